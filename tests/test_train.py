"""bnbook.nets and bnbook.train: the stacked engine against a plain loop, determinism, divergence."""

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import batching, data, nets, norms, train
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
    b = train.fit(models_b, mnist, train.FitConfig(steps=40, log_every=20, lr=0.3, stack=False), probes=probe)  # vmap
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
    z = model(mnist.x_test[:500], features=True)[1][-1][:, 3]
    expected = torch.quantile(z, torch.tensor([0.15, 0.5, 0.85]))
    np.testing.assert_allclose(res.probes["p"][-1, 0], expected.detach(), rtol=1e-5, atol=1e-6)


def test_stacked_batch_binds_views_and_matches_the_models():
    torch.manual_seed(0)
    models = [nets.MLP(20, (8, 8), 3, norm="bn", seed=s) for s in range(3)]
    copies = [copy.deepcopy(m) for m in models]
    stack = batching.batch_models(models)
    assert isinstance(stack, batching.StackedMLP)
    x = torch.randn(3, 16, 20)
    stack.train()
    out = stack(x)  # one training step's forward also updates the running averages ...
    for k, c in enumerate(copies):
        c.train()
        torch.testing.assert_close(out[k], c(x[k]), rtol=1e-5, atol=1e-6)
        # ... which the models see at once: their tensors are views into the stack
        torch.testing.assert_close(models[k].norms[1].running_mean, c.norms[1].running_mean)
    stack.eval()
    for k, c in enumerate(copies):
        c.eval()
        torch.testing.assert_close(stack(x)[k], c(x[k]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stack(x)[k], models[k](x[k]), rtol=1e-5, atol=1e-6)
    stack.release(models)
    assert all(p.is_contiguous() for m in models for p in m.parameters())


def test_norm_specs_and_batching_rules():
    sig = batching.stack_signature
    assert sig(nets.MLP(4, (3,), norm="torch-bn")) == sig(nets.MLP(4, (3,), norm="bn"))
    eps3 = functools.partial(norms.BatchNorm, eps=1e-3)
    assert sig(nets.MLP(4, (3,), norm=eps3)) != sig(nets.MLP(4, (3,), norm="bn"))
    assert sig(nets.MLP(4, (3,), norm=nn.LayerNorm)) is None  # runs on the general path
    assert isinstance(batching.batch_models([nets.MLP(4, (3,), norm=nn.LayerNorm)] * 2), batching.VmapBatch)
    assert isinstance(batching.batch_models([nets.MLP(4, (3,))] * 2, fast=False), batching.VmapBatch)
    assert isinstance(batching.batch_models([nets.MLP(4, (3,))], fast=False), batching.SingleModel)
    assert isinstance(batching.batch_models([nets.SmallCNN()]), batching.SingleModel)
    assert sig(nets.MLP(4, (3,), norm="ws+bn")) is None  # the stacked path has no weight standardisation
    with pytest.raises(BnbookError, match="one architecture"):
        batching.batch_models([nets.MLP(4, (3,)), nets.MLP(4, (5,))])
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
    with pytest.raises(BnbookError, match="loss"):
        train.FitConfig(loss="hinge")
    with pytest.raises(BnbookError, match="augment"):
        train.FitConfig(augment="mixup")
    with pytest.raises(BnbookError, match="lr"):
        train.FitConfig(lr=float("inf"))
    with pytest.raises(BnbookError, match="seeds"):
        train.fit([nets.MLP(784)], mnist, train.FitConfig(steps=1), seeds=[1, 2])
    with pytest.raises(BnbookError, match="batch_size"):
        train.fit([nets.MLP(784)], mnist, train.FitConfig(steps=1, batch_size=10**6))
    with pytest.raises(BnbookError, match="augment"):
        train.fit([nets.MLP(784)], mnist, train.FitConfig(steps=1, augment="flip+translate4"))
    frozen = nets.MLP(784)
    frozen.requires_grad_(False)
    with pytest.raises(BnbookError, match="frozen"):
        train.fit([frozen], mnist, train.FitConfig(steps=1))
    half = [nets.MLP(784), nets.MLP(784)]
    half[1].readout.weight.requires_grad_(False)
    with pytest.raises(BnbookError, match="frozen in some models"):
        train.fit(half, mnist, train.FitConfig(steps=1))


@pytest.mark.parametrize("norm", ["bn", None])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_hand_written_backward_equals_autograd(norm, activation):
    def stack():
        return batching.StackedMLP([nets.MLP(12, (7, 5), 4, activation, norm=norm, seed=s).double() for s in range(3)])

    auto, manual = stack(), stack()
    x = torch.randn(3, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (3, 9), generator=torch.Generator().manual_seed(1))
    auto.train(), manual.train()
    logits = auto(x)
    loss_auto = train.per_model_loss(logits, y)
    loss_auto.sum().backward()
    loss_manual, correct = manual.loss_and_grad(x, y)
    torch.testing.assert_close(loss_manual, loss_auto.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(correct, (logits.argmax(-1) == y).sum(1))
    for (name, p), (_, q) in zip(auto.named_trainable(), manual.named_trainable()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for name, a in auto.stacked_buffers.items():
        torch.testing.assert_close(manual.stacked_buffers[name], a, msg=name)  # running averages updated alike


def test_stacked_mlp_under_bf16_autocast_and_its_hand_written_bf16_pass():
    """The stacked MLP trains under CPU autocast (its BN statistics and running averages stay fp32), and
    the hand-written pass with bf16 products gives autograd-under-autocast's loss and gradients."""

    def stack():
        return batching.StackedMLP([nets.MLP(40, (16, 16), 5, "sigmoid", norm="bn", seed=s) for s in range(3)])

    auto, manual, exact = stack(), stack(), stack()
    x = torch.randn(3, 12, 40, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = auto(x)
    assert logits.dtype == torch.bfloat16
    loss_auto = train.per_model_loss(logits.float(), y)
    loss_auto.sum().backward()
    loss_manual, _ = manual.loss_and_grad(x, y, low=torch.bfloat16)
    loss_exact, _ = exact.loss_and_grad(x, y)
    torch.testing.assert_close(loss_manual, loss_auto.detach(), rtol=2e-3, atol=2e-3)
    assert not torch.equal(loss_manual, loss_exact)  # the products really ran in bf16
    torch.testing.assert_close(loss_manual, loss_exact, rtol=2e-2, atol=2e-2)
    for (name, p), (_, q) in zip(auto.named_trainable(), manual.named_trainable()):
        assert q.grad.dtype == torch.float32
        torch.testing.assert_close(q.grad, p.grad, rtol=3e-2, atol=3e-3, msg=name)
    for name, a in auto.stacked_buffers.items():
        assert a.dtype == manual.stacked_buffers[name].dtype
        torch.testing.assert_close(manual.stacked_buffers[name], a, rtol=1e-2, atol=1e-3, msg=name)


def test_fit_trains_stacked_mlps_in_bf16(mnist):
    runs = {}
    for amp in (None, "bf16"):
        models = [nets.MLP(784, norm="bn", seed=s) for s in (0, 1)]
        runs[amp] = train.fit(models, mnist, train.FitConfig(steps=60, log_every=30, amp=amp))
        assert runs[amp].stacked
        assert all(b.dtype == torch.float32 for m in models for b in m.buffers() if b.is_floating_point())
    assert (runs["bf16"].test_acc[-1] > 0.5).all()
    np.testing.assert_allclose(runs["bf16"].test_acc[-1], runs[None].test_acc[-1], atol=0.05)


@pytest.mark.parametrize("norm", ["bn", None])
def test_deep_linear_batch_moments_give_the_direct_loss_gradients_and_running_averages(norm):
    """DeepLinearBatch's step from the batch's moments = autograd through the forward pass over the batch (float64)."""
    def make():
        return [nets.DeepLinear(4, 6, norm=norm, seed=s).double() for s in (0, 1, 2)]

    moment, direct = batching.batch_models(make()), batching.StackedMLP(make())
    assert type(moment) is batching.DeepLinearBatch and type(direct) is batching.StackedMLP
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 30, 4, generator=gen, dtype=torch.float64) * 2 + 1
    y = torch.randn(3, 30, 4, generator=gen, dtype=torch.float64) + x @ torch.randn(4, 4, generator=gen, dtype=torch.float64)
    for loss in ("squared_sum", "squared_mean"):
        for b in (moment, direct):
            for t in b.trainable():
                t.grad = None
        losses, correct = moment.loss_and_grad(x, y, loss)
        assert correct is None
        reference = train.reduce_batch(loss, train.example_losses(loss)(direct(x), y))
        reference.sum().backward()
        torch.testing.assert_close(losses, reference.detach(), rtol=1e-10, atol=1e-10)
        for (name, p), (_, q) in zip(direct.named_trainable(), moment.named_trainable()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=name)
    for name, a in direct.stacked_buffers.items():
        torch.testing.assert_close(moment.stacked_buffers[name], a, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(BnbookError, match="squared error"):
        moment.loss_and_grad(x, y, "cross_entropy")


@pytest.mark.parametrize("norm", ["bn", None])
def test_fit_trains_deep_linear_nets_from_moments_as_autograd_and_alone(norm):
    """fit's DLN path (moments) ends where the general path (vmap, a pass over the batch) ends, and
    models trained together end where each trained alone ends."""
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = x @ torch.randn(4, 4, dtype=torch.float64)
    ds = data.Dataset("toy", x, y, x, y, (), "toy regression")
    cfg = train.FitConfig(steps=15, batch_size=20, lr=2e-4, loss="squared_sum", log_every=5)
    runs = {}
    for name, stack, seeds in (("moments", True, (0, 1)), ("vmap", False, (0, 1)), ("alone", True, (1,))):
        models = [nets.DeepLinear(4, 5, norm=norm, seed=s).double() for s in seeds]
        runs[name] = (train.fit(models, ds, dataclasses.replace(cfg, stack=stack), seeds=seeds), models)
    assert runs["moments"][0].stacked and not runs["vmap"][0].stacked
    assert np.isfinite(runs["moments"][0].train_loss[1:]).all()
    assert (runs["moments"][0].train_loss[-1] < runs["moments"][0].train_loss[1]).all()
    np.testing.assert_allclose(runs["moments"][0].train_loss, runs["vmap"][0].train_loss, rtol=1e-6)  # recorded in float32
    np.testing.assert_allclose(runs["moments"][0].test_loss, runs["vmap"][0].test_loss, rtol=1e-6)
    for a, b in zip(runs["moments"][1], runs["vmap"][1]):
        for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=n)
    for (n, p), q in zip(runs["moments"][1][1].state_dict().items(), runs["alone"][1][0].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


def test_manual_and_autograd_paths_of_fit_agree(mnist):
    runs = []
    for manual in (True, False):
        models = [nets.MLP(784, norm="bn", init_std=0.05, seed=s) for s in (0, 1)]
        runs.append(train.fit(models, mnist, train.FitConfig(steps=30, log_every=10, manual_backward=manual)))
    np.testing.assert_allclose(runs[0].train_loss[1:], runs[1].train_loss[1:], rtol=1e-5)


# ---------------------------------------------------------------- the general (vmap) path
class TinyCNN(nn.Module):
    """Two conv → BN → ReLU blocks (ours and PyTorch's BN), a linear read-out; ``features`` as the book's nets."""

    def __init__(self, seed: int, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False)
        self.n1 = norms.BatchNorm(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.n2 = nn.BatchNorm2d(2 * width)
        self.out = nn.Linear(2 * width, 10)

    def forward(self, x, features=False):
        a = self.n1(self.c1(x))
        b = self.n2(self.c2(torch.relu(a)))
        logits = self.out(torch.relu(b).mean((2, 3)))
        return (logits, [a, b]) if features else logits


@pytest.fixture(scope="module")
def tiny64():
    ds = data.load("mnist5k").subset(256, 128)
    return dataclasses.replace(ds, x_train=ds.x_train.double(), x_test=ds.x_test.double())


HARD = train.FitConfig(steps=12, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3, log_every=4,
                       augment="flip+translate4", lr_milestones=(6,), eval_train=64)


def test_models_trained_together_equal_each_trained_alone(tiny64):
    together = [TinyCNN(s).double() for s in (0, 1, 2)]
    alone = [TinyCNN(1).double()]
    a = train.fit(together, tiny64, HARD, seeds=[0, 1, 2])
    b = train.fit(alone, tiny64, HARD, seeds=[1])
    assert not a.stacked
    for field in ("train_loss", "train_acc", "test_loss", "test_acc", "train_eval_loss"):
        np.testing.assert_allclose(getattr(a, field)[:, 1], getattr(b, field)[:, 0], rtol=1e-10, atol=1e-12)
    for name, t in together[1].state_dict().items():
        torch.testing.assert_close(t, alone[0].state_dict()[name], rtol=1e-10, atol=1e-12, msg=name)
    np.testing.assert_allclose(a.lr, [0.1, 0.1, 0.01, 0.01])


def test_freezing_is_honoured_on_every_path(tiny64, mnist):
    # open_lth's test style: after training, exactly the trainable tensors changed
    cnns = [TinyCNN(s).double() for s in (0, 1)]
    mlps = [nets.MLP(784, norm="bn", seed=s) for s in (0, 1)]
    for models, ds, cfg in ((cnns, tiny64, HARD), (mlps, mnist, train.FitConfig(steps=20, weight_decay=0.01, momentum=0.9))):
        for m in models:
            for name, p in m.named_parameters():
                p.requires_grad_("norm" in name or name.startswith("n"))  # BN's γ and β only
        before = [copy.deepcopy(m.state_dict()) for m in models]
        train.fit(models, ds, cfg)
        for m, b in zip(models, before):
            trainable = {n for n, p in m.named_parameters() if p.requires_grad}
            for name, t in m.state_dict().items():
                changed = not torch.equal(t, b[name])
                expected = name in trainable or "running" in name or "num_batches" in name
                assert changed == expected, name


def test_trainable_masks_freeze_single_entries(tiny64):
    models = [TinyCNN(s).double() for s in (0, 1)]
    masks = []
    for k, m in enumerate(models):
        mask = torch.rand(m.c2.weight.shape, generator=torch.Generator().manual_seed(k)) < 0.1
        train.set_trainable_mask(m.c2.weight, mask)
        masks.append(mask)
    before = [m.c2.weight.detach().clone() for m in models]
    train.fit(models, tiny64, HARD)
    for m, b, mask in zip(models, before, masks):
        w = m.c2.weight.detach()
        assert torch.equal(w[~mask], b[~mask])  # frozen entries: bit-identical, despite momentum and decay
        assert (w[mask] != b[mask]).all()


def test_no_side_effects_restores_everything():
    m = TinyCNN(0)
    m.eval()
    state = copy.deepcopy(m.state_dict())
    rng = torch.get_rng_state()
    with train.no_side_effects(m):
        m.train()
        with torch.no_grad():
            m.c1.weight.mul_(3)
        m(torch.randn(8, 1, 12, 12)).sum().backward()  # updates running statistics, sets .grad, draws
    assert not m.training and all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_hooks_see_the_batch_of_the_update_and_change_nothing(tiny64):
    seen = {}

    def before(ctx):
        seen[ctx.step] = (ctx.x.clone(), [copy.deepcopy(m.state_dict()) for m in ctx.models])
        for m in ctx.models:  # a careless measurement: trains on the batch, moves BN statistics
            m.train()
            train.model_loss(m, ctx.x[0], ctx.y[0]).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(1.0)
        return torch.stack([train.model_loss(m, ctx.x[k], ctx.y[k]) for k, m in enumerate(ctx.models)]).detach()

    def after(ctx):
        return {"w": torch.stack([m.c1.weight.detach().flatten()[0] for m in ctx.models])}

    hooked = [TinyCNN(s).double() for s in (0, 1)]
    plain = [TinyCNN(s).double() for s in (0, 1)]
    hooks = {"b": train.StepHook(before, every=5), "a": train.StepHook(after, at=(3, 12), when="after")}
    r = train.fit(hooked, tiny64, HARD, hooks=hooks)
    p = train.fit(plain, tiny64, HARD)
    np.testing.assert_array_equal(r.test_loss, p.test_loss)  # hooks left no trace
    assert r.hooks["b"]["steps"].tolist() == [0, 5, 10] and r.hooks["b"]["values"].shape == (3, 2)
    assert r.hooks["a"]["steps"].tolist() == [3, 12] and r.hooks["a"]["values"]["w"].shape == (2, 2)
    np.testing.assert_allclose(r.hooks["a"]["values"]["w"][-1], [m.c1.weight.flatten()[0].item() for m in hooked])
    # step 0's hook saw the initial weights and the first batch: re-create them from the seeds
    fresh = TinyCNN(1).double()
    assert all(torch.equal(t, seen[0][1][1][n]) for n, t in fresh.state_dict().items())
    gen = torch.Generator().manual_seed(1)
    idx = train.epoch_batches(gen, len(tiny64.y_train), 16)[0]
    flips = next(train.augment_stream([1], 16, torch.device("cpu")))[0]
    np.testing.assert_array_equal(seen[0][0][1], train.flip_translate(tiny64.x_train[idx], flips))


def test_flip_translate_moves_pixels_as_stated():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float64).view(2, 1, 5, 6)
    p = torch.tensor([[0, 0, 0], [1, 2, -1]])  # image 1: flipped, then shifted 2 px down and 1 px left
    out = train.flip_translate(x, p, shift=4)
    assert torch.equal(out[0], x[0])
    f = x[1, 0].flip(-1)
    expected = torch.zeros(5, 6, dtype=torch.float64)
    for r in range(5):
        for c in range(6):
            if 0 <= r - 2 < 5 and 0 <= c + 1 < 6:
                expected[r, c] = f[r - 2, c + 1]
    assert torch.equal(out[1, 0], expected)


def test_regression_loss_and_bf16_autocast(tiny64):
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    a = torch.randn(10, 10)
    ds = data.Dataset("toy", x, x @ a.T, x[:16], x[:16] @ a.T, (), "linear regression")
    models = [nn.Sequential(nn.Linear(10, 10, bias=False), nn.BatchNorm1d(10), nn.Linear(10, 10)) for _ in range(2)]
    cfg = train.FitConfig(steps=40, batch_size=64, lr=1e-2, loss="squared_mean", log_every=20)
    r = train.fit(models, ds, cfg)
    assert np.isnan(r.test_acc).all() and np.isnan(r.train_acc).all()
    assert (r.test_loss[-1] < r.test_loss[0]).all()
    ref = (models[0].eval()(ds.x_test) - ds.y_test).square().sum(-1).mean().item()
    assert r.test_loss[-1, 0] == pytest.approx(ref, rel=1e-5)
    cnns = [TinyCNN(s) for s in (0, 1)]
    ds32 = dataclasses.replace(tiny64, x_train=tiny64.x_train.float(), x_test=tiny64.x_test.float())
    r = train.fit(cnns, ds32, dataclasses.replace(HARD, amp="bf16", channels_last=True))
    assert np.isfinite(r.test_loss).all()
    assert all(b.dtype == torch.float32 for m in cnns for n, b in m.named_buffers() if "running" in n)


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
    fits = {v: train.FitResult(steps=steps, train_loss=acc, train_acc=acc, test_loss=acc, test_acc=acc,
                               train_eval_loss=acc, train_eval_acc=acc, lr=np.full(3, 0.1), probes={}, hooks={},
                               diverged_step=np.array([-1, -1]), seeds=[0, 1], train_time_s=1.0, eval_time_s=0.1,
                               stacked=True, device="cpu")
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


def test_compiled_forward_gives_the_same_numbers(mnist):
    ds = mnist.subset(256, 64)
    runs = []
    for compile_ in (False, True):
        models = [nets.MLP(784, (16,), norm="bn", seed=s) for s in (0, 1)]
        cfg = train.FitConfig(steps=5, batch_size=32, log_every=5, stack=False, compile=compile_)
        runs.append(train.fit(models, ds, cfg).test_loss)
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)


def test_noise_depends_on_the_seeds_only_and_the_callers_generator_is_left_alone(tiny64):
    """Noisy BN draws from the global generator: fit seeds it from the seeds, whatever ran before, and restores it."""
    cfg = dataclasses.replace(HARD, augment=None, eval_train=0)
    ds = dataclasses.replace(tiny64, x_train=tiny64.x_train.float(), x_test=tiny64.x_test.float())

    def run(seeds, before):
        torch.manual_seed(before)
        torch.rand(7)  # whatever the process did before
        models = [nets.SmallCNN(1, 10, widths=(4, 8), norm="noisy-bn", seed=0) for _ in seeds]
        state = torch.get_rng_state()
        res = train.fit(models, ds, cfg, seeds=seeds)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is where it was
        return res.train_loss

    np.testing.assert_array_equal(run([0, 1], before=1), run([0, 1], before=2))
    assert not np.array_equal(run([0, 1], before=1), run([2, 1], before=1))  # other seeds: other noise (and batches)
    assert train.global_seed([0, 1]) != train.global_seed([1, 0])
