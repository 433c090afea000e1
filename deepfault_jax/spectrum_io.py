"""The spectrum file format (``.npz``): save, load and validate."""

from __future__ import annotations

import codecs
import io
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from deepfault_jax.attribution import ATTRIBUTION_FIELDS, LINEARISED, Attribution
from deepfault_jax.errors import InputError, check_finite, describe_os_error
from deepfault_jax.files import write_atomic
from deepfault_jax.probe import NeuronIndex
from deepfault_jax.spectrum import MAX_COUNT, POOLED, Spectrum

__all__ = [
    "SPECTRUM_FORMAT",
    "SPECTRUM_VERSION",
    "load_spectrum",
    "save_spectrum",
]

SPECTRUM_FORMAT = "deepfault-jax-spectrum"

SPECTRUM_VERSION = 1


def _atomic_savez(path: Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def save_spectrum(
    path: str | os.PathLike, spectrum: Spectrum, *, metadata: dict | None = None
) -> Path:
    """Writes ``spectrum`` to an ``.npz`` file, atomically (temp file, then rename).

    The file holds ``a_pass``, ``a_fail`` (int32 ``[classes, neurons]``),
    ``n_pass``, ``n_fail`` (int32 ``[classes]``), ``layer_names`` (str),
    ``layer_sizes`` (int64), ``threshold`` (float64), ``format``,
    ``format_version`` and ``metadata`` (a JSON string), and, for a spectrum
    with attribution sums, ``attribution_act_pass``, ``attribution_act_fail``,
    ``attribution_gxa_pass``, ``attribution_gxa_fail`` (float32) and
    ``attribution_fixes``, ``attribution_breaks`` (int32), each ``[classes,
    neurons]``, and ``attribution_linearised`` (str); every array loads with ``np.load(path, allow_pickle=False)``.

    Returns:
      The path written.
    """
    path = Path(path)
    arrays = {
        "a_pass": np.asarray(spectrum.a_pass, np.int32),
        "a_fail": np.asarray(spectrum.a_fail, np.int32),
        "n_pass": np.asarray(spectrum.n_pass, np.int32),
        "n_fail": np.asarray(spectrum.n_fail, np.int32),
        "layer_names": np.asarray(spectrum.index.layer_names, dtype=np.str_),
        "layer_sizes": np.asarray(spectrum.index.layer_sizes, np.int64),
        "threshold": np.float64(spectrum.threshold),
        "format": np.str_(SPECTRUM_FORMAT),
        "format_version": np.int64(SPECTRUM_VERSION),
        "metadata": np.str_(json.dumps(metadata or {}, sort_keys=True)),
    }
    if spectrum.classes is not None:
        arrays["classes"] = np.asarray(spectrum.classes, np.int64)
    if spectrum.attribution is not None:
        arrays["attribution_linearised"] = np.str_(spectrum.attribution.linearised)
        for field in ATTRIBUTION_FIELDS:
            dtype = np.int32 if field in ("fixes", "breaks") else np.float32
            arrays[f"attribution_{field}"] = np.asarray(getattr(spectrum.attribution, field), dtype)
    _atomic_savez(path, arrays)
    return path


def load_spectrum(path: str | os.PathLike, *, with_metadata: bool = False):
    """Reads a spectrum written by :func:`save_spectrum`, checking it is whole and consistent.

    Nothing is ever unpickled: the file is read with ``allow_pickle=False``,
    and a file that is not an ``.npz`` archive (a text file, a ``.npy``
    array, a pickle) is named as such before numpy sees it.

    Args:
      path: the ``.npz`` file.
      with_metadata: also return the file's metadata.

    Returns:
      The :class:`Spectrum`, or ``(spectrum, metadata)`` with ``with_metadata=True``
      (``metadata`` is the JSON object the file holds).

    Raises:
      InputError: a missing, unreadable, truncated or inconsistent file, or one
        that is not a spectrum file; counts that are not signed integers or
        pass the int32 limit; attribution sums that are not finite; metadata
        that is not a JSON object (the message names what was expected and
        what was found).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spectrum file must exist; got {str(path)!r}, which is not a file")
    arrays = _read_arrays(path)
    fmt = arrays.get("format", np.str_(SPECTRUM_FORMAT))
    if fmt.ndim != 0 or str(fmt) != SPECTRUM_FORMAT:
        raise InputError(f"{path}: format must be {SPECTRUM_FORMAT!r}; got {str(fmt)!r}")
    version = arrays.get("format_version", np.int64(SPECTRUM_VERSION))
    if version.ndim != 0 or version.dtype.kind not in "iu" or not 1 <= version <= SPECTRUM_VERSION:
        raise InputError(
            f"{path}: format_version must be an integer in [1, {SPECTRUM_VERSION}] (a newer "
            f"deepfault-jax writes more); got {version.dtype} {version.tolist()!r}"
        )
    index = _read_index(path, arrays)
    counts = _read_counts(path, arrays, index.num_neurons)
    attribution = _read_attribution(path, arrays, counts)
    threshold = arrays["threshold"]
    if threshold.ndim != 0 or threshold.dtype.kind not in "fiu":
        raise InputError(
            f"{path}: threshold must be a number; got {threshold.dtype} of shape {threshold.shape}"
        )
    spectrum = Spectrum(
        *(jnp.asarray(a, jnp.int32) for a in counts),
        index,
        check_finite(f"{path}: threshold", threshold.item()),
        attribution,
        _read_classes(path, arrays, len(counts[2])),
    )
    meta = _read_metadata(path, arrays)
    return (spectrum, meta) if with_metadata else spectrum


_REQUIRED = ("a_pass", "a_fail", "n_pass", "n_fail", "layer_names", "layer_sizes", "threshold")
_OPTIONAL = ("format", "format_version", "metadata", "attribution_linearised", "classes") + tuple(
    f"attribution_{f}" for f in ATTRIBUTION_FIELDS
)
_EXPECTED = "expected an .npz written by save_spectrum (deepfault-jax spectrum --out ...)"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _not_spectrum(path: Path, got: str) -> InputError:
    return InputError(f"{path} is not a readable spectrum file: {_EXPECTED}; got {got}")


def _sniff(path: Path) -> str | None:
    """What the file is, from its first bytes, when it is not a zip archive (None for a zip)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise InputError(f"spectrum file {path} cannot be read: {describe_os_error(e)}") from None
    if head[:4] in _ZIP_MAGIC:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array (np.save), not an .npz archive"
    if head[:1] == b"\x80":
        return "a Python pickle, which is never loaded"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file, not an .npz archive"
    if b"\x00" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            return "a text file"
        except UnicodeDecodeError:
            pass
    return "a binary file that is not a zip (.npz) archive"


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The spectrum's arrays from the archive (never unpickled; other members are not read)."""
    kind = _sniff(path)
    if kind is not None:
        raise _not_spectrum(path, kind)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _REQUIRED if k not in f.files]
            if missing:
                raise _not_spectrum(
                    path,
                    f"a zip without the spectrum arrays (missing {missing}; it holds "
                    f"{sorted(f.files)})",
                )
            arrays = {}
            for key in (*_REQUIRED, *(k for k in _OPTIONAL if k in f.files)):
                try:
                    arrays[key] = np.asarray(f[key])
                except ValueError as e:
                    if "pickle" not in str(e) and "Object arrays" not in str(e):
                        raise
                    raise InputError(
                        f"{path}: {key} holds Python objects (pickled data), which are never "
                        f"loaded; {_EXPECTED}"
                    ) from None
    except InputError:
        raise
    except Exception as e:  # zipfile, zlib, format and OS errors from a damaged file
        raise _not_spectrum(
            path, f"a damaged or truncated zip archive ({type(e).__name__}: {e})"
        ) from None
    return arrays


