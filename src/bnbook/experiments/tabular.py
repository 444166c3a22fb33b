"""Chapter 9, BN on tabular data (a companion to chapter 3): chapter 3's sigmoid MLP on the Glass data, with and without
BN, with and without standardised inputs (the 2×2 design), over repeated stratified splits.

Glass has 214 rows, so one train/test split says little: every number here is a mean over
``splits`` stratified splits (:func:`bnbook.data.split_table`, split ``r`` fixed by seed
``seed + r``) and ``seeds`` models per split. The four variants of one split share their
data: the same rows, the same initial weights of model ``k`` (seed ``seed + 100·r + k``) and
the same mini-batch order, so a BN/no-BN or raw/standardised pair differs only in that one
switch. The ``paper`` profile trains on BNG(glass), OpenML data id 265 (137,781 rows).

After training, every model is scored on its split's test part in inference mode — BN with
its running averages, as the engine evaluates it — and, for BN, once more with population
statistics recomputed over the training part (Algorithm 2 of Ioffe & Szegedy): on raw Glass
features the running averages lag behind the weights, and the two evaluations differ.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnbook import data, nets, norms, train
from bnbook.config import ChapterConfig
from bnbook.env import num_threads
from bnbook.experiments.ioffe import roc_per_class
from bnbook.results import Outcome, Result

INPUTS = ("raw", "std")
NORMS = ("no_bn", "bn")
VARIANTS = tuple(f"{i}_{n}" for i in INPUTS for n in NORMS)  # raw_no_bn, raw_bn, std_no_bn, std_bn
INPUT_LABELS = {"raw": "raw features", "std": "standardised features"}
NORM_LABELS = {"no_bn": "without BN", "bn": "with BN"}
LABELS = {f"{i}_{n}": f"{INPUT_LABELS[i]}, {NORM_LABELS[n]}" for i in INPUTS for n in NORMS}

SATURATION = 0.01
"""A sigmoid counts as saturated where its derivative σ'(z) = σ(z)(1 − σ(z)) is below this (|z| > 4.6)."""

STUDENT_REPORT: dict[str, Any] = {
    # What a student report that trained the same MLP on BNG(glass) (and on MNIST) wrote; numbers as printed.
    "bng_rows": 137_781, "bng_features": 9, "bng_classes": 7,
    "mnist_time_no_bn_s": 932, "mnist_time_bn_s": 1079,
}
"""The student report's statements that this chapter checks (its BNG(glass) section, and its MNIST timing)."""


@dataclasses.dataclass(frozen=True)
class TabularConfig(ChapterConfig):
    """Chapter 3's MLP on tabular data. Defaults are the ``quick`` profile."""

    dataset: str = "glass"  # the 214-row UCI Glass data (offline); 'bng-glass' (OpenML 265) in the paper profile
    splits: int = 6  # repeated stratified train/test splits, split r drawn with seed `seed + r`
    test_fraction: float = 0.3  # share of every class that goes to the test part
    seeds: int = 2  # models per variant and split
    steps: int = 2_000  # SGD steps per model (about 430 passes over Glass's 149 training rows at batch 32)
    batch_size: int = 32  # open: the report used 60 on MNIST; 32 gives 4 batches per pass over 149 rows
    width: int = 100  # chapter 3's net: 3 hidden layers of 100 sigmoid units
    depth: int = 3
    optimizer: str = "sgd"  # plain SGD, as chapter 3
    lr: float = 0.1  # chapter 3's learning rate, the same for all four variants
    eps: float = 1e-5  # BN's ε (PyTorch's default)
    bn_momentum: float = 0.1  # weight of a new batch in BN's running averages (PyTorch's default)
    log_every: int = 50  # record test accuracy and training loss every this many steps
    threads: int = 1  # CPU threads (one is faster than two for these small matrix products)

    profiles: ClassVar = {
        "smoke": {"splits": 2, "seeds": 2, "steps": 60, "log_every": 20},
        "paper": {"dataset": "bng-glass", "splits": 3, "seeds": 5, "test_fraction": 0.2, "steps": 20_000,
                  "batch_size": 60, "log_every": 500},
    }


