"""The result cache under corruption, concurrency and code edits (issue 11 cases 2, 4, 7; issue 10 item 5)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from typing import ClassVar

import matplotlib
import numpy as np
import pytest

from bnbook import results
from bnbook.config import ChapterConfig
from bnbook.results import Outcome

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclasses.dataclass(frozen=True)
class ToyConfig(ChapterConfig):
    steps: int = 5
    profiles: ClassVar = {}


def toy_compute(cfg, device):
    """A top-level compute function (keys on its own code); counts its calls."""
    toy_compute.calls += 1
    return Outcome(metrics={"steps": cfg.steps}, arrays={"curve": np.arange(cfg.steps) ** 2}, datasets=["none"])


toy_compute.calls = 0


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(toy_compute, "calls", 0)
    monkeypatch.delenv("BNBOOK_RECOMPUTE", raising=False)
    return ToyConfig(device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "delete", "random", "swap"])
def test_a_damaged_arrays_file_is_recomputed_and_said(toy, capsys, damage):
    res = results.cached("99-toy", toy, toy_compute)
    arrays = res.dir / "arrays.npz"
    size = arrays.stat().st_size
    if damage == "truncate":
        arrays.write_bytes(arrays.read_bytes()[: size // 2])
    elif damage == "delete":
        arrays.unlink()
    elif damage == "random":
        arrays.write_bytes(np.random.default_rng(0).bytes(size))
    else:  # a valid npz, but not this result's
        np.savez_compressed(arrays, curve=np.zeros(5))
    capsys.readouterr()
    again = results.cached("99-toy", toy, toy_compute)
    assert toy_compute.calls == 2 and not again.reused
    err = capsys.readouterr().err
    reason = "is missing" if damage == "delete" else "failed its checksum"
    assert f"arrays.npz {reason}" in err and "recomputing" in err
    np.testing.assert_array_equal(results.cached("99-toy", toy, toy_compute).arrays["curve"], np.arange(5) ** 2)
    assert toy_compute.calls == 2


def test_recompute_is_read_from_the_environment(toy, monkeypatch, capsys):
    results.cached("99-toy", toy, toy_compute)
    results.cached("99-toy", toy, toy_compute)
    assert toy_compute.calls == 1
    monkeypatch.setenv("BNBOOK_RECOMPUTE", "1")
    res = results.cached("99-toy", toy, toy_compute)
    assert toy_compute.calls == 2 and not res.reused
    assert "recomputing as asked" in capsys.readouterr().err


def test_files_are_world_readable(toy):
    res = results.cached("99-toy", toy, toy_compute)
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    res.save_figure(fig, "line.png")
    plt.close(fig)
    expected = 0o666 & ~umask()
    for name in ("result.json", "arrays.npz", "line.png"):
        assert (res.dir / name).stat().st_mode & 0o777 == expected, name
    assert not [p for p in res.dir.iterdir() if p.name.endswith(".tmp")]


def _figure(label="a"):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 3, 2], label=label)
    ax.legend()
    return fig


def test_figures_are_saved_once_with_checksums(toy, monkeypatch, capsys):
    res = results.cached("99-toy", toy, toy_compute)
    path = res.save_figure(_figure(), "fig.png")
    record = json.loads((res.dir / "result.json").read_text())
    assert record["figures"] == {"fig.png": results.sha256_file(path)}

    # Re-drawing the same figure from a reused result writes nothing (a read-only cache works).
    again = results.cached("99-toy", toy, toy_compute)

    def no_writes(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(results, "write_atomic", no_writes)
        m.setattr(results, "_result_lock", no_writes)
        assert again.save_figure(_figure(), "fig.png") == path
        # A changed figure that cannot be written: a notice, no exception.
        again.save_figure(_figure("b"), "fig.png")
        assert "figure fig.png not saved" in capsys.readouterr().err

    # A damaged figure is drawn again, never a reason to recompute the experiment.
    path.write_bytes(b"not a png")
    third = results.cached("99-toy", ToyConfig(device="cpu"), toy_compute)
    assert third.reused and toy_compute.calls == 1
    assert "fig.png is missing or failed its checksum; it is drawn again" in capsys.readouterr().err
    third.save_figure(_figure(), "fig.png")
    assert results.check_result(third.dir)[0].record["figures"]["fig.png"] == results.sha256_file(path)

    # Bytes rendered elsewhere (plots.save adds alt text to its PNGs) go through the same check.
    data = results.render_png(_figure("c"))
    stored = results.store_figure(third, "c.png", data)
    stamp = stored.stat().st_mtime_ns
    assert results.store_figure(third, "c.png", data) == stored and stored.stat().st_mtime_ns == stamp
    assert json.loads((third.dir / "result.json").read_text())["figures"]["c.png"] == results.sha256_file(stored)


# ------------------------------------------------------------------ concurrency
CONCURRENT = textwrap.dedent('''\
    import dataclasses, json, os, sys, time
    import numpy as np
    from bnbook import results
    from bnbook.config import ChapterConfig
    from bnbook.results import Outcome


    @dataclasses.dataclass(frozen=True)
    class BigConfig(ChapterConfig):
        megabytes: int = 80


    def compute(cfg, device):
        barrier = sys.argv[1]
        open(os.path.join(barrier, f"computing-{os.getpid()}"), "w").close()
        deadline = time.time() + 2  # let a second writer catch up, if there is one
        while len(os.listdir(barrier)) < 2 and time.time() < deadline:
            time.sleep(0.02)
        block = np.random.default_rng(os.getpid()).standard_normal(1024)  # tiled: compresses in no time
        big = np.tile(block, cfg.megabytes * 2**20 // 8 // 1024)
        return Outcome(metrics={"pid": os.getpid(), "sum": float(big.sum())}, arrays={"big": big},
                       datasets=["synthetic"])


    res = results.cached("99-concurrent", BigConfig(device="cpu"), compute)
    print(json.dumps({"pid": res.metrics["pid"], "reused": res.reused}))
    ''')


def test_two_processes_compute_a_result_once(tmp_path):
    script = tmp_path / "race.py"  # (not concurrent.py: that would shadow the standard library)
    script.write_text(CONCURRENT)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(barrier)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert len(os.listdir(barrier)) == 1, "both processes computed the result"
    assert sorted(r["reused"] for r in reports) == [False, True]
    assert reports[0]["pid"] == reports[1]["pid"]
    assert any("waiting for another process computing" in o[1] for o in outs)
    [folder] = [p for p in (results.results_dir() / "99-concurrent").iterdir() if p.is_dir()]
    found = results.load("99-concurrent", folder.name)
    assert found is not None
    assert found.arrays["big"].sum() == pytest.approx(found.metrics["sum"])
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ what a result's key covers
TOYPKG = {
    "__init__.py": "",
    "engine.py": "from toypkg import maths\n\ndef train(n):\n    return maths.square(n)\n",
    "maths.py": "def square(n):\n    return n * n\n",
    "plots.py": "PALETTE = {'bn': 'blue'}\n",
    "unrelated.py": "X = 1\n",
    "experiments/__init__.py": "",
    "experiments/exp.py": textwrap.dedent('''\
        from toypkg import engine

        SCALE = 2


        def helper(n):
            return engine.train(n) * SCALE


        def run(cfg, device):
            return helper(cfg)


        def figure(res):
            from toypkg.plots import PALETTE
            return PALETTE["bn"]
        '''),
}


def test_result_key_covers_only_the_code_the_experiment_runs(tmp_path, monkeypatch):
    pkg = tmp_path / "toypkg"
    for name, text in TOYPKG.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    from toypkg.experiments import exp

    def digest():
        return results.code_dependencies(exp.run, pkg, "toypkg").digest

    deps = results.code_dependencies(exp.run, pkg, "toypkg")
    assert deps.to_dict()["modules"] == ["__init__.py", "engine.py", "experiments/__init__.py", "maths.py"]
    before = digest()

    def edit(name, old, new):
        path = pkg / name
        path.write_text(path.read_text().replace(old, new))

    # Not run by the experiment: the plotting module, a plotting function, an unrelated module, comments.
    edit("plots.py", "blue", "navy")
    edit("unrelated.py", "1", "22")
    edit("experiments/exp.py", 'PALETTE["bn"]', 'PALETTE["bn"] + "!"')
    edit("maths.py", "return n * n", "return n * n  # the square")
    assert digest() == before
    # Run by the experiment: a module imported transitively, a constant, a helper it calls.
    for name, old, new in [("maths.py", "n * n", "n ** 2"), ("experiments/exp.py", "SCALE = 2", "SCALE = 3"),
                           ("experiments/exp.py", "* SCALE", "* SCALE + 0")]:
        edit(name, old, new)
        assert digest() != before, (name, new)
        before = digest()


def test_the_books_experiments_do_not_depend_on_plots():
    from bnbook.experiments import ioffe

    modules = results.code_dependencies(ioffe.run).to_dict()["modules"]
    assert "train.py" in modules and "config.py" in modules
    assert "plots.py" not in modules and "report.py" not in modules and "run.py" not in modules
