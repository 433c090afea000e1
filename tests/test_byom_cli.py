"""Bring your own model: ``--model keras:PATH`` and ``--model flax:MODULE:FACTORY`` in the
spectrum, localize, run and repair commands, checked against references; and every bad
input refused with exit 2, one line naming the fix, and nothing written."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest
from keras_builders import deepfault_mlp
from reference import reduce_conv, spectrum_loops
from test_cli import assert_usage_error, run_cli

from deepfault_jax import checkpoints, foreign, probe, spectrum_io, zoo

pytestmark = [
    pytest.mark.usefixtures("model_cache"),
    # Keras's own saving trips a NumPy 2 deprecation inside keras (not ours)
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

FACTORIES = textwrap.dedent("""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import nnx


    class MLP(nn.Module):
        classes: int = 10

        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(20, name="dense_0")(x))
            x = nn.relu(nn.Dense(20, name="dense_1")(x))
            return nn.Dense(self.classes, name="logits")(x)


    def make():
        module = MLP()
        params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        return module, params, jax.nn.relu


    def make_five():
        module = MLP(classes=5)
        return module, module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(64, 16, rngs=rngs)
            self.out = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


    def make_nnx():
        return Net(nnx.Rngs(1))


    def _fn(params, x):
        h = x.reshape((x.shape[0], -1)) @ params["w"]
        return jnp.maximum(h, 0) @ params["v"], {"h": h}


    def make_fn():
        k1, k2 = jax.random.split(jax.random.key(2))
        return _fn, {"w": jax.random.normal(k1, (64, 12)) * 0.2,
                     "v": jax.random.normal(k2, (12, 10)) * 0.2}


    def make_flat_fn():  # takes flat inputs: not the data set's 8x8x1 images
        return (lambda p, x: (x @ p, {"x": x})), jnp.zeros((64, 10))


    def make_logits_only():
        return (lambda p, x: x.reshape((x.shape[0], -1)) @ p), jnp.zeros((64, 10))


    def make_wrong():
        return 42


    def make_raises():
        raise RuntimeError("no weights here")


    not_callable = 3
