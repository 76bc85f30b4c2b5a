"""Loaders for every on-disk format, built on the fly, including corrupt files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normmatters.experiments.arrays import BYTES_PER_VALUE
from normmatters.experiments.data import (
    IDX_FILES,
    DataError,
    load_cifar,
    load_dataset,
    load_digits,
    load_idx,
    load_image_folder,
)


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_digits(), load_digits()
    assert len(a.train) + len(a.test) == 1797
    assert a.in_channels == 1 and a.image_size == (8, 8) and a.num_classes == 10
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert 0.0 <= float(a.train.images.min()) and float(a.train.images.max()) <= 1.0
    # no test image is a training image
    tr = {tuple(x.flatten().tolist()) for x in a.train.images}
    assert (
        sum(tuple(x.flatten().tolist()) in tr for x in a.test.images) < 5
    )  # digits has a few exact duplicates


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx(folder: Path, n_train=6, n_test=4, gz=False, h=5, w=4) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        ("train", "images"): rng.integers(0, 256, (n_train, h, w)),
        ("train", "labels"): rng.integers(0, 3, n_train),
        ("test", "images"): rng.integers(0, 256, (n_test, h, w)),
        ("test", "labels"): rng.integers(0, 3, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        data = _idx_bytes(arr)
        name = IDX_FILES[key] + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = _write_idx(tmp_path, gz=gz)
    d = load_idx(tmp_path)
    assert d.train.images.shape == (6, 1, 5, 4) and d.test.images.shape == (4, 1, 5, 4)
    np.testing.assert_allclose(d.train.images[:, 0].numpy() * 255, arrays[("train", "images")], atol=1e-4)
    assert d.test.labels.tolist() == arrays[("test", "labels")].tolist()
    assert load_dataset(tmp_path).name == d.name  # detected by file names
    assert load_dataset(f"idx:{tmp_path}").train.images.shape == d.train.images.shape


def test_idx_missing_file(tmp_path):
    _write_idx(tmp_path)
    (tmp_path / IDX_FILES[("test", "labels")]).unlink()
    with pytest.raises(DataError, match="missing file t10k-labels-idx1-ubyte"):
        load_idx(tmp_path)


def test_idx_wrong_magic(tmp_path):
    _write_idx(tmp_path)
    p = tmp_path / IDX_FILES[("train", "images")]
    raw = bytearray(p.read_bytes())
    raw[3] = 1  # claims 1 dim
    p.write_bytes(bytes(raw))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801, expected 0x00000803"
    ):
        load_idx(tmp_path)


def test_idx_truncated(tmp_path):
    _write_idx(tmp_path, gz=True)
    p = tmp_path / (IDX_FILES[("train", "images")] + ".gz")
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(
        DataError, match=r"truncated IDX file: shape \(6, 5, 4\) needs 120 data bytes, found 113"
    ):
        load_idx(tmp_path)


def test_idx_count_mismatch(tmp_path):
    _write_idx(tmp_path)
    (tmp_path / IDX_FILES[("train", "labels")]).write_bytes(_idx_bytes(np.zeros(5)))
    with pytest.raises(DataError, match="holds 6 images but .*train-labels-idx1-ubyte holds 5 labels"):
        load_idx(tmp_path)


def test_idx_bad_gzip(tmp_path):
    _write_idx(tmp_path, gz=True)
    (tmp_path / (IDX_FILES[("test", "images")] + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read IDX file"):
        load_idx(tmp_path)


def _write_cifar(folder: Path, hundred=False, n=4) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)

    def batch(path: Path, key: str) -> None:
        d = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            key.encode(): rng.integers(0, 100 if hundred else 10, n).tolist(),
        }
        path.write_bytes(pickle.dumps(d))

    if hundred:
        batch(folder / "train", "fine_labels")
        batch(folder / "test", "fine_labels")
    else:
        for i in range(1, 6):
            batch(folder / f"data_batch_{i}", "labels")
        batch(folder / "test_batch", "labels")


def test_cifar10_and_100(tmp_path):
    _write_cifar(tmp_path / "c10" / "cifar-10-batches-py")
    d = load_cifar(tmp_path / "c10")
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    assert d.num_classes == 10 and d.name == "cifar10"
    _write_cifar(tmp_path / "c100", hundred=True)
    d = load_dataset(tmp_path / "c100")
    assert d.name == "cifar100" and d.num_classes == 100 and d.train.images.shape == (4, 3, 32, 32)


def test_cifar_errors(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing file .*data_batch_3"):
        load_cifar(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR pickle"):
        load_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]})
    )
    with pytest.raises(DataError, match=r"test_batch: 3 images but labels of shape \(2,\)"):
        load_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})
    )
    with pytest.raises(DataError, match=r"expected data of shape \(N, 3072\), found \(2, 100\)"):
        load_cifar(tmp_path)


def _write_images(folder: Path, counts: dict[str, int], mode="RGB", size=(6, 5)) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(
                folder / cls / f"{i}.png"
            )


def test_image_folder_flat_split(tmp_path):
    _write_images(tmp_path, {"cat": 5, "dog": 5})
    d = load_image_folder(tmp_path)
    assert len(d.train) == 8 and len(d.test) == 2
    assert d.train.images.shape[1:] == (3, 5, 6) and d.train.classes == ["cat", "dog"]


def test_image_folder_train_test_grayscale(tmp_path):
    _write_images(tmp_path / "train", {"a": 3, "b": 2}, mode="L")
    _write_images(tmp_path / "test", {"a": 1, "b": 1}, mode="L")
    d = load_dataset(tmp_path)
    assert d.in_channels == 1 and len(d.train) == 5 and d.test.labels.tolist() == [0, 1]


def test_image_folder_errors(tmp_path):
    _write_images(tmp_path / "x", {"a": 2})
    (tmp_path / "x" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*x/b holds no PNG/JPEG images"):
        load_image_folder(tmp_path / "x")
    _write_images(tmp_path / "y", {"a": 2, "b": 1})
    (tmp_path / "y" / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"y/b/bad.png: cannot read image"):
        load_image_folder(tmp_path / "y")
    _write_images(tmp_path / "z", {"a": 1})
    _write_images(tmp_path / "z", {"b": 1}, size=(7, 7))
    with pytest.raises(DataError, match=r"z/b/0.png: image size"):
        load_image_folder(tmp_path / "z")


def test_load_dataset_unknown(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "nope")


# --------------------------------------------------------------------------------------- hostile or odd files


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_with_a_code_object_inside_a_valid_batch_runs_nothing(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "PWNED"
    batch = pickle.loads((tmp_path / "data_batch_2").read_bytes())
    batch[b"batch_label"] = _RunsCode(marker)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_2: not a CIFAR batch: the pickle names (builtins|io).open"):
        load_cifar(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_any_pickle_protocol_loads(tmp_path, protocol):
    """Python 2 era batches (protocol 2, bytes via _codecs.encode) and numpy's protocol-5 path both load."""
    _write_cifar(tmp_path)
    for p in tmp_path.iterdir():
        p.write_bytes(pickle.dumps(pickle.loads(p.read_bytes()), protocol=protocol))
    d = load_cifar(tmp_path)
    assert d.train.images.shape == (20, 3, 32, 32) and d.train.images.max() <= 1.0


