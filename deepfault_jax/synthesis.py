"""Synthesis: gradient ascent on the activation of suspicious neurons, within an L-inf ball.

Each input ``x`` of true class ``c`` climbs the mean value of the suspicious set
of its own class, ``J(x) = mean_{n in S_c} value_n(x)`` (pre-activation values
by default: build the probe with ``activation="post"`` for the other choice).
A ``[classes, k]`` table holds the sets, so one compiled function serves
batches that mix classes. The gradient of the mean equals the mean of the
per-neuron gradients, so one backward pass over the whole batch replaces the
original's k x inputs gradient graphs (DESIGN 4.6).

Two modes (DESIGN 4.7; the paper's symbols: ``d`` is the maximum L-inf
distance, ``step_size`` the gradient multiplier, ``[lo, hi]`` the valid input
range):

* ``"deepfault"``: the original single step,
  ``delta = clip(step_size * grad, -d, d)``, ``x' = clip(x + delta, lo, hi)``.
* ``"pgd"``: ``steps`` steps of projected ascent; the direction is the raw
  gradient, its sign, the L2-normalised gradient, or the update of any optax
  optimiser fed with the negated gradient; after each step the input is
  projected onto the L-inf ball of radius ``d`` around the original intersected
  with ``[lo, hi]`` (``optax.projections.projection_box``). Optionally each
  input stops once the model misclassifies it.

:func:`make_synthesizer` returns an ``init`` / ``step`` pair (like an
``optax.GradientTransformation``); :func:`synthesize` runs it under ``jit``:
up to 16 steps as straight-line code (XLA's CPU backend runs a while-loop body
about twice as slowly), more in one ``lax.fori_loop``.

Inputs are checked before anything is traced: a JAX gather clamps an index
out of range without a word, so a neuron id outside ``[0, neurons)``, a table
with the wrong number of rows or a label outside ``[0, classes)`` would
silently climb the wrong neurons. :func:`synthesize` checks shapes and types
always and values where they are concrete; a caller that jits it (values
traced) checks them on the host first with :func:`check_table` and
:func:`check_labels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax.cpu_layers import measured_faster
from deepfault_jax.errors import InputError, InputTypeError, check_finite, check_int
from deepfault_jax.probe import Probe

__all__ = [
    "DIRECTIONS",
    "MODES",
    "SynthesisState",
    "Synthesizer",
    "check_inputs",
    "check_labels",
    "check_table",
    "make_synthesizer",
    "objective",
    "synthesize",
]

MODES = ("deepfault", "pgd")
_MAX_UNROLL = 16
DIRECTIONS = ("raw", "sign", "l2")


class SynthesisState(NamedTuple):
    """The running state of a synthesis.

    Attributes:
      x: ``float32[batch, ...]`` current inputs.
      x0: ``float32[batch, ...]`` the originals.
      opt_state: the optax optimiser's state (an empty tuple without one).
      done: ``bool[batch]``: inputs that stopped (misclassified, with
        ``stop_when_misclassified``).
      step: number of steps taken.
    """

    x: jax.Array
    x0: jax.Array
    opt_state: Any
    done: jax.Array
    step: jax.Array


class Synthesizer(NamedTuple):
    """An ``init`` / ``step`` pair built by :func:`make_synthesizer`.

    Attributes:
      init: ``(params, x0) -> SynthesisState``.
      step: ``(params, state, labels, sets) -> SynthesisState``; ``sets`` is the
        ``int[batch, k]`` suspicious set of each input.
      num_steps: how many steps the mode takes (1 for ``"deepfault"``).
      probe: the probe it was built for (:func:`synthesize` checks the
        inputs, labels and table against it).
    """

    init: Callable[..., SynthesisState]
    step: Callable[..., SynthesisState]
    num_steps: int
    probe: Probe


def _is_traced(a: Any) -> bool:
    return isinstance(a, jax.core.Tracer)


def _shape_dtype(a: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array, a traced one included (both are static)."""
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    return tuple(int(n) for n in a.shape), np.dtype(a.dtype)


