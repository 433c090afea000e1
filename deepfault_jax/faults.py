"""Planted faults: known faulty neurons in a trained model (fault kinds and planting).

DeepFault's measures were designed without faults whose location is known.
This module plants them (DESIGN section 7) and scores every localization
method by where it ranks the planted neurons.

Fault kinds (each on one neuron, i.e. a Dense unit or a conv channel of a
zoo model; the fault's *strength* is raised step by step until the model's
accuracy on the localization inputs drops by at least ``min_drop``):

* ``push_last``: a neuron of the last probed layer that, when active, pushes
  the logits toward a wrong class ``t``: its outgoing weights move by
  ``strength * |w|`` along the gradient of the mean ``log p(t)`` with respect
  to them (``|w|``: their norm).
* ``push_early``: the same for a neuron of an earlier probed layer.
* ``always_on``: the neuron's bias is raised until it is active on every
  input (and every position of a channel) of the model it is planted in
  (a later fault in an earlier layer may change that), and its outgoing
  weights are multiplied by ``strength``.
* ``corrupt_in``: Gaussian noise of norm ``strength * |w|`` is added to the
  neuron's incoming weights.

A fault that reaches no measurable drop at the largest strength is not
planted: another neuron is tried, and a trial without any is reported as
skipped, with the reason.

The trials that score localizers on planted faults are in :mod:`deepfault_jax.faultbench`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepfault_jax import zoo
from deepfault_jax.errors import InputError
from deepfault_jax.probe import Probe
from deepfault_jax.zoo import Model

__all__ = [
    "FAULT_KINDS",
    "PlantedFault",
    "plant_faults",
]

FAULT_KINDS = ("push_last", "push_early", "always_on", "corrupt_in")


def _ladder(lo: float, hi: float) -> tuple[float, ...]:
    """Strengths from ``lo`` to ``hi``, each sqrt(2) times the last (rounded to 3 digits)."""
    steps = round(2 * np.log2(hi / lo))
    return tuple(float(f"{lo * 2 ** (i / 2):.3g}") for i in range(steps + 1))


_LADDERS = {
    "push_last": _ladder(0.25, 32.0),
    "push_early": _ladder(0.25, 32.0),
    "always_on": _ladder(1.0, 64.0)[1:],
    "corrupt_in": _ladder(0.5, 32.0),
}
_MIN_ACTIVE = 0.1  # a pushing neuron must be active on at least this share of inputs


@dataclasses.dataclass(frozen=True)
class PlantedFault:
    """One planted fault.

    Attributes:
      kind: one of :data:`FAULT_KINDS`.
      layer: the zoo layer (``dense_1``, ``conv_0``).
      unit: the unit or channel.
      neuron: its id in the probe's :class:`~deepfault_jax.probe.NeuronIndex`.
      strength: the strength used (see the module docstring).
      target_class: the class a ``push_*`` fault pushes toward (else None).
      accuracy_drop: accuracy before this fault minus after it.
    """

    kind: str
    layer: str
    unit: int
    neuron: int
    strength: float
    target_class: int | None
    accuracy_drop: float


# --------------------------------------------------------------------------- parameters


def _order(name: str):
    kind = 0 if name.startswith("conv") else 1 if name.startswith("dense") else 2
    return kind, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _Params:
    """A zoo model's parameters as a mutable dict of numpy arrays, and back.

    Zoo models only: layers are ``conv_i``, ``dense_i`` and ``logits``, called
    in that order, each reading the previous one's output (through pooling
    and a flatten after the last conv).
    """

    def __init__(self, model: Model, params: Any):
        self.model, self.original = model, params
        tree = nnx.to_pure_dict(params) if model.is_nnx else params
        self.dtypes = jax.tree.map(lambda a: np.asarray(a).dtype, dict(tree))
        self.tree = jax.tree.map(lambda a: np.array(a, np.float32), dict(tree))
        self.layers = sorted(self.tree, key=_order)

    def consumer(self, layer: str) -> str:
        i = self.layers.index(layer)
        return self.layers[i + 1]

    def kernel(self, layer: str) -> np.ndarray:
        return self.tree[layer]["kernel"]

    def outgoing(self, layer: str, unit: int) -> tuple[str, tuple]:
        """The consumer layer and the index of the weights that read ``unit``."""
        nxt = self.consumer(layer)
        kernel = self.kernel(nxt)
        if kernel.ndim == 4:  # conv -> conv
            return nxt, (slice(None), slice(None), unit, slice(None))
        channels = self.kernel(layer).shape[-1]
        if self.kernel(layer).ndim == 4:  # conv -> (pool, flatten) -> dense: NHWC order
            return nxt, (slice(unit, None, channels), slice(None))
        return nxt, (unit, slice(None))

    def as_params(self, tree: dict) -> Any:
        """``tree`` (this layout, any arrays) as the model's parameters, in their dtypes."""
        return _as_model_params(
            self.model, jax.tree.map(lambda a, d: jnp.asarray(a, d), tree, self.dtypes)
        )

    def build(self) -> Any:
        return self.as_params(self.tree)

    def copy(self) -> _Params:
        other = object.__new__(_Params)
        other.model, other.original, other.layers = self.model, self.original, self.layers
        other.dtypes = self.dtypes
        other.tree = jax.tree.map(np.copy, self.tree)
        return other


