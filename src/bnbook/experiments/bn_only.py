"""Chapter 8, "Training BatchNorm and only BatchNorm" (Frankle, Schwab & Morcos, 2020).

OpenLTH-shaped CIFAR ResNets (:class:`bnbook.nets.ResNet`) are trained under the five
conditions of :data:`bnbook.bn_only.CONDITIONS` — all parameters; BN's γ and β only; BN and
the output layer; the output layer only; the same number of random conv weights per channel
as BN-only trains — along a depth series and a width series, and then looked into: γ and β
after training, the γ ablation, γ's initialisation, the gradients BN's parameters receive,
the train–test gap, and ResNets with fewer BN layers.

**The grid is a list of independently cached units**, one result per (depth, width,
condition, γ init, BN positions, seed): :func:`unit_configs` lists them for a chapter config,
:func:`~bnbook.experiments.bn_only_units.compute_unit` computes one, :func:`units` wraps them
for :mod:`bnbook.sweep` (which dispatches a grid to local processes or a Slurm cluster), and
:func:`run` — the chapter's own experiment — computes the missing units here and summarises
all of them. A partial `paper` run is therefore reusable: whatever finished is cached.

**Seeds are trained together.** The units that differ only in their seed form a *group*
(:func:`~bnbook.experiments.bn_only_units.group_key`), trained in one :func:`bnbook.train.fit`
call; see :mod:`bnbook.experiments.bn_only_units`, which holds everything a unit runs (and
nothing else, so that editing this module's summary, figures or prose helpers keeps the units'
cached results).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from bnbook import bn_only as lib
from bnbook import results, train
from bnbook.config import ChapterConfig, stable_hash
from bnbook.env import num_threads
from bnbook.errors import BnbookError
from bnbook.experiments.bn_only_units import (  # noqa: F401 (re-exported: the grid's units)
    GAMMA_INITS, NORM_POSITIONS, UNITS_CHAPTER, UnitConfig, compute_unit, group_key, load_data, make_model,
)
from bnbook.results import Outcome

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from bnbook.sweep import Unit

CHAPTER = "08-bn-only"

# Frankle et al. (2020), abstract: BN-only ResNet-866 on CIFAR-10 (v3; v1 said 83 %).
PAPER_HEADLINE = {"depth": 866, "acc": 82.0, "dataset": "CIFAR-10", "epochs": 160}
# A third-party TensorFlow 2 re-implementation (tensorflow/models PR #9174): BN-only top-1 (%)
# on CIFAR-10, 45k/5k train/validation split, OpenLTH's schedule. Secondary source.
TF_REPRODUCTION = {14: 46.67, 32: 51.29, 56: 55.21, 110: 65.19, 218: 70.09, 434: 73.67, 866: 77.83}
PAPER_DEPTHS = (14, 32, 56, 110, 218, 434, 866)


@dataclasses.dataclass(frozen=True)
class BnOnlyConfig(ChapterConfig):
    """Chapter 8's parameters. Defaults are the ``quick`` profile (a 2-core CPU, a few minutes)."""

    dataset: str = "fashion-mnist"  # offline Fashion-MNIST; 'cifar10' (a download) in the paper profile
    pool: int = 2  # images average-pooled by this factor (28×28 → 14×14); 1: full size
    train_size: int = 6_000  # training images (a fixed random subset); 0: all
    test_size: int = 1_000  # test images (a fixed random subset); 0: all
    train_eval_size: int = 1_000  # training images evaluated in inference mode (the train–test gap)
    batch_size: int = 32  # OpenLTH: 128
    steps: int = 200  # OpenLTH: 160 epochs of 390 full batches = 62,400
    lr: float = 0.1  # SGD learning rate (OpenLTH 0.1)
    momentum: float = 0.9  # OpenLTH 0.9
    weight_decay: float = 1e-4  # on every trained tensor, γ and β included (OpenLTH 1e-4)
    milestones: tuple[float, ...] = (0.5, 0.75)  # lr ×0.1 after these fractions of training (epochs 80, 120 of 160)
    augment: str | None = None  # None | 'flip+translate4' (OpenLTH's flips and 4-px translations)
    depths: tuple[int, ...] = (8, 14, 20)  # the depth series, ResNet-N with N = 6D + 2
    width: int = 16  # W of the depth series (OpenLTH: 16)
    conditions: tuple[str, ...] = lib.CONDITIONS  # conditions of the depth series
    width_depth: int = 14  # the width series is ResNet-<width_depth>
    widths: tuple[int, ...] = (4, 8, 16)  # W of the width series
    width_conditions: tuple[str, ...] = ("all", "bn")  # conditions of the width series
    variant_depth: int = 8  # depth of the γ-init and BN-removal comparisons
    seeds: int = 2  # models per unit shape: seeds seed, seed+1, ...
    gamma_threshold: float = 0.05  # |γ| below this counts as "switched off"
    ablation_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)  # γ ablation at each (depth series, BN-only and all)
    grad_every: int = 20  # gradient magnitudes every this many steps (depth series, all trained)
    speed_steps: int = 20  # timed training steps per variant and round (time per step)
    speed_rounds: int = 5  # interleaved timing rounds (the fastest is reported)
    threads: int = 1  # CPU threads (one is fastest on a shared 2-core machine); 0: torch's default

    profiles: ClassVar = {
        "smoke": {
            "train_size": 128, "test_size": 100, "train_eval_size": 100, "batch_size": 16, "steps": 4,
            "depths": (8,), "width": 4, "width_depth": 8, "widths": (4,), "variant_depth": 8,
            "ablation_thresholds": (0.05, 0.2), "grad_every": 2, "speed_steps": 2, "speed_rounds": 1,
        },
        "paper": {
            "dataset": "cifar10", "pool": 1, "train_size": 0, "test_size": 0, "train_eval_size": 10_000,
            "batch_size": 128, "steps": 62_400, "augment": "flip+translate4", "depths": PAPER_DEPTHS,
            "widths": (16, 32, 64, 128), "variant_depth": 56, "grad_every": 390, "speed_steps": 50,
            "speed_rounds": 5, "threads": 0,
        },
    }

    def __post_init__(self) -> None:
        for name in ("milestones", "depths", "conditions", "widths", "width_conditions", "ablation_thresholds"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int, float)) else tuple(value))
        for c in (*self.conditions, *self.width_conditions):
            lib.check_condition(c)
        for d in (*self.depths, self.width_depth, self.variant_depth):
            if d < 8 or (d - 2) % 6:
                raise BnbookError(f"ResNet depths must be 6D + 2 (8, 14, 20, 32, ...), got {d}")
        for name in ("pool", "batch_size", "steps", "width", "seeds", "speed_steps", "speed_rounds"):
            if getattr(self, name) < 1:
                raise BnbookError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if any(w < 1 for w in self.widths) or not self.depths:
            raise BnbookError("widths must be positive and depths non-empty")
        if not all(0 < f < 1 for f in self.milestones):
            raise BnbookError(f"milestones are fractions of training in (0, 1), got {self.milestones}")
        if self.augment not in train.AUGMENTATIONS:
            raise BnbookError(f"augment must be one of {train.AUGMENTATIONS}, got {self.augment!r}")
        if not self.gamma_threshold > 0 or not all(t > 0 for t in self.ablation_thresholds):
            raise BnbookError("gamma thresholds must be positive")
        if self.threads < 0 or self.grad_every < 0:
            raise BnbookError("threads and grad_every must be >= 0")


