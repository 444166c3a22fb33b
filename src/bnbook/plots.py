"""The book's figure style, figure saving (PNG at 150 dpi, beside the raw arrays) and the
text alternative of every figure (:func:`describe`), which travels inside the PNG itself."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from bnbook.results import Result

DPI = 150
PALETTE = {"bn": "#1f77b4", "no_bn": "#d62728", "ref": "0.35"}
"""Colours used consistently across chapters: BN blue, no BN red, references grey."""


def setup_style() -> None:
    """Apply the book's seaborn theme to every later matplotlib figure."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    matplotlib.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "figure.autolayout": False})


def save(fig: Figure, result: Result | Path, name: str) -> Path:
    """Save ``fig`` as ``<name>.png`` in the result folder (beside ``arrays.npz``) and return the path.

    The PNG carries :func:`describe`'s text alternative in its ``Description`` field. An unchanged
    figure is not written again (so a read-only results cache works), and a result records the
    figure's checksum.
    """
    from bnbook.results import store_figure

    if isinstance(result, Path):
        result.mkdir(parents=True, exist_ok=True)
    return store_figure(result, f"{name}.png", png_bytes(fig, describe(fig)))


def seed_band(ax, x, values, color: str, label: str | None = None, *,
              band: str | tuple[float, float] | None = "range", centre: str | None = "mean",
              seed_dots: bool = False, alpha: float = 0.18, **line):
    """Plot the mean (or median) over seeds of ``values`` (points, seeds) with a band; return the line.

    ``values``: one row per point of ``x``; every further axis counts as runs (``(points, splits, seeds)``
    pools splits and seeds). ``band``: ``"range"`` (min to max over seeds: every run lies inside),
    ``"sd"`` (± one standard deviation around the mean), a pair of percentiles such as ``(10, 90)``, or
    ``None`` (no band). ``centre``: ``"mean"``, ``"median"``, or ``None`` for the band alone, which then
    carries ``label`` and is returned. ``seed_dots``: also draw every seed as a faint dot. ``line`` goes
    to the centre line (``ls``, ``lw``, ``marker``, ...). NaN entries (diverged runs) are ignored; a
    point whose runs are all NaN leaves a gap. The one seed-band helper of the book, so every figure
    draws its seeds the same way.
    """
    import warnings

    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v.reshape(v.shape[0], int(np.prod(v.shape[1:])))  # (points, runs); a 1-D series is one run
    if centre is None and band is None:
        raise ValueError("seed_band with neither centre nor band draws nothing")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a gap, not a warning
        if centre == "mean":
            mid = np.nanmean(v, 1)
        elif centre == "median":
            mid = np.nanmedian(v, 1)
        elif centre is not None:
            raise ValueError(f"unknown centre {centre!r}: use 'mean', 'median' or None")
        if band == "sd":
            mean, sd = np.nanmean(v, 1), np.nanstd(v, 1)
            lo, hi = mean - sd, mean + sd
        elif band == "range":
            lo, hi = np.nanmin(v, 1), np.nanmax(v, 1)
        elif isinstance(band, tuple) and len(band) == 2:
            lo, hi = np.nanpercentile(v, band[0], 1), np.nanpercentile(v, band[1], 1)
        elif band is not None:
            raise ValueError(f"unknown band {band!r}: use 'range', 'sd', a pair of percentiles or None")
    handle = None
    if centre is not None:
        (handle,) = ax.plot(x, mid, color=color, label=label, **line)
    if band is not None and (v.shape[1] > 1 or handle is None):
        fill = ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0, label=label if handle is None else None)
        handle = fill if handle is None else handle
    if seed_dots:
        ax.scatter(np.repeat(np.asarray(x), v.shape[1]), v.ravel(), color=color, alpha=0.35, s=12, lw=0)
    return handle


# ------------------------------------------------------------------ text alternatives
ALT_KEY = "Description"
"""The PNG text field that holds a figure's alt text (a registered PNG keyword). The book's
Sphinx extension (:mod:`bnbook.sphinx_ext`) reads it back into the ``alt`` of the page's ``<img>``."""

