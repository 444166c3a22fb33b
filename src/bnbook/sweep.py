"""A chapter's grid of runs, dispatched as independent jobs — to local processes or a Slurm cluster.

Chapters whose ``paper`` profile is too large for one GPU (chapter 8's BN-only ResNets) declare
their grid as *units*: one cached result each (:func:`bnbook.results.cached`), content-addressed
by its config and the code it runs. The chapter's experiment module provides

- ``CONFIG``: the chapter's config class (a :class:`bnbook.config.ChapterConfig`), and
- ``units(cfg) -> list[Unit]``: the grid for that config.

The chapter's own ``run`` computes the same units in-process (:func:`compute_all`), so a sweep
followed by ``bnbook run`` renders from the cache without training, and both give identical
results. :func:`sweep` skips units already cached and submits the rest through submitit
(``LocalExecutor`` for processes on this machine, ``AutoExecutor`` for Slurm). Each job writes its
result atomically (the results module's transaction and lock), so a re-submitted or pre-empted
(Slurm-requeued) job is harmless: re-running the sweep submits only what is still missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import torch

from bnbook import results
from bnbook.config import ChapterConfig
from bnbook.env import resolve_device
from bnbook.errors import BnbookError
from bnbook.paths import results_dir

EXECUTORS = ("local", "slurm")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently cached run of a chapter's grid."""

    chapter: str  # the results folder (e.g. "08-bn-only")
    config: ChapterConfig  # everything the run depends on
    compute: Callable[[ChapterConfig, torch.device], results.Outcome]
    label: str = ""  # a short human-readable name (e.g. "resnet-14 w16 bn-only seed 0")
    group: str = ""  # units of one group are trained together (one fit) and so go to one job

    def key(self) -> str:
        """The result key of this unit (the name of its folder under ``results_dir()/chapter``)."""
        device = resolve_device(self.config.device)
        return results.result_key(self.config, device, results.code_dependencies(self.compute))

    def folder(self) -> Path:
        """Where the unit's result lives."""
        return results_dir() / self.chapter / self.key()

    def cached(self) -> results.Result | None:
        """The unit's intact result, or ``None`` if it still has to be computed."""
        found, _problem = results.check_result(self.folder())
        return found

    def compute_cached(self) -> results.Result:
        """Compute the unit unless an intact result exists (the same call a chapter's ``run`` makes)."""
        return results.cached(self.chapter, self.config, self.compute)


def compute_all(units: Sequence[Unit]) -> list[results.Result]:
    """Every unit's result, in order, computing the missing ones here (what a chapter's ``run`` does)."""
    return [u.compute_cached() for u in units]


# ------------------------------------------------------------------ chapters with a grid
def experiment_module(source: Path) -> ModuleType:
    """The experiment module a chapter source imports (``from bnbook.experiments import NAME``)."""
    names = re.findall(r"^\s*from bnbook\.experiments import (\w+)", source.read_text(), flags=re.M)
    if not names:
        raise BnbookError(f"{source.name} imports no experiment module (from bnbook.experiments import ...)")
    return importlib.import_module(f"bnbook.experiments.{names[0]}")


def chapter_units(source: Path, profile: str, params: Mapping[str, Any]) -> list[Unit]:
    """The units of the chapter at ``source`` under ``profile`` and the chapter parameters ``params``."""
    module = experiment_module(source)
    if not (hasattr(module, "units") and hasattr(module, "CONFIG")):
        raise BnbookError(
            f"chapter {source.stem} has no grid to sweep: its module {module.__name__} defines no CONFIG and units(cfg)"
        )
    cfg = module.CONFIG.from_params(profile, **params)
    units = list(module.units(cfg))
    if not units:
        raise BnbookError(f"chapter {source.stem} under profile {profile!r} has an empty grid")
    return units


# ------------------------------------------------------------------ estimates
def measured_seconds(chapter: str) -> dict[str, float]:
    """Runtime of every finished result of ``chapter``, by config hash (what earlier runs measured)."""
    out: dict[str, float] = {}
    folder = results_dir() / chapter
    if not folder.is_dir():
        return out
    for sub in folder.iterdir():
        found, _ = results.check_result(sub)
        if found is not None:
            out[_config_hash(found.record["config"])] = float(found.record.get("runtime_s", 0.0))
    return out


