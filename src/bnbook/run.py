"""The ``bnbook`` command: execute chapters with papermill, build the book, show status.

::

    bnbook run [CHAPTER ...] [--profile smoke|quick|paper] [--device auto|cpu|cuda[:N]]
               [--seed N] [-p key=value ...] [--force] [--recompute] [--keep-going]
    bnbook build [--any-profile]
    bnbook status
    bnbook --version

A chapter is ``chapters/NN-slug.md`` (a MyST-Markdown notebook). ``run`` converts it with
jupytext, executes it with papermill (parameters injected) and publishes the executed
notebook as ``book/chapters/NN-slug.ipynb`` with a run-record cell appended, together with
its run record ``book/_records/NN-slug.json`` and the package list of that run: all three
are written under unique temporary names and moved into place only after the chapter
ran without error, so a failing or interrupted run never replaces a published page.

A chapter is skipped when nothing it depends on changed. Its run key hashes the chapter
source, the ``bnbook`` modules it imports (followed transitively), its parameters and
``requirements.lock``; the key is stored in the executed notebook's metadata and in the
run record, and both must agree. ``--force`` executes the notebook anyway (experiment
results are still reused from the result cache when intact); ``--recompute`` also
recomputes every experiment result (``$BNBOOK_RECOMPUTE=1`` in the kernel).

Every ``-p`` value is checked against the chapter config field it feeds (type and range,
see :mod:`bnbook.config`) before any chapter runs. ``build`` refuses a chapter that was
never run, whose last run failed, or that changed since it ran (stale), and a book with
smoke-profile or mixed-profile chapters unless ``--any-profile`` is given.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from bnbook.config import PROFILES, ChapterConfig, ParameterError, check_profile
from bnbook.errors import BnbookError

LOCK_FILE = "requirements.lock"
NOTICE_PREFIX = "[bnbook] "


class Terminated(BaseException):
    """Raised in the main thread when ``bnbook`` receives SIGTERM (so cleanup code runs)."""


# ------------------------------------------------------------------ project layout
@dataclasses.dataclass(frozen=True)
class Project:
    """Where chapter sources come from (``root``) and where the book is written (``out``).

    ``out`` is the repository itself for ``make book``; the test suite's smoke build uses a
    temporary folder holding copies of ``_config.yml``, ``_toc.yml`` and ``book/``.
    """

    root: Path
    out: Path

    @property
    def chapters_dir(self) -> Path:
        return self.root / "chapters"

    @property
    def package_dir(self) -> Path:
        return self.root / "src" / "bnbook"

    @property
    def book_dir(self) -> Path:
        return self.out / "book"

    @property
    def executed_dir(self) -> Path:
        return self.book_dir / "chapters"

    @property
    def records_dir(self) -> Path:
        return self.book_dir / "_records"

    @property
    def failed_dir(self) -> Path:
        return self.out / "_build" / "failed"

    @property
    def html_dir(self) -> Path:
        return self.out / "_build" / "html"

    @classmethod
    def find(cls, out: Path | None = None) -> Project:
        """The project around the current directory (or this checkout), writing into ``out``."""
        here = Path.cwd().resolve()
        for candidate in (here, *here.parents):
            if (candidate / "chapters").is_dir() and (candidate / "_config.yml").exists():
                root = candidate
                break
        else:
            from bnbook.paths import repo_root

            root = repo_root()
            if not (root / "chapters").is_dir():
                raise BnbookError(f"no bnbook project here: {here} has no chapters/ and _config.yml")
        return cls(root=root, out=(out or root).resolve())


@dataclasses.dataclass(frozen=True)
class Chapter:
    """One chapter source: ``chapters/<name>.md``."""

    name: str
    source: Path

    @property
    def number(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def slug(self) -> str:
        return self.name.split("-", 1)[-1]


def discover(project: Project) -> list[Chapter]:
    """Every chapter source, in file-name order (which is the book's order)."""
    return [Chapter(p.stem, p) for p in sorted(project.chapters_dir.glob("[0-9]*.md"))]


def select(chapters: Sequence[Chapter], names: Sequence[str]) -> list[Chapter]:
    """Chapters named by full name, number (``3`` or ``03``) or slug; all when ``names`` is empty."""
    if not names:
        return list(chapters)
    chosen: list[Chapter] = []
    for name in names:
        key = name.removesuffix(".md").removeprefix("chapters/")
        matches = [
            c for c in chapters
            if key in (c.name, c.slug) or (key.isdigit() and c.number.isdigit() and int(key) == int(c.number))
        ]
        if len(matches) != 1:
            known = ", ".join(c.name for c in chapters)
            raise BnbookError(f"unknown chapter {name!r}; known chapters: {known}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


# ------------------------------------------------------------------ the chapter's code
def code_cells(nb: Any) -> list[ast.Module]:
    """Syntax trees of the notebook's code cells (IPython ``%``/``!`` lines left out).

    Raises ``SyntaxError`` if a cell is not Python.
    """
    trees = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        trees.append(ast.parse("\n".join(lines)))
    return trees


def chapter_code_files(project: Project, nb: Any) -> list[Path]:
    """The ``bnbook`` source files a chapter runs: the modules it imports, followed transitively.

    A chapter whose cells cannot be parsed depends on the whole package.
    """
    from bnbook.results import import_closure, imported_modules

    try:
        trees = code_cells(nb)
    except SyntaxError:
        return sorted(project.package_dir.rglob("*.py"))
    return import_closure(imported_modules(trees), project.package_dir)


def config_binding(nb: Any) -> tuple[type[ChapterConfig] | None, dict[str, str]]:
    """The chapter's config class and which notebook parameter feeds which config field.

    Found in the chapter's call ``SomeConfig.from_params(profile, seed=seed, steps=steps, ...)``:
    a parameter passed as the first argument feeds ``profile``, one passed as ``field=param``
    feeds ``field``. ``(None, {})`` when the chapter has no such call (or it cannot be imported).
    """
    try:
        trees = code_cells(nb)
    except SyntaxError:
        return None, {}
    aliases: dict[str, str] = {}
    calls: list[ast.Call] = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_params":
                calls.append(node)
    for call in calls:
        cls = _resolve(_dotted(call.func.value), aliases)
        if not (isinstance(cls, type) and issubclass(cls, ChapterConfig)):
            continue
        bound: dict[str, str] = {}
        if call.args and isinstance(call.args[0], ast.Name):
            bound[call.args[0].id] = "profile"
        for kw in call.keywords:
            if kw.arg and isinstance(kw.value, ast.Name):
                bound[kw.value.id] = kw.arg
        return cls, bound
    return None, {}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (head := _dotted(node.value)):
        return f"{head}.{node.attr}"
    return None


def _resolve(dotted: str | None, aliases: dict[str, str]) -> Any:
    """Import what ``dotted`` names in the chapter (``ch.IoffeConfig`` → the class), or ``None``."""
    if not dotted:
        return None
    head, _, rest = dotted.partition(".")
    if head not in aliases:
        return None
    parts = (aliases[head] + ("." + rest if rest else "")).split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # an import error belongs to the chapter run, which reports it
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


# ------------------------------------------------------------------ parameters
def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``-p key=value`` items; values are Python literals, else plain strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BnbookError(f"malformed parameter {item!r}: expected key=value, e.g. -p steps=1000")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = raw.strip()
        params[key] = value
    return params


def notebook_parameters(nb: Any) -> dict[str, Any]:
    """Names and default values of a notebook's ``parameters`` cell (evaluated as literals)."""
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise BnbookError("a chapter needs exactly one code cell tagged 'parameters'")
    tree = ast.parse(cells[0].source)
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError as exc:
                raise BnbookError(f"parameter {node.targets[0].id!r} must have a literal default") from exc
    return found


def check_parameters(
    chapter: Chapter,
    declared: dict[str, Any],
    given: dict[str, Any],
    binding: tuple[type[ChapterConfig] | None, dict[str, str]] = (None, {}),
) -> dict[str, Any]:
    """Return the given parameters converted to their config fields' types, or raise.

    A parameter that feeds a config field (see :func:`config_binding`) is checked against
    that field's type and range (:mod:`bnbook.config`); the others must match the type of
    their non-``None`` default. The whole config is then built once, so a check in the
    config class itself also runs before any notebook does.
    """
    cls, bound = binding
    checked: dict[str, Any] = {}
    for key, value in given.items():
        if key not in declared:
            raise BnbookError(
                f"unknown parameter {key!r} for chapter {chapter.name}; "
                f"its parameters are: {', '.join(declared)}"
            )
        if cls is not None and key in bound:
            try:
                checked[key] = cls.check_param(bound[key], value)
            except ParameterError as exc:
                raise BnbookError(
                    f"parameter {key!r} of chapter {chapter.name} expects {exc.accepted}, got {value!r}"
                ) from None
            continue
        default = declared[key]
        checked[key] = value
        if default is None or value is None:
            continue
        ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        if not ok or isinstance(value, bool) != isinstance(default, bool):
            raise BnbookError(
                f"parameter {key!r} of chapter {chapter.name} expects {type(default).__name__} "
                f"(default {default!r}), got {value!r}"
            )
    if cls is not None:
        fields = {bound[k]: v for k, v in checked.items() if k in bound}
        try:
            cls.from_params(fields.pop("profile", "quick"), **fields)
        except (BnbookError, ValueError, TypeError) as exc:
            raise BnbookError(f"chapter {chapter.name}: {exc}") from None
    return checked


def _injectable(value: Any) -> Any:
    """A value papermill can write into the parameters cell (it writes tuples as strings)."""
    if isinstance(value, (list, tuple)):
        return [_injectable(v) for v in value]
    return value


# ------------------------------------------------------------------ records
def tree_digest(paths: Sequence[Path], base: Path) -> str:
    """sha256 over the relative names and bytes of ``paths``."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(project: Project, chapter: Chapter, params: dict[str, Any], nb: Any = None) -> str:
    """What a chapter's page depends on: its source, the ``bnbook`` modules it imports
    (transitively), its parameters and the lock file."""
    from bnbook.results import files_digest

    if nb is None:
        import jupytext

        nb = jupytext.read(chapter.source)
    digest = hashlib.sha256()
    digest.update(chapter.source.read_bytes())
    digest.update(files_digest(chapter_code_files(project, nb), project.package_dir.resolve()).encode())
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    lock = project.root / LOCK_FILE
    digest.update(lock.read_bytes() if lock.exists() else b"")
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the packages that shape a chapter's numbers and pages."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "numpy", "matplotlib", "seaborn", "papermill", "jupytext", "jupyter-book"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def bnbook_version() -> str:
    """The version of the installed ``bnbook`` package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bnbook")
    except PackageNotFoundError:
        from bnbook import __version__

        return __version__


def record_path(project: Project, chapter: Chapter) -> Path:
    return project.records_dir / f"{chapter.name}.json"


def packages_path(project: Project, chapter: Chapter) -> Path:
    """The package list (``pip freeze`` style) of the chapter's last successful run."""
    return project.records_dir / f"{chapter.name}.packages.txt"


def read_record(project: Project, chapter: Chapter) -> dict[str, Any] | None:
    """The chapter's last run record, or ``None`` (absent or unreadable)."""
    try:
        record = json.loads(record_path(project, chapter).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def notebook_key(path: Path) -> str | None:
    """The run key stored in an executed notebook's metadata (``None`` if absent)."""
    try:
        meta = json.loads(path.read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return None
    key = meta.get("bnbook", {}).get("key") if isinstance(meta, dict) else None
    return key if isinstance(key, str) else None


def write_record(project: Project, chapter: Chapter, record: dict[str, Any]) -> None:
    from bnbook.results import write_json_atomic

    write_json_atomic(record_path(project, chapter), record)


def records_table(project: Project) -> list[dict[str, Any]]:
    """One row per chapter with its last run (or 'not run')."""
    rows = []
    for chapter in discover(project):
        rec = read_record(project, chapter) or {}
        rows.append({**rec, "chapter": chapter.name})
    return rows


def _state(row: dict[str, Any]) -> str:
    return "ok" if row.get("ok") is True else ("FAILED" if "ok" in row else "not run")


def _commit_text(row: dict[str, Any]) -> str | None:
    commit = row.get("commit")
    if not isinstance(commit, str) or not commit:
        return "unknown" if "ok" in row else None
    return commit[:10] + (" (with local changes)" if row.get("commit_modified") else "")


def _device_text(row: dict[str, Any]) -> str | None:
    device = row.get("device")
    if isinstance(device, str) and device.startswith("cuda") and row.get("device_name"):
        return f"{device} ({row['device_name']})"
    return device if isinstance(device, str) else None


def status_markdown(project: Project) -> str:
    """The book's status page: each chapter's last run, rendered from the run records."""
    from bnbook.report import markdown_table

    records = records_table(project)
    rows = []
    for row in records:
        packages = row.get("packages")
        has_packages = isinstance(packages, str) and (project.records_dir / packages).is_file()
        finished = row.get("finished")
        rows.append({
            "chapter": f"[{row['chapter']}](chapters/{row['chapter']}.ipynb)" if row.get("ok") is True else row["chapter"],
            "status": _state(row),
            "profile": row.get("profile"),
            "device": _device_text(row),
            "seed": row.get("seed"),
            "runtime": row.get("runtime_s"),
            "date": finished[:16].replace("T", " ") if isinstance(finished, str) else None,
            "commit": _commit_text(row),
            "packages": f"{{download}}`list <_records/{packages}>`" if has_packages else None,
        })
    table = markdown_table(
        rows,
        {"chapter": "Chapter", "status": "Status", "profile": "Profile", "device": "Device", "seed": "Seed",
         "runtime": "Run time (s)", "date": "Executed (UTC)", "commit": "Commit", "packages": "Packages"},
        {"runtime": ".1f", "seed": "d"},
    )
    total = sum(r["runtime_s"] for r in records if isinstance(r.get("runtime_s"), (int, float)))
    names = sorted({f"{r['device']} ({r['device_name']})" for r in records
                    if isinstance(r.get("device"), str) and isinstance(r.get("device_name"), str)})
    machine = ", ".join(names) or "none yet"
    return (
        "# Execution status\n\n"
        "Every chapter of this book is a notebook that was re-executed by `bnbook run` "
        "before the HTML was built. This page lists each chapter's last run: the profile "
        "(`smoke`, `quick` or `paper`), the device, the seed, the wall-clock time, the date, the git "
        "commit the code was run from, and the full list of Python packages installed for that run. "
        "It is generated from the run records in `book/_records/`.\n\n"
        f"{table}\n\n"
        f"Total execution time: {total:.1f} s. Machine: {machine}. To reproduce a chapter: "
        "`bnbook run <chapter> --profile <profile> --device <device>`.\n"
    )


def footer_markdown(record: dict[str, Any]) -> str:
    """The run-record cell appended to every executed chapter."""
    v = record["versions"]
    params = ", ".join(f"`{k}={v!r}`" for k, v in record["parameters"].items())
    commit = _commit_text(record)
    return (
        "```{admonition} Run record\n:class: note\n"
        f"Executed by `bnbook run` on {record['finished']} (UTC) with profile **{record['profile']}** "
        f"on **{record['device']}** ({record['device_name']}), seed {record['seed']}, "
        f"in {record['runtime_s']:.1f} s, from commit {commit}. Parameters: {params}. "
        f"Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, matplotlib {v['matplotlib']}. "
        "See the [status page](../status.md) for every chapter and the full package list.\n```"
    )


# ------------------------------------------------------------------ running
@dataclasses.dataclass
class Outcome:
    chapter: Chapter
    status: str  # "ran", "skipped" or "failed"
    message: str = ""
    elapsed_s: float = 0.0


def _papermill_failure(exc: BaseException, nb_path: Path) -> str:
    """Name the failing cell of a papermill error."""
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    where = f"cell {cell}" if cell is not None else "a cell"
    first = str(evalue).splitlines()[0] if evalue else ""
    return f"{where} raised {ename}: {first} (executed notebook: {nb_path})"


def _kernel_manager_class(folder: Path) -> type:
    """A kernel manager that talks to the kernel over IPC sockets inside ``folder``.

    IPC instead of TCP: no open ports and no "running over TCP without encryption"
    warning on every run. The kernel's own stdout/stderr (not the cells' output, which
    travels over the sockets) go to ``folder/kernel.log`` instead of the terminal.
    """
    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.transport = "ipc"
            self.connection_file = str(folder / "kernel.json")

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            with open(folder / "kernel.log", "ab") as log:
                kw.update(stdout=log, stderr=log)
                await super()._async_launch_kernel(kernel_cmd, **kw)

    return IpcKernelManager


def _relay_notices(nb_path: Path, echo: Callable[[str], None]) -> None:
    """Echo the library's ``[bnbook]`` notices (stderr lines in the executed notebook)."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = "".join(out.get("text", []))
                for line in text.splitlines():
                    if line.startswith(NOTICE_PREFIX):
                        echo(f"{NOTICE_PREFIX}  {line[len(NOTICE_PREFIX):]}")


@contextlib.contextmanager
def _chapter_lock(project: Project, chapter: Chapter, echo: Callable[[str], None]) -> Iterator[None]:
    """One ``bnbook run`` of a chapter at a time (per output folder); the others wait."""
    from filelock import FileLock, Timeout

    project.records_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(project.records_dir / f".{chapter.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        echo(f"{NOTICE_PREFIX}{chapter.name}: waiting for another bnbook run of this chapter")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_current(project: Project, chapter: Chapter, key: str, record: dict[str, Any] | None = None) -> bool:
    """Whether the published notebook and its record are a successful run with run key ``key``."""
    record = read_record(project, chapter) if record is None else record
    published = project.executed_dir / f"{chapter.name}.ipynb"
    return bool(record and record.get("ok") is True and record.get("key") == key
                and notebook_key(published) == key)


def run_chapter(
    project: Project,
    chapter: Chapter,
    *,
    profile: str,
    device: str,
    seed: int,
    params: dict[str, Any],
    force: bool = False,
    recompute: bool = False,
    nb: Any = None,
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Execute one chapter unless its inputs are unchanged since its last successful run.

    ``params`` must have been checked (:func:`check_parameters`). ``recompute`` makes
    the chapter recompute its experiment results instead of reusing them (and implies
    ``force``).
    """
    import jupytext

    from bnbook.results import to_jsonable

    if nb is None:
        nb = jupytext.read(chapter.source)
    values = {"profile": profile, "device": device, "seed": seed, **params}
    # The key and the record use the JSON form (tuples as lists, NaN/inf as strings), so that
    # ``bnbook build`` recomputes the same key from the record.
    recorded = to_jsonable(values, nonfinite="string")
    t0 = time.perf_counter()
    with _chapter_lock(project, chapter, echo):
        key = run_key(project, chapter, recorded, nb)
        if not (force or recompute) and is_current(project, chapter, key):
            return Outcome(chapter, "skipped", "unchanged since its last run", time.perf_counter() - t0)
        outcome = _execute(project, chapter, nb, key, values, recorded, recompute=recompute, echo=echo)
    outcome.elapsed_s = time.perf_counter() - t0
    return outcome


def _execute(
    project: Project, chapter: Chapter, nb: Any, key: str, values: dict[str, Any], recorded: dict[str, Any], *,
    recompute: bool, echo: Callable[[str], None],
) -> Outcome:
    import nbformat
    import papermill

    from bnbook.env import device_name, git_revision, package_list, resolve_device
    from bnbook.results import RECOMPUTE_ENV, Transaction, json_bytes, to_jsonable, write_atomic

    resolved = resolve_device(values["device"])
    published = project.executed_dir / f"{chapter.name}.ipynb"
    project.executed_dir.mkdir(parents=True, exist_ok=True)
    env_backup = dict(os.environ)
    os.environ.setdefault("BNBOOK_RESULTS_DIR", str(project.out / "data" / "results"))
    os.environ.setdefault("BNBOOK_ROOT", str(project.root))
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    if recompute:
        os.environ[RECOMPUTE_ENV] = "1"
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bnbook-{chapter.name}-") as tmp:
        src = Path(tmp) / f"{chapter.name}.ipynb"
        dst = Path(tmp) / f"{chapter.name}.out.ipynb"
        nbformat.write(nb, src)
        error: BaseException | None = None
        try:
            papermill.execute_notebook(
                str(src), str(dst), parameters={k: _injectable(v) for k, v in values.items()},
                kernel_name="python3", cwd=str(project.executed_dir),
                progress_bar=False, log_output=False, report_mode=False,
                kernel_manager_class=_kernel_manager_class(Path(tmp)),
            )
        except Exception as exc:  # papermill raises PapermillExecutionError for a failing cell
            error = exc
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
        _relay_notices(dst, echo)
        runtime = time.perf_counter() - t0
        revision = git_revision(project.root)
        record = to_jsonable({
            "chapter": chapter.name, "key": key, "ok": error is None,
            "profile": values["profile"], "device": str(resolved), "device_name": device_name(resolved),
            "seed": values["seed"], "parameters": recorded, "runtime_s": round(runtime, 2),
            "started": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": revision["commit"], "commit_modified": revision["modified"],
            "bnbook": bnbook_version(), "versions": versions(),
            "packages": packages_path(project, chapter).name,
        }, nonfinite="string")
        if error is not None:
            failed_nb = project.failed_dir / f"{chapter.name}.ipynb"
            record["error"] = _papermill_failure(error, failed_nb)
            record.pop("packages")
            try:
                if dst.exists():
                    write_atomic(failed_nb, dst.read_bytes())
                log = Path(tmp) / "kernel.log"
                if log.exists() and log.stat().st_size:
                    write_atomic(project.failed_dir / f"{chapter.name}.kernel.log", log.read_bytes())
                write_record(project, chapter, record)
            except OSError as exc:  # e.g. a full disk: the message still reaches the user
                record["error"] += f"; the run record could not be written ({exc.strerror or exc})"
            return Outcome(chapter, "failed", record["error"])
        executed = nbformat.read(dst, as_version=4)
        for cell in executed.cells:  # the run record states the parameters; keep the page clean
            if "injected-parameters" in cell.metadata.get("tags", []):
                cell.metadata["tags"] = [*cell.metadata["tags"], "remove-cell"]
        executed.cells.append(nbformat.v4.new_markdown_cell(footer_markdown(record)))
        executed.metadata["bnbook"] = {k: record[k] for k in ("key", "profile", "device", "seed")}
        try:
            with Transaction() as txn:  # page, package list and record: all or none
                txn.write(published, nbformat.writes(executed).encode())
                txn.write(packages_path(project, chapter), ("\n".join(package_list()) + "\n").encode())
                txn.write(record_path(project, chapter), json_bytes(record))
        except Exception as exc:  # a full disk, or a record that cannot be stored: nothing is published
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror + (f": {exc.filename}" if exc.filename else f" (writing {published})")
            else:
                reason = f"{type(exc).__name__}: {exc}"
            message = f"the executed notebook could not be published ({reason}); the previous page is kept"
            with contextlib.suppress(Exception):
                write_record(project, chapter, {**record, "ok": False, "error": message})
            return Outcome(chapter, "failed", message)
    return Outcome(chapter, "ran", "")


@dataclasses.dataclass
class _Plan:
    chapter: Chapter
    nb: Any
    params: dict[str, Any]


def check_seed(seed: Any) -> int:
    """Return ``seed`` if it is a valid base seed, else raise naming ``--seed``."""
    try:
        return ChapterConfig.check_param("seed", seed)
    except ParameterError as exc:
        raise BnbookError(f"--seed expects {exc.accepted}, got {seed!r}") from None


def plan(
    project: Project, names: Sequence[str], *, profile: str, device: str, seed: int, params: dict[str, Any],
) -> list[_Plan]:
    """The chapters to run with their checked parameters; raises before anything runs."""
    import jupytext

    from bnbook.env import resolve_device

    check_profile(profile)
    resolve_device(device)  # fail before running anything if e.g. CUDA is absent
    check_seed(seed)
    for reserved in ("profile", "device", "seed"):
        if reserved in params:
            raise BnbookError(f"set {reserved} with --{reserved}, not with -p")
    chapters = select(discover(project), names)
    if not chapters:
        raise BnbookError(f"no chapters found in {project.chapters_dir}")
    plans = []
    for chapter in chapters:
        nb = jupytext.read(chapter.source)
        given = {"profile": profile, "device": device, "seed": seed, **params}
        checked = check_parameters(chapter, notebook_parameters(nb), given, config_binding(nb))
        plans.append(_Plan(chapter, nb, {k: v for k, v in checked.items() if k not in ("profile", "device", "seed")}))
    return plans


def run(
    project: Project,
    names: Sequence[str] = (),
    *,
    profile: str = "quick",
    device: str = "auto",
    seed: int = 0,
    params: dict[str, Any] | None = None,
    force: bool = False,
    recompute: bool = False,
    keep_going: bool = False,
    echo: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run the named chapters (all when none); stop at the first failure unless ``keep_going``.

    Every parameter of every selected chapter is checked before the first one runs.
    """
    plans = plan(project, names, profile=profile, device=device, seed=seed, params=params or {})
    project.executed_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for p in plans:
        echo(f"[bnbook] {p.chapter.name} ({profile}, {device}, seed {seed}) ...")
        outcome = run_chapter(project, p.chapter, profile=profile, device=device, seed=seed, params=p.params,
                              force=force, recompute=recompute, nb=p.nb, echo=echo)
        detail = f" ({outcome.message})" if outcome.message and outcome.status != "failed" else ""
        echo(f"[bnbook] {p.chapter.name}: {outcome.status} in {outcome.elapsed_s:.1f} s{detail}")
        outcomes.append(outcome)
        if outcome.status == "failed" and not keep_going:
            break
    try:
        write_status_page(project)
    except OSError as exc:
        echo(f"[bnbook] the status page could not be written ({exc.strerror or exc})")
    return outcomes


def write_status_page(project: Project) -> Path:
    """(Re)write ``book/status.md`` from the run records."""
    from bnbook.results import write_atomic

    path = project.book_dir / "status.md"
    write_atomic(path, status_markdown(project).encode())
    return path


# ------------------------------------------------------------------ building
def check_publishable(project: Project, *, any_profile: bool = False) -> None:
    """Raise unless every chapter's published notebook is its last, successful, current run.

    Refused: a chapter never run, whose last run failed, whose notebook and record
    disagree, or that changed since it ran (its source, the ``bnbook`` code it imports,
    or the lock file: "stale"). Unless ``any_profile``: a smoke-profile chapter, or
    chapters run with different profiles.
    """
    problems = []
    profiles: dict[str, list[str]] = {}
    for chapter in discover(project):
        rec = read_record(project, chapter)
        nb = project.executed_dir / f"{chapter.name}.ipynb"
        again = f"bnbook run {chapter.number}"
        if rec is None:
            problems.append(f"{chapter.name} has not been run ({again})")
        elif rec.get("ok") is not True:
            problems.append(f"{chapter.name} failed its last run: {rec.get('error', 'no error recorded')} ({again})")
        elif not nb.exists() or notebook_key(nb) != rec.get("key"):
            problems.append(f"{chapter.name}: its executed notebook does not match its run record ({again})")
        elif run_key(project, chapter, rec.get("parameters", {})) != rec.get("key"):
            problems.append(f"{chapter.name} is stale: its source, the bnbook code it imports or "
                            f"{LOCK_FILE} changed since its last run ({again})")
        else:
            profiles.setdefault(str(rec.get("profile")), []).append(chapter.number)
    if problems:
        raise BnbookError("cannot build the book: " + "; ".join(problems))
    if not any_profile and ("smoke" in profiles or len(profiles) > 1):
        used = "; ".join(f"{p}: {', '.join(n)}" for p, n in sorted(profiles.items()))
        raise BnbookError(
            "cannot build the book: " + ("it has smoke-profile chapters" if "smoke" in profiles
                                         else "its chapters ran with different profiles")
            + f" ({used}); re-run them with one profile (e.g. bnbook run --profile quick) "
            "or pass --any-profile to publish them as they are"
        )
    stale = {p.stem for p in project.executed_dir.glob("*.ipynb")} - {c.name for c in discover(project)}
    for name in stale:  # a chapter whose source was removed or renamed
        (project.executed_dir / f"{name}.ipynb").unlink()


def build(project: Project, *, any_profile: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Build the HTML with ``jupyter-book build`` (warnings as errors, nitpicky); return index.html."""
    missing = [n for n in ("_config.yml", "_toc.yml") if not (project.out / n).is_file()]
    if missing or not project.book_dir.is_dir():
        raise BnbookError(
            f"{project.out} is not a book folder: it lacks {', '.join(missing) or 'book/'}; "
            "a folder given with --out needs copies of _config.yml, _toc.yml and book/ from the repository"
        )
    check_publishable(project, any_profile=any_profile)
    write_status_page(project)
    # Sphinx's saved environment does not survive a changed table of contents (a KeyError in
    # sphinx-external-toc), so a new _toc.yml or _config.yml starts from a clean environment.
    stamp = project.out / "_build" / ".bnbook-config-digest"
    digest = tree_digest([project.out / "_toc.yml", project.out / "_config.yml"], project.out)
    if not stamp.exists() or stamp.read_text() != digest:
        shutil.rmtree(project.out / "_build" / ".doctrees", ignore_errors=True)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [
        str(exe) if exe.exists() else "jupyter-book", "build", str(project.book_dir),
        "--config", str(project.out / "_config.yml"), "--toc", str(project.out / "_toc.yml"),
        "--path-output", str(project.out), "--builder", "html", "-W", "-n", "--keep-going",
    ]
    echo("[bnbook] " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=project.out, capture_output=True, text=True)
    log = project.out / "_build" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BnbookError(f"jupyter-book build failed (full log: {log}):\n{tail}")
    stamp.write_text(digest)
    index = project.html_dir / "index.html"
    echo(f"[bnbook] HTML written to {index}")
    return index


# ------------------------------------------------------------------ CLI
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnbook", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"bnbook {bnbook_version()}")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the book (book/, _build/) under this folder instead of the repo")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser(
        "run", help="execute chapters (all when none is named)",
        description="Execute chapters with papermill. A chapter whose source, imported bnbook code, "
                    "parameters and requirements.lock are unchanged since its last successful run is skipped.",
    )
    p_run.add_argument("chapters", nargs="*", help="chapter name, number or slug")
    p_run.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)} (default quick)")
    p_run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p_run.add_argument("--seed", type=int, default=0, help="base seed, 0 to 2**31-1 (default 0)")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="set a chapter parameter (repeatable); checked against the chapter config's "
                            "field type and range, e.g. -p steps=500 -p batch_sizes=4,16")
    p_run.add_argument("--force", action="store_true",
                       help="execute the notebooks even if nothing changed; experiment results are "
                            "still reused from the result cache when intact")
    p_run.add_argument("--recompute", action="store_true",
                       help="also recompute every experiment result instead of reusing the cache "
                            "(implies --force): repairs a cache, re-measures timings, checks determinism")
    p_run.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    p_build = sub.add_parser(
        "build", help="build the HTML book from the executed chapters",
        description="Build the HTML (jupyter-book, warnings as errors). Refuses chapters that were never "
                    "run, failed their last run or are stale (changed since they ran).",
    )
    p_build.add_argument("--any-profile", action="store_true",
                         help="publish even if chapters ran with the smoke profile or with different profiles")
    sub.add_parser("status", help="print each chapter's last run (exit status 1 if one failed)")
    p_sweep = sub.add_parser(
        "sweep", help="dispatch a chapter's grid of runs as independent jobs (local processes or Slurm)",
        description="Enumerate the chapter's grid (one cached result per unit), skip the units already cached "
                    "and submit the rest through submitit; `bnbook run` afterwards renders from the cache.",
    )
    p_sweep.add_argument("chapter", help="chapter name, number or slug (a chapter that declares a grid, e.g. 08)")
    p_sweep.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)} (default quick)")
    p_sweep.add_argument("--device", default="auto", help="device of every job: auto, cpu, cuda or cuda:N")
    p_sweep.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p_sweep.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                         help="set a chapter parameter (repeatable), as for `bnbook run`")
    p_sweep.add_argument("--executor", choices=("local", "slurm"), default="local",
                         help="local: processes on this machine; slurm: one Slurm job per unit (default local)")
    p_sweep.add_argument("--dry-run", action="store_true", help="list the units, which are cached, and the cost")
    p_sweep.add_argument("--slurm-partition", default=None, help="Slurm partition")
    p_sweep.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per Slurm job (default 1)")
    p_sweep.add_argument("--timeout-min", type=int, default=60, help="wall-clock limit of each job (default 60)")
    p_sweep.add_argument("--max-parallel", type=int, default=None, help="at most this many jobs at once")
    p_sweep.add_argument("--assume-tflops", type=float, default=10.0,
                         help="sustained TFLOP/s per GPU for --dry-run's GPU-hour estimate (default 10)")
    return parser


