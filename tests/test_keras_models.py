"""Keras probes: loaded .keras/.h5 models give the values of Keras's own layer outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras_builders import deepfault_mlp  # noqa: E402
from reference import reduce_conv, spectrum_loops  # noqa: E402

keras = pytest.importorskip("keras", reason="keras is not installed: pip install -e '.[keras]'")
h5py = pytest.importorskip("h5py", reason="h5py is not installed: pip install -e '.[keras]'")

from deepfault_jax import compute_spectrum  # noqa: E402
from deepfault_jax.errors import InputError  # noqa: E402
from deepfault_jax.keras_models import (  # noqa: E402
    check_input_shape,
    keras_probe,
    load_keras_model,
    require_keras,
)

# Keras's own saving and set_weights trip a NumPy 2 deprecation inside keras (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

L = keras.layers
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _lenet():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((12, 12, 1)),
        L.Conv2D(4, 5, activation="relu", name="conv_0"), L.MaxPooling2D(name="pool_0"),
        L.Conv2D(8, 3, activation="relu", name="conv_1"), L.MaxPooling2D(name="pool_1"),
        L.Flatten(name="flatten"),
        L.Dense(16, activation="relu", name="dense_0"),
        L.Dense(10, activation="softmax", name="logits"),
    ], name="lenet")  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model (in memory) and its .keras and .h5 files."""
    directory = tmp_path_factory.mktemp("keras")
    out = {}
    for name, build in (("mlp", lambda: deepfault_mlp(keras)), ("lenet", _lenet)):
        model = build()
        paths = {}
        for suffix in (".keras", ".h5"):
            paths[suffix] = directory / f"{name}{suffix}"
            model.save(paths[suffix])
        out[name] = (model, paths)
    return out


def _x(model, n=24, seed=0):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _outputs(model, layers, x):
    """Keras's own outputs of ``layers`` (names or KerasTensors), by a sub-model."""
    tensors = [model.get_layer(t).output if isinstance(t, str) else t for t in layers]
    sub = keras.Model(model.inputs, tensors)
    out = sub.predict(x, verbose=0, batch_size=len(x))
    return [np.asarray(v) for v in (out if isinstance(out, (list, tuple)) else [out])]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_layer_values_match_keras(saved, name, suffix):
    original, paths = saved[name]
    model = load_keras_model(paths[suffix])
    probe, params, info = keras_probe(model)
    x = _x(model)
    hidden = {"mlp": ("dense_0", "dense_1"), "lenet": ("conv_0", "conv_1", "dense_0")}[name]
    assert probe.index.layer_names == info.layers == hidden
    assert info.input_shape == probe.input_shape == tuple(x.shape[1:])
    assert info.num_classes == probe.num_classes == 10
    assert info.ends_in_softmax
    assert probe.values == info.values == "layer"
    logits, acts = probe(params, x)
    # the reference: sub-models of the model as built (never touched by the probe)
    for layer, want in zip(hidden, _outputs(original, hidden, x), strict=True):
        np.testing.assert_allclose(acts[layer], reduce_conv(want, "mean"), **TOL)
    probs = original.predict(x, verbose=0, batch_size=len(x))
    np.testing.assert_allclose(logits, np.log(probs), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(probs, -1))
    jitted = jax.jit(probe.fn)(params, x)
    np.testing.assert_allclose(jitted[0], logits, **TOL)
    for layer in hidden:
        np.testing.assert_allclose(jitted[1][layer], acts[layer], **TOL)


def test_params_layout(saved):
    model = load_keras_model(saved["lenet"][1][".keras"])
    _, params, info = keras_probe(model)
    assert {k: sorted(v) for k, v in params.items()} == {
        "conv_0": ["bias", "kernel"], "conv_1": ["bias", "kernel"],
        "dense_0": ["bias", "kernel"], "logits": ["bias", "kernel"]}  # fmt: skip
    np.testing.assert_array_equal(params["conv_0"]["kernel"], model.get_layer("conv_0").kernel)
    assert info.layer_types == ("Conv2D", "Conv2D", "Dense")
    assert info.chain[1] == ("pool_0", "MaxPooling2D")


