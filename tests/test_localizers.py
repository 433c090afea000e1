"""The localizer registry (``localize_neurons``) against float64 NumPy references.

Gain ablation, the gradient statistics (``grad_norm``, ``grad_snr``), the
per-neuron refit, confusion pairs and rank aggregation are each recomputed from
their definitions in :mod:`reference`; the entry point's contract (names,
shapes, dtypes, per-class variants, the spectrum families, errors) is checked
for every registered localizer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import (
    ACTIVATIONS64,
    adam_refit_loops,
    aggregate_loops,
    confusion_loops,
    cross_entropy64,
    gain_ablation_loops,
    grad_norm_snr_loops,
    middle_ranks_loops,
    mlp_backprop,
    mlp_logits,
)

from deepfault_jax import (
    ablation,
    confusion,
    localize,
    localizers,
    measures,
    neuron_params,
    probe,
    spectrum_io,
    streaming,
    training,
    zoo,
)
from deepfault_jax.localizers import localize_neurons, localizer_info, localizer_names

GAINS = (-1.0, 0.0, 0.5, 2.0)
# mean loss drops of float32 forward passes against float64: a logit of magnitude <= ~20
# carries a rounding error of ~20 * 6e-8 ~ 1e-6, and so does each input's cross-entropy;
# a mean of such errors stays well under 1e-5 (measured: <= 2e-7)
LOSS_ATOL = 1e-5
# per-input activations and gradients of float32 passes against float64 backprop: values
# of magnitude <= ~5 with float32 rounding through four layers (measured: <= 1e-6)
VALUE_ATOL = 1e-5


def _layers(params, n_hidden=3):
    names = [f"dense_{i}" for i in range(n_hidden)] + ["logits"]
    return [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in names]


_TRAINED: dict[str, tuple] = {}


def _trained_mlp(digits, activation):
    """A trained mlp-3x50, its probe and float64 layers (trained once per activation)."""
    if activation not in _TRAINED:
        model = zoo.create_model(
            "mlp-3x50", input_shape=digits.input_shape, num_classes=10, activation=activation
        )
        params = training.train(jax.random.key(0), model, digits, epochs=3).params
        _TRAINED[activation] = (model, params, probe.model_probe(model, params), _layers(params))
    return _TRAINED[activation]


@pytest.fixture(scope="module", params=["relu", "leaky_relu"])
def mlp(request, digits):
    return _trained_mlp(digits, request.param)


@pytest.fixture(scope="module")
def relu_mlp(digits):
    return _trained_mlp(digits, "relu")


@pytest.fixture(scope="module")
def lenet(digits):
    """lenet1 at random parameters (the layout and gradient checks need no training)."""
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    params = _random_params(model)
    return model, params, probe.model_probe(model, params)


@pytest.fixture(scope="module")
def subset(digits):
    return digits.x_test[:100], digits.y_test[:100]


# --------------------------------------------------------------------------- gain ablation


def test_gain_ablation_matches_the_float64_reference(mlp, subset):
    model, params, prb, layers = mlp
    x, y = subset
    base_loss, _, loss, _ = gain_ablation_loops(x, y, layers, model.activation, GAINS)
    drop = base_loss[None, None, :] - loss  # [gains, neurons, inputs]: L(1) - L(g) per input
    pooled = drop.mean(axis=-1).max(axis=0)
    per_class = np.stack(
        [drop[:, :, y == c].mean(axis=-1) if np.any(y == c) else np.zeros(drop.shape[:2])
         for c in range(10)], axis=1,
    ).max(axis=0)  # fmt: skip
    assert pooled.max() > 1e-3 and per_class.max() > 1e-3  # some gain helps some neuron

    got = localize_neurons("gain_ablation", prb, params, x, y)
    assert got.dtype == np.float32 and got.shape == (150,)
    np.testing.assert_allclose(got, pooled, rtol=0, atol=LOSS_ATOL)
    got_c = localize_neurons("gain_ablation", prb, params, x, y, per_class=True)
    assert got_c.dtype == np.float32 and got_c.shape == (10, 150)
    np.testing.assert_allclose(got_c, per_class, rtol=0, atol=LOSS_ATOL)

    # one gain at a time, and gain 0 alone is ablation_loss
    for g, gain in enumerate(GAINS):
        one = localize_neurons("gain_ablation", prb, params, x, y, gains=(gain,))
        np.testing.assert_allclose(one, drop[g].mean(axis=-1), rtol=0, atol=LOSS_ATOL)
    np.testing.assert_array_equal(
        localize_neurons("gain_ablation", prb, params, x, y, gains=(0.0,)),
        localize_neurons("ablation_loss", prb, params, x, y),
    )
    np.testing.assert_array_equal(  # a single number is a list of one
        localize_neurons("gain_ablation", prb, params, x, y, gains=0.5),
        localize_neurons("gain_ablation", prb, params, x, y, gains=(0.5,)),
    )


def test_exact_ablation_gain_one_changes_nothing_and_gain_zero_is_the_ablation(mlp, subset):
    model, params, prb, layers = mlp
    x, y = subset
    same = ablation.exact_ablation(prb, params, x, y, gain=1.0)
    np.testing.assert_array_equal(same.fixes, 0)
    np.testing.assert_array_equal(same.breaks, 0)
    # the gated pass and the plain pass are different XLA programs: their float32 losses
    # agree to rounding (per class, a sum of ~10 losses of magnitude <= ~10)
    np.testing.assert_allclose(same.loss_drop, 0.0, rtol=0, atol=LOSS_ATOL)

    default = ablation.exact_ablation(prb, params, x, y)
    zero = ablation.exact_ablation(prb, params, x, y, gain=0.0, chunk=7, batch_size=33)
    np.testing.assert_array_equal(zero.fixes, default.fixes)
    np.testing.assert_array_equal(zero.breaks, default.breaks)
    np.testing.assert_allclose(zero.loss_drop, default.loss_drop, rtol=0, atol=LOSS_ATOL)

    base_loss, base_right, loss, right = gain_ablation_loops(x, y, layers, model.activation, (0.0,))
    member = np.eye(10)[y].T  # [classes, inputs]
    fixes = (right[0] & ~base_right).astype(np.int64) @ member.T
    breaks = (~right[0] & base_right).astype(np.int64) @ member.T
    assert fixes.sum() > 0 and breaks.sum() > 0
    np.testing.assert_array_equal(default.fixes, fixes.T)  # counts: exact
    np.testing.assert_array_equal(default.breaks, breaks.T)
    drop_sum = (base_loss[None, :] - loss[0]) @ member.T  # [neurons, classes]
    np.testing.assert_allclose(default.loss_drop, drop_sum.T, rtol=0, atol=10 * LOSS_ATOL)
    np.testing.assert_array_equal(default.n_inputs, np.bincount(y, minlength=10))


# --------------------------------------------------------------------------- gradients


def test_reference_backprop_equals_finite_differences(relu_mlp, subset):
    """The hand-written backprop the gradient references use, checked on a few parameters."""
    model, params, _, layers = relu_mlp
    x, y = subset[0][:20], subset[1][:20]
    act = ACTIVATIONS64[model.activation][0]
    ones = [np.ones(50)] * 3
    _, grads, _, _ = mlp_backprop(x, y, layers, model.activation)
    step = 1e-6
    for layer, which, where in [(0, 0, (20, 3)), (1, 1, (7,)), (2, 0, (11, 40)), (3, 0, (5, 2)),
                                (3, 1, (9,)), (1, 0, (0, 17))]:  # fmt: skip
        up = [(k.astype(np.float64), b.astype(np.float64)) for k, b in layers]
        down = [(k.astype(np.float64), b.astype(np.float64)) for k, b in layers]
        up[layer][which][where] += step
        down[layer][which][where] -= step
        fd = (
            cross_entropy64(mlp_logits(x, up, ones, act), y)
            - cross_entropy64(mlp_logits(x, down, ones, act), y)
        ) / (2 * step)
        # central differences of a piecewise-smooth function in float64: error ~1e-9
        np.testing.assert_allclose(grads[layer][which][(slice(None), *where)], fd, atol=1e-7)


def test_grad_norm_and_grad_snr_match_hand_backprop(mlp, subset):
    model, params, prb, layers = mlp
    x, y = subset
    _, grads, _, _ = mlp_backprop(x, y, layers, model.activation)
    norm, snr = grad_norm_snr_loops(grads, [50, 50, 50])
    assert norm.min() >= 0 and 0 <= snr.min() and snr.max() <= 1 + 1e-12
    got_norm = localize_neurons("grad_norm", prb, params, x, y, batch_size=32)
    got_snr = localize_neurons("grad_snr", prb, params, x, y, batch_size=32, groups=None)
    assert got_norm.dtype == got_snr.dtype == np.float32
    # float32 gradients summed over 100 inputs: relative rounding ~1e-6 (measured 4e-7)
    np.testing.assert_allclose(got_norm, norm, rtol=1e-5, atol=1e-6 * norm.max())
    # ratios in [0, 1] from float32 sums (measured error 3e-8); parameters no input moves
    # (inputs of always-zero pixels, dead units) give exactly 0 on both sides
    np.testing.assert_allclose(got_snr, snr, rtol=0, atol=1e-5)
    # groups: the units are the summed gradients of consecutive groups (25 inputs each)
    for groups in (4, 7):
        size = -(-len(x) // groups)

        def by_group(g, size=size):
            return np.stack([g[i : i + size].sum(axis=0) for i in range(0, len(g), size)])

        grouped = [tuple(by_group(g) for g in layer) for layer in grads]
        _, want = grad_norm_snr_loops(grouped, [50, 50, 50])
        got = localize_neurons("grad_snr", prb, params, x, y, groups=groups)
        # float32 sums of 25 gradients per group: rounding ~1e-6 of the ratio
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the default is 64 groups, clamped to the inputs (100 here: 64 groups of 2)
    assert localizer_info("grad_snr").options == {"groups": 64}


def _random_params(model, seed=0):
    """LeCun-normal kernels and small random biases in the model's parameter shapes (drawn
    with NumPy: flax's initialisation compiles every op and takes seconds)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: zoo.init_params(jax.random.key(0), model))

    def draw(s):
        fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 10
        return (rng.normal(size=s.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(draw, shapes)


def _index_tree(params):
    """A parameter tree whose every entry is its own flat index (over all leaves, in order)."""
    out, offset = {}, 0
    for layer in sorted(params):
        out[layer] = {}
        for name in sorted(params[layer]):
            shape = np.shape(params[layer][name])
            size = math.prod(shape)
            out[layer][name] = np.arange(offset, offset + size, dtype=np.int32).reshape(shape)
            offset += size
    return out


def _gather_by_hand(tree, layer, consumer, kind, unit):
    """Neuron ``unit``'s incoming, bias and outgoing entries of ``tree``, by loops."""
    kernel, bias, out = tree[layer]["kernel"], tree[layer]["bias"], tree[consumer]["kernel"]
    incoming = [kernel[idx + (unit,)] for idx in np.ndindex(kernel.shape[:-1])]
    if kind == "dense":
        outgoing = [out[unit, o] for o in range(out.shape[1])]
    elif kind == "conv":
        outgoing = [out[i, j, unit, o] for i in range(out.shape[0]) for j in range(out.shape[1])
                    for o in range(out.shape[3])]  # fmt: skip
    else:  # a flattened [h, w, channels] map: rows unit, unit + C, unit + 2C, ...
        channels = kernel.shape[-1]
        outgoing = [out[r, o] for r in range(out.shape[0]) if r % channels == unit
                    for o in range(out.shape[1])]  # fmt: skip
    return np.array(incoming), np.array([bias[unit]]), np.array(outgoing)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("lenet1", [("conv_0", "conv_1", "conv"), ("conv_1", "logits", "flatten")]),
        ("lenet5", [("conv_0", "conv_1", "conv"), ("conv_1", "dense_0", "flatten"),
                    ("dense_0", "dense_1", "dense"), ("dense_1", "logits", "dense")]),
        ("mlp-3x50", [("dense_0", "dense_1", "dense"), ("dense_1", "dense_2", "dense"),
                      ("dense_2", "logits", "dense")]),
    ],
)  # fmt: skip
def test_neuron_layout_picks_each_neurons_own_entries(name, expected, digits):
    model = zoo.create_model(name, input_shape=digits.input_shape, num_classes=10)
    shapes = jax.eval_shape(lambda: zoo.init_params(jax.random.key(0), model))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)  # shapes are enough
    prb = probe.model_probe(model, params)
    layout = neuron_params.neuron_layout(prb, params)
    assert [(lp.name, lp.consumer, lp.outgoing) for lp in layout.layers] == expected
    tree = _index_tree(params)
    assert max(int(a.max()) for layer in tree.values() for a in layer.values()) < 1 << 16
    sums, sizes, tops = [], [], []
    for lp in layout.layers:
        incoming, bias, outgoing = (np.asarray(a) for a in layout.pieces(tree, lp))
        for unit in range(lp.units):
            want = _gather_by_hand(tree, lp.name, lp.consumer, lp.outgoing, unit)
            np.testing.assert_array_equal(incoming[unit], want[0])
            np.testing.assert_array_equal(bias[unit], want[1])
            np.testing.assert_array_equal(outgoing[unit], want[2])
            flat = np.concatenate(want)
            assert len(set(flat.tolist())) == flat.size  # no entry twice
            sums.append(flat.sum())
            sizes.append(flat.size)
            tops.append(flat.max())
    assert layout.num_neurons == prb.index.num_neurons == len(sums)
    # integer sums below 2**24: exact in float32
    np.testing.assert_array_equal(np.asarray(layout.per_neuron(tree)), np.array(sums, np.float32))
    np.testing.assert_array_equal(np.asarray(layout.sizes(tree)), np.array(sizes, np.float32))
    np.testing.assert_array_equal(
        np.asarray(layout.per_neuron(tree, jnp.max)), np.array(tops, np.float32)
    )


