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
