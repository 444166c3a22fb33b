"""Batch Normalization's backward pass, written by hand (chapter 2).

Ioffe & Szegedy (2015, §3) print the gradient of BN as a staged chain rule through the
nodes μ, σ², x̂ and y of the mini-batch graph. Simplified, it becomes the compact formula

    ∂ℓ/∂xᵢ = γ / (m·s) · (m·gᵢ − Σⱼ gⱼ − x̂ᵢ · Σⱼ gⱼ x̂ⱼ),   g = ∂ℓ/∂y,  s = √(σ² + ε),

which is exact for every ε ≥ 0. In matrix form the Jacobian of one unit's m outputs with
respect to its m inputs is (γ/s)·P with P = I − 11ᵀ/m − x̂x̂ᵀ/m; at ε = 0, P is the
orthogonal projection onto the complement of span{1, x̂}.

This module provides

- :func:`bn_backward_compact` and :func:`bn_backward_staged`: the two forms as pure functions;
- :class:`BatchNormFunction` / :func:`manual_batch_norm`: a ``torch.autograd.Function`` whose
  backward is the compact formula (written in differentiable torch ops, so double backward
  works too), for (N, C) and (N, C, H, W) inputs (statistics per channel over N, H, W);
- :func:`projection_matrix` and :func:`jacobian_autograd`: the matrix P and the Jacobian
  autograd finds for PyTorch's native BN, to compare against (γ/s)·P;
- :func:`benchmark` : forward+backward timings of this Function against PyTorch's native BN.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bnbook import norms
from bnbook.env import num_threads, sync
from bnbook.errors import BnbookError


class BatchSizeError(BnbookError, ValueError):
    """Training-mode BN was given one value per channel: its batch variance is undefined.

    Also a ``ValueError``, the type PyTorch raises for the same input.
    """


# ---------------------------------------------------------------- shapes and statistics
def _check_input(x: Tensor) -> int:
    """Return m, the number of values per channel of ``x``; raise a clear error if m < 2."""
    if x.dim() < 2:
        raise BnbookError(f"BN expects input of shape (N, C) or (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise BnbookError(f"BN input has no channels: shape {tuple(x.shape)}")
    m = x.numel() // x.shape[1]
    if m < 2:
        raise BatchSizeError(
            f"training-mode BN needs more than 1 value per channel, got input of shape "
            f"{tuple(x.shape)} (m = {m}): the batch variance of a single value is undefined"
        )
    return m


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (C,) vector to broadcast against ``like`` along dimension 1."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def _channel_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the channel dimension 1; returns shape (C,)."""
    return t.sum(dim=norms.reduce_dims(t))


