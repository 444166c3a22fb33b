"""The engine benchmark: a tutorial training loop against :func:`bnbook.train.fit`, same process, same data.

The network is chapter 3's: a 784–100–100–100–10 sigmoid MLP with BN, batch 60. We time

- ``tutorial``: what most tutorials write — ``DataLoader(TensorDataset, shuffle=True)``,
  an ``nn.Sequential`` with ``nn.BatchNorm1d``, ``torch.optim.SGD``, and ``loss.item()``
  every step (a host synchronisation);
- ``indexed``: the engine on one model without stacking (batches by indexing device
  tensors, autograd, no per-step synchronisation);
- ``engine K=k``: the engine training k models (seeds) at once as one stacked MLP with the
  hand-written backward pass,
- with ``amp_too``, the tutorial under ``torch.autocast`` and the largest stack with its matrix
  products in bfloat16 (``FitConfig(amp="bf16")``; BN statistics, activations and weights stay
  float32) — on a CPU with AVX-512 BF16 the products run about four times faster,

in model-steps per second (one optimiser step of one model), interleaved and repeated,
and compare them with the *compute limit*: the machine's measured sgemm throughput divided
by the FLOPs of one model-step (the matrix products only; element-wise work is ignored,
so the limit is optimistic). The performance appendix renders the result.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from bnbook import data, nets, train
from bnbook.env import num_threads, sync
from bnbook.errors import BnbookError


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to time and how often."""

    dataset: str = "mnist5k"
    width: int = 100
    depth: int = 3
    batch_size: int = 60
    steps: int = 300  # timed steps per measurement
    warmup: int = 20  # untimed steps before each measurement
    stacks: tuple[int, ...] = (1, 8, 16)  # numbers of models the engine trains at once
    repeats: int = 3  # interleaved repetitions; the best and the median are reported
    threads: int | None = 1  # CPU threads for every contender (None: torch's default)
    gemm_size: int = 1024  # side of the square sgemm that measures the peak
    all_threads_too: bool = False  # also time the tutorial and the largest stack with torch's default threads
    amp_too: bool = False  # also time the tutorial and the largest stack with bf16 matrix products

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 1 or self.repeats < 1 or not self.stacks or min(self.stacks) < 1:
            raise BnbookError("BenchSettings: steps, warmup, repeats and every stack size must be positive")


def flops_per_model_step(sizes: tuple[int, ...], batch_size: int) -> int:
    """FLOPs of the matrix products of one SGD step of an MLP with layer ``sizes`` (input first).

    Forward: 2·B·in·out per layer; backward: the same again for each weight gradient and for
    each input gradient except the first layer's (the data needs no gradient).
    """
    pairs = list(zip(sizes, sizes[1:]))
    per_layer = [2 * batch_size * a * b for a, b in pairs]
    return 2 * sum(per_layer) + sum(per_layer[1:])