def test_lenet_pre_values(saved):
    original, paths = saved["lenet"]
    model = load_keras_model(paths[".keras"])
    x = _x(model, n=6)
    for reduce in ("mean", "max", "none"):
        probe, params, _ = keras_probe(model, values="pre", conv_reduce=reduce)
        _, acts = probe(params, x)
        for name in ("conv_0", "conv_1"):
            conv = original.get_layer(name)
            # the same convolution without its relu, on the layer's own input
            twin = L.Conv2D(conv.filters, conv.kernel_size, activation=None)
            twin.build(conv.input.shape)
            twin.set_weights(conv.get_weights())
            (inputs,) = _outputs(original, [conv.input], x) if name != "conv_0" else (x,)
            want = np.asarray(twin(inputs))
            assert want.min() < 0  # pre-relu values differ from the layer's output
            np.testing.assert_allclose(acts[name], reduce_conv(want, reduce), **TOL)


def test_mlp_post_values_and_types(saved):
    original, paths = saved["mlp"]
    model = load_keras_model(paths[".h5"])
    probe, params, _ = keras_probe(model, values="post", layers=["Dense"])
    assert probe.index.layer_names == ("dense_0", "dense_1")  # a type selects the hidden layers
    x = _x(model, n=6)
    _, acts = probe(params, x)
    refs = _outputs(original, ["leaky_0", "leaky_1"], x)
    for name, want in zip(("dense_0", "dense_1"), refs, strict=True):
        assert want.min() < 0  # leaky relu of negative values
        np.testing.assert_allclose(acts[name], want, **TOL)
    # the output layer, probed by name: post = the softmax probabilities
    probe, params, _ = keras_probe(model, values="post", layers=["logits"])
    logits, acts = probe(params, x)
    probs = original.predict(x, verbose=0, batch_size=len(x))
    np.testing.assert_allclose(acts["logits"], probs, **TOL)
    np.testing.assert_allclose(logits, np.log(probs), rtol=1e-5, atol=1e-5)


def _leaky(v):
    return np.where(v > 0, v, 0.3 * v)  # Keras's LeakyReLU default negative_slope


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mlp_gates_match_numpy_ablation(saved):
    model = load_keras_model(saved["mlp"][1][".keras"])
    probe, params, _ = keras_probe(model)
    x = _x(model, n=6)
    logits, acts = probe(params, x)
    ones_logits, ones_acts = probe.gated(params, x, probe.ones(len(x)))
    np.testing.assert_array_equal(ones_logits, logits)
    for name in probe.index.layer_names:
        np.testing.assert_array_equal(ones_acts[name], acts[name])
    # zero unit 7 of the first Dense layer; the forward pass in NumPy from the weights
    unit = 7
    gates = probe.ones(1)
    gates["dense_0"] = gates["dense_0"].at[0, unit].set(0.0)
    gated_logits, gated_acts = probe.gated(params, x, gates)
    w = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    h1 = x.reshape(len(x), -1).astype(np.float64) @ w["dense_0"]["kernel"]
    np.testing.assert_allclose(acts["dense_0"], h1, rtol=1e-5, atol=1e-5)
    cut = h1.copy()
    cut[:, unit] = 0.0
    h2 = _leaky(cut) @ w["dense_1"]["kernel"]
    z = _leaky(h2) @ w["logits"]["kernel"] + w["logits"]["bias"]
    np.testing.assert_allclose(gated_acts["dense_0"], h1, rtol=1e-5, atol=1e-5)  # before the gate
    np.testing.assert_allclose(gated_acts["dense_1"], h2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gated_logits, _log_softmax(z), rtol=1e-5, atol=1e-5)
    assert not np.allclose(gated_logits, logits)


