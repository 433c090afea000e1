"""Probes: the captured values equal a NumPy forward pass; layer selection; NeuronIndex."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import conv_same_forward, dense_forward, reduce_conv

from deepfault_jax import probe, zoo


def _random_x(shape, n=6, seed=0):
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("side", ["pre", "post"])
def test_mlp_probe_matches_numpy_forward(activation, side):
    model = zoo.create_model(
        "mlp-3x50", input_shape=(8, 8, 1), num_classes=10, activation=activation
    )
    params = zoo.init_params(jax.random.key(1), model)
    prb = probe.model_probe(model, params, values=side)
    assert prb.index.layer_names == ("dense_0", "dense_1", "dense_2")
    x = _random_x((8, 8, 1))
    logits, acts = jax.jit(prb)(params, x)
    act = {"relu": lambda v: np.maximum(v, 0), "leaky_relu": lambda v: np.where(v > 0, v, 0.01 * v)}
    h = x.reshape(len(x), -1)
    for i in range(3):
        pre = dense_forward(h, params[f"dense_{i}"]["kernel"], params[f"dense_{i}"]["bias"])
        want = pre if side == "pre" else act[activation](pre)
        np.testing.assert_allclose(acts[f"dense_{i}"], want, rtol=1e-4, atol=1e-5)
        h = act[activation](pre)
    out = dense_forward(h, params["logits"]["kernel"], params["logits"]["bias"])
    np.testing.assert_allclose(logits, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv_reduce", ["mean", "max", "none"])
@pytest.mark.parametrize("side", ["pre", "post"])
def test_conv_probe_matches_numpy_forward(conv_reduce, side):
    model = zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(2), model)
    prb = probe.model_probe(model, params, conv_reduce=conv_reduce, values=side)
    assert prb.index.layer_names == ("conv_0", "conv_1")
    x = _random_x((8, 8, 1))
    _, acts = prb(params, x)
    conv0 = conv_same_forward(x, params["conv_0"]["kernel"], params["conv_0"]["bias"])
    relu0 = np.maximum(conv0, 0)
    want = reduce_conv(conv0 if side == "pre" else relu0, conv_reduce)
    np.testing.assert_allclose(acts["conv_0"], want, rtol=1e-4, atol=1e-5)
    # second conv: its input is the 2x2 max pool of the first conv's relu
    pooled = relu0.reshape(len(x), 4, 2, 4, 2, 4).max(axis=(2, 4))
    conv1 = conv_same_forward(pooled, params["conv_1"]["kernel"], params["conv_1"]["bias"])
    want = reduce_conv(conv1 if side == "pre" else np.maximum(conv1, 0), conv_reduce)
    np.testing.assert_allclose(acts["conv_1"], want, rtol=1e-4, atol=1e-5)
    sizes = {"mean": (4, 12), "max": (4, 12), "none": (8 * 8 * 4, 4 * 4 * 12)}[conv_reduce]
    assert prb.index.layer_sizes == sizes


def test_layer_selection():
    model = zoo.create_model("lenet5", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    assert probe.model_probe(model, params).index.layer_names == (
        "conv_0", "conv_1", "dense_0", "dense_1")  # fmt: skip
    by_name = probe.model_probe(model, params, layers=["dense_1", "conv_0"])
    assert by_name.index.layer_names == ("conv_0", "dense_1")  # model order, not argument order
    by_predicate = probe.model_probe(model, params, layers=lambda n: n.startswith("dense"))
    assert by_predicate.index.layer_names == ("dense_0", "dense_1")
    # the output layer is probed only when named
    assert probe.model_probe(model, params, layers=["logits"]).index.layer_sizes == (10,)
    with pytest.raises(ValueError, match="unknown layer 'dense_9'; expected one of conv_0, conv_1"):
        probe.model_probe(model, params, layers=["dense_9"])
    with pytest.raises(ValueError, match="no layer selected"):
        probe.model_probe(model, params, layers=lambda n: False)


def test_option_errors():
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    with pytest.raises(ValueError, match="conv_reduce must be one of mean, max, none; got 'sum'"):
        probe.model_probe(model, params, conv_reduce="sum")
    with pytest.raises(ValueError, match="values must be 'pre' or 'post'; got 'mid'"):
        probe.model_probe(model, params, values="mid")
    with pytest.raises(ValueError, match="values='post' needs activation_fn"):
        probe.linen_probe(model.module, params, input_shape=(8, 8, 1), values="post")


def test_nnx_probe_names_layers_like_linen_and_skips_output():
    linen = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    nnx_model = zoo.create_model("nnx-mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), nnx_model)
    prb = probe.model_probe(nnx_model, params)
    assert prb.index == probe.model_probe(linen, zoo.init_params(jax.random.key(0), linen)).index
    x = _random_x((8, 8, 1))
    logits, acts = jax.jit(prb)(params, x)
    np.testing.assert_array_equal(logits, nnx_model.apply(params, x))
    kernel = params["dense_0"]["kernel"].get_value()
    bias = params["dense_0"]["bias"].get_value()
    np.testing.assert_allclose(
        acts["dense_0"], dense_forward(x.reshape(6, -1), kernel, bias), rtol=1e-4, atol=1e-5
    )


def test_linen_sown_values():
    class Sower(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            h = nn.Dense(5, name="hidden")(x)
            self.sow("intermediates", "hidden_tanh", jnp.tanh(h))
            return nn.Dense(3, name="out")(jnp.tanh(h))

    module = Sower()
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    prb = probe.linen_probe(module, params, input_shape=(4, 4, 1), sown=True)
    assert prb.index.layer_names == ("hidden_tanh",) and prb.index.layer_sizes == (5,)
    x = _random_x((4, 4, 1))
    _, acts = prb(params, x)
    pre = dense_forward(x.reshape(6, -1), params["hidden"]["kernel"], params["hidden"]["bias"])
    np.testing.assert_allclose(acts["hidden_tanh"], np.tanh(pre), rtol=1e-4, atol=1e-5)


def test_function_probe():
    def fn(params, x):
        h = x.reshape(x.shape[0], -1) @ params["w"]
        feature_map = x * params["s"]
        return h[:, :3], {"h": h, "map": feature_map}

    params = {"w": jnp.ones((16, 4)), "s": jnp.float32(2.0)}
    prb = probe.function_probe(fn, params, input_shape=(4, 4, 1))
    assert prb.index.layer_names == ("h", "map") and prb.index.layer_sizes == (4, 1)
    assert prb.num_classes == 3
    x = _random_x((4, 4, 1))
    logits, flat = prb.flat(params, x)
    np.testing.assert_allclose(flat[:, 4], (2 * x).mean(axis=(1, 2, 3)), rtol=1e-6)
    none = probe.function_probe(fn, params, input_shape=(4, 4, 1), conv_reduce="none")
    assert none.index.layer_sizes == (4, 16)


def test_neuron_index_round_trip():
    index = probe.NeuronIndex(("a", "b", "c"), (3, 1, 5))
    assert index.num_neurons == 9 and index.offsets == (0, 3, 4)
    for i in range(9):
        layer, unit = index.locate(i)
        assert index.neuron_id(layer, unit) == i
    assert index.locate(3) == ("b", 0) and index.locate(8) == ("c", 4)
    np.testing.assert_array_equal(index.layer_ids(["a", "c"]), [0, 1, 2, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(index.layer_of_ids(), [0, 0, 0, 1, 2, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"neuron id must lie in \[0, 9\); got 9"):
        index.locate(9)
    with pytest.raises(ValueError, match=r"unit of 'b' must lie in \[0, 1\); got 1"):
        index.neuron_id("b", 1)
    with pytest.raises(ValueError, match="unknown layer 'z'; expected one of a, b, c"):
        index.layer_slice("z")
    with pytest.raises(ValueError, match="unique"):
        probe.NeuronIndex(("a", "a"), (1, 1))
    assert hash(index) == hash(probe.NeuronIndex(("a", "b", "c"), (3, 1, 5)))


def test_fast_conv_values_and_gradients_match_xla_conv():
    model = zoo.create_model("lenet5", input_shape=(28, 28, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(5), model)
    fast = probe.model_probe(model, params)
    plain = probe.linen_probe(model.module, params, input_shape=(28, 28, 1), fast_conv=False)
    x = _random_x((28, 28, 1), n=4)

    def objective(prb):
        return lambda p, x: jnp.sum(prb.flat(p, x)[1] ** 2)

    np.testing.assert_allclose(
        fast.flat(params, x)[1], plain.flat(params, x)[1], rtol=1e-5, atol=1e-6
    )
    for argnum in (0, 1):  # parameters and inputs
        got = jax.grad(objective(fast), argnums=argnum)(params, x)
        want = jax.grad(objective(plain), argnums=argnum)(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", ["mlp-3x50", "mlp-5x30", "mlp-6x25", "mlp-8x20", "lenet5"])
def test_fast_dense_values_are_bit_identical(name):
    model = zoo.create_model(name, input_shape=(28, 28, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(2), model)
    fast = probe.model_probe(model, params)
    plain = probe.model_probe(model, params, fast_dense=False)
    x = _random_x((28, 28, 1), n=300)
    (la, aa), (lb, ab) = jax.jit(fast.flat)(params, x), jax.jit(plain.flat)(params, x)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(aa, ab)
    grads = [
        jax.grad(lambda p, pr=pr: jnp.sum(pr.flat(p, x)[1] ** 2))(params) for pr in (fast, plain)
    ]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_cpu_rewrites_are_on_by_default_only_where_measured_faster(monkeypatch):
    """The rewrites default to on for XLA's CPU backend (this machine) and off on any other
    backend; the values are the same either way."""
    from deepfault_jax import cpu_layers

    model = zoo.create_model("lenet5", input_shape=(28, 28, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(3), model)
    assert cpu_layers.measured_faster() == (jax.default_backend() == "cpu")
    here = probe.model_probe(model, params)
    on = probe.model_probe(model, params, fast_conv=True, fast_dense=True)
    off = probe.model_probe(model, params, fast_conv=False, fast_dense=False)
    assert here == (on if jax.default_backend() == "cpu" else off) and on != off
    monkeypatch.setattr(probe, "measured_faster", lambda: False)  # as on a GPU
    elsewhere = probe.model_probe(model, params)
    assert elsewhere == off and elsewhere != on
    x = _random_x((28, 28, 1), n=8)
    np.testing.assert_allclose(
        elsewhere.flat(params, x)[1], on.flat(params, x)[1], rtol=1e-5, atol=1e-6
    )


def test_synthesis_steps_unroll_only_where_measured_faster(monkeypatch):
    """Unrolled steps (the CPU's default) and the loop (any other backend's) give the same
    inputs."""
    from deepfault_jax import synthesis

    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(4), model)
    prb = probe.model_probe(model, params)
    synth = synthesis.make_synthesizer(prb, mode="pgd", d=0.1, steps=4, step_size=0.03)
    x, y = _random_x((8, 8, 1), n=5), np.arange(5, dtype=np.int32)
    table = np.tile(np.arange(3, dtype=np.int32), (10, 1))
    unrolled = synthesis.synthesize(synth, params, x, y, table)
    monkeypatch.setattr(synthesis, "measured_faster", lambda: False)
    looped = synthesis.synthesize(synth, params, x, y, table)
    np.testing.assert_allclose(unrolled, looped, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- ResNets


def _resnet_variables(name="resnet20", seed=0):
    """A ResNet's variables with random BatchNorm statistics, scales and biases (fresh ones
    are 0, 1, 1, 0: a BatchNorm that does nothing)."""
    model = zoo.create_model(name, input_shape=(8, 8, 1), num_classes=10)
    variables = zoo.init_params(jax.random.key(seed), model)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = str(path[-1].key)
        if "bn" not in str(path):
            return leaf
        if key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if key == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)  # mean, bias

    return model, jax.tree_util.tree_map_with_path(draw, variables)


def _resnet20_by_hand(variables, x, *, side="pre", gates=None):
    """ResNet-20 written out (lax convolutions, BatchNorm with the running averages, option A
    shortcuts): ``(logits, {layer: pre}, {layer: post})``; ``gates[layer]`` (``[channels]``)
    multiplies the layer's ``side`` value after it is recorded."""
    p, stats = variables["params"], variables["batch_stats"]
    gates = gates or {}
    pre, post = {}, {}

    def layer(name, h, stride, residual=None):
        kernel = p[name]["conv"]["kernel"]
        y = jax.lax.conv_general_dilated(
            h, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        bn, running = p[name]["bn"], stats[name]["bn"]
        y = (y - running["mean"]) / jnp.sqrt(running["var"] + 1e-5) * bn["scale"] + bn["bias"]
        pre[name] = y
        if side == "pre" and name in gates:
            y = y * gates[name]
        out = jnp.maximum(y if residual is None else y + residual, 0.0)
        post[name] = out
        return out * gates[name] if side == "post" and name in gates else out

    h = layer("conv_0", x, 1)
    i = 1
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            a = layer(f"conv_{i}", h, stride)
            if stride == 1:
                shortcut = h
            else:
                extra = (channels - h.shape[-1]) // 2
                shortcut = jnp.pad(h[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (extra, extra)))
            h = layer(f"conv_{i + 1}", a, 1, shortcut)
            i += 2
    logits = jnp.mean(h, axis=(1, 2)) @ p["logits"]["kernel"] + p["logits"]["bias"]
    return logits, pre, post


_resnet20_by_hand_jit = jax.jit(_resnet20_by_hand, static_argnames=("side",))


@pytest.mark.parametrize("side", ["pre", "post"])
def test_resnet_probe_matches_hand_written_forward(side):
    model, variables = _resnet_variables()
    x = _random_x((8, 8, 1))
    want_logits, pre, post = _resnet20_by_hand_jit(variables, x)
    want = pre if side == "pre" else post
    none = probe.model_probe(model, variables, values=side, conv_reduce="none")
    names = tuple(f"conv_{i}" for i in range(19))
    assert none.index.layer_names == names  # call order, conv_2 before conv_10
    logits, acts = jax.jit(none)(variables, x)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    for name in names:
        np.testing.assert_allclose(
            acts[name], np.asarray(want[name]).reshape(len(x), -1), rtol=1e-4, atol=1e-4
        )
    mean = probe.model_probe(model, variables, values=side)
    assert mean.index.layer_sizes == (16,) * 7 + (32,) * 6 + (64,) * 6
    _, flat = mean.flat(variables, x)
    np.testing.assert_allclose(
        flat,
        np.concatenate([np.asarray(want[n]).mean(axis=(1, 2)) for n in names], axis=-1),
        rtol=1e-4,
        atol=1e-4,
    )
    # post values are after the residual add: not the activation of the pre values
    assert not np.allclose(post["conv_2"], np.maximum(pre["conv_2"], 0), atol=1e-3)
    # the BatchNorm output (pre) as flax computes it, captured independently
    _, state = model.module.apply(
        variables,
        x,
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.BatchNorm),
        mutable=["intermediates"],
    )
    bn_out = state["intermediates"]["conv_7"]["bn"]["__call__"][0]
    np.testing.assert_allclose(pre["conv_7"], bn_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_resnet_gates_act_on_the_probed_value(side):
    model, variables = _resnet_variables(seed=1)
    prb = probe.model_probe(model, variables, values=side, conv_reduce="none")
    x = _random_x((8, 8, 1), seed=1)
    logits, acts = prb(variables, x)
    ones_logits, ones_acts = jax.jit(prb.gated)(variables, x, prb.ones(len(x)))
    np.testing.assert_allclose(ones_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ones_acts["conv_9"], acts["conv_9"], rtol=1e-5, atol=1e-5)
    # a gate of 0 on channel 3 of conv_1 (a block's first layer) and channel 5 of conv_18
    # (the last block's second layer, after its residual add for "post")
    by_hand = {}
    for name, units, channel in (("conv_1", 16, 3), ("conv_18", 64, 5)):
        g = np.ones(units, np.float32)
        g[channel] = 0.0
        by_hand[name] = g
    mean = probe.model_probe(model, variables, values=side)
    gated_logits, gated_acts = mean.gated(
        variables, x, {name: jnp.asarray(g)[None] for name, g in by_hand.items()}
    )
    want_logits, pre, post = _resnet20_by_hand_jit(variables, x, side=side, gates=by_hand)
    want = pre if side == "pre" else post
    np.testing.assert_allclose(gated_logits, want_logits, rtol=1e-4, atol=1e-4)
    for name in ("conv_1", "conv_2", "conv_18"):  # values before their own gate
        np.testing.assert_allclose(
            gated_acts[name], np.asarray(want[name]).mean(axis=(1, 2)), rtol=1e-4, atol=1e-4
        )
    assert float(np.abs(np.asarray(gated_logits) - np.asarray(logits)).max()) > 1e-4
    if side == "post":  # the channel the next layers read is zero
        h = post["conv_18"] * by_hand["conv_18"]
        assert float(np.abs(h[..., 5]).max()) == 0.0
        np.testing.assert_allclose(
            gated_logits,
            h.mean(axis=(1, 2)) @ variables["params"]["logits"]["kernel"]
            + variables["params"]["logits"]["bias"],
            rtol=1e-4,
            atol=1e-4,
        )


def test_resnet_spectrum_and_synthesis():
    from deepfault_jax import streaming, synthesis

    model, variables = _resnet_variables()
    prb = probe.model_probe(model, variables)
    x = _random_x((8, 8, 1), n=40, seed=3)
    y = np.arange(40, dtype=np.int32) % 10
    spectrum = streaming.compute_spectrum(prb, variables, x, y, batch_size=16)
    logits, flat = prb.flat(variables, x)
    correct = np.asarray(jnp.argmax(logits, -1)) == y
    active = np.asarray(flat) > 0
    onehot = np.eye(10, dtype=np.int64)[y]
    np.testing.assert_array_equal(spectrum.a_pass, (onehot * correct[:, None]).T @ active)
    np.testing.assert_array_equal(spectrum.a_fail, (onehot * ~correct[:, None]).T @ active)
    synth = synthesis.make_synthesizer(prb, mode="pgd", d=0.1, steps=3, step_size=0.05)
    table = np.tile(np.arange(5, dtype=np.int32) + 300, (10, 1))  # neurons of conv_18
    out = np.asarray(synthesis.synthesize(synth, variables, x[:8], y[:8], table))
    assert np.abs(out - x[:8]).max() <= 0.1 + 1e-6 and np.abs(out - x[:8]).max() > 0
    before = prb.flat(variables, x[:8])[1][:, 300:305].mean()
    assert float(prb.flat(variables, out)[1][:, 300:305].mean()) > float(before)
