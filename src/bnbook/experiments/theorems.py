"""Chapter 4: Theorems 4.1, 4.2, 4.4 and Lemma 4.5 of Santurkar et al. (2018), checked.

Three parts, all in :func:`run`:

1. **Random instances** (float64, ε = 0): for batch sizes ``sizes`` and three kinds of
   downstream loss, both sides of Theorem 4.1 (printed 1/√m and corrected 1/m), the
   first and second forms of Theorem 4.2 against exact Hessian-vector products, the
   exact-for-any-ε curvature formula, and Theorem 4.4 (printed and corrected).
2. **A trained network**: the 3×100 sigmoid MLP of Ioffe & Szegedy (chapter 3's
   :class:`bnbook.nets.MLP`), with BN and without, trained by the engine
   (:func:`bnbook.train.fit`) with plain SGD. At ``checkpoints + 1`` evenly spaced steps a
   probe evaluates, at every BN layer and on ``measure_batches`` fixed training batches,
   each side of Theorems 4.1 and 4.2 (:func:`bnbook.theory.measure_bn_layers`), and the
   network without BN's own layer gradients and curvatures.
3. **Lemma 4.5** on that instance: the BN net's initial first-layer weights ``W0`` and the
   trained no-BN net's ``W*``; and the scale invariance the lemma rests on.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from bnbook import data, nets, theory, train
from bnbook.config import ChapterConfig
from bnbook.env import num_threads, seed_everything
from bnbook.errors import BnbookError
from bnbook.results import Outcome

BN_QUANTITIES = (
    "grad_sq_bn",  # ‖∇_y L̂‖² (autograd, ε = 0)
    "grad_sq_bn_net_eps",  # the same with the network's own ε
    "rhs41_corrected",  # (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/m)
    "rhs41_printed",  # (γ²/σ²)(‖g‖² − ⟨1,g⟩²/m − ⟨g,ŷ⟩²/√m)
    "grad_sq_z",  # ‖g‖², g = ∂L̂/∂z: the unnormalised net's ‖∇_y L‖² at the same z
    "mean_term",  # ⟨1,g⟩²/m
    "yhat_term",  # ⟨g,ŷ⟩²/m
    "scale",  # γ²/σ²
    "curv_bn",  # vᵀ ∇²L̂ v, v = ∇_y L̂ (HVP)
    "scaled_curv",  # (γ²/σ²) vᵀ H v
    "reduction",  # (γ/(mσ²)) ⟨g,ŷ⟩ ‖v‖²
    "rhs42_second",  # second printed form of Theorem 4.2
    "gHg",  # gᵀ H g
    "v_sq",  # ‖v‖²
    "printed41_fails",  # 1 where rhs41_printed < ‖∇_y L̂‖² (the printed "≤" fails)
    "second42_holds",  # 1 where curv_bn ≤ rhs42_second
    "res41",  # |‖∇L̂‖² − rhs41_corrected| / max over the layer's units of ‖∇L̂‖²
    "res42",  # |curv_bn − first form| / max over the layer's units of |curv_bn|
    "sigma",  # σ_j: the batch standard deviation of the layer's pre-BN output y_j (ε = 0)
    "gamma",  # γ_j
    "input_spread",  # batch std of the sigmoid output h_j feeding the layer (NaN for layer 1: pixels)
)
PLAIN_QUANTITIES = ("grad_sq", "gHg")
INSTANCE_KINDS = theory.INSTANCE_KINDS


@dataclasses.dataclass(frozen=True)
class TheoremsConfig(ChapterConfig):
    """Santurkar et al. §4 checked on random instances and on a trained 3×100 MLP. Defaults: quick."""

    dataset: str = "mnist5k"  # training data of the MLP ('fashion-mnist' in the paper profile)
    steps: int = 3_000  # SGD steps of each network
    lr: float = 0.5  # plain SGD learning rate, both networks (the paper's §4 has no training setup)
    width: int = 100  # units per hidden layer (Ioffe & Szegedy: 3 × 100)
    batch_size: int = 60  # m: Ioffe & Szegedy's mini-batch; also the measured batches' size
    seeds: int = 3  # networks per variant (seeds seed, seed+1, ...), trained together by the engine
    checkpoints: int = 8  # measurements at steps 0, steps/checkpoints, ..., steps
    small_init_std: float = 0.05  # exercise 4: γ²/σ² at step 0 with weights ~ N(0, small_init_std²) (chapter 3's init)
    measure_batches: int = 2  # fixed training batches the theorems are evaluated on (averaged)
    instances: int = 3  # random instances per batch size and loss kind
    units: int = 6  # units per random instance
    sizes: tuple[int, ...] = (2, 3, 4, 8, 16, 32, 64, 128, 256)  # batch sizes m of the random instances

    profiles: ClassVar = {
        "smoke": {"steps": 20, "width": 16, "seeds": 2, "checkpoints": 2, "measure_batches": 1, "instances": 1, "units": 3,
                  "sizes": (2, 16, 64)},
        "paper": {"dataset": "fashion-mnist", "steps": 20_000, "checkpoints": 20, "measure_batches": 8, "instances": 10},
    }

    def __post_init__(self) -> None:
        for name in ("steps", "width", "batch_size", "seeds", "checkpoints", "measure_batches", "instances", "units"):
            if getattr(self, name) < 1:
                raise BnbookError(f"TheoremsConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.batch_size < 2 or min(self.sizes, default=0) < 2:
            raise BnbookError("batch sizes must be at least 2: BN needs two values per unit")
        if not self.lr > 0:
            raise BnbookError(f"TheoremsConfig.lr must be positive, got {self.lr}")
        if self.checkpoints > self.steps:
            raise BnbookError(f"checkpoints ({self.checkpoints}) cannot exceed steps ({self.steps})")


# ------------------------------------------------------------------ part 1: random instances
def _rel(a: Tensor, b: Tensor, scale: Tensor) -> float:
    """Largest |a − b| relative to the size of the terms that make up a and b (``scale``)."""
    return float(((a - b).abs() / scale.clamp_min(1e-300)).max())


def random_instance_sweep(cfg: TheoremsConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Theorems 4.1, 4.2 and 4.4 on random float64 instances; returns (metrics, arrays)."""
    rows: dict[str, list] = {k: [] for k in ("m", "kind", "ratio_corrected", "ratio_printed", "curv_ratio_first")}
    res41, res41_eps, res42, res_dir, res_dir_eps, res44 = [], [], [], [], [], []
    printed_negative, m2_printed, m2_lhs = [], [], []
    second_holds, t44_corr_holds, t44_printed_fails, t44_tight = [], [], [], []
    seed = cfg.seed * 100_003
    for m in cfg.sizes:
        for k, kind in enumerate(INSTANCE_KINDS):
            for i in range(cfg.instances):
                seed += 1
                inst = theory.random_instance(m, cfg.units, kind, seed)
                r = theory.check_instance(inst, eps=0.0, direction_seed=seed)
                res41.append(_rel(r["grad_sq"], r["rhs41_corrected"], r["scale41"]))
                if m > 2:  # at m = 2 and ε = 0 BN is locally constant: every 4.2 term is 0 up to round-off
                    res42.append(_rel(r["curv"], r["rhs42_first"], r["scale42"]))
                    res_dir.append(_rel(r["curv_dir"], r["curv_dir_formula"], r["scale_dir"]))
                printed_negative.append((r["rhs41_printed"] < 0).double().mean().item())
                if m == 2:
                    m2_printed.append(float((r["rhs41_printed"] / r["scale41"]).max()))
                    m2_lhs.append(float((r["grad_sq"] / r["scale41"]).max()))
                second_holds.append((r["curv"] <= r["rhs42_second"]).double().mean().item())
                r_eps = theory.check_instance(inst, eps=0.1, direction_seed=seed)
                res_dir_eps.append(_rel(r_eps["curv_dir"], r_eps["curv_dir_formula"], r_eps["scale_dir"]))
                res41_eps.append(_rel(r_eps["grad_sq"], r_eps["rhs41_corrected"], r_eps["scale41"]))
                ok = r["grad_sq"] > 1e-9 * r["scale41"]  # ratios only where ‖∇L̂‖² is not 0 (m = 2: always 0)
                for u in torch.nonzero(ok).flatten().tolist():
                    rows["m"].append(m)
                    rows["kind"].append(k)
                    rows["ratio_corrected"].append(float(r["rhs41_corrected"][u] / r["grad_sq"][u]))
                    rows["ratio_printed"].append(float(r["rhs41_printed"][u] / r["grad_sq"][u]))
                    rows["curv_ratio_first"].append(float(r["rhs42_first"][u] / r["curv"][u]))
                if m >= 4:
                    t44 = theory.check_theorem44(m, 2 * m, cfg.units, kind, seed, lam=2.0)
                    res44.append(_rel(t44["lhs_autograd"], t44["lhs"], t44["lhs"].abs()))
                    t44_corr_holds.append(float((t44["lhs"] <= t44["rhs_corrected"] * (1 + 1e-12)).double().mean()))
                    t44_printed_fails.append(float((t44["lhs"] > t44["rhs_printed"]).double().mean()))
                    t44_tight.append(float((t44["lhs"] / t44["rhs_corrected"]).max()))
    arrays = {f"inst_{k}": np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    ratio_printed = arrays["inst_ratio_printed"]
    metrics = {
        "inst_count": int(len(cfg.sizes) * len(INSTANCE_KINDS) * cfg.instances),
        "inst_units": int(cfg.units),
        "inst_m_min": int(min(cfg.sizes)),
        "inst_m_max": int(max(cfg.sizes)),
        "inst_res41_max": max(res41),
        "inst_res41_eps_max": max(res41_eps),
        "inst_printed41_negative_frac": float(np.mean(printed_negative)),
        "inst_m2_printed_rel_max": max(m2_printed) if m2_printed else None,
        "inst_m2_lhs_rel_max": max(m2_lhs) if m2_lhs else None,
        "inst_res42_max": max(res42),
        "inst_res42_dir_max": max(res_dir),
        "inst_res42_dir_eps_max": max(res_dir_eps),
        "inst_printed41_fail_frac": float(np.mean(ratio_printed < 1 - 1e-9)),
        "inst_printed41_ratio_min": float(ratio_printed.min()),
        "inst_printed41_ratio_max": float(ratio_printed.max()),
        "inst_second42_hold_frac": float(np.mean(second_holds)),
        "inst_t44_res_max": max(res44) if res44 else None,
        "inst_t44_corrected_hold_frac": float(np.mean(t44_corr_holds)) if t44_corr_holds else None,
        "inst_t44_printed_fail_frac": float(np.mean(t44_printed_fails)) if t44_printed_fails else None,
        "inst_t44_tightness_max": max(t44_tight) if t44_tight else None,
    }
    return metrics, arrays


def counterexample(seed: int, m: int = 16, gamma: float = 1.7) -> dict[str, float]:
    """Theorem 4.1's printed bound failing on one instance: cubic loss, one unit, m = 16, ε = 0."""
    inst = theory.random_instance(m, 1, "cubic", seed, gamma=gamma)
    r = theory.check_instance(inst, eps=0.0)
    y_hat, s = theory.batch_standardize(inst.y)
    g = torch.func.grad(inst.loss_of_z)(inst.gamma * y_hat + inst.beta)
    t41 = theory.theorem41(g, y_hat, inst.gamma, s)
    grad_sq = float(r["grad_sq"][0])
    return {
        "cx_m": m,
        "cx_gamma": gamma,
        "cx_sigma": float(s[0]),
        "cx_lhs": grad_sq,
        "cx_rhs_corrected": float(t41.rhs_corrected[0]),
        "cx_rhs_printed": float(t41.rhs_printed[0]),
        "cx_grad_sq_plain": float(t41.grad_sq[0]),
        "cx_mean_term": float(t41.mean_term[0]),
        "cx_yhat_term": float(t41.yhat_term[0]),
        "cx_gap": float(r["grad_sq"][0] - t41.rhs_printed[0]),
        "cx_rel_err_corrected": abs(grad_sq - float(t41.rhs_corrected[0])) / grad_sq,
    }


# ------------------------------------------------------------------ part 2: trained networks
def _bn_probe(batches: list[tuple[Tensor, Tensor]]) -> train.Probe:
    """Probe of :func:`bnbook.train.fit`: the BN quantities, (K, Q, layers, units), averaged over ``batches``."""

    def probe(models: list[torch.nn.Module], _x: Tensor) -> Tensor:
        return torch.stack([one(model) for model in models])

    def one(model: torch.nn.Module) -> Tensor:
        seq = theory.as_sequential(model)
        per_batch = []
        with torch.enable_grad():
            for x, labels in batches:
                layers = theory.measure_bn_layers(seq, x, labels)
                net_eps = theory.measure_bn_layers(seq, x, labels, eps=float(model.norms[0].eps), hessians=False)
                spreads = input_spreads(model, x)
                rows = []
                for lay, lay_eps, spread in zip(layers, net_eps, spreads):
                    v = lay.values
                    lhs, curv = v["grad_sq_bn"], v["curv_bn"]
                    q = {
                        "grad_sq_bn": lhs,
                        "grad_sq_bn_net_eps": lay_eps.values["grad_sq_bn"],
                        "rhs41_corrected": v["t41_rhs_corrected"],
                        "rhs41_printed": v["t41_rhs_printed"],
                        "grad_sq_z": v["t41_grad_sq"],
                        "mean_term": v["t41_mean_term"],
                        "yhat_term": v["t41_yhat_term"],
                        "scale": v["t41_scale"],
                        "curv_bn": curv,
                        "scaled_curv": v["t42_scaled_curvature"],
                        "reduction": v["t42_reduction"],
                        "rhs42_second": v["t42_rhs_second"],
                        "gHg": v["gHg"],
                        "v_sq": v["t42_v_sq"],
                        "printed41_fails": (v["t41_rhs_printed"] < lhs * (1 - 1e-9)).double(),
                        "second42_holds": (curv <= v["t42_rhs_second"]).double(),
                        "res41": (lhs - v["t41_rhs_corrected"]).abs() / lhs.max().clamp_min(1e-300),
                        "res42": (curv - v["t42_rhs_first"]).abs() / curv.abs().max().clamp_min(1e-300),
                        "sigma": v["sigma"],
                        "gamma": v["gamma"],
                        "input_spread": spread,
                    }
                    rows.append(torch.stack([q[name] for name in BN_QUANTITIES]))
                per_batch.append(torch.stack(rows, dim=1))  # (Q, layers, units)
        stacked = torch.stack(per_batch)  # (batches, Q, layers, units)
        out = stacked.mean(0)
        for name in ("res41", "res42"):  # residuals: worst batch, not the mean
            i = BN_QUANTITIES.index(name)
            out[i] = stacked[:, i].max(0).values
        return out

    return probe


@torch.no_grad()
def input_spreads(model: torch.nn.Module, x: Tensor) -> list[Tensor]:
    """Per hidden layer, the batch standard deviation of each input feature that is a sigmoid output
    (BN with batch statistics, as in training); NaN for the first layer, whose inputs are pixels."""
    model.train()  # the engine's probes run inside no_side_effects: the running averages are restored
    _, feats = model(x, features=True)
    width = feats[0].shape[1]
    first = torch.full((width,), float("nan"), dtype=torch.float64, device=x.device)
    return [first, *[torch.sigmoid(f).double().std(0, correction=0) for f in feats[:-1]]]


def _plain_probe(batches: list[tuple[Tensor, Tensor]]) -> train.Probe:
    """Probe: the networks without BN's per-unit ‖∂L/∂y‖² and gᵀHg, (K, 2, layers, units)."""

    def probe(models: list[torch.nn.Module], _x: Tensor) -> Tensor:
        return torch.stack([one(model) for model in models])

    def one(model: torch.nn.Module) -> Tensor:
        seq = theory.as_sequential(model)
        per_batch = []
        with torch.enable_grad():
            for x, labels in batches:
                layers = theory.measure_plain_layers(seq, x, labels)
                per_batch.append(
                    torch.stack([torch.stack([lay.values[q] for lay in layers]) for q in PLAIN_QUANTITIES])
                )
        return torch.stack(per_batch).mean(0)

    return probe


def measurement_batches(ds: data.Dataset, cfg: TheoremsConfig) -> list[tuple[Tensor, Tensor]]:
    """``cfg.measure_batches`` fixed training batches of size m (their own generator: seed + 7919)."""
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    idx = torch.randperm(len(ds.y_train), generator=gen)[: cfg.measure_batches * cfg.batch_size]
    idx = idx.view(cfg.measure_batches, cfg.batch_size).to(ds.y_train.device)
    return [(ds.x_train[i].flatten(1), ds.y_train[i]) for i in idx]


def train_and_measure(cfg: TheoremsConfig, device: torch.device) -> tuple[dict, dict[str, np.ndarray], dict]:
    """Train ``cfg.seeds`` MLPs with and without BN, measuring at every checkpoint; returns (metrics, arrays, models).

    Arrays ``bn_<quantity>`` and ``plain_<quantity>`` have shape (checkpoints, seeds, layers, units).
    """
    ds = data.load(cfg.dataset, device)
    batches = measurement_batches(ds, cfg)
    fit_cfg = train.FitConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        log_every=max(1, cfg.steps // cfg.checkpoints),
        probe_size=cfg.batch_size,  # the engine's probe batch is unused: our probes bring their own
    )
    in_features = math.prod(ds.input_shape)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    results, models = {}, {}
    for variant, norm, probe in (("bn", "bn", _bn_probe(batches)), ("plain", None, _plain_probe(batches))):
        seed_everything(cfg.seed)
        nets_ = [nets.MLP(in_features, (cfg.width,) * 3, ds.num_classes, "sigmoid", norm=norm, seed=s).to(device)
                 for s in seeds]
        models[f"{variant}_init"] = [[lin.weight.detach().clone() for lin in m.linears] for m in nets_]
        with num_threads(1 if device.type == "cpu" else None):
            results[variant] = train.fit(nets_, ds, fit_cfg, seeds=seeds, probes={"q": probe})
        models[variant] = nets_
    bn, plain = results["bn"], results["plain"]
    q_bn = bn.probes["q"].astype(np.float64)  # (L, K, Q, layers, units)
    q_plain = plain.probes["q"].astype(np.float64)  # (L, K, 2, layers, units)
    arrays = {
        "steps": bn.steps,
        "test_acc_bn": bn.test_acc,  # (L, K)
        "test_acc_plain": plain.test_acc,
        "train_loss_bn": bn.train_loss,
        "train_loss_plain": plain.train_loss,
        **{f"bn_{name}": q_bn[:, :, i] for i, name in enumerate(BN_QUANTITIES)},
        **{f"plain_{name}": q_plain[:, :, i] for i, name in enumerate(PLAIN_QUANTITIES)},
    }
    metrics = network_metrics(arrays, cfg)
    metrics.update(
        net_seeds=len(seeds),
        diverged_bn=int((bn.diverged_step >= 0).sum()),
        diverged_plain=int((plain.diverged_step >= 0).sum()),
        train_time_s=bn.train_time_s + plain.train_time_s,
        measure_time_s=bn.eval_time_s + plain.eval_time_s,
    )
    metrics.update(small_init_scales(cfg, ds, batches[0], in_features, device))
    return metrics, arrays, models


def seed_slice(a: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The arrays of seed ``k`` only: (checkpoints, seeds, ...) -> (checkpoints, ...)."""
    return {name: (v[:, k] if v.ndim >= 2 and name != "steps" and not name.startswith("inst_") else v)
            for name, v in a.items()}


@torch.no_grad()
def small_init_scales(cfg: TheoremsConfig, ds: data.Dataset, batch: tuple[Tensor, Tensor], in_features: int,
                      device: torch.device) -> dict[str, float]:
    """Exercise 4: median γ²/σ² = 1/σ² per layer at step 0 (γ = 1) for N(0, small_init_std²) weights."""
    model = nets.MLP(in_features, (cfg.width,) * 3, ds.num_classes, "sigmoid", norm="bn",
                     init_std=cfg.small_init_std, seed=cfg.seed).to(device).train()
    h = batch[0].flatten(1)
    out = {}
    for i, (lin, norm) in enumerate(zip(model.linears, model.norms)):
        y = lin(h).double()
        out[f"L{i + 1}_scale_med_small_init"] = float(np.median((1 / y.var(0, correction=0)).cpu().numpy()))
        h = torch.sigmoid(norm(lin(h)))
    return out


def network_metrics(a: dict[str, np.ndarray], cfg: TheoremsConfig) -> dict:
    """Headline numbers of the trained-network measurements, per seed and over seeds.

    Per layer at each seed's last finite checkpoint; a quantity ``X`` is reported as the mean
    over seeds (``X``) with its range (``X_min``, ``X_max``). Residuals are the worst seed's;
    the fractions pool the seeds. A ratio with a zero denominator (e.g. vanished gradients
    after a blow-up) is NaN, stored as null.
    """
    k = a["bn_grad_sq_bn"].shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_seed = [_network_metrics(seed_slice(a, i), cfg) for i in range(k)]
    out: dict = {}
    for key in per_seed[0]:
        values = np.array([m[key] for m in per_seed], dtype=np.float64)
        if key.startswith("net_res"):
            out[key] = float(np.nanmax(values))
        elif key.startswith(("net_steps", "net_checkpoints", "net_m")):
            out[key] = per_seed[0][key]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[key] = float(np.nanmean(values))
                out[f"{key}_min"], out[f"{key}_max"] = float(np.nanmin(values)), float(np.nanmax(values))
    acc_bn, acc_plain = a["test_acc_bn"][-1], a["test_acc_plain"][-1]
    out["acc_bn_seeds"] = [float(v) for v in acc_bn]
    out["acc_plain_seeds"] = [float(v) for v in acc_plain]
    out["bn_better_seeds"] = int(np.sum(acc_bn > acc_plain))
    return out


def _network_metrics(a: dict[str, np.ndarray], cfg: TheoremsConfig) -> dict:
    finite = np.isfinite(a["bn_grad_sq_bn"]).all(axis=(1, 2))
    metrics: dict = {
        "net_steps": int(a["steps"][-1]),
        "net_checkpoints": int(len(a["steps"])),
        "net_m": cfg.batch_size,
        "acc_bn": float(a["test_acc_bn"][-1]),
        "acc_plain": float(a["test_acc_plain"][-1]),
    }
    # a run that diverged at once leaves no finite checkpoint: its numbers are NaN (stored as null)
    ok = np.flatnonzero(finite) if finite.any() else np.array([0])
    last = ok[-1]
    metrics.update(
        net_res41_max=float(np.nanmax(a["bn_res41"][ok])),
        net_res42_max=float(np.nanmax(a["bn_res42"][ok])),
        net_printed41_fail_frac=float(np.nanmean(a["bn_printed41_fails"][ok])),
        net_second42_hold_frac=float(np.nanmean(a["bn_second42_holds"][ok])),
        net_eps_rel_gap_max=float(
            np.nanmax(np.abs(a["bn_grad_sq_bn_net_eps"][ok].sum(-1) / a["bn_grad_sq_bn"][ok].sum(-1) - 1))
        ),
    )
    n_layers = a["bn_grad_sq_bn"].shape[1]
    for layer in range(n_layers):
        s = lambda name, t=last: np.float64(np.sum(a[name][t, layer]))  # noqa: E731 - a layer's total (0/0 -> nan)
        scale = a["bn_scale"][:, layer]
        g = s("bn_grad_sq_z")
        L = f"L{layer + 1}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # layer 1 has no sigmoid inputs: its spread is NaN
            spread_end = float(np.nanmedian(a["bn_input_spread"][last, layer]))
            spread_init = float(np.nanmedian(a["bn_input_spread"][0, layer]))
        metrics.update({
            f"{L}_scale_med": float(np.median(scale[last])),
            f"{L}_scale_q10": float(np.quantile(scale[last], 0.1)),
            f"{L}_scale_q90": float(np.quantile(scale[last], 0.9)),
            f"{L}_scale_med_init": float(np.median(scale[0])),
            f"{L}_sigma_med": float(np.median(a["bn_sigma"][last, layer])),
            f"{L}_sigma_med_init": float(np.median(a["bn_sigma"][0, layer])),
            f"{L}_gamma_med": float(np.median(np.abs(a["bn_gamma"][last, layer]))),
            f"{L}_spread_med": spread_end,
            f"{L}_spread_med_init": spread_init,
            f"{L}_grad_bn": s("bn_grad_sq_bn"),
            f"{L}_grad_z": g,
            f"{L}_grad_plain": s("plain_grad_sq"),
            f"{L}_ratio_bn_z": s("bn_grad_sq_bn") / g,
            f"{L}_mean_frac": s("bn_mean_term") / g,
            f"{L}_yhat_frac": s("bn_yhat_term") / g,
            f"{L}_mean_frac_all": float(np.sum(a["bn_mean_term"][ok, layer]) / np.sum(a["bn_grad_sq_z"][ok, layer])),
            f"{L}_yhat_frac_all": float(np.sum(a["bn_yhat_term"][ok, layer]) / np.sum(a["bn_grad_sq_z"][ok, layer])),
            f"{L}_curv_bn": s("bn_curv_bn") / s("bn_v_sq"),
            f"{L}_curv_scaled": s("bn_scaled_curv") / s("bn_v_sq"),
            f"{L}_curv_reduction": s("bn_reduction") / s("bn_v_sq"),
            f"{L}_curv_z": s("bn_gHg") / g,
            # how large Theorem 4.2's second term is next to its first, checkpoint by checkpoint
            f"{L}_curv_red_share_init": float(
                np.abs(a["bn_reduction"][0, layer].sum()) / np.abs(a["bn_scaled_curv"][0, layer].sum())
            ),
            f"{L}_curv_red_share_median": float(np.median(
                np.abs(a["bn_reduction"][ok, layer].sum(-1)) / np.abs(a["bn_scaled_curv"][ok, layer].sum(-1))
            )),
            f"{L}_curv_plain": s("plain_gHg") / s("plain_grad_sq"),
            f"{L}_amplified": float(np.median(scale[last]) > 1),
        })
    return metrics


# ------------------------------------------------------------------ part 3: Lemma 4.5
def lemma45_on_network(models: dict, cfg: TheoremsConfig, device: torch.device) -> dict:
    """Lemma 4.5 with ``W0`` = the first seed's initial first-layer weights and ``W*`` = its trained no-BN net's.

    The distances obey the lemma's equation for *any* two matrices with ⟨W0, W*⟩ > 0 (it is the
    Pythagorean identity for the projection of W0 onto the ray through W*): evaluating it on
    trained weights checks arithmetic, not BN. What is specific to BN is that every point k·W*
    of the ray is again an optimum — the scale invariance, measured here as the relative change
    of the BN net's loss when its first layer is multiplied by k (at ε = 0 and at the net's ε).
    Per unit, BN allows one factor k_j ≥ 0 per row; the best ones give ``lemma_dist_bn_rows``.
    """
    W0 = models["bn_init"][0][0].double().cpu()
    W_star = models["plain"][0].linears[0].weight.detach().double().cpu()
    if not torch.isfinite(W_star).all() or float((W0 * W_star).sum()) <= 0:
        keys = ("k", "dist_plain", "dist_bn", "gain", "gain_predicted", "identity_err", "rows_positive",
                "dist_bn_rows", "scale_gap_eps0", "scale_gap_net_eps")
        return {"lemma_applicable": False, **{f"lemma_{k}": None for k in keys}}
    whole = theory.lemma45(W0, W_star)
    # per unit (row of W): the closest point of each row's ray {k_j w*_j : k_j ≥ 0}
    inner, norm_sq = (W0 * W_star).sum(1), W_star.square().sum(1)
    k_rows = (inner / norm_sq).clamp_min(0)
    dist_rows = float((W0 - k_rows[:, None] * W_star).square().sum())
    ds = data.load(cfg.dataset, device)
    x, labels = measurement_batches(ds, cfg)[0]
    bn_net = models["bn"][0]
    gaps = {
        eps: theory.scale_invariance_gap(theory.as_sequential(bn_net), x, labels, whole.k, eps)
        for eps in (0.0, float(bn_net.norms[0].eps))
    }
    return {
        "lemma_applicable": True,
        "lemma_k": whole.k,
        "lemma_dist_plain": whole.dist_sq_plain,
        "lemma_dist_bn": whole.dist_sq_bn,
        "lemma_gain": whole.dist_sq_plain - whole.dist_sq_bn,
        "lemma_gain_predicted": whole.gain_predicted,
        "lemma_identity_err": abs(whole.dist_sq_plain - whole.dist_sq_bn - whole.gain_predicted) / whole.dist_sq_plain,
        "lemma_rows": int(W0.shape[0]),
        "lemma_rows_positive": int((inner > 0).sum()),
        "lemma_dist_bn_rows": dist_rows,
        "lemma_scale_gap_eps0": gaps[0.0],
        "lemma_scale_gap_net_eps": gaps[float(bn_net.norms[0].eps)],
    }


# ------------------------------------------------------------------ the experiment
def run(cfg: TheoremsConfig, device: torch.device) -> Outcome:
    """All three parts; the metrics and arrays the chapter prints and plots."""
    torch.manual_seed(cfg.seed)
    with num_threads(1 if device.type == "cpu" else None):
        inst_metrics, inst_arrays = random_instance_sweep(cfg)
        cx = counterexample(cfg.seed)
    net_metrics, net_arrays, models = train_and_measure(cfg, device)
    lemma = lemma45_on_network(models, cfg, device)
    settings = {"dataset": cfg.dataset, "lr": cfg.lr, "width": cfg.width, "measure_batches": cfg.measure_batches,
                "sizes": ", ".join(str(m) for m in cfg.sizes), "instances": cfg.instances,
                "small_init_std": cfg.small_init_std}
    metrics = {**inst_metrics, **cx, **net_metrics, **lemma, **settings}
    return Outcome(
        metrics={**metrics, **summary_phrases(metrics)},
        arrays={**inst_arrays, **net_arrays},
        datasets=[cfg.dataset],
    )


# ------------------------------------------------------------------ tables
def _pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _exp(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.1e}"


def paper_vs_ours(M: dict) -> list[dict[str, str]]:
    """Rows of the chapter's paper-versus-ours table, from the result's metrics."""
    scales = ", ".join("—" if M.get(f"L{i}_scale_med") is None else f"{M[f'L{i}_scale_med']:.3g}" for i in (1, 2, 3))
    return [
        {"what": "Thm 4.1", "paper": "≤, with 1/√m on the ŷ term",
         "ours": f"= with 1/m (residual {_exp(M['inst_res41_max'])}); printed fails for "
                 f"{_pct(M['inst_printed41_fail_frac'])} of instance units, "
                 f"{_pct(M.get('net_printed41_fail_frac'))} in the network"},
        {"what": "Thm 4.2, first form", "paper": "≤",
         "ours": f"= (residual {_exp(M['inst_res42_max'])} on instances, {_exp(M.get('net_res42_max'))} in the network)"},
        {"what": "Thm 4.2, second form", "paper": "≤ if H preserves relative norms",
         "ours": f"⇔ (γ²/σ²)(Pg)ᵀH(Pg) ≤ gᵀHg; held for {_pct(M.get('net_second42_hold_frac'))} of network units"},
        {"what": "size of γ²/σ²", "paper": "σ large and uncontrolled",
         "ours": f"median per layer at the end of training (mean over {M.get('net_seeds', 1)} seeds): {scales}"},
        {"what": "Thm 4.4", "paper": "g_j², μ_g undefined, λ²⟨·,ŷ⟩²",
         "ours": f"corrected bound held for {_pct(M['inst_t44_corrected_hold_frac'])} of instance units; "
                 f"printed failed for {_pct(M['inst_t44_printed_fail_frac'])}"},
        {"what": "Lemma 4.5", "paper": "≤ via scale invariance",
         "ours": "an algebraic identity for any W0, W* with ⟨W0, W*⟩ > 0 (evaluated to "
                 f"{_exp(M.get('lemma_identity_err'))}); the BN part, scale invariance, holds to "
                 f"{_exp(M.get('lemma_scale_gap_eps0'))} at ε = 0"},
    ]


def _layer_list(layers: list[int]) -> str:
    """'layer 2', 'layers 2 and 3', 'layers 1, 2 and 3'."""
    names = [str(i) for i in layers]
    if len(names) == 1:
        return f"layer {names[0]}"
    return f"layers {', '.join(names[:-1])} and {names[-1]}"


def summary_phrases(M: dict, layers: tuple[int, ...] = (1, 2, 3)) -> dict[str, str]:
    """Phrases of the chapter's conclusions computed from the metrics (so the prose never goes stale).

    ``dominant``: which reduction term of Theorem 4.1 is larger, per layer (over all checkpoints);
    ``amplified_layers``: layers whose median γ²/σ² ends above 1 in at least one seed;
    ``scale_verdict``: the sentence saying where γ²/σ² ends above or below 1 and, from the measured
    medians of σ_j and |γ_j|, which of the two puts it there; ``removed_max``: the largest share
    of ‖g‖² (percent) that both terms together remove in any layer; ``red_share_max``: the largest
    (over layers) median (over checkpoints) size of Theorem 4.2's second term relative to its first,
    percent; ``red_init_max``: the same ratio at step 0; ``seed_verdict``: how the BN and no-BN nets'
    final accuracies compare seed by seed.
    """
    def ok(*keys: str) -> bool:
        return all(M.get(k) is not None and math.isfinite(M[k]) for k in keys)

    seeds = int(M.get("net_seeds", 1))
    dominant, amplified, removed, red_share, red_init, causes = [], [], [], [], [], []
    for i in layers:
        mean, yhat, scale = f"L{i}_mean_frac_all", f"L{i}_yhat_frac_all", f"L{i}_scale_med"
        if ok(mean, yhat):
            dominant.append(f"layer {i}: {'the mean term' if M[mean] > M[yhat] else 'the ŷ term'}")
            removed.append(100 * (M[mean] + M[yhat]))
        if ok(f"L{i}_amplified") and M[f"L{i}_amplified"] > 0:
            amplified.append(i)
            n = round(M[f"L{i}_amplified"] * seeds)
            sigma, gamma = M.get(f"L{i}_sigma_med"), M.get(f"L{i}_gamma_med")
            if ok(f"L{i}_sigma_med", f"L{i}_gamma_med"):
                if 0.8 <= gamma <= 1.25 and sigma < 0.8:
                    why = "|γ_j| is still near its initial 1, so the small σ_j sets the factor"
                elif gamma > 1.25 and sigma >= 0.8:
                    why = "σ_j is not small, |γ_j| has grown"
                else:
                    why = "both depart from 1"
                causes.append(f"layer {i} ({n} of {seeds} seeds; median σ_j {sigma:.3g}, median |γ_j| {gamma:.3g}: "
                              f"{why})")
        if ok(f"L{i}_curv_red_share_median"):
            red_share.append(100 * M[f"L{i}_curv_red_share_median"])
        if ok(f"L{i}_curv_red_share_init"):
            red_init.append(100 * M[f"L{i}_curv_red_share_init"])
    if amplified:
        verdict = (
            f"In this network the median ends above 1 in {_layer_list(amplified)}: " + "; ".join(causes) + ". "
            "There BN amplifies the gradient relative to the same-z twin."
        )
    else:
        verdict = ("In this network the median ends below 1 in every layer and every seed: here BN does shrink "
                   "the gradient relative to the same-z twin.")
    better = int(M.get("bn_better_seeds", 0))
    seed_verdict = (
        f"BN ends ahead in {better} of {seeds} seeds" if 0 < better < seeds else
        f"BN ends ahead in every one of the {seeds} seeds" if better == seeds else
        f"BN ends behind in every one of the {seeds} seeds"
    )
    return {
        "scale_verdict": verdict,
        "seed_verdict": seed_verdict,
        "dominant": "; ".join(dominant) if dominant else "— (not measured)",
        "amplified_layers": _layer_list(amplified) if amplified else "none",
        "removed_max": f"{max(removed):.1f}" if removed else "—",
        "red_share_max": f"{max(red_share):.1f}" if red_share else "—",
        "red_init_max": f"{max(red_init):.0f}" if red_init else "—",
    }


# ------------------------------------------------------------------ figures
LAYER_NAMES = ("layer 1", "layer 2", "layer 3")
KIND_MARKERS = {"linear": "o", "cubic": "s", "mlp": "^"}


def layer_name(layer: int) -> str:
    """Display name of BN layer ``layer`` (0-based) in the chapter's figures."""
    return LAYER_NAMES[layer] if layer < len(LAYER_NAMES) else f"layer {layer + 1}"