""")


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """A factory file, and its directory (for importing it by module name)."""
    directory = tmp_path_factory.mktemp("factories")
    path = directory / "byom_factories.py"
    path.write_text(FACTORIES)
    return path


def _spectrum(capsys, tmp_path, *argv, name="s.npz"):
    out = tmp_path / name
    code, text, err = run_cli(capsys, "spectrum", *argv, "--out", str(out), "--no-progress",
                              "--json")  # fmt: skip
    assert code == 0, err
    return json.loads(text), spectrum_io.load_spectrum(out)


def _assert_counts(spec, a_pass, a_fail, n_pass, n_fail):
    np.testing.assert_array_equal(spec.a_pass, a_pass)
    np.testing.assert_array_equal(spec.a_fail, a_fail)
    np.testing.assert_array_equal(spec.n_pass, n_pass)
    np.testing.assert_array_equal(spec.n_fail, n_fail)


def _error(capsys, tmp_path, command, *argv, fragments=(), out_name="out"):
    """Runs a command that must fail: exit 2, one line holding ``fragments``, --out absent."""
    out = tmp_path / out_name
    extra = ["--out", str(out.with_suffix(".npz") if command == "spectrum" else out)]
    code, text, err = run_cli(capsys, command, *argv, *extra, "--no-progress")
    line = assert_usage_error(code, text, err, *fragments)
    assert not out.exists() and not out.with_suffix(".npz").exists()
    return line


# --------------------------------------------------------------------------- flax factories


def test_flax_file_factory_spectrum_equals_linen_probe(capsys, tmp_path, factories, digits):
    spec_text = f"flax:{factories}:make"
    for values in ("pre", "post"):
        report, spec = _spectrum(capsys, tmp_path, "--model", spec_text, "--values", values,
                                 name=f"{values}.npz")  # fmt: skip
        assert report["model_source"] == spec_text and report["model"] == "make"
        assert report["activation"] is None and report["values"] == values
        # the reference: the same module and params probed directly
        sys.path.insert(0, str(factories.parent))
        try:
            import byom_factories
        finally:
            sys.path.remove(str(factories.parent))
        module, params, act = byom_factories.make()
        prb = probe.linen_probe(module, params["params"], input_shape=(8, 8, 1), values=values,
                                activation_fn=act)  # fmt: skip
        assert spec.index.layer_names == ("dense_0", "dense_1")
        logits, acts = prb.flat(params["params"], digits.x_test)
        _assert_counts(spec, *spectrum_loops(logits, acts, digits.y_test, num_classes=10))


def test_flax_module_name_localize_and_run(capsys, tmp_path, factories, monkeypatch):
    monkeypatch.syspath_prepend(str(factories.parent))
    code, text, err = run_cli(capsys, "localize", "--model", "flax:byom_factories:make",
                              "--method", "ochiai", "--k", "4", "--no-progress", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(text)
    assert result["model_source"] == "flax:byom_factories:make" and len(result["neurons"]) == 4
    # the same ranking as from the spectrum of the same model
    _spectrum(capsys, tmp_path, "--model", "flax:byom_factories:make")
    code, text, err = run_cli(capsys, "localize", "--spectrum", str(tmp_path / "s.npz"),
                              "--method", "ochiai", "--k", "4", "--json")  # fmt: skip
    assert code == 0, err
    assert [n["id"] for n in json.loads(text)["neurons"]] == [n["id"] for n in result["neurons"]]
    # the whole run
    out = tmp_path / "run"
    code, text, err = run_cli(capsys, "run", "--model", "flax:byom_factories:make",
                              "--measures", "ochiai", "--k", "1,2", "--classes", "0,1",
                              "--inputs-per-class", "3", "--random-repeats", "1",
                              "--out", str(out), "--no-progress", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["source"] == "flax:byom_factories:make"
    assert report["model"]["name"] == "make" and report["probe"]["layers"] == ["dense_0", "dense_1"]
    assert {r["measure"] for r in report["results"]} == {"ochiai"}


def test_flax_module_from_current_directory(capsys, tmp_path, factories, monkeypatch):
    (tmp_path / "cwd_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    report, spec = _spectrum(capsys, tmp_path, "--model", "flax:cwd_factories:make_nnx")
    assert report["model_source"] == "flax:cwd_factories:make_nnx"
    assert spec.index.layer_names == ("hidden",) and spec.index.num_neurons == 16


def test_flax_function_factory(capsys, tmp_path, factories, digits):
    report, spec = _spectrum(capsys, tmp_path, "--model", f"flax:{factories}:make_fn")
    assert spec.index.layer_names == ("h",)
    sys.path.insert(0, str(factories.parent))
    try:
        import byom_factories
    finally:
        sys.path.remove(str(factories.parent))
    fn, params = byom_factories.make_fn()
    logits, acts = fn(params, digits.x_test)
    _assert_counts(spec, *spectrum_loops(logits, acts["h"], digits.y_test, num_classes=10))


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("flax:{dir}/missing.py:make", ["does not exist", "missing.py"]),
        ("flax:no_such_module_xyz:make", ["cannot import flax module 'no_such_module_xyz'",
                                          "ModuleNotFoundError", "PYTHONPATH"]),
        ("flax:{dir}/broken.py:make", ["cannot import flax module file", "broken.py",
                                       "ModuleNotFoundError", "not_a_package_xyz"]),
        ("flax:{path}:nothing", ["has no factory 'nothing'", "make_fn"]),
        ("flax:{path}:not_callable", ["not callable", "int"]),
        ("flax:{path}:make_wrong", ["returned a int", "expected (linen_module, params"]),
        ("flax:{path}:make_raises", ["make_raises() raised RuntimeError", "no weights here"]),
        ("flax:{path}:make_logits_only", ["returns an array of shape [1, 10]",
                                          "expected (logits, {name: activation})"]),
        ("flax:{path}:make_flat_fn", ["cannot take the data set 'digits'", "[8, 8, 1]"]),
        ("flax:{path}:make_five", ["has 5 classes", "'digits' has 10"]),
        ("flax:justone", ["must be flax:MODULE:FACTORY"]),
    ],
)  # fmt: skip
def test_flax_errors(capsys, tmp_path, factories, spec, fragments):
    (tmp_path / "broken.py").write_text("import not_a_package_xyz\n")
    spec = spec.format(dir=tmp_path, path=factories)
    _error(capsys, tmp_path, "spectrum", "--model", spec, fragments=fragments)


def test_values_layer_and_trust_only_for_keras(capsys, tmp_path, factories):
    spec = f"flax:{factories}:make"
    _error(capsys, tmp_path, "spectrum", "--model", spec, "--values", "layer",
           fragments=["--values layer", "keras: models only", spec, "--values pre"])  # fmt: skip
    _error(capsys, tmp_path, "run", "--model", "mlp-3x50", "--values", "layer",
           fragments=["--values layer", "keras: models only", "mlp-3x50"])  # fmt: skip
    _error(capsys, tmp_path, "spectrum", "--model", spec, "--trust-model-file",
           fragments=["--trust-model-file goes with --model keras:PATH"])  # fmt: skip


def test_refusals_of_train_faultbench_and_flax_repair(capsys, tmp_path, factories):
    spec = f"flax:{factories}:make"
    _error(capsys, tmp_path, "repair", "--model", spec,
           fragments=["repair writes the repaired model back", "flax: factory", "keras:PATH"])  # fmt: skip
    _error(capsys, tmp_path, "train", "--model", "keras:m.h5",
           fragments=["zoo model", "come trained"])  # fmt: skip
    _error(capsys, tmp_path, "faultbench", "--models", spec,
           fragments=["faultbench plants faults into zoo models"])  # fmt: skip


def test_keras_not_installed(capsys, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "keras" or m.startswith("keras.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras now fails
    (tmp_path / "m.keras").write_bytes(b"not read")
    _error(capsys, tmp_path, "spectrum", "--model", f"keras:{tmp_path / 'm.keras'}",
           fragments=["keras is not installed", "pip install -e '.[keras]'"])  # fmt: skip


# --------------------------------------------------------------------------- keras


@pytest.fixture(scope="module")
def keras():
    from deepfault_jax.keras_models import require_keras

    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "jax")  # as require_keras does
    pytest.importorskip("keras", reason="keras is not installed: pip install -e '.[keras]'")
    pytest.importorskip("h5py", reason="h5py is not installed: pip install -e '.[keras]'")
    return require_keras()


def _lenet(keras):
    L = keras.layers
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(4, 3, padding="same", activation="relu", name="conv_0"),
        L.MaxPooling2D(name="pool_0"),
        L.Conv2D(8, 3, padding="same", activation="relu", name="conv_1"),
        L.MaxPooling2D(name="pool_1"), L.Flatten(name="flatten"),
        L.Dense(16, activation="relu", name="dense_0"),
        L.Dense(10, activation="softmax", name="logits"),
    ], name="lenet")  # fmt: skip


@pytest.fixture(scope="module")
def keras_files(keras, tmp_path_factory, digits):
    """The DeepFault MLP and a LeNet, trained for a few steps, as .h5 and .keras files."""
    directory = tmp_path_factory.mktemp("keras")
    out = {}
    for name, build in (("mlp", deepfault_mlp), ("lenet", _lenet)):
        model = build(keras)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(digits.x_train[:256], digits.y_train[:256], epochs=1, batch_size=64, verbose=0)
        paths = {}
        for suffix in (".h5", ".keras"):
            paths[suffix] = directory / f"{name}{suffix}"
            model.save(paths[suffix])
        out[name] = (model, paths)
    return out


def _keras_outputs(keras, model, layers, x):
    """Keras's own outputs of ``layers``, by a sub-model per layer."""
    return [
        np.asarray(keras.Model(model.inputs, model.get_layer(name).output).predict(x, verbose=0))
        for name in layers
    ]


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_keras_spectrum_matches_keras_layer_outputs(capsys, tmp_path, keras, keras_files, digits,
                                                    name, suffix):  # fmt: skip
    model, paths = keras_files[name]
    report, spec = _spectrum(capsys, tmp_path, "--model", f"keras:{paths[suffix]}",
                             "--values", "layer")  # fmt: skip
    assert report["model_source"] == f"keras:{paths[suffix].absolute()}"
    assert report["model"] == name and report["values"] == "layer"
    hidden = {"mlp": ("dense_0", "dense_1"), "lenet": ("conv_0", "conv_1", "dense_0")}[name]
    assert spec.index.layer_names == hidden
    refs = _keras_outputs(keras, model, hidden, digits.x_test)
    flat = np.concatenate([reduce_conv(r, "mean") for r in refs], axis=1)
    probs = model.predict(digits.x_test, verbose=0)
    _assert_counts(spec, *spectrum_loops(probs, flat, digits.y_test, num_classes=10))
    if name == "mlp":  # Dense then a separate LeakyReLU: the layer's output is its pre value
        _, pre = _spectrum(capsys, tmp_path, "--model", f"keras:{paths[suffix]}", name="pre.npz")
        _assert_counts(pre, spec.a_pass, spec.a_fail, spec.n_pass, spec.n_fail)


