"""LayerNorm, GroupNorm, Weight Standardization and Batch Renorm (chapter 5) checked
against PyTorch where PyTorch has them, and against their defining limits and
invariants where it does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbook import norms

torch.set_num_threads(1)


def _randomise_affine(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in (module.weight, module.bias):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ------------------------------------------------------------------ GroupNorm / LayerNorm
@pytest.mark.parametrize("shape,groups", [((4, 6), 3), ((3, 8, 5), 2), ((2, 12, 5, 4), 4), ((2, 12, 5, 4), 12)])
def test_group_norm_matches_torch(shape: tuple[int, ...], groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3 + 1
    ours, ref = norms.GroupNorm(groups, shape[1]), nn.GroupNorm(groups, shape[1])
    _randomise_affine(ours, gen)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ours.eval()  # no batch statistics: evaluation mode computes the same thing
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_group_norm_gradients_match_torch() -> None:
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    ours = norms.GroupNorm(4, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(ours, (x,))
    ref = nn.GroupNorm(4, 8, dtype=torch.float64)
    g = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    (gx_ours,) = torch.autograd.grad(ours(x), x, g)
    (gx_ref,) = torch.autograd.grad(ref(x), x, g)
    torch.testing.assert_close(gx_ours, gx_ref)


def test_group_norm_is_independent_of_the_batch() -> None:
    x = torch.randn(8, 6, 3, 3)
    gn = norms.GroupNorm(2, 6)
    torch.testing.assert_close(gn(x)[:1], gn(x[:1]))  # batch size 1 gives the same sample output


def test_group_norm_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError, match="divisible"):
        norms.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="channels"):
        norms.GroupNorm(2, 6)(torch.randn(2, 4, 3))


@pytest.mark.parametrize("normalized_shape,x_shape", [(7, (5, 7)), ((3, 4), (2, 5, 3, 4)), ((6, 2, 2), (3, 6, 2, 2))])
def test_layer_norm_matches_torch(normalized_shape, x_shape) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=gen) * 2 - 0.5
    ours, ref = norms.LayerNorm(normalized_shape), nn.LayerNorm(normalized_shape)
    _randomise_affine(ours, gen)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    xd = x.double().requires_grad_()
    assert torch.autograd.gradcheck(norms.LayerNorm(normalized_shape, dtype=torch.float64), (xd,))


def test_layer_norm_rejects_wrong_trailing_shape() -> None:
    with pytest.raises(ValueError, match="trailing shape"):
        norms.LayerNorm(5)(torch.randn(3, 4))


def test_group_norm_with_one_group_is_layer_norm_over_chw() -> None:
    x = torch.randn(4, 6, 3, 5)
    ours = norms.GroupNorm(1, 6, affine=False)(x)
    torch.testing.assert_close(ours, nn.functional.layer_norm(x, x.shape[1:]), rtol=1e-5, atol=1e-5)


def test_group_norm_over_stacked_models_is_layer_norm_per_model() -> None:
    # K models' features side by side in dim 1: GroupNorm(K, K*F) = K separate LayerNorm(F).
    k, f = 3, 5
    x = torch.randn(6, k * f)
    ours = norms.GroupNorm(k, k * f, affine=False)(x)
    ref = torch.cat([nn.functional.layer_norm(x[:, i * f : (i + 1) * f], (f,)) for i in range(k)], dim=1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Weight Standardization
def test_standardized_weight_has_zero_mean_unit_variance_per_output_channel() -> None:
    w = torch.randn(8, 3, 3, 3) * 0.2 + 0.7
    w_hat = norms.standardize_weight(w, eps=0.0).reshape(8, -1)
    torch.testing.assert_close(w_hat.mean(1), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(w_hat.var(1, correction=0), torch.ones(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make,x_shape",
    [
        (lambda: norms.WSConv2d(3, 5, 3, padding=1), (2, 3, 6, 6)),
        (lambda: norms.WSLinear(7, 4), (5, 7)),
        (lambda: norms.WSConv1d(6, 4, 1, groups=2), (5, 6, 1)),
    ],
)
def test_ws_output_is_invariant_to_affine_changes_of_each_row(make, x_shape) -> None:
    torch.manual_seed(0)
    layer = make().double()
    layer.ws_eps = 0.0  # exact invariance; ε only breaks it at the 1e-5 level
    x = torch.randn(x_shape, dtype=torch.float64)
    before = layer(x)
    out = layer.weight.shape[0]
    scale = torch.rand(out, dtype=torch.float64) * 5 + 0.1  # a_i > 0
    shift = torch.randn(out, dtype=torch.float64) * 3  # b_i
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    with torch.no_grad():
        layer.weight.mul_(scale.view(view)).add_(shift.view(view))
    torch.testing.assert_close(layer(x), before)


def test_ws_conv_uses_the_standardized_weight_and_gradchecks() -> None:
    torch.manual_seed(1)
    conv = norms.WSConv2d(2, 3, 3, bias=False).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    ref = nn.functional.conv2d(x, norms.standardize_weight(conv.weight))
    torch.testing.assert_close(conv(x), ref)
    assert torch.autograd.gradcheck(lambda w: nn.functional.conv2d(x, norms.standardize_weight(w)), (conv.weight,))


# ------------------------------------------------------------------ Batch Renormalization
def _brn_like_bn(c: int, **kw) -> tuple[norms.BatchRenorm, norms.BatchNorm]:
    gen = torch.Generator().manual_seed(3)
    brn = norms.BatchRenorm(c, rmax=1.0, dmax=0.0, **kw).double()
    bn = norms.BatchNorm(c).double()
    _randomise_affine(brn, gen)
    bn.weight.data.copy_(brn.weight.data)
    bn.bias.data.copy_(brn.bias.data)
    return brn, bn


@pytest.mark.parametrize("x_shape", [(16, 4), (4, 3, 5, 5)])
def test_batch_renorm_with_r1_d0_is_batch_norm(x_shape) -> None:
    brn, bn = _brn_like_bn(x_shape[1])
    with torch.no_grad():  # moving statistics far from the batch ones: r and d would matter
        brn.running_mean.fill_(4.0)
        brn.running_std.fill_(0.1)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x_shape, dtype=torch.float64)
    y_brn, y_bn = brn(x), bn(x)
    torch.testing.assert_close(y_brn, y_bn)
    torch.testing.assert_close(torch.autograd.grad(y_brn, x, g)[0], torch.autograd.grad(y_bn, x, g)[0])


def test_batch_renorm_inference_equals_training_when_statistics_agree() -> None:
    brn = norms.BatchRenorm(3, rmax=3.0, dmax=5.0).double()
    _randomise_affine(brn, torch.Generator().manual_seed(4))
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    mean, var, _ = norms.batch_stats(x)
    with torch.no_grad():
        brn.running_mean.copy_(mean)
        brn.running_std.copy_(torch.sqrt(var + brn.eps))
    y_train = brn.train()(x)
    with torch.no_grad():  # undo the moving-average update so that eval sees the same μ, σ
        brn.running_mean.copy_(mean)
        brn.running_std.copy_(torch.sqrt(var + brn.eps))
    torch.testing.assert_close(brn.eval()(x), y_train)


def test_batch_renorm_clips_r_and_d_and_treats_them_as_constants() -> None:
    brn = norms.BatchRenorm(2, rmax=2.0, dmax=0.5, affine=False).double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.0, 10.0]))
        brn.running_std.copy_(torch.tensor([100.0, 1.0]))
    x = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    mean, var, _ = norms.batch_stats(x.detach())
    std = torch.sqrt(var + brn.eps)
    r = (std / torch.tensor([100.0, 1.0], dtype=torch.float64)).clamp(0.5, 2.0)
    d = ((mean - torch.tensor([0.0, 10.0], dtype=torch.float64)) / torch.tensor([100.0, 1.0], dtype=torch.float64)).clamp(-0.5, 0.5)
    assert r[0] == 0.5 and d[1] == -0.5  # both clips active
    y = brn(x)
    expected = norms.batch_norm(x, eps=brn.eps) * r + d
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(expected, x, g)[0])


def test_batch_renorm_updates_moving_mean_and_std() -> None:
    brn = norms.BatchRenorm(3, momentum=0.25)
    x = torch.randn(10, 3) * 2 + 3
    brn(x)
    mean, var, _ = norms.batch_stats(x)
    torch.testing.assert_close(brn.running_mean, 0.25 * mean)
    torch.testing.assert_close(brn.running_std, 0.75 + 0.25 * torch.sqrt(var + brn.eps))
    assert int(brn.num_batches_tracked) == 1
    before = brn.running_mean.clone()
    brn.eval()(x)
    torch.testing.assert_close(brn.running_mean, before)  # evaluation never updates


def test_batch_renorm_schedule_relaxes_the_limits_linearly() -> None:
    brn = norms.BatchRenorm(1, rmax=3.0, dmax=5.0, warmup_steps=10, rmax_steps=30, dmax_steps=20)
    seen = {}
    for t in range(40):
        brn.num_batches_tracked.fill_(t)
        r_max, d_max = brn.current_limits()
        seen[t] = (float(r_max), float(d_max))
    assert seen[0] == seen[10] == (1.0, 0.0)  # BN during warm-up
    assert seen[20] == pytest.approx((2.0, 5.0))
    assert seen[15] == pytest.approx((1.5, 2.5))
    assert seen[30] == seen[39] == pytest.approx((3.0, 5.0))


def test_batch_renorm_rejects_bad_limits_and_single_values() -> None:
    with pytest.raises(ValueError, match="rmax"):
        norms.BatchRenorm(3, rmax=0.5)
    with pytest.raises(ValueError, match="more than 1 value"):
        norms.BatchRenorm(3)(torch.randn(1, 3))


def test_batch_renorm_state_dict_has_its_buffers() -> None:
    keys = set(norms.BatchRenorm(4).state_dict())
    assert keys == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked"}


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize(
    "make",
    [
        lambda: norms.GroupNorm(2, 4),
        lambda: norms.BatchRenorm(4, rmax=2.0, dmax=1.0),
        lambda: norms.LpBatchNorm(4, p=1.0),
        lambda: norms.LpBatchNorm(4, p=float("inf")),
        lambda: norms.NoisyBatchNorm(4),
    ],
)
def test_bf16_input_gives_bf16_output_and_fp32_buffers(make) -> None:
    layer = make()
    x = torch.randn(6, 4, 3, 3) * 3 + 1
    ref = layer(x) if not isinstance(layer, norms.NoisyBatchNorm) else None
    layer = make()
    torch.manual_seed(0)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert all(b.dtype in (torch.float32, torch.long) for b in layer.buffers())
    if ref is not None:  # the same numbers as in float32, up to bf16 rounding of the input and output
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    layer.eval()
    assert layer(x.bfloat16()).dtype == torch.bfloat16


# ------------------------------------------------------------------ Santurkar et al.'s noisy BN (Algorithm 1)
def test_noise_parameters_follow_algorithm_1() -> None:
    torch.manual_seed(0)
    noise = norms.ShiftScaleNoise(400)  # n_μ = 0.5, n_σ = 1.25, r_μ = r_σ = 0.1
    s, m, mu_t, sigma_t = noise.sample((2000, 400), dtype=torch.float64)
    # per unit and step: μ_t ~ U(−0.5, 0.5), σ_t ~ U(1, 1.25), spread over the whole range
    assert mu_t.abs().max() <= 0.5 and mu_t.min() < -0.45 and mu_t.max() > 0.45
    assert sigma_t.min() >= 1 and sigma_t.max() <= 1.25 and sigma_t.min() < 1.02 and sigma_t.max() > 1.23
    # per sample: m ~ U(μ_t ± 0.1) around its unit's μ_t; s ~ N(σ_t, 0.1) with 0.1 the standard deviation
    assert ((m - mu_t).abs() <= 0.1).all() and (m - mu_t).abs().max() > 0.099
    torch.testing.assert_close(m.mean(0), mu_t, atol=0.01, rtol=0)
    torch.testing.assert_close(s.mean(0), sigma_t, atol=0.012, rtol=0)
    assert abs(float((s - sigma_t).std()) - 0.1) < 0.002  # not √0.1 ≈ 0.32 (the variance reading)
    assert abs(float((m - mu_t).std()) - 0.2 / 12**0.5) < 0.002  # uniform on a width of 0.2


def test_noise_is_drawn_per_sample_and_per_position_and_redrawn_every_step() -> None:
    torch.manual_seed(1)
    noise = norms.ShiftScaleNoise(3)
    zeros = torch.zeros(4, 3, 5, 5, dtype=torch.float64)
    m1, m2 = noise(zeros), noise(zeros)  # a = 0: the output is the shift m
    assert m1.shape == zeros.shape
    assert (m1[0, :, 0, 0] != m1[1, :, 0, 0]).all() and (m1[0, :, 0, 0] != m1[0, :, 2, 3]).all()
    # H and W count as batch dimensions: one μ_t per channel, so each channel's values lie in a 2·r_μ window
    spread = m1.amax(dim=(0, 2, 3)) - m1.amin(dim=(0, 2, 3))
    assert (spread <= 0.2).all()
    assert not torch.allclose(m1.mean(dim=(0, 2, 3)), m2.mean(dim=(0, 2, 3)), atol=0.05)  # a new μ_t at each step
    shared = norms.ShiftScaleNoise(3, per_position=False)(zeros)
    assert torch.equal(shared, shared[:, :, :1, :1].expand_as(shared)) and (shared[0, :, 0, 0] != shared[1, :, 0, 0]).all()


def test_noise_scales_then_shifts_and_is_off_in_eval_mode() -> None:
    noise = norms.ShiftScaleNoise(2)
    a = torch.randn(7, 2, 3, 3, dtype=torch.float64)
    torch.manual_seed(5)
    s, m, _, _ = noise.sample(a.shape, dtype=torch.float64)
    torch.manual_seed(5)
    torch.testing.assert_close(noise(a), s * a + m)
    noise.eval()
    assert torch.equal(noise(a), a)


def test_noisy_batch_norm_is_bn_then_noise_and_plain_bn_in_eval_mode() -> None:
    torch.manual_seed(2)
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    noisy, bn = norms.NoisyBatchNorm(3, momentum=0.3), norms.BatchNorm(3, momentum=0.3)
    with torch.no_grad():
        for layer in (noisy.bn, bn):
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    y_bn = bn(x)
    torch.manual_seed(9)
    s, m, _, _ = noisy.noise.sample(x.shape)
    torch.manual_seed(9)
    torch.testing.assert_close(noisy(x), s * y_bn + m)
    torch.testing.assert_close(noisy.bn.running_mean, bn.running_mean)  # statistics of the clean input
    noisy.eval(), bn.eval()
    torch.testing.assert_close(noisy(x), bn(x))


# ------------------------------------------------------------------ ℓp batch normalisation (Santurkar §3.3)
def _lp_direct(x: torch.Tensor, p: float, centred: bool, eps: float) -> torch.Tensor:
    """The formula written out channel by channel: (x − mean) / (power mean of |v|^p + ε)."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        vals = x[:, c].reshape(-1)
        mean = vals.sum() / len(vals)
        v = vals - mean if centred else vals
        if p == float("inf"):
            scale = max(abs(float(t)) for t in v)
        else:
            scale = (sum(abs(float(t)) ** p for t in v) / len(v)) ** (1 / p)
        out[:, c] = (x[:, c] - mean) / (scale + eps)
    return out