def _lenet_slices(tree, unit_layer, unit):
    """Neuron (layer, unit)'s own gradient entries of lenet1, sliced by hand."""
    if unit_layer == "conv_0":
        parts = (tree["conv_0"]["kernel"][..., unit], tree["conv_0"]["bias"][unit],
                 tree["conv_1"]["kernel"][:, :, unit, :])  # fmt: skip
    else:  # conv_1's 2x2x12 map is flattened into the logits layer: rows unit::12
        parts = (tree["conv_1"]["kernel"][..., unit], tree["conv_1"]["bias"][unit],
                 tree["logits"]["kernel"][unit::12, :])  # fmt: skip
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in parts])


def test_grad_norm_and_snr_of_lenet1_match_jax_grad_sliced_by_hand(lenet, digits):
    model, params, prb = lenet
    x, y = digits.x_test[:60], digits.y_test[:60]

    def loss(p, xs, ys):  # the model's own apply, not the probe
        logits = model.apply(p, xs)
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(len(ys)), ys])

    total = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params, x, y))
    per_input = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(
        params, x[:, None], y[:, None]
    )
    per_input = jax.tree.map(np.asarray, per_input)
    norms, snrs = [], []
    for layer, size in (("conv_0", 4), ("conv_1", 12)):
        for unit in range(size):
            norms.append(np.linalg.norm(_lenet_slices(total, layer, unit) / len(x)))
            g = np.stack([_lenet_slices(jax.tree.map(lambda a, i=i: a[i], per_input), layer, unit)
                          for i in range(len(x))])  # fmt: skip
            first, second = g.sum(0), (g**2).sum(0)
            safe = np.where(second > 0, second * len(x), 1.0)
            snrs.append(np.mean(np.where(second > 0, first**2 / safe, 0.0)))
    got = localize_neurons("grad_norm", prb, params, x, y, batch_size=16)
    # float32 gradients of two XLA programs (the probe's conv layers, flax's): rounding ~1e-6
    np.testing.assert_allclose(got, norms, rtol=1e-5, atol=1e-6 * max(norms))
    got_snr = localize_neurons("grad_snr", prb, params, x, y, groups=None)
    np.testing.assert_allclose(got_snr, snrs, rtol=0, atol=1e-5)


