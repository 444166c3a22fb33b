"""The two measures of internal covariate shift (bnbook.ics), on small nets built here."""

import copy
import types

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import ics
from bnbook.errors import BnbookError


def squared(out, y):
    """Per-sample squared error ‖f(x) − y‖² (the deep linear network's loss)."""
    return ((out - y) ** 2).sum(-1)


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


class Features(nn.Module):
    """A small net with the book's ``forward(x, features=False)`` contract; optional Gaussian noise after BN."""

    def __init__(self, noise: float = 0.0):
        super().__init__()
        self.l1, self.bn1 = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.l2, self.bn2 = nn.Linear(5, 4), nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)
        self.noise = noise

    def forward(self, x, features=False):
        feats = []
        h = x
        for lin, bn in ((self.l1, self.bn1), (self.l2, self.bn2)):
            z = bn(lin(h))
            if self.noise:
                z = z + self.noise * torch.randn_like(z)
            feats.append(z)
            h = torch.relu(z)
        out = self.out(h)
        return (out, feats) if features else out


def linear3(seed=0, d=4):
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(d, d, bias=False) for _ in range(3))).double()


# ---------------------------------------------------------------- Definition 2.1
def test_g_prime_matches_hand_computation_on_three_layer_linear_net():
    """G and G′ of each layer from the closed-form gradients of L = mean ‖W3 W2 W1 x − y‖²."""
    net = linear3()
    torch.manual_seed(1)
    b, lr = 7, 0.05
    X, Y = torch.randn(b, 4, dtype=torch.float64), torch.randn(b, 4, dtype=torch.float64)
    W1, W2, W3 = (m.weight.detach().clone() for m in net)
    Xt, Yt = X.T, Y.T  # columns are samples

    def grads(w1, w2, w3):
        r = w3 @ w2 @ w1 @ Xt - Yt  # residual (d, B)
        return (2 / b * (w3 @ w2).T @ r @ Xt.T, 2 / b * w3.T @ r @ (w1 @ Xt).T, 2 / b * r @ (w2 @ w1 @ Xt).T)

    G1, G2, G3 = grads(W1, W2, W3)
    W1n, W2n = W1 - lr * G1, W2 - lr * G2
    G1p = grads(W1, W2, W3)[0]  # nothing before layer 1 moves
    G2p = grads(W1n, W2, W3)[1]  # W1 has taken its step
    G3p = grads(W1n, W2n, W3)[2]  # W1 and W2 have taken theirs
    got = ics.gradient_change(net, X, Y, squared, lr, layers=[0, 1, 2])
    for i, (g, gp) in enumerate([(G1, G1p), (G2, G2p), (G3, G3p)]):
        assert got["l2"][i].item() == pytest.approx((g - gp).norm().item(), rel=1e-10, abs=1e-14)
        cos = ((g * gp).sum() / (g.norm() * gp.norm())).item()
        assert got["cos"][i].item() == pytest.approx(cos, rel=1e-10)
        assert got["g_norm"][i].item() == pytest.approx(g.norm().item(), rel=1e-10)
        assert got["g_prime_norm"][i].item() == pytest.approx(gp.norm().item(), rel=1e-10)
    assert got["l2"][0].item() == 0.0 and got["cos"][0].item() == pytest.approx(1.0)
    assert got["l2"][2] > 0  # the hand computation is not trivially zero


def test_g_prime_moves_earlier_biases_and_bn_parameters_but_not_the_layers_own():
    """Against an independent, mutating implementation: SGD-step the earlier layers of a deep copy, re-differentiate."""
    torch.manual_seed(0)
    net = Features().double()
    with torch.no_grad():  # non-trivial γ, β so that moving them matters
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    lr = 0.3
    groups = ics.layer_groups(net, x)
    assert groups == [["l1.weight", "l1.bias", "bn1.weight", "bn1.bias"], ["l2.weight", "l2.bias", "bn2.weight", "bn2.bias"],
                      ["out.weight", "out.bias"]]
    ref = copy.deepcopy(net)
    loss = ce(ref(x), y).mean()
    full = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))
    for i in (1, 2):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                if any(n in g for g in groups[:i]):
                    p -= lr * full[n]
        w = dict(moved.named_parameters())[groups[i][0]]
        g_prime = torch.autograd.grad(ce(moved(x), y).mean(), [w])[0]
        g = full[groups[i][0]]
        got = ics.gradient_change(net, x, y, ce, lr, layers=[i])
        assert got["l2"][0].item() == pytest.approx((g - g_prime).norm().item(), rel=1e-9)
        # moving only the weight of the earlier layer (not its bias, γ, β) gives a different answer
        partial = copy.deepcopy(net)
        with torch.no_grad():
            dict(partial.named_parameters())[groups[i - 1][0]].sub_(lr * full[groups[i - 1][0]])
        w = dict(partial.named_parameters())[groups[i][0]]
        g_partial = torch.autograd.grad(ce(partial(x), y).mean(), [w])[0]
        assert (g - g_partial).norm().item() != pytest.approx(got["l2"][0].item(), rel=1e-6)


