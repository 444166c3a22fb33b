"""The ``bnbook`` command: execute chapters with papermill, build the book, show status.

::

    bnbook run [CHAPTER ...] [--profile smoke|quick|paper] [--device auto|cpu|cuda[:N]]
               [--seed N] [-p key=value ...] [--force] [--keep-going]
    bnbook build
    bnbook status

A chapter is ``chapters/NN-slug.md`` (a MyST-Markdown notebook). ``run`` converts it with
jupytext, executes it with papermill (parameters injected) and writes the executed
notebook to ``book/chapters/NN-slug.ipynb``, with a run-record cell appended. A chapter
is skipped when nothing it depends on changed: its source, the ``bnbook`` package source,
its parameters, and the lock file. A failed chapter keeps its previously published
notebook on disk but its record says "failed", and ``build`` refuses to publish it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bnbook.config import PROFILES, check_profile
from bnbook.errors import BnbookError

LOCK_FILE = "requirements.lock"


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
        except (ValueError, SyntaxError):
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


def check_parameters(chapter: Chapter, declared: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise if a given parameter is unknown or its type differs from the declared default's."""
    for key, value in given.items():
        if key not in declared:
            raise BnbookError(
                f"unknown parameter {key!r} for chapter {chapter.name}; "
                f"its parameters are: {', '.join(declared)}"
            )
        default = declared[key]
        if default is None or value is None:
            continue
        ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        if not ok or isinstance(value, bool) != isinstance(default, bool):
            raise BnbookError(
                f"parameter {key!r} of chapter {chapter.name} expects {type(default).__name__} "
                f"(default {default!r}), got {value!r}"
            )


# ------------------------------------------------------------------ records
def tree_digest(paths: Sequence[Path], base: Path) -> str:
    """sha256 over the relative names and bytes of ``paths``."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(base).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(project: Project, chapter: Chapter, params: dict[str, Any]) -> str:
    """What a chapter's output depends on: its source, the package source, parameters, lock file."""
    digest = hashlib.sha256()
    digest.update(chapter.source.read_bytes())
    digest.update(tree_digest(list(project.package_dir.rglob("*.py")), project.package_dir).encode())
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


def read_record(project: Project, chapter: Chapter) -> dict[str, Any] | None:
    """The chapter's last run record, or ``None``."""
    path = project.records_dir / f"{chapter.name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(project: Project, chapter: Chapter, record: dict[str, Any]) -> None:
    from bnbook.results import write_json_atomic

    write_json_atomic(project.records_dir / f"{chapter.name}.json", record)


def records_table(project: Project) -> list[dict[str, Any]]:
    """One row per chapter with its last run (or 'not run')."""
    rows = []
    for chapter in discover(project):
        rec = read_record(project, chapter) or {}
        rows.append({"chapter": chapter.name, **rec})
    return rows


def status_markdown(project: Project) -> str:
    """The book's status page: each chapter's last run, rendered from the run records."""
    from bnbook.report import markdown_table

    rows = []
    for row in records_table(project):
        v = row.get("versions", {})
        rows.append({
            "chapter": f"[{row['chapter']}](chapters/{row['chapter']}.ipynb)" if row.get("ok") else row["chapter"],
            "status": "ok" if row.get("ok") else ("FAILED" if "ok" in row else "not run"),
            "profile": row.get("profile"),
            "device": row.get("device"),
            "seed": row.get("seed"),
            "runtime": row.get("runtime_s"),
            "date": row.get("finished", "")[:16].replace("T", " ") or None,
            "torch": v.get("torch"),
        })
    table = markdown_table(
        rows,
        {"chapter": "Chapter", "status": "Status", "profile": "Profile", "device": "Device", "seed": "Seed",
         "runtime": "Run time (s)", "date": "Executed (UTC)", "torch": "torch"},
        {"runtime": ".1f", "seed": "d"},
    )
    records = records_table(project)
    total = sum(r.get("runtime_s") or 0 for r in records)
    names = sorted({f"{r['device']} ({r['device_name']})" for r in records if "device_name" in r})
    machine = ", ".join(names) or "none yet"
    return (
        "# Execution status\n\n"
        "Every chapter of this book is a notebook that was re-executed by `bnbook run` "
        "before the HTML was built. This page lists each chapter's last run: the profile "
        "(`smoke`, `quick` or `paper`), the device, the seed, the wall-clock time and the "
        "torch version (each chapter's closing run record lists the others). It is generated from the run records in `book/_records/`.\n\n"
        f"{table}\n\n"
        f"Total execution time: {total:.1f} s. Machine: {machine}. To reproduce a chapter: "
        "`bnbook run <chapter> --profile <profile> --device <device>`.\n"
    )


