"""The paper's architectures in Flax, with training, evaluation and checkpoints.

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

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepfault_jax.data import Dataset, iterate_batches, shuffled_batches
from deepfault_jax.errors import (
    InputError,
    InputTypeError,
    check_finite,
    check_int,
    check_seed,
    describe_os_error,
    env_path,
)
from deepfault_jax.files import check_replaceable, replace_directory, write_atomic

__all__ = [
    "ACTIVATIONS",
    "MODEL_NAMES",
    "Model",
    "TrainResult",
    "create_model",
    "default_cache_dir",
    "default_epochs",
    "accuracy",
    "init_params",
    "is_checkpoint_dir",
    "load_checkpoint",
    "load_or_train",
    "package_versions",
    "predict",
    "save_checkpoint",
    "train",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
}

CHECKPOINT_FORMAT = "deepfault-jax-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_ENTRIES = frozenset({"model.json", "params"})


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
    _check_key(key)
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


# --------------------------------------------------------------------------- training


def _masked_loss(model: Model, params: Any, x: jax.Array, y: jax.Array, mask: jax.Array):
    logits = model.apply(params, x)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    weight = mask.astype(per_example.dtype)
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "optimizer"), donate_argnums=(0, 1))
def _train_step(
    params, opt_state, x, y, mask, *, model: Model, optimizer: optax.GradientTransformation
):
    loss, grads = jax.value_and_grad(_masked_loss, argnums=1)(model, params, x, y, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


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


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: the trained parameters.
      history: per epoch ``{"epoch", "loss", "test_accuracy"}``.
      test_accuracy: accuracy on the test split after the last epoch.
      seconds: wall-clock training time (compilation included).
    """

    params: Any
    history: list[dict]
    test_accuracy: float
    seconds: float


