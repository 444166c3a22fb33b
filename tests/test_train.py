"""bnbook.nets and bnbook.train: the stacked engine against a plain loop, determinism, divergence."""

import functools

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import data, nets, norms, train
from bnbook.errors import BnbookError


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist5k").flat()


def sequential_copy(m: nets.MLP) -> nn.Sequential:
    """The same network as plain torch layers (nn.Linear / nn.BatchNorm1d / nn.Sigmoid), same numbers."""
    layers: list[nn.Module] = [nn.Flatten()]
    for lin, norm in zip(m.linears, m.norms):
        new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.load_state_dict(lin.state_dict())
        layers.append(new)
        if not isinstance(norm, nn.Identity):
            bn = nn.BatchNorm1d(lin.out_features, eps=norm.eps, momentum=norm.momentum)
            bn.load_state_dict(norm.state_dict())
            layers.append(bn)
        layers.append(nn.Sigmoid())
    out = nn.Linear(m.readout.in_features, m.readout.out_features)
    out.load_state_dict(m.readout.state_dict())
    return nn.Sequential(*layers, out)


def tutorial_losses(model: nn.Module, ds: data.Dataset, seed: int, steps: int, lr: float) -> np.ndarray:
    """A plain training loop over the engine's batch order for ``seed``: the loss of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, order = [], torch.empty(0, 60, dtype=torch.long)
    for step in range(steps):
        if step % len(order) == 0 if len(order) else True:
            order = train.epoch_batches(gen, len(ds.y_train), 60)
        idx = order[step % len(order)]
        loss = nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


@pytest.mark.parametrize("norm", ["bn", None])
def test_engine_matches_plain_sequential_loop(mnist, norm):
    seeds = [3, 4, 5]
    models = [nets.MLP(784, norm=norm, init_std=0.1, seed=s) for s in seeds]
    reference = sequential_copy(models[1])
    cfg = train.FitConfig(steps=80, lr=0.5, log_every=1)
    res = train.fit(models, mnist, cfg, seeds=seeds)
    assert res.stacked
    expected = tutorial_losses(reference, mnist, seed=4, steps=80, lr=0.5)
    np.testing.assert_allclose(res.train_loss[1:, 1], expected, rtol=2e-4, atol=2e-5)
    # the trained parameters were written back into the MLP objects
    ref_params = dict(reference.named_parameters())
    np.testing.assert_allclose(models[1].readout.weight.detach(), ref_params[f"{len(reference) - 1}.weight"].detach(), atol=1e-4)
    if norm == "bn":
        np.testing.assert_allclose(models[1].norms[2].running_var, reference[8].running_var, rtol=1e-4)


def test_stacked_and_loop_paths_agree(mnist):
    kw = dict(norm="bn", seed=None)
    models_a = [nets.MLP(784, **{**kw, "seed": s}) for s in (0, 1)]
    models_b = [nets.MLP(784, **{**kw, "seed": s}) for s in (0, 1)]
    probe = {"p": train.activation_percentiles()}
    a = train.fit(models_a, mnist, train.FitConfig(steps=40, log_every=20, lr=0.3), probes=probe)
    b = train.fit(models_b, mnist, train.FitConfig(steps=40, log_every=20, lr=0.3, stack=False), probes=probe)
    assert a.stacked and not b.stacked
    np.testing.assert_allclose(a.test_acc, b.test_acc, atol=2e-3)
    np.testing.assert_allclose(a.test_loss, b.test_loss, rtol=1e-4)
    np.testing.assert_allclose(a.probes["p"], b.probes["p"], rtol=1e-3, atol=1e-4)


def test_fit_is_deterministic(mnist):
    def once():
        models = [nets.MLP(784, norm="bn", init_std=0.05, seed=s) for s in (7, 8)]
        return train.fit(models, mnist, train.FitConfig(steps=50, log_every=25), seeds=(7, 8),
                         probes={"p": train.activation_percentiles()})

    a, b = once(), once()
    for field in ("train_loss", "test_loss", "test_acc"):
        assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=True)
    assert np.array_equal(a.probes["p"], b.probes["p"])


def test_divergence_is_recorded_not_raised(mnist):
    models = [nets.MLP(784, seed=s) for s in (0, 1, 2)]
    with torch.no_grad():
        models[1].readout.weight[0, 0] = float("inf")  # seed 11 is broken from the start
    res = train.fit(models, mnist, train.FitConfig(steps=30, log_every=10), seeds=(10, 11, 12))
    assert res.divergences() == [(11, 1)]
    assert list(res.diverged_step) == [-1, 1, -1]
    assert np.isnan(res.test_acc[1:, 1]).all() and np.isfinite(res.test_acc[:, [0, 2]]).all()


def test_all_diverged_stops_early(mnist):
    models = [nets.MLP(784, activation="relu", seed=0)]
    res = train.fit(models, mnist, train.FitConfig(steps=400, lr=1e6, log_every=50))
    assert res.diverged_step[0] > 0
    assert np.isnan(res.test_acc[-1]).all()


def test_probe_is_the_percentile_of_the_sigmoid_input(mnist):
    model = nets.MLP(784, init_std=0.1, seed=0)
    res = train.fit([model], mnist, train.FitConfig(steps=1, log_every=1, probe_size=500),
                    probes={"p": train.activation_percentiles(layer=-1, unit=3)})
    z = model.pre_activations(mnist.x_test[:500])[-1][:, 3]
    expected = torch.quantile(z, torch.tensor([0.15, 0.5, 0.85]))
    np.testing.assert_allclose(res.probes["p"][-1, 0], expected.detach(), rtol=1e-5, atol=1e-6)


def test_stack_round_trip_and_bn_semantics():
    torch.manual_seed(0)
    models = [nets.MLP(20, (8, 8), 3, norm="bn", seed=s) for s in range(3)]
    stack = nets.StackedMLP.from_models(models)
    x = torch.randn(3, 16, 20)
    stack.train()
    out = stack(x)  # one training step's forward also updates the running averages
    for k, m in enumerate(models):
        m.train()
        torch.testing.assert_close(out[k], m(x[k]), rtol=1e-5, atol=1e-6)
    fresh = [nets.MLP(20, (8, 8), 3, norm="bn", seed=9) for _ in range(3)]
    stack.write_back(fresh)
    for m, f in zip(models, fresh):
        for (name, a), (_, b) in zip(m.state_dict().items(), f.state_dict().items()):
            torch.testing.assert_close(a, b, msg=name)
    stack.eval()
    for k, m in enumerate(models):
        m.eval()
        torch.testing.assert_close(stack(x)[k], m(x[k]), rtol=1e-5, atol=1e-6)


def test_norm_specs_and_stacking_rules():
    assert nets.stack_signature(nets.MLP(4, (3,), norm="torch-bn")) == nets.stack_signature(nets.MLP(4, (3,), norm="bn"))
    eps3 = functools.partial(norms.BatchNorm, eps=1e-3)
    assert nets.stack_signature(nets.MLP(4, (3,), norm=eps3)) != nets.stack_signature(nets.MLP(4, (3,), norm="bn"))
    assert nets.stack_signature(nets.MLP(4, (3,), norm=nn.LayerNorm)) is None  # runs on the generic path
    assert isinstance(train.build_stack([nets.MLP(4, (3,), norm=nn.LayerNorm)]), nets.ModuleStack)
    with pytest.raises(BnbookError, match="unknown norm"):
        nets.MLP(4, (3,), norm="batchnorm")
    with pytest.raises(BnbookError, match="unknown activation"):
        nets.MLP(4, (3,), activation="swish")


def test_mlp_init_and_bias_rules():
    m = nets.MLP(784, norm="bn", init_std=0.05, seed=1)
    assert all(lin.bias is None for lin in m.linears) and m.readout.bias is not None
    assert abs(float(m.linears[0].weight.detach().std()) - 0.05) < 0.002
    plain = nets.MLP(784, init_std=0.05, seed=1)
    assert all(float(lin.bias.detach().abs().max()) == 0 for lin in plain.linears)
    torch.testing.assert_close(plain.linears[0].weight, m.linears[0].weight)  # the seed decides the init
    assert not torch.equal(nets.MLP(784, seed=2).linears[0].weight, nets.MLP(784, seed=1).linears[0].weight)


def test_bad_input_is_named(mnist):
    with pytest.raises(BnbookError, match="optimizer"):
        train.FitConfig(optimizer="lbfgs")
    with pytest.raises(BnbookError, match="steps"):
        train.FitConfig(steps=0)
    with pytest.raises(BnbookError, match="seeds"):
        train.fit([nets.MLP(784)], mnist, train.FitConfig(steps=1), seeds=[1, 2])
    with pytest.raises(BnbookError, match="batch_size"):
        train.fit([nets.MLP(784)], mnist, train.FitConfig(steps=1, batch_size=10**6))


@pytest.mark.parametrize("norm", ["bn", None])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_hand_written_backward_equals_autograd(norm, activation):
    models = [nets.MLP(12, (7, 5), 4, activation, norm=norm, seed=s).double() for s in range(3)]
    auto, manual = nets.StackedMLP.from_models(models), nets.StackedMLP.from_models(models)
    x = torch.randn(3, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (3, 9), generator=torch.Generator().manual_seed(1))
    loss_auto = train.per_model_loss(auto(x), y)
    loss_auto.sum().backward()
    loss_manual = manual.loss_and_grad(x, y)
    torch.testing.assert_close(loss_manual, loss_auto.detach(), rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(auto.named_parameters(), manual.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, a), b in zip(auto.named_buffers(), manual.buffers()):
        torch.testing.assert_close(b, a, msg=name)  # running averages updated alike


def test_manual_and_autograd_paths_of_fit_agree(mnist):
    runs = []
    for manual in (True, False):
        models = [nets.MLP(784, norm="bn", init_std=0.05, seed=s) for s in (0, 1)]
        runs.append(train.fit(models, mnist, train.FitConfig(steps=30, log_every=10, manual_backward=manual)))
    np.testing.assert_allclose(runs[0].train_loss[1:], runs[1].train_loss[1:], rtol=1e-5)


def test_probing_never_touches_running_statistics():
    models = [nets.MLP(6, (5,), 2, norm="bn", seed=s) for s in range(2)]
    x = torch.randn(2, 8, 6)
    for stack in (nets.StackedMLP.from_models(models), nets.ModuleStack(models)):
        stack.train()
        before = [b.clone() for b in stack.buffers()]
        for batch_stats in (True, False):
            stack.pre_activations(x, batch_stats=batch_stats)
        assert all(torch.equal(a, b) for a, b in zip(before, stack.buffers()))
        assert stack.training


# ---------------------------------------------------------------- chapter 3's experiment
def test_roc_per_class_extremes():
    from bnbook.experiments import ioffe

    labels = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[labels]
    grid = np.linspace(0, 1, 11)
    tpr, auc = ioffe.roc_per_class(perfect, labels, grid)
    np.testing.assert_allclose(auc, 1.0)
    assert (tpr[:, 1:] == 1).all()
    _, auc_rev = ioffe.roc_per_class(1 - perfect, labels, grid)
    np.testing.assert_allclose(auc_rev, 0.0)
    _, auc_nan = ioffe.roc_per_class(np.full((6, 3), np.nan), labels, grid)
    assert np.isnan(auc_nan).all()  # a diverged model has no ROC curve


def test_first_step_and_reference_rows():
    from bnbook.experiments import ioffe

    steps = np.array([0, 10_000, 20_000])
    acc = np.array([[0.1, 0.1], [0.95, 0.5], [0.97, 0.96]])
    assert ioffe._first_step(steps, acc, 0.96) == [20_000, 20_000]
    assert ioffe._first_step(steps, acc, 0.9) == [10_000, 20_000]
    assert ioffe._first_step(steps, acc, 0.99) == [None, None]
    fits = {v: train.FitResult(steps, acc, acc, acc, {}, np.array([-1, -1]), [0, 1], 1.0, 0.1, True, "cpu")
            for v in ioffe.VARIANTS}
    rows = ioffe.comparison_rows(steps, fits)
    assert [r["step"] for r in rows] == [10_000, 20_000]  # only the paper's steps this run reached
    assert rows[0]["paper_bn"] == 0.966 and rows[0]["ours_bn"] == pytest.approx(0.725)


def test_ioffe_smoke_result_has_what_the_chapter_reads():
    from bnbook import results
    from bnbook.experiments import ioffe

    cfg = ioffe.IoffeConfig.from_params("smoke", device="cpu")
    res = results.cached("03-ioffe-mnist", cfg, ioffe.run)
    m, a = res.metrics, res.arrays
    n_log = len(a["steps"])
    assert a["acc_bn"].shape == (n_log, cfg.seeds) and a["pct_no_bn"].shape == (n_log, cfg.seeds, 3)
    assert a["auc_bn"].shape == (cfg.seeds, 10) and a["roc_tpr_bn"].shape[:2] == (cfg.seeds, 10)
    for v in ioffe.VARIANTS:
        for key in ("acc_final", "train_time_s", "model_steps_per_s", "auc_macro", "median_range", "pct_start"):
            assert f"{key}_{v}" in m
    assert m["steps"] == cfg.steps and res.record["datasets"] == ["mnist5k"]
    assert len(ioffe.open_choices(res.config)) >= 5 and len(ioffe.percentile_rows(m)) == 4
    # BN's percentiles at step 0 are those of a standardised unit: close to ∓1.04 and 0
    np.testing.assert_allclose(a["pct_bn"][0, :, 1], 0, atol=0.15)


def test_log_steps():
    assert train.FitConfig(steps=250, log_every=100).log_steps().tolist() == [0, 100, 200, 250]
    assert train.FitConfig(steps=250, log_every=100, log_at=(5, 100)).log_steps().tolist() == [0, 5, 100, 200, 250]
    with pytest.raises(BnbookError, match="log_at"):
        train.FitConfig(steps=10, log_at=(11,))
