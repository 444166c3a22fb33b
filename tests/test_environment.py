"""The environment files agree and pin everything (torch above all)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def lock_pins():
    lines = [l.strip() for l in (ROOT / "requirements.lock").read_text().splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


def test_lock_pins_every_package_exactly():
    pins = lock_pins()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    for needed in ("torch", "jupyter-book", "papermill", "jupytext", "numpy", "matplotlib", "seaborn",
                   "sphinx-proof", "sphinxcontrib-bibtex", "myst-nb", "pytest", "pooch", "mlxtend",
                   "sphinx-mathjax-offline"):
        assert needed in names, f"{needed} is not pinned in requirements.lock"
    assert "torch==2.13.0" in pins
    assert not any(p.lower().startswith("ipywidgets") for p in pins), "ipywidgets would load scripts from CDNs"


def test_environment_yml_has_the_same_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(lock_pins())
    assert "python=3.11" in env["dependencies"]
