"""Chapter 2, "Backpropagation through BN": every claim of the derivation, checked numerically.

The experiment feeds real images (``mnist5k``) through a random linear layer (and a
random 3×3 convolution) into BN, pushes a real loss (cross-entropy through a random
linear head, with the true labels) back through it, and measures, in float64:

- the staged chain rule (Ioffe & Szegedy §3), the compact formula and PyTorch's autograd
  of its native BN agree, and the second term of ∂ℓ/∂μ vanishes;
- the Jacobian of one unit equals (γ/s)·P, P = I − 11ᵀ/m − x̂x̂ᵀ/m, and P's projection
  properties hold exactly at ε = 0, with the predicted O(ε/σ²) defect at ε > 0;
- the gradient is orthogonal to 1 and to x̂, BN is invariant to scaling/shifting its input,
  and so the weight gradient is orthogonal to the weights;
- the same for a convolution (per channel over N, H, W), and the inference-mode Jacobian
  (diagonal: no batch coupling);
- speed: forward+backward of the hand-written Function against PyTorch's native kernel.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bnbook import backprop as bp
from bnbook import data, norms
from bnbook.config import ChapterConfig
from bnbook.env import num_threads
from bnbook.errors import BnbookError
from bnbook.results import Outcome, Result

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class BackpropConfig(ChapterConfig):
    """Chapter 2's numerical checks and benchmark. Defaults are the quick profile."""

    dataset: str = "mnist5k"  # images fed to the random layers
    batch: int = 64  # m of the fully connected case (the Jacobian figure is m×m)
    units: int = 16  # units of the random linear layer before BN
    unit: int = 0  # the unit whose Jacobian is drawn
    eps: float = 1e-5  # PyTorch's default; the paper gives no value
    lr: float = 0.1  # step size of the first-order weight-norm check
    conv_batch: int = 4  # N of the convolutional case
    conv_channels: int = 4  # C of the convolutional case
    conv_pool: int = 4  # images average-pooled by this factor (28/4 = 7: m = N·7·7)
    population_batches: int = 8  # batches of size `batch` averaged for inference statistics
    bench_shapes: tuple[tuple[int, ...], ...] = ((256, 512), (128, 64, 8, 8), (32, 64, 32, 32))
    bench_repeats: int = 20  # timed repeats (median reported)
    bench_warmup: int = 3  # untimed warm-up repeats
    threads: int = 1  # torch threads during the experiment; 0: torch's default

    profiles: ClassVar = {
        "smoke": {
            "batch": 12, "units": 4, "conv_batch": 2, "conv_channels": 2, "population_batches": 2,
            "bench_shapes": ((64, 32), (8, 4, 8, 8)), "bench_repeats": 3, "bench_warmup": 1,
        },
        "paper": {
            "batch": 128, "units": 100, "conv_batch": 8,
            "bench_shapes": (
                (256, 512), (1024, 4096), (128, 64, 8, 8), (32, 64, 32, 32),
                (128, 64, 32, 32), (64, 256, 16, 16),
            ),
            "bench_repeats": 50, "bench_warmup": 5, "threads": 0,
        },
    }

    def __post_init__(self) -> None:
        if self.batch < 2 or self.conv_batch < 1:
            raise BnbookError(f"batch must be >= 2 and conv_batch >= 1, got {self.batch}, {self.conv_batch}")
        if not 0 <= self.unit < self.units:
            raise BnbookError(f"unit must be in [0, {self.units}), got {self.unit}")
        if self.eps <= 0:
            raise BnbookError(f"eps must be > 0 (the chapter contrasts it with eps = 0), got {self.eps}")
        if 28 % self.conv_pool:
            raise BnbookError(f"conv_pool must divide 28, got {self.conv_pool}")