_TEX_SYMBOLS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "Delta": "Δ", "epsilon": "ε",
    "varepsilon": "ε", "eta": "η", "theta": "θ", "kappa": "κ", "lambda": "λ", "mu": "μ",
    "nu": "ν", "pi": "π", "rho": "ρ", "sigma": "σ", "Sigma": "Σ", "tau": "τ", "phi": "φ",
    "chi": "χ", "psi": "ψ", "omega": "ω", "ell": "ℓ", "nabla": "∇", "partial": "∂",
    "infty": "∞", "times": "×", "cdot": "·", "pm": "±", "approx": "≈", "le": "≤", "leq": "≤",
    "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "to": "→", "rightarrow": "→", "sim": "∼",
    "in": "∈", "top": "ᵀ", "sqrt": "√", "log": "log", "exp": "exp", "max": "max", "min": "min",
}
_SUPERSCRIPTS = str.maketrans("0123456789-+", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺")
_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def plain_text(label: str) -> str:
    """``label`` with matplotlib's TeX (``$\\gamma/s$``, ``$10^{-3}$``) turned into readable text."""

    def math(match: re.Match[str]) -> str:
        tex = match.group(1)
        tex = re.sub(r"\\(?:mathdefault|mathrm|mathbf|mathcal|mathit|operatorname|text|hat|tilde|bar|left|right)\s*",
                     "", tex)
        tex = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", tex)
        tex = re.sub(r"\^(?:\{([0-9+\-]+)\}|([0-9]))", lambda m: (m.group(1) or m.group(2)).translate(_SUPERSCRIPTS), tex)
        tex = re.sub(r"_(?:\{([0-9]+)\}|([0-9]))", lambda m: (m.group(1) or m.group(2)).translate(_SUBSCRIPTS), tex)
        tex = tex.replace(r"\|", "‖")
        tex = re.sub(r"\\([A-Za-z]+)", lambda m: _TEX_SYMBOLS.get(m.group(1), m.group(1)), tex)
        tex = re.sub(r"\\[,;:! ]", " ", tex)
        tex = tex.replace("{", "").replace("}", "").replace("^", "").replace("_", "")
        return tex

    text = re.sub(r"\$([^$]*)\$", math, label)
    return re.sub(r"\s+", " ", text).strip()


def _range(lo: float, hi: float) -> str:
    return f"from {min(lo, hi):.3g} to {max(lo, hi):.3g}"


def _axis(ax, which: str) -> str:
    from matplotlib.ticker import FixedFormatter, FixedLocator, FuncFormatter

    label = plain_text(getattr(ax, f"get_{which}label")())
    scale = getattr(ax, f"get_{which}scale")()
    lo, hi = getattr(ax.dataLim, f"interval{which}")  # the data's extent, not the padded view
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
        lo, hi = getattr(ax, f"get_{which}lim")()
    ticks = [plain_text(t.get_text()) for t in getattr(ax, f"get_{which}ticklabels")()]
    ticks = [t for t in ticks if t]
    span = _range(lo, hi)
    axis = getattr(ax, f"{which}axis")
    # set_xticks(positions, labels) fixes both the positions and the texts: the ticks are named
    named = isinstance(axis.get_major_locator(), FixedLocator) and isinstance(
        axis.get_major_formatter(), (FixedFormatter, FuncFormatter))
    if ticks and (named or any(re.search(r"[A-DF-Za-df-z]", t) for t in ticks)):
        span = "categories " + ", ".join(ticks)  # named ticks (e.g. methods) say more than a range
    kind = "log " if scale == "log" else ""
    if ax.images and span.startswith("from"):
        span = ""  # a heat map's axes index its cells: the shape says it
    if not (label or span):
        return ""
    return (f"{which} {kind}axis" + (f" '{label}'" if label else "") + (f" {span}" if span else "")).strip()


def _marks(ax) -> str:
    """What an Axes draws: heat map, lines, points, bars, bands."""
    from matplotlib.collections import PathCollection, PolyCollection
    from matplotlib.patches import Polygon, Rectangle

    kinds = []
    for image in ax.images:
        shape = image.get_array().shape
        kinds.append(f"heat map of {shape[0]}×{shape[1]} cells" if len(shape) == 2 else "image")
    lines = [ln for ln in ax.lines if len(ln.get_xdata()) > 2 or ln.get_label()[:1] != "_"]
    if lines:
        kinds.append(f"{len(lines)} line{'s' if len(lines) > 1 else ''}")
    if any(isinstance(c, PathCollection) for c in ax.collections):
        kinds.append("points")
    if any(isinstance(c, PolyCollection) for c in ax.collections):
        kinds.append("shaded bands")
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    if bars:
        kinds.append(f"{len(bars)} bars")
    outlines = [p for p in ax.patches if isinstance(p, Polygon) and not isinstance(p, Rectangle)]
    if outlines:  # hist(histtype="step") draws one outline per data set
        kinds.append(f"{len(outlines)} histogram{'s' if len(outlines) > 1 else ''}")
    return ", ".join(kinds) or "empty panel"


def describe(fig: Figure) -> str:
    """A text alternative for ``fig``, read from what it draws.

    For each panel: its title, what it draws (heat map, lines, points, bars), its axes with
    label, scale and range (or category names; an axis common to all panels is named once) and
    its legend entries; then each colour bar's label and range. Written into the PNG by
    :func:`save` and :func:`bnbook.report.glue_figure`, so the alt text comes from the same
    labels as the figure and cannot drift from it.
    """
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    parts = []
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None and suptitle.get_text():
        parts.append(plain_text(suptitle.get_text()) + ".")
    n = len(axes)
    parts.append(f"Figure with {n} panel{'s' if n != 1 else ''}." if n != 1 else "Chart.")
    shared = {}  # an axis described the same way in every panel is described once
    for which in ("x", "y"):
        texts = {_axis(ax, which) for ax in axes}
        if n > 1 and len(texts) == 1:
            shared[which] = texts.pop()
    if any(shared.values()):
        parts.append("All panels: " + "; ".join(t for t in shared.values() if t) + ".")
    for i, ax in enumerate(axes, 1):
        title = plain_text(ax.get_title() or ax.get_title("left") or ax.get_title("right"))
        head = (f"Panel {i}" if n > 1 else "") + (f" '{title}'" if title else "")
        text = (head.strip() + ": " if head.strip() else "") + _marks(ax)
        for which in ("x", "y"):
            if which not in shared and _axis(ax, which):
                text += "; " + _axis(ax, which)
        legend = ax.get_legend()
        if legend is not None:
            entries = [plain_text(t.get_text()) for t in legend.get_texts() if t.get_text()]
            if entries:
                text += "; legend: " + ", ".join(entries)
        parts.append(text + ".")
    for cb in bars:
        label = plain_text(cb.get_ylabel() or cb.get_xlabel())
        lo, hi = cb.get_ylim() if cb.get_ylim() != (0.0, 1.0) else cb.get_xlim()
        parts.append("Colour bar" + (f" '{label}'" if label else "") + f" {_range(lo, hi)}.")
    legends = [lg for lg in fig.legends if lg.get_texts()]
    for lg in legends:
        parts.append("Legend: " + ", ".join(plain_text(t.get_text()) for t in lg.get_texts()) + ".")
    return " ".join(parts)


TEXT_KEY = "Label text px"
"""PNG text field with the typical height in pixels of the figure's text (the median font size of
its labels, ticks and legends at :data:`DPI`), from which :mod:`bnbook.pagecheck` tells how large
the labels appear on a page."""


def label_text_px(fig: Figure) -> float | None:
    """Median font size, in PNG pixels at :data:`DPI`, of the visible texts of ``fig`` (mostly tick labels)."""
    import statistics

    from matplotlib.text import Text

    fig.draw_without_rendering()  # tick labels get their text only when the figure is drawn
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return statistics.median(sizes) * DPI / 72 if sizes else None


def png_bytes(fig: Figure, description: str) -> bytes:
    """``fig`` as PNG bytes (150 dpi, tight box) with ``description`` in the PNG's alt-text field
    and its typical text size in :data:`TEXT_KEY`."""
    metadata = {ALT_KEY: description}
    px = label_text_px(fig)
    if px is not None:
        metadata[TEXT_KEY] = f"{px:.1f}"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata=metadata)
    return buf.getvalue()


def read_text_px(png: bytes | Path) -> float | None:
    """The typical text size stored in a PNG by :func:`png_bytes`, or ``None``."""
    from PIL import Image

    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as image:
        value = getattr(image, "text", {}).get(TEXT_KEY)
    return float(value) if value else None


def read_description(png: bytes | Path) -> str | None:
    """The alt text stored in a PNG by :func:`png_bytes`, or ``None``."""
    from PIL import Image

    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as image:
        return image.text.get(ALT_KEY) if hasattr(image, "text") else None
