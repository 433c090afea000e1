"""Measures against float64 references written from their formulas; no NaN, ever."""

from __future__ import annotations

import itertools

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import measure_loops, original_scores

from deepfault_jax import localize, measures, probe
from deepfault_jax.attribution import Attribution, AttributionSums
from deepfault_jax.errors import InputError, InputTypeError
from deepfault_jax.spectrum import Counts, Spectrum

NAMES = measures.measure_names(family="counts")
EXTREMES = [0, 1, 2, 3, 10, 11, 1000, 2**20, 2**31 - 1]


def _assert_close(got, want):
    got = np.asarray(got, np.float64).ravel()
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=0)


def test_at_least_fifteen_measures_with_documented_edge_cases():
    assert len(NAMES) >= 15
    assert NAMES[:3] == ("tarantula", "ochiai", "dstar")
    for name in NAMES:
        doc = measures.get_measure(name).__doc__
        assert "Edge cases:" in doc and "0/0" in doc and "x/0" in doc, name


@pytest.mark.parametrize("name", NAMES)
def test_every_combination_of_small_counts_under_jit(name):
    grid = np.array(list(itertools.product(range(4), repeat=4)), np.int32).T  # 256 combinations
    fn = jax.jit(measures.get_measure(name))
    got = fn(Counts(*grid))
    assert got.shape == (256,) and got.dtype == np.float32
    _assert_close(got, measure_loops(name, *grid))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    counts=hnp.arrays(
        np.int64, (4, 2, 7), elements=st.sampled_from(EXTREMES) | st.integers(0, 5000)
    ),
)
def test_measures_match_float64_reference(name, counts):
    a_s, a_f, n_s, n_f = counts.astype(np.int32)
    got = jax.jit(measures.get_measure(name))(Counts(a_s, a_f, n_s, n_f))
    assert got.shape == (2, 7)
    want = measure_loops(name, a_s, a_f, n_s, n_f)
    # differences of huge counts (wong2, wong3, op2) lose float32 precision: compare
    # those relative to the counts themselves
    if name in ("wong2", "wong3", "op2"):
        scale = np.maximum(1.0, np.maximum(a_s, a_f).astype(np.float64).ravel())
        np.testing.assert_allclose(
            np.asarray(got, np.float64).ravel() / scale, want / scale, atol=1e-6
        )
    elif name == "ample":  # a difference of two ratios in [0, 1]: absolute float32 error
        np.testing.assert_allclose(np.asarray(got, np.float64).ravel(), want, rtol=0, atol=1e-6)
    else:
        _assert_close(got, want)


@pytest.mark.parametrize("star", [1.0, 2.0, 3.0, 0.5])
def test_dstar_star_parameter(star):
    grid = np.array(list(itertools.product([0, 1, 5, 40], repeat=4)), np.int32).T
    _assert_close(
        measures.get_measure("dstar", star=star)(Counts(*grid)),
        measure_loops("dstar", *grid, star=star),
    )


@pytest.mark.parametrize("name", ["tarantula", "ochiai", "dstar"])
def test_rankings_match_the_original_where_it_is_defined(name):
    rng = np.random.default_rng(0)
    # spectra-like counts per neuron: 60 passing, 25 failing inputs, some never active
    a_s = rng.integers(0, 61, 400)
    a_f = rng.integers(0, 26, 400)
    a_s[:20], a_f[:20] = 0, 0
    a_s[20:30] = 0  # DStar x/0 -> +inf when also a_f == 25 (no N_f)
    a_f[20:30] = 25
    n_s, n_f = 60 - a_s, 25 - a_f
    original, defined = original_scores(name, a_s, a_f, n_s, n_f)
    ours = np.asarray(measures.get_measure(name)(Counts(a_s, a_f, n_s, n_f)), np.float64)
    np.testing.assert_allclose(
        ours[defined & np.isfinite(original)], original[defined & np.isfinite(original)], rtol=1e-6
    )
    # +inf where the original has +inf, ranked first
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(original))
    ids = np.flatnonzero(defined)
    ours_order = ids[localize.top_k_neurons(ours[ids], ids.size)]
    # along our ranking the original's scores never rise, except between values
    # that are mathematically equal (equal rationals differ by float rounding)
    along = original[ours_order]
    finite = np.isfinite(along[:-1]) & np.isfinite(along[1:])
    rises = along[1:][finite] - along[:-1][finite]
    assert (rises <= 1e-6 * np.maximum(1.0, np.abs(along[1:][finite]))).all()
    assert np.isposinf(along[: np.isposinf(along).sum()]).all()  # +inf first
    if name == "dstar":
        assert set(ours_order[:10]) == set(range(20, 30))


def test_get_errors_and_case():
    assert measures.get_measure("DStar") is measures.dstar
    assert measures.get_measure("russell-rao") is measures.russell_rao
    with pytest.raises(
        InputError, match="unknown measure 'naive'; expected one of tarantula, ochiai, dstar, "
    ):
        measures.get_measure("naive")
    with pytest.raises(
        InputError, match=r"measure 'ochiai' takes parameters \[none\]; got \['star'\]"
    ):
        measures.get_measure("ochiai", star=2)
    with pytest.raises(
        InputError, match=r"measure 'dstar' takes parameters \[star\]; got \['stars'\]"
    ):
        measures.get_measure("dstar", stars=2)
    with pytest.raises(InputError, match=r"measure 'gradxact' takes parameters \[none\]"):
        measures.get_measure("gradxact", star=2)
    with pytest.raises(InputError, match=r"dstar's star must lie in \(0, inf\]; got -1"):
        measures.get_measure("dstar", star=-1)


# --------------------------------------------------------------------------- the two families


def _spectrum_with_attribution(seed=0):
    rng = np.random.default_rng(seed)
    c, n = 3, 7
    n_pass, n_fail = rng.integers(1, 30, c), rng.integers(0, 9, c)
    a_pass = (rng.random((c, n)) * n_pass[:, None]).astype(np.int32)
    a_fail = (rng.random((c, n)) * n_fail[:, None]).astype(np.int32)
    floats = [rng.normal(size=(c, n)).astype(np.float32) for _ in range(4)]
    ints = [rng.integers(0, 4, (c, n)).astype(np.int32) for _ in range(2)]
    return Spectrum(
        *(jax.numpy.asarray(a, jax.numpy.int32) for a in (a_pass, a_fail, n_pass, n_fail)),
        probe.NeuronIndex(("dense_0", "dense_1"), (3, 4)),
        0.0,
        Attribution(*(jax.numpy.asarray(a) for a in floats + ints)),
    )


def test_every_measure_takes_the_namedtuple_of_its_registered_family():
    import typing

    assert measures.FAMILIES == {"counts": Counts, "attribution": AttributionSums}
    spec = _spectrum_with_attribution()
    inputs = {"counts": spec.counts(), "attribution": spec.attribution_sums()}
    assert set(measures.measure_names()) == set(NAMES) | set(
        measures.measure_names(family="attribution")
    )
    for name in measures.measure_names():
        family = measures.measure_kind(name)
        fn = measures.get_measure(name)
        assert measures.measure_kind(fn) == family, name
        first = next(iter(typing.get_type_hints(fn)))
        assert typing.get_type_hints(fn)[first] is measures.FAMILIES[family], name
        assert fn(inputs[family]).shape == (3, 7), name
        other = inputs["attribution" if family == "counts" else "counts"]
        with pytest.raises(
            InputTypeError, match=f"{name} takes an? {type(inputs[family]).__name__}"
        ):
            fn(other)
        with pytest.raises(TypeError):
            fn(*inputs[family])  # the old call shape: one argument per array


def test_suspiciousness_dispatches_on_the_family_for_names_and_functions():
    spec = _spectrum_with_attribution(1)
    for name in measures.measure_names():
        fn = measures.get_measure(name)
        family = measures.measure_kind(name)
        for pooled in (False, True):
            if family == "counts":
                want = fn(spec.pooled() if pooled else spec.counts())
            else:
                want = fn(spec.attribution_sums(pooled=pooled))
            for measure in (name, fn):
                got = localize.suspiciousness(spec, measure, pooled=pooled)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    bound = measures.get_measure("dstar", star=2)
    assert measures.measure_kind(bound) == "counts"
    np.testing.assert_array_equal(
        np.asarray(localize.suspiciousness(spec, bound)),
        np.asarray(localize.suspiciousness(spec, "dstar", star=2)),
    )
    # an unregistered function is a count measure
    np.testing.assert_array_equal(
        np.asarray(localize.suspiciousness(spec, lambda c: c.a_f, pooled=True)),
        np.asarray(spec.pooled().a_f),
    )


def test_suspiciousness_refuses_parameters_beside_a_function():
    # they used to be dropped silently: dstar with star=3, not the star asked for
    spec = _spectrum_with_attribution()
    with pytest.raises(InputError, match=r"parameters .*star.* a measure given by name"):
        localize.suspiciousness(spec, measures.dstar, star=2)


def test_measure_parameters_lists_the_hyperparameters_and_defaults():
    assert measures.measure_parameters("DStar") == {"star": 3.0}
    assert measures.measure_parameters("ochiai") == {}
    assert measures.measure_parameters("linear-ablation") == {}


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (float("inf"), InputError, "dstar's star must be a finite number; got inf"),
        (float("-inf"), InputError, "dstar's star must be a finite number; got -inf"),
        (float("nan"), InputError, "dstar's star must be a finite number; got nan"),
        (np.float32("inf"), InputError, "dstar's star must be a finite number; got inf"),
        (0, InputError, r"dstar's star must lie in \(0, inf\]; got 0"),
        (True, InputTypeError, "dstar's star must be a number; got bool True"),
        ("2", InputTypeError, "dstar's star must be a number; got str '2'"),
    ],
)
def test_hyperparameters_must_be_finite_at_get_measure(value, error, message):
    with pytest.raises(error, match=message):
        measures.get_measure("dstar", star=value)
    spec = _spectrum_with_attribution()
    with pytest.raises(error, match=message):
        localize.suspiciousness(spec, "dstar", star=value)


def test_star_keeps_its_type_so_scores_stay_bit_identical():
    grid = Counts(*np.array(list(itertools.product([0, 1, 5, 40, 5000], repeat=4)), np.int32).T)
    for star in (2, 2.0, np.float32(0.5), 3):
        got = measures.get_measure("dstar", star=star)(grid)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(measures.dstar(grid, star=star)))


def test_registering_a_name_twice_is_refused():
    with pytest.raises(InputError, match="measure 'ochiai' is registered already"):

        @measures.count_measure
        def ochiai(counts: Counts) -> jax.Array:
            """A second Ochiai."""
            return counts.a_f
