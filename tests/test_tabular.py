"""Chapter 9's experiment (bnbook.experiments.tabular): its measurements on small nets, its statistics,
and a tiny end-to-end run on a generated table."""

import socket

import numpy as np
import pytest
import torch

from bnbook import data, nets, norms
from bnbook.errors import DatasetError
from bnbook.experiments import tabular as T


def bn_mlp(seed: int = 0, in_features: int = 4) -> nets.MLP:
    return nets.MLP(in_features, (8, 8), 3, "sigmoid", norm=norms.BatchNorm, seed=seed)


# ---------------------------------------------------------------- measurements
def test_population_statistics_are_batch_averages_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = bn_mlp()
    x = torch.randn(40, 4) * 3 + 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pop = T.with_population_statistics(model, x, batch_size=10, seed=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not pop.training
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    z = model.linears[0](x[order]).view(4, 10, 8)  # four batches of the first layer's BN input
    layer = T.bn_layers(pop)[0]
    torch.testing.assert_close(layer.running_mean, z.mean(1).mean(0))
    torch.testing.assert_close(layer.running_var, z.var(1, unbiased=True).mean(0))
    assert T.running_average_lag(pop, pop) == 0.0
    z = z.detach()
    assert T.mean_to_spread(pop) == pytest.approx(
        float((z.mean(1).mean(0).abs() / (z.var(1).mean(0) + layer.eps).sqrt()).median()), rel=1e-5)


def test_predict_proba_uses_inference_mode_and_restores_the_mode():
    model = bn_mlp()
    model.train()
    x = torch.randn(6, 4)
    probs = T.predict_proba([model, bn_mlp(1)], x)
    assert probs.shape == (2, 6, 3) and model.training
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6))
    model.eval()
    torch.testing.assert_close(probs[0], torch.softmax(model(x), -1))  # fresh running stats: mean 0, var 1


def test_first_preactivation_and_saturation():
    model = bn_mlp()
    x = torch.randn(16, 4) * 50
    buffers = [b.clone() for b in model.buffers()]
    z = T.first_preactivation(model, x)
    assert z.shape == (16, 8)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BN buffers untouched
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-4, rtol=0)  # BN with the batch's statistics
    plain = nets.MLP(4, (8, 8), 3, "sigmoid", seed=0)
    assert T.saturated_fraction(T.first_preactivation(plain, x)) > 0.5  # inputs of size 50 saturate
    assert T.saturated_fraction(torch.tensor([0.0, 1.0, 10.0, -10.0])) == 0.5
    s = torch.sigmoid(torch.tensor(T.SATURATION_Z))
    assert float(s * (1 - s)) == pytest.approx(T.SATURATION, rel=1e-6)


def sampled_saturation(x: np.ndarray, units: int = 20_000, seed: int = 0) -> float:
    """The saturated share of first-layer sigmoids under PyTorch's default initialisation, by sampling units."""
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(x.shape[1])
    w = rng.uniform(-bound, bound, size=(units, x.shape[1]))
    b = rng.uniform(-bound, bound, size=(units, 1))
    return float((np.abs(x @ w.T + b.T) > abs(T.SATURATION_Z)).mean())


def test_predicted_saturation_matches_sampled_initial_weights():
    rng = np.random.default_rng(0)
    many = rng.normal(3.0, 1.0, size=(50, 30))  # many comparable features: the pre-activation is nearly normal
    assert T.predicted_saturation(many) == pytest.approx(sampled_saturation(many), abs=0.02)
    assert T.predicted_saturation(np.zeros((5, 3))) < 1e-9
    # one dominant feature (Glass's silicon): z is nearly uniform, and the normal approximation undercounts
    glassy = rng.normal([1.5, 13.0, 72.0], [0.01, 0.8, 0.8], size=(50, 3))
    assert 0.7 < T.predicted_saturation(glassy) < sampled_saturation(glassy)


def test_confusion_counts():
    probs = np.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]])  # one model, three rows
    conf = T.confusion(probs, np.array([0, 1, 1]), 2)
    assert conf.tolist() == [[1, 0], [1, 1]]
    share = T._confused_share(conf, 1)
    assert share == {"correct": 0.5, "other": 0, "other_share": 0.5}