_CHUNK = 512  # inputs per jitted step in the helpers below


# The caches below are keyed on a zoo Model, which compares by its name, input shape,
# classes and activation (what determines its computation); they hold compiled functions
# and shapes, never parameter arrays.


@functools.lru_cache(maxsize=16)
def _extremes_fn(model: Model, layers: tuple[str, ...], channels: tuple[int, ...]) -> Callable:
    """``jit((params, x) -> {layer: (max, min)})``: each layer's output (pre-activation) per
    input and unit or channel, its max and min over a channel's positions; built once per
    (model, layers); ``channels`` are the layers' units or channels."""
    from deepfault_jax.probe import model_probe

    # fresh parameters serve the probe's shapes (an NNX probe runs its model once); the
    # probe keeps none of them
    template = zoo.init_params(jax.random.key(0), model)
    every = model_probe(model, template, layers=list(layers), conv_reduce="none")
    del template

    @jax.jit
    def extremes(params, x):
        _, acts = every.fn(params, x)
        out = {}
        for name, c in zip(layers, channels, strict=True):
            per = acts[name].reshape(x.shape[0], -1, c)  # [batch, positions, channels]
            out[name] = (per.max(axis=1), per.min(axis=1))
        return out

    return extremes


@functools.lru_cache(maxsize=16)
def _abstract_params(model: Model) -> Any:
    """The model's parameters as shapes and dtypes (``jax.ShapeDtypeStruct`` leaves): the
    template an NNX state is filled from."""
    return jax.eval_shape(lambda: zoo.init_params(jax.random.key(0), model))


def _as_model_params(model: Model, tree: dict) -> Any:
    """A plain dict of layers -> arrays as the model's parameters (an NNX state for NNX)."""
    if not model.is_nnx:
        return tree
    state = jax.tree.map(lambda a: a, _abstract_params(model))  # a copy to fill
    nnx.replace_by_pure_dict(state, tree)  # fills every leaf
    return state


def _raw_values(model: Model, params: Any, probe: Probe, x: np.ndarray) -> dict[str, dict]:
    """Each probed layer's output (pre-activation) per input and unit or channel: its
    ``"max"`` and ``"min"`` over a channel's positions (reduced on the device, in chunks)."""
    extremes = _extremes_fn(model, probe.index.layer_names, probe.index.layer_sizes)
    parts = [extremes(params, jnp.asarray(x[i : i + _CHUNK])) for i in range(0, len(x), _CHUNK)]
    return {
        side: {
            name: np.concatenate([np.asarray(part[name][j]) for part in parts])
            for name in probe.index.layer_names
        }
        for j, side in enumerate(("max", "min"))
    }


@functools.lru_cache(maxsize=16)
def _log_prob_kernel_grad(model: Model) -> Callable:
    """``jit((params, x, target, consumer) -> d sum log p(target) / d kernel of consumer)``,
    built once per model (``consumer`` static)."""

    def objective(kernel, params, x, target, consumer):
        params = {**params, consumer: {**params[consumer], "kernel": kernel}}
        return jnp.sum(
            jax.nn.log_softmax(model.apply(_as_model_params(model, params), x))[:, target]
        )

    grad = jax.grad(objective)
    return jax.jit(
        lambda params, x, target, consumer: grad(
            params[consumer]["kernel"], params, x, target, consumer
        ),
        static_argnames=("consumer",),
    )


