"""Batch Normalization written from scratch (chapter 1), with PyTorch's exact semantics.

Algorithm 1 of Ioffe & Szegedy (2015): normalise each feature with the mean and the
*biased* (1/m) variance of the mini-batch, then scale and shift by learned γ, β.
Algorithm 2: at inference, use population statistics, with the *unbiased* m/(m-1)
variance. PyTorch keeps exponential running averages instead: ``momentum`` (0.1)
weights the new batch, the running variance stores the unbiased batch variance, and
``momentum=None`` gives the cumulative (equal-weight) average over batches.

For 4-D inputs (N, C, H, W) the statistics are per channel over N, H and W, so the
effective batch is m = N·H·W (§3.2 of the paper).

Mixed precision: under ``torch.autocast`` a convolution hands its norm a bfloat16 (or
float16) tensor. Every normaliser here then computes its statistics in float32, keeps its
parameters and running buffers in their own dtype (float32), and returns the input's
dtype — what ``torch.nn.BatchNorm2d`` does (:func:`compute_dtype`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a normaliser computes ``x``'s statistics in: float32 for half/bfloat16 inputs, else x's own."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


@torch.no_grad()
def _ema_(running: Tensor, new: Tensor, factor: Tensor | float) -> None:
    """running ← (1 − f)·running + f·new in place: PyTorch BN's order of operations (and, unlike
    ``lerp_``, batched by ``torch.func.vmap``); ``new`` is cast to the buffer's dtype (fp32 under autocast)."""
    running.mul_(1 - factor).add_(new.to(running.dtype) * factor)


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions BN averages over: all but the feature/channel dimension 1."""
    if x.dim() < 2:
        raise ValueError(f"BatchNorm expects input of shape (N, C, ...), got {tuple(x.shape)}")
    return [0, *range(2, x.dim())]


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) vector so that it broadcasts against ``x`` along dimension 1."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Return per-feature batch mean, biased (1/m) batch variance, and m (values per feature)."""
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    mean = x.mean(dim=dims)
    # two passes, written out: x.var over the non-adjacent dims (0, 2, 3) is ~3x slower on CPU
    var = (x - _per_channel(mean, x)).square().mean(dim=dims)
    return mean, var, m