def normalize(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Return (x̂, μ, 1/√(σ²+ε)) of Algorithm 1, per channel, with the biased batch variance.

    Written in differentiable torch ops: under autograd, x̂ and the statistics carry
    their dependence on ``x`` (which double backward needs).
    """
    _check_input(x)
    if eps < 0:
        raise BnbookError(f"eps must be >= 0, got {eps}")
    mean, var, _ = norms.batch_stats(x)
    inv_std = torch.rsqrt(var + eps)
    x_hat = (x - _per_channel(mean, x)) * _per_channel(inv_std, x)
    return x_hat, mean, inv_std


# ---------------------------------------------------------------- the two backward forms
def bn_backward_compact(
    grad_y: Tensor, x_hat: Tensor, gamma: Tensor, inv_std: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β) from the compact formula.

    ∂ℓ/∂xᵢ = γ·inv_std/m · (m gᵢ − Σg − x̂ᵢ Σ g x̂), per channel, with sums over the batch
    (and over H, W for 4-D input); ∂ℓ/∂γ = Σ g x̂ and ∂ℓ/∂β = Σ g. ``inv_std`` is
    1/√(σ²+ε) per channel, ``gamma`` has shape (C,).
    """
    if grad_y.shape != x_hat.shape:
        raise BnbookError(f"grad_y has shape {tuple(grad_y.shape)}, x_hat {tuple(x_hat.shape)}")
    m = _check_input(x_hat)
    grad_beta = _channel_sum(grad_y)  # Σ g
    grad_gamma = _channel_sum(grad_y * x_hat)  # Σ g x̂
    scale = _per_channel(gamma * inv_std / m, x_hat)
    grad_x = scale * (m * grad_y - _per_channel(grad_beta, x_hat) - x_hat * _per_channel(grad_gamma, x_hat))
    return grad_x, grad_gamma, grad_beta


def staged_gradients(grad_y: Tensor, x: Tensor, gamma: Tensor, eps: float = 1e-5) -> dict[str, Tensor]:
    """Return every node's gradient of the staged chain rule, as Ioffe & Szegedy §3 print it.

    Keys: ``x_hat`` (∂ℓ/∂x̂), ``var`` (∂ℓ/∂σ²), ``mean`` (∂ℓ/∂μ), ``mean_via_var`` (the
    second term of ∂ℓ/∂μ, ∂ℓ/∂σ² · Σ −2(xᵢ−μ)/m, zero up to rounding because Σ(xᵢ−μ) = 0),
    ``x``, ``gamma``, ``beta``. Per-channel quantities have shape (C,).
    """
    m = _check_input(x)
    mu, var, _ = norms.batch_stats(x)
    xc = x - _per_channel(mu, x)  # xᵢ − μ
    x_hat = xc / torch.sqrt(_per_channel(var, x) + eps)
    d_xhat = grad_y * _per_channel(gamma, x)
    d_var = _channel_sum(d_xhat * xc) * (-0.5) * (var + eps) ** -1.5
    d_mu_direct = _channel_sum(d_xhat) * (-1.0 / torch.sqrt(var + eps))
    d_mu_via_var = d_var * _channel_sum(-2.0 * xc) / m
    d_mu = d_mu_direct + d_mu_via_var
    d_x = (
        d_xhat / torch.sqrt(_per_channel(var, x) + eps)
        + _per_channel(d_var, x) * 2.0 * xc / m
        + _per_channel(d_mu, x) / m
    )
    return {
        "x_hat": d_xhat,
        "var": d_var,
        "mean": d_mu,
        "mean_via_var": d_mu_via_var,
        "x": d_x,
        "gamma": _channel_sum(grad_y * x_hat),
        "beta": _channel_sum(grad_y),
    }


def bn_backward_staged(
    grad_y: Tensor, x: Tensor, gamma: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β) by the staged chain rule of Ioffe & Szegedy §3.

    The reference implementation: node by node, un-simplified (see :func:`staged_gradients`).
    Unlike :func:`bn_backward_compact` it takes the raw input ``x`` and ``eps``.
    """
    if grad_y.shape != x.shape:
        raise BnbookError(f"grad_y has shape {tuple(grad_y.shape)}, x {tuple(x.shape)}")
    g = staged_gradients(grad_y, x, gamma, eps)
    return g["x"], g["gamma"], g["beta"]


# ---------------------------------------------------------------- the autograd Function
class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN, y = γ x̂ + β, with the hand-written compact backward.

    Like PyTorch's native kernel it saves the input and the per-channel μ and 1/√(σ²+ε).
    The backward is built from differentiable ops; when a graph of the backward is asked
    for (``create_graph=True``, double backward) it recomputes x̂ and the statistics from
    ``x`` under autograd so that their dependence on ``x`` is differentiated too.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:  # noqa: D102
        x_hat, mean, inv_std = normalize(x, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, gamma, mean, inv_std)
        return x_hat * _per_channel(gamma, x) + _per_channel(beta, x)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, gamma, mean, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: keep x̂(x) and s(x) in the graph
            x_hat, _, inv_std = normalize(x, ctx.eps)
        else:
            x_hat = (x - _per_channel(mean, x)) * _per_channel(inv_std, x)
        grad_x, grad_gamma, grad_beta = bn_backward_compact(grad_y, x_hat, gamma, inv_std)
        need_x, need_gamma, need_beta, _ = ctx.needs_input_grad
        return (
            grad_x if need_x else None,
            grad_gamma if need_gamma else None,
            grad_beta if need_beta else None,
            None,
        )


def manual_batch_norm(
    x: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Training-mode BN of (N, C) or (N, C, H, W) input through :class:`BatchNormFunction`.

    ``gamma``/``beta`` of shape (C,) default to ones/zeros. Raises :class:`BatchSizeError`
    when a channel has a single value (m = 1), as ``torch.nn.functional.batch_norm`` does.
    """
    _check_input(x)
    channels = x.shape[1]
    if gamma is None:
        gamma = torch.ones(channels, dtype=x.dtype, device=x.device)
    if beta is None:
        beta = torch.zeros(channels, dtype=x.dtype, device=x.device)
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (channels,):
            raise BnbookError(f"{name} must have shape ({channels},), got {tuple(p.shape)}")
    return BatchNormFunction.apply(x, gamma, beta, float(eps))


# ---------------------------------------------------------------- the Jacobian of one unit
def projection_matrix(x_hat: Tensor) -> Tensor:
    """Return the m×m matrix P = I − 11ᵀ/m − x̂x̂ᵀ/m for one unit's normalised batch x̂ (shape (m,)).

    BN's Jacobian dy/dx for that unit is (γ/√(σ²+ε))·P. With ε = 0, ‖x̂‖² = m and P is the
    orthogonal projection onto the complement of span{1, x̂}; with ε > 0 its eigenvalue along
    x̂ is ε/(σ²+ε) instead of 0.
    """
    if x_hat.dim() != 1:
        raise BnbookError(f"projection_matrix expects one unit's batch, shape (m,), got {tuple(x_hat.shape)}")
    m = x_hat.shape[0]
    if m < 2:
        raise BatchSizeError(f"projection_matrix needs m >= 2 values, got m = {m}")
    eye = torch.eye(m, dtype=x_hat.dtype, device=x_hat.device)
    return eye - 1.0 / m - torch.outer(x_hat, x_hat) / m


def jacobian_autograd(x: Tensor, gamma: float = 1.0, beta: float = 0.0, eps: float = 1e-5,
                      training: bool = True, running: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Return the m×m Jacobian dy/dx of PyTorch's native BN for one unit's batch ``x`` (shape (m,)).

    Computed by autograd through ``torch.nn.functional.batch_norm``, independent of this
    module's formulas. PyTorch refuses ε = 0 in training mode; for ε = 0 autograd goes
    instead through chapter 1's op-by-op :func:`bnbook.norms.batch_norm`. ``training=False``
    uses ``running = (mean, var)`` (scalars as 0-d or (1,) tensors): the inference-mode affine map.
    """
    if x.dim() != 1:
        raise BnbookError(f"jacobian_autograd expects one unit's batch, shape (m,), got {tuple(x.shape)}")
    if not training and running is None:
        raise BnbookError("inference-mode Jacobian needs running = (mean, var)")
    g = torch.tensor([gamma], dtype=x.dtype, device=x.device)
    b = torch.tensor([beta], dtype=x.dtype, device=x.device)
    rm, rv = (None, None) if running is None else (running[0].reshape(1), running[1].reshape(1))

    def f(v: Tensor) -> Tensor:
        if training and eps == 0:
            return norms.batch_norm(v[:, None], g, b, eps=0.0)[:, 0]
        return F.batch_norm(v[:, None], rm, rv, g, b, training=training, eps=eps)[:, 0]

    return torch.autograd.functional.jacobian(f, x)


# ---------------------------------------------------------------- speed
def time_forward_backward(
    bn: Callable[[Tensor, Tensor, Tensor], Tensor],
    shape: Sequence[int],
    device: torch.device,
    repeats: int = 20,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> float:
    """Return the median wall time (s) of one forward + backward of ``bn(x, γ, β)`` on ``shape``.

    The device is synchronised only around each timed repeat (CUDA kernels are asynchronous).
    """
    if repeats < 1 or warmup < 0:
        raise BnbookError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()
    grad = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
    gamma = torch.ones(shape[1], dtype=dtype, device=device, requires_grad=True)
    beta = torch.zeros(shape[1], dtype=dtype, device=device, requires_grad=True)
    times = []
    for k in range(warmup + repeats):
        x.grad = gamma.grad = beta.grad = None
        sync(device)
        start = time.perf_counter()
        bn(x, gamma, beta).backward(grad)
        sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def native_batch_norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """PyTorch's fused training-mode BN (no running statistics)."""
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)


IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {
    "native": native_batch_norm,  # one fused kernel forward, one backward
    "manual": manual_batch_norm,  # this module's Function: several elementwise/reduction ops
    "autograd": norms.batch_norm,  # chapter 1's BN, differentiated op by op by autograd
}
"""The BN implementations :func:`benchmark` times, by name."""


def benchmark(
    shapes: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Time forward+backward of each implementation in :data:`IMPLEMENTATIONS` on each shape.

    Returns one row per shape: ``shape``, ``m`` (values per channel), ``<name>_ms`` (median
    milliseconds) and ``<name>_ratio`` (time relative to ``native``).
    """
    device = torch.device(device)
    rows = []
    with num_threads(threads):
        for shape in shapes:
            shape = tuple(int(s) for s in shape)
            if len(shape) < 2:
                raise BnbookError(f"benchmark shape must be (N, C) or (N, C, H, W), got {shape}")
            row: dict[str, Any] = {"shape": "×".join(map(str, shape)), "m": _numel(shape) // shape[1]}
            for name, fn in IMPLEMENTATIONS.items():
                row[f"{name}_ms"] = 1e3 * time_forward_backward(fn, shape, device, repeats, warmup, dtype)
            for name in IMPLEMENTATIONS:
                row[f"{name}_ratio"] = row[f"{name}_ms"] / row["native_ms"]
            rows.append(row)
    return rows


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
