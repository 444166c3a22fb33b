"""Our from-scratch BatchNorm against torch.nn.BatchNorm1d/2d, in float64."""

import pytest
import torch

from bnbook.norms import BatchNorm, batch_norm, inference_affine, population_statistics

TOL = dict(rtol=1e-12, atol=1e-12)


def pair(shape, **kw):
    """Our BN and PyTorch's, with identical random γ, β."""
    c = shape[1]
    ref_cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    ours = BatchNorm(c, dtype=torch.float64, **kw)
    ref = ref_cls(c, dtype=torch.float64, **kw)
    if ours.affine:
        with torch.no_grad():
            g, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
            ours.weight.copy_(g), ref.weight.copy_(g)
            ours.bias.copy_(b), ref.bias.copy_(b)
    return ours, ref


@pytest.mark.parametrize("shape", [(16, 5), (8, 3, 7), (6, 4, 5, 3)])
@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
def test_train_eval_and_running_stats_match_torch(shape, momentum):
    torch.manual_seed(0)
    ours, ref = pair(shape, momentum=momentum)
    for step in range(7):
        x = torch.randn(*shape, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 7
    ours.eval(), ref.eval()
    x = torch.randn(*shape, dtype=torch.float64) * 3 - 1
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_gradients_match_torch():
    torch.manual_seed(1)
    ours, ref = pair((10, 4, 3, 3))
    x = torch.randn(10, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 4, 3, 3, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours(x) * w).sum(), [x, ours.weight, ours.bias])
    g_ref = torch.autograd.grad((ref(x) * w).sum(), [x, ref.weight, ref.bias])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_state_dict_is_interchangeable_with_torch():
    ours, ref = pair((12, 6))
    for _ in range(3):
        x = torch.randn(12, 6, dtype=torch.float64)
        ours(x), ref(x)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = torch.nn.BatchNorm1d(6, dtype=torch.float64)
    fresh.load_state_dict(ours.state_dict())
    fresh.eval(), ours.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), ours(x), **TOL)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_options_match_torch(affine, track):
    ours, ref = pair((9, 3), affine=affine, track_running_stats=track)
    x = torch.randn(9, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_device_move_keeps_buffers():
    ours = BatchNorm(3).to(torch.float64)
    assert ours.running_var.dtype == torch.float64
    ours.to("cpu")
    assert ours.running_mean.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - runs only on a GPU machine
    torch.manual_seed(2)
    x = torch.randn(32, 8, 4, 4)
    cpu = BatchNorm(8)
    gpu = BatchNorm(8).cuda()
    torch.testing.assert_close(cpu(x), gpu(x.cuda()).cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.running_var, gpu.running_var.cpu(), rtol=1e-5, atol=1e-6)


def test_single_value_per_feature_raises():
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchNorm(4).train()(torch.randn(1, 4))
    BatchNorm(4).eval()(torch.randn(1, 4))  # eval mode is fine with one example


def test_identity_recovery():
    x = torch.randn(50, 7, dtype=torch.float64) * 4 + 2
    mean, var = x.mean(0), x.var(0, correction=0)
    y = batch_norm(x, torch.sqrt(var + 1e-5), mean, 1e-5)
    torch.testing.assert_close(y, x, **TOL)


def test_population_statistics_is_algorithm_2_and_cumulative_running_average():
    torch.manual_seed(3)
    batches = [torch.randn(8, 5, dtype=torch.float64) * 2 + 1 for _ in range(20)]
    mean, var = population_statistics(batches)
    bn = BatchNorm(5, momentum=None, dtype=torch.float64)
    for b in batches:
        bn(b)
    torch.testing.assert_close(bn.running_mean, mean, **TOL)
    torch.testing.assert_close(bn.running_var, var, **TOL)
    expected = 8 / 7 * torch.stack([b.var(0, correction=0) for b in batches]).mean(0)
    torch.testing.assert_close(var, expected, **TOL)
    with pytest.raises(ValueError, match="one size"):
        population_statistics([torch.randn(8, 5), torch.randn(4, 5)])


def test_inference_affine_equals_eval_mode():
    bn = BatchNorm(4, dtype=torch.float64)
    for _ in range(5):
        bn(torch.randn(10, 4, dtype=torch.float64) * 3)
    bn.eval()
    a, b = inference_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(bn(x), x * a + b, **TOL)


# ------------------------------------------------------------------ mixed precision (bf16 autocast)
def test_bf16_autocast_matches_torch_and_keeps_fp32_buffers():
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    ours, ref = BatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x + step)
            assert h.dtype == torch.bfloat16  # what a conv hands its norm under autocast
            y_ours, y_ref = ours(h), ref(h)
        assert y_ours.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    for name in ("running_mean", "running_var"):
        assert getattr(ours, name).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    ours.eval(), ref.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        torch.testing.assert_close(ours(h).float(), ref(h).float(), rtol=2e-2, atol=2e-2)


def test_bf16_gradients_reach_fp32_parameters():
    ours = BatchNorm(4)
    x = torch.randn(16, 4, dtype=torch.bfloat16, requires_grad=True)
    ours(x).float().square().sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(ours.weight.grad).all() and torch.isfinite(x.grad.float()).all()
