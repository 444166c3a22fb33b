"""Both sides of Santurkar et al.'s Theorems 4.1, 4.2, 4.4 and Lemma 4.5 (chapter 4).

The setting is §4.1 of Santurkar et al. (2018): one BN layer after a fully-connected layer,
``y = W x``; for one output unit ``j`` the batch column ``y_j ∈ R^m`` is standardised,
``ŷ_j = (y_j − μ_j 1) / s_j`` with ``s_j = sqrt(σ_j² + ε)`` and the *biased* batch variance
``σ_j²``, and ``z_j = γ_j ŷ_j + β_j`` feeds an arbitrary downstream loss ``L(z)``, with
``γ, β`` held constant. ``L̂(y) = L(γ ŷ(y) + β)`` is the BN network's loss. The
unnormalised network is the same downstream loss fed directly by its layer output, so at
the same downstream input its layer gradient is ``g = ∂L/∂z`` — the comparison every
theorem makes.

Tensors are ``(m,)`` for one unit or ``(m, n)`` for ``n`` units side by side (one column
per unit); every per-unit result then has shape ``()`` or ``(n,)``. Work in float64 when
checking identities. The functions return plain tensors or small dataclasses of tensors,
so the chapter and the tests compute each side of each statement with the same code.

The network-level helpers (:func:`measure_bn_layers`, :func:`measure_plain_layers`)
evaluate the same quantities at every BN layer of a trained ``nn.Sequential`` network
(:func:`as_sequential` reads a :class:`bnbook.nets.MLP` as one), with exact
Hessian-vector products (``torch.func``, forward-over-reverse). :func:`random_instance`,
:func:`check_instance` and :func:`check_theorem44` build random float64 layers and compute
every side of every statement on them, for the tests and the chapter's instance sweep.
"""

from __future__ import annotations

import copy
import functools
import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor, nn

from bnbook import backprop, norms
from bnbook.errors import BnbookError

__all__ = [
    "TheoryError",
    "batch_standardize",
    "projection_matrix",
    "bn_input_gradient",
    "Thm41",
    "theorem41",
    "bn_second_derivative",
    "bn_hessian_quadratic_form",
    "Thm42",
    "theorem42",
    "Thm44",
    "theorem44",
    "Lemma45",
    "lemma45",
    "unitwise_quadratic_forms",
    "LayerMeasurement",
    "measure_bn_layers",
    "measure_plain_layers",
    "scale_invariance_gap",
    "as_sequential",
    "INSTANCE_KINDS",
    "Instance",
    "random_instance",
    "check_instance",
    "check_theorem44",
]


class TheoryError(BnbookError):
    """Inputs that do not describe a BN layer and batch (wrong shapes, m < 2, zero spread)."""


# ----------------------------------------------------------------------------- checks
def _check_batch(name: str, t: Tensor) -> int:
    """Return the batch size m of a ``(m,)`` or ``(m, n)`` tensor, or raise :class:`TheoryError`."""
    if not isinstance(t, Tensor):
        raise TheoryError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (1, 2):
        raise TheoryError(f"{name} must have shape (m,) or (m, n), got {tuple(t.shape)}")
    m = t.shape[0]
    if m < 2:
        raise TheoryError(f"{name} has batch size m = {m}: BN needs m >= 2")
    return m


def _check_same(**tensors: Tensor) -> int:
    """Check that all tensors have one shape; return m."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{k}{s}" for k, s in shapes.items())
        raise TheoryError(f"shapes must agree (one column per unit over the batch): {listed}")
    name, first = next(iter(tensors.items()))
    return _check_batch(name, first)


def _per_unit(v: Tensor | float, like: Tensor, name: str) -> Tensor:
    """``v`` (a scalar or one value per unit) as a tensor broadcasting like a column reduction."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    units = like.shape[1:]  # () or (n,)
    if v.dim() > 0 and tuple(v.shape) != tuple(units):
        raise TheoryError(f"{name} must be a scalar or have one value per unit {tuple(units)}, got {tuple(v.shape)}")
    return v


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Column-wise inner product over the batch dimension."""
    return (a * b).sum(dim=0)


# ------------------------------------------------------------------- BN forward/backward
def _standardize(y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = torch.sqrt(y.var(dim=0, correction=0) + eps)
    return (y - y.mean(dim=0)) / s, s


def batch_standardize(y: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Return ``(ŷ, s)``: each column standardised over the batch, and ``s = sqrt(σ² + ε)``.

    ``σ²`` is the biased (1/m) batch variance, as in Algorithm 1 of Ioffe & Szegedy.
    """
    _check_batch("y", y)
    if eps < 0:
        raise TheoryError(f"eps must be >= 0, got {eps}")
    y_hat, s = _standardize(y, eps)
    if bool((s == 0).any()):
        raise TheoryError("a unit has zero batch variance and eps = 0: ŷ is undefined")
    return y_hat, s


