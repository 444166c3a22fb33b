"""Networks of the book: the MLP of Ioffe & Szegedy's MNIST experiment (chapter 3), and
its *stacked* twin that the training engine (:mod:`bnbook.train`) uses to run several
seeds in one pass.

- :class:`MLP` is an ordinary ``nn.Module``: ``Linear → [norm] → activation`` blocks and a
  linear read-out. The normalisation layer is a *spec*: ``None`` (no normalisation),
  ``"bn"`` (our :class:`bnbook.norms.BatchNorm`), ``"torch-bn"`` (``nn.BatchNorm1d``), or any
  factory ``num_features -> nn.Module`` (e.g. ``functools.partial(norms.BatchNorm, eps=1e-3)``
  or a layer norm of chapter 5). Biases of a linear layer followed by a normalisation are
  dropped by default, since β takes their role (§3.2 of the paper).
- :class:`StackedMLP` holds K MLPs of one shape as stacked tensors ``(K, in, out)`` and
  runs them together with batched matrix products (``torch.baddbmm``). It is built from,
  and written back into, ordinary :class:`MLP` objects, so a stack is only an execution
  detail: every result belongs to one plain model with one seed.

Other chapters append their networks (e.g. a small CNN) below; the engine trains any
``nn.Module`` (stacking is used where it applies, a plain loop otherwise).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from bnbook import norms
from bnbook.errors import BnbookError

NormSpec = None | str | Callable[[int], nn.Module]
"""How to build a normalisation layer: ``None``, ``"bn"``, ``"torch-bn"`` or a factory."""

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}

_ACT_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
}


def make_norm(norm: NormSpec, num_features: int) -> nn.Module | None:
    """Return the normalisation layer that ``norm`` names for ``num_features`` features (or ``None``)."""
    if norm is None or norm == "none":
        return None
    if norm == "bn":
        return norms.BatchNorm(num_features)
    if norm == "torch-bn":
        return nn.BatchNorm1d(num_features)
    if callable(norm):
        return norm(num_features)
    raise BnbookError(f"unknown norm {norm!r}: use None, 'bn', 'torch-bn' or a factory num_features -> nn.Module")


def _check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise BnbookError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return name


class MLP(nn.Module):
    """Fully connected net: ``hidden`` blocks ``Linear → [norm] → activation``, then a linear read-out.

    Chapter 3 uses ``MLP(784, (100, 100, 100), 10, "sigmoid", norm="bn")`` (Ioffe & Szegedy §4.1).

    Args:
        in_features: size of one (flattened) input.
        hidden: widths of the hidden layers.
        num_classes: outputs of the read-out layer (logits; the loss applies the softmax).
        activation: ``"sigmoid"``, ``"relu"`` or ``"tanh"``.
        norm: the normalisation spec (see :data:`NormSpec`), applied before every activation.
        init_std: if given, weights are drawn from N(0, init_std²) and biases set to 0;
            if ``None``, PyTorch's default ``nn.Linear`` initialisation is kept.
        bias: whether hidden linear layers have a bias; default: only when ``norm`` is None.
        seed: if given, the initialisation uses its own generator seeded with it, so a model
            depends on its seed only (not on what was drawn before).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: NormSpec = None,
        init_std: float | None = None,
        bias: bool | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise BnbookError(f"MLP sizes must be positive, got in={in_features}, hidden={tuple(hidden)}, out={num_classes}")
        if init_std is not None and not init_std > 0:
            raise BnbookError(f"init_std must be positive, got {init_std}")
        self.in_features = in_features
        self.hidden_sizes = tuple(int(h) for h in hidden)
        self.num_classes = num_classes
        self.activation = _check_activation(activation)
        self.norm_spec = norm
        self.hidden_bias = (norm is None or norm == "none") if bias is None else bias
        sizes = (in_features, *self.hidden_sizes)
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=self.hidden_bias) for a, b in zip(sizes, sizes[1:]))
        layers = [make_norm(norm, h) for h in self.hidden_sizes]
        self.norms = nn.ModuleList(nn.Identity() if n is None else n for n in layers)
        self.act = ACTIVATIONS[activation]()
        self.readout = nn.Linear(sizes[-1], num_classes)
        self.init_std = init_std
        self.reset_parameters(seed)

    @property
    def has_norm(self) -> bool:
        """Whether the hidden layers are normalised."""
        return not all(isinstance(n, nn.Identity) for n in self.norms)

    def reset_parameters(self, seed: int | None = None) -> None:
        """(Re-)initialise the weights: N(0, init_std²) or PyTorch's default, from ``seed`` if given."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for lin in [*self.linears, self.readout]:
            if self.init_std is None:
                # PyTorch's default: U(-1/√fan_in, 1/√fan_in) for weights and biases
                bound = lin.in_features**-0.5
                with torch.no_grad():
                    lin.weight.copy_(torch.empty_like(lin.weight, device="cpu").uniform_(-bound, bound, generator=gen))
                    if lin.bias is not None:
                        lin.bias.copy_(torch.empty_like(lin.bias, device="cpu").uniform_(-bound, bound, generator=gen))
            else:
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * self.init_std)
                    if lin.bias is not None:
                        lin.bias.zero_()

    def pre_activations(self, x: Tensor) -> list[Tensor]:
        """The input of each hidden layer's activation (after the norm), one (B, width) tensor per layer."""
        out = []
        h = x.flatten(1)
        for lin, norm in zip(self.linears, self.norms):
            z = norm(lin(h))
            out.append(z)
            h = self.act(z)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of a batch of inputs (any shape; flattened from dim 1)."""
        h = x.flatten(1)
        for lin, norm in zip(self.linears, self.norms):
            h = self.act(norm(lin(h)))
        return self.readout(h)


# ---------------------------------------------------------------- stacked models
def _stackable_bn(module: nn.Module) -> bool:
    """Whether ``module`` is a BN layer whose arithmetic :class:`StackedMLP` reproduces exactly."""
    return (
        isinstance(module, (norms.BatchNorm, nn.BatchNorm1d))
        and module.affine
        and module.track_running_stats
        and module.momentum is not None
    )


def stack_signature(model: nn.Module) -> tuple | None:
    """A key equal for MLPs that :class:`StackedMLP` can run together, ``None`` if ``model`` can't be stacked."""
    if not isinstance(model, MLP):
        return None
    kinds = []
    for n in model.norms:
        if isinstance(n, nn.Identity):
            kinds.append(None)
        elif _stackable_bn(n):
            kinds.append(("bn", float(n.eps), float(n.momentum)))
        else:
            return None
    if len(set(kinds)) != 1:
        return None  # mixed normalised / plain layers: leave it to the generic path
    return (model.in_features, model.hidden_sizes, model.num_classes, model.activation, model.hidden_bias, kinds[0])


