"""Search-based targeted repair: differential evolution over the chosen neurons' parameters.

The gradient-free counterpart of :func:`deepfault_jax.repair.fine_tune`, in the
spirit of Arachne (Sohn, Kang and Yoo, "Arachne: Search-Based Repair of Deep
Neural Networks", TOSEM 2023): the localized weights are searched with
differential evolution (evosax's ``DifferentialEvolution``) instead of trained
with Adam, and the result is judged the same way, so a ranking's repair can be
run either way on the same budget.

What is searched. The view's values (:meth:`repair.View.gather`) are
flattened into one vector with :func:`jax.flatten_util.ravel_pytree`, and its
``weights`` entries with the largest gradient magnitude of the fitness at the
original parameters are kept (all of them with ``weights=None``; differential
evolution does not scale to the thousands of parameters a few first-layer
neurons own: measured on Fashion-MNIST MLPs, a search over all of a top-10
view kept the original model of mlp-3x50 and lenet5, and recovered 12% of
planted drops with a top-3 view). Those values ``w0`` are searched: a candidate is a
perturbation ``d`` of them, and the candidate model has the view's
parameters ``w0 + d`` and every other parameter as it was. The first
population holds ``d = 0`` (the original model) and ``population - 1`` draws of
``d ~ N(0, (sigma * rms(w0))^2 I)``, where ``rms(w0) = sqrt(mean(w0^2))`` is
the root mean square of the view's values (``sigma`` alone where they are all
zero): ``sigma`` is the perturbation's scale relative to the parameters'. (The
default 0.25 was measured on digits MLPs with a neuron's input scaled by 5 or by
-1: 0.1 and 0.25 recovered as much, 0.5 a little less, and 1.0 overshot.)
Differential evolution then grows or shrinks the steps from the population's
own spread (``d_a + F (d_b - d_c)``, binomial crossover, greedy replacement;
evosax's defaults: best member as base, ``F = 0.8``, crossover rate 0.9).

The fitness (lower is better). Each generation draws a minibatch ``B`` of
``batch_size`` repair inputs, in order from permutations made with the key
(as :func:`repair.fine_tune` does), and splits it by the *original* model's
predictions into the failing inputs ``F`` (misclassified) and the passing ones
``P``. With ``CE(d; i)`` the cross-entropy of input ``i`` under the candidate
``w0 + d``::

    fitness(d) = mean_{i in F} CE(d; i) + alpha * mean_{i in P} CE(d; i)

(a mean over no inputs counts 0). The first term pulls the failing inputs to
their labels, the second, weighted by ``alpha``, keeps the passing ones right.
Because every generation scores a new minibatch, the members' fitness is
re-measured on it before the trial vectors are scored, so each trial competes
with its parent on the same inputs and the best member is the best on this
minibatch: a generation scores ``2 * population`` candidates, all with
:func:`jax.vmap` inside one :func:`jax.jit` ed generation function.

The budget and the stop. ``steps`` counts generations, as it counts optimiser
steps in :func:`repair.fine_tune`, and both draw ``batch_size`` inputs per
step. Every ``eval_every`` generations (and after the last one) the validation
accuracy of the current best member is measured; the best parameters measured
are kept, the search stops after ``patience`` measurements without
improvement, and if no measurement beats the starting accuracy the original
parameters are returned (``kept_original``). The result is a
:class:`repair.Fit` (a :class:`SearchFit`, which also records the best
member's fitness at each measurement).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from deepfault_jax.errors import check_finite, check_int, check_key
from deepfault_jax.neuron_params import pure_params, rebuild_params
from deepfault_jax.probe import Probe
from deepfault_jax.repair import Batches, Best, Fit, View, _checked_xy, predictions

__all__ = ["MIN_POPULATION", "SearchFit", "repair_fitness", "search_repair"]

#: The smallest population differential evolution works with: each trial needs its
#: parent, a base vector and two more distinct members.
MIN_POPULATION = 4


@dataclasses.dataclass(frozen=True)
class SearchFit(Fit):
    """What :func:`search_repair` did: a :class:`repair.Fit` (``steps`` and
    ``best_step`` count generations) and the search's own record.

    Attributes:
      fitness: ``(generation, fitness)`` of the best member at each validation
        measurement, on that generation's minibatch (generation 0: the original
        model on the first minibatch).
    """

    fitness: tuple[tuple[int, float], ...] = ()


def _check_search_options(steps, population, batch_size, alpha, sigma, eval_every, patience,
                          weights=None):  # fmt: skip
    if weights is not None:
        check_int("weights", weights, lo=1)
    return (
        check_int("steps", steps, lo=1),
        check_int("population", population, lo=MIN_POPULATION),
        check_int("batch_size", batch_size, lo=1),
        check_finite("alpha", alpha, lo=0.0),
        check_finite("sigma", sigma, lo=0.0, lo_open=True),
        check_int("eval_every", eval_every, lo=1),
        check_int("patience", patience, lo=1),
    )


def _split_fitness(logits: jax.Array, y: jax.Array, failing: jax.Array, alpha) -> jax.Array:
    """Mean cross-entropy over ``failing`` plus ``alpha`` times that over the rest (0 if none)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    fail = failing.astype(ce.dtype)
    passing = 1.0 - fail
    fail_mean = jnp.sum(ce * fail) / jnp.maximum(jnp.sum(fail), 1.0)
    pass_mean = jnp.sum(ce * passing) / jnp.maximum(jnp.sum(passing), 1.0)
    return fail_mean + alpha * pass_mean


