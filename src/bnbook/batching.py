"""How the engine runs K models of one architecture as one: the *model batch*.

:func:`bnbook.train.fit` never loops over models. It hands the K models to
:func:`batch_models`, which returns a :class:`ModelBatch` — an ``nn.Module`` mapping inputs
(K, B, ...) to outputs (K, B, ...) whose parameters and buffers are *stacked* tensors with a
leading model dimension. Four implementations sit behind that one interface, chosen by type:

- :class:`StackedMLP` for the MLPs of chapters 3 and 4 (``nets.MLP`` with BN or no norm):
  each layer is one batched matrix product, and the backward pass is written out by hand
  (:meth:`StackedMLP.loss_and_grad`). It is the fast path on a CPU (about 1.8× ``vmap`` on
  chapter 3's MLP; the performance appendix measures it).
- :class:`DeepLinearBatch` for Santurkar et al.'s deep linear network (``nets.DeepLinear`` with
  BN or no norm): the same stacked forward pass, and a training step computed from the batch's
  moments (a few 10×10 products per layer, exact, in float64).
- :class:`SingleModel` for one model of any other kind (the model itself), and
  :class:`VmapBatch` for several: every other module (CNNs, ResNets, the deep linear network, any
  norm): ``torch.func.stack_module_state`` stacks the models' state, and
  ``vmap(functional_call)`` runs the stack; ``vmap`` turns each convolution into one grouped
  convolution, so K small nets fill a GPU as one larger net.

Every way the original models stay usable: their parameters and buffers are rebound as
*views* into the stacked tensors (a :class:`SingleModel` trains the model's own tensors), so during training (in a step hook, say) and after it
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
from bnbook.nets import _ACT_BACKWARD, _ACT_FUNCS, MLP, DeepLinear

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
    fast_backward: bool = False  # has a hand-written loss_and_grad(x, y, loss, low) ...
    manual_losses: tuple[str, ...] = ()  # ... for these losses

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

        in_dims = (0, 0, None if shared else 0)
        return vmap(one, in_dims=in_dims, randomness="different")(self.stacked_params, self.stacked_buffers, x)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (K, B, ...) of inputs (K, B, ...): model k sees x[k] only."""
        return self._call(x, shared=False)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Outputs (K, B, ...) of one input batch (B, ...) given to every model."""
        return self._call(x, shared=True)


class SingleModel(ModelBatch):
    """A batch of one model (of any kind the fast paths don't take): the model itself, no stacking.

    Its tensors are the optimiser's (``stacked_params`` holds the model's own parameters, without
    a model dimension), and ``forward`` calls the model — no ``vmap``, no ``functional_call``,
    whose per-call cost (swapping every tensor in and out) is a fifth of a small CNN's step on
    a CPU. Trained alone or beside others, a deterministic model gives the same numbers (tested).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) != 1:
            raise BnbookError(f"SingleModel runs one model, got {len(models)}")
        (model,) = models
        self.k = 1
        self.stacked_params = dict(model.named_parameters())
        self.stacked_buffers = dict(model.named_buffers())
        self._collect_masks(models, self.stacked_params, lambda n, t, k: t)
        object.__setattr__(self, "_model", model)  # not a submodule: the batch owns nothing
        self._models = [model]

    def forward(self, x: Tensor) -> Tensor:
        """Outputs (1, B, ...) of inputs (1, B, ...)."""
        return self._model(x[0]).unsqueeze(0)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Outputs (1, B, ...) of one input batch (B, ...)."""
        return self._model(x).unsqueeze(0)

    def release(self, models: Sequence[nn.Module]) -> None:
        """Nothing to do: the model's tensors were always its own."""


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
    """A key equal for nets that :class:`StackedMLP` (MLPs) or :class:`DeepLinearBatch` (deep linear
    networks) can run together, ``None`` if ``model`` can't be stacked."""
    if type(model) not in (MLP, DeepLinear) or any(type(lin) is not nn.Linear for lin in (*model.linears, model.readout)):
        return None  # weight-standardised (or otherwise special) layers run on the general path
    if type(model) is DeepLinear:
        shape = (model.dim, (model.dim,) * (model.depth - 1), model.dim, "identity", False)
    else:
        shape = (model.in_features, model.hidden_sizes, model.num_classes, model.activation, model.hidden_bias)
    kinds = []
    for n in model.norms:
        if isinstance(n, nn.Identity):
            kinds.append(None)
        elif _stackable_bn(n):
            kinds.append(("bn", float(n.eps), float(n.momentum)))
        else:
            return None
    if len(set(kinds)) > 1:
        return None  # mixed normalised / plain layers: leave it to the general path
    dtype = next(model.parameters()).dtype
    return (*shape, kinds[0] if kinds else None, dtype, type(model).__name__)


