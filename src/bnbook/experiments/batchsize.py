"""Chapter 5, "When the batch is small": BN's batch-size dependence and its alternatives.

The question is Wu & He's (2018): how does a normaliser's accuracy depend on N, the number of
examples its statistics are computed over ("images per GPU")? A sweep over N must vary N and
nothing else. Training with mini-batches of N examples does not: at a fixed number of epochs
a smaller N makes more, noisier steps, and even a network without any normalisation changes
its error with N. So every run here takes the **same steps of the same SGD batch** (``batch_size``
examples, the same learning rate, the same examples seen), and N is the size of the *ghost
batches* the batch is cut into for the normaliser's statistics — as on Wu & He's GPUs, where
each GPU normalises its own N images of a larger SGD batch. Only the statistics change with N.

Four measurements, all in one run so that they share data, models and machine:

1. **The phenomenon** (:func:`sweep`). A small CNN (:class:`bnbook.nets.SmallCNN`) with each
   normaliser — BN, Batch Renorm, WS + BN (statistics over ghost batches of N), GN, LN,
   WS + GN, WS alone and none (per example: N plays no role, trained once) — under ``seeds``
   seeds. Held-out error and loss per (norm, N, seed), and for the batch-dependent norms the
   error with the test set normalised as in training (batch statistics of N images).
2. **Why** (:func:`statistics_noise`): the spread of the batch mean and standard deviation
   around the population values as a function of N, on the trained BN net's real activations.
3. **The MLP** a student report studied (:func:`sweep` with :class:`bnbook.nets.MLP`): the 3×100
   sigmoid MLP on MNIST with BN, WS + BN, LN, WS alone and none, with seeds and held-out loss.
4. **Cost** (:func:`step_times`): time per training step of each normaliser relative to BN,
   same net, same batch, interleaved in one run.

Batch Renorm follows the schedule logic of Ioffe (2017): plain BN for a warm-up of a fixed
number of steps, then r_max and d_max relaxed linearly (the paper: 5k steps, d_max = 5 by 25k,
r_max = 3 by 40k; here the same 1 : 5 : 8 proportions in steps of our shorter runs). All N
share the step count, so all N share the schedule.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnbook import data as datasets
from bnbook import nets, norms, train
from bnbook.config import ChapterConfig
from bnbook.env import num_threads, sync
from bnbook.errors import BnbookError
from bnbook.results import Outcome

CNN_NORMS = ("bn", "brn", "ws+bn", "gn", "ln", "ws+gn", "ws", "none")
MLP_NORMS = ("bn", "ws+bn", "ln", "ws", "none")
BATCH_DEPENDENT = ("bn", "brn", "ws+bn")  # norms whose output depends on the other examples
LABELS = {
    "bn": "BN", "brn": "Batch Renorm", "gn": "GN", "ln": "LN", "ws+gn": "WS + GN",
    "ws+bn": "WS + BN", "none": "no norm", "ws": "WS alone",
}

# Wu & He (2018), Table 2: ResNet-50, ImageNet top-1 validation error (%) vs images per GPU.
# A reference from a different dataset, network and scale.
GN_PAPER_TABLE2 = {
    "batch_sizes": (32, 16, 8, 4, 2),
    "bn": (23.6, 23.7, 24.8, 27.3, 34.7),
    "gn": (24.1, 24.2, 24.0, 24.2, 24.1),
}


# ------------------------------------------------------------------ ghost batches
def _ghost_view(x: Tensor, n: int) -> Tensor:
    """(B, C, *S) viewed as (B/n, n, C, *S): the ghost batches of ``n`` examples."""
    if x.shape[0] % n:
        raise BnbookError(f"a batch of {x.shape[0]} examples cannot be cut into ghost batches of {n}")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:])


def _ghost_stats(v: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per ghost batch and channel: mean and biased variance over (n, *S) of ``v`` (G, n, C, *S), kept broadcastable."""
    dims = [1, *range(3, v.dim())]
    mean = v.mean(dims, keepdim=True)
    var = (v - mean).square().mean(dims, keepdim=True)
    return mean, var, v[0, :, 0].numel()


def _channel(t: Tensor, v: Tensor) -> Tensor:
    """A (C,) vector broadcast against ``v`` (G, n, C, *S)."""
    return t.reshape(1, 1, -1, *([1] * (v.dim() - 3)))


