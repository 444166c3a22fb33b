"""Result folders named by a hash of the chapter's config and code, and the result file's schema.

A chapter computes its experiment through :func:`cached`::

    res = cached("03-ioffe-mnist", cfg, experiments.ioffe.run)

The folder ``<results>/<chapter>/<key>/`` holds ``result.json`` (headline numbers,
config, datasets, machine, runtime, checksums), ``arrays.npz`` (the raw arrays every
figure plots) and the figures themselves.

The key hashes the config, the resolved device type and the code the experiment runs
(:func:`code_dependencies`): the compute function, the module-level code of its module
and the functions it calls there, and every ``bnbook`` module those import, followed
transitively. Editing a plotting function or ``plots.py`` therefore leaves the key (and
the cached numbers) alone; editing the training engine changes it.

``result.json`` records the sha256 of ``arrays.npz`` (``files``) and of every saved figure
(``figures``). A result whose ``arrays.npz`` is missing or fails its checksum is
recomputed, with a ``[bnbook]`` line on stderr saying why; a figure that fails its
checksum is simply drawn again. Files are written under unique temporary names and
moved into place (arrays first, ``result.json`` last), under a lock per result
(``filelock``), so two processes asking for the same result compute it once: the
second waits and reuses it. ``$BNBOOK_RECOMPUTE=1`` (set by ``bnbook run --recompute``)
recomputes every result a chapter asks for.

Non-finite floats (NaN, ±inf) in metrics are stored as ``null`` (:func:`to_jsonable`).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import inspect
import io
import json
import math
import os
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from bnbook.config import ChapterConfig, stable_hash
from bnbook.env import environment, resolve_device
from bnbook.paths import PACKAGE_DIR, results_dir

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

SCHEMA_VERSION = 2
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "chapter": str,
    "key": str,
    "config": dict,
    "datasets": list,
    "metrics": dict,
    "arrays": list,
    "files": dict,
    "figures": dict,
    "environment": dict,
    "runtime_s": (int, float),
    "created": str,
    "code": dict,
}
RECOMPUTE_ENV = "BNBOOK_RECOMPUTE"
"""Environment variable: ``1`` makes :func:`cached` recompute instead of reusing."""


def notice(message: str) -> None:
    """Tell the person running the book something (stderr; the runner relays ``[bnbook]`` lines)."""
    print(f"[bnbook] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ atomic files
def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

Writer = Callable[[IO[bytes]], None]


def _write_all(fh: IO[bytes], data: bytes | Writer) -> None:
    if callable(data):
        data(fh)
    else:
        fh.write(data)


class Transaction:
    """Files staged under unique temporary names and moved into place together on success.

    ::

        with Transaction() as txn:
            txn.write(folder / "arrays.npz", lambda fh: np.savez_compressed(fh, **arrays))
            txn.write(folder / "result.json", json_bytes(record))

    Nothing is replaced until the block ends without an exception; then the files are
    renamed in the order they were written (so the file that describes the others goes
    last). On an exception every temporary file is removed and the old files stay.
    Files get the usual permissions (0644 under the common umask), not ``mkstemp``'s 0600.
    """

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []

    def write(self, path: Path, data: bytes | Writer) -> Path:
        """Stage ``data`` (bytes, or a function writing to a binary file) for ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.staged.append((Path(tmp), path))
        os.close(fd)
        with open(tmp, "wb") as fh:
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        return Path(tmp)

    def commit(self) -> None:
        """Move every staged file into place, in order."""
        for tmp, path in self.staged:
            os.replace(tmp, path)
        self.staged = []

    def abort(self) -> None:
        """Remove every staged file."""
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON (strict: NaN and ±inf raise ``ValueError``)."""
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def write_atomic(path: Path, data: bytes | Writer) -> None:
    """Write ``path`` so that readers see either the old or the new file, never a part."""
    with Transaction() as txn:
        txn.write(path, data)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, json_bytes(obj))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ what code a result depends on
@lru_cache(maxsize=512)
def _parsed(path: Path, stamp: tuple[int, int]) -> tuple[str, tuple[ast.stmt, ...]]:
    """(canonical text, statements) of a Python file; ``stamp`` (mtime, size) keys the cache."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return ast.dump(tree), tuple(tree.body)


def _parse(path: Path) -> tuple[str, tuple[ast.stmt, ...]]:
    st = path.stat()
    return _parsed(path, (st.st_mtime_ns, st.st_size))


