"""Landscape probes of Santurkar et al. §3 and Li et al.'s 2-D loss surfaces (chapter 7).

Everything here evaluates the **training loss of one model on one fixed batch** as a
function of its trainable parameters ``w``, in training mode (BN and its ℓp relatives
normalise with the batch's own statistics, as during an SGD step):

- :func:`line_probe` walks from ``w`` along a direction ``d`` — the gradient
  ``g = ∇L(w)`` (Santurkar et al., §3.1, Fig. 4) or a random direction of the same length
  (the variant the paper mentions but does not show) — to the points ``w − η d``, and
  records ``L(w − η d)``, the gradient change ``‖∇L(w) − ∇L(w − η d)‖₂`` and its ratio to
  the distance moved, ``‖∇L(w) − ∇L(w − η d)‖₂ / ‖η d‖₂``.
- :func:`fig4_measures` turns a probe into the paper's three measures: the range of the
  loss over η (Fig. 4a), the range of the gradient change ("gradient predictiveness",
  Fig. 4b) and the largest ratio ("effective β-smoothness", Fig. 4c).
- :func:`bn_layer_terms` evaluates the terms of Theorem 4.1 (chapter 4's
  :func:`bnbook.theory.theorem41`) at every BN layer of a network on a batch, convolutional
  layers included (a channel's values over batch and positions are the "batch column").
- :func:`activation_moments` reads the per-channel mean and variance of every normalised
  block's nonlinearity input (the distributional shift of Figs. 5–6, 8).
- :func:`filter_normalized_direction` and :func:`surface_2d` draw Li et al. (2018)'s
  filter-normalised 2-D slices of the loss.

**No trace.** The parameters are never written: losses at moved points are computed with
``torch.func.functional_call`` on new tensors, with *copies* of every buffer (so BN running
statistics are not updated), and gradients are taken with ``torch.autograd.grad`` (so no
``.grad`` is touched). Each public function also runs inside the engine's
:func:`bnbook.train.no_side_effects`, which restores parameters, buffers, ``.grad``,
train/eval mode and the torch RNG state; random directions come from their own generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bnbook import norms, theory
from bnbook.errors import BnbookError
from bnbook.train import no_side_effects

__all__ = [
    "LandscapeError",
    "LOSSES",
    "batch_loss",
    "Objective",
    "LineProbe",
    "line_probe",
    "fig4_measures",
    "random_direction",
    "bn_layer_terms",
    "layer_gradient_norms",
    "activation_moments",
    "activation_summary",
    "activation_sample",
    "filter_normalized_direction",
    "surface_2d",
    "log_grid",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(output, target) -> scalar``: the loss of a whole batch, as training minimises it."""


class LandscapeError(BnbookError):
    """A probe that cannot be evaluated as asked (unknown loss or direction, no BN layer, bad grid)."""


# ------------------------------------------------------------------------------- losses
def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def _squared_mean(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).flatten(1).sum(1).mean()


def _squared_sum(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).sum()


LOSSES: dict[str, LossFn] = {
    "cross_entropy": _cross_entropy,  # mean over the batch
    "squared_mean": _squared_mean,  # mean over the batch of ‖f(x) − y‖²
    "squared_sum": _squared_sum,  # sum over the batch of ‖f(x) − y‖² (Santurkar et al.'s DLN)
}
"""The batch losses of the engine's ``FitConfig.loss`` names (the same reductions)."""


