"""Chapter 3, Ioffe & Szegedy's MNIST experiment (§4.1, Fig. 1), with seed bands.

A 784–100–100–100–10 MLP with sigmoid hidden units is trained with and without BN before
each sigmoid, batch 60, under ``seeds`` seeds each. The engine (:func:`bnbook.train.fit`)
records test accuracy and the {15, 50, 85}th percentiles of one last-layer sigmoid's input
over training; the final models are scored by per-class ROC curves and AUCs. The BN and
no-BN nets of seed ``i`` start from the same weights and see the same batches, so a pair
differs only in BN (and in the plain net's hidden biases, which start at zero).

Everything the paper leaves open is a field of :class:`IoffeConfig`, with the choice and
its reason in the comment.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import numpy as np
import torch

from bnbook import data, nets, norms, train
from bnbook.config import ChapterConfig
from bnbook.env import num_threads
from bnbook.results import Outcome, Result

VARIANTS = ("no_bn", "bn")
LABELS = {"no_bn": "without BN", "bn": "with BN"}

REFERENCE_ACC: dict[str, dict[int, float]] = {
    # Read off the paper's Fig. 1(a) (vector paths of the arXiv v3 PDF, ±1-2 % of the axis):
    # shared/reference/papers.md §A.6. The no-BN curve ends at ~44K steps, the BN one at ~49K;
    # both "end" values are filed under 50,000 here.
    "no_bn": {10_000: 0.926, 20_000: 0.963, 30_000: 0.968, 40_000: 0.972, 50_000: 0.972},
    "bn": {10_000: 0.966, 20_000: 0.975, 30_000: 0.978, 40_000: 0.980, 50_000: 0.982},
}
"""Test accuracy vs step in Ioffe & Szegedy's Fig. 1(a), as read off the figure (not printed numbers)."""

REFERENCE_PERCENTILES: dict[str, dict[str, tuple[float, float, float]]] = {
    # Read off Fig. 1(b, c) (papers.md §A.6): (15th, 50th, 85th) percentile of the sigmoid input.
    "no_bn": {"start": (0.8, 0.8, 0.8), "end": (-1.85, 0.0, 1.7)},
    "bn": {"start": (-1.05, 0.0, 1.25), "end": (-1.95, 0.0, 1.97)},
}
"""Percentiles at the start and the end of training in the paper's Fig. 1(b, c), as read off the figure."""

QUANTILES = (15, 50, 85)


@dataclasses.dataclass(frozen=True)
class IoffeConfig(ChapterConfig):
    """Ioffe & Szegedy §4.1. Defaults are the ``quick`` profile; the protocol's fixed parts are marked."""

    dataset: str = "mnist5k"  # offline MNIST subset (4,000 train / 1,000 test); 'mnist' in the paper profile
    steps: int = 10_000  # the paper trains 50,000 steps; quick stops at the first reference point
    seeds: int = 5  # models per variant: seeds seed, seed+1, ... (bands over seeds)
    batch_size: int = 60  # protocol: 60 examples per mini-batch
    width: int = 100  # protocol: 3 hidden layers of 100 sigmoid units
    depth: int = 3
    optimizer: str = "sgd"  # open: the paper names SGD in Algorithm 2, no optimiser in §4.1
    lr: float = 0.1  # open: constant; the largest of {0.1, 0.5, 2} at which no-BN still starts slowly
    init_std: float = 0.05  # open: "small random Gaussian values"; N(0, 0.05²)
    eps: float = 1e-5  # open: BN's ε; PyTorch's default
    bn_momentum: float = 0.1  # open: running averages for inference (PyTorch's default weight of a new batch)
    log_every: int = 100  # record test accuracy and the percentiles every this many steps
    probe_unit: int = 0  # which sigmoid of the last hidden layer Fig. 1(b, c) follows
    probe_size: int = 1_000  # fixed probe batch: the first test images
    threads: int = 1  # CPU threads (one is faster than two for these small matrix products)

    profiles: ClassVar = {
        "smoke": {"steps": 60, "seeds": 2, "log_every": 20, "probe_size": 200},
        "paper": {"dataset": "mnist", "steps": 50_000, "seeds": 10, "log_every": 500},
    }


def make_models(cfg: IoffeConfig, bn: bool, in_features: int, num_classes: int, device: torch.device) -> list[nets.MLP]:
    """The ``cfg.seeds`` MLPs of one variant, initialised from seeds ``cfg.seed``, ``cfg.seed + 1``, ..."""
    norm = functools.partial(norms.BatchNorm, eps=cfg.eps, momentum=cfg.bn_momentum) if bn else None
    return [
        nets.MLP(in_features, (cfg.width,) * cfg.depth, num_classes, "sigmoid", norm=norm,
                 init_std=cfg.init_std, seed=cfg.seed + i).to(device)
        for i in range(cfg.seeds)
    ]


