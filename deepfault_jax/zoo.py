"""The paper's architectures in Flax: the models, their parameters, prediction and accuracy.

Training is in :mod:`deepfault_jax.training`, checkpoints and the model cache
in :mod:`deepfault_jax.checkpoints`.

Models (all take ``float32[batch, height, width, channels]`` images of any size
used here: 8x8x1, 28x28x1, 32x32x3, and return ``float32[batch, classes]``
logits for any number of classes >= 2):

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
resnet20       CIFAR ResNet-20 (He et al. 2016, section 4.2): conv_0 16 3x3, then 3 stages of
               3 basic blocks (16, 32, 64 channels; stride 2 entering stages 2 and 3),
               identity shortcuts (option A: strided and zero-padded where the shape
               changes), global average pool, Dense classes
resnet18       ResNet-18 for 32x32 images: conv_0 64 3x3 (no max pool), then 4 stages of 2
               basic blocks (64, 128, 256, 512 channels; stride 2 entering stages 2-4),
               1x1 conv + BatchNorm projection shortcuts (``shortcut_i``) where the shape
               changes, global average pool, Dense classes
nnx-mlp-3x50   mlp-3x50 written as a Flax NNX module
============== =================================================================

**ResNets.** Every convolution of a ResNet is a conv+BN layer ``conv_i``
(:class:`ConvBN`: a 3x3 Conv without bias, BatchNorm, the activation); a basic
block is two of them, ``conv_i`` and ``conv_{i+1}``, and the block's shortcut
is added to ``conv_{i+1}`` before its activation. Layers are numbered in call
order: resnet20 has ``conv_0`` .. ``conv_18``, resnet18 ``conv_0`` ..
``conv_16``. A conv+BN layer's neurons are its channels, and its probed values
(:func:`deepfault_jax.probe.model_probe`) are:

* ``values="pre"``: the BatchNorm output, before the residual add and the
  activation;
* ``values="post"``: the layer's output after the activation; for a block's
  second layer, after the residual add and the activation,
  ``act(bn + shortcut)``, the value the next block reads.

The probe reads both through :class:`~deepfault_jax.linen_layers.NeuronValue`
taps (``conv_i/pre``, ``conv_i/post``), and the probe's gates multiply the
probed value itself (a gate of 0 zeroes the channel's pre value, or its post
value). The projection shortcuts and the ``logits`` layer are not probed.

BatchNorm runs in inference mode: a ResNet's parameter pytree is its whole
variables dict, ``{"params": ..., "batch_stats": ...}`` (:attr:`Model.has_batch_stats`);
:meth:`Model.apply` normalizes with the running averages in ``batch_stats`` and
never changes them. Only :func:`deepfault_jax.training.train` updates them (a
forward pass in training mode, batch statistics over the unpadded images,
momentum 0.9, epsilon 1e-5 as PyTorch's defaults), while its optimizer updates
``params`` alone. Checkpoints save and restore both collections. Repair,
fault planting and the localizers that read a neuron's own parameters refuse
ResNets (:func:`deepfault_jax.neuron_params.pure_params`).

Convolutions use ``SAME`` padding and pooling is 2x2 max pooling (ResNets:
stride-2 convolutions), so every model accepts images as small as 8x8. The activation is ``relu`` (default) or
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
from deepfault_jax.linen_layers import NeuronValue

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


# BatchNorm as PyTorch's defaults (its momentum 0.1 is flax's 0.9): running averages that
# follow a short training closely
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


class ConvBN(nn.Module):
    """A conv+BN layer of a ResNet: Conv (no bias), BatchNorm, optional residual, activation.

    Its channels are neurons: the BatchNorm output passes through the tap
    ``NeuronValue(name="pre")`` and ``act(bn + residual)`` through
    ``NeuronValue(name="post")`` (see the module docstring).

    Attributes:
      features: output channels.
      strides: the convolution's stride (1 or 2).
      activation: ``"relu"`` or ``"leaky_relu"``.
    """

    features: int
    strides: int = 1
    activation: str = "relu"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None = None,
        *,
        train: bool = False,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x[batch, h, w, c]`` -> ``[batch, h / strides, w / strides, features]``.

        Args:
          x: the input feature map.
          residual: added to the BatchNorm output before the activation (a block's shortcut).
          train: BatchNorm normalizes with the batch's statistics and updates its running
            averages (``mutable=["batch_stats"]``); False: with the running averages.
          mask: ``bool[batch, 1, 1, 1]``: the images the batch statistics are taken over.
        """
        y = nn.Conv(
            self.features,
            (3, 3),
            strides=(self.strides, self.strides),
            padding="SAME",
            use_bias=False,
            name="conv",
        )(x)
        y = nn.BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            name="bn",
        )(y, mask=mask)
        y = NeuronValue(name="pre")(y)
        if residual is not None:
            y = y + residual
        return NeuronValue(name="post")(ACTIVATIONS[self.activation](y))


