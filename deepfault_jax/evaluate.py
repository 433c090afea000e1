"""Measurements of synthesized inputs against their originals (the paper's research questions).

For a batch of originals ``x0`` (true classes ``y``), synthesized inputs ``x``
and the suspicious set of each input:

* how adversarial: misclassification rate of ``x``, mean cross-entropy loss and
  accuracy (what the original logged);
* how close: mean L1, L2 and L-inf distance between ``x`` and ``x0`` (and the
  largest L-inf);
* whether the suspicious neurons were exercised: over (input, suspicious
  neuron) pairs, the share whose value rose, the mean rise, and the share that
  went from inactive (value <= threshold) to active.

:func:`summarize_repeats` gives mean and spread over several random baselines.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax.errors import InputError, check_finite
from deepfault_jax.probe import Probe
from deepfault_jax.synthesis import check_inputs, check_labels, check_table

__all__ = ["evaluate_synthesis", "summarize_repeats"]


def _metrics(probe: Probe, params: Any, x0, x, y, sets, threshold):
    logits, flat = probe.flat(params, x)
    logits0, flat0 = probe.flat(params, x0)
    pred = jnp.argmax(logits, axis=-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    diff = (x - x0).reshape(x.shape[0], -1)
    before = jnp.take_along_axis(flat0, sets, axis=1)
    after = jnp.take_along_axis(flat, sets, axis=1)
    return {
        "pred": pred,
        "pred0": jnp.argmax(logits0, axis=-1),
        "loss": loss,
        "l1": jnp.sum(jnp.abs(diff), axis=1),
        "l2": jnp.sqrt(jnp.sum(diff * diff, axis=1)),
        "linf": jnp.max(jnp.abs(diff), axis=1),
        "rose": after > before,
        "rise": after - before,
        "activated": (before <= threshold) & (after > threshold),
        "inactive_before": before <= threshold,
    }


_metrics_jit = jax.jit(_metrics, static_argnames=("probe",))


def evaluate_synthesis(
    probe: Probe,
    params: Any,
    x0: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    table: np.ndarray,
    *,
    threshold: float = 0.0,
) -> dict:
    """Measures synthesized inputs ``x`` against originals ``x0``.

    Args:
      probe: the probe the suspicious sets index (its values are compared).
      params: the model's parameters.
      x0: ``float32[n, ...]`` originals.
      x: ``float32[n, ...]`` synthesized inputs.
      y: ``int[n]`` true classes.
      table: ``int[classes, k]`` suspicious sets; input i used ``table[y[i]]``.
      threshold: activity threshold of the spectrum (finite).

    Raises:
      InputError: arrays that do not describe the same inputs of the probe's
        model (``x0`` and ``x`` ``[n, *probe.input_shape]``, ``y`` ``int[n]`` in
        ``[0, classes)``), no input, a table that is not ``int[classes, k]``
        with ids in ``[0, neurons)`` (see :func:`~deepfault_jax.synthesis.check_table`),
        or a threshold that is not finite.

    Returns:
      JSON-ready ``{"inputs", "misclassification_rate", "accuracy", "loss",
      "l1", "l2", "linf", "linf_max", "activation_rose", "activation_mean_rise",
      "became_active", "became_active_of_inactive", "original_accuracy"}`` and
      ``"predictions"`` (a list).
    """
    x0, x, y = np.asarray(x0, np.float32), np.asarray(x, np.float32), np.asarray(y)
    if x0.shape != x.shape:
        raise InputError(
            f"x0, x and y must describe the same inputs; got shapes {x0.shape}, {x.shape}, {y.shape}"
        )
    check_labels(probe, y, batch=check_inputs(probe, x0, name="x0"), name="y")
    if len(y) == 0:
        raise InputError("there is nothing to evaluate: got 0 inputs")
    threshold = check_finite("threshold", threshold)
    sets = check_table(probe, table)[y]
    m = jax.device_get(_metrics_jit(probe, params, x0, x, y, sets, threshold))
    inactive = int(m["inactive_before"].sum())
    return {
        "inputs": int(len(y)),
        "original_accuracy": float(np.mean(m["pred0"] == y)),
        "misclassification_rate": float(np.mean(m["pred"] != y)),
        "accuracy": float(np.mean(m["pred"] == y)),
        "loss": float(np.mean(m["loss"])),
        "l1": float(np.mean(m["l1"])),
        "l2": float(np.mean(m["l2"])),
        "linf": float(np.mean(m["linf"])),
        "linf_max": float(np.max(m["linf"])),
        "activation_rose": float(np.mean(m["rose"])),
        "activation_mean_rise": float(np.mean(m["rise"])),
        "became_active": float(np.mean(m["activated"])),
        "became_active_of_inactive": float(m["activated"].sum() / inactive) if inactive else None,
        "predictions": [int(p) for p in m["pred"]],
    }


def summarize_repeats(results: list[dict]) -> dict:
    """Mean and standard deviation of each number over repeated evaluations (random baselines).

    Returns:
      ``{metric: {"mean", "std", "values"}}`` for every numeric metric.
    """
    out = {}
    for key, value in results[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in results if r[key] is not None]
            out[key] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values)) if values else None,
                "values": values,
            }
    return out
