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
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.typing import ArrayLike

from deepfault_jax import measures
from deepfault_jax.attribution import AttributionSums
from deepfault_jax.errors import InputError, InputTypeError, check_int
from deepfault_jax.probe import NeuronIndex
from deepfault_jax.spectrum import Counts, Spectrum

ArrayLikeScores = jax.Array | np.ndarray

__all__ = [
    "Ranks",
    "measure_agreement",
    "middle_ranks",
    "tie_ranks",
    "allowed_neurons",
    "random_neurons",
    "ranking_table",
    "suspiciousness",
    "suspicious_neurons",
    "top_k_neurons",
]


def _family_input(spectrum: Spectrum, family: str, pooled: bool) -> Counts | AttributionSums:
    """What a measure of ``family`` reads from ``spectrum`` (see :data:`measures.FAMILIES`)."""
    if family == "attribution":
        return spectrum.attribution_sums(pooled=pooled)
    return spectrum.pooled() if pooled else spectrum.counts()


def suspiciousness(
    spectrum: Spectrum,
    measure: str | measures.Measure,
    *,
    pooled: bool = False,
    **params: float,
) -> jax.Array:
    """Suspiciousness of every neuron.

    The measure is given the NamedTuple of the family it was registered with
    (:func:`deepfault_jax.measures.measure_kind`): the spectrum's
    :class:`~deepfault_jax.spectrum.Counts`, or its
    :class:`~deepfault_jax.attribution.AttributionSums`.

    Args:
      spectrum: the hit spectrum.
      measure: a name from :func:`deepfault_jax.measures.measure_names` or a
        measure function (from :func:`deepfault_jax.measures.get_measure`; a
        function of your own, not registered, is given the ``Counts``).
        Attribution measures (``gradxact``, ``actdiff``, ``linear_ablation``)
        need a spectrum computed with ``attribution=True``.
      pooled: score the counts (or sums) over all classes together
        (``[neurons]``) instead of each class's own (``[classes, neurons]``).
      **params: the measure's parameters (``star=...``), with a measure given by name.

    Returns:
      float32 scores, higher = more suspicious; never NaN.

    Raises:
      InputError: an unknown measure or parameter, parameters beside a measure
        function, or an attribution measure on a spectrum without attribution sums.
    """
    if isinstance(measure, str):
        fn = measures.get_measure(measure, **params)
    elif params:
        raise InputError(
            f"parameters {sorted(params)} go with a measure given by name; got a function "
            "(bind them first: get_measure(name, **params), or name the measure)"
        )
    else:
        fn = measure
    return fn(_family_input(spectrum, measures.measure_kind(fn), pooled))


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
    k = check_int("k", k)
    if not 1 <= k <= available:
        raise InputError(f"k must lie in [1, {available}] (the neurons to choose from); got {k}")
    return k


def _check_ids(what: str, ids: Any, num_neurons: int) -> np.ndarray:
    """``ids`` (any shape) as int64, refusing non-integers and ids outside ``[0, num_neurons)``."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return ids.astype(np.int64)
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise InputTypeError(f"{what} ids must be integers; got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= num_neurons:
        raise InputError(
            f"{what} ids must lie in [0, {num_neurons}); got range [{ids.min()}, {ids.max()}]"
        )
    return ids.astype(np.int64)


class Ranks(NamedTuple):
    """Tie-aware 1-based ranks of every neuron (``int64[neurons]`` each).

    Neuron ``n`` and the neurons tied with it share the ranks ``first[n] ..
    last[n]`` (``first == last`` without a tie).
    """

    first: np.ndarray
    last: np.ndarray


def tie_ranks(score: np.ndarray) -> Ranks:
    """:class:`Ranks` of ``[neurons]`` scores, higher first (+inf above every finite score)."""
    s = np.asarray(score, np.float64)
    ascending = np.sort(s)
    n = s.size
    greater = n - np.searchsorted(ascending, s, side="right")
    at_least = n - np.searchsorted(ascending, s, side="left")
    return Ranks(greater.astype(np.int64) + 1, at_least.astype(np.int64))


def middle_ranks(score: np.ndarray) -> np.ndarray:
    """1-based ranks of ``[neurons]`` scores, higher first, a tie sharing the middle of its
    ranks (float64)."""
    r = tie_ranks(score)
    return (r.first + r.last) / 2.0


def top_k_neurons(
    score: jax.Array | np.ndarray, k: int, *, allowed: ArrayLike | None = None
) -> np.ndarray:
    """The ids of the ``k`` highest scores along the last axis, deterministically.

    Ties rank the lower neuron id first; +inf ranks above every finite score.

    Args:
      score: ``[neurons]`` or ``[classes, neurons]`` scores.
      k: how many, an integer (1 <= k <= number of allowed neurons).
      allowed: optional distinct neuron ids ``[m]`` to choose among (in any order).

    Returns:
      int64 ids, ``[k]`` or ``[classes, k]``, in rank order.

    Raises:
      InputError: NaN scores, scores without a neuron axis, a k that is not an
        integer or out of range, allowed ids that are not distinct integers in
        ``[0, neurons)``.
    """
    score = np.asarray(score)
    if score.ndim not in (1, 2):
        raise InputError(f"scores must be [neurons] or [classes, neurons]; got shape {score.shape}")
    if np.isnan(score).any():
        raise InputError("scores must not be NaN; got NaN values")
    if allowed is None:
        ids = np.arange(score.shape[-1])
    else:
        ids = _check_allowed(allowed, score.shape[-1])
    k = _check_k(k, ids.size)
    sub = score[..., ids]
    # a stable sort of -score keeps equal scores in ascending id order
    order = np.argsort(-sub, axis=-1, kind="stable")[..., :k]
    return ids[order]


def _check_allowed(allowed: ArrayLike, num_neurons: int) -> np.ndarray:
    """Allowed ids, sorted (so that ties rank the lower id first); distinct ids in range."""
    ids = np.asarray(allowed)
    if ids.ndim != 1:
        raise InputError(f"allowed must be a [neurons] list of ids; got shape {ids.shape}")
    ids = _check_ids("allowed", ids, num_neurons)
    unique = np.unique(ids)
    if unique.size != ids.size:
        values, counts = np.unique(ids, return_counts=True)
        raise InputError(f"allowed ids must be distinct; got {values[counts > 1][0]} repeated")
    return unique


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
    return top_k_neurons(
        suspiciousness(spectrum, measure, pooled=pooled, **params), k, allowed=allowed
    )


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
        the measures compared with), integers in ``[0, index.num_neurons)``.

    Returns:
      int64 ids ``[k]``, sorted.

    Raises:
      InputError: k not an integer or outside [1, number of neurons left after
        exclusion]; exclude ids that are not integers in range.
    """
    allowed = allowed_neurons(index, layers)
    if exclude is not None:
        allowed = np.setdiff1d(allowed, _check_ids("exclude", exclude, index.num_neurons).ravel())
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
