"""Search-based repair (``repair_search``) on a trained digits MLP with planted faults.

The planted fault scales one hidden neuron's incoming weights and bias by 5
(the neuron of ``dense_1`` whose scaling costs the most validation accuracy);
searching that neuron's parameters must win most of it back, as much as Adam
fine-tuning does on the same budget. The rest pins the contract shared with
:func:`repair.fine_tune`: only the view changes, the key decides everything,
the original is kept when validation cannot improve, bad arguments are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from deepfault_jax import probe, repair, training, zoo
from deepfault_jax.errors import InputError
from deepfault_jax.neuron_params import pure_params
from deepfault_jax.repair_search import MIN_POPULATION, SearchFit, repair_fitness, search_repair

LAYERS = ("dense_0", "dense_1", "dense_2")
FACTOR = 5.0
N_FIT = 1000  # the first 1000 training images fit, the other 348 validate


@pytest.fixture(scope="module")
def trained(digits):
    """A mlp-3x50 trained for 10 epochs (test accuracy ~0.94), its probe and data splits."""
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = training.train(jax.random.key(0), model, digits, epochs=10).params
    x, y = digits.x_train, digits.y_train
    splits = {
        "fit": (x[:N_FIT], y[:N_FIT]),
        "val": (x[N_FIT:], y[N_FIT:]),
        "test": (digits.x_test, digits.y_test),
    }
    return probe.model_probe(model, params), params, splits


def _accuracy(pr, params, xy) -> float:
    return float(np.mean(repair.predictions(pr, params, xy[0]) == xy[1]))


def _plant(params, layer: str, unit: int, factor: float = FACTOR) -> dict:
    """``params`` with ``layer``'s neuron ``unit`` fed ``factor`` times its input (weights
    and bias), as NumPy copies."""
    tree = {k: {leaf: np.array(v) for leaf, v in d.items()} for k, d in pure_params(params).items()}
    tree[layer]["kernel"][:, unit] *= factor
    tree[layer]["bias"][unit] *= factor
    return tree


@pytest.fixture(scope="module")
def faulty(trained):
    """The planted fault: the ``dense_1`` neuron whose x5 scaling hurts validation most.

    Measured: unit 19, validation accuracy 0.968 -> 0.698, test 0.942 -> 0.673.
    """
    pr, params, splits = trained
    drops = [_accuracy(pr, _plant(params, "dense_1", u), splits["val"]) for u in range(50)]
    unit = int(np.argmin(drops))
    neuron = LAYERS.index("dense_1") * 50 + unit
    return _plant(params, "dense_1", unit), neuron


def _view_mask(view: repair.View, tree: dict) -> dict:
    """``{layer: {leaf: bool array}}``: True where ``view`` owns the parameter."""
    zeros = {
        k: {leaf: jnp.zeros(np.shape(v), bool) for leaf, v in d.items()} for k, d in tree.items()
    }
    ones = {name: jnp.ones_like(v, bool) for name, v in view.gather(zeros).items()}
    return jax.tree.map(np.asarray, view.scatter(zeros, ones))


def test_only_the_view_changes(trained, faulty):
    pr, _, splits = trained
    params, neuron = faulty
    other = LAYERS.index("dense_2") * 50 + 3  # a second layer, so outgoing meets incoming
    view = repair.neuron_view(pr, params, [neuron, other])
    calls = []
    fit = search_repair(
        jax.random.key(1), pr, params, view, splits["fit"], splits["val"],
        steps=60, eval_every=20, weights=None,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert isinstance(fit, SearchFit) and isinstance(fit, repair.Fit)
    assert not fit.kept_original and fit.best_accuracy > fit.start_accuracy
    mask = _view_mask(view, params)
    after = pure_params(fit.params)
    owned = changed = 0
    for layer, leaves in params.items():
        for leaf, before in leaves.items():
            new, m = np.asarray(after[layer][leaf]), mask[layer][leaf]
            assert new.dtype == before.dtype and new.shape == before.shape
            np.testing.assert_array_equal(new[~m], before[~m], err_msg=f"{layer}/{leaf}")
            owned += int(m.sum())
            changed += int(np.count_nonzero(new[m] != before[m]))
    # dense_1's unit: 50 in + bias + 49 out (the weight to dense_2's unit is its incoming);
    # dense_2's unit: 50 in + bias + 10 out
    assert fit.trained == owned == 50 + 1 + 49 + 50 + 1 + 10
    assert changed > owned // 2  # DE's crossover moves most coordinates
    assert calls == [(20, 60), (40, 60), (60, 60)]
    assert [s for s, _ in fit.history] == [0, *(d for d, _ in calls)]
    assert [s for s, _ in fit.fitness] == [s for s, _ in fit.history]


def test_planted_fault_is_repaired_as_well_as_by_fine_tuning(trained, faulty):
    pr, clean, splits = trained
    params, neuron = faulty
    view = repair.neuron_view(pr, params, [neuron], part="incoming")
    key = jax.random.key(2)
    fit = search_repair(key, pr, params, view, splits["fit"], splits["val"])
    tuned = repair.fine_tune(key, pr, params, view, splits["fit"], splits["val"])
    # measured: validation 0.698 -> 0.980 (Adam 0.977), test 0.673 -> 0.938 (Adam 0.918),
    # the clean model 0.968 / 0.942; fit-set fitness 2.47 -> 0.42 (Adam 0.49); keys 7 and
    # 11: validation 0.974 / 0.971 (97% / 98% of Adam's recovery), test 0.933 / 0.938
    start_val = _accuracy(pr, params, splits["val"])
    assert fit.start_accuracy == start_val < _accuracy(pr, clean, splits["val"]) - 0.2
    assert not fit.kept_original and fit.best_step > 0
    assert fit.best_accuracy == _accuracy(pr, fit.params, splits["val"])
    assert fit.best_accuracy > start_val + 0.2
    recovered = (fit.best_accuracy - start_val) / (tuned.best_accuracy - start_val)
    assert recovered > 0.9, (fit.best_accuracy, tuned.best_accuracy)
    test_before = _accuracy(pr, params, splits["test"])
    assert _accuracy(pr, fit.params, splits["test"]) > test_before + 0.2
    before = repair_fitness(pr, params, params, splits["fit"])
    after = repair_fitness(pr, params, fit.params, splits["fit"])
    assert after < 0.3 * before, (before, after)
    # the recorded fitness is the best member's, which starts at the original's
    assert fit.fitness[-1][1] < fit.fitness[0][1]


def test_the_key_decides_the_search(trained, faulty):
    pr, _, splits = trained
    params, neuron = faulty
    view = repair.neuron_view(pr, params, [neuron])

    def run(seed):
        return search_repair(
            jax.random.key(seed), pr, params, view, splits["fit"], splits["val"],
            steps=40, eval_every=10, patience=10,
        )  # fmt: skip

    a, b, c = run(3), run(3), run(4)
    assert a.history == b.history and a.fitness == b.fitness and a.best_step == b.best_step
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert a.fitness != c.fitness
    assert any(
        not np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params), strict=True)
    )


def test_original_is_kept_when_validation_cannot_improve(trained):
    pr, params, splits = trained
    x, y = splits["val"]
    right = repair.predictions(pr, params, x) == y
    val = (x[right], y[right])  # the model is 100% right here: nothing can beat it
    view = repair.neuron_view(pr, params, [60])
    fit = search_repair(
        jax.random.key(5), pr, params, view, splits["fit"], val,
        steps=100, eval_every=5, patience=3,
    )  # fmt: skip
    assert fit.kept_original and fit.params is params
    assert fit.start_accuracy == fit.best_accuracy == 1.0 and fit.best_step == 0
    assert fit.steps == 15  # stopped after 3 measurements without improvement
    assert [s for s, _ in fit.history] == [0, 5, 10, 15]


def test_fitness_matches_its_definition(trained, faulty):
    pr, clean, splits = trained
    params, _ = faulty
    x, y = splits["val"]
    alpha = 0.5
    failing = repair.predictions(pr, clean, x) != y
    assert failing.any() and not failing.all()
    logits = np.asarray(pr.fn(params, jnp.asarray(x))[0], np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]
    expected = ce[failing].mean() + alpha * ce[~failing].mean()
    got = repair_fitness(pr, clean, params, (x, y), alpha=alpha)
    assert got == pytest.approx(expected, rel=1e-5)


def _bad_data(which: str, splits) -> tuple[tuple, tuple]:
    """(fit, validation) data broken as ``which`` says."""
    fit, val = splits["fit"], splits["val"]
    if which == "empty":
        return (fit[0][:0], fit[1][:0]), val
    x = fit[0].copy()
    x[3, 1, 1, 0] = np.nan
    if which == "nan-fit":
        return (x, fit[1]), val
    return fit, (x[:10], fit[1][:10])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must lie in [1, inf]; got 0"),
        ({"population": MIN_POPULATION - 1}, f"population must lie in [{MIN_POPULATION}, inf]"),
        ({"batch_size": 0}, "batch_size must lie in [1, inf]; got 0"),
        ({"alpha": -1.0}, "alpha must lie in [0, inf]; got -1"),
        ({"alpha": float("nan")}, "alpha must be a finite number; got nan"),
        ({"sigma": 0.0}, "sigma must lie in (0, inf]; got 0"),
        ({"eval_every": 0}, "eval_every must lie in [1, inf]; got 0"),
        ({"patience": 0}, "patience must lie in [1, inf]; got 0"),
        ({"weights": 0}, "weights must lie in [1, inf]; got 0"),
        ({"key": 0}, "key must be a JAX PRNG key"),
        ({"data": "empty"}, "the repair data must hold at least one input; got shape (0, 8, 8, 1)"),
        ({"data": "nan-fit"}, "the repair data inputs must be finite floats"),
        ({"data": "nan-val"}, "the validation data inputs must be finite floats"),
    ],
)
def test_bad_arguments_raise_input_error(trained, options, message):
    pr, params, splits = trained
    options = dict(options)
    key = options.pop("key", jax.random.key(0))
    fit_xy, val_xy = splits["fit"], splits["val"]
    if "data" in options:
        fit_xy, val_xy = _bad_data(options.pop("data"), splits)
    view = repair.neuron_view(pr, params, [0])
    with pytest.raises(InputError) as info:
        search_repair(key, pr, params, view, fit_xy, val_xy, steps=options.pop("steps", 2),
                      **options)  # fmt: skip
    assert message in str(info.value)


def test_only_the_weights_with_the_largest_gradient_are_searched(trained, faulty):
    """``weights=m``: at most m parameters move, and they are the m of the view whose fitness
    gradient at the original parameters is largest in magnitude."""
    pr, _, splits = trained
    params, neuron = faulty
    view = repair.neuron_view(pr, params, [neuron, LAYERS.index("dense_2") * 50 + 3])
    fit = search_repair(jax.random.key(1), pr, params, view, splits["fit"], splits["val"],
                        steps=60, eval_every=20, weights=12.0)  # fmt: skip
    assert fit.trained == 12 and not fit.kept_original  # an integral float counts as 12
    tree = pure_params(params)
    values, unravel = ravel_pytree(view.gather(tree))
    x, y = (a[:2048] for a in splits["fit"])
    failing = repair.predictions(pr, params, x) != y

    def fitness(flat):  # the definition: mean CE on failing + alpha (1) x mean CE on passing
        logits = pr.fn(view.scatter(tree, unravel(flat)), x)[0]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce[failing].mean() + ce[~failing].mean()

    top = set(
        np.argsort(-np.abs(np.asarray(jax.grad(fitness)(values))), kind="stable")[:12].tolist()
    )
    moved, _ = ravel_pytree(view.gather(pure_params(fit.params)))
    changed = set(np.flatnonzero(np.asarray(moved) != np.asarray(values)).tolist())
    assert changed and changed <= top