def plot_instances(a: dict[str, np.ndarray]):
    """Figure: printed and corrected right side of Theorem 4.1 over the true ‖∇_y L̂‖², random instances."""
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    fig, ax = plt.subplots(figsize=(9, 3.6))
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(a["inst_m"]))
    x = np.log2(a["inst_m"]) + jitter
    for k, kind in enumerate(INSTANCE_KINDS):
        sel = a["inst_kind"] == k
        ax.scatter(x[sel], a["inst_ratio_printed"][sel], s=14, marker=KIND_MARKERS[kind], color=PALETTE["no_bn"],
                   alpha=0.6, label=f"printed (1/√m), {kind} loss")
        ax.scatter(x[sel], a["inst_ratio_corrected"][sel], s=14, marker=KIND_MARKERS[kind], color=PALETTE["bn"],
                   alpha=0.8, label=f"corrected (1/m), {kind} loss")
    ax.axhline(1.0, color=PALETTE["ref"], lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ticks = np.unique(a["inst_m"])
    ax.set_xticks(np.log2(ticks), [str(int(t)) for t in ticks])
    ax.set_xlabel("batch size m")
    ax.set_ylabel("right side / ‖∇$_y\\hat{L}$‖²")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def _layer_sum(a: dict[str, np.ndarray], name: str) -> np.ndarray:
    return a[name].sum(-1)  # (checkpoints, layers)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0/0 -> NaN silently (vanished gradients after a blow-up are drawn as gaps)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def plot_gradients(a: dict[str, np.ndarray], seed: int = 0):
    """Figure: per layer over training, ‖∇_y L̂‖² (autograd), the corrected right side, ‖g‖², and the no-BN net's gradient."""
    a = seed_slice(a, seed)  # one seed's trajectory
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    steps = a["steps"]
    n_layers = a["bn_grad_sq_bn"].shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(10, 3.3), sharey=True)
    for layer, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(steps, _layer_sum(a, "bn_grad_sq_bn")[:, layer], color=PALETTE["bn"], lw=2,
                label="BN net: ‖∇$_y\\hat L$‖² (autograd)")
        ax.plot(steps, _layer_sum(a, "bn_rhs41_corrected")[:, layer], "o", mfc="none", color="k", ms=6,
                label="Thm 4.1 corrected right side")
        ax.plot(steps, _layer_sum(a, "bn_grad_sq_z")[:, layer], "--", color=PALETTE["bn"],
                label="same z, no BN: ‖g‖² = ‖∂L/∂z‖²")
        ax.plot(steps, _layer_sum(a, "plain_grad_sq")[:, layer], ":", color=PALETTE["no_bn"], lw=2,
                label="net trained without BN: ‖∂L/∂y‖²")
        ax.set_yscale("log")
        ax.set_title(layer_name(layer))
        ax.set_xlabel("SGD step")
    np.atleast_1d(axes)[0].set_ylabel("‖gradient‖², sum over units")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_terms(a: dict[str, np.ndarray], seed: int = 0):
    """Figure: γ²/σ² (median and 10–90 % band over units) and the two reduction terms' share of ‖g‖², per layer."""
    a = seed_slice(a, seed)  # one seed's trajectory
    import matplotlib.pyplot as plt

    steps = a["steps"]
    n_layers = a["bn_scale"].shape[1]
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.8, n_layers))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for layer in range(n_layers):
        scale = a["bn_scale"][:, layer]
        name = layer_name(layer)
        left.plot(steps, np.median(scale, -1), color=colors[layer], lw=2, label=name)
        left.fill_between(steps, np.quantile(scale, 0.1, -1), np.quantile(scale, 0.9, -1), color=colors[layer], alpha=0.2)
        g = _layer_sum(a, "bn_grad_sq_z")[:, layer]
        right.plot(steps, _div(_layer_sum(a, "bn_mean_term")[:, layer], g), color=colors[layer], lw=2,
                   label=f"{name}: ⟨1,g⟩²/m")
        right.plot(steps, _div(_layer_sum(a, "bn_yhat_term")[:, layer], g), "--", color=colors[layer], lw=2,
                   label=f"{name}: ⟨g,ŷ⟩²/m")
    left.axhline(1.0, color="0.35", lw=0.8)
    left.set_yscale("log")
    left.set_ylabel("γ²/σ²  (BN's rescaling)")
    left.set_xlabel("SGD step")
    left.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    right.set_yscale("log")
    right.set_ylabel("share of ‖g‖² removed")
    right.set_xlabel("SGD step")
    right.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    return fig


