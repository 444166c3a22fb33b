"""Chapter 1, "The BN transform": batch vs population statistics, measured on real data.

Four measurements on the pre-activations ``x = W u + b`` of a randomly initialised linear
layer (PyTorch's default init, fixed seed) applied to real images ``u`` (the notation of
Ioffe & Szegedy §3.2: BN normalises ``x``):

1. the distribution of a few units before and after BN over one batch;
2. how running estimates approach the population statistics as batches stream in:
   PyTorch's momentum 0.1, the cumulative average (``momentum=None``), and Algorithm 2
   with and without the m/(m-1) correction;
3. the bias of the 1/m batch variance as a function of m, against (m-1)/m;
4. exactness checks: our :class:`bnbook.norms.BatchNorm` against ``torch.nn.BatchNorm1d``,
   the identity recovered with γ = √(σ² + ε), β = μ, and inference-mode BN folded into
   the linear layer.

It also measures the answers of the chapter's exercises: the bias of the batch variance
when a batch is drawn without replacement from a small population, and the noise floor
of the running mean with momentum α against its prediction.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from bnbook import data
from bnbook.config import ChapterConfig
from bnbook.env import num_threads, seed_everything
from bnbook.norms import BatchNorm, batch_norm, batch_stats, inference_affine
from bnbook.results import Outcome


@dataclasses.dataclass(frozen=True)
class BNTransformConfig(ChapterConfig):
    """Chapter 1's parameters. Defaults are the ``quick`` profile."""

    dataset: str = "fashion-mnist"  # real images; 'mnist5k' is the smaller offline set
    units: int = 100  # width of the random linear layer whose outputs we normalise
    batch_size: int = 60  # m, the paper's MNIST batch size
    batches: int = 1000  # batches streamed into the running estimates
    orderings: int = 24  # independent shuffles of the training set (seed bands)
    bias_sizes: tuple[int, ...] = (2, 3, 4, 6, 8, 16, 32, 64, 128, 256)  # m values of the bias sweep
    bias_batches: int = 200  # batches per m in the bias sweep
    hist_batch: int = 512  # batch whose histogram is shown before/after BN
    momentum: float = 0.1  # PyTorch's default: weight of the new batch
    small_population: int = 20  # exercise 1: images of the finite population drawn without replacement
    small_batch: int = 4  # exercise 1: m of those draws

    profiles: ClassVar = {
        "smoke": {"dataset": "mnist5k", "batches": 30, "orderings": 2, "bias_sizes": (2, 4, 16),
                  "bias_batches": 20, "hist_batch": 128},
        "paper": {"batches": 10_000, "orderings": 64, "bias_batches": 5000},
    }


def random_layer(in_features: int, units: int, seed: int) -> torch.nn.Linear:
    """A randomly initialised ``nn.Linear(in_features, units)`` (PyTorch's default init, given seed)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, units)
    torch.random.set_rng_state(gen_state)
    return layer


def preactivations(u: torch.Tensor, units: int, seed: int) -> torch.Tensor:
    """Pre-activations ``x = W u + b`` of :func:`random_layer` (given seed) on the inputs ``u``: (N, units)."""
    layer = random_layer(u.shape[1], units, seed).to(device=u.device, dtype=u.dtype)
    with torch.no_grad():
        return layer(u)


def batch_sequence(n: int, m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``k`` batches of ``m`` examples drawn i.i.d. (uniformly, with replacement) from ``n``: (k, m).

    Independent draws make the textbook statements exact for the empirical distribution:
    E[σ²_B] = (m-1)/m · Var, and averages over k batches converge like 1/√k. (Shuffled
    epochs behave almost the same, except that one whole epoch reproduces the population
    mean exactly — a sampling artefact we do not want in the figures.)
    """
    return torch.randint(n, (k, m), generator=generator)


