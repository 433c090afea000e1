"""Models: forward pass on every input shape, training on real data, checkpoints."""

from __future__ import annotations

import functools
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_fashion

from deepfault_jax import checkpoints, cli, data, training, zoo
from deepfault_jax.errors import InputError, InputTypeError

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_forward_every_model_every_shape(name, shape):
    model = zoo.create_model(name, input_shape=shape, num_classes=7)
    params = zoo.init_params(jax.random.key(0), model)
    x = jax.random.uniform(jax.random.key(1), (3, *shape))
    apply = jax.jit(model.apply)
    logits = apply(params, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # each example is computed on its own: batch composition does not matter
    np.testing.assert_allclose(apply(params, x[:1]), logits[:1], rtol=1e-5, atol=1e-6)
    # different inputs give different outputs (the model is not constant)
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 0


def test_layer_names_are_stable():
    model = zoo.create_model("lenet5", input_shape=(28, 28, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    assert list(params) == ["conv_0", "conv_1", "dense_0", "dense_1", "logits"]
    assert params["conv_0"]["kernel"].shape == (5, 5, 1, 6)
    assert params["dense_1"]["kernel"].shape == (120, 84)
    cifar = zoo.init_params(
        jax.random.key(0),
        zoo.create_model("cifar-convnet", input_shape=(32, 32, 3), num_classes=10),
    )
    assert [cifar[f"conv_{i}"]["kernel"].shape[-1] for i in range(4)] == [32, 32, 64, 64]
    assert cifar["dense_0"]["kernel"].shape == (8 * 8 * 64, 512)
    mlp = zoo.init_params(
        jax.random.key(0), zoo.create_model("mlp-8x20", input_shape=(8, 8, 1), num_classes=10)
    )
    assert list(mlp) == [f"dense_{i}" for i in range(8)] + ["logits"]


def test_leaky_relu_differs_from_relu():
    x = -jnp.ones((2, 8, 8, 1))
    relu = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    leaky = zoo.create_model(
        "mlp-3x50", input_shape=(8, 8, 1), num_classes=10, activation="leaky_relu"
    )
    params = zoo.init_params(jax.random.key(0), relu)
    assert not np.allclose(relu.apply(params, x), leaky.apply(params, x))


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'; expected one of mlp-3x50"):
        zoo.create_model("vgg", input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match="unknown activation 'tanh'; expected one of relu"):
        zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10, activation="tanh")
    with pytest.raises(ValueError, match=r"input_shape must be .*got \(8, 8\)"):
        zoo.create_model("lenet1", input_shape=(8, 8), num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be >= 2; got 1"):
        zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=1)


def test_model_is_a_static_jit_argument():
    a = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    b = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    assert a == b and hash(a) == hash(b)
    assert a != zoo.create_model("mlp-3x50", input_shape=(28, 28, 1), num_classes=10)


@pytest.mark.parametrize("name", ["mlp-3x50", "nnx-mlp-3x50"])
def test_train_on_digits_reaches_95_percent(digits, name):
    model = zoo.create_model(name, input_shape=digits.input_shape, num_classes=10)
    result = training.train(jax.random.key(0), model, digits)
    assert len(result.history) == zoo.default_epochs(digits) == 40
    assert result.test_accuracy >= 0.95
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 5
    assert result.test_accuracy == zoo.accuracy(model, result.params, digits.x_test, digits.y_test)


def test_train_is_reproducible_by_seed(digits):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    a = training.train(jax.random.key(3), model, digits, epochs=2)
    b = training.train(jax.random.key(3), model, digits, epochs=2)
    c = training.train(jax.random.key(4), model, digits, epochs=2)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.params["logits"]["kernel"], c.params["logits"]["kernel"])


def test_train_and_predict_refuse_mismatched_data(digits):
    model = zoo.create_model("lenet1", input_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(ValueError, match=r"built for input \(28, 28, 1\).*has input \(8, 8, 1\)"):
        training.train(jax.random.key(0), model, digits, epochs=1)
    params = zoo.init_params(jax.random.key(0), model)
    with pytest.raises(ValueError, match=r"expects images of shape \(28, 28, 1\); got \(8, 8, 1\)"):
        zoo.predict(model, params, digits.x_test)
    model = zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match=r"epochs must lie in \[1, inf\]; got 0"):
        training.train(jax.random.key(0), model, digits, epochs=0)


def test_predict_pads_the_tail_without_changing_results(digits):
    model = zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    full = np.asarray(jnp.argmax(model.apply(params, digits.x_test), -1))
    for batch_size in (1, 7, 1000):
        got = zoo.predict(model, params, digits.x_test, batch_size=batch_size)
        np.testing.assert_array_equal(got, full)


@needs_fashion
@pytest.mark.slow
@pytest.mark.parametrize(("name", "floor"), [("mlp-3x50", 0.85), ("lenet5", 0.88)])
def test_fashion_mnist_accuracy_with_default_epochs(name, floor):
    ds = data.load_dataset("fashion-mnist")
    model = zoo.create_model(name, input_shape=ds.input_shape, num_classes=10)
    result = training.train(jax.random.key(0), model, ds)
    assert len(result.history) == 10
    assert result.test_accuracy >= floor


# --------------------------------------------------------------------------- checkpoints


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["lenet4", "nnx-mlp-3x50"])
def test_checkpoint_round_trip_is_bit_identical(tmp_path, name):
    model = zoo.create_model(name, input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(5), model)
    path = checkpoints.save_checkpoint(
        tmp_path / "ck", model, params, metadata={"seed": 5, "dataset": "x"}
    )
    loaded, restored, meta = checkpoints.load_checkpoint(path, model=name, input_shape=(8, 8, 1))
    assert loaded == model
    _assert_same_tree(params, restored)
    assert meta["seed"] == 5 and meta["dataset"] == "x" and meta["model"] == name
    assert meta["input_shape"] == [8, 8, 1] and "jax" in meta["versions"]
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    np.testing.assert_array_equal(model.apply(params, x), loaded.apply(restored, x))
    # nothing left over beside the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_checkpoint_overwrite_replaces_atomically(tmp_path):
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    first = zoo.init_params(jax.random.key(0), model)
    second = zoo.init_params(jax.random.key(1), model)
    checkpoints.save_checkpoint(tmp_path / "ck", model, first)
    checkpoints.save_checkpoint(tmp_path / "ck", model, second)
    _assert_same_tree(second, checkpoints.load_checkpoint(tmp_path / "ck")[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_checkpoint_refuses_other_architecture_or_shape(tmp_path):
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    path = checkpoints.save_checkpoint(
        tmp_path / "ck", model, zoo.init_params(jax.random.key(0), model)
    )
    with pytest.raises(ValueError, match="holds architecture 'mlp-3x50'; expected 'lenet5'"):
        checkpoints.load_checkpoint(path, model="lenet5")
    with pytest.raises(ValueError, match=r"input shape \(8, 8, 1\); expected \(28, 28, 1\)"):
        checkpoints.load_checkpoint(path, input_shape=(28, 28, 1))
    # metadata edited to claim another architecture: the parameters do not fit
    meta = json.loads((path / "model.json").read_text())
    meta["model"] = "mlp-5x30"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="parameters do not fit mlp-5x30"):
        checkpoints.load_checkpoint(path)
    meta["model"], meta["input_shape"] = "mlp-3x50", [28, 28, 1]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"parameters do not fit mlp-3x50 with input \(28, 28, 1\)"
    ):
        checkpoints.load_checkpoint(path)


