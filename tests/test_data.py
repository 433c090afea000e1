"""Data sources, validation and batching, on real files written in the real formats."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import needs_fashion, write_idx, write_mnist_dir

from deepfault_jax import data


def _check_dataset(ds: data.Dataset, *, shape, classes):
    for x, y in (ds.split("train"), ds.split("test")):
        assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == shape
        assert y.dtype == np.int32 and y.shape == (x.shape[0],)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert 0 <= y.min() and y.max() < classes
    assert ds.num_classes == classes
    assert ds.input_shape == shape


# --------------------------------------------------------------------------- digits


def test_digits_is_real_and_split_fixed(digits):
    _check_dataset(digits, shape=(8, 8, 1), classes=10)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == round(0.25 * 1797)
    again = data.load_dataset("digits")
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)
    other = data.load_dataset("digits", digits_seed=1)
    assert not np.array_equal(other.y_test, digits.y_test)
    # every class occurs in both splits; pixels use the whole range
    assert set(np.unique(digits.y_test)) == set(range(10))
    assert digits.x_train.max() == 1.0 and digits.x_train.min() == 0.0


def test_digits_train_and_test_are_disjoint(digits):
    train = {row.tobytes() for row in digits.x_train}
    test = [row.tobytes() for row in digits.x_test]
    # the raw set holds a few duplicate images; the split must not copy rows across
    from sklearn.datasets import load_digits

    raw = (load_digits().images / 16.0).astype(np.float32)[..., None]
    dup = len(raw) - len({r.tobytes() for r in raw})
    assert sum(t in train for t in test) <= dup


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    arr = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", arr, compress=compress)
    got = data.read_idx(path)
    assert got.shape == (2, 3, 4) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, arr)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = write_idx(tmp_path / "a", np.zeros((3, 2), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[0] = 0x12
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad IDX magic number.*expected 0x0000.*got 0x1200"):
        data.read_idx(path)


def test_read_idx_rejects_unknown_type(tmp_path):
    path = write_idx(tmp_path / "a", np.zeros((3, 2), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[2] = 0x07
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unknown IDX type code.*got 0x07"):
        data.read_idx(path)


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_read_idx_rejects_truncated_data(tmp_path, cut):
    path = write_idx(tmp_path / "a", np.zeros((10, 28, 28), np.uint8))
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    with pytest.raises(ValueError, match=rf"truncated IDX data: dimensions \[10, 28, 28\] need "
                                         rf"7840 bytes; got {7840 - cut}"):  # fmt: skip
        data.read_idx(path)


def test_read_idx_rejects_oversized_and_short_header(tmp_path):
    path = write_idx(tmp_path / "a", np.zeros((4,), np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="oversized IDX data"):
        data.read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 3]) + b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated IDX header: rank 3 needs 16 bytes; got 9"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="at least 4 bytes; got 2"):
        data.read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "a.gz", np.ones((50, 28, 28), np.uint8) * 7, compress=True)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip data"):
        data.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory(tmp_path, compress):
    directory, arrays = write_mnist_dir(tmp_path / "mnist", compress=compress)
    ds = data.load_dataset(f"idx:{directory}")
    _check_dataset(ds, shape=(28, 28, 1), classes=10)
    expected = arrays["train-images-idx3-ubyte"].astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(ds.x_train[..., 0], expected)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.name == f"idx:{directory}"


def test_idx_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="must name a directory.*which does not exist"):
        data.load_dataset(f"idx:{tmp_path / 'nope'}")
    directory, _ = write_mnist_dir(tmp_path / "m")
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="expected exactly one test labels file.*got none"):
        data.load_dataset(f"idx:{directory}")
    directory, _ = write_mnist_dir(tmp_path / "m2", n_train=60)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(59, np.uint8), compress=True)
    with pytest.raises(ValueError, match=r"y_train must hold one label per image \(60\); got 59"):
        data.load_dataset(f"idx:{directory}")


@needs_fashion
def test_fashion_mnist_real_files():
    ds = data.load_dataset("fashion-mnist")
    _check_dataset(ds, shape=(28, 28, 1), classes=10)
    assert (len(ds.y_train), len(ds.y_test)) == (60_000, 10_000)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    # real images: mostly dark background with bright garments
    assert 0.2 < ds.x_test.mean() < 0.4


def test_fashion_mnist_absent_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist")


# --------------------------------------------------------------------------- npz


def write_npz(tmp_path, name="d.npz", **arrays):
    """Writes a small npz data set (3 classes); ``arrays`` replace or (None) drop entries."""
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.integers(0, 256, (30, 6, 5), dtype=np.uint8),
        "y_train": np.arange(30) % 3,
        "x_test": rng.integers(0, 256, (9, 6, 5), dtype=np.uint8),
        "y_test": np.arange(9) % 3,
    }
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **base)
    return path, base


def test_npz_uint8_and_float(tmp_path):
    path, arrays = write_npz(tmp_path)
    ds = data.load_dataset(f"npz:{path}")
    _check_dataset(ds, shape=(6, 5, 1), classes=3)
    np.testing.assert_allclose(ds.x_train[..., 0], arrays["x_train"] / 255.0, rtol=0, atol=1e-7)
    xf = np.random.default_rng(1).random((30, 4, 4, 3)).astype(np.float64)
    path, _ = write_npz(tmp_path, "f.npz", x_train=xf, x_test=xf[:9])
    ds = data.load_dataset(f"npz:{path}")
    _check_dataset(ds, shape=(4, 4, 3), classes=3)
    np.testing.assert_array_equal(ds.x_train, xf.astype(np.float32))


def test_npz_num_classes_key(tmp_path):
    path, _ = write_npz(tmp_path, num_classes=np.array(5))
    assert data.load_dataset(f"npz:{path}").num_classes == 5


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y_test": np.array([0, 1, 2, 3, 4, 0, 1, 2, 7]), "num_classes": np.array(3)},
         r"labels must lie in \[0, 3\); got max 7"),
        ({"y_train": -(np.arange(30) % 3)}, "y_train must be >= 0; got min -2"),
        ({"y_train": (np.arange(30) % 3).astype(np.float32)}, "y_train must hold integers"),
        ({"x_train": np.zeros((30, 30), np.uint8)}, r"x_train must have rank 3.*got rank 2"),
        ({"x_test": np.zeros((9, 6, 5, 1, 1), np.uint8)}, "x_test must have rank 3.*got rank 5"),
        ({"x_train": np.full((30, 6, 5), np.nan)}, "x_train must be finite; got 900 NaN"),
        ({"x_train": np.full((30, 6, 5), 3.0)}, r"must lie in \[0, 1\]; got range \[3, 3\]"),
        ({"x_train": np.full((30, 6, 5), 300, np.int32)}, r"must lie in \[0, 255\]"),
        ({"x_test": np.zeros((9, 7, 5), np.uint8)}, "same image shape"),
        ({"y_test": np.zeros(8, np.int64)}, r"one label per image \(9\); got 8"),
        ({"y_test": None}, r"missing \['y_test'\]"),
        ({"y_train": np.zeros(30, np.int64), "y_test": np.zeros(9, np.int64)},
         "at least 2 classes; got num_classes=1"),
        ({"x_train": np.zeros((0, 6, 5), np.uint8), "y_train": np.zeros(0, np.int64)},
         "at least one image"),
    ],
)  # fmt: skip
def test_npz_bad_arrays(tmp_path, arrays, message):
    path, _ = write_npz(tmp_path, **arrays)
    with pytest.raises((ValueError, TypeError), match=message):
        data.load_dataset(f"npz:{path}")


def test_npz_truncated_and_corrupt_files(tmp_path):
    path, _ = write_npz(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable npz file"):
        data.load_dataset(f"npz:{path}")
    path.write_bytes(b"\x01" + os.urandom(2000))
    with pytest.raises(ValueError, match="must be a .npz archive.*got a file that is not a zip"):
        data.load_dataset(f"npz:{path}")
    with pytest.raises(ValueError, match="missing.npz': No such file or directory"):
        data.load_dataset(f"npz:{tmp_path / 'missing.npz'}")


def test_npz_with_object_arrays_is_refused(tmp_path):
    path = tmp_path / "o.npz"
    obj = np.empty(30, dtype=object)
    np.savez(path, x_train=obj, y_train=np.zeros(30), x_test=obj, y_test=np.zeros(30))
    with pytest.raises(ValueError, match="not a readable npz file"):
        data.load_dataset(f"npz:{path}")


def test_unknown_spec_lists_the_forms():
    for spec in ["mnist", "npz:", "foo:bar", ""]:
        with pytest.raises(ValueError, match="unknown data set .*expected one of digits, "
                                             "fashion-mnist, idx:DIR, tfds:NAME"):  # fmt: skip
            data.load_dataset(spec)
    with pytest.raises(TypeError, match="must be a str; got int"):
        data.load_dataset(3)


# --------------------------------------------------------------------------- TFDS


def test_tfds_through_data_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_dataset("tfds:mnist")
        _check_dataset(ds, shape=(28, 28, 1), classes=10)
        assert (len(ds.y_train), len(ds.y_test)) == (24, 24)
        assert ds.name == "tfds:mnist"
        ds = data.load_dataset("tfds:cifar10:test")
        _check_dataset(ds, shape=(32, 32, 3), classes=10)


def test_tfds_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown TFDS data set 'no_such_set_xyz'"):
        data.load_dataset("tfds:no_such_set_xyz")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="is not prepared here.*tfds build mnist"):
        data.load_dataset("tfds:mnist")


def test_tfds_prepared_data_set(prepared_tfds_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared_tfds_dir))
    ds = data.load_dataset("tfds:tiny_shapes")
    _check_dataset(ds, shape=(8, 8, 1), classes=3)
    assert (len(ds.y_train), len(ds.y_test)) == (30, 9)
    # the same images the builder generated (TFDS shuffles the order on disk)
    rng = np.random.default_rng(1)
    expected = {rng.integers(0, 256, (8, 8, 1), dtype=np.uint8).tobytes(): i % 3 for i in range(9)}
    got = {
        (x * 255).round().astype(np.uint8).tobytes(): int(y)
        for x, y in zip(ds.x_test, ds.y_test, strict=True)
    }
    assert got == expected
    assert "tiny_shapes" in data.available_datasets()["tfds"]["detail"]
    with pytest.raises(
        ValueError, match=r"has no split 'validation'; expected one of \['train', 'test'\]"
    ):
        data.load_dataset("tfds:tiny_shapes:validation")


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("batch_size", [1, 7, 10, 64])
def test_iterate_batches_pads_and_masks(batch_size):
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2, 1, 1)
    y = np.arange(10, dtype=np.int32)
    batches = list(data.iterate_batches(x, y, batch_size=batch_size))
    assert len(batches) == -(-10 // batch_size)
    assert all(b.x.shape == (batch_size, 2, 1, 1) and b.y.shape == (batch_size,) for b in batches)
    xs = np.concatenate([b.x[b.mask] for b in batches])
    ys = np.concatenate([b.y[b.mask] for b in batches])
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    last = batches[-1]
    assert last.mask.sum() == 10 - batch_size * (len(batches) - 1)
    assert not last.x[~last.mask].any() and not last.y[~last.mask].any()


def test_shuffled_batches_is_a_permutation_fixed_by_key():
    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    y = np.arange(50, dtype=np.int32)

    def order(key):
        return np.concatenate([b.y[b.mask] for b in data.shuffled_batches(key, x, y, batch_size=8)])

    a, b = order(jax.random.key(0)), order(jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), y)
    assert not np.array_equal(a, y)
    assert not np.array_equal(order(jax.random.key(1)), a)


def test_iterate_batches_errors():
    x = np.zeros((3, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="positive integer; got 0"):
        list(data.iterate_batches(x, np.zeros(3), batch_size=0))
    with pytest.raises(ValueError, match="same length; got 3 and 2"):
        list(data.iterate_batches(x, np.zeros(2), batch_size=2))
    with pytest.raises(ValueError, match="empty"):
        list(data.iterate_batches(x[:0], np.zeros(0), batch_size=2))


def test_available_datasets_reports_each_source():
    avail = data.available_datasets()
    assert avail["digits"]["available"] is True
    assert avail["fashion-mnist"]["available"] == data.FASHION_MNIST_DIR.is_dir()
    assert "reader" in avail["tfds"]["detail"]
