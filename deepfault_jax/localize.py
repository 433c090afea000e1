"""Localization: suspicious neurons from a spectrum, the random baseline, rankings.

* :func:`scores` applies a measure to a spectrum, per class (``[classes,
  neurons]``) or pooled over classes (``[neurons]``).
* :func:`top_k` ranks deterministically: higher score first, ties broken by the
  lower neuron id; optionally only among allowed neurons (some layers).
* :func:`suspicious_neurons` combines the two: the paper's suspicious set.
* :func:`random_neurons` is the paper's baseline: k neurons drawn uniformly with
  a ``key`` from the same layers, excluding the neurons chosen by the measures
  it is compared with.
* :func:`ranking_table` and :func:`agreement` report and compare rankings.
* :func:`exact_ablation` is the reference localizer for small models: every
  neuron zeroed in turn (through the probe's gates, vmapped over chunks of
  neurons under jit), counting the failing inputs it fixes, the passing inputs
  it breaks and the change of the loss; :func:`ablation_scores` ranks by it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepfault_jax import measures
from deepfault_jax.data import iterate_batches
from deepfault_jax.probe import NeuronIndex, Probe
from deepfault_jax.spectrum import Counts, Spectrum

ArrayLikeScores = jax.Array | np.ndarray

__all__ = [
    "Ablation",
    "ablation_scores",
    "agreement",
    "exact_ablation",
    "allowed_neurons",
    "random_neurons",
    "ranking_table",
    "scores",
    "suspicious_neurons",
    "top_k",
]


def scores(
    spectrum: Spectrum,
    measure: str | measures.Measure,
    *,
    pooled: bool = False,
    **params: float,
) -> jax.Array:
    """Suspiciousness of every neuron.

    Args:
      spectrum: the hit spectrum.
      measure: a name from :func:`deepfault_jax.measures.names` or a function
        ``(a_s, a_f, n_s, n_f) -> score``. Attribution measures
        (``gradxact``, ``actdiff``, ``linear_ablation``) need a spectrum
        computed with ``attribution=True``.
      pooled: score the counts (or sums) over all classes together
        (``[neurons]``) instead of each class's own (``[classes, neurons]``).
      **params: the measure's parameters (``star=...``).

    Returns:
      float32 scores, higher = more suspicious; never NaN.

    Raises:
      ValueError: an unknown measure, or an attribution measure on a spectrum
        without attribution sums.
    """
    if isinstance(measure, str):
        fn = measures.get(measure, **params)
        if measures.kind(measure) == "attribution":
            return fn(*spectrum.attribution_sums(pooled=pooled))
    else:
        fn = measure
    counts: Counts = spectrum.pooled() if pooled else spectrum.counts()
    return fn(*counts)


def allowed_neurons(index: NeuronIndex, layers: Sequence[str] | None = None) -> np.ndarray:
    """Sorted ids of the neurons of ``layers`` (every neuron when None)."""
    if layers is None:
        return np.arange(index.num_neurons)
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise ValueError(
            f"layers must name at least one layer of {', '.join(index.layer_names)}; got none"
        )
    for name in layers:
        index.layer_slice(name)  # raises for an unknown layer, listing the known ones
    return index.layer_ids([name for name in index.layer_names if name in set(layers)])


def _check_k(k: int, available: int) -> int:
    if isinstance(k, bool) or int(k) != k:
        raise TypeError(f"k must be an integer; got {k!r}")
    k = int(k)
    if not 1 <= k <= available:
        raise ValueError(f"k must lie in [1, {available}] (the neurons to choose from); got {k}")
    return k


def top_k(
    score: jax.Array | np.ndarray, k: int, *, allowed: np.ndarray | None = None
) -> np.ndarray:
    """The ids of the ``k`` highest scores along the last axis, deterministically.

    Ties rank the lower neuron id first; +inf ranks above every finite score.

    Args:
      score: ``[neurons]`` or ``[classes, neurons]`` scores.
      k: how many (1 <= k <= number of allowed neurons).
      allowed: optional sorted neuron ids to choose among.

    Returns:
      int64 ids, ``[k]`` or ``[classes, k]``, in rank order.
    """
    score = np.asarray(score)
    if np.isnan(score).any():
        raise ValueError("scores must not be NaN; got NaN values")
    ids = np.arange(score.shape[-1]) if allowed is None else np.asarray(allowed, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= score.shape[-1]):
        raise ValueError(
            f"allowed ids must lie in [0, {score.shape[-1]}); got range [{ids.min()}, {ids.max()}]"
        )
    k = _check_k(k, ids.size)
    sub = score[..., ids]
    # a stable sort of -score keeps equal scores in ascending id order
    order = np.argsort(-sub, axis=-1, kind="stable")[..., :k]
    return ids[order]


def suspicious_neurons(
    spectrum: Spectrum,
    measure: str | measures.Measure,
    k: int,
    *,
    pooled: bool = False,
    layers: Sequence[str] | None = None,
    **params: float,
) -> np.ndarray:
    """The suspicious set: top-``k`` neuron ids per class (``[classes, k]``) or pooled (``[k]``).

    Args:
      spectrum: the hit spectrum.
      measure: a measure name or function.
      k: neurons per set.
      pooled: one set for all classes together.
      layers: restrict the choice to these layers.
      **params: the measure's parameters.
    """
    allowed = allowed_neurons(spectrum.index, layers)
    return top_k(scores(spectrum, measure, pooled=pooled, **params), k, allowed=allowed)


def random_neurons(
    key: jax.Array,
    index: NeuronIndex,
    k: int,
    *,
    layers: Sequence[str] | None = None,
    exclude: Any = None,
) -> np.ndarray:
    """The paper's random baseline: ``k`` distinct neurons drawn uniformly with ``key``.

    Args:
      key: PRNG key.
      index: the neuron layout (conv channels are neurons on the channel axis
        when the spectrum used ``conv_reduce="mean"`` or ``"max"``).
      k: how many.
      layers: draw from these layers only (the same layers as the measures).
      exclude: neuron ids never drawn (any shape, e.g. the suspicious sets of
        the measures compared with).

    Returns:
      int64 ids ``[k]``, sorted.

    Raises:
      ValueError: k outside [1, number of neurons left after exclusion].
    """
    allowed = allowed_neurons(index, layers)
    if exclude is not None:
        allowed = np.setdiff1d(allowed, np.asarray(exclude, np.int64).ravel())
    k = _check_k(k, allowed.size)
    chosen = jax.random.choice(key, allowed.size, shape=(k,), replace=False)
    return np.sort(allowed[np.asarray(chosen)])


def ranking_table(
    spectrum: Spectrum,
    score: jax.Array | np.ndarray,
    ids: np.ndarray,
    *,
    class_index: int | None = None,
) -> list[dict]:
    """Rows for ranked neuron ``ids``: id, layer, unit, the four counts, score, rank.

    Args:
      spectrum: the spectrum the scores came from.
      score: ``[neurons]`` scores (pooled, or of one class).
      ids: neuron ids in rank order (from :func:`top_k`).
      class_index: the class whose counts to show; None for pooled counts.

    Returns:
      One dict per neuron, JSON-ready (+inf scores as ``float("inf")``).
    """
    counts = spectrum.pooled() if class_index is None else spectrum.for_class(class_index)
    a_s, a_f, n_s, n_f = (np.asarray(c) for c in counts)
    score = np.asarray(score)
    rows = []
    for rank, nid in enumerate(np.asarray(ids).tolist(), start=1):
        layer, unit = spectrum.index.locate(nid)
        rows.append(
            {
                "rank": rank,
                "id": int(nid),
                "layer": layer,
                "unit": int(unit),
                "a_s": int(a_s[nid]),
                "a_f": int(a_f[nid]),
                "n_s": int(n_s[nid]),
                "n_f": int(n_f[nid]),
                "score": float(score[nid]),
            }
        )
    return rows


def agreement(score_a: ArrayLikeScores, score_b: ArrayLikeScores, k: int) -> dict:
    """How much two measures agree on the same neurons (``[neurons]`` scores).

    Returns:
      ``{"top_k_overlap": |top-k(a) & top-k(b)| / k, "kendall_tau": tau-b over
      all neurons}``; tau is None when either ranking is constant.
    """
    from scipy.stats import kendalltau

    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"scores must be two [neurons] arrays of one shape; got {a.shape} and {b.shape}"
        )
    overlap = np.intersect1d(top_k(a, k), top_k(b, k)).size / int(k)

    # +inf is the top rank: map it above every finite score, keeping order
    def finite(x):
        top = np.nanmax(x[np.isfinite(x)]) if np.isfinite(x).any() else 0.0
        return np.where(np.isposinf(x), top + 1.0, x)

    tau = kendalltau(finite(a), finite(b)).statistic
    return {"top_k_overlap": float(overlap), "kendall_tau": None if np.isnan(tau) else float(tau)}


# --------------------------------------------------------------------------- exact ablation


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


def _cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("probe",))
def _logits(params, x, *, probe: Probe):
    return probe(params, x)[0]


@functools.partial(jax.jit, static_argnames=("probe",))
def _ablate_chunk(params, x, y, mask, base, ids, *, probe: Probe):
    """For neuron ``ids[j]`` (-1: none), per class: fixes, breaks and loss drop
    ``[chunk, classes]``; ``base`` holds the batch's logits of the model as it is."""
    num_classes = probe.num_classes
    base_right = jnp.argmax(base, axis=-1) == y
    base_loss = _cross_entropy(base, y)
    member = (jax.nn.one_hot(y, num_classes) * mask[:, None]).astype(jnp.float32)  # [B, C]
    offsets = probe.index.offsets

    def one(neuron):
        gates = {
            name: (1.0 - (jnp.arange(size) + offset == neuron).astype(jnp.float32))[None, :]
            for name, size, offset in zip(
                probe.index.layer_names, probe.index.layer_sizes, offsets, strict=True
            )
        }
        logits, _ = probe.gated(params, x, gates)
        right = jnp.argmax(logits, axis=-1) == y
        fixes = (right & ~base_right).astype(jnp.float32) @ member
        breaks = (~right & base_right).astype(jnp.float32) @ member
        drop = (base_loss - _cross_entropy(logits, y)) @ member
        return fixes, breaks, drop

    return jax.vmap(one)(ids)


