"""Chapter 8, "Training BatchNorm and only BatchNorm" (Frankle, Schwab & Morcos, 2020).

OpenLTH-shaped CIFAR ResNets (:class:`bnbook.nets.ResNet`) are trained under the five
conditions of :data:`bnbook.bn_only.CONDITIONS` — all parameters; BN's γ and β only; BN and
the output layer; the output layer only; the same number of random conv weights per channel
as BN-only trains — along a depth series and a width series, and then looked into: γ and β
after training, the γ ablation, γ's initialisation, the gradients BN's parameters receive,
the train–test gap, and ResNets with fewer BN layers.

**The grid is a list of independently cached units**, one result per (depth, width,
condition, γ init, BN positions, seed): :func:`unit_configs` lists them for a chapter config,
:func:`compute_unit` computes one, :func:`units` wraps them for :mod:`bnbook.sweep` (which
dispatches a grid to local processes or a Slurm cluster), and :func:`run` — the chapter's own
experiment — computes the missing units here and summarises all of them. A partial `paper`
run is therefore reusable: whatever finished is cached.

**Seeds are trained together.** The units that differ only in their seed form a *group*
(:func:`group_key`); :func:`compute_unit` trains all of its group's seeds in one
:func:`bnbook.train.fit` call (the engine runs them as one batch of models) and stores every
sibling's result as well. A unit's config names the seeds trained with it
(``seeds_together``), so its numbers are the same however the grid is dispatched.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from bnbook import bn_only as lib
from bnbook import data as datasets
from bnbook import nets, results, train
from bnbook.config import ChapterConfig, stable_hash
from bnbook.env import num_threads
from bnbook.errors import BnbookError
from bnbook.results import Outcome

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from bnbook.sweep import Unit

CHAPTER = "08-bn-only"
UNITS_CHAPTER = "08-bn-only-units"  # the results folder of the units
GAMMA_INITS = ("uniform", "one")
NORM_POSITIONS = nets.RESNET_NORM_POSITIONS  # ("all", "second", "none")

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
    speed_steps: int = 10  # timed training steps per variant and round (time per step)
    speed_rounds: int = 3  # interleaved timing rounds (the median is reported)
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


@dataclasses.dataclass(frozen=True)
class UnitConfig(ChapterConfig):
    """One unit of the grid: one ResNet, one condition, one seed (``seed``), trained with ``seeds_together``."""

    dataset: str = "fashion-mnist"
    pool: int = 2
    train_size: int = 6_000
    test_size: int = 1_000
    train_eval_size: int = 1_000
    batch_size: int = 64
    steps: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[int, ...] = (150, 225)  # steps
    augment: str | None = None
    depth: int = 14
    width: int = 16
    condition: str = "all"
    gamma_init: str = "uniform"  # 'uniform' (γ ~ U[0, 1), OpenLTH) | 'one'
    norm_positions: str = "all"  # 'all' | 'second' | 'none' (nets.ResNet)
    seeds_together: tuple[int, ...] = (0, 1)  # the seeds of this unit's group, trained in one fit
    ablation_thresholds: tuple[float, ...] = ()  # γ ablation at each (units with norms)
    grad_every: int = 0  # gradient magnitudes every this many steps (0: not recorded)
    threads: int = 1  # CPU threads while training (0: torch's default)

    def __post_init__(self) -> None:
        for name in ("lr_milestones", "seeds_together", "ablation_thresholds"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (int, float)) else tuple(value))
        lib.check_condition(self.condition)
        if self.seed not in self.seeds_together:
            raise BnbookError(f"unit seed {self.seed} is not among seeds_together {self.seeds_together}")
        if self.gamma_init not in GAMMA_INITS or self.norm_positions not in NORM_POSITIONS:
            raise BnbookError(f"bad gamma_init {self.gamma_init!r} or norm_positions {self.norm_positions!r}")
        if self.condition == "random" and self.norm_positions != "all":
            raise BnbookError("the random-parameter control needs a BN after every conv (norm_positions='all')")
        if self.condition != "all" and self.norm_positions == "none":
            raise BnbookError(f"condition {self.condition!r} needs BN layers")

    @property
    def label(self) -> str:
        """A short name, e.g. ``resnet-14 w16 bn seed 0``."""
        extra = "" if self.gamma_init == "uniform" else " gamma=1"
        extra += "" if self.norm_positions == "all" else f" norms={self.norm_positions}"
        return f"resnet-{self.depth} w{self.width} {self.condition}{extra} seed {self.seed}"


def group_key(unit: UnitConfig) -> str:
    """Units with the same group key differ only in their seed and are trained in one ``fit``."""
    cfg = unit.to_dict()
    cfg.pop("seed")
    cfg.pop("device")
    return stable_hash(cfg)


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

    return [Unit(UNITS_CHAPTER, u, compute_unit, u.label) for u in unit_configs(cfg)]


# ------------------------------------------------------------------ one unit
@dataclasses.dataclass
class _Store:
    """Outcomes of siblings trained alongside a unit, waiting to be written by ``results.cached``."""

    outcomes: dict[str, Outcome] = dataclasses.field(default_factory=dict)


_SIBLINGS = _Store()


def _unit_id(unit: UnitConfig, device: torch.device) -> str:
    cfg = unit.to_dict()
    cfg["device"] = device.type
    return stable_hash(cfg)


def load_data(unit: UnitConfig | BnOnlyConfig, device: torch.device) -> datasets.Dataset:
    """The unit's dataset on ``device``: pooled and subset as its config says (the subset seed is fixed, 0)."""
    ds = datasets.load(unit.dataset, device)
    return lib.pooled(ds.subset(unit.train_size, unit.test_size, seed=0), unit.pool)