def _is_int(dtype: np.dtype) -> bool:
    return dtype != np.bool_ and np.issubdtype(dtype, np.integer)


def _check_ids(name: str, ids: Any, num_neurons: int) -> None:
    """Values of a concrete id array in ``[0, num_neurons)``, naming the first bad one."""
    ids = np.asarray(ids)
    bad = np.argwhere((ids < 0) | (ids >= num_neurons))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise InputError(
            f"{name} ids must lie in [0, {num_neurons}) (the probe's neurons); got "
            f"{ids[where]} at [{', '.join(map(str, where))}]"
        )


def check_inputs(probe: Probe, x: Any, *, name: str = "x") -> int:
    """Checks that ``x`` is a batch of the probe's inputs, ``[batch, *probe.input_shape]``.

    Runs on a traced ``x`` too (only its shape is read).

    Returns:
      The batch size.

    Raises:
      InputError: another shape; the message names both.
    """
    shape, _ = _shape_dtype(x)
    want = tuple(probe.input_shape)
    if len(shape) != len(want) + 1 or shape[1:] != want:
        raise InputError(
            f"{name} must have shape [batch, {', '.join(map(str, want))}] (the probe's input "
            f"shape); got {shape}"
        )
    return shape[0]


def check_labels(probe: Probe, labels: Any, *, batch: int | None = None, name: str = "labels"):
    """Checks ``labels``: ``int[batch]`` classes in ``[0, probe.num_classes)``.

    The values are checked when concrete (numpy, or a JAX array outside a
    trace); under ``jit`` only the shape and type are, so check on the host first.

    Args:
      probe: the model's probe.
      labels: the true classes.
      batch: the expected length (None: any).
      name: how the caller knows the labels (for the message).

    Raises:
      InputError: not integers, another shape, or a class out of range.
    """
    shape, dtype = _shape_dtype(labels)
    if not _is_int(dtype):
        raise InputTypeError(f"{name} must be integer classes; got {dtype}")
    if len(shape) != 1 or (batch is not None and shape[0] != batch):
        want = "batch" if batch is None else f"batch] = int[{batch}"
        raise InputError(f"{name} must be int[{want}]; got shape {shape}")
    if not _is_traced(labels):
        values = np.asarray(labels)
        bad = values[(values < 0) | (values >= probe.num_classes)]
        if bad.size:
            raise InputError(
                f"{name} must lie in [0, {probe.num_classes}); got {bad[0]} "
                f"(the probe's model has {probe.num_classes} classes)"
            )


def _check_table_layout(probe: Probe, table: Any) -> None:
    shape, dtype = _shape_dtype(table)
    if not _is_int(dtype):
        raise InputTypeError(f"table must hold integer neuron ids; got {dtype}")
    c, n = probe.num_classes, probe.index.num_neurons
    if len(shape) != 2 or shape[0] != c:
        raise InputError(
            f"table must have shape [num_classes, k] = [{c}, k]; got shape {shape} "
            "(one row of suspicious neuron ids per class of the probe's model)"
        )
    if not 1 <= shape[1] <= n:
        raise InputError(
            f"k (the table's columns) must lie in [1, {n}]; got {shape[1]} (the probe has {n} neurons)"
        )


def check_table(probe: Probe, table: Any) -> np.ndarray:
    """Checks a suspicious-set table on the host: ``int[num_classes, k]``, ids in ``[0, N)``.

    ``N`` is ``probe.index.num_neurons`` and ``1 <= k <= N``. Call it before a
    jitted :func:`synthesize` (where the table is traced and its ids cannot
    be checked): a JAX gather would clamp a bad id silently.

    Args:
      probe: the probe the ids index.
      table: numpy or concrete JAX array of neuron ids, one row per class.

    Returns:
      The table as a numpy array (its dtype kept).

    Raises:
      InputError: another type or shape, or an id out of range (the message
        names the expected and the actual shape, or the bad id and where it is);
        a traced table.
    """
    if _is_traced(table):
        raise InputTypeError(
            "check_table needs a concrete table: call it on the host, outside jit; got a traced value"
        )
    _check_table_layout(probe, table)
    table = np.asarray(table)
    _check_ids("table", table, probe.index.num_neurons)
    return table