def repair_fitness(
    probe: Probe,
    original: Any,
    params: Any,
    xy: tuple[np.ndarray, np.ndarray],
    *,
    alpha: float = 1.0,
) -> float:
    """The search's fitness of ``params`` on all of ``xy`` (lower is better).

    The inputs are split into failing and passing by ``original``'s predictions
    (the model before repair), as :func:`search_repair` splits each minibatch.

    Args:
      probe: the model's probe.
      original: the parameters that split the inputs.
      params: the parameters scored.
      xy: inputs and labels.
      alpha: the weight of the passing inputs' mean cross-entropy (finite, >= 0).
    """
    alpha = check_finite("alpha", alpha, lo=0.0)
    x, y = _checked_xy(probe, *xy, "the fitness data")
    failing = predictions(probe, original, x) != y
    logits = probe.fn(params, jnp.asarray(x))[0]
    return float(_split_fitness(logits, jnp.asarray(y), jnp.asarray(failing), alpha))


def _initial_population(key: jax.Array, flat: jax.Array, population: int, sigma: float):
    """``population`` perturbations: zero, then normal draws of scale ``sigma * rms(flat)``."""
    rms = float(jnp.sqrt(jnp.mean(jnp.square(flat))))
    scale = sigma * rms if rms > 0 else sigma
    draws = scale * jax.random.normal(key, (population, flat.size), flat.dtype)
    return draws.at[0].set(0.0)


def _chosen_weights(probe, params, view, tree, data, alpha, weights) -> np.ndarray:
    """Indices (ascending) into the view's flattened values of the ``weights`` with the
    largest ``|d fitness / d w|`` at the original parameters (ties: lower index first)."""
    full0, unravel = ravel_pytree(view.gather(tree))
    if weights is None or weights >= full0.size:
        return np.arange(full0.size)
    x, y, failing = (a[:2048] for a in data)

    def fit(flat):
        p = rebuild_params(params, view.scatter(tree, unravel(flat)))
        return _split_fitness(probe.fn(p, x)[0], y, failing, alpha)

    g = np.abs(np.asarray(jax.grad(fit)(full0)))
    return np.sort(np.argsort(-g, kind="stable")[:weights])


