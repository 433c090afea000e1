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
    IDX files, gzip-compressed or not.
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
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

__all__ = [
    "Batch",
    "Dataset",
    "DATASET_SPECS",
    "FASHION_MNIST_DIR",
    "available_datasets",
    "iterate_batches",
    "load_dataset",
    "make_dataset",
    "read_idx",
    "shuffled_batches",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The accepted spec forms, as shown in error messages and ``--help``.
DATASET_SPECS = ("digits", "fashion-mnist", "idx:DIR", "tfds:NAME[:SPLIT]", "npz:PATH")

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


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
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")

    def summary(self) -> dict:
        """Sizes and shapes, JSON-ready."""
        return {
            "name": self.name,
            "num_train": int(len(self.y_train)),
            "num_test": int(len(self.y_test)),
            "input_shape": list(self.input_shape),
            "num_classes": int(self.num_classes),
        }


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


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    """Validates raw images and converts them to float32 NHWC in [0, 1]."""
    x = np.asarray(x)
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise TypeError(f"{what} must hold numbers; got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{what} must have rank 3 [n, height, width] or 4 [n, height, width, channels]; "
            f"got rank {x.ndim} with shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one image; got shape {x.shape}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{what} must have non-empty images; got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{what} with integer dtype must lie in [0, 255]; got range [{lo}, {hi}]"
            )
        return (x.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{what} must be finite; got {bad} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what} with float dtype must lie in [0, 1]; got range [{lo:g}, {hi:g}] "
            "(store uint8 pixels, or divide by 255)"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validates labels: rank 1, ``n`` of them, non-negative integers."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{what} must have rank 1 [n]; got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{what} must hold one label per image ({n}); got {y.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{what} must hold integers; got dtype {y.dtype}")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"{what} must be >= 0; got min {int(y.min())}")
    return y.astype(np.int32)


