"""Synthesis against the original's formula, its bounds, and batch independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfault_jax import evaluate, probe, synthesis, zoo
from deepfault_jax.errors import InputError, InputTypeError


@pytest.fixture(scope="module")
def mlp():
    model = zoo.create_model(
        "mlp-3x50", input_shape=(4, 4, 1), num_classes=3, activation="leaky_relu"
    )
    params = zoo.init_params(jax.random.key(0), model)
    return model, params, probe.model_probe(model, params)


def _numpy_values(params, x):
    """Pre-activations of the three hidden layers, float64, by hand (leaky relu 0.01)."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    values = []
    for i in range(3):
        pre = h @ np.asarray(params[f"dense_{i}"]["kernel"], np.float64) + np.asarray(
            params[f"dense_{i}"]["bias"], np.float64
        )
        values.append(pre)
        h = np.where(pre > 0, pre, 0.01 * pre)
    return np.concatenate(values, axis=1)


def test_deepfault_mode_equals_the_original_formula(mlp):
    """The original: per input, one gradient per suspicious neuron (here by central
    finite differences in float64), averaged; delta = clip(step * mean, -d, d);
    x' = clip(x + delta, lo, hi)."""
    model, params, prb = mlp
    rng = np.random.default_rng(0)
    x = rng.random((6, 4, 4, 1))
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    table = np.array([[3, 60, 149], [7, 7, 120], [0, 99, 51]], np.int32)  # a repeated id too
    d, step, h = 0.05, 2.0, 1e-4
    want = np.zeros_like(x)
    for i in range(len(x)):
        grads = []
        for n in table[y[i]]:
            g = np.zeros(x[i].size)
            for p in range(x[i].size):
                e = np.zeros(x[i].size)
                e[p] = h
                up = _numpy_values(params, (x[i].ravel() + e).reshape(1, 4, 4, 1))[0, n]
                down = _numpy_values(params, (x[i].ravel() - e).reshape(1, 4, 4, 1))[0, n]
                g[p] = (up - down) / (2 * h)
            grads.append(g)
        delta = np.clip(step * np.mean(grads, axis=0), -d, d)
        want[i] = np.clip(x[i].ravel() + delta, 0.0, 1.0).reshape(4, 4, 1)
    synth = synthesis.make_synthesizer(prb, mode="deepfault", d=d, step_size=step)
    got = jax.jit(synthesis.synthesize, static_argnums=0)(
        synth, params, x.astype(np.float32), y, table
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    assert np.abs(np.asarray(got) - x).max() > 0.01  # the step moved the inputs


SYNTH_CASES = [
    {"mode": "deepfault", "step_size": 5.0},
    {"mode": "pgd", "direction": "sign", "steps": 4, "step_size": 0.04},
    {"mode": "pgd", "direction": "raw", "steps": 3, "step_size": 3.0},
    {"mode": "pgd", "direction": "l2", "steps": 3, "step_size": 0.5},
    {"mode": "pgd", "direction": optax.adam(0.05), "steps": 3},
    {
        "mode": "pgd",
        "direction": "sign",
        "steps": 5,
        "step_size": 0.05,
        "stop_when_misclassified": True,
    },
]


@settings(max_examples=25, deadline=None)
@given(
    case=st.sampled_from(range(len(SYNTH_CASES))),
    d=st.floats(0.001, 0.6),
    seed=st.integers(0, 2**16),
    lo_hi=st.sampled_from([(0.0, 1.0), (0.2, 0.9), (-1.0, 1.0)]),
)
def test_synthesized_inputs_stay_within_d_and_range(mlp, case, d, seed, lo_hi):
    model, params, prb = mlp
    lo, hi = lo_hi
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, (5, 4, 4, 1)).astype(np.float32)
    x[0] = lo  # inputs on the edges of the range
    x[1] = hi
    y = rng.integers(0, 3, 5).astype(np.int32)
    table = rng.integers(0, prb.index.num_neurons, (3, 4)).astype(np.int32)
    synth = synthesis.make_synthesizer(prb, d=d, lo=lo, hi=hi, **SYNTH_CASES[case])
    got = np.asarray(synthesis.synthesize(synth, params, x, y, table))
    assert np.abs(got - x).max() <= d * (1 + 1e-6) + 1e-6
    assert got.min() >= lo and got.max() <= hi


