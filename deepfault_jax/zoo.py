"""The paper's architectures in Flax: the models, their parameters, prediction and accuracy.

Training is in :mod:`deepfault_jax.training`, checkpoints and the model cache
in :mod:`deepfault_jax.checkpoints`.

Models (all take ``float32[batch, height, width, channels]`` images of any size
used here: 8x8x1, 28x28x1, 32x32x3, and return ``float32[batch, classes]``
logits):

============== =================================================================
name           layers (probed layers are named; ``logits`` is the output layer)
============== =================================================================
mlp-3x50       flatten, 3 x (Dense 50 + activation), Dense classes
mlp-5x30       flatten, 5 x (Dense 30 + activation), Dense classes
mlp-6x25       flatten, 6 x (Dense 25 + activation), Dense classes
mlp-8x20       flatten, 8 x (Dense 20 + activation), Dense classes
lenet1         Conv 4 5x5, pool, Conv 12 5x5, pool, Dense classes
lenet4         Conv 6 5x5, pool, Conv 16 5x5, pool, Dense 84, Dense classes
lenet5         Conv 6 5x5, pool, Conv 16 5x5, pool, Dense 120, Dense 84, Dense classes
cifar-convnet  Conv 32, Conv 32, pool, Conv 64, Conv 64, pool (3x3), Dense 512, Dense classes
nnx-mlp-3x50   mlp-3x50 written as a Flax NNX module
============== =================================================================

Convolutions use ``SAME`` padding and pooling is 2x2 max pooling, so every
model accepts images as small as 8x8. The activation is ``relu`` (default) or
``leaky_relu`` (slope 0.01, as the original's MNIST models).

A :class:`Model` is the static description (architecture, input shape,
classes, activation); parameters are a separate pytree, as everywhere in JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepfault_jax.data import Dataset, iterate_batches
from deepfault_jax.errors import (
    InputError,
    check_key,
)

__all__ = [
    "ACTIVATIONS",
    "MODEL_NAMES",
    "Model",
    "create_model",
    "default_epochs",
    "accuracy",
    "init_params",
    "predict",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
}


# --------------------------------------------------------------------------- linen modules


class MLP(nn.Module):
    """Fully connected classifier: flatten, ``Dense + activation`` per hidden width, Dense."""

    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = act(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, name="logits")(x)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, ``SAME`` padding, as ``nn.max_pool``.

    For even sizes it is a reshape and a max (the same values; XLA's CPU gradient
    of this form is ~5x faster than that of ``reduce_window``); odd sizes use
    ``nn.max_pool``.
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class ConvNet(nn.Module):
    """Conv blocks (``Conv + activation`` per layer, 2x2 max pool after each block), then Dense.

    ``blocks`` lists the channels of each block's convolutions.
    """

    blocks: Sequence[Sequence[int]]
    kernel: int
    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        i = 0
        for block in self.blocks:
            for channels in block:
                conv = nn.Conv(
                    channels, (self.kernel, self.kernel), padding="SAME", name=f"conv_{i}"
                )
                x = act(conv(x))
                i += 1
            x = _max_pool_2x2(x)
        x = x.reshape((x.shape[0], -1))
        for j, width in enumerate(self.hidden):
            x = act(nn.Dense(width, name=f"dense_{j}")(x))
        return nn.Dense(self.num_classes, name="logits")(x)


# --------------------------------------------------------------------------- NNX module


class NnxMLP(nnx.Module):
    """The MLP as a Flax NNX module (``nnx.Linear`` layers ``dense_0, dense_1, ...`` and ``logits``)."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        *,
        activation: str = "relu",
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.num_hidden = len(hidden)
        widths = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            # the same layer names as the linen MLP, so probes of both agree
            setattr(self, f"dense_{i}", nnx.Linear(a, b, rngs=rngs))
        self.logits = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], -1))
        for i in range(self.num_hidden):
            x = act(getattr(self, f"dense_{i}")(x))
        return self.logits(x)


# --------------------------------------------------------------------------- registry

_LINEN_BUILDERS: dict[str, Callable[[int, str], nn.Module]] = {
    "mlp-3x50": lambda c, a: MLP((50,) * 3, c, a),
    "mlp-5x30": lambda c, a: MLP((30,) * 5, c, a),
    "mlp-6x25": lambda c, a: MLP((25,) * 6, c, a),
    "mlp-8x20": lambda c, a: MLP((20,) * 8, c, a),
    "lenet1": lambda c, a: ConvNet(((4,), (12,)), 5, (), c, a),
    "lenet4": lambda c, a: ConvNet(((6,), (16,)), 5, (84,), c, a),
    "lenet5": lambda c, a: ConvNet(((6,), (16,)), 5, (120, 84), c, a),
    "cifar-convnet": lambda c, a: ConvNet(((32, 32), (64, 64)), 3, (512,), c, a),
}
_NNX_HIDDEN = {"nnx-mlp-3x50": (50,) * 3}

