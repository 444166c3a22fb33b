"""Chapter 6: does BN reduce internal covariate shift? Santurkar et al. (2018), §2 (Figs. 1, 2, 3, 8).

Three experiments, all trained by the engine (:func:`bnbook.train.fit`) with every seed of a
variant in one call, and measured by step hooks (:mod:`bnbook.ics`) on the very batches the
networks train on:

1. **Fig. 1** — a VGG with and without BN at two learning rates: training and test accuracy,
   and the distribution of two layers' activations over training (quantile bands).
2. **Fig. 2 / Fig. 8** — standard, BN and *noisy* BN (Algorithm 1 of the paper's appendix,
   :class:`bnbook.norms.NoisyBatchNorm`), and the same noise without BN: training accuracy,
   activation distributions of three layers, and the step-to-step change of each channel's
   mean and variance across one update on the same batch.
3. **Fig. 3** — Definition 2.1 (‖G − G′‖₂ and cos(G, G′) per layer) for the VGG at two
   learning rates and for the 25-layer deep linear network (DLN) at two more.

Layers are named by the paper's labels (#1 … #13 of its VGG, #1 … #25 of the DLN) and mapped
onto our depth at the same relative position (:func:`bnbook.ics.scaled_layer`). Everything
the paper leaves open is a field of :class:`IcsConfig` with the choice in its comment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from bnbook import data, ics, nets, train
from bnbook.config import ChapterConfig
from bnbook.env import num_threads
from bnbook.results import Outcome, Result

VARIANTS: dict[str, str] = {"standard": "none", "bn": "bn", "noisy_bn": "noisy-bn", "noise": "noise"}
"""The VGG variants and their norm slot (:func:`bnbook.nets.make_norm`): the book's BN (chapter 1); noisy BN is
that BN followed by Algorithm 1's noise; ``noise`` is the same noise after the layers of the standard net."""

LABELS = {"standard": "standard", "bn": "standard + BN", "noisy_bn": "standard + noisy BN",
          "noise": "standard + noise (no BN)"}
COLORS = {"standard": "#d62728", "bn": "#1f77b4", "noisy_bn": "#2ca02c", "noise": "#9467bd"}

RUNS: tuple[tuple[str, str], ...] = (
    ("standard", "lr"), ("bn", "lr"), ("noisy_bn", "lr"), ("noise", "lr"),
    ("standard", "lr_high"), ("bn", "lr_high"),
    ("standard", "lr_low"), ("bn", "lr_low"),
)
"""Every VGG run: (variant, the config field that holds its learning rate)."""

ICS_RUNS = {("standard", "lr"), ("bn", "lr"), ("standard", "lr_low"), ("bn", "lr_low")}
"""The VGG runs on which Definition 2.1 is measured (Fig. 3a); activation statistics are recorded on
every run at ``lr`` and ``lr_low``, so both senses of ICS are measured on the same runs."""

DLN_VARIANTS = ("standard", "bn")
DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}

# ---------------------------------------------------------------- the paper's numbers
PAPER = {"dataset": "CIFAR-10", "net": "VGG (depth and widths not stated; labels up to #13)", "steps": 15_000,
         "batch": 128, "dln_steps": 10_000}
PAPER_FIG1 = {
    # Appendix A.1 and the digitised Fig. 1 (±1-2 % of the axis): test accuracy at the end, lr 0.1
    ("standard", "lr", "test_end"): 0.80, ("bn", "lr", "test_end"): 0.83,
    # Fig. 1(a), training accuracy at step 2,500 of 15,000, lr 0.1
    ("standard", "lr", "train_early"): 0.73, ("bn", "lr", "train_early"): 0.91,
    # lr 0.5: the standard net stays near chance (training ≈ 6–17 %, test ≈ 10 %); BN ≈ 96 % / 80 %
    ("standard", "lr_high", "train_end"): 0.10, ("standard", "lr_high", "test_end"): 0.10,
    ("bn", "lr_high", "train_end"): 0.96, ("bn", "lr_high", "test_end"): 0.80,
}
"""Santurkar et al.'s Fig. 1 / Appendix A.1 values (CIFAR-10, 15,000 steps); ``train_early`` is step 2,500."""
PAPER_EARLY_STEP = 2_500

PAPER_FIG2 = {
    # training accuracy read off Fig. 2 (per-batch, noisy) at steps 500, 1k, 2k, 3k, 5k, 15k
    "standard": (0.45, 0.49, 0.77, 0.77, 0.96, 0.98),
    "bn": (0.72, 0.83, 0.94, 0.91, 0.99, 0.98),
    "noisy_bn": (0.69, 0.77, 0.88, 0.92, 0.98, 0.97),
}
PAPER_FIG2_STEPS = (500, 1_000, 2_000, 3_000, 5_000, 15_000)


@dataclasses.dataclass(frozen=True)
class IcsConfig(ChapterConfig):
    """Santurkar et al. §2. Defaults are the ``quick`` profile; the paper's protocol is the ``paper`` profile."""

    dataset: str = "fashion-mnist"  # offline; 28×28 images zero-padded to 32×32. Paper: CIFAR-10
    train_size: int = 0  # training images (0: all)
    test_size: int = 1_000  # test images evaluated at every record (0: all); a fixed random subset
    vgg: str = "vgg11"  # configuration A, 8 convs (paper: unstated; its labels reach #13, so vgg16 in paper)
    width_multiplier: float = 0.0625  # conv widths 4-8-16-16-32-32-32-32 (paper profile: full widths)
    batch_size: int = 128  # protocol
    steps: int = 200  # paper: 15,000
    seeds: int = 3  # models per variant (seed, seed+1, ...), trained together
    lr: float = 0.1  # protocol (Figs. 1, 2, 3)
    lr_high: float = 0.5  # Fig. 1's second learning rate
    lr_low: float = 0.01  # Fig. 3's second learning rate
    log_every: int = 50  # record accuracies every this many steps (and at the paper's reference steps, scaled)
    stats_every: int = 20  # activation statistics before and after every this-many-th update
    ics_every: int = 20  # Definition 2.1 every this many steps (1 + 2 forward/backward passes per model)
    paper_depth: int = 13  # the paper's labels count 13 VGG layers
    dist_layers: tuple[int, ...] = (3, 11)  # Fig. 1's distribution panels (paper labels)
    noise_layers: tuple[int, ...] = (2, 9, 13)  # Fig. 2 / Fig. 8 (paper labels)
    ics_layers: tuple[int, ...] = (5, 10)  # Fig. 3a (paper labels)
    dln_dim: int = 10  # protocol: 10×10 matrices
    dln_depth: int = 25  # protocol
    dln_points: int = 1_000  # protocol: 1,000 Gaussian inputs, trained full-batch (batch = all points)
    dln_steps: int = 10_000  # protocol
    dln_lrs: tuple[float, ...] = (1e-6, 1e-7)  # protocol (Fig. 3b)
    dln_layers: tuple[int, ...] = (9, 17)  # protocol (Fig. 3b)
    dln_loss: str = "squared_sum"  # open: ‖W x − A x‖² summed over the 1,000 points (a mean would barely move at lr 1e-6)
    dln_norm: str = "bn"  # open: BN after each of the first 24 layers (not the output layer)
    dln_seeds: int = 3  # initialisations per variant; A and the data are fixed by `seed`
    dln_every: int = 250  # Definition 2.1 and statistics on the DLN every this many steps
    dln_log_every: int = 100  # record the DLN's losses every this many steps
    threads: int = 1  # CPU threads (0: PyTorch's default); one is faster on a shared 2-core machine

    profiles: ClassVar = {
        "smoke": {"train_size": 1_024, "test_size": 256, "steps": 12, "seeds": 2,
                  "log_every": 4, "stats_every": 4, "ics_every": 6, "dln_steps": 20, "dln_seeds": 2,
                  "dln_every": 10, "dln_log_every": 10},
        "paper": {"dataset": "cifar10", "test_size": 0, "vgg": "vgg16", "width_multiplier": 1.0,
                  "steps": 15_000, "log_every": 250, "stats_every": 50, "ics_every": 250,
                  "dln_every": 100, "threads": 0},
    }