# the refit's options here and in the contract test (one compilation per layer serves both)
REFIT = {"steps": 3, "inputs": 40}


def test_refit_matches_float64_adam(relu_mlp, digits):
    model, params, prb, layers = relu_mlp
    x, y = digits.x_test[:40], digits.y_test[:40]
    got = localize_neurons("refit", prb, params, x, y, **REFIT)
    assert got.shape == (150,) and got.dtype == np.float32
    # in each layer, two units active on many of the fitting inputs
    _, _, pre, _ = mlp_backprop(x[0::2], y[0::2], layers, model.activation)
    for layer in range(3):
        active = np.flatnonzero((pre[layer] > 0).mean(axis=0) > 0.3)
        assert len(active) >= 2
        for unit in active[:2]:
            want = adam_refit_loops(x, y, layers, model.activation, layer, int(unit),
                                    steps=REFIT["steps"], learning_rate=0.05)  # fmt: skip
            assert abs(want) > 1e-4  # the refit moves the held-out loss
            # float32 Adam on float32 gradients against float64: the first steps are about
            # lr * sign(gradient), so only parameters of tiny gradient can move otherwise, and
            # they barely change the loss; the score, a difference of two mean losses of
            # magnitude ~1, carries float32 rounding ~1e-6 (measured below 1e-6)
            assert got[50 * layer + unit] == pytest.approx(want, rel=1e-3, abs=2e-5)
    # more inputs with inputs=40: only the first 40 are read
    more = localize_neurons("refit", prb, params, digits.x_test[:90], digits.y_test[:90], **REFIT)
    np.testing.assert_array_equal(more, got)


