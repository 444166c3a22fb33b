"""Landscape probes (chapter 7): exact answers on a quadratic, Theorem 4.1 inside a net, no trace left."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bnbook import landscape, norms


# ------------------------------------------------------------------------- a quadratic
class Quadratic(nn.Module):
    """Outputs its parameters (a 2×3 matrix and a 4-vector, 10 numbers); the loss makes ``L(w) = ½ wᵀHw − bᵀw``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(w[:6].view(2, 3).clone())
        self.v = nn.Parameter(w[6:].clone())
        self.frozen = nn.Parameter(torch.ones(3, dtype=w.dtype), requires_grad=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1  # a buffer written on every forward, as BN's running statistics are
        return torch.cat([self.A.flatten(), self.v]) + 0 * self.frozen.sum()


def quadratic_problem(seed: int = 0, n: int = 10):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(0.5, 7.0, n, dtype=torch.float64)
    H = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss(out: Tensor, _y: Tensor) -> Tensor:
        return 0.5 * out @ H @ out - b @ out

    return Quadratic(w), H, b, w, loss, q, eig


DUMMY = torch.zeros(1, dtype=torch.float64)
ETAS = (0.01, 0.05, 0.1, 0.3)


def test_line_probe_along_gradient_is_exact_on_a_quadratic():
    model, H, b, w, loss, _, _ = quadratic_problem()
    (p,) = landscape.line_probe(model, DUMMY, DUMMY, ETAS, loss=loss)
    g = H @ w - b
    L0 = 0.5 * w @ H @ w - b @ w
    eta = torch.tensor(ETAS, dtype=torch.float64)
    # L(w − ηg) = L(w) − η‖g‖² + ½η² gᵀHg;  ∇L(w) − ∇L(w − ηg) = ηHg
    expected_loss = L0 - eta * (g @ g) + 0.5 * eta**2 * (g @ H @ g)
    torch.testing.assert_close(p.loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.grad_change, eta * torch.linalg.norm(H @ g), rtol=1e-12, atol=0)
    beta = torch.linalg.norm(H @ g) / torch.linalg.norm(g)
    torch.testing.assert_close(p.beta, beta.expand(len(ETAS)), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.loss0, L0)
    torch.testing.assert_close(p.grad_norm, torch.linalg.norm(g))
    m = landscape.fig4_measures(p.loss, p.grad_change, p.beta)
    assert float(m["loss_min"]) == pytest.approx(float(expected_loss.min()), rel=1e-12)
    assert float(m["loss_max"]) == pytest.approx(float(expected_loss.max()), rel=1e-12)
    assert float(m["change_min"]) == pytest.approx(ETAS[0] * float(torch.linalg.norm(H @ g)), rel=1e-12)
    assert float(m["change_max"]) == pytest.approx(ETAS[-1] * float(torch.linalg.norm(H @ g)), rel=1e-12)
    assert float(m["beta"]) == pytest.approx(float(beta), rel=1e-12)
    # β along g lies between the extreme curvatures, and the gradient is no eigenvector here
    assert 0.5 < float(beta) < 7.0


def test_effective_beta_along_an_eigenvector_is_its_eigenvalue():
    model, H, b, w, loss, q, eig = quadratic_problem(seed=1)
    for i in (0, 4, 9):
        e = q[:, i]
        direction = [e[:6].view(2, 3), e[6:]]
        (p,) = landscape.line_probe(model, DUMMY, DUMMY, ETAS, loss=loss, directions=[direction])
        torch.testing.assert_close(p.beta, eig[i].expand(len(ETAS)), rtol=1e-10, atol=0)
        torch.testing.assert_close(p.grad_change, torch.tensor(ETAS, dtype=torch.float64) * eig[i], rtol=1e-10, atol=0)


def test_random_direction_has_the_gradient_length_and_exact_answers():
    model, H, b, w, loss, _, _ = quadratic_problem(seed=2)
    grad, rand = landscape.line_probe(model, DUMMY, DUMMY, ETAS, loss=loss, directions=("gradient", "random"), seed=5)
    g = H @ w - b
    torch.testing.assert_close(rand.dir_norm, torch.linalg.norm(g), rtol=1e-12, atol=0)
    # the same direction again, from the documented generator
    d = landscape.random_direction([torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)], torch.linalg.norm(g), 5 + 7919)
    d = torch.cat([d[0].flatten(), d[1]])
    eta = torch.tensor(ETAS, dtype=torch.float64)
    torch.testing.assert_close(rand.grad_change, eta * torch.linalg.norm(H @ d), rtol=1e-12, atol=0)
    torch.testing.assert_close(rand.beta, (torch.linalg.norm(H @ d) / torch.linalg.norm(d)).expand(4), rtol=1e-12, atol=0)
    L0 = 0.5 * w @ H @ w - b @ w
    torch.testing.assert_close(rand.loss, L0 - eta * (g @ d) + 0.5 * eta**2 * (d @ H @ d), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(rand.beta, grad.beta)  # a different direction sees a different curvature


def test_probes_use_only_trainable_parameters_and_leave_the_quadratic_untouched():
    model, *_ , loss, _, _ = quadratic_problem(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    landscape.line_probe(model, DUMMY, DUMMY, ETAS, loss=loss, directions=("gradient", "random"))
    f = landscape.Objective(model, DUMMY, DUMMY, loss)
    assert f.names == ["A", "v"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the 'calls' buffer too: probes run on copies


def test_fig4_measures_on_arrays():
    loss = torch.tensor([[3.0, 1.0, 2.0], [float("nan"), 1.0, 1.0]])
    change = torch.tensor([[0.1, 0.5, 0.2], [1.0, 2.0, 3.0]])
    beta = torch.tensor([[4.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    m = landscape.fig4_measures(loss, change, beta)
    assert m["loss_min"][0] == 1.0 and m["loss_max"][0] == 3.0
    assert math.isnan(float(m["loss_min"][1]))  # a diverged model stays NaN
    assert m["change_min"].tolist() == pytest.approx([0.1, 1.0]) and m["change_max"].tolist() == pytest.approx([0.5, 3.0])
    assert m["beta"].tolist() == [5.0, 1.0]


def test_bad_requests_fail_clearly():
    model, *_ , loss, _, _ = quadratic_problem()
    with pytest.raises(landscape.LandscapeError, match="positive"):
        landscape.line_probe(model, DUMMY, DUMMY, (0.0, 1.0), loss=loss)
    with pytest.raises(landscape.LandscapeError, match="unknown direction"):
        landscape.line_probe(model, DUMMY, DUMMY, (1.0,), loss=loss, directions=("sideways",))
    with pytest.raises(landscape.LandscapeError, match="unknown loss"):
        landscape.batch_loss("hinge")
    with pytest.raises(landscape.LandscapeError, match="no BN layer"):
        landscape.bn_layer_terms(model, DUMMY, DUMMY, loss)


# ------------------------------------------------------------------ a small BN network
class TinyNet(nn.Module):
    """conv → BN (ours) → ReLU(inplace) → conv → torch BN → ReLU → linear, with ``features``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.n1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), norms.BatchNorm(4)
        self.c2, self.n2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            self.n1.weight.uniform_(0.5, 2.0)
            self.n2.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor, features: bool = False):
        a1 = self.n1(self.c1(x))
        h = self.act(a1.clone()) if features else self.act(a1)
        a2 = self.n2(self.c2(h))
        h = self.act(a2.clone()) if features else self.act(a2)
        out = self.head(h.mean(dim=(2, 3)))
        return (out, [a1, a2]) if features else out


def _tiny_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def test_every_probe_leaves_parameters_buffers_grads_mode_and_rng_untouched():
    net = TinyNet()
    x, y = _tiny_batch()
    net.train()
    net(x)  # running statistics away from their initial values
    net.eval()
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    landscape.line_probe(net, x, y, (0.05, 0.2), directions=("gradient", "random"))
    landscape.bn_layer_terms(net, x, y)
    landscape.layer_gradient_norms(net, x, y)
    landscape.activation_moments(net, x)
    landscape.activation_sample(net, x, layer=1, size=20)
    landscape.surface_2d(net, x, y, (-0.5, 0.0, 0.5), (-0.5, 0.5))
    assert not net.training
    assert all(not m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)


def test_line_probe_loss_at_zero_step_matches_a_training_mode_forward():
    net = TinyNet()
    x, y = _tiny_batch()
    (p,) = landscape.line_probe(net, x, y, (1e-3,))
    net.train()
    direct = nn.functional.cross_entropy(net(x), y)
    assert float(p.loss0) == pytest.approx(float(direct.detach()), rel=1e-6)
    # a tiny step changes the loss by about η‖g‖² (first order)
    assert float(p.loss0 - p.loss[0]) == pytest.approx(1e-3 * float(p.grad_norm) ** 2, rel=0.05)


def test_bn_layer_terms_satisfy_theorem41_inside_a_conv_net():
    net = TinyNet()
    x, y = _tiny_batch()
    terms = landscape.bn_layer_terms(net, x, y)
    assert len(terms) == 2 and terms[0]["scale"].shape == (4,) and terms[1]["scale"].shape == (5,)
    for layer, bn in zip(terms, (net.n1, net.n2)):
        # ‖∇_y L̂‖² by autograd equals chapter 4's corrected right side (with ε), channel by channel
        torch.testing.assert_close(layer["grad_sq_bn"], layer["rhs"], rtol=1e-4, atol=1e-10)
        expected_scale = bn.weight.detach().double() ** 2 / (layer["sigma"] ** 2 + bn.eps)
        torch.testing.assert_close(layer["scale"], expected_scale, rtol=1e-6, atol=0)
    # σ is the spread of the conv output over batch and positions
    with torch.no_grad():
        y1 = net.c1(x)
    torch.testing.assert_close(terms[0]["sigma"], y1.double().transpose(0, 1).reshape(4, -1).std(1, correction=0), rtol=1e-6, atol=0)


def test_layer_gradient_norms_match_autograd_on_features():
    net = TinyNet()
    x, y = _tiny_batch()
    norms_sq = landscape.layer_gradient_norms(net, x, y)
    net.train()
    out, feats = net(x, features=True)
    grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), feats)
    torch.testing.assert_close(norms_sq, torch.stack([g.double().pow(2).sum() for g in grads]), rtol=1e-6, atol=0)


def test_activation_moments_are_batch_statistics_of_the_features():
    net = TinyNet()
    x, _ = _tiny_batch()
    (m1, v1), (m2, v2) = landscape.activation_moments(net, x)
    # after BN in training mode each channel has mean β and variance γ² σ²/(σ² + ε) ≈ γ²
    torch.testing.assert_close(m1, net.n1.bias.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(v1, net.n1.weight.detach() ** 2, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(m2, net.n2.bias.detach(), atol=1e-5, rtol=0)


def test_filter_normalised_direction_and_surface():
    net = TinyNet()
    x, y = _tiny_batch()
    d = landscape.filter_normalized_direction(net, seed=3)
    for p, t in zip(net.parameters(), d):
        if p.dim() < 2:
            assert torch.count_nonzero(t) == 0  # biases and BN's γ, β are not moved
        else:
            torch.testing.assert_close(t.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    assert not torch.equal(d[0], landscape.filter_normalized_direction(net, seed=4)[0])
    grid = landscape.surface_2d(net, x, y, (-1.0, 0.0, 1.0), (0.0, 0.5), seed=3)
    assert grid.shape == (3, 2)
    (p,) = landscape.line_probe(net, x, y, (1.0,))
    assert float(grid[1, 0]) == pytest.approx(float(p.loss0), rel=1e-6)  # the centre is the model itself
    # the surface is L(w + α δ + β η) with the documented directions
    d2 = landscape.filter_normalized_direction(net, seed=4)
    (q,) = landscape.line_probe(net, x, y, (1.0,), directions=[[-a - 0.5 * b for a, b in zip(d, d2)]])
    assert float(grid[2, 1]) == pytest.approx(float(q.loss[0]), rel=1e-5)


def test_log_grid():
    g = landscape.log_grid(0.01, 30.0, 5)
    assert g[0] == pytest.approx(0.01) and g[-1] == pytest.approx(30.0)
    assert g[2] / g[1] == pytest.approx(g[1] / g[0])
    with pytest.raises(landscape.LandscapeError):
        landscape.log_grid(0.0, 1.0, 3)


@pytest.mark.parametrize("name", ["cross_entropy", "squared_mean", "squared_sum"])
def test_batch_losses_are_the_engines_training_losses(name):
    from bnbook import train

    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(7, 5, generator=gen)
    y = torch.randint(0, 4, (7,), generator=gen) if name == "cross_entropy" else torch.randn(7, 4, generator=gen)
    ours = landscape.batch_loss(name)(model(x), y)
    assert float(ours.detach()) == pytest.approx(float(train.model_loss(model, x, y, loss=name).detach()), rel=1e-6)


def test_activation_summary_agrees_with_moments_and_quantiles():
    net = TinyNet()
    x, _ = _tiny_batch()
    moments = landscape.activation_moments(net, x)
    summary = landscape.activation_summary(net, x, [1, 0], (10, 50, 90))
    for (mu, var, q), layer in zip(summary, (1, 0)):
        torch.testing.assert_close(mu, moments[layer][0])
        torch.testing.assert_close(var, moments[layer][1])
        net.train()
        with torch.no_grad():
            values = net(x, features=True)[1][layer].flatten()
        torch.testing.assert_close(q, torch.quantile(values, torch.tensor([0.1, 0.5, 0.9])))


# ------------------------------------------------------------------ the chapter's experiment
def test_dln_dataset_is_a_linear_map_fixed_by_its_seed():
    from bnbook.experiments import landscape as ch

    ds = ch.dln_dataset(50, 4, seed=3)
    A = torch.linalg.lstsq(ds.x_train, ds.y_train).solution.T
    torch.testing.assert_close(ds.x_test @ A.T, ds.y_test, rtol=1e-4, atol=1e-4)  # one A for both splits
    assert torch.equal(ds.x_train, ch.dln_dataset(50, 4, seed=3).x_train)
    assert not torch.equal(ds.x_train, ch.dln_dataset(50, 4, seed=4).x_train)


def test_landscape_hook_records_the_documented_shapes_and_leaves_training_unchanged():
    from bnbook import nets, train
    from bnbook.experiments import landscape as ch

    ds = ch.dln_dataset(64, 4, seed=0)
    cfg = train.FitConfig(steps=4, batch_size=64, lr=1e-3, loss="squared_sum", log_every=2)

    def models():
        return [nets.DeepLinear(dim=4, depth=3, norm="bn", seed=k) for k in range(2)]

    hook = ch.landscape_hook((0.1, 1.0, 10.0), "squared_sum", ("gradient", "random"), bn_terms=True, seed=0)
    with_hook = train.fit(models(), ds, cfg, hooks={"land": train.StepHook(hook, every=2, at=(1,))})
    without = train.fit(models(), ds, cfg)
    np.testing.assert_array_equal(with_hook.train_loss, without.train_loss)  # probing changes nothing
    h = with_hook.hooks["land"]
    assert h["steps"].tolist() == [0, 1, 2]
    v = h["values"]
    assert v["loss"].shape == (3, 2, 2, 3) and v["beta"].shape == (3, 2, 2, 3)
    assert v["layer_grad"].shape == (3, 2, 3)  # every block's output, the read-out included
    assert v["t41_scale_med"].shape == (3, 2, 2)  # a BN layer after each of the first depth − 1 layers
    assert float(np.max(v["t41_res"])) < 1e-4  # Theorem 4.1's identity inside the net
    m = ch.landscape.fig4_measures(torch.as_tensor(v["loss"][..., 0, :]), torch.as_tensor(v["change"][..., 0, :]),
                                   torch.as_tensor(v["beta"][..., 0, :]))
    assert bool((m["change_max"] >= m["change_min"]).all())


def test_config_rejects_what_the_chapter_cannot_compare():
    from bnbook.errors import BnbookError
    from bnbook.experiments import landscape as ch

    with pytest.raises(BnbookError, match="'none' and 'bn'"):
        ch.LandscapeConfig(variants=("bn", "l1"))
    with pytest.raises(BnbookError, match="probe_batch"):
        ch.LandscapeConfig(probe_batch="other")
    assert ch.LandscapeConfig.from_params("paper").dataset == "cifar10"