def _check_key(key: Any) -> None:
    """Refuses anything but a JAX PRNG key: a typed key (``jax.random.key``) or a raw
    ``uint32`` one (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if isinstance(key, (jax.Array, np.ndarray)) and (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == np.uint32
    ):
        return
    raise InputTypeError(
        f"key must be a JAX PRNG key such as jax.random.key(0); got {type(key).__name__} {key!r}"
    )


def _check_train_options(
    model: Model, dataset: Dataset, *, epochs: Any, batch_size: Any, learning_rate: Any
) -> tuple[int, int, float]:
    """``(epochs, batch_size, learning_rate)`` checked, or :class:`InputError`."""
    if model.input_shape != dataset.input_shape or model.num_classes != dataset.num_classes:
        raise InputError(
            f"{model.name} was built for input {model.input_shape} and {model.num_classes} classes; "
            f"data set {dataset.name!r} has input {dataset.input_shape} and {dataset.num_classes}"
        )
    epochs = default_epochs(dataset) if epochs is None else check_int("epochs", epochs, lo=1)
    batch_size = check_int("batch_size", batch_size, lo=1)
    learning_rate = check_finite("learning_rate", learning_rate, lo=0.0, lo_open=True)
    return epochs, batch_size, learning_rate


class _Interrupt:
    """Whether Ctrl-C (SIGINT) arrived inside :func:`_deferred_interrupt`."""

    pending: bool = False


@contextlib.contextmanager
def _deferred_interrupt():
    """Holds Ctrl-C back while JAX compiles and runs; yields an :class:`_Interrupt`.

    Python raises ``KeyboardInterrupt`` wherever the main thread happens to be,
    and inside JAX that may be while XLA still compiles in a thread of its own:
    the interpreter then exits under that thread, which crashes (SIGSEGV, exit
    139, after the "interrupted" message). Here the first SIGINT only takes
    note; the caller stops at a safe point (``pending``), and at the latest the
    block raises ``KeyboardInterrupt`` as it ends. A second Ctrl-C raises at
    once, as usual. Acts only in the main thread and only over Python's default
    handler: a caller's own SIGINT handler (or ``SIG_IGN``) is left alone.
    """
    state = _Interrupt()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield state
        return

    def take_note(signum, frame):
        state.pending = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

    signal.signal(signal.SIGINT, take_note)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if state.pending:
        raise KeyboardInterrupt


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _check_not_diverged(mean_loss: float, params: Any, *, epoch: int, learning_rate: float) -> None:
    """Raises :class:`InputError` when the loss or a parameter is no longer finite."""
    if not math.isfinite(mean_loss):
        what = f"loss became {mean_loss}"
    elif not bool(_all_finite(params)):
        what = "parameters became non-finite"
    else:
        return
    raise InputError(
        f"training diverged: {what} at epoch {epoch}; "
        f"lower the learning rate (got {learning_rate:g})"
    )


def _stop_if_interrupted(interrupt: _Interrupt, *arrays: Any) -> None:
    """Raises ``KeyboardInterrupt`` if Ctrl-C was pressed, once ``arrays`` (the newest
    results, on which all earlier work depends) are computed: nothing is left running."""
    if interrupt.pending:
        jax.block_until_ready(arrays)
        raise KeyboardInterrupt


def _train_epoch(
    params: Any,
    opt_state: Any,
    key: jax.Array,
    dataset: Dataset,
    *,
    model: Model,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    desc: str,
    progress: bool,
    interrupt: _Interrupt,
) -> tuple[Any, Any, float]:
    """One pass over the training images in the order ``key`` draws:
    ``(params, opt_state, mean loss)``.

    Raises:
      KeyboardInterrupt: Ctrl-C was pressed; raised after the step under way has
        finished, so no computation is left running.
    """
    from tqdm.auto import tqdm

    batches = shuffled_batches(key, dataset.x_train, dataset.y_train, batch_size=batch_size)
    steps = math.ceil(len(dataset.y_train) / batch_size)
    disable = None if progress else True  # None: off when stderr is no terminal
    losses = []
    with tqdm(batches, total=steps, desc=desc, disable=disable, leave=False, unit="batch") as bar:
        for batch in bar:
            params, opt_state, loss = _train_step(
                params, opt_state, batch.x, batch.y, batch.mask, model=model, optimizer=optimizer
            )
            losses.append(loss)
            _stop_if_interrupted(interrupt, params, opt_state)
    return params, opt_state, float(np.mean(jax.device_get(losses)))


def train(
    key: jax.Array,
    model: Model,
    dataset: Dataset,
    *,
    epochs: int | None = None,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    progress: bool = False,
    params: Any = None,
) -> TrainResult:
    """Trains ``model`` on ``dataset``'s train split with optax Adam.

    Every epoch visits the training images in a fresh order drawn from ``key``;
    the last batch is padded and masked, so one compilation serves the run.

    Args:
      key: PRNG key for the initial parameters and the shuffling.
      model: from :func:`create_model`; its input shape and classes must match
        the data set.
      dataset: the data.
      epochs: number of passes (an integer >= 1); default :func:`default_epochs`.
      batch_size: images per step (an integer >= 1).
      learning_rate: Adam's step size (finite, > 0).
      progress: show a progress bar per epoch on stderr.
      params: start from these parameters instead of drawing new ones.

    Returns:
      A :class:`TrainResult`.

    Raises:
      InputError: a bad option, a model that does not fit the data set, or
        training that diverged (the loss or a parameter became NaN or
        infinite: the message names the epoch and the learning rate).
      InputTypeError: ``key`` is not a JAX PRNG key.
      KeyboardInterrupt: Ctrl-C; raised at the end of the step under way, once
        JAX has nothing left running (see :func:`_deferred_interrupt`).
    """
    from tqdm.auto import tqdm

    _check_key(key)
    epochs, batch_size, learning_rate = _check_train_options(
        model, dataset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate
    )
    start = time.perf_counter()
    with _deferred_interrupt() as interrupt:
        init_key, shuffle_key = jax.random.split(key)
        if params is None:
            params = init_params(init_key, model)
        optimizer = optax.adam(learning_rate)
        opt_state = optimizer.init(params)
        batch_size = min(batch_size, len(dataset.y_train))
        history = []
        for epoch in range(1, epochs + 1):
            _stop_if_interrupted(interrupt, params, opt_state)
            params, opt_state, mean_loss = _train_epoch(
                params,
                opt_state,
                jax.random.fold_in(shuffle_key, epoch - 1),
                dataset,
                model=model,
                optimizer=optimizer,
                batch_size=batch_size,
                desc=f"epoch {epoch}/{epochs}",
                progress=progress,
                interrupt=interrupt,
            )
            _check_not_diverged(mean_loss, params, epoch=epoch, learning_rate=learning_rate)
            test_accuracy = accuracy(model, params, dataset.x_test, dataset.y_test)
            history.append({"epoch": epoch, "loss": mean_loss, "test_accuracy": test_accuracy})
            if progress:
                tqdm.write(
                    f"epoch {epoch}/{epochs}: loss {mean_loss:.4f}, test accuracy {test_accuracy:.4f}",
                    file=sys.stderr,
                )
    return TrainResult(params, history, history[-1]["test_accuracy"], time.perf_counter() - start)


# --------------------------------------------------------------------------- checkpoints


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "deepfault-jax",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "tensorflow-datasets",
        "scikit-learn",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _leaf_name(path: tuple) -> str:
    """A pytree path as ``dense_0/kernel`` (dict keys, attribute names, sequence indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _params_digest(params: Any) -> str:
    """``"sha256:<hex>"`` over every parameter array: its path, shape, dtype and bytes, in
    the order of the paths (so a dict's key order, and orbax's file layout, do not matter)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    named = sorted(((_leaf_name(path), leaf) for path, leaf in leaves), key=lambda item: item[0])
    digest = hashlib.sha256()
    for name, leaf in named:
        array = np.ascontiguousarray(jax.device_get(leaf))
        header = json.dumps([name, list(array.shape), array.dtype.str]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(array.tobytes())
    return f"sha256:{digest.hexdigest()}"


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`save_checkpoint`: its
    ``model.json`` carries the checkpoint format marker (as every version wrote it)
    and the directory holds nothing but ``model.json`` and ``params/``.

    :func:`save_checkpoint` replaces only such a directory (or an empty one), so a
    user's files are never deleted.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "model.json").read_text())
        names = {entry.name for entry in path.iterdir()}
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == CHECKPOINT_FORMAT
        and names <= _CHECKPOINT_ENTRIES
    )


def _orbax_save(path: Path, params: Any) -> None:
    """Saves ``params`` to ``path`` with orbax, returning (or raising) only once orbax has
    stopped writing: after a failed save its background threads would otherwise go on
    creating files in a directory that is being removed."""
    import orbax.checkpoint as ocp

    before = set(threading.enumerate())
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    except BaseException:
        with _QuietOrbax():  # its threads complain as the checkpointer closes under them
            checkpointer.close()
            _wait_for_new_threads(before, limit_s=5.0)
        raise
    checkpointer.close()


def _wait_for_new_threads(before: set[threading.Thread], *, limit_s: float) -> None:
    """Waits (at most ``limit_s``) until every thread not in ``before`` has ended."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        new = [t for t in threading.enumerate() if t not in before]
        if not new:
            return
        for thread in new:
            try:
                thread.join(timeout=0.05)
            except RuntimeError:  # started, but not running yet
                time.sleep(0.01)


def save_checkpoint(
    directory: str | os.PathLike, model: Model, params: Any, *, metadata: dict | None = None
) -> Path:
    """Saves ``params`` with orbax and a ``model.json`` describing ``model``.

    The directory is assembled beside its destination and renamed into place
    (:func:`~deepfault_jax.files.replace_directory`), so a reader never sees
    half a checkpoint. An existing destination is replaced only when it is an
    empty directory or an earlier checkpoint (:func:`is_checkpoint_dir`);
    anything else is refused and left untouched. ``model.json`` records a
    digest of the parameters (``params_digest``), checked on load.

    Args:
      directory: destination; parent directories are created.
      model: the architecture the parameters belong to.
      params: the parameter pytree.
      metadata: extra JSON-ready facts (data set, seed, accuracy, ...); the
        keys this function writes itself take precedence.

    Returns:
      The absolute checkpoint directory.

    Raises:
      InputError: ``directory`` is an existing file, or a non-empty directory
        that is not a checkpoint (nothing is changed), or cannot be created.
      InputTypeError: ``metadata`` is not JSON-ready.
      KeyboardInterrupt: Ctrl-C during the write; held until orbax has
        finished, then raised with nothing replaced.
    """
    meta = {
        **(metadata or {}),
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": model.name,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "activation": model.activation,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params_digest": _params_digest(params),
    }
    try:
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"metadata must be JSON-ready; got {metadata!r} ({e})") from None

    def fill(staging: Path) -> None:
        with _deferred_interrupt():
            _orbax_save(staging / "params", params)
        write_atomic(staging / "model.json", text.encode())

    return replace_directory(directory, fill, owned=is_checkpoint_dir, what="checkpoint directory")


