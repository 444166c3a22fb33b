"""Tables and inline numbers rendered from results."""

import math

from bnbook.report import fmt, markdown_table


def test_fmt():
    assert fmt(None) == "—" and fmt(math.nan) == "—"
    assert fmt(0.123456, ".3f") == "0.123" and fmt(12, "d") == "12" and fmt("BN") == "BN"
    assert fmt(2.0, lambda v: f"{v:.0%}") == "200%"


def test_markdown_table_escapes_pipes_and_keeps_column_count():
    text = markdown_table([{"a": "|x|", "b": 0.5}, {"a": "y"}], {"a": "max |d|", "b": "B"}, {"b": ".2f"})
    lines = text.splitlines()
    assert lines[0] == "| max \\|d\\| | B |" and lines[1] == "|---|---|"
    assert lines[2] == "| \\|x\\| | 0.50 |" and lines[3] == "| y | — |"
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)


def test_seed_band_draws_mean_and_range_and_skips_nan():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bnbook import plots

    fig, ax = plt.subplots()
    values = np.array([[1.0, 3.0], [2.0, np.nan], [np.nan, np.nan]])
    line = plots.seed_band(ax, [0, 1, 2], values, "C0", "bn")
    y = line.get_ydata()
    assert y[0] == 2.0 and y[1] == 2.0 and np.isnan(y[2])
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 1.0 and band[:, 1].max() == 3.0
    plt.close(fig)
