"""Data sets as float32 NHWC images in [0, 1] with int32 labels, and fixed-shape batches.

A data set is named by a *spec* string:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no
    download), split into train and test by a fixed seed.
``fashion-mnist``
    the 70,000 28x28 Fashion-MNIST images from Debian's ``dataset-fashion-mnist``
    package (``apt-get install dataset-fashion-mnist``).
``idx:DIR``
    any MNIST-format directory (MNIST, Fashion-MNIST, KMNIST, EMNIST): the four
    IDX files, gzip-compressed or not. num_classes is the largest label + 1;
    a class without examples in train and test (but class 0 when labels start
    at 1, as in EMNIST letters) is an ``InputError`` naming it: a stray label
    such as 255 is a corrupt file, not 256 classes.
``tfds:NAME[:SPLIT]``
    a prepared tensorflow-datasets data set; ``SPLIT`` names the evaluation
    split (default ``test``), training always uses ``train``. Without
    TensorFlow it is read with ``tfds.data_source`` (array_record files).
``npz:PATH``
    the user's own arrays ``x_train, y_train, x_test, y_test`` (and optionally
    ``num_classes``).

Nothing is downloaded: a missing data set is a ``ValueError`` that names the
command providing it.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from deepfault_jax import errors
from deepfault_jax.errors import InputError, InputTypeError, check_int, check_seed

__all__ = [
    "Batch",
    "Dataset",
    "DATASET_SPECS",
    "FASHION_MNIST_DIR",
    "as_images",
    "as_labels",
    "available_datasets",
    "find_idx_files",
    "idx_header",
    "iterate_batches",
    "load_dataset",
    "make_dataset",
    "read_idx",
    "shuffled_batches",
    "stored_num_classes",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The accepted spec forms, as shown in error messages and ``--help``.
DATASET_SPECS = ("digits", "fashion-mnist", "idx:DIR", "tfds:NAME[:SPLIT]", "npz:PATH")

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
_MAX_CLASSES = 2**31 - 1  # labels are int32, and every label must be < num_classes


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image data set with a train and a test split.

    Attributes:
      name: the spec it was loaded from (``"digits"``, ``"npz:my.npz"``, ...).
      x_train: ``float32[n_train, height, width, channels]`` in [0, 1].
      y_train: ``int32[n_train]`` in [0, num_classes).
      x_test: ``float32[n_test, height, width, channels]`` in [0, 1].
      y_test: ``int32[n_test]`` in [0, num_classes).
      num_classes: number of classes (at least 2).

    Build one from raw arrays with :func:`make_dataset`, which validates them.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(x, y)`` of ``split``, ``"train"`` or ``"test"``."""
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test'; got {split!r}")
        return (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)

    def summary(self) -> dict:
        """Sizes and shapes, JSON-ready."""
        return {"name": self.name, "num_train": int(len(self.y_train)),
                "num_test": int(len(self.y_test)), "input_shape": list(self.input_shape),
                "num_classes": int(self.num_classes)}  # fmt: skip


class Batch(NamedTuple):
    """One fixed-shape batch.

    Attributes:
      x: ``float32[batch, height, width, channels]``; padded rows are zeros.
      y: ``int32[batch]``; padded rows are 0.
      mask: ``bool[batch]``; False on padded rows.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray


# --------------------------------------------------------------------------- validation


def _array(value, what: str) -> np.ndarray:
    """``np.asarray(value)``; input numpy cannot convert (ragged lists) is an InputTypeError."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InputTypeError(f"{what} must be an array of numbers; got a {type(value).__name__} "
                             f"numpy cannot convert ({e})") from None  # fmt: skip


