"""Tests of bnbook.theory (chapter 4): Santurkar et al.'s Theorems 4.1, 4.2, 4.4 and Lemma 4.5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import nets, theory
from bnbook.errors import BnbookError
from bnbook.experiments import theorems

torch.set_num_threads(1)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------- BN pieces
def test_batch_standardize_matches_definition():
    y = torch.randn(10, 3, generator=_gen(0), dtype=F64) * 4 + 2
    y_hat, s = theory.batch_standardize(y)
    assert torch.allclose(s, y.std(dim=0, correction=0))
    assert torch.allclose(y_hat.mean(0), torch.zeros(3, dtype=F64), atol=1e-14)
    assert torch.allclose((y_hat**2).mean(0), torch.ones(3, dtype=F64))
    _, s_eps = theory.batch_standardize(y, eps=0.5)
    assert torch.allclose(s_eps**2, s**2 + 0.5)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_bn_input_gradient_is_fact_c1_and_the_projection(eps):
    inst = theory.random_instance(12, 4, "mlp", seed=3)
    y_hat, s = theory.batch_standardize(inst.y, eps)
    z = inst.gamma * y_hat + inst.beta
    g = torch.func.grad(inst.loss_of_z)(z)
    auto = torch.func.grad(lambda y: inst.loss_of_y(y, eps))(inst.y)
    ours = theory.bn_input_gradient(g, y_hat, inst.gamma, s)
    assert torch.allclose(ours, auto, rtol=1e-12, atol=1e-15)
    for j in range(4):  # the Jacobian is (γ/s) P
        P = theory.projection_matrix(y_hat[:, j])
        assert torch.allclose(inst.gamma[j] / s[j] * P @ g[:, j], auto[:, j], rtol=1e-12, atol=1e-15)
    if eps == 0:  # orthogonal to 1 and ŷ, and P is an orthogonal projection
        assert torch.allclose(ours.sum(0), torch.zeros(4, dtype=F64), atol=1e-14)
        assert torch.allclose((ours * y_hat).sum(0), torch.zeros(4, dtype=F64), atol=1e-13)
        P = theory.projection_matrix(y_hat[:, 0])
        assert torch.allclose(P @ P, P, atol=1e-13) and torch.allclose(P, P.T)


# ------------------------------------------------------------------------- Theorem 4.1
@pytest.mark.parametrize("m", [2, 3, 5, 16, 64, 200])
@pytest.mark.parametrize("kind", theory.INSTANCE_KINDS)
def test_corrected_theorem41_is_an_identity(m, kind):
    """‖∇_y L̂‖² = (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m) exactly (ε = 0), for many γ (some negative)."""
    for seed in range(3):
        r = theory.check_instance(theory.random_instance(m, 5, kind, seed=100 * m + seed))
        err = (r["grad_sq"] - r["rhs41_corrected"]).abs() / r["scale41"]
        assert float(err.max()) < 1e-12


@pytest.mark.parametrize("gamma", [0.1, 1.0, -2.5, 40.0])
def test_corrected_theorem41_for_fixed_gamma_and_eps(gamma):
    """With ε > 0 the exact coefficient of the ŷ term is (2 − ρ)/m, ρ = σ²/(σ²+ε)."""
    inst = theory.random_instance(32, 4, "cubic", seed=7, gamma=gamma)
    for eps in (0.0, 1e-5, 0.5, 10.0):
        r = theory.check_instance(inst, eps=eps)
        assert float(((r["grad_sq"] - r["rhs41_corrected"]).abs() / r["scale41"]).max()) < 1e-12


def test_printed_theorem41_fails_on_constructed_instance():
    """With g = ŷ, ‖∇_y L̂‖² = 0 but the printed right side is (γ²/σ²) m (1 − √m) < 0."""
    m, gamma = 9, 1.3
    y = torch.randn(m, 1, generator=_gen(1), dtype=F64) * 2 + 1
    y_hat, s = theory.batch_standardize(y)
    target = y_hat.clone()  # the loss L(z) = ⟨ŷ₀, z⟩ has gradient g = ŷ₀ = ŷ

    def loss_of_y(yv):
        yh, _ = theory.batch_standardize(yv)
        return (target * (gamma * yh + 0.3)).sum()

    grad = torch.func.grad(loss_of_y)(y)
    t41 = theory.theorem41(target, y_hat, gamma, s)
    lhs = float(grad.pow(2).sum())
    expected = gamma**2 / float(s[0]) ** 2 * m * (1 - math.sqrt(m))
    assert lhs < 1e-20
    assert float(t41.rhs_printed[0]) == pytest.approx(expected, rel=1e-12)
    assert float(t41.rhs_printed[0]) < -1.0 < lhs  # the printed "≤" fails
    assert abs(float(t41.rhs_corrected[0])) < 1e-12


def test_printed_theorem41_fails_whenever_g_has_a_yhat_component():
    cx = theorems.counterexample(seed=0)
    assert cx["cx_rhs_printed"] < cx["cx_lhs"]
    assert cx["cx_rel_err_corrected"] < 1e-12
    r = theory.check_instance(theory.random_instance(16, 8, "mlp", seed=11))
    assert bool((r["rhs41_printed"] < r["grad_sq"]).all())


# ------------------------------------------------------------------------- Theorem 4.2
def test_bn_second_derivative_against_finite_differences():
    """ŷ'' from the closed form agrees with a central second difference of the standardisation."""
    y = torch.randn(7, 3, generator=_gen(2), dtype=F64) * 3
    v = torch.randn(7, 3, generator=_gen(3), dtype=F64)
    for eps in (0.0, 0.4):
        y_hat, s = theory.batch_standardize(y, eps)
        h = 1e-4
        fd = (theory.batch_standardize(y + h * v, eps)[0] - 2 * y_hat + theory.batch_standardize(y - h * v, eps)[0]) / h**2
        assert torch.allclose(theory.bn_second_derivative(v, y_hat, s), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [3, 8, 33])
@pytest.mark.parametrize("kind", ["cubic", "mlp"])
def test_theorem42_first_form_is_an_identity_against_hvp(m, kind):
    """vᵀ∇²L̂v = (γ²/σ²) vᵀHv − (γ/(mσ²))⟨g,ŷ⟩‖v‖² with v = ∇L̂ (ε = 0), HVP by torch.func."""
    for seed in range(2):
        r = theory.check_instance(theory.random_instance(m, 4, kind, seed=seed))
        assert float(((r["curv"] - r["rhs42_first"]).abs() / r["scale42"]).max()) < 1e-10


def test_theorem42_against_double_backward():
    """The same identity with the HVP from torch.autograd (double backward), one unit at a time."""
    inst = theory.random_instance(10, 3, "mlp", seed=5)
    r = theory.check_instance(inst)
    y = inst.y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(inst.loss_of_y(y), y, create_graph=True)
    for j in range(3):
        v = torch.zeros_like(y)
        v[:, j] = grad[:, j].detach()
        (hv,) = torch.autograd.grad((grad * v).sum(), y, retain_graph=True)
        curv = float((hv * v).sum())
        assert curv == pytest.approx(float(r["curv"][j]), rel=1e-10)
        assert curv == pytest.approx(float(r["rhs42_first"][j]), rel=1e-9)


def test_theorem42_first_form_is_not_exact_with_eps_but_the_general_formula_is():
    inst = theory.random_instance(12, 4, "cubic", seed=9)
    r = theory.check_instance(inst, eps=2.0, direction_seed=1)
    assert float(((r["curv"] - r["rhs42_first"]).abs() / r["scale42"]).max()) > 1e-3
    assert float(((r["curv_dir"] - r["curv_dir_formula"]).abs() / r["scale_dir"]).max()) < 1e-10


def test_unitwise_quadratic_forms_match_the_hessian_blocks():
    Y = torch.randn(4, 3, generator=_gen(4), dtype=F64)
    D = torch.randn(4, 3, generator=_gen(5), dtype=F64)
    A = torch.randn(12, 12, generator=_gen(6), dtype=F64)

    def f(Yv):
        return torch.sin(Yv.reshape(-1) @ A).sum() + (Yv**4).sum()

    H = torch.autograd.functional.hessian(f, Y).reshape(4, 3, 4, 3)
    q = theory.unitwise_quadratic_forms(f, Y, D)
    for j in range(3):
        assert float(q[j]) == pytest.approx(float(D[:, j] @ H[:, j, :, j] @ D[:, j]), rel=1e-10)


# ------------------------------------------------------------------------- Theorem 4.4
@pytest.mark.parametrize("kind", theory.INSTANCE_KINDS)
def test_theorem44_corrected_holds_and_printed_fails(kind):
    for seed in range(3):
        for loss_scale in (1.0, 0.01):
            r = theory.check_theorem44(16, 40, 5, kind, seed, lam=3.0, loss_scale=loss_scale)
            assert torch.allclose(r["lhs"], r["lhs_autograd"], rtol=1e-10)
            assert bool((r["lhs"] <= r["rhs_corrected"] * (1 + 1e-12)).all())
        assert bool((r["lhs"] > r["rhs_printed"]).all())  # loss × 0.01: the printed g_j² term is negligible


def test_theorem44_printed_statement_has_the_wrong_units():
    """Scaling the loss by c scales ‖∇_W L̂‖² by c², but the printed g_j² term by c⁴."""
    a = theory.check_theorem44(8, 10, 3, "cubic", 1, loss_scale=1.0)
    b = theory.check_theorem44(8, 10, 3, "cubic", 1, loss_scale=10.0)
    assert torch.allclose(b["lhs"], 100 * a["lhs"], rtol=1e-10)
    assert torch.allclose(b["rhs_corrected"], 100 * a["rhs_corrected"], rtol=1e-10)
    assert torch.allclose(b["g_max"] ** 2, 1e4 * a["g_max"] ** 2, rtol=1e-10)


# ------------------------------------------------------------------------- Lemma 4.5
def test_lemma45_identity_and_hypothesis():
    W0 = torch.randn(20, 30, generator=_gen(7), dtype=F64)
    W_star = W0 + 0.7 * torch.randn(20, 30, generator=_gen(8), dtype=F64)
    r = theory.lemma45(W0, W_star)
    assert r.dist_sq_plain - r.dist_sq_bn == pytest.approx(r.gain_predicted, rel=1e-10)
    assert r.dist_sq_bn <= r.dist_sq_plain
    ks = torch.linspace(0.01, 3, 301, dtype=F64)  # k W* is the closest point of the ray
    assert min(float((W0 - k * W_star).pow(2).sum()) for k in ks) >= r.dist_sq_bn - 1e-9
    with pytest.raises(theory.TheoryError, match="⟨W0, W\\*⟩ > 0"):
        theory.lemma45(W0, -W0)


def test_scale_invariance_behind_lemma45():
    torch.manual_seed(0)
    model = nets.MLP(12, (8, 8), 3, "sigmoid", norm="bn", seed=0)
    x, labels = torch.randn(16, 12), torch.randint(0, 3, (16,))
    seq = theory.as_sequential(model)
    assert theory.scale_invariance_gap(seq, x, labels, 3.7, eps=0.0) < 1e-14
    assert theory.scale_invariance_gap(seq, x, labels, 1e-3, eps=1e-5) > 1e-8  # ε breaks it for small weights


# ------------------------------------------------------------------------- networks
@pytest.mark.parametrize("norm", ["bn", "torch-bn"])
def test_measure_bn_layers_on_a_network(norm):
    model = nets.MLP(10, (6, 5, 7), 4, "sigmoid", norm=norm, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, labels = torch.randn(20, 10, generator=_gen(9)), torch.randint(0, 4, (20,), generator=_gen(10))
    layers = theory.measure_bn_layers(theory.as_sequential(model), x, labels)
    assert [lay.index for lay in layers] == [1, 4, 7]
    for lay in layers:
        v = lay.values
        assert torch.allclose(v["grad_sq_bn"], v["t41_rhs_corrected"], rtol=1e-10, atol=1e-20)
        assert torch.allclose(v["curv_bn"], v["t42_rhs_first"], rtol=1e-8, atol=1e-18)
        assert bool((v["t41_rhs_printed"] < v["grad_sq_bn"]).all())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed, buffers included


def test_measure_plain_layers_gradient_matches_autograd():
    model = nets.MLP(10, (6, 5), 3, "sigmoid", norm=None, seed=2).double()
    x, labels = torch.randn(8, 10, generator=_gen(11), dtype=F64), torch.randint(0, 3, (8,), generator=_gen(12))
    layers = theory.measure_plain_layers(theory.as_sequential(model), x, labels)
    pre = []
    h = x
    for lin in model.linears:
        y = lin(h)
        y.retain_grad()
        pre.append(y)
        h = torch.sigmoid(y)
    nn.functional.cross_entropy(model.readout(h), labels).backward()
    for lay, y in zip(layers, pre):
        assert torch.allclose(lay.values["grad_sq"], y.grad.pow(2).sum(0), rtol=1e-10)


# ------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    y = torch.randn(5, 2, dtype=F64)
    with pytest.raises(theory.TheoryError, match="m >= 2"):
        theory.batch_standardize(torch.randn(1, 3))
    with pytest.raises(theory.TheoryError, match="zero batch variance"):
        theory.batch_standardize(torch.ones(4, 2))
    with pytest.raises(theory.TheoryError, match="shapes must agree"):
        theory.theorem41(y, y[:4], 1.0, 1.0)
    with pytest.raises(theory.TheoryError, match="one value per unit"):
        theory.theorem41(y, y, torch.ones(3), 1.0)
    with pytest.raises(theory.TheoryError, match="unknown instance kind"):
        theory.random_instance(4, 2, "quartic", 0)
    with pytest.raises(theory.TheoryError, match="no BN layer"):
        theory.measure_bn_layers(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(theory.TheoryError, match="Sequential"):
        theory.as_sequential(nn.Conv2d(1, 1, 1))
    assert issubclass(theory.TheoryError, BnbookError)


def test_config_profiles_and_validation():
    smoke = theorems.TheoremsConfig.from_params("smoke")
    assert smoke.steps < theorems.TheoremsConfig().steps
    assert theorems.TheoremsConfig.from_params("paper").dataset == "fashion-mnist"
    with pytest.raises(BnbookError, match="batch sizes"):
        theorems.TheoremsConfig(batch_size=1)
    with pytest.raises(BnbookError, match="checkpoints"):
        theorems.TheoremsConfig(steps=3, checkpoints=5)


def test_trained_network_measurement_is_exact_and_reproducible():
    """A tiny run of the chapter's experiment: identities hold at every checkpoint; same seed, same numbers."""
    cfg = theorems.TheoremsConfig.from_params("smoke", steps=6, checkpoints=2, width=6)
    runs = [theorems.train_and_measure(cfg, torch.device("cpu"))[1] for _ in range(2)]
    a = runs[0]
    assert a["bn_grad_sq_bn"].shape == (3, 2, 3, 6)  # (checkpoints, seeds, layers, units)
    assert np.all(np.isfinite(a["bn_grad_sq_bn"]))
    assert np.nanmax(a["bn_res41"]) < 1e-10 and np.nanmax(a["bn_res42"]) < 1e-8
    for key in ("bn_grad_sq_bn", "bn_curv_bn", "plain_grad_sq", "test_acc_bn"):
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
    # the two seeds are different networks, and σ, γ are the factors of γ²/σ²
    assert not np.array_equal(a["bn_grad_sq_bn"][:, 0], a["bn_grad_sq_bn"][:, 1])
    np.testing.assert_allclose(a["bn_scale"], a["bn_gamma"] ** 2 / a["bn_sigma"] ** 2, rtol=1e-6)
    np.testing.assert_allclose(a["bn_gamma"][0], 1.0)  # γ starts at 1
    assert np.isnan(a["bn_input_spread"][:, :, 0]).all() and (a["bn_input_spread"][:, :, 1:] <= 0.5).all()
    metrics = theorems.network_metrics(a, cfg)
    assert metrics["acc_bn_min"] <= metrics["acc_bn"] <= metrics["acc_bn_max"] and len(metrics["acc_bn_seeds"]) == 2


