"""bnbook.data: the IDX, CIFAR, R-data and ARFF parsers, the download/checksum path, the offline datasets,
stratified splits and training-only standardisation."""

import gzip
import hashlib
import http.server
import io
import json
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
    """A file in place that fails its checksum is reported as such, where it is — not as 'put it there'."""
    blob = b"a complete file"
    url = f"http://127.0.0.1:{closed_port()}/"
    monkeypatch.setitem(data.REMOTE, "cifar10", (data.RemoteFile("c.tar.gz", url + "c.tar.gz", md5(blob)),))
    (data_home / "cifar10").mkdir(parents=True)
    target = data_home / "cifar10" / "c.tar.gz"
    target.write_bytes(blob[:5])  # an interrupted manual copy
    with pytest.raises(DatasetError) as err:
        data.load("cifar10")
    msg = str(err.value)
    assert f"{target} is there but FAILS ITS CHECKSUM" in msg
    assert md5(blob) in msg and md5(blob[:5]) in msg  # expected and found
    assert "no network" in msg and "fashion-mnist" in msg
    assert "put them into" not in msg  # the file is already where it belongs
    assert target.read_bytes() == blob[:5]  # left in place for the user to inspect


def test_offline_message_names_every_missing_file(data_home, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/"
    files = fake_mnist()
    monkeypatch.setitem(data.REMOTE, "mnist", tuple(data.RemoteFile(n, url + n, md5(b)) for n, b in files.items()))
    with pytest.raises(DatasetError) as err:
        data.load("mnist")
    msg = str(err.value)
    for name, blob in files.items():
        assert name in msg and md5(blob) in msg
    assert str(data_home / "mnist") in msg and "mnist5k" in msg and "no network" in msg


def test_files_in_place_are_used_and_only_the_bad_one_is_named(data_home, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/"
    files = fake_mnist()
    monkeypatch.setitem(data.REMOTE, "mnist", tuple(data.RemoteFile(n, url + n, md5(b)) for n, b in files.items()))
    folder = data_home / "mnist"
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    assert data.load("mnist").x_test.shape == (6, 1, 28, 28)  # offline, from the files in place
    data._load_cpu.cache_clear()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DatasetError) as err:
        data.load("mnist")
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz is there but FAILS ITS CHECKSUM" in msg
    assert "train-images-idx3-ubyte.gz" not in msg


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
    fashion = {f.fname: f for f in data.REMOTE["fashion-mnist"]}
    assert set(fashion) == set(data.FASHION_FILES)
    assert fashion["train-images-idx3-ubyte.gz"].known_hash == "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert all("zalandoresearch/fashion-mnist" in f.url for f in fashion.values())
    assert data.OPENML["bng-glass"].data_id == 265
    assert data.OPENML_API.startswith("https://")


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


# ---------------------------------------------------------------- Fashion-MNIST off Debian
def fake_fashion(folder: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(2)
    blobs = {
        "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(rng.integers(0, 256, (8, 28, 28)))),
        "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(np.arange(8) % 10)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(rng.integers(0, 256, (4, 28, 28)))),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(np.arange(4) % 10)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return blobs


def test_fashion_mnist_prefers_the_debian_package(data_home, tmp_path, monkeypatch):
    fake_fashion(tmp_path / "debian")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "debian")
    url = f"http://127.0.0.1:{closed_port()}/"  # offline: the Debian files must suffice
    monkeypatch.setitem(data.REMOTE, "fashion-mnist", tuple(data.RemoteFile(n, url + n, "md5:0") for n in data.FASHION_FILES))
    ds = data.load("fashion-mnist")
    assert ds.x_train.shape == (8, 1, 28, 28) and "Debian" in ds.description
    assert not (data_home / "fashion-mnist").exists()


def test_fashion_mnist_falls_back_to_a_checked_download(server, data_home, tmp_path, monkeypatch):
    root, url = server
    blobs = fake_fashion(root)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "no-debian-here")
    monkeypatch.setitem(data.REMOTE, "fashion-mnist", tuple(data.RemoteFile(n, url + n, md5(b)) for n, b in blobs.items()))
    ds = data.load("fashion-mnist")
    assert ds.x_test.shape == (4, 1, 28, 28) and ds.y_train.tolist() == [i % 10 for i in range(8)]
    assert "downloaded" in ds.description
    assert sorted(p.name for p in (data_home / "fashion-mnist").iterdir()) == sorted(blobs)


def test_fashion_mnist_offline_message(data_home, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "no-debian-here")
    url = f"http://127.0.0.1:{closed_port()}/"
    monkeypatch.setitem(data.REMOTE, "fashion-mnist", tuple(data.RemoteFile(n, url + n, "md5:" + "0" * 32) for n in data.FASHION_FILES))
    with pytest.raises(DatasetError) as err:
        data.load("fashion-mnist")
    msg = str(err.value)
    assert all(n in msg for n in data.FASHION_FILES) and "mnist5k" in msg and "no network" in msg


# ---------------------------------------------------------------- Glass (R data) and BNG(glass) (ARFF)
def glass_frame(counts=data.GLASS_CLASS_COUNTS, seed: int = 0):
    """A data frame shaped like mlbench's Glass: nine float columns and a factor Type with R's levels."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    types = np.repeat(np.arange(1, 8), counts)
    frame = pd.DataFrame({f: rng.normal(loc, 0.1, len(types)) for f, loc in zip(data.GLASS_FEATURES, range(9))})
    levels = [str(t) for t in range(1, 8) if counts[t - 1] > 0]
    frame["Type"] = pd.Categorical([str(t) for t in types], categories=levels)
    return frame


def write_glass_rda(path: Path, frame, name: str = "Glass") -> None:
    import rdata

    path.parent.mkdir(parents=True, exist_ok=True)
    rdata.write_rda(str(path), {name: frame})


@pytest.fixture
def no_system_glass(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MLBENCH_GLASS", tmp_path / "no-r-here" / "Glass.rda")
    data.read_table.cache_clear()
    yield
    data.read_table.cache_clear()


def test_read_glass_rda_round_trip(tmp_path):
    frame = glass_frame(counts=(3, 2, 0, 0, 1, 0, 2))
    write_glass_rda(tmp_path / "Glass.rda", frame)
    table = data.read_glass_rda(tmp_path / "Glass.rda")
    np.testing.assert_allclose(table.x, frame[list(data.GLASS_FEATURES)].to_numpy())
    assert table.y.tolist() == [0, 0, 0, 1, 1, 4, 6, 6]  # label = UCI type - 1
    assert table.class_counts.tolist() == [3, 2, 0, 0, 1, 0, 2]
    assert table.classes[4] == "containers" and table.features[0] == "RI"


def test_read_glass_rda_rejects_foreign_files(tmp_path):
    (tmp_path / "junk.rda").write_bytes(b"RDX3 this is not R data")
    with pytest.raises(DatasetError, match="cannot read"):
        data.read_glass_rda(tmp_path / "junk.rda")
    write_glass_rda(tmp_path / "other.rda", glass_frame(), name="Sonar")
    with pytest.raises(DatasetError, match="no data frame 'Glass'.*Sonar"):
        data.read_glass_rda(tmp_path / "other.rda")
    frame = glass_frame().drop(columns=["Mg"])
    write_glass_rda(tmp_path / "short.rda", frame)
    with pytest.raises(DatasetError, match="lacks the column.*Mg"):
        data.read_glass_rda(tmp_path / "short.rda")


def test_glass_loader_finds_the_extracted_file_and_checks_it(data_home, no_system_glass):
    with pytest.raises(DatasetError, match=r"not installed.*make setup.*r-cran-mlbench"):
        data.read_table("glass")
    write_glass_rda(data_home / "glass" / "Glass.rda", glass_frame(counts=(70, 76, 17, 0, 13, 9, 28)))
    with pytest.raises(DatasetError, match="not the UCI Glass data"):
        data.read_table("glass")
    data.read_table.cache_clear()
    write_glass_rda(data_home / "glass" / "Glass.rda", glass_frame())
    table = data.read_table("glass")
    assert table.x.shape == (214, 9) and table.class_counts.tolist() == list(data.GLASS_CLASS_COUNTS)


def test_glass_type_spellings():
    assert data.glass_type("5") == 5 and data.glass_type("containers") == 5
    assert data.glass_type("build wind non-float") == 2 and data.glass_type("'vehic wind float'") == 3
    assert data.glass_type("building_windows_float_processed") == 1 and data.glass_type("Headlamps") == 7
    with pytest.raises(DatasetError, match="unknown glass type"):
        data.glass_type("bottles")


ARFF_CLASSES = "{'build wind float','build wind non-float','vehic wind float','vehic wind non-float',containers,tableware,headlamps}"
ARFF_NAMES = ["build wind float", "build wind non-float", "vehic wind float", "vehic wind non-float",
              "containers", "tableware", "headlamps"]


def glass_arff(rows: int = 40, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An ARFF file shaped like BNG(glass): (bytes, features, UCI types)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 9)).round(4)
    types = rng.choice([1, 2, 3, 4, 5, 6, 7], size=rows)
    head = ["@relation 'BNG(glass)'"] + [f"@attribute {f} numeric" for f in data.GLASS_FEATURES]
    head += [f"@attribute Type {ARFF_CLASSES}", "@data"]
    body = [",".join(f"{v:g}" for v in row) + f",'{ARFF_NAMES[t - 1]}'" for row, t in zip(x, types)]
    return ("\n".join(head + body) + "\n").encode(), x, types


def test_read_glass_arff(tmp_path):
    blob, x, types = glass_arff()
    (tmp_path / "g.arff").write_bytes(blob)
    table = data.read_glass_arff(tmp_path / "g.arff")
    np.testing.assert_allclose(table.x, x)
    np.testing.assert_array_equal(table.y, types - 1)
    (tmp_path / "bad.arff").write_bytes(blob.replace(b"@attribute Ca numeric", b"@attribute Calcium numeric"))
    with pytest.raises(DatasetError, match="lacks the attribute.*Ca"):
        data.read_glass_arff(tmp_path / "bad.arff")


def openml_server(root: Path, url: str, blob: bytes, md5_hex: str, data_id: int = 265) -> None:
    (root / "api").mkdir()
    description = {"data_set_description": {"id": str(data_id), "name": "BNG(glass)",
                                            "url": url + "BNG(glass).arff", "md5_checksum": md5_hex}}
    (root / "api" / str(data_id)).write_text(json.dumps(description))
    (root / "BNG(glass).arff").write_bytes(blob)


@pytest.fixture
def bng_home(data_home, monkeypatch):
    data.read_table.cache_clear()
    yield data_home
    data.read_table.cache_clear()


def test_bng_glass_download_checked_against_openml_md5(server, bng_home, monkeypatch):
    root, url = server
    blob, x, types = glass_arff(rows=60)
    openml_server(root, url, blob, hashlib.md5(blob).hexdigest())
    monkeypatch.setattr(data, "OPENML_API", url + "api/")
    ds = data.load("bng-glass")
    assert len(ds.y_train) + len(ds.y_test) == 60 and ds.input_shape == (9,)
    assert (bng_home / "bng-glass" / "bng-glass.arff").read_bytes() == blob
    # offline afterwards: the description and the file in place suffice, and are checked again
    monkeypatch.setattr(data, "OPENML_API", f"http://127.0.0.1:{closed_port()}/api/")
    data._load_cpu.cache_clear()
    data.read_table.cache_clear()
    assert data.read_table("bng-glass").x.shape == (60, 9)


def test_bng_glass_checksum_failure(server, bng_home, monkeypatch):
    root, url = server
    blob, _, _ = glass_arff()
    openml_server(root, url, blob[:-40], hashlib.md5(blob).hexdigest())  # the server hands out a cut file
    monkeypatch.setattr(data, "OPENML_API", url + "api/")
    with pytest.raises(DatasetError, match="checksum mismatch") as err:
        data.read_table("bng-glass")
    assert "'glass'" in str(err.value)
    assert not (bng_home / "bng-glass" / "bng-glass.arff").exists()


def test_bng_glass_pinned_md5_must_match(server, bng_home, monkeypatch):
    root, url = server
    blob, _, _ = glass_arff()
    openml_server(root, url, blob, hashlib.md5(blob).hexdigest())
    monkeypatch.setattr(data, "OPENML_API", url + "api/")
    monkeypatch.setitem(data.OPENML, "bng-glass", data.OpenMLData(265, "bng-glass.arff", pinned_md5="0" * 32))
    with pytest.raises(DatasetError, match="pins 0{32}"):
        data.read_table("bng-glass")


def test_bng_glass_offline_message(bng_home, monkeypatch):
    monkeypatch.setattr(data, "OPENML_API", f"http://127.0.0.1:{closed_port()}/api/")
    with pytest.raises(DatasetError) as err:
        data.load("bng-glass")
    msg = str(err.value)
    assert "openml-265.json" in msg and "no network" in msg and "bng-glass.arff" in msg
    assert str(bng_home / "bng-glass") in msg and "'glass'" in msg and "openml.org/d/265" in msg


# ---------------------------------------------------------------- stratified splits and standardisation
def test_stratified_split_keeps_class_shares():
    y = np.repeat(np.arange(7), [70, 76, 17, 0, 13, 9, 29])
    train, test = data.stratified_split(y, 0.3, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    counts = np.bincount(y[test], minlength=7)
    assert counts.tolist() == [21, 23, 5, 0, 4, 3, 9]  # nearest whole number to 30 % of each class
    for c, n in enumerate([70, 76, 17, 0, 13, 9, 29]):
        assert abs(counts[c] - 0.3 * n) <= 0.5


def test_stratified_split_is_fixed_by_its_seed():
    y = np.random.default_rng(0).integers(0, 4, 500)
    a = data.stratified_split(y, 0.25, seed=3)
    b = data.stratified_split(y.copy(), 0.25, seed=3)
    c = data.stratified_split(y, 0.25, seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_stratified_split_small_classes():
    y = np.array([0] * 10 + [1, 1] + [2])
    train, test = data.stratified_split(y, 0.1, seed=0)
    assert np.bincount(y[test], minlength=3).tolist() == [1, 1, 0]  # a two-row class is split 1/1
    assert 12 in train  # a one-row class stays in training
    with pytest.raises(DatasetError, match="test_fraction"):
        data.stratified_split(y, 1.0)


def toy_table(rows: int = 90) -> data.Table:
    rng = np.random.default_rng(5)
    x = rng.normal([1.52, 72.0, 0.1], [0.003, 0.8, 0.1], size=(rows, 3))
    y = np.arange(rows) % 3
    return data.Table("toy", x, y, ("RI", "Si", "Fe"), ("a", "b", "c"), "toy table")


def test_standardisation_uses_the_training_part_only():
    table = toy_table()
    ds = data.split_table(table, seed=1, test_fraction=0.3)
    train, test = data.stratified_split(table.y, 0.3, seed=1)
    mean, sd = table.x[train].mean(0), table.x[train].std(0)
    torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x_train.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds.x_test.numpy(), (table.x[test] - mean) / sd, rtol=1e-5, atol=1e-5)
    # the test part has no say: change it wildly and the training features stay identical
    x = table.x.copy()
    x[test] = 1e6
    ds2 = data.split_table(data.Table("toy", x, table.y, table.features, table.classes, ""), seed=1, test_fraction=0.3)
    assert torch.equal(ds2.x_train, ds.x_train)
    raw = data.split_table(table, seed=1, test_fraction=0.3, standardize=False)
    np.testing.assert_allclose(raw.x_train.numpy(), table.x[train].astype(np.float32))
    assert torch.equal(raw.y_test, torch.from_numpy(table.y[test]))


def test_constant_training_column_is_only_centred():
    x_train = np.array([[1.0, 5.0], [3.0, 5.0]])
    a, b, mean, sd = data.standardize_columns(x_train, np.array([[2.0, 7.0]]))
    assert sd.tolist() == [1.0, 1.0] and a[:, 1].tolist() == [0.0, 0.0] and b.tolist() == [[0.0, 2.0]]


def test_real_glass_from_setup():
    """The file `make setup` extracts: the UCI Glass data, split 149/65 by default."""
    table = data.read_table("glass")
    assert table.x.shape == (214, 9) and tuple(table.class_counts) == data.GLASS_CLASS_COUNTS
    assert 1.51 < table.x[:, 0].mean() < 1.53 and 72 < table.x[:, 4].mean() < 73.5  # RI and Si (%)
    ds = data.load("glass")
    assert len(ds.y_train) == 149 and len(ds.y_test) == 65 and ds.num_classes == 7
