"""Chapter 6's experiment module: protocol, layer mapping, the DLN task and the exercises' answers."""

import numpy as np
import pytest
import torch

from bnbook import ics, nets
from bnbook.experiments import ics as ch


def test_paper_profile_is_the_protocol():
    cfg = ch.IcsConfig.from_params("paper")
    assert (cfg.dataset, cfg.batch_size, cfg.steps, cfg.lr, cfg.lr_high, cfg.lr_low) == ("cifar10", 128, 15_000, 0.1,
                                                                                          0.5, 0.01)
    assert cfg.seeds >= 3 and cfg.vgg == "vgg16" and cfg.width_multiplier == 1.0
    assert (cfg.dln_dim, cfg.dln_depth, cfg.dln_points, cfg.dln_steps, cfg.dln_lrs, cfg.dln_layers) == (
        10, 25, 1_000, 10_000, (1e-6, 1e-7), (9, 17))
    quick = ch.IcsConfig.from_params("quick")
    assert quick.seeds >= 3 and quick.dln_steps == 10_000 and quick.dln_points == 1_000  # the DLN at paper scale


def test_paper_labels_map_onto_our_depth():
    paper = ch.IcsConfig.from_params("paper")  # VGG-16: the labels are the layers
    assert ch.our_layers(paper, (3, 11, 2, 9, 13, 5, 10)) == [3, 11, 2, 9, 13, 5, 10]
    quick = ch.IcsConfig.from_params("quick")
    assert ch.conv_layers(quick) == 8
    assert ch.our_layers(quick, quick.ics_layers) == [3, 6]
    assert max(ch.stat_layers(quick)) == 8  # the paper's last layer #13 is our last


def test_noisy_variant_is_bn_plus_algorithm_1_and_noise_variant_has_no_bn():
    cfg = ch.IcsConfig.from_params("smoke")
    noisy = ch.make_vgg(cfg, "noisy_bn", 1, 10, seed=0)
    noise = ch.make_vgg(cfg, "noise", 1, 10, seed=0)
    assert all(type(n).__name__ == "NoisyBatchNorm" for n in noisy.norms)
    assert all(type(n).__name__ == "ShiftScaleNoise" for n in noise.norms)
    assert nets.bn_parameters(noise) == [] and all(c.bias is not None for c in noise.convs)


def test_dln_task_is_a_fixed_linear_map():
    cfg = ch.IcsConfig.from_params("smoke")
    ds = ch.dln_data(cfg, torch.device("cpu"))
    assert ds.x_train.shape == (cfg.dln_points, cfg.dln_dim) and ds.y_test.shape == (cfg.dln_points, cfg.dln_dim)
    a = torch.linalg.lstsq(ds.x_train, ds.y_train).solution.T
    torch.testing.assert_close(ds.x_test @ a.T, ds.y_test, atol=1e-4, rtol=1e-4)  # one A for train and test
    again = ch.dln_data(cfg, torch.device("cpu"))
    assert torch.equal(ds.x_train, again.x_train)


def test_exercise_1_answer():
    """The two-layer scalar net of exercise 1: ‖G − G′‖ = 8η − 8η² (0.72 at η = 0.1), cos = 1."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    for layer in net:
        torch.nn.init.ones_(layer.weight)
    got = ics.gradient_change(net, torch.ones(1, 1), torch.zeros(1, 1), lambda o, t: ((o - t) ** 2).sum(-1), 0.1, [0, 1])
    assert got["l2"][0].item() == 0.0
    assert got["l2"][1].item() == pytest.approx(0.72, abs=1e-6) and got["cos"][1].item() == pytest.approx(1.0)


def test_noise_shift_prediction_matches_algorithm_1():
    """Exercise 2's prediction against the noise module itself, on a BN output with β = 0 and γ = 1."""
    pred = ch.noise_shift_prediction()
    assert pred["dmean"] == pytest.approx(1 / 3) and pred["dvar"] == pytest.approx(3 / 16, rel=1e-4)
    torch.manual_seed(0)
    layer = nets.make_norm("noisy-bn", 2000, dims=2).train()
    x = torch.randn(16, 2000, 4, 4)
    (m0, v0), (m1, v1) = (ics.channel_stats(layer(x)) for _ in range(2))
    assert (m1 - m0).abs().mean().item() == pytest.approx(pred["dmean"], rel=0.05)
    assert (v1 - v0).abs().mean().item() == pytest.approx(pred["dvar"], rel=0.1)


def test_first_step_and_at_step():
    steps = np.array([0, 10, 20, 30])
    assert ch.first_step(steps, np.array([np.nan, 0.2, 0.6, 0.9]), 0.5) == 20
    assert ch.first_step(steps, np.array([np.nan, 0.2, 0.3, 0.4]), 0.5) is None
    assert ch.at_step(steps, np.arange(4), 2)[0] == 10  # never step 0
