"""Chapter 3, Ioffe & Szegedy's MNIST experiment (§4.1, Fig. 1), with seed bands.

A 784–100–100–100–10 MLP with sigmoid hidden units is trained with and without BN before
each sigmoid, batch 60, under ``seeds`` seeds each. The engine (:func:`bnbook.train.fit`)
records test accuracy and the {15, 50, 85}th percentiles of one last-layer sigmoid's input
over training; the final models are scored by per-class ROC curves and AUCs. The BN and
no-BN nets of seed ``i`` start from the same weights and see the same batches, so a pair
differs only in BN (and in the plain net's hidden biases, which start at zero).

Everything the paper leaves open is a field of :class:`IoffeConfig`, with the choice and
its reason in the comment.

Besides the paper's figure, the run measures how many steps each net needs to reach a fixed
set of test accuracies (per seed), the test accuracy with population statistics recomputed at
every record (Algorithm 2 of the paper: does a dip of a BN seed come from its running
averages?), and two short sweeps that the BN literature's practical claims call for: the
learning rate (does the net without BN fail at a rate BN trains with?) and the scale of the
initial weights (CS231n's weight-scale experiment), each with seed bands.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
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
    # Read off the paper's Fig. 1(a) (vector paths of the arXiv v3 PDF, ±1-2 % of the axis),
    # full MNIST (60,000 / 10,000). The no-BN curve ends at ~44K steps, the BN one at ~49K;
    # both "end" values are filed under 50,000 here.
    "no_bn": {10_000: 0.926, 20_000: 0.963, 30_000: 0.968, 40_000: 0.972, 50_000: 0.972},
    "bn": {10_000: 0.966, 20_000: 0.975, 30_000: 0.978, 40_000: 0.980, 50_000: 0.982},
}
"""Test accuracy vs step in Ioffe & Szegedy's Fig. 1(a), as read off the figure (not printed numbers)."""

