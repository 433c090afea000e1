"""Planted faults change the model where they say; the benchmark scores localizers honestly."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from deepfault_jax import (
    faults,
    probe,
    training,
    zoo,
)


@pytest.fixture(scope="module")
def models(digits):
    out = {}
    for name, epochs in (("mlp-3x50", 10), ("lenet5", 3), ("nnx-mlp-3x50", 10), ("lenet1", 5)):
        model = zoo.create_model(name, input_shape=digits.input_shape, num_classes=10)
        out[name] = (model, training.train(jax.random.key(0), model, digits, epochs=epochs).params)
    return out


def _flat(model, params) -> dict[str, np.ndarray]:
    from flax import nnx

    tree = nnx.to_pure_dict(params) if model.is_nnx else params
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize("kind", faults.FAULT_KINDS)
@pytest.mark.parametrize("name", ["mlp-3x50", "lenet5", "nnx-mlp-3x50", "lenet1"])
def test_each_fault_kind_changes_predictions_and_only_its_neurons_weights(
    models, digits, name, kind
):
    model, params = models[name]
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    faulty, planted, notes = faults.plant_faults(
        jax.random.key(1), model, params, prb, x, y, kind=kind, count=2, min_drop=0.02
    )
    assert len(planted) == 2, notes
    before, after = zoo.predict(model, params, x), zoo.predict(model, faulty, x)
    assert (before != after).sum() > 0
    acc_before, acc_after = np.mean(before == y), np.mean(after == y)
    assert acc_before - acc_after >= 0.04 - 1e-9  # two faults, each at least 0.02
    assert sum(f.accuracy_drop for f in planted) == pytest.approx(acc_before - acc_after)
    assert len({f.neuron for f in planted}) == 2
    last = prb.index.layer_names[-1]
    for f in planted:
        assert f.neuron == prb.index.neuron_id(f.layer, f.unit)
        assert f.accuracy_drop >= 0.02
        if kind == "push_last":
            assert f.layer == last
        if kind == "push_early":
            assert f.layer != last
        assert (f.target_class is not None) == kind.startswith("push")
    # which weights changed: the planted neurons' incoming (corrupt_in, always_on's bias)
    # or outgoing (push_*, always_on) weights, and nothing else
    a, b = _flat(model, params), _flat(model, faulty)
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    layers = [f.layer for f in planted]
    order = sorted({k.split("/")[0] for k in a}, key=faults._order)
    consumers = [order[order.index(layer) + 1] for layer in layers]
    if kind == "corrupt_in":
        assert changed <= {f"{layer}/kernel" for layer in layers}
    elif kind == "always_on":
        assert changed <= {f"{c}/kernel" for c in consumers} | {f"{layer}/bias" for layer in layers}
    else:
        assert changed <= {f"{c}/kernel" for c in consumers}
    assert changed
    # inside a changed array, only the planted units' slices moved
    slices = faults._Params(model, params)
    for name in changed:
        layer, leaf = name.split("/")
        touched = np.zeros(a[name].shape, bool)
        for f, consumer in zip(planted, consumers, strict=True):
            if layer == consumer and leaf == "kernel":
                touched[slices.outgoing(f.layer, f.unit)[1]] = True
            if layer == f.layer:
                touched[..., f.unit] = True
        np.testing.assert_array_equal(a[name][~touched], b[name][~touched])
    if kind.startswith("push"):
        # the pushed classes are predicted more often
        targets = {f.target_class for f in planted}
        assert sum(np.sum(after == t) for t in targets) > sum(np.sum(before == t) for t in targets)
    if kind == "always_on":
        # the last fault planted is active on every input, at every position
        every = probe.model_probe(model, faulty, conv_reduce="none")
        _, acts = every(faulty, x)
        f = planted[-1]
        channels = b[f"{f.layer}/kernel"].shape[-1]
        value = np.asarray(acts[f.layer]).reshape(len(x), -1, channels)[:, :, f.unit]
        assert (value > 0).all()


def test_a_fault_that_changes_nothing_is_not_planted(models, digits):
    model, params = models["mlp-3x50"]
    prb = probe.model_probe(model, params)
    # a drop of 0.9 is out of reach of any single neuron of this kind
    faulty, planted, notes = faults.plant_faults(
        jax.random.key(0), model, params, prb, digits.x_test, digits.y_test,
        kind="corrupt_in", count=1, min_drop=0.9, tries=2,
    )  # fmt: skip
    assert planted == []
    assert any("not planted" in n for n in notes)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(faulty), strict=True)
    )


def test_plant_errors(models, digits):
    model, params = models["mlp-3x50"]
    x, y = digits.x_test, digits.y_test
    prb = probe.model_probe(model, params)
    with pytest.raises(ValueError, match="kind must be one of push_last"):
        faults.plant_faults(jax.random.key(0), model, params, prb, x, y, kind="flip")
    lenet, lenet_params = models["lenet5"]
    with pytest.raises(ValueError, match="conv_reduce must be 'mean' or 'max'; got 'none'"):
        faults.plant_faults(jax.random.key(0), lenet, lenet_params,
                            probe.model_probe(lenet, lenet_params, conv_reduce="none"), x, y,
                            kind="push_last")  # fmt: skip
    one = probe.model_probe(model, params, layers=["dense_1"])
    with pytest.raises(ValueError, match="push_early needs two or more probed layers"):
        faults.plant_faults(jax.random.key(0), model, params, one, x, y, kind="push_early")