def _config_hash(config: Mapping[str, Any]) -> str:
    from bnbook.config import stable_hash

    cfg = {k: v for k, v in config.items() if k != "device"}
    return stable_hash(cfg)


def plan(units: Sequence[Unit], flops: Callable[[ChapterConfig], float] | None = None) -> list[dict[str, Any]]:
    """One row per unit: label, key, whether it is cached, its measured runtime where a run of the same
    config was recorded (any code version; ``None`` if never measured), and its training FLOPs where the
    chapter can count them (``flops(unit_config)``; ``None`` otherwise)."""
    seen: dict[str, dict[str, float]] = {}
    counted: dict[str, float] = {}
    rows = []
    for u in units:
        times = seen.setdefault(u.chapter, measured_seconds(u.chapter))
        cfg = results.to_jsonable(u.config.to_dict())
        shape = _config_hash({k: v for k, v in cfg.items() if k != "seed"})
        if flops is not None and shape not in counted:
            counted[shape] = float(flops(u.config))
        rows.append({
            "label": u.label or u.key(),
            "chapter": u.chapter,
            "key": u.key(),
            "cached": u.cached() is not None,
            "seconds": times.get(_config_hash(cfg)),
            "flops": counted.get(shape),
        })
    return rows


# ------------------------------------------------------------------ jobs
def _job(units: Sequence[Unit], results_root: str, data_root: str | None) -> list[str]:
    """What one submitted job runs: compute its units (one group) into the shared results folder, return their keys."""
    os.environ["BNBOOK_RESULTS_DIR"] = results_root
    if data_root:
        os.environ["BNBOOK_DATA_DIR"] = data_root
    return [r.record["key"] for r in compute_all(units)]


def jobs_of(units: Sequence[Unit]) -> list[list[Unit]]:
    """The units grouped into jobs: one job per group (units without a group go alone), in grid order.

    A group's units are trained in one pass by whichever of them is computed first, so splitting a
    group over two jobs would train it twice (and the two would wait on each other's results)."""
    jobs: dict[str, list[Unit]] = {}
    for i, u in enumerate(units):
        jobs.setdefault(u.group or f"#{i}", []).append(u)
    return list(jobs.values())


@dataclasses.dataclass
class SweepReport:
    """What a sweep did."""

    submitted: list[str]  # labels of the units sent as jobs
    skipped: list[str]  # labels of the units already cached
    failed: list[dict[str, str]]  # {"label", "error", "log"} of the jobs that raised
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether every submitted job finished."""
        return not self.failed


def make_executor(kind: str, folder: Path, *, partition: str | None = None, gpus_per_job: int = 0,
                  timeout_min: int = 60, max_parallel: int | None = None, python: str | None = None):
    """A submitit executor writing its logs under ``folder``: ``local`` (processes here) or ``slurm``."""
    import submitit

    if kind not in EXECUTORS:
        raise BnbookError(f"unknown executor {kind!r}; known: {', '.join(EXECUTORS)}")
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder, python=python)
        ex.update_parameters(timeout_min=timeout_min)
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {"timeout_min": timeout_min, "gpus_per_node": gpus_per_job, "tasks_per_node": 1,
                              "slurm_additional_parameters": {"requeue": True}}
    if partition:
        params["slurm_partition"] = partition
    if max_parallel:
        params["slurm_array_parallelism"] = max_parallel
    ex.update_parameters(**params)
    return ex


def sweep(units: Sequence[Unit], executor, *, max_parallel: int | None = None,
          echo: Callable[[str], None] = print) -> SweepReport:
    """Submit every unit that is not cached — one job per group of units (:func:`jobs_of`) — wait for
    all, and report.

    ``max_parallel`` bounds how many jobs run at once (submitted in waves; Slurm arrays bound it
    themselves). A job that raises is reported with its units and log file; the others still land.
    """
    start = time.perf_counter()
    todo = [u for u in units if u.cached() is None]
    skipped = [u.label or u.key() for u in units if u not in todo]
    root = str(results_dir())
    data_root = os.environ.get("BNBOOK_DATA_DIR")
    failed: list[dict[str, str]] = []
    groups = jobs_of(todo)
    wave = max_parallel or len(groups) or 1
    for i in range(0, len(groups), wave):
        batch = groups[i : i + wave]
        jobs = [executor.submit(_job, group, root, data_root) for group in batch]
        for group, job in zip(batch, jobs):
            name = ", ".join(u.label or u.key() for u in group)
            try:
                job.result()
                echo(f"[sweep] done: {name}")
            except Exception as exc:  # noqa: BLE001 - a failed job is reported, the others go on
                log = str(getattr(job.paths, "stderr", ""))
                failed.append({"label": name, "error": _last_line(exc), "log": log})
                echo(f"[sweep] FAILED: {name}: {_last_line(exc)} (log: {log})")
    return SweepReport([u.label or u.key() for u in todo], skipped, failed, time.perf_counter() - start)


def _last_line(exc: BaseException) -> str:
    """The job's own exception line (``RuntimeError: ...``) out of submitit's report, else its last line."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    return (errors or lines or [type(exc).__name__])[-1]