def batch_loss(loss: str | LossFn) -> LossFn:
    """Return the batch loss that ``loss`` names (or ``loss`` itself if it is a callable)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise LandscapeError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    return LOSSES[loss]


# ---------------------------------------------------------------------- list-of-tensor algebra
def _norm(ts: Sequence[Tensor]) -> Tensor:
    """ℓ2 norm of a list of tensors taken as one flat vector."""
    return torch.sqrt(sum((t.double().pow(2).sum() for t in ts), torch.zeros((), dtype=torch.float64, device=ts[0].device)))


def _axpy(a: float, x: Sequence[Tensor], y: Sequence[Tensor]) -> list[Tensor]:
    """``y + a·x`` elementwise over two lists of tensors."""
    return [yi + a * xi for xi, yi in zip(x, y)]


# ------------------------------------------------------------------------------ objective
class Objective:
    """``L(w)``: the batch loss of ``model`` on ``(x, y)`` as a function of its trainable parameters.

    ``w`` is the list of the model's parameters with ``requires_grad`` (names in
    :attr:`names`); frozen parameters stay at their values. Every evaluation runs the model
    through ``functional_call`` with fresh copies of its buffers, in the mode the model is in,
    so neither its parameters nor its running statistics ever change.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss: str | LossFn = "cross_entropy") -> None:
        named = dict(model.named_parameters())
        self.model = model
        self.x, self.y = x, y
        self.loss_fn = batch_loss(loss)
        self.names = [n for n, p in named.items() if p.requires_grad]
        if not self.names:
            raise LandscapeError("the model has no trainable parameters: there is no landscape to probe")
        self.w = [named[n].detach() for n in self.names]
        self._fixed = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        self._buffers = dict(model.named_buffers())

    def output(self, params: Sequence[Tensor]) -> Tensor:
        """The model's output on ``x`` with its trainable parameters replaced by ``params``."""
        state = {n: b.clone() for n, b in self._buffers.items()}
        state.update(self._fixed)
        state.update(zip(self.names, params))
        return functional_call(self.model, state, (self.x,))

    def __call__(self, params: Sequence[Tensor]) -> Tensor:
        """``L(params)``, a scalar."""
        return self.loss_fn(self.output(params), self.y)

    def value_and_grad(self, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``(L(params), ∇L(params))``, both detached."""
        ps = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            value = self(ps)
            grads = torch.autograd.grad(value, ps, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]
        return value.detach(), [g.detach() for g in grads]

    def value(self, params: Sequence[Tensor]) -> Tensor:
        """``L(params)`` without a gradient."""
        with torch.no_grad():
            return self(params).detach()


# ------------------------------------------------------------------------ line probes
@dataclasses.dataclass
class LineProbe:
    """The loss and the gradient along ``w − η d`` for the step lengths ``eta`` (tensors on the CPU, float64)."""

    eta: Tensor  # (E,) step lengths η
    loss: Tensor  # (E,) L(w − η d)
    grad_change: Tensor  # (E,) ‖∇L(w) − ∇L(w − η d)‖₂
    beta: Tensor  # (E,) grad_change / ‖η d‖₂ (the local smoothness along d)
    loss0: Tensor  # () L(w)
    grad_norm: Tensor  # () ‖∇L(w)‖₂
    dir_norm: Tensor  # () ‖d‖₂


DIRECTIONS = ("gradient", "random")


def random_direction(like: Sequence[Tensor], norm: Tensor | float, seed: int) -> list[Tensor]:
    """A Gaussian direction shaped like ``like``, scaled to total ℓ2 norm ``norm``.

    Drawn from its own CPU generator seeded with ``seed`` (the global RNG is not used), so
    the same seed gives the same direction on every device.
    """
    gen = torch.Generator().manual_seed(int(seed))
    d = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype) for t in like]
    return [t * (float(norm) / float(_norm(d))) for t in d]


def line_probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    etas: Sequence[float],
    loss: str | LossFn = "cross_entropy",
    directions: Sequence[str | Sequence[Tensor]] = ("gradient",),
    seed: int = 0,
) -> list[LineProbe]:
    """Probe the loss along each direction from the model's current parameters; one :class:`LineProbe` each.

    ``directions`` holds ``"gradient"`` (``d = ∇L(w)``: Santurkar et al.'s Fig. 4),
    ``"random"`` (a Gaussian ``d`` with ``‖d‖ = ‖∇L(w)‖``, seeded by ``seed``, so that the
    distances ``‖η d‖`` match the gradient's) or an explicit list of tensors shaped like the
    trainable parameters. ``L`` is ``loss`` on the batch ``(x, y)`` in training mode. The
    model, its buffers, gradients, mode and the RNG are left exactly as they were.
    """
    etas = [float(e) for e in etas]
    if not etas or min(etas) <= 0:
        raise LandscapeError(f"step lengths must be positive, got {etas}")
    with no_side_effects(model):
        model.train()
        f = Objective(model, x, y, loss)
        loss0, g = f.value_and_grad(f.w)
        g_norm = _norm(g)
        out = []
        for i, spec in enumerate(directions):
            if isinstance(spec, str):
                if spec == "gradient":
                    d = g
                elif spec == "random":
                    d = random_direction(g, g_norm, seed + 7919 * i)
                else:
                    raise LandscapeError(f"unknown direction {spec!r}; known: {', '.join(DIRECTIONS)} or a list of tensors")
            else:
                d = [t.detach() for t in spec]
                if [t.shape for t in d] != [t.shape for t in g]:
                    raise LandscapeError("an explicit direction must be shaped like the model's trainable parameters")
            d_norm = _norm(d)
            losses, changes = [], []
            for eta in etas:
                value, g_eta = f.value_and_grad(_axpy(-eta, d, f.w))
                losses.append(value.double())
                changes.append(_norm([a - b for a, b in zip(g, g_eta)]))
            eta_t = torch.tensor(etas, dtype=torch.float64)
            change_t = torch.stack(changes).cpu()
            out.append(
                LineProbe(
                    eta=eta_t,
                    loss=torch.stack(losses).cpu(),
                    grad_change=change_t,
                    beta=change_t / (eta_t * float(d_norm)),
                    loss0=loss0.double().cpu(),
                    grad_norm=g_norm.cpu(),
                    dir_norm=d_norm.cpu(),
                )
            )
    return out


def fig4_measures(loss: Tensor, grad_change: Tensor, beta: Tensor) -> dict[str, Tensor]:
    """Santurkar et al.'s three measures from probes along the last axis (η): each ``(...,)``.

    ``loss_min``/``loss_max``: the range of ``L(w − η g)`` over η (Fig. 4a);
    ``change_min``/``change_max``: the range of ``‖∇L(w) − ∇L(w − η g)‖₂`` (Fig. 4b, "gradient
    predictiveness"); ``beta``: ``max_η ‖∇L(w) − ∇L(w − η g)‖₂ / ‖η g‖₂`` (Fig. 4c, "effective
    β-smoothness"). Accepts tensors or numpy arrays; NaN (a diverged model) propagates.
    """
    loss, grad_change, beta = (torch.as_tensor(t) for t in (loss, grad_change, beta))
    return {
        "loss_min": loss.amin(-1),
        "loss_max": loss.amax(-1),
        "change_min": grad_change.amin(-1),
        "change_max": grad_change.amax(-1),
        "beta": beta.amax(-1),
    }


# --------------------------------------------------------------- Theorem 4.1 inside a net
_BN_TYPES = (norms.BatchNorm, nn.modules.batchnorm._BatchNorm)


def _columns(t: Tensor) -> Tensor:
    """(N, C, ...) -> (N·…, C): one column per channel, its values over batch and positions."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).T


def bn_layer_terms(model: nn.Module, x: Tensor, y: Tensor, loss: str | LossFn = "cross_entropy") -> list[dict[str, Tensor]]:
    """The terms of Theorem 4.1 at every BN layer of ``model`` on the batch ``(x, y)``, one dict per layer.

    For channel ``j`` the "batch column" ``y_j`` holds its pre-BN values over the batch and
    (for convolutions) all positions, which is what BN standardises. Per channel (tensors of
    shape ``(C,)``, float64): ``grad_sq_bn`` = ``‖∇_{y_j} L̂‖²`` by autograd through the whole
    network, ``grad_sq_z`` = ``‖g_j‖²`` with ``g = ∂L̂/∂z`` (the same-``z`` unnormalised
    network's gradient, chapter 4), ``scale`` = ``γ_j²/(σ_j² + ε)``, ``mean_term``,
    ``yhat_term`` and ``rhs`` (the exact right side of chapter 4's corrected Theorem 4.1,
    :func:`bnbook.theory.theorem41`), ``gamma`` and ``sigma`` (the batch standard deviation).
    """
    loss_fn = batch_loss(loss)
    with no_side_effects(model):
        model.train()
        layers = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
        if not layers:
            raise LandscapeError(f"{type(model).__name__} has no BN layer")
        seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            seen[module] = (inputs[0], output)
            return output.clone()  # later in-place ops (ReLU(inplace)) act on the copy, not on z

        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            with torch.enable_grad():
                value = loss_fn(model(x), y)
                ins = [seen[m][0] for m in layers]
                outs = [seen[m][1] for m in layers]
                grads = torch.autograd.grad(value, ins + outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        result = []
        for i, m in enumerate(layers):
            grad_y, grad_z = grads[i], grads[len(layers) + i]
            yv = _columns(ins[i].detach()).double()
            gy = torch.zeros_like(yv) if grad_y is None else _columns(grad_y).double()
            gz = torch.zeros_like(yv) if grad_z is None else _columns(grad_z).double()
            y_hat, s = theory.batch_standardize(yv, eps=float(m.eps))
            gamma = m.weight.detach().double() if m.weight is not None else torch.ones_like(s)
            t41 = theory.theorem41(gz, y_hat, gamma, s)
            result.append(
                {
                    "grad_sq_bn": (gy * gy).sum(0),
                    "grad_sq_z": t41.grad_sq,
                    "scale": t41.scale,
                    "mean_term": t41.mean_term,
                    "yhat_term": t41.yhat_term,
                    "rhs": t41.rhs_corrected,
                    "gamma": gamma.clone(),
                    "sigma": yv.std(0, correction=0),
                }
            )
    return result


def _features(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    out = model(x, features=True)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise LandscapeError(f"{type(model).__name__}.forward(x, features=True) must return (output, feats)")
    return out


def layer_gradient_norms(model: nn.Module, x: Tensor, y: Tensor, loss: str | LossFn = "cross_entropy") -> Tensor:
    """``‖∂L/∂a_l‖₂²`` for every normalised block's nonlinearity input ``a_l`` (a ``(layers,)`` tensor).

    ``a_l`` is what ``model(x, features=True)`` returns: the norm's output (``z``) in a
    normalised net, the conv/linear output in an unnormalised one. Training mode, no trace.
    """
    loss_fn = batch_loss(loss)
    with no_side_effects(model):
        model.train()
        with torch.enable_grad():
            out, feats = _features(model, x)
            grads = torch.autograd.grad(loss_fn(out, y), feats, allow_unused=True)
    return torch.stack([torch.zeros((), dtype=torch.float64) if g is None else g.double().pow(2).sum().cpu() for g in grads])


def activation_moments(model: nn.Module, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per-channel ``(mean, variance)`` over batch and positions of every block's nonlinearity input.

    Training mode (batch statistics, as during training), computed without a trace. The
    distributional shift of a layer is how these move between training steps.
    """
    with no_side_effects(model), torch.no_grad():
        model.train()
        _, feats = _features(model, x)
        cols = [_columns(f.float()) for f in feats]
        return [(c.mean(0), c.var(0, correction=0)) for c in cols]


def activation_summary(
    model: nn.Module, x: Tensor, layers: Sequence[int], quantiles: Sequence[float]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each block in ``layers``: per-channel mean and variance, and the ``quantiles`` (in %) of all its values.

    One training-mode forward pass, no trace; the moments are those of
    :func:`activation_moments`.
    """
    q = torch.tensor([float(p) / 100 for p in quantiles])
    with no_side_effects(model), torch.no_grad():
        model.train()
        _, feats = _features(model, x)
        out = []
        for layer in layers:
            f = feats[layer].float()
            c = _columns(f)
            out.append((c.mean(0), c.var(0, correction=0), torch.quantile(f.flatten()[: 2**24], q.to(f.device))))
    return out


def activation_sample(model: nn.Module, x: Tensor, layer: int, size: int, seed: int = 0) -> Tensor:
    """``size`` values drawn (without replacement, own generator) from block ``layer``'s nonlinearity input."""
    with no_side_effects(model), torch.no_grad():
        model.train()
        _, feats = _features(model, x)
        flat = feats[layer].detach().flatten().float().cpu()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(flat.numel(), generator=gen)[: min(size, flat.numel())]
    return flat[idx]


# ------------------------------------------------------------------ Li et al.'s surfaces
def filter_normalized_direction(model: nn.Module, seed: int) -> list[Tensor]:
    """Li et al. (2018)'s filter-normalised random direction for the trainable parameters.

    For every weight with two or more dimensions (a conv or linear layer) each filter — a
    slice ``W[i]`` along the output dimension — gets a Gaussian direction rescaled to the
    norm of ``W[i]``. Vectors (biases, BN's γ and β) get a zero direction, as in Li et al.'s
    "ignore biases and BN" setting. The scale invariance BN gives its weights is why the
    rescaling is needed to compare nets: a filter twice as large needs a step twice as long.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for p in (p for p in model.parameters() if p.requires_grad):
        w = p.detach()
        if w.dim() < 2:
            out.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        w64 = w.double().cpu()
        scale = w64.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-300)
        out.append((d * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.device, w.dtype))
    return out


def surface_2d(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    alphas: Sequence[float],
    betas: Sequence[float],
    loss: str | LossFn = "cross_entropy",
    seed: int = 0,
    directions: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
) -> Tensor:
    """``L(w + α δ + β η)`` on the grid ``alphas × betas`` (an ``(A, B)`` float64 tensor).

    ``δ, η`` are two filter-normalised directions (:func:`filter_normalized_direction` with
    seeds ``seed`` and ``seed + 1``) unless given. Training mode (batch statistics), no trace.
    """
    if not len(alphas) or not len(betas):
        raise LandscapeError("the surface grid needs at least one α and one β")
    with no_side_effects(model):
        model.train()
        f = Objective(model, x, y, loss)
        if directions is None:
            directions = (filter_normalized_direction(model, seed), filter_normalized_direction(model, seed + 1))
        d1, d2 = ([t.detach() for t in d] for d in directions)
        grid = torch.empty(len(alphas), len(betas), dtype=torch.float64)
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                point = [w + float(a) * u + float(b) * v for w, u, v in zip(f.w, d1, d2)]
                grid[i, j] = float(f.value(point))
    return grid


def log_grid(lo: float, hi: float, points: int) -> list[float]:
    """``points`` values spaced evenly on a log scale from ``lo`` to ``hi`` (both included)."""
    if points < 1 or not 0 < lo <= hi:
        raise LandscapeError(f"a log grid needs 0 < lo <= hi and points >= 1, got {lo}, {hi}, {points}")
    if points == 1:
        return [lo]
    r = math.log(hi / lo) / (points - 1)
    return [lo * math.exp(r * i) for i in range(points)]
