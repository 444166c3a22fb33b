"""Chapter 1, "The BN transform": batch vs population statistics, measured on real data.

Four measurements on the pre-activations ``u = W x`` of a randomly initialised linear
layer (PyTorch's default init, fixed seed) applied to real images:

1. the distribution of a few units before and after BN over one batch;
2. how running estimates approach the population statistics as batches stream in:
   PyTorch's momentum 0.1, the cumulative average (``momentum=None``), and Algorithm 2
   with and without the m/(m-1) correction;
3. the bias of the 1/m batch variance as a function of m, against (m-1)/m;
4. exactness checks: our :class:`bnbook.norms.BatchNorm` against ``torch.nn.BatchNorm1d``,
   and the identity recovered with γ = √(σ² + ε), β = μ.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from bnbook import data
from bnbook.config import ChapterConfig
from bnbook.env import num_threads, seed_everything
from bnbook.norms import BatchNorm, batch_norm, batch_stats
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

    profiles: ClassVar = {
        "smoke": {"dataset": "mnist5k", "batches": 30, "orderings": 2, "bias_sizes": (2, 4, 16),
                  "bias_batches": 20, "hist_batch": 128},
        "paper": {"batches": 10_000, "orderings": 64, "bias_batches": 5000},
    }


def preactivations(x: torch.Tensor, units: int, seed: int) -> torch.Tensor:
    """Outputs of a randomly initialised ``nn.Linear(d, units)`` (default init, given seed) on ``x``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], units).to(device=x.device, dtype=x.dtype)
    torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        return layer(x)


