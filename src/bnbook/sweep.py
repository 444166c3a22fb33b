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


def plan(units: Sequence[Unit]) -> list[dict[str, Any]]:
    """One row per unit: label, key, whether it is cached, and its measured runtime where a run of the same
    config was recorded (any code version; ``None`` if never measured)."""
    seen: dict[str, dict[str, float]] = {}
    rows = []
    for u in units:
        times = seen.setdefault(u.chapter, measured_seconds(u.chapter))
        cfg = results.to_jsonable(u.config.to_dict())
        rows.append({
            "label": u.label or u.key(),
            "chapter": u.chapter,
            "key": u.key(),
            "cached": u.cached() is not None,
            "seconds": times.get(_config_hash(cfg)),
        })
    return rows


# ------------------------------------------------------------------ jobs
def _job(unit: Unit, results_root: str, data_root: str | None) -> str:
    """What one submitted job runs: compute the unit into the shared results folder, return its key."""
    os.environ["BNBOOK_RESULTS_DIR"] = results_root
    if data_root:
        os.environ["BNBOOK_DATA_DIR"] = data_root
    return unit.compute_cached().record["key"]


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
    """Submit every unit that is not cached as its own job, wait for all, and report.

    ``max_parallel`` bounds how many jobs run at once (submitted in waves; Slurm arrays bound it
    themselves). A job that raises is reported with its unit and log file; the others still land.
    """
    start = time.perf_counter()
    todo = [u for u in units if u.cached() is None]
    skipped = [u.label or u.key() for u in units if u not in todo]
    root = str(results_dir())
    data_root = os.environ.get("BNBOOK_DATA_DIR")
    failed: list[dict[str, str]] = []
    wave = max_parallel or len(todo) or 1
    for i in range(0, len(todo), wave):
        batch = todo[i : i + wave]
        jobs = [executor.submit(_job, u, root, data_root) for u in batch]
        for u, job in zip(batch, jobs):
            name = u.label or u.key()
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