def projection_matrix(y_hat: Tensor) -> Tensor:
    """Return ``P = I − 11ᵀ/m − ŷŷᵀ/m`` for one unit's ``ŷ ∈ R^m`` (chapter 2's projection).

    With ε = 0, ``P`` is the orthogonal projection onto the complement of span{1, ŷ}, and
    the Jacobian of BN is ``(γ/σ) P`` (Fact C.2 of Santurkar et al.).
    """
    _check_batch("y_hat", y_hat)
    return backprop.projection_matrix(y_hat)


def bn_input_gradient(g: Tensor, y_hat: Tensor, gamma: Tensor | float, s: Tensor | float) -> Tensor:
    """Return ``∂L̂/∂y = (γ/s)(g − mean(g) 1 − ŷ ⟨ŷ, g⟩/m)`` (Fact C.1), column by column.

    ``g = ∂L/∂z``. The formula holds for any ε ≥ 0 (with ``s = sqrt(σ² + ε)``); it is
    chapter 2's compact backward (:func:`bnbook.backprop.bn_backward_compact`).
    """
    _check_same(g=g, y_hat=y_hat)
    gamma = _per_unit(gamma, g, "gamma")
    s = _per_unit(s, g, "s")
    units = g.shape[1:]
    g2, y2 = g.reshape(g.shape[0], -1), y_hat.reshape(g.shape[0], -1)
    n = g2.shape[1]
    grad, _, _ = backprop.bn_backward_compact(g2, y2, gamma.expand(units).reshape(n), (1 / s).expand(units).reshape(n))
    return grad.reshape(g.shape)


# -------------------------------------------------------------------------- Theorem 4.1
@dataclasses.dataclass
class Thm41:
    """The pieces of Theorem 4.1 for each unit (tensors of shape () or (n,)).

    ``rhs_printed`` uses the paper's coefficient 1/√m on the ŷ term; ``rhs_corrected`` is
    the exact value of ‖∇_y L̂‖²: 1/m when ε = 0, and (2 − ρ)/m with ρ = ‖ŷ‖²/m in general.
    """

    scale: Tensor  # γ² / s²  (s = σ when ε = 0)
    grad_sq: Tensor  # ‖g‖², g = ∂L/∂z: the unnormalised network's ‖∇_y L‖² at the same z
    mean_term: Tensor  # ⟨1, g⟩² / m
    yhat_term: Tensor  # ⟨g, ŷ⟩² / m
    rho: Tensor  # ‖ŷ‖² / m = σ² / (σ² + ε); 1 when ε = 0
    rhs_corrected: Tensor  # exact ‖∇_y L̂‖²
    rhs_printed: Tensor  # the paper's right-hand side (1/√m on the ŷ term)


def theorem41(g: Tensor, y_hat: Tensor, gamma: Tensor | float, s: Tensor | float) -> Thm41:
    """Return both right-hand sides of Theorem 4.1 and its terms, for each unit.

    ``g = ∂L/∂z`` is the downstream gradient, ``ŷ`` the standardised batch, ``s`` the
    batch standard deviation (with ε inside, if any). Compare with ``‖∇_y L̂‖²`` computed
    independently (autograd or :func:`bn_input_gradient`).
    """
    m = _check_same(g=g, y_hat=y_hat)
    gamma = _per_unit(gamma, g, "gamma")
    s = _per_unit(s, g, "s")
    scale = gamma**2 / s**2
    grad_sq = _dot(g, g)
    mean_term = g.sum(dim=0) ** 2 / m
    yhat_term = _dot(g, y_hat) ** 2 / m
    rho = _dot(y_hat, y_hat) / m
    # Pythagoras on P g (ε = 0); for ε > 0 the cross term gives (2 − ρ) instead of 1.
    rhs_corrected = scale * (grad_sq - mean_term - (2 - rho) * yhat_term)
    rhs_printed = scale * (grad_sq - mean_term - math.sqrt(m) * yhat_term)  # ⟨g,ŷ⟩²/√m
    return Thm41(scale, grad_sq, mean_term, yhat_term, rho, rhs_corrected, rhs_printed)