@pytest.mark.parametrize("values", ["layer", "pre"])
def test_lenet_channel_gate_matches_masked_keras_model(saved, values):
    """Zeroing channel 2 of the first conv, before (pre) or after (layer) its relu, equals
    the Keras model with that channel multiplied by 0 after the layer."""
    original, paths = saved["lenet"]
    model = load_keras_model(paths[".h5"])
    probe, params, _ = keras_probe(model, values=values)
    x = _x(model, n=6)
    logits, _ = probe(params, x)
    ones_logits, _ = probe.gated(params, x, probe.ones(len(x)))
    np.testing.assert_array_equal(ones_logits, logits)
    gates = probe.ones(1)
    gates["conv_0"] = gates["conv_0"].at[0, 2].set(0.0)
    gated_logits, _ = probe.gated(params, x, gates)
    mask = np.ones(4, np.float32)
    mask[2] = 0.0
    inputs = keras.Input((12, 12, 1))
    h = L.Lambda(lambda t: t * mask)(original.get_layer("conv_0")(inputs))
    for layer in original.layers[1:]:
        h = layer(h)
    masked = keras.Model(inputs, h).predict(x, verbose=0, batch_size=len(x))
    np.testing.assert_allclose(gated_logits, np.log(masked), rtol=1e-5, atol=1e-5)
    assert not np.allclose(gated_logits, logits)
    # gradients flow through the gates (attribution)
    grads = jax.grad(lambda g: probe.gated(params, x, g)[0][:, 0].sum())(probe.ones(1))
    assert grads["conv_0"].shape == (1, 4) and np.all(np.isfinite(grads["conv_0"]))


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_spectrum_matches_loop_counts(saved, name):
    original, paths = saved[name]
    model = load_keras_model(paths[".keras"])
    probe, params, _ = keras_probe(model)
    x = _x(model, n=40, seed=3)
    y = np.random.default_rng(4).integers(0, 10, len(x))
    # the lenet run also gathers attribution sums (through the gates)
    spectrum = compute_spectrum(probe, params, x, y, batch_size=16, attribution=name == "lenet")
    assert (spectrum.attribution is not None) == (name == "lenet")
    refs = _outputs(original, probe.index.layer_names, x)
    flat = np.concatenate([reduce_conv(r, "mean") for r in refs], axis=1)
    probs = original.predict(x, verbose=0, batch_size=len(x))
    a_pass, a_fail, n_pass, n_fail = spectrum_loops(probs, flat, y, num_classes=10)
    np.testing.assert_array_equal(spectrum.a_pass, a_pass)
    np.testing.assert_array_equal(spectrum.a_fail, a_fail)
    np.testing.assert_array_equal(spectrum.n_pass, n_pass)
    np.testing.assert_array_equal(spectrum.n_fail, n_fail)


def test_functional_chain_with_batchnorm_and_dropout(tmp_path):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 1))
    h = L.Conv2D(3, 3, padding="same", name="conv")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU()(h)
    h = L.Dropout(0.5)(h)
    h = L.Flatten()(L.ZeroPadding2D(1)(L.AveragePooling2D(2)(h)))
    outputs = L.Softmax()(L.Dense(5, name="logits")(h))
    original = keras.Model(inputs, outputs, name="functional_bn")
    bn = original.get_layer("bn")
    rng = np.random.default_rng(0)
    bn.set_weights([rng.random(3) + 0.5, rng.random(3), rng.random(3), rng.random(3) + 0.5])
    original.save(tmp_path / "bn.keras")
    model = load_keras_model(tmp_path / "bn.keras")
    probe, params, info = keras_probe(model)
    assert info.layers == ("conv",) and info.ends_in_softmax
    assert sorted(params) == ["bn", "conv", "logits"]
    assert sorted(params["bn"]) == ["beta", "gamma", "moving_mean", "moving_variance"]
    x = _x(model, n=6)
    logits, acts = probe(params, x)
    (conv,) = _outputs(original, ["conv"], x)
    np.testing.assert_allclose(acts["conv"], reduce_conv(conv, "mean"), **TOL)
    probs = original.predict(x, verbose=0, batch_size=len(x))
    np.testing.assert_allclose(logits, np.log(probs), rtol=1e-5, atol=1e-5)
    # the conv's "post" would need an activation right after it; BatchNormalization follows
    with pytest.raises(InputError, match="'conv' .*followed by 'bn'"):
        keras_probe(model, values="post")