CONFIG = BnOnlyConfig  # what bnbook.sweep looks for


def epoch_steps(cfg: BnOnlyConfig, n_train: int) -> float:
    """Epochs that ``cfg.steps`` steps make on ``n_train`` images."""
    return cfg.steps * cfg.batch_size / n_train


def unit_configs(cfg: BnOnlyConfig) -> list[UnitConfig]:
    """The grid of ``cfg``: every unit, once, in a stable order.

    1. depth series: every depth × every condition of ``cfg.conditions`` (width ``cfg.width``);
    2. width series: ResNet-``width_depth`` at every width × ``width_conditions``;
    3. γ init 1 instead of U[0, 1): all-trained and BN-only at ``variant_depth``;
    4. fewer BN layers: all-trained ResNet-``variant_depth`` with BN after every second conv
       and with none (BN after every conv is in the depth series or added here).
    """
    seeds = tuple(cfg.seed + i for i in range(cfg.seeds))
    common = dict(
        profile=cfg.profile, device=cfg.device, dataset=cfg.dataset, pool=cfg.pool, train_size=cfg.train_size,
        test_size=cfg.test_size, train_eval_size=cfg.train_eval_size, batch_size=cfg.batch_size, steps=cfg.steps,
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, augment=cfg.augment,
        lr_milestones=tuple(int(round(f * cfg.steps)) for f in cfg.milestones), seeds_together=seeds,
        threads=cfg.threads,
    )

    def shape(depth: int, width: int, condition: str, gamma_init: str = "uniform", positions: str = "all") -> list[UnitConfig]:
        # units of the depth series also measure the γ ablation (BN-only, all trained) and the gradients
        # (all trained); a unit of another series with the same shape is the same unit
        series = (depth in cfg.depths and width == cfg.width and condition in cfg.conditions
                  and gamma_init == "uniform" and positions == "all")
        return [UnitConfig(
            **common, seed=s, depth=depth, width=width, condition=condition, gamma_init=gamma_init,
            norm_positions=positions,
            ablation_thresholds=cfg.ablation_thresholds if series and condition in ("all", "bn") else (),
            grad_every=cfg.grad_every if series and condition == "all" else 0,
        ) for s in seeds]

    out: list[UnitConfig] = []
    for depth in cfg.depths:
        for c in cfg.conditions:
            out += shape(depth, cfg.width, c)
    for width in cfg.widths:
        for c in cfg.width_conditions:
            out += shape(cfg.width_depth, width, c)
    for c in ("all", "bn"):
        out += shape(cfg.variant_depth, cfg.width, c, "uniform") + shape(cfg.variant_depth, cfg.width, c, "one")
    for positions in NORM_POSITIONS:
        out += shape(cfg.variant_depth, cfg.width, "all", positions=positions)
    unique: dict[str, UnitConfig] = {}
    for u in out:
        unique.setdefault(stable_hash(u.to_dict()), u)
    return list(unique.values())


def units(cfg: BnOnlyConfig) -> list[Unit]:
    """The grid of ``cfg`` as :class:`bnbook.sweep.Unit` objects (one cached result each)."""
    from bnbook.sweep import Unit

    return [Unit(UNITS_CHAPTER, u, compute_unit, u.label, group_key(u)) for u in unit_configs(cfg)]


