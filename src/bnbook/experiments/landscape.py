"""Chapter 7: the loss landscape of Santurkar et al. (2018), §3 — measured along the training trajectory.

One :func:`run` trains, for two architectures and several normalisations, ``seeds`` models
per variant (all seeds of a variant in one :func:`bnbook.train.fit` call):

- **VGG** (:class:`bnbook.nets.VGG`) on 32×32 images by plain SGD, and **the deep linear
  network** (DLN, :class:`bnbook.nets.DeepLinear`: 25 layers of 10×10, full-batch GD on the
  squared error ``‖W₂₅⋯W₁x − Ax‖²`` summed over 1,000 Gaussian points, :func:`dln_dataset`);
- each with the variants ``none`` (the "standard" net), ``bn``, and the ℓp normalisations
  ``l1``, ``l2``, ``linf`` of §3.3 (:class:`bnbook.norms.LpBatchNorm`).

A step hook (:func:`landscape_hook`) fires every ``probe_every`` steps (and at the early step
of Fig. 11). With the models at ``W(t)`` and, by default, the very mini-batch of the next
update, it probes the loss along ``w − η g`` (``g = ∇L(w)``) and along a random direction of
the same length, for the η grid of the config in units of the learning rate
(:func:`bnbook.landscape.line_probe`); it records every block's gradient norm and, in BN nets,
the per-layer terms of Theorem 4.1 (:func:`bnbook.landscape.bn_layer_terms`). A probe at the
log steps records the per-channel moments of chosen layers (distributional shift). After
training: activation histograms and Li et al.'s filter-normalised 2-D loss surfaces around the
trained VGG with and without BN (:func:`bnbook.landscape.surface_2d`).

The figures of the chapter are drawn by the ``plot_*`` functions from the result's arrays;
:func:`summarise` computes every number the chapter quotes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from bnbook import data, landscape, nets, train
from bnbook.plots import seed_band
from bnbook.config import ChapterConfig
from bnbook.env import num_threads, seed_everything
from bnbook.errors import BnbookError
from bnbook.results import Outcome

ARCHS = ("vgg", "dln")
VARIANTS = ("none", "bn", "l1", "l2", "linf")
LABELS = {"none": "standard", "bn": "BN", "l1": "ℓ1", "l2": "ℓ2", "linf": "ℓ∞", "vgg": "VGG", "dln": "DLN"}
COLORS = {"none": "#d62728", "bn": "#1f77b4", "l1": "#2ca02c", "l2": "#9467bd", "linf": "#ff7f0e"}
DIRECTIONS = ("gradient", "random")
HIST_QUANTILES = (5, 15, 30, 50, 70, 85, 95)  # percentiles of a layer's activations recorded over training

# Santurkar et al., Fig. 4 (VGG on CIFAR-10, 15k steps, lr 0.1), digitised by hand: the band of each measure
# in a ±300-step window. Steps at which the paper's bands were read, and the values (standard, BN).
PAPER_FIG4 = {
    "scale": "VGG on CIFAR-10, batch 128, lr 0.1, 15,000 steps",
    "steps": 15_000,
    "loss_range": {  # step -> ((standard min, max), (BN min, max))
        1_000: ((2.7, 8.1), (1.9, 2.7)),
        2_500: ((1.8, 9.7), (1.6, 2.1)),
        15_000: ((0.68, 4.2), (0.63, 0.87)),
    },
    "change_max_2500": (255.0, 34.0),  # gradient-change ℓ2 range, upper end, at ≈2.5k steps
    "beta_peak": (45.0, 25.0),  # effective β: standard peaks ≈45; BN stays within ≈16–25
    "beta_late": (20.0, 16.0),  # standard settles ≈20; BN's lower end ≈16
}


@dataclasses.dataclass(frozen=True)
class LandscapeConfig(ChapterConfig):
    """Santurkar et al. §3 (Figs. 4–6, 10–13) on a VGG and the 25-layer DLN. Defaults: the quick profile."""

    dataset: str = "fashion-mnist"  # VGG data, zero-padded to 32×32 ('cifar10' in the paper profile)
    train_size: int = 10_000  # training images used (0: all)
    test_size: int = 1_000  # test images for the test curves (0: all)
    vgg_widths: str = "vgg11"  # VGG configuration (nets.VGG_CONFIGS): 'vgg11' = A, 8 conv layers; 'vgg16' = D, 13
    vgg_width_multiplier: float = 0.0625  # conv widths × this (1/16: 4-8-16-16-32-32-32-32)
    vgg_steps: int = 240  # SGD steps (paper: 15,000)
    vgg_batch: int = 128  # mini-batch (paper: 128)
    vgg_lr: float = 0.1  # constant learning rate (paper: 0.1)
    vgg_etas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # probe steps η in units of lr (paper: [½, 4] × lr, Fig. 11's points)
    dln_steps: int = 400  # full-batch GD steps (paper: 10,000)
    dln_lr: float = 1e-6  # (paper: 1e-6)
    dln_points: int = 1_000  # training points (paper: 1,000); as many test points
    dln_dim: int = 10  # width of every layer (paper: 10)
    dln_depth: int = 25  # layers (paper: 25)
    dln_etas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 30.0)  # η in units of lr (paper: [1/100, 30] × lr)
    variants: tuple[str, ...] = VARIANTS  # normalisations trained on both architectures
    seeds: int = 3  # models per variant (seed, seed + 1, ...)
    probe_every: int = 30  # landscape probe every this many VGG steps (the DLN: scaled to its steps)
    early_step: int = 5  # the "early" step of Fig. 11 (paper: 100); the late one is the last step
    probe_batch: str = "step"  # gradients on: 'step' = the mini-batch of that step's update | 'fixed' = one fixed training batch
    random_for: tuple[str, ...] = ("none", "bn")  # variants also probed along a random direction of the gradient's length
    probe_size: int = 256  # test inputs on which activation moments are recorded
    hist_layers: tuple[int, int] = (1, -2)  # blocks whose activations are shown (VGG; the DLN uses depth//3, 2·depth//3)
    hist_values: int = 4_000  # activation values per histogram
    surface_points: int = 9  # Li et al. surface: grid points per axis
    surface_span: float = 1.0  # grid from −span to span along each filter-normalised direction
    surface_examples: int = 256  # training examples the surface loss is computed on

    profiles: ClassVar = {
        "smoke": {
            "train_size": 512, "test_size": 256, "vgg_width_multiplier": 0.03125, "vgg_steps": 6,
            "vgg_batch": 32, "dln_steps": 8, "dln_points": 200, "dln_depth": 6, "seeds": 2, "probe_every": 3,
            "early_step": 1, "probe_size": 64, "hist_values": 500, "surface_points": 3, "surface_examples": 64,
        },
        "paper": {
            "dataset": "cifar10", "train_size": 0, "test_size": 0, "vgg_widths": "vgg16", "vgg_width_multiplier": 1.0,
            "vgg_steps": 15_000, "dln_steps": 10_000, "probe_every": 250, "early_step": 100, "probe_size": 1_000,
            "surface_points": 31, "surface_examples": 2_000,
        },
    }

    def __post_init__(self) -> None:
        for name in ("vgg_steps", "vgg_batch", "dln_steps", "dln_points", "dln_dim", "dln_depth", "seeds",
                     "probe_every", "probe_size", "hist_values", "surface_points", "surface_examples"):
            if getattr(self, name) < 1:
                raise BnbookError(f"LandscapeConfig.{name} must be a positive integer, got {getattr(self, name)}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or "none" not in self.variants or "bn" not in self.variants:
            raise BnbookError(f"variants must include 'none' and 'bn' and be among {VARIANTS}; got {self.variants}")
        if self.probe_batch not in ("step", "fixed"):
            raise BnbookError(f"probe_batch must be 'step' or 'fixed', got {self.probe_batch!r}")
        if min(self.vgg_etas + self.dln_etas) <= 0 or not (self.vgg_lr > 0 and self.dln_lr > 0):
            raise BnbookError("learning rates and η multiples must be positive")
        if not 0 <= self.early_step < self.vgg_steps:
            raise BnbookError(f"early_step must lie in [0, vgg_steps), got {self.early_step}")

    def arch(self, name: str) -> dict[str, Any]:
        """The training settings of architecture ``name`` ('vgg' or 'dln')."""
        if name == "vgg":
            return {"steps": self.vgg_steps, "batch": self.vgg_batch, "lr": self.vgg_lr, "etas": self.vgg_etas,
                    "every": self.probe_every, "loss": "cross_entropy"}
        if name == "dln":
            every = max(1, round(self.probe_every * self.dln_steps / self.vgg_steps))
            return {"steps": self.dln_steps, "batch": self.dln_points, "lr": self.dln_lr, "etas": self.dln_etas,
                    "every": every, "loss": "squared_sum"}
        raise BnbookError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")


# ------------------------------------------------------------------------------ data
def dln_dataset(points: int, dim: int, seed: int, device: torch.device | str = "cpu") -> data.Dataset:
    """Santurkar et al.'s DLN task: Gaussian inputs ``x`` and targets ``A x`` with a Gaussian 10×10 ``A``.

    ``points`` training and as many test points, all i.i.d. ``N(0, I)``; ``A`` has i.i.d.
    ``N(0, 1)`` entries. Fixed by ``seed`` alone (its own generator).
    """
    gen = torch.Generator().manual_seed(int(seed))
    A = torch.randn(dim, dim, generator=gen)
    x_train = torch.randn(points, dim, generator=gen)
    x_test = torch.randn(points, dim, generator=gen)
    ds = data.Dataset(
        "dln-gaussian", x_train, x_train @ A.T, x_test, x_test @ A.T, (),
        f"{points} train / {points} test Gaussian points in R^{dim}, targets A x with a Gaussian {dim}×{dim} A",
    )
    return ds.to(device)


def vgg_dataset(cfg: LandscapeConfig, device: torch.device) -> data.Dataset:
    """The VGG's images at 32×32 (Fashion-MNIST zero-padded), subset as the config says."""
    ds = data.load(cfg.dataset, device)
    if ds.x_train.shape[-1] < 32:
        ds = ds.padded(32)
    return ds.subset(cfg.train_size, cfg.test_size, seed=cfg.seed)