def roc_per_class(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC of every class: TPR on the FPR ``grid`` (C, G) and the AUC (C,)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    n_classes = probs.shape[1]
    tpr = np.zeros((n_classes, len(grid)))
    auc = np.zeros(n_classes)
    for c in range(n_classes):
        positive = labels == c
        if not np.isfinite(probs[:, c]).all() or positive.all() or not positive.any():
            tpr[c], auc[c] = np.nan, np.nan  # a diverged model, or a class absent from the test set
            continue
        fpr, tp, _ = roc_curve(positive, probs[:, c])
        tpr[c] = np.interp(grid, fpr, tp)
        auc[c] = roc_auc_score(positive, probs[:, c])
    return tpr, auc


def value_at(steps: np.ndarray, values: np.ndarray, step: int) -> np.ndarray:
    """``values`` at the recorded step nearest to ``step`` (values indexed by record first)."""
    return values[int(np.abs(steps - step).argmin())]


def run(cfg: IoffeConfig, device: torch.device) -> Outcome:
    """Train both variants, return accuracy curves, percentiles, ROC/AUC, timings and the paper comparison."""
    ds = data.load(cfg.dataset, device).flat()
    fit_cfg = train.FitConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        log_every=cfg.log_every, probe_size=cfg.probe_size,
    )
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    probe = {"pct": train.activation_percentiles(layer=-1, unit=cfg.probe_unit, q=QUANTILES)}
    grid = np.unique(np.r_[np.linspace(0.0, 0.01, 41), np.geomspace(0.01, 1.0, 121)])  # dense near FPR 0
    labels = ds.y_test.cpu().numpy()
    fits: dict[str, train.FitResult] = {}
    arrays: dict[str, np.ndarray] = {"roc_fpr": grid}
    aucs: dict[str, np.ndarray] = {}
    with num_threads(cfg.threads if device.type == "cpu" else None):
        for variant in VARIANTS:
            models = make_models(cfg, variant == "bn", ds.input_shape[0], ds.num_classes, device)
            fits[variant] = res = train.fit(models, ds, fit_cfg, seeds=seeds, probes=probe)
            probs = train.predict_proba(models, ds.x_test).cpu().numpy()
            rocs = [roc_per_class(p, labels, grid) for p in probs]
            arrays[f"roc_tpr_{variant}"] = np.stack([r[0] for r in rocs])  # (K, C, G)
            aucs[variant] = np.stack([r[1] for r in rocs])  # (K, C)
            arrays[f"auc_{variant}"] = aucs[variant]
            arrays[f"acc_{variant}"] = res.test_acc
            arrays[f"test_loss_{variant}"] = res.test_loss
            arrays[f"train_loss_{variant}"] = res.train_loss
            arrays[f"pct_{variant}"] = res.probes["pct"]  # (L, K, 3)
    steps = fits["bn"].steps
    arrays["steps"] = steps
    return Outcome(metrics=summarise(cfg, fits, aucs, steps), arrays=arrays, datasets=[ds.name])


