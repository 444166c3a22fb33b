"""The performance appendix: the engine benchmark of :mod:`bnbook.bench`, run under the book's profiles."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from bnbook import bench
from bnbook.config import ChapterConfig
from bnbook.results import Outcome, Result

LABELS = {"tutorial": "tutorial loop", "indexed": "engine, 1 model, autograd"}


def label(name: str) -> str:
    """Human-readable name of a contender."""
    if name.startswith("engine_k"):
        k = int(name.removeprefix("engine_k"))
        return f"engine, {k} model{'s' if k > 1 else ''} stacked"
    return LABELS.get(name, name)


@dataclasses.dataclass(frozen=True)
class PerformanceConfig(ChapterConfig):
    """Benchmark settings; defaults are the ``quick`` profile."""

    dataset: str = "mnist5k"  # the data every contender trains on
    steps: int = 300  # timed steps per measurement
    warmup: int = 20  # untimed steps before each measurement
    stacks: tuple[int, ...] = (1, 8, 16)  # numbers of models the engine trains at once
    repeats: int = 3  # interleaved repetitions (best and median reported)
    threads: int = 1  # CPU threads for every contender: small GEMMs run faster on one

    profiles: ClassVar = {
        "smoke": {"steps": 10, "warmup": 2, "stacks": (1, 2), "repeats": 1},
        "paper": {"steps": 1_000, "repeats": 5, "stacks": (1, 8, 16, 64)},
    }


def settings(cfg: PerformanceConfig) -> bench.BenchSettings:
    """The benchmark settings of ``cfg``."""
    return bench.BenchSettings(dataset=cfg.dataset, steps=cfg.steps, warmup=cfg.warmup, stacks=tuple(cfg.stacks),
                               repeats=cfg.repeats, threads=cfg.threads)


def run(cfg: PerformanceConfig, device: torch.device) -> Outcome:
    """Run the benchmark; the summary is the metrics, the raw timings the arrays."""
    summary = bench.run_benchmark(settings(cfg), device)
    return Outcome(metrics=summary, arrays=bench.samples_array(summary), datasets=[cfg.dataset])


def figure(res: Result):
    """Model-steps per second of each contender (bar: best, dots: every repeat) against the compute limit."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    m = res.metrics
    names = [row["contender"] for row in m["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(names) + 1.2))
    y = np.arange(len(names))
    colors = [PALETTE["no_bn"] if n == "tutorial" else PALETTE["bn"] for n in names]
    ax.barh(y, [m["best"][n] for n in names], color=colors, alpha=0.75)
    for i, n in enumerate(names):
        ax.plot(m["samples"][n], [i] * len(m["samples"][n]), "o", color="k", ms=3)
    ax.axvline(m["compute_limit_model_steps_per_s"], color=PALETTE["ref"], ls="--", lw=1)
    ax.text(m["compute_limit_model_steps_per_s"], len(names) - 0.45, " compute limit", color=PALETTE["ref"],
            va="center", fontsize=8)
    ax.set_yticks(y, [label(n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("model-steps per second (higher is better)")
    fig.tight_layout()
    return fig
