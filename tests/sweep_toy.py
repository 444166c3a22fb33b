"""A toy chapter grid for tests/test_sweep.py: importable by the jobs' processes (the test puts this folder on PYTHONPATH)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from bnbook import results, sweep
from bnbook.config import ChapterConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig(ChapterConfig):
    """One unit of a toy grid: ``x`` decides the numbers (and 99 makes it fail)."""

    x: int = 1
    profiles: ClassVar = {}


def toy_compute(cfg: ToyConfig, device: torch.device) -> results.Outcome:
    """Five seeded normal draws times ``x``; raises for ``x == 99``."""
    if cfg.x == 99:
        raise RuntimeError("unit x=99 is broken on purpose")
    gen = torch.Generator().manual_seed(cfg.seed)
    values = torch.randn(5, generator=gen) * cfg.x
    return results.Outcome(metrics={"sum": float(values.sum())}, arrays={"values": values.numpy()},
                           datasets=["synthetic"])


def toy_units(xs=(1, 2, 3)) -> list[sweep.Unit]:
    """The grid: one unit per ``x``."""
    return [sweep.Unit("toy-grid", ToyConfig(profile="smoke", device="cpu", seed=7, x=x), toy_compute, f"x={x}")
            for x in xs]
