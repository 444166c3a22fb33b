"""Citable, accessible course material: licence, CITATION.cff, one version and one repository URL,
figure alt text carried inside the PNG, and runnable chapter downloads. (The built site and the
PDF edition are checked in tests/test_book.py, on its smoke build.)"""

import dataclasses
import datetime as dt
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

import bnbook  # noqa: E402
from bnbook import plots, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFFCONVERT = Path(sys.executable).with_name("cffconvert")


def validate_cff(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CFFCONVERT), "--validate", "-i", str(path)], capture_output=True, text=True,
                          cwd=path.parent)


# ------------------------------------------------------------------ licence, citation, version
def test_licence_covers_code_and_text():
    text = (ROOT / "LICENSE").read_text()
    assert "MIT License" in text and "Permission is hereby granted" in text
    assert "Creative Commons Attribution 4.0" in text and "CC-BY-4.0" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"] == publish.LICENSES["code"]


def test_one_version_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "bnbook.__version__"
    dt.date.fromisoformat(bnbook.RELEASE_DATE)
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["version"] == bnbook.__version__ == cff["preferred-citation"]["version"]
    assert cff["date-released"] == bnbook.RELEASE_DATE


def test_citation_cff_is_current_and_valid():
    meta = publish.book_meta(ROOT)
    assert (ROOT / "CITATION.cff").read_text() == publish.citation_cff(meta), (
        "CITATION.cff is out of date: python -m bnbook.publish citation"
    )
    result = validate_cff(ROOT / "CITATION.cff")
    assert result.returncode == 0, result.stdout + result.stderr


def test_citation_cff_with_a_repository_is_valid_and_an_invalid_one_is_caught(tmp_path):
    meta = dataclasses.replace(publish.book_meta(ROOT), repository="https://example.org/bnbook/bnbook")
    good = tmp_path / "good" / "CITATION.cff"
    good.parent.mkdir()
    good.write_text(publish.citation_cff(meta))
    assert validate_cff(good).returncode == 0
    assert yaml.safe_load(good.read_text())["repository-code"] == meta.repository
    bad = tmp_path / "bad" / "CITATION.cff"
    bad.parent.mkdir()
    bad.write_text(publish.citation_cff(meta).replace(f'"{meta.released.isoformat()}"', '"last spring"'))
    assert validate_cff(bad).returncode != 0  # the validator really validates


def test_bibtex_is_a_book_entry_with_the_version():
    meta = publish.book_meta(ROOT)
    entry = publish.bibtex(meta)
    assert entry.startswith(f"@book{{bnbook{meta.year},") and entry.endswith("}")
    assert f"version = {{{bnbook.__version__}}}" in entry.replace("  ", "").replace(" =", " =")
    assert f"{{{meta.title}}}" in entry and "{{The bnbook authors}}" in entry
    assert entry.count("{") == entry.count("}")
    assert "url" not in entry  # no repository URL yet
    with_url = publish.bibtex(dataclasses.replace(meta, repository="https://example.org/x/y"))
    assert "https://example.org/x/y" in with_url