def module_file(name: str, package_dir: Path = PACKAGE_DIR, package: str = "bnbook") -> Path | None:
    """The source file of module ``name`` inside the package at ``package_dir``, or ``None``."""
    parts = name.split(".")
    if parts[0] != package:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")) if len(parts) > 1 else (base / "__init__.py",):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(nodes: Iterable[ast.AST], module: str = "", *, is_package: bool = False,
                     package: str = "bnbook") -> set[str]:
    """Names of the ``package`` modules that the statements ``nodes`` import (anywhere in them).

    ``from bnbook import data`` yields ``bnbook.data`` (it may also be a name defined in
    ``bnbook/__init__.py``; :func:`import_closure` keeps what exists). Relative imports are
    resolved against ``module`` (a package itself when ``is_package``).
    """
    found: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names if a.name.split(".")[0] == package)
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - (sub.level - 1)] if sub.level > 1 else parts
                    base = ".".join(parts + ([sub.module] if sub.module else []))
                else:
                    base = sub.module or ""
                if base.split(".")[0] != package:
                    continue
                found.add(base)
                found.update(f"{base}.{a.name}" for a in sub.names if a.name != "*")
    return found


def import_closure(modules: Iterable[str], package_dir: Path = PACKAGE_DIR, package: str = "bnbook") -> list[Path]:
    """Source files of ``modules`` and of every ``package`` module they import, transitively.

    A module's parent packages count too (importing ``bnbook.experiments.ioffe`` runs
    ``bnbook/__init__.py`` and ``bnbook/experiments/__init__.py``). Imports anywhere in a
    module, including inside functions, are followed.
    """
    package_dir = package_dir.resolve()
    todo = list(modules)
    files: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in files:
                continue
            path = module_file(prefix, package_dir, package)
            if path is None:
                continue
            files[prefix] = path
            _, body = _parse(path)
            todo.extend(imported_modules(body, prefix, is_package=path.name == "__init__.py", package=package))
    return sorted(set(files.values()))


def files_digest(paths: Iterable[Path], base: Path) -> str:
    """sha256 over the relative names and syntax trees of Python files (comments and layout don't count)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(_parse(path)[0].encode())
    return digest.hexdigest()


def _reachable(body: tuple[ast.stmt, ...], start: str) -> tuple[list[ast.stmt], bool]:
    """Module-level statements that ``start`` depends on: every non-definition statement,
    the definition of ``start`` and of every module-level function or class it (or they) name."""
    defs = {n.name: n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    if start not in defs:
        return list(body), False
    plain = [n for n in body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    seen: set[str] = set()
    todo = [start] + [sub.id for n in plain for sub in ast.walk(n) if isinstance(sub, ast.Name) and sub.id in defs]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(sub.id for sub in ast.walk(defs[name]) if isinstance(sub, ast.Name) and sub.id in defs)
    return plain + [n for n in body if getattr(n, "name", None) in seen], True


@dataclasses.dataclass(frozen=True)
class CodeDeps:
    """The code a compute function runs: its own part and the ``bnbook`` files it imports."""

    function: str
    own: str  # canonical text of the function's module-level dependencies
    files: tuple[Path, ...]
    base: Path = PACKAGE_DIR  # the package directory the files are named relative to

    @property
    def digest(self) -> str:
        """Short hex digest of the function's code and of every file it depends on."""
        digest = hashlib.sha256(f"{self.function}\n{self.own}\n".encode())
        digest.update(files_digest(self.files, self.base).encode())
        return digest.hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "function": self.function,
                "modules": [p.relative_to(self.base).as_posix() for p in self.files]}