def test_conv1d_causal():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([
        keras.Input((10, 2)), L.Conv1D(3, 3, padding="causal", activation="relu", name="conv"),
        L.GlobalAveragePooling1D(), L.Dense(4, activation="softmax")])  # fmt: skip
    probe, params, _ = keras_probe(model, values="pre", conv_reduce="none")
    x = _x(model, n=4)
    _, acts = probe(params, x)
    conv = model.get_layer("conv")
    twin = L.Conv1D(3, 3, padding="causal")
    twin.build((None, 10, 2))
    twin.set_weights(conv.get_weights())
    np.testing.assert_allclose(acts["conv"], np.asarray(twin(x)).reshape(4, -1), **TOL)


def test_probe_equality_and_selection(saved):
    model = load_keras_model(saved["lenet"][1][".keras"])
    a, _, _ = keras_probe(model)
    b, _, _ = keras_probe(model)
    assert a == b and hash(a) == hash(b)
    assert a != keras_probe(model, values="pre")[0]
    assert keras_probe(model, layers=["logits"])[0].index.layer_sizes == (10,)
    assert keras_probe(model, layers=["Conv2D"])[0].index.layer_names == ("conv_0", "conv_1")
    with pytest.raises(
        InputError,
        match=r"unknown layer 'nope'; expected one of conv_0, conv_1, dense_0, logits or a layer type \(Conv2D, Dense\)",
    ):
        keras_probe(model, layers=["nope"])
    with pytest.raises(InputError, match="layer 'flatten' is a Flatten, not a Dense or Conv"):
        keras_probe(model, layers=["flatten"])
    with pytest.raises(InputError, match="values must be one of layer, pre, post; got 'mid'"):
        keras_probe(model, values="mid")


def test_input_shape_check(saved):
    model = load_keras_model(saved["mlp"][1][".keras"])
    _, _, info = keras_probe(model)
    check_input_shape(info, (8, 8, 1))
    with pytest.raises(InputError, match=r"shape \[8, 8, 1\].*shape \[28, 28, 1\]"):
        check_input_shape(info, (28, 28, 1))


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_keras_model(tmp_path / "missing.keras")
    text = tmp_path / "model.keras"
    text.write_text("not a model")
    with pytest.raises(InputError, match="neither a .keras zip archive nor an HDF5 file"):
        load_keras_model(text)
    npz = tmp_path / "weights.npz"
    np.savez(npz, a=np.zeros(3))
    with pytest.raises(InputError, match=r"zip archive without config.json \(it holds a.npy\)"):
        load_keras_model(npz)
    weights = tmp_path / "weights.h5"
    with h5py.File(weights, "w") as f:
        f["w"] = np.zeros(3)
    with pytest.raises(InputError, match="HDF5 file without a model config"):
        load_keras_model(weights)


def _lambda_model():
    return keras.Sequential(
        [keras.Input((4,)), L.Dense(3), L.Lambda(lambda t: t * 2, name="double"), L.Dense(2)]
    )


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_refused_under_safe_mode(tmp_path, suffix):
    path = tmp_path / f"lambda{suffix}"
    _lambda_model().save(path)
    with pytest.raises(
        InputError, match=r"layer 'double' \(Lambda\) holds Python code.*--trust-model-file"
    ):
        load_keras_model(path)
    # trusted, the file's function runs (traced by JAX) in the probe
    model = load_keras_model(path, safe_mode=False)
    probe, params, _ = keras_probe(model)
    x = _x(model, n=3)
    np.testing.assert_allclose(probe(params, x)[0], model.predict(x, verbose=0), **TOL)


def test_legacy_h5_lambda_is_not_unmarshalled(tmp_path):
    """A Keras 2 Lambda config (marshalled code in a list): Keras's own legacy loader refuses it
    under safe mode before decoding the code (here garbage, which would fail to decode)."""
    path = tmp_path / "legacy.h5"
    _lambda_model().save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Lambda":
                layer["config"]["function"] = ["not marshalled code", None, None]
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ValueError, match="Lambda"):
        keras.saving.load_model(path, safe_mode=True, compile=False)
    with pytest.raises(InputError, match="'double' \\(Lambda\\).*--trust-model-file"):
        load_keras_model(path)