# -------------------------------------------------------------------------- Theorem 4.2
def bn_second_derivative(v: Tensor, y_hat: Tensor, s: Tensor | float) -> Tensor:
    """Return ``d²ŷ(y + t v)/dt²`` at ``t = 0``, column by column (any ε ≥ 0).

    With ``v̄ = v − mean(v)``, ``α = ⟨ŷ, v̄⟩/m`` and ``b = ‖v̄‖²/m``:
    ``ŷ'' = (ŷ (3α² − b) − 2 α v̄) / s²``. For ε = 0 and ``v ⊥ 1, ŷ`` this is ``−‖v‖² ŷ/(m σ²)``.
    """
    m = _check_same(v=v, y_hat=y_hat)
    s = _per_unit(s, v, "s")
    v_bar = v - v.mean(dim=0)
    alpha = _dot(y_hat, v_bar) / m
    b = _dot(v_bar, v_bar) / m
    return (y_hat * (3 * alpha**2 - b) - 2 * alpha * v_bar) / s**2


def bn_hessian_quadratic_form(
    v: Tensor,
    g: Tensor,
    y_hat: Tensor,
    gamma: Tensor | float,
    s: Tensor | float,
    uHu: Tensor,
) -> Tensor:
    """Return ``vᵀ (∂²L̂/∂y∂y) v`` per unit, exactly, for any direction ``v`` and any ε.

    Chain rule to second order: ``(Jv)ᵀ H (Jv) + γ ⟨g, ŷ''⟩`` with ``J = ∂z/∂y``. The
    caller passes ``uHu = (Jv)ᵀ H (Jv)``, the downstream Hessian's quadratic form in the
    pushed-forward direction ``u = Jv`` (see :func:`bn_input_gradient` with g → v for ``Jv``).
    """
    _check_same(v=v, g=g, y_hat=y_hat)
    gamma = _per_unit(gamma, g, "gamma")
    return uHu + gamma * _dot(g, bn_second_derivative(v, y_hat, s))


@dataclasses.dataclass
class Thm42:
    """The pieces of Theorem 4.2 for each unit, with ``v = ∇_y L̂`` (the BN net's gradient)."""

    scaled_curvature: Tensor  # (γ²/σ²) vᵀ H v
    reduction: Tensor  # (γ / (m σ²)) ⟨g, ŷ⟩ ‖v‖²  (subtracted)
    rhs_first: Tensor  # first printed form: scaled_curvature − reduction (= the LHS at ε = 0)
    rhs_second: Tensor  # second printed form: (γ²/σ²)(gᵀHg − ⟨g,ŷ⟩‖v‖²/(mγ))
    v_sq: Tensor  # ‖v‖²
    g_inner_yhat: Tensor  # ⟨g, ŷ⟩


def theorem42(
    g: Tensor,
    y_hat: Tensor,
    gamma: Tensor | float,
    s: Tensor | float,
    v: Tensor,
    vHv: Tensor,
    gHg: Tensor,
) -> Thm42:
    """Return the right-hand sides of Theorem 4.2 (σ read as σ_j), for each unit.

    ``v = ∇_y L̂``; ``vHv`` and ``gHg`` are the downstream Hessian ``H = ∂²L/∂z∂z``'s quadratic
    forms in the directions ``v`` and ``g``. Compare with ``vᵀ (∂²L̂/∂y∂y) v`` from an HVP.
    """
    m = _check_same(g=g, y_hat=y_hat, v=v)
    gamma = _per_unit(gamma, g, "gamma")
    s = _per_unit(s, g, "s")
    scale = gamma**2 / s**2
    v_sq = _dot(v, v)
    g_y = _dot(g, y_hat)
    scaled = scale * vHv
    reduction = gamma / (m * s**2) * g_y * v_sq
    rhs_second = scale * (gHg - g_y * v_sq / (m * gamma))
    return Thm42(scaled, reduction, scaled - reduction, rhs_second, v_sq, g_y)