def make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int | None = None,
) -> Dataset:
    """Validates raw arrays and returns a :class:`Dataset`.

    Args:
      name: a name for reports.
      x_train, x_test: images ``[n, height, width]`` or ``[n, height, width,
        channels]``; integers in [0, 255] (scaled by 1/255) or floats in [0, 1].
      y_train, y_test: integer labels ``[n]``.
      num_classes: number of classes; default ``max(label) + 1``.

    Returns:
      The data set, x as float32 in [0, 1], y as int32.

    Raises:
      ValueError, TypeError: wrong rank, dtype, range, NaN/inf values,
        mismatched lengths or image shapes, labels outside [0, num_classes),
        fewer than two classes.

    Example:
      >>> ds = make_dataset("toy", np.zeros((4, 2, 2), np.uint8), [0, 1, 0, 1],
      ...                   np.zeros((2, 2, 2), np.uint8), [1, 0])
      >>> ds.input_shape
      (2, 2, 1)
    """
    xtr = _as_images(x_train, "x_train")
    xte = _as_images(x_test, "x_test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(
            f"x_train and x_test must have the same image shape; "
            f"got {xtr.shape[1:]} and {xte.shape[1:]}"
        )
    ytr = _as_labels(y_train, xtr.shape[0], "y_train")
    yte = _as_labels(y_test, xte.shape[0], "y_test")
    top = int(max(ytr.max(), yte.max()))
    if num_classes is None:
        num_classes = top + 1
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes; got num_classes={num_classes}")
    if top >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got max {top}")
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64), the rank, then one
    big-endian uint32 per dimension.

    Args:
      path: the file; a ``.gz`` file (detected by its magic bytes) is inflated.

    Returns:
      The array, in native byte order.

    Raises:
      ValueError: a corrupt or truncated gzip stream, a bad magic number, an
        unknown type code, a header shorter than its rank says, or a data size
        that differs from the product of the dimensions.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: IDX header needs at least 4 bytes; got {len(raw)}")
    if raw[:2] != b"\x00\x00":
        raise ValueError(
            f"{path}: bad IDX magic number: expected 0x0000 then type and rank; "
            f"got 0x{raw[:4].hex()}"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"{path}: unknown IDX type code: expected one of {known}; got 0x{code:02X}"
        )
    if ndim < 1:
        raise ValueError(f"{path}: IDX rank must be >= 1; got {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header: rank {ndim} needs {header} bytes; got {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "oversized"
        raise ValueError(
            f"{path}: {kind} IDX data: dimensions {list(dims)} need {expected} bytes; got {actual}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


_IDX_ROLES = {
    "train images": re.compile(r"train.*images.*idx3"),
    "train labels": re.compile(r"train.*labels.*idx1"),
    "test images": re.compile(r"(t10k|test).*images.*idx3"),
    "test labels": re.compile(r"(t10k|test).*labels.*idx1"),
}


def _find_idx_files(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise ValueError(
            f"IDX directory must exist; got {str(directory)!r}, which is not a directory"
        )
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    found = {}
    for role, pattern in _IDX_ROLES.items():
        hits = [n for n in names if pattern.search(n)]
        if len(hits) != 1:
            raise ValueError(
                f"{directory}: expected exactly one {role} file (like "
                f"'{'t10k' if 'test' in role else 'train'}-{role.split()[1]}-"
                f"idx{3 if 'images' in role else 1}-ubyte.gz'); got {hits or 'none'}"
            )
        found[role] = directory / hits[0]
    return found


def _load_idx_dir(directory: Path, name: str) -> Dataset:
    files = _find_idx_files(directory)
    arrays = {role: read_idx(p) for role, p in files.items()}
    for role in ("train images", "test images"):
        a = arrays[role]
        if a.ndim not in (3, 4) or a.dtype != np.uint8:
            raise ValueError(
                f"{files[role]}: {role} must be uint8 of rank 3 or 4; got {a.dtype} of shape {a.shape}"
            )
    for role in ("train labels", "test labels"):
        a = arrays[role]
        if a.ndim != 1:
            raise ValueError(f"{files[role]}: {role} must have rank 1; got shape {a.shape}")
    return make_dataset(
        name,
        arrays["train images"],
        arrays["train labels"],
        arrays["test images"],
        arrays["test labels"],
    )


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


def _load_npz(path: Path, name: str) -> Dataset:
    if not path.is_file():
        raise ValueError(f"npz file must exist; got {str(path)!r}, which is not a file")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
            if missing:
                raise ValueError(
                    f"{path}: npz must hold x_train, y_train, x_test, y_test; missing {missing}, "
                    f"got {sorted(keys)}"
                )
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            num_classes = int(f["num_classes"]) if "num_classes" in keys else None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable npz file ({e})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from None
    return make_dataset(name, **arrays, num_classes=num_classes)


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_prepare_hint(name: str) -> str:
    return (
        f"prepare it on a machine with network access with "
        f"`tfds build {name} --file_format=array_record` (or tfds.data_source('{name}')) "
        "and copy the data directory here (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )


def _read_tfds_split(name: str, split: str, image_key: str, label_key: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    if _tensorflow_installed():
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=False)
        rows = list(tfds.as_numpy(ds))
    else:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        rows = [source[i] for i in range(len(source))]
    if not rows:
        raise ValueError(
            f"TFDS data set {name!r} split {split!r} must not be empty; got 0 examples"
        )
    x = np.stack([np.asarray(r[image_key]) for r in rows])
    y = np.asarray([int(r[label_key]) for r in rows], dtype=np.int64)
    return x, y


def _load_tfds(name: str, split: str, spec: str) -> Dataset:
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now, not at tfds import time
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"unknown TFDS data set {name!r}: {first}") from None
    info = builder.info
    keys = info.supervised_keys or ("image", "label")
    image_key, label_key = keys[0], keys[1]
    try:
        num_classes = int(info.features[label_key].num_classes)
    except (AttributeError, KeyError):
        raise ValueError(
            f"TFDS data set {name!r} must have a class label feature {label_key!r}; "
            f"got features {list(info.features)}"
        ) from None
    known_splits = list(info.splits) if info.splits else []
    if known_splits and split not in known_splits:
        raise ValueError(
            f"TFDS data set {name!r} has no split {split!r}; expected one of {known_splits}"
        )
    try:
        x_train, y_train = _read_tfds_split(name, "train", image_key, label_key, data_dir)
        x_test, y_test = _read_tfds_split(name, split, image_key, label_key, data_dir)
    except ValueError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"TFDS data set {name!r} is not prepared here ({first}); {_tfds_prepare_hint(name)}"
        ) from None
    return make_dataset(spec, x_train, y_train, x_test, y_test, num_classes=num_classes)


def load_dataset(spec: str, *, digits_seed: int = DIGITS_SPLIT_SEED) -> Dataset:
    """Loads a data set by spec (see the module docstring for the forms).

    Args:
      spec: ``"digits"``, ``"fashion-mnist"``, ``"idx:DIR"``,
        ``"tfds:NAME[:SPLIT]"`` or ``"npz:PATH"``.
      digits_seed: seed of the fixed train/test split of ``digits``.

    Returns:
      A validated :class:`Dataset`.

    Raises:
      ValueError: an unknown spec (the message lists the forms), a missing data
        set (the message names the command that provides it), or invalid data.

    Example:
      >>> ds = load_dataset("digits")
      >>> ds.input_shape, ds.num_classes
      ((8, 8, 1), 10)
    """
    if not isinstance(spec, str):
        raise TypeError(f"data set spec must be a str; got {type(spec).__name__}")
    if spec == "digits":
        return _load_digits(digits_seed)
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise ValueError(
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
    raise ValueError(f"unknown data set {spec!r}; expected one of {', '.join(DATASET_SPECS)}")


def available_datasets() -> dict[str, dict]:
    """Which data sets can be loaded here, without loading them.

    Returns:
      ``{spec: {"available": bool, "detail": str}}`` for ``digits``,
      ``fashion-mnist`` and ``tfds`` (the prepared TFDS data sets found, and
      whether TensorFlow is installed).
    """
    out = {}
    out["digits"] = {
        "available": importlib.util.find_spec("sklearn") is not None,
        "detail": "scikit-learn's bundled 8x8 digits, 1,797 images",
    }
    fm = FASHION_MNIST_DIR.is_dir()
    out["fashion-mnist"] = {
        "available": fm,
        "detail": str(FASHION_MNIST_DIR) if fm else "absent: apt-get install dataset-fashion-mnist",
    }
    data_dir = Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))
    prepared = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    reader = (
        "tfds.load (TensorFlow)" if _tensorflow_installed() else "tfds.data_source (no TensorFlow)"
    )
    out["tfds"] = {
        "available": bool(prepared),
        "detail": f"{data_dir}: {', '.join(prepared) if prepared else 'no prepared data sets'}; "
        f"reader {reader}",
    }
    return out


# --------------------------------------------------------------------------- batches


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    order: Sequence[int] | np.ndarray | None = None,
) -> Iterator[Batch]:
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
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have the same length; got {n} and {len(y)}")
    if n == 0:
        raise ValueError("cannot batch an empty data set; got 0 rows")
    idx = np.arange(n) if order is None else np.asarray(order)
    if idx.shape != (n,):
        raise ValueError(f"order must be a permutation of {n} rows; got shape {idx.shape}")
    for start in range(0, n, batch_size):
        rows = idx[start : start + batch_size]
        xb, yb = x[rows], y[rows]
        m = len(rows)
        mask = np.ones(batch_size, dtype=bool)
        if m < batch_size:
            pad = batch_size - m
            xb = np.concatenate([xb, np.zeros((pad, *x.shape[1:]), dtype=x.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), dtype=y.dtype)])
            mask[m:] = False
        yield Batch(xb, yb, mask)


def shuffled_batches(
    key: jax.Array, x: np.ndarray, y: np.ndarray, *, batch_size: int
) -> Iterator[Batch]:
    """Like :func:`iterate_batches`, in the order of a permutation drawn with ``key``."""
    order = np.asarray(jax.random.permutation(key, len(x)))
    return iterate_batches(x, y, batch_size=batch_size, order=order)