@pytest.mark.parametrize("p", [1.0, 2.0, float("inf"), 3.0])
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("shape", [(9, 3), (4, 2, 3, 3)])
def test_lp_norm_matches_its_formula(p, centred, shape) -> None:
    gen = torch.Generator().manual_seed(int(p) if p != float("inf") else 7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.7
    layer = norms.LpBatchNorm(shape[1], p=p, centred=centred, eps=1e-3, affine=False).double()
    torch.testing.assert_close(layer(x), _lp_direct(x, p, centred, 1e-3))


def test_l2_norm_of_centred_activations_is_batch_norm() -> None:
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True) * 3 + 2
    lp = norms.LpBatchNorm(3, p=2.0, centred=True, eps=0.0).double()
    bn = norms.BatchNorm(3, eps=0.0).double()
    for layer in (lp, bn):
        _randomise_affine(layer, torch.Generator().manual_seed(8))
    g = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    y_lp, y_bn = lp(x), bn(x)
    torch.testing.assert_close(y_lp, y_bn)
    torch.testing.assert_close(torch.autograd.grad(y_lp, x, g)[0], torch.autograd.grad(y_bn, x, g)[0])
    raw = norms.LpBatchNorm(3, p=2.0, eps=0.0).double()  # the default: the norm of the raw activations
    assert not torch.allclose(raw(x), norms.batch_norm(x, eps=0.0))


def test_lp_norm_running_statistics_and_eval_mode() -> None:
    layer = norms.LpBatchNorm(2, p=1.0, momentum=0.25, eps=0.0, affine=False).double()
    x = torch.randn(10, 2, dtype=torch.float64) * 2 + 3
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(0))
    torch.testing.assert_close(layer.running_scale, 0.75 + 0.25 * x.abs().mean(0))
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    x2 = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(layer(x2), (x2 - layer.running_mean) / layer.running_scale)
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(0))  # evaluation never updates
    assert torch.autograd.gradcheck(norms.LpBatchNorm(2, p=1.0).double().train(), (x.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="p >= 1"):
        norms.LpBatchNorm(2, p=0.5)
