"""Tests of the hand-written BN backward (bnbook.backprop) and chapter 2's experiment."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bnbook import backprop as bp
from bnbook import norms
from bnbook.errors import BnbookError

F64 = torch.float64
SHAPES = [(7, 3), (3, 2, 2, 3)]  # (N, C) and (N, C, H, W)


def _inputs(shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = (2.0 * torch.randn(*shape, generator=gen, dtype=dtype) + 0.7).requires_grad_()
    gamma = (0.5 + torch.rand(shape[1], generator=gen, dtype=dtype)).requires_grad_()
    beta = torch.randn(shape[1], generator=gen, dtype=dtype).requires_grad_()
    return x, gamma, beta


def _native(x, gamma, beta, eps):
    """PyTorch's BN; for ε = 0, which it refuses in training, autograd through norms.batch_norm."""
    if eps == 0:
        return norms.batch_norm(x, gamma, beta, eps=0.0)
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)


def _native_grads(x, gamma, beta, grad_y, eps):
    return torch.autograd.grad(_native(x, gamma, beta, eps), (x, gamma, beta), grad_y)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_gradcheck_and_gradgradcheck(shape, eps):
    x, gamma, beta = _inputs(shape)
    fn = lambda x, g, b: bp.manual_batch_norm(x, g, b, eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(fn, (x, gamma, beta))


@pytest.mark.parametrize("shape", SHAPES + [(16, 5), (4, 3, 5, 5)])
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_all_forms_match_native(shape, eps):
    x, gamma, beta = _inputs(shape, seed=1)
    grad_y = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    want = _native_grads(x, gamma, beta, grad_y, eps)
    y_ours = bp.manual_batch_norm(x, gamma, beta, eps)
    y_native = _native(x, gamma, beta, eps)
    torch.testing.assert_close(y_ours, y_native, rtol=1e-12, atol=1e-12)
    function = torch.autograd.grad(y_ours, (x, gamma, beta), grad_y)
    xd = x.detach()
    staged = bp.bn_backward_staged(grad_y, xd, gamma.detach(), eps)
    x_hat, _, inv_std = bp.normalize(xd, eps)
    compact = bp.bn_backward_compact(grad_y, x_hat, gamma.detach(), inv_std)
    for got in (function, staged, compact):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float32_matches_native_and_only_needed_grads():
    x, gamma, beta = _inputs((32, 4, 3, 3), seed=3, dtype=torch.float32)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    for a, b in zip(torch.autograd.grad(bp.manual_batch_norm(x, gamma, beta), (x, gamma, beta), grad_y),
                    _native_grads(x, gamma, beta, grad_y, 1e-5)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    frozen = gamma.detach()  # γ without grad: the Function must still work
    (gx,) = torch.autograd.grad(bp.manual_batch_norm(x, frozen, beta), (x,), grad_y)
    assert gx.shape == x.shape


def test_staged_second_mu_term_vanishes_and_is_not_trivially_zero():
    x, gamma, _ = _inputs((9, 3), seed=5)
    grad_y = torch.randn(9, 3, dtype=F64)
    terms = bp.staged_gradients(grad_y, x.detach(), gamma.detach(), 1e-5)
    scale = terms["var"].abs().max() * x.detach().abs().max()  # size of each summand
    assert terms["mean_via_var"].abs().max() < 1e-13 * scale
    assert terms["var"].abs().min() > 1e-6  # the factor it multiplies is not zero
    assert terms["mean"].abs().max() > 1e-3


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_projection_matrix_properties(eps):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, generator=gen, dtype=F64) * 0.01  # σ² = 1e-4: the ε defect is visible
    x_hat = bp.normalize(x[:, None], eps)[0][:, 0]
    p = bp.projection_matrix(x_hat)
    ones = torch.ones(20, dtype=F64)
    torch.testing.assert_close(p, p.T, rtol=0, atol=0)
    torch.testing.assert_close(p @ ones, torch.zeros(20, dtype=F64), rtol=0, atol=1e-13)
    var = float(x.var(correction=0))
    defect = eps / (var + eps)  # eigenvalue along x̂
    torch.testing.assert_close(p @ x_hat, defect * x_hat, rtol=0, atol=1e-12)
    idem = float(torch.linalg.matrix_norm(p @ p - p, ord=2))
    assert idem == pytest.approx(defect * (1 - defect), abs=1e-12)
    if eps == 0:
        assert idem < 1e-13
        assert float(torch.trace(p)) == pytest.approx(18)  # rank m − 2
    else:
        assert defect > 0.05 and idem > 0.04  # a real, predicted defect


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_jacobian_is_scaled_projection(eps):
    gen = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(10, generator=gen, dtype=F64) + 1
    jac = bp.jacobian_autograd(x, 1.7, -0.3, eps)
    x_hat, _, inv_std = bp.normalize(x[:, None], eps)
    torch.testing.assert_close(jac, 1.7 * inv_std[0] * bp.projection_matrix(x_hat[:, 0]), rtol=1e-12, atol=1e-13)


def test_inference_jacobian_is_diagonal():
    x = torch.randn(6, dtype=F64)
    running = (torch.tensor(0.3, dtype=F64), torch.tensor(2.0, dtype=F64))
    jac = bp.jacobian_autograd(x, 1.5, 0.0, 1e-5, training=False, running=running)
    torch.testing.assert_close(jac, torch.eye(6, dtype=F64) * 1.5 / (2.0 + 1e-5) ** 0.5)
    with pytest.raises(BnbookError, match="running"):
        bp.jacobian_autograd(x, training=False)


def test_gradient_orthogonal_to_ones_and_xhat_and_weights():
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(16, 10, generator=gen, dtype=F64)
    w = torch.randn(4, 10, generator=gen, dtype=F64, requires_grad=True)
    target = torch.randn(16, 4, generator=gen, dtype=F64)
    x = u @ w.T
    x.retain_grad()
    y = bp.manual_batch_norm(x, eps=0.0)
    ((y - target) ** 3).sum().backward()
    x_hat = bp.normalize(x.detach(), 0.0)[0]
    assert x.grad.sum(0).abs().max() < 1e-12
    assert (x.grad * x_hat).sum(0).abs().max() < 1e-12
    assert (w.grad * w.detach()).sum(1).abs().max() < 1e-12  # ⟨W_k, ∂ℓ/∂W_k⟩ = 0 per unit
    assert w.grad.abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(1, 3), (1, 2, 1, 1), (1, 4, 1)])