def test_lemma45_is_an_identity_for_any_two_matrices_and_rows_are_never_worse():
    """The lemma's equation holds for arbitrary W0, W* with ⟨W0, W*⟩ > 0: it checks arithmetic, not BN."""
    gen = torch.Generator().manual_seed(4)
    W0, W_star = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)
    W_star += W0  # make ⟨W0, W*⟩ > 0
    lem = theory.lemma45(W0, W_star)
    assert lem.dist_sq_plain - lem.dist_sq_bn == pytest.approx(lem.gain_predicted, rel=1e-12)
    cfg = theorems.TheoremsConfig.from_params("smoke", steps=4, checkpoints=2, width=6)
    _, _, models = theorems.train_and_measure(cfg, torch.device("cpu"))
    out = theorems.lemma45_on_network(models, cfg, torch.device("cpu"))
    assert out["lemma_dist_bn_rows"] <= out["lemma_dist_bn"] + 1e-12
    assert out["lemma_scale_gap_eps0"] < 1e-12 and out["lemma_identity_err"] < 1e-12


def test_chapter_phrases_follow_the_metrics_and_survive_missing_values():
    M = {"L1_mean_frac_all": 0.02, "L1_yhat_frac_all": 0.01, "L1_scale_med": 0.3, "L1_curv_red_share_median": 0.1,
         "L2_mean_frac_all": 0.001, "L2_yhat_frac_all": 0.01, "L2_scale_med": 15.0, "L3_scale_med": None}
    M.update({"L2_amplified": 2 / 3, "L2_sigma_med": 0.2, "L2_gamma_med": 1.05, "net_seeds": 3, "bn_better_seeds": 1})
    p = theorems.summary_phrases(M)
    assert p["dominant"] == "layer 1: the mean term; layer 2: the ŷ term"
    assert p["amplified_layers"] == "layer 2" and "above 1 in layer 2" in p["scale_verdict"]
    assert "2 of 3 seeds" in p["scale_verdict"] and "small σ_j sets the factor" in p["scale_verdict"]
    assert "(s)" not in p["scale_verdict"] and p["seed_verdict"] == "BN ends ahead in 1 of 3 seeds"
    assert p["removed_max"] == "3.0" and p["red_share_max"] == "10.0" and p["red_init_max"] == "—"
    assert "below 1" in theorems.summary_phrases({"L1_scale_med": 0.5})["scale_verdict"]
    assert theorems._layer_list([1, 2, 3]) == "layers 1, 2 and 3"
    rows = theorems.paper_vs_ours({k: None for k in ("inst_res41_max", "inst_printed41_fail_frac", "inst_res42_max",
                                                      "inst_t44_corrected_hold_frac", "inst_t44_printed_fail_frac")})
    assert len(rows) == 6 and all("—" in r["ours"] for r in rows)