def _read_index(path: Path, arrays: dict[str, np.ndarray]) -> NeuronIndex:
    names, sizes = arrays["layer_names"], arrays["layer_sizes"]
    if names.ndim != 1 or names.dtype.kind != "U":
        raise InputError(
            f"{path}: layer_names must be strings of shape [layers]; got {names.dtype} {names.shape}"
        )
    if sizes.shape != names.shape or sizes.dtype.kind not in "iu":
        raise InputError(
            f"{path}: layer_sizes must be integers of shape {names.shape}; "
            f"got {sizes.dtype} {sizes.shape}"
        )
    return NeuronIndex(tuple(str(s) for s in names), tuple(int(s) for s in sizes))


def _check_counts(path: Path, name: str, a: np.ndarray, shape: tuple) -> None:
    """A count array: signed integers of ``shape`` in ``[0, MAX_COUNT]``."""
    if a.dtype.kind != "i":
        raise InputError(
            f"{path}: {name} must be signed integers (int32, or int64 within int32's range); "
            f"got {a.dtype}"
        )
    if a.shape != shape:
        raise InputError(
            f"{path}: {name} must be integer of shape {shape}; got {a.dtype} {a.shape}"
        )
    if a.size and a.min() < 0:
        raise InputError(f"{path}: counts must be >= 0; got a negative count in {name}")
    if a.size and a.max() > MAX_COUNT:
        raise InputError(
            f"{path}: {name} must hold counts of at most {MAX_COUNT} (int32); got {int(a.max())}"
        )