REFERENCE_PERCENTILES: dict[str, dict[str, tuple[float, float, float]]] = {
    # Read off Fig. 1(b, c): (15th, 50th, 85th) percentile of the sigmoid input.
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
    log_at: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # extra early records (steps to target)
    targets: tuple[float, ...] = (0.80, 0.85, 0.88, 0.90, 0.91)  # test accuracies whose first step we report
    population_batches: int = 20  # training batches for the population statistics recomputed at each record
    sweep_seeds: int = 3  # models per point of the two sweeps
    sweep_steps: int = 1_000  # steps of every sweep run
    sweep_lrs: tuple[float, ...] = (0.1, 0.5, 2.0, 8.0, 32.0)  # learning-rate sweep (init_std fixed)
    sweep_inits: tuple[float, ...] = (0.001, 0.01, 0.05, 0.2, 1.0)  # initial weight std sweep (lr fixed)
    threads: int = 1  # CPU threads (one is faster than two for these small matrix products)

    profiles: ClassVar = {
        "smoke": {"steps": 60, "seeds": 2, "log_every": 20, "log_at": (10,), "probe_size": 200, "population_batches": 2,
                  "sweep_seeds": 2, "sweep_steps": 20},
        "paper": {"dataset": "mnist", "steps": 50_000, "seeds": 10, "log_every": 500, "targets": (0.90, 0.95, 0.97, 0.98),
                  "sweep_seeds": 5, "sweep_steps": 5_000},
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


def population_accuracy(ds: data.Dataset, batches: int, batch_size: int, seed: int) -> train.Probe:
    """Probe: test accuracy (K,) with every BN layer's inference statistics recomputed as Algorithm 2 does.

    At each record a copy of each model streams ``batches`` fixed training batches through its
    BN layers with ``momentum=None`` (the cumulative average, which is Algorithm 2 — chapter 1),
    then classifies the test set in inference mode. Comparing it with the running-average
    accuracy separates a problem of the inference statistics from one of the weights. For a net
    without BN it is the ordinary test accuracy.
    """
    import copy

    gen = torch.Generator().manual_seed(seed + 4242)
    idx = torch.randint(len(ds.y_train), (batches, batch_size), generator=gen).to(ds.y_train.device)

    @torch.no_grad()
    def probe(models: list[torch.nn.Module], _x: torch.Tensor) -> torch.Tensor:
        out = []
        for model in models:
            m = copy.deepcopy(model)
            bns = [n for n in m.modules() if isinstance(n, norms.BatchNorm)]
            for bn in bns:
                bn.momentum = None
                bn.reset_running_stats()
            if bns:
                m.train()
                for rows in idx:
                    m(ds.x_train[rows])
            m.eval()
            out.append((m(ds.x_test).argmax(-1) == ds.y_test).float().mean())
        return torch.stack(out)

    return probe


def sweep(cfg: IoffeConfig, ds: data.Dataset, device: torch.device, param: str, values: tuple[float, ...]) -> dict:
    """Final test accuracy (V, 2, K), divergences and the step-0 percentiles of the probe unit, for each value
    of ``param`` (``"lr"`` or ``"init_std"``), with and without BN, ``cfg.sweep_seeds`` seeds, ``cfg.sweep_steps`` steps."""
    acc = np.full((len(values), 2, cfg.sweep_seeds), np.nan)
    diverged = np.zeros((len(values), 2), dtype=int)
    pct0 = np.full((len(values), 2, cfg.sweep_seeds, len(QUANTILES)), np.nan)
    seeds = [cfg.seed + i for i in range(cfg.sweep_seeds)]
    probe = {"pct": train.activation_percentiles(layer=-1, unit=cfg.probe_unit, q=QUANTILES)}
    for i, value in enumerate(values):
        run_cfg = dataclasses.replace(cfg, seeds=cfg.sweep_seeds, **{param: value})
        fit_cfg = train.FitConfig(steps=cfg.sweep_steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                                  lr=run_cfg.lr, log_every=cfg.sweep_steps, probe_size=cfg.probe_size)
        for j, variant in enumerate(VARIANTS):
            models = make_models(run_cfg, variant == "bn", ds.input_shape[0], ds.num_classes, device)
            res = train.fit(models, ds, fit_cfg, seeds=seeds, probes=probe)
            acc[i, j] = res.test_acc[-1]
            diverged[i, j] = int((res.diverged_step >= 0).sum())
            pct0[i, j] = res.probes["pct"][0]
    return {"acc": acc, "diverged": diverged, "pct0": pct0, "values": np.array(values, dtype=float)}


def value_at(steps: np.ndarray, values: np.ndarray, step: int) -> np.ndarray:
    """``values`` at the recorded step nearest to ``step`` (values indexed by record first)."""
    return values[int(np.abs(steps - step).argmin())]


def run(cfg: IoffeConfig, device: torch.device) -> Outcome:
    """Train both variants, return accuracy curves, percentiles, ROC/AUC, timings and the paper comparison."""
    ds = data.load(cfg.dataset, device).flat()
    fit_cfg = train.FitConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        log_every=cfg.log_every, log_at=tuple(s for s in cfg.log_at if s <= cfg.steps), probe_size=cfg.probe_size,
    )
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    probe = {
        "pct": train.activation_percentiles(layer=-1, unit=cfg.probe_unit, q=QUANTILES),
        "acc_pop": population_accuracy(ds, cfg.population_batches, cfg.batch_size, cfg.seed),
    }
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
            arrays[f"acc_pop_{variant}"] = res.probes["acc_pop"]  # (L, K)
        sweeps = {name: sweep(cfg, ds, device, param, values)
                  for name, param, values in (("lr", "lr", cfg.sweep_lrs), ("init", "init_std", cfg.sweep_inits))}
    steps = fits["bn"].steps
    arrays["steps"] = steps
    for name, sw in sweeps.items():
        for key, value in sw.items():
            arrays[f"sweep_{name}_{key}"] = value
    metrics = summarise(cfg, fits, aucs, steps)
    metrics.update(sweep_metrics(cfg, sweeps))
    metrics.update(dataset=ds.name, profile=cfg.profile, lr=cfg.lr, init_std=cfg.init_std)
    return Outcome(metrics=metrics, arrays=arrays, datasets=[ds.name])


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
        m[f"pct_start_{v}"] = np.nanmean(pct[0], 0).tolist()  # mean over seeds
        m[f"pct_end_{v}"] = np.nanmean(pct[-1], 0).tolist()
    # steps to a fixed set of targets, seed by seed (BN and no-BN nets of one seed share their data order)
    m["targets"] = target_rows(steps, fits, cfg.targets)
    pairs = [(r["bn"][k], r["no_bn"][k]) for r in m["targets"] for k in range(cfg.seeds)]
    both = [(b, n) for b, n in pairs if b is not None and n is not None]
    m["target_pairs"] = len(pairs)
    m["target_pairs_bn_first"] = sum(1 for b, n in pairs if b is not None and (n is None or b < n))
    m["target_pairs_never_no_bn"] = sum(1 for b, n in pairs if n is None)
    ratios = [n / b for b, n in both if b > 0]
    m["target_ratio_min"] = min(ratios) if ratios else None
    m["target_ratio_max"] = max(ratios) if ratios else None
    m["target_lo"], m["target_hi"] = min(cfg.targets), max(cfg.targets)
    m.update(dip_metrics(steps, fits["bn"]))
    m["acc_pop_final_bn"] = float(np.nanmean(fits["bn"].probes["acc_pop"][-1]))
    m["acc_pop_final_sd_bn"] = float(np.nanstd(fits["bn"].probes["acc_pop"][-1]))
    m["acc_pop_gap_bn"] = m["acc_pop_final_bn"] - m["acc_final_bn"]
    early = int(steps[(steps > 0) & (steps >= steps[-1] / 10)][0])  # the first record after 10 % of training
    m["early_step"] = early
    for v in VARIANTS:
        m[f"acc_early_{v}"] = float(np.nanmean(value_at(steps, fits[v].test_acc, early)))
    m["acc_gap"] = m["acc_final_bn"] - m["acc_final_no_bn"]
    m["n_diverged"] = len(m["diverged_bn"]) + len(m["diverged_no_bn"])
    m["comparison"] = comparison_rows(steps, fits)
    return m


def target_rows(steps: np.ndarray, fits: dict[str, train.FitResult], targets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per target accuracy: each seed's first recorded step at or above it, per variant (``None``: never),
    with the median and range over the seeds that got there and the per-seed ratio no-BN / BN."""
    rows = []
    for t in targets:
        row: dict[str, Any] = {"target": t}
        for v in VARIANTS:
            first = _first_step(steps, fits[v].test_acc, t)
            row[v] = first
            hit = [f for f in first if f is not None]
            row[f"{v}_reached"] = len(hit)
            row[f"{v}_median"] = float(np.median(hit)) if hit else None
            row[f"{v}_min"] = min(hit) if hit else None
            row[f"{v}_max"] = max(hit) if hit else None
        ratios = [n / b for b, n in zip(row["bn"], row["no_bn"]) if b and n]
        row["ratio_median"] = float(np.median(ratios)) if ratios else None
        row["ratio_min"] = min(ratios) if ratios else None
        row["ratio_max"] = max(ratios) if ratios else None
        rows.append(row)
    return rows


def dip_metrics(steps: np.ndarray, fit: train.FitResult) -> dict[str, Any]:
    """The largest drop of any BN seed's test accuracy below its own best so far, and what explains it.

    Reports the seed, the step, the accuracy there and the seed's previous best, the other seeds'
    range at that step, and the accuracy at that step with population statistics recomputed
    (the ``acc_pop`` probe): if that is close to the previous best, the running averages caused
    the drop, not the weights.
    """
    acc, pop = fit.test_acc, fit.probes["acc_pop"]
    drop = np.maximum.accumulate(np.nan_to_num(acc, nan=0.0), axis=0) - np.nan_to_num(acc, nan=0.0)
    t, k = np.unravel_index(int(np.argmax(drop)), drop.shape)
    others = np.delete(acc[t], k)
    out = {
        "dip_seed": int(fit.seeds[k]), "dip_seed_index": int(k), "dip_step": int(steps[t]), "dip_acc": float(acc[t, k]),
        "dip_size": float(drop[t, k]), "dip_best_before": float(acc[t, k] + drop[t, k]),
        "dip_others_min": float(np.nanmin(others)) if others.size else None,
        "dip_others_max": float(np.nanmax(others)) if others.size else None,
        "dip_acc_pop": float(pop[t, k]),
    }
    later = np.flatnonzero(acc[t + 1 :, k] >= out["dip_best_before"] - 0.005)
    out["dip_recovered_step"] = int(steps[t + 1 + later[0]]) if later.size else None
    if out["dip_size"] < 0.01:
        out["dip_phrase"] = "No BN seed drops by more than one point below its own best accuracy during training."
    else:
        share = (out["dip_acc_pop"] - out["dip_acc"]) / out["dip_size"]
        out["dip_pop_share"] = float(share)
        out["dip_phrase"] = (
            f"One BN seed (seed {out['dip_seed']}) drops to {out['dip_acc']:.3f} at step {out['dip_step']:,}, "
            f"{out['dip_size']:.3f} below its own best so far"
            + (f", while the other seeds read {out['dip_others_min']:.3f}–{out['dip_others_max']:.3f}" if others.size else "")
            + f". With population statistics recomputed at that step (Algorithm 2), the same weights score "
            f"{out['dip_acc_pop']:.3f}, recovering {max(share, 0):.0%} of the drop: "
            + ("most of it is a spike of the running averages used for inference, not a change of the weights."
               if share > 0.5 else
               "most of it is in the weights themselves, not in the running averages used for inference.")
            + (f" The seed is back within half a point of its best at step {out['dip_recovered_step']:,}."
               if out["dip_recovered_step"] is not None else " It has not recovered by the end of the run.")
        )
    return out


def sweep_metrics(cfg: IoffeConfig, sweeps: dict[str, dict]) -> dict[str, Any]:
    """Mean and range of the final accuracy per sweep value and variant, divergences, and a phrase saying
    at which values the net without BN stays near chance (below 0.2) while BN trains (above 0.5)."""
    out: dict[str, Any] = {}
    names = {"lr": ("learning rate", "sweep_lrs"), "init": ("initial weight std", "sweep_inits")}
    for name, sw in sweeps.items():
        acc = sw["acc"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(acc, -1), np.nanmin(acc, -1), np.nanmax(acc, -1)
        rows = []
        for i, value in enumerate(sw["values"]):
            row: dict[str, Any] = {"value": float(value)}
            for j, v in enumerate(VARIANTS):
                row[f"{v}"] = float(mean[i, j])
                row[f"{v}_min"], row[f"{v}_max"] = float(lo[i, j]), float(hi[i, j])
                row[f"{v}_diverged"] = int(sw["diverged"][i, j])
            rows.append(row)
        out[f"sweep_{name}"] = rows
        for i, r in enumerate(rows):  # the same numbers under flat names, for the prose
            tag = f"{r['value']:g}".replace(".", "_")
            for j, v in enumerate(VARIANTS):
                out[f"sweep_{name}_{v}_{tag}"] = r[v]
                pct = sw["pct0"][i, j]  # (K, 3): the probe unit's percentiles at step 0
                out[f"sweep_{name}_{v}_width0_{tag}"] = float(np.nanmean(pct[:, 2] - pct[:, 0]))
        only_bn = [r["value"] for r in rows if r["bn"] > 0.5 and not r["no_bn"] > 0.2]
        what = names[name][0]
        out[f"sweep_{name}_phrase"] = (
            f"at {what} {', '.join(f'{x:g}' for x in only_bn)} the net without BN stays near chance "
            "(mean final accuracy below 0.2) while the BN net trains (above 0.5)" if only_bn else
            f"at no {what} of the sweep does the net without BN stay near chance while the BN net trains"
        )
        out[f"sweep_{name}_phrase"] = f"after {cfg.sweep_steps:,} steps, " + out[f"sweep_{name}_phrase"]
        out[f"sweep_{name}_diverged"] = int(sw["diverged"].sum())
        for j, v in enumerate(VARIANTS):  # each variant's best value of the swept setting
            best = int(np.nanargmax(mean[:, j])) if np.isfinite(mean[:, j]).any() else 0
            out[f"sweep_{name}_best_{v}"] = float(sw["values"][best])
            out[f"sweep_{name}_best_acc_{v}"] = float(mean[best, j])
            out[f"sweep_{name}_trains_{v}"] = int(np.sum(mean[:, j] > 0.5))  # values with mean accuracy above 0.5
        out[f"sweep_{name}_points"] = len(sw["values"])
    out["sweep_steps"], out["sweep_seeds"] = cfg.sweep_steps, cfg.sweep_seeds
    return out


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
def figure_accuracy(res: Result):
    """Fig. 1(a): test accuracy vs step, mean and min–max band over seeds, with the paper's points in range."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE, seed_band

    a = res.arrays
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for v in VARIANTS:
        seed_band(ax, a["steps"], a[f"acc_{v}"], PALETTE[v], f"ours, {LABELS[v]} (mean, min–max over seeds)",
                  alpha=0.2, lw=1.6)
        ref = {s: acc for s, acc in REFERENCE_ACC[v].items() if s <= a["steps"][-1] * 1.001}
        ax.plot(list(ref), list(ref.values()), ls="none", marker="o" if v == "bn" else "s", mfc="none",
                color=PALETTE[v], label=f"paper's Fig. 1(a), {LABELS[v]} (full MNIST)")
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

    from bnbook.plots import PALETTE, seed_band

    a = res.arrays
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharey=True)
    for ax, v, panel in zip(axes, VARIANTS, "bc"):
        pct = a[f"pct_{v}"]
        for j, (q, ls) in enumerate(zip(QUANTILES, (":", "-", "--"))):
            ax.plot(a["steps"], pct[:, 0, j], color=PALETTE[v], ls=ls, lw=1.4 if q == 50 else 1.0,
                    label=f"{q}th percentile")
        seed_band(ax, a["steps"], pct[:, :, 1], PALETTE[v], "median, all seeds (min–max)", centre=None, alpha=0.15)
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
        ax.plot(a["roc_fpr"], a["roc_fpr"], color="0.6", lw=0.6, ls=":", label="chance (TPR = FPR)")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_title(LABELS[v])
        ax.set_xlabel("false-positive rate (linear below 0.01)")
        ax.legend(fontsize=6.5, ncol=2, loc="lower right", title="digit", title_fontsize=7)
    axes[0].set_ylabel("true-positive rate")
    fig.tight_layout()
    return fig


def figure_targets(res: Result):
    """Steps to reach each target test accuracy, per variant: median over seeds with the min–max range."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    rows = res.metrics["targets"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for shift, v in zip((-0.0015, 0.0015), VARIANTS):
        xs = [r["target"] + shift for r in rows if r[f"{v}_median"] is not None]
        med = [r[f"{v}_median"] for r in rows if r[f"{v}_median"] is not None]
        lo = [r[f"{v}_median"] - r[f"{v}_min"] for r in rows if r[f"{v}_median"] is not None]
        hi = [r[f"{v}_max"] - r[f"{v}_median"] for r in rows if r[f"{v}_median"] is not None]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o" if v == "bn" else "s", color=PALETTE[v], capsize=3, lw=1.2,
                    label=f"{LABELS[v]} (median, min–max over seeds)")
    ax.set_yscale("log")
    ax.set_xlabel("target test accuracy")
    ax.set_ylabel("first step at or above the target")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_sweeps(res: Result):
    """Final test accuracy against the learning rate (left) and the initial weight std (right), with and
    without BN: mean over seeds with the min–max band."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE, seed_band

    a = res.arrays
    steps = res.metrics["sweep_steps"]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), sharey=True)
    for ax, name, label in zip(axes, ("lr", "init"), ("learning rate", "initial weight std")):
        x, acc = a[f"sweep_{name}_values"], a[f"sweep_{name}_acc"]
        for j, v in enumerate(VARIANTS):
            seed_band(ax, x, acc[:, j], PALETTE[v], LABELS[v], alpha=0.2, lw=1.6)
        ax.axhline(0.1, color=PALETTE["ref"], lw=0.8, ls=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel(label)
    axes[0].set_ylabel(f"test accuracy after {steps:,} steps")
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- tables
def machine_line(res: Result) -> str:
    """'cpu (model, 2 cores, 1 training thread)': where the run trained, with real plurals."""
    env, threads = res.record["environment"], res.config.get("threads", 0)
    where = f"{env['device']} ({env['device_name']}, {env['cpu_count']} cores"
    if env["device"] == "cpu" and threads:
        where += f", {threads} training thread" + ("" if threads == 1 else "s")
    return where + ")"


def target_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the steps-to-target table: median (min–max) steps per variant, seeds that got there, ratio."""
    def cell(r: dict, v: str) -> str:
        if r[f"{v}_median"] is None:
            return "never"
        n = r[f"{v}_reached"]
        return f"{r[f'{v}_median']:,.0f} ({r[f'{v}_min']:,}–{r[f'{v}_max']:,}); {n} seed" + ("" if n == 1 else "s")

    return [
        {"target": r["target"], "bn": cell(r, "bn"), "no_bn": cell(r, "no_bn"),
         "ratio": "—" if r["ratio_median"] is None else
         f"{r['ratio_median']:.1f} ({r['ratio_min']:.1f}–{r['ratio_max']:.1f})"}
        for r in metrics["targets"]
    ]


TARGET_COLUMNS = {"target": "target accuracy", "bn": "with BN: steps", "no_bn": "without BN: steps",
                  "ratio": "ratio without / with (per seed)"}


def sweep_table(metrics: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Rows of a sweep's table: final accuracy, mean (min–max) over seeds, per variant, and divergences."""
    def cell(r: dict, v: str) -> str:
        text = f"{r[v]:.3f} ({r[v + '_min']:.3f}–{r[v + '_max']:.3f})"
        return text + (f", {r[v + '_diverged']} diverged" if r[v + "_diverged"] else "")

    return [{"value": f"{r['value']:g}", "bn": cell(r, "bn"), "no_bn": cell(r, "no_bn")} for r in metrics[f"sweep_{name}"]]


GLUE_FORMATS = {
    "steps": ",", "log_every": ",", "early_step": ",", "dip_step": ",", "lr": "g", "init_std": "g",
    "target_ratio_*": ".1f", "target_lo": ".2f", "target_hi": ".2f", "median_range_*": ".2f", "width_*": ".2f",
    "pct_*": ".2f", "auc_*": ".4f", "train_time_s_*": ".1f", "time_per_model_s_*": ".1f", "eval_time_s_*": ".1f",
    "model_steps_per_s_*": ",.0f", "acc_gap": "+.3f", "acc_pop_gap_bn": "+.3f", "*seeds*": "d", "sweep_steps": ",",
    "dip_seed*": "d", "dip_size": ".3f", "acc_*": ".3f", "dip_*": ".3f", "sweep_*_width0_*": ".2f",
    "sweep_*_best_acc_*": ".3f", "sweep_*_best_*": "g", "sweep_*_trains_*": "d", "sweep_*_points": "d", "sweep_lr_*": ".3f", "sweep_init_*": ".3f", "train_loss_final_*": ".3f",
}
"""How chapter 3 prints its metrics (``report.glue_metrics``; first matching pattern wins)."""

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
