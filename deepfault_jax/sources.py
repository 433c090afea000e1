"""Streamed data sets: rows read a batch at a time, never the whole set in memory.

A :class:`Source` is one split of a data set with random access to contiguous
rows: ``len(source)``, ``source.input_shape``, ``source.num_classes`` and
``source.read(start, stop) -> (x float32[n, h, w, c] in [0, 1], y int32[n])``.
Each read converts and checks only its own rows (integer pixels are divided by
255; float pixels must lie in [0, 1]; labels must lie in ``[0, num_classes)``).

:func:`stream_batches` turns rows ``[start, stop)`` of a source into fixed-shape
:class:`~deepfault_jax.data.Batch` es through ``grain``: the batches are a
``grain.MapDataset`` over batch indices, read ahead by worker threads, in order.
A read that fails (a lost file, a corrupt record) surfaces from the iterator
as the original exception, after every earlier batch.

:func:`open_source` opens a data set spec for streaming:

``npz:PATH``
    an uncompressed ``.npz`` (``np.savez``): each array is memory-mapped in
    place inside the zip file. A compressed one (``np.savez_compressed``) cannot
    be mapped and is refused with the way to convert it.
``npy:DIR``
    ``x_train.npy``, ``y_train.npy``, ``x_test.npy``, ``y_test.npy`` (and
    optionally ``num_classes.npy``), memory-mapped.
``idx:DIR`` / ``fashion-mnist``
    IDX files: uncompressed ones memory-mapped, gzip ones read in chunks (a
    read at row r inflates the stream up to r; labels, one byte per row, are
    read whole).
``tfds:NAME[:SPLIT]``
    a prepared TFDS data set through ``tfds.data_source`` (array_record
    files, no TensorFlow), read in batched ``__getitems__`` calls.
``digits``
    the small in-memory set, through the same path.

The resume identity of a source (:meth:`Source.identity`) names it, its rows,
shape and classes, and hashes a fixed sample of 16 rows spread over its first
4,096, so that a resume file of another data set is refused without reading it all.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import os
import re
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deepfault_jax.data import (
    FASHION_MNIST_DIR,
    Batch,
    as_images,
    as_labels,
    find_idx_files,
    idx_header,
    load_dataset,
    read_idx,
    stored_num_classes,
)
from deepfault_jax.errors import InputError, InputTypeError, check_int

__all__ = [
    "STREAM_SPECS",
    "ArraySource",
    "Source",
    "open_source",
    "stream_batches",
]

#: The data set specs :func:`open_source` streams.
STREAM_SPECS = ("digits", "fashion-mnist", "idx:DIR", "npz:PATH", "npy:DIR", "tfds:NAME[:SPLIT]")

_SAMPLE_ROWS = 16
_SAMPLE_SPAN = 4096


class Source:
    """One split of a data set, read by contiguous rows.

    Subclasses set ``name``, ``input_shape`` (height, width, channels),
    ``num_classes`` and implement ``__len__`` and :meth:`_raw` (the stored rows
    ``[start, stop)`` as arrays: images of any integer or float dtype, labels of
    any integer dtype).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int

    def __len__(self) -> int:
        raise NotImplementedError

    def _raw(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` as ``(float32[n, h, w, c] in [0, 1], int32[n])``.

        Raises:
          InputError: rows outside the split, a read that fails (the reader's
            error is named: a truncated or corrupt file, a lost one), or rows that are not images of
            the source's shape in range, or labels outside ``[0, num_classes)``
            (the rows are named).
        """
        n = len(self)
        start, stop = check_int("start", start), check_int("stop", stop)
        if not 0 <= start < stop <= n:
            raise InputError(
                f"{self.name}: rows [start, stop) must lie within its {n} rows; got [{start}, {stop})"
            )
        what = f"{self.name} rows {start}..{stop - 1}"
        try:
            x, y = self._raw(start, stop)
        except InputError:
            raise
        except (OSError, EOFError, zlib.error, ValueError, KeyError, IndexError) as e:
            raise InputError(f"{what} cannot be read ({type(e).__name__}: {e})") from None
        x = as_images(x, f"{what} (images)")
        if x.shape[1:] != self.input_shape:
            raise InputError(
                f"{what}: images must have shape {self.input_shape}; got {x.shape[1:]}"
            )
        y = as_labels(y, len(x), f"{what} (labels)")
        if int(y.max()) >= self.num_classes:
            raise InputError(
                f"{what}: labels must lie in [0, {self.num_classes}); got max {int(y.max())}"
            )
        return x, y

    def identity(self) -> dict:
        """What a resume file records of the data: name, rows, shape, classes, and a
        sha256 of 16 rows spread evenly over the first 4,096 (cheap for every reader,
        a gzip stream included; a damaged file later on fails when it is read)."""
        n = min(len(self), _SAMPLE_SPAN)
        rows = sorted({round(i * (n - 1) / (_SAMPLE_ROWS - 1)) for i in range(_SAMPLE_ROWS)})
        h = hashlib.sha256()
        for r in rows:
            x, y = self.read(r, r + 1)
            h.update(x.tobytes())
            h.update(y.tobytes())
        return {
            "source": self.name,
            "rows": len(self),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "sample_sha256": h.hexdigest()[:32],
        }

    def describe(self) -> dict:
        """A summary for reports: name, rows, input shape, classes, reader."""
        return {
            "name": self.name,
            "rows": len(self),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "reader": type(self).__name__,
        }


class ArraySource(Source):
    """Rows of two arrays (in memory or ``np.memmap``): images ``[n, h, w(, c)]`` and labels ``[n]``."""

    def __init__(self, name: str, x: Any, y: Any, *, num_classes: int | None = None):
        if not hasattr(x, "shape") or not hasattr(y, "shape"):
            raise InputTypeError(
                f"{name}: images and labels must be arrays; got {type(x).__name__} and {type(y).__name__}"
            )
        if x.ndim not in (3, 4) or x.shape[0] == 0:
            raise InputError(
                f"{name}: images must have shape [n, height, width(, channels)] with n >= 1; "
                f"got {tuple(x.shape)}"
            )
        if y.shape[0] != x.shape[0]:
            raise InputError(
                f"{name}: labels must hold one label per image ({x.shape[0]}); got {y.shape[0]}"
            )
        self.name, self._x, self._y = name, x, y
        self.input_shape = tuple(int(d) for d in (*x.shape[1:3], x.shape[3] if x.ndim == 4 else 1))
        if num_classes is None:  # labels are small next to images: one pass over them
            num_classes = int(as_labels(np.asarray(y), x.shape[0], f"{name} labels").max()) + 1
        self.num_classes = check_int("num_classes", num_classes, lo=2)

    def __len__(self) -> int:
        return int(self._x.shape[0])

    def _raw(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self._x[start:stop]), np.asarray(self._y[start:stop])


# --------------------------------------------------------------------------- file formats


def _npz_member_map(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """The member ``key.npy`` of an uncompressed npz, memory-mapped in place."""
    info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(
            f"{path}: array {key!r} is compressed (np.savez_compressed) and cannot be "
            "memory-mapped; stream it after saving with np.savez, or load it whole "
            "without streaming"
        )
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise InputError(f"{path}: corrupt zip entry for {key!r}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)  # fmt: skip
        if read_header is None:
            raise InputError(f"{path}: array {key!r} has npy format {version}; expected 1.0 or 2.0")
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran or dtype.hasobject:
        raise InputError(
            f"{path}: array {key!r} must be a C-ordered numeric array to be memory-mapped"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape), offset=offset)


def _open_npz(path: Path, split: str) -> Source:
    keys = (f"x_{split}", f"y_{split}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
            missing = [k for k in keys if k not in names]
            if missing:
                raise InputError(f"{path}: npz must hold {list(keys)}; missing {missing}, got {sorted(names)}")  # fmt: skip
            x, y = (_npz_member_map(path, zf, k) for k in keys)
            if "num_classes" in names:
                with zf.open("num_classes.npy") as fh:
                    num_classes = stored_num_classes(np.lib.format.read_array(fh), path)
            else:  # as load_dataset: the largest label of both splits + 1
                labels = [_npz_member_map(path, zf, k) for k in ("y_train", "y_test") if k in names]
                num_classes = _classes_of(labels, path)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, KeyError, EOFError) as e:
        raise InputError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from None
    return ArraySource(f"npz:{path}[{split}]", x, y, num_classes=num_classes)


def _open_npy_dir(directory: Path, split: str) -> Source:
    if not directory.is_dir():
        raise InputError(f"npy:DIR must name a directory; got {str(directory)!r}")
    files = {k: directory / f"{k}_{split}.npy" for k in ("x", "y")}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"{directory}: npy:DIR needs x_{split}.npy and y_{split}.npy; missing {missing}")  # fmt: skip
    try:
        x, y = (np.load(p, mmap_mode="r", allow_pickle=False) for p in files.values())
        nc = directory / "num_classes.npy"
        if nc.is_file():
            num_classes = stored_num_classes(np.load(nc, allow_pickle=False), nc)
        else:  # as load_dataset: the largest label of both splits + 1
            found = [directory / f"y_{k}.npy" for k in ("train", "test")]
            labels = [np.load(p, mmap_mode="r", allow_pickle=False) for p in found if p.is_file()]
            num_classes = _classes_of(labels, directory)
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{directory}: cannot read the npy files ({type(e).__name__}: {e})") from None  # fmt: skip
    return ArraySource(f"npy:{directory}[{split}]", x, y, num_classes=num_classes)


def _classes_of(labels: list, where: Path) -> int:
    """The largest label of the (memory-mapped) label arrays + 1, read in chunks."""
    top = -1
    for y in labels:
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise InputError(f"{where}: labels must be a 1-D integer array; got a {y.dtype} array of shape {y.shape}")  # fmt: skip
        for lo in range(0, len(y), 1 << 20):
            chunk = np.asarray(y[lo : lo + (1 << 20)])
            if chunk.size:
                top = max(top, int(chunk.max()))
    return top + 1


class _GzipIdxImages:
    """The images of a gzip IDX file, read by row range. One open stream moves
    forward through the file (batches come in order); a read behind it reopens it."""

    def __init__(self, path: Path, dims: list[int], header: int):
        self.path, self.shape, self.header = path, tuple(dims), header
        self.ndim, self.row_bytes = len(dims), math.prod(dims[1:])
        self._lock, self._stream = threading.Lock(), None

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        offset, want = self.header + start * self.row_bytes, (stop - start) * self.row_bytes
        with self._lock:
            if self._stream is None or self._stream.tell() > offset:
                if self._stream is not None:
                    self._stream.close()
                self._stream = gzip.open(self.path, "rb")
            self._stream.seek(offset)
            buf = self._stream.read(want)
            # at the last row, read past it: gzip then checks the stream's CRC and length
            extra = self._stream.read(1) if stop == self.shape[0] and len(buf) == want else b""
        if len(buf) < want:
            raise InputError(f"{self.path}: truncated IDX data at row {start + len(buf) // self.row_bytes}")  # fmt: skip
        if extra:
            raise InputError(f"{self.path}: oversized IDX data: more bytes after its {self.shape[0]} rows")  # fmt: skip
        return np.frombuffer(buf, np.uint8).reshape(stop - start, *self.shape[1:])


def _open_idx_dir(directory: Path, name: str, split: str) -> Source:
    files = find_idx_files(directory)
    path = files[f"{split} images"]
    dims, header, packed = idx_header(path)
    if len(dims) not in (3, 4):
        raise InputError(f"{path}: images must have rank 3 or 4; got dimensions {dims}")
    need = math.prod(dims)
    if packed:
        images: Any = _GzipIdxImages(path, dims, header)
    else:
        size = path.stat().st_size
        if size != header + need:
            state = "truncated" if size < header + need else "oversized"
            raise InputError(f"{path}: {state} IDX data: dimensions {dims} need {need} bytes; got {size - header}")  # fmt: skip
        images = np.memmap(path, np.uint8, mode="r", shape=tuple(dims), offset=header)
    y = read_idx(files[f"{split} labels"])
    other = read_idx(files[f"{'train' if split == 'test' else 'test'} labels"])
    for labels, which in ((y, split), (other, "the other split")):
        if labels.size == 0:
            raise InputError(f"{directory}: the labels of {which} must hold at least one row; got 0")  # fmt: skip
    num_classes = int(max(y.max(), other.max())) + 1  # as load_dataset counts them
    return ArraySource(f"{name}[{split}]", images, y, num_classes=num_classes)


def _no_unprepared_warning(record: logging.LogRecord) -> bool:
    """A logging filter: drops tfds's warning of a version folder without data."""
    return "has no dataset_info.json" not in record.getMessage()


class _TfdsSource(Source):
    """A prepared TFDS split through ``tfds.data_source`` (array_record)."""

    def __init__(self, name: str, split: str):
        import tensorflow_datasets as tfds

        data_dir = os.environ.get("TFDS_DATA_DIR") or None
        spec = f"tfds:{name}:{split}"
        prepare = (f"prepare it on a machine with network access with `tfds build {name} "
                   "--file_format=array_record` and copy the data directory here (TFDS_DATA_DIR "
                   "or ~/tensorflow_datasets)")  # fmt: skip
        absl = logging.getLogger("absl")  # tfds warns of an unprepared folder: the error says it
        absl.addFilter(_no_unprepared_warning)
        try:
            builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
        except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
            raise InputError(f"unknown TFDS data set {name!r}: {_first_line(e)}") from None
        finally:
            absl.removeFilter(_no_unprepared_warning)
        if not (builder.data_path / "dataset_info.json").exists():  # local or remote (epath)
            raise InputError(f"TFDS data set {name!r} is not prepared in {builder.data_dir}; {prepare}")  # fmt: skip
        info = builder.info
        self.image_key, self.label_key = (info.supervised_keys or ("image", "label"))[:2]
        try:
            self.num_classes = int(info.features[self.label_key].num_classes)
        except (AttributeError, KeyError, TypeError):
            raise InputError(f"TFDS data set {name!r} must have a class label feature {self.label_key!r}; got features {list(info.features)}") from None  # fmt: skip
        known = list(info.splits) if info.splits else []
        if known and re.split(r"[\[+]", split)[0] not in known:  # "test[:10%]" slices "test"
            raise InputError(f"TFDS data set {name!r} has no split {split!r}; expected one of {known}")  # fmt: skip
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            first = self._data[0]
        except Exception as e:  # not prepared, or prepared in another file format
            raise InputError(f"TFDS data set {name!r} is not prepared here for streaming ({_first_line(e)}); {prepare}") from None  # fmt: skip
        shape = np.shape(first[self.image_key])
        self.input_shape = tuple(int(d) for d in (*shape[:2], shape[2] if len(shape) == 3 else 1))
        self.name = spec

    def __len__(self) -> int:
        return len(self._data)

    def _raw(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._data.__getitems__(list(range(start, stop)))
        x = np.stack([np.asarray(r[self.image_key]) for r in rows])
        y = np.asarray([int(r[self.label_key]) for r in rows], np.int64)
        return x, y


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_source(spec: str, *, split: str = "test") -> Source:
    """Opens one split of a data set for streaming (the forms: module docstring).

    Args:
      spec: a data set spec of :data:`STREAM_SPECS`.
      split: ``"train"`` or ``"test"`` (for ``tfds:NAME:SPLIT`` the spec's split
        wins).

    Raises:
      InputError: an unknown spec (the forms are listed), a missing path, a
        compressed npz, a TFDS data set that is not prepared (the command that
        builds it is named).
    """
    if not isinstance(spec, str):
        raise InputTypeError(f"data set spec must be a str; got {type(spec).__name__}")
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test'; got {split!r}")
    if spec == "digits":
        ds = load_dataset("digits")
        x, y = ds.split(split)
        return ArraySource(f"digits[{split}]", x, y, num_classes=ds.num_classes)
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            load_dataset(spec)  # raises the message naming the package
        return _open_idx_dir(FASHION_MNIST_DIR, spec, split)
    kind, sep, rest = spec.partition(":")
    if sep and rest:
        path = Path(rest).expanduser()
        if kind == "npz":
            if not path.is_file():
                which = "is a directory" if path.is_dir() else "does not exist"
                raise InputError(f"npz:PATH must name a file; got {str(path)!r}, which {which}")
            return _open_npz(path, split)
        if kind == "npy":
            return _open_npy_dir(path, split)
        if kind == "idx":
            return _open_idx_dir(path, spec, split)
        if kind == "tfds":
            if importlib.util.find_spec("tensorflow_datasets") is None:
                raise InputError("tfds:NAME needs tensorflow-datasets: pip install tensorflow-datasets")  # fmt: skip
            name, _, tsplit = rest.partition(":")
            return _TfdsSource(name, tsplit or split)
    raise InputError(f"unknown data set {spec!r} for streaming; expected one of {', '.join(STREAM_SPECS)}")  # fmt: skip


# --------------------------------------------------------------------------- batches


class _BatchView:
    """Batch ``i`` of rows ``[start, stop)`` of a source, zero-padded and masked: a
    random-access sequence for ``grain.MapDataset.source``."""

    def __init__(self, source: Source, start: int, stop: int, batch_size: int, n_batches: int):
        self.source, self.start, self.stop = source, start, stop
        self.batch_size, self.n_batches = batch_size, n_batches

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> Batch:
        b = self.batch_size
        lo = self.start + i * b
        hi = min(self.stop, lo + b)
        x = np.zeros((b, *self.source.input_shape), np.float32)
        y = np.zeros((b,), np.int32)
        mask = np.zeros((b,), bool)
        if lo < hi:
            x[: hi - lo], y[: hi - lo] = self.source.read(lo, hi)
            mask[: hi - lo] = True
        return Batch(x, y, mask)


def stream_batches(
    source: Source,
    *,
    start: int,
    stop: int,
    batch_size: int,
    n_batches: int | None = None,
    threads: int = 2,
    prefetch: int = 4,
) -> Iterator[Batch]:
    """Fixed-shape batches of rows ``[start, stop)`` of ``source``, read ahead by grain.

    Args:
      source: the data.
      start, stop: the rows, ``0 <= start <= stop <= len(source)``.
      batch_size: rows per batch; the last one is zero-padded and masked.
      n_batches: batches to yield (default: enough for the rows); beyond the
        rows they are all-masked, so that processes with fewer rows keep step.
      threads: grain reader threads.
      prefetch: batches read ahead.
    """
    import grain

    need = -(-(stop - start) // batch_size)
    n_batches = need if n_batches is None else n_batches
    if n_batches < need:
        raise InputError(f"n_batches must cover the {stop - start} rows ({need}); got {n_batches}")
    if n_batches == 0:
        return iter(())
    view = _BatchView(source, start, stop, batch_size, n_batches)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(grain.MapDataset.source(view).to_iter_dataset(options))