def _push_direction(p: _Params, layer: str, unit: int, target: int, x) -> tuple:
    """Gradient of the mean log p(target) over ``x`` with respect to the weights reading
    ``unit`` (summed over chunks of inputs)."""
    nxt, idx = p.outgoing(layer, unit)
    grad = _log_prob_kernel_grad(p.model)
    tree = jax.tree.map(jnp.asarray, p.tree)
    total = sum(
        np.asarray(grad(tree, jnp.asarray(x[i : i + _CHUNK]), target, consumer=nxt))
        for i in range(0, len(x), _CHUNK)
    )
    return nxt, idx, total[idx] / len(x)


def _apply(kind, p: _Params, layer, unit, strength, *, direction, key, lift):
    q = p.copy()
    if kind in ("push_last", "push_early"):
        nxt, idx, grad = direction
        w = q.kernel(nxt)[idx]
        norm = np.linalg.norm(grad)
        q.tree[nxt]["kernel"][idx] = w + strength * np.linalg.norm(w) * grad / max(norm, 1e-30)
    elif kind == "always_on":
        q.tree[layer]["bias"][unit] += lift
        nxt, idx = q.outgoing(layer, unit)
        q.tree[nxt]["kernel"][idx] = q.kernel(nxt)[idx] * strength
    else:  # corrupt_in
        w = q.kernel(layer)[..., unit]  # the unit's incoming weights
        noise = np.asarray(jax.random.normal(key, w.shape), np.float32)
        scale = strength * np.linalg.norm(w) / np.linalg.norm(noise)
        q.tree[layer]["kernel"][..., unit] = w + scale * noise
    return q


def _checked_inputs(kind: str, probe: Probe, count, min_drop, tries, x, y):
    """``x`` and ``y`` as arrays, once the options of :func:`plant_faults` are checked."""
    if kind not in FAULT_KINDS:
        raise InputError(f"kind must be one of {', '.join(FAULT_KINDS)}; got {kind!r}")
    if probe.conv_reduce == "none":
        raise InputError(
            "faults are planted in units and channels: conv_reduce must be 'mean' or 'max'; "
            "got 'none'"
        )
    if int(count) != count or count < 1:
        raise InputError(f"count must be a positive integer; got {count!r}")
    if not 0 < min_drop < 1:
        raise InputError(f"min_drop must lie in (0, 1); got {min_drop}")
    if int(tries) != tries or tries < 1:
        raise InputError(f"tries must be a positive integer; got {tries!r}")
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.shape[1:] != probe.input_shape or y.shape != (len(x),) or not len(x):
        raise InputError(
            f"x must be [n >= 1, {', '.join(map(str, probe.input_shape))}] with one label each; "
            f"got x {list(x.shape)} and y {list(y.shape)}"
        )
    return x, y


def _fault_layers(kind: str, probe: Probe, p: _Params) -> list[str]:
    """The probed layers a fault of ``kind`` may go into."""
    names = list(probe.index.layer_names)
    for name in names:
        if name not in p.tree or name == p.layers[-1]:
            raise InputError(
                f"faults need probed zoo layers (one of {', '.join(p.layers[:-1])}); got {name!r}"
            )
    if kind == "push_last":
        return [names[-1]]
    if kind == "push_early":
        if len(names) < 2:
            raise InputError(
                f"push_early needs two or more probed layers; got {names} (use push_last)"
            )
        return names[:-1]
    return names


def _next_candidate(cursor: int, order, candidates, used, kind: str, values) -> int:
    """The first position from ``cursor`` on in ``order`` of a candidate not yet used (for a
    push: one active on at least ``_MIN_ACTIVE`` of the inputs); ``len(order)``: none left."""
    while cursor < len(order):
        layer, unit = candidates[order[cursor]]
        if (layer, unit) not in used and (
            not kind.startswith("push") or np.mean(values["max"][layer][:, unit] > 0) >= _MIN_ACTIVE
        ):
            break
        cursor += 1
    return cursor