def plot_curvature(a: dict[str, np.ndarray], seed: int = 0):
    """Figure: curvature along the gradient per layer over training (Theorem 4.2's two terms, and the no-BN nets)."""
    a = seed_slice(a, seed)  # one seed's trajectory
    import matplotlib.pyplot as plt

    from bnbook.plots import PALETTE

    steps = a["steps"]
    n_layers = a["bn_curv_bn"].shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(10, 3.3), sharey=True)
    for layer, ax in enumerate(np.atleast_1d(axes)):
        v_sq = _layer_sum(a, "bn_v_sq")[:, layer]
        ax.plot(steps, _div(_layer_sum(a, "bn_curv_bn")[:, layer], v_sq), color=PALETTE["bn"], lw=2,
                label="BN net along ∇$_y\\hat L$ (HVP)")
        ax.plot(steps, _div(_layer_sum(a, "bn_scaled_curv")[:, layer], v_sq), "o", mfc="none", color="k", ms=6,
                label="(γ²/σ²)·vᵀHv/‖v‖²")
        ax.plot(steps, _div(-_layer_sum(a, "bn_reduction")[:, layer], v_sq), "x", color="k", ms=6,
                label="−(γ/(mσ²))⟨g,ŷ⟩")
        ax.plot(steps, _div(_layer_sum(a, "bn_gHg")[:, layer], _layer_sum(a, "bn_grad_sq_z")[:, layer]), "--",
                color=PALETTE["bn"], label="same z, no BN: gᵀHg/‖g‖²")
        ax.plot(steps, _div(_layer_sum(a, "plain_gHg")[:, layer], _layer_sum(a, "plain_grad_sq")[:, layer]), ":",
                color=PALETTE["no_bn"], lw=2, label="net trained without BN")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_title(layer_name(layer))
        ax.set_xlabel("SGD step")
    np.atleast_1d(axes)[0].set_ylabel("curvature along the gradient")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_sigma(a: dict[str, np.ndarray]):
    """Figure: per layer over training, the median over units of σ_j, of |γ_j|, of γ_j²/σ_j² and of the batch
    spread of the sigmoid outputs feeding the layer; one line per seed (the first one thicker)."""
    import matplotlib.pyplot as plt

    steps = a["steps"]
    k, n_layers = a["bn_sigma"].shape[1], a["bn_sigma"].shape[2]
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.8, n_layers))
    panels = [("bn_sigma", "σ_j (pre-BN batch std)", "log"), ("bn_gamma", "|γ_j|", "log"),
              ("bn_scale", "γ_j²/σ_j²", "log"), ("bn_input_spread", "batch std of the input sigmoids", "linear")]
    fig, grid = plt.subplots(2, 2, figsize=(8.4, 6.2))  # 2×2, not 1×4: labels stay readable in a text column
    axes = grid.ravel()
    for ax, (name, title, scale) in zip(axes, panels):
        for layer in range(n_layers):
            for seed in range(k):
                values = np.abs(a[name][:, seed, layer])
                if np.isnan(values).all():  # layer 1's inputs are pixels: no sigmoid spread
                    continue
                ax.plot(steps, np.median(values, -1), color=colors[layer], lw=1.6 if seed == 0 else 0.8,
                        alpha=1 if seed == 0 else 0.6, label=layer_name(layer) if seed == 0 else None)
        if name == "bn_scale":
            ax.axhline(1.0, color="0.35", lw=0.8)
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=10)
    for ax in grid[-1]:
        ax.set_xlabel("SGD step")
    for ax in grid[:, 0]:
        ax.set_ylabel("median over units")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def seed_rows(M: dict) -> list[dict]:
    """Rows (one per layer) of the factors of γ²/σ², mean over seeds with the range in brackets."""
    def band(key: str, spec: str) -> str:
        if any(M.get(k) is None or not math.isfinite(M[k]) for k in (key, f"{key}_min", f"{key}_max")):
            return "—"
        return f"{M[key]:{spec}} ({M[key + '_min']:{spec}}–{M[key + '_max']:{spec}})"

    return [
        {"layer": i, "scale0": band(f"L{i}_scale_med_init", ".3g"), "scale": band(f"L{i}_scale_med", ".3g"),
         "sigma0": band(f"L{i}_sigma_med_init", ".3g"), "sigma": band(f"L{i}_sigma_med", ".3g"),
         "gamma": band(f"L{i}_gamma_med", ".3g"),
         "spread": band(f"L{i}_spread_med", ".3f") if i > 1 else "— (pixels)"}
        for i in (1, 2, 3)
    ]


