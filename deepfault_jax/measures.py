"""Suspiciousness measures: pure, vectorised functions of a spectrum, in two registered families.

**Count measures** take the paper's four counts of a set of neurons, one
:class:`~deepfault_jax.spectrum.Counts` (``a_s, a_f, n_s, n_f``; any shape,
``[neurons]`` or ``[classes, neurons]``; integers or floats), plus keyword
hyperparameters (``dstar(counts, *, star=3.0)``), and return a float32 score of
the same shape; a higher score is more suspicious. In the formulas
(spectrum-based fault localization notation):

* ``a_ef`` = A_f, active on failing inputs;   ``a_nf`` = N_f, inactive on failing inputs;
* ``a_ep`` = A_s, active on passing inputs;   ``a_np`` = N_s, inactive on passing inputs;
* ``F = a_ef + a_nf`` failing inputs, ``P = a_ep + a_np`` passing inputs.

No measure returns NaN. A ratio with a zero denominator is given the value
that ranks the neuron as the original DeepFault does where it is defined: a
0/0 term is 0 (the original turns NaN into 0), and DStar's x/0 with x > 0 is
+inf, ranked first. Each docstring states its own rule.

**Attribution measures** (DESIGN section 7) read the float sums gathered with
``attribution=True`` instead of the counts: ``gradxact``, ``actdiff`` and
``linear_ablation``. Each takes one
:class:`~deepfault_jax.attribution.AttributionSums` (``act_pass, act_fail,
gxa_pass, gxa_fail, fixes, breaks, n_pass, n_fail``). They too never return
NaN, and higher is more suspicious.

Each measure is registered with its family when it is defined
(:func:`count_measure`, :func:`attribution_measure`); :func:`measure_kind`
reads the family back, :data:`FAMILIES` maps it to the NamedTuple the measure
takes, and :func:`deepfault_jax.localize.suspiciousness` dispatches on it. Use
:func:`get_measure` to look a measure up by name (with its hyperparameters,
checked there), :func:`measure_names` for the list and
:func:`measure_parameters` for a measure's hyperparameters.

Example:
  >>> score = get_measure("dstar", star=2)(spectrum.pooled())  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from deepfault_jax.attribution import AttributionSums
from deepfault_jax.errors import InputError, InputTypeError, check_finite
from deepfault_jax.spectrum import Counts

__all__ = [
    "FAMILIES",
    "AttributionMeasure",
    "CountMeasure",
    "Measure",
    "ample",
    "anderberg",
    "attribution_measure",
    "barinel",
    "count_measure",
    "dstar",
    "actdiff",
    "get_measure",
    "gp13",
    "gradxact",
    "measure_kind",
    "measure_parameters",
    "linear_ablation",
    "jaccard",
    "kulczynski1",
    "kulczynski2",
    "measure_names",
    "ochiai",
    "ochiai2",
    "op2",
    "russell_rao",
    "sorensen_dice",
    "tarantula",
    "wong1",
    "wong2",
    "wong3",
    "zoltar",
]

#: A count measure: ``Counts -> float32 score`` (hyperparameters bound).
CountMeasure = Callable[[Counts], jax.Array]
#: An attribution measure: ``AttributionSums -> float32 score``.
AttributionMeasure = Callable[[AttributionSums], jax.Array]
#: Either family.
Measure = CountMeasure | AttributionMeasure

#: Each family's name and the NamedTuple its measures take.
FAMILIES: Mapping[str, type] = types.MappingProxyType(
    {"counts": Counts, "attribution": AttributionSums}
)


class _Entry(NamedTuple):
    fn: Callable[..., jax.Array]
    family: str
    positive: tuple[str, ...]  # hyperparameters that must be > 0


_REGISTRY: dict[str, _Entry] = {}


def _hyperparameters(fn: Callable[..., jax.Array]) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


def _register(fn: Callable[..., jax.Array], family: str, positive: tuple[str, ...]):
    name = fn.__name__.lower()
    if name in _REGISTRY:
        raise InputError(f"measure {name!r} is registered already; choose another function name")
    keywords = {p.name for p in _hyperparameters(fn)}
    unknown = sorted(set(positive) - keywords)
    if unknown:
        raise InputError(
            f"positive must name keyword parameters of {name} {sorted(keywords)}; got {unknown}"
        )
    fn.measure_family = family
    _REGISTRY[name] = _Entry(fn, family, tuple(positive))
    return fn


def count_measure(fn=None, *, positive: tuple[str, ...] = ()):
    """Registers a count measure (``fn(counts: Counts, *, hyperparameters) -> score``) under its name.

    Args:
      fn: the measure; its name (lower case) becomes the registered name.
      positive: hyperparameters that must be > 0 (every one must be finite).

    Use as ``@count_measure`` or ``@count_measure(positive=("star",))``.
    Raises :class:`~deepfault_jax.errors.InputError` for a name registered already.
    """
    if fn is None:
        return functools.partial(count_measure, positive=positive)
    return _register(fn, "counts", positive)


def attribution_measure(fn):
    """Registers an attribution measure (``fn(sums: AttributionSums) -> score``) under its name.

    Raises :class:`~deepfault_jax.errors.InputError` for a name registered already.
    """
    return _register(fn, "attribution", ())


def _check_input(value: Any, family: str, name: str) -> None:
    want = FAMILIES[family]
    if not isinstance(value, want):
        article = "an" if want.__name__[0] in "AEIOU" else "a"
        fields = ", ".join(want._fields)
        raise InputTypeError(
            f"{name} takes {article} {want.__name__} ({fields}); got {type(value).__name__}"
        )


def _counts(counts: Counts, name: str) -> tuple[jax.Array, ...]:
    """The four counts as float32, in the order ``a_s, a_f, n_s, n_f`` (= a_ep, a_ef, a_np, a_nf)."""
    _check_input(counts, "counts", name)
    return _f(counts.a_s, counts.a_f, counts.n_s, counts.n_f)


def _sums(sums: AttributionSums, name: str) -> AttributionSums:
    _check_input(sums, "attribution", name)
    return sums


def _f(*counts: ArrayLike) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(c, jnp.float32) for c in counts)


def _ratio(num: jax.Array, den: jax.Array, *, when_zero: float = 0.0) -> jax.Array:
    """``num / den``, and ``when_zero`` where ``den == 0`` (no NaN, no inf)."""
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, when_zero, num / safe)


@count_measure
def tarantula(counts: Counts) -> jax.Array:
    """Tarantula (Jones and Harrold, ASE 2005).

    ``(a_ef / F) / (a_ef / F + a_ep / P)``

    Edge cases: ``a_ef / F`` is 0 when F = 0 and ``a_ep / P`` is 0 when P = 0;
    0/0 overall (never active) is 0; x/0 cannot occur (the denominator is 0
    only when the numerator is). Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _counts(counts, "tarantula")
    fail = _ratio(a_ef, a_ef + a_nf)
    passed = _ratio(a_ep, a_ep + a_np)
    return _ratio(fail, fail + passed)


