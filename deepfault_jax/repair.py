"""Targeted repair: fine-tune only chosen neurons' parameters, and the baselines it is judged by.

DeepFault's promise is that suspicious neurons "can be retrained in a targeted
fashion to improve the overall accuracy of the network". A repair is that
test of a ranking: if re-training the top-k neurons of a localizer recovers
what a fault broke, far better than re-training k random neurons, the
ranking was right.

What is trained is a :class:`View` of the parameters:

* :func:`neuron_view`: each chosen neuron's incoming weights and bias
  (``part="incoming"``), its outgoing weights (``"outgoing"``), or both (the
  default); a conv channel's kernel slice and bias, and the slice of its
  consumer that reads it (:mod:`deepfault_jax.neuron_params`). A weight
  between two chosen neurons of consecutive layers is trained once.
* :func:`layer_view`: whole layers (the output layer baseline; every layer
  is full fine-tuning).

The view gathers the chosen slices into leaves of their own; the optimiser
(``optax.adam`` after ``optax.clip_by_global_norm``) and its state cover
exactly those leaves, and :meth:`View.scatter` writes them back, so every
other parameter is left bit for bit as it was. (optax's own masks,
``optax.masked`` and ``optax.freeze``, select whole leaves: a kernel, not the
column of one neuron; gathering the slices first is what lets a standard
optax optimiser train single neurons.)

:func:`fine_tune` takes minibatch steps of the mean cross-entropy of the
repair inputs (their order drawn with the key), measures the validation
accuracy every ``eval_every`` steps, keeps the best parameters seen, and
stops after ``patience`` measurements without improvement. If no
measurement beats the starting validation accuracy, the original parameters
are returned and the result says so (``kept_original``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax.data import iterate_batches
from deepfault_jax.errors import InputError, check_finite, check_int, check_key
from deepfault_jax.neuron_params import layer_order, neuron_layout, pure_params, rebuild_params
from deepfault_jax.probe import Probe

__all__ = [
    "BASELINES",
    "PARTS",
    "Batches",
    "Best",
    "Block",
    "Fit",
    "View",
    "changed_parameters",
    "compare_repairs",
    "fine_tune",
    "layer_view",
    "neuron_view",
    "output_layer",
    "predictions",
    "random_neurons",
    "repair_metrics",
    "total_parameters",
]

#: What of each chosen neuron a repair trains.
PARTS = ("both", "incoming", "outgoing")


@dataclasses.dataclass(frozen=True)
class Block:
    """One trained slice: ``tree[layer][leaf][index]``.

    Attributes:
      layer: the layer's key in the parameter tree.
      leaf: ``"kernel"`` or ``"bias"`` (or any leaf name of a whole layer).
      index: a NumPy index tuple (integer arrays, slices or ``Ellipsis``).
      piece: ``"incoming"``, ``"bias"``, ``"outgoing"`` or ``"layer"``.
    """

    layer: str
    leaf: str
    index: tuple
    piece: str


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    """The parameters a repair trains, as disjoint :class:`Block` s."""

    blocks: tuple[Block, ...]

    def gather(self, tree: dict) -> dict[str, jax.Array]:
        """The trained values of ``tree`` (a pure dict), one leaf per block."""
        return {
            f"{i}": jnp.asarray(tree[b.layer][b.leaf])[b.index] for i, b in enumerate(self.blocks)
        }

    def scatter(self, tree: dict, values: dict[str, jax.Array]) -> dict:
        """``tree`` with every block set from ``values`` (a new dict; ``tree`` is unchanged)."""
        out = {name: dict(layer) for name, layer in tree.items()}
        for i, b in enumerate(self.blocks):
            out[b.layer][b.leaf] = jnp.asarray(out[b.layer][b.leaf]).at[b.index].set(values[f"{i}"])
        return out

    def size(self, tree: dict) -> int:
        """How many parameters the view trains."""
        return int(sum(math.prod(np.shape(v)) for v in self.gather(tree).values()))


def _checked_neurons(neurons: Any, num_neurons: int) -> np.ndarray:
    ids = np.asarray(neurons)
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"neurons must be a non-empty list of neuron ids; got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"neuron ids must be integers; got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= num_neurons)]
    if bad.size:
        raise InputError(
            f"neuron ids must lie in [0, {num_neurons}) (the probed neurons); got {int(bad[0])}"
        )
    if np.unique(ids).size != ids.size:
        raise InputError(f"neuron ids must not repeat; got {ids.tolist()}")
    return ids.astype(np.int64)


def neuron_view(probe: Probe, params: Any, neurons: Any, *, part: str = "both") -> View:
    """The :class:`View` of the chosen neurons' own parameters.

    Args:
      probe: the probe whose flat neuron ids ``neurons`` are.
      params: the model's parameters (laid out by layer, as the zoo's are).
      neurons: distinct neuron ids in ``[0, probe.index.num_neurons)``.
      part: one of :data:`PARTS`.

    Raises:
      InputError: an id out of range or repeated, an unknown part, parameters
        laid out otherwise.
    """
    if part not in PARTS:
        raise InputError(f"part must be one of {', '.join(PARTS)}; got {part!r}")
    index = probe.index
    ids = _checked_neurons(neurons, index.num_neurons)
    layout = neuron_layout(probe, params, what="repair")
    tree = pure_params(params)
    chosen: dict[str, np.ndarray] = {}
    start = 0
    for layer in layout.layers:
        units = ids[(ids >= start) & (ids < start + layer.units)] - start
        if units.size:
            chosen[layer.name] = np.sort(units)
        start += layer.units
    incoming = chosen if part in ("both", "incoming") else {}
    blocks = []
    for layer in layout.layers:
        units = chosen.get(layer.name)
        if units is None:
            continue
        if part in ("both", "incoming"):
            blocks.append(Block(layer.name, "kernel", (Ellipsis, units), "incoming"))
            blocks.append(Block(layer.name, "bias", (units,), "bias"))
        if part in ("both", "outgoing"):
            kernel = np.shape(tree[layer.consumer]["kernel"])
            taken = incoming.get(layer.consumer, np.zeros(0, np.int64))
            keep = np.setdiff1d(np.arange(kernel[-1]), taken)
            if keep.size == 0:
                continue  # every weight reading these neurons is trained as incoming already
            if layer.outgoing == "flatten":  # rows unit::units of a Dense kernel
                rows = np.flatnonzero(np.isin(np.arange(kernel[0]) % layer.units, units))
            else:
                rows = units
            where = (rows[:, None], keep[None, :])
            if layer.outgoing == "conv":
                where = (slice(None), slice(None), *where)
            blocks.append(Block(layer.consumer, "kernel", where, "outgoing"))
    return View(tuple(blocks))


def output_layer(params: Any) -> str:
    """The output layer's name: the last layer in the zoo's order."""
    return sorted(pure_params(params), key=layer_order)[-1]


def layer_view(params: Any, *, layers: Sequence[str] | None = None) -> View:
    """The :class:`View` of whole layers (``None``: every layer, i.e. full fine-tuning)."""
    tree = pure_params(params)
    names = list(tree) if layers is None else list(layers)
    missing = [n for n in names if n not in tree]
    if missing or not names:
        raise InputError(
            f"layers must be among the model's layers {sorted(tree)}; got {missing or names}"
        )
    return View(
        tuple(Block(n, leaf, (Ellipsis,), "layer") for n in names for leaf in sorted(tree[n]))
    )


def random_neurons(key: jax.Array, num_neurons: int, k: int) -> np.ndarray:
    """``k`` distinct neuron ids of ``num_neurons``, drawn uniformly with ``key``."""
    check_key(key)
    k = check_int("k", k, lo=1, hi=num_neurons)
    return np.sort(np.asarray(jax.random.choice(key, num_neurons, (k,), replace=False)))


# --------------------------------------------------------------------------- fitting


@dataclasses.dataclass(frozen=True)
class Fit:
    """What :func:`fine_tune` did.

    Attributes:
      params: the repaired parameters (the original ones if ``kept_original``).
      start_accuracy: validation accuracy before.
      best_accuracy: the best validation accuracy measured (of the returned parameters).
      best_step: the step it was measured after (0: the start).
      steps: the steps taken (fewer than the budget after an early stop).
      kept_original: no measurement beat the start; the original parameters are returned.
      trained: parameters the view trains.
      seconds: wall time.
      history: ``(step, validation accuracy)`` of every measurement.
    """

    params: Any
    start_accuracy: float
    best_accuracy: float
    best_step: int
    steps: int
    kept_original: bool
    trained: int
    seconds: float
    history: tuple[tuple[int, float], ...]


class Batches:
    """Minibatch indices of ``n`` inputs: consecutive slices of permutations of ``range(n)``,
    each permutation drawn with a fresh split of ``key`` when the last one runs out."""

    def __init__(self, key: jax.Array, n: int, batch_size: int):
        self.key, self.n, self.batch_size = key, n, min(batch_size, n)
        self.order = np.zeros(0, np.int64)

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices."""
        if self.order.size < self.batch_size:
            self.key, sub = jax.random.split(self.key)
            self.order = np.concatenate(
                [self.order, np.asarray(jax.random.permutation(sub, self.n))]
            )
        take, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return take


