"""Spectra per confusion pair: which neurons go with inputs of class ``t`` predicted as ``p``.

DeepFault's spectra split inputs by their true class only. A fault that moves
inputs of one class to one other class shows most clearly among exactly those
inputs (Duran et al., ISSRE 2021, "What to blame?"). For each confusion pair
``(t, p)``, ``t != p``, with at least ``min_failures`` failing inputs, the
failing inputs are those of class ``t`` predicted ``p`` and the passing inputs
those of class ``t`` predicted right:

* for a count measure, the four counts over those inputs (active means value
  ``> threshold``) and the measure of them;
* for ``gradxact``, the mean over the pair's failing inputs of
  ``a * d loss / d a`` (the first-order loss drop of zeroing the neuron).

A neuron's pooled score comes from its best rank over the pairs (the middle
of a tie; pairs whose scores are all equal carry no evidence and are left
out): ``score = -best rank``, so that a neuron first in some pair scores
highest.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax import measures
from deepfault_jax.data import iterate_batches
from deepfault_jax.errors import InputError, check_finite, check_int
from deepfault_jax.localize import middle_ranks
from deepfault_jax.probe import Probe
from deepfault_jax.spectrum import Counts

__all__ = ["confusion_scores", "per_input_values"]


@functools.partial(jax.jit, static_argnames=("probe",))
def _batch(params, x, y, *, probe: Probe):
    def loss(gates):
        logits, acts = probe.gated(params, x, gates)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)), (logits, acts)

    gates = probe.ones(x.shape[0])
    grads, (logits, acts) = jax.grad(loss, has_aux=True)(gates)
    names = probe.index.layer_names
    act = jnp.concatenate([acts[n] for n in names], axis=-1)
    gxa = jnp.concatenate([grads[n] for n in names], axis=-1)
    return jnp.argmax(logits, axis=-1), act, gxa


def per_input_values(
    probe: Probe, params: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input: the predicted class ``int[n]``, every neuron's value ``float32[n, neurons]``
    and ``a * d loss / d a`` (the gradient of its own cross-entropy with respect to a gate
    on the neuron, at 1) ``float32[n, neurons]``. One forward and one backward pass."""
    probe.require_gates("per-input attribution")
    preds, acts, gxas = [], [], []
    for batch in iterate_batches(x, y, batch_size=batch_size):
        p, a, g = _batch(params, batch.x, batch.y, probe=probe)
        keep = np.asarray(batch.mask, bool)
        preds.append(np.asarray(p)[keep])
        acts.append(np.asarray(a)[keep])
        gxas.append(np.asarray(g)[keep])
    return np.concatenate(preds), np.concatenate(acts), np.concatenate(gxas)


def confusion_scores(
    predicted: np.ndarray,
    values: np.ndarray,
    gxa: np.ndarray,
    y: np.ndarray,
    *,
    measure: str = "gradxact",
    threshold: float = 0.0,
    min_failures: int = 3,
) -> np.ndarray:
    """``float32[neurons]``: minus each neuron's best rank over the confusion pairs (see the
    module docstring); 0 for every neuron when no pair has ``min_failures`` failing inputs."""
    threshold = check_finite("threshold", threshold)
    min_failures = check_int("min_failures", min_failures, lo=1)
    if measure != "gradxact" and measures.measure_kind(measure) != "counts":
        raise InputError(f"confusion pairs take a count measure or 'gradxact'; got {measure!r}")
    fn = None if measure == "gradxact" else measures.get_measure(measure)
    y = np.asarray(y)
    right = predicted == y
    active = (values > threshold).astype(np.float64)
    best = None
    for t, p in sorted(
        {(int(a), int(b)) for a, b in zip(y[~right], predicted[~right], strict=True)}
    ):
        fail = (y == t) & (predicted == p)
        if fail.sum() < min_failures:
            continue
        if fn is None:
            score = gxa[fail].astype(np.float64).mean(axis=0)
        else:
            passing = (y == t) & right
            a_f, a_s = active[fail].sum(0), active[passing].sum(0)
            counts = Counts(a_s, a_f, passing.sum() - a_s, fail.sum() - a_f)
            score = np.asarray(fn(counts), np.float64)
        if np.ptp(score) == 0:
            continue
        ranks = middle_ranks(score)
        best = ranks if best is None else np.minimum(best, ranks)
    if best is None:
        return np.zeros(values.shape[1], np.float32)
    return (-best).astype(np.float32)