# -------------------------------------------------------------------------- Theorem 4.4
@dataclasses.dataclass
class Thm44:
    """Theorem 4.4 on one batch ``X`` with spectral norm λ, for each unit j.

    ``lhs = ‖∇_{W_·j} L̂‖² = ‖Xᵀ ∇_{y_j} L̂‖²``. ``g_max = λ² ‖g‖²`` is the largest
    ``‖Xᵀ g‖²`` over inputs with ‖X‖ ≤ λ at a fixed output gradient g (the paper's g_j).
    """

    lam: Tensor  # λ = ‖X‖₂
    lhs: Tensor  # ‖∇_W L̂‖² for this X
    plain: Tensor  # ‖Xᵀ g‖²: the unnormalised net's weight gradient at the same z
    g_max: Tensor  # λ² ‖g‖²
    rhs_corrected: Tensor  # (γ²/σ²)(g_max − λ² m μ_g² − (λ²/m) ⟨g, ŷ⟩²)
    rhs_printed: Tensor  # (γ²/σ²)(g_max² − m μ_g² − λ² ⟨g, ŷ⟩²), μ_g read as mean(g)


def theorem44(X: Tensor, g: Tensor, y_hat: Tensor, gamma: Tensor | float, s: Tensor | float) -> Thm44:
    """Return both sides of Theorem 4.4 (printed and corrected) for the input batch ``X``.

    ``X`` is (m, d), the layer's input batch (``y = X W``); ``g``, ``ŷ`` are (m,) or (m, n).
    The corrected bound is Theorem 4.1 (exact, ε = 0) times ``‖X‖₂²``.
    """
    m = _check_same(g=g, y_hat=y_hat)
    if X.dim() != 2 or X.shape[0] != m:
        raise TheoryError(f"X must be the (m, d) input batch with m = {m}, got {tuple(X.shape)}")
    gamma_t = _per_unit(gamma, g, "gamma")
    s_t = _per_unit(s, g, "s")
    lam = torch.linalg.matrix_norm(X, ord=2)
    grad_y = bn_input_gradient(g, y_hat, gamma_t, s_t)
    lhs = (X.T @ grad_y.reshape(m, -1)).pow(2).sum(dim=0).reshape(g.shape[1:])
    plain = (X.T @ g.reshape(m, -1)).pow(2).sum(dim=0).reshape(g.shape[1:])
    t41 = theorem41(g, y_hat, gamma_t, s_t)
    g_max = lam**2 * t41.grad_sq
    mu_g = g.mean(dim=0)
    rhs_corrected = t41.scale * (g_max - lam**2 * m * mu_g**2 - lam**2 * t41.yhat_term)
    rhs_printed = t41.scale * (g_max**2 - m * mu_g**2 - lam**2 * _dot(g, y_hat) ** 2)
    return Thm44(lam, lhs, plain, g_max, rhs_corrected, rhs_printed)


# --------------------------------------------------------------------------- Lemma 4.5
@dataclasses.dataclass
class Lemma45:
    """Lemma 4.5 on one instance: distances from ``W0`` to ``W*`` and to the BN optimum ``k W*``."""

    k: float  # ⟨W*, W0⟩ / ‖W*‖²: the closest point of the ray {k W*: k > 0}
    dist_sq_plain: float  # ‖W0 − W*‖²
    dist_sq_bn: float  # ‖W0 − k W*‖²
    gain_predicted: float  # (‖W*‖² − ⟨W*, W0⟩)² / ‖W*‖²


