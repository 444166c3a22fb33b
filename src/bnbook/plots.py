"""The book's figure style and figure saving (PNG at 150 dpi, beside the raw arrays)."""

from __future__ import annotations

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
    """Save ``fig`` as ``<name>.png`` in the result folder (beside ``arrays.npz``) and return the path."""
    folder = result if isinstance(result, Path) else result.dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
