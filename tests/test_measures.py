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

from deepfault_jax import localize, measures

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
    got = fn(*grid)
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
    got = jax.jit(measures.get_measure(name))(a_s, a_f, n_s, n_f)
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
        measures.get_measure("dstar", star=star)(*grid), measure_loops("dstar", *grid, star=star)
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
    ours = np.asarray(measures.get_measure(name)(a_s, a_f, n_s, n_f), np.float64)
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
        ValueError, match="unknown measure 'naive'; expected one of tarantula, ochiai, dstar, "
    ):
        measures.get_measure("naive")
    with pytest.raises(
        ValueError, match=r"measure 'ochiai' takes parameters \[none\]; got \['star'\]"
    ):
        measures.get_measure("ochiai", star=2)
    with pytest.raises(ValueError, match="star must be > 0; got -1"):
        measures.get_measure("dstar", star=-1)
