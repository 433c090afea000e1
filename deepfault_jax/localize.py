"""Localization: suspicious neurons from a spectrum, the random baseline, rankings.

* :func:`suspiciousness` applies a measure to a spectrum, per class (``[classes,
  neurons]``) or pooled over classes (``[neurons]``).
* :func:`top_k_neurons` ranks deterministically: higher score first, ties broken by the
  lower neuron id; optionally only among allowed neurons (some layers).
* :func:`suspicious_neurons` combines the two: the paper's suspicious set.
* :func:`random_neurons` is the paper's baseline: k neurons drawn uniformly with
  a ``key`` from the same layers, excluding the neurons chosen by the measures
  it is compared with.
* :func:`ranking_table` and :func:`measure_agreement` report and compare rankings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from deepfault_jax import measures
from deepfault_jax.errors import InputError, InputTypeError
from deepfault_jax.probe import NeuronIndex
from deepfault_jax.spectrum import Counts, Spectrum

ArrayLikeScores = jax.Array | np.ndarray

__all__ = [
    "measure_agreement",
    "allowed_neurons",
    "random_neurons",
    "ranking_table",
    "suspiciousness",
    "suspicious_neurons",
    "top_k_neurons",
]


def suspiciousness(
    spectrum: Spectrum,
    measure: str | measures.Measure,
    *,
    pooled: bool = False,
    **params: float,
) -> jax.Array:
    """Suspiciousness of every neuron.

    Args:
      spectrum: the hit spectrum.
      measure: a name from :func:`deepfault_jax.measures.measure_names` or a function
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
        fn = measures.get_measure(measure, **params)
        if measures.measure_kind(measure) == "attribution":
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
        raise InputError(
            f"layers must name at least one layer of {', '.join(index.layer_names)}; got none"
        )
    for name in layers:
        index.layer_slice(name)  # raises for an unknown layer, listing the known ones
    return index.layer_ids([name for name in index.layer_names if name in set(layers)])


def _check_k(k: int, available: int) -> int:
    if isinstance(k, bool) or int(k) != k:
        raise InputTypeError(f"k must be an integer; got {k!r}")
    k = int(k)
    if not 1 <= k <= available:
        raise InputError(f"k must lie in [1, {available}] (the neurons to choose from); got {k}")
    return k


def top_k_neurons(
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
        raise InputError("scores must not be NaN; got NaN values")
    ids = np.arange(score.shape[-1]) if allowed is None else np.asarray(allowed, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= score.shape[-1]):
        raise InputError(
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
    return top_k_neurons(suspiciousness(spectrum, measure, pooled=pooled, **params), k, allowed=allowed)


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
      ids: neuron ids in rank order (from :func:`top_k_neurons`).
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


def measure_agreement(score_a: ArrayLikeScores, score_b: ArrayLikeScores, k: int) -> dict:
    """How much two measures agree on the same neurons (``[neurons]`` scores).

    Returns:
      ``{"top_k_overlap": |top-k(a) & top-k(b)| / k, "kendall_tau": tau-b over
      all neurons}``; tau is None when either ranking is constant.
    """
    from scipy.stats import kendalltau

    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(
            f"scores must be two [neurons] arrays of one shape; got {a.shape} and {b.shape}"
        )
    overlap = np.intersect1d(top_k_neurons(a, k), top_k_neurons(b, k)).size / int(k)

    # +inf is the top rank: map it above every finite score, keeping order
    def finite(x):
        top = np.nanmax(x[np.isfinite(x)]) if np.isfinite(x).any() else 0.0
        return np.where(np.isposinf(x), top + 1.0, x)

    tau = kendalltau(finite(a), finite(b)).statistic
    return {"top_k_overlap": float(overlap), "kendall_tau": None if np.isnan(tau) else float(tau)}