def running_estimates(x: torch.Tensor, idx: torch.Tensor, momentum: float) -> dict[str, np.ndarray]:
    """Stream the batches ``x[idx[t]]`` through two BN layers and record every estimate after each batch.

    Returns arrays of shape (k, units): the running mean/var of ``BatchNorm(momentum)``
    and of ``BatchNorm(momentum=None)``, and Algorithm 2's averages of the batch
    statistics without and with the m/(m-1) correction.
    """
    m = idx.shape[1]
    units = x.shape[1]
    ema = BatchNorm(units, momentum=momentum, affine=False).to(x.device, x.dtype)
    cum = BatchNorm(units, momentum=None, affine=False).to(x.device, x.dtype)
    out = {k: torch.empty(len(idx), units, dtype=x.dtype, device=x.device)
           for k in ("ema_mean", "ema_var", "cum_mean", "cum_var")}
    for t, rows in enumerate(idx):
        batch = x[rows]
        ema(batch)
        cum(batch)
        out["ema_mean"][t], out["ema_var"][t] = ema.running_mean, ema.running_var
        out["cum_mean"][t], out["cum_var"][t] = cum.running_mean, cum.running_var
    batches = x[idx]  # (k, m, units)
    mean_b = batches.mean(1)
    var_b = batches.var(1, correction=0)
    steps = torch.arange(1, len(idx) + 1, dtype=x.dtype, device=x.device)[:, None]
    out["alg2_mean"] = mean_b.cumsum(0) / steps
    out["alg2_var_biased"] = var_b.cumsum(0) / steps
    out["alg2_var"] = out["alg2_var_biased"] * m / (m - 1)
    return {k: v.cpu().numpy() for k, v in out.items()}


def variance_bias(x: torch.Tensor, sizes: tuple[int, ...], batches: int, generator: torch.Generator) -> np.ndarray:
    """E_B[σ²_B] / Var[x] for each batch size m, averaged over ``batches`` batches and all units."""
    pop_var = x.var(0, correction=0)
    ratios = []
    for m in sizes:
        idx = batch_sequence(len(x), m, batches, generator)
        var_b = x[idx].var(1, correction=0)  # (batches, units)
        ratios.append((var_b.mean(0) / pop_var).mean().item())
    return np.array(ratios)


def variance_bias_without_replacement(x: torch.Tensor, m: int, batches: int, generator: torch.Generator) -> float:
    """E_B[σ²_B] / Var[x] for batches of ``m`` *distinct* rows of the finite population ``x`` (exercise 1).

    Sampling without replacement from N values gives (m−1)/m · N/(N−1): the batch values are
    negatively correlated, so the 1/m batch variance is biased less than for i.i.d. draws.
    """
    pop_var = x.var(0, correction=0)
    idx = torch.stack([torch.randperm(len(x), generator=generator)[:m] for _ in range(batches)]).to(x.device)
    return (x[idx].var(1, correction=0).mean(0) / pop_var).mean().item()


def ema_noise_floor(momentum: float, m: int) -> float:
    """Predicted plateau of E|μ̂ − μ|/σ for the running mean with weight ``momentum`` of the new batch (exercise 3).

    After many batches μ̂ = α Σ_t (1−α)^t μ_B(t), so Var[μ̂] = α²/(1−(1−α)²) · σ²/m = α/(2−α) · σ²/m;
    for a Gaussian error E|e| = √(2/π)·sd.
    """
    return float(np.sqrt(2 / np.pi) * np.sqrt(momentum / ((2 - momentum) * m)))


