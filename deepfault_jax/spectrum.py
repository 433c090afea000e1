"""Hit spectra: per class and neuron, how often a neuron was active on passing and failing inputs.

For true class ``c`` and neuron ``n`` (DESIGN section 2):

* ``a_pass[c, n]``: inputs of class c, classified correctly, with ``value > threshold``;
* ``a_fail[c, n]``: inputs of class c, misclassified, with ``value > threshold``;
* ``n_pass[c]``, ``n_fail[c]``: all correctly / wrongly classified inputs of class c.

The paper's four counts follow: A_s = a_pass, A_f = a_fail, N_s = n_pass - a_pass,
N_f = n_fail - a_fail. A neuron whose value equals the threshold is inactive.

Modules of the spectrum engine, in the order data flows:

* :mod:`deepfault_jax.kernels`: one batch's counts (the jitted body);
* :mod:`deepfault_jax.attribution`: attribution sums of one batch (types and the gated VJP);
* this module: the :class:`Spectrum` and :class:`Counts` types, pure init / update / merge;
* :mod:`deepfault_jax.streaming`: a mesh, accumulation over batches, whole data sets, resume;
* :mod:`deepfault_jax.spectrum_io`: the ``.npz`` file format;
* :mod:`deepfault_jax.metrics`: :class:`~deepfault_jax.metrics.SpectrumMetric` for NNX loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from deepfault_jax.attribution import (
    ATTRIBUTION_FIELDS,
    Attribution,
    AttributionSums,
    attribution_mode,
    zero_attribution,
)
from deepfault_jax.errors import InputError, check_finite, check_int
from deepfault_jax.kernels import POOLED, batch_counts, row_map
from deepfault_jax.probe import NeuronIndex

__all__ = [
    "POOLED",
    "Counts",
    "MAX_COUNT",
    "Spectrum",
    "add_to_spectrum",
    "check_same_attribution",
    "check_same_layout",
    "describe_attribution",
    "init_spectrum",
    "layer_summary",
    "merge_spectra",
    "update_spectrum",
]

MAX_COUNT = 2**31 - 1


class Counts(NamedTuple):
    """The paper's four counts of a set of neurons (``[neurons]`` or ``[classes, neurons]``).

    Attributes:
      a_s: active on passing (correctly classified) inputs.
      a_f: active on failing (misclassified) inputs.
      n_s: not active on passing inputs.
      n_f: not active on failing inputs.
    """

    a_s: jax.Array
    a_f: jax.Array
    n_s: jax.Array
    n_f: jax.Array


@struct.dataclass
class Spectrum:
    """The all-class hit spectrum of a set of neurons: a pytree of int32 counts, and
    optionally the :class:`Attribution` sums of the same inputs.

    Attributes:
      a_pass: ``int32[classes, neurons]``, active on correctly classified inputs of each class.
      a_fail: ``int32[classes, neurons]``, active on misclassified inputs of each class.
      n_pass: ``int32[classes]``, correctly classified inputs of each class.
      n_fail: ``int32[classes]``, misclassified inputs of each class.
      index: the neuron layout (static).
      threshold: a neuron is active when its value is ``> threshold`` (static).
      attribution: the :class:`Attribution` sums of the same inputs, or None
        (a count-only spectrum).
      classes: the true classes of the rows (static): None for every class of
        the model in order (row c is class c); a tuple of class ids for a class
        subset (inputs of other classes are not counted); ``(POOLED,)`` for one
        row counting every class together (pooled-only: per-class counts are not
        kept, for very large neuron counts).

    Example:
      >>> s = init_spectrum(NeuronIndex(("dense_0",), (4,)), num_classes=3)
      >>> s.pooled().a_s.shape
      (4,)
    """

    a_pass: jax.Array
    a_fail: jax.Array
    n_pass: jax.Array
    n_fail: jax.Array
    index: NeuronIndex = struct.field(pytree_node=False)
    threshold: float = struct.field(pytree_node=False, default=0.0)
    attribution: Attribution | None = None
    classes: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def num_classes(self) -> int:
        """Number of rows: the classes, or the class subset, or 1 when pooled-only."""
        return int(self.n_pass.shape[0])

    @property
    def pooled_only(self) -> bool:
        """True when every class is counted in one row (no per-class counts)."""
        return self.classes == (POOLED,)

    @property
    def class_ids(self) -> tuple[int, ...]:
        """The true class of each row (``(POOLED,)`` for a pooled-only spectrum)."""
        return tuple(range(self.num_classes)) if self.classes is None else self.classes

    def row_of(self, c: int) -> int:
        """The row holding class ``c``.

        Raises:
          InputError: ``c`` is not one of the spectrum's classes (the classes are
            named), or the spectrum is pooled-only.
        """
        if self.pooled_only:
            raise InputError(
                f"class {c}: this spectrum was counted pooled-only (every class in one row); "
                "expected a spectrum with per-class rows"
            )
        if self.classes is None:
            if not 0 <= int(c) < self.num_classes:
                raise InputError(f"class must lie in [0, {self.num_classes}); got {c}")
            return int(c)
        if int(c) not in self.classes:
            shown = list(self.classes[:20]) + (["..."] if len(self.classes) > 20 else [])
            raise InputError(f"class must be one of the spectrum's classes {shown}; got {c}")
        return self.classes.index(int(c))

    @property
    def num_inputs(self) -> int:
        """Number of inputs counted."""
        return int(
            np.sum(np.asarray(self.n_pass), dtype=np.int64)
            + np.sum(np.asarray(self.n_fail), dtype=np.int64)
        )

    def counts(self) -> Counts:
        """The four counts per class, each ``int32[classes, neurons]``."""
        return Counts(
            self.a_pass,
            self.a_fail,
            self.n_pass[:, None] - self.a_pass,
            self.n_fail[:, None] - self.a_fail,
        )

    def for_class(self, c: int) -> Counts:
        """The four counts of inputs whose true class is ``c``, each ``int32[neurons]``."""
        row = self.row_of(c)
        return Counts(*(a[row] for a in self.counts()))

    def pooled(self) -> Counts:
        """The four counts over all classes together, each ``int32[neurons]``."""
        return Counts(*(jnp.sum(a, axis=0) for a in self.counts()))

    def attribution_sums(self, *, pooled: bool = False) -> AttributionSums:
        """The attribution sums per class (``[classes, neurons]``) or over all classes (``[neurons]``).

        Raises:
          ValueError: the spectrum was computed without ``attribution=True``.
        """
        if self.attribution is None:
            raise InputError(
                "attribution measures need attribution sums: compute the spectrum with "
                "attribution=True (CLI: --attribution); got a count-only spectrum"
            )
        sums = [getattr(self.attribution, f) for f in ATTRIBUTION_FIELDS]
        n_pass, n_fail = self.n_pass[:, None], self.n_fail[:, None]
        if pooled:
            sums = [jnp.sum(a, axis=0) for a in sums]
            n_pass, n_fail = jnp.sum(n_pass, axis=0), jnp.sum(n_fail, axis=0)
        return AttributionSums(*sums, n_pass, n_fail)

    def layer(self, name: str) -> Spectrum:
        """The spectrum restricted to one layer's neurons."""
        cols = self.index.layer_slice(name)
        attribution = None
        if self.attribution is not None:
            attribution = jax.tree.map(lambda a: a[:, cols], self.attribution)
        return Spectrum(
            self.a_pass[:, cols],
            self.a_fail[:, cols],
            self.n_pass,
            self.n_fail,
            NeuronIndex((name,), (self.index.layer_sizes[self.index.layer_names.index(name)],)),
            self.threshold,
            attribution,
            self.classes,
        )


def init_spectrum(
    index: NeuronIndex,
    *,
    num_classes: int,
    threshold: float = 0.0,
    attribution: bool | str = False,
    classes: Sequence[int] | str | None = None,
) -> Spectrum:
    """An all-zero spectrum for ``index`` and ``num_classes`` classes.

    Args:
      index: the neuron layout.
      num_classes: the model's classes, an integer >= 2.
      threshold: active means ``> threshold``; a finite number.
      attribution: False for counts only; True (``"margin"``) or
        ``"all-classes"`` for zero :class:`Attribution` sums of that kind.
      classes: None for a row per class; ``"pooled"`` for one row of every
        class together (pooled-only); or distinct class ids in
        ``[0, num_classes)`` for a row each (a class subset). Memory is
        2 x rows x neurons x 4 bytes of counts (x4 with attribution sums).

    Returns:
      The spectrum.

    Raises:
      InputError: ``num_classes`` is not an integer >= 2, ``threshold`` is
        not a finite number (a NaN threshold would count no neuron active),
        or ``attribution`` names no mode.
    """
    mode = attribution_mode(attribution)
    c, n = check_int("num_classes", num_classes), index.num_neurons
    if c < 2:
        raise InputError(f"num_classes must be >= 2; got {num_classes}")
    threshold = check_finite("threshold", threshold)
    rows = check_classes(classes, c)
    r = c if rows is None else len(rows)
    return Spectrum(
        jnp.zeros((r, n), jnp.int32),
        jnp.zeros((r, n), jnp.int32),
        jnp.zeros((r,), jnp.int32),
        jnp.zeros((r,), jnp.int32),
        index,
        threshold,
        zero_attribution(r, n, mode) if mode else None,
        rows,
    )


def check_classes(classes: Any, num_classes: int) -> tuple[int, ...] | None:
    """``classes`` of :func:`init_spectrum` as a :class:`Spectrum`'s static ``classes``.

    Raises:
      InputError: not None, ``"pooled"`` or a non-empty sequence of distinct
        integers in ``[0, num_classes)``.
    """
    if classes is None:
        return None
    if isinstance(classes, str):
        if classes != "pooled":
            raise InputError(f"classes must be 'pooled' or a list of class ids; got {classes!r}")
        return (POOLED,)
    try:
        ids = [check_int("classes", c) for c in classes]
    except TypeError:
        raise InputError(
            f"classes must be 'pooled' or a list of class ids; got {classes!r}"
        ) from None
    outside = [c for c in ids if not 0 <= c < num_classes]
    if outside:
        raise InputError(
            f"classes must lie in [0, {num_classes}) (the model's classes); got {outside}"
        )
    if not ids:
        raise InputError("classes must name at least one class; got none")
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise InputError(f"classes must be distinct; got {dup} more than once")
    return tuple(ids)


def add_to_spectrum(spectrum: Spectrum, counts, attribution: Attribution | None = None) -> Spectrum:
    a_pass, a_fail, n_pass, n_fail = counts
    if attribution is not None:
        attribution = jax.tree.map(jnp.add, spectrum.attribution, attribution)
    return spectrum.replace(
        a_pass=spectrum.a_pass + a_pass,
        a_fail=spectrum.a_fail + a_fail,
        n_pass=spectrum.n_pass + n_pass,
        n_fail=spectrum.n_fail + n_fail,
        attribution=attribution if attribution is not None else spectrum.attribution,
    )


def _layer_list(spectrum: Spectrum, activations) -> jax.Array | list[jax.Array]:
    if isinstance(activations, Mapping):
        return [activations[name] for name in spectrum.index.layer_names]
    return activations


def update_spectrum(
    spectrum: Spectrum,
    logits: jax.Array,
    activations: jax.Array | Mapping[str, jax.Array],
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> Spectrum:
    """Adds one batch to ``spectrum``; pure and jit-able.

    Args:
      spectrum: the running spectrum.
      logits: ``float[batch, classes]``.
      activations: ``float[batch, neurons]`` in neuron-id order, or a probe's
        mapping layer -> ``[batch, units]``.
      labels: ``int[batch]`` true classes.
      mask: optional ``bool[batch]``; False rows (padding) are not counted.

    Returns:
      The new spectrum.
    """
    if spectrum.attribution is not None:
        raise InputError(
            "update adds counts only, and this spectrum carries attribution sums that would no "
            "longer cover its inputs; expected a count-only spectrum (use accumulate_spectrum or "
            "compute_spectrum with attribution=True to add inputs to one with sums)"
        )
    acts = _layer_list(spectrum, activations)
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    rows = row_map(logits.shape[-1], spectrum.classes)
    return add_to_spectrum(
        spectrum, batch_counts(logits, acts, labels, mask, threshold=spectrum.threshold, rows=rows)
    )


def merge_spectra(a: Spectrum, b: Spectrum) -> Spectrum:
    """The spectrum of the union of two disjoint data sets.

    Raises:
      ValueError: the spectra have another layout (layers, sizes), number of
        classes or threshold.
    """
    check_same_layout(a, b, "merge")
    check_same_attribution(a, b, "merge")
    return add_to_spectrum(a, (b.a_pass, b.a_fail, b.n_pass, b.n_fail), b.attribution)


def check_same_layout(a: Spectrum, b: Spectrum, what: str) -> None:
    if a.index != b.index:
        raise InputError(
            f"cannot {what} spectra of different layouts: expected layers "
            f"{list(zip(a.index.layer_names, a.index.layer_sizes, strict=True))}, got "
            f"{list(zip(b.index.layer_names, b.index.layer_sizes, strict=True))}"
        )
    if a.classes != b.classes:
        raise InputError(
            f"cannot {what} spectra: expected rows of {_rows_name(a)}, got {_rows_name(b)}"
        )
    if a.num_classes != b.num_classes:
        raise InputError(
            f"cannot {what} spectra: expected {a.num_classes} classes, got {b.num_classes}"
        )
    if a.threshold != b.threshold:
        raise InputError(
            f"cannot {what} spectra: expected threshold {a.threshold}, got {b.threshold}"
        )


def _rows_name(s: Spectrum) -> str:
    if s.classes is None:
        return "every class"
    return "every class pooled" if s.pooled_only else f"classes {list(s.classes)}"


def describe_attribution(s: Spectrum) -> str:
    if s.attribution is None:
        return "without attribution sums"
    return f"with {s.attribution.linearised!r} attribution sums"


def check_same_attribution(a: Spectrum, b: Spectrum, what: str) -> None:
    if describe_attribution(a) != describe_attribution(b):
        raise InputError(
            f"cannot {what}: expected a spectrum {describe_attribution(a)}, got one {describe_attribution(b)}"
        )


def layer_summary(spectrum: Spectrum) -> list[dict]:
    """Per layer: neurons, and the share of (input, neuron) pairs active on failing and on passing inputs.

    Returns:
      ``[{"layer", "neurons", "active_share_fail", "active_share_pass"}]``;
      a share is None when there is no failing (or passing) input.
    """
    a_pass = np.asarray(spectrum.a_pass, np.int64).sum(axis=0)
    a_fail = np.asarray(spectrum.a_fail, np.int64).sum(axis=0)
    n_pass = int(np.asarray(spectrum.n_pass, np.int64).sum())
    n_fail = int(np.asarray(spectrum.n_fail, np.int64).sum())
    rows = []
    for name, size in zip(spectrum.index.layer_names, spectrum.index.layer_sizes, strict=True):
        cols = spectrum.index.layer_slice(name)
        rows.append(
            {
                "layer": name,
                "neurons": size,
                "active_share_fail": float(a_fail[cols].sum() / (n_fail * size))
                if n_fail
                else None,
                "active_share_pass": float(a_pass[cols].sum() / (n_pass * size))
                if n_pass
                else None,
            }
        )
    return rows