def code_dependencies(compute: Callable[..., Any], package_dir: Path = PACKAGE_DIR,
                      package: str = "bnbook") -> CodeDeps:
    """What ``compute`` runs (see the module docstring); conservative where it cannot tell.

    A top-level function of a module with a source file is followed precisely: the
    module's non-definition statements, the definitions it reaches by name, and the
    ``bnbook`` modules imported there (transitively, all of each imported module).
    A nested function or a method keys on its whole module. A function without a
    source file (defined in a notebook) keys on its own source and the whole package.
    """
    package_dir = package_dir.resolve()
    name = f"{compute.__module__}.{compute.__qualname__}"
    module = sys.modules.get(compute.__module__)
    path = Path(getattr(module, "__file__", "") or "")
    if path.suffix == ".py" and path.is_file():
        _, body = _parse(path.resolve())
        stmts, precise = _reachable(body, compute.__qualname__)
        own = "\n".join(ast.dump(s) for s in stmts)
        imports = imported_modules(stmts, compute.__module__, is_package=path.name == "__init__.py",
                                   package=package)
        if module_file(compute.__module__, package_dir, package) is not None:
            imports.add(compute.__module__.rsplit(".", 1)[0])  # its parent packages run on import
        files = [f for f in import_closure(imports, package_dir, package) if f != path.resolve() or not precise]
        return CodeDeps(name, own, tuple(files), package_dir)
    try:
        own = inspect.getsource(compute)
    except (OSError, TypeError):
        own = ""
    return CodeDeps(name, own, tuple(sorted(package_dir.rglob("*.py"))), package_dir)


# ------------------------------------------------------------------ result records
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

    def save_figure(self, fig: Figure, name: str, *, dpi: int = 150) -> Path:
        """Save ``fig`` as ``name`` (a PNG) in the result folder, only if it is missing or changed.

        The figure's checksum is added to ``result.json``. Re-drawing an unchanged
        figure writes nothing, so a read-only results cache works; if a changed figure
        cannot be written there, a ``[bnbook]`` notice says so and the page still shows
        the figure (it is drawn inline).
        """
        return self.store_figure(name, render_png(fig, dpi))

    def store_figure(self, name: str, data: bytes) -> Path:
        """Store a rendered figure (e.g. PNG bytes) as ``name``, only if it is missing or changed.

        See :meth:`save_figure`; this is the same for bytes already rendered.
        """
        path = self.path(name)
        sha = hashlib.sha256(data).hexdigest()
        same = path.is_file() and sha256_file(path) == sha
        if same and self.record.get("figures", {}).get(name) == sha:
            return path
        try:
            with _result_lock(self.dir):
                if not (path.is_file() and sha256_file(path) == sha):
                    write_atomic(path, data)
                self._record_figure(name, sha)
        except OSError as exc:
            if not same:  # an unchanged figure that cannot be recorded is no loss
                notice(f"figure {name} not saved in {self.dir} ({exc.strerror or exc})")
        return path

    def _record_figure(self, name: str, sha: str) -> None:
        """Add a figure checksum to ``result.json`` (caller holds the result lock)."""
        try:
            record = json.loads((self.dir / "result.json").read_text())
        except (OSError, ValueError):
            return
        if record.get("key") != self.record.get("key"):
            return
        record.setdefault("figures", {})[name] = sha
        write_json_atomic(self.dir / "result.json", record)
        self.record.setdefault("figures", {})[name] = sha