#: Every model name :func:`create_model` accepts.
MODEL_NAMES: tuple[str, ...] = (*_LINEN_BUILDERS, *_NNX_HIDDEN)


@dataclasses.dataclass(frozen=True)
class Model:
    """A zoo architecture bound to an input shape and a number of classes.

    Static and hashable (usable as a ``jax.jit`` static argument); the
    parameters live apart, in the pytree from :func:`init_params`.

    Attributes:
      name: one of :data:`MODEL_NAMES`.
      input_shape: ``(height, width, channels)``.
      num_classes: size of the output layer.
      activation: ``"relu"`` or ``"leaky_relu"``.
      module: the Flax linen module, or the NNX graph definition.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    activation: str = "relu"
    module: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def is_nnx(self) -> bool:
        """True for a Flax NNX model (``module`` is an ``nnx.GraphDef``)."""
        return self.name in _NNX_HIDDEN

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        """Logits ``float32[batch, classes]`` of images ``x[batch, *input_shape]``."""
        if self.is_nnx:
            return nnx.merge(self.module, params)(x)
        return self.module.apply({"params": params}, x)


def create_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    activation: str = "relu",
) -> Model:
    """Builds the static description of a zoo model.

    Args:
      name: one of :data:`MODEL_NAMES`.
      input_shape: ``(height, width, channels)`` of one image.
      num_classes: number of classes (>= 2).
      activation: ``"relu"`` or ``"leaky_relu"``.

    Raises:
      ValueError: unknown name or activation (the message lists the valid
        ones), an input shape that is not 3 positive integers, fewer than 2
        classes.

    Example:
      >>> model = create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    """
    if name not in MODEL_NAMES:
        raise InputError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if activation not in ACTIVATIONS:
        raise InputError(
            f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
        )
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            f"input_shape must be (height, width, channels) of positive sizes; got {tuple(input_shape)}"
        )
    if int(num_classes) < 2:
        raise InputError(f"num_classes must be >= 2; got {num_classes}")
    num_classes = int(num_classes)
    if name in _NNX_HIDDEN:
        template = NnxMLP(
            math.prod(shape),
            _NNX_HIDDEN[name],
            num_classes,
            activation=activation,
            rngs=nnx.Rngs(0),
        )
        module = nnx.graphdef(template)
    else:
        module = _LINEN_BUILDERS[name](num_classes, activation)
    return Model(name, shape, num_classes, activation, module)  # type: ignore[arg-type]


def init_params(key: jax.Array, model: Model) -> Any:
    """Draws fresh parameters for ``model`` with ``key``.

    Returns:
      For linen models the ``params`` collection (a dict); for NNX models the
      ``nnx.State`` of its ``nnx.Param`` variables.

    Raises:
      InputTypeError: ``key`` is not a JAX PRNG key (``jax.random.key(seed)``).
    """
    check_key(key)
    if model.is_nnx:
        module = NnxMLP(
            math.prod(model.input_shape),
            _NNX_HIDDEN[model.name],
            model.num_classes,
            activation=model.activation,
            rngs=nnx.Rngs(params=key),
        )
        return nnx.state(module, nnx.Param)
    x = jnp.zeros((1, *model.input_shape), jnp.float32)
    return model.module.init(key, x)["params"]


# --------------------------------------------------------------------------- prediction


@functools.partial(jax.jit, static_argnames=("model",))
def _predict_batch(params, x, *, model: Model):
    return jnp.argmax(model.apply(params, x), axis=-1).astype(jnp.int32)


def predict(model: Model, params: Any, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Predicted labels ``int32[n]`` of images ``x[n, *input_shape]``, in fixed-shape batches."""
    _check_input_shape(model, x)
    out = []
    y_dummy = np.zeros(len(x), np.int32)
    for batch in iterate_batches(x, y_dummy, batch_size=min(batch_size, len(x))):
        pred = np.asarray(_predict_batch(params, batch.x, model=model))
        out.append(pred[batch.mask])
    return np.concatenate(out)


def accuracy(
    model: Model, params: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024
) -> float:
    """Accuracy in [0, 1] of ``model`` on images ``x[n, ...]`` with labels ``y[n]``."""
    pred = predict(model, params, x, batch_size=batch_size)
    return float(np.mean(pred == np.asarray(y)))


def _check_input_shape(model: Model, x: np.ndarray) -> None:
    if tuple(x.shape[1:]) != model.input_shape:
        raise InputError(
            f"{model.name} expects images of shape {model.input_shape}; got {tuple(x.shape[1:])}"
        )


def default_epochs(dataset: Dataset) -> int:
    """The default number of training epochs: 40 for small data sets (< 10,000
    training images, like ``digits``), 10 otherwise."""
    return 40 if len(dataset.y_train) < 10_000 else 10
