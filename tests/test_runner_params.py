"""Every -p value is checked against its config field's type and range before any chapter runs
(issue 11, case 6), on a toy chapter with its own config class and on the book's chapters."""

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

from bnbook import run as runner
from bnbook.config import ChapterConfig
from toychapter import chapter

MAX_SEED = 2**31 - 1

ROOT = Path(__file__).resolve().parents[1]

TOYCFG = textwrap.dedent('''\
    import dataclasses
    from typing import ClassVar

    from bnbook.config import ChapterConfig


    @dataclasses.dataclass(frozen=True)
    class ToyConfig(ChapterConfig):
        steps: int = 100
        lr: float = 0.1
        batch_sizes: tuple[int, ...] = (2, 8)
        train_size: int = 500  # 0: all (the paper profile uses it)
        verbose: bool = False
        profiles: ClassVar = {"smoke": {"steps": 3}, "paper": {"train_size": 0}}
    ''')

CHAPTER = chapter("Toy", '''\
    ```{code-cell} ipython3
    :tags: [parameters]
    profile = "quick"
    device = "auto"
    seed = 0
    steps = None  # None: the profile's value
    lr = None
    batch_sizes = None  # e.g. (4, 16)
    train_size = None
    verbose = None
    ```

    ```{code-cell} ipython3
    from toycfg import ToyConfig as Cfg
    cfg = Cfg.from_params(profile, device=device, seed=seed, steps=steps, lr=lr,
                          batch_sizes=batch_sizes, train_size=train_size, verbose=verbose)
    print("CONFIG", repr(cfg))
    ```
    ''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "toycfg.py").write_text(TOYCFG)
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.setenv("PYTHONPATH", str(lib))  # the kernel imports it too
    (tmp_path / "chapters").mkdir()
    (tmp_path / "src" / "bnbook").mkdir(parents=True)
    (tmp_path / "_config.yml").write_text("title: toy\n")
    (tmp_path / "chapters" / "01-toy.md").write_text(CHAPTER)
    monkeypatch.chdir(tmp_path)
    return runner.Project(tmp_path, tmp_path)


@pytest.mark.parametrize(
    "param, message",
    [
        ("steps=abc", "parameter 'steps' of chapter 01-toy expects an integer > 0, got 'abc'"),
        ("steps=1.5", "parameter 'steps' of chapter 01-toy expects an integer > 0, got 1.5"),
        ("steps=2.0", "expects an integer > 0, got 2.0"),
        ("steps=True", "parameter 'steps' of chapter 01-toy expects an integer > 0, got True"),
        ("steps=0", "expects an integer > 0, got 0"),
        ("steps=-3", "expects an integer > 0, got -3"),
        ("lr=nan", "parameter 'lr' of chapter 01-toy expects a finite number > 0, got 'nan'"),
        ("lr=1e999", "parameter 'lr' of chapter 01-toy expects a finite number > 0, got inf"),
        ("lr=0", "expects a finite number > 0, got 0"),
        ("batch_sizes=(4,0)", "parameter 'batch_sizes' of chapter 01-toy expects a non-empty tuple of integers > 0"),
        ("batch_sizes=()", "expects a non-empty tuple of integers > 0"),
        ("batch_sizes=a,b", "expects a non-empty tuple of integers > 0"),
        ("train_size=-1", "parameter 'train_size' of chapter 01-toy expects an integer ≥ 0, got -1"),
        ("verbose=1", "parameter 'verbose' of chapter 01-toy expects True or False, got 1"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(project, capsys, param, message):
    assert runner.main(["run", "01", "-p", param]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnbook: error: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not project.executed_dir.exists() and not project.records_dir.exists()


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(MAX_SEED + 1)])
def test_seed_is_range_checked(project, capsys, seed):
    assert runner.main(["run", "01", "--seed", seed]) == 2
    err = capsys.readouterr().err
    assert "--seed expects an integer ≥ 0 and ≤ 2,147,483,647" in err and "Traceback" not in err


@pytest.mark.parametrize("form", ["(4,16)", "4,16", "[4, 16]"])
def test_tuple_forms_are_accepted(project, form):
    [p] = runner.plan(project, ["01"], profile="smoke", device="cpu", seed=0, params={
        **runner.parse_assignments([f"batch_sizes={form}", "lr=1", "train_size=0"])})
    assert p.params == {"batch_sizes": (4, 16), "lr": 1.0, "train_size": 0}


def test_checked_values_reach_the_notebook(project, capsys):
    assert runner.main(["run", "01", "--profile", "smoke", "-p", "batch_sizes=4,16", "-p", "lr=1"]) == 0
    nb = (project.executed_dir / "01-toy.ipynb").read_text()
    assert "batch_sizes=(4, 16)" in nb and "lr=1.0" in nb and "steps=3" in nb
    record = json.loads((project.records_dir / "01-toy.json").read_text())
    assert record["parameters"]["batch_sizes"] == [4, 16]


def test_the_books_chapters_are_checked_too(tmp_path, monkeypatch, capsys):
    """The issue's recipes on the real chapters: refused before any notebook runs."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    for chapter, param, message in [
        ("03", "lr=1e999", "parameter 'lr' of chapter 03-ioffe-mnist expects a finite number > 0, got inf"),
        ("03", "steps=abc", "parameter 'steps' of chapter 03-ioffe-mnist expects an integer > 0, got 'abc'"),
        ("03", "steps=True", "expects an integer > 0, got True"),
        ("01", "batches=0", "parameter 'batches' of chapter 01-bn-transform expects an integer > 0, got 0"),
    ]:
        assert runner.main(["--out", str(out), "run", chapter, "--profile", "smoke", "-p", param]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_every_chapter_binds_its_parameters_to_its_config():
    """Each chapter's -p parameters feed a config field, so all of them are checked."""
    project = runner.Project(ROOT, ROOT)
    for chapter in runner.discover(project):
        import jupytext

        nb = jupytext.read(chapter.source)
        cls, bound = runner.config_binding(nb)
        assert cls is not None and issubclass(cls, ChapterConfig), chapter.name
        declared = runner.notebook_parameters(nb)
        assert set(declared) <= set(bound), f"{chapter.name}: {set(declared) - set(bound)} not checked"


# ------------------------------------------------------------------ the generic rules
@dataclasses.dataclass(frozen=True)
class Ranged(ChapterConfig):
    momentum: float = dataclasses.field(default=0.9, metadata={"min": 0, "max": 1, "allow_zero": True})
    shift: float = dataclasses.field(default=1.0, metadata={"min": None})
    slope: float = dataclasses.field(default=1.0, metadata={"allow_nonfinite": True})
    optimizer: str = dataclasses.field(default="sgd", metadata={"choices": ("sgd", "adam")})
    norms: tuple[str, ...] = ("bn", "gn")
    shapes: tuple[tuple[int, ...], ...] = ((2, 3),)
    cap: int | None = None
    profiles: ClassVar = {}


def test_field_metadata_narrows_and_widens_the_rules():
    from bnbook.config import ParameterError, field_rules

    rules = field_rules(Ranged)
    assert rules["momentum"].check(0) == 0.0 and rules["momentum"].check(1) == 1.0
    with pytest.raises(ParameterError, match=r"a finite number ≥ 0 and ≤ 1, got 1.5"):
        rules["momentum"].check(1.5)
    assert rules["shift"].check(-2.5) == -2.5
    assert rules["slope"].check(float("inf")) == float("inf")
    with pytest.raises(ParameterError, match="one of sgd, adam"):
        rules["optimizer"].check("rmsprop")
    assert rules["norms"].check("bn, ln") == ("bn", "ln") and rules["norms"].check("bn") == ("bn",)
    assert rules["shapes"].check([[4, 4], (2, 3, 4)]) == ((4, 4), (2, 3, 4))
    assert rules["cap"].check(None) is None and rules["cap"].check(5) == 5
    with pytest.raises(ParameterError, match="or None"):
        rules["cap"].check("five")
    with pytest.raises(ParameterError):
        rules["shapes"].check([[4, 0]])
    big = 10**400
    with pytest.raises(ParameterError):
        field_rules(Ranged)["slope"].check(big)


def test_from_params_checks_and_converts():
    from bnbook.config import ParameterError

    cfg = Ranged.from_params("smoke", momentum=0, norms="bn,ln", shapes=[[1, 2]])
    assert cfg.momentum == 0.0 and cfg.norms == ("bn", "ln") and cfg.shapes == ((1, 2),)
    with pytest.raises(ParameterError, match="parameter 'momentum' of Ranged expects"):
        Ranged.from_params("quick", momentum=2)
    with pytest.raises(ParameterError, match="parameter 'seed'"):
        Ranged.from_params("quick", seed=-1)
    with pytest.raises(ParameterError, match="parameter 'device' of Ranged expects auto, cpu, cuda or cuda:N"):
        Ranged.from_params("quick", device="gpu")
