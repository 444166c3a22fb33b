"""Chapter 5's experiment: ghost batches change BN's statistics and nothing else, the sweep varies
N only where it matters, and the measurements measure what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnbook import batching, data, nets, norms, train
from bnbook.errors import BnbookError
from bnbook.experiments import batchsize as bs


# ------------------------------------------------------------------ ghost batches
def test_ghost_bn_over_the_whole_batch_is_our_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    bn, ghost = norms.BatchNorm(3).double(), bs.GhostBatchNorm(3, 8).double()
    with torch.no_grad():
        for m in (bn, ghost):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    for _ in range(3):
        torch.testing.assert_close(ghost(x), bn(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, name), getattr(bn, name))
    bn.eval(), ghost.eval()
    torch.testing.assert_close(ghost(x), bn(x))


def test_ghost_bn_normalises_each_group_by_itself_and_averages_the_running_statistics() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, dtype=torch.float64) * 3 + 1
    ghost = bs.GhostBatchNorm(3, 2, momentum=1.0).double()
    chunks = [norms.BatchNorm(3, momentum=1.0).double() for _ in range(4)]
    ref = torch.cat([bn(x[2 * i : 2 * i + 2]) for i, bn in enumerate(chunks)])
    torch.testing.assert_close(ghost(x), ref)
    torch.testing.assert_close(ghost.running_mean, torch.stack([bn.running_mean for bn in chunks]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([bn.running_var for bn in chunks]).mean(0))


def test_ghost_bn_gradient_flows_only_within_a_group() -> None:
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    y = bs.GhostBatchNorm(2, 3).double()(x)
    (grad,) = torch.autograd.grad(y[0, 0] ** 2 + y[1, 1], x)
    assert grad[3:].abs().max() == 0 and grad[:3].abs().max() > 0


def test_ghost_batch_renorm_over_the_whole_batch_is_batch_renorm() -> None:
    torch.manual_seed(2)
    kw = {"warmup_steps": 1, "dmax_steps": 3, "rmax_steps": 4}
    brn, ghost = norms.BatchRenorm(3, **kw).double(), bs.GhostBatchRenorm(3, 8, **kw).double()
    for step in range(6):  # through the warm-up and the relaxation of r_max, d_max
        x = torch.randn(8, 3, 2, 2, dtype=torch.float64) * (1 + step) + step
        torch.testing.assert_close(ghost(x), brn(x))
    torch.testing.assert_close(ghost.running_std, brn.running_std)
    torch.testing.assert_close(ghost.running_mean, brn.running_mean)
    brn.eval(), ghost.eval()
    torch.testing.assert_close(ghost(x), brn(x))


def test_ghost_batches_reject_a_batch_that_does_not_divide() -> None:
    with pytest.raises(BnbookError, match="ghost batches of 4"):
        bs.GhostBatchNorm(2, 4)(torch.randn(6, 2))
    with pytest.raises(BnbookError, match="m = 1"):
        bs.GhostBatchNorm(2, 1)(torch.randn(6, 2))


@pytest.mark.parametrize("kind", ["bn", "brn", "ws+bn", "gn"])
def test_with_ghost_batches_swaps_only_batch_norms_and_keeps_the_model(kind: str) -> None:
    plain = nets.SmallCNN(1, 10, (4, 8, 8), norm=kind, seed=3, renorm={"warmup_steps": 2})
    ghost = bs.with_ghost_batches(nets.SmallCNN(1, 10, (4, 8, 8), norm=kind, seed=3, renorm={"warmup_steps": 2}), 2)
    expected = {"bn": bs.GhostBatchNorm, "ws+bn": bs.GhostBatchNorm, "brn": bs.GhostBatchRenorm, "gn": norms.GroupNorm}
    assert all(type(n) is expected[kind] for n in ghost.norms)
    assert type(ghost.convs[0]) is type(plain.convs[0])  # WS stays where it was
    x = torch.randn(4, 1, 12, 12)
    plain.eval(), ghost.eval()
    torch.testing.assert_close(ghost(x), plain(x))  # same parameters and running statistics
    if kind in bs.BATCH_DEPENDENT:
        assert all(n.group == 2 for n in ghost.norms)


def test_the_engine_runs_ghost_models_on_the_general_path_with_per_model_numbers() -> None:
    """A ghost-BN MLP must not be mistaken for a plain BN MLP by the fast stacked path."""
    make = lambda s: bs.with_ghost_batches(nets.MLP(6, (5, 5), 3, norm="bn", seed=s), 2)  # noqa: E731
    assert isinstance(batching.batch_models([make(0), make(1)]), batching.VmapBatch)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    ds = data.Dataset("t", x, y, x[:16], y[:16], ("a", "b", "c"), "random")
    cfg = train.FitConfig(steps=5, batch_size=8, lr=0.1, log_every=5, probe_size=4)
    both = train.fit([make(0), make(1)], ds, cfg, seeds=[0, 1])
    alone = train.fit([make(1)], ds, cfg, seeds=[1])
    np.testing.assert_allclose(both.test_loss[:, 1], alone.test_loss[:, 0], rtol=1e-5)


# ------------------------------------------------------------------ experiment helpers
def _tiny_dataset(n: int = 64) -> data.Dataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = torch.randn(n, 1, 12, 12, generator=gen) + y.view(-1, 1, 1, 1) * 0.3
    return data.Dataset("tiny", x, y, x[:32], y[:32], tuple("0123456789"), "random test data")


def _make(kind: str, seed: int) -> torch.nn.Module:
    return nets.SmallCNN(1, 10, (4, 8, 8), norm=kind, seed=seed, renorm={"warmup_steps": 1})


def test_sweep_trains_per_example_norms_once_and_fills_every_n() -> None:
    ds = _tiny_dataset()
    cfg = bs.BatchSizeConfig.from_params("smoke")
    out = bs.sweep(_make, ds, ["bn", "gn"], [2, 8], [0, 1], bs.train_config(cfg, 3, 0.05))
    assert out["acc"].shape == (2, 2, 2)
    np.testing.assert_array_equal(out["acc"][1, 0], out["acc"][1, 1])  # GN: one set of runs
    assert np.isnan(out["acc_batch_mode"][1]).all() and np.isfinite(out["acc_batch_mode"][0]).all()
    assert set(out["models"]) == {("bn", 2), ("bn", 8), ("gn", 0)}
    again = bs.sweep(_make, ds, ["bn"], [2], [0, 1], bs.train_config(cfg, 3, 0.05))
    np.testing.assert_array_equal(again["acc"][0, 0], out["acc"][0, 0])  # deterministic


def test_training_mode_evaluation_leaves_the_models_untouched_and_equals_eval_for_gn() -> None:
    ds = _tiny_dataset()
    bn = [bs.with_ghost_batches(_make("bn", 0), 4)]
    before = {k: v.clone() for k, v in bn[0].state_dict().items()}
    bs._evaluate_in_training_mode(bn, ds.x_test, ds.y_test, 4)
    for k, v in bn[0].state_dict().items():
        torch.testing.assert_close(v, before[k])
    gn = _make("gn", 0).eval()
    with torch.no_grad():
        acc = float((gn(ds.x_test).argmax(-1) == ds.y_test).float().mean())
    assert bs._evaluate_in_training_mode([gn], ds.x_test, ds.y_test, 4)[0] == pytest.approx(acc)
    assert np.isnan(bs._evaluate_in_training_mode([gn], ds.x_test, ds.y_test, 64)).all()  # fewer than N images


def test_verdict_reads_the_seed_ranges() -> None:
    err = np.array([[30.0, 31.0, 32.0], [20.0, 21.0, 22.0]])  # [N index, seed]
    assert bs._verdict(err, 0, 1).startswith("higher at the small N for every seed")
    assert bs._verdict(err[::-1], 0, 1).startswith("lower")
    assert bs._verdict(np.array([[20.0, 25.0], [21.0, 24.0]]), 0, 1) == "a change within the range of the seeds"


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


def test_renorm_schedule_is_in_steps_and_the_same_for_every_n() -> None:
    cfg = bs.BatchSizeConfig.from_params("quick")
    kw = cfg.renorm()
    assert (kw["warmup_steps"], kw["dmax_steps"], kw["rmax_steps"]) == (50, 175, 250)
    brn = norms.BatchRenorm(2, **kw)
    brn.num_batches_tracked.fill_(49)
    assert [float(v) for v in brn.current_limits()] == pytest.approx([1.0, 0.0])  # still plain BN
    brn.num_batches_tracked.fill_(250)
    assert [float(v) for v in brn.current_limits()] == pytest.approx([3.0, 5.0])
    assert cfg.renorm_rmax_step <= cfg.steps  # fully relaxed within the run


def test_config_rejects_bad_parameters() -> None:
    with pytest.raises(BnbookError, match="unknown norm"):
        bs.BatchSizeConfig.from_params("smoke", norms=["bn", "batchnorm"])
    with pytest.raises(BnbookError, match="sizes >= 2"):
        bs.BatchSizeConfig.from_params("smoke", stat_batches=[1, 8])
    with pytest.raises(BnbookError, match="multiple of every N"):
        bs.BatchSizeConfig.from_params("smoke", stat_batches=[3, 8])
    with pytest.raises(BnbookError, match="GroupNorm"):
        bs.BatchSizeConfig.from_params("smoke", mlp_norms=["gn"])
    assert bs.BatchSizeConfig.from_params("smoke", stat_batches=[4, 8]).stat_batches == (4, 8)


def test_step_times_shape() -> None:
    ds = _tiny_dataset()
    t = bs.step_times(lambda k: _make(k, 0), ds, ["bn", "gn"], 8, 2, 2)
    assert t.shape == (2, 2) and (t > 0).all()


def test_plateau_is_where_the_seed_ranges_start_to_overlap_the_largest_n() -> None:
    err = np.array([[50, 55, 60], [12, 13, 14], [10, 11, 12], [10, 10.5, 11.5]])  # [N index, seed]
    assert bs.plateau(err, [2, 4, 8, 16]) == 8
    assert bs.plateau(err[[0, 3]], [2, 16]) == 16
    assert bs.plateau(np.ones((3, 2)), [2, 4, 8]) == 2