def test_keras_localize_equals_spectrum_ranking(capsys, tmp_path, keras_files):
    path = keras_files["lenet"][1][".h5"]
    _spectrum(capsys, tmp_path, "--model", f"keras:{path}", "--values", "layer")
    code, text, err = run_cli(capsys, "localize", "--model", f"keras:{path}", "--values",
                              "layer", "--method", "ochiai", "--k", "6", "--no-progress",
                              "--json")  # fmt: skip
    assert code == 0, err
    from_model = json.loads(text)
    assert from_model["model_source"] == f"keras:{path.absolute()}"
    code, text, err = run_cli(capsys, "localize", "--spectrum", str(tmp_path / "s.npz"),
                              "--method", "ochiai", "--k", "6", "--json")  # fmt: skip
    assert code == 0, err
    assert [n["id"] for n in json.loads(text)["neurons"]] == [
        n["id"] for n in from_model["neurons"]
    ]
    # a model localizer (exact ablation, through the Keras probe's gates)
    code, text, err = run_cli(capsys, "localize", "--model", f"keras:{path}", "--method",
                              "ablation", "--k", "3", "--no-progress", "--json")  # fmt: skip
    assert code == 0, err
    # DeepFault's bias-free Dense layers: parameter localizers say which ones serve them
    mlp = keras_files["mlp"][1][".keras"]
    code, text, err = run_cli(capsys, "localize", "--model", f"keras:{mlp}", "--method",
                              "grad_norm", "--no-progress")  # fmt: skip
    assert_usage_error(code, text, err, "no bias", "ochiai")


