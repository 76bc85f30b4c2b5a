"""Datasets read from local disk (nothing is downloaded): embedded digits, IDX, CIFAR pickles, image folders.

Every loader returns a :class:`DataSplit` of two in-memory :class:`ArrayDataset` s whose ``images`` are a
float32 tensor of shape (N, C, H, W) with values in [0, 1] and ``labels`` an int64 tensor of shape (N,).
Standardization (per-channel mean/std of the *training* split) and augmentation happen later, per batch,
in :mod:`normmatters.experiments.augment`.

Formats:

* ``digits`` — scikit-learn's embedded 8×8 handwritten digits (1797 images, 10 classes; UCI "Optical
  Recognition of Handwritten Digits"), split by a fixed seeded permutation: 80 % train, 20 % test.
* IDX (LeCun's MNIST format and its drop-in replacements, e.g. Fashion-MNIST, KMNIST): a folder holding
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally ``.gz``. Magic 0x00000803 (uint8, 3 dims) for images,
  0x00000801 (uint8, 1 dim) for labels.
* CIFAR-10 / CIFAR-100 python pickles (Krizhevsky 2009): ``data_batch_1..5`` + ``test_batch`` (CIFAR-10)
  or ``train`` + ``test`` (CIFAR-100, fine labels), in the folder or its ``cifar-10-batches-py`` /
  ``cifar-100-python`` sub-folder.
* Image folder: ``root/<class>/*.png|jpg|jpeg`` (split 80/20 by a fixed seed) or ``root/train/<class>/…`` with
  ``root/test/<class>/…`` (or ``val``). Images are converted to RGB, or to grayscale when every image is
  grayscale; all must share one size.

Bad data raises :class:`DataError` naming the file and what was expected vs found.

Bounded reading: an IDX file is inflated only up to the size its own header declares (plus
:data:`IDX_TRAILING_MARGIN` bytes to tell "trailing data" apart), never whole, so a small gzip that inflates to
gigabytes is refused after reading a few more bytes than it claims; a header that claims more than the memory at
hand (:func:`available_memory`, after the float32 copy a loader makes) is refused before anything is inflated. An
image folder's images are measured from their headers before any is decoded, and a folder whose total pixels
would not fit in the memory at hand is refused naming the image at which the total passes it.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .arrays import (
    BYTES_PER_VALUE,
    ArrayDataset,
    DataError,
    DataSplit,
    available_memory,
    check_fits,
    fixed_split,
    size_text,
)
from .cifar_pickle import RefusedGlobalError, load_cifar_pickle

__all__ = [
    "ArrayDataset",
    "DataSplit",
    "DataError",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_cifar",
    "load_image_folder",
    "IDX_FILES",
    "IMAGE_SUFFIXES",
    "IDX_TRAILING_MARGIN",
    "available_memory",
]

log = logging.getLogger(__name__)

#: standard IDX file names (without an optional .gz) by split and kind
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: bytes read past an IDX file's declared data to tell whether it holds more (it must not)
IDX_TRAILING_MARGIN = 1 << 16
def load_digits() -> DataSplit:
    """scikit-learn's embedded 8×8 digits: (1438 + 359) × 1 × 8 × 8, 10 classes, values scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataError(
            "the embedded 'digits' dataset needs scikit-learn: pip install 'normmatters[experiments]'"
        ) from e
    d = _sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return fixed_split(images, labels, [str(i) for i in range(10)], "digits")


# ---------------------------------------------------------------------------------------------------- IDX