def sgemm_gflops(device: torch.device, n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best measured matrix-multiply throughput (GFLOP/s) of an n×n product in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = max(1, (2048 // n) ** 3) * (20 if device.type == "cuda" else 1)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e9



def tutorial_mlp(s: BenchSettings, in_features: int, num_classes: int, seed: int) -> nn.Sequential:
    """The tutorial's model: nn.Linear / nn.BatchNorm1d / nn.Sigmoid layers in an nn.Sequential."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = (in_features, *(s.width,) * s.depth)
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


def time_tutorial(s: BenchSettings, ds: data.Dataset, device: torch.device, seed: int = 0,
                  amp: str | None = None) -> float:
    """Steps per second of the tutorial loop on chapter 3's MLP (see :func:`time_plain_loop`)."""
    model = tutorial_mlp(s, ds.x_train[0].numel(), ds.num_classes, seed).to(device)
    return time_plain_loop(model, ds, device, s.batch_size, s.steps, s.warmup, seed, amp)


def time_plain_loop(
    model: nn.Module, ds: data.Dataset, device: torch.device, batch_size: int, steps: int, warmup: int, seed: int = 0,
    amp: str | None = None,
) -> float:
    """Steps per second of the loop most tutorials write: ``DataLoader(TensorDataset, shuffle=True)``
    from host memory, ``torch.optim.SGD``, and ``loss.item()`` every step (a host synchronisation);
    with ``amp="bf16"`` the forward pass runs under ``torch.autocast`` (bfloat16), as tutorials on
    mixed precision write it."""
    import contextlib

    from torch.utils.data import DataLoader, TensorDataset

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    cpu = ds.to("cpu")
    loader = DataLoader(TensorDataset(cpu.x_train, cpu.y_train), batch_size=batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    done, t0, losses = 0, 0.0, []
    total = warmup + steps
    while done < total:
        for x, y in loader:
            if done == warmup:
                sync(device)
                t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            with autocast:
                out = model(x)
            loss = loss_fn(out.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            done += 1
            if done == total:
                break
    sync(device)
    return steps / (time.perf_counter() - t0)


def time_fit(models: list[nn.Module], ds: data.Dataset, batch_size: int, steps: int, warmup: int,
             seed: int = 0, stack: bool = True, amp: str | None = None) -> float:
    """Model-steps per second of :func:`bnbook.train.fit` training ``models`` at once, timed by two step
    hooks between the end of update ``warmup`` and the end of update ``warmup + steps`` (as the tutorial loop is)."""
    cfg = train.FitConfig(steps=warmup + steps, batch_size=batch_size, lr=0.1, log_every=warmup + steps,
                          stack=stack, probe_size=1, amp=amp)
    small_test = dataclasses.replace(ds, x_test=ds.x_test[:1], y_test=ds.y_test[:1])
    device = ds.x_train.device

    def clock(_ctx: train.StepContext) -> float:
        sync(device)
        return time.perf_counter()

    hook = train.StepHook(clock, at=(warmup, warmup + steps), when="after", mutates=True)
    res = train.fit(models, small_test, cfg, seeds=range(seed, seed + len(models)), hooks={"clock": hook})
    t0, t1 = res.hooks["clock"]["values"]
    return len(models) * steps / (t1 - t0)


def time_engine(s: BenchSettings, ds: data.Dataset, k: int, stack: bool = True, seed: int = 0,
                amp: str | None = None) -> float:
    """Model-steps per second of :func:`bnbook.train.fit` training ``k`` BN MLPs at once (evaluation excluded).

    Unstacked, the models use ``nn.BatchNorm1d`` (PyTorch's fused kernel, as the tutorial does),
    so that the comparison with the tutorial isolates the data path.
    """
    norm = "bn" if stack else "torch-bn"
    models = [
        nets.MLP(ds.x_train[0].numel(), (s.width,) * s.depth, ds.num_classes, "sigmoid", norm=norm, seed=seed + i)
        .to(ds.x_train.device)
        for i in range(k)
    ]
    return time_fit(models, ds, s.batch_size, s.steps, s.warmup, seed, stack, amp)


def contender(name: str) -> dict[str, Any]:
    """What a contender's name says: ``kind`` (tutorial | indexed | engine), ``models``, ``bf16``
    (matrix products in bfloat16), ``all_threads`` (torch's default thread count) and ``book_bn``
    (the book's ``norms.BatchNorm`` instead of PyTorch's), e.g. ``engine_k16_bf16_all``."""
    parts = name.split("_")
    kind = parts[0]
    models = int(parts[1].removeprefix("k")) if kind == "engine" else 1
    flags = set(parts[2:] if kind == "engine" else parts[1:])
    unknown = flags - {"bf16", "all", "ours"}
    if kind not in ("tutorial", "indexed", "engine") or unknown:
        raise BnbookError(f"unknown benchmark contender {name!r}")
    return {"kind": kind, "models": models, "bf16": "bf16" in flags, "all_threads": "all" in flags,
            "book_bn": "ours" in flags}


def run_benchmark(s: BenchSettings, device: torch.device, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every contender ``s.repeats`` times (interleaved) and return the summary (JSON-ready)."""
    ds = data.load(s.dataset, device)
    in_features = ds.x_train[0].numel()
    sizes = (in_features, *(s.width,) * s.depth, ds.num_classes)
    contenders: dict[str, Callable[[int], float]] = {
        "tutorial": lambda r: time_tutorial(s, ds, device, seed=r),
        "indexed": lambda r: time_engine(s, ds, 1, stack=False, seed=r),
    }
    for k in s.stacks:
        contenders[f"engine_k{k}"] = functools.partial(time_engine, s, ds, k, True)  # called with seed=r
    largest = f"engine_k{max(s.stacks)}"
    varied = ["tutorial", largest]
    if s.amp_too:
        contenders["tutorial_bf16"] = lambda r: time_tutorial(s, ds, device, seed=r, amp="bf16")
        contenders[f"{largest}_bf16"] = lambda r: time_engine(s, ds, max(s.stacks), True, seed=r, amp="bf16")
        varied += ["tutorial_bf16", f"{largest}_bf16"]
    old_threads = torch.get_num_threads()
    row_threads = {name: s.threads or old_threads for name in contenders}
    if s.all_threads_too and device.type == "cpu":
        for name in varied:
            contenders[f"{name}_all"] = _with_threads(contenders[name], old_threads)
            row_threads[f"{name}_all"] = old_threads
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    with num_threads(s.threads if device.type == "cpu" else None):
        threads = torch.get_num_threads()
        peak_used = sgemm_gflops(device, s.gemm_size)
        for r in range(s.repeats):
            for name, fn in contenders.items():
                samples[name].append(fn(r))
                if progress:
                    progress(f"repeat {r + 1}/{s.repeats} {name}: {samples[name][-1]:.0f} model-steps/s")
    with num_threads(old_threads if device.type == "cpu" else None):
        peak_all = sgemm_gflops(device, s.gemm_size)
        peak_bf16 = sgemm_gflops(device, s.gemm_size, dtype=torch.bfloat16) if s.amp_too else None
        threads_all = torch.get_num_threads()
    flops = flops_per_model_step(sizes, s.batch_size)
    peak = max(peak_used, peak_all)
    limit = peak * 1e9 / flops
    best = {name: max(v) for name, v in samples.items()}
    median = {name: statistics.median(v) for name, v in samples.items()}
    info = {name: contender(name) for name in contenders}

    def fastest(kind: str, bf16: bool) -> str | None:
        names = [n for n in best if info[n]["kind"] == kind and info[n]["bf16"] == bf16]
        return max(names, key=best.get) if names else None

    # Headline: each side at its best thread count (the "_all" rows use torch's default), float32 against
    # float32; the bf16 rows are compared with the float32 tutorial and with the bf16 one.
    engine_best, tutorial_best = fastest("engine", False), fastest("tutorial", False)
    bf16 = {}
    if s.amp_too:
        e16, t16 = fastest("engine", True), fastest("tutorial", True)
        bf16 = {"best_engine_bf16": e16, "best_tutorial_bf16": t16, "sgemm_gflops_bf16": peak_bf16,
                "compute_limit_bf16_model_steps_per_s": peak_bf16 * 1e9 / flops,
                "ratio_bf16": best[e16] / best[tutorial_best], "ratio_bf16_vs_tutorial_bf16": best[e16] / best[t16],
                "speedup_bf16_engine": best[e16] / best[engine_best], "speedup_bf16_tutorial": best[t16] / best[tutorial_best]}
    return {
        "device": str(device),
        "threads": threads,
        "threads_all": threads_all,
        "settings": dataclasses.asdict(s),
        "flops_per_model_step": flops,
        "sgemm_gflops_used_threads": peak_used,
        "sgemm_gflops_all_threads": peak_all,
        "compute_limit_model_steps_per_s": limit,
        "samples": samples,
        "best": best,
        "median": median,
        "best_engine": engine_best,
        "best_tutorial": tutorial_best,
        "ratio_best": best[engine_best] / best[tutorial_best],
        "ratio_median": median[engine_best] / median[tutorial_best],
        "fraction_of_limit": best[engine_best] / limit,
        "headroom": limit / best[tutorial_best],  # the largest ratio any float32 engine could reach on this machine
        **bf16,
        "rows": [
            {"contender": name, "models": info[name]["models"], "precision": "bf16" if info[name]["bf16"] else "fp32",
             "threads": row_threads[name] if device.type == "cpu" else None,
             "best": best[name], "median": median[name],
             "ratio": best[name] / best[tutorial_best], "fraction_of_limit": best[name] / limit}
            for name in contenders
        ],
    }


def _with_threads(fn: Callable[[int], float], threads: int) -> Callable[[int], float]:
    """``fn`` run with ``threads`` CPU threads (restored afterwards)."""

    def timed(r: int) -> float:
        with num_threads(threads):
            return fn(r)

    return timed


def samples_array(summary: dict[str, Any]) -> dict[str, np.ndarray]:
    """The raw timings as arrays (one per contender), for the result folder."""
    return {f"samples_{name}": np.asarray(v, dtype=float) for name, v in summary["samples"].items()}


# ---------------------------------------------------------------- convolutional nets
@dataclasses.dataclass(frozen=True)
class ConvBenchSettings:
    """The CNN rows: chapter 5's small CNN and a CIFAR ResNet-20, tutorial loop vs the engine's K seeds."""

    dataset: str = "fashion-mnist"  # images the small CNN trains on (28×28)
    cnn_batch: int = 32
    resnet_batch: int = 64
    resnet_shape: tuple[int, int, int] = (3, 32, 32)  # CIFAR-shaped random data for the ResNet
    resnet_depth: int = 20
    steps: int = 30
    warmup: int = 5
    seeds: tuple[int, ...] = (1, 4)  # models the engine trains at once
    repeats: int = 2
    threads: int | None = None  # CPU threads (None: torch's default; convolutions use them well)
    amp_too: bool = True  # also the tutorial and one engine model with bf16 convolutions (autocast)
    book_bn_too: bool = True  # also one engine model with the book's BN (norms.BatchNorm) instead of PyTorch's

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 1 or self.repeats < 1 or not self.seeds or min(self.seeds) < 1:
            raise BnbookError("ConvBenchSettings: steps, warmup, repeats and every number of seeds must be positive")


def conv_flops_per_step(model: nn.Module, x: Tensor) -> int:
    """FLOPs of the convolutions and linear layers of one training step of ``model`` on batch ``x``:
    each layer's forward product counted with a hook, once more for its weight gradient, and once more for
    its input gradient where the input needs one (not the first layer's: the data needs no gradient)."""
    total = 0

    def count(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            forward = 2 * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1] * out.numel()
        else:
            forward = 2 * mod.in_features * out.numel()
        total += forward * (3 if inp[0].requires_grad else 2)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with train.no_side_effects(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def conv_gflops(device: torch.device, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best measured throughput (GFLOP/s) of a mid-sized 3×3 convolution's forward pass in ``dtype`` on ``device``."""
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device, dtype)
    x = torch.randn(64, 64, 32, 32, device=device).to(dtype)
    flops = 2 * 64 * 9 * x.numel()
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            conv(x)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def run_conv_benchmark(s: ConvBenchSettings, device: torch.device) -> dict[str, Any]:
    """Images per second of the tutorial loop and of the engine for the small CNN and a ResNet, and the
    fraction of the machine's measured convolution throughput each reaches (JSON-ready summary)."""
    cnn_data = data.load(s.dataset, device)
    gen = torch.Generator().manual_seed(0)
    n = s.resnet_batch * 8
    fake = torch.randn(n, *s.resnet_shape, generator=gen).to(device)
    labels = torch.randint(0, 10, (n,), generator=gen).to(device)
    resnet_data = data.Dataset("random-cifar-shaped", fake, labels, fake[:8], labels[:8], tuple("0123456789"),
                               "random images of CIFAR-10's shape (3×32×32), for timing only")
    nets_ = {
        "cnn": (lambda seed, norm="bn": nets.SmallCNN(cnn_data.input_shape[0], 10, norm=norm, seed=seed), cnn_data, s.cnn_batch),
        "resnet": (lambda seed, norm="bn": nets.ResNet(s.resnet_depth, in_channels=s.resnet_shape[0], norm=norm, seed=seed),
                   resnet_data, s.resnet_batch),
    }
    rows = []
    with num_threads(s.threads if device.type == "cpu" else None):
        peak = conv_gflops(device)
        peak_bf16 = conv_gflops(device, dtype=torch.bfloat16) if s.amp_too else None
        for net, (make, ds, batch) in nets_.items():
            flops = conv_flops_per_step(make(0).to(device), ds.x_train[:batch])
            contenders = {name: contender(name) for name in (
                "tutorial", *[f"engine_k{k}" for k in s.seeds],
                *(["tutorial_bf16", f"engine_k{min(s.seeds)}_bf16"] if s.amp_too else []),
                *([f"engine_k{min(s.seeds)}_ours"] if s.book_bn_too else []))}
            samples: dict[str, list[float]] = {name: [] for name in contenders}
            for r in range(s.repeats):
                for name, c in contenders.items():
                    amp = "bf16" if c["bf16"] else None
                    norm = "bn" if c["book_bn"] else "torch-bn"  # PyTorch's BN unless the row says otherwise
                    if c["kind"] == "tutorial":
                        rate = time_plain_loop(make(r, norm).to(device), ds, device, batch, s.steps, s.warmup, r, amp)
                    else:
                        models = [make(r * 100 + i, norm).to(device) for i in range(c["models"])]
                        rate = time_fit(models, ds, batch, s.steps, s.warmup, seed=r, amp=amp)
                    samples[name].append(rate)
            base = max(samples["tutorial"])
            for name, v in samples.items():
                rows.append({
                    "net": net, "contender": name, "models": contenders[name]["models"], "batch": batch,
                    "precision": "bf16" if contenders[name]["bf16"] else "fp32",
                    "norm": "norms.BatchNorm" if contenders[name]["book_bn"] else "nn.BatchNorm2d",
                    "best": max(v), "median": statistics.median(v), "images_per_s": max(v) * batch,
                    "ratio": max(v) / base, "flops_per_step": flops,
                    "fraction_of_conv_peak": max(v) * flops / (peak * 1e9), "samples": v,
                })
    return {"device": str(device), "threads": torch.get_num_threads() if s.threads is None else s.threads,
            "settings": dataclasses.asdict(s), "conv_gflops": peak, "conv_gflops_bf16": peak_bf16, "rows": rows}