def exactness_checks(x: torch.Tensor, idx: torch.Tensor, momentum: float, eps: float = 1e-5) -> dict[str, float]:
    """Max absolute differences between our BN and ``torch.nn.BatchNorm1d`` (float64), and identity recovery."""
    x64 = x.double()
    ours = BatchNorm(x.shape[1], eps=eps, momentum=momentum).to(x.device, torch.float64)
    ref = torch.nn.BatchNorm1d(x.shape[1], eps=eps, momentum=momentum).to(x.device, torch.float64)
    with torch.no_grad():
        gamma = torch.rand(x.shape[1], dtype=torch.float64, device=x.device) + 0.5
        beta = torch.randn(x.shape[1], dtype=torch.float64, device=x.device)
        for mod in (ours, ref):
            mod.weight.copy_(gamma)
            mod.bias.copy_(beta)
    train_diff = max((ours(x64[r]) - ref(x64[r])).abs().max().item() for r in idx)
    ours.eval()
    ref.eval()
    test = x64[idx[0]]
    eval_diff = (ours(test) - ref(test)).abs().max().item()
    checks = {
        "train_output_maxdiff": train_diff,
        "eval_output_maxdiff": eval_diff,
        "running_mean_maxdiff": (ours.running_mean - ref.running_mean).abs().max().item(),
        "running_var_maxdiff": (ours.running_var - ref.running_var).abs().max().item(),
        "num_batches_tracked": int(ours.num_batches_tracked),
    }
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        batch = x[idx[0]].to(dtype)
        mean, var, _ = batch_stats(batch)
        y = batch_norm(batch, torch.sqrt(var + eps), mean, eps)
        checks[f"identity_maxdiff_{name}"] = (y - batch).abs().max().item()
        checks[f"identity_scale_{name}"] = batch.abs().max().item()
    return checks


def fold_into_linear(layer: torch.nn.Linear, bn: BatchNorm) -> torch.nn.Linear:
    """The linear layer ``u ↦ BN(W u + b)`` of an inference-mode ``bn`` (exercise 4).

    With a = γ/√(Var[x] + ε): W' = diag(a) W and b' = a (b − E[x]) + β.
    """
    a, shift = inference_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    folded = torch.nn.Linear(layer.in_features, layer.out_features).to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(a[:, None] * layer.weight)
        folded.bias.copy_(a * layer.bias + shift)
    return folded


def folding_check(u: torch.Tensor, units: int, seed: int, idx: torch.Tensor, momentum: float) -> float:
    """Max |BN(W u + b) − (W' u + b')| / max |BN(W u + b)| in float64, BN in eval mode after the batches ``idx``."""
    layer = random_layer(u.shape[1], units, seed).to(u.device, torch.float64)
    bn = BatchNorm(units, momentum=momentum).to(u.device, torch.float64)
    u64 = u.double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, units))  # a non-trivial γ and β, so that they must be folded too
        bn.bias.copy_(torch.linspace(-1.0, 1.0, units))
        for rows in idx:
            bn(layer(u64[rows]))
        bn.eval()
        ref = bn(layer(u64[idx[0]]))
        out = fold_into_linear(layer, bn)(u64[idx[0]])
    return float((out - ref).abs().max() / ref.abs().max())


def run(cfg: BNTransformConfig, device: torch.device) -> Outcome:
    """Run the four measurements of chapter 1 and return their metrics and raw arrays."""
    with num_threads(1):  # thousands of tiny (60 x 100) ops: one thread is fastest
        return _run(cfg, device)


