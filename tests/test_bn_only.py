"""Chapter 8: freezing conditions, the random-parameter control, γ statistics and ablation, gradient
magnitudes, and the grid of independently cached units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnbook import bn_only as lib
from bnbook import nets, results, train
from bnbook.data import Dataset
from bnbook.errors import BnbookError
from bnbook.experiments import bn_only as ch
from bnbook.experiments import bn_only_units


def tiny_data(n_train: int = 64, n_test: int = 32, size: int = 8, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    return Dataset(
        "tiny", torch.randn(n_train, 1, size, size, generator=gen), torch.randint(0, 10, (n_train,), generator=gen),
        torch.randn(n_test, 1, size, size, generator=gen), torch.randint(0, 10, (n_test,), generator=gen),
        tuple(str(i) for i in range(10)), "random images",
    )


def resnet(seed: int, condition: str | None = None, **kw) -> torch.nn.Module:
    model = nets.ResNet(depth=8, width=4, in_channels=1, seed=seed, **kw)
    return lib.apply_condition(model, condition, seed) if condition else model


FIT = train.FitConfig(steps=3, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3, log_every=3, probe_size=1)


@pytest.mark.parametrize("condition", lib.CONDITIONS)
def test_each_condition_changes_exactly_its_tensors(condition):
    models = [resnet(s, condition) for s in (0, 1)]
    groups = lib.parameter_groups(models[0])
    before = [lib.snapshot(m) for m in models]
    masks = [{n: train.trainable_mask(p) for n, p in m.named_parameters()} for m in models]
    train.fit(models, tiny_data(), FIT, seeds=[0, 1])
    expected = {  # which groups may change
        "all": {"bn", "output", "others"}, "bn": {"bn"}, "bn+output": {"bn", "output"},
        "output": {"output"}, "random": {"others"},
    }[condition]
    for m, b, mk in zip(models, before, masks):
        for name, p in m.named_parameters():
            moved = p.detach() != b[name]
            if groups[name] not in expected:
                assert not moved.any(), f"{condition}: frozen {name} changed"
            elif mk[name] is not None:  # random: exactly the chosen entries move
                assert torch.equal(moved, mk[name]), f"{condition}: {name} moved outside its mask"
            else:
                assert moved.any(), f"{condition}: trainable {name} did not change"
        changed = lib.changed_entries(m, b)
        trainable = lib.trainable_entries(m)
        assert changed == trainable  # every trainable entry moved, no other one did


def test_conditions_follow_openlth_switches():
    m = resnet(0, "bn")
    assert all(p.requires_grad for p in nets.bn_parameters(m))
    assert not any(p.requires_grad for p in nets.output_parameters(m))
    m = resnet(0, "bn+output")
    assert lib.trainable_entries(m) == {"bn": 2 * lib.bn_channels(m), "output": 16 * 10 + 10, "others": 0}
    m = resnet(0, "output")
    assert lib.trainable_entries(m)["output"] == 170 and lib.trainable_entries(m)["bn"] == 0
    with pytest.raises(BnbookError, match="unknown condition"):
        lib.apply_condition(m, "bn-only")
    # switching back clears the random control's masks
    m = resnet(0, "random")
    lib.apply_condition(m, "all")
    assert all(train.trainable_mask(p) is None for p in m.parameters())
    assert lib.trainable_entries(m)["others"] == lib.group_sizes(m)["others"]


@pytest.mark.parametrize("depth,width", [(8, 4), (14, 16)])
def test_random_control_trains_as_many_weights_as_bn_per_channel(depth, width):
    m = nets.ResNet(depth=depth, width=width, in_channels=1, seed=3)
    lib.apply_condition(m, "random", seed=3)
    channels = lib.bn_channels(m)
    assert channels == 7 * width + 14 * ((depth - 2) // 6) * width  # §C.3's count
    counts = lib.trainable_entries(m)
    assert counts == {"bn": 0, "output": 0, "others": 2 * channels}
    assert counts["others"] == sum(p.numel() for p in nets.bn_parameters(m))
    for conv in lib.conv_layers(m):  # two per output channel, in every conv
        mask = train.trainable_mask(conv.weight)
        assert torch.equal(mask.flatten(1).sum(1), torch.full((conv.out_channels,), 2))
    again = lib.random_masks(m, seed=3)
    other = lib.random_masks(m, seed=4)
    assert all(torch.equal(again[n], train.trainable_mask(p)) for n, p in m.named_parameters() if n in again)
    assert any(not torch.equal(again[n], other[n]) for n in again)


def test_random_control_needs_bn():
    m = nets.ResNet(depth=8, width=4, in_channels=1, norm_positions="none", seed=0)
    with pytest.raises(BnbookError, match="needs norm layers"):
        lib.apply_condition(m, "random")


def test_gammas_fraction_and_ablation_restore_exactly():
    m = resnet(0)
    g = lib.gammas(m)
    assert g.shape == (lib.bn_channels(m),) and (g >= 0).all() and (g < 1).all()  # U[0, 1) init
    assert lib.betas(m).shape == g.shape and not lib.betas(m).any()
    assert lib.fraction_below(np.array([-0.01, 0.02, 0.5, -2.0]), 0.05) == 0.5
    before = lib.snapshot(m)
    with lib.ablated(m, threshold=0.2) as n_off:
        assert n_off == int((np.abs(g) < 0.2).sum()) > 0
        now = lib.gammas(m)
        assert (now[np.abs(g) < 0.2] == 0).all() and np.array_equal(now[np.abs(g) >= 0.2], g[np.abs(g) >= 0.2])
    with lib.ablated(m, count=7, seed=1) as n_rand:
        assert n_rand == 7 and (lib.gammas(m) == 0).sum() == 7
    assert lib.changed_entries(m, before) == {"bn": 0, "output": 0, "others": 0}
    with pytest.raises(BnbookError):
        with lib.ablated(m, threshold=0.1, count=3):
            pass


def test_ablating_every_channel_makes_the_output_constant():
    ds = tiny_data()
    m = resnet(0)
    m.eval()
    with lib.ablated(m, threshold=10.0):
        out = m(ds.x_test)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-5)
    assert 0 <= lib.accuracy(m, ds.x_test, ds.y_test) <= 1


def test_gradient_magnitudes_match_autograd_and_leave_no_trace():
    ds = tiny_data()
    m = resnet(0, "bn")  # gradients are measured for frozen groups too
    x, y = ds.x_train[:16], ds.y_train[:16]
    before = lib.snapshot(m)
    flags = [p.requires_grad for p in m.parameters()]
    with train.no_side_effects(m):
        got = lib.gradient_magnitudes(m, x, y)
    assert set(got) == set(lib.GRADIENT_KEYS)
    ref = resnet(0)
    ref.train()
    loss = torch.nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    conv = torch.cat([c.weight.grad.flatten() for c in lib.conv_layers(ref)])
    gamma = torch.cat([n.weight.grad for n in lib.norm_layers(ref)])
    assert got["mean_abs_conv"] == pytest.approx(float(conv.abs().mean()), rel=1e-4)
    assert got["mean_abs_gamma"] == pytest.approx(float(gamma.abs().mean()), rel=1e-4)
    assert [p.requires_grad for p in m.parameters()] == flags
    assert lib.changed_entries(m, before) == {"bn": 0, "output": 0, "others": 0}


def test_gradient_hook_does_not_change_training():
    ds = tiny_data()
    plain = [resnet(s, "all") for s in (0, 1)]
    hooked = [resnet(s, "all") for s in (0, 1)]
    train.fit(plain, ds, FIT, seeds=[0, 1])
    res = train.fit(hooked, ds, FIT, seeds=[0, 1], hooks={"g": lib.gradient_magnitude_hook(every=1)})
    for a, b in zip(plain, hooked):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    values = res.hooks["g"]["values"]
    assert values["mean_abs_gamma"].shape == (3, 2) and (values["mean_abs_conv"] > 0).all()


def test_pooled_images():
    ds = lib.pooled(tiny_data(size=8), 2)  # not 8-bit levels: pooled and standardised as they are
    assert ds.x_train.shape[-2:] == (4, 4) and "pooled" in ds.description
    assert float(ds.x_train.mean()) == pytest.approx(0, abs=1e-5)
    assert float(ds.x_train.std()) == pytest.approx(1, abs=1e-3)
    assert lib.pooled(ds, 1).x_train.shape == ds.x_train.shape


def test_pooled_images_do_not_depend_on_how_they_were_standardised():
    """Two loads of one 8-bit dataset whose standardisation differs in the last bits (as with another
    thread count) give bit-identical pooled images."""
    gen = torch.Generator().manual_seed(0)
    raw_train = torch.randint(0, 256, (64, 1, 8, 8), generator=gen).float() / 255
    raw_test = torch.randint(0, 256, (16, 1, 8, 8), generator=gen).float() / 255
    y = torch.zeros(64, dtype=torch.long)

    def load(mean: float, std: float) -> Dataset:
        return Dataset("levels", (raw_train - mean) / std, y, (raw_test - mean) / std, y[:16], ("0",), "8-bit")

    a, b = load(0.2860, 0.3530), load(0.2860 + 3e-8, 0.3530 * (1 + 2e-7))
    assert not torch.equal(a.x_train, b.x_train)
    levels = lib.pixel_levels(a.x_train, a.x_test)
    assert levels is not None and np.array_equal(levels[0], (raw_train * 255).round().numpy() - raw_train.min().item() * 255)
    for factor in (1, 2):
        pa, pb = lib.pooled(a, factor), lib.pooled(b, factor)
        assert torch.equal(pa.x_train, pb.x_train) and torch.equal(pa.x_test, pb.x_test)
    assert lib.pixel_levels(torch.randn(8, 1, 4, 4), torch.randn(2, 1, 4, 4)) is None


# ------------------------------------------------------------------ the grid
def test_grid_units_are_unique_and_grouped_by_seed():
    cfg = ch.BnOnlyConfig.from_params("quick")
    units = ch.unit_configs(cfg)
    assert len({results.stable_hash(u.to_dict()) for u in units}) == len(units)
    groups: dict[str, list[int]] = {}
    for u in units:
        groups.setdefault(ch.group_key(u), []).append(u.seed)
        assert u.seeds_together == (0, 1)
    assert all(sorted(s) == [0, 1] for s in groups.values())
    n_series = len(cfg.depths) * len(cfg.conditions)
    extra_widths = len([w for w in cfg.widths if w != cfg.width]) * len(cfg.width_conditions)
    variants = 2 + 2  # γ = 1 (all, BN-only) and BN after every second conv / none
    assert len(groups) == n_series + extra_widths + variants
    # the ablation and the gradients are measured in the depth series only
    assert all(bool(u.ablation_thresholds) == (u.condition in ("all", "bn") and u.width == cfg.width and
                                               u.gamma_init == "uniform" and u.norm_positions == "all")
               for u in units)
    assert {u.depth for u in units if u.grad_every} == set(cfg.depths)
    paper = ch.BnOnlyConfig.from_params("paper")
    assert paper.steps == 160 * (50_000 // 128) and paper.batch_size == 128
    assert [round(f * paper.steps) for f in paper.milestones] == [80 * 390, 120 * 390]


def test_unit_keys_do_not_depend_on_the_chapter_summary():
    """A unit's result key hashes the code its computation runs: the units module and the library,
    not the chapter's config class, summary, figures or prose helpers."""
    deps = results.code_dependencies(ch.compute_unit)
    names = {p.name for p in deps.files}
    assert "bn_only.py" in names and "train.py" in names and "nets.py" in names
    assert not any(p.as_posix().endswith("experiments/bn_only.py") for p in deps.files)
    assert "BnOnlyConfig" not in deps.own and "prose_numbers" not in deps.own