def _is_count(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


#: model.json keys: (required, check, what the check expects).
_META_KEYS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "model": (
        True,
        lambda v: isinstance(v, str) and v in MODEL_NAMES,
        f"one of {', '.join(MODEL_NAMES)}",
    ),
    "input_shape": (
        True,
        lambda v: isinstance(v, list) and len(v) == 3 and all(_is_count(d, 1) for d in v),
        "a list of 3 positive integers [height, width, channels]",
    ),
    "num_classes": (True, lambda v: _is_count(v, 2), "an integer >= 2"),
    "activation": (
        False,
        lambda v: isinstance(v, str) and v in ACTIVATIONS,
        f"one of {', '.join(ACTIVATIONS)}",
    ),
    "params_digest": (
        False,
        lambda v: isinstance(v, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", v) is not None,
        "'sha256:' followed by 64 hexadecimal digits",
    ),
}


def _read_model_json(directory: Path) -> dict:
    """The checkpoint's ``model.json``, every key this module relies on checked.

    Raises:
      InputError: a missing, unreadable or malformed file, naming it and the key.
    """
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise InputError(
            f"{directory} must be a checkpoint directory holding model.json; it does not"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{meta_path}: format must be {CHECKPOINT_FORMAT!r}; got {got!r}")
    for key, (required, check, expected) in _META_KEYS.items():
        if key not in meta:
            if required:
                raise InputError(f"{meta_path}: missing key {key!r} (expected {expected})")
        elif not check(meta[key]):
            shown = json.dumps(meta[key])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise InputError(f"{meta_path}: key {key!r} must be {expected}; got {shown}")
    return meta


def _error_text(error: BaseException) -> str:
    """The telling line of an orbax/TensorStore error: orbax's wrapper ("Encountered error
    while reading array index ... See full TensorStore details") gives way to its cause."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    chosen = next(
        (e for e in chain if str(e).strip() and "See full TensorStore details" not in str(e)),
        chain[0],
    )
    text = str(chosen).strip()
    line = text.splitlines()[0].split(" [tensorstore_spec")[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(chosen).__name__}: {line}" if line else type(chosen).__name__


class _QuietOrbax:
    """Keeps orbax's noise off stderr while it reads: its log lines (absl), the tasks its
    asyncio loop never retrieved ("Task exception was never retrieved", logged by asyncio as
    they are freed), and the errors its background threads report after a failed read
    ("Event loop is closed", "Exception ignored in <coroutine ...>", through
    ``sys.unraisablehook``). The failure itself reaches the caller as the text :meth:`call`
    returns. After a failure, exiting collects the leftovers and waits (at most 3 s) until
    the background threads have been silent for half a second."""

    _LOGGERS = ("absl", "asyncio")

    def __enter__(self) -> _QuietOrbax:
        self.failed = False
        self._strays: list[float] = []
        self._loggers = [logging.getLogger(name) for name in self._LOGGERS]
        self._levels = [logger.level for logger in self._loggers]
        self._hook = sys.unraisablehook
        for logger in self._loggers:
            logger.setLevel(logging.CRITICAL)
        sys.unraisablehook = lambda unraisable: self._strays.append(time.monotonic())
        return self

    def call(self, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        """``(fn(), None)``, or ``(None, what went wrong)`` when ``fn`` raises."""
        try:
            return fn(), None
        except Exception as e:  # orbax and TensorStore raise many types
            self.failed = True
            return None, _error_text(e)

    def __exit__(self, *exc_info) -> None:
        try:
            start = time.monotonic()
            while self.failed or self._strays or exc_info[0] is not None:
                gc.collect()  # coroutines left by a failed read report as they are freed
                now = time.monotonic()
                if now - max([start, *self._strays]) >= 0.5 or now - start >= 3.0:
                    break
                time.sleep(0.05)
        finally:
            sys.unraisablehook = self._hook
            for logger, level in zip(self._loggers, self._levels, strict=True):
                logger.setLevel(level)


def _leaf_shapes(tree: Any) -> list[tuple]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: hasattr(a, "shape"))
    return sorted((tuple(a.shape), str(np.dtype(a.dtype))) for a in leaves)


def _restore_params(directory: Path, arch: Model) -> Any:
    """The parameters in ``directory/params``, restored as ``arch``'s pytree.

    Raises:
      InputError: the arrays saved do not fit ``arch`` (both are named), or
        orbax cannot read them (the reason is named).
    """
    import orbax.checkpoint as ocp

    params_dir = directory / "params"
    failed = f"checkpoint {directory}: restoring the parameters from {params_dir} failed"
    if not params_dir.is_dir():
        raise InputError(f"{failed} ({'not a directory' if params_dir.exists() else 'missing'})")
    abstract = jax.eval_shape(lambda key: init_params(key, arch), jax.random.key(0))
    with _QuietOrbax() as quiet, ocp.StandardCheckpointer() as checkpointer:
        saved, failure = quiet.call(lambda: checkpointer.metadata(params_dir).item_metadata)
        saved = _leaf_shapes(getattr(saved, "tree", saved))  # empty when orbax cannot tell
        expected = _leaf_shapes(abstract)
        fits = not saved or saved == expected
        if failure is None and fits:
            params, failure = quiet.call(lambda: checkpointer.restore(params_dir, abstract))
    if failure is None and not fits:
        raise InputError(
            f"checkpoint {directory}: parameters do not fit {arch.name} with input "
            f"{arch.input_shape} and {arch.num_classes} classes: expected arrays {expected}, "
            f"got {saved}"
        )
    if failure is not None:
        raise InputError(f"{failed} ({failure})")
    return params


def _verify_digest(directory: Path, meta: dict, params: Any) -> None:
    """Checks the restored ``params`` against ``model.json``'s ``params_digest``.

    A checkpoint without a digest (written before digests existed) is loaded
    with a ``UserWarning``, not refused: it is the user's trained model, and
    saving it again adds the digest.
    """
    expected = meta.get("params_digest")
    if expected is None:
        warnings.warn(
            f"checkpoint {directory} has no parameter digest (written by an older "
            "deepfault-jax): its parameters are loaded unverified; save it again to add one",
            UserWarning,
            stacklevel=3,
        )
        return
    actual = _params_digest(params)
    if actual != expected:
        raise InputError(
            f"checkpoint {directory} is corrupt: parameter digest expected {expected}, got {actual}"
        )


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[Model, Any, dict]:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    The restored parameters are checked against the digest in ``model.json``.
    A checkpoint of an older version, which has no digest, loads with a
    ``UserWarning`` (its parameters unverified) rather than being refused.

    Args:
      directory: the checkpoint directory.
      model: if given, the architecture the caller expects.
      input_shape: if given, the input shape the caller expects.

    Returns:
      ``(model, params, metadata)``.

    Raises:
      InputError: a missing or unreadable checkpoint; a ``model.json`` with a
        missing or malformed key (the file and the key are named); parameters
        that do not fit the architecture, that orbax cannot restore (the
        reason is named), or whose digest differs (the checkpoint is corrupt);
        an architecture or input shape other than the expected one.
    """
    directory = Path(directory).expanduser().absolute()
    meta = _read_model_json(directory)
    saved_shape = tuple(meta["input_shape"])
    if model is not None and model != meta["model"]:
        raise InputError(
            f"checkpoint {directory} holds architecture {meta['model']!r}; expected {model!r}"
        )
    if input_shape is not None and tuple(int(d) for d in input_shape) != saved_shape:
        raise InputError(
            f"checkpoint {directory} was trained on input shape {saved_shape}; "
            f"expected {tuple(input_shape)}"
        )
    arch = create_model(
        meta["model"],
        input_shape=saved_shape,
        num_classes=meta["num_classes"],
        activation=meta.get("activation", "relu"),
    )
    params = _restore_params(directory, arch)
    _verify_digest(directory, meta, params)
    meta["checkpoint"] = str(directory)
    return arch, params, meta


# --------------------------------------------------------------------------- the model cache


def default_cache_dir() -> Path:
    """Where :func:`load_or_train` keeps trained models: ``$DEEPFAULT_JAX_CACHE`` or
    ``~/.cache/deepfault-jax`` (also when the variable is set but empty)."""
    value = env_path("DEEPFAULT_JAX_CACHE")
    return Path(value) if value is not None else Path.home() / ".cache" / "deepfault-jax"


def _cache_root(cache_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The cache directory, and how a message names where it came from."""
    if cache_dir is not None:
        return Path(cache_dir), f"cache_dir must name a writable directory; got {str(cache_dir)!r}"
    value = env_path("DEEPFAULT_JAX_CACHE")
    if value is not None:
        return Path(value), f"DEEPFAULT_JAX_CACHE must name a writable directory; got {value!r}"
    root = default_cache_dir()
    return root, (
        f"the model cache must be a writable directory (set DEEPFAULT_JAX_CACHE to choose "
        f"another); got {str(root)!r}"
    )


def _check_cache_writable(models: Path, complaint: str) -> None:
    """Creates ``models`` and writes a temporary file there, or raises :class:`InputError`."""
    try:
        models.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=models):
            pass
    except OSError as e:
        raise InputError(f"{complaint} ({describe_os_error(e)})") from None


def load_or_train(
    name: str,
    dataset: Dataset,
    *,
    seed: int = 0,
    activation: str = "relu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[Model, Any, dict]:
    """The cached model for (architecture, data set, activation, seed), trained on first use.

    Training uses the defaults of :func:`train` with ``jax.random.key(seed)``;
    the checkpoint is kept in ``cache_dir/models/`` (default
    :func:`default_cache_dir`). Before training, the cache is checked to be
    writable and the model's entry to be new, empty or a checkpoint.

    Returns:
      ``(model, params, metadata)`` as :func:`load_checkpoint`.

    Raises:
      InputError: a bad name, activation or seed (an integer in
        ``[0, 2**63 - 1]``); a cache that cannot be written (naming
        ``DEEPFAULT_JAX_CACHE`` or ``cache_dir`` and its value); a cache entry
        that holds other files; or a cached checkpoint that fails to load.
    """
    seed = check_seed(seed)
    model = create_model(
        name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        activation=activation,
    )
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in dataset.name).strip("-")
    root, complaint = _cache_root(cache_dir)
    path = root / "models" / f"{name}-{activation}-{slug}-seed{seed}"
    if (path / "model.json").is_file():
        return load_checkpoint(path, model=name, input_shape=dataset.input_shape)
    _check_cache_writable(root / "models", complaint)
    check_replaceable(path, owned=is_checkpoint_dir, what="cached model directory")
    result = train(jax.random.key(seed), model, dataset, progress=progress)
    meta = {
        "dataset": dataset.name,
        "seed": seed,
        "epochs": len(result.history),
        "test_accuracy": result.test_accuracy,
    }
    save_checkpoint(path, model, result.params, metadata=meta)
    return load_checkpoint(path, model=name, input_shape=dataset.input_shape)