def test_checkpoint_unreadable(tmp_path):
    with pytest.raises(ValueError, match="must be a checkpoint directory holding model.json"):
        checkpoints.load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable checkpoint metadata"):
        checkpoints.load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format must be 'deepfault-jax-checkpoint'; got 'other'"):
        checkpoints.load_checkpoint(tmp_path)
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    path = checkpoints.save_checkpoint(
        tmp_path / "ck", model, zoo.init_params(jax.random.key(0), model)
    )
    shutil.rmtree(path / "params")
    with pytest.raises(ValueError, match="restoring the parameters from .* failed"):
        checkpoints.load_checkpoint(path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="must be a directory; got existing file"):
        checkpoints.save_checkpoint(
            tmp_path / "f", model, zoo.init_params(jax.random.key(0), model)
        )


# --------------------------------------------------------------------------- ResNets

RESNETS = ("resnet20", "resnet18")


def _random_batch_stats(params, seed=0):
    """``params`` with random running means, variances, scales and biases (the fresh ones
    are 0, 1, 1, 0: a BatchNorm that does nothing)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if name in ("mean", "bias") and "bn" in str(path):
            return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, params)


def test_resnets_are_in_the_zoo_and_the_cli():
    assert set(RESNETS) <= set(zoo.MODEL_NAMES)
    for name in RESNETS:
        assert cli._zoo_model("--model", name) == name
        model = zoo.create_model(name, input_shape=(8, 8, 1), num_classes=10)
        assert model.has_batch_stats and not model.is_nnx
    assert not zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10).has_batch_stats


@pytest.mark.parametrize("classes", [10, 100, 1000])
@pytest.mark.parametrize("name", RESNETS)
def test_resnet_logits_for_any_number_of_classes(name, classes):
    model = zoo.create_model(name, input_shape=(8, 8, 1), num_classes=classes)
    params = zoo.init_params(jax.random.key(0), model)
    assert set(params) == {"params", "batch_stats"}
    assert params["params"]["logits"]["kernel"].shape == ({"resnet20": 64, "resnet18": 512}[name],
                                                          classes)  # fmt: skip
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
    logits = jax.jit(model.apply)(params, x)
    assert logits.shape == (2, classes) and bool(jnp.all(jnp.isfinite(logits)))


def test_resnet_architectures():
    r20 = zoo.init_params(
        jax.random.key(0), zoo.create_model("resnet20", input_shape=(32, 32, 3), num_classes=10)
    )["params"]
    convs = [f"conv_{i}" for i in range(19)]
    assert list(r20) == [*convs, "logits"]  # option A shortcuts: no parameters
    assert [r20[n]["conv"]["kernel"].shape[-1] for n in convs] == [16] * 7 + [32] * 6 + [64] * 6
    assert r20["conv_0"]["conv"]["kernel"].shape == (3, 3, 3, 16)
    assert set(r20["conv_5"]) == {"conv", "bn"} and set(r20["conv_5"]["conv"]) == {"kernel"}
    assert sum(a.size for a in jax.tree.leaves(r20)) == 269_722  # He et al.: 0.27M
    r18 = jax.eval_shape(
        lambda: zoo.init_params(
            jax.random.key(0),
            zoo.create_model("resnet18", input_shape=(32, 32, 3), num_classes=10),
        )
    )
    assert [r18["params"][f"conv_{i}"]["conv"]["kernel"].shape[-1] for i in range(17)] == (
        [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    )
    assert {n for n in r18["params"] if n.startswith("shortcut")} == {
        "shortcut_6", "shortcut_10", "shortcut_14"}  # fmt: skip
    assert r18["params"]["shortcut_6"]["conv"]["kernel"].shape == (1, 1, 64, 128)
    assert sum(a.size for a in jax.tree.leaves(r18["params"])) == 11_173_962  # CIFAR ResNet-18
    assert set(r18["batch_stats"]["conv_3"]["bn"]) == {"mean", "var"}


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_batch_norm_runs_in_inference_mode(name):
    model = zoo.create_model(name, input_shape=(8, 8, 1), num_classes=10)
    params = _random_batch_stats(zoo.init_params(jax.random.key(0), model))
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    apply = jax.jit(model.apply)
    first = apply(params, x)
    np.testing.assert_array_equal(first, apply(params, x))
    # applied with batch_stats mutable, nothing changes: the running averages normalize
    logits, state = jax.jit(functools.partial(model.module.apply, mutable=["batch_stats"]))(
        params, x
    )
    np.testing.assert_allclose(logits, first, rtol=1e-6, atol=1e-6)
    _assert_same_tree(state["batch_stats"], params["batch_stats"])
    # an image gets the same logits alone as in a batch (no batch statistics)
    np.testing.assert_allclose(apply(params, x[1:2]), first[1:2], rtol=1e-5, atol=1e-5)
    # the running averages are what normalizes
    fresh = {**params, "batch_stats": zoo.init_params(jax.random.key(0), model)["batch_stats"]}
    assert float(jnp.abs(apply(fresh, x) - first).max()) > 1e-3


def test_resnet_train_step_updates_batch_stats_from_real_images_and_params_by_adam(digits):
    """One step: the optimizer covers ``params`` alone; ``batch_stats`` move by momentum 0.9
    toward the statistics of the unmasked images (checked by hand on the first layer)."""
    import optax

    model = zoo.create_model("resnet20", input_shape=(8, 8, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    before = jax.tree.map(np.asarray, params)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params["params"])
    x, y = digits.x_train[:16], digits.y_train[:16]
    mask = np.arange(16) < 11  # the last 5 are padding
    x = np.where(mask[:, None, None, None], x, 100.0).astype(np.float32)  # outliers, masked
    new, opt_state, loss = training._train_step(
        params, opt_state, x, y, mask, model=model, optimizer=optimizer
    )
    assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(new["params"])
    conv = jax.lax.conv_general_dilated(
        x[mask], before["params"]["conv_0"]["conv"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    stats = new["batch_stats"]["conv_0"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        stats["var"], 0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # every kernel moved by Adam's first step (about the learning rate)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new["params"],
                         before["params"])  # fmt: skip
    assert 5e-4 < min(jax.tree.leaves(moved)) and max(jax.tree.leaves(moved)) < 2e-3
    assert bool(jnp.isfinite(loss))


@pytest.fixture(scope="module")
def trained_resnet20(digits):
    model = zoo.create_model("resnet20", input_shape=digits.input_shape, num_classes=10)
    return model, training.train(jax.random.key(0), model, digits, epochs=2)


def test_resnet_trains_on_digits(digits, trained_resnet20):
    model, result = trained_resnet20
    assert result.seconds < 30
    assert result.test_accuracy >= 0.6  # chance is 0.1 (0.97 measured)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.test_accuracy == zoo.accuracy(model, result.params, digits.x_test, digits.y_test)
    fresh = zoo.init_params(jax.random.key(0), model)
    assert jax.tree.structure(result.params) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(result.params["batch_stats"]),
                    jax.tree.leaves(fresh["batch_stats"]), strict=True):  # fmt: skip
        assert bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)


def test_resnet_checkpoint_round_trip_keeps_batch_stats(tmp_path, digits, trained_resnet20):
    model, result = trained_resnet20
    path = checkpoints.save_checkpoint(tmp_path / "ck", model, result.params)
    loaded, restored, meta = checkpoints.load_checkpoint(path, model="resnet20")
    assert loaded == model and loaded.has_batch_stats and meta["model"] == "resnet20"
    _assert_same_tree(result.params, restored)
    x = digits.x_test[:32]
    np.testing.assert_array_equal(model.apply(result.params, x), loaded.apply(restored, x))


def test_resnet18_checkpoint_round_trip(tmp_path):
    model = zoo.create_model("resnet18", input_shape=(8, 8, 1), num_classes=100)
    params = _random_batch_stats(zoo.init_params(jax.random.key(2), model), seed=2)
    path = checkpoints.save_checkpoint(tmp_path / "ck", model, params)
    loaded, restored, _ = checkpoints.load_checkpoint(path)
    _assert_same_tree(params, restored)
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    np.testing.assert_array_equal(model.apply(params, x), loaded.apply(restored, x))


def test_resnet_is_refused_where_neurons_need_their_parameters(digits, trained_resnet20):
    from deepfault_jax import neuron_params, probe, repair

    model, result = trained_resnet20
    prb = probe.model_probe(model, result.params)
    with pytest.raises(InputError, match="repair needs parameters laid out by layer.*resnet20"):
        repair.neuron_view(prb, result.params, [0])
    with pytest.raises(InputError, match="BatchNorm"):
        repair.layer_view(result.params)
    with pytest.raises(InputError, match="grad_norm needs .*'batch_stats'"):
        neuron_params.neuron_layout(prb, result.params, what="grad_norm")


# --------------------------------------------------------------------------- training that fails


def test_diverging_training_is_an_input_error_and_saves_nothing(digits, tmp_path, capsys):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    with pytest.raises(
        InputError,
        match=r"training diverged: loss became nan at epoch 1; lower the learning rate \(got 1e\+30\)",
    ):
        training.train(jax.random.key(0), model, digits, epochs=2, learning_rate=1e30)
    out = tmp_path / "ck"
    argv = ["train", "--dataset", "digits", "--epochs", "2", "--learning-rate", "1e30"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("learning_rate", float("nan"), "learning_rate must be a finite number; got nan"),
        ("learning_rate", float("inf"), "learning_rate must be a finite number; got inf"),
        ("learning_rate", 0.0, r"learning_rate must lie in \(0, inf\]; got 0"),
        ("learning_rate", "0.1", "learning_rate must be a number; got str"),
        ("epochs", 1.5, "epochs must be an integer; got 1.5"),
        ("epochs", 0, r"epochs must lie in \[1, inf\]; got 0"),
        ("epochs", True, "epochs must be an integer; got bool"),
        ("batch_size", 0, r"batch_size must lie in \[1, inf\]; got 0"),
        ("batch_size", 2.5, "batch_size must be an integer; got 2.5"),
    ],
)
def test_train_options_are_checked_up_front(digits, option, value, message):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    with pytest.raises(InputError, match=message):
        training.train(jax.random.key(0), model, digits, **{option: value})


def test_keys_and_seeds_are_checked(digits, tmp_path):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    for bad in (2**63, 5):
        with pytest.raises(InputTypeError, match="key must be a JAX PRNG key"):
            zoo.init_params(bad, model)
        with pytest.raises(InputTypeError, match="key must be a JAX PRNG key"):
            training.train(bad, model, digits, epochs=1)
    for seed, error, message in [
        (
            2**63,
            InputError,
            r"seed must lie in \[0, 9223372036854775807\]; got 9223372036854775808",
        ),
        (-1, InputError, r"seed must lie in \[0, 9223372036854775807\]; got -1"),
        ("3", InputTypeError, "seed must be an integer; got str"),
    ]:
        with pytest.raises(error, match=message):
            checkpoints.load_or_train("mlp-3x50", digits, seed=seed, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_training_leaves_the_sigint_handler_as_it_was(digits):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    before = signal.getsignal(signal.SIGINT)
    training.train(jax.random.key(0), model, digits, epochs=1)
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------- the model cache


def test_cache_variable_naming_a_file_fails_before_training(digits, tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for value in (str(a_file), str(a_file / "cache")):
        monkeypatch.setenv("DEEPFAULT_JAX_CACHE", value)
        start = time.perf_counter()
        with pytest.raises(InputError, match=rf"DEEPFAULT_JAX_CACHE .*got '{value}'"):
            checkpoints.load_or_train("mlp-3x50", digits, seed=0)
        assert time.perf_counter() - start < 5  # refused before training (40 epochs)
    with pytest.raises(InputError, match=rf"cache_dir .*got '{a_file}'"):
        checkpoints.load_or_train("mlp-3x50", digits, seed=0, cache_dir=a_file)
    assert a_file.read_text() == "x"


def test_empty_cache_variable_means_the_default(monkeypatch):
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", "")
    assert checkpoints.default_cache_dir() == Path.home() / ".cache" / "deepfault-jax"
    monkeypatch.delenv("DEEPFAULT_JAX_CACHE")
    assert checkpoints.default_cache_dir() == Path.home() / ".cache" / "deepfault-jax"


def test_cache_entry_that_is_not_a_checkpoint_is_refused_before_training(digits, tmp_path):
    entry = tmp_path / "models" / "mlp-3x50-relu-digits-seed0"
    entry.mkdir(parents=True)
    (entry / "keep.txt").write_text("mine")
    start = time.perf_counter()
    with pytest.raises(InputError, match=re.escape(str(entry))):
        checkpoints.load_or_train("mlp-3x50", digits, seed=0, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    assert (entry / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- Ctrl-C

_TRAIN_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    # as a shell starts a foreground command, even when this test runs in the background
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("SIGINT_DURING_COMPILE"):
        from jax import monitoring

        def on_event(event, value, **kw):
            # fires as XLA starts compiling the training step: the signal lands mid-compile
            if event.endswith("backend_compile_duration") and "_train_step" in str(kw):
                print("compiling", file=sys.stderr, flush=True)
                kill = (os.getpid(), signal.SIGINT)
                threading.Timer(0.05, os.kill, kill).start()

        monitoring.register_scalar_listener(on_event)
    from deepfault_jax.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def _start_train(out: Path, **popen) -> subprocess.Popen:
    """``deepfault-jax train`` for more epochs than a test waits for, in a child."""
    argv = ["train", "--model", "mlp-3x50", "--dataset", "digits", "--epochs", "100000"]
    return subprocess.Popen(
        [sys.executable, "-c", _TRAIN_CHILD, *argv, "--out", str(out)],
        stdin=subprocess.DEVNULL,
        **popen,
    )


def _interrupted_mid_compile(out: Path) -> tuple[int, str]:
    """SIGINT lands while XLA compiles the training step (the child sends it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SIGINT_DURING_COMPILE": "1"}
    child = _start_train(out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        err = child.communicate(timeout=120)[1].decode(errors="replace")
    except subprocess.TimeoutExpired:
        child.kill()
        err = child.communicate()[1].decode(errors="replace") + "\n(killed after 120 s)"
    assert "compiling" in err, err  # the signal was sent
    return child.returncode, err


def _interrupted_in_a_terminal(out: Path, delay: float) -> tuple[int, str]:
    """Ctrl-C ``delay`` seconds after the progress bar of epoch 1 appears on a terminal."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    terminal, child_end = pty.openpty()
    child = _start_train(out, stdout=child_end, stderr=child_end, env=env)
    os.close(child_end)
    seen, sent, deadline = b"", False, time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    chunk = os.read(terminal, 65536)
                except OSError:  # EIO: the child has closed the terminal
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
            if not sent and b"epoch 1/" in seen:
                time.sleep(delay)
                child.send_signal(signal.SIGINT)
                sent = True
    finally:
        os.close(terminal)
    try:
        code = child.wait(timeout=60 if sent else 0.1)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    return code, seen.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.parametrize("where", ["mid-compile", "in-a-terminal"])
def test_ctrl_c_during_training_exits_130_cleanly(tmp_path, where):
    """Ctrl-C exits 130 with one message and nothing written; before, a KeyboardInterrupt
    raised while XLA was compiling let the interpreter exit under the compiler thread,
    which crashed (SIGSEGV, exit 139) after the message."""
    for attempt, delay in enumerate([0.0, 0.3, 0.7, 1.2] if where == "in-a-terminal" else [0, 0]):
        out = tmp_path / f"ck{attempt}"
        if where == "mid-compile":
            code, err = _interrupted_mid_compile(out)
        else:
            code, err = _interrupted_in_a_terminal(out, delay)
        assert code == 130, f"attempt {attempt}: exit code {code}\n{err}"
        assert err.rstrip().endswith("deepfault-jax: interrupted"), err
        assert "Traceback" not in err and "Fatal Python error" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing half-written