@pytest.fixture(scope="module")
def twin(keras, tmp_path_factory, digits):
    """zoo mlp-3x50 with fresh parameters as a checkpoint, and its Keras twin (Dense(50, relu)
    x3 + Dense(10), the same weights) as a .keras file."""
    directory = tmp_path_factory.mktemp("twin")
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(7), model)
    checkpoint = checkpoints.save_checkpoint(directory / "ck", model, params)
    L = keras.layers
    names = ("dense_0", "dense_1", "dense_2", "logits")
    twin = keras.Sequential([
        keras.Input((8, 8, 1)), L.Flatten(),
        *[L.Dense(50, activation="relu", name=n) for n in names[:3]],
        L.Dense(10, name="logits"),
    ], name="twin")  # fmt: skip
    for n in names:
        twin.get_layer(n).set_weights([np.asarray(params[n]["kernel"]),
                                       np.asarray(params[n]["bias"])])  # fmt: skip
    path = directory / "twin.keras"
    twin.save(path)
    return checkpoint, path


@pytest.mark.parametrize("values", ["pre", "post"])
def test_keras_twin_of_a_zoo_model_has_the_same_spectrum(capsys, tmp_path, twin, values):
    checkpoint, path = twin
    _, zoo_spec = _spectrum(capsys, tmp_path, "--checkpoint", str(checkpoint), "--values",
                            values, name="zoo.npz")  # fmt: skip
    _, keras_spec = _spectrum(capsys, tmp_path, "--model", f"keras:{path}", "--values", values,
                              name="keras.npz")  # fmt: skip
    assert keras_spec.index == zoo_spec.index
    _assert_counts(keras_spec, zoo_spec.a_pass, zoo_spec.a_fail, zoo_spec.n_pass, zoo_spec.n_fail)