def _read_counts(path: Path, arrays: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, ...]:
    """``(a_pass, a_fail, n_pass, n_fail)``, checked against each other."""
    a_pass, a_fail, n_pass, n_fail = (arrays[k] for k in ("a_pass", "a_fail", "n_pass", "n_fail"))
    least = 1 if "classes" in arrays else 2  # a class subset or pooled row may be one row
    if n_pass.ndim != 1 or n_pass.shape[0] < least:
        raise InputError(
            f"{path}: n_pass must be integer of shape [classes >= {least}]; got {n_pass.dtype} {n_pass.shape}"
        )
    c = n_pass.shape[0]
    for name, a, shape in (
        ("n_pass", n_pass, (c,)),
        ("a_pass", a_pass, (c, n)),
        ("a_fail", a_fail, (c, n)),
        ("n_fail", n_fail, (c,)),
    ):
        _check_counts(path, name, a, shape)
    if (a_pass > n_pass[:, None]).any() or (a_fail > n_fail[:, None]).any():
        raise InputError(f"{path}: active counts must not exceed the input counts of their class")
    return a_pass, a_fail, n_pass, n_fail


def _read_classes(path: Path, arrays: dict[str, np.ndarray], rows: int) -> tuple[int, ...] | None:
    """The rows' classes: None (row c is class c), ``(POOLED,)`` or distinct class ids."""
    if "classes" not in arrays:
        return None
    a = arrays["classes"]
    if a.dtype.kind not in "iu" or a.shape != (rows,):
        raise InputError(f"{path}: classes must be integers of shape [{rows}] (one per row); got {a.dtype} {a.shape}")  # fmt: skip
    ids = tuple(int(c) for c in a)
    if ids == (POOLED,):
        return ids
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise InputError(f"{path}: classes must be distinct class ids >= 0, or [-1] for pooled-only; got {list(ids)[:20]}")  # fmt: skip
    return ids


def _read_attribution(
    path: Path, arrays: dict[str, np.ndarray], counts: tuple[np.ndarray, ...]
) -> Attribution | None:
    """The attribution sums, or None for a count-only file."""
    present = [f for f in ATTRIBUTION_FIELDS if f"attribution_{f}" in arrays]
    if not present:
        return None
    if len(present) != len(ATTRIBUTION_FIELDS):
        raise InputError(
            f"{path}: attribution sums must be whole: expected {list(ATTRIBUTION_FIELDS)}, "
            f"got {present}"
        )
    _, _, n_pass, n_fail = counts
    shape = counts[0].shape
    parts = {}
    for field in ATTRIBUTION_FIELDS:
        key, a = f"attribution_{field}", arrays[f"attribution_{field}"]
        if field in ("fixes", "breaks"):
            _check_counts(path, key, a, shape)
            limit = n_fail if field == "fixes" else n_pass
            if (a > limit[:, None]).any():
                which = "failing" if field == "fixes" else "passing"
                raise InputError(f"{path}: {key} must not exceed the {which} inputs of their class")
            parts[field] = jnp.asarray(a, jnp.int32)
        else:
            parts[field] = jnp.asarray(_float_sums(path, key, a, shape))
    linearised = arrays.get("attribution_linearised", np.str_("margin"))
    if linearised.ndim != 0 or str(linearised) not in LINEARISED:
        raise InputError(
            f"{path}: attribution_linearised must be one of {', '.join(LINEARISED)}; "
            f"got {str(linearised)!r}"
        )
    return Attribution(**parts, linearised=str(linearised))


def _float_sums(path: Path, key: str, a: np.ndarray, shape: tuple) -> np.ndarray:
    """A float sum array as finite float32 of ``shape``."""
    if a.dtype.kind != "f" or a.shape != shape:
        raise InputError(f"{path}: {key} must be float of shape {shape}; got {a.dtype} {a.shape}")
    bad = int(np.sum(~np.isfinite(a)))
    if bad:
        raise InputError(f"{path}: {key} must be finite; got {bad} NaN or infinite values")
    with np.errstate(over="ignore"):
        single = a.astype(np.float32)
    bad = int(np.sum(~np.isfinite(single)))
    if bad:
        raise InputError(
            f"{path}: {key} must be finite in float32; got {bad} values beyond float32's range"
        )
    return single


_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip


def _read_metadata(path: Path, arrays: dict[str, np.ndarray]) -> dict:
    text = arrays.get("metadata", np.str_("{}"))
    if text.ndim != 0 or text.dtype.kind != "U":
        raise InputError(
            f"{path}: metadata must be a JSON string; got {text.dtype} of shape {text.shape}"
        )
    try:
        meta = json.loads(str(text))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: metadata must be JSON ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(
            f"{path}: metadata must be a JSON object; got {_JSON_TYPES.get(type(meta), 'a value')}"
        )
    return meta
