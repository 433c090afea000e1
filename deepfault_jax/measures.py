"""Suspiciousness measures: pure, vectorised functions of the four spectrum counts.

Every measure takes the paper's four counts of a set of neurons (any shape,
``[neurons]`` or ``[classes, neurons]``; integers or floats) and returns a
float32 score of the same shape; a higher score is more suspicious. In the
formulas (spectrum-based fault localization notation):

* ``a_ef`` = A_f, active on failing inputs;   ``a_nf`` = N_f, inactive on failing inputs;
* ``a_ep`` = A_s, active on passing inputs;   ``a_np`` = N_s, inactive on passing inputs;
* ``F = a_ef + a_nf`` failing inputs, ``P = a_ep + a_np`` passing inputs.

No measure returns NaN. A ratio with a zero denominator is given the value
that ranks the neuron as the original DeepFault does where it is defined: a
0/0 term is 0 (the original turns NaN into 0), and DStar's x/0 with x > 0 is
+inf, ranked first. Each docstring states its own rule.

Use :func:`get_measure` to look a measure up by name (with parameters) and
:func:`measure_names` for the list.

**Attribution measures** (DESIGN section 7) read the float sums gathered with
``attribution=True`` instead of the counts: ``gradxact``, ``actdiff`` and
``linear_ablation``. Each takes the eight arrays of
:class:`~deepfault_jax.attribution.AttributionSums` (``act_pass, act_fail,
gxa_pass, gxa_fail, fixes, breaks, n_pass, n_fail``); :func:`measure_kind` tells the
two families apart. They too never return NaN, and higher is more suspicious.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from deepfault_jax.errors import InputError

__all__ = [
    "Measure",
    "ample",
    "anderberg",
    "barinel",
    "dstar",
    "actdiff",
    "get_measure",
    "gp13",
    "gradxact",
    "measure_kind",
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

Measure = Callable[[ArrayLike, ArrayLike, ArrayLike, ArrayLike], jax.Array]


def _f(*counts: ArrayLike) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(c, jnp.float32) for c in counts)


def _ratio(num: jax.Array, den: jax.Array, *, when_zero: float = 0.0) -> jax.Array:
    """``num / den``, and ``when_zero`` where ``den == 0`` (no NaN, no inf)."""
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, when_zero, num / safe)


def tarantula(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Tarantula (Jones and Harrold, ASE 2005).

    ``(a_ef / F) / (a_ef / F + a_ep / P)``

    Edge cases: ``a_ef / F`` is 0 when F = 0 and ``a_ep / P`` is 0 when P = 0;
    0/0 overall (never active) is 0; x/0 cannot occur (the denominator is 0
    only when the numerator is). Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _f(a_s, a_f, n_s, n_f)
    fail = _ratio(a_ef, a_ef + a_nf)
    passed = _ratio(a_ep, a_ep + a_np)
    return _ratio(fail, fail + passed)


def ochiai(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Ochiai (Abreu, Zoeteweij, van Gemund, TAIC PART 2007).

    ``a_ef / sqrt(F * (a_ef + a_ep))``

    Edge cases: 0/0 (no failing input, or never active) is 0; x/0 cannot occur
    (a_ef > 0 makes both factors positive). Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    return _ratio(a_ef, jnp.sqrt((a_ef + a_nf) * (a_ef + a_ep)))


def dstar(
    a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike, *, star: float = 3.0
) -> jax.Array:
    """DStar, D* (Wong, Debroy, Gao, Li, IEEE TR 2014); ``star`` = 3 as the original.

    ``a_ef ** star / (a_ep + a_nf)``

    Edge cases: x/0 with a_ef > 0 (active on every failing input, on no
    passing one) is +inf, ranked first; 0/0 is 0. A float32 overflow of
    ``a_ef ** star`` also gives +inf.
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    num = a_ef**star
    den = a_ep + a_nf
    return jnp.where(
        den == 0, jnp.where(a_ef > 0, jnp.inf, 0.0), num / jnp.where(den == 0, 1.0, den)
    )


def jaccard(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Jaccard (Chen et al., DSN 2002).

    ``a_ef / (a_ef + a_nf + a_ep)``

    Edge cases: 0/0 is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    return _ratio(a_ef, a_ef + a_nf + a_ep)


def ochiai2(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Ochiai2 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``a_ef * a_np / sqrt((a_ef + a_ep) (a_nf + a_np) (a_ef + a_np) (a_ep + a_nf))``

    Edge cases: 0/0 and x/0 (a zero factor in the denominator) are 0. Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _f(a_s, a_f, n_s, n_f)
    # the product of four counts can pass float32's range: take the root of each pair
    den = jnp.sqrt((a_ef + a_ep) * (a_nf + a_np)) * jnp.sqrt((a_ef + a_np) * (a_ep + a_nf))
    return _ratio(a_ef * a_np, den)


def op2(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Op2 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``a_ef - a_ep / (P + 1)``

    Edge cases: always defined (P + 1 > 0: no 0/0 or x/0).
    """
    a_ep, a_ef, a_np, _ = _f(a_s, a_f, n_s, n_f)
    return a_ef - a_ep / (a_ep + a_np + 1.0)


def barinel(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Barinel (Abreu, Zoeteweij, van Gemund, ASE 2009).

    ``1 - a_ep / (a_ep + a_ef)``

    Edge cases: 0/0 (never active) is 0, the least suspicious; x/0 cannot occur.
    Range [0, 1].
    """
    a_ep, a_ef, _, _ = _f(a_s, a_f, n_s, n_f)
    # computed as a_ef / (a_ep + a_ef), the same value without float cancellation
    return _ratio(a_ef, a_ep + a_ef)


def kulczynski1(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Kulczynski1 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``a_ef / (a_nf + a_ep)``

    Edge cases: x/0 with a_ef > 0 is +inf (as DStar); 0/0 is 0.
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    den = a_nf + a_ep
    return jnp.where(
        den == 0, jnp.where(a_ef > 0, jnp.inf, 0.0), a_ef / jnp.where(den == 0, 1.0, den)
    )


def kulczynski2(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Kulczynski2 (Naish, Lee, Ramamohanarao, TOSEM 2011).

    ``(a_ef / (a_ef + a_nf) + a_ef / (a_ef + a_ep)) / 2``

    Edge cases: each 0/0 term is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    return 0.5 * (_ratio(a_ef, a_ef + a_nf) + _ratio(a_ef, a_ef + a_ep))


def zoltar(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Zoltar (Gonzalez-Sanchez, TU Delft 2007).

    ``a_ef / (a_ef + a_nf + a_ep + 10000 a_nf a_ep / a_ef)``

    Edge cases: a_ef = 0 gives 0 (the penalty's x/0 and the 0/0 included).
    Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    penalty = _ratio(10000.0 * a_nf * a_ep, a_ef)
    return _ratio(a_ef, a_ef + a_nf + a_ep + penalty)


def wong1(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Wong1 (Wong, Qi, Zhao, Cai, COMPSAC 2007): ``a_ef``.

    Edge cases: always defined (no division: no 0/0 or x/0).
    """
    _, a_ef, _, _ = _f(a_s, a_f, n_s, n_f)
    return a_ef


def wong2(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Wong2 (Wong, Qi, Zhao, Cai, COMPSAC 2007): ``a_ef - a_ep``.

    Edge cases: always defined (no division: no 0/0 or x/0).
    """
    a_ep, a_ef, _, _ = _f(a_s, a_f, n_s, n_f)
    return a_ef - a_ep


def wong3(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Wong3 (Wong, Qi, Zhao, Cai, COMPSAC 2007).

    ``a_ef - h``, with ``h = a_ep`` for a_ep <= 2, ``2 + 0.1 (a_ep - 2)`` for
    2 < a_ep <= 10, ``2.8 + 0.001 (a_ep - 10)`` above.

    Edge cases: always defined (no division: no 0/0 or x/0).
    """
    a_ep, a_ef, _, _ = _f(a_s, a_f, n_s, n_f)
    h = jnp.where(
        a_ep <= 2,
        a_ep,
        jnp.where(a_ep <= 10, 2.0 + 0.1 * (a_ep - 2.0), 2.8 + 0.001 * (a_ep - 10.0)),
    )
    return a_ef - h


def russell_rao(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Russell and Rao (1940), as in Naish et al., TOSEM 2011.

    ``a_ef / (F + P)``

    Edge cases: 0/0 (no input) is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _f(a_s, a_f, n_s, n_f)
    return _ratio(a_ef, a_ef + a_nf + a_ep + a_np)


def sorensen_dice(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Sorensen-Dice (Dice 1945), as in Naish et al., TOSEM 2011.

    ``2 a_ef / (2 a_ef + a_nf + a_ep)``

    Edge cases: 0/0 is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    return _ratio(2.0 * a_ef, 2.0 * a_ef + a_nf + a_ep)


def anderberg(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """Anderberg (1973), as in Naish et al., TOSEM 2011.

    ``a_ef / (a_ef + 2 (a_nf + a_ep))``

    Edge cases: 0/0 is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, _, a_nf = _f(a_s, a_f, n_s, n_f)
    return _ratio(a_ef, a_ef + 2.0 * (a_nf + a_ep))


def gp13(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """GP13 (Yoo, 2012; Xie et al., TOSEM 2013).

    ``a_ef (1 + 1 / (2 a_ep + a_ef))``

    Edge cases: never active, the term 1/0 (x/0) is taken as 0, so the score is
    0 * 1 = 0; no 0/0 arises.
    """
    a_ep, a_ef, _, _ = _f(a_s, a_f, n_s, n_f)
    return a_ef * (1.0 + _ratio(jnp.ones_like(a_ef), 2.0 * a_ep + a_ef))


def ample(a_s: ArrayLike, a_f: ArrayLike, n_s: ArrayLike, n_f: ArrayLike) -> jax.Array:
    """AMPLE (Dallmeier, Lindig, Zeller, ECOOP 2005).

    ``| a_ef / F - a_ep / P |``

    Edge cases: a 0/0 term (F = 0 or P = 0) is 0; x/0 cannot occur. Range [0, 1].
    """
    a_ep, a_ef, a_np, a_nf = _f(a_s, a_f, n_s, n_f)
    return jnp.abs(_ratio(a_ef, a_ef + a_nf) - _ratio(a_ep, a_ep + a_np))


def gradxact(
    act_pass: ArrayLike,
    act_fail: ArrayLike,
    gxa_pass: ArrayLike,
    gxa_fail: ArrayLike,
    fixes: ArrayLike,
    breaks: ArrayLike,
    n_pass: ArrayLike,
    n_fail: ArrayLike,
) -> jax.Array:
    """Gradient x activation of the loss, averaged over all inputs.

    ``(sum_pass + sum_fail of a * d loss / d a) / (P + F)``: the first-order
    drop of the mean cross-entropy loss when the neuron is zeroed. A neuron
    that pushes inputs toward wrong classes scores high; one the model needs
    scores below zero.

    Edge cases: no input (P + F = 0) gives 0.
    """
    del act_pass, act_fail, fixes, breaks
    gp, gf, n_p, n_f = _f(gxa_pass, gxa_fail, n_pass, n_fail)
    return _ratio(gp + gf, n_p + n_f)


def actdiff(
    act_pass: ArrayLike,
    act_fail: ArrayLike,
    gxa_pass: ArrayLike,
    gxa_fail: ArrayLike,
    fixes: ArrayLike,
    breaks: ArrayLike,
    n_pass: ArrayLike,
    n_fail: ArrayLike,
) -> jax.Array:
    """Mean activation on failing inputs minus mean activation on passing inputs.

    ``sum_fail a / F - sum_pass a / P``: the float analogue of the hit
    spectrum (how much more the neuron fires when the model fails).

    Edge cases: a mean over no input (F = 0 or P = 0) is 0.
    """
    del gxa_pass, gxa_fail, fixes, breaks
    ap, af, n_p, n_f = _f(act_pass, act_fail, n_pass, n_fail)
    return _ratio(af, n_f) - _ratio(ap, n_p)


def linear_ablation(
    act_pass: ArrayLike,
    act_fail: ArrayLike,
    gxa_pass: ArrayLike,
    gxa_fail: ArrayLike,
    fixes: ArrayLike,
    breaks: ArrayLike,
    n_pass: ArrayLike,
    n_fail: ArrayLike,
) -> jax.Array:
    """Linearised ablation: predicted fixes of failing inputs minus predicted breaks of passing ones.

    ``fixes - breaks``, where whether an input is right with the neuron zeroed
    is predicted to first order: by default from the margin between the true
    class and its strongest rival, ``m - J_m``; with ``attribution="all-classes"``
    from every class's logit, ``z - J`` (see
    :class:`~deepfault_jax.attribution.Attribution`). A neuron whose removal
    would repair more inputs than it breaks scores above zero.

    Edge cases: none (a difference of counts); an integer-valued float32.
    """
    del act_pass, act_fail, gxa_pass, gxa_fail, n_pass, n_fail
    fx, br = _f(fixes, breaks)
    return fx - br


_ATTRIBUTION = {"gradxact": gradxact, "actdiff": actdiff, "linear_ablation": linear_ablation}

_REGISTRY: dict[str, Callable[..., jax.Array]] = {
    "tarantula": tarantula,
    "ochiai": ochiai,
    "dstar": dstar,
    "jaccard": jaccard,
    "ochiai2": ochiai2,
    "op2": op2,
    "barinel": barinel,
    "kulczynski1": kulczynski1,
    "kulczynski2": kulczynski2,
    "zoltar": zoltar,
    "wong1": wong1,
    "wong2": wong2,
    "wong3": wong3,
    "russell_rao": russell_rao,
    "sorensen_dice": sorensen_dice,
    "anderberg": anderberg,
    "gp13": gp13,
    "ample": ample,
    **_ATTRIBUTION,
}


def measure_names(*, family: str | None = None) -> tuple[str, ...]:
    """The names :func:`get_measure` accepts, in a fixed order (the paper's three first).

    Args:
      family: ``"counts"`` or ``"attribution"`` for one family; None for both.
    """
    if family not in (None, "counts", "attribution"):
        raise InputError(f"family must be 'counts', 'attribution' or None; got {family!r}")
    return tuple(n for n in _REGISTRY if family is None or measure_kind(n) == family)


def _key(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise InputError(f"unknown measure {name!r}; expected one of {', '.join(measure_names())}")
    return key


def measure_kind(name: str) -> str:
    """``"counts"`` for a function of the four counts, ``"attribution"`` for one of the
    attribution sums (:class:`~deepfault_jax.attribution.AttributionSums`)."""
    return "attribution" if _key(name) in _ATTRIBUTION else "counts"


def get_measure(name: str, **params: float) -> Measure:
    """The measure called ``name``, with its parameters bound.

    Args:
      name: one of :func:`measure_names` (case-insensitive; ``-`` and ``_`` are the same).
      **params: the measure's parameters (``star`` for ``dstar``).

    Returns:
      A function ``(a_s, a_f, n_s, n_f) -> score`` (count measures) or of the
      eight attribution sums (attribution measures, see :func:`measure_kind`), pure
      and jit-able.

    Raises:
      ValueError: an unknown name (the message lists the names) or parameter.

    Example:
      >>> score = get_measure("dstar", star=2)(a_s, a_f, n_s, n_f)  # doctest: +SKIP
    """
    key = _key(name)
    fn = _REGISTRY[key]
    accepted = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - {p.name for p in accepted})
    if unknown:
        expected = ", ".join(p.name for p in accepted) or "none"
        raise InputError(f"measure {key!r} takes parameters [{expected}]; got {unknown}")
    if key == "dstar" and "star" in params and not params["star"] > 0:
        raise InputError(f"dstar's star must be > 0; got {params['star']}")
    return functools.partial(fn, **params) if params else fn
