"""Targeted repair (:mod:`deepfault_jax.repair`) against float64 NumPy references.

What a repair trains is checked element by element against the definition of a
neuron's parameters (MLP and conv layouts); the optimiser path against Adam
written out in NumPy on hand-derived gradients; the judging metrics against
loops over the inputs; and the contract: nothing outside the view changes, the
key decides everything random, a repair that cannot beat the start keeps the
original parameters, and bad input is refused before any work.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from reference import adam_loops, mlp_backprop, repair_mask_loops

from deepfault_jax import probe, repair, training, zoo
from deepfault_jax.errors import InputError
from deepfault_jax.neuron_params import neuron_layout, pure_params

LR = 3e-3


@pytest.fixture(scope="module")
def weak_mlp(digits):
    """mlp-3x50 trained for one epoch only, so that a few repair steps still help."""
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = training.train(jax.random.key(0), model, digits, epochs=1).params
    return model, params, probe.model_probe(model, params)


@pytest.fixture(scope="module")
def lenet(digits):
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(1), model)
    return model, params, probe.model_probe(model, params)


def _shapes(params):
    return {
        n: {k: np.shape(v) for k, v in layer.items()} for n, layer in pure_params(params).items()
    }


def _view_mask(view, params):
    """Which elements the view trains, and how often each (every count must be 0 or 1)."""
    tree = pure_params(params)
    count = {
        n: {k: np.zeros(np.shape(v), int) for k, v in layer.items()} for n, layer in tree.items()
    }
    for b in view.blocks:
        np.add.at(count[b.layer][b.leaf], b.index, 1)
    return count


def _layers_of(prb, params):
    return [
        (lp.name, lp.units, lp.consumer, lp.outgoing) for lp in neuron_layout(prb, params).layers
    ]


@pytest.mark.parametrize("part", repair.PARTS)
@pytest.mark.parametrize(
    "which, neurons",
    [
        ("mlp", [0]),
        ("mlp", [3, 49, 50, 77, 120, 149]),  # neighbours in consecutive layers share weights
        ("lenet", [0, 3, 4, 15]),  # conv -> conv and conv -> flatten -> dense
        ("lenet", list(range(16))),
    ],
)
def test_neuron_view_trains_exactly_the_neurons_parameters(which, neurons, part, weak_mlp, lenet):
    _, params, prb = weak_mlp if which == "mlp" else lenet
    view = repair.neuron_view(prb, params, neurons, part=part)
    want = repair_mask_loops(_shapes(params), _layers_of(prb, params), neurons, part)
    got = _view_mask(view, params)
    for name in want:
        for leaf in want[name]:
            assert got[name][leaf].max(initial=0) <= 1, f"{name}/{leaf} trained twice"
            np.testing.assert_array_equal(got[name][leaf] == 1, want[name][leaf], f"{name}/{leaf}")
    assert view.size(pure_params(params)) == sum(
        int(m.sum()) for layer in want.values() for m in layer.values()
    )


def test_gather_then_scatter_is_the_identity_and_scatter_touches_only_the_view(lenet):
    _, params, prb = lenet
    tree = pure_params(params)
    view = repair.neuron_view(prb, params, [1, 5, 9])
    same = view.scatter(tree, view.gather(tree))
    for name in tree:
        for leaf in tree[name]:
            np.testing.assert_array_equal(
                np.asarray(same[name][leaf]), np.asarray(tree[name][leaf])
            )
    bumped = view.scatter(tree, jax.tree.map(lambda v: v + 1.0, view.gather(tree)))
    mask = _view_mask(view, params)
    for name in tree:
        for leaf in tree[name]:
            diff = np.asarray(bumped[name][leaf]) != np.asarray(tree[name][leaf])
            np.testing.assert_array_equal(diff, mask[name][leaf] == 1, f"{name}/{leaf}")


def _flat(tree):
    return {
        f"{n}/{k}": np.asarray(v, np.float64) for n, layer in tree.items() for k, v in layer.items()
    }


def test_fine_tune_is_adam_on_the_view_only(weak_mlp, digits):
    """Full-batch steps against Adam in NumPy on float64 backprop gradients, masked by the
    definition of the neurons' parameters; the parameters at the kept step are compared."""
    model, params, prb = weak_mlp
    x, y = digits.x_train[:300], digits.y_train[:300]
    xv, yv = digits.x_train[300:700], digits.y_train[300:700]
    neurons = [2, 7, 60, 149]
    view = repair.neuron_view(prb, params, neurons)
    fit = repair.fine_tune(
        jax.random.key(3), prb, params, view, (x, y), (xv, yv), steps=6, batch_size=300,
        learning_rate=LR, eval_every=1, patience=6, clip=0.5,
    )  # fmt: skip
    assert not fit.kept_original and fit.best_step >= 1  # the weak model improves

    names = ["dense_0", "dense_1", "dense_2", "logits"]
    mask = _flat(repair_mask_loops(_shapes(params), _layers_of(prb, params), neurons, "both"))
    mask = {k: v.astype(bool) for k, v in mask.items()}

    def grad_fn(t, p):
        layers = [(p[f"{n}/kernel"], p[f"{n}/bias"]) for n in names]
        _, grads, _, _ = mlp_backprop(x, y, layers, "relu")
        out = {}
        for n, (gk, gb) in zip(names, grads, strict=True):
            out[f"{n}/kernel"], out[f"{n}/bias"] = gk.mean(0), gb.mean(0)
        return out

    want = adam_loops(grad_fn, _flat(pure_params(params)), mask, fit.best_step, LR, 0.5)[-1]
    got = _flat(pure_params(fit.params))
    before = _flat(pure_params(params))
    for k in want:
        # untouched parameters are bit-identical
        np.testing.assert_array_equal(got[k][~mask[k]], before[k][~mask[k]], k)
        # float32 against float64: Adam divides by sqrt(v); where a gradient is at float32
        # rounding level its direction is noise. Measured: every trained parameter agrees to
        # < 4e-8 after 6 steps; the bound allows float32 rounding of weights up to ~10.
        np.testing.assert_allclose(got[k][mask[k]], want[k][mask[k]], rtol=0, atol=1e-5)
    assert any(np.any(got[k] != before[k]) for k in got)