def test_one_value_per_channel_raises(shape):
    x = torch.randn(shape)
    with pytest.raises(bp.BatchSizeError, match="more than 1 value per channel"):
        bp.manual_batch_norm(x)
    with pytest.raises(ValueError):  # the same exception type PyTorch raises
        F.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError):
        bp.manual_batch_norm(x)
    with pytest.raises(bp.BatchSizeError):
        bp.projection_matrix(torch.ones(1))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(BnbookError, match="shape"):
        bp.manual_batch_norm(torch.randn(5))
    with pytest.raises(BnbookError, match="gamma must have shape"):
        bp.manual_batch_norm(torch.randn(5, 3), torch.ones(2))
    with pytest.raises(BnbookError, match="eps"):
        bp.manual_batch_norm(torch.randn(5, 3), eps=-1.0)
    with pytest.raises(BnbookError, match="shape"):
        bp.projection_matrix(torch.ones(3, 3))
    with pytest.raises(BnbookError, match="grad_y"):
        bp.bn_backward_compact(torch.ones(4, 2), torch.ones(4, 3), torch.ones(3), torch.ones(3))


def test_eps_zero_constant_channel_is_nan_not_crash():
    y = bp.manual_batch_norm(torch.ones(4, 2), eps=0.0)
    assert torch.isnan(y).all()  # recorded as NaN (0/0), like the native kernel
    assert torch.isfinite(bp.manual_batch_norm(torch.ones(4, 2), eps=1e-5)).all()