def _find_idx(folder: Path, base: str) -> Path:
    for cand in (folder / base, folder / (base + ".gz")):
        if cand.is_file():
            return cand
    raise DataError(f"IDX dataset {folder}: missing file {base} (or {base}.gz)")


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read one uint8 IDX file (raw or gzip) into an array of ``expected_dims`` dims.

    A gzip is inflated as a stream and only up to the size its header declares (plus
    :data:`IDX_TRAILING_MARGIN`), so a small file that inflates to gigabytes costs no more than it claims."""
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as f:
            return _read_idx_stream(path, f, expected_dims, None if gz else path.stat().st_size)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file ({e})") from e


def _read_idx_stream(path: Path, f: Any, expected_dims: int, file_size: int | None) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(head)} bytes, expected at least a 4-byte header")
    zero, dtype_code, ndim = struct.unpack(">HBB", head)
    expected_magic = 0x0800 + expected_dims
    magic = (dtype_code << 8) | ndim
    if zero != 0 or magic != expected_magic:
        raise DataError(
            f"{path}: wrong magic number 0x{int.from_bytes(head, 'big'):08x}, expected "
            f"0x{expected_magic:08x} (uint8, {expected_dims} dims)"
        )
    header = 4 + 4 * ndim
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX file: {4 + len(dims)} bytes, header needs {header}")
    shape = struct.unpack(">" + "I" * ndim, dims)
    need = math.prod(shape)  # Python ints: a crafted header cannot overflow the size check
    if file_size is not None:  # a raw file: its size says whether the data is all there
        have = file_size - header
        if have < need:
            raise DataError(f"{path}: truncated IDX file: shape {shape} needs {need} data bytes, found {have}")
        if have > need:
            raise DataError(f"{path}: IDX file has {have - need} unexpected trailing bytes after shape {shape}")
    if shape[0] == 0 or need == 0:
        raise DataError(f"{path}: IDX file holds no data (shape {shape})")
    check_fits(path, need, f"its header declares shape {shape}")
    data = f.read(need)  # a gzip stream inflates at most this much
    if len(data) < need:
        raise DataError(f"{path}: truncated IDX file: shape {shape} needs {need} data bytes, found {len(data)}")
    extra = len(f.read(IDX_TRAILING_MARGIN))
    if extra:
        more = "more than " if extra == IDX_TRAILING_MARGIN else ""
        raise DataError(f"{path}: IDX file has {more}{extra} unexpected trailing bytes after shape {shape} "
                        f"(it inflates beyond the {header + need} bytes its header declares; the rest was not read)")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _idx_split(folder: Path, split: str) -> ArrayDataset:
    ipath = _find_idx(folder, IDX_FILES[(split, "images")])
    lpath = _find_idx(folder, IDX_FILES[(split, "labels")])
    images = read_idx(ipath, 3)
    labels = read_idx(lpath, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{ipath} holds {images.shape[0]} images but {lpath} holds {labels.shape[0]} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_idx(folder: str | Path) -> DataSplit:
    """MNIST-format IDX files (gzipped or raw) found by their standard names in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"IDX dataset: folder {folder} does not exist")
    train, test = _idx_split(folder, "train"), _idx_split(folder, "test")
    n = int(max(train.labels.max(), test.labels.max())) + 1
    train.classes = test.classes = [str(i) for i in range(n)]
    return DataSplit(f"idx:{folder.name}", train, test)