def summarise(
    cfg: IoffeConfig, fits: dict[str, train.FitResult], aucs: dict[str, np.ndarray], steps: np.ndarray
) -> dict[str, Any]:
    """The chapter's headline numbers from the two variants' fit results."""
    m: dict[str, Any] = {"steps": int(steps[-1]), "seeds": cfg.seeds, "log_every": cfg.log_every}
    curves = {v: np.nanmean(fits[v].test_acc, axis=1) for v in VARIANTS}
    for v in VARIANTS:
        f = fits[v]
        final = f.test_acc[-1]
        m[f"acc_final_{v}"] = float(np.nanmean(final))
        m[f"acc_final_sd_{v}"] = float(np.nanstd(final))
        m[f"acc_final_min_{v}"] = float(np.nanmin(final)) if np.isfinite(final).any() else None
        m[f"acc_final_max_{v}"] = float(np.nanmax(final)) if np.isfinite(final).any() else None
        m[f"train_time_s_{v}"] = f.train_time_s
        m[f"eval_time_s_{v}"] = f.eval_time_s
        m[f"model_steps_per_s_{v}"] = f.model_steps_per_s
        m[f"time_per_model_s_{v}"] = f.train_time_s / cfg.seeds
        m[f"train_loss_final_{v}"] = float(np.nanmean(f.train_loss[-1]))  # mean over the last log interval
        m[f"diverged_{v}"] = [{"seed": s, "step": st} for s, st in f.divergences()]
        m[f"auc_macro_{v}"] = float(np.nanmean(aucs[v]))
        m[f"auc_min_class_{v}"] = int(np.nanargmin(np.nanmean(aucs[v], axis=0))) if np.isfinite(aucs[v]).any() else None
        m[f"auc_min_{v}"] = float(np.nanmin(np.nanmean(aucs[v], axis=0))) if np.isfinite(aucs[v]).any() else None
        pct = f.probes["pct"]  # (L, K, 3)
        median = pct[:, :, 1]
        m[f"median_range_{v}"] = float(np.nanmean(np.nanmax(median, 0) - np.nanmin(median, 0)))
        width = pct[:, :, 2] - pct[:, :, 0]
        m[f"width_start_{v}"] = float(np.nanmean(width[0]))
        m[f"width_end_{v}"] = float(np.nanmean(width[-1]))
        m[f"pct_start_{v}"] = pct[0, 0].tolist()  # the figure's model: seed cfg.seed
        m[f"pct_end_{v}"] = pct[-1, 0].tolist()
    # how much sooner BN reaches the final accuracy of the net without BN (mean curves)
    target = m["acc_final_no_bn"]
    reached = np.nonzero(curves["bn"] >= target)[0] if np.isfinite(target) else []
    m["target_acc"] = target
    m["bn_steps_to_target"] = int(steps[reached[0]]) if len(reached) else None
    reached_no = np.nonzero(curves["no_bn"] >= target)[0] if np.isfinite(target) else []
    m["no_bn_steps_to_target"] = int(steps[reached_no[0]]) if len(reached_no) else None
    if m["bn_steps_to_target"] and m["no_bn_steps_to_target"]:
        m["step_ratio"] = m["no_bn_steps_to_target"] / m["bn_steps_to_target"]
    else:
        m["step_ratio"] = None
    # the same, seed by seed (BN and no-BN nets of one seed share their data order)
    per_seed = [_first_step(steps, fits[v].test_acc, target) for v in VARIANTS]
    ratios = [n / b for n, b in zip(*per_seed) if n and b]  # None (never reached) or 0 drop out
    m["seeds_bn_first"] = sum(
        1 for n, b in zip(*per_seed) if b is not None and (n is None or b < n)
    )
    m["seed_ratio_min"] = min(ratios) if ratios else None
    m["seed_ratio_max"] = max(ratios) if ratios else None
    early = int(steps[(steps > 0) & (steps >= steps[-1] / 10)][0])  # the first record after 10 % of training
    m["early_step"] = early
    for v in VARIANTS:
        m[f"acc_early_{v}"] = float(np.nanmean(value_at(steps, fits[v].test_acc, early)))
    m["acc_gap"] = m["acc_final_bn"] - m["acc_final_no_bn"]
    m["comparison"] = comparison_rows(steps, fits)
    return m


def _first_step(steps: np.ndarray, acc: np.ndarray, target: float) -> list[int | None]:
    """Per model (column of ``acc``), the first recorded step with accuracy ≥ ``target`` (``None``: never)."""
    out: list[int | None] = []
    for k in range(acc.shape[1]):
        hit = np.nonzero(acc[:, k] >= target)[0] if np.isfinite(target) else []
        out.append(int(steps[hit[0]]) if len(hit) else None)
    return out


def comparison_rows(steps: np.ndarray, fits: dict[str, train.FitResult]) -> list[dict[str, Any]]:
    """Paper-vs-ours rows: at each of the paper's reference steps we reached, mean ± sd over seeds."""
    rows = []
    for ref_step in REFERENCE_ACC["bn"]:
        if ref_step > steps[-1] * 1.001:
            continue
        row: dict[str, Any] = {"step": ref_step, "ours_step": int(steps[int(np.abs(steps - ref_step).argmin())])}
        for v in VARIANTS:
            acc = value_at(steps, fits[v].test_acc, ref_step)
            row[f"paper_{v}"] = REFERENCE_ACC[v][ref_step]
            row[f"ours_{v}"] = float(np.nanmean(acc))
            row[f"ours_sd_{v}"] = float(np.nanstd(acc))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- figures
