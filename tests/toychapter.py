"""Toy chapter sources for the runner's tests: the MyST front matter every chapter starts with."""

import textwrap

HEADER = textwrap.dedent('''\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
    kernelspec:
      display_name: Python 3
      language: python
      name: python3
    ---

    ''')


def chapter(title: str, body: str) -> str:
    """A chapter source: front matter, ``# title`` and ``body`` (dedented MyST cells)."""
    return HEADER + f"# {title}\n\n" + textwrap.dedent(body)