def _normalise(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 on ``x``: (y, μ_B, σ²_B), the statistics computed once for the output and the running averages."""
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    if m < 2:
        raise ValueError(
            f"BatchNorm needs more than 1 value per feature in training mode (got m = {m}): "
            "the batch variance of a single value is undefined"
        )
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = centred.square().mean(dim=dims, keepdim=True)
    scale = torch.rsqrt(var + eps)  # 1/√(σ²_B + ε), per channel
    if gamma is not None:
        scale = scale * _per_channel(gamma, x)
    y = centred * scale if beta is None else torch.addcmul(_per_channel(beta, x), centred, scale)
    return y, mean.reshape(-1), var.reshape(-1)


def batch_norm(
    x: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Algorithm 1 (training mode): y = γ·(x − μ_B)/√(σ²_B + ε) + β with batch statistics."""
    return _normalise(x, gamma, beta, eps)[0]


def inference_affine(
    mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Algorithm 2, step 3: the fixed affine map y = a·x + b that replaces BN at inference."""
    a = gamma / torch.sqrt(var + eps)
    return a, beta - a * mean


def population_statistics(batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Algorithm 2, step 2: E[x] = E_B[μ_B] and Var[x] = m/(m−1)·E_B[σ²_B] over equal-size batches."""
    means, variances, sizes = [], [], set()
    for batch in batches:
        mean, var, m = batch_stats(batch)
        means.append(mean)
        variances.append(var)
        sizes.add(m)
    if not means:
        raise ValueError("population_statistics needs at least one batch")
    if len(sizes) != 1:
        raise ValueError(f"Algorithm 2 averages batches of one size m; got sizes {sorted(sizes)}")
    (m,) = sizes
    return torch.stack(means).mean(0), m / (m - 1) * torch.stack(variances).mean(0)


def _affine_parameters(module: nn.Module, shape, affine: bool, kw: dict) -> None:
    """Give ``module`` its affine parameters γ = 1 (``weight``) and β = 0 (``bias``) of ``shape``, or register none."""
    if affine:
        module.weight = nn.Parameter(torch.ones(shape, **kw))  # γ
        module.bias = nn.Parameter(torch.zeros(shape, **kw))  # β
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class BatchNorm(nn.Module):
    """BN over dimension 1 of (N, C), (N, C, L) or (N, C, H, W) inputs; a drop-in for
    ``torch.nn.BatchNorm1d/2d`` (same arguments, buffers, ``state_dict`` and numbers)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _affine_parameters(self, num_features, affine, kw)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with batch statistics in training mode, running statistics in eval mode."""
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features in dim 1, got {x.shape[1]}")
        use_batch_stats = self.training or not self.track_running_stats
        xc = x.to(compute_dtype(x))  # float32 statistics under autocast; a no-op otherwise
        if not use_batch_stats:
            a, b = inference_affine(
                self.running_mean,
                self.running_var,
                self.weight if self.affine else torch.ones_like(self.running_mean),
                self.bias if self.affine else torch.zeros_like(self.running_mean),
                self.eps,
            )
            return (xc * _per_channel(a, xc) + _per_channel(b, xc)).to(x.dtype)
        y, mean, var = _normalise(xc, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, xc.numel() // xc.shape[1])
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, m: int) -> None:
        self.num_batches_tracked.add_(1)
        # momentum weights the *new* batch; None means the cumulative average 1/k.
        # (kept as a tensor so that a CUDA step never waits on the host)
        if self.momentum is None:
            factor: Tensor | float = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = self.momentum
        _ema_(self.running_mean, mean, factor)
        _ema_(self.running_var, var * (m / (m - 1)), factor)  # stores the unbiased variance

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


# =====================================================================================
# BN's relatives (chapter 5, "When the batch is small"): normalisers that do not need a
# batch (LayerNorm, GroupNorm), one that normalises the weights instead of the
# activations (Weight Standardization), and one that keeps BN but removes its
# train/inference mismatch (Batch Renormalization). Same interface style as BatchNorm:
# inputs (N, C, ...), per-channel affine γ (``weight``) and β (``bias``).
# =====================================================================================


def _check_eps(eps: float) -> float:
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return eps


def group_norm(
    x: Tensor,
    num_groups: int,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Wu & He (2018), eq. 1 with S_i = {same sample, same group of C/G channels}.

    Each sample's channels are split into ``num_groups`` contiguous groups; every group
    is normalised with its own mean and biased variance over (C/G, H, W), then each
    channel is scaled by γ and shifted by β. ``num_groups=1`` is LayerNorm over
    (C, H, W); ``num_groups=C`` is InstanceNorm.
    """
    if x.dim() < 2:
        raise ValueError(f"GroupNorm expects input of shape (N, C, ...), got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels cannot be split into {num_groups} equal groups")
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = g.var(dim=2, correction=0, keepdim=True)
    x_hat = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if gamma is not None:
        x_hat = x_hat * _per_channel(gamma, x)
    if beta is not None:
        x_hat = x_hat + _per_channel(beta, x)
    return x_hat


class GroupNorm(nn.Module):
    """Group Normalization (Wu & He 2018); a drop-in for ``torch.nn.GroupNorm``.

    The same computation in training and evaluation mode: no batch statistics, no
    running buffers, so the batch size plays no role at all.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        kw = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = _check_eps(eps)
        self.affine = affine
        _affine_parameters(self, num_channels, affine, kw)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each sample's channel groups with their own mean and variance."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels in dim 1, got shape {tuple(x.shape)}")
        return group_norm(x.to(compute_dtype(x)), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class LayerNorm(nn.Module):
    """Layer Normalization (Ba, Kiros & Hinton 2016); a drop-in for ``torch.nn.LayerNorm``.

    Normalises over the trailing dimensions ``normalized_shape`` of each sample, with an
    elementwise γ and β of that shape. On an (N, F) input this is the paper's per-case
    normalisation over the H = F hidden units. (For feature maps, Wu & He's "LN" over
    (C, H, W) with per-channel γ, β is ``GroupNorm(1, C)``.)
    """

    def __init__(
        self,
        normalized_shape: int | Iterable[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"LayerNorm: normalized_shape must be positive sizes, got {normalized_shape!r}")
        kw = {"device": device, "dtype": dtype}
        self.normalized_shape = shape
        self.eps = _check_eps(eps)
        self.elementwise_affine = elementwise_affine
        _affine_parameters(self, shape, elementwise_affine, kw)

    def forward(self, x: Tensor) -> Tensor:
        """μ, σ² over the trailing ``normalized_shape`` dims of each sample (§3 of Ba et al.)."""
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"LayerNorm: input's trailing shape {tuple(x.shape[-k:])} is not {self.normalized_shape}"
            )
        dims = list(range(x.dim() - k, x.dim()))
        xc = x.to(compute_dtype(x))
        mean = xc.mean(dim=dims, keepdim=True)
        var = xc.var(dim=dims, correction=0, keepdim=True)
        y = (xc - mean) / torch.sqrt(var + self.eps)
        if self.elementwise_affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def standardize_weight(w: Tensor, eps: float = 1e-5) -> Tensor:
    """Qiao et al. (2019), eq. 5: Ŵ_i = (W_i − mean(W_i)) / √(var(W_i) + ε) per output row i.

    ``w`` has the output channel in dimension 0 (Linear (O, I), Conv (O, I/groups, k...));
    mean and the biased variance are over everything else. The ε sits inside the square
    root as in the paper's equation (the authors' code adds 1e-5 to the unbiased std).
    """
    if w.dim() < 2:
        raise ValueError(f"standardize_weight expects (out, in, ...) weights, got {tuple(w.shape)}")
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, correction=0, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


class WSLinear(nn.Linear):
    """``nn.Linear`` whose weight is standardised per output unit on every forward pass."""

    ws_eps: float = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        """y = x Ŵᵀ + b with Ŵ = standardize_weight(W)."""
        return nn.functional.linear(x, standardize_weight(self.weight, self.ws_eps), self.bias)


class WSConv1d(nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization (per output channel)."""

    ws_eps: float = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        """Convolve with the standardised weight Ŵ."""
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (per output channel), Qiao et al. (2019)."""

    ws_eps: float = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        """Convolve with the standardised weight Ŵ."""
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)


class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe 2017, Algorithm 1) over dimension 1 of (N, C, ...) inputs.

    Training mode: x̂ = (x − μ_B)/σ_B · r + d with σ_B = √(σ²_B + ε) and the per-channel
    corrections r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max),
    both treated as constants in backprop. The moving averages μ and σ (of μ_B and of
    σ_B, as in the paper — not of the unbiased variance, as BN stores) are updated with
    ``momentum``. Evaluation mode: x̂ = (x − μ)/σ. With r = 1, d = 0 this is BN; when
    the batch statistics equal the moving ones, training and inference agree exactly.

    The limits follow a schedule in the number of training batches t seen so far:
    r_max = d_max = "off" (1 and 0) for t < ``warmup_steps``, then both are relaxed
    linearly, reaching ``rmax`` at ``rmax_steps`` and ``dmax`` at ``dmax_steps``.
    The schedule is evaluated on the device (no host sync per step).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_steps: int = 0,
        dmax_steps: int = 0,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rmax < 1 or dmax < 0:
            raise ValueError(f"BatchRenorm needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if not 0 < momentum <= 1:
            raise ValueError(f"BatchRenorm momentum must be in (0, 1], got {momentum}")
        if min(warmup_steps, rmax_steps, dmax_steps) < 0:
            raise ValueError("BatchRenorm schedule steps must be non-negative")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = _check_eps(eps)
        self.momentum = momentum
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps = int(warmup_steps)
        self.rmax_steps = max(int(rmax_steps), self.warmup_steps)
        self.dmax_steps = max(int(dmax_steps), self.warmup_steps)
        self.affine = affine
        _affine_parameters(self, num_features, affine, kw)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))  # μ
        self.register_buffer("running_std", torch.ones(num_features, **kw))  # σ (includes ε)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _ramp(self, limit: float, end: int, t: Tensor) -> Tensor:
        """``limit`` times the fraction of the ramp (warmup_steps → ``end``) done at step ``t``."""
        if end <= self.warmup_steps:
            frac = (t >= self.warmup_steps).to(self.running_mean.dtype)
        else:
            frac = ((t - self.warmup_steps) / (end - self.warmup_steps)).clamp(0, 1).to(self.running_mean.dtype)
        return frac * limit

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) in force for the next training batch, as 0-d tensors."""
        t = self.num_batches_tracked.to(self.running_mean.dtype)
        r_max = 1 + self._ramp(self.rmax - 1, self.rmax_steps, t)
        d_max = self._ramp(self.dmax, self.dmax_steps, t)
        return r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        """Training: Algorithm 1 of Ioffe (2017); evaluation: the moving-statistics affine map."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features in dim 1, got shape {tuple(x.shape)}")
        out_dtype, x = x.dtype, x.to(compute_dtype(x))
        if not self.training:
            x_hat = (x - _per_channel(self.running_mean, x)) / _per_channel(self.running_std, x)
        else:
            mean, var, m = batch_stats(x)
            if m < 2:
                raise ValueError(f"BatchRenorm needs more than 1 value per feature in training mode (got m = {m})")
            std = torch.sqrt(var + self.eps)
            with torch.no_grad():  # r and d are constants for backprop (stop-gradient)
                r_max, d_max = self.current_limits()
                r = (std / self.running_std).clamp(1 / r_max, r_max)
                d = ((mean - self.running_mean) / self.running_std).clamp(-d_max, d_max)
                self.num_batches_tracked.add_(1)
                _ema_(self.running_mean, mean, self.momentum)
                _ema_(self.running_std, std, self.momentum)
            x_hat = (x - _per_channel(mean, x)) / _per_channel(std, x) * _per_channel(r, x) + _per_channel(d, x)
        if self.affine:
            x_hat = x_hat * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return x_hat.to(out_dtype)

    def reset_running_stats(self) -> None:
        """Moving mean 0, moving standard deviation 1, no batches seen (the schedule starts again)."""
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, rmax={self.rmax}, "
            f"dmax={self.dmax}, schedule=({self.warmup_steps}, {self.rmax_steps}, {self.dmax_steps})"
        )


