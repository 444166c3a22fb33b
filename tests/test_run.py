"""The runner: chapter selection, parameter checks, incremental runs, failures (on a toy project)."""

import json

import pytest
import torch

from bnbook import run as runner
from toychapter import chapter

TOY = chapter("Toy", '''\
    ```{code-cell} ipython3
    :tags: [parameters]
    profile = "quick"
    device = "auto"
    seed = 0
    steps = 5
    ```

    ```{code-cell} ipython3
    if False:  # seen by the runner's import scan (the toy's bnbook lives in the toy project)
        from bnbook import mod
    assert steps != 13, "unlucky number of steps"
    print(profile, steps)
    ```
    ''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "src" / "bnbook").mkdir(parents=True)
    (tmp_path / "src" / "bnbook" / "mod.py").write_text("x = 1\n")
    (tmp_path / "_config.yml").write_text("title: toy\n")
    (tmp_path / "chapters" / "01-toy.md").write_text(TOY)
    (tmp_path / "chapters" / "02-other.md").write_text(TOY.replace("# Toy", "# Other"))
    monkeypatch.chdir(tmp_path)
    return runner.Project(tmp_path, tmp_path)


def cli(*args):
    return runner.main(list(args))


def test_select_by_name_number_and_slug(project):
    chapters = runner.discover(project)
    assert [c.name for c in runner.select(chapters, ["1", "02", "toy", "01-toy"])] == ["01-toy", "02-other"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "07"], "unknown chapter '07'; known chapters: 01-toy, 02-other"),
        (["run", "01", "-p", "stepz=3"], "unknown parameter 'stepz' for chapter 01-toy"),
        (["run", "01", "--profile", "huge"], "unknown profile 'huge'"),
        (["run", "01", "-p", "steps"], "malformed parameter 'steps'"),
        (["run", "01", "-p", "steps=many"], "parameter 'steps' of chapter 01-toy expects int"),
        (["run", "01", "-p", "profile=paper"], "set profile with --profile"),
        (["run", "01", "--device", "gpu"], "unknown device 'gpu'"),
    ],
)
def test_bad_input_is_one_clear_line(project, capsys, args, message):
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnbook: error: ") and message in err
    assert not (project.executed_dir).exists()  # nothing was executed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(project, capsys):
    assert cli("run", "01", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_incremental_runs_records_and_failures(project, capsys):
    assert cli("run", "01", "--profile", "smoke") == 0
    record = json.loads((project.records_dir / "01-toy.json").read_text())
    assert record["ok"] and record["profile"] == "smoke" and record["device"] == "cpu"
    assert {"torch", "numpy", "python"} <= set(record["versions"])
    nb = json.loads((project.executed_dir / "01-toy.ipynb").read_text())
    assert "smoke 5" in json.dumps(nb["cells"])  # the parameter was injected
    assert "Run record" in "".join(nb["cells"][-1]["source"])

    assert cli("run", "01", "--profile", "smoke") == 0
    assert "01-toy: skipped" in capsys.readouterr().out
    (project.root / "src" / "bnbook" / "other.py").write_text("y = 2\n")  # a module it doesn't import
    (project.root / "src" / "bnbook" / "mod.py").write_text("x = 1  # a comment only\n")
    assert cli("run", "01", "--profile", "smoke") == 0
    assert "01-toy: skipped" in capsys.readouterr().out
    (project.root / "src" / "bnbook" / "mod.py").write_text("x = 2\n")  # an imported module -> re-run
    assert cli("run", "01", "--profile", "smoke") == 0
    assert "01-toy: ran" in capsys.readouterr().out
    assert cli("run", "01", "--profile", "smoke", "--force") == 0
    assert "01-toy: ran" in capsys.readouterr().out

    published = (project.executed_dir / "01-toy.ipynb").read_bytes()
    assert cli("run", "01", "-p", "steps=13") == 1
    err = capsys.readouterr().err
    assert "chapter 01-toy failed" in err and "AssertionError" in err and "cell" in err
    assert (project.executed_dir / "01-toy.ipynb").read_bytes() == published  # not lost
    assert (project.failed_dir / "01-toy.ipynb").exists()
    assert not json.loads((project.records_dir / "01-toy.json").read_text())["ok"]
    with pytest.raises(runner.BnbookError, match="01-toy failed its last run"):
        runner.check_publishable(project)
    status = (project.book_dir / "status.md").read_text()
    assert "FAILED" in status and "02-other" in status and "not run" in status


def test_keep_going_runs_the_rest(project, capsys):
    (project.chapters_dir / "01-toy.md").write_text(TOY.replace('assert steps != 13', 'assert False'))
    assert cli("run", "--profile", "smoke") == 1
    assert "02-other" not in capsys.readouterr().out
    assert cli("run", "--profile", "smoke", "--keep-going") == 1
    out = capsys.readouterr()
    assert "02-other: ran" in out.out and "chapter 01-toy failed" in out.err
