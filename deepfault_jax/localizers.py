"""One entry point for every localizer: ``localize_neurons(name, probe, params, x, y, **options)``.

A *localizer* scores every probed neuron of a model on labelled inputs
(higher = more suspicious). The families:

* ``counts``: DeepFault's count measures (Tarantula, Ochiai, DStar, ...) on the
  hit spectrum (:mod:`deepfault_jax.measures`); option ``threshold`` (active
  means ``> threshold``) and the measure's own hyperparameters.
* ``attribution``: the attribution measures (``gradxact``, ``actdiff``,
  ``linear_ablation``) on the attribution sums of the same pass.
* ``ablation``: exact single-neuron ablation (``ablation``: fixes minus breaks;
  ``ablation_loss``: mean loss drop) and its generalisation to gains
  (``gain_ablation``).
* ``gradient``: per-neuron statistics of the gradient of the loss with respect
  to each neuron's own parameters (``grad_norm``, ``grad_snr``) and the
  per-neuron refit (``refit``): :mod:`deepfault_jax.gradients`.
* ``confusion``: count or attribution measures per confusion pair (true
  class, predicted class): :mod:`deepfault_jax.confusion`.
* ``aggregate``: rank aggregation of other localizers (``aggregate``).

:class:`Evidence` holds one model on one set of inputs and computes what the
localizers read once (the spectrum, the ablations, the gradient statistics),
so that a benchmark scoring many localizers on one faulty model pays for each
pass once. :func:`localize_neurons` is one call of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deepfault_jax import ablation as ablation_lib
from deepfault_jax import localize, measures
from deepfault_jax.errors import InputError, check_finite, check_int
from deepfault_jax.probe import Probe
from deepfault_jax.spectrum import Spectrum

__all__ = [
    "DEFAULT_LOCALIZER",
    "Evidence",
    "LocalizerInfo",
    "localize_neurons",
    "localizer_info",
    "localizer_names",
    "register_localizer",
    "spectrum_scores",
]

#: The localizer used when none is named (chosen on faultbench v2 by leave-one-kind-out;
#: README "Which localizer should I trust?").
DEFAULT_LOCALIZER = "consensus"

#: What a localizer reads: the hit spectrum (a saved one will do), the spectrum with
#: attribution sums (a saved one computed with them will do), the model's gates, or its
#: parameters (laid out by layer, :mod:`deepfault_jax.neuron_params`).
NEEDS = ("spectrum", "attribution", "gates", "parameters", "localizers")


@dataclasses.dataclass(frozen=True)
class LocalizerInfo:
    """A registered localizer.

    Attributes:
      name: its name.
      family: ``counts``, ``attribution``, ``ablation``, ``gradient``, ``confusion``
        or ``aggregate``.
      needs: what it reads (:data:`NEEDS`).
      per_class: whether it has a per-class variant (``per_class=True``).
      options: its options and their defaults.
      cost: what one call costs, in words.
      summary: one line.
    """

    name: str
    family: str
    needs: str
    per_class: bool
    options: Mapping[str, Any]
    cost: str
    summary: str
    fn: Callable[..., np.ndarray] = dataclasses.field(repr=False, compare=False)


_REGISTRY: dict[str, LocalizerInfo] = {}


def register_localizer(*, name: str, family: str, needs: str, per_class: bool, cost: str):
    """Registers ``fn(evidence, *, per_class, **options) -> scores`` as localizer ``name``.

    The function's keyword-only parameters (after ``per_class``) are its options, with
    their defaults; its docstring's first line is its summary.
    """
    if needs not in NEEDS:
        raise InputError(f"needs must be one of {', '.join(NEEDS)}; got {needs!r}")

    def register(fn):
        if name in _REGISTRY:
            raise InputError(f"localizer {name!r} is registered already")
        options = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "per_class"
        }
        summary = (inspect.getdoc(fn) or name).splitlines()[0]
        _REGISTRY[name] = LocalizerInfo(name, family, needs, per_class, options, cost, summary, fn)
        return fn

    return register


def localizer_names(*, family: str | None = None) -> tuple[str, ...]:
    """Every registered localizer (or one family's), in registration order."""
    families = sorted({info.family for info in _REGISTRY.values()})
    if family is not None and family not in families:
        raise InputError(f"family must be one of {', '.join(families)}; got {family!r}")
    return tuple(n for n, i in _REGISTRY.items() if family is None or i.family == family)


def localizer_info(name: str) -> LocalizerInfo:
    """The :class:`LocalizerInfo` of ``name`` (case-insensitive, ``-`` as ``_``)."""
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise InputError(
            f"unknown localizer {name!r}; expected one of {', '.join(localizer_names())}"
        )
    return _REGISTRY[key]


def _check_options(info: LocalizerInfo, per_class: bool, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise InputError(f"localizer {info.name!r} takes options [{accepted}]; got {unknown}")
    if per_class and not info.per_class:
        raise InputError(f"localizer {info.name!r} has no per-class variant; got per_class=True")


def _options_key(options: Mapping[str, Any]) -> tuple:
    """``options`` as a hashable key (lists and arrays as tuples)."""

    def frozen(value):
        if isinstance(value, (list, tuple, np.ndarray)):
            return tuple(frozen(v) for v in np.asarray(value, dtype=object).ravel().tolist())
        return value

    return tuple(sorted(((k, frozen(v)) for k, v in options.items()), key=str))


class Evidence:
    """One model on one set of labelled inputs, and everything localizers read from them.

    Each pass (the spectrum with attribution sums, an ablation at a gain, the
    gradient statistics) runs once, when a localizer first needs it, and is
    kept for the others; so are the scores. Not thread-safe.

    Args:
      probe: the model's probe (gates needed by ablations and the refit).
      params: its parameters.
      x: ``float32[n, *input_shape]`` inputs, finite.
      y: ``int[n]`` true classes.
      batch_size: inputs per compiled step.
      progress: show progress bars on long passes.
    """

    def __init__(
        self,
        probe: Probe,
        params: Any,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = 512,
        progress: bool = False,
    ):
        self.probe, self.params = probe, params
        self.x, self.y = ablation_lib.checked_inputs(probe, x, y)
        self.batch_size = check_int("batch_size", batch_size, lo=1)
        self.progress = bool(progress)
        self.seconds: dict[str, float] = {}  # per localizer name: time of its first call
        self._memo: dict[Any, Any] = {}

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def spectrum(self, *, threshold: float = 0.0, attribution: bool = False) -> Spectrum:
        """The hit spectrum, with attribution sums (margin mode) if asked; a spectrum with
        attribution sums computed already serves a count-only request too."""
        from deepfault_jax.streaming import compute_spectrum

        threshold = check_finite("threshold", threshold)
        if not attribution and ("spectrum", threshold, True) in self._memo:
            return self._memo[("spectrum", threshold, True)]
        return self.memo(
            ("spectrum", threshold, bool(attribution)),
            lambda: compute_spectrum(
                self.probe, self.params, self.x, self.y, batch_size=self.batch_size,
                threshold=threshold, attribution=bool(attribution),
            ),
        )  # fmt: skip

    def held_spectrum(self, *, threshold: float = 0.0) -> Spectrum | None:
        """The spectrum at ``threshold`` computed so far (with attribution sums if one was),
        or None: nothing is computed."""
        for attribution in (True, False):
            found = self._memo.get(("spectrum", float(threshold), attribution))
            if found is not None:
                return found
        return None

    def ablation(self, gain: float = 0.0) -> ablation_lib.Ablation:
        """The exact ablation with every neuron's output times ``gain`` in turn."""
        gain = check_finite("gain", gain)
        return self.memo(
            ("ablation", gain),
            lambda: ablation_lib.exact_ablation(
                self.probe, self.params, self.x, self.y, batch_size=self.batch_size,
                gain=gain, progress=self.progress,
            ),
        )  # fmt: skip

    def scores(self, name: str, *, per_class: bool = False, **options: Any) -> np.ndarray:
        """Localizer ``name``'s float32 scores: ``[neurons]``, or ``[classes, neurons]`` with
        ``per_class``; higher = more suspicious, never NaN."""
        info = localizer_info(name)
        _check_options(info, per_class, options)
        key = ("scores", info.name, bool(per_class), _options_key(options))
        if key not in self._memo:
            start = time.perf_counter()
            score = np.asarray(info.fn(self, per_class=bool(per_class), **options), np.float32)
            self.seconds.setdefault(info.name, time.perf_counter() - start)
            want = (self.probe.num_classes,) if per_class else ()
            want += (self.probe.index.num_neurons,)
            if score.shape != want or np.isnan(score).any():
                raise AssertionError(f"localizer {info.name} gave {score.shape} or NaN scores")
            self._memo[key] = score
        return self._memo[key].copy()  # the caller's to change; the kept one stays


def localize_neurons(
    name: str,
    probe: Probe,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    per_class: bool = False,
    batch_size: int = 512,
    progress: bool = False,
    **options: Any,
) -> np.ndarray:
    """Scores every probed neuron with localizer ``name``: higher = more suspicious.

    Args:
      name: one of :func:`localizer_names` (:data:`DEFAULT_LOCALIZER` is the
        recommended one).
      probe: the model's probe; params: its parameters.
      x: ``float32[n, *input_shape]`` inputs, finite; y: ``int[n]`` their true classes.
      per_class: scores per true class (``[classes, neurons]``), for localizers that
        have such a variant (:attr:`LocalizerInfo.per_class`).
      batch_size: inputs per compiled step.
      progress: show progress bars on long passes.
      **options: the localizer's options (:attr:`LocalizerInfo.options`).

    Returns:
      ``float32[neurons]`` (pooled over classes) or ``float32[classes, neurons]``; never NaN.

    Raises:
      InputError: an unknown localizer (the message lists them), an option it does not
        take, ``per_class`` where it has no such variant, a probe without gates for a
        localizer that needs them, bad inputs.

    Example:
      >>> scores = localize_neurons("gradxact", probe, params, x, y)  # doctest: +SKIP
      >>> top10 = top_k_neurons(scores, 10)  # doctest: +SKIP
    """
    info = localizer_info(name)
    _check_options(info, per_class, options)
    if info.needs in ("gates",):
        probe.require_gates(f"localizer {info.name!r}")
    evidence = Evidence(probe, params, x, y, batch_size=batch_size, progress=progress)
    return evidence.scores(info.name, per_class=per_class, **options)


class _SpectrumEvidence:
    """Evidence that holds only a saved spectrum (for the spectrum families)."""

    def __init__(self, spectrum: Spectrum):
        self._spectrum = spectrum

    def spectrum(self, *, threshold: float = 0.0, attribution: bool = False) -> Spectrum:
        if check_finite("threshold", threshold) != float(self._spectrum.threshold):
            raise InputError(
                f"a saved spectrum was counted at threshold {self._spectrum.threshold}; got "
                f"threshold={threshold} (compute the spectrum again at that threshold)"
            )
        return self._spectrum


def spectrum_scores(
    name: str, spectrum: Spectrum, *, per_class: bool = False, **options: Any
) -> np.ndarray:
    """Localizer ``name``'s scores from a (saved) spectrum: count measures, and attribution
    measures of a spectrum computed with ``attribution=True``.

    Raises:
      InputError: a localizer that needs the model (the message says which), or as
        :func:`localize_neurons`.
    """
    info = localizer_info(name)
    _check_options(info, per_class, options)
    if info.needs not in ("spectrum", "attribution"):
        raise InputError(
            f"localizer {info.name!r} needs the model ({info.needs}), not a saved spectrum: "
            "give a checkpoint or model and a data set"
        )
    score = info.fn(_SpectrumEvidence(spectrum), per_class=bool(per_class), **options)
    return np.asarray(score, np.float32)


# --------------------------------------------------------------------------- the measures


def _measure_localizer(name: str) -> None:
    family = measures.measure_kind(name)
    params = measures.measure_parameters(name)

    def fn(evidence, *, per_class: bool, threshold: float = 0.0, **hyper):
        spectrum = evidence.spectrum(threshold=threshold, attribution=family == "attribution")
        return localize.suspiciousness(spectrum, name, pooled=not per_class, **hyper)

    # the measure's hyperparameters become keyword-only options beside the threshold
    fn.__signature__ = inspect.Signature(
        [
            inspect.Parameter("evidence", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("per_class", inspect.Parameter.KEYWORD_ONLY),
            inspect.Parameter("threshold", inspect.Parameter.KEYWORD_ONLY, default=0.0),
            *(
                inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                for k, v in params.items()
            ),
        ]
    )
    doc = inspect.getdoc(measures.get_measure(name)) or name
    fn.__doc__ = doc
    if family == "counts":
        register_localizer(
            name=name, family="counts", needs="spectrum", per_class=True,
            cost="one forward pass (the spectrum)",
        )(fn)  # fmt: skip
    else:
        register_localizer(
            name=name, family="attribution", needs="attribution", per_class=True,
            cost="one forward and one backward pass with two cotangents",
        )(fn)  # fmt: skip


for _name in measures.measure_names():
    _measure_localizer(_name)


# --------------------------------------------------------------------------- ablations


@register_localizer(
    name="ablation", family="ablation", needs="gates", per_class=True,
    cost="one forward pass per neuron",
)  # fmt: skip
def _ablation(evidence: Evidence, *, per_class: bool) -> np.ndarray:
    """Exact ablation: failing inputs repaired minus passing inputs broken when the neuron is zeroed."""
    return ablation_lib.ablation_scores(evidence.ablation(0.0), pooled=not per_class)


@register_localizer(
    name="ablation_loss", family="ablation", needs="gates", per_class=True,
    cost="one forward pass per neuron",
)  # fmt: skip
def _ablation_loss(evidence: Evidence, *, per_class: bool) -> np.ndarray:
    """Exact ablation: the mean cross-entropy drop when the neuron is zeroed."""
    return ablation_lib.ablation_scores(evidence.ablation(0.0), by="loss", pooled=not per_class)


def _check_gains(gains: Any) -> tuple[float, ...]:
    values = (gains,) if isinstance(gains, (int, float)) else tuple(gains)
    if not values:
        raise InputError("gains must list at least one number; got none")
    out = tuple(check_finite("gains", g) for g in values)
    if 1.0 in out:
        raise InputError(f"gains must not contain 1 (the model as it is); got {list(out)}")
    return out


@register_localizer(
    name="gain_ablation", family="ablation", needs="gates", per_class=True,
    cost="one forward pass per neuron and gain",
)  # fmt: skip
def _gain_ablation(
    evidence: Evidence, *, per_class: bool, gains: tuple[float, ...] = (-1.0, 0.0, 0.5, 2.0)
) -> np.ndarray:
    """Generalised ablation: the largest mean loss drop when the neuron's output is multiplied by one of ``gains``.

    With ``L(g)`` the mean cross-entropy over the inputs (of a class, per
    class) when neuron ``n``'s layer output is multiplied by ``g`` (its value
    before the activation; 1: the model as it is), the score is
    ``max_{g in gains} L(1) - L(g)``. Gain 0 is the plain ablation; -1 undoes
    a sign flip of the incoming weights and bias; 0.5 and 2 undo an amplified
    or an attenuated neuron (after a ReLU, a positive gain also scales the
    outgoing effect).
    """
    gains = _check_gains(gains)
    scores = [
        ablation_lib.ablation_scores(evidence.ablation(g), by="loss", pooled=not per_class)
        for g in gains
    ]
    return np.max(np.stack(scores), axis=0)


# --------------------------------------------------------------------------- gradients


def _gradient_stats(evidence: Evidence, groups: int | None):
    from deepfault_jax.gradients import gradient_stats

    if groups is not None:
        groups = min(check_int("groups", groups, lo=2), len(evidence.x))
    return evidence.memo(
        ("gradient_stats", groups),
        lambda: gradient_stats(
            evidence.probe, evidence.params, evidence.x, evidence.y,
            batch_size=evidence.batch_size, groups=groups,
        ),
    )  # fmt: skip


@register_localizer(
    name="grad_norm", family="gradient", needs="parameters", per_class=False,
    cost="one forward and one backward pass",
)  # fmt: skip
def _grad_norm(evidence: Evidence, *, per_class: bool) -> np.ndarray:
    """The norm of the mean loss gradient with respect to the neuron's own parameters.

    ``|| (1/n) sum_i d l_i / d theta_k ||_2`` over neuron ``k``'s incoming
    weights, bias and outgoing weights (:mod:`deepfault_jax.gradients`).
    """
    from deepfault_jax.gradients import mean_gradient_norms

    return evidence.memo(
        "grad_norm",
        lambda: mean_gradient_norms(
            evidence.probe, evidence.params, evidence.x, evidence.y,
            batch_size=evidence.batch_size,
        ),
    )  # fmt: skip


@register_localizer(
    name="grad_snr", family="gradient", needs="parameters", per_class=False,
    cost="one backward pass per group of inputs (groups=None: per input)",
)  # fmt: skip
def _grad_snr(evidence: Evidence, *, per_class: bool, groups: int | None = 64) -> np.ndarray:
    """How consistently the inputs push the neuron's own parameters: mean squared-mean over mean-square gradient.

    ``(1/P_k) sum_p (sum_j g_jp)^2 / (m sum_j g_jp^2)`` over the ``P_k``
    parameters of neuron ``k`` (incoming weights, bias, outgoing weights), with
    ``g_jp`` the gradient with respect to parameter ``p`` of the summed
    cross-entropy of unit ``j`` of ``m``: ``groups`` consecutive groups of the
    inputs (at most one per input; the default 64 costs 64 batched backward
    passes), or single inputs with ``groups=None`` (one backward pass per input:
    measured ~25x slower, with top-10 recall within a few points on planted
    faults). See :mod:`deepfault_jax.gradients`.
    """
    return _gradient_stats(evidence, groups).grad_snr()


@register_localizer(
    name="refit", family="gradient", needs="parameters", per_class=False,
    cost="steps forward and backward passes of half the inputs per neuron",
)  # fmt: skip
def _refit(
    evidence: Evidence,
    *,
    per_class: bool,
    steps: int = 20,
    learning_rate: float = 0.05,
    inputs: int = 1024,
) -> np.ndarray:
    """Per-neuron refit: the held-out loss drop of re-fitting only the neuron's parameters.

    ``steps`` Adam steps (optax) on the mean cross-entropy of the even-numbered
    inputs among the first ``inputs``, moving only neuron ``k``'s incoming
    weights, bias and outgoing weights (in units of each piece's RMS); the
    score is the mean cross-entropy of the odd-numbered inputs before minus
    after (:func:`deepfault_jax.gradients.refit_scores`).
    """
    from deepfault_jax.gradients import refit_scores

    return refit_scores(
        evidence.probe, evidence.params, evidence.x, evidence.y, steps=steps,
        learning_rate=learning_rate, inputs=inputs,
    )  # fmt: skip


# --------------------------------------------------------------------------- confusion pairs


@register_localizer(
    name="confusion", family="confusion", needs="gates", per_class=False,
    cost="one forward and one backward pass; holds [inputs, neurons] values",
)  # fmt: skip
def _confusion(
    evidence: Evidence,
    *,
    per_class: bool,
    measure: str = "gradxact",
    threshold: float = 0.0,
    min_failures: int = 3,
) -> np.ndarray:
    """Best rank over confusion pairs (true class, predicted class) of a measure on the pair's inputs.

    See :mod:`deepfault_jax.confusion`: per pair ``(t, p)`` with at least
    ``min_failures`` inputs of class ``t`` predicted ``p``, ``measure`` (a count
    measure, or ``gradxact``: the mean ``a * d loss / d a`` over the pair's
    failing inputs) ranks the neurons; the score is minus the best rank.
    """
    from deepfault_jax.confusion import confusion_scores, per_input_values

    predicted, values, gxa = evidence.memo(
        "per_input",
        lambda: per_input_values(
            evidence.probe, evidence.params, evidence.x, evidence.y,
            batch_size=evidence.batch_size,
        ),
    )  # fmt: skip
    return confusion_scores(
        predicted, values, gxa, evidence.y, measure=measure, threshold=threshold,
        min_failures=min_failures,
    )  # fmt: skip


# --------------------------------------------------------------------------- aggregation

#: How :func:`aggregate` combines ranks.
COMBINE = ("rrf", "best", "mean")


def _parse_methods(methods: Any) -> tuple[str, ...]:
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if len(names) < 2:
        raise InputError(f"aggregate needs two or more localizers; got {list(names)}")
    out = []
    for name in names:
        info = localizer_info(name)
        if info.family == "aggregate":
            raise InputError(f"aggregate combines other localizers; got {name!r}")
        out.append(info.name)
    return tuple(out)


@register_localizer(
    name="aggregate", family="aggregate", needs="localizers", per_class=False,
    cost="the sum of its localizers' costs",
)  # fmt: skip
def _aggregate(
    evidence: Evidence,
    *,
    per_class: bool,
    methods: tuple[str, ...] = ("gradxact", "grad_norm"),
    combine: str = "rrf",
    k: float = 10.0,
) -> np.ndarray:
    """Rank aggregation of complementary localizers.

    With ``r_m(n)`` neuron ``n``'s rank under localizer ``m`` (1 = most
    suspicious; a tie shares the middle of its ranks): ``combine="rrf"``
    (reciprocal rank fusion) scores ``sum_m 1 / (k + r_m(n))``; ``"best"``
    scores ``-min_m r_m(n)`` (a neuron any method puts first is first);
    ``"mean"`` scores ``-mean_m r_m(n)`` (Borda).
    """
    names = _parse_methods(methods)
    if combine not in COMBINE:
        raise InputError(f"combine must be one of {', '.join(COMBINE)}; got {combine!r}")
    k = check_finite("k", k, lo=0.0)
    ranks = np.stack([localize.middle_ranks(evidence.scores(name)) for name in names])
    if combine == "rrf":
        return np.sum(1.0 / (k + ranks), axis=0)
    if combine == "best":
        return -ranks.min(axis=0)
    return -ranks.mean(axis=0)


#: The localizers :func:`consensus` combines.
CONSENSUS = ("gradxact", "grad_norm", "grad_snr")


@register_localizer(
    name="consensus", family="aggregate", needs="localizers", per_class=False,
    cost="one forward and two backward passes, and one backward pass per group of 64",
)  # fmt: skip
def _consensus(evidence: Evidence, *, per_class: bool) -> np.ndarray:
    """The recommended default: reciprocal rank fusion of gradxact, grad_norm and grad_snr.

    ``sum_m 1 / (10 + r_m(n))`` over ``m`` in gradxact (the first-order loss
    change of zeroing the neuron), grad_norm (how hard the loss pulls on its
    parameters) and grad_snr (how consistently the inputs pull on them), with
    ``r_m(n)`` neuron ``n``'s rank under ``m`` (:func:`aggregate` with these
    three). Each catches faults the others miss: zeroing-based scores miss a
    faulty neuron that still carries useful signal; gradient scores miss a
    neuron that is silent on most inputs.
    """
    return _aggregate(evidence, per_class=per_class, methods=CONSENSUS, combine="rrf", k=10.0)