@pytest.mark.parametrize(
    "data, labels, message",
    [
        (np.full((2, 3072), 300, np.int64), [1, 2], r"pixel values must lie in 0..255, found 300..300"),
        (np.full((2, 3072), -1, np.int16), [1, 2], r"pixel values must lie in 0..255, found -1..-1"),
        (np.zeros((2, 3072), np.uint8), [-1, 2], r"labels must lie in 0..9, found -1..2"),
        (np.zeros((2, 3072), np.uint8), [1, 10], r"labels must lie in 0..9, found 1..10"),
        (np.zeros((2, 3072), np.float32), [1, 2], r"expected integer pixels"),
        (np.zeros((0, 3072), np.uint8), [], r"holds no images"),
    ],
)
def test_cifar_bad_values(tmp_path, data, labels, message):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    with pytest.raises(DataError, match=r"test_batch: " + message):
        load_cifar(tmp_path)


def test_idx_empty_and_overflowing_headers(tmp_path):
    _write_idx(tmp_path)
    path = tmp_path / IDX_FILES[("train", "images")]
    path.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 0, 28, 28))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX file holds no data \(shape \(0, 28, 28\)\)"):
        load_idx(tmp_path)
    # 2^32-1 cubed overflows int64 (np.prod wraps it): must read as "needs more bytes", not wrap to a small size
    big = 2**32 - 1
    path.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", big, big, big) + b"\x00" * 16)
    with pytest.raises(DataError, match=r"truncated IDX file: shape .* needs \d{20,} data bytes, found 16"):
        load_idx(tmp_path)
    path.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2**31, 2**31, 4) + b"\x00" * 16)
    with pytest.raises(DataError, match="truncated IDX file"):
        load_idx(tmp_path)


