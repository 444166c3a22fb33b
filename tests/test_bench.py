"""bnbook.bench: the FLOP count, the benchmark's summary, the performance appendix's result file.

Nothing here is timed: the numbers depend on the machine and its load; the appendix reports them.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bnbook import bench, data, nets, results
from bnbook.errors import BnbookError
from bnbook.experiments import performance


def test_flops_per_model_step_by_hand():
    # layers 4->3->2, batch 5: forward 120 + 60; weight grads the same; input grad of layer 2 only
    assert bench.flops_per_model_step((4, 3, 2), 5) == 2 * (120 + 60) + 60


def test_flops_per_model_step_matches_torch_counter():
    s = bench.BenchSettings()
    model = bench.tutorial_mlp(s, 784, 10, seed=0)
    x, y = torch.randn(60, 784), torch.randint(0, 10, (60,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    assert counter.get_total_flops() == bench.flops_per_model_step((784, 100, 100, 100, 10), 60)


def test_run_benchmark_summary():
    s = bench.BenchSettings(steps=3, warmup=1, repeats=2, stacks=(1, 2), gemm_size=64)
    out = bench.run_benchmark(s, torch.device("cpu"))
    names = ["tutorial", "indexed", "engine_k1", "engine_k2"]
    assert [r["contender"] for r in out["rows"]] == names
    assert all(len(out["samples"][n]) == 2 and min(out["samples"][n]) > 0 for n in names)
    assert out["best_engine"] in ("engine_k1", "engine_k2")
    assert math.isclose(out["ratio_best"], out["best"][out["best_engine"]] / out["best"][out["best_tutorial"]])
    limit = max(out["sgemm_gflops_used_threads"], out["sgemm_gflops_all_threads"]) * 1e9 / out["flops_per_model_step"]
    assert math.isclose(out["compute_limit_model_steps_per_s"], limit)
    assert 0 < out["fraction_of_limit"]
    assert torch.get_num_threads() == 1  # the benchmark restores the thread count it found


def test_bad_settings_are_named():
    with pytest.raises(BnbookError, match="stack"):
        bench.BenchSettings(stacks=(0,))


def test_performance_appendix_result_file():
    cfg = performance.PerformanceConfig.from_params("smoke", device="cpu")
    res = results.cached("90-performance", cfg, performance.run)
    results.validate_result(res.record)
    conv = {f"conv_samples_{r['net']}_{r['contender']}" for r in res.metrics["conv"]["rows"]}
    assert set(res.arrays) == {f"samples_{r['contender']}" for r in res.metrics["rows"]} | conv
    assert {r["net"] for r in res.metrics["conv"]["rows"]} == {"cnn", "resnet"}
    assert all(r["images_per_s"] > 0 and 0 < r["fraction_of_conv_peak"] for r in res.metrics["conv"]["rows"])
    gains = performance.conv_gains(res)
    assert set(gains) == {"cnn", "resnet"}
    assert all(set(g) == {"ratio", "k", "bf16", "bf16_tut", "ours"} and min(g.values()) > 0 for g in gains.values())
    assert {r["precision"] for r in res.metrics["conv"]["rows"]} == {"fp32", "bf16"}
    assert np.all(res.arrays["samples_tutorial"] > 0)
    fig = performance.figure(res)
    assert len(fig.axes[0].patches) == len(res.metrics["rows"])


def test_default_threads_contenders_are_labelled():
    # run at the suite's single thread: two threads on a busy 2-core machine can be 100x slower
    s = bench.BenchSettings(steps=2, warmup=1, repeats=1, stacks=(2,), gemm_size=32, all_threads_too=True)
    out = bench.run_benchmark(s, torch.device("cpu"))
    rows = {r["contender"]: r for r in out["rows"]}
    assert set(rows) == {"tutorial", "indexed", "engine_k2", "tutorial_all", "engine_k2_all"}
    assert rows["tutorial_all"]["threads"] == out["threads_all"] and rows["tutorial"]["threads"] == 1
    assert rows["engine_k2_all"]["models"] == 2
    # the headline takes each side at its best thread count
    assert out["best_engine"] == max(("engine_k2", "engine_k2_all"), key=out["best"].get)
    assert out["best_tutorial"] == max(("tutorial", "tutorial_all"), key=out["best"].get)
    assert performance.label("engine_k2_all") == "engine, 2 models at once, default threads"
    assert performance.label("tutorial_all") == "tutorial loop, default threads"


@pytest.mark.parametrize("net", ["cnn", "resnet"])
def test_conv_flops_match_torch_flop_counter(net):
    model = nets.SmallCNN(1, 10, seed=0) if net == "cnn" else nets.ResNet(8, in_channels=3, seed=0)
    x = torch.randn(4, 1, 28, 28) if net == "cnn" else torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    assert bench.conv_flops_per_step(model, x) == counter.get_total_flops()


def test_fit_timing_excludes_the_warm_up():
    ds = data.load("mnist5k").flat()
    models = [nets.MLP(784, norm="bn", seed=s) for s in range(2)]
    rate = bench.time_fit(models, ds, 60, steps=5, warmup=2)
    assert rate > 0
    with pytest.raises(BnbookError, match="warmup"):
        bench.ConvBenchSettings(warmup=0)


def test_contender_names_and_the_bf16_rows():
    assert bench.contender("engine_k16_bf16_all") == {
        "kind": "engine", "models": 16, "bf16": True, "all_threads": True, "book_bn": False}
    assert bench.contender("tutorial")["models"] == 1 and bench.contender("engine_k1_ours")["book_bn"]
    with pytest.raises(BnbookError, match="unknown benchmark contender"):
        bench.contender("engine_k2_fp8")
    s = bench.BenchSettings(steps=2, warmup=1, repeats=1, stacks=(1, 2), gemm_size=32, amp_too=True)
    out = bench.run_benchmark(s, torch.device("cpu"))
    rows = {r["contender"]: r for r in out["rows"]}
    assert {"tutorial_bf16", "engine_k2_bf16"} <= set(rows)
    assert rows["engine_k2_bf16"]["precision"] == "bf16" and rows["engine_k2"]["precision"] == "fp32"
    # the headline compares float32 with float32; the bf16 rows have their own ratios
    assert out["best_engine"] in ("engine_k1", "engine_k2") and out["best_tutorial"] == "tutorial"
    assert out["best_engine_bf16"] == "engine_k2_bf16" and out["best_tutorial_bf16"] == "tutorial_bf16"
    assert math.isclose(out["ratio_bf16"], out["best"]["engine_k2_bf16"] / out["best"]["tutorial"])
    assert math.isclose(out["compute_limit_bf16_model_steps_per_s"],
                        out["sgemm_gflops_bf16"] * 1e9 / out["flops_per_model_step"])
    assert performance.label("engine_k2_bf16") == "engine, 2 models at once, bf16 products"
    assert performance.label("tutorial_bf16_all") == "tutorial loop, bf16 autocast, default threads"
    assert performance.label("engine_k1_ours") == "engine, 1 model at once, the book's BN"