def _run(cfg: BNTransformConfig, device: torch.device) -> Outcome:
    seed_everything(cfg.seed)
    ds = data.load(cfg.dataset, device).flat()
    x = preactivations(ds.x_train, cfg.units, cfg.seed)  # (N, units), the "population"
    pop_mean = x.mean(0)
    pop_var = x.var(0, correction=0)
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. one batch, before and after BN (four units with different scales)
    hist_rows = batch_sequence(len(x), cfg.hist_batch, 1, gen)[0]
    before = x[hist_rows]
    after = batch_norm(before)
    show = torch.argsort(pop_var)[torch.linspace(0, cfg.units - 1, 4).long()]

    # 2. running estimates over several independent orderings
    m = cfg.batch_size
    errs = {k: [] for k in ("ema", "cum", "alg2", "alg2_biased")}
    mean_errs = {k: [] for k in ("ema", "cum")}
    alg2_vs_cum = 0.0
    for _ in range(cfg.orderings):
        idx = batch_sequence(len(x), m, cfg.batches, gen).to(device)
        est = running_estimates(x, idx, cfg.momentum)
        pv, pm = pop_var.cpu().numpy(), pop_mean.cpu().numpy()
        rel = lambda v: np.mean(np.abs(v - pv) / pv, axis=1)  # noqa: E731 - mean over units
        errs["ema"].append(rel(est["ema_var"]))
        errs["cum"].append(rel(est["cum_var"]))
        errs["alg2"].append(rel(est["alg2_var"]))
        errs["alg2_biased"].append(rel(est["alg2_var_biased"]))
        mean_errs["ema"].append(np.mean(np.abs(est["ema_mean"] - pm) / np.sqrt(pv), axis=1))
        mean_errs["cum"].append(np.mean(np.abs(est["cum_mean"] - pm) / np.sqrt(pv), axis=1))
        alg2_vs_cum = max(alg2_vs_cum, float(np.max(np.abs(est["alg2_var"] - est["cum_var"]) / pv)))
    var_err = {k: np.stack(v) for k, v in errs.items()}  # (orderings, batches)
    mean_err = {k: np.stack(v) for k, v in mean_errs.items()}

    # 3. bias of the 1/m variance vs m; without replacement from a small population (exercise 1)
    ratios = variance_bias(x, cfg.bias_sizes, cfg.bias_batches, gen)
    sizes = np.array(cfg.bias_sizes)
    small = x[:cfg.small_population]
    ratio_small = variance_bias_without_replacement(small, cfg.small_batch, cfg.bias_batches * 10, gen)

    # 4. exactness, and inference-mode BN folded into the layer (exercise 4)
    idx = batch_sequence(len(x), m, min(cfg.batches, 50), gen).to(device)
    checks = exactness_checks(x, idx, cfg.momentum)
    fold = folding_check(ds.x_train, cfg.units, cfg.seed, idx, cfg.momentum)

    last = lambda a: float(np.mean(a[:, -1]))  # noqa: E731 - final error, mean over orderings
    plateau = var_err["ema"].shape[1] // 2  # the momentum estimate has forgotten its start by then
    n_small, m_small = len(small), cfg.small_batch
    metrics = {
        "dataset": ds.name,
        "n_population": len(x),
        "batch_size": m,
        "batches": cfg.batches,
        "orderings": cfg.orderings,
        "momentum": cfg.momentum,
        "final_var_relerr": {k: last(v) for k, v in var_err.items()},
        "final_mean_err": {k: last(v) for k, v in mean_err.items()},
        "alg2_equals_cumulative_maxrel": alg2_vs_cum,
        "expected_biased_relerr": 1.0 / m,
        "bias_ratio": {str(s): float(r) for s, r in zip(sizes, ratios)},
        "bias_ratio_maxdev_from_theory": float(np.max(np.abs(ratios - (sizes - 1) / sizes))),
        "small_population": n_small,
        "small_batch": m_small,
        "small_ratio": ratio_small,
        "small_ratio_iid": (m_small - 1) / m_small,
        "small_ratio_predicted": (m_small - 1) / m_small * n_small / (n_small - 1),
        "ema_mean_plateau": float(np.mean(mean_err["ema"][:, plateau:])),
        "ema_mean_plateau_predicted": ema_noise_floor(cfg.momentum, m),
        "fold_maxrel": fold,
        "after_bn_mean_absmax": float(after.mean(0).abs().max()),
        "after_bn_std_mean": float(after.var(0, correction=0).sqrt().mean()),
        "before_bn_std_range": [float(pop_var.sqrt().min()), float(pop_var.sqrt().max())],
        **checks,
    }
    arrays = {
        "hist_before": before[:, show].cpu().numpy(),
        "hist_after": after[:, show].cpu().numpy(),
        "hist_units": show.cpu().numpy(),
        "bias_sizes": sizes,
        "bias_ratios": ratios,
        **{f"var_err_{k}": v for k, v in var_err.items()},
        **{f"mean_err_{k}": v for k, v in mean_err.items()},
    }
    return Outcome(metrics=metrics, arrays=arrays, datasets=[cfg.dataset])