# ---------------------------------------------------------------- data and models
def vgg_data(cfg: IcsConfig, device: torch.device) -> data.Dataset:
    """The VGG's dataset: ``cfg.dataset``, padded to 32×32 if smaller, subsets as configured."""
    ds = data.load(cfg.dataset, device)
    if ds.x_train.shape[-1] < 32:
        ds = ds.padded(32)
    if cfg.train_size or cfg.test_size:
        ds = ds.subset(cfg.train_size, cfg.test_size, seed=cfg.seed)
    return ds


def dln_data(cfg: IcsConfig, device: torch.device) -> data.Dataset:
    """Santurkar et al.'s DLN task: y = A x with A (dim × dim) and x i.i.d. standard normal.

    ``dln_points`` training points and as many held-out test points; A and the points depend
    on ``cfg.seed`` only.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    a = torch.randn(cfg.dln_dim, cfg.dln_dim, generator=gen)
    x = torch.randn(2 * cfg.dln_points, cfg.dln_dim, generator=gen)
    y = x @ a.T
    n = cfg.dln_points
    return data.Dataset(
        "dln-gaussian", x[:n].to(device), y[:n].to(device), x[n:].to(device), y[n:].to(device), (),
        f"y = A x, A {cfg.dln_dim}×{cfg.dln_dim} and x ~ N(0, I) (seed {cfg.seed}); {n} training and {n} test points",
    )


def make_vgg(cfg: IcsConfig, variant: str, in_channels: int, num_classes: int, seed: int) -> nets.VGG:
    """One VGG of ``variant`` (see :data:`VARIANTS`), initialised from ``seed``."""
    return nets.VGG(in_channels, num_classes, widths=cfg.vgg, width_multiplier=cfg.width_multiplier,
                    norm=VARIANTS[variant], seed=seed)


def conv_layers(cfg: IcsConfig) -> int:
    """How many conv layers our VGG has."""
    return sum(1 for w in nets.VGG_CONFIGS[cfg.vgg] if w != "M")


def our_layers(cfg: IcsConfig, labels: Sequence[int]) -> list[int]:
    """Our 1-based layers at the relative depth of the paper's VGG labels."""
    return [ics.scaled_layer(i, cfg.paper_depth, conv_layers(cfg)) for i in labels]


def stat_layers(cfg: IcsConfig) -> list[int]:
    """Every 1-based layer whose activation statistics are recorded (Figs. 1, 2, 8 and the comparison)."""
    return sorted(set(our_layers(cfg, (*cfg.dist_layers, *cfg.noise_layers, *cfg.ics_layers))))


def paper_steps(cfg: IcsConfig) -> tuple[int, ...]:
    """Our steps at the same fractions of training as the paper's reference steps (Figs. 1 and 2)."""
    scale = cfg.steps / PAPER["steps"]
    return tuple(sorted({min(cfg.steps, max(1, round(s * scale))) for s in (*PAPER_FIG2_STEPS, PAPER_EARLY_STEP)}))


def run_name(variant: str, lr_field: str) -> str:
    """Array-name prefix of one run, e.g. ``bn_lr_low``."""
    return f"{variant}_{lr_field}"


# ---------------------------------------------------------------- hooks
def stat_hooks(layers: Sequence[int], every: int, steps: int) -> dict[str, train.StepHook]:
    """Activation statistics of the 1-based ``layers`` just before and just after every ``every``-th update.

    ``before`` fires at t = 0, every, 2·every, … with the models at W(t) and the batch of
    update t+1 (quantiles and channel moments); ``after`` fires right after that update (t+1), on
    the same batch (channel moments only).
    """
    zero_based = [i - 1 for i in layers]
    at = tuple(range(0, steps, every))
    return {"before": train.StepHook(ics.activation_stats_hook(zero_based), at=at, when="before"),
            "after": train.StepHook(ics.activation_stats_hook(zero_based, q=()), at=tuple(t + 1 for t in at),
                                    when="after")}


def ics_hook(layers: Sequence[int], every: int, steps: int) -> train.StepHook:
    """Definition 2.1 for the 1-based ``layers`` before update t+1, at t = 0, every, 2·every, …"""
    return train.StepHook(ics.gradient_change_hook([i - 1 for i in layers]), at=tuple(range(0, steps, every)),
                          when="before")


def _store_hooks(arrays: dict[str, np.ndarray], prefix: str, res: train.FitResult, layers: Sequence[int]) -> None:
    """Put one run's hook records into ``arrays`` under ``prefix``; layer keys use 1-based layer numbers."""
    if "before" in res.hooks:
        before, after = res.hooks["before"]["values"], res.hooks["after"]["values"]
        n = min(len(res.hooks["before"]["steps"]), len(res.hooks["after"]["steps"]))  # a diverged run stops early
        before = {k: v[:n] for k, v in before.items()}
        after = {k: v[:n] for k, v in after.items()}
        changes = ics.step_changes(before, after, [i - 1 for i in layers])
        arrays[f"{prefix}_stats_steps"] = res.hooks["before"]["steps"][:n]
        for i in layers:
            arrays[f"{prefix}_q{i}"] = before[f"q{i - 1}"]  # (T, K, Q)
            arrays[f"{prefix}_dmean{i}"] = changes[f"dmean{i - 1}"]  # (T, K)
            arrays[f"{prefix}_dvar{i}"] = changes[f"dvar{i - 1}"]
            arrays[f"{prefix}_var{i}"] = before[f"var{i - 1}"].mean(-1)  # (T, K) mean over channels
    if "ics" in res.hooks:
        arrays[f"{prefix}_ics_steps"] = res.hooks["ics"]["steps"]
        for key in ("l2", "cos", "g_norm"):
            arrays[f"{prefix}_{key}"] = res.hooks["ics"]["values"][key]  # (T, K, layers)


def _store_fit(arrays: dict[str, np.ndarray], prefix: str, res: train.FitResult) -> None:
    arrays[f"{prefix}_steps"] = res.steps
    arrays[f"{prefix}_train_acc"] = res.train_acc
    arrays[f"{prefix}_test_acc"] = res.test_acc
    arrays[f"{prefix}_train_loss"] = res.train_loss
    arrays[f"{prefix}_test_loss"] = res.test_loss
    arrays[f"{prefix}_diverged"] = res.diverged_step