def test_benchmark_rows():
    rows = bp.benchmark([(8, 3), (2, 3, 2, 2)], "cpu", repeats=2, warmup=1, threads=1)
    assert [r["m"] for r in rows] == [8, 8]
    for r in rows:
        assert r["native_ratio"] == 1.0
        assert r["manual_ms"] > 0 and r["autograd_ms"] > 0
        assert r["manual_ratio"] == pytest.approx(r["manual_ms"] / r["native_ms"])
    with pytest.raises(BnbookError):
        bp.benchmark([(8,)])
    with pytest.raises(BnbookError):
        bp.time_forward_backward(bp.native_batch_norm, (4, 2), torch.device("cpu"), repeats=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, gamma, beta = _inputs((8, 3, 4, 4), dtype=torch.float32)
    grad_y = torch.randn(x.shape)
    cpu = torch.autograd.grad(bp.manual_batch_norm(x, gamma, beta), (x, gamma, beta), grad_y)
    xc, gc, bc = (t.detach().cuda().requires_grad_() for t in (x, gamma, beta))
    cuda = torch.autograd.grad(bp.manual_batch_norm(xc, gc, bc), (xc, gc, bc), grad_y.cuda())
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the chapter's experiment
def test_experiment_smoke(tmp_path, monkeypatch):
    from bnbook import results
    from bnbook.experiments import backprop as exp

    monkeypatch.setenv("BNBOOK_RESULTS_DIR", str(tmp_path))
    cfg = exp.BackpropConfig.from_params("smoke", device="cpu")
    res = results.cached("02-backprop-test", cfg, exp.run)
    m = res.metrics
    json.dumps(res.record, allow_nan=False)
    assert res.record["datasets"] == ["mnist5k"]
    for key in ("staged_vs_autograd_x", "compact_vs_autograd_x", "jacobian_rel", "conv_jacobian_rel",
                "cos_grad_xhat_eps0_max", "cos_w_gradw_eps0_max", "invariance_eps0", "conv_ours_vs_native_x"):
        assert m[key] < 1e-12, key
    assert all(m[f"{c}_{t}"] is True for c in ("gradcheck", "gradgradcheck") for t in ("fc", "conv"))
    assert m["eval_offdiag_max"] == 0.0 and m["train_offdiag_max"] > 1e-3
    assert m["cos_grad_xhat_eps_max"] > 1e-8  # ε > 0 really leaves a (small) component along x̂
    assert m["xhat_dot_grad_vs_predicted"] < 1e-6 and m["sweep_lambda_rel_err"] < 1e-6
    assert m["P_idempotent_eps"] == pytest.approx(m["P_idempotent_eps_predicted"], rel=1e-6)
    assert m["conv_m"] == cfg.conv_batch * (28 // cfg.conv_pool) ** 2
    assert len(m["bench"]) == len(cfg.bench_shapes)
    assert res.arrays["jac_autograd"].shape == (cfg.batch, cfg.batch)
    for plot in (exp.plot_jacobians, exp.plot_epsilon, exp.plot_benchmark):
        assert plot(res).axes


def test_config_validation():
    from bnbook.experiments import backprop as exp

    with pytest.raises(BnbookError, match="unit"):
        exp.BackpropConfig.from_params("smoke", unit=99)
    with pytest.raises(BnbookError, match="conv_pool"):
        exp.BackpropConfig.from_params("smoke", conv_pool=5)
    with pytest.raises(BnbookError, match="eps"):
        exp.BackpropConfig.from_params("smoke", eps=0.0)


def test_benchmark_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bn_backward.py"
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(script), "--shapes", "8x3", "2x3x2x2", "--repeats", "1", "--warmup", "0",
           "--threads", "1", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert [r["shape"] for r in record["rows"]] == ["8×3", "2×3×2×2"]
    assert record["environment"]["device"] == "cpu"
    bad = subprocess.run([sys.executable, str(script), "--shapes", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "bad shape" in bad.stderr


def test_experiment_is_deterministic_for_a_seed():
    from bnbook.experiments import backprop as exp

    cfg = exp.BackpropConfig.from_params("smoke", bench_shapes=((4, 2),), bench_repeats=1, bench_warmup=1)
    first, second = (exp.run(cfg, torch.device("cpu")) for _ in range(2))
    numbers = lambda o: {k: v for k, v in o.metrics.items() if not k.startswith("bench")}  # noqa: E731
    assert numbers(first) == numbers(second)  # timings aside, bit-for-bit the same
    other = exp.run(cfg.replace(seed=1), torch.device("cpu"))
    assert numbers(other)["unit_sigma2"] != numbers(first)["unit_sigma2"]
    # the exercises' answers measure what the chapter says they do
    m = first.metrics
    assert m["bessel_jacobian_rel"] < 1e-12 and m["bessel_idempotent"] < 1e-12
    assert m["m2_jacobian_norm_eps0"] < 1e-12 and m["m2_xhat_abs_dev"] < 1e-12
    assert m["m2_jacobian_norm_eps"] == pytest.approx(m["m2_jacobian_norm_eps_predicted"], rel=1e-6)
    assert m["eig_maxdiff_rel"] < 1e-10 and m["eig_spectral_norm"] == pytest.approx(m["eig_gamma_over_s"])
    assert m["detached_gradcheck"] and not m["detached_gradgradcheck"]
    assert m["ln_jacobian_rel"] < 1e-12 and m["ln_cos_w_gradw_whole"] < 1e-12 < m["ln_cos_w_gradw_rows_max"]
    assert m["bench_threads_text"] in ("1 thread", f"{m['bench_threads']} threads")