def test_fine_tune_same_key_same_result_other_key_other_order(weak_mlp, digits):
    _, params, prb = weak_mlp
    xy, val = (
        (digits.x_train[:400], digits.y_train[:400]),
        (digits.x_train[400:800], digits.y_train[400:800]),
    )
    view = repair.neuron_view(prb, params, [1, 2, 3])
    runs = [
        repair.fine_tune(
            jax.random.key(k),
            prb,
            params,
            view,
            xy,
            val,
            steps=20,
            batch_size=32,
            eval_every=20,
            patience=1,
        )  # fmt: skip
        for k in (0, 0, 1)
    ]
    a, b, c = (_flat(pure_params(r.params)) for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_a_repair_that_cannot_beat_the_start_keeps_the_original(weak_mlp, digits):
    model, params, prb = weak_mlp
    pred = repair.predictions(prb, params, digits.x_test)
    right = pred == digits.y_test
    val = (digits.x_test[right][:200], digits.y_test[right][:200])  # already 100% right
    view = repair.neuron_view(prb, params, [5])
    fit = repair.fine_tune(
        jax.random.key(0), prb, params, view, (digits.x_train[:300], digits.y_train[:300]), val,
        steps=10, eval_every=5,
    )  # fmt: skip
    assert fit.kept_original and fit.best_step == 0
    assert fit.start_accuracy == fit.best_accuracy == 1.0
    assert fit.params is params


def test_repair_metrics_match_loops(weak_mlp, digits):
    _, params, prb = weak_mlp
    x, y = digits.x_test, digits.y_test
    tree = pure_params(params)
    after = {
        **tree,
        "logits": {
            **tree["logits"],
            "bias": np.asarray(tree["logits"]["bias"]) + 0.3 * np.arange(10),
        },
    }
    m = repair.repair_metrics(prb, params, after, (x, y), synthesized_xy=(x[:50], y[:50]))
    p0, p1 = repair.predictions(prb, params, x), repair.predictions(prb, after, x)
    fixed = broken = wrong = right = 0
    for i in range(len(y)):
        if p0[i] == y[i]:
            right += 1
            broken += p1[i] != y[i]
        else:
            wrong += 1
            fixed += p1[i] == y[i]
    assert m["fix_rate"] == fixed / wrong and m["break_rate"] == broken / right
    assert m["accuracy_before"] == right / len(y)
    assert m["accuracy_after"] == float(np.mean(p1 == y))
    assert m["synthesized_after"] == float(np.mean(p1[:50] == y[:50]))
    assert m["changed"] == 10 - 1  # class 0's bias moved by 0
    assert m["changed_share"] == 9 / sum(np.size(v) for v in jax.tree.leaves(tree))
    assert broken > 0 and fixed >= 0 and 0 < m["accuracy_after"] < 1


def test_compare_repairs_runs_every_baseline_on_the_same_budget(weak_mlp, digits):
    _, params, prb = weak_mlp
    calls = []
    fit, val = (
        (digits.x_train[:500], digits.y_train[:500]),
        (digits.x_train[500:900], digits.y_train[500:900]),
    )
    out = repair.compare_repairs(
        jax.random.key(0), prb, params, [0, 1, 2], fit, val, (digits.x_test, digits.y_test),
        random_repeats=2, steps=30, eval_every=10, patience=3,
        progress=lambda done, steps: calls.append((done, steps)),
    )  # fmt: skip
    assert calls and all(steps == 30 and 0 < done <= 30 for done, steps in calls)
    assert out["targeted"]["neurons"] == [0, 1, 2]
    runs = out["random"]["runs"]
    assert len(runs) == 2 and all(len(r["neurons"]) == 3 for r in runs)
    assert runs[0]["neurons"] != runs[1]["neurons"]
    tree = pure_params(params)
    total = sum(np.size(v) for v in jax.tree.leaves(tree))
    assert out["full"]["trained"] == total
    assert out["output"]["trained"] == np.size(tree["logits"]["kernel"]) + 10
    assert out["targeted"]["trained"] == repair.neuron_view(prb, params, [0, 1, 2]).size(tree)
    for row in (out["targeted"], out["output"], out["full"], *runs):
        assert row["steps"] <= 30 and row["changed"] <= row["trained"]
        assert row["validation_after"] >= row["validation_before"]
    assert out["random"]["mean"]["accuracy_after"] == np.mean([r["accuracy_after"] for r in runs])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda prb, p: repair.neuron_view(prb, p, [150]), r"\[0, 150\).*150"),
        (lambda prb, p: repair.neuron_view(prb, p, [-1]), r"\[0, 150\).*-1"),
        (lambda prb, p: repair.neuron_view(prb, p, [3, 3]), "must not repeat"),
        (lambda prb, p: repair.neuron_view(prb, p, []), "non-empty"),
        (lambda prb, p: repair.neuron_view(prb, p, [1.5]), "integers"),
        (lambda prb, p: repair.neuron_view(prb, p, [1], part="weights"), "part must be one of"),
        (
            lambda prb, p: repair.random_neurons(jax.random.key(0), 150, 151),
            r"k must lie in \[1, 150\]; got 151",
        ),
        (lambda prb, p: repair.layer_view(p, layers=["nope"]), "nope"),
    ],
)
def test_bad_neurons_are_refused(call, message, weak_mlp):
    _, params, prb = weak_mlp
    with pytest.raises(InputError, match=message):
        call(prb, params)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, r"steps must lie in \[1, inf\]; got 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number; got nan"),
        ({"batch_size": 0}, r"batch_size must lie in \[1, inf\]; got 0"),
        ({"patience": 0}, r"patience must lie in \[1, inf\]; got 0"),
        ({"fit_xy": "empty"}, "at least one input"),
        ({"fit_xy": "nan"}, "finite"),
        ({"fit_xy": "labels"}, r"\[0, 10\)"),
        ({"fit_xy": "shape"}, r"the model's shape \(8, 8, 1\); got \(64,\)"),
        ({"key": 0}, "PRNG key"),
    ],
)
def test_bad_fit_arguments_are_refused_before_work(change, message, weak_mlp, digits):
    _, params, prb = weak_mlp
    x, y = digits.x_train[:50].copy(), digits.y_train[:50].copy()
    kwargs = {"key": jax.random.key(0), "fit_xy": (x, y), **change}
    if kwargs["fit_xy"] == "empty":
        kwargs["fit_xy"] = (x[:0], y[:0])
    elif kwargs["fit_xy"] == "nan":
        x[3, 2] = np.nan
        kwargs["fit_xy"] = (x, y)
    elif kwargs["fit_xy"] == "labels":
        y[0] = 10
        kwargs["fit_xy"] = (x, y)
    elif kwargs["fit_xy"] == "shape":
        kwargs["fit_xy"] = (x.reshape(len(x), -1), y)
    key, fit_xy = kwargs.pop("key"), kwargs.pop("fit_xy")
    view = repair.neuron_view(prb, params, [0])
    with pytest.raises(InputError, match=message):
        repair.fine_tune(key, prb, params, view, fit_xy, (x, y), **kwargs)


def test_an_nnx_model_is_repaired_in_its_own_form(digits):
    """An NNX state in, an NNX state out; only the view's entries differ."""
    from flax import nnx

    model = zoo.create_model("nnx-mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = training.train(jax.random.key(0), model, digits, epochs=1).params
    prb = probe.model_probe(model, params)
    view = repair.neuron_view(prb, params, [4, 90])
    xy, val = (digits.x_train[:400], digits.y_train[:400]), (digits.x_test, digits.y_test)
    fit = repair.fine_tune(jax.random.key(0), prb, params, view, xy, val, steps=40,
                           eval_every=10, patience=4)  # fmt: skip
    assert isinstance(fit.params, nnx.State) and not fit.kept_original
    before, after = _flat(pure_params(params)), _flat(pure_params(fit.params))
    mask = _view_mask(view, params)
    for k in before:
        name, leaf = k.split("/")
        np.testing.assert_array_equal(
            after[k][mask[name][leaf] == 0], before[k][mask[name][leaf] == 0]
        )
    assert sum(int(np.count_nonzero(after[k] != before[k])) for k in before) > 0
    assert fit.best_accuracy > fit.start_accuracy
    assert repair.predictions(prb, fit.params, val[0]).shape == (len(val[0]),)