def search_repair(
    key: jax.Array,
    probe: Probe,
    params: Any,
    view: View,
    fit_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    *,
    steps: int = 300,
    population: int = 16,
    batch_size: int = 128,
    alpha: float = 1.0,
    sigma: float = 0.25,
    weights: int | None = 64,
    eval_every: int = 25,
    patience: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> SearchFit:
    """Searches the parameters of ``view`` with differential evolution, early-stopped on
    ``val_xy`` (the module docstring gives the fitness and the search).

    Args:
      key: draws the order of the fit inputs, the first population and every generation.
      probe: the model's probe (its ``fn`` gives the logits).
      params: the parameters (linen dict or NNX state); not modified.
      view: what is searched (:func:`repair.neuron_view`, :func:`repair.layer_view`).
      weights: how many of the view's parameters are searched: those with the largest
        gradient magnitude of the fitness at the original parameters, over the first
        (at most 2,048) repair inputs, as Arachne localizes weights before its search
        (None: all of them; every other parameter keeps its value).
      fit_xy: the repair inputs and labels.
      val_xy: validation inputs and labels (never fitted).
      steps: the budget of generations (>= 1).
      population: members per generation (>= :data:`MIN_POPULATION`).
      batch_size: inputs per generation (at most the fit inputs).
      alpha: the weight of the passing inputs' mean cross-entropy (finite, >= 0).
      sigma: the first population's spread, relative to the view's values' root mean
        square (finite, > 0).
      eval_every: generations between validation measurements.
      patience: measurements without improvement before stopping.
      progress: called as ``progress(generation, steps)`` after each measurement.

    Returns:
      A :class:`SearchFit` (a :class:`repair.Fit`).

    Raises:
      InputError: a bad option, key or data set.
    """
    check_key(key)
    steps, population, batch_size, alpha, sigma, eval_every, patience = _check_search_options(
        steps, population, batch_size, alpha, sigma, eval_every, patience, weights
    )
    weights = None if weights is None else check_int("weights", weights, lo=1)
    x, y = _checked_xy(probe, *fit_xy, "the repair data")
    xv, yv = _checked_xy(probe, *val_xy, "the validation data")
    start = time.perf_counter()
    tree = jax.tree.map(jnp.asarray, pure_params(params))
    full0, unravel = ravel_pytree(view.gather(tree))
    failing = predictions(probe, params, x) != y
    batch_size = min(batch_size, len(x))
    key_order, key_init, key_search = jax.random.split(key, 3)
    chosen = _chosen_weights(probe, params, view, tree, (x, y, failing), alpha, weights)
    flat0 = full0[chosen]

    def candidate(delta: jax.Array) -> Any:
        return rebuild_params(params, view.scatter(tree, unravel(full0.at[chosen].add(delta))))

    def fitness(delta, xb, yb, fb):
        return _split_fitness(probe.fn(candidate(delta), xb)[0], yb, fb, alpha)

    scores = jax.vmap(fitness, in_axes=(0, None, None, None))
    from evosax.algorithms import DifferentialEvolution  # evosax computes at import time

    de = DifferentialEvolution(population_size=population, solution=flat0)
    de_params = de.default_params

    @jax.jit
    def generation(state, k, xb, yb, fb):
        state = state.replace(fitness=scores(state.population, xb, yb, fb))  # same inputs
        trials, state = de.ask(k, state, de_params)
        state, _ = de.tell(k, trials, scores(trials, xb, yb, fb), state, de_params)
        best = jnp.argmin(state.fitness)
        return state, state.population[best], state.fitness[best]

    def accuracy(delta) -> float:
        return float(np.mean(predictions(probe, candidate(delta), xv) == yv))

    pop0 = _initial_population(key_init, flat0, population, sigma)
    # the members are re-scored on each generation's minibatch before use
    state = de.init(key_init, pop0, jnp.full(population, jnp.inf, flat0.dtype), de_params)
    batches = Batches(key_order, len(x), batch_size)
    take = batches.next()
    start_fitness = float(fitness(pop0[0], x[take], y[take], failing[take]))
    best = Best(pop0[0], accuracy(pop0[0]))
    record, done = [(0, start_fitness)], 0
    while done < steps:
        if done:
            take = batches.next()
        state, delta, fit = generation(
            state, jax.random.fold_in(key_search, done), x[take], y[take], failing[take]
        )
        done += 1
        if done % eval_every == 0 or done == steps:
            record.append((done, float(fit)))
            stop = best.measure(done, delta, accuracy(delta), patience)
            if progress is not None:
                progress(done, steps)
            if stop:
                break
    out = params if best.kept_original else candidate(best.value)
    return SearchFit(
        params=out, start_accuracy=best.history[0][1], best_accuracy=best.accuracy,
        best_step=best.step, steps=done, kept_original=best.kept_original,
        trained=int(flat0.size), seconds=time.perf_counter() - start,
        history=tuple(best.history), fitness=tuple(record),
    )  # fmt: skip