@count_measure
def ochiai(counts: Counts) -> jax.Array:
    """Ochiai (Abreu, Zoeteweij, van Gemund, TAIC PART 2007).

    ``a_ef / sqrt(F * (a_ef + a_ep))``

    Edge cases: 0/0 (no failing input, or never active) is 0; x/0 cannot occur
    (a_ef > 0 makes both factors positive). Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "ochiai")
    return _ratio(a_ef, jnp.sqrt((a_ef + a_nf) * (a_ef + a_ep)))


@count_measure(positive=("star",))
def dstar(counts: Counts, *, star: float = 3.0) -> jax.Array:
    """DStar, D* (Wong, Debroy, Gao, Li, IEEE TR 2014); ``star`` = 3 as the original.

    ``a_ef ** star / (a_ep + a_nf)``

    Edge cases: x/0 with a_ef > 0 (active on every failing input, on no
    passing one) is +inf, ranked first; 0/0 is 0. A float32 overflow of
    ``a_ef ** star`` also gives +inf.
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "dstar")
    num = a_ef**star
    den = a_ep + a_nf
    return jnp.where(
        den == 0, jnp.where(a_ef > 0, jnp.inf, 0.0), num / jnp.where(den == 0, 1.0, den)
    )


@count_measure
def jaccard(counts: Counts) -> jax.Array:
    """Jaccard (Chen et al., DSN 2002).

    ``a_ef / (a_ef + a_nf + a_ep)``

    Edge cases: 0/0 is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "jaccard")
    return _ratio(a_ef, a_ef + a_nf + a_ep)


@count_measure
def ochiai2(counts: Counts) -> jax.Array:
    """Ochiai2 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``a_ef * a_np / sqrt((a_ef + a_ep) (a_nf + a_np) (a_ef + a_np) (a_ep + a_nf))``

    Edge cases: 0/0 and x/0 (a zero factor in the denominator) are 0. Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _counts(counts, "ochiai2")
    # the product of four counts can pass float32's range: take the root of each pair
    den = jnp.sqrt((a_ef + a_ep) * (a_nf + a_np)) * jnp.sqrt((a_ef + a_np) * (a_ep + a_nf))
    return _ratio(a_ef * a_np, den)


