"""User-input problems in data sets and files: each is an InputError naming what was expected.

Real files in the real formats (npz archives, gzip IDX files, a real gzip bomb); no mocks.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from conftest import write_idx, write_mnist_dir
from test_data import write_npz

from deepfault_jax import data
from deepfault_jax.errors import InputError, InputTypeError

NPZ_WANT = r"must be a \.npz archive with x_train, y_train, x_test, y_test \(np\.savez\); got "


def _npz(tmp_path, name="d.npz", **arrays):
    """An npz data set (``test_data.write_npz``'s arrays, changed by ``arrays``); its path."""
    return write_npz(tmp_path, name, **arrays)[0]


def _load_npz(path):
    return data.load_dataset(f"npz:{path}")


def _gzip_stream(header: bytes, zeros: int) -> bytes:
    """``header`` then ``zeros`` zero bytes, gzip-compressed chunk by chunk (little memory)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    chunk = bytes(1 << 20)
    out = [z.compress(header)]
    for start in range(0, zeros, len(chunk)):
        out.append(z.compress(chunk[: min(len(chunk), zeros - start)]))
    out.append(z.flush())
    return b"".join(out)


def _idx_header(code: int, dims) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


# --------------------------------------------------------------------------- 1. labels


@pytest.mark.parametrize(
    ("y_train", "num_classes", "message"),
    [
        (np.where(np.arange(30) == 0, 2**40, np.arange(30) % 3), None, "got max 1099511627776"),
        (np.where(np.arange(30) == 0, 2**40, np.arange(30) % 3), np.array(3),
         "got max 1099511627776"),
        (np.where(np.arange(30) == 0, 2**32, np.arange(30) % 3), None, "got max 4294967296"),
        ((np.arange(30) % 3).astype(np.uint64) + np.uint64(2**63) * (np.arange(30) == 5),
         None, "got max 9223372036854775810"),
        (np.where(np.arange(30) == 0, 2**31 - 1, np.arange(30) % 3), None, "got max 2147483647"),
        (np.where(np.arange(30) == 0, -(2**40), np.arange(30) % 3), None,
         "y_train must be >= 0; got min -1099511627776"),
    ],
)  # fmt: skip
def test_npz_labels_are_checked_before_the_int32_cast(tmp_path, y_train, num_classes, message):
    path = _npz(tmp_path, y_train=y_train, num_classes=num_classes)
    with pytest.raises(InputError, match=message):
        _load_npz(path)


def test_make_dataset_labels_beyond_int32_are_refused():
    x = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(InputError, match="y_test must be < 2147483647.*got max 1099511627776"):
        data.make_dataset("t", x, [0, 1], x, np.array([2**40, 1]), num_classes=2)


def test_labels_at_the_int32_limit_stay_exact():
    x = np.zeros((2, 1, 1), np.uint8)
    ds = data.make_dataset("t", x, np.array([0, 2**31 - 2], np.int64), x, [1, 0])
    assert ds.num_classes == 2**31 - 1 and ds.y_train[1] == 2**31 - 2


# --------------------------------------------------------------------------- 2. num_classes


@pytest.mark.parametrize(
    ("num_classes", "error", "message"),
    [
        (np.array(3.9), InputError, r"num_classes must be an integer; got np.float64\(3.9\)"),
        (np.array(np.nan), InputError, "num_classes must be an integer"),
        (np.array(1e30), InputError, "num_classes must be <= 2147483647; got 1000000"),
        (np.array(True), InputTypeError, "num_classes must be an integer; got bool"),
        (np.array("x"), InputTypeError, "num_classes must be an integer; got str"),
        (np.array([5, 6]), InputError, r"num_classes must be a scalar \(shape \(\)\); got shape "
                                       r"\(2,\)"),
        (np.array([5]), InputError, r"num_classes must be a scalar .*got shape \(1,\)"),
        (np.array(2.0), InputError, r"labels must lie in \[0, 2\); got max 2"),
        (np.array(1), InputError, "at least 2 classes; got num_classes=1"),
    ],
)  # fmt: skip
def test_npz_num_classes_must_be_an_integer_scalar(tmp_path, num_classes, error, message):
    path = _npz(tmp_path, num_classes=num_classes)
    with pytest.raises(error, match=message):
        _load_npz(path)


@pytest.mark.parametrize(
    "num_classes", [np.array(5.0), np.array(5, np.int8), np.array(5, np.uint64)]
)
def test_npz_integral_num_classes_is_accepted(tmp_path, num_classes):
    ds = _load_npz(_npz(tmp_path, num_classes=num_classes))
    assert ds.num_classes == 5 and type(ds.num_classes) is int


@pytest.mark.parametrize(
    ("num_classes", "error"), [(3.9, InputError), ("3", InputTypeError), (True, InputTypeError)]
)
def test_make_dataset_num_classes_must_be_an_integer(num_classes, error):
    x = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(error, match="num_classes must be an integer"):
        data.make_dataset("t", x, [0, 1], x, [1, 0], num_classes=num_classes)


# --------------------------------------------------------------------------- 3. npz files


def test_npy_file_given_as_npz(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((3, 4)))
    with pytest.raises(InputError, match=f"{path}: npz:PATH {NPZ_WANT}a .npy array file"):
        _load_npz(path)


@pytest.mark.parametrize("content", [b"x_train,y_train\n1,2\n", os.urandom(2000), b"\x00" * 9])
def test_non_zip_file_given_as_npz(tmp_path, content):
    path = tmp_path / "a.npz"
    path.write_bytes(b"\x01" + content)  # never starts with the zip or .npy magic
    with pytest.raises(InputError, match=f"{NPZ_WANT}a file that is not a zip archive"):
        _load_npz(path)


def test_empty_file_given_as_npz(tmp_path):
    path = tmp_path / "a.npz"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=f"{NPZ_WANT}an empty file"):
        _load_npz(path)


def test_missing_or_directory_npz_names_the_path(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(InputError, match=f"{NPZ_WANT}'{missing}': No such file or directory"):
        _load_npz(missing)
    with pytest.raises(InputError, match=f"{NPZ_WANT}'{tmp_path}': Is a directory"):
        _load_npz(tmp_path)


def test_idx_dir_missing_or_a_file_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=f"idx:DIR must name a directory.*'{missing}', which "
                                         "does not exist"):  # fmt: skip
        data.load_dataset(f"idx:{missing}")
    file = tmp_path / "f.gz"
    file.write_bytes(b"")
    with pytest.raises(InputError, match=f"'{file}', which is a file, not a directory"):
        data.load_dataset(f"idx:{file}")


# --------------------------------------------------------------------------- 4. gzip bombs


def test_idx_gzip_bomb_is_refused_from_its_header(tmp_path):
    # header claims 10**6 x 28 x 28 = 784 MB; 32 MB of zeros follow, deflated to ~32 KB
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_stream(_idx_header(0x08, (10**6, 28, 28)), 32 << 20))
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError) as info:
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes: the stream was inflated before the check"
    assert time.perf_counter() - start < 1.0
    assert re.search(r"dimensions \[1000000, 28, 28\] need 784000000 bytes.*a gzip file of \d+ "
                     r"bytes inflates to at most \d+.*gzip bomb", str(info.value))  # fmt: skip


def test_idx_absurd_dimensions_are_refused_before_reading(tmp_path):
    header = _idx_header(0x08, (2**31, 28, 28))
    path = tmp_path / "a.gz"
    path.write_bytes(_gzip_stream(header, 4 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=rf"need {2**31 * 784} bytes"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # uncompressed: the file size says at once that the data is absent
    path = tmp_path / "a"
    path.write_bytes(_idx_header(0x0E, (2**32 - 1,) * 4))
    with pytest.raises(InputError, match=rf"truncated IDX data: .* need {(2**32 - 1) ** 4 * 8} "
                                         "bytes; got 0"):  # fmt: skip
        data.read_idx(path)


def test_idx_gzip_extra_data_or_garbage_is_refused(tmp_path):
    payload = _idx_header(0x08, (10, 4)) + bytes(40)
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(payload + b"\x07"))
    with pytest.raises(InputError, match=r"oversized IDX data: dimensions \[10, 4\] need 40 "
                                         "bytes; got more"):  # fmt: skip
        data.read_idx(path)
    path.write_bytes(gzip.compress(payload[:-5]))
    with pytest.raises(InputError, match=r"truncated IDX data: .* need 40 bytes; got 35"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(payload) + b"garbage")
    with pytest.raises(InputError, match="corrupt or truncated gzip data"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(payload)[:-4])  # no length trailer
    with pytest.raises(InputError, match="corrupt or truncated gzip data"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(payload) + b"\x00" * 8)  # zero padding is legal gzip
    assert data.read_idx(path).shape == (10, 4)


# --------------------------------------------------------------------------- 5. idx classes


def test_idx_stray_label_255_is_refused(tmp_path):
    directory, _ = write_mnist_dir(tmp_path / "m")
    labels = (np.arange(60) % 10).astype(np.uint8)
    labels[17] = 255
    write_idx(directory / "train-labels-idx1-ubyte.gz", labels, compress=True)
    with pytest.raises(InputError, match=r"each of their 256 classes .* classes 10\.\.254 have no "
                                         r"examples in train or test: the largest label, 255 in "
                                         r".*train-labels-idx1-ubyte\.gz, looks corrupt"):  # fmt: skip
        data.load_dataset(f"idx:{directory}")


def test_idx_one_based_labels_are_accepted(tmp_path):
    # EMNIST letters labels its 26 classes 1..26: class 0 has no examples, by design
    directory, _ = write_mnist_dir(tmp_path / "m", classes=26)
    for name, n in (("train-labels-idx1-ubyte.gz", 60), ("t10k-labels-idx1-ubyte.gz", 20)):
        write_idx(directory / name, (np.arange(n) % 26 + 1).astype(np.uint8), compress=True)
    ds = data.load_dataset(f"idx:{directory}")
    assert ds.num_classes == 27 and ds.y_train.min() == 1


def test_idx_gap_inside_the_classes_is_refused(tmp_path):
    directory, _ = write_mnist_dir(tmp_path / "m")
    for name, n in (("train-labels-idx1-ubyte.gz", 60), ("t10k-labels-idx1-ubyte.gz", 20)):
        y = (np.arange(n) % 10).astype(np.uint8)
        y[y == 4] = 3
        y[y == 7] = 8
        write_idx(directory / name, y, compress=True)
    with pytest.raises(InputError, match="classes 4, 7 have no examples in train or test: number "
                                         "the classes without gaps"):  # fmt: skip
        data.load_dataset(f"idx:{directory}")


def test_idx_single_populated_class_is_refused(tmp_path):
    directory, _ = write_mnist_dir(tmp_path / "m")
    for name, n in (("train-labels-idx1-ubyte.gz", 60), ("t10k-labels-idx1-ubyte.gz", 20)):
        write_idx(directory / name, np.ones(n, np.uint8), compress=True)
    with pytest.raises(InputError, match=r"at least 2 classes with examples; got only label 1"):
        data.load_dataset(f"idx:{directory}")


# --------------------------------------------------------------------------- 6. float range


def test_float_images_holding_uint8_values_are_refused():
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 3)).astype(np.float32)
    x[0, 0, 0] = 255.0
    with pytest.raises(InputError, match=r"x_train with float dtype must lie in \[0, 1\]; got "
                                         r"range \[0, 255\].*uint8-valued pixels\? pass them as "
                                         "uint8 or divide by 255"):  # fmt: skip
        data.make_dataset("t", x, [0, 1, 0, 1], x[:2] / 255, [1, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_must_be_finite(bad):
    x = np.zeros((2, 2, 2), np.float64)
    x[1, 1, 1] = bad
    with pytest.raises(InputError, match="x_test must be finite; got 1 NaN or infinite values"):
        data.make_dataset("t", np.zeros_like(x), [0, 1], x, [1, 0])


def test_negative_float_images_are_refused():
    x = np.full((2, 2, 2), -0.5)
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]; got range \[-0.5, -0.5\]"):
        data.make_dataset("t", x, [0, 1], x * 0, [1, 0])


# --------------------------------------------------------------------------- 7. the rest


def test_read_idx_missing_or_directory_names_the_path(tmp_path):
    with pytest.raises(InputError, match=f"IDX file '{tmp_path / 'no'}' cannot be read: No such"):
        data.read_idx(tmp_path / "no")
    with pytest.raises(InputError, match=f"'{tmp_path}' cannot be read: Is a directory"):
        data.read_idx(tmp_path)
    with pytest.raises(InputTypeError, match="path must be a str or os.PathLike; got NoneType"):
        data.read_idx(None)


def test_idx_directory_with_a_missing_file_or_empty_file(tmp_path):
    directory, _ = write_mnist_dir(tmp_path / "m")
    (directory / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(InputError, match="train-images-idx3-ubyte.gz: IDX header needs at least"):
        data.load_dataset(f"idx:{directory}")
    (directory / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError, match="corrupt or truncated gzip data"):
        data.load_dataset(f"idx:{directory}")
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (directory / name).unlink()
    with pytest.raises(InputError, match="expected exactly one train images file"):
        data.load_dataset(f"idx:{directory}")


def test_npz_header_claiming_a_huge_array_is_refused(tmp_path):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (2**50,)}
    )
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(key + ".npy", header.getvalue() + bytes(100))
    with pytest.raises(InputError, match=f"{path}: not a readable npz file"):
        _load_npz(path)


def test_npz_other_bad_contents(tmp_path):
    with pytest.raises(InputError, match=r"missing \['x_test'\]"):
        _load_npz(_npz(tmp_path, x_test=None))
    with pytest.raises(InputError, match=r"x_train must have rank 3.*got rank 1"):
        _load_npz(_npz(tmp_path, x_train=np.zeros(30, np.uint8)))
    with pytest.raises(InputTypeError, match="y_train must hold integers; got dtype float64"):
        _load_npz(_npz(tmp_path, y_train=np.arange(30) * 1.0))
    with pytest.raises(InputError, match=r"y_train must have rank 1 \[n\]; got shape \(30, 2\)"):
        _load_npz(_npz(tmp_path, y_train=np.zeros((30, 2), np.int64)))


def test_ragged_python_lists_are_refused():
    x = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(InputTypeError, match="x_train must be an array of numbers"):
        data.make_dataset("t", [[[1, 2]], [[3]]], [0, 1], x, [1, 0])
    with pytest.raises(InputTypeError, match="y_test must be an array of numbers"):
        data.make_dataset("t", x, [0, 1], x, [[1], [0, 1]])


@pytest.mark.parametrize(
    ("seed", "error"), [(-1, InputError), ("a", InputTypeError), (2.5, InputError)]
)
def test_digits_seed_is_validated(seed, error):
    with pytest.raises(error, match="digits_seed must"):
        data.load_dataset("digits", digits_seed=seed)


def test_iterate_batches_order_and_batch_size_are_validated():
    x = np.zeros((3, 1), np.float32)
    y = np.zeros(3, np.int32)
    for order in ([0, 1, 5], [0, 0, 1], [0.0, 1.0, 2.0]):
        with pytest.raises(InputError, match=r"order must be a permutation of range\(3\)"):
            list(data.iterate_batches(x, y, batch_size=2, order=order))
    for bs in (None, "2", True, 2.5):
        with pytest.raises(InputError, match="batch_size must be a positive integer"):
            list(data.iterate_batches(x, y, batch_size=bs))
    assert len(list(data.iterate_batches(x, y, batch_size=2.0))) == 2


def test_tfds_bad_names(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    for spec in ("tfds:no_such_set_xyz", "tfds:../../etc", "tfds:mnist/9.9.9"):
        with pytest.raises(InputError, match="unknown TFDS data set"):
            data.load_dataset(spec)