# ---------------------------------------------------------------- statistics
def test_corrected_interval():
    d = np.array([0.1, 0.05, 0.12, 0.08])
    mean, lo, hi = T.corrected_interval(d, n_train=150, n_test=64)
    from scipy import stats

    se = np.sqrt(d.var(ddof=1) * (1 / 4 + 64 / 150))
    assert mean == pytest.approx(d.mean())
    assert hi - mean == pytest.approx(stats.t.ppf(0.975, 3) * se)
    naive = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert hi - mean > naive  # the correction widens the interval
    m1, lo1, hi1 = T.corrected_interval(np.array([0.1]), 150, 64)
    assert m1 == pytest.approx(0.1) and np.isnan(lo1) and np.isnan(hi1)


def test_interval_phrase():
    assert T.interval_phrase(0.01, 0.2) == "BN ends higher"
    assert T.interval_phrase(-0.2, -0.01) == "BN ends lower"
    assert "not settled" in T.interval_phrase(-0.1, 0.2)
    assert "one split" in T.interval_phrase(float("nan"), float("nan"))


# ---------------------------------------------------------------- the experiment end to end
def toy_table(rows: int = 120) -> data.Table:
    """Three separable classes, one feature on a scale like Glass's silicon."""
    rng = np.random.default_rng(0)
    y = np.arange(rows) % 3
    x = np.column_stack([72 + 0.5 * y + rng.normal(0, 0.3, rows), rng.normal(1.5, 0.01, rows),
                         y + rng.normal(0, 0.3, rows)])
    return data.Table("toy", x, y, ("Si", "RI", "Mg"), ("a", "b", "c"), "toy")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(data, "read_table", lambda name: toy_table())
    return T.TabularConfig.from_params("smoke", splits=2, seeds=2, steps=30, log_every=10, batch_size=16)


def test_run_end_to_end_on_a_toy_table(toy):
    out = T.run(toy, torch.device("cpu"))
    a, m = out.arrays, out.metrics
    assert out.datasets == ["toy"]
    assert a["acc_std_bn"].shape == (2, 4, 2)  # (splits, records, models)
    assert a["auc_raw_no_bn"].shape == (2, 2, 3) and a["roc_tpr_std_bn"].shape[:3] == (2, 2, 3)
    assert a["confusion_std_bn"].sum() == 2 * 2 * m["n_test"]
    assert set(a) >= {f"final_pop_{i}_bn" for i in T.INPUTS} and "final_pop_std_no_bn" not in a
    assert [r["inputs"] for r in m["table_2x2"]] == [T.INPUT_LABELS[i] for i in T.INPUTS]
    assert len(m["report_rows"]) == 5 and all(r["verdict"] for r in m["report_rows"])
    assert m["runs"] == 4 and m["n_train"] + m["n_test"] == 120
    assert 0 <= m["saturated_raw_no_bn"] <= 1 and m["saturated_raw_no_bn"] > m["saturated_std_no_bn"]
    assert len(T.open_choices(toy.to_dict())) == 7


def test_run_is_deterministic(toy):
    first = T.run(toy, torch.device("cpu")).arrays
    second = T.run(toy, torch.device("cpu")).arrays
    for key in ("final_std_bn", "final_raw_no_bn", "auc_std_bn", "acc_raw_bn"):
        np.testing.assert_array_equal(first[key], second[key])


def test_raw_and_standardised_variants_start_from_the_same_weights():
    cfg = T.TabularConfig.from_params("smoke", seeds=2)
    a = T.make_models(cfg, True, 9, 7, split=1, device=torch.device("cpu"))
    b = T.make_models(cfg, True, 9, 7, split=1, device=torch.device("cpu"))
    c = T.make_models(cfg, True, 9, 7, split=2, device=torch.device("cpu"))
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))
    assert not torch.equal(next(a[0].parameters()), next(c[0].parameters()))  # another split, other seeds
    assert T.model_seeds(cfg, 1) == [100, 101]


def test_paper_profile_needs_bng_glass_and_says_so_offline(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("BNBOOK_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "OPENML_API", f"http://127.0.0.1:{port}/api/")
    data.read_table.cache_clear()
    cfg = T.TabularConfig.from_params("paper")
    assert cfg.dataset == "bng-glass"
    with pytest.raises(DatasetError, match=r"bng-glass.*not available(.|\n)*offline dataset 'glass'"):
        T.run(cfg, torch.device("cpu"))
    data.read_table.cache_clear()


def test_figures_draw_from_the_arrays(toy):
    import types

    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    out = T.run(toy, torch.device("cpu"))
    res = types.SimpleNamespace(arrays=out.arrays, metrics=out.metrics)  # what the figures read of a Result
    for fig in (T.figure_features(res), T.figure_curves(res), T.figure_roc(res)):
        assert len(fig.axes) == 2 and all(ax.get_title() for ax in fig.axes)
        plt.close(fig)