def test_keras_repair_writes_a_keras_model_every_command_reads(capsys, tmp_path, keras, twin,
                                                               digits):  # fmt: skip
    _, path = twin
    before = path.read_bytes()
    out = tmp_path / "rep"
    code, text, err = run_cli(capsys, "repair", "--model", f"keras:{path}", "--k", "3",
                              "--budget", "20", "--random-repeats", "1", "--validation", "200",
                              "--baselines", "random", "--out", str(out), "--no-progress",
                              "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(text)
    assert sorted(p.name for p in out.iterdir()) == ["model.keras", "repair.json", "repair.md"]
    assert result["model"]["source"] == f"keras:{path.absolute()}"
    assert path.read_bytes() == before  # the input file is never modified
    from deepfault_jax.keras_models import keras_probe, load_keras_model

    _, original, _ = keras_probe(load_keras_model(path))
    prb, repaired, _ = keras_probe(load_keras_model(out / "model.keras"))
    changed = sum(int(np.count_nonzero(np.asarray(original[n][k]) != np.asarray(repaired[n][k])))
                  for n in original for k in original[n])  # fmt: skip
    assert changed == result["results"]["targeted"]["changed"]
    accuracy = float(np.mean(np.argmax(prb(repaired, digits.x_test)[0], -1) == digits.y_test))
    assert accuracy == pytest.approx(result["results"]["targeted"]["accuracy_after"])
    _spectrum(capsys, tmp_path, "--model", f"keras:{out / 'model.keras'}")
    # --out may not hold the input file: refused, the directory kept as it was
    written = (out / "model.keras").read_bytes()
    code, text, err = run_cli(capsys, "repair", "--model", f"keras:{out / 'model.keras'}",
                              "--out", str(out), "--no-progress")  # fmt: skip
    assert_usage_error(code, text, err, "--out must lie apart from the input model")
    assert (out / "model.keras").read_bytes() == written


def _save(keras, tmp_path, layers, name, shape=(8, 8, 1)):
    model = keras.Sequential([keras.Input(shape), *layers], name=name)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return path


def test_keras_errors(capsys, tmp_path, keras, keras_files):
    L = keras.layers
    text_file = tmp_path / "notes.h5"
    text_file.write_text("not a model\n")
    cases = [
        (text_file, ["notes.h5", "expected a Keras model"]),
        (tmp_path / "missing.keras", ["does not exist", "missing.keras"]),
        (_save(keras, tmp_path, [L.Flatten(), L.Dense(8), L.LayerNormalization(), L.Dense(10)],
               "norm"), ["LayerNormalization", "not support"]),
        (_save(keras, tmp_path, [L.Dense(8), L.Dense(10)], "flat", shape=(64,)),
         ["takes inputs of shape [64]", "[8, 8, 1]", "Flatten"]),
        (_save(keras, tmp_path, [L.Flatten(), L.Dense(8), L.Dense(5)], "five"),
         ["has 5 classes", "'digits' has 10"]),
    ]  # fmt: skip
    for path, fragments in cases:
        _error(capsys, tmp_path, "spectrum", "--model", f"keras:{path}", fragments=fragments)
    # a Lambda layer: refused in safe mode, loaded with --trust-model-file
    lam = _save(keras, tmp_path, [L.Flatten(), L.Lambda(lambda x: x * 2.0, name="double"),
                                  L.Dense(8, name="dense_0"), L.Dense(10, name="logits")],
                "lam")  # fmt: skip
    _error(capsys, tmp_path, "spectrum", "--model", f"keras:{lam}",
           fragments=["'double'", "--trust-model-file"])  # fmt: skip
    _spectrum(capsys, tmp_path, "--model", f"keras:{lam}", "--trust-model-file")
    # DeepFault's bias-free MLP cannot be repaired through its neurons' parameters
    mlp = keras_files["mlp"][1][".h5"]
    _error(capsys, tmp_path, "repair", "--model", f"keras:{mlp}",
           fragments=["repair needs parameters", "no bias"])  # fmt: skip


def test_foreign_model_object(keras, keras_files, digits):
    path = keras_files["lenet"][1][".keras"]
    model, params = foreign.load_foreign(f"keras:{path}", input_shape=(8, 8, 1), num_classes=10)
    assert (model.kind, model.flavour, model.name) == ("keras", "keras", "lenet")
    assert model.input_shape == (8, 8, 1) and model.num_classes == 10
    assert model.source == f"keras:{path.absolute()}" and model.activation is None
    prb = model.probe(params, values="layer")
    assert prb is model.probe(params, values="layer")  # made once per options
    assert prb.index.layer_names == ("conv_0", "conv_1", "dense_0")