# --------------------------------------------------------------------------- confusion pairs


@pytest.fixture(scope="module")
def per_input(relu_mlp, digits):
    """Predictions, values and gxa per input: the package's, and the float64 reference's."""
    model, params, prb, layers = relu_mlp
    x, y = digits.x_test[:300], digits.y_test[:300]
    got = confusion.per_input_values(prb, params, x, y, batch_size=128)
    _, _, pre, dpre = mlp_backprop(x, y, layers, model.activation)
    act = ACTIVATIONS64[model.activation][0]
    logits = mlp_logits(x, layers, [np.ones(50)] * 3, act)
    values = np.concatenate(pre, axis=1)
    # the gate multiplies the pre-activation z: d loss / d gate at 1 = z * d loss / d z
    gxa = np.concatenate([z * dz for z, dz in zip(pre, dpre, strict=True)], axis=1)
    return x, y, got, (np.argmax(logits, axis=1), values, gxa)


def test_per_input_values_match_backprop_and_finite_differences(relu_mlp, per_input):
    model, params, _, layers = relu_mlp
    x, y, (predicted, values, gxa), (want_pred, want_values, want_gxa) = per_input
    np.testing.assert_array_equal(predicted, want_pred)
    np.testing.assert_allclose(values, want_values, rtol=0, atol=VALUE_ATOL)
    np.testing.assert_allclose(gxa, want_gxa, rtol=0, atol=VALUE_ATOL)
    # the reference gxa is the derivative of each input's loss along its gate: central
    # differences of the gate in float64 on a few neurons and inputs
    act = ACTIVATIONS64[model.activation][0]
    step = 1e-5
    xs, ys = x[:30], y[:30]
    for neuron in (0, 37, 64, 101, 149):
        layer, unit = divmod(neuron, 50)
        up, down = [np.ones(50) for _ in range(3)], [np.ones(50) for _ in range(3)]
        up[layer][unit] += step
        down[layer][unit] -= step
        fd = (
            cross_entropy64(mlp_logits(xs, layers, up, act), ys)
            - cross_entropy64(mlp_logits(xs, layers, down, act), ys)
        ) / (2 * step)
        np.testing.assert_allclose(want_gxa[:30, neuron], fd, atol=1e-7)