GLUE_FORMATS = {
    "inst_count": "d", "inst_units": "d", "inst_m_min": "d", "inst_m_max": "d", "cx_m": "d", "net_steps": "d",
    "net_checkpoints": "d", "net_m": "d", "net_seeds": "d", "lemma_rows*": "d", "bn_better_seeds": "d",
    "width": "d", "measure_batches": "d", "instances": "d", "lr": "g", "small_init_std": "g",
    "cx_gamma": ".2f", "cx_sigma": ".3f", "cx_lhs": ".6f", "cx_rhs_corrected": ".6f", "cx_rhs_printed": ".6f",
    "cx_grad_sq_plain": ".4f", "cx_mean_term": ".4f", "cx_yhat_term": ".4f", "cx_gap": ".4f",
    "acc_bn*": ".3f", "acc_plain*": ".3f", "lemma_k": ".3g", "lemma_dist_*": ".4g", "lemma_gain*": ".4g",
    "train_time_s": ".0f", "measure_time_s": ".0f", "inst_t44_tightness_max": ".3f",
    "*_frac": lambda v: f"{100 * v:.1f}", "*_frac_all": lambda v: f"{100 * v:.1f}",
    "*_frac_min": lambda v: f"{100 * v:.1f}", "*_frac_max": lambda v: f"{100 * v:.1f}",
    "L*_scale*": ".3g", "L*_sigma*": ".3g", "L*_gamma*": ".3g", "L*_spread*": ".3f", "*": ".2e",
}
"""How chapter 4 prints its metrics (``report.glue_metrics``): shares in percent, residuals as ``.2e``."""


