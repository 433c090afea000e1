"""Shared fixtures: small real data sets and helpers that write real files."""

from __future__ import annotations

import os

# Sharding tests need several devices: force 8 CPU devices before JAX starts.
FORCED_DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FORCED_DEVICES}"
).strip()

import gzip  # noqa: E402 - the device count above must be set before JAX is imported
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from deepfault_jax import data  # noqa: E402

FASHION_ABSENT = not data.FASHION_MNIST_DIR.is_dir()
needs_fashion = pytest.mark.skipif(
    FASHION_ABSENT,
    reason=f"fashion-mnist absent from {data.FASHION_MNIST_DIR}: "
    "apt-get install dataset-fashion-mnist",
)

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
              np.float64: 0x0E}  # fmt: skip


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Writes ``array`` as an IDX file (big-endian, the MNIST format)."""
    array = np.asarray(array)
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_mnist_dir(directory: Path, *, n_train=60, n_test=20, size=28, classes=10, seed=0,
                    compress=True) -> tuple[Path, dict]:  # fmt: skip
    """A small MNIST-format directory of random images and labels."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % classes).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % classes).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(directory / (name + (".gz" if compress else "")), arr, compress=compress)
    return directory, arrays


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """Trained zoo models cached in a private directory for the module that asks."""
    old = os.environ.get("DEEPFAULT_JAX_CACHE")
    os.environ["DEEPFAULT_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["DEEPFAULT_JAX_CACHE"]
    else:
        os.environ["DEEPFAULT_JAX_CACHE"] = old


@pytest.fixture(scope="session")
def digits() -> data.Dataset:
    return data.load_dataset("digits")


@pytest.fixture(scope="session")
def prepared_tfds_dir(tmp_path_factory) -> Path:
    """A real TFDS data set, ``tiny_shapes``, built with TFDS itself into a data directory.

    Built from a generator (no download), written as array_record files, read
    back through ``tfds.data_source`` exactly as a user's prepared data set is.
    """
    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30, 0), "test": self._generate_examples(9, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                image = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
                yield i, {"image": image, "label": i % 3}

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def assert_identical(a, b) -> None:
    """Two spectra have the same layout and threshold and bit-identical int32 counts."""
    assert a.index == b.index and a.threshold == b.threshold
    for name in ("a_pass", "a_fail", "n_pass", "n_fail"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype == np.int32, name
        np.testing.assert_array_equal(x, y, err_msg=name)