def _rel(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b| (0 when both vanish)."""
    scale = b.abs().max()
    return float((a - b).abs().max() / scale) if scale > 0 else float((a - b).abs().max())


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of the angle between matching rows of a and b (unit by unit)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _abs_max(t: Tensor) -> float:
    return float(t.abs().max())


@dataclasses.dataclass
class _Setup:
    """The fully connected case: u (m, d) images, W (units, d), head V, labels."""

    u: Tensor
    w: Tensor
    gamma: Tensor
    beta: Tensor
    head: Tensor
    labels: Tensor


def _setup(cfg: BackpropConfig, ds: data.Dataset, gen: torch.Generator) -> _Setup:
    idx = torch.randperm(len(ds.y_train), generator=gen)[: cfg.batch]
    u = ds.x_train[idx].flatten(1).to(F64)
    d = u.shape[1]
    w = torch.randn(cfg.units, d, generator=gen, dtype=F64) / d**0.5
    gamma = 0.5 + 1.5 * torch.rand(cfg.units, generator=gen, dtype=F64)
    beta = 0.5 * torch.randn(cfg.units, generator=gen, dtype=F64)
    head = torch.randn(ds.num_classes, cfg.units, generator=gen, dtype=F64) / cfg.units**0.5
    return _Setup(u, w, gamma, beta, head, ds.y_train[idx])


def _loss(s: _Setup, y: Tensor) -> Tensor:
    """Cross-entropy of a random linear head on BN's output (a real downstream loss)."""
    return F.cross_entropy(y @ s.head.T, s.labels)


def _weight_grad(s: _Setup, w: Tensor, eps: float) -> Tensor:
    w = w.detach().clone().requires_grad_()
    y = bp.manual_batch_norm(s.u @ w.T, s.gamma, s.beta, eps)
    (grad,) = torch.autograd.grad(_loss(s, y), w)
    return grad


def _fc_checks(cfg: BackpropConfig, s: _Setup) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Staged = compact = autograd; the Jacobian and P; orthogonality; invariance; weights."""
    metrics: dict[str, Any] = {}
    x = (s.u @ s.w.T).requires_grad_()
    y = F.batch_norm(x, None, None, s.gamma, s.beta, training=True, eps=cfg.eps)
    (g,) = torch.autograd.grad(_loss(s, y), y)  # g = ∂ℓ/∂y, the incoming gradient
    gamma = s.gamma.clone().requires_grad_()
    beta = s.beta.clone().requires_grad_()
    y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=cfg.eps)
    auto = torch.autograd.grad(y, (x, gamma, beta), g)
    x = x.detach()
    staged = bp.staged_gradients(g, x, s.gamma, cfg.eps)
    x_hat, _, inv_std = bp.normalize(x, cfg.eps)
    compact = bp.bn_backward_compact(g, x_hat, s.gamma, inv_std)
    for name, i in (("x", 0), ("gamma", 1), ("beta", 2)):
        metrics[f"staged_vs_autograd_{name}"] = _rel(staged[name], auto[i])
        metrics[f"compact_vs_autograd_{name}"] = _rel(compact[i], auto[i])
    metrics["compact_vs_staged_x"] = _rel(compact[0], staged["x"])
    metrics["dmu_via_var_max"] = _abs_max(staged["mean_via_var"])
    metrics["dmu_max"] = _abs_max(staged["mean"])
    metrics["dmu_via_var_relative"] = metrics["dmu_via_var_max"] / metrics["dmu_max"]
    metrics["sum_x_minus_mu_max"] = _abs_max((x - x.mean(0)).sum(0))

    # Orthogonality of ∂ℓ/∂x to 1 (exact for every ε) and to x̂ (exact at ε = 0), unit by unit.
    grad_x = auto[0].T  # (units, m)
    ones = torch.ones_like(grad_x)
    metrics["cos_grad_ones_max"] = _abs_max(_cos(grad_x, ones))
    xh0, _, inv0 = bp.normalize(x, 0.0)
    grad_x0 = bp.bn_backward_compact(g, xh0, s.gamma, inv0)[0].T
    metrics["cos_grad_xhat_eps0_max"] = _abs_max(_cos(grad_x0, xh0.T))
    metrics["cos_grad_ones_eps0_max"] = _abs_max(_cos(grad_x0, ones))
    metrics["cos_grad_xhat_eps_max"] = _abs_max(_cos(grad_x, x_hat.T))
    # predicted at ε > 0: x̂ᵀ ∂ℓ/∂x = (γ/s)·(ε/(σ²+ε))·x̂ᵀg
    var = x.var(0, correction=0)
    predicted = s.gamma * inv_std * cfg.eps / (var + cfg.eps) * (x_hat * g).sum(0)
    metrics["xhat_dot_grad_vs_predicted"] = _rel((x_hat * auto[0]).sum(0), predicted)

    # Invariance: BN(a·x + b) = BN(x) at ε = 0, for a > 0 and b per unit.
    a = 0.25 + 4 * torch.rand(cfg.units, dtype=F64, generator=torch.Generator().manual_seed(cfg.seed + 1))
    b = torch.randn(cfg.units, dtype=F64, generator=torch.Generator().manual_seed(cfg.seed + 2))
    ref = bp.manual_batch_norm(x, s.gamma, s.beta, 0.0)
    metrics["invariance_eps0"] = _rel(bp.manual_batch_norm(a * x + b, s.gamma, s.beta, 0.0), ref)
    metrics["invariance_eps"] = _rel(
        bp.manual_batch_norm(a * x + b, s.gamma, s.beta, cfg.eps), bp.manual_batch_norm(x, s.gamma, s.beta, cfg.eps)
    )

    # Weights: ⟨W_k, ∂ℓ/∂W_k⟩ = 0 at ε = 0, so an SGD step changes ‖W‖² only by lr²‖∇‖².
    for tag, eps in (("eps0", 0.0), ("eps", cfg.eps)):
        grad_w = _weight_grad(s, s.w, eps)
        metrics[f"cos_w_gradw_{tag}_max"] = _abs_max(_cos(s.w, grad_w))
        change = (s.w - cfg.lr * grad_w).square().sum() - s.w.square().sum()
        second_order = cfg.lr**2 * grad_w.square().sum()
        metrics[f"norm_change_vs_second_order_{tag}"] = float((change - second_order).abs() / second_order)
    # Ioffe & Szegedy §3.3: ∂ℓ/∂(cW) at cW equals (1/c)·∂ℓ/∂W at W (ε = 0).
    c = 3.0
    metrics["scaled_weight_grad_rel"] = _rel(c * _weight_grad(s, c * s.w, 0.0), _weight_grad(s, s.w, 0.0))

    # The Jacobian of one unit: autograd through the native BN vs (γ/s)·P.
    k = cfg.unit
    xk = x[:, k]
    gk, bk = float(s.gamma[k]), float(s.beta[k])
    jac = bp.jacobian_autograd(xk, gk, bk, cfg.eps)
    formula = gk * inv_std[k] * bp.projection_matrix(x_hat[:, k])
    metrics["jacobian_rel"] = _rel(jac, formula)
    jac32 = bp.jacobian_autograd(xk.float(), gk, bk, cfg.eps).to(F64)
    metrics["jacobian_rel_float32"] = _rel(jac32, formula)
    metrics["jacobian_symmetry"] = _rel(jac, jac.T)
    arrays = {"jac_autograd": jac.numpy(), "jac_formula": formula.numpy()}
    metrics.update(_projection_checks(xk, cfg.eps))
    metrics["unit_sigma2"] = float(var[k])
    return metrics, arrays


def _projection_checks(xk: Tensor, eps: float) -> dict[str, float]:
    """P's properties at ε = 0 (exact) and at ε (defect ε/(σ²+ε) along x̂), for one unit."""
    out: dict[str, float] = {}
    m = xk.shape[0]
    ones = torch.ones_like(xk)
    for tag, e in (("eps0", 0.0), ("eps", eps)):
        xh = bp.normalize(xk[:, None], e)[0][:, 0]
        p = bp.projection_matrix(xh)
        out[f"P_idempotent_{tag}"] = float(torch.linalg.matrix_norm(p @ p - p, ord=2))  # spectral norm
        out[f"P_symmetric_{tag}"] = _abs_max(p - p.T)
        out[f"P_ones_{tag}"] = _abs_max(p @ ones) / m**0.5
        out[f"P_xhat_{tag}"] = float((p @ xh).norm() / xh.norm())  # the eigenvalue along x̂
        out[f"P_trace_{tag}"] = float(torch.trace(p))
        out[f"xhat_norm2_over_m_{tag}"] = float(xh.square().sum() / m)
    var = float(xk.var(correction=0))
    out["P_xhat_eps_predicted"] = eps / (var + eps)
    out["P_idempotent_eps_predicted"] = eps * var / (var + eps) ** 2
    out["xhat_norm2_over_m_eps_predicted"] = var / (var + eps)
    out["m"] = m
    return out


def _epsilon_sweep(xk: Tensor, eps: float, points: int = 41) -> dict[str, np.ndarray]:
    """Rescale one unit so that σ² sweeps 1e-4·ε … 1e4·ε; measure P's defect against the prediction."""
    base = float(xk.var(correction=0))
    target = eps * torch.logspace(-4, 4, points, dtype=F64)
    lam, idem = [], []
    for s2 in target:
        xh = bp.normalize((xk * (s2 / base).sqrt())[:, None], eps)[0][:, 0]
        p = bp.projection_matrix(xh)
        lam.append(float((p @ xh).norm() / xh.norm()))
        idem.append(float(torch.linalg.matrix_norm(p @ p - p, ord=2)))
    s2 = target.numpy()
    return {
        "sweep_sigma2": s2,
        "sweep_lambda": np.array(lam),
        "sweep_lambda_predicted": eps / (s2 + eps),
        "sweep_idempotence": np.array(idem),
        "sweep_idempotence_predicted": eps * s2 / (s2 + eps) ** 2,
    }


def _conv_checks(cfg: BackpropConfig, ds: data.Dataset, gen: torch.Generator) -> dict[str, Any]:
    """A random 3×3 convolution on pooled images, then BN per channel over (N, H, W)."""
    idx = torch.randperm(len(ds.y_train), generator=gen)[: cfg.conv_batch]
    img = F.avg_pool2d(ds.x_train[idx].to(F64), cfg.conv_pool)
    kernel = torch.randn(cfg.conv_channels, img.shape[1], 3, 3, generator=gen, dtype=F64) / 3.0
    x = F.conv2d(img, kernel, padding=1)
    n, c, h, w = x.shape
    gamma = 0.5 + 1.5 * torch.rand(c, generator=gen, dtype=F64)
    beta = 0.5 * torch.randn(c, generator=gen, dtype=F64)
    g = torch.randn(x.shape, generator=gen, dtype=F64)
    ours = [t.requires_grad_() for t in (x.clone(), gamma.clone(), beta.clone())]
    grads_ours = torch.autograd.grad(bp.manual_batch_norm(*ours, eps=cfg.eps), ours, g)
    native = [t.requires_grad_() for t in (x.clone(), gamma.clone(), beta.clone())]
    y_native = F.batch_norm(native[0], None, None, native[1], native[2], training=True, eps=cfg.eps)
    grads_native = torch.autograd.grad(y_native, native, g)
    out: dict[str, Any] = {"conv_shape": [n, c, h, w], "conv_m": n * h * w}
    for name, a, b in zip(("x", "gamma", "beta"), grads_ours, grads_native):
        out[f"conv_ours_vs_native_{name}"] = _rel(a, b)
    per_channel = lambda t: t.transpose(0, 1).reshape(c, -1)  # noqa: E731  (C, N·H·W)
    xh0, _, inv0 = bp.normalize(x, 0.0)
    gx0 = bp.bn_backward_compact(g, xh0, gamma, inv0)[0]
    out["conv_cos_grad_ones_max"] = _abs_max(_cos(per_channel(grads_native[0]), torch.ones(c, n * h * w, dtype=F64)))
    out["conv_cos_grad_xhat_eps0_max"] = _abs_max(_cos(per_channel(gx0), per_channel(xh0)))
    # The Jacobian of channel 0 over its m = N·H·W values is again (γ/s)·P.
    x0 = per_channel(x)[0]
    jac = bp.jacobian_autograd(x0, float(gamma[0]), 0.0, cfg.eps)
    xh, _, inv = bp.normalize(x, cfg.eps)
    formula = gamma[0] * inv[0] * bp.projection_matrix(per_channel(xh)[0])
    out["conv_jacobian_rel"] = _rel(jac, formula)
    # A channel's statistics really pool N, H and W: a per-(n, c) normalisation differs.
    out["conv_not_per_image"] = _rel(
        F.instance_norm(x, eps=cfg.eps) * gamma[:, None, None] + beta[:, None, None], y_native.detach()
    )
    return out


def _inference_checks(cfg: BackpropConfig, s: _Setup, ds: data.Dataset, gen: torch.Generator) -> tuple[dict, dict]:
    """Inference mode: BN is the affine map of Algorithm 2; its Jacobian is diagonal."""
    x = s.u @ s.w.T
    k = cfg.unit
    d = s.u.shape[1]
    batches = []
    for _ in range(cfg.population_batches):
        idx = torch.randint(len(ds.y_train), (cfg.batch,), generator=gen)
        batches.append(ds.x_train[idx].reshape(-1, d).to(F64) @ s.w.T)
    mean, var = norms.population_statistics(batches)
    gk, bk = float(s.gamma[k]), float(s.beta[k])
    jac_eval = bp.jacobian_autograd(x[:, k], gk, bk, cfg.eps, training=False, running=(mean[k], var[k]))
    jac_train = bp.jacobian_autograd(x[:, k], gk, bk, cfg.eps)
    off = ~torch.eye(cfg.batch, dtype=torch.bool)
    a, _ = norms.inference_affine(mean, var, s.gamma, s.beta, cfg.eps)
    g = torch.randn(cfg.batch, generator=gen, dtype=F64)
    metrics = {
        "eval_offdiag_max": _abs_max(jac_eval[off]),
        "eval_diag_vs_affine": _rel(torch.diagonal(jac_eval), a[k].expand(cfg.batch)),
        "train_offdiag_max": _abs_max(jac_train[off]),
        "train_offdiag_fraction": float(jac_train[off].norm() / jac_train.norm()),
        "eval_offdiag_fraction": float(jac_eval[off].norm() / jac_eval.norm()),
        "train_grad_sum": float(_cos(jac_train.T @ g, torch.ones_like(g)).abs()),
        "eval_grad_sum": float(_cos(jac_eval.T @ g, torch.ones_like(g)).abs()),
        "eval_slope": float(a[k]),
        "train_slope_diag_mean": float(torch.diagonal(jac_train).mean()),
    }
    return metrics, {"jac_eval": jac_eval.numpy()}


def _gradchecks(seed: int) -> dict[str, bool]:
    """torch.autograd.gradcheck and gradgradcheck of the Function on small float64 inputs."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for tag, shape in (("fc", (6, 3)), ("conv", (3, 2, 2, 2))):
        args = (
            torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(),
            (0.5 + torch.rand(shape[1], generator=gen, dtype=F64)).requires_grad_(),
            torch.randn(shape[1], generator=gen, dtype=F64).requires_grad_(),
        )
        fn = lambda x, g, b: bp.manual_batch_norm(x, g, b, 1e-3)  # noqa: E731
        out[f"gradcheck_{tag}"] = torch.autograd.gradcheck(fn, args, raise_exception=False)
        out[f"gradgradcheck_{tag}"] = torch.autograd.gradgradcheck(fn, args, raise_exception=False)
    return out


# ---------------------------------------------------------------- the exercises' answers
def _bessel_checks(xk: Tensor) -> dict[str, float]:
    """Exercise 1: BN with the unbiased variance s² = Σ(x−μ)²/(m−1), ε = 0, on one unit.

    Its Jacobian is (1/s)(I − 11ᵀ/m − x̂x̂ᵀ/(m−1)) with x̂ = (x−μ)/s: only the coefficient of
    the x̂ term changes (‖x̂‖² = m − 1), and the bracket is again an orthogonal projection.
    """
    m = xk.shape[0]

    def bn_unbiased(v: Tensor) -> Tensor:
        return (v - v.mean()) / v.std(correction=1)

    jac = torch.autograd.functional.jacobian(bn_unbiased, xk)
    s = xk.std(correction=1)
    xh = bn_unbiased(xk)
    p = torch.eye(m, dtype=xk.dtype) - 1.0 / m - torch.outer(xh, xh) / (m - 1)
    return {
        "bessel_jacobian_rel": _rel(jac, p / s),
        "bessel_idempotent": float(torch.linalg.matrix_norm(p @ p - p, ord=2)),
    }


def _two_example_checks(xk: Tensor, gamma: float, eps: float) -> dict[str, float]:
    """Exercise 2: a batch of m = 2. At ε = 0, BN outputs ±γ + β and its Jacobian is 0;
    at ε > 0 the Jacobian's one non-zero eigenvalue is (γ/s)·ε/(σ²+ε), along x̂."""
    pair = xk[:2]
    xh0 = bp.normalize(pair[:, None], 0.0)[0][:, 0]
    jac0 = bp.jacobian_autograd(pair, gamma, 0.0, 0.0)
    jac = bp.jacobian_autograd(pair, gamma, 0.0, eps)
    var = float(pair.var(correction=0))
    predicted = gamma / (var + eps) ** 0.5 * eps / (var + eps)
    return {
        "m2_xhat_abs_dev": _abs_max(xh0.abs() - 1),
        "m2_jacobian_norm_eps0": float(torch.linalg.matrix_norm(jac0, ord=2)),
        "m2_jacobian_norm_eps": float(torch.linalg.matrix_norm(jac, ord=2)),
        "m2_jacobian_norm_eps_predicted": predicted,
    }


def _eigen_checks(jac: Tensor, xk: Tensor, gamma: float, eps: float) -> dict[str, float]:
    """Exercise 3: the eigenvalues of (γ/s)P are 0 (along 1), (γ/s)·ε/(σ²+ε) (along x̂) and γ/s (m − 2 times)."""
    m = xk.shape[0]
    var = float(xk.var(correction=0))
    scale = gamma / (var + eps) ** 0.5
    eig = torch.linalg.eigvalsh((jac + jac.T) / 2)  # ascending; the Jacobian is symmetric
    predicted = torch.tensor([0.0, scale * eps / (var + eps), *([scale] * (m - 2))], dtype=eig.dtype)
    return {
        "eig_maxdiff_rel": float((eig - predicted.sort().values).abs().max() / scale),
        "eig_spectral_norm": float(eig.abs().max()),
        "eig_gamma_over_s": scale,
        "eig_along_xhat_predicted": scale * eps / (var + eps),
        "eig_amplification_max": gamma / eps**0.5,
    }


class _DetachedBackward(torch.autograd.Function):
    """Exercise 5: :class:`bnbook.backprop.BatchNormFunction` with x̂ and 1/s saved *detached*:
    first derivatives are right, but a second backward misses how x̂ and s depend on x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:  # noqa: D102
        x_hat, _, inv_std = bp.normalize(x, eps)
        ctx.save_for_backward(x_hat.detach(), gamma, inv_std.detach())
        return x_hat * gamma + beta

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x_hat, gamma, inv_std = ctx.saved_tensors
        return (*bp.bn_backward_compact(grad_y, x_hat, gamma, inv_std), None)


def _detached_checks(seed: int) -> dict[str, bool]:
    """Exercise 5: gradcheck passes and gradgradcheck fails for :class:`_DetachedBackward`."""
    gen = torch.Generator().manual_seed(seed)
    args = (
        torch.randn(6, 3, generator=gen, dtype=F64).requires_grad_(),
        (0.5 + torch.rand(3, generator=gen, dtype=F64)).requires_grad_(),
        torch.randn(3, generator=gen, dtype=F64).requires_grad_(),
    )
    fn = lambda x, g, b: _DetachedBackward.apply(x, g, b, 1e-3)  # noqa: E731
    return {
        "detached_gradcheck": torch.autograd.gradcheck(fn, args, raise_exception=False),
        "detached_gradgradcheck": torch.autograd.gradgradcheck(fn, args, raise_exception=False),
    }


def _layer_norm_checks(s: _Setup) -> dict[str, float]:
    """Exercise 6: LN over the d features of one example has the Jacobian (1/s)(I − 11ᵀ/d − x̂x̂ᵀ/d)
    (ε = 0, no affine); the weight gradient is orthogonal to the whole matrix W, not to each row."""
    x = s.u @ s.w.T  # (m, d) with d = units
    d = x.shape[1]

    def ln(v: Tensor) -> Tensor:
        return (v - v.mean()) / v.std(correction=0)

    row = x[0]
    jac = torch.autograd.functional.jacobian(ln, row)
    xh = ln(row)
    formula = (torch.eye(d, dtype=F64) - 1.0 / d - torch.outer(xh, xh) / d) / row.std(correction=0)
    w = s.w.detach().clone().requires_grad_()
    z = s.u @ w.T
    y = (z - z.mean(1, keepdim=True)) / z.std(1, correction=0, keepdim=True) * s.gamma + s.beta
    (grad,) = torch.autograd.grad(_loss(s, y), w)
    return {
        "ln_jacobian_rel": _rel(jac, formula),
        "ln_cos_w_gradw_whole": float(abs((w * grad).sum()) / (w.norm() * grad.norm())),
        "ln_cos_w_gradw_rows_max": _abs_max(_cos(w.detach(), grad)),
    }


def run(cfg: BackpropConfig, device: torch.device) -> Outcome:
    """Run every numerical check of chapter 2 (float64, CPU) and the benchmark (on ``device``)."""
    with num_threads(cfg.threads or None):
        gen = torch.Generator().manual_seed(cfg.seed)
        ds = data.load(cfg.dataset)  # the checks are tiny float64 problems: they stay on the CPU
        s = _setup(cfg, ds, gen)
        metrics, arrays = _fc_checks(cfg, s)
        metrics.update(_conv_checks(cfg, ds, gen))
        metrics.update(_gradchecks(cfg.seed))
        inf_metrics, inf_arrays = _inference_checks(cfg, s, ds, gen)
        metrics.update(inf_metrics)
        arrays.update(inf_arrays)
        arrays.update(_epsilon_sweep((s.u @ s.w.T)[:, cfg.unit], cfg.eps))
        lam_err = np.abs(arrays["sweep_lambda"] / arrays["sweep_lambda_predicted"] - 1)
        idem_err = np.abs(arrays["sweep_idempotence"] / arrays["sweep_idempotence_predicted"] - 1)
        metrics["sweep_lambda_rel_err"] = float(lam_err.max())
        metrics["sweep_idempotence_rel_err"] = float(idem_err.max())
        xk = (s.u @ s.w.T)[:, cfg.unit]
        gk = float(s.gamma[cfg.unit])
        metrics.update(_bessel_checks(xk))
        metrics.update(_two_example_checks(xk, gk, cfg.eps))
        metrics.update(_eigen_checks(torch.as_tensor(arrays["jac_autograd"]), xk, gk, cfg.eps))
        metrics.update(_detached_checks(cfg.seed))
        metrics.update(_layer_norm_checks(s))
        rows = bp.benchmark(cfg.bench_shapes, device, cfg.bench_repeats, cfg.bench_warmup, cfg.threads or None)
    metrics["bench"] = rows
    metrics["bench_device"] = str(device)
    metrics["bench_threads"] = cfg.threads or torch.get_num_threads()
    metrics["bench_manual_ratio_median"] = float(np.median([r["manual_ratio"] for r in rows]))
    metrics["bench_manual_ratio_min"] = float(min(r["manual_ratio"] for r in rows))
    metrics["bench_manual_ratio_max"] = float(max(r["manual_ratio"] for r in rows))
    metrics["bench_autograd_ratio_median"] = float(np.median([r["autograd_ratio"] for r in rows]))
    metrics["bench_count"] = len(rows)
    metrics["bench_autograd_slower_count"] = sum(r["autograd_ms"] > r["manual_ms"] for r in rows)
    threads = metrics["bench_threads"]
    metrics["bench_threads_text"] = f"{threads} thread" + ("" if threads == 1 else "s")
    metrics["bench_faster_or_slower"] = (
        "slower" if metrics["bench_manual_ratio_min"] > 1 else "not uniformly slower"
    )
    by_size = sorted(rows, key=lambda r: np.prod([int(v) for v in r["shape"].split("×")]))  # by numel
    metrics["bench_smallest_shape"], metrics["bench_largest_shape"] = by_size[0]["shape"], by_size[-1]["shape"]
    metrics["bench_manual_ratio_smallest"] = by_size[0]["manual_ratio"]
    metrics["bench_manual_ratio_largest"] = by_size[-1]["manual_ratio"]
    metrics["bench_ratio_trend"] = (
        "shrinks" if by_size[-1]["manual_ratio"] < by_size[0]["manual_ratio"] else "grows"
    )
    metrics["dataset_description"] = ds.description
    metrics["dataset"] = ds.name
    metrics["conv_shape_text"] = " × ".join(str(d) for d in metrics["conv_shape"])
    metrics.update(eps_cfg=cfg.eps, units=cfg.units, population_batches=cfg.population_batches,
                   bench_repeats_used=cfg.bench_repeats, lr=cfg.lr)
    return Outcome(metrics=metrics, arrays=arrays, datasets=[cfg.dataset])


# ---------------------------------------------------------------- figures
def plot_jacobians(res: Result) -> Figure:
    """Four heat maps of one unit's m×m Jacobian: autograd (training), (γ/s)·P, their
    difference (own colour scale), and the inference-mode Jacobian. The colour scale of the
    other three is clipped at the largest off-diagonal entry (the diagonal saturates)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    a = res.arrays
    panels = [
        (a["jac_autograd"], "autograd, training mode"),
        (a["jac_formula"], r"$(\gamma/s)\,P$"),
        (a["jac_autograd"] - a["jac_formula"], "difference"),
        (a["jac_eval"], "autograd, inference mode"),
    ]
    # The diagonal (about γ/s) would drown the O(γ/(ms)) coupling: clip the colour scale at the
    # largest off-diagonal entry of the training-mode Jacobian, so the diagonal saturates.
    off = ~np.eye(len(a["jac_autograd"]), dtype=bool)
    vmax = float(np.abs(a["jac_autograd"][off]).max()) or 1.0
    # A 2×2 grid, not a row of four: at the book's column width its labels stay readable.
    fig, axes = plt.subplots(2, 2, figsize=(8.6, 7.4), constrained_layout=True)
    axes = axes.ravel()
    for i, (ax, (mat, title)) in enumerate(zip(axes, panels)):
        lim = (float(np.abs(mat).max()) or 1.0) if i == 2 else vmax
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title)
        ax.set_xlabel("input example $j$")
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.grid(False)
        if i in (2, 3):
            fig.colorbar(im, ax=ax, shrink=0.8, format="%.1e" if i == 2 else "%.2f")
    for ax in axes[::2]:
        ax.set_ylabel("output example $i$")
    fig.colorbar(axes[0].images[0], ax=axes[:2], shrink=0.8)
    return fig