def test_unknown_custom_class(tmp_path):
    @keras.saving.register_keras_serializable(package="deepfault_test")
    class Triple(L.Layer):
        def call(self, x):
            return x * 3

    path = tmp_path / "custom.keras"
    keras.Sequential([keras.Input((4,)), L.Dense(3), Triple(name="triple"), L.Dense(2)]).save(path)
    keras.saving.get_custom_objects().pop("deepfault_test>Triple")
    # unregistered, its class would be imported from the module the file names: refused
    with pytest.raises(
        InputError,
        match=r"names code outside Keras \(Triple from module .*register_keras_serializable",
    ):
        load_keras_model(path)


@pytest.mark.parametrize(
    "layer, cls", [(lambda: L.Embedding(10, 3), "Embedding"), (lambda: L.LSTM(3), "LSTM")]
)
def test_unsupported_layers(layer, cls):
    inputs = keras.Input((4,), dtype="int32") if cls == "Embedding" else keras.Input((4, 2))
    h = layer()(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(h) if cls == "Embedding" else h))
    with pytest.raises(
        InputError, match=f"has class {cls}, which the Keras probe does not support"
    ):
        keras_probe(model)


def test_non_chain_refused():
    inputs = keras.Input((4,))
    a, b = L.Dense(3)(inputs), L.Dense(3)(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.Add(name="add")([a, b])))
    with pytest.raises(InputError, match="'add' \\(Add\\) .* takes 2 inputs"):
        keras_probe(model)


def test_post_without_activation_refused():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="a"), L.Dense(2, name="b")])
    with pytest.raises(InputError, match="values='post' of layer 'a' .*followed by 'b'"):
        keras_probe(model, values="post")


def test_require_keras(monkeypatch):
    assert require_keras() is keras
    assert keras.backend.backend() == "jax"
    monkeypatch.setitem(sys.modules, "keras", None)  # as if keras were not installed
    with pytest.raises(
        InputError, match=re.escape("keras is not installed: pip install -e '.[keras]'")
    ):
        require_keras()


def test_require_keras_refuses_another_backend():
    code = (
        "import keras\n"
        "from deepfault_jax.errors import InputError\n"
        "from deepfault_jax.keras_models import require_keras\n"
        "try:\n    require_keras()\nexcept InputError as e:\n    print(e)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "keras runs the 'numpy' backend; expected 'jax'" in done.stdout, done.stderr


def test_lambda_of_a_named_function_is_refused_under_safe_mode(tmp_path):
    """A Lambda whose function is named by module (no code stored) still runs code the file
    chooses: refused by name, like a stored lambda."""
    path = tmp_path / "named.keras"
    keras.Sequential([keras.Input((4,)), L.Dense(3), L.Lambda(keras.ops.abs, name="absolute"),
                      L.Dense(2)]).save(path)  # fmt: skip
    with pytest.raises(InputError, match=r"layer 'absolute' \(Lambda\).*--trust-model-file"):
        load_keras_model(path)


def test_a_config_naming_a_module_outside_keras_is_refused(tmp_path):
    """A .keras config whose object names another module (the route of CVE-2025-1550) is
    refused before Keras deserializes anything, whatever the installed Keras checks."""
    import zipfile

    path, forged = tmp_path / "plain.keras", tmp_path / "forged.keras"
    keras.Sequential([keras.Input((4,)), L.Dense(3, name="hidden"), L.Dense(2)]).save(path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                hidden = [e for e in config["config"]["layers"] if e["config"]["name"] == "hidden"]
                hidden[0]["config"]["kernel_initializer"] = {
                    "module": "os",
                    "class_name": "system",
                    "config": {},
                    "registered_name": None,
                }
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    assert load_keras_model(path) is not None  # the file as saved loads
    with pytest.raises(InputError, match=r"names code outside Keras \(system from module 'os'\)"):
        load_keras_model(forged)
