"""bnbook: the helper library behind the executable book on Batch Normalization.

Modules (one responsibility each):

- :mod:`bnbook.config`  -- typed chapter configs and the smoke/quick/paper profiles
- :mod:`bnbook.env`     -- device selection and the machine/version record
- :mod:`bnbook.results` -- result folders named by a config hash, result files
- :mod:`bnbook.plots`   -- the book's figure style and figure saving
- :mod:`bnbook.report`  -- tables and inline numbers rendered from result files
- :mod:`bnbook.data`    -- datasets as device tensors
- :mod:`bnbook.norms`   -- BatchNorm and its relatives (LN, GN, WS, Batch Renorm) from scratch
- :mod:`bnbook.backprop` -- BN's backward pass by hand, the projection P, the speed benchmark
- :mod:`bnbook.nets`    -- the book's networks (MLPs, small CNNs; several seeds packed in one)
- :mod:`bnbook.train`   -- the training engine: several same-shape models at once, on the device
- :mod:`bnbook.bench`   -- the engine benchmark against a plain PyTorch loop
- :mod:`bnbook.theory`  -- both sides of Santurkar et al.'s theorems, measured on layers
- :mod:`bnbook.run`     -- the ``bnbook`` command: runs chapters, builds the book
- :mod:`bnbook.publish` -- citation metadata, runnable chapter downloads, the PDF edition
- :mod:`bnbook.sphinx_ext` -- the book's Sphinx extension: version footer, alt text, downloads
- :mod:`bnbook.experiments` -- one module per chapter: its config and experiment
"""

from bnbook.errors import BnbookError

__all__ = ["BnbookError"]

# The book's one version string: pyproject.toml reads it, the site shows it on every page, and
# CITATION.cff and the BibTeX entry carry it (bnbook.publish). Bump RELEASE_DATE with it.
__version__ = "0.1.0"
RELEASE_DATE = "2026-11-24"
