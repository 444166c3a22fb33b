"""Looking at built pages in headless Chromium: screenshots (narrow, dark) and layout measurements.

``python -m bnbook.pagecheck [HTML_DIR] [--out DIR]`` (``make screenshots``) writes, for every
page, a 400-px-wide screenshot in light and in dark mode, and prints the layout problems
:func:`layout_report` finds (display equations whose number overlaps the formula, figures
shrunk so far that their labels fall under 7.5 px, pages wider than the window).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from bnbook.errors import BnbookError

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)
"""Headless Chromium that touches nothing outside the page (no updates, sync or prefetching)."""

MIN_TEXT_PX = 7.5
"""Smallest readable size of a figure's labels on a page, in CSS px: the figure's typical font size
(recorded in its PNG by :func:`bnbook.plots.png_bytes`) times its display scale. Body text is 16 px."""

DEFAULT_TEXT_PX = 21.0
"""Assumed label size of a PNG that does not record it: 10 pt at 150 dpi."""

_PROBE = """
<script>
(function () {
  function report() {
    var out = {width: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
               math: [], images: [], errors: []};
    document.querySelectorAll("mjx-merror").forEach(function (e) {  // TeX that MathJax could not typeset
      out.errors.push((e.getAttribute("data-mjx-error") || e.textContent).slice(0, 200));
    });
    document.querySelectorAll("div.math").forEach(function (div) {
      var box = div.querySelector("mjx-container"), no = div.querySelector("span.eqno");
      var formula = box && box.querySelector("mjx-math");
      var r = {id: div.id || "", typeset: !!box, overlap: false,
               scrolls: box ? box.scrollWidth > box.clientWidth + 1 : false};
      if (no && formula) {
        var a = no.getBoundingClientRect(), b = formula.getBoundingClientRect(), c = box.getBoundingClientRect();
        var right = Math.min(b.right, c.right), left = Math.max(b.left, c.left);  // the visible part
        r.overlap = a.left < right - 1 && a.right > left + 1 && a.top < b.bottom && a.bottom > b.top;
      }
      out.math.push(r);
    });
    document.querySelectorAll("img").forEach(function (img) {
      out.images.push({src: img.getAttribute("src"), alt: img.getAttribute("alt"), width: img.clientWidth,
                       scale: img.naturalWidth ? img.clientWidth / img.naturalWidth : null});
    });
    var box = document.createElement("div");
    box.id = "bnbook-probe";
    box.hidden = true;
    box.textContent = JSON.stringify(out);
    document.body.appendChild(box);
  }
  window.addEventListener("load", function () {
    var ready = window.MathJax && MathJax.startup && MathJax.startup.promise;
    (ready || Promise.resolve()).then(function () { setTimeout(report, 50); });
  });
})();
</script>
"""


def chromium() -> str:
    """Path of the Chromium binary (Debian's ``chromium``)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise BnbookError("Chromium is required: apt-get install chromium (make setup does it)")
    return found


def _run(args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="bnbook-chromium-") as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout_s)