@pytest.mark.parametrize("measure", ["gradxact", "ochiai"])
@pytest.mark.parametrize("min_failures", [3, 2])
def test_confusion_matches_the_pair_loops(relu_mlp, per_input, measure, min_failures):
    _, params, prb, _ = relu_mlp
    x, y, (predicted, values, gxa), reference_values = per_input
    got = localize_neurons("confusion", prb, params, x, y, measure=measure,
                           min_failures=min_failures)  # fmt: skip
    assert got.dtype == np.float32 and got.shape == (150,)
    want = confusion_loops(predicted, values, gxa, y, num_classes=10, measure=measure,
                           min_failures=min_failures)  # fmt: skip
    assert want.min() < -1  # some pair counted
    np.testing.assert_array_equal(got, want.astype(np.float32))  # ranks: exact
    # the same from the float64 reference's own predictions, values and gxa
    want64 = confusion_loops(*reference_values, y, num_classes=10, measure=measure,
                             min_failures=min_failures)  # fmt: skip
    np.testing.assert_array_equal(got, want64.astype(np.float32))


def test_confusion_without_pairs_is_zero(per_input):
    _, y, (predicted, values, gxa), _ = per_input
    got = confusion.confusion_scores(predicted, values, gxa, y, min_failures=10_000)
    np.testing.assert_array_equal(got, np.zeros(150, np.float32))


