"""Training a zoo model with optax Adam: one compilation per run, progress through a callback,
divergence refused, Ctrl-C stopping after the step in flight.

Models with BatchNorm (the ResNets, :attr:`~deepfault_jax.zoo.Model.has_batch_stats`)
train in training mode: each step normalizes with the statistics of the batch's real
images (the padding of the last batch is masked out) and records them in the running
averages (``mutable=["batch_stats"]``); the optimizer and its state cover ``params``
alone, so ``batch_stats`` change only through those forward passes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax.data import Dataset, shuffled_batches
from deepfault_jax.errors import (
    InputError,
    check_finite,
    check_int,
    check_key,
)
from deepfault_jax.interrupts import Interrupt, deferred_interrupt, stop_if_interrupted
from deepfault_jax.progress import Progress, notify
from deepfault_jax.zoo import Model, accuracy, default_epochs, init_params

__all__ = ["TrainResult", "train"]


def _trainable(model: Model, params: Any) -> Any:
    """The part of ``params`` the optimizer updates: ``params["params"]`` for a model with
    BatchNorm (its ``batch_stats`` are not trained by gradient), else all of it."""
    return params["params"] if model.has_batch_stats else params


def _train_forward(
    model: Model, params: Any, trainable: Any, x: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Any]:
    """Logits in training mode, and ``params`` with ``trainable`` in place and, for a model
    with BatchNorm, the running averages updated from the batch (its real images only)."""
    if not model.has_batch_stats:
        return model.apply(trainable, x), trainable
    variables = {**params, "params": trainable}
    logits, state = model.module.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
    return logits, {**variables, "batch_stats": state["batch_stats"]}


def _masked_loss(
    trainable: Any, model: Model, params: Any, x: jax.Array, y: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Any]:
    """``(mean cross-entropy over the real images, params after the forward pass)``."""
    logits, new_params = _train_forward(model, params, trainable, x, mask)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    weight = mask.astype(per_example.dtype)
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0), new_params


@functools.partial(jax.jit, static_argnames=("model", "optimizer"), donate_argnums=(0, 1))
def _train_step(
    params, opt_state, x, y, mask, *, model: Model, optimizer: optax.GradientTransformation
):
    trainable = _trainable(model, params)
    (loss, params), grads = jax.value_and_grad(_masked_loss, has_aux=True)(
        trainable, model, params, x, y, mask
    )
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trained = optax.apply_updates(trainable, updates)
    params = {**params, "params": trained} if model.has_batch_stats else trained
    return params, opt_state, loss


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      params: the trained parameters (for a model with BatchNorm, the variables
        ``{"params": ..., "batch_stats": ...}`` with the running averages of the training).
      history: per epoch ``{"epoch", "loss", "test_accuracy"}``.
      test_accuracy: accuracy on the test split after the last epoch.
      seconds: wall-clock training time (compilation included).
    """

    params: Any
    history: list[dict]
    test_accuracy: float
    seconds: float


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


def _train_epoch(
    params: Any,
    opt_state: Any,
    key: jax.Array,
    dataset: Dataset,
    *,
    model: Model,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    stage: str,
    progress: Progress | None,
    interrupt: Interrupt,
) -> tuple[Any, Any, float]:
    """One pass over the training images in the order ``key`` draws:
    ``(params, opt_state, mean loss)``.

    Raises:
      KeyboardInterrupt: Ctrl-C was pressed; raised after the step under way has
        finished, so no computation is left running.
    """
    batches = shuffled_batches(key, dataset.x_train, dataset.y_train, batch_size=batch_size)
    steps = math.ceil(len(dataset.y_train) / batch_size)
    losses = []
    for batch in batches:
        params, opt_state, loss = _train_step(
            params, opt_state, batch.x, batch.y, batch.mask, model=model, optimizer=optimizer
        )
        losses.append(loss)
        stop_if_interrupted(interrupt, params, opt_state)
        notify(progress, stage, len(losses), steps)
    return params, opt_state, float(np.mean(jax.device_get(losses)))


def train(
    key: jax.Array,
    model: Model,
    dataset: Dataset,
    *,
    epochs: int | None = None,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    progress: Progress | None = None,
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
      progress: called as ``progress("epoch E/N", batches done, batches)`` during an epoch
        and ``progress("train", epochs done, epochs)`` after each.
      params: start from these parameters instead of drawing new ones (for a model
        with BatchNorm, its variables ``{"params": ..., "batch_stats": ...}``).

    Returns:
      A :class:`TrainResult`.

    Raises:
      InputError: a bad option, a model that does not fit the data set, or
        training that diverged (the loss or a parameter became NaN or
        infinite: the message names the epoch and the learning rate).
      InputTypeError: ``key`` is not a JAX PRNG key.
      KeyboardInterrupt: Ctrl-C; raised at the end of the step under way, once
        JAX has nothing left running (see :func:`deferred_interrupt`).
    """
    check_key(key)
    epochs, batch_size, learning_rate = _check_train_options(
        model, dataset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate
    )
    start = time.perf_counter()
    with deferred_interrupt() as interrupt:
        init_key, shuffle_key = jax.random.split(key)
        if params is None:
            params = init_params(init_key, model)
        optimizer = optax.adam(learning_rate)
        opt_state = optimizer.init(_trainable(model, params))
        batch_size = min(batch_size, len(dataset.y_train))
        history = []
        for epoch in range(1, epochs + 1):
            stop_if_interrupted(interrupt, params, opt_state)
            params, opt_state, mean_loss = _train_epoch(
                params,
                opt_state,
                jax.random.fold_in(shuffle_key, epoch - 1),
                dataset,
                model=model,
                optimizer=optimizer,
                batch_size=batch_size,
                stage=f"epoch {epoch}/{epochs}",
                progress=progress,
                interrupt=interrupt,
            )
            _check_not_diverged(mean_loss, params, epoch=epoch, learning_rate=learning_rate)
            test_accuracy = accuracy(model, params, dataset.x_test, dataset.y_test)
            history.append({"epoch": epoch, "loss": mean_loss, "test_accuracy": test_accuracy})
            notify(progress, "train", epoch, epochs, loss=mean_loss, test_accuracy=test_accuracy)
    return TrainResult(params, history, history[-1]["test_accuracy"], time.perf_counter() - start)
