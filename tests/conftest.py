"""Shared test settings: single-threaded torch (small ops are faster and deterministic)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes result folders into its own temporary directory."""
    monkeypatch.setenv("BNBOOK_RESULTS_DIR", str(tmp_path / "results"))