def _band(ax, x, y, color, label) -> None:
    mean, lo, hi = np.nanmean(y, 1), np.nanmin(y, 1), np.nanmax(y, 1)
    ax.plot(x, mean, color=color, label=label, lw=1.6)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def figure_accuracy(res: Result):
    """Fig. 1(a): test accuracy vs step, mean and min–max band over seeds, with the paper's points in range."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    a = res.arrays
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for v in VARIANTS:
        _band(ax, a["steps"], a[f"acc_{v}"], PALETTE[v], f"ours, {LABELS[v]} (mean, min–max over seeds)")
        ref = {s: acc for s, acc in REFERENCE_ACC[v].items() if s <= a["steps"][-1] * 1.001}
        ax.plot(list(ref), list(ref.values()), ls="none", marker="o" if v == "bn" else "s", mfc="none",
                color=PALETTE[v], label=f"paper's Fig. 1(a), {LABELS[v]}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.7, 1.0)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def figure_percentiles(res: Result):
    """Fig. 1(b, c): 15/50/85th percentiles of one last-layer sigmoid's input, without and with BN.

    Lines: the model of the first seed; the band around the median: the other seeds' medians (min–max).
    """
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    a = res.arrays
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharey=True)
    for ax, v, panel in zip(axes, VARIANTS, "bc"):
        pct = a[f"pct_{v}"]
        for j, (q, ls) in enumerate(zip(QUANTILES, (":", "-", "--"))):
            ax.plot(a["steps"], pct[:, 0, j], color=PALETTE[v], ls=ls, lw=1.4 if q == 50 else 1.0,
                    label=f"{q}th percentile")
        ax.fill_between(a["steps"], np.nanmin(pct[:, :, 1], 1), np.nanmax(pct[:, :, 1], 1), color=PALETTE[v],
                        alpha=0.15, lw=0, label="median, all seeds (min–max)")
        ax.axhline(0, color=PALETTE["ref"], lw=0.6)
        ax.set_title(f"({panel}) {LABELS[v]}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("input of the sigmoid")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_roc(res: Result):
    """ROC curves per class of the final models (mean TPR over seeds), without and with BN."""
    import matplotlib.pyplot as plt

    a = res.arrays
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, v in zip(axes, VARIANTS):
        tpr = np.nanmean(a[f"roc_tpr_{v}"], 0)  # (C, G)
        auc = np.nanmean(a[f"auc_{v}"], 0)
        for c in range(tpr.shape[0]):
            ax.plot(a["roc_fpr"], tpr[c], color=colors(c), lw=1.0, label=f"{c}: AUC {auc[c]:.4f}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls=":")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_title(LABELS[v])
        ax.set_xlabel("false-positive rate (linear below 0.01)")
        ax.legend(fontsize=6.5, ncol=2, loc="lower right", title="digit", title_fontsize=7)
    axes[0].set_ylabel("true-positive rate")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- tables
def open_choices(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings the paper leaves open, our value (from the run's config) and the reason, as table rows."""
    c = config
    return [
        {"what": "optimiser", "ours": f"plain SGD ({c['optimizer']}), constant learning rate",
         "why": "Algorithm 2 names SGD; §4.1 names none. No momentum or schedule, so BN is the only difference."},
        {"what": "learning rate", "ours": c["lr"],
         "why": "the same for both nets; large enough that the net without BN learns within the budget, "
                "small enough that its slow start (Fig. 1a) remains"},
        {"what": "initial weights", "ours": f"N(0, {c['init_std']}²), biases 0",
         "why": "'small random Gaussian values'; this scale also reproduces the narrow start of Fig. 1(b)"},
        {"what": "biases", "ours": "hidden biases only without BN; read-out bias always",
         "why": "§3.2: BN's β takes the bias's role"},
        {"what": "BN's ε", "ours": c["eps"], "why": "not stated; PyTorch's default"},
        {"what": "inference statistics", "ours": f"running averages, momentum {c['bn_momentum']}",
         "why": "§3.1 allows moving averages to track accuracy during training; chapter 1 compares them"},
        {"what": "input", "ours": "pixels scaled to [0, 1], standardised with the training mean and std",
         "why": "the paper's 'binary images' are not specified further; bnbook.data standardises every dataset"},
        {"what": "percentile batch", "ours": f"the first {c['probe_size']} test images, BN with their own statistics",
         "why": "not stated; a fixed batch makes the curves comparable across steps"},
    ]


def percentile_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Paper-vs-ours rows of the 15/50/85th percentiles at the start and the end of training."""
    rows = []
    for v in VARIANTS:
        for when in ("start", "end"):
            paper, ours = REFERENCE_PERCENTILES[v][when], metrics[f"pct_{when}_{v}"]
            rows.append({"net": LABELS[v], "when": when,
                         **{f"paper_{q}": p for q, p in zip(QUANTILES, paper)},
                         **{f"ours_{q}": o for q, o in zip(QUANTILES, ours)}})
    return rows


def timing_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Wall-clock training time and throughput of each variant, and its final accuracy and AUC."""
    return [
        {"net": LABELS[v], "time": metrics[f"train_time_s_{v}"], "per_model": metrics[f"time_per_model_s_{v}"],
         "rate": metrics[f"model_steps_per_s_{v}"], "eval": metrics[f"eval_time_s_{v}"],
         "acc": metrics[f"acc_final_{v}"], "acc_sd": metrics[f"acc_final_sd_{v}"],
         "auc": metrics[f"auc_macro_{v}"], "auc_min": metrics[f"auc_min_{v}"],
         "auc_min_class": metrics[f"auc_min_class_{v}"]}
        for v in VARIANTS
    ]
