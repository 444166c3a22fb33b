"""Where the repository, the dataset cache and the result folders are.

Environment variables override the defaults, which is how the runner points a chapter
at another output tree (the test suite's smoke build writes into a temporary folder).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The repository root: ``$BNBOOK_ROOT``, else the checkout this package was installed from."""
    if "BNBOOK_ROOT" in os.environ:
        return Path(os.environ["BNBOOK_ROOT"]).resolve()
    candidate = PACKAGE_DIR.parents[1]  # src/bnbook -> repo (editable install)
    if (candidate / "_config.yml").exists():
        return candidate
    return Path.cwd().resolve()


def data_dir() -> Path:
    """The dataset cache: ``$BNBOOK_DATA_DIR``, else ``<repo>/data``."""
    return Path(os.environ.get("BNBOOK_DATA_DIR", repo_root() / "data")).resolve()


def results_dir() -> Path:
    """The result folders: ``$BNBOOK_RESULTS_DIR``, else ``<repo>/data/results``."""
    return Path(os.environ.get("BNBOOK_RESULTS_DIR", data_dir() / "results")).resolve()