@pytest.mark.parametrize("case", [0, 2, 3, 4, 1])
def test_results_do_not_depend_on_the_batch(mlp, case):
    model, params, prb = mlp
    rng = np.random.default_rng(1)
    x = rng.random((21, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 3, 21).astype(np.int32)
    table = rng.integers(0, prb.index.num_neurons, (3, 5)).astype(np.int32)
    synth = synthesis.make_synthesizer(prb, d=0.1, **SYNTH_CASES[case])
    run = jax.jit(synthesis.synthesize, static_argnums=0)
    whole = np.asarray(run(synth, params, x, y, table))
    singles = np.concatenate(
        [np.asarray(run(synth, params, x[i : i + 1], y[i : i + 1], table)) for i in range(21)]
    )
    perm = rng.permutation(21)
    shuffled = np.asarray(run(synth, params, x[perm], y[perm], table))[np.argsort(perm)]
    sevens = np.concatenate(
        [np.asarray(run(synth, params, x[i : i + 7], y[i : i + 7], table)) for i in (0, 7, 14)]
    )
    for other in (singles, shuffled, sevens):
        np.testing.assert_allclose(other, whole, atol=1e-6)


def test_each_input_climbs_its_own_class_set(mlp):
    model, params, prb = mlp
    x = np.full((2, 4, 4, 1), 0.5, np.float32)
    y = np.array([0, 1], np.int32)
    table = np.array([[5], [77], [0]], np.int32)  # one row per class of the model
    synth = synthesis.make_synthesizer(
        prb, mode="pgd", d=0.2, steps=5, step_size=0.05, direction="sign"
    )
    got = synthesis.synthesize(synth, params, x, y, table)
    _, before = prb.flat(params, x)
    _, after = prb.flat(params, got)
    assert after[0, 5] > before[0, 5] and after[1, 77] > before[1, 77]


def test_one_compilation_for_a_stream_of_batches(mlp):
    model, params, prb = mlp
    traces = []

    def fn(p, x):
        traces.append(1)
        return prb.flat(p, x)[0], {"all": prb.flat(p, x)[1]}

    counted = probe.function_probe(fn, params, input_shape=(4, 4, 1))
    synth = synthesis.make_synthesizer(counted, mode="pgd", d=0.1, steps=3, step_size=0.03)
    run = jax.jit(synthesis.synthesize, static_argnums=0)
    table = np.zeros((3, 2), np.int32)
    x = np.random.default_rng(0).random((8, 4, 4, 1)).astype(np.float32)
    run(synth, params, x, np.zeros(8, np.int32), table)
    first = len(traces)
    assert first > 0
    for seed in range(1, 4):  # new batches of the same shape: no new trace, no compilation
        x = np.random.default_rng(seed).random((8, 4, 4, 1)).astype(np.float32)
        run(synth, params, x, np.full(8, seed % 3, np.int32), table)
    assert len(traces) == first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"d": 0.0},
            r"d \(the maximum L-inf distance\) must lie in \(0, hi - lo\] = \(0, 1\]; got 0",
        ),
        ({"d": -0.1}, r"must lie in \(0, hi - lo\] = \(0, 1\]; got -0.1"),
        ({"mode": "fgsm"}, "mode must be one of deepfault, pgd; got 'fgsm'"),
        ({"step_size": 0}, r"step_size must lie in \(0, inf\]; got 0"),
        ({"mode": "pgd", "steps": 0}, r"steps must lie in \[1, inf\]; got 0"),
        ({"mode": "pgd", "direction": "up"}, "direction must be one of raw, sign, l2"),
        ({"lo": 1.0, "hi": 0.0}, r"lo < hi; got \[1, 0\]"),
    ],
)
def test_bad_configuration(mlp, kwargs, message):
    with pytest.raises(InputError, match=message):
        synthesis.make_synthesizer(mlp[2], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        # each of these used to be accepted and gave inputs that are not what was asked
        ({"d": float("inf")}, InputError, "d must be a finite number; got inf"),
        ({"d": float("nan")}, InputError, "d must be a finite number; got nan"),
        (
            {"d": 1.5},
            InputError,
            r"d \(the maximum L-inf distance\) must lie in \(0, hi - lo\] = \(0, 1\]; got 1.5",
        ),
        ({"d": 0.8, "lo": 0.2, "hi": 0.9}, InputError, r"\(0, hi - lo\] = \(0, 0.7\]; got 0.8"),
        ({"step_size": float("inf")}, InputError, "step_size must be a finite number; got inf"),
        ({"step_size": float("nan")}, InputError, "step_size must be a finite number; got nan"),
        ({"mode": "pgd", "step_size": float("inf")}, InputError, "step_size must be a finite"),
        ({"mode": "pgd", "steps": 2.5}, InputError, "steps must be an integer; got 2.5"),
        ({"mode": "pgd", "steps": True}, InputTypeError, "steps must be an integer; got bool"),
        ({"mode": "pgd", "steps": float("inf")}, InputError, "steps must be an integer; got inf"),
        ({"steps": 0}, InputError, r"steps must lie in \[1, inf\]; got 0"),
        ({"lo": float("nan")}, InputError, "lo must be a finite number; got nan"),
        ({"hi": float("inf")}, InputError, "hi must be a finite number; got inf"),
        ({"d": True}, InputTypeError, "d must be a number; got bool True"),
    ],
)
def test_options_must_be_finite_and_d_within_the_range(mlp, kwargs, error, message):
    with pytest.raises(error, match=message):
        synthesis.make_synthesizer(mlp[2], **kwargs)


