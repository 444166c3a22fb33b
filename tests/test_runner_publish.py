"""Publishing is one transaction; builds refuse what is not a current, successful, single-profile run;
the runner's messages, status page and exit codes (issue 11 cases 1, 2, 3, 5, 7; issue 16 items 7, 8)."""

import errno
import os
import json
import textwrap

import pytest

from bnbook import results
from bnbook import run as runner
from toychapter import HEADER

TOYEXP = textwrap.dedent('''\
    import dataclasses
    import os
    from typing import ClassVar

    import numpy as np

    from bnbook.config import ChapterConfig
    from bnbook.results import Outcome


    @dataclasses.dataclass(frozen=True)
    class ToyConfig(ChapterConfig):
        steps: int = 5
        profiles: ClassVar = {"smoke": {"steps": 4}}


    def run(cfg, device):
        with open(os.environ["TOY_COUNTER"], "a") as fh:
            fh.write("computed\\n")
        return Outcome(metrics={"total": cfg.steps * 10}, arrays={"curve": np.arange(cfg.steps)}, datasets=["none"])
    ''')

CHAPTER = HEADER + "# Toy\n\n" + textwrap.dedent('''\
    ```{code-cell} ipython3
    :tags: [parameters]
    profile = "quick"
    device = "auto"
    seed = 0
    steps = 5
    scale = 1.0  # a parameter that feeds no config field: checked against its default's type only
    ```

    ```{code-cell} ipython3
    import sys
    if False:  # seen by the runner's import scan (the toy's bnbook lives in the toy project)
        from bnbook import mod
    assert steps != 13, "unlucky number of steps"
    print(profile, steps)
    print("[bnbook] a notice for the operator", file=sys.stderr)
    ```
    ''')

