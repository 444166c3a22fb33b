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

# d activation / d input, written in terms of the activation's *output* a
_ACT_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sigmoid": lambda grad, a: torch.ops.aten.sigmoid_backward(grad, a),  # grad · a(1 − a)
    "tanh": lambda grad, a: torch.ops.aten.tanh_backward(grad, a),  # grad · (1 − a²)
    "relu": lambda grad, a: torch.ops.aten.threshold_backward(grad, a, 0),  # grad · [a > 0]
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
        self.act_backward = _ACT_BACKWARD[activation]
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
        """Stack ``models`` (same :func:`stack_signature`) into one module on their device, in their dtype."""
        sigs = {stack_signature(m) for m in models}
        if not models or None in sigs or len(sigs) != 1:
            raise BnbookError("StackedMLP needs one or more MLPs of one shape with no norm or BatchNorm layers")
        first = next(models[0].parameters())
        stack = cls(sigs.pop(), len(models)).to(device=first.device, dtype=first.dtype)
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
            # (written out: torch.var_mean over a middle dimension is ~15x slower on CPU)
            mean = z.mean(1, keepdim=True)
            var = (z - mean).square().mean(1, keepdim=True)
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

    @torch.no_grad()
    def loss_and_grad(self, x: Tensor, y: Tensor) -> Tensor:
        """One training step's forward and backward pass, written out by hand (no autograd).

        Returns the per-model mean cross-entropy (K,) on inputs ``x`` (K, B, ...) and labels
        ``y`` (K, B), and *sets* the ``.grad`` of every parameter to the gradient of that
        model's loss; BN running averages are updated as in :meth:`forward`. This is the
        engine's fast path: the same numbers as ``per_model_loss(self(x), y).sum().backward()``
        (a test checks it in float64) with fewer operations. BN's backward is the
        compact form of Ioffe & Szegedy §3 (γ is constant over the batch, so it factors out):
        ∂ℓ/∂z = γ/(σ·B) · (B ∂ℓ/∂u − Σ ∂ℓ/∂u − x̂ Σ ∂ℓ/∂u x̂).
        """
        k, b = self.k, x.shape[1]
        h = x.reshape(k, b, -1)
        n_hidden = len(self.weights) - 1
        cache = []
        for i in range(n_hidden):
            z = self._linear(i, h)
            if self.bn:
                mean = z.mean(1, keepdim=True)
                zc = z.sub_(mean)
                var = zc.square().mean(1, keepdim=True)
                rstd = (var + self.eps).rsqrt_()
                x_hat = zc.mul_(rstd)
                u = torch.addcmul(self.betas[i], x_hat, self.gammas[i])
                getattr(self, f"running_mean{i}").lerp_(mean, self.momentum)
                getattr(self, f"running_var{i}").lerp_(var * (b / (b - 1)), self.momentum)
                getattr(self, f"num_batches_tracked{i}").add_(1)
            else:
                x_hat = rstd = None
                u = z
            a = self.act(u)
            cache.append((h, x_hat, rstd, a))
            h = a
        logits = self._linear(n_hidden, h)
        log_p = torch.log_softmax(logits, -1)
        target = y.reshape(k, b, 1)
        losses = -log_p.gather(-1, target).squeeze(-1).mean(1)
        g = log_p.exp_()  # softmax − one-hot, over the batch: ∂(mean loss)/∂logits
        g.scatter_add_(-1, target, torch.full_like(target, -1, dtype=g.dtype))
        g.mul_(1.0 / b)
        self.weights[n_hidden].grad = torch.bmm(h.transpose(1, 2), g)
        self.biases[n_hidden].grad = g.sum(1, keepdim=True)
        dh = torch.bmm(g, self.weights[n_hidden].transpose(1, 2))
        for i in reversed(range(n_hidden)):
            h_in, x_hat, rstd, a = cache[i]
            du = self.act_backward(dh, a)
            if self.bn:
                d_beta = du.sum(1, keepdim=True)
                d_gamma = (du * x_hat).sum(1, keepdim=True)
                self.betas[i].grad, self.gammas[i].grad = d_beta, d_gamma
                dz = torch.addcmul(du - d_beta / b, x_hat, d_gamma, value=-1.0 / b).mul_(self.gammas[i] * rstd)
            else:
                dz = du
            if self.biases[i] is not None:
                self.biases[i].grad = dz.sum(1, keepdim=True)
            self.weights[i].grad = torch.bmm(h_in.transpose(1, 2), dz)
            if i > 0:
                dh = torch.bmm(dz, self.weights[i].transpose(1, 2))
        return losses


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
                per_model.append(_batch_stats_no_update(m).pre_activations(x[k]))
            else:
                was_training = m.training
                m.eval()  # running statistics, and no update of them
                per_model.append(m.pre_activations(x[k]))
                m.train(was_training)
        return [torch.stack(layer) for layer in zip(*per_model)]

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Nothing to copy: the stack holds the models themselves."""


def _batch_stats_no_update(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in training mode whose norm layers don't update running statistics."""
    clone = copy.deepcopy(model)  # small models only (probes); the original's buffers stay untouched
    clone.train()
    return clone