@count_measure
def op2(counts: Counts) -> jax.Array:
    """Op2 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``a_ef - a_ep / (P + 1)``

    Edge cases: always defined (P + 1 > 0: no 0/0 or x/0).
    """
    a_ep, a_ef, a_np, _ = _counts(counts, "op2")
    return a_ef - a_ep / (a_ep + a_np + 1.0)


@count_measure
def barinel(counts: Counts) -> jax.Array:
    """Barinel (Abreu, Zoeteweij, van Gemund, ASE 2009).

    ``1 - a_ep / (a_ep + a_ef)``

    Edge cases: 0/0 (never active) is 0, the least suspicious; x/0 cannot occur.
    Range [0, 1].
    """
    a_ep, a_ef, _, _ = _counts(counts, "barinel")
    # computed as a_ef / (a_ep + a_ef), the same value without float cancellation
    return _ratio(a_ef, a_ep + a_ef)


@count_measure
def kulczynski1(counts: Counts) -> jax.Array:
    """Kulczynski1 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``a_ef / (a_nf + a_ep)``

    Edge cases: x/0 with a_ef > 0 is +inf (as DStar); 0/0 is 0.
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "kulczynski1")
    den = a_nf + a_ep
    return jnp.where(
        den == 0, jnp.where(a_ef > 0, jnp.inf, 0.0), a_ef / jnp.where(den == 0, 1.0, den)
    )


@count_measure
def kulczynski2(counts: Counts) -> jax.Array:
    """Kulczynski2 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``(a_ef / (a_ef + a_nf) + a_ef / (a_ef + a_ep)) / 2``

    Edge cases: each 0/0 term is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "kulczynski2")
    return 0.5 * (_ratio(a_ef, a_ef + a_nf) + _ratio(a_ef, a_ef + a_ep))


@count_measure
def zoltar(counts: Counts) -> jax.Array:
    """Zoltar (Gonzalez-Sanchez, TU Delft 2007).

    ``a_ef / (a_ef + a_nf + a_ep + 10000 a_nf a_ep / a_ef)``

    Edge cases: a_ef = 0 gives 0 (the penalty's x/0 and the 0/0 included).
    Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "zoltar")
    penalty = _ratio(10000.0 * a_nf * a_ep, a_ef)
    return _ratio(a_ef, a_ef + a_nf + a_ep + penalty)


@count_measure
def wong1(counts: Counts) -> jax.Array:
    """Wong1 (Wong, Qi, Zhao, Cai, COMPSAC 2007): ``a_ef``.

    Edge cases: always defined (no division: no 0/0 or x/0).
    """
    _, a_ef, _, _ = _counts(counts, "wong1")
    return a_ef


@count_measure
def wong2(counts: Counts) -> jax.Array:
    """Wong2 (Wong, Qi, Zhao, Cai, COMPSAC 2007): ``a_ef - a_ep``.

    Edge cases: always defined (no division: no 0/0 or x/0).
    """
    a_ep, a_ef, _, _ = _counts(counts, "wong2")
    return a_ef - a_ep


@count_measure
def wong3(counts: Counts) -> jax.Array:
    """Wong3 (Wong, Qi, Zhao, Cai, COMPSAC 2007).

    ``a_ef - h``, with ``h = a_ep`` for a_ep <= 2, ``2 + 0.1 (a_ep - 2)`` for
    2 < a_ep <= 10, ``2.8 + 0.001 (a_ep - 10)`` above.

    Edge cases: always defined (no division: no 0/0 or x/0).
    """
    a_ep, a_ef, _, _ = _counts(counts, "wong3")
    h = jnp.where(
        a_ep <= 2,
        a_ep,
        jnp.where(a_ep <= 10, 2.0 + 0.1 * (a_ep - 2.0), 2.8 + 0.001 * (a_ep - 10.0)),
    )
    return a_ef - h


@count_measure
def russell_rao(counts: Counts) -> jax.Array:
    """Russell and Rao (1940), as in Naish et al., TOSEM 2011.

    ``a_ef / (F + P)``

    Edge cases: 0/0 (no input) is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _counts(counts, "russell_rao")
    return _ratio(a_ef, a_ef + a_nf + a_ep + a_np)


@count_measure
def sorensen_dice(counts: Counts) -> jax.Array:
    """Sorensen-Dice (Dice 1945), as in Naish et al., TOSEM 2011.

    ``2 a_ef / (2 a_ef + a_nf + a_ep)``

    Edge cases: 0/0 is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "sorensen_dice")
    return _ratio(2.0 * a_ef, 2.0 * a_ef + a_nf + a_ep)


@count_measure
def anderberg(counts: Counts) -> jax.Array:
    """Anderberg (1973), as in Naish et al., TOSEM 2011.

    ``a_ef / (a_ef + 2 (a_nf + a_ep))``

    Edge cases: 0/0 is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _counts(counts, "anderberg")
    return _ratio(a_ef, a_ef + 2.0 * (a_nf + a_ep))


@count_measure
def gp13(counts: Counts) -> jax.Array:
    """GP13 (Yoo, 2012; Xie et al., TOSEM 2013).

    ``a_ef (1 + 1 / (2 a_ep + a_ef))``

    Edge cases: never active, the term 1/0 (x/0) is taken as 0, so the score is
    0 * 1 = 0; no 0/0 arises.
    """
    a_ep, a_ef, _, _ = _counts(counts, "gp13")
    return a_ef * (1.0 + _ratio(jnp.ones_like(a_ef), 2.0 * a_ep + a_ef))