def as_images(x: np.ndarray, what: str) -> np.ndarray:
    """Validates raw images and converts them to float32 NHWC in [0, 1]."""
    x = _array(x, what)
    if x.dtype.kind not in "iuf":  # integers or floats; not bool, complex or objects
        raise InputTypeError(f"{what} must hold numbers; got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise InputError(f"{what} must have rank 3 [n, height, width] or 4 [n, height, width, "
                         f"channels]; got rank {x.ndim} with shape {x.shape}")  # fmt: skip
    if x.shape[0] == 0:
        raise InputError(f"{what} must hold at least one image; got shape {x.shape}")
    if min(x.shape[1:]) < 1:
        raise InputError(f"{what} must have non-empty images; got shape {x.shape}")
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise InputError(f"{what} with integer dtype must lie in [0, 255]; got range [{lo}, {hi}]")  # fmt: skip
        return (x.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise InputError(f"{what} must be finite; got {bad} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        hint = "uint8-valued pixels? pass them as uint8 or divide by 255" if hi > 1.0 else ""
        raise InputError(f"{what} with float dtype must lie in [0, 1]; got range [{lo:g}, {hi:g}] "
                         f"({hint or 'rescale them to [0, 1]'})")  # fmt: skip
    return np.ascontiguousarray(x, dtype=np.float32)


def as_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validates labels (rank 1, ``n`` integers in [0, 2**31 - 1), in their own dtype): int32."""
    y = _array(y, what)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"{what} must have rank 1 [n]; got shape {y.shape}")
    if y.shape[0] != n:
        raise InputError(f"{what} must hold one label per image ({n}); got {y.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputTypeError(f"{what} must hold integers; got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())  # Python ints: exact for int64 and uint64
    if lo < 0:
        raise InputError(f"{what} must be >= 0; got min {lo}")
    if hi >= _MAX_CLASSES:
        raise InputError(f"{what} must be < {_MAX_CLASSES} (labels are int32); got max {hi}")
    return y.astype(np.int32)


def make_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, *, num_classes: int | None = None) -> Dataset:  # fmt: skip
    """Validates raw arrays and returns a :class:`Dataset`.

    Args:
      name: a name for reports.
      x_train, x_test: images ``[n, height, width]`` or ``[n, height, width,
        channels]``; integers in [0, 255] (scaled by 1/255) or floats in [0, 1].
      y_train, y_test: integer labels ``[n]``.
      num_classes: number of classes, an integer (or integral float) in
        [2, 2**31 - 1] above every label; default ``max(label) + 1``.

    Returns:
      The data set, x as float32 in [0, 1], y as int32.

    Raises:
      InputError, InputTypeError: wrong rank, dtype, range (float images
        outside [0, 1], such as uint8 values stored as float), NaN/inf values,
        mismatched lengths or image shapes, labels outside [0, num_classes) or
        beyond int32, a non-integer num_classes, fewer than two classes.

    Example:
      >>> ds = make_dataset("toy", np.zeros((4, 2, 2), np.uint8), [0, 1, 0, 1],
      ...                   np.zeros((2, 2, 2), np.uint8), [1, 0])
      >>> ds.input_shape
      (2, 2, 1)
    """
    xtr = as_images(x_train, "x_train")
    xte = as_images(x_test, "x_test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise InputError(f"x_train and x_test must have the same image shape; "
                         f"got {xtr.shape[1:]} and {xte.shape[1:]}")  # fmt: skip
    ytr = as_labels(y_train, xtr.shape[0], "y_train")
    yte = as_labels(y_test, xte.shape[0], "y_test")
    top = int(max(ytr.max(), yte.max()))
    num_classes = check_int("num_classes", top + 1 if num_classes is None else num_classes)
    if num_classes < 2:
        raise InputError(f"a classifier needs at least 2 classes; got num_classes={num_classes}")
    if num_classes > _MAX_CLASSES:
        raise InputError(f"num_classes must be <= {_MAX_CLASSES}; got {num_classes}")
    if top >= num_classes:
        raise InputError(f"labels must lie in [0, {num_classes}); got max {top}")
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip
_GZIP_MAX_RATIO = 1032  # deflate's limit (a 258-byte match per 2 bits): no gzip inflates more
_READ_CHUNK = 1 << 22


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64), the rank, then one
    big-endian uint32 per dimension. The data size it declares is checked
    before any data is read: it must equal the rest of an uncompressed file, or
    fit in 1032 times a gzip file's size (deflate's maximum ratio, so a gzip
    bomb is refused from its header), and fit in memory.

    Args:
      path: the file; a gzip file (detected by its magic bytes) is inflated as a stream.

    Returns:
      The array, in native byte order.

    Raises:
      InputError: a missing or unreadable file (named), corrupt or truncated
        gzip, a bad magic number or type code, a short header, dimensions the
        file or memory cannot hold, or data shorter or longer than they say.
      InputTypeError: ``path`` is not a str or os.PathLike.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path, packed = Path(path), False
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            packed = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            if not packed:
                return _read_idx_stream(fh, path, size, packed=False)
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                return _read_idx_stream(gz, path, size, packed=True)
    except InputError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:  # ValueError: a NUL in the path
        if packed:
            raise InputError(f"{path}: corrupt or truncated gzip data ({e})") from None
        reason = errors.describe_os_error(e) if isinstance(e, OSError) else str(e)
        raise InputError(f"IDX file {str(path)!r} cannot be read: {reason}") from None


def _read_idx_stream(stream, path: Path, size: int, *, packed: bool) -> np.ndarray:
    """Reads an IDX header, checks its data size against the file's ``size``, then the data."""
    head = stream.read(4)
    if len(head) < 4:
        raise InputError(f"{path}: IDX header needs at least 4 bytes; got {len(head)}")
    if head[:2] != b"\x00\x00":
        raise InputError(f"{path}: bad IDX magic number: expected 0x0000 then type and rank; "
                         f"got 0x{head.hex()}")  # fmt: skip
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise InputError(f"{path}: unknown IDX type code: expected one of {known}; got 0x{code:02X}")  # fmt: skip
    if ndim < 1:
        raise InputError(f"{path}: IDX rank must be >= 1; got {ndim}")
    header, raw_dims = 4 + 4 * ndim, stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise InputError(f"{path}: truncated IDX header: rank {ndim} needs {header} bytes; "
                         f"got {4 + len(raw_dims)}")  # fmt: skip
    dims, dtype = list(struct.unpack(f">{ndim}I", raw_dims)), _IDX_DTYPES[code]
    need = math.prod(dims) * dtype.itemsize  # a Python int: no overflow
    bad = f"{path}: {{}} IDX data: dimensions {dims} need {need} bytes; got {{}}"
    if not packed and need != size - header:
        raise InputError(bad.format("truncated" if need > size - header else "oversized", size - header))  # fmt: skip
    if packed and need + header > _GZIP_MAX_RATIO * size:
        raise InputError(f"{path}: IDX dimensions {dims} need {need} bytes, but a gzip file of {size} "
                         f"bytes inflates to at most {_GZIP_MAX_RATIO * size}: a corrupt header or a "
                         "gzip bomb")  # fmt: skip
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    if 0 < mem < need:
        raise InputError(f"{path}: IDX dimensions {dims} need {need} bytes; this machine has {mem}")  # fmt: skip
    buf = np.empty(need, np.uint8)
    view, got = memoryview(buf), 0
    while got < need and (n := stream.readinto(view[got : got + _READ_CHUNK])):
        got += n
    if got < need or stream.read(1):  # read(1) also makes gzip check its CRC and length
        raise InputError(bad.format(*(("truncated", got) if got < need else ("oversized", "more"))))
    arr = buf.view(dtype).reshape(dims)
    return arr if dtype.isnative else arr.byteswap(inplace=True).view(dtype.newbyteorder("="))


def idx_header(path: Path) -> tuple[list[int], int, bool]:
    """An IDX file's dimensions, header size in bytes, and whether it is gzip,
    read without its data; only uint8 data (images) is accepted here.

    Raises:
      InputError: an unreadable file, a bad magic number, or a type other than uint8.
    """
    try:
        with open(path, "rb") as fh:
            packed = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            stream = gzip.GzipFile(fileobj=fh, mode="rb") if packed else fh
            head = stream.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] != 0x08 or head[3] < 1:
                raise InputError(f"{path}: expected an IDX header of uint8 data (0x0000 08 rank); "
                                 f"got 0x{head.hex()}")  # fmt: skip
            raw = stream.read(4 * head[3])
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"IDX file {str(path)!r} cannot be read: {e}") from None
    if len(raw) < 4 * head[3]:
        raise InputError(f"{path}: truncated IDX header")
    return list(struct.unpack(f">{head[3]}I", raw)), 4 + len(raw), packed


_IDX_ROLES = {
    "train images": re.compile(r"train.*images.*idx3"),
    "train labels": re.compile(r"train.*labels.*idx1"),
    "test images": re.compile(r"(t10k|test).*images.*idx3"),
    "test labels": re.compile(r"(t10k|test).*labels.*idx1"),
}


def find_idx_files(directory: Path) -> dict[str, Path]:
    """The four IDX files of ``directory`` by role; InputError naming what is missing."""
    if not directory.is_dir():
        which = "is a file, not a directory" if directory.exists() else "does not exist"
        raise InputError(f"idx:DIR must name a directory holding the four IDX files; "
                         f"got {str(directory)!r}, which {which}")  # fmt: skip
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as e:
        raise InputError(f"idx:DIR {str(directory)!r} cannot be listed: "
                         f"{errors.describe_os_error(e)}") from None  # fmt: skip
    found = {}
    for role, pattern in _IDX_ROLES.items():
        hits = [n for n in names if pattern.search(n)]
        if len(hits) != 1:
            like = f"{'t10k' if 'test' in role else 'train'}-{role.split()[1]}-idx{3 if 'images' in role else 1}"  # fmt: skip
            raise InputError(f"{directory}: expected exactly one {role} file (like "
                             f"'{like}-ubyte.gz'); got {hits or 'none'}")  # fmt: skip
        found[role] = directory / hits[0]
    return found


def _load_idx_dir(directory: Path, name: str) -> Dataset:
    files = find_idx_files(directory)
    arrays = {role: read_idx(p) for role, p in files.items()}
    for role, a in arrays.items():
        if "images" in role and (a.ndim not in (3, 4) or a.dtype != np.uint8):
            raise InputError(f"{files[role]}: {role} must be uint8 of rank 3 or 4; "
                             f"got {a.dtype} of shape {a.shape}")  # fmt: skip
        if "labels" in role and a.ndim != 1:
            raise InputError(f"{files[role]}: {role} must have rank 1; got shape {a.shape}")
    ds = make_dataset(name, *arrays.values())  # the roles come in make_dataset's order
    _check_idx_classes(ds, files)
    return ds


def _check_idx_classes(ds: Dataset, files: dict[str, Path]) -> None:
    """Refuses idx labels that leave a class without examples (see the module docstring)."""
    present = np.unique(np.concatenate([ds.y_train, ds.y_test])).tolist()
    top = present[-1]
    where = files["train labels" if int(ds.y_train.max()) == top else "test labels"]
    if len(present) < 2:
        raise InputError(f"idx labels must name at least 2 classes with examples; got only label {top} in {where}")  # fmt: skip
    edges = [0 if present[0] == 1 else -1, *present]  # 1-based labels leave class 0 empty
    gaps = [f"{a + 1}..{b - 1}" if b - a > 2 else f"{a + 1}"
            for a, b in zip(edges[:-1], edges[1:], strict=True) if b - a > 1]  # fmt: skip
    if gaps:  # the largest label alone above a gap is a stray one, such as 255
        hint = f"the largest label, {top} in {where}, looks corrupt" if edges[-1] - edges[-2] > 1 else "number the classes without gaps"  # fmt: skip
        raise InputError(f"idx labels must give each of their {top + 1} classes (the largest label + 1) an "
                         f"example; classes {', '.join(gaps[:5])}{', ...' if len(gaps) > 5 else ''} have no "
                         f"examples in train or test: {hint}")  # fmt: skip


# --------------------------------------------------------------------------- sources


def _load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    return make_dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_ERRORS = (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError, MemoryError)


def _load_npz(path: Path, name: str) -> Dataset:
    """Loads ``npz:PATH``; the file's kind is checked first, so a wrong file gets a clear message."""
    want = "npz:PATH must be a .npz archive with x_train, y_train, x_test, y_test (np.savez)"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        reason = errors.describe_os_error(e) if isinstance(e, OSError) else str(e)
        raise InputError(f"{want}; got {str(path)!r}: {reason}") from None
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # what np.load takes for a zip
        kind = "a .npy array file" if magic == b"\x93NUMPY" else "a file that is not a zip archive" if magic else "an empty file"  # fmt: skip
        raise InputError(f"{path}: {want}; got {kind}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if missing := [k for k in _NPZ_KEYS if k not in f.files]:
                raise InputError(f"{path}: npz must hold x_train, y_train, x_test, y_test; "
                                 f"missing {missing}, got {sorted(f.files)}")  # fmt: skip
            arrays = {k: f[k] for k in _NPZ_KEYS}
            num_classes = f["num_classes"] if "num_classes" in f.files else None
    except InputError:
        raise
    except _NPZ_ERRORS as e:  # MemoryError: a member's header declares a huge array
        raise InputError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from None
    if num_classes is not None:
        num_classes = stored_num_classes(num_classes, path)
    return make_dataset(name, **arrays, num_classes=num_classes)


def stored_num_classes(value: Any, where: str | os.PathLike) -> int:
    """A ``num_classes`` array stored beside the data (npz, npy): a scalar (shape
    ``()``), integral; InputError naming ``where`` otherwise."""
    a = np.asarray(value)
    if a.shape != ():
        raise InputError(f"{where}: num_classes must be a scalar (shape ()); got shape {a.shape}")
    try:
        return check_int("num_classes", a[()])
    except InputError as e:
        raise type(e)(f"{where}: {e}") from None


def _read_tfds_split(name: str, split: str, image_key: str, label_key: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    if importlib.util.find_spec("tensorflow") is not None:
        rows = list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, download=False)))
    else:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        rows = [source[i] for i in range(len(source))]
    if not rows:
        raise InputError(f"TFDS data set {name!r} split {split!r} must not be empty; got 0 examples")  # fmt: skip
    try:
        x = np.stack([np.asarray(r[image_key]) for r in rows])
    except ValueError as e:
        raise InputError(f"TFDS data set {name!r} split {split!r} must have one image shape ({e})") from None  # fmt: skip
    y = np.asarray([int(r[label_key]) for r in rows], dtype=np.int64)
    return x, y