class GhostBatchNorm(nn.Module):
    """BN whose training-mode statistics are taken over ghost batches of ``group`` examples.

    A batch of B = G·``group`` examples is cut into G consecutive groups; each group is
    normalised with its own per-channel mean and biased variance (over the group's examples
    and positions), as G devices would do with ``group`` examples each. The running averages
    (momentum ``momentum`` for the new batch) are updated once per call with the mean over
    the groups of their means and of their unbiased variances. Evaluation mode is BN's:
    the affine map of the running averages. With ``group`` = B this is :class:`bnbook.norms.BatchNorm`.

    It deliberately does not subclass ``BatchNorm``: the engine's fast MLP path recognises
    that class and would compute plain BN.
    """

    def __init__(self, num_features: int, group: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if group < 1:
            raise BnbookError(f"ghost batches need at least one example, got {group}")
        self.num_features, self.group, self.eps, self.momentum = num_features, int(group), eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Ghost-batch statistics in training mode, running averages in evaluation mode."""
        if not self.training:
            a, b = norms.inference_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            return x * a.reshape(1, -1, *([1] * (x.dim() - 2))) + b.reshape(1, -1, *([1] * (x.dim() - 2)))
        v = _ghost_view(x, self.group)
        mean, var, m = _ghost_stats(v)
        if m < 2:
            raise BnbookError(f"BN needs more than 1 value per channel and ghost batch, got m = {m}")
        y = (v - mean) * torch.rsqrt(var + self.eps) * _channel(self.weight, v) + _channel(self.bias, v)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            norms._ema_(self.running_mean, mean.detach().mean(0).flatten(), self.momentum)
            norms._ema_(self.running_var, (var.detach() * m / (m - 1)).mean(0).flatten(), self.momentum)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, group={self.group}, eps={self.eps}, momentum={self.momentum}"


class GhostBatchRenorm(norms.BatchRenorm):
    """Batch Renorm (:class:`bnbook.norms.BatchRenorm`) with statistics over ghost batches of ``group``.

    Each group gets its own r = clip(σ_B/σ) and d = clip((μ_B − μ)/σ) against the shared moving
    averages, which are updated once per call with the mean over the groups of μ_B and σ_B.
    """

    def __init__(self, num_features: int, group: int, **options: Any) -> None:
        super().__init__(num_features, **options)
        if group < 1:
            raise BnbookError(f"ghost batches need at least one example, got {group}")
        self.group = int(group)

    def forward(self, x: Tensor) -> Tensor:
        """Algorithm 1 of Ioffe (2017) per ghost batch in training mode; the moving averages in evaluation."""
        if not self.training:
            return super().forward(x)
        v = _ghost_view(x, self.group)
        mean, var, m = _ghost_stats(v)
        if m < 2:
            raise BnbookError(f"Batch Renorm needs more than 1 value per channel and ghost batch, got m = {m}")
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():  # r and d are constants for backprop (stop-gradient)
            r_max, d_max = self.current_limits()
            running_mean, running_std = _channel(self.running_mean, v), _channel(self.running_std, v)
            r = (std / running_std).clamp(1 / r_max, r_max)
            d = ((mean - running_mean) / running_std).clamp(-d_max, d_max)
            self.num_batches_tracked.add_(1)
            norms._ema_(self.running_mean, mean.detach().mean(0).flatten(), self.momentum)
            norms._ema_(self.running_std, std.detach().mean(0).flatten(), self.momentum)
        y = ((v - mean) / std * r + d) * _channel(self.weight, v) + _channel(self.bias, v)
        return y.reshape(x.shape)


def with_ghost_batches(model: nn.Module, group: int) -> nn.Module:
    """``model`` with every BN / Batch Renorm layer replaced by its ghost-batch version (same settings).

    The new layers take over γ, β and the running statistics, so an untrained model stays
    exactly as initialised. Other norms (GN, LN) and WS are left alone: they never look
    across the batch.
    """
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, norms.BatchRenorm) and not isinstance(child, GhostBatchRenorm):
                new: nn.Module = GhostBatchRenorm(
                    child.num_features, group, eps=child.eps, momentum=child.momentum, rmax=child.rmax,
                    dmax=child.dmax, warmup_steps=child.warmup_steps, rmax_steps=child.rmax_steps,
                    dmax_steps=child.dmax_steps,
                )
            elif isinstance(child, norms.BatchNorm):
                new = GhostBatchNorm(child.num_features, group, eps=child.eps, momentum=child.momentum)
            else:
                continue
            new.load_state_dict(child.state_dict())
            setattr(parent, name, new.to(child.weight.device, child.weight.dtype))
    return model


# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class BatchSizeConfig(ChapterConfig):
    """Chapter 5's parameters. Defaults are the ``quick`` profile (a 2-core CPU, about 3 minutes)."""

    # Experiment 1: the CNN sweep over N
    dataset: str = "fashion-mnist"  # offline Fashion-MNIST; 'cifar10' (downloaded once) in the paper profile
    train_size: int = 6_000  # training images used (a fixed random subset); 0: all
    test_size: int = 1_000  # held-out images evaluated (a fixed random subset of the test split); 0: all
    norms: tuple[str, ...] = CNN_NORMS  # normalisers compared
    stat_batches: tuple[int, ...] = (2, 4, 8, 16, 32, 64)  # N: examples per BN statistic (ghost batch)
    batch_size: int = 64  # examples per SGD step, the same for every N (a multiple of every N)
    steps: int = 300  # SGD steps, the same for every N and norm
    seeds: int = 3  # models per (norm, N): seeds seed, seed+1, ...
    lr: float = 0.05  # the same for every run
    momentum: float = 0.9  # SGD momentum
    widths: tuple[int, ...] = (8, 16, 32)  # channels of the three conv blocks (16, 32, 64 in the paper profile)
    group_size: int = 4  # channels per group of GN
    # Batch Renorm (Ioffe 2017): BN for `renorm_warmup` steps, then d_max → 5 and r_max → 3 linearly
    renorm_warmup: int = 50  # the paper: 5k steps
    renorm_dmax_step: int = 175  # the paper: 25k
    renorm_rmax_step: int = 250  # the paper: 40k
    # Experiment 2: noise of batch statistics
    noise_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)  # batch sizes m probed
    noise_draws: int = 200  # random batches per m
    noise_images: int = 2_000  # training images that define the "population"
    # Experiment 3: the MLP of a student report
    mlp_dataset: str = "mnist5k"  # offline MNIST subset (4,000 train / 1,000 test)
    mlp_train_size: int = 0  # 0: all
    mlp_test_size: int = 0  # 0: all
    mlp_norms: tuple[str, ...] = MLP_NORMS
    mlp_stat_batches: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    mlp_steps: int = 400  # SGD steps at batch_size examples
    mlp_lr: float = 0.1
    # Experiment 4: cost per step
    speed_steps: int = 10  # timed steps per norm and round
    speed_rounds: int = 3  # interleaved rounds (the median is reported)
    threads: int = 1  # CPU threads (small convolutions run best on one); 0: torch's default

    profiles: ClassVar = {
        "smoke": {
            "train_size": 128, "test_size": 64, "stat_batches": (2, 8), "batch_size": 8, "steps": 6, "seeds": 2,
            "renorm_warmup": 2, "renorm_dmax_step": 4, "renorm_rmax_step": 5,
            "noise_sizes": (2, 8, 32), "noise_draws": 10, "noise_images": 128, "mlp_dataset": "fashion-mnist",
            "mlp_train_size": 128, "mlp_test_size": 64, "mlp_stat_batches": (2, 8), "mlp_steps": 6,
            "speed_steps": 1, "speed_rounds": 1,
        },
        "paper": {
            "dataset": "cifar10", "train_size": 0, "test_size": 0, "stat_batches": (2, 4, 8, 16, 32, 64, 128, 256),
            "batch_size": 256, "steps": 8_000, "widths": (16, 32, 64), "renorm_warmup": 1_000,
            "renorm_dmax_step": 5_000, "renorm_rmax_step": 8_000, "noise_draws": 1_000, "noise_images": 10_000,
            "mlp_stat_batches": (2, 4, 8, 16, 32, 64, 128, 256), "mlp_steps": 5_000, "speed_steps": 50,
            "speed_rounds": 5, "threads": 0,
        },
    }

    def __post_init__(self) -> None:
        for name in ("norms", "stat_batches", "widths", "noise_sizes", "mlp_norms", "mlp_stat_batches"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        for kind in (*self.norms, *self.mlp_norms):
            if kind not in LABELS:
                raise BnbookError(f"unknown norm {kind!r}: choose from {', '.join(LABELS)}")
        if "gn" in self.mlp_norms or "ws+gn" in self.mlp_norms:
            raise BnbookError("mlp_norms: the MLP comparison has no GroupNorm; use 'ln'")
        for name in ("seeds", "steps", "mlp_steps", "noise_draws", "speed_steps", "speed_rounds"):
            if getattr(self, name) < 1:
                raise BnbookError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("stat_batches", "mlp_stat_batches", "noise_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(int(b) < 2 for b in sizes):
                raise BnbookError(f"{name} must be sizes >= 2 (BN needs two examples), got {sizes}")
        for name in ("stat_batches", "mlp_stat_batches"):
            bad = [n for n in getattr(self, name) if self.batch_size % n]
            if bad:
                raise BnbookError(f"batch_size {self.batch_size} must be a multiple of every N in {name}; not of {bad}")
        if not self.lr > 0 or not self.mlp_lr > 0:
            raise BnbookError("learning rates must be positive")
        if not (self.renorm_warmup <= self.renorm_dmax_step and self.renorm_warmup <= self.renorm_rmax_step):
            raise BnbookError("Batch Renorm's warm-up must end before its limits are relaxed")

    def renorm(self) -> dict[str, Any]:
        """Keyword arguments of :class:`bnbook.norms.BatchRenorm`: the schedule in steps, r_max 3, d_max 5."""
        return {"rmax": 3.0, "dmax": 5.0, "warmup_steps": self.renorm_warmup,
                "dmax_steps": self.renorm_dmax_step, "rmax_steps": self.renorm_rmax_step}


# ------------------------------------------------------------------ training
@dataclasses.dataclass
class Trained:
    """The K models of one (norm, N) configuration after training, and what was measured on them."""

    models: list[nn.Module]
    acc: np.ndarray  # (K,) held-out accuracy, inference mode (NaN once diverged)
    loss: np.ndarray  # (K,) held-out cross-entropy, inference mode
    acc_batch_mode: np.ndarray  # (K,) held-out accuracy in training mode with ghost batches of N (NaN: not batch-dependent)
    train_loss: np.ndarray  # (K,) mean training loss over the last logging interval
    seconds: float  # wall-clock training time


def _evaluate_in_training_mode(models: Sequence[nn.Module], x: Tensor, y: Tensor, group: int) -> np.ndarray:
    """Held-out accuracy (K,) with the norms in *training* mode: every ghost batch of ``group`` test
    images normalised by its own statistics, as in training. Nothing the evaluation does to the
    models (running averages, Batch Renorm's step counter) persists."""
    usable = len(y) // group * group
    if usable == 0:
        return np.full(len(models), np.nan)
    chunk = max(group, 512 // group * group)
    out = []
    with train.no_side_effects(list(models)), torch.no_grad():
        for model in models:
            model.train()
            correct = 0
            for s in range(0, usable, chunk):
                e = min(s + chunk, usable)
                correct += int((model(x[s:e]).argmax(-1) == y[s:e]).sum())
            out.append(correct / usable)
    return np.array(out)


def train_config(cfg: BatchSizeConfig, steps: int, lr: float) -> train.FitConfig:
    """The engine's settings for one configuration: the same for every norm and N."""
    return train.FitConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, momentum=cfg.momentum,
                           log_every=steps, eval_batch=1_000, probe_size=1)


def train_one(
    make: Callable[[int], nn.Module], ds: datasets.Dataset, fit_cfg: train.FitConfig, seeds: Sequence[int],
    group: int | None,
) -> Trained:
    """Build ``make(seed)`` for every seed, cut BN's statistics into ghost batches of ``group``
    (``None``: a per-example norm, left as it is), train all seeds in one engine pass, evaluate."""
    models = [make(s) for s in seeds]
    if group is not None:
        models = [with_ghost_batches(m, group) for m in models]
    models = [m.to(ds.x_train.device) for m in models]
    res = train.fit(models, ds, fit_cfg, seeds=list(seeds))
    acc, loss = res.test_acc[-1].copy(), res.test_loss[-1].copy()
    diverged = res.diverged_step >= 0
    acc[diverged], loss[diverged] = np.nan, np.nan
    batch_mode = np.full(len(seeds), np.nan)
    if group is not None:
        batch_mode = _evaluate_in_training_mode(models, ds.x_test, ds.y_test, group)
        batch_mode[diverged] = np.nan
    return Trained(models, acc, loss, batch_mode, res.train_loss[-1], res.train_time_s)


def sweep(
    make: Callable[[str, int], nn.Module],
    ds: datasets.Dataset,
    norms_: Sequence[str],
    sizes: Sequence[int],
    seeds: Sequence[int],
    fit_cfg: train.FitConfig,
) -> dict[str, Any]:
    """Train every norm at every N (per-example norms once: N plays no role); arrays indexed [norm, N, seed].

    ``make(norm, seed)`` builds one model. A per-example norm's single run fills its row for
    every N, so that tables and figures read the same way for all norms.
    """
    shape = (len(norms_), len(sizes), len(seeds))
    out = {k: np.full(shape, np.nan) for k in ("acc", "loss", "acc_batch_mode", "train_loss")}
    seconds = np.zeros(shape[:2])
    models: dict[tuple[str, int], list[nn.Module]] = {}
    for i, kind in enumerate(norms_):
        groups = sizes if kind in BATCH_DEPENDENT else [None]
        for j, group in enumerate(groups):
            t = train_one(lambda s, k=kind: make(k, s), ds, fit_cfg, seeds, group)
            cols = [j] if group is not None else list(range(len(sizes)))
            for col in cols:
                out["acc"][i, col], out["loss"][i, col] = t.acc, t.loss
                out["acc_batch_mode"][i, col], out["train_loss"][i, col] = t.acc_batch_mode, t.train_loss
            seconds[i, cols[0]] = t.seconds
            models[kind, sizes[j] if group is not None else 0] = t.models
    return {**out, "seconds": seconds, "models": models}


# ------------------------------------------------------------------ statistics noise
@torch.no_grad()
def statistics_noise(
    feats: Tensor, sizes: Sequence[int], draws: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Spread of batch statistics around the population ones, for each batch size m.

    ``feats`` are one layer's activations on a "population" of images, (P, C) or
    (P, C, H, W) (the output of an inference-mode BN is an affine map of its input per
    channel, which leaves both relative spreads unchanged). For every m, ``draws`` batches
    of m distinct images are drawn; per channel the batch mean μ_B and standard deviation
    σ_B (over m·H·W values, biased, as BN computes them) are compared with the population
    μ, σ. Returns the root-mean-square (over channels and draws) of (μ_B − μ)/σ and of
    σ_B/σ − 1: two arrays (len(sizes),).
    """
    x = feats.flatten(2) if feats.dim() > 2 else feats.unsqueeze(2)
    p = x.shape[0]
    if max(sizes) > p:
        raise BnbookError(f"batch size {max(sizes)} exceeds the {p} images of the population")
    # per image and channel: E[x] and E[x²] over positions, accumulated in float64
    s1, s2 = x.mean(2, dtype=torch.float64), x.square().mean(2, dtype=torch.float64)
    mu = s1.mean(0)
    sigma = torch.sqrt((s2.mean(0) - mu**2).clamp_min(0))
    keep = sigma > 1e-6 * sigma.max()  # dead channels (σ = 0) have no relative spread
    mu, sigma, s1, s2 = mu[keep], sigma[keep], s1[:, keep], s2[:, keep]
    spread_mu, spread_sigma = [], []
    for m in sizes:
        idx = torch.stack([torch.randperm(p, generator=generator)[:m] for _ in range(draws)]).to(x.device)
        mu_b = s1[idx].mean(1)  # (draws, C)
        sigma_b = torch.sqrt((s2[idx].mean(1) - mu_b**2).clamp_min(0))
        spread_mu.append(torch.sqrt((((mu_b - mu) / sigma) ** 2).mean()).item())
        spread_sigma.append(torch.sqrt(((sigma_b / sigma - 1) ** 2).mean()).item())
    return np.array(spread_mu), np.array(spread_sigma)


# ------------------------------------------------------------------ cost per step
def step_times(
    make: Callable[[str], nn.Module], ds: datasets.Dataset, norms_: Sequence[str], batch_size: int, steps: int,
    rounds: int,
) -> np.ndarray:
    """Seconds per training step (forward, backward, SGD with momentum) of each norm's net: (len(norms_), rounds).

    One model per norm, the same batch, plain PyTorch (no engine), timed in interleaved rounds
    (norm 1, 2, ..., then again), so a slow moment of a shared machine hits all of them alike;
    one untimed step precedes each timing.
    """
    device = ds.x_train.device
    x, y = ds.x_train[:batch_size], ds.y_train[:batch_size]
    models = [make(kind).to(device).train() for kind in norms_]
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in models]
    out = np.zeros((len(norms_), rounds))

    def step(m: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    for r in range(rounds):
        for i, (m, opt) in enumerate(zip(models, opts)):
            step(m, opt)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m, opt)
            sync(device)
            out[i, r] = (time.perf_counter() - t0) / steps
    return out


# ------------------------------------------------------------------ the chapter's run
def _seed_band(values: np.ndarray, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Mean, min and max over seeds (last axis) of ``scale·values``, NaN-aware (a diverged seed drops out)."""
    v = scale * values
    with warnings.catch_warnings():  # an all-NaN slice (every seed diverged) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mean": np.nanmean(v, -1), "min": np.nanmin(v, -1), "max": np.nanmax(v, -1)}


def _error(acc: np.ndarray) -> np.ndarray:
    return 100 * (1 - acc)


def run(cfg: BatchSizeConfig, device: torch.device) -> Outcome:
    """All four measurements of chapter 5; metrics are test errors in %, times in ms."""
    with num_threads(cfg.threads or None):
        return _run(cfg, device)


def _run(cfg: BatchSizeConfig, device: torch.device) -> Outcome:
    torch.manual_seed(cfg.seed)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    full = datasets.load(cfg.dataset, device)
    ds = full.subset(cfg.train_size, cfg.test_size, seed=cfg.seed)
    if cfg.batch_size > len(ds.y_train):
        raise BnbookError(f"batch size {cfg.batch_size} exceeds the {len(ds.y_train)} training images")
    c_in, n_classes = ds.input_shape[0], ds.num_classes
    mlp_ds = datasets.load(cfg.mlp_dataset, device).flat().subset(cfg.mlp_train_size, cfg.mlp_test_size, seed=cfg.seed)
    n_pop = min(cfg.noise_images, len(ds.y_train), len(mlp_ds.y_train))
    noise_sizes = [m for m in cfg.noise_sizes if m <= n_pop]

    def make_cnn(kind: str, seed: int = 0) -> nn.Module:
        return nets.SmallCNN(c_in, n_classes, cfg.widths, norm=kind, seed=seed, group_size=cfg.group_size,
                             renorm=cfg.renorm())

    def make_mlp(kind: str, seed: int) -> nn.Module:
        return nets.MLP(mlp_ds.input_shape[0], (100, 100, 100), mlp_ds.num_classes, "sigmoid", norm=kind, seed=seed,
                        norm_options=cfg.renorm() if kind == "brn" else None)

    # 1. the phenomenon: every norm at every N, the same steps of the same SGD batch
    cnn = sweep(make_cnn, ds, cfg.norms, cfg.stat_batches, seeds, train_config(cfg, cfg.steps, cfg.lr))

    # 2. why: noise of the batch statistics on the trained BN net's activations
    noise: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    bn_kind = "bn" if "bn" in cfg.norms else next((k for k in cfg.norms if k in BATCH_DEPENDENT), None)
    if bn_kind is not None:
        net = cnn["models"][bn_kind, max(cfg.stat_batches)][0].eval()
        with torch.no_grad():
            _, feats = net(ds.x_train[:n_pop], features=True)
        for layer, f in enumerate(feats):
            noise[f"cnn{layer + 1}"] = statistics_noise(f, noise_sizes, cfg.noise_draws, gen)
            noise[f"cnn{layer + 1}_positions"] = f.shape[2] * f.shape[3]

    # 3. the MLP of a student report: 3×100 sigmoid MLP on MNIST
    mlp = sweep(make_mlp, mlp_ds, cfg.mlp_norms, cfg.mlp_stat_batches, seeds, train_config(cfg, cfg.mlp_steps, cfg.mlp_lr))
    if "bn" in cfg.mlp_norms:
        net = mlp["models"]["bn", max(cfg.mlp_stat_batches)][0].eval()
        with torch.no_grad():
            _, feats = net(mlp_ds.x_train[:n_pop], features=True)
        noise["mlp3"] = statistics_noise(feats[-1], noise_sizes, cfg.noise_draws, gen)
        noise["mlp3_positions"] = 1

    # 4. cost per step, relative to BN
    speed_norms = tuple(dict.fromkeys(("bn", *cfg.norms)))
    times = step_times(make_cnn, ds, speed_norms, cfg.batch_size, cfg.speed_steps, cfg.speed_rounds)
    step_ms = 1e3 * np.median(times, axis=1)
    return _outcome(cfg, ds, len(full.y_train), mlp_ds, cnn, mlp, noise, noise_sizes, n_pop, speed_norms, step_ms)


def _verdict(err: np.ndarray, lo: int, hi: int) -> str:
    """How the error (seeds on the last axis) at N index ``lo`` compares with that at ``hi``, in words."""
    band = _seed_band(err)
    if np.isnan(band["mean"][lo]) or np.isnan(band["mean"][hi]):
        return "not measured (a run diverged)"
    if band["min"][lo] > band["max"][hi]:
        return "higher at the small N for every seed: the seed ranges do not overlap"
    if band["max"][lo] < band["min"][hi]:
        return "lower at the small N for every seed: the seed ranges do not overlap"
    return "a change within the range of the seeds"


def plateau(err: np.ndarray, sizes: Sequence[int]) -> int:
    """The smallest N from which on every N's seed range overlaps the seed range at the largest N.

    ``err`` is (len(sizes), seeds). Where the curve has flattened out, within what the seeds resolve.
    """
    band = _seed_band(err)
    order = np.argsort(sizes)
    hi = order[-1]
    result = int(sizes[hi])
    for j in order[::-1]:
        if band["min"][j] <= band["max"][hi] and band["max"][j] >= band["min"][hi]:
            result = int(sizes[j])
        else:
            break
    return result


def _sweep_metrics(prefix: str, res: dict[str, Any], norms_: Sequence[str], sizes: Sequence[int]) -> dict[str, Any]:
    """Errors (%) and held-out losses per norm and N (mean, min, max over seeds), and the small-vs-large-N verdicts."""
    err, loss, err_train = _error(res["acc"]), res["loss"], _error(res["acc_batch_mode"])
    band, loss_band, train_band = _seed_band(err), _seed_band(loss), _seed_band(err_train)
    keys = [str(n) for n in sizes]
    out: dict[str, Any] = {}
    for name, b in (("error", band), ("loss", loss_band)):
        for stat in ("mean", "min", "max"):
            suffix = "" if stat == "mean" else f"_{stat}"
            out[f"{prefix}{name}{suffix}"] = {k: dict(zip(keys, b[stat][i])) for i, k in enumerate(norms_)}
    out[f"{prefix}error_train_mode"] = {
        k: dict(zip(keys, train_band["mean"][i])) for i, k in enumerate(norms_) if k in BATCH_DEPENDENT
    }
    lo, hi = int(np.argmin(sizes)), int(np.argmax(sizes))  # the smallest and the largest N
    for tag, j in (("lo", lo), ("hi", hi)):  # the smallest and largest N under fixed names, for the prose
        for name, b in (("error", band), ("loss", loss_band)):
            for stat in ("mean", "min", "max"):
                suffix = "" if stat == "mean" else f"_{stat}"
                out[f"{prefix}{name}{suffix}_{tag}"] = {k: float(b[stat][i, j]) for i, k in enumerate(norms_)}
        out[f"{prefix}error_train_mode_{tag}"] = {
            k: float(train_band["mean"][i, j]) for i, k in enumerate(norms_) if k in BATCH_DEPENDENT
        }
    out[f"{prefix}penalty"] = {k: float(band["mean"][i, lo] - band["mean"][i, hi]) for i, k in enumerate(norms_)
                               if k in BATCH_DEPENDENT}
    out[f"{prefix}train_mode_penalty"] = {
        k: float(train_band["mean"][i, lo] - band["mean"][i, lo]) for i, k in enumerate(norms_) if k in BATCH_DEPENDENT
    }
    out[f"{prefix}verdict"] = {k: _verdict(err[i], lo, hi) for i, k in enumerate(norms_) if k in BATCH_DEPENDENT}
    out[f"{prefix}plateau_n"] = {k: plateau(err[i], sizes) for i, k in enumerate(norms_) if k in BATCH_DEPENDENT}
    out[f"{prefix}diverged"] = int(np.isnan(res["acc"][:, :, :]).sum())
    return out


def _outcome(cfg, ds, n_available, mlp_ds, cnn, mlp, noise, noise_sizes, n_pop, speed_norms, step_ms) -> Outcome:
    """Pack the four measurements into headline metrics (errors in %, times in ms) and raw arrays."""
    sizes, mlp_sizes = list(cfg.stat_batches), list(cfg.mlp_stat_batches)
    lo, hi = min(sizes), max(sizes)
    metrics: dict[str, Any] = {
        "dataset": ds.name, "train_images": len(ds.y_train), "test_images": len(ds.y_test),
        "train_images_available": n_available, "subset_note": (
            f"a fixed random subset of the {n_available:,} training images" if len(ds.y_train) < n_available
            else "the full training set"),
        "mlp_dataset": mlp_ds.name, "mlp_train_images": len(mlp_ds.y_train), "mlp_test_images": len(mlp_ds.y_test),
        "stat_batches": sizes, "mlp_stat_batches": mlp_sizes, "norms": list(cfg.norms), "mlp_norms": list(cfg.mlp_norms),
        "seeds": cfg.seeds, "batch_size": cfg.batch_size, "steps": cfg.steps, "mlp_steps": cfg.mlp_steps,
        "lr": cfg.lr, "mlp_lr": cfg.mlp_lr, "momentum": cfg.momentum,
        "widths": " / ".join(str(w) for w in cfg.widths),
        "examples": cfg.steps * cfg.batch_size, "epochs": cfg.steps * cfg.batch_size / len(ds.y_train),
        "mlp_examples": cfg.mlp_steps * cfg.batch_size, "mlp_epochs": cfg.mlp_steps * cfg.batch_size / len(mlp_ds.y_train),
        "n_lo": lo, "n_hi": hi, "mlp_n_lo": min(mlp_sizes), "mlp_n_hi": max(mlp_sizes),
        "renorm_warmup": cfg.renorm_warmup, "renorm_dmax_step": cfg.renorm_dmax_step,
        "renorm_rmax_step": cfg.renorm_rmax_step,
        "cnn_train_seconds": float(cnn["seconds"].sum()), "mlp_train_seconds": float(mlp["seconds"].sum()),
        **_sweep_metrics("", cnn, cfg.norms, sizes),
        **_sweep_metrics("mlp_", mlp, cfg.mlp_norms, mlp_sizes),
        "step_ms": dict(zip(speed_norms, step_ms)),
        "step_relative_to_bn": dict(zip(speed_norms, step_ms / step_ms[0])),
        "noise_sizes": list(noise_sizes), "noise_images": n_pop,
        "noise_positions": {k: v for k, v in noise.items() if k.endswith("_positions")},
    }
    if "gn" in cfg.norms and "bn" in cfg.norms:
        err = metrics["error"]
        metrics["gn_minus_bn"] = {str(n): err["gn"][str(n)] - err["bn"][str(n)] for n in sizes}
        metrics["gn_minus_bn_lo"], metrics["gn_minus_bn_hi"] = metrics["gn_minus_bn"][str(lo)], metrics["gn_minus_bn"][str(hi)]
    if "gn" in cfg.norms and "bn" in cfg.norms:
        metrics["gn_vs_bn_phrase"] = (
            "GN is behind BN even there, so the sign of Wu and He's result is not reproduced at this scale"
            if metrics["gn_minus_bn_lo"] > 0 else "GN is ahead of BN there, as in Wu and He's Table 2"
        )
    if "bn" in cfg.norms:  # which estimate is better at the largest N: the batch's or the running averages?
        gap = metrics["error_train_mode_hi"]["bn"] - metrics["error_hi"]["bn"]
        metrics["modes_hi_phrase"] = (
            "the batch statistics are the better estimate there: training mode errs less than inference mode"
            if gap < 0 else "inference mode errs less there too"
        )
    if "ws" in cfg.norms:  # does WS alone learn at all? (a held-out loss near ln C is a uniform guess)
        chance = float(np.log(ds.num_classes))
        metrics["ws_alone_phrase"] = (
            "does not learn at this learning rate (its held-out loss is that of a uniform guess over the classes)"
            if metrics["loss_lo"]["ws"] > 0.95 * chance else "learns, but without an activation normaliser"
        )
    # noise: "effective values per image" 1/(N·spread²) — H·W if every position were independent
    m = np.array(noise_sizes, dtype=float)
    layers = [k for k in noise if not k.endswith("_positions")]
    metrics["noise_spread_mu"] = {k: dict(zip(map(str, noise_sizes), noise[k][0])) for k in layers}
    metrics["noise_effective_per_image"] = {k: float(np.median(1 / (m * noise[k][0] ** 2))) for k in layers}
    # exercise 3: P positions with pairwise correlation ρ act like P_eff = P / (1 + (P − 1) ρ) values
    corr = {}
    for k in layers:
        positions = noise.get(f"{k}_positions", 1)
        if positions > 1:
            corr[k] = float((positions / metrics["noise_effective_per_image"][k] - 1) / (positions - 1))
    metrics["noise_correlation"] = corr
    if len(corr) > 1:
        values = [corr[k] for k in sorted(corr)]
        metrics["noise_correlation_trend"] = (
            "rises from block to block" if all(b > a for a, b in zip(values, values[1:])) else
            "does not rise steadily from block to block"
        )
    if "mlp3" in layers and "bn" in metrics["mlp_plateau_n"]:  # exercise 4: the noise where BN's MLP curve flattens
        n = metrics["mlp_plateau_n"]["bn"]
        metrics["mlp_plateau_noise_bn"] = metrics["noise_spread_mu"]["mlp3"].get(str(n))
    if noise_sizes:  # the smallest and largest m under fixed names, for the prose
        metrics["noise_m_lo"], metrics["noise_m_hi"] = min(noise_sizes), max(noise_sizes)
        metrics["noise_spread_mu_lo"] = {k: float(noise[k][0][0]) for k in layers}
        metrics["noise_spread_mu_hi"] = {k: float(noise[k][0][-1]) for k in layers}
    arrays = {
        "stat_batches": np.array(sizes), "acc": cnn["acc"], "loss": cnn["loss"], "acc_batch_mode": cnn["acc_batch_mode"],
        "train_loss": cnn["train_loss"], "train_seconds": cnn["seconds"],
        "mlp_stat_batches": np.array(mlp_sizes), "mlp_acc": mlp["acc"], "mlp_loss": mlp["loss"],
        "mlp_acc_batch_mode": mlp["acc_batch_mode"], "mlp_train_loss": mlp["train_loss"],
        "noise_sizes": np.array(noise_sizes), "step_ms": step_ms,
    }
    for name in layers:
        arrays[f"noise_{name}_mu"], arrays[f"noise_{name}_sigma"] = noise[name]
    datasets_used = [ds.name] if ds.name == mlp_ds.name else [ds.name, mlp_ds.name]
    return Outcome(metrics=metrics, arrays=arrays, datasets=datasets_used)


GLUE_FORMATS = {
    "error*": ".1f", "mlp_error*": ".1f", "loss*": ".3f", "mlp_loss*": ".3f", "penalty_*": "+.1f",
    "mlp_penalty_*": ".1f", "*train_mode_penalty_*": ".1f", "gn_minus_bn*": "+.1f", "epochs": ".1f", "mlp_epochs": ".0f", "lr": "g", "mlp_lr": "g",
    "momentum": "g", "step_ms_*": ".1f", "step_relative_to_bn_*": ".2f", "noise_spread_mu_*": ".2f",
    "noise_effective_per_image_*": ".2g", "noise_correlation_*": ".2f", "mlp_plateau_noise_bn": ".2f", "*_seconds": ".0f",
}
"""How chapter 5 prints its metrics (``report.glue_metrics``; first matching pattern wins)."""


# ------------------------------------------------------------------ figures and tables
NORM_COLORS = {
    "bn": "#1f77b4", "brn": "#17becf", "ws+bn": "#9467bd", "gn": "#2ca02c", "ln": "#ff7f0e",
    "ws+gn": "#8c564b", "none": "#d62728", "ws": "#7f7f7f",
}
NORM_STYLES = {"ws+bn": "--", "ws+gn": "--", "brn": "-.", "none": ":", "ws": ":"}


def _norm_style(kind: str, label: str | None = None) -> dict[str, Any]:
    """Keywords of :func:`bnbook.plots.seed_band` that draw norm ``kind`` the same way on every figure:
    its colour, line style and label, and markers only where it depends on N (the per-example norms are
    the same models at every N)."""
    return {"color": NORM_COLORS.get(kind, "0.3"), "label": label or LABELS.get(kind, kind), "alpha": 0.15,
            "ls": NORM_STYLES.get(kind, "-"), "marker": "o" if kind in BATCH_DEPENDENT else None, "ms": 4}


def _log2_axis(ax, sizes, label: str = "N, examples per BN statistic") -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(int(s)) for s in sizes])
    ax.set_xlabel(label)


def _error_and_loss(res, acc_key: str, loss_key: str, sizes_key: str, norms_key: str):
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    arr, norms_ = res.arrays, res.metrics[norms_key]
    x = arr[sizes_key]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    off_scale = []
    for i, kind in enumerate(norms_):
        err = _seed_band(1 - arr[acc_key][i], 100)["mean"]
        if np.nanmin(err) > 80:  # at chance: drawing it would squash every other curve
            off_scale.append(f"{LABELS.get(kind, kind)}: {np.nanmean(err):.1f} % error, loss "
                             f"{np.nanmean(_seed_band(arr[loss_key][i])['mean']):.2f} (at chance, not drawn)")
            continue
        seed_band(left, x, 100 * (1 - arr[acc_key][i]), **_norm_style(kind))
        seed_band(right, x, arr[loss_key][i], **_norm_style(kind))
    if off_scale:
        left.text(0.02, 0.97, "\n".join(off_scale), transform=left.transAxes, va="top", fontsize=7.5, color="0.3")
    left.set_ylabel("held-out error (%)")
    right.set_ylabel("held-out cross-entropy")
    for ax in (left, right):
        _log2_axis(ax, x)
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_error_vs_batch(res):
    """Figure: CNN held-out error and loss against N, every norm (same steps, same SGD batch, same lr)."""
    return _error_and_loss(res, "acc", "loss", "stat_batches", "norms")


def plot_mlp(res):
    """Figure: the 3×100 sigmoid MLP's held-out error and loss against N, per norm."""
    return _error_and_loss(res, "mlp_acc", "mlp_loss", "mlp_stat_batches", "mlp_norms")


def plot_statistics_noise(res):
    """Figure: spread of μ_B and σ_B around the population values vs batch size, per layer."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    arr = res.arrays
    m = arr["noise_sizes"].astype(float)
    positions = res.metrics["noise_positions"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    layers = sorted(k[len("noise_"):-len("_mu")] for k in arr if k.startswith("noise_") and k.endswith("_mu"))
    shades = {"cnn1": "#9ecae1", "cnn2": "#4292c6", "cnn3": "#08519c", "mlp3": "#d62728"}
    for ax, stat, symbol in zip(axes, ("mu", "sigma"), ("(μ_B − μ)/σ", "σ_B/σ − 1")):
        for name in layers:
            hw = positions.get(f"{name}_positions", 1)
            label = (f"CNN block {name[-1]} ({int(round(hw ** 0.5))}×{int(round(hw ** 0.5))} map, m = {hw}·N)"
                     if name.startswith("cnn") else "MLP layer 3 (m = N)")
            ax.plot(m, arr[f"noise_{name}_{stat}"], marker="o", ms=4, color=shades.get(name, "0.4"), label=label)
        ref = 1 / np.sqrt(m) if stat == "mu" else 1 / np.sqrt(2 * m)
        ax.plot(m, ref, color="0.35", ls="--", lw=1, label="i.i.d. values, m = N" if stat == "mu" else "i.i.d. Gaussian, m = N")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        _log2_axis(ax, m.astype(int), label="N, images per batch")
        ax.set_title(f"RMS of {symbol}", fontsize=10)
    axes[0].set_ylabel("spread around the population value")
    axes[0].legend(fontsize=7.5)
    fig.tight_layout()
    return fig


def plot_train_vs_inference(res):
    """Figure: batch-dependent norms' held-out error with running averages (inference) vs batch statistics of N."""
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    arr, norms_ = res.arrays, res.metrics["norms"]
    x = arr["stat_batches"]
    kinds = [k for k in norms_ if k in BATCH_DEPENDENT]
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    for kind in kinds:
        i = norms_.index(kind)
        inference = f"{LABELS[kind]}: inference mode (running averages)"
        seed_band(ax, x, 100 * (1 - arr["acc"][i]), **_norm_style(kind, inference))
        band = _seed_band(1 - arr["acc_batch_mode"][i], 100)
        ax.plot(x, band["mean"], marker="s", ms=4, mfc="white", color=NORM_COLORS[kind], ls=":",
                label=f"{LABELS[kind]}: training mode (statistics of N test images)")
    _log2_axis(ax, x)
    ax.set_ylabel("held-out error (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_step_cost(res):
    """Figure: time per training step of each norm relative to BN (same net and batch), bars from zero."""
    import matplotlib.pyplot as plt

    rel = res.metrics["step_relative_to_bn"]
    kinds = list(rel)
    fig, ax = plt.subplots(figsize=(6.2, 3.0))
    ax.barh([LABELS.get(k, k) for k in kinds], [rel[k] for k in kinds], color=[NORM_COLORS.get(k, "0.4") for k in kinds])
    ax.axvline(1.0, color="0.35", lw=1, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel(f"time per training step relative to BN (batch {res.metrics['batch_size']})")
    fig.tight_layout()
    return fig


def error_table_rows(res, mlp: bool = False) -> list[dict[str, Any]]:
    """Rows (one per norm): held-out error % "mean (min–max)" and loss at each N, for report.table."""
    p = "mlp_" if mlp else ""
    arr, norms_ = res.arrays, res.metrics[f"{p}norms"]
    rows = []
    for i, kind in enumerate(norms_):
        err, loss = _seed_band(1 - arr[f"{p}acc"][i], 100), _seed_band(arr[f"{p}loss"][i])
        row: dict[str, Any] = {"norm": LABELS.get(kind, kind)}
        for j, b in enumerate(arr[f"{p}stat_batches"]):
            if kind not in BATCH_DEPENDENT and j:
                row[str(int(b))] = "〃"  # trained once: the same models at every N
                continue
            mean, lo, hi = err["mean"][j], err["min"][j], err["max"][j]
            row[str(int(b))] = ("diverged" if np.isnan(mean)
                                else f"{mean:.1f} ({lo:.1f}–{hi:.1f}); {loss['mean'][j]:.3f}")
        rows.append(row)
    return rows


def error_table_columns(res, mlp: bool = False) -> dict[str, str]:
    """Column headers of :func:`error_table_rows`."""
    p = "mlp_" if mlp else ""
    return {"norm": "norm", **{str(b): f"N = {b}" for b in res.metrics[f"{p}stat_batches"]}}


def paper_table_rows(res) -> list[dict[str, Any]]:
    """Rows comparing Wu & He's Table 2 (ImageNet, ResNet-50) with our BN and GN errors, by N."""
    ours = res.metrics["error"]
    paper = GN_PAPER_TABLE2
    sizes = sorted({*paper["batch_sizes"], *res.metrics["stat_batches"]})
    rows = []
    for b in sizes:
        row: dict[str, Any] = {"batch": b}
        if b in paper["batch_sizes"]:
            j = paper["batch_sizes"].index(b)
            row["p_bn"], row["p_gn"] = paper["bn"][j], paper["gn"][j]
            row["p_delta"] = paper["gn"][j] - paper["bn"][j]
        if str(b) in ours.get("bn", {}) and "gn" in ours:
            row["o_bn"], row["o_gn"] = ours["bn"][str(b)], ours["gn"][str(b)]
            if row["o_bn"] is not None and row["o_gn"] is not None:
                row["o_delta"] = row["o_gn"] - row["o_bn"]
        rows.append(row)
    return rows


def paper_numbers() -> dict[str, float]:
    """Wu & He's Table 2 numbers the prose quotes, for ``report.glue_metrics`` (prefix ``paper_``)."""
    p = GN_PAPER_TABLE2
    i2, i32 = p["batch_sizes"].index(2), p["batch_sizes"].index(32)
    return {"bn_32": p["bn"][i32], "bn_2": p["bn"][i2], "gn_2": p["gn"][i2],
            "delta_32": p["gn"][i32] - p["bn"][i32], "delta_2": p["gn"][i2] - p["bn"][i2]}