def test_bad_configs_fail_clearly():
    with pytest.raises(BnbookError, match="6D"):
        ch.BnOnlyConfig.from_params("smoke", depths=(10,))
    with pytest.raises(BnbookError, match="unknown condition"):
        ch.BnOnlyConfig.from_params("smoke", conditions=("bn-only",))
    unit = ch.unit_configs(ch.BnOnlyConfig.from_params("smoke"))[0]
    with pytest.raises(BnbookError, match="needs BN"):
        unit.replace(condition="bn", norm_positions="none")
    with pytest.raises(BnbookError, match="not among"):
        unit.replace(seed=5)


def test_a_unit_trains_its_seed_group_once_and_caches_every_sibling():
    cfg = ch.BnOnlyConfig.from_params("smoke", train_size=64, test_size=32, train_eval_size=32, steps=2)
    unit = next(u for u in ch.unit_configs(cfg) if u.condition == "bn" and u.seed == 0 and u.ablation_thresholds)
    first = results.cached(ch.UNITS_CHAPTER, unit, ch.compute_unit)
    sibling = results.cached(ch.UNITS_CHAPTER, unit.replace(seed=1), ch.compute_unit)
    assert not first.reused and sibling.reused  # stored when the group was trained
    assert first.metrics["seed"] == 0 and sibling.metrics["seed"] == 1
    assert first.metrics["changed_others"] == 0 and first.metrics["changed_bn"] == first.metrics["trainable_bn"]
    assert first.arrays["gamma"].shape == (lib.bn_channels(nets.ResNet(8, 4, in_channels=1)),)
    assert {a["threshold"] for a in first.metrics["ablation"]} == set(cfg.ablation_thresholds)
    assert not bn_only_units._SIBLINGS.outcomes  # nothing left behind