def lemma45(W0: Tensor, W_star: Tensor) -> Lemma45:
    """Return the quantities of Lemma 4.5; ``dist_sq_plain − dist_sq_bn`` equals ``gain_predicted``.

    Requires ``⟨W0, W*⟩ > 0`` (the lemma's hypothesis), which makes ``k > 0`` so that ``k W*``
    is again an optimum of the BN network (scale invariance with γ, β fixed).
    """
    if W0.shape != W_star.shape:
        raise TheoryError(f"W0 {tuple(W0.shape)} and W* {tuple(W_star.shape)} must have one shape")
    w0, ws = W0.reshape(-1).double(), W_star.reshape(-1).double()
    inner, norm_sq = float(w0 @ ws), float(ws @ ws)
    if norm_sq == 0:
        raise TheoryError("W* = 0: the lemma needs a non-zero optimum")
    if inner <= 0:
        raise TheoryError(f"Lemma 4.5 assumes ⟨W0, W*⟩ > 0, got {inner:.4g}")
    k = inner / norm_sq
    return Lemma45(
        k=k,
        dist_sq_plain=float((w0 - ws).pow(2).sum()),
        dist_sq_bn=float((w0 - k * ws).pow(2).sum()),
        gain_predicted=(norm_sq - inner) ** 2 / norm_sq,
    )


# ------------------------------------------------------------- networks: exact measurements
def unitwise_quadratic_forms(f: Callable[[Tensor], Tensor], Y: Tensor, D: Tensor) -> Tensor:
    """Return ``q_j = D_jᵀ (∂²f/∂Y_j∂Y_j) D_j`` for every column j of ``Y`` (shape (n,)).

    Each is one exact Hessian-vector product (forward-over-reverse, ``torch.func``) with a
    tangent that is zero outside column j; the n products run as one ``vmap``.
    """
    if Y.shape != D.shape or Y.dim() != 2:
        raise TheoryError(f"Y and D must both be (m, n), got {tuple(Y.shape)} and {tuple(D.shape)}")
    n = Y.shape[1]
    eye = torch.eye(n, dtype=Y.dtype, device=Y.device)
    tangents = D.unsqueeze(0) * eye.unsqueeze(1)  # (n, m, n): tangent j lives in column j
    grad_f = torch.func.grad(f)

    def hvp(t: Tensor) -> Tensor:
        return torch.func.jvp(grad_f, (Y,), (t,))[1]

    return (torch.func.vmap(hvp)(tangents) * tangents).sum(dim=(1, 2))


@dataclasses.dataclass
class LayerMeasurement:
    """Per-unit quantities at one layer of a network on one batch (float64 tensors of shape (n,))."""

    index: int  # position of the BN (or Linear) module in the Sequential
    values: dict[str, Tensor]


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, norms.BatchNorm))