# --------------------------------------------------------------------------- aggregation


def test_middle_ranks_equal_the_loops():
    rng = np.random.default_rng(0)
    for trial in range(5):
        score = rng.integers(0, 6, 40).astype(np.float32)  # many ties
        if trial == 0:
            score[:] = 1.0
        np.testing.assert_array_equal(localize.middle_ranks(score), middle_ranks_loops(score))
    np.testing.assert_array_equal(localize.middle_ranks([3.0, 1.0, 3.0, 2.0]), [1.5, 4, 1.5, 3])


@pytest.mark.parametrize("combine", localizers.COMBINE)
def test_aggregate_matches_rank_loops(relu_mlp, subset, combine):
    _, params, prb, _ = relu_mlp
    x, y = subset
    for methods in (("gradxact", "grad_norm"), ("ochiai", "ablation_loss", "grad_snr")):
        parts = [localize_neurons(m, prb, params, x, y) for m in methods]
        for k in (10.0, 0.5):
            got = localize_neurons("aggregate", prb, params, x, y, methods=methods,
                                   combine=combine, k=k)  # fmt: skip
            want = aggregate_loops(parts, combine, k)
            # float64 rank arithmetic cast to float32 (rrf sums, means of thirds)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
            if combine != "rrf":
                break
    assert len(np.unique(parts[0])) < 150  # ochiai ties: middle ranks exercised


# --------------------------------------------------------------------------- the contract


def test_localizer_names_list_every_family():
    names = localizer_names()
    for m in measures.measure_names():
        assert m in names
    for name in ("ablation", "ablation_loss", "gain_ablation", "grad_norm", "grad_snr", "refit",
                 "confusion", "aggregate"):  # fmt: skip
        assert name in names
    assert len(set(names)) == len(names)
    assert localizer_names(family="counts") == measures.measure_names(family="counts")
    assert localizer_names(family="attribution") == measures.measure_names(family="attribution")
    assert localizers.DEFAULT_LOCALIZER in names
    assert localizer_info("Grad-Norm").name == "grad_norm"
    assert localizer_info("gain_ablation").options == {"gains": GAINS}
    assert localizer_info("refit").options == {"steps": 20, "learning_rate": 0.05, "inputs": 1024}
    assert set(localizer_info("dstar").options) == {"threshold", "star"}
    for name in names:
        info = localizer_info(name)
        assert info.needs in localizers.NEEDS and info.summary and info.cost


SMALL = {"refit": REFIT}


def test_every_localizer_returns_float32_scores_without_nan(relu_mlp, digits):
    _, params, prb, _ = relu_mlp
    x, y = digits.x_test[:64], digits.y_test[:64]
    for name in localizer_names():
        options = SMALL.get(name, {})
        score = localize_neurons(name, prb, params, x, y, **options)
        assert score.dtype == np.float32 and score.shape == (150,), name
        assert not np.isnan(score).any(), name
        if localizer_info(name).per_class:
            per = localize_neurons(name, prb, params, x, y, per_class=True, **options)
            assert per.dtype == np.float32 and per.shape == (10, 150), name
            assert not np.isnan(per).any(), name


