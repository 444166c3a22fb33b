"""End to end: every chapter under the smoke profile, the book built with warnings as errors,
and every page opened in headless Chromium (math typeset, nothing loaded from the network)."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bnbook import run as runner

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


class _Refs(HTMLParser):
    """Collects script src, link href and img src of a page."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.refs.append(("script", a["src"]))
        elif tag == "link" and a.get("href"):
            self.refs.append(("link", a["href"]))
        elif tag == "img" and a.get("src"):
            self.refs.append(("img", a["src"]))


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, out / name)
    shutil.copytree(ROOT / "book", out / "book", ignore=shutil.ignore_patterns("chapters", "_records", "status.md"))
    project = runner.Project(ROOT, out)
    outcomes = runner.run(project, profile="smoke", device="cpu", force=True, keep_going=True)
    failed = [f"{o.chapter.name}: {o.message}" for o in outcomes if o.status == "failed"]
    assert not failed, failed
    runner.build(project)
    return project


def test_every_chapter_is_published(smoke_book):
    html = smoke_book.html_dir
    for chapter in runner.discover(smoke_book):
        page = html / "chapters" / f"{chapter.name}.html"
        assert page.exists(), page
        text = page.read_text()
        assert "Run record" in text and "smoke" in text
    status = (html / "status.html").read_text()
    assert status.count(">ok<") == len(runner.discover(smoke_book))


def pages(project):
    html = project.html_dir
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts and p.name != "genindex.html"
                  and p.name != "search.html" and "_sources" not in p.parts)


def test_pages_load_nothing_from_the_network(smoke_book):
    for page in pages(smoke_book):
        parser = _Refs()
        parser.feed(page.read_text())
        for kind, ref in parser.refs:
            assert not re.match(r"^(https?:)?//", ref), f"{page.name} loads {kind} {ref} from the network"
            if ref.startswith("data:") or ref.startswith("#"):
                continue
            target = (page.parent / ref.split("?")[0].split("#")[0]).resolve()
            assert target.exists(), f"{page.name}: {kind} {ref} is missing"


def test_math_is_typeset_in_chromium(smoke_book, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (make setup installs it)"
    for page in pages(smoke_book):
        if page.name in ("index.html",):  # a redirect to intro.html
            continue
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        ).stdout
        assert "</html>" in dom, f"Chromium did not render {page}"
        source = page.read_text()
        has_math = "math notranslate" in source
        if has_math:
            assert "<mjx-container" in dom, f"math on {page.name} was not typeset by MathJax"
        assert "Traceback (most recent call last)" not in dom and "output traceback" not in dom, (
            f"{page.name} shows a Python traceback"
        )