def _functional_copy(model: nn.Sequential) -> nn.Sequential:
    """A float64 copy whose BN layers use batch statistics and never write running buffers.

    (``torch.func`` transforms forbid in-place buffer updates; batch statistics are what the
    training-mode loss uses anyway.)
    """
    model = copy.deepcopy(model).double().train()
    for module in model.modules():
        if _is_bn(module):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            if hasattr(module, "num_batches_tracked"):
                module.num_batches_tracked = None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure_bn_layers(
    model: nn.Sequential,
    x: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    eps: float = 0.0,
    hessians: bool = True,
) -> list[LayerMeasurement]:
    """Evaluate Theorems 4.1 and 4.2 at every BN layer of ``model`` on the batch ``(x, labels)``.

    For each BN module the measured layer is recomputed in float64 with ``ε = eps`` (default
    0, the paper's setting); everything downstream — later BN layers included — is the
    network as it is, in training mode. Returned per unit: ``grad_sq_bn`` (‖∇_y L̂‖² by
    autograd), the :class:`Thm41` and :class:`Thm42` pieces, ``curv_bn`` (``vᵀ∇²L̂v`` by HVP,
    ``v = ∇_y L̂``), ``vHv``, ``gHg``, ``gamma``, ``sigma``. With ``hessians=False`` only
    ``grad_sq_bn``, ``gamma``, ``sigma`` and the Theorem 4.1 pieces (no HVPs). The model is
    not modified.
    """
    net = _functional_copy(model)
    x = x.to(dtype=torch.float64)
    out: list[LayerMeasurement] = []
    for i, module in enumerate(net):
        if not _is_bn(module):
            continue
        prefix, suffix = net[:i], net[i + 1 :]
        with torch.no_grad():
            Y = prefix(x)
        if Y.dim() != 2:
            raise TheoryError(f"BN layer {i} sees a {Y.dim()}-d input; the theorems are for (m, n) layers")
        gamma = module.weight.detach() if module.weight is not None else torch.ones_like(Y[0])
        beta = module.bias.detach() if module.bias is not None else torch.zeros_like(Y[0])

        def loss_of_z(Z: Tensor, suffix=suffix) -> Tensor:
            return loss_fn(suffix(Z), labels)

        def loss_of_y(Yv: Tensor, gamma=gamma, beta=beta, loss_of_z=loss_of_z) -> Tensor:
            y_hat, _ = _standardize(Yv, eps)  # no checks: runs under torch.func transforms
            return loss_of_z(gamma * y_hat + beta)

        y_hat, s = batch_standardize(Y, eps)
        Z = gamma * y_hat + beta
        g = torch.func.grad(loss_of_z)(Z)
        v = torch.func.grad(loss_of_y)(Y)
        t41 = theorem41(g, y_hat, gamma, s)
        values = {
            "grad_sq_bn": _dot(v, v),
            "gamma": gamma.clone(),
            "sigma": s.clone(),
            **{f"t41_{k}": val for k, val in dataclasses.asdict(t41).items()},
        }
        if not hessians:
            out.append(LayerMeasurement(i, values))
            continue
        curv_bn = unitwise_quadratic_forms(loss_of_y, Y, v)
        vHv = unitwise_quadratic_forms(loss_of_z, Z, v)
        gHg = unitwise_quadratic_forms(loss_of_z, Z, g)
        t42 = theorem42(g, y_hat, gamma, s, v, vHv, gHg)
        values.update(
            curv_bn=curv_bn,
            vHv=vHv,
            gHg=gHg,
            **{f"t42_{k}": val for k, val in dataclasses.asdict(t42).items()},
        )
        out.append(LayerMeasurement(i, values))
    if not out:
        raise TheoryError("measure_bn_layers found no BN layer in the model")
    return out