def _load_tfds(name: str, split: str, spec: str) -> Dataset:
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now, not at tfds import time
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"unknown TFDS data set {name!r}: {first}") from None
    info = builder.info
    image_key, label_key = (info.supervised_keys or ("image", "label"))[:2]
    try:
        num_classes = int(info.features[label_key].num_classes)
    except (AttributeError, KeyError, TypeError):
        raise InputError(f"TFDS data set {name!r} must have a class label feature {label_key!r}; "
                         f"got features {list(info.features)}") from None  # fmt: skip
    known_splits = list(info.splits) if info.splits else []
    if known_splits and split not in known_splits:
        raise InputError(f"TFDS data set {name!r} has no split {split!r}; expected one of {known_splits}")  # fmt: skip
    try:
        x_train, y_train = _read_tfds_split(name, "train", image_key, label_key, data_dir)
        x_test, y_test = _read_tfds_split(name, split, image_key, label_key, data_dir)
    except InputError:
        raise
    except Exception as e:  # tfds's own errors for a data set that is not prepared
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"TFDS data set {name!r} is not prepared here ({first}); prepare it on a "
                         f"machine with network access with `tfds build {name} --file_format="
                         f"array_record` (or tfds.data_source('{name}')) and copy the data "
                         "directory here (TFDS_DATA_DIR or ~/tensorflow_datasets)") from None  # fmt: skip
    return make_dataset(spec, x_train, y_train, x_test, y_test, num_classes=num_classes)