def _objective(probe: Probe, params: Any, x: jax.Array, sets: jax.Array) -> jax.Array:
    _, flat = probe.flat(params, x)
    return jnp.mean(jnp.take_along_axis(flat, sets, axis=1), axis=1)


def objective(probe: Probe, params: Any, x: jax.Array, sets: jax.Array) -> jax.Array:
    """Per-input objective ``float32[batch]``: the mean value of each input's suspicious set.

    Args:
      probe: the model's probe.
      params: its parameters.
      x: ``float32[batch, *input_shape]``.
      sets: ``int[batch, k]`` neuron ids (checked to lie in ``[0, neurons)`` when concrete).
    """
    batch = check_inputs(probe, x)
    shape, dtype = _shape_dtype(sets)
    if not _is_int(dtype) or len(shape) != 2 or shape[0] != batch or shape[1] < 1:
        raise InputError(f"sets must be int[batch, k] = int[{batch}, k]; got {dtype}{list(shape)}")
    if not _is_traced(sets):
        _check_ids("sets", sets, probe.index.num_neurons)
    return _objective(probe, params, x, sets)


def _check_config(mode, d, step_size, steps, direction, lo, hi):
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    lo_f, hi_f = check_finite("lo", lo), check_finite("hi", hi)
    if not lo_f < hi_f:
        raise InputError(f"the input range must have lo < hi; got [{lo_f:g}, {hi_f:g}]")
    d_f, span = check_finite("d", d), hi_f - lo_f
    # a d beyond the whole range means nothing (equal up to rounding is the whole range)
    if not d_f > 0 or (d_f > span and not math.isclose(d_f, span)):
        raise InputError(
            f"d (the maximum L-inf distance) must lie in (0, hi - lo] = (0, {span:g}]; got {d_f:g}"
        )
    check_finite("step_size", step_size, lo=0.0, lo_open=True)
    check_int("steps", steps, lo=1)
    if mode == "pgd" and not (
        callable(getattr(direction, "update", None)) or direction in DIRECTIONS
    ):
        raise InputError(
            f"direction must be one of {', '.join(DIRECTIONS)} or an optax optimiser; got {direction!r}"
        )


def _pgd_update(g, state: SynthesisState, optimizer, direction, step_size):
    """One pgd step's move before the projection, and the optimiser's next state."""
    if optimizer is not None:
        return optimizer.update(-g, state.opt_state, state.x)  # ascent
    if direction == "sign":
        return step_size * jnp.sign(g), state.opt_state
    if direction == "l2":
        axes = tuple(range(1, g.ndim))
        norm = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))
        return step_size * g / jnp.where(norm == 0, 1.0, norm), state.opt_state
    return step_size * g, state.opt_state