# ---------------------------------------------------------------- models and measurements
def make_models(cfg: TabularConfig, bn: bool, in_features: int, num_classes: int, split: int,
                device: torch.device) -> list[nn.Module]:
    """The ``cfg.seeds`` MLPs of one variant on split ``split``: model k starts from seed ``seed + 100·split + k``."""
    norm = functools.partial(norms.BatchNorm, eps=cfg.eps, momentum=cfg.bn_momentum) if bn else None
    return [
        nets.MLP(in_features, (cfg.width,) * cfg.depth, num_classes, "sigmoid", norm=norm,
                 seed=seed).to(device)
        for seed in model_seeds(cfg, split)
    ]


def model_seeds(cfg: TabularConfig, split: int) -> list[int]:
    """Initialisation and data-order seeds of the models of split ``split``."""
    return [cfg.seed + 100 * split + k for k in range(cfg.seeds)]


@torch.no_grad()
def predict_proba(models: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Class probabilities (K, N, C) of each model on ``x`` in inference mode (BN with its stored statistics)."""
    out = []
    for m in models:
        was_training = m.training
        m.eval()
        out.append(torch.softmax(m(x), dim=-1))
        m.train(was_training)
    return torch.stack(out)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BN layers (modules that keep running statistics), in order."""
    return [m for m in model.modules() if hasattr(m, "running_mean") and hasattr(m, "reset_running_stats")]


@torch.no_grad()
def with_population_statistics(model: nn.Module, x_train: Tensor, batch_size: int, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose BN layers hold population statistics of the training inputs (Algorithm 2).

    Every BN layer's statistics are reset and re-estimated as the plain average of the batch
    means and (unbiased) batch variances over one pass of mini-batches of ``batch_size``
    (momentum ``None``), with all weights fixed. The model itself is not changed.
    """
    twin = copy.deepcopy(model)
    for layer in bn_layers(twin):
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every batch counts the same
    twin.train()
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed)).to(x_train.device)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        twin(x_train[order[start : start + batch_size]])
    return twin.eval()


@torch.no_grad()
def first_preactivation(model: nn.Module, x: Tensor) -> Tensor:
    """The input of the first hidden layer's sigmoid for the batch ``x`` (BN with ``x``'s own statistics), (N, width).

    Computed on a copy, so the model's BN buffers are left as they were.
    """
    twin = copy.deepcopy(model).train()
    try:
        _, feats = twin(x, features=True)
    except TypeError:  # the nets API before `features=`: pre_activations()
        feats = twin.pre_activations(x)
    return feats[0]


SATURATION_Z = float(np.log((1 - np.sqrt(1 - 4 * SATURATION)) / (1 + np.sqrt(1 - 4 * SATURATION))))
"""The sigmoid input where σ'(z) = :data:`SATURATION` (about −4.59); saturated means |z| above its magnitude."""


def predicted_saturation(x: np.ndarray) -> float:
    """The share of saturated first-layer sigmoids at initialisation predicted from the inputs alone.

    PyTorch's default initialisation draws weights and bias of a layer with fan-in F from
    U(−1/√F, 1/√F), of variance 1/(3F). For a fixed input row x the pre-activation
    z = w·x + b is then (nearly) normal with variance (‖x‖² + 1)/(3F) across units; the
    share with |z| > |z*| is averaged over the rows of ``x``.
    """
    from scipy import stats

    var = ((x**2).sum(1) + 1) / (3 * x.shape[1])
    return float(np.mean(2 * stats.norm.sf(abs(SATURATION_Z) / np.sqrt(var))))


def saturation_at_the_mean(x: np.ndarray) -> dict[str, float]:
    """Exercise 2's hand estimate: the row of feature means, its norm, the pre-activation sd and the saturated share."""
    from scipy import stats

    norm = float(np.linalg.norm(x.mean(0)))
    sd = float(np.sqrt((norm**2 + 1) / (3 * x.shape[1])))
    return {"mean_row_norm": norm, "mean_row_sd": sd, "mean_row_saturated": float(2 * stats.norm.sf(abs(SATURATION_Z) / sd))}


def interval_phrase(lo: float, hi: float, what: str = "BN") -> str:
    """How a 95 % interval of a difference (with − without) reads: higher, lower, or not settled."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"whether {what} ends higher cannot be said from one split"
    if lo > 0:
        return f"{what} ends higher"
    if hi < 0:
        return f"{what} ends lower"
    return f"whether {what} ends higher is not settled here"


def saturated_fraction(z: Tensor) -> float:
    """Share of sigmoid inputs ``z`` where σ'(z) < :data:`SATURATION` (the gradient through the unit all but vanishes)."""
    s = torch.sigmoid(z)
    return float((s * (1 - s) < SATURATION).float().mean())


def running_average_lag(model: nn.Module, reference: nn.Module) -> float:
    """Median over the first BN layer's units of |running mean − population mean| / population sd."""
    ours, pop = bn_layers(model)[0], bn_layers(reference)[0]
    lag = (ours.running_mean - pop.running_mean).abs() / (pop.running_var + pop.eps).sqrt()
    return float(lag.median())


def mean_to_spread(reference: nn.Module) -> float:
    """Median over the first BN layer's units of |mean| / sd of its input (population statistics of ``reference``)."""
    pop = bn_layers(reference)[0]
    return float((pop.running_mean.abs() / (pop.running_var + pop.eps).sqrt()).median())


def accuracy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy of each model's probabilities (K, N, C) against ``labels`` (N,): (K,)."""
    return (probs.argmax(-1) == labels[None, :]).mean(-1)


def confusion(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (C, C) of true class × predicted class, summed over the K models of ``probs`` (K, N, C)."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    for p in probs:
        np.add.at(out, (labels, p.argmax(-1)), 1)
    return out


def corrected_interval(diffs: np.ndarray, n_train: int, n_test: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-split differences and its confidence interval, corrected for overlapping training sets.

    Repeated random splits share most of their rows, so the per-split results are positively
    correlated and the naive standard error is too small. Nadeau & Bengio's corrected
    resampled t-test inflates the variance of the mean from s²/R to s²·(1/R + n_test/n_train).
    """
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    r = len(d)
    mean = float(d.mean()) if r else float("nan")
    if r < 2:
        return mean, float("nan"), float("nan")
    se = float(np.sqrt(d.var(ddof=1) * (1 / r + n_test / n_train)))
    half = float(stats.t.ppf(0.5 + level / 2, df=r - 1)) * se
    return mean, mean - half, mean + half


# ---------------------------------------------------------------- the experiment
def run(cfg: TabularConfig, device: torch.device) -> Outcome:
    """Train the 2×2 variants on every split; return curves, final accuracies, AUCs, timings and diagnostics."""
    table = data.read_table(cfg.dataset)
    n_classes = len(table.classes)
    fit_cfg = train.FitConfig(steps=cfg.steps, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                              log_every=cfg.log_every)
    grid = np.unique(np.r_[np.linspace(0.0, 0.05, 26), np.geomspace(0.05, 1.0, 60)])
    per: dict[str, dict[str, list]] = {v: {k: [] for k in (
        "acc", "loss", "final", "final_pop", "train_final", "auc", "tpr", "time", "saturated", "lag", "confusion", "ratio")}
        for v in VARIANTS}
    majority, n_train, n_test, steps = [], [], [], None
    with num_threads(cfg.threads if device.type == "cpu" else None):
        for r in range(cfg.splits):
            split_seed = cfg.seed + r
            sets = {i: data.split_table(table, split_seed, cfg.test_fraction, standardize=(i == "std")).to(device)
                    for i in INPUTS}
            labels = sets["std"].y_test.cpu().numpy()
            train_labels = sets["std"].y_train.cpu().numpy()
            n_train.append(len(train_labels))
            n_test.append(len(labels))
            majority.append(float(np.mean(labels == np.bincount(train_labels).argmax())))
            for v in VARIANTS:
                inputs, norm = v.split("_", 1)
                ds = sets[inputs]
                models = make_models(cfg, norm == "bn", ds.input_shape[0], n_classes, r, device)
                per[v]["saturated"].append(np.mean([saturated_fraction(first_preactivation(m, ds.x_train))
                                                    for m in models]))
                res = train.fit(models, ds, fit_cfg, seeds=model_seeds(cfg, r))
                steps = res.steps
                per[v]["acc"].append(res.test_acc)  # (L, K)
                per[v]["loss"].append(res.train_loss)
                per[v]["time"].append(res.train_time_s)
                probs = predict_proba(models, ds.x_test).cpu().numpy()
                per[v]["final"].append(accuracy(probs, labels))
                per[v]["confusion"].append(confusion(probs, labels, n_classes))
                per[v]["train_final"].append(accuracy(predict_proba(models, ds.x_train).cpu().numpy(), train_labels))
                rocs = [roc_per_class(p, labels, grid) for p in probs]
                per[v]["tpr"].append(np.stack([t for t, _ in rocs]))  # (K, C, G)
                per[v]["auc"].append(np.stack([a for _, a in rocs]))  # (K, C)
                if norm == "bn":
                    pops = [with_population_statistics(m, ds.x_train, cfg.batch_size, seed=split_seed) for m in models]
                    per[v]["final_pop"].append(accuracy(predict_proba(pops, ds.x_test).cpu().numpy(), labels))
                    per[v]["lag"].append(np.mean([running_average_lag(m, p) for m, p in zip(models, pops)]))
                    per[v]["ratio"].append(np.mean([mean_to_spread(p) for p in pops]))
    arrays: dict[str, np.ndarray] = {"steps": np.asarray(steps), "roc_fpr": grid, "majority": np.array(majority),
                                     "class_counts": table.class_counts, "features_raw": table.x}
    for v in VARIANTS:
        p = per[v]
        arrays[f"acc_{v}"] = np.stack(p["acc"])  # (R, L, K)
        arrays[f"train_loss_{v}"] = np.stack(p["loss"])
        arrays[f"final_{v}"] = np.stack(p["final"])  # (R, K)
        arrays[f"train_final_{v}"] = np.stack(p["train_final"])
        arrays[f"auc_{v}"] = np.stack(p["auc"])  # (R, K, C)
        arrays[f"roc_tpr_{v}"] = np.stack(p["tpr"])  # (R, K, C, G)
        arrays[f"time_{v}"] = np.array(p["time"])  # (R,)
        arrays[f"saturated_{v}"] = np.array(p["saturated"])  # (R,)
        arrays[f"confusion_{v}"] = np.sum(p["confusion"], axis=0)  # (C, C): true type × predicted type, all runs
        if p["final_pop"]:
            arrays[f"final_pop_{v}"] = np.stack(p["final_pop"])
            arrays[f"lag_{v}"] = np.array(p["lag"])
            arrays[f"mean_to_spread_{v}"] = np.array(p["ratio"])
    metrics = summarise(cfg, table, arrays, n_train=int(np.mean(n_train)), n_test=int(np.mean(n_test)))
    return Outcome(metrics=metrics, arrays=arrays, datasets=[table.name])


# ---------------------------------------------------------------- summaries
def _mean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def summarise(cfg: TabularConfig, table: data.Table, a: dict[str, np.ndarray], n_train: int, n_test: int) -> dict[str, Any]:
    """The chapter's headline numbers from the raw arrays."""
    steps = a["steps"]
    early_i = int(np.nonzero(steps >= steps[-1] / 10)[0][0])  # the first record after 10 % of training
    counts = a["class_counts"]
    present = np.flatnonzero(counts > 0)
    m: dict[str, Any] = {
        "rows": int(len(table.y)), "features": len(table.features), "classes": len(table.classes),
        "classes_present": int(len(present)), "missing_values": int((~np.isfinite(table.x)).sum()),
        "class_counts": counts.tolist(), "n_train": n_train, "n_test": n_test, "splits": cfg.splits,
        "seeds": cfg.seeds, "runs": cfg.splits * cfg.seeds, "steps": int(steps[-1]), "early_step": int(steps[early_i]),
        "majority_acc": float(np.mean(a["majority"])),
        "saturated_predicted_raw": predicted_saturation(table.x),
        **saturation_at_the_mean(table.x),
        "saturation_z": abs(SATURATION_Z),
        "bn_memory_batches": 1 / cfg.bn_momentum,
        "batches_per_pass": n_train // cfg.batch_size,
        "bn_memory_passes": (1 / cfg.bn_momentum) / max(n_train // cfg.batch_size, 1),
        "feature_table": feature_rows(table),
    }
    for v in VARIANTS:
        final = a[f"final_{v}"]  # (R, K)
        m[f"acc_{v}"] = _mean(final)
        m[f"acc_sd_{v}"] = float(np.nanstd(final))
        m[f"acc_split_sd_{v}"] = float(np.nanstd(np.nanmean(final, 1), ddof=1)) if cfg.splits > 1 else float("nan")
        m[f"acc_binomial_se_{v}"] = float(np.sqrt(m[f"acc_{v}"] * (1 - m[f"acc_{v}"]) / n_test))
        m[f"acc_early_{v}"] = _mean(a[f"acc_{v}"][:, early_i])
        m[f"train_acc_{v}"] = _mean(a[f"train_final_{v}"])
        m[f"train_loss_{v}"] = _mean(a[f"train_loss_{v}"][:, -1])
        m[f"saturated_{v}"] = _mean(a[f"saturated_{v}"])
        m[f"time_{v}"] = float(np.sum(a[f"time_{v}"]))
        m[f"rate_{v}"] = cfg.splits * cfg.seeds * int(steps[-1]) / max(m[f"time_{v}"], 1e-12)
        auc = np.full(len(counts), np.nan)
        auc[present] = np.nanmean(a[f"auc_{v}"][:, :, present], axis=(0, 1))  # absent classes have no AUC
        m[f"auc_{v}"] = [float(x) if np.isfinite(x) else None for x in auc]
        m[f"auc_sd_{v}"] = [float(x) if np.isfinite(x) else None for x in _auc_split_sd(a[f"auc_{v}"], present)]
        m[f"auc_macro_{v}"] = _mean(auc)
        conf = a[f"confusion_{v}"]
        m[f"confused_{v}"] = [_confused_share(conf, c) if c in present else None for c in range(len(counts))]
        order = present[np.argsort(auc[present])]  # present classes, hardest first
        m[f"auc_rank_{v}"] = [int(np.nonzero(order == c)[0][0]) + 1 if c in present else None
                              for c in range(len(counts))]  # 1: the lowest AUC
        m[f"hardest_{v}"] = int(order[0])
        if f"final_pop_{v}" in a:
            m[f"acc_pop_{v}"] = _mean(a[f"final_pop_{v}"])
            m[f"acc_pop_sd_{v}"] = float(np.nanstd(a[f"final_pop_{v}"]))
            m[f"lag_{v}"] = _mean(a[f"lag_{v}"])
            m[f"mean_to_spread_{v}"] = _mean(a[f"mean_to_spread_{v}"])
    for name, (x, y) in {"bn_vs_no": ("std_bn", "std_no_bn"), "std_vs_raw": ("std_no_bn", "raw_no_bn"),
                         "rawbn_vs_raw": ("raw_bn", "raw_no_bn")}.items():
        diffs = np.nanmean(a[f"final_{x}"] - a[f"final_{y}"], axis=1)  # per split, paired over seeds
        m[f"diff_{name}"], m[f"diff_{name}_lo"], m[f"diff_{name}_hi"] = corrected_interval(diffs, n_train, n_test)
    m["time_ratio"] = m["time_std_bn"] / max(m["time_std_no_bn"], 1e-12)
    m["table_2x2"] = table_2x2(m)
    m["auc_table"] = auc_rows(m, counts, cfg.test_fraction, table.classes)
    m["report_rows"] = report_rows(m, table.name)
    return m


def _auc_split_sd(auc: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per class, the sd over splits of the split's mean AUC (NaN for absent classes or a single split)."""
    out = np.full(auc.shape[-1], np.nan)
    if auc.shape[0] > 1:
        out[present] = np.nanstd(np.nanmean(auc[:, :, present], axis=1), axis=0, ddof=1)
    return out


def _confused_share(conf: np.ndarray, c: int) -> dict[str, Any]:
    """For true class ``c``: the share predicted correctly, and the class it is most often mistaken for (and how often)."""
    row = conf[c].astype(float)
    total = row.sum()
    wrong = row.copy()
    wrong[c] = 0
    other = int(wrong.argmax())
    return {"correct": float(row[c] / total) if total else None, "other": other,
            "other_share": float(wrong[other] / total) if total else None}


def feature_rows(table: data.Table) -> list[dict[str, Any]]:
    """Per feature: the raw mean, sd, minimum and maximum over all rows."""
    x = table.x
    return [{"feature": f, "mean": float(x[:, j].mean()), "sd": float(x[:, j].std()), "min": float(x[:, j].min()),
             "max": float(x[:, j].max()), "cv": float(x[:, j].std() / abs(x[:, j].mean())) if x[:, j].mean() else None}
            for j, f in enumerate(table.features)]


def table_2x2(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The 2×2 table: rows input scaling, columns BN; final test accuracy (mean ± sd over splits and seeds)."""
    rows = []
    for i in INPUTS:
        row: dict[str, Any] = {"inputs": INPUT_LABELS[i]}
        for n in NORMS:
            v = f"{i}_{n}"
            row[n] = m[f"acc_{v}"]
            row[f"{n}_sd"] = m[f"acc_sd_{v}"]
            row[f"{n}_train"] = m[f"train_acc_{v}"]
        row["bn_pop"] = m[f"acc_pop_{i}_bn"]
        row["bn_pop_sd"] = m[f"acc_pop_sd_{i}_bn"]
        rows.append(row)
    return rows


def auc_rows(m: dict[str, Any], counts: np.ndarray, test_fraction: float, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per class: its size, expected test rows per split and its mean one-vs-rest AUC under each variant."""
    rows = []
    for c, name in enumerate(classes):
        if counts[c] == 0:
            continue
        row: dict[str, Any] = {"type": c + 1, "name": name, "rows": int(counts[c]),
                               "test_rows": float(np.floor(test_fraction * counts[c] + 0.5))}
        for v in VARIANTS:
            row[v] = m[f"auc_{v}"][c]
        rows.append(row)
    return rows


def _verdict(ok: bool | None, yes: str, no: str) -> str:
    return "—" if ok is None else (yes if ok else no)


def report_rows(m: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """The student report's statements next to our numbers, each labelled with the dataset behind it."""
    s = STUDENT_REPORT
    ours = "Glass (214 rows)" if dataset == "glass" else "BNG(glass)"
    bng = dataset == "bng-glass"
    early_bn, early_no = m["acc_early_std_bn"], m["acc_early_std_no_bn"]
    gap_early, gap_end = early_bn - early_no, m["acc_std_bn"] - m["acc_std_no_bn"]
    rank5 = [_at(m[f"auc_rank_std_{n}"], 4) for n in NORMS]  # label 4: glass type 5 (containers)
    rank6 = [_at(m[f"auc_rank_std_{n}"], 5) for n in NORMS]  # label 5: type 6 (tableware)
    hard = lambda ranks: None if None in ranks else all(r <= 2 for r in ranks)  # noqa: E731 - among the 2 hardest
    auc5 = [_at(m[f"auc_std_{n}"], 4) for n in NORMS]
    auc6 = [_at(m[f"auc_std_{n}"], 5) for n in NORMS]
    return [
        {"theirs": "BNG(glass)", "statement": f"{s['bng_rows']:,} rows, {s['bng_features']} features, "
                                              f"{s['bng_classes']} classes, no missing data",
         "ours_data": ours,
         "ours": f"{m['rows']:,} rows, {m['features']} features, {m['classes_present']} of {m['classes']} classes "
                 f"present, {m['missing_values']} missing values",
         "verdict": _verdict(m["rows"] == s["bng_rows"], "agrees", "other dataset (the one BNG(glass) was fitted to)")
         if not bng else _verdict(m["rows"] == s["bng_rows"] and m["missing_values"] == 0, "agrees", "differs")},
        {"theirs": "BNG(glass)", "statement": "with BN, training and test accuracy are higher from the start; "
                                              "without BN the net slowly catches up",
         "ours_data": ours,
         "ours": f"test accuracy at step {m['early_step']:,}: {early_bn:.3f} with BN, {early_no:.3f} without; "
                 f"at the end: {m['acc_std_bn']:.3f} and {m['acc_std_no_bn']:.3f} (standardised inputs)",
         "verdict": _verdict(gap_early > 0 and abs(gap_end) < gap_early, "agrees", "does not agree")},
        {"theirs": "BNG(glass)", "statement": "the ROC curves are better with BN",
         "ours_data": ours,
         "ours": f"mean AUC {m['auc_macro_std_bn']:.3f} with BN, {m['auc_macro_std_no_bn']:.3f} without",
         "verdict": _verdict(m["auc_macro_std_bn"] > m["auc_macro_std_no_bn"], "agrees", "does not agree")},
        {"theirs": "BNG(glass)", "statement": "type 5 is hard to predict for both nets",
         "ours_data": ours,
         "ours": f"type 5 (containers): AUC {_f(auc5[1])} with BN, {_f(auc5[0])} without; "
                 f"type 6 (tableware, '5' if counted from 0): {_f(auc6[1])} and {_f(auc6[0])}",
         "verdict": "containers: " + _verdict(hard(rank5), "among the two hardest", "not among the two hardest")
                    + "; tableware: " + _verdict(hard(rank6), "among the two hardest", "not among the two hardest")},
        {"theirs": "MNIST", "statement": f"BN takes longer to train ({s['mnist_time_bn_s']:,} s against "
                                         f"{s['mnist_time_no_bn_s']:,} s)",
         "ours_data": ours,
         "ours": f"{m['time_std_bn']:.1f} s with BN, {m['time_std_no_bn']:.1f} s without ({m['time_ratio']:.2f}×)",
         "verdict": _verdict(m["time_ratio"] > 1, "agrees", "does not agree")},
    ]


def _at(values: Sequence[Any], i: int) -> Any:
    """``values[i]``, or ``None`` where the dataset has fewer classes."""
    return values[i] if i < len(values) else None


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------- figures
COLORS = {"raw_no_bn": "#f4a582", "raw_bn": "#92c5de", "std_no_bn": "#d62728", "std_bn": "#1f77b4"}
STYLES = {"raw_no_bn": "--", "raw_bn": "--", "std_no_bn": "-", "std_bn": "-"}


def figure_features(res: Result):
    """Box plots of Glass's nine features: (a) as published, (b) standardised (all rows)."""
    import matplotlib.pyplot as plt

    x = res.arrays["features_raw"]
    names = [r["feature"] for r in res.metrics["feature_table"]]
    z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
    for ax, values, title in zip(axes, (x, z), ("(a) as published", "(b) standardised")):
        ax.boxplot([values[:, j] for j in range(values.shape[1])], orientation="horizontal", widths=0.6,
                   flierprops={"markersize": 2})
        ax.set_yticks(range(1, len(names) + 1), names)
        ax.set_title(title)
    axes[0].set_xlabel("value (RI: refractive index; others: weight % of the oxide)")
    axes[1].set_xlabel("(value − mean) / sd")
    axes[0].invert_yaxis()
    fig.tight_layout()
    return fig


def figure_curves(res: Result):
    """Test accuracy and training loss against the step for the four variants (mean, 10th–90th percentile of runs)."""
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    a = res.arrays
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for v in VARIANTS:
        style = {"band": (10, 90), "alpha": 0.15, "ls": STYLES[v], "lw": 1.5}
        # (R, L, K) → (L, R, K): every split and seed is one run of the band
        seed_band(axes[0], a["steps"], np.moveaxis(a[f"acc_{v}"], 1, 0), COLORS[v], LABELS[v], **style)
        seed_band(axes[1], a["steps"][1:], np.moveaxis(a[f"train_loss_{v}"][:, 1:], 1, 0), COLORS[v], LABELS[v],
                  **style)
    axes[0].axhline(float(np.mean(a["majority"])), color="0.4", lw=0.8, ls=":", label="always the largest class")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("(a) test accuracy")
    axes[1].set_ylabel("training loss (cross-entropy)")
    axes[1].set_yscale("log")
    axes[1].set_title("(b) training loss")
    for ax in axes:
        ax.set_xlabel("training step")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def figure_roc(res: Result, inputs: str = "std"):
    """One-vs-rest ROC curves per glass type of the final models (mean TPR over runs), without and with BN."""
    import matplotlib.pyplot as plt

    a = res.arrays
    counts = a["class_counts"]
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.7), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, n in zip(axes, NORMS):
        v = f"{inputs}_{n}"
        tpr = np.nanmean(a[f"roc_tpr_{v}"], axis=(0, 1))  # (C, G)
        auc = np.nanmean(a[f"auc_{v}"], axis=(0, 1))
        for c in np.flatnonzero(counts > 0):
            ax.plot(a["roc_fpr"], tpr[c], color=colors(c), lw=1.1,
                    label=f"type {c + 1} ({counts[c]} rows): AUC {auc[c]:.3f}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls=":")
        ax.set_title(f"{INPUT_LABELS[inputs]}, {NORM_LABELS[n]}")
        ax.set_xlabel("false-positive rate")
        ax.legend(fontsize=6.5, loc="lower right")
    axes[0].set_ylabel("true-positive rate")
    fig.tight_layout()
    return fig


def timing_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Wall-clock training time of each variant (all splits and seeds) and its throughput."""
    return [{"variant": LABELS[v], "time": m[f"time_{v}"], "per_run": m[f"time_{v}"] / m["runs"],
             "rate": m[f"rate_{v}"], "saturated": m[f"saturated_{v}"]} for v in VARIANTS]


def open_choices(config: dict[str, Any]) -> list[dict[str, Any]]:
    """What the student report leaves open, our choice (from the run's config) and why, as table rows."""
    c = config
    return [
        {"what": "data", "ours": f"{c['dataset']}; {c['splits']} stratified splits, {c['test_fraction']:.0%} test",
         "why": "BNG(glass) needs a download; Glass itself is offline and small enough for repeated splits"},
        {"what": "network", "ours": f"{c['depth']}×{c['width']} sigmoid MLP, BN before every sigmoid",
         "why": "the report's net, which is chapter 3's"},
        {"what": "input scaling", "ours": "raw and standardised (training statistics), both",
         "why": "the report does not say; the 2×2 design shows what each does"},
        {"what": "optimiser", "ours": f"plain SGD, learning rate {c['lr']:g}, batch {c['batch_size']}",
         "why": "chapter 3's optimiser and rate; a batch that gives 4 steps per pass over Glass"},
        {"what": "training length", "ours": f"{c['steps']:,} steps", "why": "what the quick profile affords"},
        {"what": "initial weights", "ours": "PyTorch's default, U(−1/√fan-in, 1/√fan-in)",
         "why": "not stated; the default is what a reader's first script uses"},
        {"what": "BN at test time", "ours": f"running averages (momentum {c['bn_momentum']:g}); "
                                            "also population statistics after training",
         "why": "the running averages are what frameworks use; the population statistics are Algorithm 2"},
    ]
