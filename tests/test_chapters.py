"""Every chapter source follows the book's contract (checked without executing anything)."""

from pathlib import Path

import jupytext
import pytest

from bnbook import run as runner

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = runner.discover(runner.Project(ROOT, ROOT))


def test_there_are_chapters():
    assert CHAPTERS and CHAPTERS[0].name == "01-bn-transform"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_chapter_contract(chapter):
    nb = jupytext.read(chapter.source)
    params = runner.notebook_parameters(nb)
    assert params.get("profile") == "quick" and params.get("device") == "auto" and params.get("seed") == 0
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), "the first code cell must hold the parameters"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "sys.path" not in code, "chapters import bnbook, they never patch sys.path"
    assert "results.cached(" in code, "a chapter computes through results.cached (numbers are data)"
    headings = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")]
    assert len(headings) == 1, "exactly one top-level title"
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    if int(chapter.number) < 90:  # numbered chapters; 90+ are appendices
        assert "## Exercises" in prose