# ---------------------------------------------------------------- packed nets (chapter 5)
# K independent networks of one shape packed side by side as channel *groups* of one
# network: every convolution has ``groups=K`` (model k's channels only see model k's
# channels), BN-like layers are per channel anyway, and a "per-sample" norm (GN, LN) is a
# GroupNorm whose groups never straddle two models. Unlike StackedMLP this works for any
# normaliser of chapter 5, and for convolutions. The calling convention is the engine's
# stack protocol: inputs (K, B, ...) -> logits (K, B, classes), attribute ``k``.

PACKED_NORMS = ("none", "bn", "brn", "gn", "ln")
"""Base normalisers of the packed nets; prefix ``"ws+"`` adds Weight Standardization
(``"ws"`` alone = ``"ws+none"``)."""


def parse_norm_kind(kind: str) -> tuple[bool, str]:
    """Split a chapter-5 norm name like ``"ws+gn"`` into (weight standardised?, base norm)."""
    name = "ws+none" if kind == "ws" else kind
    ws = name.startswith("ws+")
    base = name.removeprefix("ws+")
    if base not in PACKED_NORMS:
        raise BnbookError(
            f"unknown norm {kind!r}: use one of {', '.join(PACKED_NORMS)}, optionally prefixed 'ws+' (or 'ws')"
        )
    return ws, base