def test_d_equal_to_the_whole_range_is_accepted(mlp):
    model, params, prb = mlp
    synth = synthesis.make_synthesizer(prb, d=0.7, lo=0.2, hi=0.9)
    x = np.full((1, 4, 4, 1), 0.5, np.float32)
    got = synthesis.synthesize(synth, params, x, np.zeros(1, np.int32), np.zeros((3, 1), np.int32))
    assert got.shape == x.shape


BAD_TABLES = [
    # ids past the neurons: JAX gathers clamp them to the last neuron, without a word
    (np.array([[0, 1], [2, 150], [3, 4]], np.int32), InputError,
     r"table ids must lie in \[0, 150\) \(the probe's neurons\); got 150 at \[1, 1\]"),
    (np.array([[0, 1], [2, 3], [-1, 4]], np.int32), InputError,
     r"table ids must lie in \[0, 150\) \(the probe's neurons\); got -1 at \[2, 0\]"),
    # one row per class of the model: a [2, k] table for 3 classes clamped class 2 to row 1
    (np.zeros((2, 3), np.int32), InputError,
     r"table must have shape \[num_classes, k\] = \[3, k\]; got shape \(2, 3\)"),
    (np.zeros((10, 3), np.int32), InputError, r"= \[3, k\]; got shape \(10, 3\)"),
    (np.zeros(3, np.int32), InputError, r"= \[3, k\]; got shape \(3,\)"),
    (np.zeros((3, 0), np.int32), InputError, r"k \(the table's columns\) must lie in \[1, 150\]; got 0"),
    (np.zeros((3, 151), np.int32), InputError, r"must lie in \[1, 150\]; got 151"),
    (np.zeros((3, 2), np.float32), InputTypeError, "table must hold integer neuron ids; got float32"),
    (np.zeros((3, 2), bool), InputTypeError, "table must hold integer neuron ids; got bool"),
]  # fmt: skip


@pytest.mark.parametrize(("table", "error", "message"), BAD_TABLES)
def test_bad_tables_are_refused_before_tracing(mlp, table, error, message):
    model, params, prb = mlp
    x = np.full((3, 4, 4, 1), 0.5, np.float32)
    y = np.array([0, 1, 2], np.int32)
    synth = synthesis.make_synthesizer(prb)
    with pytest.raises(error, match=message):
        synthesis.check_table(prb, table)
    with pytest.raises(error, match=message):
        synthesis.check_table(prb, jnp.asarray(table))
    with pytest.raises(error, match=message):
        synthesis.synthesize(synth, params, x, y, table)
    with pytest.raises(error, match=message):
        evaluate.evaluate_synthesis(prb, params, x, x, y, table)


