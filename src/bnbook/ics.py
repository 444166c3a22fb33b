"""Internal covariate shift, measured in the two senses chapter 6 compares.

1. **Ioffe & Szegedy's informal sense** (§2 of their paper): the distribution of a layer's
   inputs changes while the parameters before it are trained. :func:`activation_stats`
   records that distribution — quantiles over all of a layer's values, and each channel's
   mean and variance — so a chapter can draw quantile bands over training and the
   step-to-step changes :math:`|\\mu_{t+1}-\\mu_t|`, :math:`|\\sigma^2_{t+1}-\\sigma^2_t|`
   (Santurkar et al., Figs. 1, 2 and 8; :func:`step_changes`).
2. **Santurkar et al.'s Definition 2.1**: the change of layer *i*'s gradient when the layers
   before it have already taken their step on the same batch,

   .. math::
      G_{t,i} = \\nabla_{W_i}\\mathcal L(W^{(t)}_1,\\dots,W^{(t)}_k; x^{(t)}, y^{(t)}),\\qquad
      G'_{t,i} = \\nabla_{W_i}\\mathcal L(W^{(t+1)}_1,\\dots,W^{(t+1)}_{i-1}, W^{(t)}_i,\\dots,W^{(t)}_k;
      x^{(t)}, y^{(t)}),

   reported as :math:`\\|G-G'\\|_2` and :math:`\\cos(G, G')` by :func:`gradient_change`.

A *layer* is a trainable weight tensor of two or more dimensions (a convolution kernel or
a weight matrix) together with the one-dimensional parameters used after it and before
the next weight (its bias, and the γ, β of the normalisation that follows it):
:func:`layer_groups`. "Earlier" in Definition 2.1 means earlier in the forward pass, which
is observed once per model (:func:`call_order`), not read off the registration order.

Both measurements are side-effect free by construction: every forward pass runs through
:func:`torch.func.functional_call` on detached parameters and *cloned* buffers (so BN's
running averages are never written), and the random-number state is put back afterwards
(so a noisy-BN net draws the same noise in training whether or not it is measured). With
the engine they are used as step hooks (:func:`gradient_change_hook`,
:func:`activation_stats_hook`), called with the very batch that step trains on.

Cost: Definition 2.1 for L layers of one model at one step is 1 + L forward/backward passes
(one for G of every layer, one G' per measured layer); activation statistics cost one
forward pass. Measure every n steps, not every step.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnbook.errors import BnbookError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Per-sample loss: ``loss_fn(outputs (B, ...), targets (B, ...)) -> (B,)``."""

QUANTILES: tuple[float, ...] = (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95)
"""Default quantiles of a layer's values for the distribution bands (the median in the middle)."""

MAX_QUANTILE_VALUES = 1 << 16
"""``torch.quantile`` sorts its input; beyond this many values a fixed random subset of this size is used
(its quantiles are within about 0.01 in probability of the full set's; drawn from a fixed seed, not the
global generator, so training is unaffected and every call picks the same positions)."""


# ---------------------------------------------------------------- layers
_CALL_ORDER: "weakref.WeakKeyDictionary[nn.Module, list[str]]" = weakref.WeakKeyDictionary()