# ---------------------------------------------------------------- the experiment
def run(cfg: IcsConfig, device: torch.device) -> Outcome:
    """Train every VGG run and the four DLN runs; return headline numbers, arrays and the datasets used."""
    arrays: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    with num_threads(cfg.threads or None if device.type == "cpu" else None):
        ds = vgg_data(cfg, device)
        run_vgg(cfg, ds, device, arrays, timing)
        dln = dln_data(cfg, device)
        run_dln(cfg, dln, device, arrays, timing)
    metrics = summarise(cfg, arrays)
    metrics["timing_s"] = timing
    metrics["train_images"], metrics["test_images"] = len(ds.y_train), len(ds.y_test)
    metrics["dataset_description"] = ds.description
    metrics["dataset"] = DATASET_NAMES.get(ds.name, ds.name)
    metrics["widths"] = [w for w in nets.VGG(ds.input_shape[0], ds.num_classes, widths=cfg.vgg,
                                             width_multiplier=cfg.width_multiplier, norm="none").plan if w != "M"]
    return Outcome(metrics=metrics, arrays=arrays, datasets=[ds.name, dln.name])


def run_vgg(cfg: IcsConfig, ds: data.Dataset, device: torch.device, arrays: dict, timing: dict) -> None:
    """The eight VGG runs of :data:`RUNS` (all seeds of one run in one ``fit`` call)."""
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    layers = stat_layers(cfg)
    for variant, lr_field in RUNS:
        fit_cfg = train.FitConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=getattr(cfg, lr_field),
                                  log_every=cfg.log_every, log_at=paper_steps(cfg))
        hooks: dict[str, train.StepHook] = {}
        if lr_field != "lr_high":
            hooks.update(stat_hooks(layers, cfg.stats_every, cfg.steps))
        if (variant, lr_field) in ICS_RUNS:
            hooks["ics"] = ics_hook(our_layers(cfg, cfg.ics_layers), cfg.ics_every, cfg.steps)
        models = [make_vgg(cfg, variant, ds.input_shape[0], ds.num_classes, s).to(device) for s in seeds]
        res = train.fit(models, ds, fit_cfg, seeds=seeds, hooks=hooks)
        prefix = run_name(variant, lr_field)
        _store_fit(arrays, prefix, res)
        _store_hooks(arrays, prefix, res, layers)
        timing[prefix] = res.train_time_s + res.eval_time_s
        timing[f"{prefix}_hooks"] = res.eval_time_s


def loss_hooks(log_steps: Sequence[int], steps: int) -> dict[str, train.StepHook]:
    """Each model's training loss (its mode, its own batch) at W(t) for t in ``log_steps``: before the
    update t+1, and after the last update for t = ``steps``."""

    def losses(ctx: train.StepContext) -> Tensor:
        return torch.stack([train.model_loss(m, ctx.x[k], ctx.y[k], ctx.cfg.loss) for k, m in enumerate(ctx.models)])

    return {"loss": train.StepHook(losses, at=tuple(t for t in log_steps if t < steps), when="before"),
            "loss_end": train.StepHook(losses, at=(steps,), when="after")}


def run_dln(cfg: IcsConfig, ds: data.Dataset, device: torch.device, arrays: dict, timing: dict) -> None:
    """The 25-layer DLN without and with BN, full-batch gradient descent: one ``fit`` call per variant and
    learning rate, all seeds together.

    The engine trains DLNs from the batch's moments (:class:`bnbook.batching.DeepLinearBatch`), exact
    and in float64; models and data are float64 too, so the measurements are. Before the update of every
    ``dln_every``-th step: Definition 2.1 at ``dln_layers`` and those layers' activation statistics;
    right after that update, the statistics again; the loss every ``dln_log_every`` steps.
    """
    if cfg.dln_loss != "squared_sum":
        raise ValueError("the DLN is trained on the summed squared error (dln_loss='squared_sum')")
    seeds = [cfg.seed + i for i in range(cfg.dln_seeds)]
    ds = dataclasses.replace(ds, x_train=ds.x_train.double(), y_train=ds.y_train.double(),
                             x_test=ds.x_test.double(), y_test=ds.y_test.double())
    log_steps = sorted(set(range(0, cfg.dln_steps, cfg.dln_log_every)) | {cfg.dln_steps})
    for variant in DLN_VARIANTS:
        norm = cfg.dln_norm if variant == "bn" else None
        total = hooks_time = 0.0
        for j, lr in enumerate(cfg.dln_lrs):
            models = [nets.DeepLinear(cfg.dln_dim, cfg.dln_depth, norm=norm, seed=s).to(device).double() for s in seeds]
            fit_cfg = train.FitConfig(steps=cfg.dln_steps, batch_size=cfg.dln_points, lr=lr, loss=cfg.dln_loss,
                                      log_every=cfg.dln_steps)
            hooks = {**stat_hooks(cfg.dln_layers, cfg.dln_every, cfg.dln_steps),
                     "ics": ics_hook(cfg.dln_layers, cfg.dln_every, cfg.dln_steps),
                     **loss_hooks(log_steps, cfg.dln_steps)}
            res = train.fit(models, ds, fit_cfg, seeds=seeds, hooks=hooks)
            p = f"dln_{variant}_{j}"
            _store_hooks(arrays, p, res, cfg.dln_layers)
            losses = np.concatenate([res.hooks["loss"]["values"], res.hooks["loss_end"]["values"]])
            arrays[f"{p}_steps"] = np.concatenate([res.hooks["loss"]["steps"], res.hooks["loss_end"]["steps"]])
            arrays[f"{p}_loss"] = losses / cfg.dln_points  # (L, K) per point
            arrays[f"{p}_diverged"] = res.diverged_step
            total += res.train_time_s + res.eval_time_s
            hooks_time += res.eval_time_s
        timing[f"dln_{variant}"] = total
        timing[f"dln_{variant}_hooks"] = hooks_time