def test_check_table_returns_a_good_table_and_jit_checks_what_it_can(mlp):
    model, params, prb = mlp
    table = np.array([[0, 149], [5, 5], [7, 8]], np.int32)
    np.testing.assert_array_equal(synthesis.check_table(prb, table), table)
    np.testing.assert_array_equal(synthesis.check_table(prb, jnp.asarray(table)), table)
    synth = synthesis.make_synthesizer(prb)
    run = jax.jit(synthesis.synthesize, static_argnums=0)
    x = np.full((3, 4, 4, 1), 0.5, np.float32)
    y = np.array([0, 1, 2], np.int32)
    run(synth, params, x, y, table)
    # under jit the shape and type are still known: a wrong shape is refused at trace time
    with pytest.raises(InputError, match=r"= \[3, k\]; got shape \(2, 2\)"):
        run(synth, params, x, y, table[:2])
    with pytest.raises(
        InputError, match=r"labels must be int\[batch\] = int\[3\]; got shape \(2,\)"
    ):
        run(synth, params, x, y[:2], table)


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (np.array([0, 1, 3], np.int32), InputError, r"labels must lie in \[0, 3\); got 3"),
        (np.array([0, -1, 2], np.int32), InputError, r"labels must lie in \[0, 3\); got -1"),
        (
            np.array([0, 1], np.int32),
            InputError,
            r"labels must be int\[batch\] = int\[3\]; got shape \(2,\)",
        ),
        (np.array([[0, 1, 2]], np.int32), InputError, r"got shape \(1, 3\)"),
        (np.array([0.0, 1.0, 2.0]), InputTypeError, "labels must be integer classes; got float64"),
    ],
)
def test_bad_labels_are_refused(mlp, labels, error, message):
    model, params, prb = mlp
    x = np.full((3, 4, 4, 1), 0.5, np.float32)
    table = np.zeros((3, 2), np.int32)
    synth = synthesis.make_synthesizer(prb)
    with pytest.raises(error, match=message):
        synthesis.synthesize(synth, params, x, labels, table)
    with pytest.raises(error, match=message.replace("labels", "y")):
        evaluate.evaluate_synthesis(prb, params, x, x, labels, table)


def test_inputs_must_have_the_probe_input_shape(mlp):
    model, params, prb = mlp
    synth = synthesis.make_synthesizer(prb)
    table = np.zeros((3, 2), np.int32)
    y = np.zeros(2, np.int32)
    message = r"x must have shape \[batch, 4, 4, 1\] \(the probe's input shape\); got \(2, 16\)"
    with pytest.raises(InputError, match=message):
        synthesis.synthesize(synth, params, np.zeros((2, 16), np.float32), y, table)
    with pytest.raises(InputError, match=message.replace("x must", "x0 must")):
        evaluate.evaluate_synthesis(
            prb, params, np.zeros((2, 16), np.float32), np.zeros((2, 16), np.float32), y, table
        )


def test_evaluate_refuses_a_threshold_that_is_not_finite(mlp):
    model, params, prb = mlp
    x = np.full((3, 4, 4, 1), 0.5, np.float32)
    y = np.array([0, 1, 2], np.int32)
    table = np.zeros((3, 2), np.int32)
    with pytest.raises(InputError, match="threshold must be a finite number; got nan"):
        evaluate.evaluate_synthesis(prb, params, x, x, y, table, threshold=float("nan"))


def test_objective_refuses_ids_outside_the_neurons(mlp):
    model, params, prb = mlp
    x = np.zeros((2, 4, 4, 1), np.float32)
    with pytest.raises(InputError, match=r"sets ids must lie in \[0, 150\).*got 150"):
        synthesis.objective(prb, params, x, np.array([[0], [150]], np.int32))
    with pytest.raises(InputError, match=r"sets must be int\[batch, k\] = int\[2, k\]"):
        synthesis.objective(prb, params, x, np.array([[0]], np.int32))


def test_objective_is_the_mean_of_the_set(mlp):
    model, params, prb = mlp
    x = np.random.default_rng(3).random((4, 4, 4, 1)).astype(np.float32)
    sets = np.array([[1, 2], [3, 3], [0, 149], [10, 20]], np.int32)
    _, flat = prb.flat(params, x)
    want = jnp.stack([flat[i, sets[i]].mean() for i in range(4)])
    np.testing.assert_allclose(synthesis.objective(prb, params, x, sets), want, rtol=1e-6)