def test_frozen_tensors_belong_to_no_layer_and_never_move():
    net = Features()
    net.bn1.weight.requires_grad_(False)
    net.l2.weight.requires_grad_(False)
    x = torch.randn(4, 6)
    groups = ics.layer_groups(net, x)
    assert groups == [["l1.weight", "l1.bias", "bn1.bias", "l2.bias", "bn2.weight", "bn2.bias"], ["out.weight", "out.bias"]]
    assert ics.layer_weights(net, x) == ["l1.weight", "out.weight"]
    with pytest.raises(BnbookError, match="no trainable weight"):
        ics.layer_groups(nn.Sequential(nn.BatchNorm1d(3)), torch.randn(4, 3))


class OutOfOrder(nn.Module):
    """Registers all its linears, then all its norms (as the book's VGG and DLN do), and uses them interleaved."""

    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(3), nn.BatchNorm1d(3)])
        self.readout = nn.Linear(3, 2)

    def forward(self, x):
        for lin, bn in zip(self.linears, self.norms):
            x = torch.relu(bn(lin(x)))
        return self.readout(x)


def test_layers_follow_the_forward_pass_not_the_registration_order():
    net = OutOfOrder()
    assert [n for n, _ in net.named_parameters()][:4] == ["linears.0.weight", "linears.0.bias", "linears.1.weight",
                                                          "linears.1.bias"]
    assert ics.layer_groups(net, torch.randn(5, 3)) == [
        ["linears.0.weight", "linears.0.bias", "norms.0.weight", "norms.0.bias"],
        ["linears.1.weight", "linears.1.bias", "norms.1.weight", "norms.1.bias"],
        ["readout.weight", "readout.bias"],
    ]


def test_measurements_have_no_side_effects():
    torch.manual_seed(0)
    net = Features(noise=0.5)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    ics.gradient_change(net, x, y, ce, 0.1, layers=[1, 2])
    ics.activation_stats(net, x, layers=[0, 1])
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # parameters and BN running averages untouched
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in net.parameters())


