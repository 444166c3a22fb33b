"""bnbook.data: the IDX and CIFAR parsers, the download/checksum path, the offline datasets."""

import gzip
import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from bnbook import data
from bnbook.errors import DatasetError


# ---------------------------------------------------------------- helpers
def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def cifar_tar(path: Path, rows: int = 4, skip: str | None = None) -> dict[str, np.ndarray]:
    """Write a small tarball with the layout of cifar-10-python.tar.gz; return the arrays it holds."""
    rng = np.random.default_rng(0)
    written = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            if name == skip:
                continue
            x = rng.integers(0, 256, size=(rows, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, size=rows).tolist()
            written[name] = (x, y)
            blob = pickle.dumps({b"data": x, b"labels": y, b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return written


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over a temporary folder: yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """Datasets go to a temporary folder; the in-memory dataset cache starts empty."""
    home = tmp_path / "data"
    monkeypatch.setenv("BNBOOK_DATA_DIR", str(home))
    data._load_cpu.cache_clear()
    yield home
    data._load_cpu.cache_clear()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def md5(blob: bytes) -> str:
    return "md5:" + hashlib.md5(blob).hexdigest()


def fake_mnist(n_train: int = 12, n_test: int = 6) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    return {
        "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(rng.integers(0, 256, (n_train, 28, 28)))),
        "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(np.arange(n_train) % 10)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(rng.integers(0, 256, (n_test, 28, 28)))),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(np.arange(n_test) % 10)),
    }


# ---------------------------------------------------------------- parsers
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    np.testing.assert_array_equal(data.read_idx(path), arr)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    arr = np.zeros((5, 4), dtype=np.uint8)
    cut = tmp_path / "cut.idx"
    cut.write_bytes(idx_bytes(arr)[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        data.read_idx(cut)
    foreign = tmp_path / "foreign.idx"
    foreign.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DatasetError, match="magic"):
        data.read_idx(foreign)


def test_read_cifar10_tar(tmp_path):
    path = tmp_path / "cifar.tar.gz"
    written = cifar_tar(path, rows=3)
    arr = data.read_cifar10_tar(path)
    assert arr["x_train"].shape == (15, 3, 32, 32) and arr["x_test"].shape == (3, 3, 32, 32)
    assert arr["y_train"].dtype == np.int64
    x1, y1 = written["data_batch_1"]
    np.testing.assert_array_equal(arr["x_train"][:3].reshape(3, -1), x1)  # row layout: R plane, G, B
    np.testing.assert_array_equal(arr["y_test"], written["test_batch"][1])


def test_read_cifar10_tar_names_what_is_missing(tmp_path):
    path = tmp_path / "cifar.tar.gz"
    cifar_tar(path, skip="data_batch_3")
    with pytest.raises(DatasetError, match="data_batch_3"):
        data.read_cifar10_tar(path)


# ---------------------------------------------------------------- download and checksums
def test_mnist_download_checked_and_parsed(server, data_home, monkeypatch):
    root, url = server
    files = fake_mnist()
    for name, blob in files.items():
        (root / name).write_bytes(blob)
    remote = tuple(data.RemoteFile(n, url + n, md5(b)) for n, b in files.items())
    monkeypatch.setitem(data.REMOTE, "mnist", remote)
    ds = data.load("mnist")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert ds.y_train.tolist() == [i % 10 for i in range(12)]
    assert sorted(p.name for p in (data_home / "mnist").iterdir()) == sorted(files)
    # a second load needs no network: the files in place pass their checksums
    for name in files:
        (root / name).unlink()
    data._load_cpu.cache_clear()
    assert data.load("mnist").x_train.shape == (12, 1, 28, 28)


def test_corrupt_download_never_passes(server, data_home, monkeypatch):
    root, url = server
    files = fake_mnist()
    for name, blob in files.items():
        (root / name).write_bytes(blob[: len(blob) // 2])  # the server hands out partial files
    remote = tuple(data.RemoteFile(n, url + n, md5(b)) for n, b in files.items())
    monkeypatch.setitem(data.REMOTE, "mnist", remote)
    with pytest.raises(DatasetError) as err:
        data.load("mnist")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "mnist5k" in msg and str(data_home / "mnist") in msg
    assert "checksum mismatch" in msg
    assert not (data_home / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_offline_with_corrupt_local_file(data_home, monkeypatch):
    blob = b"a complete file"
    url = f"http://127.0.0.1:{closed_port()}/"
    monkeypatch.setitem(data.REMOTE, "cifar10", (data.RemoteFile("c.tar.gz", url + "c.tar.gz", md5(blob)),))
    (data_home / "cifar10").mkdir(parents=True)
    (data_home / "cifar10" / "c.tar.gz").write_bytes(blob[:5])  # an interrupted manual copy
    with pytest.raises(DatasetError, match=r"cifar10.*c\.tar\.gz.*put it at.*fashion-mnist"):
        data.load("cifar10")


def test_cifar10_from_local_file(data_home, tmp_path, monkeypatch):
    tar = tmp_path / "cifar.tar.gz"
    cifar_tar(tar, rows=2)
    blob = tar.read_bytes()
    url = f"http://127.0.0.1:{closed_port()}/"  # offline: the file placed by hand must suffice
    monkeypatch.setitem(data.REMOTE, "cifar10", (data.RemoteFile("c.tar.gz", url + "c.tar.gz", md5(blob)),))
    (data_home / "cifar10").mkdir(parents=True)
    (data_home / "cifar10" / "c.tar.gz").write_bytes(blob)
    ds = data.load("cifar10")
    assert ds.input_shape == (3, 32, 32) and len(ds.y_train) == 10 and len(ds.y_test) == 2
    assert ds.classes[0] == "airplane"


def test_registry_uses_official_sources():
    assert all(f.url.startswith("https://") and f.known_hash.startswith("md5:") for fs in data.REMOTE.values() for f in fs)
    assert data.REMOTE["cifar10"][0].known_hash == "md5:c58f30108f718f92721af3b95e74349a"
    assert len(data.REMOTE["mnist"]) == 4


# ---------------------------------------------------------------- offline datasets and names
def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DatasetError, match="mnist5k.*") as err:
        data.load("imagenet")
    assert all(name in str(err.value) for name in data.LOADERS)


def test_mnist5k_split_and_normalisation():
    ds = data.load("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    counts = torch.bincount(ds.y_train, minlength=10)
    assert counts.sum() == 4000 and counts.min() > 300  # shuffled, not sorted by label
    assert torch.equal(data.load("mnist5k").y_test, ds.y_test)  # the split is fixed
