"""Training BatchNorm and only BatchNorm (Frankle et al., 2020): the measurements of chapter 8.

The chapter trains OpenLTH-shaped ResNets (:class:`bnbook.nets.ResNet`) under five
*conditions* — which tensors may change — and then looks inside them. This module holds the
pieces that are not the training engine itself:

- **Conditions** (:data:`CONDITIONS`, :func:`apply_condition`): OpenLTH's freezing switches
  (:func:`bnbook.nets.freeze`) plus Frankle et al.'s control, :func:`random_masks`, which trains
  the same number of randomly chosen *non-BN* weights per channel as BN-only trains γ and β.
- **Bookkeeping that a test can check**: :func:`parameter_groups` (every tensor is BN, output
  or other), :func:`trainable_entries` (entries that may change, masks included),
  :func:`changed_entries` (entries that did change, per group).
- **γ and β**: :func:`gammas` / :func:`betas`, :func:`fraction_below`, the ablation
  (:func:`ablated`: γ set to 0 where |γ| is below a threshold, or on randomly chosen channels),
  :func:`accuracy`.
- **Gradient magnitudes over training** (:func:`gradient_magnitude_hook`), a step hook for the
  engine: the mean |∂L/∂θ| and the relative gradient ‖∂L/∂θ‖/‖θ‖ of γ, β, conv weights and the
  output layer — the student report's question of whether BN's parameters "learn more".
- :func:`pooled`: Fashion-MNIST average-pooled to 14×14, so that the quick profile fits a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook import nets, train
from bnbook.data import Dataset
from bnbook.errors import BnbookError

CONDITIONS: tuple[str, ...] = ("all", "bn", "bn+output", "output", "random")
"""The trained tensors of each condition: every parameter; BN's γ and β only; γ, β and the
output layer; the output layer only (a linear probe on random features); and
:data:`RANDOM_PER_CHANNEL` randomly chosen conv weights per output channel (Frankle's control)."""

LABELS: dict[str, str] = {
    "all": "all trained",
    "bn": "BN only",
    "bn+output": "BN + output",
    "output": "output only",
    "random": "random weights",
}

SWITCHES: dict[str, dict[str, bool]] = {
    # OpenLTH's model hyperparameters batchnorm_frozen / output_frozen / others_frozen
    "all": {},
    "bn": {"output_frozen": True, "others_frozen": True},
    "bn+output": {"others_frozen": True},
    "output": {"batchnorm_frozen": True, "others_frozen": True},
    "random": {"batchnorm_frozen": True, "output_frozen": True},  # others: only the masked entries
}

GROUPS: tuple[str, ...] = ("bn", "output", "others")
"""Every parameter belongs to one group: a norm layer's γ or β, the output layer, or the others
(convolution weights)."""

RANDOM_PER_CHANNEL = 2
"""Entries trained per conv output channel in the ``random`` condition: one per BN parameter
(γ and β) of the BN channel that follows the conv."""


def check_condition(condition: str) -> str:
    """Return ``condition`` if it is one of :data:`CONDITIONS`, else raise a clear error."""
    if condition not in CONDITIONS:
        raise BnbookError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    return condition


# ------------------------------------------------------------------ which tensors train
def parameter_groups(model: nn.Module) -> dict[str, str]:
    """Map every parameter name of ``model`` to its group, ``"bn"``, ``"output"`` or ``"others"``."""
    bn = {id(p) for p in nets.bn_parameters(model)}
    out = {id(p) for p in nets.output_parameters(model)}
    return {
        name: "bn" if id(p) in bn else "output" if id(p) in out else "others"
        for name, p in model.named_parameters()
    }


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    """Every convolution of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def random_masks(model: nn.Module, seed: int, per_channel: int = RANDOM_PER_CHANNEL) -> dict[str, Tensor]:
    """Frankle et al.'s control: for each conv and each of its output channels, ``per_channel``
    weights drawn uniformly without replacement from that channel's ``c_in·k·k`` weights.

    Returns ``{parameter name: bool mask}`` for every conv weight. In a net with a BN channel
    after every conv (OpenLTH's ResNet) the number of chosen entries is ``per_channel`` times
    the number of BN channels — with ``per_channel = 2``, exactly the number of γ and β that
    BN-only trains, spread over the same channels. The draw depends on ``seed`` only (its own
    generator, convs in module order).
    """
    gen = torch.Generator().manual_seed(int(seed) + 7_919)  # offset: not the init's stream
    names = {id(p): n for n, p in model.named_parameters()}
    masks: dict[str, Tensor] = {}
    for conv in conv_layers(model):
        w = conv.weight
        fan = w[0].numel()
        if per_channel > fan:
            raise BnbookError(f"cannot choose {per_channel} of the {fan} weights per channel of a conv")
        # per channel: the first `per_channel` positions of an independent random permutation
        ranks = torch.rand((w.shape[0], fan), generator=gen).argsort(dim=1).argsort(dim=1)
        masks[names[id(w)]] = (ranks < per_channel).view(w.shape).to(w.device)
    return masks


def bn_channels(model: nn.Module) -> int:
    """Number of norm-layer channels of ``model`` (one γ and one β each)."""
    return sum(p.numel() for p in nets.bn_parameters(model)) // 2


def apply_condition(model: nn.Module, condition: str, seed: int = 0) -> nn.Module:
    """Freeze ``model`` as ``condition`` says (see :data:`CONDITIONS`); returns ``model``.

    ``random`` also sets the engine's element-wise masks (:func:`bnbook.train.set_trainable_mask`)
    from :func:`random_masks` with ``seed``; the other conditions clear any mask.
    """
    nets.freeze(model, **SWITCHES[check_condition(condition)])
    params = dict(model.named_parameters())
    for p in params.values():
        train.set_trainable_mask(p, None)
    if condition == "random":
        if bn_channels(model) == 0:
            raise BnbookError("the random-parameter control needs norm layers: it trains as many weights as BN has")
        for name, mask in random_masks(model, seed).items():
            train.set_trainable_mask(params[name], mask)
    return model


def trainable_entries(model: nn.Module) -> dict[str, int]:
    """Number of entries that training may change, per group (masks included)."""
    counts = dict.fromkeys(GROUPS, 0)
    groups = parameter_groups(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            mask = train.trainable_mask(p)
            counts[groups[name]] += int(mask.sum()) if mask is not None else p.numel()
    return counts


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter (to compare with after training)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_entries(model: nn.Module, before: Mapping[str, Tensor]) -> dict[str, int]:
    """Number of entries that differ from ``before`` (a :func:`snapshot`), per group."""
    counts = dict.fromkeys(GROUPS, 0)
    groups = parameter_groups(model)
    for name, p in model.named_parameters():
        counts[groups[name]] += int((p.detach() != before[name].to(p.device)).sum())
    return counts


def group_sizes(model: nn.Module) -> dict[str, int]:
    """Number of entries per group."""
    counts = dict.fromkeys(GROUPS, 0)
    for name, group in parameter_groups(model).items():
        counts[group] += dict(model.named_parameters())[name].numel()
    return counts


# ------------------------------------------------------------------ γ and β
def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The norm layers of ``model`` that have an affine γ (in module order)."""
    return [m for m in model.modules() if nets.is_norm_layer(m) and isinstance(getattr(m, "weight", None), Tensor)]


def gammas(model: nn.Module) -> np.ndarray:
    """Every norm layer's γ, concatenated in module order (float64)."""
    layers = norm_layers(model)
    if not layers:
        return np.zeros(0)
    return torch.cat([m.weight.detach().flatten().double().cpu() for m in layers]).numpy()


def betas(model: nn.Module) -> np.ndarray:
    """Every norm layer's β, concatenated in module order (float64)."""
    layers = [m for m in norm_layers(model) if isinstance(getattr(m, "bias", None), Tensor)]
    if not layers:
        return np.zeros(0)
    return torch.cat([m.bias.detach().flatten().double().cpu() for m in layers]).numpy()


def fraction_below(values: np.ndarray, threshold: float) -> float:
    """Fraction of ``values`` with absolute value below ``threshold`` (NaN for none)."""
    values = np.asarray(values)
    return float(np.mean(np.abs(values) < threshold)) if values.size else float("nan")


@contextlib.contextmanager
def ablated(model: nn.Module, threshold: float | None = None, count: int | None = None,
            seed: int = 0) -> Iterator[int]:
    """Within the block, γ = 0 on some channels of ``model``; restored exactly on exit. Yields how many.

    With ``threshold``: the channels with |γ| < threshold (Frankle et al.'s ablation). With
    ``count``: that many channels drawn uniformly at random (seeded) from all norm channels —
    the control that says whether *which* channels are switched off matters. A channel with γ = 0
    outputs the constant β, so its feature carries no information about the input.
    """
    if (threshold is None) == (count is None):
        raise BnbookError("ablated() takes either a threshold or a count")
    weights = [m.weight for m in norm_layers(model)]
    flat = torch.cat([w.detach().flatten() for w in weights]) if weights else torch.zeros(0)
    if threshold is not None:
        off = flat.abs() < threshold
    else:
        if not 0 <= count <= flat.numel():
            raise BnbookError(f"cannot ablate {count} of {flat.numel()} channels")
        gen = torch.Generator().manual_seed(int(seed) + 104_729)
        off = torch.zeros(flat.numel(), dtype=torch.bool)
        off[torch.randperm(flat.numel(), generator=gen)[:count]] = True
        off = off.to(flat.device)
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            start = 0
            for w in weights:
                n = w.numel()
                w.masked_fill_(off[start : start + n].view(w.shape), 0.0)
                start += n
        yield int(off.sum())
    finally:
        with torch.no_grad():
            for w, v in zip(weights, saved):
                w.copy_(v)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1_000) -> float:
    """Test accuracy of one model in inference mode (BN with its running averages); leaves no trace."""
    with train.no_side_effects(model):
        model.eval()
        correct = sum(int((model(x[s : s + chunk]).argmax(-1) == y[s : s + chunk]).sum())
                      for s in range(0, len(y), chunk))
    return correct / max(len(y), 1)


# ------------------------------------------------------------------ gradient magnitudes
def gradient_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters whose gradients :func:`gradient_magnitude_hook` compares: γ, β, conv weights, output."""
    layers = norm_layers(model)
    return {
        "gamma": [m.weight for m in layers],
        "beta": [m.bias for m in layers if isinstance(getattr(m, "bias", None), Tensor)],
        "conv": [c.weight for c in conv_layers(model)],
        "output": nets.output_parameters(model),
    }


GRADIENT_KEYS: tuple[str, ...] = (
    "mean_abs_gamma", "mean_abs_beta", "mean_abs_conv", "mean_abs_output",
    "relative_gamma", "relative_conv", "relative_output",
)
"""What :func:`gradient_magnitudes` returns."""


def gradient_magnitudes(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Per group (:func:`gradient_groups`): mean |∂L/∂θ| over its entries (``mean_abs_*``) and
    ‖∂L/∂θ‖/‖θ‖ (``relative_*``; not for β, which starts at 0), for the training loss of one batch in training mode.

    Gradients are taken with respect to every group, trainable or not: the question is how
    strongly the loss pulls on each kind of parameter, whatever the optimiser is allowed to move.
    """
    groups = {k: v for k, v in gradient_groups(model).items() if v}
    params = [p for ps in groups.values() for p in ps]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        model.train()
        grads = train.grads(model, x, y, params)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    out: dict[str, float] = {}
    i = 0
    for name, ps in groups.items():
        g = torch.cat([gr.detach().flatten() for gr in grads[i : i + len(ps)]]).double()
        w = torch.cat([p.detach().flatten() for p in ps]).double()
        i += len(ps)
        out[f"mean_abs_{name}"] = float(g.abs().mean())
        if name != "beta":  # β starts at 0: a gradient relative to it is undefined at first
            out[f"relative_{name}"] = float(g.norm() / w.norm().clamp_min(1e-12))
    return out


def gradient_magnitude_hook(every: int) -> train.StepHook:
    """A step hook recording :func:`gradient_magnitudes` of every model on its own training batch.

    Values: ``{key: (K,)}`` per call, so the engine's record is ``{key: (T, K)}``. It runs
    inside :func:`bnbook.train.no_side_effects` (running averages and everything else restored).
    """
    def fn(ctx: train.StepContext) -> dict[str, Tensor]:
        rows = [gradient_magnitudes(m, ctx.x[k], ctx.y[k]) for k, m in enumerate(ctx.models)]
        return {key: torch.tensor([r[key] for r in rows]) for key in rows[0]}

    return train.StepHook(fn, every=every, at=(0,), when="before")


# ------------------------------------------------------------------ data
def pixel_levels(x_train: Tensor, x_test: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """The integer grey levels behind standardised 8-bit images, per channel, or ``None`` if they cannot be
    recovered exactly.

    Standardised images are an affine map of 8-bit levels, ``x = (k/255 − m)/s``. The last bits of
    ``m`` and ``s`` depend on how many threads computed them, so the same dataset loaded in two
    processes can differ by an ulp. The levels do not: with ``lo`` the smallest training value and
    ``δ`` the smallest gap between two distinct training values of a channel, ``k − k_min =
    round((x − lo)/δ)`` exactly. Returned as float64 arrays of the inputs' shapes (offset by the
    smallest level, which no later standardisation can see).
    """
    xs = [x_train.detach().cpu().double().numpy(), x_test.detach().cpu().double().numpy()]
    outs = [np.empty_like(x) for x in xs]
    for c in range(xs[0].shape[1]):
        values = np.unique(xs[0][:, c])
        if values.size < 2:
            return None
        lo, gap = values[0], float(np.min(np.diff(values)))
        for x, out in zip(xs, outs):
            levels = (x[:, c] - lo) / gap
            out[:, c] = np.round(levels)
            if np.max(np.abs(levels - out[:, c]), initial=0.0) > 1e-2:  # not an evenly spaced set of levels
                return None
    return outs[0], outs[1]


def pooled(ds: Dataset, factor: int) -> Dataset:
    """``ds`` with images average-pooled by ``factor`` (28×28 → 14×14 for 2; 1 keeps the size) and
    standardised with the training split's per-channel mean and standard deviation.

    The result is the same in every process, whatever thread count loaded ``ds``: the images are
    taken back to their 8-bit levels (:func:`pixel_levels`), pooled, and standardised in float64 with
    NumPy's reductions (which do not depend on threads). Images that are not 8-bit levels are
    pooled and standardised as they are.
    """
    if factor < 1 or ds.x_train.dim() != 4:
        raise BnbookError(f"pooling needs images (N, C, H, W) and a factor >= 1, got {factor}")
    levels = pixel_levels(ds.x_train, ds.x_test)
    if levels is None:
        levels = ds.x_train.detach().cpu().double().numpy(), ds.x_test.detach().cpu().double().numpy()
    x_train, x_test = (F.avg_pool2d(torch.from_numpy(x), factor).numpy() if factor > 1 else x for x in levels)
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True, ddof=1)
    h, w = x_train.shape[-2:]
    device = ds.x_train.device

    def to_tensor(x: np.ndarray) -> Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32)).to(device)

    note = f"average-pooled {factor}×{factor} to {h}×{w}" if factor > 1 else "re-standardised"
    return dataclasses.replace(ds, x_train=to_tensor(x_train), x_test=to_tensor(x_test),
                               description=f"{ds.description}; {note}")


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Entries per group and trainable entries per group, flat: ``size_bn``, ``trainable_bn``, …, ``trainable``."""
    sizes, trainable = group_sizes(model), trainable_entries(model)
    out = {f"size_{g}": sizes[g] for g in GROUPS}
    out.update({f"trainable_{g}": trainable[g] for g in GROUPS})
    out["trainable"] = sum(trainable.values())
    out["parameters"] = sum(sizes.values())
    return out


def mean_over(values: Sequence[float]) -> float:
    """Mean of the finite ``values`` (NaN if none)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")