def scale_invariance_gap(
    model: nn.Sequential,
    x: Tensor,
    labels: Tensor,
    k: float,
    eps: float,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> float:
    """Return ``|L̂(k W₁) − L̂(W₁)| / |L̂(W₁)|`` for the first Linear layer's weights ``W₁``.

    Every BN layer is recomputed in float64 with batch statistics and the given ``eps``;
    with ``eps = 0`` BN makes the loss exactly invariant to ``k > 0`` (the fact Lemma 4.5
    rests on), with ``eps > 0`` only approximately.
    """
    if not k > 0:
        raise TheoryError(f"the scale k must be positive, got {k}")
    net = _functional_copy(model)
    for module in net.modules():
        if _is_bn(module):
            module.eps = eps
    first = next((mod for mod in net if isinstance(mod, nn.Linear)), None)
    if first is None:
        raise TheoryError("scale_invariance_gap needs a Linear layer")
    x = x.to(dtype=torch.float64)
    with torch.no_grad():
        base = float(loss_fn(net(x), labels))
        first.weight.mul_(k)
        scaled = float(loss_fn(net(x), labels))
    return abs(scaled - base) / abs(base)


def measure_plain_layers(
    model: nn.Sequential,
    x: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> list[LayerMeasurement]:
    """Per-unit ``‖∂L/∂y_j‖²`` and ``g_jᵀ H_jj g_j`` at every hidden Linear output of a network.

    Meant for the network without BN, to set its own layer gradients beside the BN net's.
    The last Linear (the classifier) is skipped: it has no BN counterpart.
    """
    net = _functional_copy(model)
    x = x.to(dtype=torch.float64)
    linear = [i for i, mod in enumerate(net) if isinstance(mod, nn.Linear)]
    out: list[LayerMeasurement] = []
    for i in linear[:-1]:
        prefix, suffix = net[: i + 1], net[i + 1 :]
        with torch.no_grad():
            Y = prefix(x)

        def loss_of_y(Yv: Tensor, suffix=suffix) -> Tensor:
            return loss_fn(suffix(Yv), labels)

        g = torch.func.grad(loss_of_y)(Y)
        out.append(LayerMeasurement(i, {"grad_sq": _dot(g, g), "gHg": unitwise_quadratic_forms(loss_of_y, Y, g)}))
    if not out:
        raise TheoryError("measure_plain_layers needs at least two Linear layers")
    return out


def as_sequential(model: nn.Module) -> nn.Sequential:
    """Return ``model`` as an ``nn.Sequential`` sharing its modules.

    Accepts a Sequential, or a :class:`bnbook.nets.MLP`-like model (``linears``, ``norms``,
    ``act``, ``readout``), which becomes ``Linear, norm, act, …, readout``.
    """
    if isinstance(model, nn.Sequential):
        return model
    if all(hasattr(model, a) for a in ("linears", "norms", "act", "readout")):
        layers: list[nn.Module] = []
        for lin, norm in zip(model.linears, model.norms):
            layers += [lin, norm, model.act]
        return nn.Sequential(*layers, model.readout)
    raise TheoryError(f"cannot read {type(model).__name__} as a sequence of layers: pass an nn.Sequential or a bnbook.nets.MLP")


# ------------------------------------------------------------------ random instances
INSTANCE_KINDS = ("linear", "cubic", "mlp")
"""Downstream losses of random instances: linear, quadratic-plus-cubic (units coupled), a small tanh MLP with cross-entropy."""


@dataclasses.dataclass
class Instance:
    """One BN layer on one batch with a downstream loss: ``L̂(y) = loss_of_z(γ ŷ(y) + β)``."""

    y: Tensor  # (m, n) pre-BN outputs
    gamma: Tensor  # (n,)
    beta: Tensor  # (n,)
    loss_of_z: Callable[[Tensor], Tensor]
    kind: str

    def loss_of_y(self, y: Tensor, eps: float = 0.0) -> Tensor:
        """The BN network's loss ``L̂`` as a function of the pre-BN outputs."""
        y_hat, _ = _standardize(y, eps)
        return self.loss_of_z(self.gamma * y_hat + self.beta)


def random_instance(m: int, n: int, kind: str, seed: int, gamma: float | None = None) -> Instance:
    """A float64 random BN layer (m × n batch, random scale and offset per unit) with a ``kind`` loss.

    ``gamma``: one value for every unit; by default γ is drawn per unit from ±U(0.2, 3).
    """
    if kind not in INSTANCE_KINDS:
        raise TheoryError(f"unknown instance kind {kind!r}; known: {', '.join(INSTANCE_KINDS)}")
    if m < 2 or n < 1:
        raise TheoryError(f"an instance needs m >= 2 and n >= 1, got m = {m}, n = {n}")
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, **f64)

    scale = torch.exp(torch.empty(n, **f64).uniform_(-2.3, 2.3, generator=gen))  # σ from 0.1 to 10
    y = rand(m, n) * scale + rand(n) * 3
    if gamma is None:
        sign = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0).to(torch.float64)
        g = sign * torch.empty(n, **f64).uniform_(0.2, 3.0, generator=gen)
    else:
        g = torch.full((n,), float(gamma), **f64)
    beta = rand(n)
    w = rand(m, n)
    if kind == "linear":
        def loss_of_z(z: Tensor) -> Tensor:
            return (w * z).sum() / m
    elif kind == "cubic":
        B = rand(n, n) / math.sqrt(n)

        def loss_of_z(z: Tensor) -> Tensor:
            return ((w * z).sum() + 0.5 * (z @ B).pow(2).sum() + 0.1 * z.pow(3).sum()) / m
    else:
        V = rand(n, 5)
        labels = torch.randint(0, 5, (m,), generator=gen)

        def loss_of_z(z: Tensor) -> Tensor:
            return nn.functional.cross_entropy(torch.tanh(z) @ V, labels)

    return Instance(y, g, beta, loss_of_z, kind)