def render_png(fig: Figure, dpi: int = 150) -> bytes:
    """The bytes of ``fig`` as a PNG (matplotlib writes the same bytes for the same figure)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def store_figure(target: Result | Path, name: str, data: bytes) -> Path:
    """Store figure bytes as ``name`` in a result (with checksum) or a plain folder, if missing or changed.

    ``plots.save`` calls this, so re-drawing an unchanged figure writes nothing.
    """
    if isinstance(target, Result):
        return target.store_figure(name, data)
    path = Path(target) / name
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)
    return path


def save_figure(fig: Figure, target: Result | Path, name: str, *, dpi: int = 150) -> Path:
    """Save ``fig`` as a PNG ``name`` into a result or a plain folder (see :func:`store_figure`)."""
    return store_figure(target, name, render_png(fig, dpi))


def to_jsonable(obj: Any, *, nonfinite: str = "null") -> Any:
    """Convert numpy/torch scalars and arrays to JSON types.

    NaN and ±inf become ``None`` (``nonfinite="null"``, used for metrics) or the strings
    ``"nan"``, ``"inf"``, ``"-inf"`` (``nonfinite="string"``, used where the value must
    stay readable, e.g. a run record's parameters).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, nonfinite=nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nonfinite=nonfinite) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy(), nonfinite=nonfinite)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), nonfinite=nonfinite)
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if math.isfinite(value):
            return value
        return str(value) if nonfinite == "string" else None
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
    if "arrays.npz" not in record["files"]:
        raise ValueError("a result must record the checksum of its arrays.npz ('files')")
    json.dumps(record, allow_nan=False)  # raises ValueError on NaN/inf or non-JSON values


def result_key(config: ChapterConfig, device: torch.device, code: CodeDeps | str) -> str:
    """The folder name of a result: hash of config, resolved device type and code digest."""
    cfg = config.to_dict()
    cfg["device"] = device.type  # 'auto' and 'cpu' on a CPU machine are the same run
    return stable_hash({"config": cfg, "code": code if isinstance(code, str) else code.digest})


def recompute_requested() -> bool:
    """Whether ``$BNBOOK_RECOMPUTE`` asks :func:`cached` to recompute (``bnbook run --recompute``)."""
    return os.environ.get(RECOMPUTE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_result(folder: Path) -> tuple[Result | None, str | None]:
    """``(result, None)`` for a finished, intact result folder, else ``(None, why)``.

    ``why`` is ``None`` when there is simply no result yet, and a sentence when there is
    one that cannot be trusted (invalid ``result.json``, missing or corrupt ``arrays.npz``).
    A figure failing its checksum is reported but does not invalidate the result.
    """
    try:
        text = (folder / "result.json").read_text()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"its result.json cannot be read ({exc.strerror or exc})"
    try:
        record = json.loads(text)
        validate_result(record)
    except ValueError as exc:
        return None, f"its result.json is invalid ({exc})"
    for name, expected in record["files"].items():
        path = folder / name
        if not path.is_file():
            return None, f"its {name} is missing"
        if sha256_file(path) != expected:
            return None, f"its {name} failed its checksum (corrupt or changed)"
    for name, expected in list(record["figures"].items()):
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            notice(f"figure {folder.name}/{name} is missing or failed its checksum; it is drawn again")
            del record["figures"][name]
    return Result(folder, record, reused=True), None


def load(chapter: str, key: str) -> Result | None:
    """Return the finished, intact result ``chapter/key``, or ``None``."""
    return check_result(results_dir() / chapter / key)[0]


@contextlib.contextmanager
def _result_lock(folder: Path, what: str = "") -> Iterator[bool]:
    """Hold the lock of a result folder; yields whether another process held it first."""
    from filelock import FileLock, Timeout

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        notice(f"waiting for another process computing {what or folder}")
        lock.acquire()
    try:
        yield waited
    finally:
        lock.release()


def cached(
    chapter: str,
    config: ChapterConfig,
    compute: Callable[[ChapterConfig, torch.device], Outcome],
    *,
    force: bool | None = None,
) -> Result:
    """Return the chapter's result for ``config``, computing it only if no intact one exists.

    ``compute(config, device)`` runs the experiment and returns an :class:`Outcome`.
    ``force`` recomputes even if a result exists; ``None`` (the default) reads
    ``$BNBOOK_RECOMPUTE``, which ``bnbook run --recompute`` sets.
    """
    force = recompute_requested() if force is None else force
    device = resolve_device(config.device)
    code = code_dependencies(compute)
    key = result_key(config, device, code)
    folder = results_dir() / chapter / key
    what = f"{chapter}/{key}"
    problem = None
    if not force:
        found, problem = check_result(folder)
        if found is not None:
            return found
    with _result_lock(folder, what) as waited:
        if not force or waited:  # another process may have finished it while we waited
            found, again = check_result(folder)
            if found is not None:
                return found
            problem = problem or again
        if problem:
            notice(f"result {what}: {problem}; recomputing")
        elif force:
            notice(f"result {what}: recomputing as asked ({RECOMPUTE_ENV}=1 / --recompute)")
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        outcome = compute(config, device)
        runtime = time.perf_counter() - start
        arrays = {k: np.asarray(v) for k, v in outcome.arrays.items()}
        record = {
            "schema_version": SCHEMA_VERSION,
            "chapter": chapter,
            "key": key,
            "config": to_jsonable(config.to_dict()),
            "datasets": list(outcome.datasets),
            "metrics": to_jsonable(outcome.metrics),
            "arrays": sorted(arrays),
            "files": {},
            "figures": {},
            "environment": environment(device),
            "runtime_s": round(runtime, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code": code.to_dict(),
        }
        with Transaction() as txn:
            tmp = txn.write(folder / "arrays.npz", lambda fh: np.savez_compressed(fh, **arrays))
            record["files"]["arrays.npz"] = sha256_file(tmp)
            validate_result(record)
            txn.write(folder / "result.json", json_bytes(record))
    return Result(folder, record, reused=False)