# =====================================================================================
# Santurkar et al. (2018), chapters 6 and 7: BN with noise injected after it (§2.1,
# Appendix A.2.1, Algorithm 1), and BN's "ℓp" relatives that divide by an ℓp average
# instead of the standard deviation (§3.3).
# =====================================================================================


class ShiftScaleNoise(nn.Module):
    """The noise of Santurkar et al.'s Algorithm 1: a ← s·a + m, drawn afresh at every training step.

    At each training-mode forward pass ("time step t"), for each unit (channel) j:
    μ_t ~ U(−n_μ, n_μ) and σ_t ~ U(1, n_σ). Then, for each sample i and unit j:
    m ~ U(μ_t − r_μ, μ_t + r_μ) and s ~ N(σ_t, r_σ), and the activation becomes s·a + m.
    So each unit's activations are shifted by about μ_t and scaled by about σ_t, a
    distortion that changes from step to step (the "internal covariate shift" the
    experiment injects on purpose). Evaluation mode returns the input unchanged.

    Our readings of what the algorithm leaves open:

    - **N(σ_t, r_σ)**: r_σ is the *standard deviation* (the ``(mean, std)`` convention
      of ``torch.normal``/``numpy.random.normal``, and the counterpart of r_μ, which is a
      half-width in the same units as the activation).
    - **"for each sample i" in a convolutional layer**: the paper says height and width
      count as batch dimensions, so a "sample" is one position (i, h, w) and m, s are drawn
      independently per sample, channel *and* position (``per_position=True``). With
      ``per_position=False`` one (m, s) per sample and channel is shared by all positions.
    - **"at each time step"**: one draw of μ_t, σ_t per training-mode forward pass; the
      engine runs one per step, so a probe that runs extra forward passes in training
      mode draws extra noise.

    Draws use PyTorch's global random number generator (so ``torch.manual_seed`` and
    the engine's per-model randomness control them).
    """

    def __init__(
        self,
        num_features: int,
        n_mu: float = 0.5,
        n_sigma: float = 1.25,
        r_mu: float = 0.1,
        r_sigma: float = 0.1,
        per_position: bool = True,
    ) -> None:
        super().__init__()
        if not (n_mu >= 0 and n_sigma >= 1 and r_mu >= 0 and r_sigma >= 0):
            raise ValueError(f"noise constants need n_mu, r_mu, r_sigma >= 0 and n_sigma >= 1, got {n_mu, n_sigma, r_mu, r_sigma}")
        self.num_features = num_features
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = float(n_mu), float(n_sigma), float(r_mu), float(r_sigma)
        self.per_position = per_position

    def sample(self, shape: torch.Size | tuple[int, ...], device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step's draws for activations of ``shape`` (N, C, ...): (s, m, μ_t, σ_t).

        s and m broadcast against the activations; μ_t and σ_t have shape (C,).
        """
        if len(shape) < 2 or shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features in dim 1, got shape {tuple(shape)}")
        c = shape[1]
        kw = {"device": device, "dtype": dtype}
        mu_t = (torch.rand(c, **kw) * 2 - 1) * self.n_mu  # U(−n_μ, n_μ), per unit
        sigma_t = 1 + torch.rand(c, **kw) * (self.n_sigma - 1)  # U(1, n_σ), per unit
        draw_shape = tuple(shape) if self.per_position else (*shape[:2], *([1] * (len(shape) - 2)))
        mu, sigma = mu_t.reshape(1, c, *([1] * (len(shape) - 2))), sigma_t.reshape(1, c, *([1] * (len(shape) - 2)))
        m = mu + (torch.rand(draw_shape, **kw) * 2 - 1) * self.r_mu  # U(μ_t − r_μ, μ_t + r_μ)
        s = sigma + torch.randn(draw_shape, **kw) * self.r_sigma  # N(σ_t, r_σ²): r_σ is the std
        return s, m, mu_t, sigma_t

    def forward(self, a: Tensor) -> Tensor:
        """s·a + m with this step's draws in training mode; ``a`` itself in evaluation mode."""
        if not self.training:
            return a
        s, m, _, _ = self.sample(a.shape, a.device, compute_dtype(a))
        return (s * a + m).to(a.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, n_mu={self.n_mu}, n_sigma={self.n_sigma}, r_mu={self.r_mu}, "
            f"r_sigma={self.r_sigma}, per_position={self.per_position}"
        )


class NoisyBatchNorm(nn.Module):
    """Santurkar et al.'s "noisy BN": our :class:`BatchNorm`, then :class:`ShiftScaleNoise` (Algorithm 1).

    The noise acts after BN's γ, β ("random noise added after each BN layer"); the
    running statistics are BN's own, of the clean input. Keyword arguments other than
    ``eps`` and ``momentum`` go to :class:`ShiftScaleNoise`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, **noise: float | bool) -> None:
        super().__init__()
        self.num_features = num_features
        self.bn = BatchNorm(num_features, eps=eps, momentum=momentum)
        self.noise = ShiftScaleNoise(num_features, **noise)

    def forward(self, x: Tensor) -> Tensor:
        """BN(x), distorted by this step's noise in training mode."""
        return self.noise(self.bn(x))


class LpBatchNorm(nn.Module):
    """BN with the standard deviation replaced by an ℓp average (Santurkar et al. 2018, §3.3).

    The paper states the method in words only ("normalise by the average of their ℓp
    norm (before shifting the mean)", keeping BN's centring). Our formula, per channel c
    over the batch set S (N, or N·H·W for feature maps, m = |S| values):

        x̂ = (x − μ_B) / (s_p + ε),   μ_B = (1/m) Σ_S x,
        s_p = ((1/m) Σ_S |v|^p)^(1/p) for p < ∞,   s_∞ = max_S |v|,

    then y = γ·x̂ + β. The ℓp "average" is the ℓp norm of the m values divided by
    m^(1/p) (a power mean): ℓ1 is the mean absolute value, ℓ2 the root mean square.
    ``v`` is the **raw** activation x by default — our reading of "before shifting the
    mean": the norm is taken before the batch mean is subtracted, so ℓ2 is
    √(σ²_B + μ²_B) and differs from BN. With ``centred=True``, v = x − μ_B, and then ℓ2
    with ε = 0 is exactly BN with ε = 0 (a test checks it). ε is added to s_p (not under
    a root as in BN).

    Running averages of μ_B and s_p (``running_mean``, ``running_scale``; ``momentum``
    weights the new batch, as in BN) replace them in evaluation mode:
    x̂ = (x − running_mean) / (running_scale + ε).
    """

    def __init__(
        self,
        num_features: int,
        p: float = 2.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        centred: bool = False,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not p >= 1:
            raise ValueError(f"LpBatchNorm needs p >= 1 (or inf), got {p!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"LpBatchNorm momentum must be in (0, 1], got {momentum}")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.p = float(p)
        self.eps = _check_eps(eps)
        self.momentum = momentum
        self.centred = centred
        self.affine = affine
        _affine_parameters(self, num_features, affine, kw)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_scale", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Running mean 0, running scale 1, no batches seen."""
        self.running_mean.zero_()
        self.running_scale.fill_(1.0)
        self.num_batches_tracked.zero_()

    def batch_scale(self, x: Tensor, mean: Tensor) -> Tensor:
        """s_p of the batch ``x`` per channel (its mean ``mean`` (C,) is used when ``centred``)."""
        dims = reduce_dims(x)
        v = (x - _per_channel(mean, x)) if self.centred else x
        if self.p == float("inf"):
            return v.abs().amax(dim=dims)
        if self.p == 1:
            return v.abs().mean(dim=dims)
        if self.p == 2:
            return v.square().mean(dim=dims).sqrt()
        return v.abs().pow(self.p).mean(dim=dims).pow(1 / self.p)

    def forward(self, x: Tensor) -> Tensor:
        """Batch μ_B and s_p in training mode (updating the running averages), running ones in evaluation."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features in dim 1, got shape {tuple(x.shape)}")
        out_dtype, x = x.dtype, x.to(compute_dtype(x))
        if self.training:
            mean = x.mean(dim=reduce_dims(x))
            scale = self.batch_scale(x, mean)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                _ema_(self.running_mean, mean.detach(), self.momentum)
                _ema_(self.running_scale, scale.detach(), self.momentum)
        else:
            mean, scale = self.running_mean, self.running_scale
        x_hat = (x - _per_channel(mean, x)) / _per_channel(scale + self.eps, x)
        if self.affine:
            x_hat = x_hat * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return x_hat.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}, eps={self.eps}, momentum={self.momentum}, centred={self.centred}"
