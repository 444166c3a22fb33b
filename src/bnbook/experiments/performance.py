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
    suffix = ", default threads" if name.endswith("_all") else ""
    name = name.removesuffix("_all")
    if name.startswith("engine_k"):
        k = int(name.removeprefix("engine_k"))
        return f"engine, {k} model{'s' if k > 1 else ''} stacked{suffix}"
    return LABELS.get(name, name) + suffix


@dataclasses.dataclass(frozen=True)
class PerformanceConfig(ChapterConfig):
    """Benchmark settings; defaults are the ``quick`` profile."""

    dataset: str = "mnist5k"  # the data every contender trains on
    steps: int = 300  # timed steps per measurement
    warmup: int = 20  # untimed steps before each measurement
    stacks: tuple[int, ...] = (1, 8, 16)  # numbers of models the engine trains at once
    repeats: int = 3  # interleaved repetitions (best and median reported)
    threads: int = 1  # CPU threads for every contender: small GEMMs run faster on one
    all_threads_too: bool = True  # also time tutorial and largest stack with torch's default threads

    profiles: ClassVar = {
        "smoke": {"steps": 10, "warmup": 2, "stacks": (1, 2), "repeats": 1, "all_threads_too": False},
        "paper": {"steps": 1_000, "repeats": 5, "stacks": (1, 8, 16, 64)},
    }


def settings(cfg: PerformanceConfig) -> bench.BenchSettings:
    """The benchmark settings of ``cfg``."""
    return bench.BenchSettings(dataset=cfg.dataset, steps=cfg.steps, warmup=cfg.warmup, stacks=tuple(cfg.stacks),
                               repeats=cfg.repeats, threads=cfg.threads, all_threads_too=cfg.all_threads_too)


def run(cfg: PerformanceConfig, device: torch.device) -> Outcome:
    """Run the benchmark; the summary is the metrics, the raw timings the arrays."""
    summary = bench.run_benchmark(settings(cfg), device)
    return Outcome(metrics=summary, arrays=bench.samples_array(summary), datasets=[cfg.dataset])


def figure(res: Result):
    """Model-steps per second of each contender (bar: best, dots: every repeat) against the compute limits."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    m = res.metrics
    names = [row["contender"] for row in m["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(names) + 1.2))
    y = np.arange(len(names))
    colors = [PALETTE["no_bn"] if n.startswith("tutorial") else PALETTE["bn"] for n in names]
    ax.barh(y, [m["best"][n] for n in names], color=colors, alpha=0.75)
    for i, n in enumerate(names):
        ax.plot(m["samples"][n], [i] * len(m["samples"][n]), "o", color="k", ms=3)
    per_thread_limit = m["sgemm_gflops_used_threads"] * 1e9 / m["flops_per_model_step"]
    for x, ls, text in [
        (m["compute_limit_model_steps_per_s"], "--", "compute limit"),
        (per_thread_limit, ":", f"limit at {m['threads']} thread{'s' if m['threads'] != 1 else ''}"),
    ]:
        ax.axvline(x, color=PALETTE["ref"], ls=ls, lw=1)
        ax.text(x, -0.5, f"{text} ", color=PALETTE["ref"], va="top", ha="right", fontsize=7, rotation=90)
    ax.set_yticks(y, [label(n) for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)  # first contender on top
    ax.set_xlabel("model-steps per second (higher is better)")
    fig.tight_layout()
    return fig