def _status_lines(project: Project) -> tuple[list[str], bool]:
    """The lines ``bnbook status`` prints and whether a chapter's last run failed."""
    lines, failed = [], False
    for row in records_table(project):
        state = _state(row)
        failed |= state == "FAILED"
        extra = ""
        if "ok" in row:
            runtime = row.get("runtime_s")
            fields = [
                f"{row.get('profile', '?')!s:6}", f"{row.get('device', '?')!s:8}", f"seed {row.get('seed', '?')!s:<3}",
                f"{runtime:8.1f} s" if isinstance(runtime, (int, float)) else f"{'?':>8} s",
                str(row.get("finished", "?")),
                f"torch {row.get('versions', {}).get('torch', '?') if isinstance(row.get('versions'), dict) else '?'}",
            ]
            extra = " ".join(fields)
        lines.append(f"{row['chapter']:28} {state:8} {extra}".rstrip())
        if row.get("error"):
            lines.append(f"{'':28} {row['error']}")
    return lines, failed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnbook`` command; returns the exit status.

    0: success; 1: a chapter failed (``run``) or a chapter's last run failed (``status``);
    2: bad input or an unmet precondition (one ``bnbook: error:`` line); 130: interrupted
    (Ctrl-C); 143: terminated (SIGTERM). Temporary folders are removed in every case.
    """
    args = make_parser().parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        project = Project.find(args.out)
        if args.command == "run":
            outcomes = run(
                project, args.chapters, profile=args.profile, device=args.device, seed=args.seed,
                params=parse_assignments(args.param), force=args.force or args.recompute,
                recompute=args.recompute, keep_going=args.keep_going,
            )
            failed = [o for o in outcomes if o.status == "failed"]
            if failed:
                for o in failed:
                    print(f"bnbook: error: chapter {o.chapter.name} failed: {o.message}", file=sys.stderr)
                return 1
        elif args.command == "build":
            build(project, any_profile=args.any_profile)
        elif args.command == "status":
            lines, failed = _status_lines(project)
            print("\n".join(lines))
            return 1 if failed else 0
        elif args.command == "sweep":
            from bnbook import sweep

            (chapter,) = select(discover(project), [args.chapter])
            params = {"device": args.device, "seed": args.seed, **parse_assignments(args.param)}
            return sweep.command(
                chapter.source, profile=args.profile, params=params, executor=args.executor,
                dry_run=args.dry_run, partition=args.slurm_partition, gpus_per_job=args.gpus_per_job,
                timeout_min=args.timeout_min, max_parallel=args.max_parallel, tflops=args.assume_tflops,
            )
    except BnbookError as exc:
        print(f"bnbook: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk or a read-only output folder
        print(f"bnbook: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bnbook: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("bnbook: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