def plot_epsilon(res: Result) -> Figure:
    """P's defect with ε > 0 against σ²/ε: measured points on the predicted curves."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    a = res.arrays
    eps = res.config["eps"]
    r = a["sweep_sigma2"] / eps
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    ax.loglog(r, a["sweep_lambda_predicted"], color=PALETTE["ref"], lw=1,
              label=r"$\varepsilon/(\sigma^2+\varepsilon)$")
    ax.loglog(r, a["sweep_lambda"], "o", ms=4, color=PALETTE["bn"], label=r"eigenvalue of $P$ along $\hat x$ (measured)")
    ax.loglog(r, a["sweep_idempotence_predicted"], color=PALETTE["ref"], lw=1, ls="--",
              label=r"$\varepsilon\sigma^2/(\sigma^2+\varepsilon)^2$")
    ax.loglog(r, a["sweep_idempotence"], "s", ms=4, color=PALETTE["no_bn"], label=r"$\|P^2-P\|_2$ (measured)")
    ax.set_xlabel(r"$\sigma^2/\varepsilon$")
    ax.set_ylabel("defect")
    ax.legend(fontsize=8)
    return fig


def plot_benchmark(res: Result) -> Figure:
    """Median forward+backward time per implementation and shape: points on a log axis
    (bars would need a zero, which a log axis does not have)."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    rows = res.metrics["bench"]
    names = list(bp.IMPLEMENTATIONS)
    labels = {"native": "native (PyTorch)", "manual": "our Function", "autograd": "op-by-op autograd"}
    colours = {"native": PALETTE["ref"], "manual": PALETTE["bn"], "autograd": PALETTE["no_bn"]}
    markers = {"native": "o", "manual": "s", "autograd": "^"}
    offset = 0.12
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.8), constrained_layout=True)
    for j, name in enumerate(names):
        xs = np.arange(len(rows)) + (j - (len(names) - 1) / 2) * offset
        ax.plot(xs, [r[f"{name}_ms"] for r in rows], ls="none", marker=markers.get(name, "o"), ms=7,
                label=labels.get(name, name), color=colours[name])
    ax.set_xticks(np.arange(len(rows)), [r["shape"] for r in rows], fontsize=8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("input shape")
    ax.set_ylabel("forward + backward (ms, median)")
    ax.legend(fontsize=8)
    return fig


GLUE_FORMATS = {
    "m": "d", "conv_m": "d", "unit_sigma2": ".3f", "eval_slope": ".3f", "train_slope_diag_mean": ".3f",
    "train_offdiag_fraction": ".2f", "eval_offdiag_fraction": ".2f", "train_grad_sum": ".1e",
    "eval_grad_sum": ".2f", "bench_count": "d", "bench_autograd_slower_count": "d", "P_trace_eps*": ".6f",
    "xhat_norm2_over_m_eps*": ".8f", "conv_not_per_image": ".2f", "bench_manual_ratio_*": ".1f",
    "bench_autograd_ratio_median": ".1f", "bench_threads": "d", "eps_cfg": ".0e", "units": "d",
    "population_batches": "d", "bench_repeats_used": "d", "lr": "g", "eig_gamma_over_s": ".3f",
    "eig_spectral_norm": ".3f", "eig_amplification_max": ".0f", "*gradcheck*": lambda ok: "passes" if ok else "fails",
    "*": ".1e",
}
"""How chapter 2 prints its metrics (``report.glue_metrics``): residuals as ``.1e`` unless named here."""


def backward_check_rows(metrics: dict) -> list[dict]:
    """Rows of the table "staged vs compact vs autograd" (relative max. differences)."""
    M = metrics
    return [
        {"check": "staged chain rule vs autograd (native BN)", "x": M["staged_vs_autograd_x"],
         "gamma": M["staged_vs_autograd_gamma"], "beta": M["staged_vs_autograd_beta"]},
        {"check": "compact formula vs autograd (native BN)", "x": M["compact_vs_autograd_x"],
         "gamma": M["compact_vs_autograd_gamma"], "beta": M["compact_vs_autograd_beta"]},
        {"check": "compact vs staged", "x": M["compact_vs_staged_x"]},
    ]


def projection_rows(metrics: dict) -> list[dict]:
    """Rows of the table of P's properties at ε = 0, at the configured ε, and predicted."""
    M = metrics
    m = M["m"]
    return [
        {"prop": "‖P² − P‖₂", "eps0": M["P_idempotent_eps0"], "eps": M["P_idempotent_eps"],
         "pred": M["P_idempotent_eps_predicted"]},
        {"prop": "largest entry of abs(P − Pᵀ)", "eps0": M["P_symmetric_eps0"], "eps": M["P_symmetric_eps"], "pred": 0.0},
        {"prop": "‖P 1‖ / ‖1‖", "eps0": M["P_ones_eps0"], "eps": M["P_ones_eps"], "pred": 0.0},
        {"prop": "‖P x̂‖ / ‖x̂‖", "eps0": M["P_xhat_eps0"], "eps": M["P_xhat_eps"], "pred": M["P_xhat_eps_predicted"]},
        {"prop": "tr P − (m − 2)", "eps0": M["P_trace_eps0"] - (m - 2), "eps": M["P_trace_eps"] - (m - 2),
         "pred": M["P_xhat_eps_predicted"]},
    ]


def consequence_rows(metrics: dict) -> list[dict]:
    """Rows of the table checking the consequences (orthogonality, invariance, weight norm)."""
    M = metrics
    return [
        {"check": "largest abs. cosine of (∂ℓ/∂x, 1) over units", "eps0": M["cos_grad_ones_eps0_max"], "eps": M["cos_grad_ones_max"]},
        {"check": "largest abs. cosine of (∂ℓ/∂x, x̂) over units", "eps0": M["cos_grad_xhat_eps0_max"], "eps": M["cos_grad_xhat_eps_max"]},
        {"check": "x̂ᵀ∂ℓ/∂x vs the ε-prediction (rel. diff.)", "eps": M["xhat_dot_grad_vs_predicted"]},
        {"check": "BN(ax + b) vs BN(x) (rel. diff.)", "eps0": M["invariance_eps0"], "eps": M["invariance_eps"]},
        {"check": "largest abs. cosine of (w_k, ∂ℓ/∂w_k) over units", "eps0": M["cos_w_gradw_eps0_max"], "eps": M["cos_w_gradw_eps_max"]},
        {"check": "Δ‖W‖² vs η²‖∇W‖² (rel. diff.)", "eps0": M["norm_change_vs_second_order_eps0"],
         "eps": M["norm_change_vs_second_order_eps"]},
        {"check": "a·∇ℓ(aW) vs ∇ℓ(W), a = 3 (rel. diff.)", "eps0": M["scaled_weight_grad_rel"]},
    ]
