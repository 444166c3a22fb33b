"""Networks of the book, each an ordinary ``nn.Module`` for ONE model with one norm slot.

- :class:`MLP` — Ioffe & Szegedy's MNIST net (chapters 3 and 4).
- :class:`SmallCNN` — the small CNN of chapter 5 (BN when the batch is small).
- :class:`VGG` — Santurkar et al.'s "VGG-like" net for 32×32 inputs (chapters 6 and 7).
- :class:`DeepLinear` — Santurkar et al.'s 25-layer deep linear network (chapters 6 and 7).
- :class:`ResNet` — the OpenLTH-shaped CIFAR ResNet-N of Frankle et al. (chapter 8), with
  :func:`freeze`, :func:`bn_parameters` and :func:`output_parameters` for BN-only training.

Every normalisation layer comes from one registry, :func:`make_norm`, so a net's norm is
a single argument (``"bn"``, ``"noisy-bn"``, ``"l1"``, ``"ws+gn"``, ...). Every net has

- ``forward(x, features=False)``: logits, or with ``features=True`` the pair
  ``(logits, feats)`` whose list ``feats`` holds, for every normalised block in order, the
  **input of its nonlinearity** (after the norm slot, noise included; the conv/linear
  output where the slot is empty). The DLN, which has no nonlinearity, lists each
  layer's output instead;
- a ``seed`` argument and ``reset_parameters(seed)``: the initial weights depend on the
  seed only (each net draws from its own ``torch.Generator``), never on what was drawn
  before, so model k of an ensemble is the same whether it is trained alone or with others;
- the final linear layer named ``readout`` (what "output layer" means to :func:`freeze`).

The training engine (:mod:`bnbook.train`) runs K such models at once; the stacked-MLP
and packed-net code further down is its older machinery, kept until chapter 5 moves over.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from bnbook import norms
from bnbook.errors import BnbookError

NormSpec = None | str | Callable[[int], nn.Module]
"""How to build a normalisation layer: a name of :data:`NORMS` (optionally prefixed ``"ws+"``),
``None`` (= ``"none"``), or a factory ``num_features -> nn.Module``."""

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}

_ACT_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "identity": lambda t: t,  # the deep linear network's (not an MLP choice: see ACTIVATIONS)
}

# d activation / d input, written in terms of the activation's *output* a
_ACT_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sigmoid": lambda grad, a: torch.ops.aten.sigmoid_backward(grad, a),  # grad · a(1 − a)
    "tanh": lambda grad, a: torch.ops.aten.tanh_backward(grad, a),  # grad · (1 − a²)
    "relu": lambda grad, a: torch.ops.aten.threshold_backward(grad, a, 0),  # grad · [a > 0]
    "identity": lambda grad, a: grad,
}


# ---------------------------------------------------------------- the norm registry
NORMS: dict[str, str] = {
    "none": "no normalisation (the layer keeps its bias)",
    "bn": "our BatchNorm (bnbook.norms.BatchNorm), per channel over (N, H, W)",
    "torch-bn": "PyTorch's nn.BatchNorm1d / nn.BatchNorm2d",
    "noisy-bn": "BN followed by Santurkar et al.'s Algorithm 1 noise (norms.NoisyBatchNorm)",
    "noise": "Algorithm 1's noise alone, after a layer with no norm (norms.ShiftScaleNoise)",
    "l1": "ℓ1 batch normalisation of Santurkar et al. §3.3 (norms.LpBatchNorm, p=1)",
    "l2": "ℓ2 batch normalisation (norms.LpBatchNorm, p=2)",
    "linf": "ℓ∞ batch normalisation (norms.LpBatchNorm, p=∞)",
    "ln": "Layer Normalization: per sample over all features (GroupNorm(1, C) on feature maps)",
    "gn": "Group Normalization with groups of `group_size` channels (default 4)",
    "brn": "Batch Renormalization (norms.BatchRenorm; options are its schedule)",
}
"""The norm names :func:`make_norm` knows; any may be prefixed ``"ws+"`` (``"ws"`` = ``"ws+none"``)
for Weight Standardization of the conv/linear layer before the norm."""

_NO_SHIFT = (None, "none", "noise")  # slots without a learned β: the layer before keeps its bias


def split_norm_spec(spec: NormSpec) -> tuple[bool, NormSpec]:
    """Split a norm spec into (weight-standardise the preceding layer?, the norm itself)."""
    if isinstance(spec, str):
        if spec == "ws":
            return True, "none"
        if spec.startswith("ws+"):
            base = spec[3:]
            if base.startswith("ws"):
                raise BnbookError(f"norm {spec!r}: 'ws+' may appear once")
            return True, base
    return False, spec


def _check_norm_spec(spec: NormSpec) -> NormSpec:
    """``spec`` if :func:`make_norm` can build it, else a :class:`BnbookError` naming the choices."""
    _, base = split_norm_spec(spec)
    if base is None or base in NORMS or (callable(base) and not isinstance(base, str)):
        return spec
    raise BnbookError(
        f"unknown norm {spec!r}: use one of {', '.join(NORMS)} (optionally prefixed 'ws+'), "
        "None, or a factory num_features -> nn.Module"
    )


def make_norm(spec: NormSpec, num_features: int, dims: int = 1, **options) -> nn.Module | None:
    """The normalisation layer ``spec`` names for ``num_features`` features, or ``None`` for no norm.

    Args:
        spec: a name of :data:`NORMS`, ``None``, or a factory ``num_features -> nn.Module``.
            A ``"ws+"`` prefix is accepted and ignored here: Weight Standardization belongs to
            the conv/linear layer *before* the norm, which the nets build from the same spec.
        num_features: channels (feature maps) or features (vectors).
        dims: 1 for (N, F) inputs, 2 for (N, C, H, W) feature maps (chooses ``nn.BatchNorm1d``
            or ``2d`` for ``"torch-bn"``, and LN's form).
        options: keyword arguments of the layer's class, e.g. ``eps``, ``momentum``;
            ``group_size`` for ``"gn"``; ``centred`` for the ℓp norms; the schedule of
            ``"brn"``; the noise constants of ``"noisy-bn"`` / ``"noise"``.
    """
    _check_norm_spec(spec)
    if dims not in (1, 2):
        raise BnbookError(f"make_norm: dims must be 1 (vectors) or 2 (feature maps), got {dims}")
    _, base = split_norm_spec(spec)
    if base is None or base == "none":
        return None
    if not isinstance(base, str):
        if options:
            raise BnbookError(f"norm options {sorted(options)} cannot be passed to a factory; bind them in it")
        return base(num_features)
    options = dict(options)
    try:
        if base == "bn":
            return norms.BatchNorm(num_features, **options)
        if base == "torch-bn":
            return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, **options)
        if base == "noisy-bn":
            return norms.NoisyBatchNorm(num_features, **options)
        if base == "noise":
            return norms.ShiftScaleNoise(num_features, **options)
        if base in ("l1", "l2", "linf"):
            p = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}[base]
            return norms.LpBatchNorm(num_features, p=p, **options)
        if base == "ln":
            return norms.LayerNorm(num_features, **options) if dims == 1 else norms.GroupNorm(1, num_features, **options)
        if base == "gn":
            group_size = int(options.pop("group_size", 4))
            if group_size < 1 or num_features % group_size:
                raise BnbookError(f"GroupNorm: {num_features} channels are not a multiple of the group size {group_size}")
            return norms.GroupNorm(num_features // group_size, num_features, **options)
        if base == "brn":
            return norms.BatchRenorm(num_features, **options)
    except TypeError as err:  # an option the layer does not take
        raise BnbookError(f"norm {spec!r}: bad options {options}: {err}") from None
    raise AssertionError(f"norm {base!r} is listed in NORMS but not built")  # pragma: no cover


def _slot(spec: NormSpec, num_features: int, dims: int, options: Mapping | None) -> nn.Module:
    """A norm slot: the layer :func:`make_norm` builds, or ``nn.Identity`` for no norm (see :func:`norm_slots`)."""
    layer = make_norm(spec, num_features, dims, **dict(options or {}))
    slot = nn.Identity() if layer is None else layer
    slot.is_norm_slot = True
    return slot


def norm_slots(model: nn.Module) -> list[nn.Module]:
    """The norm slots of one of this module's nets, in module order (``nn.Identity`` where a slot is empty)."""
    return [m for m in model.modules() if getattr(m, "is_norm_slot", False)]


def norm_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """What every norm slot receives in one forward pass of ``model`` on ``x``, in call order.

    These are the conv/linear outputs whose statistics BN takes (chapter 5 compares them
    with the running averages). The forward pass runs in the model's current mode, so in
    training mode it updates BN's running statistics: wrap it in
    :func:`bnbook.train.no_side_effects` or call it in evaluation mode.
    """
    seen: list[Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for m in norm_slots(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _has_shift(spec: NormSpec) -> bool:
    """Whether the norm named by ``spec`` has a learned shift β (then the layer before needs no bias)."""
    return split_norm_spec(spec)[1] not in _NO_SHIFT


def _check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise BnbookError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return name


# ---------------------------------------------------------------- initialisation
def _generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed`` (``None``: PyTorch's global generator)."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def _fill(param: Tensor, values: Tensor) -> None:
    """Copy CPU-drawn ``values`` into ``param`` (any device and dtype): the draw is device-independent."""
    param.copy_(values.reshape(param.shape))


def _fans(weight: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a linear (out, in) or conv (out, in, k, k) weight."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _he_normal(weight: Tensor, gen: torch.Generator | None) -> None:
    """He et al. (2015): N(0, 2/fan_in) — ``nn.init.kaiming_normal_``'s default, for ReLU nets."""
    fan_in, _ = _fans(weight)
    _fill(weight, torch.randn(weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


def _glorot_uniform(weight: Tensor, gen: torch.Generator | None) -> None:
    """Glorot & Bengio (2010): U(±√(6/(fan_in + fan_out))), variance 2/(fan_in + fan_out)."""
    fan_in, fan_out = _fans(weight)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    _fill(weight, (torch.rand(weight.shape, generator=gen) * 2 - 1) * bound)


def _torch_default_uniform(t: Tensor, fan_in: int, gen: torch.Generator | None) -> None:
    """U(±1/√fan_in): PyTorch's default for a linear layer's bias."""
    _fill(t, (torch.rand(t.shape, generator=gen) * 2 - 1) * fan_in**-0.5)


def _reset_norm(layer: nn.Module, gamma: Callable[[Tensor], None] | None = None) -> None:
    """γ = 1 (or ``gamma(γ)``), β = 0 and fresh running statistics for one norm layer."""
    with torch.no_grad():
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        if isinstance(weight, Tensor):
            weight.fill_(1.0) if gamma is None else gamma(weight)
        if isinstance(bias, Tensor):
            bias.zero_()
    if hasattr(layer, "reset_running_stats"):
        layer.reset_running_stats()


def reset_parameters(model: nn.Module, seed: int | None) -> nn.Module:
    """Re-initialise ``model`` (one of this module's nets) from ``seed``, as a fresh ``model`` with that seed."""
    if not hasattr(model, "reset_parameters"):
        raise BnbookError(f"{type(model).__name__} has no reset_parameters(seed)")
    model.reset_parameters(seed)
    return model


# ---------------------------------------------------------------- MLP (chapters 3, 4)
class MLP(nn.Module):
    """Fully connected net: ``hidden`` blocks ``Linear → [norm] → activation``, then a linear read-out.

    Chapter 3 uses ``MLP(784, (100, 100, 100), 10, "sigmoid", norm="bn")`` (Ioffe & Szegedy §4.1).

    Args:
        in_features: size of one (flattened) input.
        hidden: widths of the hidden layers.
        num_classes: outputs of the read-out layer (logits; the loss applies the softmax).
        activation: ``"sigmoid"``, ``"relu"`` or ``"tanh"``.
        norm: the normalisation spec (see :func:`make_norm`), applied before every activation;
            a ``"ws+"`` prefix standardises the hidden linear layers' weights.
        init_std: if given, weights are drawn from N(0, init_std²) and biases set to 0;
            if ``None``, PyTorch's default ``nn.Linear`` initialisation is kept.
        bias: whether hidden linear layers have a bias; default: only when the norm has no β
            (β takes the bias's role, §3.2 of the paper).
        seed: if given, the initialisation uses its own generator seeded with it, so a model
            depends on its seed only (not on what was drawn before).
        norm_options: keyword arguments for every norm layer (see :func:`make_norm`).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: NormSpec = None,
        init_std: float | None = None,
        bias: bool | None = None,
        seed: int | None = None,
        norm_options: Mapping | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise BnbookError(f"MLP sizes must be positive, got in={in_features}, hidden={tuple(hidden)}, out={num_classes}")
        if init_std is not None and not init_std > 0:
            raise BnbookError(f"init_std must be positive, got {init_std}")
        self.in_features = in_features
        self.hidden_sizes = tuple(int(h) for h in hidden)
        self.num_classes = num_classes
        self.activation = _check_activation(activation)
        self.norm_spec = _check_norm_spec(norm)
        self.weight_standardised, _ = split_norm_spec(norm)
        self.hidden_bias = (not _has_shift(norm)) if bias is None else bias
        sizes = (in_features, *self.hidden_sizes)
        linear = norms.WSLinear if self.weight_standardised else nn.Linear
        self.linears = nn.ModuleList(linear(a, b, bias=self.hidden_bias) for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(_slot(norm, h, 1, norm_options) for h in self.hidden_sizes)
        self.act = ACTIVATIONS[activation]()
        self.readout = nn.Linear(sizes[-1], num_classes)
        self.init_std = init_std
        self.reset_parameters(seed)

    @property
    def has_norm(self) -> bool:
        """Whether the hidden layers are normalised."""
        return not all(isinstance(n, nn.Identity) for n in self.norms)

    def reset_parameters(self, seed: int | None = None) -> None:
        """(Re-)initialise the weights: N(0, init_std²) or PyTorch's default, from ``seed`` if given."""
        gen = _generator(seed)
        for lin in [*self.linears, self.readout]:
            if self.init_std is None:
                # PyTorch's default: U(-1/√fan_in, 1/√fan_in) for weights and biases
                bound = lin.in_features**-0.5
                with torch.no_grad():
                    lin.weight.copy_(torch.empty_like(lin.weight, device="cpu").uniform_(-bound, bound, generator=gen))
                    if lin.bias is not None:
                        lin.bias.copy_(torch.empty_like(lin.bias, device="cpu").uniform_(-bound, bound, generator=gen))
            else:
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * self.init_std)
                    if lin.bias is not None:
                        lin.bias.zero_()
        for n in self.norms:
            _reset_norm(n)

    def pre_activations(self, x: Tensor) -> list[Tensor]:
        """The input of each hidden layer's activation (after the norm), one (B, width) tensor per layer."""
        return self.forward(x, features=True)[1]

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, num_classes) of a batch (any shape; flattened from dim 1); with ``features``
        also each activation's input (B, width)."""
        feats = []
        h = x.flatten(1)
        for lin, norm in zip(self.linears, self.norms):
            z = norm(lin(h))
            if features:
                feats.append(z)
            h = self.act(z)
        out = self.readout(h)
        return (out, feats) if features else out


# ---------------------------------------------------------------- small CNN (chapter 5)
def _conv(spec: NormSpec, c_in: int, c_out: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A k×k convolution with padding k//2, weight-standardised when ``spec`` says ``"ws+"``."""
    cls = norms.WSConv2d if split_norm_spec(spec)[0] else nn.Conv2d
    return cls(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)


class SmallCNN(nn.Module):
    """Chapter 5's CNN: blocks ``conv3×3 → norm → ReLU`` (the first with stride ``stem_stride``),
    a 2×2 max-pool between blocks, global average pooling and a linear read-out.

    On 28×28 inputs with the defaults the blocks see 14×14, 7×7 and 3×3 maps, so the last
    norm has m = 9·N values per channel — few, as in the last stage of an ImageNet ResNet.

    Initialisation (identical, model by model, to the packed nets chapter 5 used before):
    every conv draws He-normal weights N(0, 2/fan_in) from a generator seeded with ``seed``
    (each conv restarts it), the read-out U(±1/√fan_in) from ``seed + 10_000``; biases
    (convs have one only without a norm) start at 0.

    Args:
        in_channels: input channels (1 for Fashion-MNIST, 3 for CIFAR-10).
        num_classes: outputs of the read-out.
        widths: channels of each block.
        stem_stride: stride of the first convolution.
        norm: the norm spec of every block (see :func:`make_norm`).
        seed: initialisation seed (``None``: PyTorch's global generator).
        group_size: channels per group for ``"gn"``.
        renorm: keyword arguments of :class:`bnbook.norms.BatchRenorm` (its r/d schedule) for ``"brn"``.
        norm_options: further keyword arguments for every norm layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        stem_stride: int = 2,
        norm: NormSpec = "bn",
        seed: int | None = None,
        group_size: int = 4,
        renorm: Mapping | None = None,
        norm_options: Mapping | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or not widths or any(w < 1 for w in widths) or stem_stride < 1:
            raise BnbookError(f"SmallCNN sizes must be positive, got in={in_channels}, widths={tuple(widths)}")
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, tuple(int(w) for w in widths)
        self.norm_spec = _check_norm_spec(norm)
        base = split_norm_spec(norm)[1]
        options = dict(norm_options or {})
        if base == "gn":
            options.setdefault("group_size", group_size)
        if base == "brn":
            options = {**dict(renorm or {}), **options}
        bias = not _has_shift(norm)
        sizes = (in_channels, *self.widths)
        self.convs = nn.ModuleList(
            _conv(norm, a, b, 3, stride=stem_stride if i == 0 else 1, bias=bias) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))
        )
        self.norms = nn.ModuleList(_slot(norm, w, 2, options) for w in self.widths)
        self.readout = nn.Linear(self.widths[-1], num_classes)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        """He-normal convs (each from a fresh generator seeded ``seed``), read-out from ``seed + 10_000``."""
        for conv in self.convs:
            _he_normal(conv.weight, _generator(seed))
            if conv.bias is not None:
                _fill(conv.bias, torch.zeros(conv.bias.shape))
        gen = _generator(None if seed is None else seed + 10_000)
        _torch_default_uniform(self.readout.weight, self.readout.in_features, gen)
        _fill(self.readout.bias, torch.zeros(self.readout.bias.shape))
        for n in self.norms:
            _reset_norm(n)

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, classes) of images (B, C, H, W); with ``features`` also each ReLU's input (B, C_i, H_i, W_i)."""
        feats, h = [], x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            z = norm(conv(h))
            if features:
                feats.append(z)
            h = torch.relu(z)
            if i < len(self.convs) - 1:
                h = nn.functional.max_pool2d(h, 2)
        out = self.readout(h.mean(dim=(2, 3)))
        return (out, feats) if features else out


# ---------------------------------------------------------------- VGG (chapters 6, 7)
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
"""Simonyan & Zisserman's configurations A (``vgg11``), B (``vgg13``) and D (``vgg16``):
conv widths in order, ``"M"`` = 2×2 max-pooling."""


class VGG(nn.Module):
    """Santurkar et al.'s "VGG-like" network for 32×32 images (chapters 6 and 7).

    The paper states only "a VGG-like network", trained on CIFAR-10 with Glorot
    initialisation. Everything else is our choice:

    - **Depth**: VGG-16's 13 conv layers (configuration D, ``widths="vgg16"``, the default),
      because the paper's layer labels reach #13; ``"vgg11"`` (A) and ``"vgg13"`` (B) or any
      sequence of widths and ``"M"`` are available.
    - **Width**: the configuration's widths (64 … 512) times ``width_multiplier``, rounded
      (at least 1), so quick profiles can run a narrow copy of the same shape.
    - **Blocks**: ``conv3×3 (padding 1) → norm → ReLU``, the norm before the ReLU as in
      Ioffe & Szegedy; convs have a bias only when the norm has no β.
    - **Head**: global average pooling, then one linear layer to the classes. After VGG's
      five poolings a 32×32 input is 1×1, so the pooling only flattens; no hidden
      fully connected layers (the common CIFAR form of VGG).
    - **Init**: Glorot-uniform U(±√(6/(fan_in + fan_out))) for every conv and the read-out,
      biases 0 (the paper says "Glorot"; uniform is Glorot & Bengio's own form).

    ``forward(x, features=True)`` lists each conv's ReLU input — layer #k of the paper's
    figures is ``feats[k - 1]``.

    Args:
        in_channels: 3 (CIFAR-10) or 1 (e.g. Fashion-MNIST padded to 32×32).
        num_classes: outputs.
        widths: a name of :data:`VGG_CONFIGS` or a sequence of conv widths and ``"M"``.
        width_multiplier: scales every conv width.
        norm: the norm spec of every conv (see :func:`make_norm`); ``"none"`` for the "standard" net.
        seed: initialisation seed (``None``: PyTorch's global generator).
        norm_options: keyword arguments for every norm layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: str | Sequence[int | str] = "vgg16",
        width_multiplier: float = 1.0,
        norm: NormSpec = "bn",
        seed: int | None = None,
        norm_options: Mapping | None = None,
    ) -> None:
        super().__init__()
        if isinstance(widths, str):
            if widths not in VGG_CONFIGS:
                raise BnbookError(f"unknown VGG configuration {widths!r}; known: {', '.join(VGG_CONFIGS)}")
            widths = VGG_CONFIGS[widths]
        if in_channels < 1 or num_classes < 1 or not width_multiplier > 0:
            raise BnbookError(f"VGG needs positive sizes, got in={in_channels}, classes={num_classes}, multiplier={width_multiplier}")
        if not any(w != "M" for w in widths) or any(w != "M" and not (isinstance(w, int) and w >= 1) for w in widths):
            raise BnbookError(f"VGG widths must be positive ints and 'M', with at least one conv; got {tuple(widths)}")
        plan = tuple("M" if w == "M" else max(1, round(w * width_multiplier)) for w in widths)
        self.in_channels, self.num_classes, self.plan = in_channels, num_classes, plan
        self.norm_spec = _check_norm_spec(norm)
        bias = not _has_shift(norm)
        convs, slots, pool_after, c = [], [], [], in_channels
        for w in plan:
            if w == "M":
                if convs:
                    pool_after[-1] += 1
                continue
            convs.append(_conv(norm, c, w, 3, bias=bias))
            slots.append(_slot(norm, w, 2, norm_options))
            pool_after.append(0)
            c = w
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(slots)
        self.pool_after = tuple(pool_after)  # 2×2 max-poolings after each conv block
        self.leading_pools = next(i for i, w in enumerate(plan) if w != "M")
        self.readout = nn.Linear(c, num_classes)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Glorot-uniform weights and zero biases from one generator seeded ``seed``; norms γ = 1, β = 0."""
        gen = _generator(seed)
        for layer in [*self.convs, self.readout]:
            _glorot_uniform(layer.weight, gen)
            if layer.bias is not None:
                _fill(layer.bias, torch.zeros(layer.bias.shape))
        for n in self.norms:
            _reset_norm(n)

    @staticmethod
    def _pool(h: Tensor, times: int) -> Tensor:
        for _ in range(times):
            if min(h.shape[-2:]) < 2:
                raise BnbookError(f"VGG: a {tuple(h.shape[-2:])} map cannot be max-pooled again; use 32×32 inputs")
            h = nn.functional.max_pool2d(h, 2)
        return h

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, classes) of images (B, C, 32, 32); with ``features`` also each conv's ReLU input."""
        feats, h = [], self._pool(x, self.leading_pools)
        for conv, norm, pools in zip(self.convs, self.norms, self.pool_after):
            z = norm(conv(h))
            if features:
                feats.append(z)
            h = self._pool(torch.relu(z), pools)
        out = self.readout(h.mean(dim=(2, 3)))
        return (out, feats) if features else out


# ---------------------------------------------------------------- deep linear network (chapters 6, 7)
class DeepLinear(nn.Module):
    """Santurkar et al.'s deep linear network (DLN): x ↦ W_depth ⋯ W_1 x, all W_i square (dim × dim).

    Appendix A.1 of the paper: 25 layers of 10×10, Glorot initialisation, trained to fit
    y = A x. We draw Glorot-uniform U(±√(6/(2·dim))) = U(±√(3/dim)) weights and use no
    biases (the model is the product of the matrices). With ``norm``, a norm layer follows
    each of the first ``depth − 1`` layers (our choice: not the output layer, which is
    the read-out ``readout`` = W_depth); ``norm=None`` is the paper's "standard" DLN.

    ``forward(x, features=True)`` lists every layer's output in order (after its norm),
    the last one being the network's output.
    """

    def __init__(
        self,
        dim: int = 10,
        depth: int = 25,
        norm: NormSpec = None,
        seed: int | None = None,
        norm_options: Mapping | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or depth < 1:
            raise BnbookError(f"DeepLinear needs dim >= 1 and depth >= 1, got dim={dim}, depth={depth}")
        self.dim, self.depth = dim, depth
        self.norm_spec = _check_norm_spec(norm)
        ws = split_norm_spec(norm)[0]
        linear = norms.WSLinear if ws else nn.Linear
        self.linears = nn.ModuleList(linear(dim, dim, bias=False) for _ in range(depth - 1))
        self.norms = nn.ModuleList(_slot(norm, dim, 1, norm_options) for _ in range(depth - 1))
        self.readout = nn.Linear(dim, dim, bias=False)
        self.reset_parameters(seed)

    def weights(self) -> list[Tensor]:
        """The matrices W_1, …, W_depth (each (dim, dim), acting as x ↦ W x), in the order they act."""
        return [lin.weight for lin in self.linears] + [self.readout.weight]

    def matrix(self) -> Tensor:
        """The end-to-end matrix W_depth ⋯ W_1 of a DLN without norms (output = x @ matrix().T)."""
        if any(not isinstance(n, nn.Identity) for n in self.norms) or split_norm_spec(self.norm_spec)[0]:
            raise BnbookError("DeepLinear.matrix: only a DLN without norm layers is one matrix")
        m = self.weights()[0]
        for w in self.weights()[1:]:
            m = w @ m
        return m

    def reset_parameters(self, seed: int | None = None) -> None:
        """Glorot-uniform matrices from one generator seeded ``seed``; norms γ = 1, β = 0."""
        gen = _generator(seed)
        for lin in [*self.linears, self.readout]:
            _glorot_uniform(lin.weight, gen)
        for n in self.norms:
            _reset_norm(n)

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Outputs (B, dim) of inputs (B, dim); with ``features`` also every layer's output."""
        feats, h = [], x
        for lin, norm in zip(self.linears, self.norms):
            h = norm(lin(h))
            if features:
                feats.append(h)
        out = self.readout(h)
        if features:
            feats.append(out)
            return out, feats
        return out


# ---------------------------------------------------------------- CIFAR ResNet (chapter 8)
RESNET_NORM_POSITIONS = ("all", "second", "none")
"""Where :class:`ResNet` puts its norm layers: after every conv; after every second conv of the
main path (the stem and each block's second conv) and the shortcut convs; nowhere."""


class _BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus the shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, spec: NormSpec, c_in: int, c_out: int, stride: int, first_norm: bool, second_norm: bool, options: Mapping | None):
        super().__init__()
        none = "ws" if split_norm_spec(spec)[0] else "none"
        self.conv1 = _conv(spec, c_in, c_out, 3, stride=stride)
        self.norm1 = _slot(spec if first_norm else none, c_out, 2, options)
        self.conv2 = _conv(spec, c_out, c_out, 3)
        self.norm2 = _slot(spec if second_norm else none, c_out, 2, options)
        if stride != 1 or c_in != c_out:
            # 1×1-conv + norm shortcut (OpenLTH, He et al.'s option B), only where the shape changes
            self.shortcut: nn.Module | None = nn.Sequential(
                _conv(spec, c_in, c_out, 1, stride=stride), _slot(spec if second_norm else none, c_out, 2, options)
            )
        else:
            self.shortcut = None

    def forward(self, x: Tensor, feats: list[Tensor] | None) -> Tensor:
        z1 = self.norm1(self.conv1(x))
        z2 = self.norm2(self.conv2(torch.relu(z1))) + (x if self.shortcut is None else self.shortcut(x))
        if feats is not None:
            feats += [z1, z2]
        return torch.relu(z2)


class ResNet(nn.Module):
    """The CIFAR ResNet-N of OpenLTH (Frankle et al.'s code), N = 6D + 2 (chapter 8).

    A 3×3 stem conv (W channels) + norm + ReLU; three stages of D basic blocks with
    W, 2W and 4W channels (the first block of stages 2 and 3 has stride 2 and a 1×1-conv +
    norm shortcut); global average pooling; a linear ``readout`` to the classes. Convs
    have no bias. Init as OpenLTH's ``kaiming_normal`` + ``uniform`` BN init: conv and
    read-out weights N(0, 2/fan_in), the read-out's bias PyTorch's U(±1/√fan_in), every norm's
    γ ~ U[0, 1) (``gamma_init="uniform"``) or 1 (``"one"``), β = 0 — all from one generator
    seeded ``seed``, in module order.

    With BN everywhere there are 7W + 14DW BN channels (W stem, 2W + 4W shortcuts, two per
    block); ResNet-14/32/56/110 have 175,258 / 466,906 / 855,770 / 1,730,714 parameters.

    Args:
        depth: N = 6D + 2 (8, 14, 20, 32, 56, 110, …).
        width: W, the first stage's channels (16 in OpenLTH).
        in_channels: 3 (CIFAR-10) or 1 (Fashion-MNIST).
        num_classes: outputs.
        norm: the norm spec of every norm slot (see :func:`make_norm`).
        gamma_init: ``"uniform"`` (γ ~ U[0, 1), OpenLTH/Frankle) or ``"one"``.
        norm_positions: ``"all"`` (after every conv), ``"second"`` (after every second conv of
            the main path — the stem and each block's second conv — and after the shortcut
            convs; each block's first conv loses its norm), or ``"none"``. Removing a norm
            removes its γ and β; convs stay without bias (all else equal).
        seed: initialisation seed (``None``: PyTorch's global generator).
        norm_options: keyword arguments for every norm layer.

    ``forward(x, features=True)`` lists every ReLU's input: the stem's, then per block the
    first norm's output and the sum of the second norm's output and the shortcut (N − 1 maps).
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        in_channels: int = 3,
        num_classes: int = 10,
        norm: NormSpec = "bn",
        gamma_init: str = "uniform",
        norm_positions: str = "all",
        seed: int | None = None,
        norm_options: Mapping | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise BnbookError(f"ResNet depth must be 6D + 2 with D >= 1 (8, 14, 20, 32, ...), got {depth}")
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise BnbookError(f"ResNet sizes must be positive, got width={width}, in={in_channels}, classes={num_classes}")
        if gamma_init not in ("uniform", "one"):
            raise BnbookError(f"gamma_init must be 'uniform' or 'one', got {gamma_init!r}")
        if norm_positions not in RESNET_NORM_POSITIONS:
            raise BnbookError(f"norm_positions must be one of {', '.join(RESNET_NORM_POSITIONS)}, got {norm_positions!r}")
        self.depth, self.width, self.blocks_per_stage = depth, width, (depth - 2) // 6
        self.in_channels, self.num_classes = in_channels, num_classes
        self.norm_spec = _check_norm_spec(norm)
        self.gamma_init, self.norm_positions = gamma_init, norm_positions
        first = norm_positions == "all"
        second = norm_positions != "none"
        none = "ws" if split_norm_spec(norm)[0] else "none"
        self.stem = _conv(norm, in_channels, width, 3)
        self.stem_norm = _slot(norm if second else none, width, 2, norm_options)
        blocks, c = [], width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(_BasicBlock(norm, c, c_out, stride, first, second, norm_options))
                c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.readout = nn.Linear(c, num_classes)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Kaiming-normal conv/read-out weights, default read-out bias, γ per ``gamma_init``, β = 0."""
        gen = _generator(seed)

        def gamma(w: Tensor) -> None:
            _fill(w, torch.rand(w.shape, generator=gen))  # U[0, 1), torch.rand as OpenLTH

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                _he_normal(module.weight, gen)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    _torch_default_uniform(module.bias, module.in_features, gen)
            elif is_norm_layer(module):
                _reset_norm(module, gamma if self.gamma_init == "uniform" else None)

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, classes) of images (B, C, H, W); with ``features`` also every ReLU's input."""
        feats: list[Tensor] | None = [] if features else None
        z = self.stem_norm(self.stem(x))
        if feats is not None:
            feats.append(z)
        h = torch.relu(z)
        for block in self.blocks:
            h = block(h, feats)
        out = self.readout(h.mean(dim=(2, 3)))
        return (out, feats) if features else out


# ---------------------------------------------------------------- freezing (chapter 8)
NORM_LAYER_TYPES: tuple[type, ...] = (
    norms.BatchNorm,
    norms.BatchRenorm,
    norms.GroupNorm,
    norms.LayerNorm,
    norms.LpBatchNorm,
    nn.modules.batchnorm._NormBase,  # nn.BatchNorm1d/2d/3d, nn.InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
)
"""Layers whose affine γ, β count as "BatchNorm parameters" for :func:`freeze` (BN and its relatives;
noisy BN's γ, β live in its inner :class:`bnbook.norms.BatchNorm`)."""


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with (possibly) affine γ, β."""
    return isinstance(module, NORM_LAYER_TYPES)


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The γ and β of every normalisation layer of ``model`` (OpenLTH's "batchnorm" tensors), in module order."""
    return [p for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)]


def output_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model.readout``, the output layer (OpenLTH's ``output_layer_names``)."""
    readout = getattr(model, "readout", None)
    if not isinstance(readout, nn.Module):
        raise BnbookError(f"{type(model).__name__} has no 'readout' output layer")
    return list(readout.parameters())


def freeze(
    model: nn.Module,
    batchnorm_frozen: bool = False,
    output_frozen: bool = False,
    others_frozen: bool = False,
) -> nn.Module:
    """Set ``requires_grad`` of every parameter of ``model`` by OpenLTH's three switches; returns ``model``.

    Each parameter is in exactly one group — the norm layers' γ, β (:func:`bn_parameters`),
    the output layer (:func:`output_parameters`), or the others (conv and linear weights) —
    and is trainable unless its group is frozen. Frankle et al.'s "BN only" is
    ``freeze(m, output_frozen=True, others_frozen=True)``; "BN + output" is
    ``freeze(m, others_frozen=True)``; "output only" is ``freeze(m, batchnorm_frozen=True, others_frozen=True)``.
    """
    bn = {id(p) for p in bn_parameters(model)}
    out = {id(p) for p in output_parameters(model)}
    for p in model.parameters():
        if id(p) in bn:
            p.requires_grad_(not batchnorm_frozen)
        elif id(p) in out:
            p.requires_grad_(not output_frozen)
        else:
            p.requires_grad_(not others_frozen)
    return model
