"""The spectrum file format (``.npz``): save, load and validate."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from deepfault_jax.attribution import ATTRIBUTION_FIELDS, LINEARISED, Attribution
from deepfault_jax.errors import InputError
from deepfault_jax.files import write_atomic
from deepfault_jax.probe import NeuronIndex
from deepfault_jax.spectrum import Spectrum

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
    if spectrum.attribution is not None:
        arrays["attribution_linearised"] = np.str_(spectrum.attribution.linearised)
        for field in ATTRIBUTION_FIELDS:
            dtype = np.int32 if field in ("fixes", "breaks") else np.float32
            arrays[f"attribution_{field}"] = np.asarray(getattr(spectrum.attribution, field), dtype)
    _atomic_savez(path, arrays)
    return path


def load_spectrum(path: str | os.PathLike, *, with_metadata: bool = False):
    """Reads a spectrum written by :func:`save_spectrum`, checking it is whole and consistent.

    Returns:
      The :class:`Spectrum`, or ``(spectrum, metadata)`` with ``with_metadata=True``.

    Raises:
      ValueError: a missing, unreadable, truncated or inconsistent file (the
        message names what was expected and what was found).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spectrum file must exist; got {str(path)!r}, which is not a file")
    required = ("a_pass", "a_fail", "n_pass", "n_fail", "layer_names", "layer_sizes", "threshold")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in required if k not in f.files]
            if missing:
                raise InputError(
                    f"{path}: not a spectrum file: missing {missing}, got {sorted(f.files)}"
                )
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise InputError(f"{path}: not a readable spectrum file ({e})") from None
    except Exception as e:  # zipfile, zlib and OS errors from a damaged file
        raise InputError(
            f"{path}: not a readable spectrum file ({type(e).__name__}: {e})"
        ) from None
    fmt = str(arrays.get("format", SPECTRUM_FORMAT))
    if fmt != SPECTRUM_FORMAT:
        raise InputError(f"{path}: format must be {SPECTRUM_FORMAT!r}; got {fmt!r}")
    index = NeuronIndex(
        tuple(str(s) for s in arrays["layer_names"]), tuple(int(s) for s in arrays["layer_sizes"])
    )
    a_pass, a_fail, n_pass, n_fail = (arrays[k] for k in ("a_pass", "a_fail", "n_pass", "n_fail"))
    c, n = n_pass.shape[0] if n_pass.ndim == 1 else -1, index.num_neurons
    for name, a, shape in (
        ("a_pass", a_pass, (c, n)),
        ("a_fail", a_fail, (c, n)),
        ("n_fail", n_fail, (c,)),
    ):
        if a.shape != shape or not np.issubdtype(a.dtype, np.integer):
            raise InputError(
                f"{path}: {name} must be integer of shape {shape}; got {a.dtype} {a.shape}"
            )
    if not np.issubdtype(n_pass.dtype, np.integer) or c < 2:
        raise InputError(
            f"{path}: n_pass must be integer of shape [classes >= 2]; got {n_pass.dtype} {n_pass.shape}"
        )
    if min(a.min() for a in (a_pass, a_fail, n_pass, n_fail)) < 0:
        raise InputError(f"{path}: counts must be >= 0; got a negative count")
    if (a_pass > n_pass[:, None]).any() or (a_fail > n_fail[:, None]).any():
        raise InputError(f"{path}: active counts must not exceed the input counts of their class")
    try:
        meta = json.loads(str(arrays.get("metadata", "{}")))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: metadata must be JSON ({e})") from None
    present = [f for f in ATTRIBUTION_FIELDS if f"attribution_{f}" in arrays]
    attribution = None
    if present:
        if len(present) != len(ATTRIBUTION_FIELDS):
            raise InputError(
                f"{path}: attribution sums must be whole: expected {list(ATTRIBUTION_FIELDS)}, "
                f"got {present}"
            )
        parts = {}
        for field in ATTRIBUTION_FIELDS:
            a = arrays[f"attribution_{field}"]
            integer = field in ("fixes", "breaks")
            kind_ok = np.issubdtype(a.dtype, np.integer if integer else np.floating)
            if a.shape != (c, n) or not kind_ok:
                raise InputError(
                    f"{path}: attribution_{field} must be {'integer' if integer else 'float'} of "
                    f"shape {(c, n)}; got {a.dtype} {a.shape}"
                )
            parts[field] = jnp.asarray(a, jnp.int32 if integer else jnp.float32)
        linearised = str(arrays.get("attribution_linearised", "margin"))
        if linearised not in LINEARISED:
            raise InputError(
                f"{path}: attribution_linearised must be one of {', '.join(LINEARISED)}; "
                f"got {linearised!r}"
            )
        attribution = Attribution(**parts, linearised=linearised)
    spectrum = Spectrum(
        *(jnp.asarray(a, jnp.int32) for a in (a_pass, a_fail, n_pass, n_fail)),
        index,
        float(arrays["threshold"]),
        attribution,
    )
    return (spectrum, meta) if with_metadata else spectrum