# ---------------------------------------------------------------- headline numbers
def _nanmean(a: Any) -> float | None:
    a = np.asarray(a, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def _nanmedian(a: Any) -> float | None:
    a = np.asarray(a, dtype=float)
    return float(np.nanmedian(a)) if np.isfinite(a).any() else None


def at_step(steps: np.ndarray, values: np.ndarray, step: float) -> tuple[int, np.ndarray]:
    """The recorded step nearest to ``step`` (never step 0, which has no training accuracy) and its values."""
    candidates = np.nonzero(steps > 0)[0]
    i = candidates[int(np.abs(steps[candidates] - step).argmin())]
    return int(steps[i]), values[i]


def seed_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the seed axis (1) ignoring NaN; all-NaN rows (step 0's training accuracy) stay NaN, silently."""
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    count = finite.sum(1)
    total = np.where(finite, v, 0.0).sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def first_step(steps: np.ndarray, curve: np.ndarray, target: float) -> int | None:
    """The first recorded step where ``curve`` (one value per record) reaches ``target``; ``None``: never."""
    hit = np.nonzero(np.nan_to_num(curve, nan=-np.inf) >= target)[0]
    return int(steps[hit[0]]) if len(hit) else None


def summarise(cfg: IcsConfig, a: dict[str, np.ndarray]) -> dict[str, Any]:
    """The chapter's numbers from the raw arrays (everything the prose and the tables quote)."""
    scale = cfg.steps / PAPER["steps"]
    m: dict[str, Any] = {
        "steps": cfg.steps, "seeds": cfg.seeds, "batch_size": cfg.batch_size, "dln_steps": cfg.dln_steps,
        "dln_seeds": cfg.dln_seeds, "conv_layers": conv_layers(cfg), "scale": scale,
        "layers_dist": our_layers(cfg, cfg.dist_layers), "layers_noise": our_layers(cfg, cfg.noise_layers),
        "layers_ics": our_layers(cfg, cfg.ics_layers), "stats_every": cfg.stats_every, "ics_every": cfg.ics_every,
        "dln_every": cfg.dln_every,
    }
    runs: dict[str, dict[str, Any]] = {}
    for variant, lr_field in RUNS:
        p = run_name(variant, lr_field)
        steps, tr, te = a[f"{p}_steps"], a[f"{p}_train_acc"], a[f"{p}_test_acc"]
        early_step, early = at_step(steps, tr, PAPER_EARLY_STEP * scale)
        runs[p] = {
            "lr": getattr(cfg, lr_field), "train_end": _nanmean(tr[-1]), "test_end": _nanmean(te[-1]),
            "test_end_sd": float(np.nanstd(te[-1])) if np.isfinite(te[-1]).any() else None,
            "train_early": _nanmean(early), "early_step": early_step,
            "diverged": int((a[f"{p}_diverged"] >= 0).sum()),
        }
    m["runs"] = runs
    m["early_step"] = runs["bn_lr"]["early_step"]
    m["fig1_rows"] = fig1_rows(m)
    m["fig2_rows"], m["fig2_steps"] = fig2_rows(cfg, a)
    # noisy BN vs BN: steps to the standard net's final training accuracy (mean curves)
    target = runs["standard_lr"]["train_end"]
    m["target_train_acc"] = target
    for v in ("standard", "bn", "noisy_bn"):
        p = run_name(v, "lr")
        m[f"steps_to_target_{v}"] = first_step(a[f"{p}_steps"], seed_mean(a[f"{p}_train_acc"]), target) \
            if target is not None else None
    m["shift"] = shift_summary(cfg, a)
    m["dist"] = distribution_summary(cfg, a)
    m["ics"] = ics_summary(cfg, a)
    m["dln"] = dln_summary(cfg, a)
    return m


def fig1_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Paper-vs-ours rows for Fig. 1 / Appendix A.1 (accuracy at the end and early in training)."""
    rows = []
    for (variant, lr_field, what), paper in PAPER_FIG1.items():
        r = m["runs"][run_name(variant, lr_field)]
        label = {"test_end": "test accuracy, end", "train_end": "training accuracy, end",
                 "train_early": f"training accuracy, step {PAPER_EARLY_STEP:,} (ours: {r['early_step']:,})"}[what]
        rows.append({"net": LABELS[variant], "lr": r["lr"], "what": label, "paper": paper, "ours": r[what]})
    return rows


def fig2_rows(cfg: IcsConfig, a: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[int]]:
    """Fig. 2's training accuracies, paper vs ours at the same fraction of training; and our steps."""
    scale = cfg.steps / PAPER["steps"]
    rows, ours_steps = [], []
    for v in ("standard", "bn", "noisy_bn"):
        p = run_name(v, "lr")
        paper_row: dict[str, Any] = {"net": LABELS[v], "source": f"paper ({PAPER['dataset']})"}
        ours_row: dict[str, Any] = {"net": LABELS[v], "source": "ours"}
        ours_steps = []
        for j, (s, acc) in enumerate(zip(PAPER_FIG2_STEPS, PAPER_FIG2[v])):
            step, values = at_step(a[f"{p}_steps"], a[f"{p}_train_acc"], s * scale)
            ours_steps.append(step)
            paper_row[f"c{j}"], ours_row[f"c{j}"] = acc, _nanmean(values)
        rows += [paper_row, ours_row]
    return rows, ours_steps


def distribution_summary(cfg: IcsConfig, a: dict[str, np.ndarray]) -> dict[str, Any]:
    """Figs. 1c and 2 in numbers: the 5–95 % spread of each layer's values at the first and the last record,
    and the range its median covers during training (means over seeds), per run at ``lr``."""
    qs = list(ics.QUANTILES)
    lo, mid, hi = qs.index(0.05), qs.index(0.5), qs.index(0.95)
    out: dict[str, Any] = {}
    for v in ("standard", "bn", "noisy_bn"):
        p = run_name(v, "lr")
        out[p] = {}
        for i in stat_layers(cfg):
            q = a[f"{p}_q{i}"]  # (T, K, Q)
            spread = q[..., hi] - q[..., lo]
            out[p][str(i)] = {"spread_start": _nanmean(spread[0]), "spread_end": _nanmean(spread[-1]),
                              "median_range": _nanmean(np.nanmax(q[..., mid], 0) - np.nanmin(q[..., mid], 0))}
    return out


def shift_summary(cfg: IcsConfig, a: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fig. 8 and Ioffe's sense: mean over steps and seeds of |Δμ| and |Δσ²| across one update, per run and layer."""
    out: dict[str, Any] = {}
    for variant, lr_field in RUNS:
        p = run_name(variant, lr_field)
        if f"{p}_stats_steps" not in a:
            continue
        out[p] = {str(i): {"dmean": _nanmean(a[f"{p}_dmean{i}"]), "dvar": _nanmean(a[f"{p}_dvar{i}"])}
                  for i in stat_layers(cfg)}
    for i in our_layers(cfg, cfg.noise_layers):
        k = str(i)
        std = out["standard_lr"][k]
        for v in ("bn", "noisy_bn", "noise"):
            for key in ("dmean", "dvar"):
                x, base = out[f"{v}_lr"][k][key], std[key]
                out[f"{v}_lr"][k][f"{key}_vs_standard"] = x / base if x is not None and base else None
    return out


def ics_summary(cfg: IcsConfig, a: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fig. 3a: median over measured steps and seeds of ‖G − G′‖, cos(G, G′), ‖G′−G‖/‖G‖, per run and layer."""
    out: dict[str, Any] = {}
    for variant, lr_field in sorted(ICS_RUNS):
        p = run_name(variant, lr_field)
        out[p] = _ics_medians(a, p, our_layers(cfg, cfg.ics_layers))
    for lr_field in ("lr", "lr_low"):
        for j, layer in enumerate(our_layers(cfg, cfg.ics_layers)):
            s, b = out[f"standard_{lr_field}"][str(layer)], out[f"bn_{lr_field}"][str(layer)]
            b["l2_vs_standard"] = b["l2"] / s["l2"] if b["l2"] is not None and s["l2"] else None
    return out


def _ics_medians(a: dict[str, np.ndarray], p: str, layers: Sequence[int]) -> dict[str, Any]:
    l2, cos, g = a[f"{p}_l2"], a[f"{p}_cos"], a[f"{p}_g_norm"]
    with np.errstate(all="ignore"):
        rel = l2 / g
    return {str(layer): {"l2": _nanmedian(l2[..., j]), "cos": _nanmedian(cos[..., j]), "rel": _nanmedian(rel[..., j]),
                         "cos_min": float(np.nanmin(cos[..., j])) if np.isfinite(cos[..., j]).any() else None,
                         "aligned": float(np.mean(cos[..., j] > ALIGNED))}
            for j, layer in enumerate(layers)}


ALIGNED = 0.9
"""cos(G, G′) above this counts as 'G′ points where G points' (the share of measured steps and seeds is reported)."""


def dln_summary(cfg: IcsConfig, a: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fig. 3b: the DLN's training loss per point (at the start and the end) and the Definition 2.1 medians,
    per variant and lr."""
    out: dict[str, Any] = {}
    for v in DLN_VARIANTS:
        for j, lr in enumerate(cfg.dln_lrs):
            p = f"dln_{v}_{j}"
            loss = a[f"{p}_loss"]  # (L, seeds) per point
            out[p] = {"lr": lr, "loss_start": _nanmean(loss[0]), "loss_end": _nanmean(loss[-1]),
                      "diverged": int((a[f"{p}_diverged"] >= 0).sum()), **_ics_medians(a, p, cfg.dln_layers)}
            first = a[f"{p}_l2"][0]  # step 0: the same initial weights at both learning rates
            out[p]["l2_step0"] = _nanmean(first[..., 0])
    for layer in cfg.dln_layers:
        for v in DLN_VARIANTS:
            hi, lo = out[f"dln_{v}_0"], out[f"dln_{v}_1"]
            hi_l2, lo_l2 = a[f"dln_{v}_0_l2"][0], a[f"dln_{v}_1_l2"][0]
            j = list(cfg.dln_layers).index(layer)
            with np.errstate(all="ignore"):
                hi[str(layer)]["l2_ratio_step0"] = _nanmean(hi_l2[..., j] / lo_l2[..., j])
    return out


# ---------------------------------------------------------------- tables
def ours_label(m: dict[str, Any], dln: bool = False) -> str:
    """'ours (dataset, widths, steps)' for a table header (and the DLN's scale with ``dln``)."""
    text = f"ours ({m['dataset']} 32×32, widths {'-'.join(map(str, m['widths']))}, {m['steps']:,} steps"
    return text + (f"; DLN 10×10, {m['dln_steps']:,} steps)" if dln else ")")


def open_choices(c: dict[str, Any], m: dict[str, Any]) -> list[dict[str, str]]:
    """What the paper leaves open or what the machine forced, and our choice (rows for a table)."""
    widths = "-".join(str(w) for w in m["widths"])
    return [
        {"what": "which VGG", "ours": f"{c['vgg']} ({m['conv_layers']} convs, widths {widths}), conv → BN → ReLU, "
         "global average pooling, one linear read-out, Glorot-uniform init",
         "why": "the paper says only 'VGG-like'; its labels reach #13 (VGG-16); the quick profile narrows the net to fit "
                "a 2-core CPU; the paper profile uses VGG-16 at full width"},
        {"what": "data", "ours": f"{m['dataset_description']}; {m['train_images']:,} training and "
                                 f"{m['test_images']:,} test images used",
         "why": "CIFAR-10 needs a download; Fashion-MNIST ships with the machine"},
        {"what": "layer labels", "ours": f"the paper's #k of {c['paper_depth']} ↦ our layer at the same relative depth",
         "why": "our net has a different depth"},
        {"what": "noise: r_σ in N(σ, r_σ)", "ours": "a standard deviation", "why": "the paper does not say"},
        {"what": "noise in conv layers", "ours": "one draw of m, s per sample, channel and position",
         "why": "the paper: height and width count as batch dimensions"},
        {"what": "activation statistics", "ours": "per channel over batch and positions, on the training batch, "
         "in training mode; change = after − before one update on the same batch",
         "why": "Fig. 8 does not say which batch; the same batch isolates the update's effect"},
        {"what": "a 'layer' in Definition 2.1", "ours": "a conv kernel or weight matrix W_i; 'earlier layers' move "
         "all their parameters (weights, biases, γ, β); G, G′ from one batch, same noise",
         "why": "the definition names W_i only"},
        {"what": "DLN loss", "ours": "squared error summed over the 1,000 points",
         "why": "with the mean, lr 1e-6 barely moves the loss in 10,000 steps"},
        {"what": "DLN with BN", "ours": "BN after each of the first 24 matrices, none after the output matrix",
         "why": "the paper does not say where"},
    ]


def shift_rows(cfg: IcsConfig, m: dict[str, Any]) -> list[dict[str, Any]]:
    """Fig. 8 in numbers: mean |Δμ| and |Δσ²| across one update, per variant and layer."""
    rows = []
    for v in ("standard", "bn", "noisy_bn", "noise"):
        for paper_label, i in zip(cfg.noise_layers, m["layers_noise"]):
            s = m["shift"][f"{v}_lr"][str(i)]
            rows.append({"net": LABELS[v], "layer": f"#{paper_label} (ours {i})", "dmean": s["dmean"],
                         "dvar": s["dvar"], "dmean_x": s.get("dmean_vs_standard"), "dvar_x": s.get("dvar_vs_standard")})
    return rows


def both_measures_rows(cfg: IcsConfig, m: dict[str, Any]) -> list[dict[str, Any]]:
    """The two senses of ICS on the same VGG runs: distribution change (Ioffe) and gradient change (Santurkar)."""
    rows = []
    for lr_field in ("lr", "lr_low"):
        for v in ("standard", "bn"):
            p = run_name(v, lr_field)
            for paper_label, i in zip(cfg.ics_layers, m["layers_ics"]):
                sh, g = m["shift"][p][str(i)], m["ics"][p][str(i)]
                rows.append({"net": LABELS[v], "lr": getattr(cfg, lr_field), "layer": f"#{paper_label} (ours {i})",
                             "dmean": sh["dmean"], "dvar": sh["dvar"], "l2": g["l2"], "rel": g["rel"], "cos": g["cos"]})
    return rows


def dln_rows(cfg: IcsConfig, m: dict[str, Any]) -> list[dict[str, Any]]:
    """Fig. 3b in numbers: per DLN variant and lr, the training loss and the medians of Definition 2.1."""
    rows = []
    for v in DLN_VARIANTS:
        for j, lr in enumerate(cfg.dln_lrs):
            d = m["dln"][f"dln_{v}_{j}"]
            for layer in cfg.dln_layers:
                g = d[str(layer)]
                rows.append({"net": "DLN" + (" + BN" if v == "bn" else ""), "lr": lr, "layer": f"#{layer}",
                             "loss_start": d["loss_start"], "loss_end": d["loss_end"], "l2": g["l2"], "rel": g["rel"],
                             "cos": g["cos"]})
    return rows


def _agreement(flags: Sequence[bool]) -> str:
    """'yes' if every case agrees, 'partly' if some do, 'no' if none."""
    return "yes" if all(flags) else ("partly" if any(flags) else "no")


CHANCE_MARGIN = 0.1
"""A network 'does not train' if its final training accuracy is below chance + this margin."""


def findings_rows(cfg: IcsConfig, m: dict[str, Any]) -> list[dict[str, str]]:
    """The paper's qualitative findings of §2 (B.1, B.2) beside our numbers, with a computed 'same direction?'."""
    r, ics_m, d = m["runs"], m["ics"], m["dln"]
    chance = 1 / 10 + CHANCE_MARGIN
    rows = []
    std_high, bn_high = r["standard_lr_high"]["train_end"], r["bn_lr_high"]["train_end"]
    rows.append({"finding": f"Fig. 1: at lr {cfg.lr_high:g} the standard net stays near chance, the BN net trains",
                 "ours": f"final training accuracy {_fmt(std_high, '.2f')} vs {_fmt(bn_high, '.2f')}",
                 "agrees": _agreement([_lt(std_high, chance), _lt(chance, bn_high)])})
    noisy, bn, std, noise = (r[f"{v}_lr"]["train_end"] for v in ("noisy_bn", "bn", "standard", "noise"))
    layers = [str(i) for i in m["layers_noise"]]
    x_noisy = [m["shift"]["noisy_bn_lr"][i]["dmean_vs_standard"] for i in layers]
    rows.append({"finding": "Fig. 2, 8: noisy BN has less stable distributions than the standard net, yet trains "
                            "nearly as well as BN and better than the standard net",
                 "ours": f"|Δμ| ×{_range_text(x_noisy, '.3g')} the standard net's; final training accuracy "
                         f"{_fmt(noisy, '.2f')} (noisy BN), {_fmt(bn, '.2f')} (BN), {_fmt(std, '.2f')} (standard)",
                 "agrees": _agreement([all(_lt(1, x) for x in x_noisy), _lt(std, noisy)])})
    # "stops it from training": less than half of the standard net's gain over chance (0.1)
    halfway = None if std is None else 0.1 + (std - 0.1) / 2
    rows.append({"finding": "the same noise without BN stops the standard net from training",
                 "ours": f"final training accuracy {_fmt(noise, '.2f')} (standard net without noise: {_fmt(std, '.2f')})",
                 "agrees": _agreement([_lt(noise, halfway)])})
    ratios = [ics_m[f"bn_{lr}"][str(i)]["l2_vs_standard"] for lr in ("lr", "lr_low") for i in m["layers_ics"]]
    rows.append({"finding": "Fig. 3a: the BN VGG's ‖G − G′‖ is similar to or larger than the standard VGG's",
                 "ours": f"BN ÷ standard, median over steps: {_range_text(ratios, '.3g')} (2 lrs × 2 layers)",
                 "agrees": _agreement([_lt(0.8, x) for x in ratios])})
    cos_pairs = [(ics_m[f"bn_{lr}"][str(i)]["cos"], ics_m[f"standard_{lr}"][str(i)]["cos"])
                 for lr in ("lr", "lr_low") for i in m["layers_ics"]]
    rows.append({"finding": "Fig. 3a: BN does not bring cos(G, G′) closer to 1",
                 "ours": "median cos with BN / without: " + ", ".join(f"{_fmt(b, '.2f')}/{_fmt(s_, '.2f')}"
                                                                      for b, s_ in cos_pairs),
                 "agrees": _agreement([_lt(b, s_ + 0.02) for b, s_ in cos_pairs])})
    dl = [str(i) for i in cfg.dln_layers]
    std_cos = [d[f"dln_standard_{j}"][i]["cos"] for j in range(len(cfg.dln_lrs)) for i in dl]
    bn_cos = [d[f"dln_bn_{j}"][i]["cos"] for j in range(len(cfg.dln_lrs)) for i in dl]
    rows.append({"finding": "Fig. 3b: the standard DLN has almost no ICS (cos(G, G′) ≈ 1)",
                 "ours": f"median cos {_range_text(std_cos, '.2f')} (2 lrs × 2 layers)",
                 "agrees": _agreement([_lt(0.9, c) for c in std_cos])})
    rows.append({"finding": "Fig. 3b: with BN, G and G′ of the DLN are almost uncorrelated",
                 "ours": f"median cos {_range_text(bn_cos, '.2f')}",
                 "agrees": _agreement([c is not None and abs(c) < 0.5 for c in bn_cos])})
    losses = [(d[f"dln_bn_{j}"]["loss_end"], d[f"dln_standard_{j}"]["loss_end"]) for j in range(len(cfg.dln_lrs))]
    rows.append({"finding": "Fig. 3b: the BN DLN still reaches a lower training loss",
                 "ours": "final loss per point, BN / standard: " + ", ".join(
                     f"{_fmt(b, '.3g')}/{_fmt(s_, '.3g')} (lr {lr:g})" for (b, s_), lr in zip(losses, cfg.dln_lrs)),
                 "agrees": _agreement([_lt(b, s_) for b, s_ in losses])})
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _lt(a: float | None, b: float | None) -> bool:
    """a < b, False when either is missing (a diverged run)."""
    return a is not None and b is not None and a < b


# ---------------------------------------------------------------- figures
def _steps(res: Result, p: str) -> np.ndarray:
    return res.arrays[f"{p}_steps"]


def figure_accuracy(res: Result, lr_fields: Sequence[str] = ("lr", "lr_high")):
    """Fig. 1(a, b): training and test accuracy of the standard and the BN VGG at two learning rates (seed bands)."""
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    a, c = res.arrays, res.config
    fig, axes = plt.subplots(2, len(lr_fields), figsize=(4.2 * len(lr_fields), 5.6), sharex=True, sharey="row",
                             squeeze=False)
    for col, lr_field in enumerate(lr_fields):
        for v in ("standard", "bn"):
            p = run_name(v, lr_field)
            seed_band(axes[0, col], _steps(res, p), a[f"{p}_train_acc"], COLORS[v], LABELS[v])
            seed_band(axes[1, col], _steps(res, p), a[f"{p}_test_acc"], COLORS[v], LABELS[v])
        axes[0, col].set_title(f"lr {c[lr_field]:g}")
        axes[1, col].set_xlabel("training step")
    axes[0, 0].set_ylabel("training accuracy\n(batches, training mode)")
    axes[1, 0].set_ylabel("test accuracy")
    for ax in axes.flat:
        ax.set_ylim(0, 1)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _quantile_band(ax, steps: np.ndarray, q: np.ndarray, color: str) -> None:
    """Nested bands between symmetric quantiles (outermost lightest) and the median as a line; q: (T, Q)."""
    n = q.shape[1]
    for j in range(n // 2):
        ax.fill_between(steps, q[:, j], q[:, n - 1 - j], color=color, alpha=0.15 + 0.12 * j, lw=0)
    ax.plot(steps, q[:, n // 2], color=color, lw=1.2)


def figure_distributions(res: Result, variants: Sequence[str], layers: Sequence[int], paper_labels: Sequence[int],
                         lr_field: str = "lr", seed_index: int = 0):
    """Activation distributions over training: quantile bands of each layer's ReLU input (one model per variant)."""
    import matplotlib.pyplot as plt

    from bnbook import ics as measures

    a = res.arrays
    fig, axes = plt.subplots(len(variants), len(layers), figsize=(3.3 * len(layers), 2.4 * len(variants)),
                             sharex=True, squeeze=False)
    qs = measures.QUANTILES
    for r, v in enumerate(variants):
        p = run_name(v, lr_field)
        for col, (i, label) in enumerate(zip(layers, paper_labels)):
            ax = axes[r, col]
            _quantile_band(ax, a[f"{p}_stats_steps"], a[f"{p}_q{i}"][:, seed_index], COLORS[v])
            ax.set_title(f"{LABELS[v]}, layer #{label} (ours {i})", fontsize=8.5)
        axes[r, 0].set_ylabel("ReLU input")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    fig.suptitle(f"quantiles {', '.join(f'{q:g}' for q in qs)} (bands) and median (line)", fontsize=8.5)
    fig.tight_layout()
    return fig


def figure_noisy_accuracy(res: Result):
    """Fig. 2's accuracy panel: standard, BN, noisy BN and noise without BN (seed bands), training and test."""
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    a = res.arrays
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.4), sharey=True)
    for v in ("standard", "bn", "noisy_bn", "noise"):
        p = run_name(v, "lr")
        seed_band(axes[0], _steps(res, p), a[f"{p}_train_acc"], COLORS[v], LABELS[v])
        seed_band(axes[1], _steps(res, p), a[f"{p}_test_acc"], COLORS[v], LABELS[v])
    axes[0].set_ylabel("accuracy")
    axes[0].set_title("training (batches, training mode)", fontsize=9)
    axes[1].set_title("test (inference mode: no noise)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    return fig


def figure_step_changes(res: Result, layers: Sequence[int], paper_labels: Sequence[int]):
    """Fig. 8: |μ_after − μ_before| and |σ²_after − σ²_before| across one update, per layer (mean over channels)."""
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    a = res.arrays
    fig, axes = plt.subplots(2, len(layers), figsize=(3.3 * len(layers), 4.8), sharex=True, squeeze=False)
    for col, (i, label) in enumerate(zip(layers, paper_labels)):
        for v in ("standard", "bn", "noisy_bn"):
            p = run_name(v, "lr")
            steps = a[f"{p}_stats_steps"]
            seed_band(axes[0, col], steps, np.maximum(a[f"{p}_dmean{i}"], 1e-12), COLORS[v], LABELS[v])
            seed_band(axes[1, col], steps, np.maximum(a[f"{p}_dvar{i}"], 1e-12), COLORS[v], LABELS[v])
        axes[0, col].set_title(f"layer #{label} (ours {i})", fontsize=9)
        axes[1, col].set_xlabel("training step")
        for ax in axes[:, col]:
            ax.set_yscale("log")
    axes[0, 0].set_ylabel(r"$|\mu_{t+1}-\mu_t|$")
    axes[1, 0].set_ylabel(r"$|\sigma^2_{t+1}-\sigma^2_t|$")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def figure_gradient_change(res: Result, prefixes: Sequence[Sequence[str]], titles: Sequence[str],
                           layers: Sequence[int], layer_labels: Sequence[str], left: str):
    """Fig. 3: per column (one learning rate), the training curve and ‖G − G′‖₂, cos(G, G′) of two layers.

    ``prefixes[r]`` holds the run prefixes of column r as (standard, BN); ``left`` is ``"acc"`` (VGG:
    training accuracy) or ``"loss"`` (DLN: training loss per point, log scale).
    """
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    a = res.arrays
    n = 1 + 2 * len(layers)
    # one column per learning rate, one row per quantity: two narrow columns stay readable in a text column
    fig, axes = plt.subplots(n, len(prefixes), figsize=(3.4 * len(prefixes), 2.0 * n), squeeze=False, sharex="col")
    for r, (row, title) in enumerate(zip(prefixes, titles)):
        for p, v in zip(row, ("standard", "bn")):
            label = LABELS[v] if left == "acc" else ("DLN" if v == "standard" else "DLN + BN")
            curve = a[f"{p}_train_acc"] if left == "acc" else a[f"{p}_loss"]
            seed_band(axes[0, r], a[f"{p}_steps"], curve, COLORS[v], label)
            steps = a[f"{p}_ics_steps"]
            for j in range(len(layers)):
                seed_band(axes[1 + 2 * j, r], steps, a[f"{p}_l2"][..., j], COLORS[v], label)
                seed_band(axes[2 + 2 * j, r], steps, a[f"{p}_cos"][..., j], COLORS[v], label)
        axes[0, r].set_title(title, fontsize=10)
        if left == "acc":
            axes[0, r].set_ylim(0, 1)
        else:
            axes[0, r].set_yscale("log")
        for j in range(len(layers)):
            axes[1 + 2 * j, r].set_yscale("log")
            axes[2 + 2 * j, r].set_ylim(-1.05, 1.05)
        axes[-1, r].set_xlabel("training step")
    axes[0, 0].set_ylabel("training accuracy" if left == "acc" else "training loss\nper point", fontsize=9)
    for j, name in enumerate(layer_labels):
        axes[1 + 2 * j, 0].set_ylabel(f"{name}:\n$\\|G-G'\\|_2$", fontsize=9)
        axes[2 + 2 * j, 0].set_ylabel(f"{name}:\n$\\cos(G, G')$", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- exercises
def noise_shift_prediction(n_mu: float = 0.5, n_sigma: float = 1.25, grid: int = 1_000) -> dict[str, float]:
    """Expected per-channel |Δμ| and |Δσ²| across one update behind noisy BN, if γ and β stayed put.

    Behind BN a channel has batch mean β and variance ≈ γ²; Algorithm 1 shifts it by about
    μ_t ~ U(−n_μ, n_μ) and scales it by about σ_t ~ U(1, n_σ), drawn afresh each step. With
    γ = 1, β = 0: E|μ_{t+1} − μ_t| = 2n_μ/3, and the variance σ_t² (plus the constants r_σ²
    and r_μ²/3, which cancel in the difference) gives E|σ²_{t+1} − σ²_t| — here by the
    midpoint rule on a ``grid``×``grid`` lattice.
    """
    s = 1 + (n_sigma - 1) * (np.arange(grid) + 0.5) / grid
    v = s**2
    return {"dmean": 2 * n_mu / 3, "dvar": float(np.abs(v[:, None] - v[None, :]).mean())}


# ---------------------------------------------------------------- numbers for the prose
def readable(x: float) -> str:
    """A ratio or magnitude for prose: thousands separators from 100 up, three significant digits below."""
    return f"{x:,.0f}" if abs(x) >= 100 else format(x, ".3g")


def _range_text(values: Sequence[float | None], spec: str) -> str:
    """'a–b' over the finite values (or the single value), '—' if none; ``spec`` "auto" means :func:`readable`."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "—"
    lo, hi = min(v), max(v)
    f = readable if spec == "auto" else (lambda x: format(x, spec))
    a, b = f(lo).replace("-", "−"), f(hi).replace("-", "−")
    return a if a == b else f"{a} to {b}" if lo < 0 else f"{a}–{b}"


def _effect(ratio: float | None) -> str:
    """How BN changes a measure, from the ratio BN ÷ standard: below 1/2, within a factor 2, above 2."""
    if ratio is None or not np.isfinite(ratio):
        return "cannot be compared"
    return "reduces it" if ratio < 0.5 else ("leaves it about the same" if ratio <= 2 else "increases it")


def verdicts(c: dict[str, Any], m: dict[str, Any]) -> dict[str, str]:
    """One clause per sense of ICS and learning rate: what BN does to it on these runs (median over Fig. 3's layers).

    ``c`` is the result's config (a dict); Ioffe's sense is the channel-mean change, Santurkar's ‖G − G′‖.
    """
    out = {}
    for sense in ("ioffe", "santurkar"):
        parts = []
        for lr_field in ("lr", "lr_low"):
            ratios = []
            for i in m["layers_ics"]:
                if sense == "ioffe":
                    b, s_ = m["shift"][f"bn_{lr_field}"][str(i)]["dmean"], m["shift"][f"standard_{lr_field}"][str(i)]["dmean"]
                    ratios.append(b / s_ if b is not None and s_ else None)
                else:
                    ratios.append(m["ics"][f"bn_{lr_field}"][str(i)]["l2_vs_standard"])
            finite = [x for x in ratios if x is not None and np.isfinite(x)]
            mid = float(np.median(finite)) if finite else None
            parts.append(f"at lr {c[lr_field]:g} BN {_effect(mid)} (BN ÷ standard: {_range_text(ratios, 'auto')})")
        out[sense] = "; ".join(parts)
    return out


def prose_values(res: Result) -> dict[str, tuple[Any, str]]:
    """Every number the chapter's prose quotes: name -> (value, format spec), all from the result file."""
    m, c = res.metrics, res.config
    r = m["runs"]
    env = res.record["environment"]
    la, lb = m["layers_ics"]
    v: dict[str, tuple[Any, str]] = {
        "profile": (c["profile"], ""), "steps": (c["steps"], ","), "seeds": (c["seeds"], "d"),
        "batch": (c["batch_size"], "d"), "n_train": (m["train_images"], ","), "n_test": (m["test_images"], ","),
        "widths": ("-".join(str(w) for w in m["widths"]), ""), "vgg": (c["vgg"], ""), "n_conv": (m["conv_layers"], "d"),
        "lr": (c["lr"], "g"), "lr_high": (c["lr_high"], "g"), "lr_low": (c["lr_low"], "g"),
        "dln_steps": (c["dln_steps"], ","), "dln_seeds": (c["dln_seeds"], "d"), "dln_points": (c["dln_points"], ","),
        "dln_lr_hi": (c["dln_lrs"][0], "g"), "dln_lr_lo": (c["dln_lrs"][1], "g"),
        "stats_every": (c["stats_every"], "d"), "ics_every": (c["ics_every"], "d"), "dln_every": (c["dln_every"], "d"),
        "early_step": (m["early_step"], ","), "paper_early_step": (PAPER_EARLY_STEP, ","),
        "runtime": (res.record["runtime_s"], ".0f"),
        "machine": (f"{env['device']} ({env['device_name']}, {env['cpu_count']} cores, "
                    + ("1 training thread)" if (c['threads'] or env['torch_threads']) == 1
                       else f"{c['threads'] or env['torch_threads']} training threads)"), ""),
        "width_mult": (c["width_multiplier"], "g"),
    }
    for p, name in (("standard_lr", "std"), ("bn_lr", "bn"), ("noisy_bn_lr", "noisy"), ("noise_lr", "noise"),
                    ("standard_lr_high", "std_high"), ("bn_lr_high", "bn_high"), ("standard_lr_low", "std_low"),
                    ("bn_lr_low", "bn_low")):
        v[f"test_{name}"] = (r[p]["test_end"], ".3f")
        v[f"test_sd_{name}"] = (r[p]["test_end_sd"], ".3f")
        v[f"train_{name}"] = (r[p]["train_end"], ".3f")
        v[f"early_{name}"] = (r[p]["train_early"], ".3f")
        v[f"div_{name}"] = (r[p]["diverged"], "d")
    v["target"] = (m["target_train_acc"], ".3f")
    for name in ("standard", "bn", "noisy_bn"):
        step = m[f"steps_to_target_{name}"]
        v[f"to_target_{name}"] = (f"at step {step:,}" if step is not None else f"not within {c['steps']:,} steps", "")
    # Fig. 8: noisy BN's and BN's shift relative to the standard net's, over the three layers
    sh = m["shift"]
    noise_layers = [str(i) for i in m["layers_noise"]]
    for name, p in (("noisy", "noisy_bn_lr"), ("bn", "bn_lr"), ("noise", "noise_lr")):
        for key in ("dmean", "dvar"):
            v[f"{name}_{key}_x"] = (_range_text([sh[p][i][f"{key}_vs_standard"] for i in noise_layers], "auto"), "")
            v[f"{name}_{key}"] = (_range_text([sh[p][i][key] for i in noise_layers], ".3f"), "")
    for key in ("dmean", "dvar"):
        v[f"std_{key}"] = (_range_text([sh["standard_lr"][i][key] for i in noise_layers], ".2g"), "")
    pred = noise_shift_prediction()
    v["pred_dmean"], v["pred_dvar"] = (pred["dmean"], ".3f"), (pred["dvar"], ".3f")
    # the two senses of ICS on the same runs, at Fig. 3's layers
    for lr_field, tag in (("lr", ""), ("lr_low", "_low")):
        for layer, ab in ((la, "a"), (lb, "b")):
            s_std, s_bn = sh[f"standard_{lr_field}"][str(layer)], sh[f"bn_{lr_field}"][str(layer)]
            g_std, g_bn = m["ics"][f"standard_{lr_field}"][str(layer)], m["ics"][f"bn_{lr_field}"][str(layer)]
            ratio = s_bn["dmean"] / s_std["dmean"] if s_std["dmean"] else None
            v[f"ioffe_x{tag}_{ab}"] = (ratio, ".2g")
            v[f"l2_x{tag}_{ab}"] = (g_bn["l2_vs_standard"], ".2g")
            v[f"cos_std{tag}_{ab}"] = (g_std["cos"], ".2f")
            v[f"cos_bn{tag}_{ab}"] = (g_bn["cos"], ".2f")
            v[f"rel_std{tag}_{ab}"] = (g_std["rel"], ".2g")
            v[f"rel_bn{tag}_{ab}"] = (g_bn["rel"], ".2g")
    for sense, text in verdicts(c, m).items():
        v[f"verdict_{sense}"] = (text, "")
    v["layer_a"], v["layer_b"] = (la, "d"), (lb, "d")
    v["paper_a"], v["paper_b"] = (c["ics_layers"][0], "d"), (c["ics_layers"][1], "d")
    # the DLN
    d = m["dln"]
    dl = [str(i) for i in c["dln_layers"]]
    for name in DLN_VARIANTS:
        for j, tag in ((0, "hi"), (1, "lo")):
            p = f"dln_{name}_{j}"
            v[f"dln_{name}_loss0_{tag}"] = (d[p]["loss_start"], ".3g")
            v[f"dln_{name}_loss_{tag}"] = (d[p]["loss_end"], ".3g")
            v[f"dln_{name}_cos_{tag}"] = (_range_text([d[p][i]["cos"] for i in dl], ".2f"), "")
            v[f"dln_{name}_rel_{tag}"] = (_range_text([d[p][i]["rel"] for i in dl], ".2g"), "")
        v[f"dln_{name}_ratio0"] = (_range_text([d[f"dln_{name}_0"][i]["l2_ratio_step0"] for i in dl], ".3g"), "")
    for name, p in (("std", "standard_lr"), ("bn", "bn_lr"), ("noisy", "noisy_bn_lr")):
        for layer, ab in zip(m["layers_dist"], "ab"):
            dd = m["dist"][p][str(layer)]
            v[f"spread0_{name}_{ab}"] = (dd["spread_start"], ".2f")
            v[f"spread1_{name}_{ab}"] = (dd["spread_end"], ".2f")
            v[f"medrange_{name}_{ab}"] = (dd["median_range"], ".2f")
    v["dist_a"], v["dist_b"] = (m["layers_dist"][0], "d"), (m["layers_dist"][1], "d")
    v["paper_dist_a"], v["paper_dist_b"] = (c["dist_layers"][0], "d"), (c["dist_layers"][1], "d")
    for name in DLN_VARIANTS:
        for j, tag in ((0, "hi"), (1, "lo")):
            p = f"dln_{name}_{j}"
            v[f"dln_{name}_aligned_{tag}"] = (100 * float(np.mean([d[p][i]["aligned"] for i in dl])), ".0f")
    v["aligned"] = (ALIGNED, "g")
    # cost of Definition 2.1
    t = m["timing_s"]
    measured = len(range(0, c["steps"], c["ics_every"]))
    v["ics_passes"] = (measured * (1 + len(c["ics_layers"])) * c["seeds"], ",")
    v["ics_measured"] = (measured, ",")
    v["train_passes"] = (c["steps"] * c["seeds"], ",")
    v["ics_share"] = (100 * measured * (1 + len(c["ics_layers"])) / c["steps"], ".0f")
    hooks = sum(val for k, val in t.items() if k.endswith("_hooks"))
    total = sum(val for k, val in t.items() if not k.endswith("_hooks"))
    v["hook_time"], v["train_time"] = (hooks, ".0f"), (total - hooks, ".0f")
    return v
