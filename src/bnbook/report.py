"""Tables and inline numbers rendered from result files (never typed into the prose)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from bnbook.results import Result

Formatter = str | Callable[[Any], str]


def fmt(value: Any, spec: Formatter = ".4g") -> str:
    """Format one cell: ``None``/NaN as an em dash, numbers with ``spec``, the rest with ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if callable(spec):
        return spec(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, str],
    formats: Mapping[str, Formatter] | None = None,
) -> str:
    """Return a Markdown table: ``columns`` maps row keys to headers, ``formats`` keys to specs."""
    formats = formats or {}
    esc = lambda text: str(text).replace("|", "\\|")  # noqa: E731 - a literal | would split the cell
    header = "| " + " | ".join(esc(c) for c in columns.values()) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(esc(fmt(row.get(key), formats.get(key, ".4g"))) for key in columns) + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])


def table(
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, str],
    formats: Mapping[str, Formatter] | None = None,
):
    """Display-ready Markdown table (an IPython ``Markdown`` object) for a notebook cell."""
    from IPython.display import Markdown

    return Markdown(markdown_table(rows, columns, formats))


def glue(name: str, value: Any, spec: Formatter = ".3g") -> None:
    """Store ``value`` formatted under ``name`` for ``{glue}`name``` in the chapter's prose.

    The text is glued as Markdown, so it renders inline without quotes (and may hold `code`).
    """
    from IPython.display import Markdown
    from myst_nb import glue as _glue

    _glue(name, Markdown(fmt(value, spec)), display=False)


def glue_metrics(
    result: Result | Mapping[str, Any], formats: Mapping[str, Formatter] | None = None, prefix: str = ""
) -> None:
    """Glue every scalar metric of ``result`` (a :class:`Result` or a metrics mapping) for the prose.

    Names are flattened: nested mappings join their keys with ``_`` (``{"err": {"ws+bn": x}}``
    becomes ``err_ws_bn``, characters other than letters, digits and ``_`` turned into ``_``),
    lists of scalars are numbered (``range_0``, ``range_1``); lists of rows and other
    containers are skipped (they are tables). Each value is glued as ``prefix + name``
    (``{glue}`prefix_name``` in the text), formatted by the first pattern of ``formats``
    (``fnmatch`` patterns on the flattened name, without the prefix) that matches; without a
    match integers get ``,`` (thousands separators), other numbers ``.3g``, and strings,
    booleans and ``None`` (an em dash) are glued as they are.
    """
    import fnmatch
    import re

    metrics = result.metrics if isinstance(result, Result) else result
    flat: dict[str, Any] = {}

    def walk(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{name}_{key}" if name else str(key), inner)
        elif isinstance(value, (list, tuple)):
            if all(v is None or isinstance(v, (int, float, str)) for v in value):
                for i, inner in enumerate(value):
                    walk(f"{name}_{i}", inner)
        elif value is None or isinstance(value, (int, float, str)):
            flat[re.sub(r"\W", "_", name)] = value

    walk("", metrics)
    for name, value in flat.items():
        spec = next((s for pattern, s in (formats or {}).items() if fnmatch.fnmatchcase(name, pattern)), None)
        if spec is None:
            spec = "," if isinstance(value, int) and not isinstance(value, bool) else ".3g"
        glue(prefix + name, value, spec)


def provenance(result: Result | Sequence[Result]) -> str:
    """One sentence naming the dataset(s), machine, runtime and result folder of a result."""
    results = [result] if isinstance(result, Result) else list(result)
    parts = []
    for res in results:
        env = res.record["environment"]
        reused = " (reused from cache)" if res.reused else ""
        parts.append(
            f"dataset {', '.join(res.record['datasets'])}; computed on {env['device']} "
            f"({env['device_name']}), torch {env['torch']}, in {res.record['runtime_s']:.1f} s"
            f"{reused}; result folder `{res.record['chapter']}/{res.record['key']}`"
        )
    return "; ".join(parts) + "."


def glue_figure(name: str, fig: Any, alt: str | None = None) -> None:
    """Store ``fig`` under ``name`` for a numbered ``{glue:figure}`` with a caption, and close it.

    The alt text is ``alt`` (a sentence saying what the figure shows, optional) followed by
    :func:`bnbook.plots.describe` (its panels, axes, ranges and legends, read from the figure).
    It is written into the glued PNG itself, from which the book's Sphinx extension sets the
    page's ``<img alt>``; a ``:alt:`` option on the ``{glue:figure}`` directive is put in front.
    Closing keeps the inline backend from showing the figure a second time in the cell's output
    (and nothing is returned, so a last-line call shows nothing either).
    """
    import matplotlib.pyplot as plt
    from IPython.display import Image
    from myst_nb import glue as _glue

    from bnbook.plots import describe, png_bytes

    text = " ".join(part.strip() for part in (alt or "", describe(fig)) if part.strip())
    _glue(name, Image(data=png_bytes(fig, text), format="png"), display=False)
    plt.close(fig)
