"""Models: forward pass on every input shape, training on real data, checkpoints."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_fashion

from deepfault_jax import data, zoo

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_forward_every_model_every_shape(name, shape):
    model = zoo.create_model(name, input_shape=shape, num_classes=7)
    params = zoo.init_params(jax.random.key(0), model)
    x = jax.random.uniform(jax.random.key(1), (3, *shape))
    logits = jax.jit(model.apply)(params, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # each example is computed on its own: batch composition does not matter
    np.testing.assert_allclose(model.apply(params, x[:1]), logits[:1], rtol=1e-5, atol=1e-6)
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
    result = zoo.train(jax.random.key(0), model, digits)
    assert len(result.history) == zoo.default_epochs(digits) == 40
    assert result.test_accuracy >= 0.95
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 5
    assert result.test_accuracy == zoo.accuracy(model, result.params, digits.x_test, digits.y_test)


def test_train_is_reproducible_by_seed(digits):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    a = zoo.train(jax.random.key(3), model, digits, epochs=2)
    b = zoo.train(jax.random.key(3), model, digits, epochs=2)
    c = zoo.train(jax.random.key(4), model, digits, epochs=2)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.params["logits"]["kernel"], c.params["logits"]["kernel"])


def test_train_and_predict_refuse_mismatched_data(digits):
    model = zoo.create_model("lenet1", input_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(ValueError, match=r"built for input \(28, 28, 1\).*has input \(8, 8, 1\)"):
        zoo.train(jax.random.key(0), model, digits, epochs=1)
    params = zoo.init_params(jax.random.key(0), model)
    with pytest.raises(ValueError, match=r"expects images of shape \(28, 28, 1\); got \(8, 8, 1\)"):
        zoo.predict(model, params, digits.x_test)
    model = zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10)
    with pytest.raises(ValueError, match="epochs must be >= 1; got 0"):
        zoo.train(jax.random.key(0), model, digits, epochs=0)


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
    result = zoo.train(jax.random.key(0), model, ds)
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
    path = zoo.save_checkpoint(tmp_path / "ck", model, params, metadata={"seed": 5, "dataset": "x"})
    loaded, restored, meta = zoo.load_checkpoint(path, model=name, input_shape=(8, 8, 1))
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
    zoo.save_checkpoint(tmp_path / "ck", model, first)
    zoo.save_checkpoint(tmp_path / "ck", model, second)
    _assert_same_tree(second, zoo.load_checkpoint(tmp_path / "ck")[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_checkpoint_refuses_other_architecture_or_shape(tmp_path):
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    path = zoo.save_checkpoint(tmp_path / "ck", model, zoo.init_params(jax.random.key(0), model))
    with pytest.raises(ValueError, match="holds architecture 'mlp-3x50'; expected 'lenet5'"):
        zoo.load_checkpoint(path, model="lenet5")
    with pytest.raises(ValueError, match=r"input shape \(8, 8, 1\); expected \(28, 28, 1\)"):
        zoo.load_checkpoint(path, input_shape=(28, 28, 1))
    # metadata edited to claim another architecture: the parameters do not fit
    meta = json.loads((path / "model.json").read_text())
    meta["model"] = "mlp-5x30"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="parameters do not fit mlp-5x30"):
        zoo.load_checkpoint(path)
    meta["model"], meta["input_shape"] = "mlp-3x50", [28, 28, 1]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"parameters do not fit mlp-3x50 with input \(28, 28, 1\)"
    ):
        zoo.load_checkpoint(path)


def test_checkpoint_unreadable(tmp_path):
    with pytest.raises(ValueError, match="must be a checkpoint directory holding model.json"):
        zoo.load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable checkpoint metadata"):
        zoo.load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format must be 'deepfault-jax-checkpoint'; got 'other'"):
        zoo.load_checkpoint(tmp_path)
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    path = zoo.save_checkpoint(tmp_path / "ck", model, zoo.init_params(jax.random.key(0), model))
    shutil.rmtree(path / "params")
    with pytest.raises(ValueError, match="unreadable parameters"):
        zoo.load_checkpoint(path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="must be a directory; got existing file"):
        zoo.save_checkpoint(tmp_path / "f", model, zoo.init_params(jax.random.key(0), model))
