"""The performance appendix: the engine benchmark of :mod:`bnbook.bench`, run under the book's profiles."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from bnbook import bench
from bnbook.config import ChapterConfig
from bnbook.results import Outcome, Result

NETS = {"cnn": "small CNN (chapter 5)", "resnet": "ResNet-20"}


def label(name: str) -> str:
    """Human-readable name of a contender (see :func:`bnbook.bench.contender`)."""
    c = bench.contender(name)
    if c["kind"] == "tutorial":
        text = "tutorial loop" + (", bf16 autocast" if c["bf16"] else "")
    elif c["kind"] == "indexed":
        text = "engine, 1 model, autograd"
    else:
        k = c["models"]
        text = f"engine, {k} model{'s' if k > 1 else ''} at once" + (", bf16 products" if c["bf16"] else "")
        text += ", the book's BN" if c["book_bn"] else ""
    return text + (", default threads" if c["all_threads"] else "")


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
    amp_too: bool = True  # also time tutorial and largest stack (and the CNNs) with bf16 products
    conv_dataset: str = "fashion-mnist"  # images of the small-CNN rows
    conv_steps: int = 30  # timed steps per measurement of the CNN rows (small CNN and ResNet-20)
    conv_seeds: tuple[int, ...] = (1, 4)  # numbers of CNNs the engine trains at once
    conv_repeats: int = 2  # interleaved repetitions of the CNN rows

    profiles: ClassVar = {
        "smoke": {"steps": 10, "warmup": 2, "stacks": (1, 2), "repeats": 1, "all_threads_too": False,
                  "conv_steps": 2, "conv_seeds": (2,), "conv_repeats": 1},
        "paper": {"steps": 1_000, "repeats": 5, "stacks": (1, 8, 16, 64), "conv_steps": 100,
                  "conv_seeds": (1, 8, 32), "conv_repeats": 3},
    }


def settings(cfg: PerformanceConfig) -> bench.BenchSettings:
    """The benchmark settings of ``cfg``."""
    return bench.BenchSettings(dataset=cfg.dataset, steps=cfg.steps, warmup=cfg.warmup, stacks=tuple(cfg.stacks),
                               repeats=cfg.repeats, threads=cfg.threads, all_threads_too=cfg.all_threads_too,
                               amp_too=cfg.amp_too)


def conv_settings(cfg: PerformanceConfig) -> bench.ConvBenchSettings:
    """The settings of the CNN rows of ``cfg``."""
    return bench.ConvBenchSettings(dataset=cfg.conv_dataset, steps=cfg.conv_steps, warmup=min(5, cfg.conv_steps),
                                   seeds=tuple(cfg.conv_seeds), repeats=cfg.conv_repeats, amp_too=cfg.amp_too)


def run(cfg: PerformanceConfig, device: torch.device) -> Outcome:
    """Run both benchmarks; the summaries are the metrics (the CNN rows under ``conv``), the raw timings the arrays."""
    summary = bench.run_benchmark(settings(cfg), device)
    summary["conv"] = bench.run_conv_benchmark(conv_settings(cfg), device)
    arrays = bench.samples_array(summary)
    for row in summary["conv"]["rows"]:
        arrays[f"conv_samples_{row['net']}_{row['contender']}"] = np.asarray(row["samples"], dtype=float)
    return Outcome(metrics=summary, arrays=arrays, datasets=[cfg.dataset, cfg.conv_dataset, "random-cifar-shaped"])


def figure(res: Result):
    """Model-steps per second of each contender (bar: best, dots: every repeat) against the compute limits."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    m = res.metrics
    names = [row["contender"] for row in m["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(names) + 1.2))
    y = np.arange(len(names))
    colors = [PALETTE["no_bn"] if n.startswith("tutorial") else PALETTE["bn"] for n in names]
    hatches = ["//" if bench.contender(n)["bf16"] else "" for n in names]  # bf16 products: hatched
    ax.barh(y, [m["best"][n] for n in names], color=colors, alpha=0.75, hatch=hatches, edgecolor="white")
    for i, n in enumerate(names):
        ax.plot(m["samples"][n], [i] * len(m["samples"][n]), "o", color="k", ms=3)
    per_thread_limit = m["sgemm_gflops_used_threads"] * 1e9 / m["flops_per_model_step"]
    limits = [
        (m["compute_limit_model_steps_per_s"], "--", "compute limit"),
        (per_thread_limit, ":", f"limit at {m['threads']} thread{'s' if m['threads'] != 1 else ''}"),
    ]
    if m.get("compute_limit_bf16_model_steps_per_s"):
        limits.append((m["compute_limit_bf16_model_steps_per_s"], "-.", "bf16 compute limit"))
    for x, ls, text in limits:
        ax.axvline(x, color=PALETTE["ref"], ls=ls, lw=1)
        ax.text(x, -0.5, f"{text} ", color=PALETTE["ref"], va="top", ha="right", fontsize=7, rotation=90)
    ax.set_yticks(y, [label(n) for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)  # first contender on top
    ax.set_xlabel("model-steps per second (higher is better)")
    fig.tight_layout()
    return fig


CONV_COLUMNS = {"net": "network", "label": "contender", "precision": "convolutions", "norm": "BN layer",
                "threads": "threads", "images_per_s": "images/s", "ratio": "× tutorial", "pct": "% of float32 conv throughput"}
CONV_FORMATS = {"precision": str, "norm": str, "threads": "d", "images_per_s": ",.0f", "ratio": ".2f", "pct": ".1f"}


def conv_rows(res: Result) -> list[dict]:
    """The CNN rows of the result, ready for :func:`bnbook.report.table`."""
    conv = res.metrics["conv"]
    return [{**r, "net": NETS[r["net"]], "label": label(r["contender"]), "threads": conv["threads"],
             "pct": 100 * r["fraction_of_conv_peak"]} for r in conv["rows"]]


def conv_gains(res: Result) -> dict[str, dict[str, float]]:
    """Per CNN, from images per second: ``ratio`` = best float32 engine (PyTorch's BN, as the tutorial) /
    tutorial; ``k`` = that engine with the most models at once / with the fewest (what batching models
    buys on this device); where measured, ``bf16`` = best bf16 engine / float32 tutorial, ``bf16_tut`` =
    bf16 tutorial / float32 tutorial, and ``ours`` = one model with the book's BN / with PyTorch's."""
    out = {}
    for net in NETS:
        rows = {r["contender"]: r for r in res.metrics["conv"]["rows"] if r["net"] == net}
        kind = {n: bench.contender(n) for n in rows}
        speed = {n: r["images_per_s"] for n, r in rows.items()}
        plain = sorted((n for n in rows if kind[n]["kind"] == "engine" and not kind[n]["bf16"] and not kind[n]["book_bn"]),
                       key=lambda n: kind[n]["models"])
        gains = {"ratio": max(speed[n] for n in plain) / speed["tutorial"], "k": speed[plain[-1]] / speed[plain[0]]}
        low = [n for n in rows if kind[n]["kind"] == "engine" and kind[n]["bf16"]]
        if low:
            gains["bf16"] = max(speed[n] for n in low) / speed["tutorial"]
        if "tutorial_bf16" in rows:
            gains["bf16_tut"] = speed["tutorial_bf16"] / speed["tutorial"]
        ours = [n for n in rows if kind[n]["book_bn"]]
        if ours:
            gains["ours"] = speed[ours[0]] / speed[f"engine_k{kind[ours[0]]['models']}"]
        out[net] = gains
    return out