def make_model(unit: UnitConfig, seed: int, in_channels: int, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The unit's ResNet with ``seed``'s initialisation, frozen as its condition says."""
    model = nets.ResNet(depth=unit.depth, width=unit.width, in_channels=in_channels, num_classes=num_classes,
                        norm="bn", gamma_init=unit.gamma_init, norm_positions=unit.norm_positions, seed=seed)
    return lib.apply_condition(model.to(device), unit.condition, seed)


def train_group(unit: UnitConfig, device: torch.device) -> dict[int, Outcome]:
    """Train every seed of ``unit``'s group in one ``fit``; return each seed's :class:`Outcome`."""
    ds = load_data(unit, device)
    seeds = list(unit.seeds_together)
    models = [make_model(unit, s, ds.input_shape[0], ds.num_classes, device) for s in seeds]
    before = [lib.snapshot(m) for m in models]
    gamma_init = [lib.gammas(m) for m in models]
    trainable = [lib.trainable_summary(m) for m in models]
    fit_cfg = train.FitConfig(
        steps=unit.steps, batch_size=unit.batch_size, lr=unit.lr, momentum=unit.momentum,
        weight_decay=unit.weight_decay, lr_milestones=unit.lr_milestones, augment=unit.augment,
        log_every=unit.steps, eval_train=unit.train_eval_size, probe_size=1,
    )
    hooks = {"grad": lib.gradient_magnitude_hook(unit.grad_every)} if unit.grad_every else {}
    with num_threads(unit.threads or None):
        res = train.fit(models, ds, fit_cfg, seeds=seeds, hooks=hooks)
        return _outcomes(unit, ds, res, models, before, gamma_init, trainable, bool(hooks))


def _outcomes(unit: UnitConfig, ds: datasets.Dataset, res: train.FitResult, models: list[torch.nn.Module],
              before: list[dict[str, torch.Tensor]], gamma_init: list[np.ndarray], trainable: list[dict[str, int]],
              grads: bool) -> dict[int, Outcome]:
    """Each trained model's metrics (accuracies, what changed, the γ ablation) and arrays (γ, β, gradients)."""
    seeds = list(unit.seeds_together)
    x_test, y_test = ds.x_test, ds.y_test
    out: dict[int, Outcome] = {}
    for k, (seed, model) in enumerate(zip(seeds, models)):
        gamma, beta = lib.gammas(model), lib.betas(model)
        changed = lib.changed_entries(model, before[k])
        metrics: dict[str, Any] = {
            "label": unit.label, "depth": unit.depth, "width": unit.width, "condition": unit.condition,
            "gamma_init": unit.gamma_init, "norm_positions": unit.norm_positions, "seed": seed,
            "test_acc": float(res.test_acc[-1, k]), "test_acc_init": float(res.test_acc[0, k]),
            "train_acc": float(res.train_eval_acc[-1, k]), "train_loss": float(res.train_loss[-1, k]),
            "diverged_step": int(res.diverged_step[k]),
            "bn_channels": lib.bn_channels(model),
            **trainable[k],
            **{f"changed_{g}": n for g, n in changed.items()},
            "train_images": len(ds.y_train), "test_images": len(ds.y_test), "image_size": ds.input_shape[-1],
            "dataset_description": ds.description,
            "group_train_s": res.train_time_s, "models_together": len(seeds),
            "ms_per_step": 1e3 * res.train_time_s / unit.steps,  # for all models of the group together
        }
        if gamma.size and unit.ablation_thresholds:
            acc = lib.accuracy(model, x_test, y_test)  # the baseline, evaluated exactly as the ablated nets
            ablation = []
            for t in unit.ablation_thresholds:
                with lib.ablated(model, threshold=t) as n_off:
                    acc_off = lib.accuracy(model, x_test, y_test)
                with lib.ablated(model, count=n_off, seed=seed):
                    acc_rand = lib.accuracy(model, x_test, y_test)
                ablation.append({"threshold": t, "channels_off": n_off, "acc_full": acc, "acc": acc_off,
                                 "acc_random": acc_rand})
            metrics["ablation"] = ablation
        arrays: dict[str, np.ndarray] = {"gamma": gamma, "beta": beta, "gamma_init": gamma_init[k]}
        if grads:
            h = res.hooks["grad"]
            arrays["grad_steps"] = h["steps"]
            for key, values in h["values"].items():
                arrays[f"grad_{key}"] = values[:, k]
        out[seed] = Outcome(metrics=metrics, arrays=arrays, datasets=[unit.dataset])
    return out


def compute_unit(unit: UnitConfig, device: torch.device) -> Outcome:
    """The result of one unit. Trains its whole seed group (unless a sibling already did, in this
    process) and stores the siblings' results too, so that each group is trained once."""
    uid = _unit_id(unit, device)
    if uid in _SIBLINGS.outcomes:
        return _SIBLINGS.outcomes.pop(uid)
    outcomes = train_group(unit, device)
    siblings = [dataclasses.replace(unit, seed=s) for s in unit.seeds_together if s != unit.seed]
    for sib in siblings:
        _SIBLINGS.outcomes[_unit_id(sib, device)] = outcomes[sib.seed]
    try:
        for sib in siblings:
            results.cached(UNITS_CHAPTER, sib, compute_unit)
    finally:
        for sib in siblings:
            _SIBLINGS.outcomes.pop(_unit_id(sib, device), None)
    return outcomes[unit.seed]


def compute_grid(cfg: BnOnlyConfig) -> list[results.Result]:
    """Every unit's result (computing the missing ones here), in :func:`unit_configs` order."""
    return [results.cached(UNITS_CHAPTER, u, compute_unit) for u in unit_configs(cfg)]


# ------------------------------------------------------------------ time per step
SPEED_VARIANTS: tuple[tuple[str, str], ...] = (
    ("all", "all"), ("bn", "all"), ("output", "all"), ("random", "all"), ("all", "second"), ("all", "none"),
)
"""(condition, BN positions) of the timing: the conditions, and all-trained nets with fewer BN layers."""


def step_times(cfg: BnOnlyConfig, device: torch.device) -> dict[str, float]:
    """Median milliseconds per training step of one ResNet-``variant_depth`` per :data:`SPEED_VARIANTS`
    (key ``"condition/positions"``), measured in ``speed_rounds`` interleaved rounds of
    ``speed_steps`` steps through the engine, so that a slow moment of a shared machine hits every
    variant alike. The first round's steps include no warm-up: a separate warm-up fit runs first."""
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
    return {k: float(np.median(v)) for k, v in times.items()}


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
