"""The units of chapter 8's grid: one trained ResNet per (depth, width, condition, γ init, BN positions, seed).

A unit is a :class:`UnitConfig`; :func:`compute_unit` computes its result (an
:class:`~bnbook.results.Outcome`, cached by :func:`bnbook.results.cached` in the folder
:data:`UNITS_CHAPTER`). The units that differ only in their seed form a *group*
(:func:`group_key`): :func:`compute_unit` trains the whole group in one
:func:`bnbook.train.fit` call and stores every sibling's result too, so a group is trained once.
A unit's config names the seeds trained with it (``seeds_together``), so its numbers are the same
however the grid is dispatched — by the chapter (:mod:`bnbook.experiments.bn_only`) or as separate
jobs (:mod:`bnbook.sweep`).

This module holds only what a unit's computation runs, so that its result keys (which hash the
code a computation depends on) do not change when the chapter's summary, figures or prose helpers do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from bnbook import bn_only as lib
from bnbook import data as datasets
from bnbook import nets, results, train
from bnbook.config import ChapterConfig, stable_hash
from bnbook.env import num_threads
from bnbook.errors import BnbookError
from bnbook.results import Outcome

UNITS_CHAPTER = "08-bn-only-units"  # the results folder of the units
GAMMA_INITS = ("uniform", "one")
NORM_POSITIONS = nets.RESNET_NORM_POSITIONS  # ("all", "second", "none")


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


# ------------------------------------------------------------------ computing a unit
@dataclasses.dataclass
class _Store:
    """Outcomes of siblings trained alongside a unit, waiting to be written by ``results.cached``."""

    outcomes: dict[str, Outcome] = dataclasses.field(default_factory=dict)


_SIBLINGS = _Store()


def _unit_id(unit: UnitConfig, device: torch.device) -> str:
    cfg = unit.to_dict()
    cfg["device"] = device.type
    return stable_hash(cfg)


def load_data(unit: UnitConfig, device: torch.device) -> datasets.Dataset:
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