IMAGE_SHAPES = {"cifar10": (3, 32, 32), "fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "mnist5k": (1, 28, 28)}
"""Image shape of each dataset a unit may train on (before pooling), for :func:`unit_flops`."""


def unit_flops(unit: UnitConfig) -> float:
    """Floating-point operations of training one unit (one model): the convolutions and the linear layer
    counted for one image (forward, input and weight gradients: :func:`bnbook.bench.conv_flops_per_step`),
    times the batch size and the number of steps. An estimate for planning a sweep: BN, ReLU and the
    optimiser are left out, and so are the weight gradients that frozen layers skip."""
    from bnbook import bench, nets

    c, h, w = IMAGE_SHAPES[unit.dataset]
    model = nets.ResNet(depth=unit.depth, width=unit.width, in_channels=c, num_classes=10, norm="bn",
                        norm_positions=unit.norm_positions, seed=0)
    x = torch.zeros(2, c, h // unit.pool, w // unit.pool)  # two images: BN needs more than one value per channel
    return bench.conv_flops_per_step(model, x) / 2 * unit.batch_size * unit.steps


def compute_grid(cfg: BnOnlyConfig) -> list[results.Result]:
    """Every unit's result (computing the missing ones here), in :func:`unit_configs` order — the same
    units, and so the same cached results, that ``bnbook sweep 08`` dispatches as jobs."""
    from bnbook.sweep import compute_all

    return compute_all(units(cfg))


# ------------------------------------------------------------------ time per step
SPEED_VARIANTS: tuple[tuple[str, str], ...] = (
    ("all", "all"), ("bn", "all"), ("output", "all"), ("random", "all"), ("all", "second"), ("all", "none"),
)
"""(condition, BN positions) of the timing: the conditions, and all-trained nets with fewer BN layers."""


def step_times(cfg: BnOnlyConfig, device: torch.device) -> dict[str, float]:
    """Milliseconds per training step of one ResNet-``variant_depth`` per :data:`SPEED_VARIANTS`
    (key ``"condition/positions"``): the fastest of ``speed_rounds`` interleaved rounds of
    ``speed_steps`` steps through the engine. On a shared machine other work only ever adds time,
    so the fastest round is the best estimate of a variant's own cost; interleaving gives every
    variant the same chances. A warm-up round (not counted) runs first."""
    unit = unit_configs(cfg)[0]
    ds = load_data(unit, device).subset(0, cfg.batch_size)  # a tiny test set: evaluation is not timed anyway
    times: dict[str, list[float]] = {f"{c}/{p}": [] for c, p in SPEED_VARIANTS}
    fit_cfg = train.FitConfig(steps=cfg.speed_steps, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, augment=cfg.augment, log_every=cfg.speed_steps,
                              probe_size=1)
    with num_threads(cfg.threads or None):
        for r in range(cfg.speed_rounds + 1):
            for c, p in SPEED_VARIANTS:
                u = dataclasses.replace(unit, depth=cfg.variant_depth, width=cfg.width, condition=c, norm_positions=p)
                model = make_model(u, cfg.seed, ds.input_shape[0], ds.num_classes, device)
                res = train.fit([model], ds, fit_cfg, seeds=[cfg.seed])
                if r > 0:  # round 0 warms up every variant
                    times[f"{c}/{p}"].append(1e3 * res.train_time_s / cfg.speed_steps)
    return {k: float(np.min(v)) for k, v in times.items()}


# ------------------------------------------------------------------ the chapter's summary
def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return lib.mean_over([r[key] for r in rows])


def _select(rows: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def run(cfg: BnOnlyConfig, device: torch.device) -> Outcome:
    """Compute (or reuse) every unit of ``cfg``, time a step of each variant, and summarise for the chapter.

    Metrics are nested by topic (``acc[condition][depth]``, ``width_acc[condition][width]``, …) and
    tables are lists of rows; arrays hold what the figures plot (accuracy per seed, γ and β per
    depth, gradient traces).
    """
    start = time.perf_counter()
    found = compute_grid(cfg)
    wall = time.perf_counter() - start
    if cfg.gamma_threshold not in cfg.ablation_thresholds:
        raise BnbookError(f"gamma_threshold {cfg.gamma_threshold} must be one of ablation_thresholds {cfg.ablation_thresholds}")
    rows = [dict(r.metrics, key=r.record["key"]) for r in found]
    arrays_of = {r.record["key"]: r for r in found}
    base = dict(gamma_init="uniform", norm_positions="all")
    seeds = sorted({r["seed"] for r in rows})
    tau = cfg.gamma_threshold
    first = rows[0]
    m: dict[str, Any] = {
        "dataset": cfg.dataset, "dataset_description": first["dataset_description"],
        "train_images": first["train_images"], "test_images": first["test_images"],
        "image_size": first["image_size"], "steps": cfg.steps, "batch_size": cfg.batch_size,
        "epochs": epoch_steps(cfg, first["train_images"]), "seeds": len(seeds), "units": len(rows),
        "groups": len({group_key(u) for u in unit_configs(cfg)}),
        "depths": list(cfg.depths), "widths": list(cfg.widths), "width": cfg.width, "width_depth": cfg.width_depth,
        "variant_depth": cfg.variant_depth, "gamma_threshold": tau, "lr": cfg.lr,
        "units_trained_here": sum(not r.reused for r in found), "grid_wall_s": wall,
        "unit_train_s": sum(r["group_train_s"] / r["models_together"] for r in rows),
        "diverged_units": sum(r["diverged_step"] >= 0 for r in rows),
    }
    arrays: dict[str, np.ndarray] = {"depths": np.array(cfg.depths), "widths": np.array(cfg.widths)}

    def gammas_of(sel: Sequence[dict[str, Any]], name: str = "gamma") -> np.ndarray:
        return np.stack([arrays_of[r["key"]].arrays[name] for r in sel])  # (seeds, channels)

    # 1. conditions × depths: accuracy, trainable entries, what changed, train–test gap
    acc = np.full((len(cfg.conditions), len(cfg.depths), len(seeds)), np.nan)
    trainable = np.zeros((len(cfg.conditions), len(cfg.depths)))
    table = []
    for i, c in enumerate(cfg.conditions):
        for j, d in enumerate(cfg.depths):
            sel = _select(rows, condition=c, depth=d, width=cfg.width, **base)
            for r in sel:
                acc[i, j, seeds.index(r["seed"])] = r["test_acc"]
            trainable[i, j] = sel[0]["trainable"]
            table.append({
                "condition": c, "label": lib.LABELS[c], "depth": d, "trainable": sel[0]["trainable"],
                "parameters": sel[0]["parameters"], "share": sel[0]["trainable"] / sel[0]["parameters"],
                "acc": _mean(sel, "test_acc"), "train_acc": _mean(sel, "train_acc"),
                "gap": _mean(sel, "train_acc") - _mean(sel, "test_acc"),
                **{f"changed_{g}": sel[0][f"changed_{g}"] for g in lib.GROUPS},
            })
    arrays.update(depth_acc=acc, depth_trainable=trainable)
    m["condition_table"] = table
    m["acc"] = {c: {str(r["depth"]): r["acc"] for r in table if r["condition"] == c} for c in cfg.conditions}
    m["gap"] = {c: {str(r["depth"]): r["gap"] for r in table if r["condition"] == c} for c in cfg.conditions}
    m["trainable"] = {c: {str(r["depth"]): r["trainable"] for r in table if r["condition"] == c} for c in cfg.conditions}
    m["parameters"] = {str(r["depth"]): r["parameters"] for r in table}
    m["bn_channels"] = {str(d): _select(rows, depth=d, width=cfg.width, **base)[0]["bn_channels"] for d in cfg.depths}
    # every unit changed nothing it may not change, and (unless it diverged) something in each group it may
    m["changed_ok"] = all(
        all(r[f"changed_{g}"] <= r[f"trainable_{g}"] for g in lib.GROUPS)
        and (r["diverged_step"] >= 0 or all(r[f"changed_{g}"] > 0 for g in lib.GROUPS if r[f"trainable_{g}"]))
        for r in rows
    )
    m["random_equals_bn"] = all(
        r["trainable"] == 2 * r["bn_channels"] for r in rows if r["condition"] == "random"
    )

    # 2. width series
    wacc = np.full((len(cfg.width_conditions), len(cfg.widths), len(seeds)), np.nan)
    wtrain = np.zeros((len(cfg.width_conditions), len(cfg.widths)))
    for i, c in enumerate(cfg.width_conditions):
        for j, w in enumerate(cfg.widths):
            sel = _select(rows, condition=c, depth=cfg.width_depth, width=w, **base)
            for r in sel:
                wacc[i, j, seeds.index(r["seed"])] = r["test_acc"]
            wtrain[i, j] = sel[0]["trainable"]
    arrays.update(width_acc=wacc, width_trainable=wtrain)
    m["width_acc"] = {c: {str(w): float(np.nanmean(wacc[i, j])) for j, w in enumerate(cfg.widths)}
                      for i, c in enumerate(cfg.width_conditions)}
    m["width_trainable"] = {c: {str(w): int(wtrain[i, j]) for j, w in enumerate(cfg.widths)}
                            for i, c in enumerate(cfg.width_conditions)}

    # 3. γ and β per depth (BN-only vs all trained) and the ablation
    gamma_rows, ablation_rows = [], []
    for c in [c for c in ("bn", "all") if c in cfg.conditions]:
        for d in cfg.depths:
            sel = _select(rows, condition=c, depth=d, width=cfg.width, **base)
            g, b, g0 = gammas_of(sel), gammas_of(sel, "beta"), gammas_of(sel, "gamma_init")
            arrays[f"gamma_{c}_{d}"], arrays[f"beta_{c}_{d}"] = g, b
            gamma_rows.append({
                "condition": c, "label": lib.LABELS[c], "depth": d, "channels": g.shape[1],
                "below": lib.fraction_below(g, tau), "below_init": lib.fraction_below(g0, tau),
                "negative": float(np.mean(g < 0)), "gamma_mean": float(np.mean(g)),
                "abs_gamma_median": float(np.median(np.abs(g))),
                "beta_mean": float(np.mean(b)), "beta_sd": float(np.std(b)), "beta_negative": float(np.mean(b < 0)),
            })
            for t in cfg.ablation_thresholds:
                ab = [next(a for a in r["ablation"] if np.isclose(a["threshold"], t)) for r in sel]
                ablation_rows.append({
                    "condition": c, "label": lib.LABELS[c], "depth": d, "threshold": t,
                    "off": float(np.mean([a["channels_off"] for a in ab])) / g.shape[1],
                    "acc": float(np.mean([a["acc_full"] for a in ab])),
                    "acc_ablated": float(np.mean([a["acc"] for a in ab])),
                    "acc_random": float(np.mean([a["acc_random"] for a in ab])),
                })
    for r in ablation_rows:
        r["drop"] = r["acc"] - r["acc_ablated"]
        r["drop_random"] = r["acc"] - r["acc_random"]
    m["gamma_table"], m["ablation_table"] = gamma_rows, ablation_rows
    m["below"] = {c: {str(r["depth"]): r["below"] for r in gamma_rows if r["condition"] == c} for c in ("bn", "all")}
    m["below_init"] = lib.mean_over([r["below_init"] for r in gamma_rows])
    at_tau = [r for r in ablation_rows if np.isclose(r["threshold"], tau)]
    m["off"] = {c: {str(r["depth"]): r["off"] for r in at_tau if r["condition"] == c} for c in ("bn", "all")}
    m["drop"] = {c: {str(r["depth"]): r["drop"] for r in at_tau if r["condition"] == c} for c in ("bn", "all")}
    m["drop_random"] = {c: {str(r["depth"]): r["drop_random"] for r in at_tau if r["condition"] == c}
                        for c in ("bn", "all")}
    m["beta"] = {c: {str(r["depth"]): {"mean": r["beta_mean"], "sd": r["beta_sd"], "negative": r["beta_negative"]}
                     for r in gamma_rows if r["condition"] == c} for c in ("bn", "all")}

    # 4. γ init U[0, 1) vs 1 (ResNet-variant_depth)
    init_rows = []
    for c in ("all", "bn"):
        for gi in GAMMA_INITS:
            sel = _select(rows, condition=c, depth=cfg.variant_depth, width=cfg.width, gamma_init=gi, norm_positions="all")
            g = gammas_of(sel)
            arrays[f"gamma_{c}_init_{gi}"] = g
            init_rows.append({"condition": c, "label": lib.LABELS[c], "gamma_init": gi,
                              "init": "U[0, 1)" if gi == "uniform" else "1", "acc": _mean(sel, "test_acc"),
                              "train_acc": _mean(sel, "train_acc"), "below": lib.fraction_below(g, tau),
                              "gamma_mean": float(np.mean(g)), "gamma_sd": float(np.std(g))})
    m["init_table"] = init_rows
    m["init_acc"] = {f"{r['condition']}_{r['gamma_init']}": r["acc"] for r in init_rows}
    m["init_below"] = {f"{r['condition']}_{r['gamma_init']}": r["below"] for r in init_rows}

    # 5. fewer BN layers (all trained): accuracy, and time per step of every variant
    speed = step_times(cfg, device)
    m["step_ms"] = speed
    m["step_relative"] = {k: v / speed["all/all"] for k, v in speed.items()}
    removal_rows = []
    for p in NORM_POSITIONS:
        sel = _select(rows, condition="all", depth=cfg.variant_depth, width=cfg.width, gamma_init="uniform",
                      norm_positions=p)
        removal_rows.append({
            "positions": p, "label": {"all": "after every conv", "second": "after every second conv", "none": "none"}[p],
            "bn_channels": sel[0]["bn_channels"], "acc": _mean(sel, "test_acc"), "train_acc": _mean(sel, "train_acc"),
            "ms_per_step": speed[f"all/{p}"], "relative": speed[f"all/{p}"] / speed["all/all"],
            "diverged": sum(r["diverged_step"] >= 0 for r in sel),
        })
    m["removal_table"] = removal_rows
    m["removal_acc"] = {r["positions"]: r["acc"] for r in removal_rows}
    m["removal_diverged"] = {r["positions"]: r["diverged"] for r in removal_rows}

    # 6. gradient magnitudes over training (all trained, per depth)
    grad_rows = []
    for d in cfg.depths:
        sel = _select(rows, condition="all", depth=d, width=cfg.width, **base)
        if not sel or "grad_steps" not in arrays_of[sel[0]["key"]].arrays:
            continue
        arrays["grad_steps"] = arrays_of[sel[0]["key"]].arrays["grad_steps"]
        row: dict[str, Any] = {"depth": d}
        for key in lib.GRADIENT_KEYS:
            trace = gammas_of(sel, f"grad_{key}")  # (seeds, T)
            arrays[f"grad_{key}_{d}"] = trace
            row[key] = float(np.mean(trace))
        row["ratio_gamma_conv"] = row["mean_abs_gamma"] / row["mean_abs_conv"]
        row["ratio_beta_conv"] = row["mean_abs_beta"] / row["mean_abs_conv"]
        row["ratio_rel_gamma_conv"] = row["relative_gamma"] / row["relative_conv"]
        grad_rows.append(row)
    m["grad_table"] = grad_rows
    m["grad_ratio"] = {str(r["depth"]): r["ratio_gamma_conv"] for r in grad_rows}
    m["grad_ratio_beta"] = {str(r["depth"]): r["ratio_beta_conv"] for r in grad_rows}
    m["grad_ratio_rel"] = {str(r["depth"]): r["ratio_rel_gamma_conv"] for r in grad_rows}

    # 7. the paper, a re-implementation, and ours
    paper_rows = [{"source": "Frankle et al., abstract", "dataset": PAPER_HEADLINE["dataset"],
                   "epochs": PAPER_HEADLINE["epochs"], "depth": PAPER_HEADLINE["depth"], "acc": PAPER_HEADLINE["acc"]}]
    paper_rows += [{"source": "TF re-implementation (secondary)", "dataset": "CIFAR-10 (45k train)", "epochs": 160,
                    "depth": d, "acc": a} for d, a in TF_REPRODUCTION.items()]
    if "bn" in cfg.conditions:
        size = first["image_size"]
        paper_rows += [{"source": "ours", "dataset": f"{cfg.dataset} {size}×{size}, {first['train_images']:,} train",
                        "epochs": m["epochs"], "depth": d, "acc": 100 * m["acc"]["bn"][str(d)]} for d in cfg.depths]
    m["paper_table"] = paper_rows
    m["paper_headline"] = PAPER_HEADLINE
    return Outcome(metrics=m, arrays=arrays, datasets=[cfg.dataset])


# ------------------------------------------------------------------ figures
COLORS = {"all": "#d62728", "bn": "#1f77b4", "bn+output": "#17becf", "output": "#7f7f7f", "random": "#ff7f0e"}
"""One colour per condition, on every figure of the chapter."""


def _spread(values: Sequence[int], most: int) -> list[int]:
    """At most ``most`` of ``values``, evenly spread, always with the first and the last."""
    values = list(values)
    if len(values) <= most:
        return values
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, most)).astype(int))
    return [values[i] for i in idx]