class StackedMLP(nn.Module):
    """K MLPs of one shape, run together: inputs (K, B, in) → logits (K, B, classes).

    Weights are stored as (K, in, out) so that a layer is one ``baddbmm``; BN statistics
    are taken per model over its own batch (dimension 1), exactly as K separate
    :class:`bnbook.norms.BatchNorm` layers would, including the running averages.
    Build it with :meth:`from_models` and copy the trained numbers back with :meth:`write_back`.
    """

    def __init__(self, signature: tuple, k: int) -> None:
        super().__init__()
        in_features, hidden, num_classes, activation, bias, bn = signature
        self.signature = signature
        self.k = k
        self.act = _ACT_FUNCS[activation]
        self.bn = bn is not None
        self.eps, self.momentum = (bn[1], bn[2]) if bn else (0.0, 0.0)
        sizes = (in_features, *hidden, num_classes)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(k, a, b)) for a, b in zip(sizes, sizes[1:]))
        n_hidden = len(hidden)
        biased = [bias] * n_hidden + [True]
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(k, 1, b)) if has else None for b, has in zip(sizes[1:], biased)
        )
        if self.bn:
            self.gammas = nn.ParameterList(nn.Parameter(torch.empty(k, 1, h)) for h in hidden)
            self.betas = nn.ParameterList(nn.Parameter(torch.empty(k, 1, h)) for h in hidden)
            for i, h in enumerate(hidden):
                self.register_buffer(f"running_mean{i}", torch.zeros(k, 1, h))
                self.register_buffer(f"running_var{i}", torch.ones(k, 1, h))
                self.register_buffer(f"num_batches_tracked{i}", torch.zeros(k, dtype=torch.long))

    @classmethod
    def from_models(cls, models: Sequence[MLP]) -> StackedMLP:
        """Stack ``models`` (same :func:`stack_signature`) into one module on their device."""
        sigs = {stack_signature(m) for m in models}
        if not models or None in sigs or len(sigs) != 1:
            raise BnbookError("StackedMLP needs one or more MLPs of one shape with no norm or BatchNorm layers")
        device = next(models[0].parameters()).device
        stack = cls(sigs.pop(), len(models)).to(device)
        with torch.no_grad():
            for i in range(len(stack.weights)):
                lins = [(list(m.linears) + [m.readout])[i] for m in models]
                stack.weights[i].copy_(torch.stack([lin.weight.t() for lin in lins]))
                if stack.biases[i] is not None:
                    stack.biases[i].copy_(torch.stack([lin.bias for lin in lins]).unsqueeze(1))
            if stack.bn:
                for i in range(len(stack.gammas)):
                    bns = [m.norms[i] for m in models]
                    stack.gammas[i].copy_(torch.stack([b.weight for b in bns]).unsqueeze(1))
                    stack.betas[i].copy_(torch.stack([b.bias for b in bns]).unsqueeze(1))
                    getattr(stack, f"running_mean{i}").copy_(torch.stack([b.running_mean for b in bns]).unsqueeze(1))
                    getattr(stack, f"running_var{i}").copy_(torch.stack([b.running_var for b in bns]).unsqueeze(1))
                    getattr(stack, f"num_batches_tracked{i}").copy_(torch.stack([b.num_batches_tracked for b in bns]))
        return stack

    @torch.no_grad()
    def write_back(self, models: Sequence[MLP]) -> None:
        """Copy the stack's parameters and BN buffers into ``models`` (the ones it was built from)."""
        if len(models) != self.k:
            raise BnbookError(f"write_back needs {self.k} models, got {len(models)}")
        for k, m in enumerate(models):
            for i, lin in enumerate(list(m.linears) + [m.readout]):
                lin.weight.copy_(self.weights[i][k].t())
                if self.biases[i] is not None:
                    lin.bias.copy_(self.biases[i][k, 0])
            if self.bn:
                for i, bn in enumerate(m.norms):
                    bn.weight.copy_(self.gammas[i][k, 0])
                    bn.bias.copy_(self.betas[i][k, 0])
                    bn.running_mean.copy_(getattr(self, f"running_mean{i}")[k, 0])
                    bn.running_var.copy_(getattr(self, f"running_var{i}")[k, 0])
                    bn.num_batches_tracked.copy_(getattr(self, f"num_batches_tracked{i}")[k])

    def _linear(self, i: int, h: Tensor) -> Tensor:
        b = self.biases[i]
        return torch.bmm(h, self.weights[i]) if b is None else torch.baddbmm(b, h, self.weights[i])

    def _norm(self, i: int, z: Tensor, batch_stats: bool, update: bool) -> Tensor:
        if not self.bn:
            return z
        if batch_stats:
            # Algorithm 1: per model and feature, the batch mean and biased variance over dim 1
            var, mean = torch.var_mean(z, dim=1, keepdim=True, correction=0)
            if update:
                m = z.shape[1]
                with torch.no_grad():
                    getattr(self, f"running_mean{i}").lerp_(mean, self.momentum)
                    getattr(self, f"running_var{i}").lerp_(var * (m / (m - 1)), self.momentum)
                    getattr(self, f"num_batches_tracked{i}").add_(1)
        else:
            mean, var = getattr(self, f"running_mean{i}"), getattr(self, f"running_var{i}")
        return (z - mean) * torch.rsqrt(var + self.eps) * self.gammas[i] + self.betas[i]

    def pre_activations(self, x: Tensor, batch_stats: bool | None = None) -> list[Tensor]:
        """Each hidden activation's input, (K, B, width) per layer; never updates BN running statistics.

        ``batch_stats`` (default: ``self.training``) chooses batch or running statistics for BN.
        """
        batch_stats = self.training if batch_stats is None else batch_stats
        out, h = [], x.reshape(self.k, x.shape[1], -1)
        for i in range(len(self.weights) - 1):
            z = self._norm(i, self._linear(i, h), batch_stats, update=False)
            out.append(z)
            h = self.act(z)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of inputs (K, B, ...); in training mode BN uses and updates batch statistics."""
        h = x.reshape(self.k, x.shape[1], -1)
        for i in range(len(self.weights) - 1):
            h = self.act(self._norm(i, self._linear(i, h), self.training, update=self.training))
        return self._linear(len(self.weights) - 1, h)


class ModuleStack(nn.Module):
    """The generic fallback of the engine: K arbitrary models, inputs (K, B, ...) → outputs (K, B, ...)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.k = len(models)

    def forward(self, x: Tensor) -> Tensor:
        """Each model on its own slice of the batch, outputs stacked along dimension 0."""
        return torch.stack([m(x[k]) for k, m in enumerate(self.models)])

    def pre_activations(self, x: Tensor, batch_stats: bool | None = None) -> list[Tensor]:
        """Per layer, the models' ``pre_activations`` stacked to (K, B, width); needs models that define it.

        With ``batch_stats=True`` BN layers normalise with the batch's statistics without
        touching their running averages (modules are switched to eval only for the buffers).
        """
        per_model = []
        for k, m in enumerate(self.models):
            if not hasattr(m, "pre_activations"):
                raise BnbookError(f"{type(m).__name__} has no pre_activations(): this probe needs one")
            use_batch = m.training if batch_stats is None else batch_stats
            if use_batch:
                m = _batch_stats_no_update(m)
            per_model.append(m.pre_activations(x[k]))
        return [torch.stack(layer) for layer in zip(*per_model)]

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Nothing to copy: the stack holds the models themselves."""


def _batch_stats_no_update(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in training mode whose norm layers don't update running statistics."""
    clone = copy.deepcopy(model)  # small models only (probes); the original's buffers stay untouched
    clone.train()
    return clone

