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

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
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
from deepfault_jax.files import current_umask, write_atomic

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
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
        )
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive sizes; got {tuple(input_shape)}"
        )
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
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
    """
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
        raise ValueError(
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
      epochs: number of passes; default :func:`default_epochs`.
      batch_size: images per step.
      learning_rate: Adam's step size.
      progress: show a progress bar per epoch on stderr.
      params: start from these parameters instead of drawing new ones.

    Returns:
      A :class:`TrainResult`.
    """
    from tqdm.auto import tqdm

    if model.input_shape != dataset.input_shape or model.num_classes != dataset.num_classes:
        raise ValueError(
            f"{model.name} was built for input {model.input_shape} and {model.num_classes} classes; "
            f"data set {dataset.name!r} has input {dataset.input_shape} and {dataset.num_classes}"
        )
    epochs = default_epochs(dataset) if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}")
    start = time.perf_counter()
    init_key, shuffle_key = jax.random.split(key)
    if params is None:
        params = init_params(init_key, model)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    batch_size = min(int(batch_size), len(dataset.y_train))
    steps = math.ceil(len(dataset.y_train) / batch_size)
    history = []
    for epoch in range(epochs):
        epoch_key = jax.random.fold_in(shuffle_key, epoch)
        batches = shuffled_batches(
            epoch_key, dataset.x_train, dataset.y_train, batch_size=batch_size
        )
        bar = tqdm(
            batches,
            total=steps,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=None if progress else True,  # None: off when stderr is no terminal
            leave=False,
            unit="batch",
        )
        losses = []
        for batch in bar:
            params, opt_state, loss = _train_step(
                params, opt_state, batch.x, batch.y, batch.mask, model=model, optimizer=optimizer
            )
            losses.append(loss)
        mean_loss = float(np.mean(jax.device_get(losses)))
        test_accuracy = accuracy(model, params, dataset.x_test, dataset.y_test)
        history.append({"epoch": epoch + 1, "loss": mean_loss, "test_accuracy": test_accuracy})
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}, test accuracy {test_accuracy:.4f}",
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


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(
    directory: str | os.PathLike, model: Model, params: Any, *, metadata: dict | None = None
) -> Path:
    """Saves ``params`` with orbax and a ``model.json`` describing ``model``.

    The directory is assembled beside its destination and renamed into place,
    so a reader never sees half a checkpoint; an existing checkpoint there is
    replaced.

    Args:
      directory: destination; parent directories are created.
      model: the architecture the parameters belong to.
      params: the parameter pytree.
      metadata: extra JSON-ready facts (data set, seed, accuracy, ...).

    Returns:
      The absolute checkpoint directory.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"checkpoint destination must be a directory; got existing file {directory}"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp")
    )
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": model.name,
            "input_shape": list(model.input_shape),
            "num_classes": model.num_classes,
            "activation": model.activation,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(metadata or {}),
        }
        _write_json_atomic(staging / "model.json", meta)
        if directory.exists():
            old = Path(
                tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old")
            )
            old.rmdir()
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[Model, Any, dict]:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    Args:
      directory: the checkpoint directory.
      model: if given, the architecture the caller expects.
      input_shape: if given, the input shape the caller expects.

    Returns:
      ``(model, params, metadata)``.

    Raises:
      ValueError: a missing or unreadable checkpoint, or one whose architecture
        or input shape differs from the expected one (both are named).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).expanduser().absolute()
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise ValueError(
            f"{directory} must be a checkpoint directory holding model.json; it does not"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: format must be {CHECKPOINT_FORMAT!r}; got {got!r}")
    saved_shape = tuple(meta["input_shape"])
    if model is not None and model != meta["model"]:
        raise ValueError(
            f"checkpoint {directory} holds architecture {meta['model']!r}; expected {model!r}"
        )
    if input_shape is not None and tuple(int(d) for d in input_shape) != saved_shape:
        raise ValueError(
            f"checkpoint {directory} was trained on input shape {saved_shape}; "
            f"expected {tuple(input_shape)}"
        )
    arch = create_model(
        meta["model"],
        input_shape=saved_shape,
        num_classes=meta["num_classes"],
        activation=meta.get("activation", "relu"),
    )
    abstract = jax.eval_shape(lambda key: init_params(key, arch), jax.random.key(0))
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = checkpointer.metadata(directory / "params").item_metadata
        saved = getattr(saved, "tree", saved)
    except Exception as e:  # orbax raises many types for a missing or corrupt directory
        raise ValueError(
            f"checkpoint {directory}: unreadable parameters ({type(e).__name__})"
        ) from None

    def leaf_shapes(tree):
        leaves = jax.tree.leaves(tree, is_leaf=lambda a: hasattr(a, "shape"))
        return sorted((tuple(a.shape), str(np.dtype(a.dtype))) for a in leaves)

    if not leaf_shapes(saved):
        raise ValueError(
            f"checkpoint {directory}: unreadable parameters (params/ missing or empty)"
        )

    if leaf_shapes(saved) != leaf_shapes(abstract):
        raise ValueError(
            f"checkpoint {directory}: parameters do not fit {arch.name} with input {saved_shape} "
            f"and {arch.num_classes} classes: expected arrays {leaf_shapes(abstract)}, "
            f"got {leaf_shapes(saved)}"
        )
    try:
        params = checkpointer.restore(directory / "params", abstract)
    except Exception as e:  # orbax raises many types for missing or mismatched trees
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {directory}: parameters do not fit {arch.name} with input {saved_shape} "
            f"({type(e).__name__}: {first})"
        ) from None
    meta["checkpoint"] = str(directory)
    return arch, params, meta


def default_cache_dir() -> Path:
    """Where :func:`load_or_train` keeps trained models: ``$DEEPFAULT_JAX_CACHE`` or
    ``~/.cache/deepfault-jax``."""
    return Path(os.environ.get("DEEPFAULT_JAX_CACHE", Path.home() / ".cache" / "deepfault-jax"))


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
    :func:`default_cache_dir`).

    Returns:
      ``(model, params, metadata)`` as :func:`load_checkpoint`.
    """
    model = create_model(
        name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        activation=activation,
    )
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in dataset.name).strip("-")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "models" / f"{name}-{activation}-{slug}-seed{int(seed)}"
    if (path / "model.json").is_file():
        return load_checkpoint(path, model=name, input_shape=dataset.input_shape)
    result = train(jax.random.key(int(seed)), model, dataset, progress=progress)
    meta = {
        "dataset": dataset.name,
        "seed": int(seed),
        "epochs": len(result.history),
        "test_accuracy": result.test_accuracy,
    }
    save_checkpoint(path, model, result.params, metadata=meta)
    return load_checkpoint(path, model=name, input_shape=dataset.input_shape)