GLUE_FORMATS = {
    "final_*": ".4f", "expected_biased_relerr": ".4f", "bias_ratio_maxdev_from_theory": ".3f",
    "bias_ratio_*": ".3f", "small_ratio*": ".3f", "ema_mean_plateau*": ".4f", "momentum": "g",
    "after_bn_std_mean": ".5f", "after_bn_mean_absmax": ".1e", "before_bn_std_range_*": ".2f", "*_max*": ".1e", "identity_*": ".1e",
    "num_batches_tracked": "d",
}
"""How chapter 1 prints its metrics (``report.glue_metrics``; first matching pattern wins)."""


def exactness_rows(metrics: dict) -> list[dict]:
    """Rows of chapter 1's table: our BN against ``torch.nn.BatchNorm1d`` (max |difference|, float64)."""
    n = metrics["num_batches_tracked"]
    return [
        {"what": "training-mode output", "v": metrics["train_output_maxdiff"]},
        {"what": "eval-mode output", "v": metrics["eval_output_maxdiff"]},
        {"what": f"running mean after {n} batches", "v": metrics["running_mean_maxdiff"]},
        {"what": f"running variance after {n} batches", "v": metrics["running_var_maxdiff"]},
    ]


# ---------------------------------------------------------------- figures
def plot_before_after(res) -> "matplotlib.figure.Figure":
    """Histograms of four units over one batch, before and after BN."""
    import matplotlib.pyplot as plt

    a = res.arrays
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, a["hist_before"].shape[1]))
    for j, c in enumerate(colors):
        label = f"unit {int(a['hist_units'][j])}"
        axes[0].hist(a["hist_before"][:, j], bins=40, histtype="step", lw=1.6, color=c, label=label, density=True)
        axes[1].hist(a["hist_after"][:, j], bins=40, histtype="step", lw=1.6, color=c, label=label, density=True)
    axes[0].set(title="before BN: $x_j = w_j^\\top u + b_j$", xlabel="pre-activation", ylabel="density")
    axes[1].set(title="after BN: $\\hat x_j$ (batch mean 0, variance 1)", xlabel="normalised pre-activation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_running_stats(res) -> "matplotlib.figure.Figure":
    """Relative error of the variance estimates vs batches seen, and the 1/m bias vs m."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE, seed_band

    a = res.arrays
    m = res.metrics["batch_size"]
    fig = plt.figure(figsize=(10, 7.2))
    grid = fig.add_gridspec(2, 2)
    axes = [fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])]
    k = np.arange(1, a["var_err_ema"].shape[1] + 1)
    styles = {
        "ema": ("momentum 0.1 (PyTorch default)", "C1", "-"),
        "cum": ("momentum=None (cumulative)", PALETTE["bn"], "-"),
        "alg2_biased": ("Alg. 2 without m/(m−1)", PALETTE["no_bn"], "--"),
    }
    for key, (label, color, ls) in styles.items():
        seed_band(axes[0], k, a[f"var_err_{key}"].T, color, label, centre="median", band=(10, 90), alpha=0.15, ls=ls)
    axes[0].axhline(1 / m, color=PALETTE["ref"], lw=1, ls=":", label=f"bias 1/m = {1 / m:.3f}")
    axes[0].set(xscale="log", yscale="log", xlabel="batches seen k", ylabel="mean relative error of Var",
                title=f"variance estimates (m = {m})")
    axes[0].legend(fontsize=7.5)
    for key, (label, color, ls) in {k: styles[k] for k in ("ema", "cum")}.items():
        seed_band(axes[1], k, a[f"mean_err_{key}"].T, color, label, centre="median", band=(10, 90), alpha=0.15, ls=ls)
    axes[1].set(xscale="log", yscale="log", xlabel="batches seen k", ylabel="mean |error| / std",
                title="mean estimates")
    axes[1].legend(fontsize=7.5)
    sizes = a["bias_sizes"]
    ms = np.geomspace(sizes.min(), sizes.max(), 200)
    axes[2].plot(ms, (ms - 1) / ms, color=PALETTE["ref"], label="theory (m−1)/m")
    axes[2].plot(sizes, a["bias_ratios"], "o", color=PALETTE["bn"], label="measured")
    axes[2].set(xscale="log", xlabel="batch size m", ylabel="E[σ²_B] / Var[x]",
                title="bias of the 1/m batch variance")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig
