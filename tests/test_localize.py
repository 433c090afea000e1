"""Top-k, the random baseline, ranking tables, agreement, and the localize command."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from scipy.stats import chisquare

from deepfault_jax import cli, localize, measures, probe, spectrum, spectrum_io
from deepfault_jax.errors import InputError, InputTypeError


@pytest.fixture(scope="module")
def spec():
    rng = np.random.default_rng(0)
    index = probe.NeuronIndex(("conv_0", "dense_0", "dense_1"), (4, 10, 6))
    n_pass = rng.integers(20, 40, 3)
    n_fail = rng.integers(0, 10, 3)
    a_pass = (rng.random((3, 20)) * n_pass[:, None]).astype(np.int32)
    a_fail = (rng.random((3, 20)) * n_fail[:, None]).astype(np.int32)
    return spectrum.Spectrum(
        *(jax.numpy.asarray(a, jax.numpy.int32) for a in (a_pass, a_fail, n_pass, n_fail)),
        index,
        0.0,
    )


def test_top_k_breaks_ties_by_lower_id():
    score = np.array([0.5, 1.0, 0.5, np.inf, 1.0, 0.0, 0.5])
    np.testing.assert_array_equal(localize.top_k_neurons(score, 5), [3, 1, 4, 0, 2])
    per_class = np.stack([score, score[::-1]])
    np.testing.assert_array_equal(localize.top_k_neurons(per_class, 2), [[3, 1], [3, 2]])
    np.testing.assert_array_equal(
        localize.top_k_neurons(score, 2, allowed=np.array([0, 2, 5, 6])), [0, 2]
    )
    for shuffled in range(5):  # the result does not depend on how ties arrive
        perm = np.random.default_rng(shuffled).permutation(7)
        assert set(perm[localize.top_k_neurons(score[perm], 3)]) == {3, 1, 4}


@pytest.mark.parametrize("k", [0, -1, 8])
def test_top_k_refuses_bad_k(k):
    with pytest.raises(ValueError, match=rf"k must lie in \[1, 7\].*got {k}"):
        localize.top_k_neurons(np.zeros(7), k)


def test_top_k_refuses_nan_and_non_integer_k():
    with pytest.raises(ValueError, match="must not be NaN"):
        localize.top_k_neurons(np.array([0.0, np.nan]), 1)
    with pytest.raises(InputError, match="k must be an integer; got 1.5"):
        localize.top_k_neurons(np.zeros(3), 1.5)


@pytest.mark.parametrize(
    ("k", "error"),
    [
        (3.5, InputError),
        (True, InputTypeError),
        (None, InputTypeError),
        ("3", InputTypeError),
        (float("nan"), InputError),
        (float("inf"), InputError),
        (np.float64(2.5), InputError),
    ],
)
def test_k_must_be_an_integer_everywhere(spec, k, error):
    with pytest.raises(error, match="k must be an integer"):
        localize.top_k_neurons(np.zeros(7), k)
    with pytest.raises(error, match="k must be an integer"):
        localize.suspicious_neurons(spec, "ochiai", k)
    with pytest.raises(error, match="k must be an integer"):
        localize.random_neurons(jax.random.key(0), spec.index, k)


def test_integral_k_of_other_types_is_accepted(spec):
    for k in (3.0, np.int64(3), np.int32(3)):
        np.testing.assert_array_equal(
            localize.top_k_neurons(np.arange(7.0), k), localize.top_k_neurons(np.arange(7.0), 3)
        )
        assert localize.random_neurons(jax.random.key(0), spec.index, k).shape == (3,)


def test_allowed_ids_are_integers_distinct_and_in_range():
    score = np.array([0.5, 1.0, 0.5, np.inf, 1.0, 0.0, 0.5])
    # floats used to be truncated (0.5 -> 0, 2.7 -> 2) without a word
    with pytest.raises(InputTypeError, match="allowed ids must be integers; got float64"):
        localize.top_k_neurons(score, 1, allowed=np.array([0.5, 2.7]))
    # a repeated id used to come back twice in the top k
    with pytest.raises(InputError, match=r"allowed ids must be distinct; got 1 repeated"):
        localize.top_k_neurons(score, 2, allowed=np.array([1, 1, 4]))
    with pytest.raises(InputError, match=r"allowed ids must lie in \[0, 7\); got range \[0, 7\]"):
        localize.top_k_neurons(score, 1, allowed=np.array([0, 7]))
    with pytest.raises(InputError, match=r"allowed ids must lie in \[0, 7\); got range \[-1, 2\]"):
        localize.top_k_neurons(score, 1, allowed=[-1, 2])
    with pytest.raises(InputError, match=r"allowed must be a \[neurons\] list of ids; got shape"):
        localize.top_k_neurons(score, 1, allowed=np.array([[0, 2]]))


def test_unsorted_allowed_ids_still_break_ties_by_lower_id():
    score = np.array([0.5, 1.0, 0.5, np.inf, 1.0, 0.0, 0.5])
    np.testing.assert_array_equal(localize.top_k_neurons(score, 2, allowed=[6, 2, 0]), [0, 2])
    np.testing.assert_array_equal(
        localize.top_k_neurons(score, 3, allowed=[6, 2, 0]),
        localize.top_k_neurons(score, 3, allowed=[0, 2, 6]),
    )


def test_scores_need_a_neuron_axis():
    with pytest.raises(InputError, match=r"scores must be \[neurons\] or \[classes, neurons\]"):
        localize.top_k_neurons(np.float32(1.0), 1)
    with pytest.raises(InputError, match=r"scores must be \[neurons\] or \[classes, neurons\]"):
        localize.top_k_neurons(np.zeros((2, 3, 4)), 1)


def test_random_neurons_refuses_exclusions_outside_the_neurons(spec):
    key = jax.random.key(0)
    # an id past the neurons, or a negative one, used to be ignored; a float truncated
    with pytest.raises(InputError, match=r"exclude ids must lie in \[0, 20\); got range \[3, 20\]"):
        localize.random_neurons(key, spec.index, 2, exclude=[3, 20])
    with pytest.raises(InputError, match=r"exclude ids must lie in \[0, 20\); got range \[-1, 3\]"):
        localize.random_neurons(key, spec.index, 2, exclude=np.array([[-1, 3]]))
    with pytest.raises(InputTypeError, match="exclude ids must be integers; got float64"):
        localize.random_neurons(key, spec.index, 2, exclude=[4.5])
    base = localize.random_neurons(key, spec.index, 2, exclude=np.array([], np.int64))
    np.testing.assert_array_equal(base, localize.random_neurons(key, spec.index, 2))
    np.testing.assert_array_equal(base, localize.random_neurons(key, spec.index, 2, exclude=[]))


def test_scores_per_class_and_pooled(spec):
    per_class = localize.suspiciousness(spec, "ochiai")
    pooled = localize.suspiciousness(spec, "ochiai", pooled=True)
    assert per_class.shape == (3, 20) and pooled.shape == (20,)
    np.testing.assert_array_equal(pooled, measures.ochiai(spec.pooled()))
    np.testing.assert_array_equal(per_class[1], measures.ochiai(spec.for_class(1)))
    np.testing.assert_array_equal(
        localize.suspiciousness(spec, "dstar", star=2), measures.dstar(spec.counts(), star=2)
    )


def test_suspicious_neurons_within_layers(spec):
    ids = localize.suspicious_neurons(spec, "tarantula", 3, layers=["dense_1"])
    assert ids.shape == (3, 3) and ((ids >= 14) & (ids < 20)).all()
    pooled = localize.suspicious_neurons(spec, "tarantula", 5, pooled=True)
    np.testing.assert_array_equal(
        pooled, localize.top_k_neurons(localize.suspiciousness(spec, "tarantula", pooled=True), 5)
    )
    with pytest.raises(
        ValueError, match="unknown layer 'dense_7'; expected one of conv_0, dense_0, dense_1"
    ):
        localize.suspicious_neurons(spec, "tarantula", 3, layers=["dense_0", "dense_7"])
    with pytest.raises(ValueError, match=r"k must lie in \[1, 6\]"):
        localize.suspicious_neurons(spec, "tarantula", 7, layers=["dense_1"])


def test_random_baseline_is_uniform_and_respects_exclusion(spec):
    exclude = np.array([[4, 5, 6], [7, 8, 4]])
    allowed = np.setdiff1d(np.arange(4, 14), exclude)  # dense_0 minus excluded: 5 neurons
    draws = 3000
    counts = np.zeros(20, np.int64)
    base = jax.random.key(1234)
    for i in range(draws):
        ids = localize.random_neurons(
            jax.random.fold_in(base, i), spec.index, 2, layers=["dense_0"], exclude=exclude
        )
        assert len(set(ids.tolist())) == 2
        counts[ids] += 1
    assert counts[np.setdiff1d(np.arange(20), allowed)].sum() == 0  # never an excluded neuron
    observed = counts[allowed]
    assert observed.sum() == 2 * draws
    assert chisquare(observed).pvalue > 0.001  # uniform over the allowed neurons
    again = localize.random_neurons(
        jax.random.fold_in(base, 0), spec.index, 2, layers=["dense_0"], exclude=exclude
    )
    first = localize.random_neurons(
        jax.random.fold_in(base, 0), spec.index, 2, layers=["dense_0"], exclude=exclude
    )
    np.testing.assert_array_equal(again, first)  # the same key, the same draw
    with pytest.raises(ValueError, match=r"k must lie in \[1, 5\]"):
        localize.random_neurons(base, spec.index, 6, layers=["dense_0"], exclude=exclude)


def test_ranking_table_and_agreement(spec):
    score = localize.suspiciousness(spec, "dstar", pooled=True)
    ids = localize.top_k_neurons(score, 4)
    rows = localize.ranking_table(spec, score, ids)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    a_s, a_f, n_s, n_f = (np.asarray(c) for c in spec.pooled())
    for r in rows:
        assert spec.index.locate(r["id"]) == (r["layer"], r["unit"])
        assert (r["a_s"], r["a_f"], r["n_s"], r["n_f"]) == (
            a_s[r["id"]],
            a_f[r["id"]],
            n_s[r["id"]],
            n_f[r["id"]],
        )
        assert r["score"] == float(score[r["id"]])
    same = localize.measure_agreement(score, score, 5)
    assert same["top_k_overlap"] == 1.0 and same["kendall_tau"] == pytest.approx(1.0)
    reverse = localize.measure_agreement(np.arange(20.0), -np.arange(20.0), 5)
    assert reverse["top_k_overlap"] == 0.0 and reverse["kendall_tau"] == pytest.approx(-1.0)
    assert localize.measure_agreement(np.zeros(20), np.arange(20.0), 3)["kendall_tau"] is None


# --------------------------------------------------------------------------- command line


@pytest.fixture()
def spec_file(spec, tmp_path):
    return spectrum_io.save_spectrum(tmp_path / "s.npz", spec)


def test_localize_json_lists_neurons_in_rank_order(capsys, spec, spec_file):
    code = cli.main(["localize", "--spectrum", str(spec_file), "--measure", "dstar", "--star", "2",
                     "--k", "5", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    score = localize.suspiciousness(spec, "dstar", pooled=True, star=2)
    expected = localize.top_k_neurons(score, 5)
    assert [n["id"] for n in out["neurons"]] == expected.tolist()
    for n in out["neurons"]:
        assert set(n) >= {"id", "layer", "unit", "score", "a_s", "a_f", "n_s", "n_f"}
        assert n["score"] == "inf" or n["score"] == pytest.approx(float(score[n["id"]]))
    assert out["pooled"] is True and out["params"] == {"star": 2.0}


def test_localize_one_class_and_layers(capsys, spec, spec_file):
    code = cli.main(["localize", "--spectrum", str(spec_file), "--measure", "ochiai", "--k", "3",
                     "--class", "2", "--layers", "dense_1", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["class"] == 2
    expected = localize.top_k_neurons(
        localize.suspiciousness(spec, "ochiai")[2], 3, allowed=np.arange(14, 20)
    )
    assert [n["id"] for n in out["neurons"]] == expected.tolist()
    assert {n["layer"] for n in out["neurons"]} == {"dense_1"}
    code = cli.main(
        ["localize", "--spectrum", str(spec_file), "--measure", "tarantula", "--k", "2"]
    )
    human = capsys.readouterr().out
    assert code == 0 and "top 2 neurons by tarantula (all classes pooled)" in human


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--measure", "foo"], "unknown measure 'foo'; expected one of tarantula, ochiai, dstar"),
        (["--measure", "tarantula", "--k", "0"], "k must lie in [1, 20]"),
        (["--measure", "tarantula", "--k", "21"], "k must lie in [1, 20]"),
        (["--class", "3"], "--class must lie in [0, 3); got 3"),
        (["--star", "2"], "--star is a parameter of dstar"),
        (["--measure", "dstar", "--star", "inf"], "dstar's star must be a finite number; got inf"),
        (["--measure", "dstar", "--star", "nan"], "dstar's star must be a finite number; got nan"),
        (["--measure", "dstar", "--star", "0"], "dstar's star must lie in (0, inf]; got 0"),
        (["--measure", "tarantula", "--layers", "x"], "unknown layer 'x'"),
        (["--class", "1", "--pooled"], "not allowed with argument"),
    ],
)
def test_localize_usage_errors(capsys, spec_file, extra, fragment):
    if "--measure" not in extra:  # the default, gradxact, needs attribution sums
        extra = ["--measure", "tarantula", *extra]
    code = cli.main(["localize", "--spectrum", str(spec_file), *extra])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and fragment in captured.err


def test_localize_corrupt_spectrum(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    code = cli.main(["localize", "--spectrum", str(bad)])
    assert code == 2 and "not a readable spectrum file" in capsys.readouterr().err
