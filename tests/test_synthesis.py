"""Synthesis against the original's formula, its bounds, and batch independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfault_jax import probe, synthesis, zoo


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
    table = np.array([[5], [77]], np.int32)
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
        ({"d": 0.0}, r"d \(the maximum L-inf distance\) must be > 0; got 0.0"),
        ({"d": -0.1}, "must be > 0; got -0.1"),
        ({"mode": "fgsm"}, "mode must be one of deepfault, pgd; got 'fgsm'"),
        ({"step_size": 0}, "step_size must be > 0; got 0"),
        ({"mode": "pgd", "steps": 0}, "steps must be a positive integer; got 0"),
        ({"mode": "pgd", "direction": "up"}, "direction must be one of raw, sign, l2"),
        ({"lo": 1.0, "hi": 0.0}, r"lo < hi; got \[1.0, 0.0\]"),
    ],
)
def test_bad_configuration(mlp, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesis.make_synthesizer(mlp[2], **kwargs)


def test_objective_is_the_mean_of_the_set(mlp):
    model, params, prb = mlp
    x = np.random.default_rng(3).random((4, 4, 4, 1)).astype(np.float32)
    sets = np.array([[1, 2], [3, 3], [0, 149], [10, 20]], np.int32)
    _, flat = prb.flat(params, x)
    want = jnp.stack([flat[i, sets[i]].mean() for i in range(4)])
    np.testing.assert_allclose(synthesis.objective(prb, params, x, sets), want, rtol=1e-6)
