"""The training engine: ``fit(models, data, cfg) -> FitResult``.

``fit`` trains K models at once — typically one architecture under K seeds — on a
:class:`bnbook.data.Dataset` whose tensors already live on the device. The speed comes
from three things, all kept inside this module (chapter 3 and the performance appendix
measure them):

1. **No data loader.** Each model draws its own mini-batches from its own generator
   (seeded by the model's seed): an epoch is a random permutation of the training set,
   cut into batches, the last partial batch dropped. Batches are gathered by indexing
   the device tensors.
2. **Stacking.** MLPs of one shape run as one :class:`bnbook.nets.StackedMLP`, whose
   layers are batched matrix products over the K models. Other models (e.g. CNNs) run
   in a plain loop over the K models (:class:`bnbook.nets.ModuleStack`); the results
   are the same, only slower.
3. **No per-step host synchronisation.** Losses, divergence flags and the logged
   metrics are accumulated in device tensors and read once, at the end.

At the steps ``0, log_every, 2·log_every, …, steps`` the engine records, per model, the
mean training loss since the previous record, the test loss and accuracy (BN in
inference mode, with its running averages), and every registered probe, evaluated on a
fixed probe batch. A model whose loss becomes NaN or ±inf is *recorded* as diverged
(with the step), its later metrics are NaN, and the others train on.

On a CPU the same config, models and seeds give bit-identical results run after run.
After ``fit`` the models passed in hold the trained parameters (and BN buffers).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnbook.data import Dataset
from bnbook.errors import BnbookError
from bnbook.nets import ModuleStack, StackedMLP, stack_signature

Probe = Callable[[nn.Module, Tensor], Tensor]
"""``probe(stack, x) -> (K, ...)`` tensor: a measurement of K models on inputs ``x`` of shape (K, P, ...)."""

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How to train. Every model of one ``fit`` call is trained the same way."""

    steps: int = 5_000  # optimiser steps (one mini-batch each)
    batch_size: int = 60  # examples per mini-batch and model
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1  # learning rate (constant)
    momentum: float = 0.0  # SGD momentum (0: plain SGD)
    weight_decay: float = 0.0  # L2 penalty coefficient, applied to every parameter
    log_every: int = 100  # record metrics and probes every this many steps (and at 0 and at the end)
    log_at: tuple[int, ...] = ()  # further steps to record at (e.g. a denser start)
    eval_batch: int = 2_000  # the test set is evaluated in chunks of this many examples
    probe_size: int = 1_000  # examples in the fixed probe batch (the first ones of the test set)
    stack: bool = True  # run same-shape MLPs as one StackedMLP (False: the plain per-model loop)
    manual_backward: bool = True  # StackedMLP: hand-written backward pass (False: autograd)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_batch", "probe_size"):
            if getattr(self, name) < 1:
                raise BnbookError(f"FitConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise BnbookError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise BnbookError(f"FitConfig.lr must be positive, got {self.lr}")
        bad = [s for s in self.log_at if not 0 <= s <= self.steps]
        if bad:
            raise BnbookError(f"FitConfig.log_at has steps outside 0..{self.steps}: {bad}")

    def log_steps(self) -> np.ndarray:
        """The steps at which metrics are recorded: 0, log_every, 2·log_every, ..., ``steps``, and ``log_at``."""
        return np.unique(np.r_[np.arange(0, self.steps, self.log_every), self.steps, list(self.log_at)]).astype(int)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` recorded. Arrays are indexed [record, model, ...]; model order is the input order."""

    steps: np.ndarray  # (L,) the recorded steps
    train_loss: np.ndarray  # (L, K) mean training loss since the previous record (NaN at step 0)
    test_loss: np.ndarray  # (L, K) test cross-entropy
    test_acc: np.ndarray  # (L, K) test accuracy
    probes: dict[str, np.ndarray]  # name -> (L, K, ...)
    diverged_step: np.ndarray  # (K,) first step with a non-finite loss, -1 if none
    seeds: list[int]  # the data-order seed of each model
    train_time_s: float  # wall-clock seconds spent training (excluding evaluation and probes)
    eval_time_s: float  # wall-clock seconds spent on evaluation and probes
    stacked: bool  # whether the models ran as one StackedMLP
    device: str

    @property
    def model_steps_per_s(self) -> float:
        """Training throughput: models × steps / training seconds."""
        return len(self.seeds) * int(self.steps[-1]) / max(self.train_time_s, 1e-12)

    def divergences(self) -> list[tuple[int, int]]:
        """``(seed, step)`` of every model that diverged."""
        return [(s, int(d)) for s, d in zip(self.seeds, self.diverged_step) if d >= 0]


def epoch_batches(gen: torch.Generator, n: int, batch_size: int) -> Tensor:
    """One epoch of mini-batch indices, (n // batch_size, batch_size): a random permutation, last partial batch dropped."""
    if n < batch_size:
        raise BnbookError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // batch_size
    return torch.randperm(n, generator=gen)[: per_epoch * batch_size].view(per_epoch, batch_size)


def batch_stream(seeds: Sequence[int], n: int, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """Yield (K, batch_size) index tensors on ``device``: model k's batches come from its own seed's generator.

    Model k sees the same batches whatever else is trained beside it, which is what lets
    a stacked run be compared with a plain single-model loop.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    while True:
        block = torch.stack([epoch_batches(g, n, batch_size) for g in gens], dim=1).to(device, non_blocking=True)
        yield from block  # (K, B) per step


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over ``params`` (element-wise, so stacking models changes nothing)."""
    params = list(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)


def build_stack(models: Sequence[nn.Module], stack: bool = True) -> nn.Module:
    """One module running all ``models`` with inputs (K, B, ...) -> outputs (K, B, ...).

    A single module that already packs K models (it has an attribute ``k``, like
    :class:`bnbook.nets.PackedCNN`) is used as it is; same-shape MLPs become a
    :class:`StackedMLP` (when ``stack``); anything else runs in a loop (:class:`ModuleStack`).
    """
    if len(models) == 1 and isinstance(getattr(models[0], "k", None), int):
        return models[0]
    sigs = {stack_signature(m) for m in models}
    if stack and None not in sigs and len(sigs) == 1:
        return StackedMLP.from_models(models)
    return ModuleStack(models)


def per_model_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (K, B, C) logits against (K, B) labels: (K,) per-model mean (or sum)."""
    k, b, c = logits.shape
    loss = F.cross_entropy(logits.reshape(k * b, c), targets.reshape(k * b), reduction="none").view(k, b)
    return loss.mean(1) if reduction == "mean" else loss.sum(1)


@torch.no_grad()
def evaluate(stack: nn.Module, x: Tensor, y: Tensor, chunk: int = 2_000) -> tuple[Tensor, Tensor]:
    """Test loss and accuracy of each of the stack's K models on (x, y), in inference mode: two (K,) tensors."""
    was_training = stack.training
    stack.eval()
    k = stack.k
    loss = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device)
    for start in range(0, len(y), chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        logits = stack(xc.unsqueeze(0).expand(k, *xc.shape))
        loss += per_model_loss(logits, yc.expand(k, -1), reduction="sum")
        correct += (logits.argmax(-1) == yc).sum(1)
    stack.train(was_training)
    return loss / len(y), correct / len(y)


@torch.no_grad()
def predict_proba(models: Sequence[nn.Module], x: Tensor, chunk: int = 2_000) -> Tensor:
    """Class probabilities (K, N, C) of each model on ``x``, in inference mode."""
    out = []
    for m in models:
        was_training = m.training
        m.eval()
        out.append(torch.cat([torch.softmax(m(x[s : s + chunk]), -1) for s in range(0, len(x), chunk)]))
        m.train(was_training)
    return torch.stack(out)


def activation_percentiles(
    layer: int = -1, unit: int = 0, q: Sequence[float] = (15, 50, 85), batch_stats: bool = True
) -> Probe:
    """A probe: the ``q`` percentiles of one hidden unit's activation input over the probe batch, (K, len(q)).

    This is Ioffe & Szegedy's Fig. 1(b, c): the input of one sigmoid in the last hidden
    layer (``layer=-1``). With ``batch_stats`` BN normalises with the probe batch's own
    statistics — the distribution the sigmoid sees during training — and running averages
    are left untouched.
    """
    quantiles = torch.tensor([float(p) / 100 for p in q])

    def probe(stack: nn.Module, x: Tensor) -> Tensor:
        z = stack.pre_activations(x, batch_stats=batch_stats)[layer][:, :, unit]
        return torch.quantile(z, quantiles.to(z.device, z.dtype), dim=1).T

    return probe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(
    models: Sequence[nn.Module],
    data: Dataset,
    cfg: FitConfig,
    seeds: Sequence[int] | None = None,
    probes: Mapping[str, Probe] | None = None,
) -> FitResult:
    """Train ``models`` on ``data`` as ``cfg`` says and return what was recorded (see the module docstring).

    Args:
        models: K models on ``data``'s device, mapping a batch (B, ...) to logits (B, C);
            or one module that packs K models (attribute ``k``, inputs (K, B, ...)).
        data: train and test tensors on the device.
        cfg: the training settings.
        seeds: the data-order seed of each model (default 0, 1, ..., K-1).
        probes: name -> :data:`Probe`, evaluated on the first ``cfg.probe_size`` test inputs.
    """
    models = list(models)
    if not models:
        raise BnbookError("fit needs at least one model")
    device = data.x_train.device
    for m in models:
        p = next(m.parameters(), None)
        if p is not None and p.device != device:
            raise BnbookError(f"models are on {p.device} but the data is on {device}: move both to one device")
    probes = dict(probes or {})
    stack = build_stack(models, cfg.stack)
    k = len(models) if stack is not models[0] else stack.k
    seeds = list(range(k)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != k:
        raise BnbookError(f"fit trains {k} models but got {len(seeds)} seeds")
    stack.train()
    manual = cfg.manual_backward and isinstance(stack, StackedMLP)
    opt = make_optimizer(stack.parameters(), cfg)
    log_steps = cfg.log_steps()
    log_set = set(log_steps.tolist())
    n_log = len(log_steps)
    nan = float("nan")
    rec_train = torch.full((n_log, k), nan, device=device)
    rec_test_loss = torch.full((n_log, k), nan, device=device)
    rec_test_acc = torch.full((n_log, k), nan, device=device)
    rec_probes: dict[str, list[Tensor]] = {name: [] for name in probes}
    probe_x = data.x_test[: cfg.probe_size]
    probe_x = probe_x.unsqueeze(0).expand(k, *probe_x.shape)
    loss_sum = torch.zeros(k, device=device)
    diverged = torch.full((k,), -1, dtype=torch.long, device=device)
    batches = batch_stream(seeds, len(data.y_train), cfg.batch_size, device)
    eval_time = 0.0

    def record(i: int, since: int) -> None:
        nonlocal eval_time, loss_sum
        _sync(device)
        t0 = time.perf_counter()
        if since > 0:
            rec_train[i] = loss_sum / since
            loss_sum = torch.zeros_like(loss_sum)
        rec_test_loss[i], rec_test_acc[i] = evaluate(stack, data.x_test, data.y_test, cfg.eval_batch)
        with torch.no_grad():
            for name, probe in probes.items():
                rec_probes[name].append(probe(stack, probe_x).float())
        _sync(device)
        eval_time += time.perf_counter() - t0

    record(0, 0)
    eval_before = eval_time
    _sync(device)
    start = time.perf_counter()
    last = 0
    for step in range(1, cfg.steps + 1):
        idx = next(batches)  # (K, B)
        flat = idx.reshape(-1)  # index_select is ~3x faster than advanced indexing on CPU
        xb = data.x_train.index_select(0, flat).view(k, cfg.batch_size, *data.x_train.shape[1:])
        yb = data.y_train.index_select(0, flat).view(k, cfg.batch_size)
        if manual:
            losses = stack.loss_and_grad(xb, yb)  # sets .grad itself
        else:
            losses = per_model_loss(stack(xb), yb)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
        opt.step()
        with torch.no_grad():
            loss_sum += losses
            diverged = torch.where(~torch.isfinite(losses) & (diverged < 0), step, diverged)
        if step in log_set:
            i = int(np.searchsorted(log_steps, step))
            record(i, step - last)
            last = step
            if bool((diverged >= 0).all()):  # one sync per record: stop when nothing is left to train
                break
    _sync(device)
    total = time.perf_counter() - start
    if stack is not models[0]:  # a packed module was trained in place
        stack.write_back(models)

    steps_t = torch.as_tensor(log_steps, device=device)
    dead = (diverged[None, :] >= 0) & (steps_t[:, None] >= diverged[None, :])  # (L, K)
    not_run = steps_t[:, None] > last
    mask = dead | not_run
    for t in (rec_train, rec_test_loss, rec_test_acc):
        t.masked_fill_(mask, nan)
    probe_arrays = {}
    for name, values in rec_probes.items():
        arr = torch.full((n_log, *values[0].shape), nan, device=device)
        arr[: len(values)] = torch.stack(values)
        arr[mask] = nan
        probe_arrays[name] = arr.cpu().numpy()
    return FitResult(
        steps=log_steps,
        train_loss=rec_train.cpu().numpy(),
        test_loss=rec_test_loss.cpu().numpy(),
        test_acc=rec_test_acc.cpu().numpy(),
        probes=probe_arrays,
        diverged_step=diverged.cpu().numpy(),
        seeds=seeds,
        train_time_s=total - (eval_time - eval_before),
        eval_time_s=eval_time,
        stacked=isinstance(stack, StackedMLP),
        device=str(device),
    )