def test_repository_url_is_one_setting():
    """_config.yml's repository.url feeds the buttons, CITATION.cff and the README; empty: none anywhere."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"]
    html = config.get("html", {})
    assert "use_repository_button" not in html and "use_issues_button" not in html, (
        "the buttons follow repository.url (bnbook.sphinx_ext); do not set them by hand"
    )
    assert "bnbook.sphinx_ext" in config["sphinx"]["extra_extensions"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    readme = (ROOT / "README.md").read_text()
    if url:
        assert cff["repository-code"] == url and url in readme
    else:
        assert "repository-code" not in cff and "url" not in cff


def test_build_info_names_version_date_and_commit(tmp_path):
    info = publish.build_info(ROOT, now=dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc))
    assert info.version == bnbook.__version__ and info.date == "2030-01-02"
    assert info.commit is None or len(info.commit) >= 7
    assert f"version {bnbook.__version__}, built 2030-01-02" in info.line()
    outside = publish.build_info(tmp_path)
    assert outside.commit is None and "outside a git checkout" in outside.line()


# ------------------------------------------------------------------ alt text
def _figure():
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    steps = np.arange(10)
    axes[0].plot(steps, 1 - 0.5 ** steps, label="BN")
    axes[0].plot(steps, 1 - 0.8 ** steps, label="no BN")
    axes[0].legend()
    axes[0].set(title="Test accuracy", xlabel="training step", ylabel="accuracy")
    im = axes[1].imshow(np.eye(4), cmap="RdBu_r")
    axes[1].set(title=r"$(\gamma/s)\,P$", xlabel="input example $j$")
    fig.colorbar(im, ax=axes[1], label="value")
    return fig


def test_plain_text_reads_tex():
    assert plots.plain_text(r"$\varepsilon/(\sigma^2+\varepsilon)$") == "ε/(σ²+ε)"
    assert plots.plain_text(r"$\|P^2-P\|_2$ and $10^{-3}$") == "‖P²-P‖₂ and 10⁻³"
    assert plots.plain_text(r"$\frac{\gamma}{m s}$") == "(γ)/(m s)"


def test_describe_reads_panels_axes_legends_and_colour_bars():
    fig = _figure()
    text = plots.describe(fig)
    plt.close(fig)
    assert text.startswith("Figure with 2 panels.")
    assert "Panel 1 'Test accuracy': 2 lines; x axis 'training step' from 0 to 9" in text
    assert "legend: BN, no BN" in text
    assert "Panel 2 '(γ/s) P': heat map of 4×4 cells; x axis 'input example j'" in text
    assert "Colour bar 'value' from 0 to 1" in text
    assert "$" not in text and "\\" not in text


def test_alt_text_travels_inside_the_png(tmp_path):
    fig = _figure()
    path = plots.save(fig, tmp_path, "fig")
    plt.close(fig)
    assert plots.read_description(path) == plots.describe(_figure())
    assert plots.read_description(plots.png_bytes(_figure(), "my words")) == "my words"
    plt.close("all")


def test_glue_figure_puts_summary_and_description_in_the_glued_png(monkeypatch):
    import base64

    import myst_nb

    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, obj, display=True: glued.update({name: obj}))
    from bnbook import report

    fig = _figure()
    expected = plots.describe(fig)
    assert report.glue_figure("f", fig, alt="Accuracy rises faster with BN.") is None
    png = glued["f"]._repr_png_()
    png = base64.b64decode(png) if isinstance(png, str) else png
    assert plots.read_description(png) == "Accuracy rises faster with BN. " + expected
    assert not plt.fignum_exists(fig.number)


# ------------------------------------------------------------------ downloads
def test_runnable_source_puts_the_note_after_the_front_matter():
    meta = publish.book_meta(ROOT)
    source = "---\njupytext:\n  text_representation:\n    format_name: myst\n---\n\n# Title\n\ntext\n"
    out = publish.runnable_source(source, meta, "07-demo.md")
    assert out.startswith("---\njupytext:") and out.index("**Running this notebook.**") > out.index("\n---\n")
    assert out.index("**Running this notebook.**") < out.index("# Title") and "\n+++\n" in out
    for needed in ("pip install -r requirements.lock", "pip install --no-deps -e .", "bnbook run 07",
                   "chapters/07-demo.md", "mlxtend", bnbook.__version__):
        assert needed in out, needed
    import jupytext

    nb = jupytext.reads(out, fmt="md:myst")
    assert nb.cells[0].cell_type == "markdown" and "Running this notebook" in nb.cells[0].source
    assert nb.cells[1].source.startswith("# Title")


@pytest.mark.parametrize("chapter", sorted((ROOT / "chapters").glob("[0-9]*.md")), ids=lambda p: p.stem)
def test_every_chapter_download_parses_as_a_notebook(chapter):
    import jupytext

    out = publish.runnable_source(chapter.read_text(), publish.book_meta(ROOT), chapter.name)
    nb = jupytext.reads(out, fmt="md:myst")
    original = jupytext.reads(chapter.read_text(), fmt="md:myst")
    assert "Running this notebook" in nb.cells[0].source
    assert [c.source for c in nb.cells[1:]] == [c.source for c in original.cells]
    assert nb.metadata.get("kernelspec") == original.metadata.get("kernelspec")


# ------------------------------------------------------------------ PDF helpers
def test_pdf_checks_catch_raw_math_and_missing_titles(tmp_path):
    for bad in ("$$x$$", r"\(x\)", r"\[x\]", r"\begin{align}", r"|g|^2 - \frac1m"):
        assert publish.RAW_MATH.search(bad), bad
    assert not publish.RAW_MATH.search("y = γ x̂ + β, a price of $5")


def test_readme_layout_names_only_modules_that_exist():
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `src/bnbook/` |"))
    named = set(re.findall(r"`([a-z_]+)`", row)) - {"bnbook"}  # `bnbook` is the command
    assert named, row
    package = ROOT / "src" / "bnbook"
    missing = sorted(n for n in named if not (package / f"{n}.py").exists() and not (package / n).is_dir())
    assert not missing, f"README names modules that do not exist: {missing}"


def test_png_records_its_label_size():
    fig = _figure()
    default = plots.label_text_px(fig)
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    assert len(sizes) > 10 and default == pytest.approx(float(np.median(sizes)) * plots.DPI / 72)  # ticks counted
    for ax in fig.axes:
        ax.tick_params(labelsize=4)
    small = plots.label_text_px(fig)
    assert small < 10 and plots.read_text_px(plots.png_bytes(fig, "x")) == pytest.approx(small, abs=0.05)
    plt.close("all")


def test_layout_problems_name_overlaps_errors_and_small_text():
    from bnbook import pagecheck

    report = {"width": 400, "scrollWidth": 520, "errors": ["Undefined control sequence \\foo"],
              "math": [{"id": "equation-a", "typeset": True, "overlap": True, "scrolls": True},
                       {"id": "equation-b", "typeset": False, "overlap": False, "scrolls": False}],
              "images": [{"src": "a.png", "scale": 0.3, "text_px": 6.3}, {"src": "b.png", "scale": 0.6, "text_px": 12.6}]}
    problems = pagecheck.layout_problems(report)
    assert len(problems) == 5 and "520 px wide" in problems[0] and "\\foo" in problems[1]
    assert "equation-a" in problems[2] and "equation-b" in problems[3] and "a.png" in problems[4]
    clean = dict(report, scrollWidth=400, errors=[], math=[], images=report["images"][1:])
    assert pagecheck.layout_problems(clean) == []