def test_spectrum_families_equal_suspiciousness_and_spectrum_scores(relu_mlp, subset, tmp_path):
    _, params, prb, _ = relu_mlp
    x, y = subset
    spec = streaming.compute_spectrum(prb, params, x, y, attribution=True)
    path = spectrum_io.save_spectrum(tmp_path / "s.npz", spec)
    saved = spectrum_io.load_spectrum(path)
    names = localizer_names(family="counts") + localizer_names(family="attribution")
    assert len(names) == len(measures.measure_names())
    for name in names:
        for per_class in (False, True):
            want = np.asarray(localize.suspiciousness(spec, name, pooled=not per_class))
            got = localize_neurons(name, prb, params, x, y, per_class=per_class)
            np.testing.assert_array_equal(got, want, err_msg=name)
            from_file = localizers.spectrum_scores(name, saved, per_class=per_class)
            np.testing.assert_array_equal(from_file, want, err_msg=name)
    # options: a measure's hyperparameter and the threshold
    np.testing.assert_array_equal(
        localize_neurons("dstar", prb, params, x, y, star=2.0),
        localize.suspiciousness(spec, "dstar", pooled=True, star=2.0),
    )
    high = streaming.compute_spectrum(prb, params, x, y, threshold=0.5, attribution=True)
    np.testing.assert_array_equal(
        localize_neurons("ochiai", prb, params, x, y, threshold=0.5),
        localize.suspiciousness(high, "ochiai", pooled=True),
    )
    with pytest.raises(ValueError, match="counted at threshold 0.0; got threshold=0.5"):
        localizers.spectrum_scores("ochiai", saved, threshold=0.5)


def test_list_options_are_accepted(relu_mlp, subset):
    """Sequences given as lists (as ``_check_gains`` and ``_parse_methods`` accept) work."""
    _, params, prb, _ = relu_mlp
    x, y = subset[0][:30], subset[1][:30]
    np.testing.assert_array_equal(
        localize_neurons("gain_ablation", prb, params, x, y, gains=[0.0, 2.0]),
        localize_neurons("gain_ablation", prb, params, x, y, gains=(0.0, 2.0)),
    )
    np.testing.assert_array_equal(
        localize_neurons("aggregate", prb, params, x, y, methods=["gradxact", "grad_norm"]),
        localize_neurons("aggregate", prb, params, x, y, methods=("gradxact", "grad_norm")),
    )