def _wrong_class(key: jax.Array, values, y: np.ndarray, layer: str, unit: int, classes: int):
    """A class the neuron's active inputs do not belong to, mostly (drawn with ``key``)."""
    active = values["max"][layer][:, unit] > 0
    share = np.bincount(y[active], minlength=classes) / max(active.sum(), 1)
    options = np.flatnonzero(share < np.median(share) + 1e-12)
    return int(options[int(jax.random.randint(key, (), 0, options.size))])


def _climb(kind, model, p: _Params, layer, unit, x, y, accuracy, min_drop, **how):
    """The first strength of the ladder whose fault drops the accuracy by ``min_drop``:
    ``(strength, faulty parameters, their accuracy)``, or None."""
    for strength in _LADDERS[kind]:
        q = _apply(kind, p, layer, unit, strength, **how)
        acc = zoo.accuracy(model, q.build(), x, y)
        if accuracy - acc >= min_drop:
            return strength, q, acc
    return None


def plant_faults(
    key: jax.Array,
    model: Model,
    params: Any,
    probe: Probe,
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: str,
    count: int = 1,
    min_drop: float = 0.02,
    tries: int = 8,
) -> tuple[Any, list[PlantedFault], list[str]]:
    """Plants ``count`` faults of one kind in distinct neurons of a zoo model.

    Each fault's strength climbs its ladder until the accuracy on ``(x, y)``
    drops by at least ``min_drop`` below the accuracy before that fault; a
    neuron that never gets there is given up and another drawn (up to
    ``tries`` per fault).

    Args:
      key: PRNG key (neurons, target classes, noise).
      model: the zoo model; ``params`` its parameters (linen or NNX).
      probe: its probe (faults go into probed Dense units or conv channels).
      x, y: the inputs the drop is measured on (the localization inputs).
      kind: one of :data:`FAULT_KINDS`.
      count: faults to plant.
      min_drop: accuracy drop each fault must cause.
      tries: neurons tried per fault before giving up.

    Returns:
      ``(faulty params, planted faults, notes)``; fewer faults than ``count``
      when some could not reach ``min_drop`` (the notes say why).
    """
    x, y = _checked_inputs(kind, probe, count, min_drop, tries, x, y)
    p = _Params(model, params)
    candidates = [(layer, u) for layer in _fault_layers(kind, probe, p)
                  for u in range(p.kernel(layer).shape[-1])]  # fmt: skip
    values = _raw_values(model, params, probe, x)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(candidates)))
    accuracy = zoo.accuracy(model, p.build(), x, y)
    planted: list[PlantedFault] = []
    notes: list[str] = []
    used, cursor = set(), 0  # (layer, unit)s tried; the position in order
    for f in range(int(count)):
        done = False
        for _ in range(tries):
            cursor = _next_candidate(cursor, order, candidates, used, kind, values)
            if cursor >= len(order):
                break
            layer, unit = candidates[order[cursor]]
            cursor += 1
            fkey = jax.random.fold_in(key, 1000 + cursor)
            target = direction = None
            if kind.startswith("push"):
                target = _wrong_class(fkey, values, y, layer, unit, probe.num_classes)
                direction = _push_direction(p, layer, unit, target, x)
            lift = max(0.0, -float(values["min"][layer][:, unit].min())) * 1.05 + 1e-3
            found = _climb(kind, model, p, layer, unit, x, y, accuracy, min_drop,
                           direction=direction, key=fkey, lift=lift)  # fmt: skip
            used.add((layer, unit))
            if found is not None:
                strength, p, acc = found
                neuron = probe.index.neuron_id(layer, unit)
                planted.append(PlantedFault(kind, layer, int(unit), neuron, float(strength),
                                            target, float(accuracy - acc)))  # fmt: skip
                accuracy, done = acc, True
                values = _raw_values(model, p.build(), probe, x)  # for the next fault
                break
            notes.append(
                f"{kind} on {layer}:{unit} dropped accuracy by less than {min_drop} at strength "
                f"{_LADDERS[kind][-1]}; not planted"
            )
        if not done:
            notes.append(
                f"fault {f + 1} of {count} ({kind}) not planted: no neuron reached the drop"
            )
            break
    return p.build(), planted, notes