# -------------------------------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR dataset: missing file {path}")
    try:
        d = load_cifar_pickle(path)
    except RefusedGlobalError as e:
        raise DataError(f"{path}: not a CIFAR batch: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path}: missing key {key!r} (found {sorted(d)})")
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[label_key])
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: data/labels are not arrays of numbers ({e})") from e
    if data.ndim == 0 or data.shape[0] == 0:
        raise DataError(f"{path}: holds no images")
    if data.dtype.kind not in "iu" or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: expected integer pixels and labels, found dtypes {data.dtype} and {labels.dtype}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected data of shape (N, 3072), found {data.shape}")
    if labels.ndim != 1 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: pixel values must lie in 0..255, found {data.min()}..{data.max()}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(
            f"{path}: {label_key} must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(folder: str | Path) -> DataSplit:
    """CIFAR-10 or CIFAR-100 python-pickle batches in ``folder`` (or its standard sub-folder)."""
    folder = Path(folder)
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (folder / sub).is_dir():
            folder = folder / sub
            break
    if (folder / "data_batch_1").exists() or (folder / "test_batch").exists():
        parts = [_cifar_batch(folder / f"data_batch_{i}", "labels", 10) for i in range(1, 6)]
        test = _cifar_batch(folder / "test_batch", "labels", 10)
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        n_classes, name = 10, "cifar10"
    elif (folder / "train").is_file() or (folder / "test").is_file():
        train = _cifar_batch(folder / "train", "fine_labels", 100)
        test = _cifar_batch(folder / "test", "fine_labels", 100)
        n_classes, name = 100, "cifar100"
    else:
        raise DataError(
            f"CIFAR dataset {folder}: found neither data_batch_1/test_batch (CIFAR-10) nor "
            "train/test (CIFAR-100)"
        )
    classes = [str(i) for i in range(n_classes)]

    def _ds(a: tuple[np.ndarray, np.ndarray]) -> ArrayDataset:
        return ArrayDataset(
            torch.from_numpy(a[0].astype(np.float32) / 255.0), torch.from_numpy(a[1]), classes
        )

    return DataSplit(name, _ds(train), _ds(test))


# --------------------------------------------------------------------------------------------- image folder


def _read_class_folders(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"image folder {root}: no class sub-folders")
    if classes is not None and found != classes:
        raise DataError(
            f"image folder {root}: class folders {found} differ from the training split's {classes}"
        )
    files, labels = [], []
    for i, c in enumerate(found):
        imgs = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise DataError(f"image folder {root}: class folder {root / c} holds no PNG/JPEG images")
        files += imgs
        labels += [i] * len(imgs)
    return files, labels, found


def _measure_images(files: list[Path]) -> None:
    """Raise DataError naming the first image at which the folder's total pixels (read from the images' headers,
    nothing decoded) would no longer fit in the memory at hand."""
    from PIL import Image, UnidentifiedImageError

    avail = available_memory()
    if avail is None:
        return
    total = 0
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:  # reads the header only
                    w, h = im.size
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: refused as a possible decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read image ({e})") from e
        total += w * h * 3  # RGB at most
        if total * BYTES_PER_VALUE > avail:
            raise DataError(
                f"{f}: the images of the folder up to this one ({w}×{h}) hold {total} values, about "
                f"{size_text(total * BYTES_PER_VALUE)} once loaded as float32: more than the "
                f"{size_text(avail)} of memory available; refused before decoding any"
            )


def _read_images(files: list[Path], mode: str | None = None) -> tuple[Tensor, str]:
    from PIL import Image, UnidentifiedImageError

    pics = []
    for f in files:
        try:
            with warnings.catch_warnings():
                # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    im.load()
                    pics.append(im.copy())
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: refused as a possible decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read image ({e})") from e
    if mode is None:
        mode = "L" if all(p.mode in ("L", "1", "I;16", "I") for p in pics) else "RGB"
    arrays = []
    size = None
    for f, p in zip(files, pics, strict=True):
        a = np.asarray(p.convert(mode), dtype=np.float32) / 255.0
        if size is None:
            size = a.shape
        elif a.shape != size:
            raise DataError(f"{f}: image size {a.shape[:2]} differs from {size[:2]} of {files[0]}")
        arrays.append(a if a.ndim == 3 else a[..., None])
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, mode


def load_image_folder(root: str | Path) -> DataSplit:
    """Class sub-folders of PNG/JPEG images; ``train/`` + ``test/`` (or ``val/``) if present, else 80/20."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        files, labels, classes = _read_class_folders(root / "train")
        tfiles, tlabels, _ = _read_class_folders(test_dir, classes)
        _measure_images(files + tfiles)
        x, mode = _read_images(files)
        tx, _ = _read_images(tfiles, mode)
        if tx.shape[1:] != x.shape[1:]:
            raise DataError(
                f"image folder {root}: test images are {tuple(tx.shape[1:])}, train images "
                f"{tuple(x.shape[1:])}"
            )
        return DataSplit(
            f"folder:{root.name}",
            ArrayDataset(x, torch.tensor(labels), classes),
            ArrayDataset(tx, torch.tensor(tlabels), classes),
        )
    files, labels, classes = _read_class_folders(root)
    _measure_images(files)
    x, _ = _read_images(files)
    return fixed_split(x, torch.tensor(labels), classes, f"folder:{root.name}")


# ------------------------------------------------------------------------------------------------ dispatch


def load_dataset(spec: str | Path) -> DataSplit:
    """``"digits"``, ``"idx:PATH"``, ``"cifar:PATH"``, ``"folder:PATH"``, or a PATH (format detected)."""
    s = str(spec)
    if s == "digits":
        return load_digits()
    kind, sep, rest = s.partition(":")
    if sep and kind in ("idx", "cifar", "folder"):
        return {"idx": load_idx, "cifar": load_cifar, "folder": load_image_folder}[kind](rest)
    path = Path(s)
    if not path.exists():
        raise DataError(f"dataset {s!r}: not 'digits' and no such file or folder")
    if not path.is_dir():
        raise DataError(f"dataset {s!r}: expected a folder (IDX files, CIFAR batches or class sub-folders)")
    names = {p.name for p in path.iterdir()}
    if any(n.startswith(("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")) for n in names):
        return load_idx(path)
    if names & {"data_batch_1", "test_batch", "cifar-10-batches-py", "cifar-100-python"} or (
        {"train", "test"} <= names and (path / "train").is_file()
    ):
        return load_cifar(path)
    return load_image_folder(path)