def test_decompression_bomb_image_refused(tmp_path, monkeypatch):
    from PIL import Image

    _write_images(tmp_path, {"a": 2, "b": 2}, size=(40, 40))
    # PIL's limits scaled down so a 40×40 image stands in for a 90-megapixel one: above the warning limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"a/0.png: refused as a possible decompression bomb"):
        load_image_folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # above twice the limit: PIL's own error
    with pytest.raises(DataError, match=r"a/0.png: refused as a possible decompression bomb"):
        load_image_folder(tmp_path)


def test_idx_gzip_bomb_is_inflated_only_as_far_as_its_header_says(tmp_path, monkeypatch):
    """A small gzip whose data goes on far past its header's shape: refused after reading the declared bytes
    plus a margin, not inflated whole."""
    import normmatters.experiments.data as D

    _write_idx(tmp_path, gz=True)
    name = IDX_FILES[("train", "labels")] + ".gz"
    bomb = struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 6) + bytes(6) + bytes(16 << 20)  # 16 MiB of zeros
    (tmp_path / name).write_bytes(gzip.compress(bomb, compresslevel=9))
    assert (tmp_path / name).stat().st_size < 200_000
    inflated = []
    real_read = gzip.GzipFile.read

    def counting_read(self, size=-1):
        assert size is not None and size >= 0, "the IDX reader must never inflate a whole stream"
        out = real_read(self, size)
        inflated.append(len(out))
        return out

    monkeypatch.setattr(gzip.GzipFile, "read", counting_read)
    with pytest.raises(DataError, match=rf"{name}: IDX file has more than {D.IDX_TRAILING_MARGIN} unexpected "
                                        r"trailing bytes .*beyond the 14 bytes its header declares"):
        load_idx(tmp_path)
    assert sum(inflated) <= D.IDX_TRAILING_MARGIN + 1000  # the images file (136 bytes) and the labels, not 16 MiB


def test_idx_header_larger_than_memory_refused_before_inflating(tmp_path, monkeypatch):
    import normmatters.experiments.arrays as A

    _write_idx(tmp_path, gz=True)
    monkeypatch.setattr(A, "available_memory", lambda: 1000)  # 6×5×4 images × 13 bytes per value > 1000
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: its header declares shape \(6, 5, 4\) "
                                        r"\(120 values.*would not fit in the 1000 bytes of memory available"):
        load_idx(tmp_path)


def test_image_folder_larger_than_memory_refused_naming_the_image(tmp_path, monkeypatch):
    import normmatters.experiments.data as D

    _write_images(tmp_path, {"a": 2, "b": 2}, size=(10, 10))  # 300 values per image
    per_image = 300 * BYTES_PER_VALUE
    monkeypatch.setattr(D, "available_memory", lambda: 2 * per_image + 100)  # the third image does not fit
    decoded = []
    monkeypatch.setattr(D, "_read_images", lambda *a, **k: decoded.append(a))
    with pytest.raises(DataError, match=r"b/0.png: the images of the folder up to this one \(10×10\) hold 900 "
                                        r"values.*refused before decoding any"):
        load_image_folder(tmp_path)
    assert decoded == []