def _plain_function_probe():
    """A hand-written model with parameters ``{"w": ..., "v": ...}`` (not laid out by layer)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 5)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(5, 10)), jnp.float32)}  # fmt: skip

    def fn(p, x):
        h = x.reshape(len(x), -1) @ p["w"]
        return jax.nn.relu(h) @ p["v"], {"h": h}

    return probe.function_probe(fn, params, input_shape=(8, 8, 1)), params


def test_errors(relu_mlp, subset):
    _, params, prb, _ = relu_mlp
    x, y = subset[0][:20], subset[1][:20]
    with pytest.raises(ValueError, match=r"unknown localizer 'nope'; expected one of ") as e:
        localize_neurons("nope", prb, params, x, y)
    for name in localizer_names():
        assert name in str(e.value)
    with pytest.raises(ValueError, match=r"localizer 'grad_norm' takes options \[none\]; got \['steps'\]"):  # fmt: skip
        localize_neurons("grad_norm", prb, params, x, y, steps=3)
    with pytest.raises(ValueError, match=r"'refit' takes options \[steps, learning_rate, inputs\]; got \['gains'\]"):  # fmt: skip
        localize_neurons("refit", prb, params, x, y, gains=(0.0,))
    for name in ("grad_norm", "grad_snr", "refit", "confusion", "aggregate"):
        assert not localizer_info(name).per_class
        with pytest.raises(ValueError, match=f"localizer '{name}' has no per-class variant"):
            localize_neurons(name, prb, params, x, y, per_class=True)
    with pytest.raises(ValueError, match=r"gains must not contain 1 \(the model as it is\)"):
        localize_neurons("gain_ablation", prb, params, x, y, gains=(0.0, 1.0))
    with pytest.raises(ValueError, match="gains must list at least one number; got none"):
        localize_neurons("gain_ablation", prb, params, x, y, gains=())
    with pytest.raises(ValueError, match="gains must be a finite number; got nan"):
        localize_neurons("gain_ablation", prb, params, x, y, gains=(float("nan"),))
    with pytest.raises(ValueError, match=r"aggregate needs two or more localizers; got \['gradxact'\]"):  # fmt: skip
        localize_neurons("aggregate", prb, params, x, y, methods=("gradxact",))
    with pytest.raises(ValueError, match="aggregate needs two or more localizers"):
        localize_neurons("aggregate", prb, params, x, y, methods="gradxact")
    with pytest.raises(ValueError, match="aggregate combines other localizers; got 'aggregate'"):
        localize_neurons("aggregate", prb, params, x, y, methods=("aggregate", "gradxact"))
    with pytest.raises(ValueError, match="unknown localizer 'nope'"):
        localize_neurons("aggregate", prb, params, x, y, methods=("gradxact", "nope"))
    with pytest.raises(ValueError, match="combine must be one of rrf, best, mean; got 'max'"):
        localize_neurons("aggregate", prb, params, x, y, combine="max")
    with pytest.raises(ValueError, match=r"confusion pairs take a count measure or 'gradxact'; got 'actdiff'"):  # fmt: skip
        localize_neurons("confusion", prb, params, x, y, measure="actdiff")
    with pytest.raises(ValueError, match="family must be one of"):
        localizer_names(family="nope")

    # a probe without gates: the gate localizers say so before any pass
    ungated, plain_params = _plain_function_probe()
    assert ungated.gated is None
    for name in ("ablation", "ablation_loss", "gain_ablation", "confusion"):
        with pytest.raises(ValueError, match=f"localizer '{name}' needs a probe that can gate"):
            localize_neurons(name, ungated, plain_params, x, y)
    # its parameters are not laid out by layer
    for name, who in (("grad_norm", "grad_norm"), ("grad_snr", "a gradient localizer"),
                      ("refit", "refit")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{who} needs parameters laid out by layer as the "
                           "zoo models' are .*got no kernel and bias for probed layer 'h'"):  # fmt: skip
            localize_neurons(name, ungated, plain_params, x, y)
    # the spectrum families still serve it
    assert localize_neurons("ochiai", ungated, plain_params, x, y).shape == (5,)

    spec = streaming.compute_spectrum(prb, params, x, y)
    for name in ("ablation", "gain_ablation", "grad_norm", "refit", "confusion", "aggregate"):
        with pytest.raises(ValueError, match=f"localizer '{name}' needs the model .*not a saved spectrum"):  # fmt: skip
            localizers.spectrum_scores(name, spec)
    with pytest.raises(ValueError, match="attribution measures need attribution sums"):
        localizers.spectrum_scores("gradxact", spec)

    bad = x.copy()
    bad[3, 2, 2, 0] = np.nan
    for name in ("ochiai", "gradxact", "ablation", "grad_norm", "refit"):
        with pytest.raises(ValueError, match="x must be finite; got 1 NaN or infinite values"):
            localize_neurons(name, prb, params, bad, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        localize_neurons("grad_norm", prb, params, x, np.full(len(x), 10))


def test_refit_needs_two_inputs(relu_mlp, subset):
    """With one input nothing is left to score the refit on: a clear error, not a crash."""
    _, params, prb, _ = relu_mlp
    x, y = subset
    with pytest.raises(ValueError, match=r"(?i)refit.*input"):
        localize_neurons("refit", prb, params, x[:1], y[:1], steps=1)


def test_evidence_computes_each_pass_once_and_hands_out_copies(mlp, subset):
    _, params, prb, _ = mlp
    x, y = subset
    evidence = localizers.Evidence(prb, params, x, y)
    first = evidence.scores("gradxact")
    spectrum = evidence.held_spectrum()
    assert spectrum is not None and spectrum.attribution is not None
    first[:] = -1.0  # a caller changing its copy changes nothing kept
    again = evidence.scores("gradxact")
    np.testing.assert_array_equal(again, localize_neurons("gradxact", prb, params, x, y))
    evidence.scores("ochiai")  # served by the spectrum with attribution sums: no new pass
    assert evidence.held_spectrum() is spectrum
    assert evidence.held_spectrum(threshold=0.5) is None