def check_instance(inst: Instance, eps: float = 0.0, direction_seed: int = 0) -> dict[str, Tensor]:
    """Every side of Theorems 4.1 and 4.2 on one instance, with the left sides from autograd.

    Returns per-unit tensors: ``grad_sq`` (‖∇_y L̂‖², autograd), the :class:`Thm41` right
    sides, ``curv`` (``vᵀ∇²L̂v`` by HVP, ``v = ∇_y L̂``), the :class:`Thm42` right sides, and,
    for a random direction ``d``, ``curv_dir`` (HVP) beside ``curv_dir_formula``
    (:func:`bn_hessian_quadratic_form`, exact for any ε). ``scale41``, ``scale42`` and
    ``scale_dir`` are the sizes of the terms each identity adds up (|term| summed), the
    yardstick for round-off: at m = 2 and ε = 0 both sides of Theorem 4.1 are exactly 0.
    """
    y = inst.y
    y_hat, s = batch_standardize(y, eps)
    z = inst.gamma * y_hat + inst.beta
    g = torch.func.grad(inst.loss_of_z)(z)
    loss_y = functools.partial(inst.loss_of_y, eps=eps)
    v = torch.func.grad(loss_y)(y)
    t41 = theorem41(g, y_hat, inst.gamma, s)
    curv = unitwise_quadratic_forms(loss_y, y, v)
    t42 = theorem42(
        g, y_hat, inst.gamma, s, v,
        unitwise_quadratic_forms(inst.loss_of_z, z, v),
        unitwise_quadratic_forms(inst.loss_of_z, z, g),
    )
    d = torch.randn(y.shape, generator=torch.Generator().manual_seed(direction_seed), dtype=y.dtype)
    u = bn_input_gradient(d, y_hat, inst.gamma, s)  # J d (J is symmetric)
    uHu = unitwise_quadratic_forms(inst.loss_of_z, z, u)
    bn_term = bn_hessian_quadratic_form(d, g, y_hat, inst.gamma, s, torch.zeros_like(uHu))
    return {
        "grad_sq": _dot(v, v),
        "grad_sq_plain": t41.grad_sq,
        "rhs41_corrected": t41.rhs_corrected,
        "rhs41_printed": t41.rhs_printed,
        "scale41": t41.scale * t41.grad_sq,  # size of the terms: the yardstick of round-off
        "curv": curv,
        "rhs42_first": t42.rhs_first,
        "rhs42_second": t42.rhs_second,
        "scale42": t42.scaled_curvature.abs() + t42.reduction.abs(),
        "curv_dir": unitwise_quadratic_forms(loss_y, y, d),
        "curv_dir_formula": uHu + bn_term,
        "scale_dir": uHu.abs() + bn_term.abs(),
    }


def check_theorem44(
    m: int, d: int, n: int, kind: str, seed: int, lam: float = 1.0, loss_scale: float = 1.0
) -> dict[str, Tensor]:
    """Theorem 4.4 on a random layer ``y = X W`` whose input batch has spectral norm ``lam``.

    The downstream loss (of ``kind``, see :func:`random_instance`) is multiplied by
    ``loss_scale``: a rescaled loss shows the printed statement's units do not match.
    Returns per-unit tensors: ``lhs_autograd`` (‖∇_{W·j} L̂‖² by autograd) and the
    :class:`Thm44` fields.
    """
    if not lam > 0:
        raise TheoryError(f"lam must be positive, got {lam}")
    inst = random_instance(m, n, kind, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(m, d, generator=gen, dtype=torch.float64)
    X = X * (lam / torch.linalg.matrix_norm(X, ord=2))
    W = torch.linalg.lstsq(X, inst.y).solution if d >= m else torch.randn(d, n, generator=gen, dtype=torch.float64)
    y = X @ W

    def loss_of_z(z: Tensor) -> Tensor:
        return loss_scale * inst.loss_of_z(z)

    def loss_of_w(Wv: Tensor) -> Tensor:
        y_hat, _ = _standardize(X @ Wv, 0.0)
        return loss_of_z(inst.gamma * y_hat + inst.beta)

    y_hat, s = batch_standardize(y)
    g = torch.func.grad(loss_of_z)(inst.gamma * y_hat + inst.beta)
    gw = torch.func.grad(loss_of_w)(W)
    t44 = theorem44(X, g, y_hat, inst.gamma, s)
    return {"lhs_autograd": gw.pow(2).sum(dim=0), **dataclasses.asdict(t44)}