class Projection(nn.Module):
    """A ResNet's projection shortcut: 1x1 Conv (no bias, ``strides``) and BatchNorm.

    Not probed: its output is summed into the block's second conv+BN layer.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        """``x[batch, h, w, c]`` -> ``[batch, h / strides, w / strides, features]``
        (``train`` and ``mask`` as in :class:`ConvBN`)."""
        strides = (self.strides, self.strides)
        y = nn.Conv(self.features, (1, 1), strides=strides, use_bias=False, name="conv")(x)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
            name="bn",
        )(y, mask=mask)


def _padded_identity(x: jax.Array, features: int, strides: int) -> jax.Array:
    """Option A shortcut (He et al. 2016): ``x`` subsampled by ``strides`` and zero-padded
    on both sides of the channel axis to ``features`` channels (no parameters)."""
    x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class ResNet(nn.Module):
    """A ResNet of basic blocks for small images (3x3 stem, no max pool).

    Layers ``conv_0`` (the stem), then per block ``conv_i`` and ``conv_{i+1}``
    (:class:`ConvBN`), ``shortcut_{i+1}`` (:class:`Projection`, where the shape
    changes and ``shortcut="projection"``), and ``logits`` after a global average pool.

    Attributes:
      stem: channels of the stem convolution.
      stages: channels of each stage; every stage but the first starts with stride 2.
      blocks: basic blocks per stage.
      num_classes: size of the output layer.
      activation: ``"relu"`` or ``"leaky_relu"``.
      shortcut: where a block changes the shape: ``"pad"`` (option A, parameter-free) or
        ``"projection"`` (option B, 1x1 conv + BatchNorm).
    """

    stem: int
    stages: Sequence[int]
    blocks: int
    num_classes: int
    activation: str = "relu"
    shortcut: str = "pad"

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        """Logits ``float32[batch, classes]`` of images ``x[batch, h, w, c]``.

        Args:
          x: the images.
          train: training mode: BatchNorm uses (and, with ``mutable=["batch_stats"]``,
            records) the batch's statistics; False (the default, :meth:`Model.apply`):
            inference mode, the running averages.
          mask: ``bool[batch]``, the real images of a padded batch: the batch statistics
            are taken over them alone (training mode only).
        """
        bn_mask = None if mask is None else jnp.reshape(mask, (-1, 1, 1, 1))
        mode = {"train": train, "mask": bn_mask}
        x = ConvBN(self.stem, activation=self.activation, name="conv_0")(x, **mode)
        i = 1
        for stage, features in enumerate(self.stages):
            for block in range(self.blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                h = ConvBN(features, strides, self.activation, name=f"conv_{i}")(x, **mode)
                if strides == 1 and x.shape[-1] == features:
                    shortcut = x
                elif self.shortcut == "pad":
                    shortcut = _padded_identity(x, features, strides)
                else:
                    shortcut = Projection(features, strides, name=f"shortcut_{i + 1}")(x, **mode)
                x = ConvBN(features, 1, self.activation, name=f"conv_{i + 1}")(h, shortcut, **mode)
                i += 2
        x = jnp.mean(x, axis=(1, 2))
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
    "resnet20": lambda c, a: ResNet(16, (16, 32, 64), 3, c, a, shortcut="pad"),
    "resnet18": lambda c, a: ResNet(64, (64, 128, 256, 512), 2, c, a, shortcut="projection"),
}
#: Models with BatchNorm: their parameters are the variables ``{"params", "batch_stats"}``.
#: The zoo models with BatchNorm (their parameters are ``{"params", "batch_stats"}``).
BATCH_NORM_MODELS = frozenset({"resnet20", "resnet18"})
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

    @property
    def has_batch_stats(self) -> bool:
        """True for a model with BatchNorm (the ResNets): its parameter pytree is the whole
        linen variables dict ``{"params": ..., "batch_stats": ...}``."""
        return self.name in BATCH_NORM_MODELS

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        """Logits ``float32[batch, classes]`` of images ``x[batch, *input_shape]``.

        BatchNorm (ResNets) runs in inference mode: the running averages in
        ``params["batch_stats"]`` normalize, and nothing is updated.
        """
        if self.is_nnx:
            return nnx.merge(self.module, params)(x)
        if self.has_batch_stats:
            return self.module.apply(params, x)
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
      For linen models the ``params`` collection (a dict), except for models with
      BatchNorm (:attr:`Model.has_batch_stats`): their variables ``{"params": ...,
      "batch_stats": ...}`` (running means 0, variances 1); for NNX models the
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
    variables = model.module.init(key, x)
    if model.has_batch_stats:
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return variables["params"]


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
