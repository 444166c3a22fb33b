"""Chapter 5's packed networks and experiment helpers: packing changes no model's numbers,
a diverging model cannot disturb its neighbours, and the measurements measure what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import data, nets, norms
from bnbook.errors import BnbookError
from bnbook.experiments import batchsize as bs

CNN_KINDS = ["bn", "brn", "gn", "ln", "ws+gn", "ws+bn", "none"]


def _cnn(kind: str, seeds: list[int]) -> nets.PackedCNN:
    return nets.PackedCNN(1, 10, (4, 8, 8), norm=kind, models=len(seeds), seeds=seeds,
                          renorm={"momentum": 0.1}).double()


@pytest.mark.parametrize("kind", CNN_KINDS)
def test_packed_cnn_equals_its_models_run_one_by_one(kind: str) -> None:
    torch.manual_seed(0)
    pack, singles = _cnn(kind, [3, 7]), [_cnn(kind, [3]), _cnn(kind, [7])]
    x = torch.randn(2, 6, 1, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 10, (2, 6))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (pack, *singles)]
    for _ in range(3):  # forward, backward and SGD steps keep the models identical
        out = pack(x)
        for k, m in enumerate(singles):
            torch.testing.assert_close(out[k], m(x[k : k + 1])[0])
        losses = [bs.train.per_model_loss(pack(x), y).sum()] + [
            bs.train.per_model_loss(m(x[k : k + 1]), y[k : k + 1]).sum() for k, m in enumerate(singles)
        ]
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()
    pack.eval(), [m.eval() for m in singles]
    for k, m in enumerate(singles):
        torch.testing.assert_close(pack(x)[k], m(x[k : k + 1])[0])


def test_packed_mlp_with_ln_is_the_plain_computation() -> None:
    torch.manual_seed(1)
    net = nets.PackedMLP(7, (5, 4), 3, "sigmoid", norm="ln", models=1).double()
    x = torch.randn(1, 9, 7, dtype=torch.float64)
    h = x[0]
    for lin, n in zip(net.linears, net.norms):
        h = torch.sigmoid(nn.functional.layer_norm(h @ lin.weight[:, :, 0].T, (lin.weight.shape[0],), n.weight, n.bias))
    ref = h @ net.readout.weight[:, :, 0].T + net.readout.bias
    torch.testing.assert_close(net(x)[0], ref)


def test_packed_mlp_ws_bn_uses_standardized_weights_and_batch_norm() -> None:
    torch.manual_seed(2)
    net = nets.PackedMLP(6, (5,), 2, "relu", norm="ws+bn", models=2).double()
    assert isinstance(net.linears[0], norms.WSConv1d) and isinstance(net.norms[0], norms.BatchNorm)
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    w = norms.standardize_weight(net.linears[0].weight[5:, :, 0])  # model 1's rows
    z = nn.functional.batch_norm(x[1] @ w.T, None, None, training=True)
    ref = torch.relu(z) @ net.readout.weight[2:, :, 0].T + net.readout.bias[2:]
    torch.testing.assert_close(net(x)[1], ref)


def test_a_diverging_packed_model_does_not_disturb_the_others() -> None:
    torch.manual_seed(3)
    pack, single = _cnn("bn", [0, 1]).float(), _cnn("bn", [0]).float()
    with torch.no_grad():
        pack.convs[1].weight[8:].fill_(float("inf"))  # model 1 is broken
    x = torch.randn(2, 4, 1, 12, 12)
    out = pack(x)
    assert not torch.isfinite(out[1]).any()
    torch.testing.assert_close(out[0], single(x[:1])[0])
    out.nan_to_num(0)[0].sum().backward()
    assert torch.isfinite(pack.convs[0].weight.grad[:4]).all()


def test_packed_nets_reject_bad_arguments() -> None:
    with pytest.raises(BnbookError, match="unknown norm"):
        nets.PackedCNN(norm="instance")
    with pytest.raises(BnbookError, match="group size"):
        nets.PackedCNN(widths=(6, 8, 8), norm="gn", group_size=4)
    with pytest.raises(BnbookError, match=r"inputs \(K=2"):
        nets.PackedCNN(models=2)(torch.randn(3, 2, 1, 8, 8))
    with pytest.raises(BnbookError, match="2 models but 3 seeds"):
        nets.PackedMLP(4, norm="bn", models=2, seeds=[0, 1, 2])


def test_model_depends_on_its_seed_only() -> None:
    a, b = nets.PackedCNN(models=2, seeds=[5, 6]), nets.PackedCNN(models=1, seeds=[6])
    torch.testing.assert_close(a.convs[1].weight[32:], b.convs[1].weight)


# ------------------------------------------------------------------ experiment helpers
def _tiny_dataset(n: int = 64) -> data.Dataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = torch.randn(n, 1, 12, 12, generator=gen) + y.view(-1, 1, 1, 1) * 0.3
    return data.Dataset("tiny", x, y, x[:32], y[:32], tuple("0123456789"), "random test data")


def test_train_packed_is_deterministic_and_reports_per_model_results() -> None:
    ds = _tiny_dataset()
    runs = [bs.train_packed(_cnn("gn", [0, 1]).float(), ds, 8, 2, 0.05, 0.9, [0, 1]) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].test_acc, runs[1].test_acc)
    np.testing.assert_array_equal(runs[0].epoch_loss, runs[1].epoch_loss)
    assert runs[0].epoch_loss.shape == (2, 2) and not runs[0].diverged.any()


def test_train_packed_records_divergence_as_nan() -> None:
    ds = _tiny_dataset()
    out = bs.train_packed(_cnn("none", [0, 1]).float(), ds, 8, 2, 1e6, 0.9, [0, 1])
    assert out.diverged.any()
    np.testing.assert_array_equal(out.diverged, ~np.isfinite(out.epoch_loss).all(0))
    np.testing.assert_array_equal(np.isnan(out.test_acc), out.diverged)


def test_batch_mode_accuracy_restores_buffers_and_matches_eval_for_gn() -> None:
    ds = _tiny_dataset()
    net = bs.train_packed(_cnn("bn", [0, 1]).float(), ds, 8, 1, 0.05, 0.9, [0, 1]).model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bs.batch_mode_accuracy(net, ds.x_test, ds.y_test, 4)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    gn = _cnn("gn", [0]).float()
    _, acc = bs.train.evaluate(gn, ds.x_test, ds.y_test)
    np.testing.assert_allclose(bs.batch_mode_accuracy(gn, ds.x_test, ds.y_test, 4), acc.numpy())
    assert np.isnan(bs.batch_mode_accuracy(gn, ds.x_test, ds.y_test, 64)).all()  # fewer than N test images


def test_statistics_noise_of_iid_values_follows_one_over_sqrt_m() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4000, 40, generator=gen) * 3 + 2  # independent examples, no positions
    mu, sigma = bs.statistics_noise(feats, [4, 16, 64], 300, gen)
    m = np.array([4, 16, 64])
    np.testing.assert_allclose(mu, 1 / np.sqrt(m), rtol=0.1)
    assert np.all(np.diff(sigma) < 0) and sigma[-1] < 0.15


def test_statistics_noise_sees_correlated_positions_as_fewer_samples() -> None:
    gen = torch.Generator().manual_seed(1)
    per_image = torch.randn(2000, 8, 1, 1, generator=gen)
    feats = per_image.expand(2000, 8, 5, 5) + 0.01 * torch.randn(2000, 8, 5, 5, generator=gen)
    mu, _ = bs.statistics_noise(feats, [16], 300, gen)
    assert mu[0] > 0.8 / np.sqrt(16)  # ~1/√m, not 1/√(25 m): identical positions add nothing


def test_scaled_lr_and_renorm_schedule() -> None:
    assert bs.scaled_lr(0.1, 32) == pytest.approx(0.1) and bs.scaled_lr(0.1, 2) == pytest.approx(0.00625)
    kw = bs.renorm_kwargs(1000)
    assert (kw["warmup_steps"], kw["dmax_steps"], kw["rmax_steps"]) == (100, 500, 800)
    brn = norms.BatchRenorm(2, **kw)
    brn.num_batches_tracked.fill_(800)
    assert [float(v) for v in brn.current_limits()] == pytest.approx([3.0, 5.0])


def test_config_rejects_bad_parameters() -> None:
    with pytest.raises(BnbookError, match="unknown norm"):
        bs.BatchSizeConfig.from_params("smoke", norms=["bn", "batchnorm"])
    with pytest.raises(BnbookError, match="batch sizes >= 2"):
        bs.BatchSizeConfig.from_params("smoke", batch_sizes=[1, 8])
    with pytest.raises(BnbookError, match="GroupNorm"):
        bs.BatchSizeConfig.from_params("smoke", mlp_norms=["gn"])
    cfg = bs.BatchSizeConfig.from_params("smoke", batch_sizes=[4, 16])
    assert cfg.batch_sizes == (4, 16)


def test_step_times_shape() -> None:
    ds = _tiny_dataset()
    t = bs.step_times(lambda k: _cnn(k, [0]).float(), ds, ["bn", "gn"], 8, 2, 2)
    assert t.shape == (2, 2) and (t > 0).all()