# ----------------------------------------------------------------------------- models
def make_models(arch: str, variant: str, cfg: LandscapeConfig, in_channels: int, device: torch.device) -> list[torch.nn.Module]:
    """The ``seeds`` models of one variant (model k initialised from seed ``cfg.seed + k``)."""
    norm = None if variant == "none" else variant
    out = []
    for k in range(cfg.seeds):
        if arch == "vgg":
            m = nets.VGG(in_channels=in_channels, num_classes=10, widths=cfg.vgg_widths,
                         width_multiplier=cfg.vgg_width_multiplier, norm=norm, seed=cfg.seed + k)
        else:
            m = nets.DeepLinear(dim=cfg.dln_dim, depth=cfg.dln_depth, norm=norm, seed=cfg.seed + k)
        out.append(m.to(device))
    return out


def _aggregate_bn_terms(terms: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer summaries of :func:`bnbook.landscape.bn_layer_terms`: each a ``(layers,)`` tensor."""
    def stack(f) -> Tensor:
        return torch.stack([f(t) for t in terms]).float().cpu()

    return {
        "t41_grad_bn": stack(lambda t: t["grad_sq_bn"].sum()),  # ‖∇_y L̂‖² (summed over channels)
        "t41_grad_z": stack(lambda t: t["grad_sq_z"].sum()),  # ‖g‖² (same-z unnormalised twin)
        "t41_scaled_z": stack(lambda t: (t["scale"] * t["grad_sq_z"]).sum()),  # Σ_j (γ_j²/σ_j²)‖g_j‖²
        "t41_scale_med": stack(lambda t: t["scale"].median()),  # median over channels of γ²/(σ² + ε)
        "t41_below1": stack(lambda t: (t["scale"] < 1).double().mean()),  # share of channels with γ²/σ² < 1
        "t41_mean": stack(lambda t: t["mean_term"].sum()),
        "t41_yhat": stack(lambda t: t["yhat_term"].sum()),
        "t41_res": stack(lambda t: (t["grad_sq_bn"] - t["rhs"]).abs().max() / t["grad_sq_bn"].abs().max().clamp_min(1e-300)),
    }


def landscape_hook(
    etas: Sequence[float],
    loss: str,
    directions: Sequence[str],
    bn_terms: bool,
    seed: int,
    fixed_batch: tuple[Tensor, Tensor] | None = None,
    layer_grads: bool = True,
):
    """The step hook's function: for each model, line probes along ``directions``, block gradients, BN terms.

    ``etas`` are multiples of the step's learning rate. The probe batch is the step's own
    mini-batch unless ``fixed_batch`` is given. Values per model: ``loss``, ``change``,
    ``beta`` of shape (directions, η); ``loss0``, ``gnorm``; with ``layer_grads`` every block's
    ``layer_grad`` (blocks,); and with ``bn_terms`` the ``t41_*`` per-layer summaries.
    """
    def fn(ctx: train.StepContext) -> dict[str, Tensor]:
        rows: dict[str, list[Tensor]] = {}
        for k, model in enumerate(ctx.models):
            x, y = (ctx.x[k], ctx.y[k]) if fixed_batch is None else fixed_batch
            probes = landscape.line_probe(
                model, x, y, [e * ctx.lr for e in etas], loss=loss, directions=directions,
                seed=seed * 1_000_003 + ctx.step * 101 + k,
            )
            values = {
                "loss": torch.stack([p.loss for p in probes]),
                "change": torch.stack([p.grad_change for p in probes]),
                "beta": torch.stack([p.beta for p in probes]),
                "loss0": probes[0].loss0,
                "gnorm": probes[0].grad_norm,
            }
            if layer_grads:
                values["layer_grad"] = landscape.layer_gradient_norms(model, x, y, loss)
            if bn_terms:
                values.update(_aggregate_bn_terms(landscape.bn_layer_terms(model, x, y, loss)))
            for name, v in values.items():
                rows.setdefault(name, []).append(v.float().cpu())
        return {name: torch.stack(v) for name, v in rows.items()}

    return fn


def activation_probe(layers: Sequence[int], quantiles: Sequence[float]):
    """An engine probe: per chosen block, its per-channel means and variances and the ``quantiles`` of all its values.

    Returns ``(K, Σ_l (2·C_l + Q))``: for each layer in turn, C means, C variances, Q quantiles.
    """
    def probe(models: list[torch.nn.Module], x: Tensor) -> Tensor:
        rows = [landscape.activation_summary(m, x, layers, quantiles) for m in models]
        return torch.stack([torch.cat([t.cpu() for layer in row for t in layer]) for row in rows])

    return probe


def _hist_layers(arch: str, cfg: LandscapeConfig, blocks: int) -> list[int]:
    if arch == "vgg":
        return sorted({l % blocks for l in cfg.hist_layers})
    return sorted({max(0, cfg.dln_depth // 3 - 1), max(0, 2 * cfg.dln_depth // 3 - 1)})


def train_variant(
    arch: str, variant: str, cfg: LandscapeConfig, ds: data.Dataset, device: torch.device
) -> tuple[dict[str, np.ndarray], list[torch.nn.Module], dict[str, float]]:
    """Train all seeds of one (architecture, variant) in one ``fit`` call with the landscape hook.

    Returns the arrays (prefixed ``{arch}_{variant}_``), the trained models and timings.
    """
    s = cfg.arch(arch)
    seed_everything(cfg.seed)
    models = make_models(arch, variant, cfg, ds.x_train.shape[1], device)
    with train.no_side_effects(models[0]), torch.no_grad():  # a look at the architecture must not move BN statistics
        feats = models[0](ds.x_train[:2], features=True)[1]
    blocks, channels = len(feats), [f.shape[1] for f in feats]
    layers = _hist_layers(arch, cfg, blocks)
    directions = DIRECTIONS if variant in cfg.random_for else DIRECTIONS[:1]
    fixed = None
    if cfg.probe_batch == "fixed":
        fixed = (ds.x_train[: s["batch"]], ds.y_train[: s["batch"]])
    hook = landscape_hook(s["etas"], s["loss"], directions, bn_terms=variant == "bn", seed=cfg.seed, fixed_batch=fixed,
                          layer_grads=variant in ("none", "bn"))
    early = min(cfg.early_step, s["steps"] - 1)
    fit_cfg = train.FitConfig(
        steps=s["steps"], batch_size=s["batch"], lr=s["lr"], loss=s["loss"], log_every=s["every"],
        eval_batch=1_000, probe_size=min(cfg.probe_size, len(ds.y_test)),
    )
    res = train.fit(
        models, ds, fit_cfg, seeds=[cfg.seed + k for k in range(cfg.seeds)],
        probes={"acts": activation_probe(layers, HIST_QUANTILES)},
        hooks={"land": train.StepHook(hook, every=s["every"], at=(early, s["steps"] - 1), when="before")},
    )
    p = f"{arch}_{variant}_"
    h = res.hooks["land"]
    arrays = {
        p + "steps": res.steps, p + "train_loss": res.train_loss, p + "test_loss": res.test_loss,
        p + "test_acc": res.test_acc, p + "diverged": res.diverged_step, p + "probe_steps": h["steps"],
        p + "hist_layers": np.array(layers),
        **{p + name: v for name, v in h["values"].items()},
    }
    # the activation probe's flat vector, split per layer
    acts = res.probes["acts"]  # (L, K, Σ(2C+Q))
    offset = 0
    for layer in layers:
        c, nq = channels[layer], len(HIST_QUANTILES)
        arrays[p + f"act{layer}_mean"] = acts[:, :, offset : offset + c]
        arrays[p + f"act{layer}_var"] = acts[:, :, offset + c : offset + 2 * c]
        arrays[p + f"act{layer}_q"] = acts[:, :, offset + 2 * c : offset + 2 * c + nq]
        offset += 2 * c + nq
        arrays[p + f"act{layer}_sample"] = landscape.activation_sample(
            models[0], ds.x_test[: cfg.probe_size], layer, cfg.hist_values, seed=cfg.seed
        ).numpy()
    times = {"train_s": res.train_time_s, "probe_s": res.eval_time_s}
    return arrays, models, times


def surfaces(models: dict[str, torch.nn.Module], ds: data.Dataset, cfg: LandscapeConfig) -> dict[str, np.ndarray]:
    """Li et al.'s filter-normalised 2-D loss surfaces around each trained model (same seeds for the directions)."""
    grid = np.linspace(-cfg.surface_span, cfg.surface_span, cfg.surface_points)
    x, y = ds.x_train[: cfg.surface_examples], ds.y_train[: cfg.surface_examples]
    out = {"surface_grid": grid}
    for variant, model in models.items():
        out[f"surface_{variant}"] = landscape.surface_2d(model, x, y, grid.tolist(), grid.tolist(), seed=cfg.seed).numpy()
    return out


def run(cfg: LandscapeConfig, device: torch.device) -> Outcome:
    """Train every (architecture, variant), probe the landscape during training, draw the surfaces.

    On a CPU everything runs on one thread: these nets are small, and on a shared two-core
    machine a second thread costs more in waiting than it gains.
    """
    with num_threads(1 if device.type == "cpu" else None):
        return _run(cfg, device)


def _run(cfg: LandscapeConfig, device: torch.device) -> Outcome:
    start = time.perf_counter()
    sets = {"vgg": vgg_dataset(cfg, device), "dln": dln_dataset(cfg.dln_points, cfg.dln_dim, cfg.seed, device)}
    arrays: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    trained: dict[str, torch.nn.Module] = {}
    for arch in ARCHS:
        for variant in cfg.variants:
            a, models, t = train_variant(arch, variant, cfg, sets[arch], device)
            arrays.update(a)
            times.update({f"{arch}_{variant}_{k}": v for k, v in t.items()})
            if arch == "vgg" and variant in ("none", "bn"):
                trained[variant] = models[0]
            if arch == "vgg":
                plan_vgg = "-".join(str(w) for w in models[0].plan)
    t0 = time.perf_counter()
    arrays.update(surfaces(trained, sets["vgg"], cfg))
    times["surface_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - start
    metrics = summarise(arrays, cfg)
    metrics.update(exercise_quadratic(), **exercise_scale_invariance(), **exercise_loss_scale(cfg))
    metrics["times"] = times
    metrics.update(vgg_plan=plan_vgg, vgg_batch=cfg.vgg_batch, vgg_lr=cfg.vgg_lr, dln_lr=cfg.dln_lr)
    metrics["train_images"] = int(len(sets["vgg"].y_train))
    metrics["test_images"] = int(len(sets["vgg"].y_test))
    return Outcome(metrics=metrics, arrays=arrays, datasets=[sets["vgg"].name, sets["dln"].name])


# ------------------------------------------------------------------------- exercises
class _Vector(torch.nn.Module):
    """A model that outputs its own parameter vector (the loss function does the rest)."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.w


def exercise_quadratic(eta: float = 0.005) -> dict[str, float]:
    """Exercise 1: ``L(w) = ½ wᵀHw`` with ``H = diag(1, 100)`` at ``w = (1, 0.01)``, probed by :func:`line_probe`."""
    H = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
    model = _Vector(torch.tensor([1.0, 0.01], dtype=torch.float64))
    dummy = torch.zeros(1, dtype=torch.float64)
    (p,) = landscape.line_probe(model, dummy, dummy, [eta], loss=lambda out, _y: 0.5 * out @ H @ out)
    return {"ex1_grad_norm": float(p.grad_norm), "ex1_change": float(p.grad_change[0]), "ex1_beta": float(p.beta[0])}


def exercise_scale_invariance(c: float = 2.0, eta: float = 0.3) -> dict[str, float]:
    """Exercise 2: for a scale-invariant loss, β at ``c·w`` with step η equals β at ``w`` with step η/c², over c²."""
    u = torch.tensor([0.6, -0.8, 0.0, 0.0], dtype=torch.float64)
    dummy = torch.zeros(1, dtype=torch.float64)

    def loss(out: Tensor, _y: Tensor) -> Tensor:  # depends on the direction of w only
        v = out / out.norm()
        return 0.5 * (v - u).pow(2).sum() + (v[2] * v[3]) ** 2

    w = torch.tensor([0.3, 0.4, 0.5, -0.7], dtype=torch.float64)
    (far,) = landscape.line_probe(_Vector(c * w), dummy, dummy, [eta], loss=loss)
    (near,) = landscape.line_probe(_Vector(w), dummy, dummy, [eta / c**2], loss=loss)
    return {"ex2_c": c, "ex2_beta_scaled": float(far.beta[0]), "ex2_beta_original": float(near.beta[0]),
            "ex2_ratio": float(far.beta[0] * c**2 / near.beta[0])}


def exercise_loss_scale(cfg: LandscapeConfig) -> dict[str, float]:
    """Exercise 3: the DLN at initialisation probed with the summed loss at lr and the averaged loss at lr × points."""
    ds = dln_dataset(cfg.dln_points, cfg.dln_dim, cfg.seed)
    model = nets.DeepLinear(dim=cfg.dln_dim, depth=cfg.dln_depth, norm=None, seed=cfg.seed)
    etas = [e * cfg.dln_lr for e in cfg.dln_etas]
    (summed,) = landscape.line_probe(model, ds.x_train, ds.y_train, etas, loss="squared_sum")
    (mean,) = landscape.line_probe(model, ds.x_train, ds.y_train, [e * cfg.dln_points for e in etas], loss="squared_mean")
    a = landscape.fig4_measures(summed.loss, summed.grad_change, summed.beta)
    b = landscape.fig4_measures(mean.loss, mean.grad_change, mean.beta)
    return {
        "ex3_width_ratio": float((a["loss_max"] - a["loss_min"]) / (b["loss_max"] - b["loss_min"])),
        "ex3_change_ratio": float(a["change_max"] / b["change_max"]),
        "ex3_beta_ratio": float(a["beta"] / b["beta"]),
    }


# -------------------------------------------------------------------------- summaries
def measures(A: dict[str, np.ndarray], arch: str, variant: str, direction: int = 0) -> dict[str, np.ndarray]:
    """Fig. 4's three measures for every probe step and seed: each (T, K)."""
    p = f"{arch}_{variant}_"
    m = landscape.fig4_measures(
        torch.as_tensor(A[p + "loss"][:, :, direction]),
        torch.as_tensor(A[p + "change"][:, :, direction]),
        torch.as_tensor(A[p + "beta"][:, :, direction]),
    )
    return {k: v.numpy().astype(np.float64) for k, v in m.items()}


def _nearest(steps: np.ndarray, target: float) -> int:
    return int(np.argmin(np.abs(steps.astype(float) - target)))


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summarise(A: dict[str, np.ndarray], cfg: LandscapeConfig) -> dict[str, Any]:
    """Every number the chapter quotes, from the arrays (NaN, e.g. a diverged run, becomes ``None``)."""
    with np.errstate(all="ignore"):
        return _summarise(A, cfg)


def _summarise(A: dict[str, np.ndarray], cfg: LandscapeConfig) -> dict[str, Any]:
    M: dict[str, Any] = {"variants": list(cfg.variants), "seeds": cfg.seeds}
    for arch in ARCHS:
        s = cfg.arch(arch)
        M[f"{arch}_steps"] = s["steps"]
        M[f"{arch}_every"] = s["every"]
        for v in cfg.variants:
            p = f"{arch}_{v}_"
            key = f"{arch}_{v}"
            tl = A[p + "train_loss"]
            M[key + "_final_train_loss"] = _f(np.nanmedian(tl[-1]))
            M[key + "_final_test_loss"] = _f(np.nanmedian(A[p + "test_loss"][-1]))
            M[key + "_final_test_acc"] = _f(np.nanmedian(A[p + "test_acc"][-1])) if arch == "vgg" else None
            M[key + "_diverged"] = int((A[p + "diverged"] >= 0).sum())
            steps = A[p + "probe_steps"]
            late = steps > 0  # summaries over the trajectory leave out the initialisation
            # the loss at η = lr (the next SGD iterate, on the same batch) relative to L(w), at the last probe step
            if 1.0 in s["etas"]:
                i_lr = list(s["etas"]).index(1.0)
                M[key + "_lr_step_ratio_last"] = _f(np.nanmedian(A[p + "loss"][-1, :, 0, i_lr] / A[p + "loss0"][-1]))
            # the loss after the largest probe step relative to the loss before it (> 1: that step overshoots)
            top = A[p + "loss"][:, :, 0, -1] / A[p + "loss0"]
            M[key + "_top_step_loss_ratio"] = _f(np.nanmedian(np.nanmedian(top, axis=1)[late]))
            for d, dname in enumerate(DIRECTIONS[: A[p + "loss"].shape[2]]):
                m = measures(A, arch, v, d)
                width = np.nanmean(m["loss_max"] - m["loss_min"], axis=1)
                cmax = np.nanmean(m["change_max"], axis=1)
                beta = np.nanmean(m["beta"], axis=1)
                tag = key + ("" if dname == "gradient" else "_rand")
                M[tag + "_loss_width_median"] = _f(np.nanmedian(width[late]))
                M[tag + "_change_peak"] = _f(np.nanmax(cmax[late]))
                M[tag + "_change_median"] = _f(np.nanmedian(cmax[late]))
                M[tag + "_beta_peak"] = _f(np.nanmax(beta[late]))
                M[tag + "_beta_median"] = _f(np.nanmedian(beta[late]))
                M[tag + "_beta_last"] = _f(beta[-1])
                M[tag + "_beta_first"] = _f(beta[0])
            # distributional shift of the recorded layers: mean over channels of |Δμ| and |Δσ²| between records
            for layer in A[p + "hist_layers"].tolist():
                mu, var = A[p + f"act{layer}_mean"], A[p + f"act{layer}_var"]
                dmu = np.abs(np.diff(mu, axis=0)).mean(-1)  # (L-1, K)
                dvar = np.abs(np.diff(var, axis=0)).mean(-1)
                M[key + f"_L{layer}_shift_mu"] = _f(np.nanmedian(np.nanmean(dmu, axis=1)))
                M[key + f"_L{layer}_shift_var"] = _f(np.nanmedian(np.nanmean(dvar, axis=1)))
                sample = A[p + f"act{layer}_sample"].astype(np.float64)
                z = (sample - sample.mean()) / sample.std() if sample.std() > 0 else sample * np.nan
                M[key + f"_L{layer}_kurtosis"] = _f(np.mean(z**4) - 3)
                M[key + f"_L{layer}_skew"] = _f(np.mean(z**3))
        # headline ratios: standard over BN, along the gradient and along random directions
        for tag in ("", "_rand"):
            for q in ("loss_width_median", "change_peak", "change_median", "beta_peak", "beta_median"):
                a, b = M.get(f"{arch}_none{tag}_{q}"), M.get(f"{arch}_bn{tag}_{q}")
                M[f"{arch}{tag}_ratio_{q}"] = _f(a / b) if a is not None and b else None
        for v in ("none", "bn"):  # how much more curvature the gradient direction sees than a random one
            g, r = M.get(f"{arch}_{v}_beta_median"), M.get(f"{arch}_{v}_rand_beta_median")
            M[f"{arch}_{v}_grad_over_rand_beta"] = _f(g / r) if g is not None and r else None
        mb, mn = measures(A, arch, "bn"), measures(A, arch, "none")
        steps = A[f"{arch}_bn_probe_steps"]
        late = steps > 0
        M[f"{arch}_bn_beta_lower_frac"] = _f(np.mean(np.nanmean(mb["beta"], 1)[late] < np.nanmean(mn["beta"], 1)[late]))
        M[f"{arch}_bn_change_lower_frac"] = _f(
            np.mean(np.nanmean(mb["change_max"], 1)[late] < np.nanmean(mn["change_max"], 1)[late])
        )
        M[f"{arch}_probes"] = int(late.sum())
        M.update(_theorem_summary(A, arch))
    M.update(_paper_rows(A, cfg))
    M.update(_surface_summary(A))
    return M


def _theorem_summary(A: dict[str, np.ndarray], arch: str) -> dict[str, Any]:
    """Theorem 4.1's per-layer quantities in the trained BN net, beside the standard net's layer gradients."""
    p, q = f"{arch}_bn_", f"{arch}_none_"
    scale = np.nanmedian(A[p + "t41_scale_med"], axis=1)  # (T, layers): median over seeds of the channel median
    below = np.nanmean(A[p + "t41_below1"], axis=1)
    g_bn = np.nanmedian(A[p + "t41_grad_bn"], axis=1)
    g_z = np.nanmedian(A[p + "t41_grad_z"], axis=1)
    g_std = np.nanmedian(A[q + "layer_grad"], axis=1)  # standard net's ‖∂L/∂y‖² per block
    n = min(g_bn.shape[1], g_std.shape[1])
    out = {
        f"{arch}_t41_layers": int(scale.shape[1]),
        f"{arch}_t41_res_max": _f(np.nanmax(A[p + "t41_res"])),
        f"{arch}_t41_scale_med_first": _f(np.median(scale[0])),
        f"{arch}_t41_scale_med_last": _f(np.median(scale[-1])),
        f"{arch}_t41_scale_med_all": _f(np.median(scale[1:]) if len(scale) > 1 else np.median(scale)),
        f"{arch}_t41_scale_min_last": _f(np.min(scale[-1])),
        f"{arch}_t41_scale_max_last": _f(np.max(scale[-1])),
        f"{arch}_t41_layers_below1_last": int(np.sum(scale[-1] < 1)),
        f"{arch}_t41_channels_below1_last": _f(np.mean(below[-1])),
        f"{arch}_t41_channels_below1_all": _f(np.mean(below[1:]) if len(below) > 1 else np.mean(below)),
        # what the projection leaves: ‖∇_y L̂‖² / Σ_j (γ_j²/σ_j²)‖g_j‖² (≤ 1; 1 − it is the share removed)
        f"{arch}_t41_proj_share_last": _f(np.median(g_bn[-1] / np.nanmedian(A[p + "t41_scaled_z"], axis=1)[-1])),
        f"{arch}_t41_bn_over_z_last": _f(np.median(g_bn[-1] / g_z[-1])),
        f"{arch}_t41_bn_over_std_last": _f(np.median(g_bn[-1, :n] / g_std[-1, :n])),
        f"{arch}_t41_bn_over_std_all": _f(np.median(g_bn[1:, :n] / g_std[1:, :n]) if len(g_bn) > 1 else None),
        f"{arch}_t41_bn_smaller_frac": _f(np.mean(g_bn[1:, :n] < g_std[1:, :n]) if len(g_bn) > 1 else None),
    }
    return out


def _paper_rows(A: dict[str, np.ndarray], cfg: LandscapeConfig) -> dict[str, Any]:
    """Our VGG values at the steps where the paper's Fig. 4 was read (scaled by the fraction of training)."""
    out: dict[str, Any] = {}
    steps = A["vgg_bn_probe_steps"]
    mb, mn = measures(A, "vgg", "bn"), measures(A, "vgg", "none")
    for paper_step in PAPER_FIG4["loss_range"]:
        i = _nearest(steps, paper_step / PAPER_FIG4["steps"] * cfg.vgg_steps)
        out[f"pv_step_{paper_step}"] = int(steps[i])
        for tag, m in (("none", mn), ("bn", mb)):
            out[f"pv_{tag}_loss_min_{paper_step}"] = _f(np.nanmean(m["loss_min"][i]))
            out[f"pv_{tag}_loss_max_{paper_step}"] = _f(np.nanmean(m["loss_max"][i]))
            out[f"pv_{tag}_change_max_{paper_step}"] = _f(np.nanmean(m["change_max"][i]))
    return out


def _surface_summary(A: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    grid = A["surface_grid"]
    c = len(grid) // 2
    for v in ("none", "bn"):
        s = A.get(f"surface_{v}")
        if s is None:
            continue
        centre = float(s[c, c])
        out[f"surface_{v}_centre"] = _f(centre)
        out[f"surface_{v}_max"] = _f(np.nanmax(s))
        out[f"surface_{v}_within1"] = _f(np.mean(s <= centre + 1.0))
    return out


# ------------------------------------------------------------------------------ tables
def paper_vs_ours(M: dict[str, Any], dataset: str) -> list[dict[str, str]]:
    """Rows of the chapter's paper-versus-ours table (VGG, standard vs BN), labelled with data set and scale."""
    def rng(lo: float | None, hi: float | None) -> str:
        return "—" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"

    def num(x: float | None, spec: str = ".3g") -> str:
        return "—" if x is None else format(x, spec)

    ours_scale = f"VGG {M['vgg_plan']} on {dataset}, batch {M['vgg_batch']}, lr {M['vgg_lr']:g}, {M['vgg_steps']:,} steps"
    rows = [{"what": "scale", "paper": PAPER_FIG4["scale"], "ours": ours_scale}]
    for step, (std, bn) in PAPER_FIG4["loss_range"].items():
        s = M[f"pv_step_{step}"]
        rows.append({
            "what": f"loss range over η, ≈{step:,} steps (ours: step {s})",
            "paper": f"standard [{std[0]}, {std[1]}]; BN [{bn[0]}, {bn[1]}]",
            "ours": f"standard {rng(M[f'pv_none_loss_min_{step}'], M[f'pv_none_loss_max_{step}'])}; "
                    f"BN {rng(M[f'pv_bn_loss_min_{step}'], M[f'pv_bn_loss_max_{step}'])}",
        })
    s = M["pv_step_2500"]
    pc = PAPER_FIG4["change_max_2500"]
    rows.append({
        "what": f"largest gradient change, ≈2,500 steps (ours: step {s})",
        "paper": f"standard ≈{pc[0]:.0f}; BN ≈{pc[1]:.0f} (ratio ≈{pc[0] / pc[1]:.1f})",
        "ours": f"standard {num(M['pv_none_change_max_2500'])}; BN {num(M['pv_bn_change_max_2500'])}",
    })
    rows.append({
        "what": "largest gradient change over training, standard / BN",
        "paper": "close to two orders of magnitude early on (text)",
        "ours": num(M["vgg_ratio_change_peak"], ".2f"),
    })
    pb, pl = PAPER_FIG4["beta_peak"], PAPER_FIG4["beta_late"]
    rows.append({
        "what": "effective β: peak (at the end)",
        "paper": f"standard ≈{pb[0]:.0f} (≈{pl[0]:.0f}); BN ≈{pl[1]:.0f}–{pb[1]:.0f} throughout",
        "ours": f"standard {num(M['vgg_none_beta_peak'])} ({num(M['vgg_none_beta_last'])}); "
                f"BN {num(M['vgg_bn_beta_peak'])} ({num(M['vgg_bn_beta_last'])})",
    })
    return rows


def headline_rows(M: dict[str, Any]) -> list[dict[str, Any]]:
    """Standard-over-BN ratios of the three measures, per architecture and direction."""
    rows = []
    for arch in ARCHS:
        for tag, dname in (("", "gradient"), ("_rand", "random")):
            rows.append({
                "arch": LABELS[arch], "dir": dname,
                "width": M.get(f"{arch}{tag}_ratio_loss_width_median"),
                "cpeak": M.get(f"{arch}{tag}_ratio_change_peak"),
                "cmed": M.get(f"{arch}{tag}_ratio_change_median"),
                "bpeak": M.get(f"{arch}{tag}_ratio_beta_peak"),
                "bmed": M.get(f"{arch}{tag}_ratio_beta_median"),
            })
    return rows


def _last_layer(M: dict[str, Any], arch: str, variant: str) -> int | None:
    """The deepest block whose activations were recorded for (arch, variant), read from the metric names."""
    k = f"{arch}_{variant}_L"
    layers = sorted({int(name[len(k):].split("_")[0]) for name in M if name.startswith(k)})
    return layers[-1] if layers else None


def lp_rows(M: dict[str, Any], arch: str) -> list[dict[str, Any]]:
    """One row per variant of one architecture: training outcome, landscape medians, shift, histogram shape."""
    rows = []
    for v in M["variants"]:
        k = f"{arch}_{v}"
        last = _last_layer(M, arch, v)
        rows.append({
            "variant": LABELS[v],
            "loss": M.get(k + "_final_train_loss"),
            "acc": None if M.get(k + "_final_test_acc") is None else 100 * M[k + "_final_test_acc"],
            "width": M.get(k + "_loss_width_median"),
            "change": M.get(k + "_change_median"),
            "beta": M.get(k + "_beta_median"),
            "shift_mu": M.get(f"{k}_L{last}_shift_mu"),
            "shift_var": M.get(f"{k}_L{last}_shift_var"),
            "kurt": M.get(f"{k}_L{last}_kurtosis"),
        })
    return rows


# ------------------------------------------------------------------------------ figures
def plot_fig4(A: dict[str, np.ndarray], variants: Sequence[str] = ("none", "bn"), direction: int = 0):
    """Fig. 4 of Santurkar et al.: loss range, gradient-change range and effective β over training (rows: VGG, DLN)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for r, arch in enumerate(ARCHS):
        for v in variants:
            steps = A[f"{arch}_{v}_probe_steps"]
            m = measures(A, arch, v, direction)
            c = COLORS[v]
            for j, (lo, hi) in enumerate((("loss_min", "loss_max"), ("change_min", "change_max"))):
                ax = axes[r, j]
                ax.fill_between(steps, np.nanmean(m[lo], 1), np.nanmean(m[hi], 1), color=c, alpha=0.3, lw=0, label=LABELS[v])
                ax.plot(steps, np.nanmax(m[hi], 1), color=c, lw=0.6, ls=":")
            seed_band(axes[r, 2], steps, m["beta"], c, LABELS[v])
        axes[r, 0].set_ylabel(f"{LABELS[arch]}\nloss L(w − ηg)")
        axes[r, 1].set_ylabel("‖∇L(w) − ∇L(w − ηg)‖₂")
        axes[r, 2].set_ylabel("effective β")
        for ax in axes[r]:
            ax.set_yscale("log")
        axes[r, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("training step")
    axes[0, 0].set_title("(a) loss landscape")
    axes[0, 1].set_title("(b) gradient predictiveness")
    axes[0, 2].set_title("(c) effective β-smoothness")
    fig.tight_layout()
    return fig


def plot_fig11(A: dict[str, np.ndarray], cfg_etas: dict[str, Sequence[float]], variants: Sequence[str] = ("none", "bn")):
    """Fig. 11: gradient change against step size at the early and the late probe step; solid: along g, dashed: random."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for r, arch in enumerate(ARCHS):
        etas = np.asarray(cfg_etas[arch])
        for v in variants:
            steps = A[f"{arch}_{v}_probe_steps"]
            change = A[f"{arch}_{v}_change"]  # (T, K, D, E)
            picks = (_early_index(steps), len(steps) - 1)
            for col, i in enumerate(picks):
                ax = axes[r, col]
                for d, ls in zip(range(change.shape[2]), ("-", "--")):
                    y = change[i, :, d, :]  # (K, E)
                    seed_band(ax, etas, y.T, COLORS[v], f"{LABELS[v]}, {DIRECTIONS[d]}", alpha=0.15,
                              ls=ls, marker="o", ms=3)
                ax.set_title(f"{LABELS[arch]}, step {int(steps[i])}")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("step size η / learning rate")
        axes[r, 0].set_ylabel("‖∇L(w) − ∇L(w − ηd)‖₂")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _early_index(steps: np.ndarray) -> int:
    """Index of the first probe step after initialisation (the 'early' step of Fig. 11)."""
    after = np.flatnonzero(steps > 0)
    return int(after[0]) if len(after) else 0


def plot_lp_training(A: dict[str, np.ndarray], variants: Sequence[str]):
    """Fig. 5: training loss of every normalisation, VGG and DLN (seed mean, min–max band)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, arch in zip(axes, ARCHS):
        for v in variants:
            steps, tl = A[f"{arch}_{v}_steps"], A[f"{arch}_{v}_train_loss"]
            seed_band(ax, steps[1:], tl[1:], COLORS[v], LABELS[v])
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (mean since last record)")
        ax.set_title(LABELS[arch])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lp_hist(A: dict[str, np.ndarray], variants: Sequence[str]):
    """Fig. 6: histograms of the last recorded layer's activations at the end of training, with a Gaussian of equal moments."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(variants), figsize=(2.4 * len(variants), 4.6))
    for r, arch in enumerate(ARCHS):
        for c, v in enumerate(variants):
            ax = axes[r, c]
            layer = int(A[f"{arch}_{v}_hist_layers"][-1])
            x = A[f"{arch}_{v}_act{layer}_sample"].astype(float)
            x = x[np.isfinite(x)]
            if len(x) and x.std() > 0:
                ax.hist(x, bins=50, density=True, color=COLORS[v], alpha=0.7)
                t = np.linspace(x.min(), x.max(), 200)
                ax.plot(t, np.exp(-0.5 * ((t - x.mean()) / x.std()) ** 2) / (x.std() * math.sqrt(2 * math.pi)), color="0.2", lw=1)
            ax.set_title(f"{LABELS[arch]} {LABELS[v]}, block {layer + 1}", fontsize=9)
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def _finish_arch_rows(fig, axes, ylabels: Sequence[str]):
    """The ℓp figures' common finish: one row per architecture (named on its first panel), the given y labels
    per column, log scales, the step axis on the bottom row, one legend; returns ``fig``."""
    for r, arch in enumerate(ARCHS):
        for c, (ax, text) in enumerate(zip(axes[r], ylabels)):
            ax.set_ylabel(f"{LABELS[arch]}\n{text}" if c == 0 else text)
            ax.set_yscale("log")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_lp_shift(A: dict[str, np.ndarray], variants: Sequence[str]):
    """Distributional shift: mean over channels of |Δμ| and |Δσ²| between records, last recorded layer."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    for r, arch in enumerate(ARCHS):
        for v in variants:
            layer = int(A[f"{arch}_{v}_hist_layers"][-1])
            steps = A[f"{arch}_{v}_steps"]
            for c, stat in enumerate(("mean", "var")):
                d = np.abs(np.diff(A[f"{arch}_{v}_act{layer}_{stat}"], axis=0)).mean(-1)
                seed_band(axes[r, c], steps[1:], d, COLORS[v], LABELS[v])
    return _finish_arch_rows(fig, axes, ("|μ(t) − μ(t − Δ)|", "|σ²(t) − σ²(t − Δ)|"))


def plot_lp_landscape(A: dict[str, np.ndarray], variants: Sequence[str]):
    """Figs. 12–13: the three measures (loss-range width, largest gradient change, effective β) for every normalisation."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.2))
    for r, arch in enumerate(ARCHS):
        for v in variants:
            steps = A[f"{arch}_{v}_probe_steps"]
            m = measures(A, arch, v)
            seed_band(axes[r, 0], steps, m["loss_max"] - m["loss_min"], COLORS[v], LABELS[v])
            seed_band(axes[r, 1], steps, m["change_max"], COLORS[v], LABELS[v])
            seed_band(axes[r, 2], steps, m["beta"], COLORS[v], LABELS[v])
    return _finish_arch_rows(fig, axes, ("loss range width", "largest gradient change", "effective β"))


def plot_theorem(A: dict[str, np.ndarray]):
    """Theorem 4.1 in the trained nets: γ²/σ² per BN layer (early, last), and layer gradients BN vs standard."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4))
    for r, arch in enumerate(ARCHS):
        p, q = f"{arch}_bn_", f"{arch}_none_"
        steps = A[p + "probe_steps"]
        scale = A[p + "t41_scale_med"]  # (T, K, layers)
        layers = np.arange(1, scale.shape[2] + 1)
        ax = axes[r, 0]
        for i, ls in ((_early_index(steps), "--"), (len(steps) - 1, "-")):
            seed_band(ax, layers, scale[i].T, COLORS["bn"], f"step {int(steps[i])}", ls=ls)
        ax.axhline(1.0, color="0.35", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel(f"{LABELS[arch]}\nmedian γ²/σ² over channels")
        ax.legend(fontsize=8)
        ax = axes[r, 1]
        i = len(steps) - 1
        n = min(scale.shape[2], A[q + "layer_grad"].shape[2])
        seed_band(ax, layers[:n], A[p + "t41_grad_bn"][i, :, :n].T, COLORS["bn"], "BN net: ‖∇_y L̂‖²")
        seed_band(ax, layers[:n], A[p + "t41_grad_z"][i, :, :n].T, COLORS["bn"], "BN net: ‖g‖² (same-z twin)", ls=":")
        seed_band(ax, layers[:n], A[q + "layer_grad"][i, :, :n].T, COLORS["none"], "standard net: ‖∇_y L‖²")
        ax.set_yscale("log")
        ax.set_ylabel(f"squared gradient norm, step {int(steps[i])}")
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    fig.tight_layout()
    return fig


def plot_surfaces(A: dict[str, np.ndarray]):
    """Li et al.'s filter-normalised loss surfaces around the trained VGG, without and with BN (shared contour levels)."""
    import matplotlib.pyplot as plt

    grid = A["surface_grid"]
    surfs = {v: A[f"surface_{v}"] for v in ("none", "bn") if f"surface_{v}" in A}
    vals = np.concatenate([s[np.isfinite(s)].ravel() for s in surfs.values()])
    lo, hi = max(vals.min(), 1e-3), min(vals.max(), 1e3)
    levels = np.geomspace(lo, hi, 15)
    fig, axes = plt.subplots(1, len(surfs), figsize=(5 * len(surfs), 4.2))
    for ax, (v, s) in zip(np.atleast_1d(axes), surfs.items()):
        cs = ax.contour(grid, grid, np.clip(s.T, lo, hi), levels=levels, cmap="viridis", norm=_lognorm(lo, hi))
        ax.clabel(cs, fontsize=6, fmt="%.2g")
        ax.plot(0, 0, "k+", ms=8)
        ax.set_title(f"VGG, {LABELS[v]}")
        ax.set_xlabel("α (direction δ)")
        ax.set_ylabel("β (direction η)")
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def _lognorm(lo: float, hi: float):
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=lo, vmax=hi)


# ------------------------------------------------------------------------------ prose
def _word(ratio: float | None, above: str, below: str, equal: str = "about the same as") -> str:
    if ratio is None:
        return "not comparable with (a run diverged)"
    if 0.9 <= ratio <= 1.1:
        return equal
    return above if ratio > 1 else below


def phrases(M: dict[str, Any]) -> dict[str, str]:
    """Phrases of the chapter's findings, computed from the metrics so that the prose never goes stale.

    ``{arch}_change_cmp`` / ``{arch}_beta_cmp`` / ``{arch}_width_cmp``: how the standard net's
    measure compares with BN's ("larger than", "smaller than", "about the same as");
    ``{arch}_rand_*`` the same along random directions; ``{arch}_t41_verdict``: whether BN's
    rescaling factor γ²/σ² is below 1 in the trained net.
    """
    out: dict[str, str] = {}
    for arch in ARCHS:
        for tag in ("", "_rand"):
            out[f"{arch}{tag}_change_cmp"] = _word(M.get(f"{arch}{tag}_ratio_change_peak"), "larger than", "smaller than")
            out[f"{arch}{tag}_beta_cmp"] = _word(M.get(f"{arch}{tag}_ratio_beta_median"), "larger than", "smaller than")
            out[f"{arch}{tag}_width_cmp"] = _word(M.get(f"{arch}{tag}_ratio_loss_width_median"), "wider than", "narrower than")
        g, r = M.get(f"{arch}_ratio_beta_median"), M.get(f"{arch}_rand_ratio_beta_median")
        if g is None or r is None:
            out[f"{arch}_rand_agrees"] = "cannot be compared (a run diverged)"
        elif (g > 1) == (r > 1):
            out[f"{arch}_rand_agrees"] = "is the same as along the gradient"
        else:
            out[f"{arch}_rand_agrees"] = "is the reverse of the ordering along the gradient"
        n, below = M.get(f"{arch}_t41_layers"), M.get(f"{arch}_t41_layers_below1_last")
        if n is None or below is None:
            out[f"{arch}_t41_verdict"] = "could not be measured"
        elif below == 0:
            out[f"{arch}_t41_verdict"] = f"is above 1 in all {n} BN layers"
        elif below == n:
            out[f"{arch}_t41_verdict"] = f"is below 1 in all {n} BN layers"
        else:
            out[f"{arch}_t41_verdict"] = f"is below 1 in {below} of the {n} BN layers and above 1 in the other {n - below}"
        if n is None or below is None:
            out[f"{arch}_t41_story"] = "cannot be judged"
        elif below == 0:
            out[f"{arch}_t41_story"] = ("cannot be the source of the smoothing: at every BN layer it enlarges the layer "
                                        "gradient relative to the same-z twin instead of shrinking it")
        elif below == n:
            out[f"{arch}_t41_story"] = "is consistent with the paper's story: at every BN layer it shrinks the layer gradient"
        else:
            out[f"{arch}_t41_story"] = ("points both ways: it shrinks the layer gradient in some BN layers and enlarges "
                                        "it in others, so it cannot account for a smoothing of the whole network")
        r = M.get(f"{arch}_t41_bn_over_std_all")
        out[f"{arch}_t41_grad_cmp"] = _word(None if r is None else 1 / r, "smaller than", "larger than")
    for arch in ARCHS:
        lp = [v for v in M["variants"] if v not in ("none", "bn")]
        for stat in ("mu", "var"):
            more = []
            std = M.get(f"{arch}_none_L{_last_layer(M, arch, 'none')}_shift_{stat}")
            for v in lp:
                mine = M.get(f"{arch}_{v}_L{_last_layer(M, arch, v)}_shift_{stat}")
                if mine is not None and std is not None:
                    more.append(mine > std)
            out[f"{arch}_lp_shift_{stat}_more"] = f"{sum(more)} of {len(lp)}"
        std_beta = M.get(f"{arch}_none_beta_median")
        lower = [M.get(f"{arch}_{v}_beta_median") is not None and std_beta is not None
                 and M[f"{arch}_{v}_beta_median"] < std_beta for v in lp]
        out[f"{arch}_lp_beta_lower"] = f"{sum(lower)} of {len(lp)}"
        top, top_bn = M.get(f"{arch}_none_top_step_loss_ratio"), M.get(f"{arch}_bn_top_step_loss_ratio")
        if top is None or top_bn is None:
            out[f"{arch}_top_caution"] = "could not be measured (a run diverged)."
        elif top > 1:
            out[f"{arch}_top_caution"] = (
                f"overshoots for the standard network: the loss there is {top:.3g} times the loss before the step "
                f"(median over probe steps; BN: {top_bn:.3g}). That step lies beyond the standard network's stable "
                "step size, and its maxima record the overshoot (the right ends of the curves in the step-size "
                "figure below).")
        else:
            out[f"{arch}_top_caution"] = (
                f"still lowers the standard network's loss (to {top:.3g} times its value before the step, median over "
                f"probe steps; BN: {top_bn:.3g}), so no single overshooting step drives its maxima.")
    ratios = [M.get(f"{arch}_{v}_grad_over_rand_beta") for arch in ARCHS for v in ("none", "bn")]
    known = [r for r in ratios if r is not None]
    more = sum(r > 1 for r in known)
    out["rand_vs_grad"] = (f"in all {len(known)} cases" if known and more == len(known)
                           else f"in {more} of {len(known)} cases")
    sb, sn = M.get("surface_bn_within1"), M.get("surface_none_within1")
    out["surface_cmp"] = "—" if sb is None or sn is None else (
        "a larger" if sb > sn else "a smaller" if sb < sn else "the same")
    return out


FORMATS = {"ex1_change": ".3f", "ex1_grad_norm": ".4f", "ex2_ratio": ".4f", "ex2_c": "g",
           "vgg_t41_proj_share_last": ".3f", "dln_t41_proj_share_last": ".3f"}
"""Formats of numbers that need more than 3 significant digits (the rest: 3 significant digits)."""


def glue_all(M: dict[str, Any]) -> None:
    """Glue every scalar metric as ``ls_<name>`` (fractions as percentages) and every phrase of :func:`phrases`."""
    from bnbook import report

    for name, value in M.items():
        if isinstance(value, (dict, list, bool)):
            continue
        if value is None or isinstance(value, str):
            report.glue(f"ls_{name}", value)
        elif name in FORMATS:
            report.glue(f"ls_{name}", value, FORMATS[name])
        elif name.startswith("ex3_"):
            report.glue(f"ls_{name}", value, ",.1f")
        elif isinstance(value, int):
            report.glue(f"ls_{name}", value, ",")
        elif name.endswith("_frac") or "below1" in name or name.endswith("_within1"):
            report.glue(f"ls_{name}", 100 * value, ".0f")
        else:
            report.glue(f"ls_{name}", value, ".3g")
    for name, text in phrases(M).items():
        report.glue(f"ls_{name}", text)
    for arch in ARCHS:
        for what in ("beta", "change"):
            frac, n = M.get(f"{arch}_bn_{what}_lower_frac"), M.get(f"{arch}_probes")
            report.glue(f"ls_{arch}_bn_{what}_lower_count", None if frac is None else round(frac * n), "d")