CACHED_CHAPTER = HEADER + "# Toy\n\n" + textwrap.dedent('''\
    ```{code-cell} ipython3
    :tags: [parameters]
    profile = "quick"
    device = "auto"
    seed = 0
    steps = None
    ```

    ```{code-cell} ipython3
    import toyexp
    from bnbook import results
    cfg = toyexp.ToyConfig.from_params(profile, device=device, seed=seed, steps=steps)
    res = results.cached("01-toy", cfg, toyexp.run)
    print("total", res.metrics["total"])
    ```
    ''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "toyexp.py").write_text(TOYEXP)
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.setenv("PYTHONPATH", str(lib))  # the kernel imports it too
    monkeypatch.setenv("TOY_COUNTER", str(tmp_path / "counter.txt"))
    monkeypatch.delenv("BNBOOK_RECOMPUTE", raising=False)
    (tmp_path / "chapters").mkdir()
    (tmp_path / "src" / "bnbook").mkdir(parents=True)
    (tmp_path / "src" / "bnbook" / "mod.py").write_text("x = 1\n")
    (tmp_path / "_config.yml").write_text("title: toy\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (tmp_path / "book").mkdir()
    (tmp_path / "chapters" / "01-toy.md").write_text(CHAPTER)
    monkeypatch.chdir(tmp_path)
    return runner.Project(tmp_path, tmp_path)


def cli(*args):
    return runner.main(list(args))


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def computed(project):
    path = project.root / "counter.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def published(project):
    return project.executed_dir / "01-toy.ipynb"


def record(project):
    return json.loads((project.records_dir / "01-toy.json").read_text())


def test_a_run_that_cannot_be_recorded_publishes_nothing(project, capsys, monkeypatch):
    """Case 1: a run whose record cannot be written must not leave its page published."""
    assert cli("run", "01", "--profile", "smoke") == 0
    page, rec = published(project).read_bytes(), record(project)
    assert runner.notebook_key(published(project)) == rec["key"]

    def unstorable(obj):
        raise ValueError("Out of range float values are not JSON compliant: inf")

    with monkeypatch.context() as m:
        m.setattr(results, "json_bytes", unstorable)
        assert cli("run", "01", "--profile", "smoke", "-p", "steps=7") == 1
    err = capsys.readouterr().err
    assert "could not be published" in err and "Traceback" not in err
    assert published(project).read_bytes() == page and record(project) == rec
    assert not [p for p in project.executed_dir.iterdir() if p.name != "01-toy.ipynb"]
    assert cli("run", "01", "--profile", "smoke") == 0
    assert "01-toy: skipped" in capsys.readouterr().out
    runner.check_publishable(project, any_profile=True)


def test_a_notebook_that_disagrees_with_its_record_is_rerun_and_not_built(project, capsys):
    """Case 1: the skip check and the build compare the notebook's own key with the record's."""
    assert cli("run", "01", "--profile", "smoke") == 0
    nb = json.loads(published(project).read_text())
    nb["metadata"]["bnbook"]["key"] = "0123456789abcdef"  # e.g. a page from another run
    published(project).write_text(json.dumps(nb))
    with pytest.raises(runner.BnbookError, match="01-toy: its executed notebook does not match its run record"):
        runner.check_publishable(project, any_profile=True)
    capsys.readouterr()
    assert cli("run", "01", "--profile", "smoke") == 0
    assert "01-toy: ran" in capsys.readouterr().out
    runner.check_publishable(project, any_profile=True)


def test_build_refuses_stale_failed_and_unrun_chapters(project, capsys):
    """Case 7: 'failed its last run' (not 'has not been run'); an edited chapter is stale."""
    with pytest.raises(runner.BnbookError, match="01-toy has not been run"):
        runner.check_publishable(project)
    assert cli("run", "01", "--profile", "smoke", "-p", "steps=13") == 1  # fails before any page exists
    with pytest.raises(runner.BnbookError, match="01-toy failed its last run: cell .* AssertionError"):
        runner.check_publishable(project)
    assert cli("run", "01", "--profile", "smoke") == 0
    runner.check_publishable(project, any_profile=True)
    (project.root / "src" / "bnbook" / "unrelated.py").write_text("y = 1\n")
    runner.check_publishable(project, any_profile=True)
    for path, old, new in [(project.chapters_dir / "01-toy.md", "# Toy", "# Toy, edited"),
                           (project.root / "src" / "bnbook" / "mod.py", "x = 1", "x = 2")]:
        path.write_text(path.read_text().replace(old, new))
        with pytest.raises(runner.BnbookError, match="01-toy is stale: its source, the bnbook code it imports"):
            runner.check_publishable(project, any_profile=True)
        assert cli("run", "01", "--profile", "smoke") == 0
        runner.check_publishable(project, any_profile=True)


def test_build_refuses_smoke_and_mixed_profiles_unless_asked(project, capsys):
    (project.chapters_dir / "02-other.md").write_text(CHAPTER.replace("# Toy", "# Other"))
    assert cli("run", "--profile", "smoke") == 0
    with pytest.raises(runner.BnbookError, match=r"smoke-profile chapters \(smoke: 01, 02\).*--any-profile"):
        runner.check_publishable(project)
    runner.check_publishable(project, any_profile=True)
    assert cli("run", "02", "--profile", "quick") == 0
    with pytest.raises(runner.BnbookError, match=r"smoke-profile chapters \(quick: 02; smoke: 01\)"):
        runner.check_publishable(project)
    assert cli("run", "01", "--profile", "paper") == 0
    with pytest.raises(runner.BnbookError, match=r"different profiles \(paper: 01; quick: 02\)"):
        runner.check_publishable(project)
    assert cli("run", "01", "--profile", "quick") == 0
    runner.check_publishable(project)


def test_force_reexecutes_recompute_recomputes_and_corrupt_results_are_recomputed(project, capsys):
    """Cases 2 and 3: --force re-executes with cached results; --recompute recomputes them;
    a damaged arrays.npz (the issue's recipes, then bnbook run --force) is recomputed and said."""
    (project.chapters_dir / "01-toy.md").write_text(CACHED_CHAPTER)
    assert cli("run", "01", "--profile", "smoke") == 0
    assert computed(project) == 1
    assert cli("run", "01", "--profile", "smoke", "--force") == 0
    assert "01-toy: ran" in capsys.readouterr().out and computed(project) == 1
    assert cli("run", "01", "--profile", "smoke", "--recompute") == 0
    out = capsys.readouterr().out
    assert "01-toy: ran" in out and "recomputing as asked" in out and computed(project) == 2
    [arrays] = results.results_dir().glob("01-toy/*/arrays.npz")
    for damage in ("truncate", "delete", "random"):
        if damage == "truncate":
            arrays.write_bytes(arrays.read_bytes()[:40])
        elif damage == "delete":
            arrays.unlink()
        else:
            arrays.write_bytes(bytes(range(256)) * 4)
        assert cli("run", "01", "--profile", "smoke", "--force") == 0
        out = capsys.readouterr().out
        reason = "is missing" if damage == "delete" else "failed its checksum"
        assert f"arrays.npz {reason}" in out and "recomputing" in out, out
    assert computed(project) == 5


def test_disk_full_while_publishing_is_a_clean_failure(project, capsys, monkeypatch):
    """Case 5: ENOSPC while writing the executed notebook: one message, no partial file, old page kept."""
    assert cli("run", "01", "--profile", "smoke") == 0
    page = published(project).read_bytes()
    real = results._write_all

    def full_disk(fh, data):
        if ".ipynb." in fh.name:
            fh.write(b'{"cells": [')
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(results, "_write_all", full_disk)
    capsys.readouterr()
    assert cli("run", "01", "--profile", "smoke", "--force") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and "previous page is kept" in err
    assert published(project).read_bytes() == page
    assert sorted(p.name for p in project.executed_dir.iterdir()) == ["01-toy.ipynb"]
    with pytest.raises(runner.BnbookError, match="failed its last run"):
        runner.check_publishable(project, any_profile=True)


def test_build_into_a_folder_without_the_config(project, tmp_path, capsys):
    """Case 5: bnbook --out DIR build, DIR lacking _config.yml."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    assert cli("--out", str(empty), "build") == 2
    err = capsys.readouterr().err
    assert "is not a book folder: it lacks _config.yml, _toc.yml" in err and "Traceback" not in err


def test_status_copes_with_odd_records_and_fails_on_failures(project, capsys):
    """Case 5: a record missing fields; issue 16: non-zero exit when a last run failed."""
    project.records_dir.mkdir(parents=True)
    (project.records_dir / "01-toy.json").write_text('{"ok": true}')
    assert cli("status") == 0
    assert "01-toy" in capsys.readouterr().out
    (project.records_dir / "01-toy.json").write_text('{"ok": false, "error": "cell 2 raised X"}')
    assert cli("status") == 1
    assert "FAILED" in capsys.readouterr().out
    (project.records_dir / "01-toy.json").write_text("[1, 2]")
    assert cli("status") == 0
    assert "not run" in capsys.readouterr().out
    runner.write_status_page(project)


def test_runner_output_status_page_and_files(project, capfd):
    """Issue 16 items 7, 8: elapsed times, no kernel TCP warning, relayed notices, the status page."""
    assert cli("run", "01", "--profile", "smoke") == 0
    captured = capfd.readouterr()
    assert "01-toy: ran in " in captured.out and " s" in captured.out
    assert "[bnbook]   a notice for the operator" in captured.out
    assert "without encryption" not in captured.out + captured.err
    rec = record(project)
    assert rec["packages"] == "01-toy.packages.txt" and "commit" in rec and rec["bnbook"]
    packages = (project.records_dir / rec["packages"]).read_text()
    assert "numpy==" in packages and "torch==" in packages
    status = (project.book_dir / "status.md").read_text()
    assert "{download}`list <_records/01-toy.packages.txt>`" in status
    assert "| Commit |" in status and "unknown" in status  # the toy project is no git repository
    expected = 0o666 & ~umask()
    for path in (published(project), project.records_dir / "01-toy.json",
                 project.records_dir / "01-toy.packages.txt", project.book_dir / "status.md"):
        assert path.stat().st_mode & 0o777 == expected, path
    row = {"ok": True, "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "commit": "a" * 40,
           "commit_modified": True}
    assert runner._device_text(row) == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert runner._commit_text(row) == "aaaaaaaaaa (with local changes)"


def test_non_finite_values_never_break_the_record(project, capsys):
    """Case 1: a run record holds NaN/inf as the strings "nan"/"inf" (JSON has no such numbers)."""
    assert cli("run", "01", "--profile", "smoke", "-p", "scale=1e999") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert record(project)["parameters"]["scale"] == "inf"
    runner.check_publishable(project, any_profile=True)  # the key recomputed from the record matches
    assert results.to_jsonable({"a": float("nan")}) == {"a": None}
    assert results.to_jsonable([float("-inf")], nonfinite="string") == ["-inf"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"bnbook {runner.bnbook_version()}"