class Best:
    """Early stopping on validation accuracy: the best value measured, and what gave it.

    Starts from the unrepaired ``value`` and its ``accuracy`` (step 0); only a strictly
    higher accuracy replaces it.
    """

    def __init__(self, value: Any, accuracy: float):
        self.value, self.accuracy, self.step, self.waited = value, accuracy, 0, 0
        self.history: list[tuple[int, float]] = [(0, accuracy)]

    @property
    def kept_original(self) -> bool:
        """No measurement beat the start."""
        return self.step == 0

    def measure(self, step: int, value: Any, accuracy: float, patience: int) -> bool:
        """Records a measurement; True when ``patience`` measurements in a row did not improve."""
        self.history.append((step, accuracy))
        if accuracy > self.accuracy:
            self.value, self.accuracy, self.step, self.waited = value, accuracy, step, 0
            return False
        self.waited += 1
        return self.waited >= patience


def _checked_xy(probe: Probe, x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{what} must hold at least one input; got shape {x.shape}")
    if tuple(x.shape[1:]) != tuple(probe.input_shape):
        raise InputError(
            f"{what} inputs must have the model's shape {tuple(probe.input_shape)}; got "
            f"{tuple(x.shape[1:])}"
        )
    if y.shape != (len(x),):
        raise InputError(f"{what} needs one label per input: {len(x)}; got shape {y.shape}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise InputError(f"{what} inputs must be finite floats; got dtype {x.dtype} or NaN/inf")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{what} labels must be integers; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= probe.num_classes:
        raise InputError(
            f"{what} labels must lie in [0, {probe.num_classes}); got {int(y.min())}..{int(y.max())}"
        )
    return x.astype(np.float32), y.astype(np.int32)


def predictions(probe: Probe, params: Any, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Predicted classes ``int32[n]`` of ``probe``'s model on ``x``."""
    fn = _predict_fn(probe)
    out = []
    y = np.zeros(len(x), np.int32)
    for batch in iterate_batches(x, y, batch_size=min(batch_size, len(x))):
        out.append(np.asarray(fn(params, batch.x))[batch.mask])
    return np.concatenate(out)


_PREDICT: dict[Probe, Callable] = {}


def _predict_fn(probe: Probe) -> Callable:
    if probe not in _PREDICT:
        _PREDICT[probe] = jax.jit(lambda p, x: jnp.argmax(probe.fn(p, x)[0], axis=-1))
    return _PREDICT[probe]


def _check_fit_options(steps, batch_size, learning_rate, eval_every, patience, clip):
    return (
        check_int("steps", steps, lo=1),
        check_int("batch_size", batch_size, lo=1),
        check_finite("learning_rate", learning_rate, lo=0.0, lo_open=True),
        check_int("eval_every", eval_every, lo=1),
        check_int("patience", patience, lo=1),
        check_finite("clip", clip, lo=0.0, lo_open=True),
    )


def fine_tune(
    key: jax.Array,
    probe: Probe,
    params: Any,
    view: View,
    fit_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    *,
    steps: int = 300,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    eval_every: int = 25,
    patience: int = 4,
    clip: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Fit:
    """Fine-tunes the parameters of ``view`` on ``fit_xy``, early-stopped on ``val_xy``.

    Args:
      key: draws the order of the fit inputs.
      probe: the model's probe (its ``fn`` gives the logits).
      params: the parameters (linen dict or NNX state); not modified.
      view: what is trained (:func:`neuron_view`, :func:`layer_view`).
      fit_xy: the repair inputs and labels.
      val_xy: validation inputs and labels (never fitted).
      steps: the budget of optimiser steps (>= 1).
      batch_size: inputs per step (at most the fit inputs).
      learning_rate: Adam's step size.
      eval_every: steps between validation measurements.
      patience: measurements without improvement before stopping.
      clip: the global gradient norm is clipped to this (``optax.clip_by_global_norm``).
      progress: called as ``progress(step, steps)`` after each measurement.

    Returns:
      A :class:`Fit`.
    """
    check_key(key)
    steps, batch_size, learning_rate, eval_every, patience, clip = _check_fit_options(
        steps, batch_size, learning_rate, eval_every, patience, clip
    )
    x, y = _checked_xy(probe, *fit_xy, "the repair data")
    xv, yv = _checked_xy(probe, *val_xy, "the validation data")
    start = time.perf_counter()
    tree = jax.tree.map(jnp.asarray, pure_params(params))
    values = view.gather(tree)
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.adam(learning_rate))
    state = optimizer.init(values)

    def loss(v, xb, yb):
        logits = probe.fn(rebuild_params(params, view.scatter(tree, v)), xb)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(v, s, xb, yb):
        grads = jax.grad(loss)(v, xb, yb)
        updates, s = optimizer.update(grads, s, v)
        return optax.apply_updates(v, updates), s

    def accuracy(v) -> float:
        p = rebuild_params(params, view.scatter(tree, v))
        return float(np.mean(predictions(probe, p, xv) == yv))

    batches = Batches(key, len(x), batch_size)
    best = Best(values, accuracy(values))
    done = 0
    while done < steps:
        take = batches.next()
        values, state = step(values, state, x[take], y[take])
        done += 1
        if done % eval_every == 0 or done == steps:
            stop = best.measure(done, values, accuracy(values), patience)
            if progress is not None:
                progress(done, steps)
            if stop:
                break
    out = params if best.kept_original else rebuild_params(params, view.scatter(tree, best.value))
    return Fit(
        params=out, start_accuracy=best.history[0][1], best_accuracy=best.accuracy,
        best_step=best.step, steps=done, kept_original=best.kept_original,
        trained=view.size(tree), seconds=time.perf_counter() - start,
        history=tuple(best.history),
    )  # fmt: skip


# --------------------------------------------------------------------------- judging


def changed_parameters(before: Any, after: Any) -> int:
    """How many parameters differ between two parameter trees of one model."""
    a, b = pure_params(before), pure_params(after)
    return int(
        sum(
            np.count_nonzero(np.asarray(u) != np.asarray(v))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
    )


def total_parameters(params: Any) -> int:
    """How many parameters a model has."""
    return int(sum(np.size(v) for v in jax.tree.leaves(pure_params(params))))


def repair_metrics(
    probe: Probe,
    before: Any,
    after: Any,
    test_xy: tuple[np.ndarray, np.ndarray],
    *,
    synthesized_xy: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """How a repair changed the model on held-out inputs.

    Returns:
      ``accuracy_before`` / ``accuracy_after`` on ``test_xy``; ``fix_rate``: the
      share of test inputs misclassified before that are right after; ``break_rate``:
      the share right before that are wrong after; ``synthesized_before`` /
      ``synthesized_after``: accuracy on ``synthesized_xy`` (when given);
      ``changed`` / ``changed_share``: parameters that differ, of all.
    """
    x, y = test_xy
    p0, p1 = predictions(probe, before, x), predictions(probe, after, x)
    wrong, right = p0 != y, p0 == y
    out = {
        "accuracy_before": float(np.mean(right)),
        "accuracy_after": float(np.mean(p1 == y)),
        "fix_rate": float(np.mean(p1[wrong] == y[wrong])) if wrong.any() else 0.0,
        "break_rate": float(np.mean(p1[right] != y[right])) if right.any() else 0.0,
    }
    if synthesized_xy is not None:
        xs, ys = synthesized_xy
        out["synthesized_before"] = float(np.mean(predictions(probe, before, xs) == ys))
        out["synthesized_after"] = float(np.mean(predictions(probe, after, xs) == ys))
    changed = changed_parameters(before, after)
    out["changed"] = changed
    out["changed_share"] = changed / total_parameters(before)
    return out


def _row(fit: Fit, metrics: dict, **extra) -> dict:
    return {
        **extra, **metrics, "trained": fit.trained, "steps": fit.steps,
        "best_step": fit.best_step, "validation_before": fit.start_accuracy,
        "validation_after": fit.best_accuracy, "kept_original": fit.kept_original,
        "seconds": fit.seconds,
    }  # fmt: skip


#: The baselines :func:`compare_repairs` can run beside a targeted repair.
BASELINES = ("random", "output", "full")


def compare_repairs(
    key: jax.Array,
    probe: Probe,
    params: Any,
    neurons: Any,
    fit_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    test_xy: tuple[np.ndarray, np.ndarray],
    *,
    synthesized_xy: tuple[np.ndarray, np.ndarray] | None = None,
    baselines: Sequence[str] = BASELINES,
    random_repeats: int = 3,
    part: str = "both",
    full_learning_rate: float | None = None,
    **fit_options: Any,
) -> dict[str, Any]:
    """A targeted repair of ``neurons`` and its baselines, all on the same step budget.

    Baselines: ``random`` (as many random neurons, ``random_repeats`` times, with
    mean and spread), ``output`` (the output layer only), ``full`` (every
    parameter, at ``full_learning_rate``: by default a tenth of the others', as
    fine-tuning a whole network usually takes; at the same rate, Adam's first
    steps on every weight at once measured worse than no repair on planted
    faults). Each fit draws its input order from its own fold of ``key``.

    Returns:
      ``{"targeted": row, "random": {"runs": [row, ...], "mean": {...}, "std": {...}},
      "output": row, "full": row, "repaired": params}`` where each row holds the
      :func:`repair_metrics` and the fit's record, and ``repaired`` the targeted
      repair's parameters.
    """
    check_key(key)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InputError(f"baselines must be among {', '.join(BASELINES)}; got {unknown}")
    random_repeats = check_int("random_repeats", random_repeats, lo=1)
    ids = _checked_neurons(neurons, probe.index.num_neurons)
    options = {k: v for k, v in fit_options.items() if k != "progress"}
    checked = _check_fit_options(**{"steps": 300, "batch_size": 128, "learning_rate": 3e-3,
                                    "eval_every": 25, "patience": 4, "clip": 1.0, **options})  # fmt: skip
    if full_learning_rate is None:
        full_learning_rate = checked[2] / 10
    full_learning_rate = check_finite("full_learning_rate", full_learning_rate, lo=0.0,
                                      lo_open=True)  # fmt: skip

    def run(fold: int, view: View, learning_rate: float | None = None, **extra):
        options = dict(fit_options)
        if learning_rate is not None:
            options["learning_rate"] = learning_rate
        fit = fine_tune(
            jax.random.fold_in(key, fold), probe, params, view, fit_xy, val_xy, **options
        )
        metrics = repair_metrics(probe, params, fit.params, test_xy, synthesized_xy=synthesized_xy)
        return _row(fit, metrics, **extra), fit

    targeted, fit = run(0, neuron_view(probe, params, ids, part=part), neurons=ids.tolist())
    out: dict[str, Any] = {"targeted": targeted, "repaired": fit.params}
    if "random" in baselines:
        runs = []
        for r in range(random_repeats):
            chosen = random_neurons(
                jax.random.fold_in(key, 1000 + r), probe.index.num_neurons, ids.size
            )
            runs.append(run(1 + r, neuron_view(probe, params, chosen, part=part),
                            neurons=chosen.tolist())[0])  # fmt: skip
        numeric = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
        out["random"] = {
            "runs": runs,
            "mean": {k: float(np.mean([r[k] for r in runs])) for k in numeric},
            "std": {k: float(np.std([r[k] for r in runs])) for k in numeric},
        }
    if "output" in baselines:
        out["output"] = run(500, layer_view(params, layers=[output_layer(params)]))[0]
    if "full" in baselines:
        out["full"] = run(600, layer_view(params), full_learning_rate)[0]
    return out