def screenshot(page: Path, png: Path, *, width: int = 400, height: int = 1600, dark: bool = False,
               budget_ms: int = 15_000) -> Path:
    """A ``width`` × ``height`` screenshot of the top of ``page`` (dark: ``prefers-color-scheme: dark``)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    args = ["--hide-scrollbars", f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
            f"--screenshot={png.resolve()}", page.resolve().as_uri()]
    if dark:
        args.insert(0, "--force-dark-mode")
    proc = _run(args, timeout_s=120)
    if not png.exists():
        raise BnbookError(f"Chromium made no screenshot of {page}: {proc.stderr.strip()[-1000:]}")
    return png


def layout_report(page: Path, *, width: int = 768, height: int = 1200, budget_ms: int = 20_000) -> dict[str, Any]:
    """Measure ``page`` at a window ``width`` once MathJax has finished.

    Returns ``{"width", "scrollWidth", "math": [{id, typeset, overlap, scrolls}], "images":
    [{src, alt, width, scale, text_px}], "errors": [MathJax errors]}``: ``overlap`` means an
    equation number covers its formula, ``scale`` is the figure's displayed/natural width and
    ``text_px`` the displayed size of its labels.
    """
    source = page.read_text()
    probe = page.with_name(f".probe-{page.name}")  # beside the page, so relative links resolve
    probe.write_text(source.replace("</body>", _PROBE + "</body>", 1))
    try:
        proc = _run([f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", "--dump-dom",
                     probe.as_uri()], timeout_s=120)
    finally:
        probe.unlink(missing_ok=True)
    match = re.search(r'<div id="bnbook-probe"[^>]*>(.*?)</div>', proc.stdout, flags=re.DOTALL)
    if not match:
        raise BnbookError(f"no layout report from {page} (did the page load?) {proc.stderr.strip()[-500:]}")
    import html

    from bnbook.plots import read_text_px

    report = json.loads(html.unescape(match.group(1)))
    for img in report["images"]:  # how large the figure's labels appear
        src = (img["src"] or "").split("?")[0]
        path = (page.parent / src).resolve()
        text_px = read_text_px(path) if src.endswith(".png") and path.exists() else None
        img["text_px"] = (text_px or DEFAULT_TEXT_PX) * img["scale"] if img["scale"] else None
    return report


def layout_problems(report: dict[str, Any], *, min_text_px: float = MIN_TEXT_PX) -> list[str]:
    """What is wrong in a :func:`layout_report`, as sentences (empty when nothing is)."""
    problems = []
    if report["scrollWidth"] > report["width"] + 1:
        problems.append(f"the page is {report['scrollWidth']} px wide in a {report['width']} px window")
    for error in report.get("errors", []):
        problems.append(f"MathJax could not typeset a formula: {error}")
    for m in report["math"]:
        if not m["typeset"]:
            problems.append(f"equation {m['id'] or '(unnamed)'} was not typeset")
        elif m["overlap"]:
            problems.append(f"equation {m['id'] or '(unnamed)'}: its number overlaps the formula")
    for img in report["images"]:
        if img.get("text_px") is not None and img["text_px"] < min_text_px:
            problems.append(f"figure {img['src']} is shown at {img['scale']:.2f} of its size: "
                            f"its labels are {img['text_px']:.1f} px")
    return problems


def pages(html_dir: Path) -> list[Path]:
    """The book's content pages (no search, index or source copies)."""
    return sorted(p for p in html_dir.rglob("*.html")
                  if not {"_static", "_sources", "_images"} & set(p.relative_to(html_dir).parts)
                  and p.name not in ("genindex.html", "search.html", "index.html") and not p.name.startswith("."))


def main(argv: Sequence[str] | None = None) -> int:
    """Screenshots at 400 px, light and dark, and layout problems at 400, 768 and 1280 px."""
    parser = argparse.ArgumentParser(prog="python -m bnbook.pagecheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", type=Path, default=Path("_build/html"))
    parser.add_argument("--out", type=Path, default=Path("_build/screenshots"))
    args = parser.parse_args(argv)
    args.html = args.html.resolve()  # pages are opened as file:// URIs, which need absolute paths
    found = 0
    for page in pages(args.html):
        stem = "-".join(page.relative_to(args.html).with_suffix("").parts)
        for dark in (False, True):
            shot = screenshot(page, args.out / f"{stem}-400{'-dark' if dark else ''}.png", dark=dark)
            print(f"screenshot {shot}")
        for width in (400, 768, 1280):
            min_px = MIN_TEXT_PX if width >= 768 else 0.0  # a phone shrinks every figure
            for problem in layout_problems(layout_report(page, width=width), min_text_px=min_px):
                found += 1
                print(f"{page.name} at {width} px: {problem}")
    print(f"{found} layout problem(s)")
    return 1 if found else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
