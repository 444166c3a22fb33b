"""How the engine runs K models of one architecture as one: the *model batch*.

:func:`bnbook.train.fit` never loops over models. It hands the K models to
:func:`batch_models`, which returns a :class:`ModelBatch` — an ``nn.Module`` mapping inputs
(K, B, ...) to outputs (K, B, ...) whose parameters and buffers are *stacked* tensors with a
leading model dimension. Two implementations sit behind that one interface, chosen by type:

- :class:`StackedMLP` for the MLPs of chapters 3 and 4 (``nets.MLP`` with BN or no norm):
  each layer is one batched matrix product, and the backward pass is written out by hand
  (:meth:`StackedMLP.loss_and_grad`). It is the fast path on a CPU (about 1.8× ``vmap`` on
  chapter 3's MLP; the performance appendix measures it).
- :class:`VmapBatch` for every other module (CNNs, ResNets, the deep linear network, any
  norm): ``torch.func.stack_module_state`` stacks the models' state, and
  ``vmap(functional_call)`` runs the stack; ``vmap`` turns each convolution into one grouped
  convolution, so K small nets fill a GPU as one larger net.

Either way the original models stay usable: their parameters and buffers are rebound as
*views* into the stacked tensors, so during training (in a step hook, say) and after it
each model holds the live numbers, with no copying. :meth:`ModelBatch.release` gives them
storage of their own again at the end of ``fit``.

Freezing is part of the contract. A stacked tensor is trainable only if the corresponding
tensor is trainable in the models (``requires_grad``; it must agree across the K models),
and element-wise masks set with :func:`set_trainable_mask` are re-imposed after every
optimiser step, so frozen entries keep their values exactly — under momentum and weight
decay too.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from bnbook import norms
from bnbook.errors import BnbookError
from bnbook.nets import _ACT_BACKWARD, _ACT_FUNCS, MLP

MASK_ATTR = "_bnbook_trainable_mask"


def set_trainable_mask(param: nn.Parameter, mask: Tensor | None) -> None:
    """Train only the entries of ``param`` where ``mask`` is True; the others keep their value (``None`` clears).

    Frankle et al.'s control trains a random subset of a layer's weights: this is how a model
    says which. The engine honours it on every path (a test checks that masked entries never move).
    """
    if mask is None:
        if hasattr(param, MASK_ATTR):
            delattr(param, MASK_ATTR)
        return
    if mask.shape != param.shape or mask.dtype != torch.bool:
        raise BnbookError(f"a trainable mask must be a bool tensor of the parameter's shape {tuple(param.shape)}")
    setattr(param, MASK_ATTR, mask.to(param.device))


def trainable_mask(param: Tensor) -> Tensor | None:
    """The element-wise trainable mask of ``param`` (:func:`set_trainable_mask`), or ``None``."""
    return getattr(param, MASK_ATTR, None)


class ModelBatch(nn.Module):
    """K models run as one: ``forward`` maps (K, B, ...) to (K, B, ...); state is stacked along dim 0.

    Subclasses set ``self.k`` and ``self.names`` (parameter names, the models' own) and keep,
    for each name, the stacked tensor in ``self.stacked_params[name]``.
    """

    k: int
    fast_backward: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _bind(self, models: Sequence[nn.Module], stacked: dict[str, Tensor], view) -> None:
        """Make each model's tensor ``name`` a view ``view(stacked[name], k)`` of the stacked tensor."""
        for k, m in enumerate(models):
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                if name not in stacked:
                    continue
                v = view(name, stacked[name].detach(), k)
                if isinstance(t, nn.Parameter):
                    t.data = v
                else:
                    mod, attr = _owner(m, name)
                    mod._buffers[attr] = v

    def _collect_masks(self, models: Sequence[nn.Module], stacked: dict[str, Tensor], view) -> None:
        named = [dict(m.named_parameters()) for m in models]
        for name in stacked:
            masks = [trainable_mask(p[name]) for p in named if name in p]
            if not masks or all(mk is None for mk in masks):
                continue
            if any(mk is None for mk in masks):
                raise BnbookError(f"parameter {name!r} has a trainable mask in some models but not in others")
            full = torch.empty_like(stacked[name], dtype=torch.bool)
            for k, mk in enumerate(masks):
                view(name, full, k).copy_(mk)
            self._masks[name] = (full, stacked[name].detach().clone())

    def trainable(self) -> list[Tensor]:
        """The stacked tensors the optimiser updates."""
        return [t for _, t in self.named_trainable()]

    def named_trainable(self) -> list[tuple[str, Tensor]]:
        """(model parameter name, stacked tensor) of every trainable tensor."""
        return [(n, t) for n, t in self.stacked_params.items() if t.requires_grad]

    def train(self, mode: bool = True) -> ModelBatch:
        """Training or inference mode for the batch and for every model (their norms follow it)."""
        super().train(mode)
        for m in getattr(self, "_models", []):
            m.train(mode)
        return self

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Put back the frozen entries of element-wise masked tensors (after an optimiser step)."""
        for name, (mask, initial) in self._masks.items():
            t = self.stacked_params[name]
            t.copy_(torch.where(mask, t, initial))

    def release(self, models: Sequence[nn.Module]) -> None:
        """Give every model storage of its own again (contiguous copies of its views)."""
        for m in models:
            for p in m.parameters():
                p.data = p.data.clone(memory_format=torch.contiguous_format)
            for mod in m.modules():
                for attr, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[attr] = b.clone(memory_format=torch.contiguous_format)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    mod = model
    for part in path:
        mod = getattr(mod, part)
    return mod, attr


def _requires_grad(models: Sequence[nn.Module], name: str) -> bool:
    flags = {dict(m.named_parameters())[name].requires_grad for m in models}
    if len(flags) != 1:
        raise BnbookError(f"parameter {name!r} is frozen in some models but not in others: one fit call, one freezing")
    return flags.pop()


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    first = [(n, tuple(t.shape), t.dtype) for n, t in models[0].state_dict().items()]
    for m in models[1:]:
        if type(m) is not type(models[0]) or [(n, tuple(t.shape), t.dtype) for n, t in m.state_dict().items()] != first:
            raise BnbookError("fit trains models of one architecture at a time (same type, same tensor names and shapes)")


# ---------------------------------------------------------------- the general path
class VmapBatch(ModelBatch):
    """Any K models of one architecture, run with ``torch.func.vmap`` over their stacked state.

    Random draws inside the models (noisy BN, dropout) differ between models
    (``randomness="different"``); they come from the global generator, so a run is reproducible
    from its seed, but a model with random layers does not draw the same noise trained beside
    others as trained alone (deterministic models give identical numbers either way). Inputs
    shared by all models (evaluation) are not copied K times.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        from torch.func import stack_module_state

        _check_same_architecture(models)
        self.k = len(models)
        params, buffers = stack_module_state(list(models))
        self.stacked_params = {n: t.detach().requires_grad_(_requires_grad(models, n)) for n, t in params.items()}
        self.stacked_buffers = buffers
        object.__setattr__(self, "_base", copy.deepcopy(models[0]).to("meta"))  # not a submodule
        self._bind(models, {**self.stacked_params, **self.stacked_buffers}, lambda n, t, k: t[k])
        self._collect_masks(models, self.stacked_params, lambda n, t, k: t[k])
        self._models = list(models)

    def train(self, mode: bool = True) -> VmapBatch:
        super().train(mode)
        self._base.train(mode)
        return self

    def _call(self, x: Tensor, shared: bool) -> Tensor:
        from torch.func import functional_call, vmap

        def one(p, b, xx):
            return functional_call(self._base, (p, b), (xx,))

        if self.k == 1:  # one model needs no vmap (and vmap's per-op dispatch costs up to 2x on small nets)
            first = {n: t[0] for n, t in self.stacked_params.items()}, {n: t[0] for n, t in self.stacked_buffers.items()}
            return one(*first, x if shared else x[0]).unsqueeze(0)
        in_dims = (0, 0, None if shared else 0)
        return vmap(one, in_dims=in_dims, randomness="different")(self.stacked_params, self.stacked_buffers, x)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (K, B, ...) of inputs (K, B, ...): model k sees x[k] only."""
        return self._call(x, shared=False)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Outputs (K, B, ...) of one input batch (B, ...) given to every model."""
        return self._call(x, shared=True)


# ---------------------------------------------------------------- the fast MLP path
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
    if type(model) is not MLP or any(type(lin) is not nn.Linear for lin in (*model.linears, model.readout)):
        return None  # weight-standardised (or otherwise special) layers run on the general path
    kinds = []
    for n in model.norms:
        if isinstance(n, nn.Identity):
            kinds.append(None)
        elif _stackable_bn(n):
            kinds.append(("bn", float(n.eps), float(n.momentum)))
        else:
            return None
    if len(set(kinds)) != 1:
        return None  # mixed normalised / plain layers: leave it to the general path
    dtype = next(model.parameters()).dtype
    return (model.in_features, model.hidden_sizes, model.num_classes, model.activation, model.hidden_bias, kinds[0], dtype)


class StackedMLP(ModelBatch):
    """K MLPs of one shape, run together: inputs (K, B, in) → logits (K, B, classes).

    Weights are stored as (K, in, out) so that a layer is one ``baddbmm``; BN statistics
    are taken per model over its own batch (dimension 1), exactly as K separate
    :class:`bnbook.norms.BatchNorm` layers would, including the running averages. The
    models' ``Linear`` weights are bound as transposed views of the stacked weights.
    """

    fast_backward = True

    def __init__(self, models: Sequence[MLP]) -> None:
        super().__init__()
        sigs = {stack_signature(m) for m in models}
        if not models or None in sigs or len(sigs) != 1:
            raise BnbookError("StackedMLP needs one or more MLPs of one shape with no norm or BatchNorm layers")
        in_features, hidden, num_classes, activation, bias, bn, _ = sigs.pop()
        self.k = k = len(models)
        self.act = _ACT_FUNCS[activation]
        self.act_backward = _ACT_BACKWARD[activation]
        self.bn = bn is not None
        self.eps, self.momentum = (bn[1], bn[2]) if bn else (0.0, 0.0)
        self.n_layers = len(hidden) + 1
        with torch.no_grad():
            stacked: dict[str, Tensor] = {}
            for i in range(self.n_layers):
                name = f"linears.{i}" if i < len(hidden) else "readout"
                stacked[f"{name}.weight"] = torch.stack([_layer(m, i).weight.t() for m in models]).contiguous()
                if _layer(models[0], i).bias is not None:
                    stacked[f"{name}.bias"] = torch.stack([_layer(m, i).bias for m in models]).unsqueeze(1).contiguous()
                if self.bn and i < len(hidden):
                    for suffix in ("weight", "bias", "running_mean", "running_var"):
                        stacked[f"norms.{i}.{suffix}"] = torch.stack(
                            [getattr(m.norms[i], suffix) for m in models]
                        ).unsqueeze(1).contiguous()
                    stacked[f"norms.{i}.num_batches_tracked"] = torch.stack(
                        [m.norms[i].num_batches_tracked for m in models]
                    )
        param_names = {n for n, _ in models[0].named_parameters()}
        self.stacked_params = {n: t.requires_grad_(_requires_grad(models, n)) for n, t in stacked.items() if n in param_names}
        self.stacked_buffers = {n: t for n, t in stacked.items() if n not in param_names}

        def view(name: str, t: Tensor, k: int) -> Tensor:
            if name.endswith("num_batches_tracked"):
                return t[k]
            if name.endswith("weight") and not name.startswith("norms"):
                return t[k].t()
            return t[k, 0]

        self._bind(models, stacked, view)
        self._collect_masks(models, self.stacked_params, view)
        self._models = list(models)

    def _p(self, name: str) -> Tensor | None:
        return self.stacked_params.get(name, self.stacked_buffers.get(name))

    def _lin(self, i: int) -> str:
        return f"linears.{i}" if i < self.n_layers - 1 else "readout"

    def _linear(self, i: int, h: Tensor) -> Tensor:
        w, b = self._p(f"{self._lin(i)}.weight"), self._p(f"{self._lin(i)}.bias")
        return torch.bmm(h, w) if b is None else torch.baddbmm(b, h, w)

    def _norm(self, i: int, z: Tensor) -> Tensor:
        if not self.bn:
            return z
        rm, rv = self._p(f"norms.{i}.running_mean"), self._p(f"norms.{i}.running_var")
        if self.training:
            # Algorithm 1: per model and feature, the batch mean and biased variance over dim 1
            # (written out: torch.var_mean over a middle dimension is ~15x slower on CPU)
            mean = z.mean(1, keepdim=True)
            var = (z - mean).square().mean(1, keepdim=True)
            m = z.shape[1]
            with torch.no_grad():
                rm.lerp_(mean, self.momentum)
                rv.lerp_(var * (m / (m - 1)), self.momentum)
                self._p(f"norms.{i}.num_batches_tracked").add_(1)
        else:
            mean, var = rm, rv
        return (z - mean) * torch.rsqrt(var + self.eps) * self._p(f"norms.{i}.weight") + self._p(f"norms.{i}.bias")

    def forward(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of inputs (K, B, ...); in training mode BN uses and updates batch statistics."""
        h = x.reshape(self.k, x.shape[1], -1)
        for i in range(self.n_layers - 1):
            h = self.act(self._norm(i, self._linear(i, h)))
        return self._linear(self.n_layers - 1, h)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of one input batch (B, ...) given to every model."""
        return self(x.unsqueeze(0).expand(self.k, *x.shape))

    @torch.no_grad()
    def loss_and_grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One training step's forward and backward pass, written out by hand (no autograd).

        Returns the per-model mean cross-entropy (K,) and the number of correct predictions
        (K,) on inputs ``x`` (K, B, ...) and labels ``y`` (K, B), and *sets* the ``.grad`` of
        every trainable stacked tensor to the gradient of that model's loss (frozen ones get
        none); BN running averages are updated as in :meth:`forward`. The same numbers as
        ``per_model_loss(self(x), y).sum().backward()`` (a test checks it in float64) with
        fewer operations. BN's backward is the compact form of Ioffe & Szegedy §3 (γ is
        constant over the batch, so it factors out):
        ∂ℓ/∂z = γ/(σ·B) · (B ∂ℓ/∂u − Σ ∂ℓ/∂u − x̂ Σ ∂ℓ/∂u x̂).
        """
        k, b = self.k, x.shape[1]
        p = self._p
        h = x.reshape(k, b, -1)
        n_hidden = self.n_layers - 1
        cache = []
        for i in range(n_hidden):
            z = self._linear(i, h)
            if self.bn:
                mean = z.mean(1, keepdim=True)
                zc = z.sub_(mean)
                var = zc.square().mean(1, keepdim=True)
                rstd = (var + self.eps).rsqrt_()
                x_hat = zc.mul_(rstd)
                u = torch.addcmul(p(f"norms.{i}.bias"), x_hat, p(f"norms.{i}.weight"))
                p(f"norms.{i}.running_mean").lerp_(mean, self.momentum)
                p(f"norms.{i}.running_var").lerp_(var * (b / (b - 1)), self.momentum)
                p(f"norms.{i}.num_batches_tracked").add_(1)
            else:
                x_hat = rstd = None
                u = z
            a = self.act(u)
            cache.append((h, x_hat, rstd, a))
            h = a
        logits = self._linear(n_hidden, h)
        correct = (logits.argmax(-1) == y.reshape(k, b)).sum(1)
        log_p = torch.log_softmax(logits, -1)
        target = y.reshape(k, b, 1)
        losses = -log_p.gather(-1, target).squeeze(-1).mean(1)
        g = log_p.exp_()  # softmax − one-hot, over the batch: ∂(mean loss)/∂logits
        g.scatter_add_(-1, target, torch.full_like(target, -1, dtype=g.dtype))
        g.mul_(1.0 / b)

        def set_grad(name: str, value) -> None:
            t = self.stacked_params[name]
            if t.requires_grad:
                t.grad = value() if callable(value) else value

        out = self._lin(n_hidden)
        set_grad(f"{out}.weight", lambda: torch.bmm(h.transpose(1, 2), g))
        set_grad(f"{out}.bias", lambda: g.sum(1, keepdim=True))
        dh = torch.bmm(g, p(f"{out}.weight").transpose(1, 2))
        for i in reversed(range(n_hidden)):
            h_in, x_hat, rstd, a = cache[i]
            du = self.act_backward(dh, a)
            if self.bn:
                d_beta = du.sum(1, keepdim=True)
                d_gamma = (du * x_hat).sum(1, keepdim=True)
                set_grad(f"norms.{i}.bias", d_beta)
                set_grad(f"norms.{i}.weight", d_gamma)
                dz = torch.addcmul(du - d_beta / b, x_hat, d_gamma, value=-1.0 / b).mul_(p(f"norms.{i}.weight") * rstd)
            else:
                dz = du
            if p(f"linears.{i}.bias") is not None:
                set_grad(f"linears.{i}.bias", lambda: dz.sum(1, keepdim=True))
            set_grad(f"linears.{i}.weight", lambda: torch.bmm(h_in.transpose(1, 2), dz))
            if i > 0:
                dh = torch.bmm(dz, p(f"linears.{i}.weight").transpose(1, 2))
        return losses, correct


def _layer(m: MLP, i: int) -> nn.Linear:
    return m.linears[i] if i < len(m.linears) else m.readout


def batch_models(models: Sequence[nn.Module], fast: bool = True) -> ModelBatch:
    """The :class:`ModelBatch` that runs ``models``: :class:`StackedMLP` where it applies (and ``fast``), else :class:`VmapBatch`.

    The models' parameters and buffers become views into the batch (see the module docstring).
    """
    models = list(models)
    if not models:
        raise BnbookError("a model batch needs at least one model")
    sigs = {stack_signature(m) for m in models}
    if fast and None not in sigs and len(sigs) == 1:
        return StackedMLP(models)
    return VmapBatch(models)