def make_synthesizer(
    probe: Probe,
    *,
    mode: str = "deepfault",
    d: float = 0.1,
    step_size: float = 1.0,
    steps: int = 10,
    direction: str | optax.GradientTransformation = "sign",
    lo: float = 0.0,
    hi: float = 1.0,
    stop_when_misclassified: bool = False,
) -> Synthesizer:
    """Builds the ``init`` / ``step`` pair of a synthesis.

    Args:
      probe: the model's probe; its values define the objective.
      mode: ``"deepfault"`` (one clipped step, as the original) or ``"pgd"``.
      d: maximum L-inf distance from the original, finite, in ``(0, hi - lo]``.
      step_size: gradient multiplier (deepfault), or the step of ``raw`` /
        ``sign`` / ``l2`` directions (pgd); finite and > 0; ignored by an optax
        optimiser, which carries its own learning rate.
      steps: pgd steps, an integer >= 1 (checked in either mode).
      direction: pgd direction: ``"raw"``, ``"sign"``, ``"l2"`` (per input),
        or an ``optax.GradientTransformation``.
      lo, hi: valid input range (finite, lo < hi).
      stop_when_misclassified: pgd: freeze each input once the model
        misclassifies it.

    Returns:
      A :class:`Synthesizer`.

    Raises:
      InputError: an option that is not finite or out of its range, named with its value.
    """
    _check_config(mode, d, step_size, steps, direction, lo, hi)
    optimizer = direction if callable(getattr(direction, "update", None)) else None

    def grad(params, x, sets):
        return jax.grad(lambda z: jnp.sum(_objective(probe, params, z, sets)))(x)

    def project(x, x0):
        return optax.projections.projection_box(x, jnp.maximum(x0 - d, lo), jnp.minimum(x0 + d, hi))

    def init(params, x0):
        del params
        x0 = jnp.asarray(x0, jnp.float32)
        opt_state = optimizer.init(x0) if optimizer is not None else ()
        return SynthesisState(
            x0, x0, opt_state, jnp.zeros(x0.shape[0], bool), jnp.zeros((), jnp.int32)
        )

    def deepfault_step(params, state, labels, sets):
        del labels
        g = grad(params, state.x, sets)
        delta = jnp.clip(step_size * g, -d, d)
        x = jnp.clip(state.x0 + delta, lo, hi)
        return state._replace(x=x, step=state.step + 1)

    def pgd_step(params, state, labels, sets):
        g = grad(params, state.x, sets)
        update, opt_state = _pgd_update(g, state, optimizer, direction, step_size)
        moved = project(state.x + update, state.x0)
        keep = state.done.reshape((-1,) + (1,) * (g.ndim - 1))
        x = jnp.where(keep, state.x, moved)
        done = state.done
        if stop_when_misclassified:
            logits, _ = probe.flat(params, x)
            done = done | (jnp.argmax(logits, axis=-1) != labels)
        return SynthesisState(x, state.x0, opt_state, done, state.step + 1)

    if mode == "deepfault":
        return Synthesizer(init, deepfault_step, 1, probe)
    return Synthesizer(init, pgd_step, int(steps), probe)


def synthesize(
    synthesizer: Synthesizer,
    params: Any,
    x: jax.Array,
    labels: jax.Array,
    table: jax.Array,
) -> jax.Array:
    """Runs a synthesis on a batch in one ``lax.fori_loop``; pure and jit-able.

    Args:
      synthesizer: from :func:`make_synthesizer`.
      params: the model's parameters.
      x: ``float32[batch, *input_shape]`` originals (correctly classified ones,
        in the paper).
      labels: ``int[batch]`` their true classes.
      table: ``int[classes, k]`` suspicious neuron ids of each class; input i
        climbs ``table[labels[i]]``.

    Returns:
      ``float32[batch, *input_shape]`` synthesized inputs, each within ``d``
      (L-inf) of its original and inside ``[lo, hi]``.

    Raises:
      InputError: ``x`` not ``[batch, *probe.input_shape]``, ``labels`` not
        ``int[batch]`` in ``[0, classes)``, ``table`` not ``int[classes, k]`` with
        ``1 <= k <= neurons`` and ids in ``[0, neurons)``. Under ``jit`` the
        values of ``labels`` and ``table`` are traced and only their shapes and
        types are checked: check them on the host first (:func:`check_table`,
        :func:`check_labels`).
    """
    prb = synthesizer.probe
    check_labels(prb, labels, batch=check_inputs(prb, x))
    _check_table_layout(prb, table)
    if not _is_traced(table):
        _check_ids("table", table, prb.index.num_neurons)
    sets = jnp.asarray(table)[labels]
    state = synthesizer.init(params, x)
    if synthesizer.num_steps <= _MAX_UNROLL and measured_faster():
        # straight-line steps: XLA's CPU backend runs a while-loop body (even one
        # fori_loop fully unrolls) about twice as slowly as the same code outside it;
        # not measured elsewhere, so other backends keep the loop
        for _ in range(synthesizer.num_steps):
            state = synthesizer.step(params, state, labels, sets)
        return state.x
    state = jax.lax.fori_loop(
        0, synthesizer.num_steps, lambda _, s: synthesizer.step(params, s, labels, sets), state
    )
    return state.x