# ------------------------------------------------------------------ the `bnbook sweep` command
def format_plan(rows: Sequence[Mapping[str, Any]], tflops: float = 10.0) -> list[str]:
    """The lines ``bnbook sweep --dry-run`` prints: each unit, cached or to run, its measured time, its counted
    training PFLOP and the GPU-hours those take at a sustained ``tflops`` TFLOP/s (an assumption, stated)."""
    lines = [f"{'unit':44} {'state':8} {'measured':>10} {'PFLOP':>9} {'GPU-h':>7}"]
    todo_known = todo_unknown = 0
    todo_seconds = 0.0
    todo_flops = [r["flops"] for r in rows if not r["cached"] and r.get("flops") is not None]
    for r in rows:
        measured = "—" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        fl = r.get("flops")
        pflop = "—" if fl is None else f"{fl / 1e15:.3g}"
        hours = "—" if fl is None else f"{fl / (tflops * 1e12) / 3600:.3g}"
        lines.append(f"{r['label'][:44]:44} {'cached' if r['cached'] else 'to run':8} {measured:>10} {pflop:>9} {hours:>7}")
        if not r["cached"]:
            if r["seconds"] is None:
                todo_unknown += 1
            else:
                todo_known += 1
                todo_seconds += r["seconds"]
    cached = sum(r["cached"] for r in rows)
    lines.append(f"{len(rows)} units: {cached} cached, {len(rows) - cached} to run; "
                 f"measured cost of {todo_known} of them: {todo_seconds / 3600:.2f} h"
                 + (f" ({todo_unknown} never measured)" if todo_unknown else ""))
    if todo_flops:
        total = sum(todo_flops)
        lines.append(f"counted training arithmetic of {len(todo_flops)} units to run: {total / 1e15:.3g} PFLOP = "
                     f"{total / (tflops * 1e12) / 3600:.3g} GPU-hours at an assumed sustained {tflops:g} TFLOP/s "
                     "(an estimate, not a measurement)")
    return lines


def command(source: Path, *, profile: str, params: Mapping[str, Any], executor: str = "local",
            dry_run: bool = False, log_dir: Path | None = None, partition: str | None = None,
            gpus_per_job: int = 0, timeout_min: int = 60, max_parallel: int | None = None,
            tflops: float = 10.0, echo: Callable[[str], None] = print) -> int:
    """``bnbook sweep``: plan (``dry_run``) or dispatch the chapter's grid; returns the exit status (1 if a job failed)."""
    units = chapter_units(source, profile, params)
    if dry_run:
        flops = getattr(experiment_module(source), "unit_flops", None)
        for line in format_plan(plan(units, flops), tflops):
            echo(line)
        return 0
    folder = log_dir or results_dir() / "_sweeps" / source.stem
    ex = make_executor(executor, folder, partition=partition, gpus_per_job=gpus_per_job,
                       timeout_min=timeout_min, max_parallel=max_parallel)
    report = sweep(units, ex, max_parallel=max_parallel if executor == "local" else None, echo=echo)
    echo(f"[sweep] {source.stem}: {len(report.submitted)} submitted, {len(report.skipped)} already cached, "
         f"{len(report.failed)} failed, {report.seconds:.0f} s")
    for f in report.failed:
        echo(f"[sweep] failed unit {f['label']}: {f['error']} (log: {f['log']})")
    return 1 if report.failed else 0
