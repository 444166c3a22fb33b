"""Chapter 3's measurements: steps to fixed targets, the dip analysis, population statistics
recomputed at a record, and the sweep summaries say what the chapter quotes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bnbook import data, nets, norms
from bnbook.experiments import ioffe


def _fit(acc: np.ndarray, pop: np.ndarray | None = None, seeds=(0, 1)) -> SimpleNamespace:
    return SimpleNamespace(test_acc=acc, probes={"acc_pop": acc if pop is None else pop}, seeds=list(seeds))


def test_target_rows_count_per_seed_and_ratio() -> None:
    steps = np.array([0, 100, 200, 400])
    bn = np.array([[0.1, 0.1], [0.85, 0.7], [0.9, 0.88], [0.92, 0.9]])
    no = np.array([[0.1, 0.1], [0.5, 0.5], [0.86, 0.8], [0.9, 0.86]])
    rows = ioffe.target_rows(steps, {"bn": _fit(bn), "no_bn": _fit(no)}, (0.85, 0.9))
    assert rows[0]["bn"] == [100, 200] and rows[0]["no_bn"] == [200, 400]
    assert rows[0]["ratio_median"] == pytest.approx(2.0) and rows[0]["bn_reached"] == 2
    assert rows[1]["no_bn"] == [400, None] and rows[1]["no_bn_reached"] == 1
    assert rows[1]["ratio_min"] == rows[1]["ratio_max"] == pytest.approx(2.0)  # only the pair where both arrive
    table = ioffe.target_table({"targets": rows})
    assert table[1]["no_bn"].endswith("1 seed") and table[0]["bn"].endswith("2 seeds")


@pytest.mark.parametrize("pop_at_dip, expected", [(0.89, "spike of the running averages"), (0.75, "in the weights")])
def test_dip_metrics_find_the_largest_drop_and_attribute_it(pop_at_dip: float, expected: str) -> None:
    steps = np.array([0, 100, 200, 300])
    acc = np.array([[0.5, 0.5], [0.9, 0.9], [0.91, 0.7], [0.91, 0.9]])
    pop = acc.copy()
    pop[2, 1] = pop_at_dip
    out = ioffe.dip_metrics(steps, _fit(acc, pop, seeds=(5, 6)))
    assert (out["dip_seed"], out["dip_step"]) == (6, 200)
    assert out["dip_size"] == pytest.approx(0.2) and out["dip_recovered_step"] == 300
    assert expected in out["dip_phrase"] and "(s)" not in out["dip_phrase"]
    flat = ioffe.dip_metrics(steps, _fit(np.maximum.accumulate(acc, axis=0)))
    assert flat["dip_phrase"].startswith("No BN seed drops")


def test_population_accuracy_is_algorithm_2_and_leaves_the_model_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 6, generator=gen), torch.randint(0, 3, (90,), generator=gen)
    ds = data.Dataset("t", x, y, x[:30], y[:30], ("a", "b", "c"), "random")
    model = nets.MLP(6, (5, 5), 3, "sigmoid", norm="bn", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = ioffe.population_accuracy(ds, batches=4, batch_size=10, seed=0)
    acc = float(probe([model], ds.x_test)[0])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # the same by hand: population statistics of each BN layer's input over the same batches
    idx = torch.randint(90, (4, 10), generator=torch.Generator().manual_seed(4242))
    ref = nets.MLP(6, (5, 5), 3, "sigmoid", norm="bn", seed=1)
    with torch.no_grad():
        h = [ds.x_train[r] for r in idx]
        for lin, bn in zip(ref.linears, ref.norms):
            pre = [lin(b) for b in h]
            bn.running_mean, bn.running_var = norms.population_statistics(pre)
            h = [torch.sigmoid(bn(p)) for p in pre]  # training mode: batch statistics
        ref.eval()
        expected = float((ref(ds.x_test).argmax(-1) == ds.y_test).float().mean())
    assert acc == pytest.approx(expected)


def test_sweep_metrics_phrase_and_flat_names() -> None:
    cfg = ioffe.IoffeConfig.from_params("smoke")
    acc = np.array([[[0.9, 0.92], [0.1, 0.12]], [[0.88, 0.9], [0.85, 0.87]]])  # (values, variant no_bn/bn?, seeds)
    acc = acc[:, ::-1]  # VARIANTS is (no_bn, bn): index 0 is no BN
    sw = {"acc": acc, "diverged": np.zeros((2, 2), int), "pct0": np.zeros((2, 2, 2, 3)), "values": np.array([32.0, 0.5])}
    out = ioffe.sweep_metrics(cfg, {"lr": sw})
    assert "learning rate 32 the net without BN stays near chance" in out["sweep_lr_phrase"]
    assert out["sweep_lr_bn_32"] == pytest.approx(0.91) and out["sweep_lr_no_bn_0_5"] == pytest.approx(0.86)
    assert out["sweep_lr_trains_bn"] == 2 and out["sweep_lr_trains_no_bn"] == 1 and out["sweep_lr_best_bn"] == 32.0


def test_machine_line_writes_real_plurals() -> None:
    res = SimpleNamespace(record={"environment": {"device": "cpu", "device_name": "X", "cpu_count": 2}},
                          config={"threads": 1})
    assert ioffe.machine_line(res) == "cpu (X, 2 cores, 1 training thread)"
    res.config["threads"] = 2
    assert ioffe.machine_line(res).endswith("2 training threads)")