def call_order(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the submodules that own parameters, in the order a forward pass on ``x`` first calls them.

    Registration order is not forward order in general (the book's VGG registers all its
    convs, then all its norms), so the order is observed once per model, on a
    side-effect-free forward pass, and remembered. Modules the forward pass never calls
    are left out.
    """
    if model in _CALL_ORDER:
        return _CALL_ORDER[model]
    owners = {m: name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    order: list[str] = []

    def note(module: nn.Module, _args: Any) -> None:
        if owners[module] not in order:
            order.append(owners[module])

    handles = [m.register_forward_pre_hook(note) for m in owners]
    try:
        params = {n: p.detach() for n, p in model.named_parameters()}
        with replayable_randomness(x), torch.no_grad():
            _call(model, params, x)
    finally:
        for h in handles:
            h.remove()
    _CALL_ORDER[model] = order
    return order


def layer_groups(model: nn.Module, x: Tensor) -> list[list[str]]:
    """The model's trainable parameters grouped by layer, in forward order (inputs like ``x``).

    Each group starts with a trainable tensor of ≥ 2 dimensions (the layer's weight: a
    convolution kernel or a weight matrix) and holds the 1-D trainable parameters used
    after it and before the next weight: its bias, and the γ, β of the norm that follows
    it. Trainable 1-D parameters before the first weight (none in this book's nets) join
    the first group. Frozen tensors (``requires_grad=False``) never move and belong to no group.
    """
    modules = dict(model.named_modules())
    groups: list[list[str]] = []
    leading: list[str] = []
    for owner in call_order(model, x):
        own = [(f"{owner}.{n}" if owner else n, p) for n, p in modules[owner].named_parameters(recurse=False)]
        own = [(n, p) for n, p in own if p.requires_grad]
        for name, p in sorted(own, key=lambda item: item[1].dim() < 2):  # weights first, stable otherwise
            if p.dim() >= 2:
                groups.append([name])
            elif groups:
                groups[-1].append(name)
            else:
                leading.append(name)
    if not groups:
        raise BnbookError(f"{type(model).__name__} has no trainable weight tensor (≥ 2 dims): no layers to measure")
    groups[0][1:1] = leading
    return groups


def layer_weights(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the layers' weight tensors, in forward order (the W_i of Definition 2.1)."""
    return [g[0] for g in layer_groups(model, x)]


def scaled_layer(paper_index: int, paper_depth: int, depth: int) -> int:
    """The 1-based layer of a ``depth``-layer net at the same relative depth as ``paper_index`` of ``paper_depth``.

    E.g. the paper's VGG layer #10 of 13 in an 8-layer VGG: ``scaled_layer(10, 13, 8) == 6``.
    The first and the last layer map onto themselves.
    """
    if not 1 <= paper_index <= paper_depth or depth < 1:
        raise BnbookError(f"layer {paper_index} of {paper_depth} cannot be mapped onto a {depth}-layer net")
    if paper_depth == 1:
        return 1
    return 1 + round((paper_index - 1) * (depth - 1) / (paper_depth - 1))


# ---------------------------------------------------------------- side-effect-free forward passes
def _devices(x: Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []


@contextlib.contextmanager
def replayable_randomness(x: Tensor) -> Iterator[Callable[[], None]]:
    """Yield ``replay()``, which resets the RNG to its state at entry; the state is restored on exit.

    Calling ``replay()`` before each forward pass makes a noisy-BN net draw the same noise
    in every pass (G and G′ must see the same network function, only the weights differ).
    """
    with torch.random.fork_rng(devices=_devices(x)):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in _devices(x)]

        def replay() -> None:
            torch.set_rng_state(cpu)
            for d, state in zip(_devices(x), cuda):
                torch.cuda.set_rng_state(state, d)

        yield replay


def _fresh_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _call(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, **kwargs: Any) -> Any:
    """``model(x, **kwargs)`` with ``params`` in place of its parameters and copies of its buffers."""
    return functional_call(model, ({**params, **_fresh_buffers(model)}), (x,), kwargs)


def reduce_loss(per_sample: Tensor, reduction: str) -> Tensor:
    """The training loss from per-sample losses: their ``"mean"`` or ``"sum"``."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise BnbookError(f"unknown loss reduction {reduction!r}: 'mean' or 'sum'")


def _grads(
    model: nn.Module, params: Mapping[str, Tensor], wrt: Sequence[str], x: Tensor, y: Tensor,
    loss_fn: LossFn, reduction: str,
) -> dict[str, Tensor]:
    """Gradient of the training loss at ``params`` with respect to the tensors named ``wrt``."""
    leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
    with torch.enable_grad():
        out = _call(model, {**params, **leaves}, x)
        loss = reduce_loss(loss_fn(out, y), reduction)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


# ---------------------------------------------------------------- Definition 2.1
def sgd_step(w: Tensor, g: Tensor, lr: float) -> Tensor:
    """Plain SGD: W − lr·G (the optimiser of Santurkar et al.'s experiments)."""
    return w - lr * g


def gradient_change(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    lr: float,
    layers: Sequence[int],
    reduction: str = "mean",
    step: Callable[[Tensor, Tensor, float], Tensor] = sgd_step,
) -> dict[str, Tensor]:
    """Definition 2.1 of Santurkar et al. for the 0-based ``layers`` of ``model`` on one batch.

    G is the gradient of layer i's weight at the current parameters; G′ is the same
    gradient after every parameter of the layers before i (weights, biases, γ, β) has taken
    its training step ``step(W, G_W, lr)`` — the step of the usual simultaneous update, so
    computed from the gradient at the current parameters — while layer i and everything
    after it keep their current values. Same batch, same noise (:func:`replayable_randomness`),
    the model's current train/eval mode; one measured layer at a time.

    Returns a dict of (len(layers),) tensors: ``l2`` = ‖G − G′‖₂, ``cos`` = cos(G, G′)
    (NaN where G or G′ is zero), ``g_norm`` = ‖G‖₂, ``g_prime_norm`` = ‖G′‖₂.
    Cost: 1 + len(layers) forward/backward passes.
    """
    groups = layer_groups(model, x)
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < len(groups)]
    if bad:
        raise BnbookError(f"layers {bad} out of range: the model has {len(groups)} layers (0-based indices)")
    params = {n: p.detach() for n, p in model.named_parameters()}
    earlier = [n for g in groups[: max(layers)] for n in g]
    measured = [groups[i][0] for i in layers]
    wrt = list(dict.fromkeys(earlier + measured))
    l2, cos, g_norm, gp_norm = [], [], [], []
    with replayable_randomness(x) as replay:
        replay()
        grad = _grads(model, params, wrt, x, y, loss_fn, reduction)
        for i, name in zip(layers, measured):
            moved = dict(params)
            for n in (n for g in groups[:i] for n in g):
                moved[n] = step(params[n], grad[n], lr)
            replay()
            g_prime = _grads(model, moved, [name], x, y, loss_fn, reduction)[name]
            g = grad[name]
            a, b = g.norm(), g_prime.norm()
            l2.append((g - g_prime).norm())
            cos.append((g * g_prime).sum() / (a * b) if a > 0 and b > 0 else torch.tensor(math.nan, device=g.device))
            g_norm.append(a)
            gp_norm.append(b)
    return {"l2": torch.stack(l2), "cos": torch.stack(cos), "g_norm": torch.stack(g_norm),
            "g_prime_norm": torch.stack(gp_norm)}


def loss_reduction(loss: str) -> str:
    """How the engine reduces a batch's per-sample losses for the loss name ``loss`` of a FitConfig."""
    return "sum" if loss.endswith("_sum") else "mean"


def _check_plain_sgd(cfg: Any) -> None:
    opt = getattr(cfg, "optimizer", "sgd")
    if opt != "sgd" or getattr(cfg, "momentum", 0.0) or getattr(cfg, "weight_decay", 0.0):
        raise BnbookError(
            "Definition 2.1 is measured here for plain SGD (the paper's optimiser): the earlier layers' step "
            f"is W − lr·G; got optimizer={opt!r}, momentum={getattr(cfg, 'momentum', 0.0)}, "
            f"weight_decay={getattr(cfg, 'weight_decay', 0.0)}"
        )


def gradient_change_hook(layers: Sequence[int]) -> Callable[[Any], dict[str, Tensor]]:
    """A step-hook function (``StepHook(fn, every=n, when="before")``) measuring Definition 2.1.

    Called before the update of step t, with the models at W(t), the batch that update uses
    and that step's learning rate; returns :func:`gradient_change`'s dict with each entry
    stacked over the K models, (K, len(layers)).
    """
    layers = [int(i) for i in layers]

    def fn(ctx: Any) -> dict[str, Tensor]:
        _check_plain_sgd(ctx.cfg)
        reduction = loss_reduction(getattr(ctx.cfg, "loss", "cross_entropy"))
        rows = [
            gradient_change(m, ctx.x[k], ctx.y[k], ctx.loss_fn, ctx.lr, layers, reduction)
            for k, m in enumerate(ctx.models)
        ]
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    return fn


# ---------------------------------------------------------------- activation distributions
def channel_stats(f: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of a (B, C, ...) tensor over the batch and all positions: two (C,)."""
    dims = [0, *range(2, f.dim())]
    return f.mean(dims), f.var(dims, unbiased=False)


def value_quantiles(f: Tensor, q: Sequence[float] = QUANTILES) -> Tensor:
    """The ``q`` quantiles (fractions in [0, 1]) of all values of ``f`` pooled: (len(q),)."""
    v = f.detach().flatten().float()
    if v.numel() > MAX_QUANTILE_VALUES:
        # a random subset, not a strided one: a stride can line up with the image rows and pick the border
        gen = torch.Generator().manual_seed(0)
        v = v[torch.randint(v.numel(), (MAX_QUANTILE_VALUES,), generator=gen).to(v.device)]
    return torch.quantile(v, torch.tensor(list(q), device=v.device, dtype=v.dtype))


def activation_stats(
    model: nn.Module, x: Tensor, layers: Sequence[int], q: Sequence[float] = QUANTILES
) -> dict[str, Tensor]:
    """Statistics of the feature maps ``layers`` (0-based indices into ``model(x, features=True)[1]``) on ``x``.

    The features are the inputs of the nonlinearities (after BN and any noise), computed in
    the model's current mode — in training mode with the batch's own statistics, the
    distribution the next layer sees while it trains. Returns, for each layer l:
    ``q{l}`` (len(q),) quantiles of all its values; ``mean{l}``, ``var{l}`` (C,) per channel.
    With ``q`` empty, only the channel moments are computed. Nothing in the model changes
    (parameters, buffers, RNG state).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    with replayable_randomness(x), torch.no_grad():
        _, feats = _call(model, params, x, features=True)
    n = len(feats)
    out: dict[str, Tensor] = {}
    for layer in layers:
        if not -n <= layer < n:
            raise BnbookError(f"feature {layer} out of range: the model returns {n} feature maps")
        f = feats[layer]
        if len(q):
            out[f"q{layer}"] = value_quantiles(f, q)
        out[f"mean{layer}"], out[f"var{layer}"] = channel_stats(f)
    return out


def activation_stats_hook(layers: Sequence[int], q: Sequence[float] = QUANTILES) -> Callable[[Any], dict[str, Tensor]]:
    """A step-hook function recording :func:`activation_stats` of each model on its own training batch.

    Returns a dict of (K, ...) tensors. Registered twice at the same steps — ``when="before"``
    and ``when="after"`` — it gives the distribution just before and just after one update
    on the same batch, whose difference is that update's shift (:func:`step_changes`).
    """
    layers = [int(i) for i in layers]

    def fn(ctx: Any) -> dict[str, Tensor]:
        rows = [activation_stats(m, ctx.x[k], layers, q) for k, m in enumerate(ctx.models)]
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    return fn


def step_changes(before: Mapping[str, Any], after: Mapping[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """Mean over channels of |μ_after − μ_before| and |σ²_after − σ²_before| per layer.

    ``before``/``after`` hold ``mean{l}``, ``var{l}`` arrays (T, K, C) recorded at the same
    steps (e.g. :func:`activation_stats_hook` before and after the update); returns
    ``dmean{l}``, ``dvar{l}`` of shape (T, K).
    """
    out: dict[str, Any] = {}
    for layer in layers:
        for key in ("mean", "var"):
            a, b = before[f"{key}{layer}"], after[f"{key}{layer}"]
            if a.shape != b.shape:
                raise BnbookError(f"{key}{layer}: shapes before {a.shape} and after {b.shape} differ")
            out[f"d{key}{layer}"] = abs(b - a).mean(-1)
    return out
