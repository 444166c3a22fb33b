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
    runner.build(project, any_profile=True)  # smoke chapters, on purpose
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


# ------------------------------------------------------------------ citable, accessible (issue 16)
class _Imgs(HTMLParser):
    """Collects the attributes of every <img> and every link of a page."""

    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "a" and dict(attrs).get("href"):
            self.links.append(dict(attrs)["href"])


def _parse(page: Path) -> _Imgs:
    parser = _Imgs()
    parser.feed(page.read_text())
    return parser


def content_pages(project):
    return [p for p in pages(project) if p.name != "index.html"]  # index.html only redirects


def chapter_pages(project):
    return [project.html_dir / "chapters" / f"{c.name}.html" for c in runner.discover(project)]


PATH_LIKE = re.compile(r"\.(png|jpe?g|svg|gif)\b|[0-9a-f]{32,}|^\.\.?/|_images/")


def test_every_image_has_real_alt_text(smoke_book):
    figures = 0
    for page in content_pages(smoke_book):
        for img in _parse(page).imgs:
            alt = (img.get("alt") or "").strip()
            assert alt and not PATH_LIKE.search(alt), f"{page.name}: <img src={img.get('src')}> has alt {alt!r}"
            if "_images/" in img.get("src", ""):
                figures += 1
                assert len(alt) >= 30 and ("panel" in alt or "Chart." in alt), (page.name, alt)
    assert figures >= len(runner.discover(smoke_book)) - 1  # (nearly) every chapter has a figure


def test_every_page_shows_the_version_date_and_commit(smoke_book):
    from bnbook import __version__

    expected = re.compile(rf"version {re.escape(__version__)}, built \d{{4}}-\d\d-\d\d "
                          r"(from commit [0-9a-f]{7,}( with uncommitted changes)?|outside a git checkout)")
    lines = set()
    for page in content_pages(smoke_book):
        text = page.read_text()
        found = expected.search(text)
        assert found, f"{page.name} does not show the version line"
        lines.add(found.group(0))
        assert "How to cite</a>" in text and "CC BY 4.0" in text
    assert len(lines) == 1, lines  # one build, one line


def test_repository_buttons_follow_the_one_setting(smoke_book):
    import yaml

    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    for page in content_pages(smoke_book):
        text = page.read_text()
        assert ("repository-button" in text) == bool(url), page.name
        assert ("issues-button" in text) == bool(url), page.name


def test_chapter_downloads_are_runnable_sources(smoke_book):
    import jupytext

    for chapter, page in zip(runner.discover(smoke_book), chapter_pages(smoke_book)):
        links = _parse(page).links
        md = f"../_sources/chapters/{chapter.name}.md"
        assert md in links, f"{page.name}'s download menu does not offer {md}"
        assert not any(l.endswith(".ipynb") and "_sources" in l for l in links), page.name
        text = (page.parent / md).resolve().read_text()
        nb = jupytext.reads(text, fmt="md:myst")
        assert "pip install --no-deps -e ." in nb.cells[0].source
        assert len(nb.cells) == len(jupytext.read(chapter.source).cells) + 1


def test_pages_at_400_px_and_a_768_px_column(smoke_book):
    """No equation number over its formula, no page wider than a phone, figure labels readable."""
    from bnbook import pagecheck

    problems = []
    for page in chapter_pages(smoke_book):
        for width in (768, 400):
            report = pagecheck.layout_report(page, width=width)
            assert report["math"] or '<div class="math' not in page.read_text(), page.name  # display math measured
            min_px = pagecheck.MIN_TEXT_PX if width == 768 else 0.0  # a phone shrinks every figure
            problems += [f"{page.name} at {width} px: {p}"
                         for p in pagecheck.layout_problems(report, min_text_px=min_px)]
    assert not problems, "\n".join(problems)


def test_dark_mode_and_phone_screenshots(smoke_book, tmp_path):
    from PIL import Image, ImageStat

    from bnbook import pagecheck

    page = chapter_pages(smoke_book)[0]
    means = {}
    for dark in (False, True):
        png = pagecheck.screenshot(page, tmp_path / f"{'dark' if dark else 'light'}.png", width=400, height=900, dark=dark)
        with Image.open(png) as image:
            assert image.size == (400, 900)
            means[dark] = ImageStat.Stat(image.convert("L")).mean[0]
    assert means[False] > 180 and means[True] < 90, means  # the theme follows prefers-color-scheme


@pytest.fixture(scope="module")
def smoke_pdf(smoke_book):
    """The PDF edition of the smoke build, and the site rebuilt to offer it."""
    from bnbook import publish

    pdf = publish.make_pdf(smoke_book, any_profile=True)
    runner.build(smoke_book, any_profile=True)
    return pdf


def test_pdf_edition_has_every_chapter_typeset_math_and_figures(smoke_book, smoke_pdf):
    from bnbook import __version__, publish

    chapters = runner.discover(smoke_book)
    pages_ = publish.check_pdf(smoke_pdf, publish.chapter_titles(smoke_book))  # titles present, no raw TeX
    assert len(chapters) + 2 <= pages_ <= 40 * len(chapters), pages_
    text = publish.pdf_text(smoke_pdf)
    assert f"version {__version__}" in text
    assert "∑" in text or "Σ" in text or "√" in text  # MathJax glyphs, not TeX source
    listing = subprocess.run(["pdfimages", "-list", str(smoke_pdf)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[2:]
    figures = sum(len([i for i in _parse(p).imgs if "_images/" in i.get("src", "")]) for p in chapter_pages(smoke_book))
    assert len(listing) >= figures, (len(listing), figures)


def test_site_offers_the_pdf(smoke_book, smoke_pdf):
    html = smoke_book.html_dir
    assert (html / "bnbook.pdf").read_bytes() == smoke_pdf.read_bytes()
    for page in [html / "intro.html", html / "cite.html", *chapter_pages(smoke_book)]:  # pages with a source
        assert 'href="' + ("../" if page.parent != html else "") + 'bnbook.pdf"' in page.read_text(), (
            f"{page.name}'s download menu does not offer the PDF")


def test_pagecheck_command_takes_a_relative_folder(tmp_path, monkeypatch):
    """``python -m bnbook.pagecheck _build/html`` (its default is relative): pages reach Chromium as file URIs."""
    from bnbook import pagecheck

    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "page.html").write_text("<html><body>x</body></html>")
    seen = []
    monkeypatch.setattr(pagecheck, "screenshot", lambda page, out, **kw: seen.append(page.as_uri()) or out)
    monkeypatch.setattr(pagecheck, "layout_report", lambda page, width: seen.append(page.as_uri()) or {})
    monkeypatch.setattr(pagecheck, "layout_problems", lambda report, min_text_px: [])
    monkeypatch.chdir(tmp_path)
    assert pagecheck.main(["html", "--out", "shots"]) == 0
    assert len(seen) == 5 and all(uri.startswith("file:///") for uri in seen)
