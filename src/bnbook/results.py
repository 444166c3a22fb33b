"""Result folders named by a hash of the chapter's config, and the result file's schema.

A chapter computes its experiment through :func:`cached`::

    res = cached("03-ioffe-mnist", cfg, experiments.ioffe.run)

The folder ``<results>/<chapter>/<key>/`` holds ``result.json`` (headline numbers,
config, datasets, machine, runtime), ``arrays.npz`` (the raw arrays every figure
plots) and the figures themselves. The key hashes the config, the resolved device and
the source of the ``bnbook`` package, so an unchanged run is reused and a code change
is never hidden behind a stale cache. ``result.json`` is written last and atomically:
a folder without it is an interrupted run and is recomputed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from bnbook.config import ChapterConfig, stable_hash
from bnbook.env import environment, resolve_device
from bnbook.paths import PACKAGE_DIR, results_dir

SCHEMA_VERSION = 1
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "chapter": str,
    "key": str,
    "config": dict,
    "datasets": list,
    "metrics": dict,
    "arrays": list,
    "environment": dict,
    "runtime_s": (int, float),
    "created": str,
    "bnbook_source": str,
}


@dataclasses.dataclass
class Outcome:
    """What an experiment returns: headline numbers, raw arrays, and the datasets it used."""

    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    datasets: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Result:
    """A finished result folder: its record (``result.json``) and lazily loaded arrays."""

    dir: Path
    record: dict[str, Any]
    reused: bool = False

    @property
    def metrics(self) -> dict[str, Any]:
        """The headline numbers."""
        return self.record["metrics"]

    @property
    def config(self) -> dict[str, Any]:
        """The config the result was computed with."""
        return self.record["config"]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The raw arrays (loaded from ``arrays.npz`` on first access)."""
        if not hasattr(self, "_arrays"):
            path = self.dir / "arrays.npz"
            with np.load(path, allow_pickle=False) as npz:
                self._arrays = {k: npz[k] for k in npz.files}
        return self._arrays

    def path(self, name: str) -> Path:
        """Path of a file inside the result folder (e.g. a figure)."""
        return self.dir / name


@lru_cache(maxsize=1)
def source_hash() -> str:
    """Digest of every ``.py`` file of the installed ``bnbook`` package (the code version)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays to JSON types; NaN and ±inf become ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a result file")


def validate_result(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first way ``record`` breaks the result-file schema."""
    for key, kind in REQUIRED_KEYS.items():
        if key not in record:
            raise ValueError(f"result file lacks the key {key!r}")
        if not isinstance(record[key], kind) or isinstance(record[key], bool) and kind is int:
            raise ValueError(f"result key {key!r} should be {kind}, got {type(record[key]).__name__}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"result schema {record['schema_version']} is not {SCHEMA_VERSION}")
    if not record["datasets"] or not all(isinstance(d, str) for d in record["datasets"]):
        raise ValueError("a result must name the dataset(s) it used ('datasets': [names])")
    json.dumps(record, allow_nan=False)  # raises ValueError on NaN/inf or non-JSON values


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_key(config: ChapterConfig, device: torch.device) -> str:
    """The folder name of a result: hash of config, resolved device type and code version."""
    cfg = config.to_dict()
    cfg["device"] = device.type  # 'auto' and 'cpu' on a CPU machine are the same run
    return stable_hash({"config": cfg, "source": source_hash()})


def load(chapter: str, key: str) -> Result | None:
    """Return the finished result ``chapter/key``, or ``None`` if absent or invalid."""
    folder = results_dir() / chapter / key
    try:
        record = json.loads((folder / "result.json").read_text())
        validate_result(record)
    except (OSError, ValueError):
        return None
    return Result(folder, record, reused=True)


def cached(
    chapter: str,
    config: ChapterConfig,
    compute: Callable[[ChapterConfig, torch.device], Outcome],
    *,
    force: bool = False,
) -> Result:
    """Return the chapter's result for ``config``, computing it only if no finished one exists.

    ``compute(config, device)`` runs the experiment and returns an :class:`Outcome`.
    """
    device = resolve_device(config.device)
    key = result_key(config, device)
    if not force and (found := load(chapter, key)) is not None:
        return found
    folder = results_dir() / chapter / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    start = time.perf_counter()
    outcome = compute(config, device)
    runtime = time.perf_counter() - start
    arrays = {k: np.asarray(v) for k, v in outcome.arrays.items()}
    tmp = folder / ".arrays.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, folder / "arrays.npz")
    record = {
        "schema_version": SCHEMA_VERSION,
        "chapter": chapter,
        "key": key,
        "config": to_jsonable(config.to_dict()),
        "datasets": list(outcome.datasets),
        "metrics": to_jsonable(outcome.metrics),
        "arrays": sorted(arrays),
        "environment": environment(device),
        "runtime_s": round(runtime, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bnbook_source": source_hash(),
    }
    validate_result(record)
    write_json_atomic(folder / "result.json", record)
    return Result(folder, record, reused=False)