def load_dataset(spec: str, *, digits_seed: int = DIGITS_SPLIT_SEED) -> Dataset:
    """Loads a data set by spec (see the module docstring for the forms).

    Args:
      spec: ``"digits"``, ``"fashion-mnist"``, ``"idx:DIR"``,
        ``"tfds:NAME[:SPLIT]"`` or ``"npz:PATH"``.
      digits_seed: seed of the fixed train/test split of ``digits``, in [0, 2**63 - 1].

    Returns:
      A validated :class:`Dataset`.

    Raises:
      InputError, InputTypeError: an unknown spec (the message lists the
        forms), a missing data set (the message names the command providing
        it), a missing or unreadable path (named), a file of the wrong kind,
        invalid data (see :func:`make_dataset`, :func:`read_idx`), or an
        ``idx:DIR`` class without examples (see the module docstring).

    Example:
      >>> ds = load_dataset("digits")
      >>> ds.input_shape, ds.num_classes
      ((8, 8, 1), 10)
    """
    if not isinstance(spec, str):
        raise InputTypeError(f"data set spec must be a str; got {type(spec).__name__}")
    if spec == "digits":
        return _load_digits(check_seed(digits_seed, name="digits_seed"))
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise InputError(
                f"fashion-mnist must be installed in {FASHION_MNIST_DIR}; it is absent: "
                "run `apt-get install dataset-fashion-mnist`, or pass idx:DIR for a copy elsewhere"
            )
        return _load_idx_dir(FASHION_MNIST_DIR, "fashion-mnist")
    kind, sep, rest = spec.partition(":")
    if sep and rest:
        if kind == "idx":
            return _load_idx_dir(Path(rest).expanduser(), spec)
        if kind == "npz":
            return _load_npz(Path(rest).expanduser(), spec)
        if kind == "tfds":
            name, _, split = rest.partition(":")
            return _load_tfds(name, split or "test", spec)
    raise InputError(f"unknown data set {spec!r}; expected one of {', '.join(DATASET_SPECS)}")


