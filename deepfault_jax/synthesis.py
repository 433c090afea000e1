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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepfault_jax.errors import InputError
from deepfault_jax.probe import Probe

__all__ = [
    "DIRECTIONS",
    "MODES",
    "SynthesisState",
    "Synthesizer",
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
    """

    init: Callable[..., SynthesisState]
    step: Callable[..., SynthesisState]
    num_steps: int


def objective(probe: Probe, params: Any, x: jax.Array, sets: jax.Array) -> jax.Array:
    """Per-input objective ``float32[batch]``: the mean value of each input's suspicious set.

    Args:
      probe: the model's probe.
      params: its parameters.
      x: ``float32[batch, *input_shape]``.
      sets: ``int[batch, k]`` neuron ids.
    """
    _, flat = probe.flat(params, x)
    return jnp.mean(jnp.take_along_axis(flat, sets, axis=1), axis=1)


def _check_config(mode, d, step_size, steps, direction, lo, hi):
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not d > 0:
        raise InputError(f"d (the maximum L-inf distance) must be > 0; got {d}")
    if not step_size > 0:
        raise InputError(f"step_size must be > 0; got {step_size}")
    if not lo < hi:
        raise InputError(f"the input range must have lo < hi; got [{lo}, {hi}]")
    if mode == "pgd":
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a positive integer; got {steps!r}")
        if not (callable(getattr(direction, "update", None)) or direction in DIRECTIONS):
            raise InputError(
                f"direction must be one of {', '.join(DIRECTIONS)} or an optax optimiser; got {direction!r}"
            )


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
      d: maximum L-inf distance from the original (> 0).
      step_size: gradient multiplier (deepfault), or the step of ``raw`` /
        ``sign`` / ``l2`` directions (pgd); ignored by an optax optimiser,
        which carries its own learning rate.
      steps: pgd steps.
      direction: pgd direction: ``"raw"``, ``"sign"``, ``"l2"`` (per input),
        or an ``optax.GradientTransformation``.
      lo, hi: valid input range.
      stop_when_misclassified: pgd: freeze each input once the model
        misclassifies it.

    Returns:
      A :class:`Synthesizer`.
    """
    _check_config(mode, d, step_size, steps, direction, lo, hi)
    optimizer = direction if callable(getattr(direction, "update", None)) else None

    def grad(params, x, sets):
        return jax.grad(lambda z: jnp.sum(objective(probe, params, z, sets)))(x)

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
        axes = tuple(range(1, g.ndim))
        opt_state = state.opt_state
        if optimizer is not None:
            update, opt_state = optimizer.update(-g, state.opt_state, state.x)  # ascent
        elif direction == "sign":
            update = step_size * jnp.sign(g)
        elif direction == "l2":
            norm = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))
            update = step_size * g / jnp.where(norm == 0, 1.0, norm)
        else:
            update = step_size * g
        moved = project(state.x + update, state.x0)
        keep = state.done.reshape((-1,) + (1,) * (g.ndim - 1))
        x = jnp.where(keep, state.x, moved)
        done = state.done
        if stop_when_misclassified:
            logits, _ = probe.flat(params, x)
            done = done | (jnp.argmax(logits, axis=-1) != labels)
        return SynthesisState(x, state.x0, opt_state, done, state.step + 1)

    if mode == "deepfault":
        return Synthesizer(init, deepfault_step, 1)
    return Synthesizer(init, pgd_step, int(steps))


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
    """
    sets = jnp.asarray(table)[labels]
    state = synthesizer.init(params, x)
    if synthesizer.num_steps <= _MAX_UNROLL:
        # straight-line steps: XLA's CPU backend runs a while-loop body (even one
        # fori_loop fully unrolls) about twice as slowly as the same code outside it
        for _ in range(synthesizer.num_steps):
            state = synthesizer.step(params, state, labels, sets)
        return state.x
    state = jax.lax.fori_loop(
        0, synthesizer.num_steps, lambda _, s: synthesizer.step(params, s, labels, sets), state
    )
    return state.x
