"""Planted faults: known faulty neurons in a trained model (fault kinds and planting).

DeepFault's measures were designed without faults whose location is known.
This module plants them (DESIGN section 7) and scores every localization
method by where it ranks the planted neurons.

A fault goes into one neuron (a Dense unit or a conv channel of a zoo model) with a
*strength* ``s`` calibrated so that the fault drops the accuracy into a window
(:func:`plant_faults`). The kinds by family (:data:`FAULT_FAMILIES`; each kind's function
gives its mathematics), and why a trained network can have each:

* ``output-coupled``: the outgoing weights pull toward a wrong class.

  * ``push_last``: in the last probed layer: a shortcut feature wired to a wrong class.
  * ``push_early``: in an earlier probed layer: the same shortcut, behind other neurons.

* ``activation``: the firing pattern breaks.

  * ``always_on``: fires on every input: a stuck unit after a bias blow-up.
  * ``dying``: falls silent on a share ``s`` of its inputs: a dying ReLU after a large step.

* ``incoming``: what the neuron computes is corrupted.

  * ``corrupt_in``: Gaussian noise on the weights: noisy, perturbed or under-trained weights.
  * ``in_sign``: a fraction ``s`` of the weights' signs flipped: sign-bit errors in storage.
  * ``in_scale``: weights and bias scaled by ``1 + s``: a wrong quantization or norm scale.
  * ``in_zero``: a fraction ``s`` of the weights zeroed: broken links, over-eager pruning.

* ``outgoing``: what the neuron's output means downstream is corrupted.

  * ``out_swap``: its weights to two consumers (classes) partly exchanged: a label mix-up.
  * ``out_scale``: its weights scaled by ``1 + s``: an over-amplified feature.

The trials that score localizers on planted faults are in :mod:`deepfault_jax.faultbench`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepfault_jax import zoo
from deepfault_jax.errors import InputError
from deepfault_jax.neuron_params import layer_order, pure_params
from deepfault_jax.probe import Probe
from deepfault_jax.zoo import Model

__all__ = [
    "FAULT_FAMILIES",
    "FAULT_KINDS",
    "FaultKind",
    "PlantedFault",
    "Planting",
    "fault_kind",
    "fault_kinds",
    "plant_faults",
]


def _doubling(lo: int, hi: int) -> tuple[float, ...]:
    """Strengths ``2**lo, 2**(lo + 1), ..., 2**hi`` (bisection refines between steps)."""
    return tuple(2.0**i for i in range(lo, hi + 1))


_FRACTIONS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
_MIN_ACTIVE = 0.1  # a pushing or dying neuron must be active on at least this share of inputs
_BISECTIONS = 8  # halvings of the strength interval when a ladder step overshoots the window


@dataclasses.dataclass(frozen=True)
class PlantedFault:
    """One planted fault.

    Attributes:
      kind: one of :data:`FAULT_KINDS`.
      family: its family (:data:`FAULT_FAMILIES`).
      layer: the zoo layer (``dense_1``, ``conv_0``).
      unit: the unit or channel.
      neuron: its id in the probe's :class:`~deepfault_jax.probe.NeuronIndex`.
      strength: the strength used (see the kind's function).
      target_class: the class a ``push_*`` fault pushes toward (else None).
      accuracy_drop: accuracy before this fault minus after it.
    """

    kind: str
    family: str
    layer: str
    unit: int
    neuron: int
    strength: float
    target_class: int | None
    accuracy_drop: float


class Planting(NamedTuple):
    """What :func:`plant_faults` returns.

    Attributes:
      params: the faulty parameters (the model's own layout: linen dict or NNX state).
      faults: the planted faults, in the order planted.
      notes: why attempts were rejected or faults not planted.
      rejected: attempts rejected (a neuron whose drop could not be put into the window).
    """

    params: Any
    faults: list[PlantedFault]
    notes: list[str]
    rejected: int


# --------------------------------------------------------------------------- parameters


class _Params:
    """A zoo model's parameters as a mutable dict of numpy arrays, and back.

    Zoo models only: layers are ``conv_i``, ``dense_i`` and ``logits``, called
    in that order, each reading the previous one's output (through pooling
    and a flatten after the last conv).
    """

    def __init__(self, model: Model, params: Any):
        self.model, self.original = model, params
        tree = pure_params(params)
        self.dtypes = jax.tree.map(lambda a: np.asarray(a).dtype, dict(tree))
        self.tree = jax.tree.map(lambda a: np.array(a, np.float32), dict(tree))
        self.layers = sorted(self.tree, key=layer_order)

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


# --------------------------------------------------------------------------- fault kinds


class _Site(NamedTuple):
    """Where a fault goes, and what preparing it may read: the parameters before it
    (``p``), the neuron (``layer``, ``unit``), the fault's PRNG ``key``, the inputs ``x, y``
    the drop is measured on, their pre-activation extremes under ``p`` (``values``, see
    :func:`_raw_values`) and the number of classes."""

    p: _Params
    layer: str
    unit: int
    key: jax.Array
    x: np.ndarray
    y: np.ndarray
    values: dict
    classes: int


def _share(s: float, n: int) -> int:
    """How many of ``n`` weights a fraction ``s`` covers: ``round(s n)``, at least 1 (monotone
    in ``s``: a larger ``s`` covers a superset of the same order)."""
    return min(n, max(1, round(s * n)))


def _set_incoming(q: _Params, layer: str, unit: int, flat: np.ndarray) -> _Params:
    kernel = q.kernel(layer)
    kernel[..., unit] = flat.reshape(kernel.shape[:-1])
    return q


def _nothing(site: _Site) -> dict:
    return {}


def _prepare_push(site: _Site) -> dict:
    target = _wrong_class(site.key, site.values, site.y, site.layer, site.unit, site.classes)
    nxt, idx, grad = _push_direction(site.p, site.layer, site.unit, target, site.x)
    return {"target": target, "nxt": nxt, "idx": idx, "grad": grad}


def _push(site: _Site, prep: dict, s: float) -> _Params:
    """Outgoing weights pushed toward a wrong class ``t``: ``w <- w + s |w| g / |g|``.

    ``w``: the weights reading the neuron (its row of the consumer's kernel; every
    position's row for a channel); ``g``: the gradient of the mean ``log p(t | x)`` over
    the inputs with respect to ``w``; ``t``: a class that the inputs the neuron is active
    on mostly do not belong to (drawn with the key); ``s > 0``: the relative step.
    """
    q = site.p.copy()
    nxt, idx, g = prep["nxt"], prep["idx"], prep["grad"]
    w = q.kernel(nxt)[idx]
    q.tree[nxt]["kernel"][idx] = w + s * np.linalg.norm(w) * g / max(np.linalg.norm(g), 1e-30)
    return q


def _prepare_always_on(site: _Site) -> dict:
    low = float(site.values["min"][site.layer][:, site.unit].min())
    return {"lift": max(0.0, -low) * 1.05 + 1e-3}


def _always_on(site: _Site, prep: dict, s: float) -> _Params:
    """Stuck on: ``b <- b + lift`` and ``w_out <- s w_out``.

    ``lift = 1.05 max(0, -min_x min_pos z(x)) + 0.001`` makes the pre-activation ``z``
    positive on every input (and every position of a channel) of the model the fault is
    planted in (a later fault in an earlier layer may change that); ``s > 0`` scales the
    outgoing weights ``w_out``.
    """
    q = site.p.copy()
    q.tree[site.layer]["bias"][site.unit] += prep["lift"]
    nxt, idx = q.outgoing(site.layer, site.unit)
    q.tree[nxt]["kernel"][idx] = q.kernel(nxt)[idx] * s
    return q


def _prepare_noise(site: _Site) -> dict:
    shape = site.p.kernel(site.layer)[..., site.unit].shape
    return {"noise": np.asarray(jax.random.normal(site.key, shape), np.float32)}


def _corrupt_in(site: _Site, prep: dict, s: float) -> _Params:
    """Gaussian noise on the incoming weights: ``w <- w + s |w| n / |n|``.

    ``n ~ N(0, I)`` is drawn once with the key (the same direction at every strength).
    """
    q = site.p.copy()
    w, noise = q.kernel(site.layer)[..., site.unit], prep["noise"]
    q.tree[site.layer]["kernel"][..., site.unit] = (
        w + s * np.linalg.norm(w) / np.linalg.norm(noise) * noise
    )
    return q


def _prepare_permutation(site: _Site) -> dict:
    n = site.p.kernel(site.layer)[..., site.unit].size
    return {"order": np.asarray(jax.random.permutation(site.key, n))}


def _in_sign(site: _Site, prep: dict, s: float) -> _Params:
    """Sign errors: ``w_i <- -w_i`` for a fraction ``s`` in (0, 1] of the incoming weights.

    The flipped weights are the first ``k = max(1, round(s n))`` of the ``n`` incoming
    weights in a random order drawn with the key, so a larger ``s`` flips a superset; at
    ``s = 1`` the bias flips too (``b <- -b``): the pre-activation is negated exactly.
    """
    q = site.p.copy()
    flat = q.kernel(site.layer)[..., site.unit].reshape(-1).copy()
    flipped = prep["order"][: _share(s, flat.size)]
    flat[flipped] = -flat[flipped]
    if s >= 1:
        q.tree[site.layer]["bias"][site.unit] *= -1
    return _set_incoming(q, site.layer, site.unit, flat)


def _in_scale(site: _Site, prep: dict, s: float) -> _Params:
    """A wrong scale: ``w <- (1 + s) w`` and ``b <- (1 + s) b``, so ``z <- (1 + s) z``.

    ``s > 0``; with a (leaky) ReLU, the neuron's output is scaled by ``1 + s`` as well.
    """
    q = site.p.copy()
    q.tree[site.layer]["kernel"][..., site.unit] *= 1 + s
    q.tree[site.layer]["bias"][site.unit] *= 1 + s
    return q


def _prepare_largest(site: _Site) -> dict:
    w = site.p.kernel(site.layer)[..., site.unit].reshape(-1)
    return {"order": np.argsort(-np.abs(w), kind="stable")}


def _in_zero(site: _Site, prep: dict, s: float) -> _Params:
    """Broken connections: ``w_i <- 0`` for a fraction ``s`` in (0, 1] of the incoming weights.

    The zeroed weights are the ``k = max(1, round(s n))`` of the ``n`` with the largest
    ``|w_i|`` (ties in index order), so a larger ``s`` zeroes a superset.
    """
    q = site.p.copy()
    flat = q.kernel(site.layer)[..., site.unit].reshape(-1).copy()
    flat[prep["order"][: _share(s, flat.size)]] = 0.0
    return _set_incoming(q, site.layer, site.unit, flat)


def _prepare_swap(site: _Site) -> dict:
    nxt, idx = site.p.outgoing(site.layer, site.unit)
    w = site.p.kernel(nxt)[idx]
    total = w.reshape(-1, w.shape[-1]).sum(axis=0)  # per consumer unit, over positions
    a = int(np.argmax(total))
    others = np.delete(np.arange(total.size), a)
    b = int(others[int(jax.random.randint(site.key, (), 0, others.size))])
    return {"nxt": nxt, "idx": idx, "a": a, "b": b}


def _out_swap(site: _Site, prep: dict, s: float) -> _Params:
    """Two consumer units' weights partly exchanged, ``s`` in (0, 1]:
    ``w_a, w_b <- (1 - s) w_a + s w_b, (1 - s) w_b + s w_a``.

    ``w_u``: the weights from the neuron to consumer unit ``u`` (a class, for the last probed
    layer; a channel's every position, or kernel tap, in turn); ``a``: the unit with the
    largest outgoing weight (summed over positions); ``b``: another unit drawn with the
    key. ``s = 1`` swaps them, ``s = 1/2`` makes them equal.
    """
    q = site.p.copy()
    nxt, idx, a, b = prep["nxt"], prep["idx"], prep["a"], prep["b"]
    w = q.kernel(nxt)[idx].copy()
    w[..., a], w[..., b] = (1 - s) * w[..., a] + s * w[..., b], (1 - s) * w[..., b] + s * w[..., a]
    q.tree[nxt]["kernel"][idx] = w
    return q


def _out_scale(site: _Site, prep: dict, s: float) -> _Params:
    """An over-amplified feature: ``w_out <- (1 + s) w_out``, ``s > 0``."""
    q = site.p.copy()
    nxt, idx = q.outgoing(site.layer, site.unit)
    q.tree[nxt]["kernel"][idx] = q.kernel(nxt)[idx] * (1 + s)
    return q


def _prepare_dying(site: _Site) -> dict:
    z = site.values["max"][site.layer][:, site.unit]
    return {"positive": z[z > 0]}


def _dying(site: _Site, prep: dict, s: float) -> _Params:
    """A dying ReLU: ``b <- b - Q_s``, ``s`` in (0, 1].

    ``Q_s``: the ``s``-quantile of the neuron's positive pre-activations (a channel's max
    over positions) over the inputs; the neuron falls silent on the inputs whose value was
    at most ``Q_s``, a share ``s`` of those it was active on (all of them at ``s = 1``).
    """
    q = site.p.copy()
    q.tree[site.layer]["bias"][site.unit] -= np.float32(np.quantile(prep["positive"], s))
    return q


@dataclasses.dataclass(frozen=True)
class FaultKind:
    """A kind of planted fault (see the module docstring for the kinds).

    Attributes:
      name: one of :data:`FAULT_KINDS`.
      family: ``"output-coupled"``, ``"activation"``, ``"incoming"`` or ``"outgoing"``.
      ladder: strengths from weak to strong (:func:`plant_faults` climbs it, then bisects).
      layers: the probed layers it may go into: ``"last"``, ``"early"`` (all but the last)
        or ``"any"``.
      summary: what it does, in one line.
      apply: ``(site, prepared, strength) -> faulty parameters``, a changed copy of the
        parameters before the fault; its docstring gives the mathematics.
      prepare: ``site -> dict``, what does not depend on the strength (drawn with the
        fault's key); ``"target"``: the class the fault pushes toward, if any.
      min_active: the share of the inputs a neuron must be active on to host the fault.
    """

    name: str
    family: str
    ladder: tuple[float, ...]
    layers: str
    summary: str
    apply: Callable[[_Site, dict, float], _Params]
    prepare: Callable[[_Site], dict] = _nothing
    min_active: float = 0.0


# Ladders: on the zoo's MLPs and lenet1 trained on fashion-mnist, the first step rarely drops
# the accuracy by 0.005 and the last by several points for most neurons (out_swap, in_zero
# and dying stay weak in wide layers: such neurons are rejected). always_on's drop does not
# vanish as s -> 0 (the stuck neuron's outgoing weights vanish: it is removed), so its
# bisection can miss where removing the neuron alone overshoots.
_KINDS = (
    FaultKind("push_last", "output-coupled", _doubling(-6, 4), "last",
              "outgoing weights pushed toward a wrong class (last probed layer)",
              _push, _prepare_push, _MIN_ACTIVE),
    FaultKind("push_early", "output-coupled", _doubling(-6, 4), "early",
              "outgoing weights pushed toward a wrong class (earlier probed layers)",
              _push, _prepare_push, _MIN_ACTIVE),
    FaultKind("always_on", "activation", _doubling(-4, 3), "any",
              "bias raised until active on every input, outgoing weights scaled",
              _always_on, _prepare_always_on),
    FaultKind("corrupt_in", "incoming", _doubling(-3, 6), "any",
              "Gaussian noise on the incoming weights", _corrupt_in, _prepare_noise),
    FaultKind("in_sign", "incoming", _FRACTIONS, "any",
              "signs of a fraction of the incoming weights flipped", _in_sign,
              _prepare_permutation),
    FaultKind("in_scale", "incoming", _doubling(-3, 6), "any",
              "incoming weights and bias scaled by 1 + s", _in_scale),
    FaultKind("in_zero", "incoming", _FRACTIONS, "any",
              "a fraction of the incoming weights zeroed, largest first", _in_zero,
              _prepare_largest),
    FaultKind("out_swap", "outgoing", _FRACTIONS, "any",
              "outgoing weights to two consumer units partly exchanged", _out_swap,
              _prepare_swap),
    FaultKind("out_scale", "outgoing", _doubling(-3, 6), "any",
              "outgoing weights scaled by 1 + s", _out_scale),
    FaultKind("dying", "activation", _FRACTIONS, "any",
              "bias lowered until silent on a share s of the inputs it was active on",
              _dying, _prepare_dying, _MIN_ACTIVE),
)  # fmt: skip
_REGISTRY = {k.name: k for k in _KINDS}

#: The fault kinds' names (the order is stable: new kinds are appended).
FAULT_KINDS: tuple[str, ...] = tuple(_REGISTRY)
#: Each fault kind's family.
FAULT_FAMILIES: dict[str, str] = {k.name: k.family for k in _KINDS}


def fault_kind(name: str) -> FaultKind:
    """The :class:`FaultKind` called ``name``; an InputError lists the known names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InputError(f"kind must be one of {', '.join(FAULT_KINDS)}; got {name!r}")
    return _REGISTRY[name]


def fault_kinds(family: str | None = None) -> tuple[str, ...]:
    """The names of the fault kinds of ``family`` (every kind when None), in registry order.

    Example: ``fault_kinds("outgoing") == ("out_swap", "out_scale")``.
    """
    if family is None:
        return FAULT_KINDS
    families = tuple(dict.fromkeys(FAULT_FAMILIES.values()))
    if family not in families:
        raise InputError(f"family must be one of {', '.join(families)}; got {family!r}")
    return tuple(k for k, f in FAULT_FAMILIES.items() if f == family)


# --------------------------------------------------------------------------- planting


_EPS = 1e-9  # accuracies are shares of the inputs: compare drops with this slack


def _checked_drop(drop: Any) -> tuple[float, float]:
    expected = "drop must be two finite floats (lo, hi) with 0 < lo < hi < 1"
    try:
        lo, hi = (float(v) for v in drop)
    except (TypeError, ValueError):
        raise InputError(f"{expected}; got {drop!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi < 1):
        raise InputError(f"{expected}; got {drop!r}")
    return lo, hi


def _checked_inputs(kind: str, probe: Probe, count, drop, tries, x, y):
    """The kind, the window and ``x, y`` as arrays, once the options of :func:`plant_faults`
    are checked."""
    fk = fault_kind(kind)
    if probe.conv_reduce == "none":
        raise InputError(
            "faults are planted in units and channels: conv_reduce must be 'mean' or 'max'; "
            "got 'none'"
        )
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise InputError(f"count must be a positive integer; got {count!r}")
    window = _checked_drop(drop)
    if isinstance(tries, bool) or int(tries) != tries or tries < 1:
        raise InputError(f"tries must be a positive integer; got {tries!r}")
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.shape[1:] != probe.input_shape or y.shape != (len(x),) or not len(x):
        raise InputError(
            f"x must be [n >= 1, {', '.join(map(str, probe.input_shape))}] with one label each; "
            f"got x {list(x.shape)} and y {list(y.shape)}"
        )
    return fk, window, x, y


def _fault_layers(fk: FaultKind, probe: Probe, p: _Params) -> list[str]:
    """The probed layers a fault of kind ``fk`` may go into."""
    names = list(probe.index.layer_names)
    for name in names:
        if name not in p.tree or name == p.layers[-1]:
            raise InputError(
                f"faults need probed zoo layers (one of {', '.join(p.layers[:-1])}); got {name!r}"
            )
    if fk.layers == "last":
        return [names[-1]]
    if fk.layers == "early":
        if len(names) < 2:
            raise InputError(
                f"{fk.name} needs two or more probed layers; got {names} (use a kind that may "
                "go into the last layer, such as push_last)"
            )
        return names[:-1]
    return names


def _next_candidate(cursor: int, order, candidates, used, fk: FaultKind, values) -> int:
    """The first position from ``cursor`` on in ``order`` of a candidate not yet used and
    active on at least ``fk.min_active`` of the inputs; ``len(order)``: none left."""
    while cursor < len(order):
        layer, unit = candidates[order[cursor]]
        if (layer, unit) not in used and (
            not fk.min_active or np.mean(values["max"][layer][:, unit] > 0) >= fk.min_active
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


def _attempt(fk: FaultKind, site: _Site, probe: Probe, accuracy: float, lo, hi):
    """A fault of kind ``fk`` at ``site``, calibrated into the window: ``(the fault, the
    faulty parameters, their accuracy)``, or why it was rejected (a str)."""
    model, prep = site.p.model, fk.prepare(site)
    found = _calibrate(fk, site, prep, lambda q: zoo.accuracy(model, q.build(), site.x, site.y),
                       accuracy, lo, hi)  # fmt: skip
    if isinstance(found, str):
        return found
    strength, q, acc = found
    neuron = probe.index.neuron_id(site.layer, site.unit)
    fault = PlantedFault(fk.name, fk.family, site.layer, site.unit, neuron, float(strength),
                         prep.get("target"), float(accuracy - acc))  # fmt: skip
    return fault, q, acc


def _calibrate(fk: FaultKind, site: _Site, prep: dict, accuracy_of, accuracy, lo, hi):
    """Puts the fault's drop into ``[lo, hi]``: the first ladder strength whose drop reaches
    ``lo``, bisected toward the step before (0 before the first) while the drop exceeds
    ``hi``. Returns ``(strength, faulty parameters, their accuracy)``, or why not (a str)."""
    below, most = 0.0, -math.inf
    for strength in fk.ladder:
        q = fk.apply(site, prep, strength)
        acc = accuracy_of(q)
        if accuracy - acc >= lo - _EPS:
            break
        below, most = strength, max(most, accuracy - acc)
    else:
        return f"drop {most:.4f} < {lo:g} at the largest strength {fk.ladder[-1]:g}"
    above, overshoot = strength, accuracy - acc
    bracket = [below, above]
    for i in range(_BISECTIONS + 1):
        d = accuracy - acc
        if lo - _EPS <= d <= hi + _EPS:
            return strength, q, acc
        if i == _BISECTIONS:
            break
        bracket[0 if d < lo else 1] = strength  # below the window: raise the floor
        strength = (bracket[0] + bracket[1]) / 2
        q = fk.apply(site, prep, strength)
        acc = accuracy_of(q)
    return (
        f"drop {overshoot:.4f} > {hi:g} at strength {above:g}, and {_BISECTIONS} bisections "
        f"from {below:g} missed the window (last drop {d:.4f} at {strength:.4g})"
    )


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
    drop: tuple[float, float] = (0.005, 0.01),
    tries: int = 8,
) -> Planting:
    """Plants ``count`` faults of one kind in distinct neurons of a zoo model, each with a
    strength calibrated so that it drops the accuracy into a window.

    A fault's drop is the accuracy on ``(x, y)`` before it (with the faults planted before
    it) minus after it. Its strength is the first of the kind's ladder whose drop reaches
    ``drop[0]``; when that drop exceeds ``drop[1]``, the strength is bisected between the
    step before (0 before the first) and this one, up to 8 halvings, until the drop lies in
    the window. A neuron whose drop cannot be put in the window (it never reaches
    ``drop[0]``, or it overshoots and the bisection misses) is a rejected attempt: counted,
    noted, and the next candidate neuron (in an order drawn with ``key``) tried, up to
    ``tries`` per fault.

    Args:
      key: PRNG key (neurons, target classes, noise, permutations, partners).
      model: the zoo model; ``params`` its parameters (linen or NNX).
      probe: its probe (faults go into probed Dense units or conv channels; the probe's
        ``conv_reduce`` must not be ``"none"``).
      x, y: ``float32[n, *input_shape]`` inputs and ``int[n]`` labels the drop is measured
        on: a held-out part of the test set, distinct from the part localizers see (so the
        calibration does not tune faults to the localizers' own inputs).
      kind: one of :data:`FAULT_KINDS` (see :func:`fault_kind`).
      count: faults to plant.
      drop: ``(lo, hi)``, the window of each fault's accuracy drop, ``0 < lo < hi < 1``.
      tries: attempts (neurons) per fault before giving up.

    Returns:
      A :class:`Planting`: the faulty parameters, the planted faults, notes, and the
      number of rejected attempts. Fewer faults than ``count`` when a fault found no neuron
      in ``tries`` attempts (planting stops there; the notes say why).

    Example:
      >>> planting = plant_faults(key, model, params, probe, x_held, y_held,
      ...                         kind="in_sign", count=2, drop=(0.005, 0.01))
      >>> [f.neuron for f in planting.faults], planting.rejected
    """
    fk, (lo, hi), x, y = _checked_inputs(kind, probe, count, drop, tries, x, y)
    p = _Params(model, params)
    candidates = [(layer, u) for layer in _fault_layers(fk, probe, p)
                  for u in range(p.kernel(layer).shape[-1])]  # fmt: skip
    values = _raw_values(model, params, probe, x)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(candidates)))
    accuracy = zoo.accuracy(model, p.build(), x, y)
    planted: list[PlantedFault] = []
    notes: list[str] = []
    rejected, used, cursor = 0, set(), 0  # (layer, unit)s tried; the position in order
    for f in range(int(count)):
        fault, attempts = None, 0
        while fault is None and attempts < tries:
            cursor = _next_candidate(cursor, order, candidates, used, fk, values)
            if cursor >= len(order):
                break
            layer, unit = candidates[order[cursor]]
            cursor, attempts = cursor + 1, attempts + 1
            used.add((layer, unit))
            site = _Site(p, layer, unit, jax.random.fold_in(key, 1000 + cursor), x, y, values,
                         probe.num_classes)  # fmt: skip
            found = _attempt(fk, site, probe, accuracy, lo, hi)
            if isinstance(found, str):
                rejected += 1
                notes.append(f"{fk.name} on {layer}:{unit} rejected: {found}")
            else:
                fault, p, accuracy = found
        if fault is None:
            left = "" if attempts == tries else ", no neuron left"
            notes.append(
                f"fault {f + 1} of {count} ({fk.name}) not planted: no neuron's drop fit the "
                f"window [{lo:g}, {hi:g}] ({attempts} attempts rejected{left})"
            )
            break
        planted.append(fault)
        values = _raw_values(model, p.build(), probe, x)  # for the next fault
    return Planting(p.build(), planted, notes, rejected)