def available_datasets() -> dict[str, dict]:
    """Which data sets can be loaded here, without loading them.

    Returns:
      ``{spec: {"available": bool, "detail": str}}`` for ``digits``,
      ``fashion-mnist`` and ``tfds`` (the prepared TFDS data sets found, and
      whether TensorFlow is installed).
    """
    fm = FASHION_MNIST_DIR.is_dir()
    data_dir = Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))
    prepared = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    tf = importlib.util.find_spec("tensorflow") is not None
    reader = "tfds.load (TensorFlow)" if tf else "tfds.data_source (no TensorFlow)"
    return {
        "digits": {"available": importlib.util.find_spec("sklearn") is not None,
                   "detail": "scikit-learn's bundled 8x8 digits, 1,797 images"},
        "fashion-mnist": {"available": fm, "detail": str(FASHION_MNIST_DIR) if fm
                          else "absent: apt-get install dataset-fashion-mnist"},
        "tfds": {"available": bool(prepared), "detail": f"{data_dir}: "
                 f"{', '.join(prepared) if prepared else 'no prepared data sets'}; reader {reader}"},
    }  # fmt: skip


# --------------------------------------------------------------------------- batches


def iterate_batches(x: np.ndarray, y: np.ndarray, *, batch_size: int,
                    order: Sequence[int] | np.ndarray | None = None) -> Iterator[Batch]:  # fmt: skip
    """Yields fixed-shape batches; the last one is zero-padded and masked.

    Args:
      x: ``[n, ...]`` inputs.
      y: ``[n]`` labels.
      batch_size: rows per batch (>= 1).
      order: optional permutation of ``range(n)`` to visit rows in.

    Yields:
      :class:`Batch` with ``x[batch_size, ...]``, ``y[batch_size]``,
      ``mask[batch_size]`` (True on real rows). ``ceil(n / batch_size)``
      batches in all; every one has the same shape, so one compilation serves
      a whole pass.
    """
    try:
        batch_size = check_int("batch_size", batch_size, lo=1)
    except InputError:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}") from None
    n = len(x)
    if len(y) != n:
        raise InputError(f"x and y must have the same length; got {n} and {len(y)}")
    if n == 0:
        raise InputError("cannot batch an empty data set; got 0 rows")
    idx = np.arange(n) if order is None else _array(order, "order")
    perm = idx.shape == (n,) and idx.dtype.kind in "iu" and np.array_equal(np.sort(idx), range(n))
    if not perm:
        raise InputError(f"order must be a permutation of range({n}); got {idx.dtype} of shape {idx.shape}")  # fmt: skip
    for start in range(0, n, batch_size):
        rows = idx[start : start + batch_size]
        xb, yb, pad = x[rows], y[rows], batch_size - len(rows)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), dtype=y.dtype)])
        yield Batch(xb, yb, np.arange(batch_size) < batch_size - pad)


def shuffled_batches(key: jax.Array, x: np.ndarray, y: np.ndarray, *,
                     batch_size: int) -> Iterator[Batch]:  # fmt: skip
    """Like :func:`iterate_batches`, in the order of a permutation drawn with ``key``."""
    order = np.asarray(jax.random.permutation(key, len(x)))
    return iterate_batches(x, y, batch_size=batch_size, order=order)