def exact_ablation(
    probe: Probe,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    neurons: Sequence[int] | None = None,
    batch_size: int = 512,
    chunk: int = 16,
    progress: bool = False,
) -> Ablation:
    """Zeroes each neuron in turn and measures the effect on every input: the reference localizer.

    A neuron is zeroed through the probe's gates: its layer's output is set to
    0 for that unit (a conv channel at every position, unless
    ``conv_reduce="none"``), the rest of the model unchanged. Costs one forward
    pass of the data per neuron; ``chunk`` neurons run together under
    ``vmap`` (memory grows with ``chunk * batch_size``).

    Args:
      probe: a probe with gates.
      params: the model's parameters.
      x: ``float32[n, *input_shape]`` inputs.
      y: ``int[n]`` true classes.
      neurons: ids to ablate (default: all); the others are left 0.
      batch_size: inputs per step.
      chunk: neurons per step.
      progress: show a progress bar.

    Returns:
      An :class:`Ablation`.
    """
    from tqdm.auto import tqdm

    probe.require_gates("exact ablation")
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.shape[1:] != probe.input_shape or len(x) != len(y) or not len(x):
        raise ValueError(
            f"x must be [n >= 1, {', '.join(map(str, probe.input_shape))}] with one label each; "
            f"got x {list(x.shape)} and y {list(y.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= probe.num_classes:
        raise ValueError(
            f"labels must lie in [0, {probe.num_classes}); got range [{y.min()}, {y.max()}]"
        )
    n = probe.index.num_neurons
    ids = np.arange(n) if neurons is None else np.unique(np.asarray(neurons, np.int64))
    if ids.size == 0 or ids.min() < 0 or ids.max() >= n:
        raise ValueError(f"neurons must be ids in [0, {n}); got {list(np.asarray(neurons))[:8]}")
    for name, bad in (("batch_size", batch_size), ("chunk", chunk)):
        if int(bad) != bad or bad < 1:
            raise ValueError(f"{name} must be a positive integer; got {bad!r}")
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
                                    jnp.asarray(group, jnp.int32), probe=probe)  # fmt: skip
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


ABLATION_SCORES = ("fixes-breaks", "loss")


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
        raise ValueError(f"by must be one of {', '.join(ABLATION_SCORES)}; got {by!r}")
    if by == "fixes-breaks":
        score = ablation.fixes.astype(np.float32) - ablation.breaks
        return score.sum(axis=0) if pooled else score
    if pooled:
        return (ablation.loss_drop.sum(axis=0) / max(int(ablation.n_inputs.sum()), 1)).astype(
            np.float32
        )
    return (ablation.loss_drop / np.maximum(ablation.n_inputs, 1)[:, None]).astype(np.float32)
