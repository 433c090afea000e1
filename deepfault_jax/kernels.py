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
    "counts_and_nonfinite",
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
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The spectrum counts of one batch (the body of :func:`update_spectrum`).

    Args:
      logits: ``float[batch, classes]``.
      activations: ``float[batch, neurons]``, or one ``float[batch, units]``
        per layer in neuron-id order (faster: no concatenated copy).
      labels: ``int[batch]`` true classes.
      mask: ``bool[batch]``; False rows are not counted.
      threshold: active means ``> threshold``.

    Returns:
      ``(a_pass[classes, neurons], a_fail[classes, neurons], n_pass[classes],
      n_fail[classes])`` as int32.

    Raises:
      InputError: ``threshold`` is not a finite number.
    """
    counts, _ = counts_and_nonfinite(logits, activations, labels, mask, threshold)
    return counts


def counts_and_nonfinite(logits, activations, labels, mask, threshold):
    """:func:`batch_counts`, and the number of non-finite values seen (logits of
    counted rows, activations of any row), found at the cost of small arrays.

    Raises:
      InputError: a concrete ``threshold`` that is not a finite number (no
        value is ``> nan``: every neuron would count as inactive).
    """
    if not isinstance(threshold, jax.core.Tracer):
        check_finite("threshold", threshold)
    num_classes = logits.shape[-1]
    parts = [activations] if isinstance(activations, jax.Array | np.ndarray) else list(activations)
    weights, _ = slot_weights(logits, labels, mask)
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
    split = (counts[:num_classes], counts[num_classes:], totals[:num_classes], totals[num_classes:])
    return split, nonfinite


exact_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def slot_weights(logits, labels, mask):
    """``float32[batch, 2 * classes]`` one-hot rows (its class's pass slot, or its
    class's fail slot; none for padding) and ``bool[batch]`` correct."""
    num_classes = logits.shape[-1]
    correct = predicts(logits, labels)
    # each row goes to one of 2C slots: its class's pass row, its class's fail
    # row, or (padding) slot 2C, which no output reads
    slot = jnp.where(mask, labels + num_classes * (~correct).astype(labels.dtype), 2 * num_classes)
    weights = (slot[:, None] == jnp.arange(2 * num_classes)[None, :]).astype(jnp.float32)
    return weights, correct


def predicts(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``argmax(logits, -1) == labels`` (first maximum wins), without a variadic reduction.

    A label is the argmax when no logit is larger and no earlier logit is equal.
    """
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    earlier = jnp.arange(logits.shape[-1])[None, :] < labels[:, None]
    beaten = (logits > own) | ((logits == own) & earlier)
    return ~jnp.any(beaten, axis=-1)
