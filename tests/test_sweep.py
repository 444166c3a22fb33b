"""bnbook.sweep: a grid of cached units, dispatched through submitit's local executor."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bnbook import sweep
from sweep_toy import toy_compute, toy_units


@pytest.fixture()
def results_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("BNBOOK_RESULTS_DIR", str(tmp_path / "results"))
    here = str(Path(__file__).parent)  # the jobs import the toy grid from this folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    return tmp_path


def test_local_sweep_equals_in_process_run_and_is_idempotent(results_tmp):
    units = toy_units()
    assert [r["cached"] for r in sweep.plan(units)] == [False] * 3
    ex = sweep.make_executor("local", results_tmp / "logs", timeout_min=5)
    report = sweep.sweep(units, ex, echo=lambda _msg: None)
    assert report.ok and report.submitted == ["x=1", "x=2", "x=3"] and report.skipped == []
    swept = [u.cached() for u in units]
    assert all(r is not None for r in swept)
    # what the chapter's own run computes in-process: same keys, same numbers
    local = sweep.compute_all(units)
    assert all(r.reused for r in local)  # nothing was recomputed
    for a, b in zip(swept, local):
        assert a.record["key"] == b.record["key"]
    for u, r in zip(units, swept):
        expected = toy_compute(u.config, torch.device("cpu"))
        np.testing.assert_array_equal(r.arrays["values"], expected.arrays["values"])
        assert r.metrics["sum"] == pytest.approx(expected.metrics["sum"])
    again = sweep.sweep(units, ex, echo=lambda _msg: None)
    assert again.submitted == [] and again.skipped == ["x=1", "x=2", "x=3"]
    assert all(r["cached"] for r in sweep.plan(units))


def test_a_failing_unit_is_reported_and_the_others_land(results_tmp):
    units = toy_units((4, 99, 5))
    ex = sweep.make_executor("local", results_tmp / "logs", timeout_min=5)
    report = sweep.sweep(units, ex, max_parallel=2, echo=lambda _msg: None)
    assert not report.ok and [f["label"] for f in report.failed] == ["x=99"]
    assert "broken on purpose" in report.failed[0]["error"] and report.failed[0]["log"]
    assert units[0].cached() is not None and units[2].cached() is not None and units[1].cached() is None
    retry = sweep.sweep(units, ex, echo=lambda _msg: None)
    assert retry.submitted == ["x=99"]  # only what is missing is resubmitted


def test_unknown_executor_is_named(results_tmp):
    from bnbook.errors import BnbookError

    with pytest.raises(BnbookError, match="unknown executor"):
        sweep.make_executor("kubernetes", results_tmp)


def test_chapter8_smoke_grid_swept_equals_the_plain_run(results_tmp, tmp_path, monkeypatch):
    from bnbook import results
    from bnbook.experiments import bn_only

    source = Path(__file__).parents[1] / "chapters" / "08-bn-only.md"
    params = {"device": "cpu", "seed": 0}
    units = sweep.chapter_units(source, "smoke", params)
    assert len(units) == len(bn_only.unit_configs(bn_only.CONFIG.from_params("smoke", **params)))
    lines = []
    assert sweep.command(source, profile="smoke", params=params, dry_run=True, echo=lines.append) == 0
    assert any(f"{len(units)} units: 0 cached, {len(units)} to run" in line for line in lines)
    assert "GPU-hours at an assumed sustained 10 TFLOP/s" in lines[-1]
    from bnbook import run as runner

    # the README's example, through the command line
    assert runner.main(["sweep", "08", "--profile", "smoke", "--device", "cpu", "--max-parallel", "2"]) == 0
    swept = [u.cached() for u in units]
    assert all(r is not None for r in swept)
    # the chapter's own computation finds every unit cached: same keys, nothing trained again
    grid = bn_only.compute_grid(bn_only.CONFIG.from_params("smoke", **params))
    assert [r.record["key"] for r in grid] == [r.record["key"] for r in swept] and all(r.reused for r in grid)
    # and computed from scratch by one fresh process, as `bnbook run 08` does (its kernel computes
    # the grid with compute_grid), the numbers are bit-identical
    import subprocess
    import sys

    monkeypatch.setenv("BNBOOK_RESULTS_DIR", str(tmp_path / "plain"))
    code = ("from bnbook.experiments import bn_only as b; "
            "b.compute_grid(b.CONFIG.from_params('smoke', device='cpu', seed=0))")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())
    plain = [u.cached() for u in units]
    for a, b in zip(swept, plain):
        assert a.record["key"] == b.record["key"]
        assert set(a.arrays) == set(b.arrays)
        for name in a.arrays:
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)
    monkeypatch.setenv("BNBOOK_RESULTS_DIR", str(results_tmp / "results"))
    ex = sweep.make_executor("local", results_tmp / "logs", timeout_min=10)
    assert sweep.sweep(units, ex, echo=lambda _m: None).submitted == []  # a second sweep submits nothing


def test_unit_flops_scale_with_steps_batch_and_depth():
    from bnbook.experiments import bn_only

    cfg = bn_only.CONFIG.from_params("smoke", device="cpu")
    unit = bn_only.unit_configs(cfg)[0]
    base = bn_only.unit_flops(unit)
    assert base > 0
    assert bn_only.unit_flops(dataclasses.replace(unit, steps=2 * unit.steps)) == pytest.approx(2 * base)
    assert bn_only.unit_flops(dataclasses.replace(unit, batch_size=3 * unit.batch_size)) == pytest.approx(3 * base)
    assert bn_only.unit_flops(dataclasses.replace(unit, depth=14)) > base
