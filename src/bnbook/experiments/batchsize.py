"""Chapter 5, "When the batch is small": BN's batch-size dependence and its alternatives.

Four measurements, all in one run so that they share data, models and machine:

1. **The phenomenon** (:func:`sweep`). A small CNN (:class:`bnbook.nets.PackedCNN`) with
   each normaliser — BN, Batch Renorm, GN, LN, WS+GN, WS+BN, none — trained for the
   same number of epochs at every batch size N, with the learning rate scaled linearly,
   lr = base_lr · N/32 (Wu & He's rule, 0.1·N/32). Test error per (norm, N, seed).
2. **Why** (:func:`statistics_noise`, :func:`batch_mode_accuracy`). The spread of the
   batch mean and standard deviation around the population values as a function of the
   batch size, on the trained net's real activations; and the accuracy of the BN models
   when the test set is normalised the way training normalised it (batch statistics of
   N examples) against inference mode (running averages).
3. **Seed report 001 redone** (:func:`sweep` with :class:`bnbook.nets.PackedMLP`): the
   3×100 sigmoid MLP on MNIST with BN, LN, WS+BN and no norm, over batch sizes, with seeds.
4. **Cost** (:func:`step_times`): time per training step of each normaliser relative to BN,
   same net, same batch, interleaved in one run.

Seeds of one configuration are trained together as one packed network (``groups=K``), an
execution detail that does not change any model's numbers (tested).
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
from bnbook import nets, train
from bnbook.config import ChapterConfig
from bnbook.env import num_threads
from bnbook.errors import BnbookError
from bnbook.results import Outcome

CNN_NORMS = ("bn", "brn", "gn", "ln", "ws+gn", "ws+bn", "none")
MLP_NORMS = ("none", "bn", "ln", "ws+bn")
BATCH_DEPENDENT = ("bn", "brn", "ws+bn")  # norms whose output depends on the other examples
LABELS = {
    "bn": "BN", "brn": "Batch Renorm", "gn": "GN", "ln": "LN", "ws+gn": "WS + GN",
    "ws+bn": "WS + BN", "none": "no norm", "ws": "WS only",
}

# Wu & He (2018), Table 2: ResNet-50, ImageNet top-1 validation error (%) vs images per GPU
# (papers.md §D.2). A reference from a different dataset, network and scale.
GN_PAPER_TABLE2 = {
    "batch_sizes": (32, 16, 8, 4, 2),
    "bn": (23.6, 23.7, 24.8, 27.3, 34.7),
    "gn": (24.1, 24.2, 24.0, 24.2, 24.1),
}

# Batch Renorm's r/d schedule (papers.md §D.4, an UNVERIFIED recollection): BN for the first
# 5k steps, r_max relaxed to 3 by 40k and d_max to 5 by 25k. We read it as fractions of a
# 50k-step run and apply the fractions to each of our runs.
RENORM_SCHEDULE = {"warmup": 5 / 50, "rmax_end": 40 / 50, "dmax_end": 25 / 50, "rmax": 3.0, "dmax": 5.0}


def renorm_kwargs(steps: int, momentum: float = 0.1) -> dict[str, Any]:
    """BatchRenorm arguments for a run of ``steps`` steps (:data:`RENORM_SCHEDULE` scaled to it)."""
    s = RENORM_SCHEDULE
    return {
        "momentum": momentum,
        "rmax": s["rmax"],
        "dmax": s["dmax"],
        "warmup_steps": round(s["warmup"] * steps),
        "rmax_steps": round(s["rmax_end"] * steps),
        "dmax_steps": round(s["dmax_end"] * steps),
    }


@dataclasses.dataclass(frozen=True)
class BatchSizeConfig(ChapterConfig):
    """Chapter 5's parameters. Defaults are the ``quick`` profile (a 2-core CPU, ~2 minutes)."""

    # Experiment 1: the CNN batch-size sweep
    dataset: str = "fashion-mnist"  # offline Fashion-MNIST; 'cifar10' (downloaded once) in the paper profile
    train_size: int = 6_000  # training images used (a fixed random subset); 0: all
    test_size: int = 2_000  # test images evaluated (a fixed random subset); 0: all
    norms: tuple[str, ...] = CNN_NORMS  # normalisers compared
    batch_sizes: tuple[int, ...] = (2, 8, 32)  # N, images per batch (three of Wu & He's Table 2)
    seeds: int = 2  # models per (norm, N): seeds seed, seed+1, ...
    epochs: int = 1  # the same for every N
    base_lr: float = 0.1  # learning rate at N = 32; lr = base_lr·N/32 (Wu & He's 0.1·N/32)
    momentum: float = 0.9  # SGD momentum
    widths: tuple[int, ...] = (16, 32, 64)  # channels of the three conv blocks
    group_size: int = 4  # channels per group of GN
    # Experiment 2: noise of batch statistics
    noise_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)  # batch sizes m probed
    noise_draws: int = 200  # random batches per m
    noise_images: int = 2_000  # training images that define the "population"
    # Experiment 3: seed report 001's MLP comparison
    mlp_dataset: str = "mnist5k"  # offline MNIST subset (4,000 train / 1,000 test)
    mlp_train_size: int = 0  # 0: all
    mlp_test_size: int = 0  # 0: all
    mlp_norms: tuple[str, ...] = MLP_NORMS
    mlp_batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)
    mlp_seeds: int = 3
    mlp_epochs: int = 1
    mlp_base_lr: float = 0.1  # at N = 32, scaled linearly like the CNN's
    # Experiment 4: cost per step
    speed_batch: int = 32  # batch size of the timing
    speed_steps: int = 15  # timed steps per norm and round
    speed_rounds: int = 3  # interleaved rounds (the median is reported)
    threads: int = 1  # CPU threads (small convolutions run best on one); 0: torch's default

    profiles: ClassVar = {
        "smoke": {
            "train_size": 128, "test_size": 100, "batch_sizes": (4, 16),
            "noise_sizes": (2, 8, 32), "noise_draws": 10, "noise_images": 128, "mlp_dataset": "fashion-mnist",
            "mlp_train_size": 128, "mlp_test_size": 100, "mlp_batch_sizes": (4, 16), "mlp_seeds": 2,
            "speed_steps": 1, "speed_rounds": 1,
        },
        "paper": {
            "dataset": "cifar10", "train_size": 0, "test_size": 0, "batch_sizes": (2, 4, 8, 16, 32, 64, 128, 256), "seeds": 3,
            "epochs": 2, "noise_draws": 1_000, "noise_images": 10_000, "mlp_batch_sizes": (2, 4, 8, 16, 32, 64, 128),
            "mlp_seeds": 5, "mlp_epochs": 5, "speed_steps": 50, "speed_rounds": 5, "threads": 0,
        },
    }

    def __post_init__(self) -> None:
        for name in ("norms", "batch_sizes", "widths", "noise_sizes", "mlp_norms", "mlp_batch_sizes"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        for kind in (*self.norms, *self.mlp_norms):
            nets.parse_norm_kind(kind)  # raises BnbookError naming the unknown norm
        if "gn" in self.mlp_norms or "ws+gn" in self.mlp_norms:
            raise BnbookError("mlp_norms: the MLP comparison has no GroupNorm; use 'ln'")
        positive = ("seeds", "epochs", "noise_draws", "mlp_seeds", "mlp_epochs", "speed_steps", "speed_rounds")
        for name in positive:
            if getattr(self, name) < 1:
                raise BnbookError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("batch_sizes", "noise_sizes", "mlp_batch_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(int(b) < 2 for b in sizes):
                raise BnbookError(f"{name} must be batch sizes >= 2 (BN needs two examples), got {sizes}")
        if not self.base_lr > 0 or not self.mlp_base_lr > 0:
            raise BnbookError("learning rates must be positive")
        for name in ("train_size", "test_size", "mlp_train_size", "mlp_test_size", "threads"):
            if getattr(self, name) < 0:
                raise BnbookError(f"{name} must be >= 0 (0 means all / default), got {getattr(self, name)}")


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of Wu & He (2018) §4: lr = base_lr · N / 32."""
    return base_lr * batch_size / 32


def subset(ds: datasets.Dataset, train_size: int, test_size: int, seed: int = 0) -> datasets.Dataset:
    """A fixed random subset of ``ds`` (``0``: keep the split whole); the subset depends on ``seed`` only."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for split, size in (("train", train_size), ("test", test_size)):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if size and size < len(y):
            idx = torch.randperm(len(y), generator=gen)[:size].to(y.device)
            x, y = x[idx], y[idx]
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return dataclasses.replace(ds, **out)


# ------------------------------------------------------------------ training
@dataclasses.dataclass
class Trained:
    """One packed net after training: per-model test accuracy and training loss per epoch."""

    model: nn.Module
    test_acc: np.ndarray  # (K,) inference mode
    epoch_loss: np.ndarray  # (epochs, K) mean training loss of each epoch (NaN once diverged)
    diverged: np.ndarray  # (K,) bool: a non-finite training loss occurred
    seconds: float  # wall-clock training time


def train_packed(
    model: nn.Module,
    ds: datasets.Dataset,
    batch_size: int,
    epochs: int,
    lr: float,
    momentum: float,
    seeds: Sequence[int],
) -> Trained:
    """Train the K packed models of ``model`` for ``epochs`` epochs by SGD with momentum, with the engine.

    :func:`bnbook.train.fit` does the work: model k draws its mini-batches from the
    generator of ``seeds[k]`` (last partial batch dropped), losses stay on the device, and a
    model whose loss turns non-finite is recorded as diverged and cannot disturb the others
    (the packed groups share no parameters).
    """
    per_epoch = len(ds.y_train) // batch_size
    if per_epoch < 1:
        raise BnbookError(f"batch size {batch_size} is larger than the training set ({len(ds.y_train)} images)")
    cfg = train.FitConfig(steps=epochs * per_epoch, batch_size=batch_size, lr=lr, momentum=momentum,
                          log_every=per_epoch, stack=False, probe_size=1)
    res = train.fit([model], ds, cfg, seeds=seeds)
    epoch_loss = res.train_loss[1:]  # (epochs, K): the record at step 0 has no training loss
    diverged = res.diverged_step >= 0
    acc = res.test_acc[-1]  # NaN for a diverged model
    seconds = res.train_time_s
    return Trained(model, acc, epoch_loss, diverged, seconds)


@torch.no_grad()
def batch_mode_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> np.ndarray:
    """Test accuracy (K,) with norms in *training* mode: each test batch of ``batch_size`` is
    normalised with its own statistics, as during training. Running statistics and step
    counters are restored afterwards, so the model is left exactly as it was. NaN when the
    test set holds fewer than ``batch_size`` examples (a partial batch would be another N)."""
    if len(y) < batch_size:
        return np.full(model.k, np.nan)
    saved = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    k = model.k
    usable = len(y) // batch_size * batch_size
    correct = torch.zeros(k, device=x.device)
    for s in range(0, usable, batch_size):
        xb = x[s : s + batch_size]
        correct += (model(xb.unsqueeze(0).expand(k, *xb.shape)).argmax(-1) == y[s : s + batch_size]).sum(1)
    for name, b in model.named_buffers():
        b.copy_(saved[name])
    model.train(was_training)
    return (correct / usable).cpu().numpy()


def sweep(
    make: Callable[[str, int, list[int]], nn.Module],
    ds: datasets.Dataset,
    norms_: Sequence[str],
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    epochs: int,
    base_lr: float,
    momentum: float,
) -> dict[str, Any]:
    """Train every (norm, batch size) with all ``seeds`` packed; return arrays indexed [norm, N, seed].

    ``make(norm, steps, seeds)`` builds the packed net (``steps`` lets Batch Renorm scale its
    schedule). Besides inference-mode accuracy, the batch-dependent norms are also
    evaluated in training mode at their own batch size (:func:`batch_mode_accuracy`).
    """
    shape = (len(norms_), len(batch_sizes), len(seeds))
    acc = np.full(shape, np.nan)
    acc_batch_mode = np.full(shape, np.nan)
    loss = np.full((*shape[:2], epochs, len(seeds)), np.nan)
    seconds = np.zeros(shape[:2])
    models: dict[tuple[str, int], nn.Module] = {}
    n = len(ds.y_train)
    for i, kind in enumerate(norms_):
        for j, bs in enumerate(batch_sizes):
            model = make(kind, epochs * (n // bs), list(seeds)).to(ds.x_train.device)
            out = train_packed(model, ds, bs, epochs, scaled_lr(base_lr, bs), momentum, seeds)
            acc[i, j], loss[i, j], seconds[i, j] = out.test_acc, out.epoch_loss, out.seconds
            if kind in BATCH_DEPENDENT:
                acc_batch_mode[i, j] = batch_mode_accuracy(model, ds.x_test, ds.y_test, bs)
                acc_batch_mode[i, j][out.diverged] = np.nan
            models[kind, bs] = model
    return {"acc": acc, "acc_batch_mode": acc_batch_mode, "epoch_loss": loss, "seconds": seconds, "models": models}


# ------------------------------------------------------------------ statistics noise
@torch.no_grad()
def statistics_noise(
    feats: Tensor, sizes: Sequence[int], draws: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Spread of batch statistics around the population ones, for each batch size m.

    ``feats`` are one layer's norm inputs on a "population" of images, (P, C) or
    (P, C, H, W). For every m, ``draws`` batches of m distinct images are drawn; per
    channel the batch mean μ_B and standard deviation σ_B (over m·H·W values, biased, as
    BN computes them) are compared with the population μ, σ. Returns the root-mean-square
    (over channels and draws) of (μ_B − μ)/σ and of σ_B/σ − 1: two arrays (len(sizes),).
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
    make: Callable[[str], nn.Module], ds: datasets.Dataset, norms_: Sequence[str], batch_size: int, steps: int, rounds: int
) -> np.ndarray:
    """Seconds per training step (forward, backward, SGD) of each norm's net: (len(norms_), rounds).

    The norms are timed in interleaved rounds (norm 1, 2, ..., then again), so a slow
    moment of a shared machine hits all of them alike; one warm-up step precedes each.
    """
    device = ds.x_train.device
    x, y = ds.x_train[:batch_size].unsqueeze(0), ds.y_train[:batch_size].unsqueeze(0)
    models = [make(kind).to(device) for kind in norms_]
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, foreach=True) for m in models]
    out = np.zeros((len(norms_), rounds))

    def step(m: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        train.per_model_loss(m(x), y).sum().backward()
        opt.step()

    for r in range(rounds):
        for i, (m, opt) in enumerate(zip(models, opts)):
            step(m, opt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m, opt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out[i, r] = (time.perf_counter() - t0) / steps
    return out


# ------------------------------------------------------------------ the chapter's run
def _seed_band(acc: np.ndarray) -> dict[str, np.ndarray]:
    """Test error (%) mean, min and max over seeds (last axis), NaN-aware."""
    err = 100 * (1 - acc)
    with warnings.catch_warnings():  # an all-NaN slice (every seed diverged) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mean": np.nanmean(err, -1), "min": np.nanmin(err, -1), "max": np.nanmax(err, -1)}


def run(cfg: BatchSizeConfig, device: torch.device) -> Outcome:
    """All four measurements of chapter 5; metrics are test errors in %, times in ms."""
    with num_threads(cfg.threads or None):
        return _run(cfg, device)


def _run(cfg: BatchSizeConfig, device: torch.device) -> Outcome:
    torch.manual_seed(cfg.seed)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    full = datasets.load(cfg.dataset, device)
    ds = subset(full, cfg.train_size, cfg.test_size, seed=cfg.seed)
    if max(cfg.batch_sizes) > len(ds.y_train):
        raise BnbookError(f"largest batch size {max(cfg.batch_sizes)} exceeds the {len(ds.y_train)} training images")
    c_in, n_classes = ds.input_shape[0], ds.num_classes
    mlp_ds = subset(
        datasets.load(cfg.mlp_dataset, device).flat(), cfg.mlp_train_size, cfg.mlp_test_size, seed=cfg.seed
    )
    n_pop = min(cfg.noise_images, len(ds.y_train), len(mlp_ds.y_train))
    noise_sizes = [m for m in cfg.noise_sizes if m <= n_pop]

    def make_cnn(kind: str, steps: int = 1, seeds_: Sequence[int] = (0,)) -> nn.Module:
        return nets.PackedCNN(
            c_in, n_classes, cfg.widths, norm=kind, models=len(seeds_), seeds=seeds_,
            group_size=cfg.group_size, renorm=renorm_kwargs(steps),
        )

    # 1. the phenomenon
    cnn = sweep(make_cnn, ds, cfg.norms, cfg.batch_sizes, seeds, cfg.epochs, cfg.base_lr, cfg.momentum)

    # 2. why: noise of the batch statistics on the trained BN net's activations
    noise = {}
    bn_kind = "bn" if "bn" in cfg.norms else next((k for k in cfg.norms if k in BATCH_DEPENDENT), None)
    gen = torch.Generator().manual_seed(cfg.seed)
    if bn_kind is not None:
        net = cnn["models"][bn_kind, max(cfg.batch_sizes)].eval()
        pop = ds.x_train[:n_pop]
        with torch.no_grad():
            feats = net.features(pop.unsqueeze(0).expand(net.k, *pop.shape))
        for layer, f in enumerate(feats):
            noise[f"cnn{layer + 1}"] = statistics_noise(f, noise_sizes, cfg.noise_draws, gen)
            noise[f"cnn{layer + 1}_positions"] = f.shape[2] * f.shape[3]

    # 3. seed report 001 redone: 3×100 sigmoid MLP on MNIST
    mlp_seeds = [cfg.seed + i for i in range(cfg.mlp_seeds)]

    def make_mlp(kind: str, steps: int, seeds_: Sequence[int]) -> nn.Module:
        return nets.PackedMLP(
            mlp_ds.input_shape[0], (100, 100, 100), mlp_ds.num_classes, "sigmoid", norm=kind,
            models=len(seeds_), seeds=seeds_, renorm=renorm_kwargs(steps),
        )

    mlp = sweep(make_mlp, mlp_ds, cfg.mlp_norms, cfg.mlp_batch_sizes, mlp_seeds, cfg.mlp_epochs,
                cfg.mlp_base_lr, cfg.momentum)
    if "bn" in cfg.mlp_norms:
        net = mlp["models"]["bn", max(cfg.mlp_batch_sizes)].eval()
        pop = mlp_ds.x_train[:n_pop]
        with torch.no_grad():
            feats = net.features(pop.unsqueeze(0).expand(net.k, *pop.shape))
        noise["mlp3"] = statistics_noise(feats[-1], noise_sizes, cfg.noise_draws, gen)
        noise["mlp3_positions"] = 1

    # 4. cost per step, relative to BN
    speed_norms = tuple(dict.fromkeys(("bn", *cfg.norms)))
    times = step_times(make_cnn, ds, speed_norms, min(cfg.speed_batch, len(ds.y_train)), cfg.speed_steps, cfg.speed_rounds)
    step_ms = 1e3 * np.median(times, axis=1)

    return _outcome(cfg, ds, len(full.y_train), mlp_ds, cnn, mlp, noise, noise_sizes, n_pop, speed_norms, step_ms,
                    seeds, mlp_seeds)


def _outcome(cfg, ds, n_available, mlp_ds, cnn, mlp, noise, noise_sizes, n_pop, speed_norms, step_ms, seeds,
             mlp_seeds) -> Outcome:
    """Pack the four measurements into headline metrics (errors in %, times in ms) and raw arrays."""
    band = _seed_band(cnn["acc"])
    band_train_mode = _seed_band(cnn["acc_batch_mode"])
    mlp_band = _seed_band(mlp["acc"])
    bs = list(cfg.batch_sizes)
    metrics: dict[str, Any] = {
        "dataset": ds.name, "train_images": len(ds.y_train), "test_images": len(ds.y_test),
        "train_images_available": n_available,
        "mlp_dataset": mlp_ds.name, "mlp_train_images": len(mlp_ds.y_train), "mlp_test_images": len(mlp_ds.y_test),
        "batch_sizes": bs, "norms": list(cfg.norms), "seeds": len(seeds), "epochs": cfg.epochs,
        "lr": {str(b): scaled_lr(cfg.base_lr, b) for b in bs},
        "steps": {str(b): cfg.epochs * (len(ds.y_train) // b) for b in bs},
        "cnn_error": {k: dict(zip(map(str, bs), band["mean"][i])) for i, k in enumerate(cfg.norms)},
        "cnn_error_spread": {
            k: dict(zip(map(str, bs), band["max"][i] - band["min"][i])) for i, k in enumerate(cfg.norms)
        },
        "cnn_error_train_mode": {
            k: dict(zip(map(str, bs), band_train_mode["mean"][i]))
            for i, k in enumerate(cfg.norms) if k in BATCH_DEPENDENT
        },
        "cnn_diverged": int(np.isnan(cnn["acc"]).sum()),
        "cnn_train_seconds": float(cnn["seconds"].sum()),
        "mlp_batch_sizes": list(cfg.mlp_batch_sizes), "mlp_norms": list(cfg.mlp_norms), "mlp_seeds": len(mlp_seeds),
        "mlp_epochs": cfg.mlp_epochs,
        "mlp_error": {k: dict(zip(map(str, cfg.mlp_batch_sizes), mlp_band["mean"][i])) for i, k in enumerate(cfg.mlp_norms)},
        "mlp_diverged": int(np.isnan(mlp["acc"]).sum()),
        "step_ms": dict(zip(speed_norms, step_ms)),
        "step_relative_to_bn": dict(zip(speed_norms, step_ms / step_ms[0])),
        "speed_batch": min(cfg.speed_batch, len(ds.y_train)),
        "noise_sizes": list(noise_sizes), "noise_images": n_pop,
        "noise_positions": {k: v for k, v in noise.items() if k.endswith("_positions")},
    }
    # noise: "effective values per image" 1/(N·spread²) — H·W if every position were independent
    sizes = np.array(metrics["noise_sizes"], dtype=float)
    metrics["noise_spread_mu"] = {k: dict(zip(map(str, metrics["noise_sizes"]), v[0])) for k, v in noise.items()
                                  if not k.endswith("_positions")}
    metrics["noise_effective_per_image"] = {
        k: float(np.median(1 / (sizes * v[0] ** 2))) for k, v in noise.items() if not k.endswith("_positions")
    }
    metrics["bs_lo"], metrics["bs_hi"] = min(bs), max(bs)
    arrays = {
        "batch_sizes": np.array(bs), "acc": cnn["acc"], "acc_batch_mode": cnn["acc_batch_mode"],
        "epoch_loss": cnn["epoch_loss"], "train_seconds": cnn["seconds"],
        "mlp_batch_sizes": np.array(cfg.mlp_batch_sizes), "mlp_acc": mlp["acc"],
        "mlp_acc_batch_mode": mlp["acc_batch_mode"], "mlp_epoch_loss": mlp["epoch_loss"],
        "noise_sizes": np.array(metrics["noise_sizes"]), "step_ms": step_ms,
    }
    for name, value in noise.items():
        if not name.endswith("_positions"):
            arrays[f"noise_{name}_mu"], arrays[f"noise_{name}_sigma"] = value
    datasets_used = [ds.name] if ds.name == mlp_ds.name else [ds.name, mlp_ds.name]
    return Outcome(metrics=metrics, arrays=arrays, datasets=datasets_used)


# ------------------------------------------------------------------ figures and tables
NORM_COLORS = {
    "bn": "#1f77b4", "brn": "#17becf", "ws+bn": "#9467bd", "gn": "#2ca02c", "ln": "#ff7f0e",
    "ws+gn": "#8c564b", "none": "#d62728", "ws": "#7f7f7f",
}
NORM_STYLES = {"ws+bn": "--", "ws+gn": "--", "brn": "-.", "none": ":"}


def _error_band(ax, x, acc, kind, label=None, **kw) -> None:
    """Mean test error over seeds with a min–max band; diverged seeds (NaN) are left out."""
    band = _seed_band(acc)
    color = NORM_COLORS.get(kind, "0.3")
    ax.plot(x, band["mean"], marker="o", ms=4, color=color, ls=NORM_STYLES.get(kind, "-"),
            label=label or LABELS.get(kind, kind), **kw)
    ax.fill_between(x, band["min"], band["max"], color=color, alpha=0.15, lw=0)


def _log2_axis(ax, sizes, label: str = "batch size N (images per batch)") -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(int(s)) for s in sizes])
    ax.set_xlabel(label)


def plot_error_vs_batch(res):
    """Figure: CNN test error vs batch size, batch-dependent norms (left) and the others (right)."""
    import matplotlib.pyplot as plt

    arr, norms_ = res.arrays, res.metrics["norms"]
    x = arr["batch_sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    groups = [[k for k in norms_ if k in (*BATCH_DEPENDENT, "none")], [k for k in norms_ if k not in BATCH_DEPENDENT]]
    titles = ["normalised with batch statistics", "normalised per example (and BN for reference)"]
    for ax, group, title in zip(axes, groups, titles):
        if ax is axes[1] and "bn" in norms_:
            _error_band(ax, x, arr["acc"][norms_.index("bn")], "bn", label="BN (reference)", alpha=0.5)
        for kind in group:
            _error_band(ax, x, arr["acc"][norms_.index(kind)], kind)
        _log2_axis(ax, x)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test error (%)")
    fig.tight_layout()
    return fig


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
        _log2_axis(ax, m.astype(int))
        ax.set_title(f"RMS of {symbol}", fontsize=10)
    axes[0].set_ylabel("spread around the population value")
    axes[0].legend(fontsize=7.5)
    fig.tight_layout()
    return fig


def plot_train_vs_inference(res):
    """Figure: BN-family test error with batch statistics (training mode) vs running averages (inference)."""
    import matplotlib.pyplot as plt

    arr, norms_ = res.arrays, res.metrics["norms"]
    x = arr["batch_sizes"]
    kinds = [k for k in norms_ if k in BATCH_DEPENDENT]
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    for kind in kinds:
        i = norms_.index(kind)
        _error_band(ax, x, arr["acc"][i], kind, label=f"{LABELS[kind]}: inference mode (running averages)")
        band = _seed_band(arr["acc_batch_mode"][i])
        ax.plot(x, band["mean"], marker="s", ms=4, mfc="white", color=NORM_COLORS[kind], ls=":",
                label=f"{LABELS[kind]}: training mode (statistics of N test images)")
    _log2_axis(ax, x)
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_mlp(res):
    """Figure: seed report 001's comparison redone — MLP test error vs batch size per norm."""
    import matplotlib.pyplot as plt

    arr, norms_ = res.arrays, res.metrics["mlp_norms"]
    x = arr["mlp_batch_sizes"]
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for i, kind in enumerate(norms_):
        _error_band(ax, x, arr["mlp_acc"][i], kind)
    _log2_axis(ax, x)
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_step_cost(res):
    """Figure: time per training step of each norm relative to BN (same net and batch)."""
    import matplotlib.pyplot as plt

    rel = res.metrics["step_relative_to_bn"]
    kinds = list(rel)
    fig, ax = plt.subplots(figsize=(6.2, 3.0))
    ax.barh([LABELS.get(k, k) for k in kinds], [rel[k] for k in kinds], color=[NORM_COLORS.get(k, "0.4") for k in kinds])
    ax.axvline(1.0, color="0.35", lw=1, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel(f"time per training step relative to BN (batch {res.metrics['speed_batch']})")
    fig.tight_layout()
    return fig


def error_table_rows(res) -> list[dict[str, Any]]:
    """Rows (one per norm) of mean test error and seed range at each batch size, for report.table."""
    arr, norms_ = res.arrays, res.metrics["norms"]
    rows = []
    for i, kind in enumerate(norms_):
        band = _seed_band(arr["acc"][i])
        row: dict[str, Any] = {"norm": LABELS.get(kind, kind)}
        for j, b in enumerate(arr["batch_sizes"]):
            mean, lo, hi = band["mean"][j], band["min"][j], band["max"][j]
            row[str(int(b))] = "diverged" if np.isnan(mean) else f"{mean:.1f} ({lo:.1f}–{hi:.1f})"
        rows.append(row)
    return rows


def paper_table_rows(res) -> list[dict[str, Any]]:
    """Rows comparing Wu & He's Table 2 (ImageNet, ResNet-50) with our BN and GN errors, by batch size."""
    ours = res.metrics["cnn_error"]
    paper = GN_PAPER_TABLE2
    sizes = sorted({*paper["batch_sizes"], *res.metrics["batch_sizes"]})
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