@count_measure
def ample(counts: Counts) -> jax.Array:
    """AMPLE (Dallmeier, Lindig, Zeller, ECOOP 2005).

    ``| a_ef / F - a_ep / P |``

    Edge cases: a 0/0 term (F = 0 or P = 0) is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _counts(counts, "ample")
    return jnp.abs(_ratio(a_ef, a_ef + a_nf) - _ratio(a_ep, a_ep + a_np))


@attribution_measure
def gradxact(sums: AttributionSums) -> jax.Array:
    """Gradient x activation of the loss, averaged over all inputs.

    ``(sum_pass + sum_fail of a * d loss / d a) / (P + F)``: the first-order
    drop of the mean cross-entropy loss when the neuron is zeroed. A neuron
    that pushes inputs toward wrong classes scores high; one the model needs
    scores below zero.

    Edge cases: no input (P + F = 0) gives 0.
    """
    s = _sums(sums, "gradxact")
    gp, gf, n_p, n_f = _f(s.gxa_pass, s.gxa_fail, s.n_pass, s.n_fail)
    return _ratio(gp + gf, n_p + n_f)


@attribution_measure
def actdiff(sums: AttributionSums) -> jax.Array:
    """Mean activation on failing inputs minus mean activation on passing inputs.

    ``sum_fail a / F - sum_pass a / P``: the float analogue of the hit
    spectrum (how much more the neuron fires when the model fails).

    Edge cases: a mean over no input (F = 0 or P = 0) is 0.
    """
    s = _sums(sums, "actdiff")
    ap, af, n_p, n_f = _f(s.act_pass, s.act_fail, s.n_pass, s.n_fail)
    return _ratio(af, n_f) - _ratio(ap, n_p)


@attribution_measure
def linear_ablation(sums: AttributionSums) -> jax.Array:
    """Linearised ablation: predicted fixes of failing inputs minus predicted breaks of passing ones.

    ``fixes - breaks``, where whether an input is right with the neuron zeroed
    is predicted to first order: by default from the margin between the true
    class and its strongest rival, ``m - J_m``; with ``attribution="all-classes"``
    from every class's logit, ``z - J`` (see
    :class:`~deepfault_jax.attribution.Attribution`). A neuron whose removal
    would repair more inputs than it breaks scores above zero.

    Edge cases: none (a difference of counts); an integer-valued float32.
    """
    s = _sums(sums, "linear_ablation")
    fx, br = _f(s.fixes, s.breaks)
    return fx - br


def measure_names(*, family: str | None = None) -> tuple[str, ...]:
    """The names :func:`get_measure` accepts, in a fixed order (the paper's three first).

    Args:
      family: ``"counts"`` or ``"attribution"`` for one family; None for both.
    """
    if family is not None and family not in FAMILIES:
        raise InputError(f"family must be 'counts', 'attribution' or None; got {family!r}")
    return tuple(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def _key(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise InputError(f"unknown measure {name!r}; expected one of {', '.join(measure_names())}")
    return key


def measure_kind(measure: str | Measure) -> str:
    """The family a measure was registered with: ``"counts"`` for a function of a
    :class:`~deepfault_jax.spectrum.Counts`, ``"attribution"`` for one of an
    :class:`~deepfault_jax.attribution.AttributionSums` (see :data:`FAMILIES`).

    Args:
      measure: a registered name, or a measure function (from :func:`get_measure`,
        a ``functools.partial`` of one, or a function of your own: one not
        registered is a count measure).
    """
    if isinstance(measure, str):
        return _REGISTRY[_key(measure)].family
    fn = measure
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "measure_family", "counts")


def measure_parameters(name: str) -> dict[str, Any]:
    """The hyperparameters of measure ``name`` and their defaults (``{"star": 3.0}`` for dstar)."""
    return {p.name: p.default for p in _hyperparameters(_REGISTRY[_key(name)].fn)}


def get_measure(name: str, **params: float) -> Measure:
    """The measure called ``name``, with its hyperparameters checked and bound.

    Args:
      name: one of :func:`measure_names` (case-insensitive; ``-`` and ``_`` are the same).
      **params: the measure's hyperparameters (``star`` for ``dstar``): finite
        numbers (and > 0 where the measure says so).

    Returns:
      A function of the family's NamedTuple (:data:`FAMILIES`): ``Counts ->
      score`` (count measures) or ``AttributionSums -> score`` (attribution
      measures, see :func:`measure_kind`), pure and jit-able. The registered
      function itself when no parameter is given.

    Raises:
      InputError: an unknown name (the message lists the names) or parameter,
        or a parameter that is not finite or out of its range.

    Example:
      >>> score = get_measure("dstar", star=2)(spectrum.pooled())  # doctest: +SKIP
    """
    key = _key(name)
    entry = _REGISTRY[key]
    accepted = [p.name for p in _hyperparameters(entry.fn)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InputError(
            f"measure {key!r} takes parameters [{', '.join(accepted) or 'none'}]; got {unknown}"
        )
    for param, value in params.items():
        positive = param in entry.positive
        check_finite(f"{key}'s {param}", value, lo=0.0 if positive else None, lo_open=positive)
    # the values are bound as given: star=2 and star=2.0 round differently in float32
    return functools.partial(entry.fn, **params) if params else entry.fn