LAYER_COLUMNS = {
    "layer": "layer", "scale0": "γ²/σ² at step 0 (median)", "scale": "γ²/σ² at the end (median)",
    "ratio": "‖∇L̂‖² / ‖g‖²", "mean": "mean term (% of ‖g‖²)", "yhat": "ŷ term (% of ‖g‖²)",
    "gbn": "‖∇L̂‖², BN net", "gplain": "‖∂L/∂y‖², no-BN net",
    "cbn": "curvature, BN net", "cz": "curvature, same z", "cplain": "curvature, no-BN net",
}
LAYER_FORMATS = {"layer": "d", "scale": ".3g", "scale0": ".3g", "ratio": ".3g", "mean": ".2f", "yhat": ".2f",
                 "gbn": ".2e", "gplain": ".2e", "cbn": ".2e", "cz": ".2e", "cplain": ".2e"}


def layer_rows(M: dict) -> list[dict]:
    """Rows (one per layer) of the last-checkpoint table: each entry the mean over seeds (see ``network_metrics``)."""
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    return [
        {"layer": i, "scale": M[f"L{i}_scale_med"], "scale0": M[f"L{i}_scale_med_init"], "ratio": M[f"L{i}_ratio_bn_z"],
         "mean": pct(M[f"L{i}_mean_frac"]), "yhat": pct(M[f"L{i}_yhat_frac"]), "gbn": M[f"L{i}_grad_bn"],
         "gplain": M[f"L{i}_grad_plain"], "cbn": M[f"L{i}_curv_bn"], "cz": M[f"L{i}_curv_z"],
         "cplain": M[f"L{i}_curv_plain"]}
        for i in (1, 2, 3)
    ]