def figure_series(res: results.Result) -> Figure:
    """Left: test accuracy against depth, every condition. Right: accuracy against the number of trained
    parameters, for the depth series and the width series (BN-only and all trained)."""
    import matplotlib.pyplot as plt

    from bnbook.plots import seed_band

    a, m = res.arrays, res.metrics
    dots = {"band": None, "seed_dots": True}  # the mean over seeds as a line, each seed as a faint dot
    conditions = [r["condition"] for r in m["condition_table"][:: len(m["depths"])]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, c in enumerate(conditions):
        seed_band(ax1, a["depths"], a["depth_acc"][i], COLORS[c], lib.LABELS[c], marker="o", **dots)
    ax1.set(xlabel="depth N of ResNet-N", ylabel="test accuracy", xticks=a["depths"],
            title=f"depth series (W = {m['width']})")
    ax1.legend(fontsize=8)
    for i, c in enumerate(conditions):
        if c in ("bn", "all"):
            seed_band(ax2, a["depth_trainable"][i], a["depth_acc"][i], COLORS[c], f"{lib.LABELS[c]}: deeper",
                      marker="o", **dots)
    for i, c in enumerate(m["width_acc"]):
        seed_band(ax2, a["width_trainable"][i], a["width_acc"][i], COLORS[c], f"{lib.LABELS[c]}: wider",
                  marker="s", ls="--", **dots)
    ax2.set(xscale="log", xlabel="trained parameters", ylabel="test accuracy",
            title=f"depth series vs width series (ResNet-{m['width_depth']})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_gamma(res: results.Result) -> Figure:
    """γ (top) and β (bottom) after training, BN-only vs all trained, one column per depth (at most four,
    spread over the series); the dashed line is the threshold below which a γ counts as switched off."""
    import matplotlib.pyplot as plt

    a, m = res.arrays, res.metrics
    depths = _spread(m["depths"], 4)
    fig, axes = plt.subplots(2, len(depths), figsize=(2.6 * len(depths) + 0.6, 5.2), squeeze=False)
    for j, d in enumerate(depths):
        for c in ("all", "bn"):
            if f"gamma_{c}_{d}" not in a:
                continue
            for row, name in enumerate(("gamma", "beta")):
                values = a[f"{name}_{c}_{d}"].ravel()
                axes[row, j].hist(values, bins=40, color=COLORS[c], alpha=0.55, label=lib.LABELS[c], density=True)
        axes[0, j].axvline(m["gamma_threshold"], color="k", ls="--", lw=1)
        axes[0, j].axvline(-m["gamma_threshold"], color="k", ls="--", lw=1)
        axes[0, j].set(title=f"ResNet-{d}", xlabel="γ")
        axes[1, j].set(xlabel="β")
    axes[0, 0].set_ylabel("density")
    axes[1, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_ablation(res: results.Result) -> Figure:
    """Accuracy lost when γ is set to 0 on the channels with |γ| below each threshold (solid) and on as
    many randomly chosen channels (dotted), against the fraction of channels switched off."""
    import matplotlib.pyplot as plt

    m = res.metrics
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    markers = "os^Dv<>"
    for c in ("bn", "all"):
        for j, d in enumerate(m["depths"]):
            rows = [r for r in m["ablation_table"] if r["condition"] == c and r["depth"] == d]
            if not rows:
                continue
            off = [r["off"] for r in rows]
            ax.plot(off, [r["drop"] for r in rows], marker=markers[j % 7], color=COLORS[c],
                    label=f"{lib.LABELS[c]}, ResNet-{d}")
            ax.plot(off, [r["drop_random"] for r in rows], marker=markers[j % 7], color=COLORS[c], ls=":",
                    alpha=0.6)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set(xlabel="fraction of BN channels with γ set to 0", ylabel="accuracy lost",
           title="solid: smallest |γ|; dotted: random channels")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def figure_gradients(res: results.Result) -> Figure:
    """Mean |∂L/∂θ| per entry of γ, β, conv weights and the output layer over training (all trained),
    for the shallowest and the deepest net, and ‖∂L/∂θ‖/‖θ‖ of the deepest in the last panel."""
    import matplotlib.pyplot as plt

    a, m = res.arrays, res.metrics
    depths = _spread([r["depth"] for r in m["grad_table"]], 2)
    steps = a["grad_steps"]
    groups = {"gamma": ("γ", "#1f77b4"), "beta": ("β", "#17becf"), "conv": ("conv weights", "#d62728"),
              "output": ("output layer", "#7f7f7f")}
    fig, axes = plt.subplots(1, len(depths) + 1, figsize=(3.2 * (len(depths) + 1), 3.4), squeeze=False)
    for j, d in enumerate(depths):
        ax = axes[0, j]
        for g, (label, color) in groups.items():
            ax.plot(steps, a[f"grad_mean_abs_{g}_{d}"].mean(0), color=color, label=label)
        ax.set(yscale="log", xlabel="step", title=f"ResNet-{d}: mean |gradient|")
    axes[0, 0].legend(fontsize=8)
    ax = axes[0, -1]
    d = depths[-1]
    for g in ("gamma", "conv", "output"):
        label, color = groups[g]
        ax.plot(steps, a[f"grad_relative_{g}_{d}"].mean(0), color=color, label=label)
    ax.set(yscale="log", xlabel="step", title=f"ResNet-{d}: ‖gradient‖ / ‖θ‖")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ numbers and phrases for the prose
def trend(values: Sequence[float], tolerance: float = 0.0) -> str:
    """``"rises"`` / ``"falls"`` if ``values`` (in series order) change monotonically by more than
    ``tolerance`` at each step, ``"is measured at one point only"`` for one value, else
    ``"does not change monotonically"``."""
    v = [float(x) for x in values]
    if len(v) < 2:
        return "is measured at one point only"
    steps = np.diff(v)
    if (steps > tolerance).all():
        return "rises"
    if (steps < -tolerance).all():
        return "falls"
    return "does not change monotonically"


def comparison(a: float, b: float, more: str = "higher", less: str = "lower", same: str = "the same") -> str:
    """``more`` if ``a > b``, ``less`` if ``a < b``, else ``same``."""
    return more if a > b else less if a < b else same


def prose_numbers(res: results.Result) -> list[tuple[str, Any, str]]:
    """``(glue name, value, format)`` for the chapter's prose: the shallowest (``lo``) and deepest (``hi``)
    nets of the depth series, the narrowest and widest of the width series, and phrases that say what
    the data show (a trend is only called a trend if every step of the series goes the same way)."""
    m = res.metrics
    depths, widths = m["depths"], m["widths"]
    lo, hi = str(depths[0]), str(depths[-1])
    wlo, whi = str(widths[0]), str(widths[-1])
    acc = m["acc"]
    conds = list(acc)
    out: list[tuple[str, Any, str]] = [
        ("d_lo", depths[0], "d"), ("d_hi", depths[-1], "d"), ("w_lo", widths[0], "d"), ("w_hi", widths[-1], "d"),
        ("n_depths", len(depths), "d"), ("n_widths", len(widths), "d"),
        ("width", m["width"], "d"), ("width_depth", m["width_depth"], "d"), ("variant_depth", m["variant_depth"], "d"),
        ("train_images", m["train_images"], ","), ("test_images", m["test_images"], ","),
        ("image_size", m["image_size"], "d"), ("steps", m["steps"], ","), ("batch", m["batch_size"], "d"),
        ("epochs", m["epochs"], ".2g"), ("seeds", m["seeds"], "d"), ("units", m["units"], "d"),
        ("groups", m["groups"], "d"), ("tau", m["gamma_threshold"], "g"), ("lr", m["lr"], "g"),
        ("diverged_units", m["diverged_units"], "d"), ("grid_wall", m["grid_wall_s"], ".0f"),
        ("unit_train", m["unit_train_s"], ".0f"), ("runtime", res.record["runtime_s"], ".0f"),
        ("below_init", m["below_init"], ".1%"), ("paper_acc", m["paper_headline"]["acc"], ".0f"),
        ("paper_depth", m["paper_headline"]["depth"], "d"), ("paper_epochs", m["paper_headline"]["epochs"], "d"),
        ("changed_ok", "holds for every unit" if m["changed_ok"] else "fails for at least one unit", ""),
        ("random_count_ok", "exactly" if m["random_equals_bn"] else "not exactly", ""),
        ("paper_blocks_ratio", (PAPER_DEPTHS[-1] - 2) / (PAPER_DEPTHS[0] - 2), ".0f"),
    ]
    for c in conds:
        key = c.replace("+", "_")
        out += [(f"acc_{key}_lo", acc[c][lo], ".1%"), (f"acc_{key}_hi", acc[c][hi], ".1%"),
                (f"gap_{key}_hi", m["gap"][c][hi], "+.1%"), (f"gap_{key}_lo", m["gap"][c][lo], "+.1%"),
                (f"trainable_{key}_lo", m["trainable"][c][lo], ","), (f"trainable_{key}_hi", m["trainable"][c][hi], ",")]
    out += [("params_lo", m["parameters"][lo], ","), ("params_hi", m["parameters"][hi], ","),
            ("channels_lo", m["bn_channels"][lo], ","), ("channels_hi", m["bn_channels"][hi], ",")]
    if "bn" in acc:
        out += [("share_bn_lo", m["trainable"]["bn"][lo] / m["parameters"][lo], ".2%"),
                ("share_bn_hi", m["trainable"]["bn"][hi] / m["parameters"][hi], ".2%"),
                ("bn_trend", trend([acc["bn"][str(d)] for d in depths]), "")]
    if "output" in acc:
        out += [("output_trend", trend([acc["output"][str(d)] for d in depths]), "")]
    if "bn" in acc and "random" in acc:
        above = [acc["bn"][str(d)] > acc["random"][str(d)] for d in depths]
        out += [("bn_vs_random", "above the random-weights control at every depth" if all(above)
                 else "below the random-weights control at every depth" if not any(above)
                 else "above the random-weights control at some depths and below it at others", "")]
    if "bn" in acc and "output" in acc:
        out += [("bn_vs_output_hi", comparison(acc["bn"][hi], acc["output"][hi], "above", "below", "level with"), ""),
                ("bn_vs_output_lo", comparison(acc["bn"][lo], acc["output"][lo], "above", "below", "level with"), "")]
    for c, series in m["width_acc"].items():
        key = c.replace("+", "_")
        out += [(f"wacc_{key}_lo", series[wlo], ".1%"), (f"wacc_{key}_hi", series[whi], ".1%"),
                (f"wtrainable_{key}_lo", m["width_trainable"][c][wlo], ","),
                (f"wtrainable_{key}_hi", m["width_trainable"][c][whi], ","),
                (f"wtrend_{key}", trend([series[str(w)] for w in widths]), "")]
    for c in ("bn", "all"):
        if hi in m["below"].get(c, {}):
            out += [(f"below_{c}_hi", m["below"][c][hi], ".1%"), (f"below_{c}_lo", m["below"][c][lo], ".1%"),
                    (f"off_{c}_hi", m["off"][c][hi], ".1%"), (f"drop_{c}_hi", m["drop"][c][hi], "+.1%"),
                    (f"drop_random_{c}_hi", m["drop_random"][c][hi], "+.1%"),
                    (f"beta_mean_{c}_hi", m["beta"][c][hi]["mean"], "+.3f"),
                    (f"beta_sd_{c}_hi", m["beta"][c][hi]["sd"], ".3f"),
                    (f"beta_neg_{c}_hi", m["beta"][c][hi]["negative"], ".0%")]
    gneg = {r["condition"]: r["negative"] for r in m["gamma_table"] if str(r["depth"]) == hi}
    for c, v in gneg.items():
        out += [(f"gamma_neg_{c}_hi", v, ".1%")]
    big = [r for r in m["ablation_table"] if r["threshold"] == max(x["threshold"] for x in m["ablation_table"])]
    if big:
        out += [("tau_max", big[0]["threshold"], "g"),
                ("max_drop", max(r["drop"] for r in big), "+.1%"),
                ("min_drop_random", min(r["drop_random"] for r in big), "+.1%"),
                ("max_off", max(r["off"] for r in big), ".0%")]
    for key, value in m["init_acc"].items():
        out += [(f"init_acc_{key}", value, ".1%")]
    for key, value in m["init_below"].items():
        out += [(f"init_below_{key}", value, ".1%")]
    for c in ("all", "bn"):
        out += [(f"init_effect_{c}", comparison(m["init_acc"][f"{c}_one"], m["init_acc"][f"{c}_uniform"]), "")]
    for p, v in m["removal_acc"].items():
        out += [(f"removal_acc_{p}", v, ".1%"), (f"removal_div_{p}", m["removal_diverged"][p], "d")]
    for key, v in m["step_ms"].items():
        k = key.replace("/", "_").replace("+", "_")
        out += [(f"ms_{k}", v, ".1f"), (f"rel_{k}", m["step_relative"][key], ".2f")]
    out += [("bn_saving", 1 - m["step_relative"]["bn/all"], ".0%")]
    if m["grad_table"]:
        ratios = [r["ratio_gamma_conv"] for r in m["grad_table"]]
        rel = [r["ratio_rel_gamma_conv"] for r in m["grad_table"]]
        out += [("grad_ratio_min", min(ratios), ".1f"), ("grad_ratio_max", max(ratios), ".1f"),
                ("grad_rel_min", min(rel), ".2f"), ("grad_rel_max", max(rel), ".2f"),
                ("grad_rel_phrase", "smaller than the convolution weights' at every depth" if max(rel) < 1
                 else "larger than the convolution weights' at every depth" if min(rel) > 1
                 else "smaller than the convolution weights' at some depths and larger at others", "")]
    # the paper profile's protocol, from its config
    pp = BnOnlyConfig.from_params("paper")
    epoch = 50_000 // pp.batch_size  # CIFAR-10's 50,000 training images, last partial batch dropped
    milestones = [round(f * pp.steps) for f in pp.milestones]
    out += [("pp_steps", pp.steps, ","), ("pp_batch", pp.batch_size, "d"), ("pp_epochs", pp.steps / epoch, ".0f"),
            ("pp_epoch_steps", epoch, "d"), ("pp_lr", pp.lr, "g"), ("pp_momentum", pp.momentum, "g"),
            ("pp_gamma", train.FitConfig.__dataclass_fields__["lr_gamma"].default, "g"), ("pp_m1", milestones[0], ","), ("pp_m2", milestones[1], ","),
            ("pp_e1", milestones[0] / epoch, ".0f"), ("pp_e2", milestones[1] / epoch, ".0f"),
            ("pp_wd", pp.weight_decay, "g"), ("pp_d_lo", pp.depths[0], "d"), ("pp_d_hi", pp.depths[-1], "d")]
    # phrases whose wording depends on the data
    if "bn" in m["below"] and m["below"]["bn"]:
        f = max(m["below"]["bn"].values())
        out += [("below_bn_max", f, ".1%"),
                ("third_phrase", "far fewer than a third" if f < 0.2 else "fewer than a third" if f < 0.28
                 else "about a third" if f <= 0.4 else "more than a third", "")]
    if hi in m["beta"].get("bn", {}) and hi in m["beta"].get("all", {}):
        out += [("beta_width_phrase", comparison(m["beta"]["all"][hi]["sd"], m["beta"]["bn"][hi]["sd"],
                                                 "wider", "narrower", "as wide"), "")]
    if m["ablation_table"]:
        less = all(r["drop"] < r["drop_random"] for r in m["ablation_table"])
        out += [("ablation_phrase", "at every threshold and depth, zeroing them cost less accuracy than zeroing "
                 "as many random channels" if less else "at some thresholds or depths, zeroing them cost as much "
                 "accuracy as zeroing as many random channels, or more", ""),
                ("ablation_verdict", "matter less to the net than randomly chosen channels" if less
                 else "do not consistently matter less to the net than randomly chosen channels", "")]
    if m["grad_table"]:
        out += [("grad_entry_phrase", "holds here too" if min(ratios) > 1 else "does not hold at every depth here", ""),
                ("grad_entry_verdict", "receive larger" if min(ratios) > 1 else "do not consistently receive larger", "")]
    if "all" in m["removal_acc"] and "none" in m["removal_acc"]:
        gap_none = m["removal_acc"]["all"] - m["removal_acc"]["none"]
        out += [("removal_none_phrase", "well below the net with BN: at this learning rate and initialisation the "
                 "BN-free ResNet trains poorly, and would need settings of its own" if gap_none > 0.05
                 else "close to the net with BN", "")]
    if "bn" in acc and "random" in acc:
        out += [("diff_bn_random_hi", acc["bn"][hi] - acc["random"][hi], "+.1%"),
                ("bn_random_verdict", "beats" if all(above) else "does not consistently beat", "")]
    spread = np.nanmax(res.arrays["depth_acc"], axis=-1) - np.nanmin(res.arrays["depth_acc"], axis=-1)
    out += [("seed_spread_max", float(np.nanmax(spread)), ".1%"),
            ("init_diff_bn", m["init_acc"]["bn_one"] - m["init_acc"]["bn_uniform"], "+.1%")]
    gaps = {c: max(m["gap"][c].values()) for c in conds}
    out += [("gap_max_bn", gaps.get("bn", float("nan")), "+.1%"), ("gap_max_all", gaps.get("all", float("nan")), "+.1%")]
    if "bn" in gaps and "all" in gaps:
        out += [("gap_phrase", comparison(gaps["bn"], gaps["all"], "larger than", "smaller than", "equal to"), "")]
    return out