def batch_sequence(n: int, m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``k`` batches of ``m`` examples drawn i.i.d. (uniformly, with replacement) from ``n``: (k, m).

    Independent draws make the textbook statements exact for the empirical distribution:
    E[σ²_B] = (m-1)/m · Var, and averages over k batches converge like 1/√k. (Shuffled
    epochs behave almost the same, except that one whole epoch reproduces the population
    mean exactly — a sampling artefact we do not want in the figures.)
    """
    return torch.randint(n, (k, m), generator=generator)


def running_estimates(u: torch.Tensor, idx: torch.Tensor, momentum: float) -> dict[str, np.ndarray]:
    """Stream the batches ``u[idx[t]]`` through two BN layers and record every estimate after each batch.

    Returns arrays of shape (k, units): the running mean/var of ``BatchNorm(momentum)``
    and of ``BatchNorm(momentum=None)``, and Algorithm 2's averages of the batch
    statistics without and with the m/(m-1) correction.
    """
    m = idx.shape[1]
    units = u.shape[1]
    ema = BatchNorm(units, momentum=momentum, affine=False).to(u.device, u.dtype)
    cum = BatchNorm(units, momentum=None, affine=False).to(u.device, u.dtype)
    out = {k: torch.empty(len(idx), units, dtype=u.dtype, device=u.device)
           for k in ("ema_mean", "ema_var", "cum_mean", "cum_var")}
    for t, rows in enumerate(idx):
        batch = u[rows]
        ema(batch)
        cum(batch)
        out["ema_mean"][t], out["ema_var"][t] = ema.running_mean, ema.running_var
        out["cum_mean"][t], out["cum_var"][t] = cum.running_mean, cum.running_var
    batches = u[idx]  # (k, m, units)
    mean_b = batches.mean(1)
    var_b = batches.var(1, correction=0)
    steps = torch.arange(1, len(idx) + 1, dtype=u.dtype, device=u.device)[:, None]
    out["alg2_mean"] = mean_b.cumsum(0) / steps
    out["alg2_var_biased"] = var_b.cumsum(0) / steps
    out["alg2_var"] = out["alg2_var_biased"] * m / (m - 1)
    return {k: v.cpu().numpy() for k, v in out.items()}


def variance_bias(u: torch.Tensor, sizes: tuple[int, ...], batches: int, generator: torch.Generator) -> np.ndarray:
    """E_B[σ²_B] / Var[u] for each batch size m, averaged over ``batches`` batches and all units."""
    pop_var = u.var(0, correction=0)
    ratios = []
    for m in sizes:
        idx = batch_sequence(len(u), m, batches, generator)
        var_b = u[idx].var(1, correction=0)  # (batches, units)
        ratios.append((var_b.mean(0) / pop_var).mean().item())
    return np.array(ratios)


def exactness_checks(u: torch.Tensor, idx: torch.Tensor, momentum: float, eps: float = 1e-5) -> dict[str, float]:
    """Max absolute differences between our BN and ``torch.nn.BatchNorm1d`` (float64), and identity recovery."""
    u64 = u.double()
    ours = BatchNorm(u.shape[1], eps=eps, momentum=momentum).to(u.device, torch.float64)
    ref = torch.nn.BatchNorm1d(u.shape[1], eps=eps, momentum=momentum).to(u.device, torch.float64)
    with torch.no_grad():
        gamma = torch.rand(u.shape[1], dtype=torch.float64, device=u.device) + 0.5
        beta = torch.randn(u.shape[1], dtype=torch.float64, device=u.device)
        for mod in (ours, ref):
            mod.weight.copy_(gamma)
            mod.bias.copy_(beta)
    train_diff = max((ours(u64[r]) - ref(u64[r])).abs().max().item() for r in idx)
    ours.eval()
    ref.eval()
    test = u64[idx[0]]
    eval_diff = (ours(test) - ref(test)).abs().max().item()
    checks = {
        "train_output_maxdiff": train_diff,
        "eval_output_maxdiff": eval_diff,
        "running_mean_maxdiff": (ours.running_mean - ref.running_mean).abs().max().item(),
        "running_var_maxdiff": (ours.running_var - ref.running_var).abs().max().item(),
        "num_batches_tracked": int(ours.num_batches_tracked),
    }
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        x = u[idx[0]].to(dtype)
        mean, var, _ = batch_stats(x)
        y = batch_norm(x, torch.sqrt(var + eps), mean, eps)
        checks[f"identity_maxdiff_{name}"] = (y - x).abs().max().item()
        checks[f"identity_scale_{name}"] = x.abs().max().item()
    return checks


def run(cfg: BNTransformConfig, device: torch.device) -> Outcome:
    """Run the four measurements of chapter 1 and return their metrics and raw arrays."""
    with num_threads(1):  # thousands of tiny (60 x 100) ops: one thread is fastest
        return _run(cfg, device)


def _run(cfg: BNTransformConfig, device: torch.device) -> Outcome:
    seed_everything(cfg.seed)
    ds = data.load(cfg.dataset, device).flat()
    u = preactivations(ds.x_train, cfg.units, cfg.seed)  # (N, units), the "population"
    pop_mean = u.mean(0)
    pop_var = u.var(0, correction=0)
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. one batch, before and after BN (four units with different scales)
    hist_rows = batch_sequence(len(u), cfg.hist_batch, 1, gen)[0]
    before = u[hist_rows]
    after = batch_norm(before)
    show = torch.argsort(pop_var)[torch.linspace(0, cfg.units - 1, 4).long()]

    # 2. running estimates over several independent orderings
    m = cfg.batch_size
    errs = {k: [] for k in ("ema", "cum", "alg2", "alg2_biased")}
    mean_errs = {k: [] for k in ("ema", "cum")}
    alg2_vs_cum = 0.0
    for _ in range(cfg.orderings):
        idx = batch_sequence(len(u), m, cfg.batches, gen).to(device)
        est = running_estimates(u, idx, cfg.momentum)
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

    # 3. bias of the 1/m variance vs m
    ratios = variance_bias(u, cfg.bias_sizes, cfg.bias_batches, gen)
    sizes = np.array(cfg.bias_sizes)

    # 4. exactness
    idx = batch_sequence(len(u), m, min(cfg.batches, 50), gen).to(device)
    checks = exactness_checks(u, idx, cfg.momentum)

    last = lambda a: float(np.mean(a[:, -1]))  # noqa: E731 - final error, mean over orderings
    metrics = {
        "n_population": len(u),
        "batch_size": m,
        "batches": cfg.batches,
        "orderings": cfg.orderings,
        "final_var_relerr": {k: last(v) for k, v in var_err.items()},
        "final_mean_err": {k: last(v) for k, v in mean_err.items()},
        "alg2_equals_cumulative_maxrel": alg2_vs_cum,
        "expected_biased_relerr": 1.0 / m,
        "bias_ratio": {str(s): float(r) for s, r in zip(sizes, ratios)},
        "bias_ratio_maxdev_from_theory": float(np.max(np.abs(ratios - (sizes - 1) / sizes))),
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
    axes[0].set(title="before BN: $u_j = w_j^\\top x$", xlabel="pre-activation", ylabel="density")
    axes[1].set(title="after BN: $\\hat u_j$ (batch mean 0, variance 1)", xlabel="normalised pre-activation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_running_stats(res) -> "matplotlib.figure.Figure":
    """Relative error of the variance estimates vs batches seen, and the 1/m bias vs m."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

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
        err = a[f"var_err_{key}"]
        lo, mid, hi = np.percentile(err, [10, 50, 90], axis=0)
        axes[0].plot(k, mid, color=color, ls=ls, label=label)
        axes[0].fill_between(k, lo, hi, color=color, alpha=0.15, lw=0)
    axes[0].axhline(1 / m, color=PALETTE["ref"], lw=1, ls=":", label=f"bias 1/m = {1 / m:.3f}")
    axes[0].set(xscale="log", yscale="log", xlabel="batches seen k", ylabel="mean relative error of Var",
                title=f"variance estimates (m = {m})")
    axes[0].legend(fontsize=7.5)
    for key, (label, color, ls) in {k: styles[k] for k in ("ema", "cum")}.items():
        err = a[f"mean_err_{key}"]
        lo, mid, hi = np.percentile(err, [10, 50, 90], axis=0)
        axes[1].plot(k, mid, color=color, ls=ls, label=label)
        axes[1].fill_between(k, lo, hi, color=color, alpha=0.15, lw=0)
    axes[1].set(xscale="log", yscale="log", xlabel="batches seen k", ylabel="mean |error| / std",
                title="mean estimates")
    axes[1].legend(fontsize=7.5)
    sizes = a["bias_sizes"]
    ms = np.geomspace(sizes.min(), sizes.max(), 200)
    axes[2].plot(ms, (ms - 1) / ms, color=PALETTE["ref"], label="theory (m−1)/m")
    axes[2].plot(sizes, a["bias_ratios"], "o", color=PALETTE["bn"], label="measured")
    axes[2].set(xscale="log", xlabel="batch size m", ylabel="E[σ²_B] / Var[u]",
                title="bias of the 1/m batch variance")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig
