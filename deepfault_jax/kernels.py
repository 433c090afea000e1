"""The batch kernels of the hit spectrum: one batch's counts from its logits and neuron values.

One jitted pass computes every class at once (DESIGN 4.1): per batch,
``active = acts > threshold`` (``[B, N]``), ``pass = onehot(y) * correct`` and
``fail = onehot(y) * ~correct`` (``[B, C]``), then ``a_pass += pass.T @ active``
and ``a_fail += fail.T @ active``. The float32 matmul of 0/1 values is exact
below 2**24 rows per batch; counts accumulate in int32 and a run refuses to
start when a counter could pass 2**31 - 1. Memory is O(classes x neurons),
whatever the data size; the last batch is padded and masked, so one
compilation serves a run. Counts are integer sums, so any batch size, device
count, process count or resume point gives the same, bit-identical spectrum.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepfault_jax.errors import check_finite

__all__ = [
    "MAX_BATCH",
    "batch_counts",
    "POOLED",
    "counts_and_nonfinite",
    "row_map",
    "exact_dot",
    "predicts",
    "slot_weights",
]

MAX_BATCH = 2**24


def batch_counts(
    logits: jax.Array,
    activations: jax.Array | Sequence[jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    *,
    threshold: float,
    rows: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The spectrum counts of one batch (the body of :func:`update_spectrum`).

    Args:
      logits: ``float[batch, classes]``.
      activations: ``float[batch, neurons]``, or one ``float[batch, units]``
        per layer in neuron-id order (faster: no concatenated copy).
      labels: ``int[batch]`` true classes.
      mask: ``bool[batch]``; False rows are not counted.
      threshold: active means ``> threshold``.
      rows: each class's spectrum row (static; :func:`row_map`), None for row c = class c.

    Returns:
      ``(a_pass[classes, neurons], a_fail[classes, neurons], n_pass[classes],
      n_fail[classes])`` as int32.

    Raises:
      InputError: ``threshold`` is not a finite number.
    """
    counts, _ = counts_and_nonfinite(logits, activations, labels, mask, threshold, rows)
    return counts


def row_map(num_classes: int, classes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The spectrum row of each class (-1: not counted) for a spectrum's ``classes``
    (None: row c is class c; ``(POOLED,)``: every class in row 0; else the listed
    classes, in order)."""
    if classes is None:
        return None
    if classes == (POOLED,):
        return (0,) * num_classes
    rows = [-1] * num_classes
    for r, c in enumerate(classes):
        rows[c] = r
    return tuple(rows)


#: ``classes`` of a pooled-only spectrum: one row, every class counted in it.
POOLED = -1


def counts_and_nonfinite(logits, activations, labels, mask, threshold, rows=None):
    """:func:`batch_counts`, and the number of non-finite values seen (logits of
    counted rows, activations of any row), found at the cost of small arrays.

    Raises:
      InputError: a concrete ``threshold`` that is not a finite number (no
        value is ``> nan``: every neuron would count as inactive).
    """
    if not isinstance(threshold, jax.core.Tracer):
        check_finite("threshold", threshold)
    parts = [activations] if isinstance(activations, jax.Array | np.ndarray) else list(activations)
    weights, _ = slot_weights(logits, labels, mask, rows)
    num_rows = weights.shape[1] // 2
    # (a - a) is 0 for a finite value and NaN otherwise: a non-finite activation
    # turns its column of the small count matrix into NaN, where it is detected
    raw = jnp.concatenate(
        [exact_dot(weights.T, (a > threshold).astype(jnp.float32) + (a - a)) for a in parts],
        axis=-1,
    )
    finite = jnp.isfinite(raw)
    bad_logits = mask & ~jnp.isfinite(jnp.sum(logits, axis=-1))
    nonfinite = jnp.sum(~finite, dtype=jnp.int32) + jnp.sum(bad_logits, dtype=jnp.int32)
    counts = jnp.where(finite, raw, 0.0).astype(jnp.int32)
    totals = jnp.sum(weights, axis=0).astype(jnp.int32)
    split = (counts[:num_rows], counts[num_rows:], totals[:num_rows], totals[num_rows:])
    return split, nonfinite


exact_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def slot_weights(logits, labels, mask, rows: tuple[int, ...] | None = None):
    """``float32[batch, 2 * R]`` one-hot rows (its spectrum row's pass slot, or its
    row's fail slot; none for padding or a class that is not counted) and
    ``bool[batch]`` correct. ``rows`` (static, from :func:`row_map`) gives each
    class's row; None: R = classes, row c is class c."""
    num_classes = logits.shape[-1]
    correct = predicts(logits, labels)
    if rows is None:
        row, num_rows = labels, num_classes
    else:
        row = jnp.asarray(np.asarray(rows, np.int32))[labels].astype(labels.dtype)
        num_rows = max(rows) + 1
        mask = mask & (row >= 0)
    # each input goes to one of 2R slots: its row's pass slot, its row's fail
    # slot, or (padding, classes not counted) slot 2R, which no output reads
    slot = jnp.where(mask, row + num_rows * (~correct).astype(labels.dtype), 2 * num_rows)
    weights = (slot[:, None] == jnp.arange(2 * num_rows)[None, :]).astype(jnp.float32)
    return weights, correct


def predicts(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``argmax(logits, -1) == labels`` (first maximum wins), without a variadic reduction.

    A label is the argmax when no logit is larger and no earlier logit is equal.
    """
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    earlier = jnp.arange(logits.shape[-1])[None, :] < labels[:, None]
    beaten = (logits > own) | ((logits == own) & earlier)
    return ~jnp.any(beaten, axis=-1)
