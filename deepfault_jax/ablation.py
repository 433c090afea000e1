"""Exact single-neuron ablation: the reference localizer for small models.

Every neuron is zeroed in turn through the probe's gates (vmapped over chunks of
neurons under jit), counting per true class the failing inputs it fixes, the
passing inputs it breaks and the change of the cross-entropy loss;
:func:`ablation_scores` ranks neurons by it. Cost: one forward pass per neuron
and input.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax.data import iterate_batches
from deepfault_jax.errors import InputError, InputTypeError, check_finite
from deepfault_jax.probe import NeuronIndex, Probe

__all__ = ["ABLATION_SCORES", "Ablation", "ablation_scores", "checked_inputs", "exact_ablation"]

#: What :func:`ablation_scores` can rank by.
ABLATION_SCORES = ("fixes-breaks", "loss")


class Ablation(NamedTuple):
    """What zeroing each neuron does, per true class (``[classes, neurons]``).

    Attributes:
      fixes: int32, failing inputs of the class that become correct.
      breaks: int32, passing inputs of the class that become wrong.
      loss_drop: float32, sum over the class's inputs of the cross-entropy
        loss before minus after (positive: the model is better without the neuron).
      n_inputs: int32 ``[classes]``, inputs of each class.
      index: the neuron layout.
    """

    fixes: np.ndarray
    breaks: np.ndarray
    loss_drop: np.ndarray
    n_inputs: np.ndarray
    index: NeuronIndex


@functools.partial(jax.jit, static_argnames=("probe",))
def _logits(params, x, *, probe: Probe):
    return probe(params, x)[0]


@functools.partial(jax.jit, static_argnames=("probe",))
def _ablate_chunk(params, x, y, mask, base, ids, gain, *, probe: Probe):
    """For neuron ``ids[j]`` (-1: none) with its output times ``gain``, per class: fixes,
    breaks and loss drop ``[chunk, classes]``; ``base`` holds the batch's logits of the
    model as it is."""
    num_classes = probe.num_classes
    base_right = jnp.argmax(base, axis=-1) == y
    base_loss = optax.softmax_cross_entropy_with_integer_labels(base, y)
    member = (jax.nn.one_hot(y, num_classes) * mask[:, None]).astype(jnp.float32)  # [B, C]
    offsets = probe.index.offsets

    def one(neuron):
        gates = {
            name: (1.0 - (1.0 - gain) * (jnp.arange(size) + offset == neuron))[None, :].astype(
                jnp.float32
            )
            for name, size, offset in zip(
                probe.index.layer_names, probe.index.layer_sizes, offsets, strict=True
            )
        }
        logits, _ = probe.gated(params, x, gates)
        right = jnp.argmax(logits, axis=-1) == y
        fixes = (right & ~base_right).astype(jnp.float32) @ member
        breaks = (~right & base_right).astype(jnp.float32) @ member
        drop = (base_loss - optax.softmax_cross_entropy_with_integer_labels(logits, y)) @ member
        return fixes, breaks, drop

    return jax.vmap(one)(ids)


def checked_inputs(probe: Probe, x, y) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32, finite) and ``y`` (integer labels of the probe's classes) as arrays."""
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.shape[1:] != probe.input_shape or len(x) != len(y) or not len(x):
        raise InputError(
            f"x must be [n >= 1, {', '.join(map(str, probe.input_shape))}] with one label each; "
            f"got x {list(x.shape)} and y {list(y.shape)}"
        )
    nonfinite = int(np.count_nonzero(~np.isfinite(x)))
    if nonfinite:
        raise InputError(f"x must be finite; got {nonfinite} NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputTypeError(f"labels must be integers; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= probe.num_classes:
        raise InputError(
            f"labels must lie in [0, {probe.num_classes}); got range [{y.min()}, {y.max()}]"
        )
    return x, y


def exact_ablation(
    probe: Probe,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    neurons: Sequence[int] | None = None,
    batch_size: int = 512,
    chunk: int = 16,
    gain: float = 0.0,
    progress: bool = False,
) -> Ablation:
    """Zeroes each neuron in turn and measures the effect on every input: the reference localizer.

    A neuron is zeroed through the probe's gates: its layer's output is set to
    0 for that unit (a conv channel at every position, unless
    ``conv_reduce="none"``), the rest of the model unchanged. With ``gain`` the
    output is multiplied by ``gain`` instead (0: zeroed; -1: negated, which
    undoes a sign flip of the neuron's incoming weights and bias; 2: doubled).
    The layer's output is its value before the activation (the gate sits
    between the layer and its activation). Costs one forward
    pass of the data per neuron; ``chunk`` neurons run together under
    ``vmap`` (memory grows with ``chunk * batch_size``).

    Args:
      probe: a probe with gates.
      params: the model's parameters.
      x: ``float32[n, *input_shape]`` inputs, finite (NaN or infinite values are refused).
      y: ``int[n]`` true classes.
      neurons: ids to ablate (default: all); the others are left 0.
      batch_size: inputs per step.
      chunk: neurons per step.
      gain: what each neuron's output is multiplied by in turn (finite; 1 changes nothing).
      progress: show a progress bar.

    Returns:
      An :class:`Ablation`.
    """
    from tqdm.auto import tqdm

    probe.require_gates("exact ablation")
    x, y = checked_inputs(probe, x, y)
    n = probe.index.num_neurons
    ids = np.arange(n) if neurons is None else np.unique(np.asarray(neurons, np.int64))
    if ids.size == 0 or ids.min() < 0 or ids.max() >= n:
        raise InputError(f"neurons must be ids in [0, {n}); got {list(np.asarray(neurons))[:8]}")
    for name, bad in (("batch_size", batch_size), ("chunk", chunk)):
        if int(bad) != bad or bad < 1:
            raise InputError(f"{name} must be a positive integer; got {bad!r}")
    gain = check_finite("gain", gain)
    c = probe.num_classes
    fixes, breaks = np.zeros((c, n), np.int64), np.zeros((c, n), np.int64)
    drop = np.zeros((c, n), np.float64)
    padded = np.concatenate([ids, -np.ones((-ids.size) % chunk, np.int64)]).reshape(-1, chunk)
    batches = list(iterate_batches(x, y, batch_size=batch_size))
    bar = tqdm(total=len(batches) * len(padded), desc="ablation", unit="step",
               disable=None if progress else True, leave=False)  # fmt: skip
    for batch in batches:
        base = _logits(params, batch.x, probe=probe)  # once per batch, for every chunk
        for group in padded:
            f, b, d = _ablate_chunk(params, batch.x, batch.y, batch.mask, base,
                                    jnp.asarray(group, jnp.int32), jnp.float32(gain), probe=probe)  # fmt: skip
            real = group >= 0
            fixes[:, group[real]] += np.asarray(f, np.int64)[real].T
            breaks[:, group[real]] += np.asarray(b, np.int64)[real].T
            drop[:, group[real]] += np.asarray(d, np.float64)[real].T
            bar.update()
    bar.close()
    counts = np.bincount(y, minlength=c).astype(np.int32)
    return Ablation(
        fixes.astype(np.int32), breaks.astype(np.int32), drop.astype(np.float32), counts,
        probe.index,
    )  # fmt: skip


def ablation_scores(
    ablation: Ablation, *, by: str = "fixes-breaks", pooled: bool = True
) -> np.ndarray:
    """Scores from an exact ablation: ``fixes - breaks`` or the mean loss drop.

    Args:
      ablation: from :func:`exact_ablation`.
      by: ``"fixes-breaks"`` (inputs repaired minus inputs broken) or
        ``"loss"`` (mean cross-entropy drop per input).
      pooled: over all classes (``[neurons]``) or per class (``[classes, neurons]``).
    """
    if by not in ABLATION_SCORES:
        raise InputError(f"by must be one of {', '.join(ABLATION_SCORES)}; got {by!r}")
    if by == "fixes-breaks":
        score = ablation.fixes.astype(np.float32) - ablation.breaks
        return score.sum(axis=0) if pooled else score
    if pooled:
        return (ablation.loss_drop.sum(axis=0) / max(int(ablation.n_inputs.sum()), 1)).astype(
            np.float32
        )
    return (ablation.loss_drop / np.maximum(ablation.n_inputs, 1)[:, None]).astype(np.float32)
