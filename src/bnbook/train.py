"""The training engine: ``fit(models, data, cfg) -> FitResult``.

``fit`` trains K models of one architecture at once — typically one network under K seeds —
on a :class:`bnbook.data.Dataset` whose tensors already live on the device. Every chapter
trains through it, so its tricks live here and nowhere else:

1. **No data loader.** Each model draws its own mini-batches from its own generator
   (seeded by the model's seed): an epoch is a random permutation of the training set,
   cut into batches, the last partial batch dropped. Batches are gathered by indexing the
   device tensors; augmentation (random flips, translations) runs on the device too.
2. **One pass for K models.** :func:`bnbook.batching.batch_models` runs the K models as one
   module (a stacked MLP with a hand-written backward for chapter 3's nets, ``torch.func``
   ``vmap`` for everything else). Model k sees exactly the batches it would see alone, so
   K models trained together give the numbers of K separate runs.
3. **No per-step host synchronisation.** Losses, accuracies, divergence flags and the logged
   metrics are accumulated in device tensors and read once, at the end.

What is recorded: at the steps ``0, log_every, 2·log_every, …, steps`` (and ``log_at``), per
model, the mean training loss and batch accuracy since the previous record, the test loss and
accuracy (inference mode: BN with its running averages), optionally the same on a fixed
training subset, and every *probe* on a fixed probe batch. *Step hooks* see the models and the
very batch of chosen steps, before or after the update — enough to measure Santurkar et al.'s
gradient change (chapter 6) or landscape (chapter 7) without a second training loop. Probes and
hooks run inside :func:`no_side_effects`: whatever they do to the models is undone. Random layers
draw from the global generator, which ``fit`` seeds from the seeds (and restores afterwards).

A model whose loss becomes NaN or ±inf is *recorded* as diverged (with the step), its later
metrics are NaN, and the others train on. Frozen tensors (``requires_grad=False``, or entries
masked with :func:`bnbook.batching.set_trainable_mask`) never change. On a CPU the same
config, models and seeds give bit-identical results run after run. During and after ``fit`` the
models passed in hold the live parameters and BN buffers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook.batching import ModelBatch, batch_models, set_trainable_mask, trainable_mask  # noqa: F401 (re-exported)
from bnbook.data import Dataset
from bnbook.env import sync
from bnbook.errors import BnbookError

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "squared_mean", "squared_sum")
AUGMENTATIONS = (None, "flip+translate4")
AMP = (None, "bf16")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How to train. Every model of one ``fit`` call is trained the same way."""

    steps: int = 5_000  # optimiser steps (one mini-batch each)
    batch_size: int = 60  # examples per mini-batch and model
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1  # initial learning rate
    momentum: float = 0.0  # SGD momentum (0: plain SGD)
    nesterov: bool = False  # SGD: Nesterov momentum
    weight_decay: float = 0.0  # L2 penalty coefficient (per parameter group: see fit's param_groups)
    lr_milestones: tuple[int, ...] = ()  # steps after which the lr is multiplied by lr_gamma (OpenLTH: epochs 80, 120)
    lr_gamma: float = 0.1  # the factor at each milestone
    loss: str = "cross_entropy"  # cross_entropy | squared_mean (mean over the batch of ‖f(x)−y‖²) | squared_sum
    augment: str | None = None  # None | "flip+translate4": random horizontal flip and shifts of up to 4 px, per image
    log_every: int = 100  # record metrics and probes every this many steps (and at 0 and at the end)
    log_at: tuple[int, ...] = ()  # further steps to record at (e.g. a denser start)
    eval_batch: int = 2_000  # the test set is evaluated in chunks of this many examples
    eval_train: int = 0  # >0: also evaluate (inference mode) on the first this-many training examples
    probe_size: int = 1_000  # examples in the fixed probe batch (the first ones of the test set)
    stack: bool = True  # run same-shape MLPs on the fast stacked path (False: the general vmap path)
    manual_backward: bool = True  # stacked MLPs: hand-written backward pass (False: autograd)
    amp: str | None = None  # None | "bf16": matrix products and convolutions in bf16 (autocast; BN statistics stay fp32)
    channels_last: bool = False  # store image batches channels-last (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the forward pass (opt-in; worth it for long GPU runs)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_batch", "probe_size"):
            if getattr(self, name) < 1:
                raise BnbookError(f"FitConfig.{name} must be a positive integer, got {getattr(self, name)}")
        checks = (("optimizer", OPTIMIZERS), ("loss", LOSSES), ("augment", AUGMENTATIONS), ("amp", AMP))
        for name, known in checks:
            if getattr(self, name) not in known:
                raise BnbookError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(map(str, known))}")
        if not self.lr > 0 or not np.isfinite(self.lr):
            raise BnbookError(f"FitConfig.lr must be a positive finite number, got {self.lr}")
        if self.eval_train < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise BnbookError("FitConfig.eval_train, momentum and weight_decay must be non-negative")
        bad = [s for s in (*self.log_at, *self.lr_milestones) if not 0 <= s <= self.steps]
        if bad:
            raise BnbookError(f"FitConfig.log_at / lr_milestones have steps outside 0..{self.steps}: {bad}")

    def log_steps(self) -> np.ndarray:
        """The steps at which metrics are recorded: 0, log_every, 2·log_every, ..., ``steps``, and ``log_at``."""
        return np.unique(np.r_[np.arange(0, self.steps, self.log_every), self.steps, list(self.log_at)]).astype(int)

    def lr_at(self, step: int) -> float:
        """The learning rate of update number ``step`` (1-based): lr × gamma^(milestones passed before it)."""
        return self.lr * self.lr_gamma ** sum(step > m for m in self.lr_milestones)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` recorded. Arrays are indexed [record, model, ...]; model order is the input order."""

    steps: np.ndarray  # (L,) the recorded steps
    train_loss: np.ndarray  # (L, K) mean training loss since the previous record (NaN at step 0)
    train_acc: np.ndarray  # (L, K) mean training-batch accuracy since the previous record (training mode)
    test_loss: np.ndarray  # (L, K) test loss
    test_acc: np.ndarray  # (L, K) test accuracy (NaN for regression)
    train_eval_loss: np.ndarray  # (L, K) loss on the first cfg.eval_train training examples, inference mode
    train_eval_acc: np.ndarray  # (L, K) accuracy on them (NaN unless cfg.eval_train)
    lr: np.ndarray  # (L,) the learning rate in force at each record
    probes: dict[str, np.ndarray]  # name -> (L, K, ...)
    hooks: dict[str, dict[str, Any]]  # name -> {"steps": (T,), "values": (T, K, ...) or {key: (T, K, ...)}}
    diverged_step: np.ndarray  # (K,) first step with a non-finite loss, -1 if none
    seeds: list[int]  # the data-order seed of each model
    train_time_s: float  # wall-clock seconds spent training (excluding evaluation, probes and hooks)
    eval_time_s: float  # wall-clock seconds spent on evaluation, probes and hooks
    stacked: bool  # whether the models ran on the fast stacked-MLP path
    device: str

    @property
    def model_steps_per_s(self) -> float:
        """Training throughput: models × steps / training seconds."""
        return len(self.seeds) * int(self.steps[-1]) / max(self.train_time_s, 1e-12)

    def divergences(self) -> list[tuple[int, int]]:
        """``(seed, step)`` of every model that diverged."""
        return [(s, int(d)) for s, d in zip(self.seeds, self.diverged_step) if d >= 0]


# ------------------------------------------------------------------ hooks and probes
Probe = Callable[[list[nn.Module], Tensor], Tensor]
"""``probe(models, x) -> (K, ...)``: a measurement of the K models on one probe batch ``x`` (P, ...)."""


@dataclasses.dataclass
class StepContext:
    """What a step hook sees. ``step`` counts the updates done so far (Santurkar et al.'s t)."""

    step: int  # updates completed when the hook looks at the models
    x: Tensor  # (K, B, ...) the batch of update step+1 (when="before") or of the update just done ("after")
    y: Tensor  # (K, B)
    models: list[nn.Module]  # the K models, live
    lr: float  # the learning rate of that update
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]  # per-example loss (B, ...) x (B, ...) -> (B,), as in training
    cfg: FitConfig


@dataclasses.dataclass(frozen=True)
class StepHook:
    """Call ``fn(ctx) -> Tensor (K, ...) | dict[str, Tensor]`` at chosen steps of training.

    It fires when ``ctx.step`` is a multiple of ``every`` (if > 0) or in ``at``. ``when="before"``:
    the models are W(t) and ``ctx.x`` the batch that produces W(t+1); ``"after"``: just after
    that update. Unless ``mutates``, the hook runs inside :func:`no_side_effects`.
    """

    fn: Callable[[StepContext], Any]
    every: int = 0
    at: tuple[int, ...] = ()
    when: str = "before"
    mutates: bool = False

    def __post_init__(self) -> None:
        if self.when not in ("before", "after"):
            raise BnbookError(f"StepHook.when must be 'before' or 'after', got {self.when!r}")
        if self.every < 0:
            raise BnbookError(f"StepHook.every must be >= 0, got {self.every}")

    def fires(self, step: int) -> bool:
        """Whether the hook runs when ``step`` updates are done."""
        return (self.every > 0 and step % self.every == 0) or step in self.at


@contextlib.contextmanager
def no_side_effects(models: nn.Module | Sequence[nn.Module]):
    """Run a measurement that leaves no trace: parameters, buffers (BN running statistics),
    ``.grad``, train/eval modes and the torch RNG state are restored on exit.

    Values are restored in place, so tensors that are views into a model batch stay views.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    saved = []
    for m in models:
        tensors = list(m.parameters()) + [b for b in m.buffers() if b is not None]
        saved.append((
            [(t, t.detach().clone()) for t in tensors],
            [(p, p.grad) for p in m.parameters()],
            [(mod, mod.training) for mod in m.modules()],
        ))
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for values, grads, modes in saved:
                for t, v in values:
                    t.copy_(v)
                for p, g in grads:
                    p.grad = g
                for mod, mode in modes:
                    mod.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _full_precision(t: Tensor) -> Tensor:
    """``t`` in float32 if it is a half-precision tensor (autocast outputs), else as it is (float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def example_losses(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-example loss of ``kind`` (see :data:`LOSSES`): ``f(outputs (..., C), targets) -> (...)``."""
    if kind == "cross_entropy":
        def ce(out: Tensor, y: Tensor) -> Tensor:
            logits = _full_precision(out.reshape(-1, out.shape[-1]))
            return F.cross_entropy(logits, y.reshape(-1), reduction="none").view(y.shape)
        return ce
    if kind in ("squared_mean", "squared_sum"):
        return lambda out, y: (_full_precision(out) - y).square().sum(-1)  # targets (..., D)
    raise BnbookError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")


def reduce_batch(kind: str, per_example: Tensor) -> Tensor:
    """The training loss from per-example losses (..., B): the batch mean, or the sum for ``squared_sum``."""
    return per_example.sum(-1) if kind == "squared_sum" else per_example.mean(-1)


def model_loss(model: nn.Module, x: Tensor, y: Tensor, loss: str = "cross_entropy") -> Tensor:
    """The training loss of one model on a batch (B, ...) — mean (or sum) over the batch, in its current mode."""
    return reduce_batch(loss, example_losses(loss)(model(x), y))


def grads(
    model: nn.Module, x: Tensor, y: Tensor, params: Sequence[Tensor] | None = None, loss: str = "cross_entropy"
) -> list[Tensor]:
    """Gradients of :func:`model_loss` w.r.t. ``params`` (default: every trainable parameter), as a list."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    with torch.enable_grad():
        return list(torch.autograd.grad(model_loss(model, x, y, loss), params, allow_unused=True))


def per_model_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (K, B, C) logits against (K, B) labels: (K,) per-model mean (or sum)."""
    loss = example_losses("cross_entropy")(logits, targets)
    return loss.mean(1) if reduction == "mean" else loss.sum(1)


def activation_percentiles(
    layer: int = -1, unit: int = 0, q: Sequence[float] = (15, 50, 85), batch_stats: bool = True
) -> Probe:
    """A probe: the ``q`` percentiles of one hidden unit's activation input over the probe batch, (K, len(q)).

    This is Ioffe & Szegedy's Fig. 1(b, c): the input of one sigmoid in the last hidden
    layer (``layer=-1``), read from the model's ``features`` (chapter 3). With ``batch_stats``
    BN normalises with the probe batch's own statistics — the distribution the sigmoid sees
    during training — and, as in every probe, running averages are left untouched.
    """
    quantiles = torch.tensor([float(p) / 100 for p in q])

    def probe(models: list[nn.Module], x: Tensor) -> Tensor:
        out = []
        for m in models:
            m.train(batch_stats)
            z = m(x, features=True)[1][layer][:, unit]
            out.append(torch.quantile(z.float(), quantiles.to(z.device)))
        return torch.stack(out)

    return probe


@torch.no_grad()
def predict_proba(models: Sequence[nn.Module], x: Tensor, chunk: int = 2_000) -> Tensor:
    """Class probabilities (K, N, C) of each model on ``x``, in inference mode."""
    out = []
    for m in models:
        with no_side_effects(m):
            m.eval()
            out.append(torch.cat([torch.softmax(m(x[s : s + chunk]), -1) for s in range(0, len(x), chunk)]))
    return torch.stack(out)


# ------------------------------------------------------------------ data on the device
def epoch_batches(gen: torch.Generator, n: int, batch_size: int) -> Tensor:
    """One epoch of mini-batch indices, (n // batch_size, batch_size): a random permutation, last partial batch dropped."""
    if n < batch_size:
        raise BnbookError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // batch_size
    return torch.randperm(n, generator=gen)[: per_epoch * batch_size].view(per_epoch, batch_size)


def batch_stream(seeds: Sequence[int], n: int, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """Yield (K, batch_size) index tensors on ``device``: model k's batches come from its own seed's generator.

    Model k sees the same batches whatever else is trained beside it, which is what lets
    a batched run be compared with a plain single-model loop.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    while True:
        block = torch.stack([epoch_batches(g, n, batch_size) for g in gens], dim=1).to(device, non_blocking=True)
        yield from block  # (K, B) per step


def augment_stream(seeds: Sequence[int], batch_size: int, device: torch.device, shift: int = 4) -> Iterator[Tensor]:
    """Yield (K, B, 3) int tensors on ``device``: per image a flip flag and a (dy, dx) shift in [−shift, shift].

    Drawn per model from its own generator (seed + 1,000,003), so augmentation, like the batch
    order, does not depend on which models train beside it. Drawn 64 steps at a time.
    """
    gens = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    while True:
        block = torch.stack([
            torch.cat([torch.randint(0, 2, (64, batch_size, 1), generator=g),
                       torch.randint(-shift, shift + 1, (64, batch_size, 2), generator=g)], -1)
            for g in gens
        ], dim=1).to(device, non_blocking=True)
        yield from block


def flip_translate(x: Tensor, params: Tensor, shift: int = 4) -> Tensor:
    """Images (..., C, H, W) flipped horizontally where ``params[..., 0]`` is 1 and shifted by
    ``params[..., 1:]`` = (dy, dx) pixels with zero fill (a padded random crop, as OpenLTH's CIFAR loader)."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    x = x.reshape(-1, c, h, w)
    p = params.reshape(-1, 3)
    x = torch.where(p[:, 0, None, None, None].bool(), x.flip(-1), x)
    padded = F.pad(x, (shift, shift, shift, shift))
    rows = (shift - p[:, 1, None] + torch.arange(h, device=x.device)).view(-1, 1, h, 1).expand(-1, c, h, w + 2 * shift)
    x = padded.gather(2, rows)
    cols = (shift - p[:, 2, None] + torch.arange(w, device=x.device)).view(-1, 1, 1, w).expand(-1, c, h, w)
    return x.gather(3, cols).reshape(*lead, c, h, w)



def make_optimizer(
    named: Sequence[tuple[str, Tensor]], cfg: FitConfig, param_groups: Mapping[str, Mapping[str, float]] | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over named tensors; ``param_groups`` maps a regex on the parameter
    name to overrides (e.g. ``{r"norms\\.": {"weight_decay": 0.0}}``; the first matching pattern wins)."""
    groups: dict[str, list[Tensor]] = {}
    for name, t in named:
        key = next((pat for pat in (param_groups or {}) if re.search(pat, name)), "")
        groups.setdefault(key, []).append(t)
    spec = [{"params": ts, **(dict(param_groups[k]) if k else {})} for k, ts in groups.items()]
    if not spec:
        raise BnbookError("nothing to train: every parameter of the models is frozen")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(spec, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(
        spec, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, foreach=True
    )


# ------------------------------------------------------------------ the engine
def fit(
    models: Sequence[nn.Module],
    data: Dataset,
    cfg: FitConfig,
    seeds: Sequence[int] | None = None,
    probes: Mapping[str, Probe] | None = None,
    hooks: Mapping[str, StepHook] | None = None,
    param_groups: Mapping[str, Mapping[str, float]] | None = None,
) -> FitResult:
    """Train ``models`` on ``data`` as ``cfg`` says and return what was recorded (see the module docstring).

    Args:
        models: K models of one architecture on ``data``'s device, each mapping a batch
            (B, ...) to outputs (B, C); probes that read features need ``forward(x, features=True)``.
        data: train and test tensors on the device.
        cfg: the training settings.
        seeds: the data-order (and augmentation) seed of each model (default 0, 1, ..., K-1).
        probes: name -> :data:`Probe`, evaluated at the log steps on the first ``cfg.probe_size`` test inputs.
        hooks: name -> :class:`StepHook`, called at their steps with a :class:`StepContext`.
        param_groups: per-parameter optimiser overrides (see :func:`make_optimizer`).

    Random layers (noisy BN, dropout) draw from PyTorch's global generator; ``fit`` seeds it from
    ``seeds`` for the run (:func:`global_seed`) and restores the caller's state afterwards, so a
    run's noise depends on its seeds only — not on what the process did before.
    """
    models = list(models)
    ks = list(range(len(models))) if seeds is None else [int(s) for s in seeds]
    devices = [data.x_train.device] if data.x_train.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(global_seed(ks))
        return _fit(models, data, cfg, seeds, probes, hooks, param_groups)


def global_seed(seeds: Sequence[int]) -> int:
    """The seed of the global generator during ``fit(..., seeds=seeds)``: a hash of the seed list
    (``numpy.random.SeedSequence``), so runs with different seeds draw different noise."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _fit(
    models: list[nn.Module],
    data: Dataset,
    cfg: FitConfig,
    seeds: Sequence[int] | None,
    probes: Mapping[str, Probe] | None,
    hooks: Mapping[str, StepHook] | None,
    param_groups: Mapping[str, Mapping[str, float]] | None,
) -> FitResult:
    """:func:`fit`'s body, run with the global generator seeded."""
    if not models:
        raise BnbookError("fit needs at least one model")
    device = data.x_train.device
    for m in models:
        p = next(m.parameters(), None)
        if p is not None and p.device != device:
            raise BnbookError(f"models are on {p.device} but the data is on {device}: move both to one device")
    k = len(models)
    seeds = list(range(k)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != k:
        raise BnbookError(f"fit trains {k} models but got {len(seeds)} seeds")
    if cfg.augment and data.x_train.dim() != 4:
        raise BnbookError(f"augment={cfg.augment!r} needs images (N, C, H, W), got {tuple(data.x_train.shape)}")
    probes, hooks = dict(probes or {}), dict(hooks or {})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x_train, x_test = data.x_train, data.x_test
    if cfg.channels_last and x_train.dim() == 4:
        x_train = x_train.contiguous(memory_format=torch.channels_last)
        x_test = x_test.contiguous(memory_format=torch.channels_last)

    batch = batch_models(models, fast=cfg.stack)
    batch.train()
    manual = cfg.manual_backward and batch.fast_backward and cfg.loss in batch.manual_losses
    low = torch.bfloat16 if cfg.amp == "bf16" else None
    opt = make_optimizer(batch.named_trainable(), cfg, param_groups)
    loss_fn = example_losses(cfg.loss)
    classify = cfg.loss == "cross_entropy"
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else contextlib.nullcontext()
    )
    forward = torch.compile(batch.forward) if cfg.compile else batch.forward

    log_steps = cfg.log_steps()
    log_index = {int(s): i for i, s in enumerate(log_steps)}
    n_log = len(log_steps)
    nan = float("nan")
    rec = {name: torch.full((n_log, k), nan, device=device) for name in
           ("train_loss", "train_acc", "test_loss", "test_acc", "train_eval_loss", "train_eval_acc")}
    rec_probes: dict[str, list[Tensor]] = {name: [] for name in probes}
    rec_hooks: dict[str, tuple[list[int], list[Any]]] = {name: ([], []) for name in hooks}
    probe_x = x_test[: cfg.probe_size]
    loss_sum = torch.zeros(k, device=device)
    correct_sum = torch.zeros(k, device=device)
    diverged = torch.full((k,), -1, dtype=torch.long, device=device)
    batches = batch_stream(seeds, len(data.y_train), cfg.batch_size, device)
    augments = augment_stream(seeds, cfg.batch_size, device) if cfg.augment else None
    eval_time = 0.0

    def evaluate_on(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device)
        for start in range(0, len(y), cfg.eval_batch):
            xc, yc = x[start : start + cfg.eval_batch], y[start : start + cfg.eval_batch]
            with autocast:
                out = batch.forward_shared(xc)
            yk = yc.expand(k, *yc.shape)
            loss += loss_fn(out, yk).sum(1)
            if classify:
                correct += (out.argmax(-1) == yk).sum(1)
        return loss / len(y), (correct / len(y) if classify else torch.full_like(correct, nan))

    def record(i: int, since: int) -> None:
        nonlocal eval_time, loss_sum, correct_sum
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if since > 0:
                rec["train_loss"][i] = loss_sum / since
                rec["train_acc"][i] = correct_sum / (since * cfg.batch_size) if classify else nan
                loss_sum, correct_sum = torch.zeros_like(loss_sum), torch.zeros_like(correct_sum)
            batch.eval()
            rec["test_loss"][i], rec["test_acc"][i] = evaluate_on(x_test, data.y_test)
            if cfg.eval_train:
                n = min(cfg.eval_train, len(data.y_train))
                rec["train_eval_loss"][i], rec["train_eval_acc"][i] = evaluate_on(x_train[:n], data.y_train[:n])
            batch.train()
        for name, probe in probes.items():
            with no_side_effects(models):
                rec_probes[name].append(torch.as_tensor(probe(models, probe_x)).detach().float())
        sync(device)
        eval_time += time.perf_counter() - t0

    def run_hooks(when: str, step: int, xb: Tensor, yb: Tensor, lr: float) -> None:
        nonlocal eval_time
        due = [(n, h) for n, h in hooks.items() if h.when == when and h.fires(step)]
        if not due:
            return
        sync(device)
        t0 = time.perf_counter()
        ctx = StepContext(step, xb, yb, models, lr, opt, loss_fn, cfg)
        for name, hook in due:
            with contextlib.nullcontext() if hook.mutates else no_side_effects(models):
                value = hook.fn(ctx)
            rec_hooks[name][0].append(step)
            rec_hooks[name][1].append(value)
        sync(device)
        eval_time += time.perf_counter() - t0

    record(0, 0)
    eval_before = eval_time
    sync(device)
    start = time.perf_counter()
    last = 0
    lr = cfg.lr
    for step in range(1, cfg.steps + 1):
        step_lr = cfg.lr_at(step)
        if step_lr != lr:
            lr = step_lr
            for group in opt.param_groups:
                group["lr"] = lr
        idx = next(batches)  # (K, B)
        flat = idx.reshape(-1)  # index_select is ~3x faster than advanced indexing on CPU
        xb = x_train.index_select(0, flat).view(k, cfg.batch_size, *x_train.shape[1:])
        yb = data.y_train.index_select(0, flat).view(k, cfg.batch_size, *data.y_train.shape[1:])
        if augments is not None:
            xb = flip_translate(xb, next(augments))
        run_hooks("before", step - 1, xb, yb, lr)
        if manual:
            losses, correct = batch.loss_and_grad(xb, yb, cfg.loss, low)  # sets .grad itself
        else:
            with autocast:
                out = forward(xb)
            losses = reduce_batch(cfg.loss, loss_fn(out, yb))
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            correct = (out.argmax(-1) == yb).sum(1) if classify else None
        opt.step()
        batch.apply_masks()
        with torch.no_grad():
            loss_sum += losses.detach()
            if correct is not None:
                correct_sum += correct
            diverged = torch.where(~torch.isfinite(losses.detach()) & (diverged < 0), step, diverged)
        run_hooks("after", step, xb, yb, lr)
        if step in log_index:
            record(log_index[step], step - last)
            last = step
            if bool((diverged >= 0).all()):  # one sync per record: stop when nothing is left to train
                break
    sync(device)
    total = time.perf_counter() - start
    batch.release(models)

    steps_t = torch.as_tensor(log_steps, device=device)
    dead = (diverged[None, :] >= 0) & (steps_t[:, None] >= diverged[None, :])  # (L, K)
    mask = dead | (steps_t[:, None] > last)
    for t in rec.values():
        t.masked_fill_(mask, nan)
    probe_arrays = {}
    for name, values in rec_probes.items():
        arr = torch.full((n_log, *values[0].shape), nan, device=device)
        arr[: len(values)] = torch.stack(values)
        arr[mask] = nan
        probe_arrays[name] = arr.cpu().numpy()
    out = {name: t.cpu().numpy() for name, t in rec.items()}
    return FitResult(
        steps=log_steps,
        **out,
        lr=np.array([cfg.lr_at(max(int(s), 1)) for s in log_steps]),
        probes=probe_arrays,
        hooks={name: {"steps": np.array(st, dtype=int), "values": _stack_values(vals)}
               for name, (st, vals) in rec_hooks.items()},
        diverged_step=diverged.cpu().numpy(),
        seeds=seeds,
        train_time_s=total - (eval_time - eval_before),
        eval_time_s=eval_time,
        stacked=batch.fast_backward,
        device=str(device),
    )


def _stack_values(values: list[Any]) -> Any:
    """Hook values of every call stacked along a new first axis (dicts key by key), as numpy."""
    if not values:
        return np.zeros((0,))
    if isinstance(values[0], Mapping):
        return {key: _stack_values([v[key] for v in values]) for key in values[0]}
    return np.stack([v.detach().float().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v) for v in values])
