"""Compiled steps are keyed on what determines the computation, not on probe objects.

Two probes built the same way for one model are equal, so the jitted spectrum
and ablation steps (static ``probe``) and the builders cached on a model
compile once for both; new parameters of the same shapes reuse them too; and no
cache keeps a model's parameters alive. Traces are counted with JAX's own
monitoring event (one ``jaxpr_trace_duration`` event per trace of a jitted
function, named by the function). Each test uses a batch size of its own, so
what it counts does not depend on which tests ran before it.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import weakref

import jax
import numpy as np
import pytest

from deepfault_jax import ablation, faults, probe, streaming, zoo
from deepfault_jax.errors import InputError

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def traces():
    """Counts the traces of jitted functions, by function name, inside the block."""
    counts: collections.Counter = collections.Counter()

    def listen(event, duration, **kwargs):
        if event == _TRACE_EVENT:
            counts[kwargs.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _model(name, digits, seed=0):
    model = zoo.create_model(name, input_shape=digits.input_shape, num_classes=10)
    return model, zoo.init_params(jax.random.key(seed), model)


def _spectrum(prb, params, digits, batch_size):
    x, y = digits.x_test[:120], digits.y_test[:120]
    return streaming.compute_spectrum(prb, params, x, y, batch_size=batch_size, attribution=True)


def test_the_trace_counter_counts_a_fresh_jit():
    @jax.jit
    def fresh_function(v):
        return v * 2

    with traces() as n:
        fresh_function(np.ones(3, np.float32))
        fresh_function(np.ones(3, np.float32))
        fresh_function(np.ones(4, np.float32))
    assert n["fresh_function"] == 2


@pytest.mark.parametrize(
    "name, batch_size", [("mlp-3x50", 41), ("lenet1", 42), ("nnx-mlp-3x50", 43)]
)
def test_two_probes_of_one_model_compile_the_spectrum_once(digits, name, batch_size):
    model, params = _model(name, digits)
    first, second = probe.model_probe(model, params), probe.model_probe(model, params)
    assert first is not second
    assert first == second and hash(first) == hash(second)
    with traces() as n_first:
        a = _spectrum(first, params, digits, batch_size)
    with traces() as n_second:
        b = _spectrum(second, params, digits, batch_size)
    assert n_first["_step"] == 1
    assert sum(n_second.values()) == 0, dict(n_second)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_two_probes_share_the_sharded_step(digits):
    model, params = _model("mlp-3x50", digits)
    mesh = streaming.data_mesh(devices=2)
    first, second = probe.model_probe(model, params), probe.model_probe(model, params)
    x, y = digits.x_test[:100], digits.y_test[:100]
    before = streaming._sharded_step.cache_info()
    with traces() as n_first:
        a = streaming.compute_spectrum(first, params, x, y, batch_size=50, mesh=mesh)
    with traces() as n_second:
        b = streaming.compute_spectrum(second, params, x, y, batch_size=50, mesh=mesh)
    after = streaming._sharded_step.cache_info()
    assert after.hits >= before.hits + 1 and after.misses <= before.misses + 1
    assert sum(n_first.values()) >= 1 and sum(n_second.values()) == 0, dict(n_second)
    np.testing.assert_array_equal(np.asarray(a.a_fail), np.asarray(b.a_fail))


def test_two_probes_of_one_model_compile_the_exact_ablation_once(digits):
    model, params = _model("lenet1", digits)
    x, y = digits.x_test[:44], digits.y_test[:44]
    first, second = probe.model_probe(model, params), probe.model_probe(model, params)
    with traces() as n_first:
        a = ablation.exact_ablation(first, params, x, y, batch_size=44, chunk=4)
    with traces() as n_second:
        b = ablation.exact_ablation(second, params, x, y, batch_size=44, chunk=4)
    assert n_first["_ablate_chunk"] == 1 and n_first["_logits"] == 1
    assert sum(n_second.values()) == 0, dict(n_second)
    for u, v in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(u, v)


def test_probes_with_other_options_are_unequal_and_compile_apart(digits):
    model, params = _model("lenet1", digits)
    probes = [
        probe.model_probe(model, params),
        probe.model_probe(model, params, conv_reduce="max"),
        probe.model_probe(model, params, layers=["conv_0"]),
        probe.model_probe(model, params, values="post"),
        probe.model_probe(model, params, fast_conv=False),
    ]
    for i, p in enumerate(probes):
        for q in probes[i + 1 :]:
            assert p != q
    for p in probes:
        with traces() as n:
            _spectrum(p, params, digits, 45)
        assert n["_step"] == 1


def test_new_parameters_of_the_same_shapes_do_not_recompile(digits):
    model, params = _model("mlp-3x50", digits)
    _, other = _model("mlp-3x50", digits, seed=7)
    _spectrum(probe.model_probe(model, params), params, digits, 46)
    # (building a probe traces its functions for shapes, with jax.eval_shape: not counted)
    from_other, from_params = probe.model_probe(model, other), probe.model_probe(model, params)
    with traces() as n:
        again = _spectrum(from_other, other, digits, 46)
        _spectrum(from_params, other, digits, 46)
    assert sum(n.values()) == 0, dict(n)
    assert int(np.asarray(again.num_inputs)) == 120


def test_probe_equality_follows_the_computation(digits):
    model, params = _model("mlp-3x50", digits)
    same_model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    assert probe.model_probe(model, params) == probe.model_probe(same_model, params)
    # the selection is compared once resolved: a list and a predicate choosing the same layers
    assert probe.model_probe(model, params, layers=["dense_0", "dense_1"]) == probe.model_probe(
        model, params, layers=lambda name: name in ("dense_0", "dense_1")
    )
    wider = zoo.create_model("mlp-5x30", input_shape=digits.input_shape, num_classes=10)
    assert probe.model_probe(model, params) != probe.model_probe(
        wider, zoo.init_params(jax.random.key(0), wider)
    )
    assert probe.model_probe(model, params) != probe.model_probe(model, params, fast_dense=False)

    def fn(p, x):
        return x.reshape(len(x), -1) @ p, {"h": x.reshape(len(x), -1)}

    def other_fn(p, x):
        return fn(p, x)

    w = np.ones((64, 10), np.float32)
    a = probe.function_probe(fn, w, input_shape=(8, 8, 1))
    assert a == probe.function_probe(fn, w, input_shape=(8, 8, 1))
    assert a != probe.function_probe(other_fn, w, input_shape=(8, 8, 1))
    assert a != probe.function_probe(fn, w, input_shape=(8, 8, 1), conv_reduce="max")
    # a probe made by hand (no structural key) equals only itself
    plain = probe.Probe(a.fn, a.index, a.input_shape, a.num_classes)
    assert plain == plain and plain != probe.Probe(a.fn, a.index, a.input_shape, a.num_classes)
    assert plain != a and {plain: 1}[plain] == 1


def test_function_probe_traces_once_for_two_probes(digits):
    calls = []

    def fn(p, x):
        calls.append(1)  # runs once per trace
        h = x.reshape(len(x), -1)
        return h @ p, {"h": h}

    w = np.ones((64, 10), np.float32)
    first = probe.function_probe(fn, w, input_shape=(8, 8, 1))
    built = len(calls)  # construction evaluates shapes
    x, y = digits.x_test[:94], digits.y_test[:94]
    streaming.compute_spectrum(first, w, x, y, batch_size=47)
    traced = len(calls) - built
    second = probe.function_probe(fn, w, input_shape=(8, 8, 1))
    built = len(calls)
    streaming.compute_spectrum(second, w, x, y, batch_size=47)
    assert traced >= 1 and len(calls) == built


@pytest.mark.parametrize("name", ["mlp-3x50", "nnx-mlp-3x50", "lenet1"])
def test_no_cache_keeps_parameters_alive(digits, name):
    gc.collect()
    already = {id(a) for a in jax.live_arrays()}
    model, params = _model(name, digits, seed=3)
    leaves = [weakref.ref(leaf) for leaf in jax.tree.leaves(params)]
    prb = probe.model_probe(model, params)
    _spectrum(prb, params, digits, 48)
    ablation.exact_ablation(prb, params, digits.x_test[:24], digits.y_test[:24], batch_size=24)
    faults._raw_values(model, params, prb, digits.x_test[:16])
    del params, prb
    gc.collect()
    assert [r() is None for r in leaves] == [True] * len(leaves)
    # nor does any cache hold other arrays of the model's shapes (templates of parameters)
    abstract = jax.eval_shape(lambda: zoo.init_params(jax.random.key(0), model))
    shapes = {tuple(s.shape) for s in jax.tree.leaves(abstract)}
    held = [a.shape for a in jax.live_arrays() if id(a) not in already and a.shape in shapes]
    assert held == []


def test_exact_ablation_refuses_non_finite_inputs(digits):
    model, params = _model("mlp-3x50", digits)
    prb = probe.model_probe(model, params)
    x = np.array(digits.x_test[:6])
    x[0, 0, 0, 0] = np.nan
    x[2, 3, 1, 0] = np.inf
    x[5, 7, 7, 0] = -np.inf
    with pytest.raises(InputError, match="x must be finite; got 3 NaN or infinite values"):
        ablation.exact_ablation(prb, params, x, digits.y_test[:6])
