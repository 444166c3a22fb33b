"""Chapter configs, profiles, result folders and the result-file schema."""

import dataclasses
import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from bnbook import results
from bnbook.config import ChapterConfig, stable_hash
from bnbook.env import resolve_device
from bnbook.errors import BnbookError, DeviceError
from bnbook.results import Outcome


@dataclasses.dataclass(frozen=True)
class ToyConfig(ChapterConfig):
    steps: int = 100
    lr: float = 0.1
    profiles: ClassVar = {"smoke": {"steps": 3}, "paper": {"steps": 10_000}}


def test_profiles_and_overrides():
    assert ToyConfig.from_params("quick").steps == 100
    assert ToyConfig.from_params("smoke").steps == 3
    assert ToyConfig.from_params("paper", steps=None).steps == 10_000
    assert ToyConfig.from_params("smoke", steps=7, lr=0.5) == ToyConfig(profile="smoke", steps=7, lr=0.5)


def test_unknown_profile_and_parameter_are_named():
    with pytest.raises(BnbookError, match="unknown profile 'fast'"):
        ToyConfig.from_params("fast")
    with pytest.raises(BnbookError, match="unknown parameter.*stpes.*known: profile, seed, device, steps, lr"):
        ToyConfig.from_params("quick", stpes=3)


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")


def _compute(calls):
    def compute(cfg, device):
        calls.append(cfg)
        return Outcome(
            metrics={"loss": np.float32(0.5), "curve": np.arange(3), "diverged": float("nan")},
            arrays={"curve": np.arange(cfg.steps)},
            datasets=["mnist5k"],
        )
    return compute


def test_cached_computes_once_and_reuses(tmp_path):
    calls = []
    cfg = ToyConfig.from_params("smoke")
    first = results.cached("99-toy", cfg, _compute(calls))
    second = results.cached("99-toy", cfg, _compute(calls))
    assert len(calls) == 1 and not first.reused and second.reused
    assert second.metrics == {"loss": 0.5, "curve": [0, 1, 2], "diverged": None}
    np.testing.assert_array_equal(second.arrays["curve"], np.arange(3))
    other = results.cached("99-toy", cfg.replace(steps=4), _compute(calls))
    assert len(calls) == 2 and other.dir != first.dir


def test_interrupted_result_is_recomputed(tmp_path):
    calls = []
    cfg = ToyConfig.from_params("smoke")
    res = results.cached("99-toy", cfg, _compute(calls))
    (res.dir / "result.json").write_text("{ truncated")
    results.cached("99-toy", cfg, _compute(calls))
    assert len(calls) == 2


def test_result_schema(tmp_path):
    res = results.cached("99-toy", ToyConfig.from_params("smoke"), _compute([]))
    record = json.loads((res.dir / "result.json").read_text())
    results.validate_result(record)
    for key in results.REQUIRED_KEYS:
        broken = {k: v for k, v in record.items() if k != key}
        with pytest.raises(ValueError, match=key):
            results.validate_result(broken)
    with pytest.raises(ValueError, match="dataset"):
        results.validate_result({**record, "datasets": []})
    with pytest.raises(ValueError):
        results.validate_result({**record, "metrics": {"x": math.nan}})


def test_to_jsonable_rejects_unknown_types():
    assert results.to_jsonable({"a": torch.tensor([1.0, float("inf")])}) == {"a": [1.0, None]}
    with pytest.raises(TypeError):
        results.to_jsonable({"a": object()})
