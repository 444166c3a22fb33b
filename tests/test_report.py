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


def test_seed_band_options_median_percentiles_band_only_dots_and_pooled_runs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pytest

    from bnbook import plots

    values = np.array([[0.0, 1.0, 2.0, 3.0, 10.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    fig, ax = plt.subplots()
    line = plots.seed_band(ax, [0, 1], values, "C0", "median", centre="median", band=(25, 75), ls="--")
    assert list(line.get_ydata()) == [2.0, 5.0] and line.get_linestyle() == "--"
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 1.0 and band.max() == 5.0  # 25th percentile 1 at x=0, both quantiles 5 at x=1
    plt.close(fig)

    fig, ax = plt.subplots()  # band alone: it carries the label and is returned
    fill = plots.seed_band(ax, [0, 1], values, "C1", "all seeds", centre=None)
    assert not ax.lines and fill is ax.collections[0] and fill.get_label() == "all seeds"
    assert ax.get_legend_handles_labels()[1] == ["all seeds"]
    plt.close(fig)

    fig, ax = plt.subplots()  # line and one dot per seed, no band
    line = plots.seed_band(ax, [0, 1], values, "C2", "dots", band=None, seed_dots=True, marker="o")
    assert list(line.get_ydata()) == [3.2, 5.0] and line.get_marker() == "o"
    (dots,) = ax.collections
    assert len(dots.get_offsets()) == values.size and ax.get_legend_handles_labels()[1] == ["dots"]
    plt.close(fig)

    fig, ax = plt.subplots()  # trailing axes pool into runs: (points, splits, seeds)
    line = plots.seed_band(ax, [0, 1], values[:, :4].reshape(2, 2, 2), "C3")
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert list(line.get_ydata()) == [1.5, 5.0] and band.min() == 0.0 and band.max() == 5.0
    with pytest.raises(ValueError):
        plots.seed_band(ax, [0, 1], values, "C3", centre=None, band=None)
    plt.close(fig)
