"""The nets of bnbook.nets: the norm registry, the features protocol, seeds, shapes and
counts against the papers' architectures, bf16 autocast for every norm, and freezing."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import nn

from bnbook import nets, norms
from bnbook.errors import BnbookError

ALL_NORMS = [*nets.NORMS, "ws", "ws+bn", "ws+gn"]


# ------------------------------------------------------------------ the registry
@pytest.mark.parametrize(
    "spec,dims,cls",
    [
        ("bn", 1, norms.BatchNorm),
        ("bn", 2, norms.BatchNorm),
        ("torch-bn", 1, nn.BatchNorm1d),
        ("torch-bn", 2, nn.BatchNorm2d),
        ("noisy-bn", 2, norms.NoisyBatchNorm),
        ("noise", 2, norms.ShiftScaleNoise),
        ("l1", 2, norms.LpBatchNorm),
        ("linf", 1, norms.LpBatchNorm),
        ("ln", 1, norms.LayerNorm),
        ("ln", 2, norms.GroupNorm),
        ("gn", 2, norms.GroupNorm),
        ("brn", 2, norms.BatchRenorm),
        ("ws+bn", 2, norms.BatchNorm),
    ],
)
def test_make_norm_builds_the_named_layer(spec, dims, cls) -> None:
    layer = nets.make_norm(spec, 8, dims)
    assert type(layer) is cls


def test_make_norm_options_none_factories_and_errors() -> None:
    assert nets.make_norm(None, 4) is None and nets.make_norm("none", 4) is None and nets.make_norm("ws", 4) is None
    assert nets.make_norm("l2", 4).p == 2 and nets.make_norm("linf", 4).p == math.inf
    assert nets.make_norm("ln", 6, 2).num_groups == 1 and nets.make_norm("gn", 8, 2).num_groups == 2  # groups of 4
    assert nets.make_norm("gn", 8, 2, group_size=2).num_groups == 4
    assert nets.make_norm("bn", 4, momentum=0.3).momentum == 0.3
    assert nets.make_norm("l1", 4, centred=True).centred
    assert nets.make_norm("brn", 4, rmax=2.0).rmax == 2.0
    assert nets.make_norm("noisy-bn", 4, n_mu=0.2).noise.n_mu == 0.2
    assert isinstance(nets.make_norm(functools.partial(nn.LayerNorm, eps=1e-3), 4), nn.LayerNorm)
    with pytest.raises(BnbookError, match="unknown norm"):
        nets.make_norm("batchnorm", 4)
    with pytest.raises(BnbookError, match="group size"):
        nets.make_norm("gn", 6, 2)
    with pytest.raises(BnbookError, match="bad options"):
        nets.make_norm("gn", 8, 2, momentum=0.1)
    with pytest.raises(BnbookError, match="dims"):
        nets.make_norm("bn", 4, 3)
    with pytest.raises(BnbookError, match="once"):
        nets.make_norm("ws+ws+bn", 4)


def test_ws_prefix_standardises_the_layer_before_the_norm() -> None:
    assert all(isinstance(c, norms.WSConv2d) for c in nets.SmallCNN(norm="ws+gn", widths=(8, 8)).convs)
    assert all(type(c) is nn.Conv2d for c in nets.SmallCNN(norm="gn", widths=(8, 8)).convs)
    mlp = nets.MLP(6, (5, 4), 3, norm="ws+bn", seed=0)
    assert mlp.weight_standardised and all(isinstance(lin, norms.WSLinear) for lin in mlp.linears)
    assert type(mlp.readout) is nn.Linear  # the read-out is never standardised
    assert nets.MLP(6, (5,), norm="ws").hidden_bias  # WS alone: no β after it, so the layer keeps its bias


def test_layers_before_a_norm_have_no_bias_unless_the_norm_has_no_shift() -> None:
    assert nets.SmallCNN(norm="bn").convs[0].bias is None
    assert nets.SmallCNN(norm="none").convs[0].bias is not None
    assert nets.VGG(widths=(4, "M"), norm="noise").convs[0].bias is not None  # the noise alone has no β
    assert nets.MLP(4, (3,), norm="noisy-bn").linears[0].bias is None


# ------------------------------------------------------------------ the features protocol
def _small_nets(norm: str = "bn") -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return {
        "mlp": (nets.MLP(12, (7, 5), 3, "relu", norm=norm, seed=0), torch.randn(6, 12)),
        "cnn": (nets.SmallCNN(1, 3, (4, 8), norm=norm, seed=0), torch.randn(4, 1, 12, 12)),
        "vgg": (nets.VGG(3, 3, (4, "M", 8, 8, "M"), norm=norm, seed=0), torch.randn(4, 3, 8, 8)),
        "resnet": (nets.ResNet(8, 4, 3, 3, norm=norm, seed=0), torch.randn(4, 3, 8, 8)),
    }


def test_features_are_the_inputs_of_the_nonlinearities() -> None:
    torch.manual_seed(0)
    for name, (net, x) in _small_nets().items():
        net.eval()
        logits, feats = net(x, features=True)
        torch.testing.assert_close(logits, net(x), msg=name)
        last = feats[-1]
        if name == "mlp":  # the read-out sees act(last feature)
            expected = net.readout(torch.relu(last))
        elif name == "vgg":  # ... after the last pooling
            expected = net.readout(nn.functional.max_pool2d(torch.relu(last), 2).mean(dim=(2, 3)))
        else:  # ... after global average pooling
            expected = net.readout(torch.relu(last).mean(dim=(2, 3)))
        torch.testing.assert_close(logits, expected, msg=name)
    mlp, x = _small_nets()["mlp"]
    z = mlp.norms[0](mlp.linears[0](x))
    torch.testing.assert_close(mlp(x, features=True)[1][0], z)
    torch.testing.assert_close(mlp.pre_activations(x)[0], z)


def test_feature_counts_and_shapes() -> None:
    torch.manual_seed(0)
    nets_ = _small_nets("none")
    assert [f.shape for f in nets_["mlp"][0](nets_["mlp"][1], features=True)[1]] == [(6, 7), (6, 5)]
    assert [f.shape for f in nets_["cnn"][0](nets_["cnn"][1], features=True)[1]] == [(4, 4, 6, 6), (4, 8, 3, 3)]
    assert [f.shape[1] for f in nets_["vgg"][0](nets_["vgg"][1], features=True)[1]] == [4, 8, 8]
    assert len(nets_["resnet"][0](nets_["resnet"][1], features=True)[1]) == 8 - 1  # stem + 2 per block
    assert len(nets.VGG(seed=0).convs) == 13  # VGG-16's conv layers, the paper's #1 … #13


def test_features_include_the_noise_of_noisy_bn() -> None:
    net = nets.SmallCNN(1, 3, (4, 8), norm="noisy-bn", seed=0)
    x = torch.randn(4, 1, 12, 12)
    torch.manual_seed(1)
    f1 = net(x, features=True)[1][0]
    torch.manual_seed(2)
    f2 = net(x, features=True)[1][0]
    assert not torch.allclose(f1, f2)  # training mode: a new draw every forward pass
    net.eval()
    torch.testing.assert_close(net(x, features=True)[1][0], net(x, features=True)[1][0])


# ------------------------------------------------------------------ seeds
@pytest.mark.parametrize(
    "make",
    [
        lambda s: nets.MLP(10, (6,), 3, norm="bn", seed=s),
        lambda s: nets.SmallCNN(seed=s),
        lambda s: nets.VGG(1, widths="vgg11", width_multiplier=0.125, seed=s),
        lambda s: nets.ResNet(8, 4, seed=s),
        lambda s: nets.DeepLinear(seed=s),
    ],
)
def test_init_depends_on_the_seed_only(make) -> None:
    torch.manual_seed(0)
    a = make(3).state_dict()
    torch.rand(1000)  # global RNG state must not matter
    b_net = make(3)
    c = make(4).state_dict()
    for k, v in a.items():
        torch.testing.assert_close(b_net.state_dict()[k], v)
    assert any(not torch.equal(v, c[k]) for k, v in a.items() if v.is_floating_point())
    with torch.no_grad():  # re-initialising a changed model gives the fresh one back
        for p in b_net.parameters():
            p.add_(1.0)
        for buf in b_net.buffers():
            buf.add_(1)
    nets.reset_parameters(b_net, 3)
    for k, v in a.items():
        torch.testing.assert_close(b_net.state_dict()[k], v)


# ------------------------------------------------------------------ SmallCNN (chapter 5)
def test_small_cnn_init_is_he_normal_per_conv_from_the_seed() -> None:
    net = nets.SmallCNN(1, 10, (16, 32, 64), seed=7)
    conv = net.convs[2]
    expected = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(7)) * (2.0 / (32 * 9)) ** 0.5
    assert torch.equal(conv.weight, expected)  # every conv restarts the seed's generator
    bound = 64**-0.5
    assert net.readout.weight.abs().max() <= bound and torch.equal(net.readout.bias, torch.zeros(10))


# ------------------------------------------------------------------ VGG (chapters 6, 7)
@pytest.mark.parametrize("channels", [1, 3])
def test_vgg_output_shapes_for_one_and_three_channels(channels) -> None:
    net = nets.VGG(channels, 10, "vgg16", width_multiplier=0.0625, seed=0)
    logits, feats = net(torch.randn(2, channels, 32, 32), features=True)
    assert logits.shape == (2, 10) and len(feats) == 13
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    assert [f.shape[1] for f in feats] == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]


def test_vgg_full_width_and_glorot_init() -> None:
    net = nets.VGG(3, 10, "vgg11", seed=0, norm="none")
    assert [c.out_channels for c in net.convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    w = net.convs[5].weight.detach()  # 512 ← 512, 3×3
    bound = math.sqrt(6 / (2 * 512 * 9))
    assert w.abs().max() <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.01 * bound
    assert torch.equal(net.convs[0].bias, torch.zeros(64))
    with pytest.raises(BnbookError, match="max-pooled"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(BnbookError, match="unknown VGG"):
        nets.VGG(widths="vgg99")


# ------------------------------------------------------------------ DeepLinear (chapters 6, 7)
def test_deep_linear_is_the_product_of_its_matrices() -> None:
    dln = nets.DeepLinear(10, 25, seed=0).double()
    assert len(dln.weights()) == 25 and all(w.shape == (10, 10) for w in dln.weights())
    x = torch.randn(7, 10, dtype=torch.float64)
    product = torch.eye(10, dtype=torch.float64)
    for w in dln.weights():
        product = w @ product
    torch.testing.assert_close(dln(x), x @ product.T)
    torch.testing.assert_close(dln.matrix(), product)
    out, feats = dln(x, features=True)
    assert len(feats) == 25 and torch.equal(feats[-1], out)
    bound = math.sqrt(3 / 10)  # Glorot: √(6 / (10 + 10))
    assert max(float(w.detach().abs().max()) for w in dln.weights()) <= bound


def test_deep_linear_with_bn_normalises_every_hidden_layer() -> None:
    dln = nets.DeepLinear(10, 5, norm="bn", seed=0)
    assert len(dln.norms) == 4 and all(isinstance(n, norms.BatchNorm) for n in dln.norms)
    _, feats = dln(torch.randn(64, 10) * 5, features=True)
    torch.testing.assert_close(feats[2].mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    with pytest.raises(BnbookError, match="one matrix"):
        dln.matrix()


# ------------------------------------------------------------------ ResNet (chapter 8)
@pytest.mark.parametrize(
    "depth,total,bn_params",
    [(14, 175_258, 1_120), (32, 466_906, 2_464), (56, 855_770, 4_256), (110, 1_730_714, 8_288)],
)
def test_resnet_counts_match_the_openlth_table(depth, total, bn_params) -> None:
    net = nets.ResNet(depth, seed=0)
    w, d = 16, (depth - 2) // 6
    assert sum(p.numel() for p in net.parameters()) == total
    assert sum(p.numel() for p in nets.bn_parameters(net)) == bn_params == 2 * (7 * w + 14 * d * w)
    assert sum(p.numel() for p in nets.output_parameters(net)) == 650
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs) and len(convs) == depth - 1 + 2  # + two 1×1 shortcuts


def test_resnet_shapes_init_and_norm_positions() -> None:
    net = nets.ResNet(20, 8, in_channels=1, num_classes=7, seed=1)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    gammas = torch.cat([m.weight.detach() for m in net.modules() if isinstance(m, norms.BatchNorm)])
    assert gammas.min() >= 0 and gammas.max() < 1 and 0.35 < float(gammas.mean()) < 0.65  # U[0, 1)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules() if isinstance(m, norms.BatchNorm))
    ones = nets.ResNet(20, 8, gamma_init="one", seed=1)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in ones.modules() if isinstance(m, norms.BatchNorm))
    big = nets.ResNet(8, 64, seed=0).blocks[0].conv2.weight.detach()  # Kaiming normal: std √(2 / (64·9))
    assert abs(float(big.std()) - math.sqrt(2 / (64 * 9))) < 0.02 * math.sqrt(2 / (64 * 9))
    w, d = 8, 3
    channels = lambda m: sum(n.num_features for n in m.modules() if isinstance(n, norms.BatchNorm))  # noqa: E731
    assert channels(net) == 7 * w + 14 * d * w
    second = nets.ResNet(20, 8, norm_positions="second", seed=1)
    assert channels(second) == 7 * w + 7 * d * w  # each block's first norm removed
    assert all(isinstance(b.norm1, nn.Identity) and isinstance(b.norm2, norms.BatchNorm) for b in second.blocks)
    none = nets.ResNet(20, 8, norm_positions="none", seed=1)
    assert channels(none) == 0 and not nets.bn_parameters(none)
    assert len(second(torch.randn(2, 3, 8, 8), features=True)[1]) == 19
    with pytest.raises(BnbookError, match="6D"):
        nets.ResNet(21)


# ------------------------------------------------------------------ freezing (OpenLTH's switches)
@pytest.mark.parametrize("switches", list(itertools.product([False, True], repeat=3)))
def test_freeze_sets_exactly_the_trainable_tensors(switches) -> None:
    bn_frozen, out_frozen, others_frozen = switches
    net = nets.ResNet(8, 4, seed=0)
    nets.freeze(net, True, True, True)  # start from all frozen: freeze() must also unfreeze
    nets.freeze(net, batchnorm_frozen=bn_frozen, output_frozen=out_frozen, others_frozen=others_frozen)
    names = {n for n, _ in net.named_parameters()}
    bn = {n for n in names if "norm" in n}  # stem_norm.*, blocks.i.norm1/2.*, shortcut norms below
    bn |= {n for n in names if ".shortcut.1." in n}
    out = {"readout.weight", "readout.bias"}
    expected = (set() if bn_frozen else bn) | (set() if out_frozen else out) | (set() if others_frozen else names - bn - out)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    assert len(bn) == 2 * (1 + 2 * 3 + 2) and len(names - bn - out) == 9  # 7 convs + 2 shortcut convs


def test_bn_parameters_cover_every_norm_kind() -> None:
    for spec in ("torch-bn", "noisy-bn", "gn", "ln", "brn", "l1"):
        net = nets.SmallCNN(widths=(8, 8), norm=spec, seed=0)
        assert len(nets.bn_parameters(net)) == 4, spec
    assert nets.bn_parameters(nets.SmallCNN(widths=(8, 8), norm="noise")) == []
    with pytest.raises(BnbookError, match="readout"):
        nets.output_parameters(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------ bf16 autocast, every norm
@pytest.mark.parametrize("spec", ALL_NORMS)
def test_every_norm_trains_under_bf16_autocast(spec) -> None:
    torch.manual_seed(0)
    for net, x in (
        (nets.SmallCNN(1, 3, (8, 8), norm=spec, seed=0), torch.randn(4, 1, 12, 12)),
        (nets.MLP(12, (8,), 3, "relu", norm=spec, seed=0), torch.randn(6, 12)),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, feats = net(x, features=True)
            loss = nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0, 1, 2][: len(x)]))
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(f.float()).all() for f in feats)
        for p in net.parameters():
            assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), spec
        assert all(b.dtype in (torch.float32, torch.long) for b in net.buffers())
        net.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = net(x)
        torch.testing.assert_close(reference.float(), net(x).float(), rtol=0.1, atol=0.1)


def test_norm_inputs_are_what_the_norm_layers_receive() -> None:
    net = nets.SmallCNN(1, 3, (4, 8), norm="bn", seed=0).eval()
    x = torch.randn(4, 1, 12, 12)
    first = net.convs[0](x)
    ins = nets.norm_inputs(net, x)
    assert len(ins) == 2 and torch.equal(ins[0], first)
    assert torch.equal(ins[1], net.convs[1](nn.functional.max_pool2d(torch.relu(net.norms[0](first)), 2)))
    resnet = nets.ResNet(8, 4, norm_positions="none", seed=0)
    assert len(nets.norm_slots(resnet)) == 7 + 2  # empty slots count too: 7 convs + 2 shortcut convs
    assert len(nets.norm_inputs(resnet, torch.randn(2, 3, 8, 8))) == 9
    assert not any(m._forward_pre_hooks for m in resnet.modules())  # the hooks are removed