def test_every_pass_sees_the_same_noise():
    """With noise after BN, G′ of the first layer equals G only if both passes draw the same noise."""
    torch.manual_seed(0)
    net = Features(noise=1.0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    got = ics.gradient_change(net, x, y, ce, 0.1, layers=[0, 1])
    assert got["l2"][0].item() == 0.0
    assert got["l2"][1].item() > 0.0


def test_sum_reduction_is_the_mean_scaled_by_the_batch():
    """Training on the summed loss at lr is training on the mean at lr·B: same cos, ℓ2 scaled by B."""
    net = linear3(seed=3)
    torch.manual_seed(2)
    b = 9
    x, y = torch.randn(b, 4, dtype=torch.float64), torch.randn(b, 4, dtype=torch.float64)
    s = ics.gradient_change(net, x, y, squared, 0.01, layers=[1, 2], reduction="sum")
    m = ics.gradient_change(net, x, y, squared, 0.01 * b, layers=[1, 2], reduction="mean")
    torch.testing.assert_close(s["cos"], m["cos"])
    torch.testing.assert_close(s["l2"], b * m["l2"])
    assert ics.loss_reduction("squared_sum") == "sum" and ics.loss_reduction("cross_entropy") == "mean"
    with pytest.raises(BnbookError, match="reduction"):
        ics.reduce_loss(torch.ones(3), "max")


def test_bad_layer_index_is_refused():
    net = linear3()
    with pytest.raises(BnbookError, match="out of range"):
        ics.gradient_change(net, torch.randn(2, 4).double(), torch.randn(2, 4).double(), squared, 0.1, layers=[3])


def ctx(models, x, y, loss_fn, **cfg):
    config = types.SimpleNamespace(**{"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "loss": "cross_entropy",
                                      **cfg})
    return types.SimpleNamespace(step=1, x=x, y=y, models=models, lr=0.2, loss_fn=loss_fn, cfg=config)


def test_hooks_stack_the_per_model_measurements():
    torch.manual_seed(0)
    models = [Features(), Features()]
    x, y = torch.randn(2, 16, 6), torch.randint(0, 3, (2, 16))
    out = ics.gradient_change_hook([1, 2])(ctx(models, x, y, ce))
    assert out["l2"].shape == (2, 2) and out["cos"].shape == (2, 2)
    for k in range(2):
        torch.testing.assert_close(out["l2"][k], ics.gradient_change(models[k], x[k], y[k], ce, 0.2, [1, 2])["l2"])
    stats = ics.activation_stats_hook([0, 1], q=(0.5,))(ctx(models, x, y, ce))
    assert stats["q0"].shape == (2, 1) and stats["mean1"].shape == (2, 4) and stats["var0"].shape == (2, 5)
    with pytest.raises(BnbookError, match="plain SGD"):
        ics.gradient_change_hook([1])(ctx(models, x, y, ce, momentum=0.9))


# ---------------------------------------------------------------- activation statistics
def test_activation_stats_in_training_mode_use_the_batch_statistics():
    """Behind a fresh BN (γ = 1, β = 0) every channel has mean 0 and variance ≈ 1 on the batch itself."""
    torch.manual_seed(0)
    net = Features()
    x = 3 + 2 * torch.randn(64, 6)
    st = ics.activation_stats(net, x, layers=[0, 1], q=(0.0, 0.5, 1.0))
    torch.testing.assert_close(st["mean0"], torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(st["var1"], torch.ones(4), atol=1e-3, rtol=0)
    _, feats = net(x, features=True)
    assert st["q0"][0].item() == pytest.approx(feats[0].min().item())
    assert st["q0"][2].item() == pytest.approx(feats[0].max().item())
    with pytest.raises(BnbookError, match="out of range"):
        ics.activation_stats(net, x, layers=[2])


def test_channel_stats_and_quantiles_match_numpy():
    torch.manual_seed(0)
    f = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 1
    mean, var = ics.channel_stats(f)
    a = f.permute(1, 0, 2, 3).reshape(3, -1).numpy()
    np.testing.assert_allclose(mean.numpy(), a.mean(1), rtol=1e-5)
    np.testing.assert_allclose(var.numpy(), a.var(1), rtol=1e-5)  # biased, as BN normalises
    q = ics.value_quantiles(f, (0.1, 0.5, 0.9))
    np.testing.assert_allclose(q.numpy(), np.quantile(f.numpy(), [0.1, 0.5, 0.9]), rtol=1e-5)


def test_step_changes_average_absolute_channel_differences():
    before = {"mean0": np.array([[[0.0, 1.0]]]), "var0": np.array([[[1.0, 1.0]]])}
    after = {"mean0": np.array([[[0.5, 0.0]]]), "var0": np.array([[[1.0, 3.0]]])}
    d = ics.step_changes(before, after, [0])
    assert d["dmean0"].shape == (1, 1)
    assert d["dmean0"][0, 0] == pytest.approx(0.75) and d["dvar0"][0, 0] == pytest.approx(1.0)


def test_scaled_layer_keeps_the_relative_depth():
    assert [ics.scaled_layer(i, 13, 8) for i in (1, 3, 5, 10, 11, 13)] == [1, 2, 3, 6, 7, 8]
    assert ics.scaled_layer(9, 25, 25) == 9
    with pytest.raises(BnbookError):
        ics.scaled_layer(14, 13, 8)


# ---------------------------------------------------------------- the book's nets
def test_vgg_layers_are_its_convs_with_their_norms_then_the_readout():
    from bnbook import nets

    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    for norm, own in (("bn", ["weight", "bias"]), ("noisy-bn", ["bn.weight", "bn.bias"]), ("none", None)):
        vgg = nets.VGG(1, 10, widths=(4, "M", 4, "M", 8, "M", 8, "M", 8, "M"), norm=norm, seed=0)
        groups = ics.layer_groups(vgg, x)
        assert len(groups) == 6 and groups[-1] == ["readout.weight", "readout.bias"]
        for i, g in enumerate(groups[:-1]):
            expected = [f"convs.{i}.weight"] + ([f"norms.{i}.{n}" for n in own] if own else [f"convs.{i}.bias"])
            assert g == expected, norm


def test_dln_layers_are_its_matrices_in_the_order_they_act():
    from bnbook import nets

    for norm in (None, "bn"):
        dln = nets.DeepLinear(dim=3, depth=5, norm=norm, seed=0)
        weights = ics.layer_weights(dln, torch.randn(8, 3))
        by_name = dict(dln.named_parameters())
        assert [by_name[n] is w for n, w in zip(weights, dln.weights())] == [True] * 5


def test_noisy_bn_vgg_noise_is_in_the_features_in_training_only():
    """Our use of Algorithm 1: the recorded features include the noise (each channel shifted away from BN's
    mean β = 0 by up to n_μ ± r_μ and scaled by σ_t ∈ [1, n_σ] ± noise); evaluation mode is plain BN."""
    from bnbook import nets

    torch.manual_seed(0)
    x = torch.randn(64, 1, 32, 32)
    noisy = nets.VGG(1, 10, widths=(6, "M", 6, "M", 6, "M", 6, "M", 6, "M"), norm="noisy-bn", seed=0)
    clean = nets.VGG(1, 10, widths=(6, "M", 6, "M", 6, "M", 6, "M", 6, "M"), norm="bn", seed=0)
    st_noisy = ics.activation_stats(noisy, x, [0])
    st_clean = ics.activation_stats(clean, x, [0])
    torch.testing.assert_close(st_clean["mean0"], torch.zeros(6), atol=1e-5, rtol=0)
    assert st_noisy["mean0"].abs().max() > 0.01 and (st_noisy["mean0"].abs() <= 0.5 + 0.1 + 0.05).all()
    assert (st_noisy["var0"] >= 0.9).all() and (st_noisy["var0"] <= 1.25**2 + 0.2).all()
    noisy.eval(), clean.eval()
    torch.testing.assert_close(noisy(x), clean(x))