class StackedMLP(ModelBatch):
    """K MLPs of one shape, run together: inputs (K, B, in) → logits (K, B, classes).

    Weights are stored as (K, in, out) so that a layer is one ``baddbmm``; BN statistics
    are taken per model over its own batch (dimension 1), exactly as K separate
    :class:`bnbook.norms.BatchNorm` layers would, including the running averages. The
    models' ``Linear`` weights are bound as transposed views of the stacked weights.
    """

    fast_backward = True
    manual_losses: tuple[str, ...] = ("cross_entropy",)  # what loss_and_grad computes

    def __init__(self, models: Sequence[MLP]) -> None:
        super().__init__()
        sigs = {stack_signature(m) for m in models}
        if not models or None in sigs or len(sigs) != 1:
            raise BnbookError("StackedMLP needs one or more MLPs of one shape with no norm or BatchNorm layers")
        in_features, hidden, num_classes, activation, bias, bn, _, _ = sigs.pop()
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
        z = z.to(rm.dtype)  # under autocast the product comes in bf16: statistics and normalisation in fp32
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
    def loss_and_grad(self, x: Tensor, y: Tensor, loss: str = "cross_entropy",
                      low: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        """One training step's forward and backward pass, written out by hand (no autograd).

        Returns the per-model mean cross-entropy (K,) and the number of correct predictions
        (K,) on inputs ``x`` (K, B, ...) and labels ``y`` (K, B), and *sets* the ``.grad`` of
        every trainable stacked tensor to the gradient of that model's loss (frozen ones get
        none); BN running averages are updated as in :meth:`forward`. The same numbers as
        ``per_model_loss(self(x), y).sum().backward()`` (a test checks it in float64) with
        fewer operations. BN's backward is the compact form of Ioffe & Szegedy §3 (γ is
        constant over the batch, so it factors out):
        ∂ℓ/∂z = γ/(σ·B) · (B ∂ℓ/∂u − Σ ∂ℓ/∂u − x̂ Σ ∂ℓ/∂u x̂).

        ``low`` (``torch.bfloat16``: ``FitConfig(amp="bf16")``) runs the six matrix products per
        layer in that dtype — the operands rounded, the result returned in float32, as
        ``torch.autocast`` does — and everything else (BN statistics, activations, the loss,
        the gradients the optimiser sees) in float32. A test checks it against autograd under
        autocast. On a CPU with AVX-512 BF16 the products run about 4× faster.
        """
        if loss != "cross_entropy":
            raise BnbookError(f"StackedMLP.loss_and_grad computes the cross-entropy, not {loss!r}")
        k, b = self.k, x.shape[1]
        p = self._p
        dtype = x.dtype
        # The products' operands (rounded to ``low`` once each, and kept for the backward pass) and results.
        lo = (lambda t: t.to(low)) if low is not None else (lambda t: t)
        weights = [lo(p(f"{self._lin(i)}.weight")) for i in range(self.n_layers)]

        def linear(i: int, h_lo: Tensor) -> Tensor:
            z = torch.bmm(h_lo, weights[i]).to(dtype)
            bias = p(f"{self._lin(i)}.bias")
            return z if bias is None else z.add_(bias)

        h = lo(x.reshape(k, b, -1))
        n_hidden = self.n_layers - 1
        cache = []
        for i in range(n_hidden):
            z = linear(i, h)
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
            h = lo(a)
        logits = linear(n_hidden, h)
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
        g_lo = lo(g)
        set_grad(f"{out}.weight", lambda: torch.bmm(h.transpose(1, 2), g_lo).to(dtype))
        set_grad(f"{out}.bias", lambda: g.sum(1, keepdim=True))
        dh = torch.bmm(g_lo, weights[n_hidden].transpose(1, 2)).to(dtype)
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
            dz_lo = lo(dz)
            set_grad(f"linears.{i}.weight", lambda: torch.bmm(h_in.transpose(1, 2), dz_lo).to(dtype))
            if i > 0:
                dh = torch.bmm(dz_lo, weights[i].transpose(1, 2)).to(dtype)
        return losses, correct


class DeepLinearBatch(StackedMLP):
    """K deep linear networks (:class:`bnbook.nets.DeepLinear`, no norm or BN) run together.

    The forward pass is :class:`StackedMLP`'s (with the identity as the activation). The
    training step is not: a DLN layer costs microseconds of arithmetic, so a step's cost is its
    number of operations, and :meth:`loss_and_grad` keeps that small and independent of the
    batch size because **a linear network sees a batch only through its moments**. Every layer
    is linear in x, and BN (training mode)
    normalises with the batch mean and biased variance, which follow from the mean and
    covariance of the layer's input. So each model is tracked, layer by layer, by
    H = [F | G | m]: a square root F of the layer's covariance (Σ = F Fᵀ), its covariance G
    with y, and its mean m — small matrices, whatever the batch size. A layer maps H ↦ W H; BN
    divides row j by √(Σ_jj + ε), multiplies it by γ_j and sets the mean to β_j. The loss
    summed over the batch is B·[tr Σ_out + ‖m_out − m_y‖² − 2 tr Cov(out, y) + tr Σ_y], exactly;
    its gradients are written out layer by layer (a test checks them against autograd through
    the forward pass over the batch, in float64). The arithmetic runs in
    float64 whatever the models' dtype; the gradients are handed back in it. BN's running
    averages are updated from the same moments, as a forward pass over the batch would.
    """

    manual_losses = ("squared_sum", "squared_mean")

    def __init__(self, models: Sequence[DeepLinear]) -> None:
        if any(type(m) is not DeepLinear for m in models):
            raise BnbookError("DeepLinearBatch runs nets.DeepLinear models only")
        super().__init__(models)

    @torch.no_grad()
    def loss_and_grad(self, x: Tensor, y: Tensor, loss: str = "squared_sum",
                      low: torch.dtype | None = None) -> tuple[Tensor, None]:
        """Per-model losses (K,) of inputs ``x`` (K, B, d) and targets ``y`` (K, B, d), from the batch's
        moments, with the ``.grad`` of every trainable tensor set (see the class docstring); ``low`` is
        ignored (float64 throughout). Returns (losses, None): a regression has no accuracy."""
        if loss not in self.manual_losses:
            raise BnbookError(f"DeepLinearBatch.loss_and_grad computes a squared error, not {loss!r}")
        f64 = torch.float64
        k, b = self.k, x.shape[1]
        xs, ys = x.reshape(k, b, -1).to(f64), y.reshape(k, b, -1).to(f64)
        dx, dy = xs.shape[-1], ys.shape[-1]
        mx, my = xs.mean(1), ys.mean(1)
        xc, yc = xs - mx.unsqueeze(1), ys - my.unsqueeze(1)
        evals, evecs = torch.linalg.eigh(xc.transpose(1, 2) @ xc / b)  # Σ_x (biased, as BN's)
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # F₀ with F₀ F₀ᵀ = Σ_x
        h0 = torch.cat([root, xc.transpose(1, 2) @ yc / b, mx.unsqueeze(-1)], dim=-1)  # (K, d, d + dy + 1)
        tr_syy = yc.square().sum((1, 2)) / b
        n_layers, bn, eps = self.n_layers, self.bn, self.eps
        w = [self._p(f"{self._lin(i)}.weight").to(f64).transpose(1, 2) for i in range(n_layers)]  # stored (K, in, out)
        if bn:
            gammas = [self._p(f"norms.{i}.weight").to(f64).reshape(k, -1) for i in range(n_layers - 1)]
            betas = [self._p(f"norms.{i}.bias").to(f64).reshape(k, -1) for i in range(n_layers - 1)]
        # Forward: A = [F | G] (K, d, d + dy) and the mean m (K, d), layer by layer.
        a_in, m_in, cache = h0[..., :-1], h0[..., -1], []
        a, m = a_in, m_in
        for i in range(n_layers):
            p_i = torch.bmm(w[i], a)
            m_pre = torch.bmm(w[i], m.unsqueeze(-1)).squeeze(-1)  # the layer's mean (BN's running mean needs it)
            if bn and i < n_layers - 1:
                var = p_i[..., :dx].square().sum(-1)  # σ²_B per row: diag(F Fᵀ)
                rstd = (var + eps).rsqrt_()
                cache.append((a, m, p_i, rstd, (m_pre, var)))
                a, m = p_i * (rstd * gammas[i]).unsqueeze(-1), betas[i]
            else:
                cache.append((a, m, None, None, None))
                a, m = p_i, m_pre
        total = b * (a[..., :dx].square().sum((1, 2)) + (m - my).square().sum(-1)
                     - 2 * torch.diagonal(a[..., dx:], dim1=-2, dim2=-1).sum(-1) + tr_syy)
        losses = total if loss == "squared_sum" else total / b
        # Backward, written out: dA and dm of each layer's output, from the top.
        scale = 2.0 * b if loss == "squared_sum" else 2.0
        d_out = a.shape[1]
        d_a = torch.cat([a[..., :dx], -torch.eye(d_out, dy, dtype=f64, device=a.device).expand(k, d_out, dy)], dim=-1) * scale
        d_m = (m - my) * scale
        grads: dict[str, Tensor] = {}
        for i in reversed(range(n_layers)):
            a_prev, m_prev, p_i, rstd, _ = cache[i]
            if p_i is not None:  # BN: A = (γ·rstd) ⊙ P row-wise, m = β
                grads[f"norms.{i}.bias"] = d_m
                d_s = (d_a * p_i).sum(-1)  # ∂ℓ/∂(γ·rstd)
                grads[f"norms.{i}.weight"] = d_s * rstd
                s_i = rstd * gammas[i]
                # rstd = (v + ε)^(-1/2), v = Σ_j P[:, :dx]²: ∂rstd/∂P = −rstd³ · P[:, :dx]
                d_p = d_a * s_i.unsqueeze(-1)
                d_p[..., :dx] -= (d_s * gammas[i] * rstd.pow(3)).unsqueeze(-1) * p_i[..., :dx]
                d_w = torch.bmm(d_p, a_prev.transpose(1, 2))  # the pre-BN mean does not reach the loss
                d_m_prev = torch.zeros_like(m_prev)
            else:
                d_p = d_a
                d_w = torch.bmm(d_p, a_prev.transpose(1, 2)) + d_m.unsqueeze(-1) * m_prev.unsqueeze(1)
                d_m_prev = torch.bmm(w[i].transpose(1, 2), d_m.unsqueeze(-1)).squeeze(-1)
            grads[f"{self._lin(i)}.weight"] = d_w.transpose(1, 2)  # stored (K, in, out)
            if i > 0:
                d_a = torch.bmm(w[i].transpose(1, 2), d_p)
                d_m = d_m_prev
        for name, t in self.named_trainable():
            g = grads[name]
            t.grad = g.reshape(t.shape).to(t.dtype)
        for i, (_, _, _, _, (m_pre, var)) in enumerate(cache[:-1] if bn else []):
            rm, rv = self._p(f"norms.{i}.running_mean"), self._p(f"norms.{i}.running_var")
            rm.lerp_(m_pre.unsqueeze(1).to(rm.dtype), self.momentum)
            rv.lerp_((var * (b / (b - 1))).unsqueeze(1).to(rv.dtype), self.momentum)
            self._p(f"norms.{i}.num_batches_tracked").add_(1)
        return losses.to(x.dtype), None


def _layer(m: MLP, i: int) -> nn.Linear:
    return m.linears[i] if i < len(m.linears) else m.readout


def batch_models(models: Sequence[nn.Module], fast: bool = True) -> ModelBatch:
    """The :class:`ModelBatch` that runs ``models``: with ``fast``, :class:`StackedMLP` for MLPs and
    :class:`DeepLinearBatch` for deep linear networks (no norm or BN); else :class:`SingleModel` for one
    model and :class:`VmapBatch` for several.

    The models' parameters and buffers become views into the batch (see the module docstring).
    """
    models = list(models)
    if not models:
        raise BnbookError("a model batch needs at least one model")
    sigs = {stack_signature(m) for m in models}
    if fast and None not in sigs and len(sigs) == 1:
        return DeepLinearBatch(models) if sigs.pop()[-1] == "DeepLinear" else StackedMLP(models)
    if len(models) == 1:
        return SingleModel(models)
    return VmapBatch(models)