def footer_markdown(record: dict[str, Any]) -> str:
    """The run-record cell appended to every executed chapter."""
    v = record["versions"]
    params = ", ".join(f"`{k}={v!r}`" for k, v in record["parameters"].items())
    return (
        "```{admonition} Run record\n:class: note\n"
        f"Executed by `bnbook run` on {record['finished']} (UTC) with profile **{record['profile']}** "
        f"on **{record['device']}** ({record['device_name']}), seed {record['seed']}, "
        f"in {record['runtime_s']:.1f} s. Parameters: {params}. "
        f"Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, matplotlib {v['matplotlib']}. "
        "See the [status page](../status.md) for every chapter.\n```"
    )


# ------------------------------------------------------------------ running
@dataclasses.dataclass
class Outcome:
    chapter: Chapter
    status: str  # "ran", "skipped" or "failed"
    message: str = ""


def _papermill_failure(exc: BaseException, nb_path: Path) -> str:
    """Name the failing cell of a papermill error."""
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    where = f"cell {cell}" if cell is not None else "a cell"
    return f"{where} raised {ename}: {str(evalue).splitlines()[0] if evalue else ''} (executed notebook: {nb_path})"


def run_chapter(
    project: Project,
    chapter: Chapter,
    *,
    profile: str,
    device: str,
    seed: int,
    params: dict[str, Any],
    force: bool = False,
) -> Outcome:
    """Execute one chapter unless its inputs are unchanged since its last successful run."""
    import jupytext
    import nbformat
    import papermill

    from bnbook.env import device_name, resolve_device

    nb = jupytext.read(chapter.source)
    declared = notebook_parameters(nb)
    all_params = {"profile": profile, "device": device, "seed": seed, **params}
    check_parameters(chapter, declared, all_params)
    key = run_key(project, chapter, all_params)
    published = project.executed_dir / f"{chapter.name}.ipynb"
    previous = read_record(project, chapter)
    if not force and previous and previous.get("ok") and previous.get("key") == key and published.exists():
        return Outcome(chapter, "skipped", "unchanged since its last run")

    resolved = resolve_device(device)
    project.executed_dir.mkdir(parents=True, exist_ok=True)
    env_backup = dict(os.environ)
    os.environ.setdefault("BNBOOK_RESULTS_DIR", str(project.out / "data" / "results"))
    os.environ.setdefault("BNBOOK_ROOT", str(project.root))
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bnbook-{chapter.name}-") as tmp:
        src = Path(tmp) / f"{chapter.name}.ipynb"
        dst = Path(tmp) / f"{chapter.name}.out.ipynb"
        nbformat.write(nb, src)
        error: BaseException | None = None
        try:
            papermill.execute_notebook(
                str(src), str(dst), parameters=all_params, kernel_name="python3",
                cwd=str(project.executed_dir), progress_bar=False, log_output=False,
                report_mode=False,
            )
        except Exception as exc:  # papermill raises PapermillExecutionError for a failing cell
            error = exc
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
        runtime = time.perf_counter() - t0
        record = {
            "chapter": chapter.name, "key": key, "ok": error is None,
            "profile": profile, "device": str(resolved), "device_name": device_name(resolved),
            "seed": seed, "parameters": all_params, "runtime_s": round(runtime, 2),
            "started": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        if error is not None:
            project.failed_dir.mkdir(parents=True, exist_ok=True)
            failed_nb = project.failed_dir / f"{chapter.name}.ipynb"
            if dst.exists():
                shutil.copyfile(dst, failed_nb)
            record["error"] = _papermill_failure(error, failed_nb)
            write_record(project, chapter, record)
            return Outcome(chapter, "failed", record["error"])
        executed = nbformat.read(dst, as_version=4)
        for cell in executed.cells:  # the run record states the parameters; keep the page clean
            if "injected-parameters" in cell.metadata.get("tags", []):
                cell.metadata["tags"] = [*cell.metadata["tags"], "remove-cell"]
        executed.cells.append(nbformat.v4.new_markdown_cell(footer_markdown(record)))
        executed.metadata.setdefault("bnbook", {}).update({k: record[k] for k in ("key", "profile", "device", "seed")})
        tmp_out = project.executed_dir / f".{chapter.name}.ipynb.tmp"
        nbformat.write(executed, tmp_out)
        os.replace(tmp_out, published)
    write_record(project, chapter, record)
    return Outcome(chapter, "ran", f"{runtime:.1f} s")


def run(
    project: Project,
    names: Sequence[str] = (),
    *,
    profile: str = "quick",
    device: str = "auto",
    seed: int = 0,
    params: dict[str, Any] | None = None,
    force: bool = False,
    keep_going: bool = False,
    echo=print,
) -> list[Outcome]:
    """Run the named chapters (all when none); stop at the first failure unless ``keep_going``."""
    import jupytext

    from bnbook.env import resolve_device

    check_profile(profile)
    resolve_device(device)  # fail before running anything if e.g. CUDA is absent
    params = params or {}
    for reserved in ("profile", "device", "seed"):
        if reserved in params:
            raise BnbookError(f"set {reserved} with --{reserved}, not with -p")
    chapters = select(discover(project), names)
    if not chapters:
        raise BnbookError(f"no chapters found in {project.chapters_dir}")
    # Validate -p against every selected chapter before executing any of them.
    if params:
        for chapter in chapters:
            check_parameters(chapter, notebook_parameters(jupytext.read(chapter.source)), params)
    outcomes = []
    for chapter in chapters:
        echo(f"[bnbook] {chapter.name} ({profile}, {device}, seed {seed}) ...")
        outcome = run_chapter(project, chapter, profile=profile, device=device, seed=seed,
                              params=params, force=force)
        echo(f"[bnbook] {chapter.name}: {outcome.status} {outcome.message}")
        outcomes.append(outcome)
        if outcome.status == "failed" and not keep_going:
            break
    write_status_page(project)
    return outcomes


def write_status_page(project: Project) -> Path:
    """(Re)write ``book/status.md`` from the run records."""
    path = project.book_dir / "status.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(status_markdown(project))
    return path


# ------------------------------------------------------------------ building
def check_publishable(project: Project) -> None:
    """Raise unless every chapter has a successful run and an executed notebook."""
    problems = []
    for chapter in discover(project):
        rec = read_record(project, chapter)
        nb = project.executed_dir / f"{chapter.name}.ipynb"
        if rec is None or not nb.exists():
            problems.append(f"{chapter.name} has not been run (bnbook run {chapter.number})")
        elif not rec.get("ok"):
            problems.append(f"{chapter.name} failed its last run: {rec.get('error', '?')}")
    if problems:
        raise BnbookError("cannot build the book: " + "; ".join(problems))
    stale = {p.stem for p in project.executed_dir.glob("*.ipynb")} - {c.name for c in discover(project)}
    for name in stale:  # a chapter whose source was removed or renamed
        (project.executed_dir / f"{name}.ipynb").unlink()


def build(project: Project, *, echo=print) -> Path:
    """Build the HTML with ``jupyter-book build`` (warnings as errors, nitpicky); return index.html."""
    check_publishable(project)
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
    parser.add_argument("--out", type=Path, default=None,
                        help="write the book (book/, _build/) under this folder instead of the repo")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute chapters (all when none is named)")
    p_run.add_argument("chapters", nargs="*", help="chapter name, number or slug")
    p_run.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)} (default quick)")
    p_run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p_run.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="set a chapter parameter (repeatable)")
    p_run.add_argument("--force", action="store_true", help="re-run even if nothing changed")
    p_run.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    sub.add_parser("build", help="build the HTML book from the executed chapters")
    sub.add_parser("status", help="print each chapter's last run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnbook`` command; returns the exit status."""
    args = make_parser().parse_args(argv)
    try:
        project = Project.find(args.out)
        if args.command == "run":
            outcomes = run(
                project, args.chapters, profile=args.profile, device=args.device, seed=args.seed,
                params=parse_assignments(args.param), force=args.force, keep_going=args.keep_going,
            )
            failed = [o for o in outcomes if o.status == "failed"]
            if failed:
                for o in failed:
                    print(f"bnbook: error: chapter {o.chapter.name} failed: {o.message}", file=sys.stderr)
                return 1
        elif args.command == "build":
            build(project)
        elif args.command == "status":
            for row in records_table(project):
                state = "ok" if row.get("ok") else ("FAILED" if "ok" in row else "not run")
                extra = (
                    f"{row['profile']:6} {row['device']:8} seed {row['seed']:<3} "
                    f"{row['runtime_s']:8.1f} s  {row['finished']}  torch {row['versions']['torch']}"
                    if "ok" in row else ""
                )
                print(f"{row['chapter']:28} {state:8} {extra}")
                if row.get("error"):
                    print(f"{'':28} {row['error']}")
    except BnbookError as exc:
        print(f"bnbook: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