def packed_norm(
    base: str,
    channels: int,
    models: int,
    group_size: int = 4,
    renorm: dict | None = None,
) -> nn.Module | None:
    """The norm layer for ``models`` packed nets of ``channels`` channels each (``None`` for "none").

    ``gn`` uses groups of ``group_size`` channels; ``ln`` is Wu & He's LN, one group per
    model (= GroupNorm(1, C) per model); ``brn`` passes ``renorm`` to BatchRenorm.
    """
    total = channels * models
    if base == "none":
        return None
    if base == "bn":
        return norms.BatchNorm(total)
    if base == "brn":
        return norms.BatchRenorm(total, **(renorm or {}))
    if base == "ln":
        return norms.GroupNorm(models, total)
    if base == "gn":
        if channels % group_size:
            raise BnbookError(f"GroupNorm: {channels} channels are not a multiple of the group size {group_size}")
        return norms.GroupNorm(total // group_size, total)
    raise BnbookError(f"unknown base norm {base!r}; known: {', '.join(PACKED_NORMS)}")


def _init_packed(weight: Tensor, bias: Tensor | None, seeds: Sequence[int], scheme: str) -> None:
    """Initialise each model's slice of a packed weight from its own seed (model k depends on seeds[k] only).

    ``scheme``: ``"he"`` N(0, 2/fan_in) (for ReLU nets), or ``"default"`` U(±1/√fan_in) as nn.Linear.
    """
    k = len(seeds)
    per = weight.shape[0] // k
    fan_in = weight[0].numel()
    with torch.no_grad():
        for i, s in enumerate(seeds):
            gen = torch.Generator().manual_seed(int(s))
            shape = (per, *weight.shape[1:])
            if scheme == "he":
                w = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
            else:
                w = (torch.rand(shape, generator=gen) * 2 - 1) * fan_in**-0.5
            weight[i * per : (i + 1) * per].copy_(w)
            if bias is not None:
                bias[i * per : (i + 1) * per].zero_()


class _Packed(nn.Module):
    """Shared bookkeeping of the packed nets: K, seeds and the (K, B, ...) calling convention."""

    def __init__(self, norm: str, models: int, seeds: Sequence[int] | None) -> None:
        super().__init__()
        if models < 1:
            raise BnbookError(f"a packed net needs at least one model, got {models}")
        self.k = models
        self.seeds = list(range(models)) if seeds is None else [int(s) for s in seeds]
        if len(self.seeds) != models:
            raise BnbookError(f"{models} models but {len(self.seeds)} seeds")
        self.norm_kind = norm
        self.ws, self.base_norm = parse_norm_kind(norm)

    def _check_input(self, x: Tensor, dims: int) -> None:
        if x.dim() != dims or x.shape[0] != self.k:
            raise BnbookError(f"{type(self).__name__} expects inputs (K={self.k}, B, ...) with {dims} dims, got {tuple(x.shape)}")


class PackedCNN(_Packed):
    """K small CNNs run as one: blocks ``conv3×3 → norm → ReLU`` (the first conv with stride
    ``stem_stride``, a 2×2 max-pool between blocks), global average pooling, a linear
    read-out. Chapter 5's net for the batch-size sweep: on 28×28 inputs with the defaults
    the blocks see 14×14, 7×7 and 3×3 maps, so BN's last layer has m = 9·N values per
    channel — few, as in the last stage of an ImageNet ResNet (7×7).

    Args:
        in_channels: input channels (1 for Fashion-MNIST, 3 for CIFAR-10).
        num_classes: outputs of the read-out.
        widths: channels of each block (per model).
        stem_stride: stride of the first convolution.
        norm: ``none``, ``bn``, ``brn``, ``gn``, ``ln``, optionally prefixed ``ws+`` (see :func:`parse_norm_kind`).
        models: K, the number of packed models.
        seeds: initialisation seed of each model (default 0..K-1); He-normal conv weights.
        group_size: channels per group for ``gn``.
        renorm: keyword arguments of :class:`bnbook.norms.BatchRenorm` (its r/d schedule) for ``brn``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        stem_stride: int = 2,
        norm: str = "bn",
        models: int = 1,
        seeds: Sequence[int] | None = None,
        group_size: int = 4,
        renorm: dict | None = None,
    ) -> None:
        super().__init__(norm, models, seeds)
        if in_channels < 1 or num_classes < 1 or not widths or any(w < 1 for w in widths):
            raise BnbookError(f"PackedCNN sizes must be positive, got in={in_channels}, widths={tuple(widths)}")
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, tuple(widths)
        k = models
        conv = norms.WSConv2d if self.ws else nn.Conv2d
        bias = self.base_norm == "none"
        sizes = (in_channels, *self.widths)
        self.convs = nn.ModuleList(
            conv(k * a, k * b, 3, stride=stem_stride if i == 0 else 1, padding=1, groups=k, bias=bias)
            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))
        )
        layers = [packed_norm(self.base_norm, w, k, group_size, renorm) for w in self.widths]
        self.norms = nn.ModuleList(nn.Identity() if n is None else n for n in layers)
        self.readout = nn.Conv2d(k * self.widths[-1], k * num_classes, 1, groups=k)
        for c in self.convs:
            _init_packed(c.weight, c.bias, self.seeds, "he")
        _init_packed(self.readout.weight, self.readout.bias, [s + 10_000 for s in self.seeds], "default")

    def features(self, x: Tensor) -> list[Tensor]:
        """Each block's norm *input* (the conv output), (B, K·C, H, W) per block: what BN's statistics see."""
        out = []
        h = self._pack(x)
        for i, (c, n) in enumerate(zip(self.convs, self.norms)):
            z = c(h)
            out.append(z)
            h = torch.relu(n(z))
            if i < len(self.convs) - 1:
                h = nn.functional.max_pool2d(h, 2)
        return out

    def _pack(self, x: Tensor) -> Tensor:
        self._check_input(x, 5)
        k, b, c, hgt, wid = x.shape
        return x.transpose(0, 1).reshape(b, k * c, hgt, wid)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of inputs (K, B, C, H, W): model k sees x[k] only."""
        h = self._pack(x)
        for i, (c, n) in enumerate(zip(self.convs, self.norms)):
            h = torch.relu(n(c(h)))
            if i < len(self.convs) - 1:
                h = nn.functional.max_pool2d(h, 2)
        h = self.readout(h.mean(dim=(2, 3), keepdim=True))  # (B, K·classes, 1, 1)
        return h.reshape(h.shape[0], self.k, self.num_classes).transpose(0, 1)


class PackedMLP(_Packed):
    """K MLPs ``Linear → norm → activation`` run as one (grouped 1×1 convolutions), for any chapter-5 norm.

    Same architecture and default initialisation as :class:`MLP` (PyTorch's U(±1/√fan_in)),
    each model's weights drawn from its own seed; hidden biases only without a norm.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: str = "bn",
        models: int = 1,
        seeds: Sequence[int] | None = None,
        renorm: dict | None = None,
    ) -> None:
        super().__init__(norm, models, seeds)
        if in_features < 1 or num_classes < 1 or not hidden or any(h < 1 for h in hidden):
            raise BnbookError(f"PackedMLP sizes must be positive, got in={in_features}, hidden={tuple(hidden)}")
        self.in_features, self.hidden_sizes, self.num_classes = in_features, tuple(hidden), num_classes
        self.act = _ACT_FUNCS[_check_activation(activation)]
        k = models
        lin = norms.WSConv1d if self.ws else nn.Conv1d
        bias = self.base_norm == "none"
        sizes = (in_features, *self.hidden_sizes)
        if self.base_norm == "gn":
            raise BnbookError("PackedMLP has no GroupNorm variant: use 'ln' (one group per model)")
        self.linears = nn.ModuleList(lin(k * a, k * b, 1, groups=k, bias=bias) for a, b in zip(sizes, sizes[1:]))
        layers = [packed_norm(self.base_norm, h, k, renorm=renorm) for h in self.hidden_sizes]
        self.norms = nn.ModuleList(nn.Identity() if n is None else n for n in layers)
        self.readout = nn.Conv1d(k * sizes[-1], k * num_classes, 1, groups=k)
        for i, layer in enumerate([*self.linears, self.readout]):
            _init_packed(layer.weight, layer.bias, [s + 10_000 * i for s in self.seeds], "default")

    def _pack(self, x: Tensor) -> Tensor:
        self._check_input(x.flatten(2), 3)
        k, b = x.shape[:2]
        return x.reshape(k, b, -1).transpose(0, 1).reshape(b, -1, 1)

    def features(self, x: Tensor) -> list[Tensor]:
        """Each hidden layer's norm input, (B, K·width, 1) per layer."""
        out, h = [], self._pack(x)
        for lin, n in zip(self.linears, self.norms):
            z = lin(h)
            out.append(z)
            h = self.act(n(z))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of inputs (K, B, ...) (flattened from dim 2)."""
        h = self._pack(x)
        for lin, n in zip(self.linears, self.norms):
            h = self.act(n(lin(h)))
        h = self.readout(h)
        return h.reshape(h.shape[0], self.k, self.num_classes).transpose(0, 1)
