"""Probes: turn a model into ``fn(params, x) -> (logits, activations)``.

A :class:`Probe` wraps a Flax linen module, a Flax NNX module, or any function
``fn(params, x) -> (logits, {name: activation})`` (Equinox, Haiku, hand-written
models) and returns, for a batch of inputs, the logits and an ordered mapping
layer name -> ``float32[batch, units]`` of neuron values.

* **Layers.** By default every Dense/Conv layer except the output layer
  (linen: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``; NNX: ``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nnx.Conv``); or a list of names; or a predicate on
  the name. Linen modules may instead expose values they ``sow`` into the
  ``intermediates`` collection (``sown=True``). A linen module that marks its
  neuron values with :class:`~deepfault_jax.linen_layers.NeuronValue` taps
  (the zoo's ResNets) is probed through them instead: its layers are the
  modules holding the taps (``conv_0``, ``conv_1``, ...), in call order.
* **Pre- or post-activation.** Captured Dense/Conv outputs are
  pre-activation values. ``values="post"`` applies the model's elementwise
  activation (``activation_fn``; zoo models supply their own) before any
  reduction. With taps, ``values`` picks the taps of that name and nothing is
  applied: for a ResNet's conv+BN layer, ``"pre"`` is the BatchNorm output and
  ``"post"`` the layer's output after the activation (in a block's second
  layer, after the residual add and the activation; see :mod:`deepfault_jax.zoo`).
* **Conv channels.** An activation of shape ``[batch, ..., channels]`` is
  reduced over its spatial axes: ``conv_reduce="mean"`` (the paper's choice),
  ``"max"``, or ``"none"`` (every (h, w, c) position is a neuron, flattened in
  row-major order).
* **Gates.** ``probe.gated(params, x, gates)`` runs the model with each probed
  layer's output multiplied by a gate per neuron (``gates[layer]`` is
  ``float32[batch or 1, units]``, broadcast over a conv layer's spatial axes
  unless ``conv_reduce="none"``). A gate of 1 is the plain model; its gradient
  is ``activation * d out / d activation`` summed over the neuron's positions,
  and a gate of 0 ablates the neuron (the attribution statistics and exact
  ablation use both). Gates act on the layer's output (the pre-activation
  value); for ``relu`` and ``leaky_relu`` zeroing it zeroes the post-activation
  value too. With taps, gates act on the probed value itself: the BatchNorm
  output for ``"pre"`` (the shortcut is still added after it), the output
  after the activation for ``"post"``. Linen Dense/Conv captures and taps, NNX
  layers and function probes given a ``gated_fn`` support gates; sown values
  do not (``probe.gated`` is None).

:class:`NeuronIndex` maps flat neuron ids (over all probed layers, in layer
order) to ``(layer, unit)`` and back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepfault_jax.cpu_layers import measured_faster
from deepfault_jax.errors import InputError
from deepfault_jax.linen_layers import calls_neuron_values, linen_capture, linen_gated

__all__ = [
    "CONV_REDUCTIONS",
    "VALUES",
    "NeuronIndex",
    "Probe",
    "function_probe",
    "linen_probe",
    "model_probe",
    "nnx_probe",
]

CONV_REDUCTIONS = ("mean", "max", "none")
#: Which neuron values are counted: the layer's output, or after the activation.
VALUES = ("pre", "post")
_NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)

LayerSelection = Sequence[str] | Callable[[str], bool] | None


@dataclasses.dataclass(frozen=True)
class NeuronIndex:
    """The layout of the probed neurons: flat ids <-> (layer, unit).

    Attributes:
      layer_names: probed layers, in order.
      layer_sizes: neurons per layer (after ``conv_reduce``).

    Neuron ids run over the layers in order: layer ``i`` holds ids
    ``offsets[i] .. offsets[i] + layer_sizes[i] - 1``.

    Example:
      >>> index = NeuronIndex(("dense_0", "dense_1"), (50, 30))
      >>> index.locate(57)
      ('dense_1', 7)
      >>> index.neuron_id("dense_1", 7)
      57
    """

    layer_names: tuple[str, ...]
    layer_sizes: tuple[int, ...]

    def __post_init__(self):
        names = tuple(str(n) for n in self.layer_names)
        sizes = tuple(int(s) for s in self.layer_sizes)
        if len(names) != len(sizes):
            raise InputError(
                f"layer_names and layer_sizes must have the same length; got {len(names)} and {len(sizes)}"
            )
        if not names:
            raise InputError("a neuron index needs at least one layer; got none")
        if len(set(names)) != len(names):
            raise InputError(f"layer names must be unique; got {list(names)}")
        if min(sizes) < 1:
            raise InputError(f"layer sizes must be >= 1; got {list(sizes)}")
        object.__setattr__(self, "layer_names", names)
        object.__setattr__(self, "layer_sizes", sizes)

    @property
    def num_neurons(self) -> int:
        """Total number of neurons."""
        return sum(self.layer_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First neuron id of each layer."""
        return tuple(int(o) for o in np.cumsum((0, *self.layer_sizes[:-1])))

    def _layer_position(self, layer: str) -> int:
        try:
            return self.layer_names.index(layer)
        except ValueError:
            raise InputError(
                f"unknown layer {layer!r}; expected one of {', '.join(self.layer_names)}"
            ) from None

    def layer_slice(self, layer: str) -> slice:
        """The ids of ``layer`` as a slice of the flat neuron axis."""
        i = self._layer_position(layer)
        return slice(self.offsets[i], self.offsets[i] + self.layer_sizes[i])

    def locate(self, neuron_id: int) -> tuple[str, int]:
        """``(layer, unit)`` of a flat neuron id."""
        neuron_id = int(neuron_id)
        if not 0 <= neuron_id < self.num_neurons:
            raise InputError(f"neuron id must lie in [0, {self.num_neurons}); got {neuron_id}")
        i = int(np.searchsorted(np.asarray(self.offsets), neuron_id, side="right")) - 1
        return self.layer_names[i], neuron_id - self.offsets[i]

    def neuron_id(self, layer: str, unit: int) -> int:
        """Flat id of ``unit`` in ``layer``."""
        i = self._layer_position(layer)
        if not 0 <= int(unit) < self.layer_sizes[i]:
            raise InputError(
                f"unit of {layer!r} must lie in [0, {self.layer_sizes[i]}); got {unit}"
            )
        return self.offsets[i] + int(unit)

    def layer_ids(self, layers: Sequence[str]) -> np.ndarray:
        """Sorted flat ids of every neuron in ``layers``."""
        return np.concatenate(
            [np.arange(self.num_neurons)[self.layer_slice(name)] for name in layers]
        )

    def layer_of_ids(self) -> np.ndarray:
        """``int32[neurons]``: the position of each neuron's layer in ``layer_names``."""
        return np.repeat(np.arange(len(self.layer_sizes)), self.layer_sizes).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
    """A model seen through its neurons: ``probe(params, x) -> (logits, activations)``.

    Build one with :func:`model_probe`, :func:`linen_probe`, :func:`nnx_probe`
    or :func:`function_probe`; it holds no parameters. It is hashable, so it
    can be a static argument of ``jax.jit``: two probes are equal when they
    compute the same thing (the same linen module, NNX graph definition, or
    ``fn`` and ``gated_fn`` objects, input shape, layers and options), so steps
    compiled for one serve both. One made without a ``key`` equals only itself.

    Attributes:
      fn: ``(params, x[batch, *input_shape]) -> (logits[batch, classes],
        {layer: float32[batch, units]})``, pure and jit-able.
      index: the :class:`NeuronIndex` of the probed neurons.
      input_shape: the shape of one input.
      num_classes: the number of logits.
      conv_reduce: how conv activations were reduced.
      values: which neuron values: ``"pre"`` or ``"post"`` (activation).
      gated: ``(params, x, gates) -> (logits, activations)`` with each probed
        layer's output multiplied by ``gates[layer]`` (``float32[batch or 1,
        units]``); the activations are the values before the gate. None when
        the model cannot be gated (sown values).
      key: hashable, what determines ``fn`` and ``gated`` (probes compare and hash by
        it), or None (by identity); set it to None when replacing ``fn`` or ``gated``.
    """

    fn: Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    index: NeuronIndex
    input_shape: tuple[int, ...]
    num_classes: int
    conv_reduce: str = "mean"
    values: str = "pre"
    gated: Callable[..., tuple[jax.Array, dict[str, jax.Array]]] | None = None
    key: Hashable | None = dataclasses.field(default=None, repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Probe):
            return NotImplemented
        return self is other or (self.key is not None and self.key == other.key)

    def __hash__(self) -> int:
        return object.__hash__(self) if self.key is None else hash(self.key)

    def require_gates(self, what: str) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
        """``gated``, or a ValueError saying that ``what`` needs a gateable probe."""
        if self.gated is None:
            raise InputError(
                f"{what} needs a probe that can gate its layers (linen Dense/Conv captures, NNX "
                "layers, or function_probe(..., gated_fn=...)); got one without gates "
                "(sown values)"
            )
        return self.gated

    def ones(self, batch: int = 1) -> dict[str, jax.Array]:
        """Gates of 1 for every probed neuron (``float32[batch, units]`` per layer): the plain model."""
        return {
            name: jnp.ones((batch, size), jnp.float32)
            for name, size in zip(self.index.layer_names, self.index.layer_sizes, strict=True)
        }

    def __call__(self, params: Any, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits and the per-layer activations of a batch ``x``."""
        return self.fn(params, x)

    def flat(self, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Logits ``[batch, classes]`` and all neurons ``float32[batch, neurons]`` in id order."""
        logits, acts = self.fn(params, x)
        return logits, jnp.concatenate([acts[name] for name in self.index.layer_names], axis=-1)


# --------------------------------------------------------------------------- shared pieces


def _check_options(conv_reduce: str, values: str, activation_fn, *, taps: bool = False) -> None:
    """Raises InputError for an unknown ``conv_reduce`` or ``values``, or ``values="post"``
    without ``activation_fn`` (which ``taps``, post values marked by the model, need not)."""
    if conv_reduce not in CONV_REDUCTIONS:
        raise InputError(
            f"conv_reduce must be one of {', '.join(CONV_REDUCTIONS)}; got {conv_reduce!r}"
        )
    if values not in VALUES:
        raise InputError(f"values must be 'pre' or 'post'; got {values!r}")
    if values == "post" and activation_fn is None and not taps:
        raise InputError(
            "values='post' needs activation_fn, the model's elementwise activation "
            "(zoo models supply it; or sow post-activation values and use sown=True)"
        )


def _reduce(value: jax.Array, conv_reduce: str) -> jax.Array:
    """``[batch, ..., channels]`` -> ``[batch, units]``."""
    value = jnp.asarray(value)
    if value.ndim < 2:
        raise InputError(f"an activation must have a batch axis and units; got shape {value.shape}")
    if value.ndim == 2:
        return value
    if conv_reduce == "none":
        return value.reshape(value.shape[0], -1)
    axes = tuple(range(1, value.ndim - 1))
    return jnp.mean(value, axis=axes) if conv_reduce == "mean" else jnp.max(value, axis=axes)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _select(available: Sequence[str], layers: LayerSelection, default: Sequence[str]) -> list[str]:
    if layers is None:
        chosen = list(default)
    elif callable(layers):
        chosen = [name for name in available if layers(name)]
    else:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [name for name in layers if name not in available]
        if unknown:
            raise InputError(
                f"unknown layer {unknown[0]!r}; expected one of {', '.join(available)}"
            )
        chosen = [name for name in available if name in set(layers)]
    if not chosen:
        raise InputError(f"no layer selected; expected at least one of {', '.join(available)}")
    return chosen


def _gate_for(gate: jax.Array, value: jax.Array, conv_reduce: str) -> jax.Array:
    """A gate ``[batch or 1, units]`` shaped to broadcast against a layer output ``value``."""
    gate = jnp.asarray(gate, value.dtype)
    if value.ndim <= 2:
        return gate
    if conv_reduce == "none":
        return gate.reshape((gate.shape[0], *value.shape[1:]))
    return gate.reshape((gate.shape[0],) + (1,) * (value.ndim - 2) + (value.shape[-1],))


def _neurons(chosen: tuple[str, ...], conv_reduce: str, activation_fn) -> Callable:
    """``raw -> {layer: float32[batch, units]}``: the chosen layers' values, through
    ``activation_fn`` (None: as they are) and reduced."""

    def neurons(raw):
        acts = {}
        for name in chosen:
            value = raw[name] if activation_fn is None else activation_fn(raw[name])
            acts[name] = _reduce(value, conv_reduce).astype(jnp.float32)
        return acts

    return neurons


def _gated_fn(raw_gated: Callable, index: NeuronIndex, conv_reduce: str, neurons) -> Callable:
    """``(params, x, gates) -> (logits, activations)`` from ``raw_gated`` (see :func:`_finish`)."""
    chosen = index.layer_names
    sizes = dict(zip(chosen, index.layer_sizes, strict=True))

    def gated(params, x, gates):
        unknown = sorted(set(gates) - set(chosen))
        if unknown:
            raise InputError(f"gates must name probed layers ({', '.join(chosen)}); got {unknown}")
        for name, gate in gates.items():
            if jnp.ndim(gate) != 2 or jnp.shape(gate)[-1] != sizes[name]:
                raise InputError(
                    f"gate of {name!r} must have shape [batch or 1, {sizes[name]}]; "
                    f"got {list(jnp.shape(gate))}"
                )
        seen: dict[str, jax.Array] = {}

        def edit(name, value):
            if name not in sizes:
                return value
            if name in seen:
                raise InputError(f"cannot gate layer {name!r}: the model calls it twice")
            seen[name] = value
            if name not in gates:
                return value
            return value * _gate_for(gates[name], value, conv_reduce)

        logits = raw_gated(params, x, edit)
        missing = [name for name in chosen if name not in seen]
        if missing:
            raise InputError(f"cannot gate layers {missing}: the model did not call them")
        return logits, neurons(seen)

    return gated


def _finish(
    raw_fn,
    params,
    input_shape,
    layers,
    default,
    conv_reduce,
    values,
    activation_fn,
    raw_gated,
    key,
    *,
    call_order: bool = False,
) -> Probe:
    """Selects layers, applies activation and reduction, and resolves the layout.

    ``raw_fn(params, x) -> (logits, {name: value})`` runs the model; ``default(names)``
    chooses the layers when ``layers`` is None; ``raw_gated(params, x, edit) -> logits`` (or
    None) runs it calling ``edit(name, value)`` on each layer's output and using what it
    returns (the gates). ``key`` names what determines both; with the shape, the layers and
    the options it becomes the probe's key. ``params`` give shapes: no function kept uses them.
    The layers are ordered by name (as ``jax.eval_shape`` returns a dict), or with
    ``call_order`` in the order of ``raw_fn``'s mapping (``conv_2`` before ``conv_10``).
    """
    input_shape = tuple(int(d) for d in input_shape)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    order: list[str] = []

    def shapes(params, x):
        logits, raw = raw_fn(params, x)
        order[:] = list(raw)  # eval_shape hands the dict back sorted by key
        return logits, raw

    logits_shape, raw_shapes = jax.eval_shape(shapes, params, x)
    available = order if call_order else list(raw_shapes)
    if not available:
        raise InputError("the model exposes no layer to probe; got none")
    chosen = tuple(_select(available, layers, default(available)))
    activation = activation_fn if values == "post" else None
    neurons = _neurons(chosen, conv_reduce, activation)

    def fn(params, x):
        logits, raw = raw_fn(params, x)
        return logits, neurons(raw)

    _, shapes = jax.eval_shape(fn, params, x)
    index = NeuronIndex(chosen, tuple(int(shapes[n].shape[-1]) for n in chosen))
    if len(logits_shape.shape) != 2:
        raise InputError(f"logits must have shape [batch, classes]; got {logits_shape.shape}")
    gated = None if raw_gated is None else _gated_fn(raw_gated, index, conv_reduce, neurons)
    full_key = (key, input_shape, chosen, conv_reduce, values, activation)
    try:
        hash(full_key)
    except TypeError:  # an unhashable piece (a callable object): compared by identity
        full_key = None
    classes = int(logits_shape.shape[-1])
    return Probe(fn, index, input_shape, classes, conv_reduce, values, gated, full_key)


# --------------------------------------------------------------------------- constructors


def linen_probe(
    module: nn.Module,
    params: Any,
    *,
    input_shape: Sequence[int],
    layers: LayerSelection = None,
    sown: bool = False,
    conv_reduce: str = "mean",
    values: str = "pre",
    activation_fn: Callable[[jax.Array], jax.Array] | None = None,
    fast_conv: bool | None = None,
    fast_dense: bool | None = None,
    variables: bool = False,
) -> Probe:
    """Probes a Flax linen module through ``capture_intermediates`` (or its sown values).

    A module that passes values through :class:`~deepfault_jax.linen_layers.NeuronValue`
    taps is probed through them (unless ``sown``): each module holding taps is a
    layer, named by its path, in call order, whose value for ``values`` is what
    passes through its tap of that name (``"pre"`` or ``"post"``); gates
    multiply that value, and ``activation_fn`` is not applied.

    Args:
      module: the linen module; called as ``module.apply({"params": params}, x)``
        (``module.apply(params, x)`` with ``variables``).
      params: its ``params`` collection (concrete or abstract; used for shapes),
        or with ``variables`` its whole variables dict.
      input_shape: shape of one input.
      layers: layer names, a predicate on names, or None for every Dense/Conv
        but the last one called (the output layer), or every tapped layer. Names
        are module paths joined with ``/`` (``"dense_0"``, ``"block/conv_1"``).
      sown: probe the values the module ``sow``s into ``intermediates``
        instead of Dense/Conv outputs (then the default is every sown value).
      conv_reduce: ``"mean"``, ``"max"`` or ``"none"``.
      values: ``"pre"`` (the layer's output) or ``"post"`` (after ``activation_fn``);
        with taps, the taps of that name.
      activation_fn: elementwise activation applied for ``"post"`` (not needed with taps).
      fast_conv: compute stride-1 ``SAME`` convolutions of a single input
        channel (a grey image's first layer) as k*k shifted multiply-adds, which
        XLA's CPU backend runs several times faster than its convolution; the
        values agree to float rounding (the tests check that spectra are equal).
      fast_dense: compute ``nn.Dense`` layers wider than 24 whose width is not a multiple of
        32 with the kernel zero-padded to the next multiple and the result
        sliced back (the same sums; ~20% faster for a 784-50-50-50 MLP on
        XLA's CPU backend; the tests check the values are bit-identical).
        Both default to None: on where they were measured faster, XLA's CPU
        backend (:func:`deepfault_jax.cpu_layers.measured_faster`), off elsewhere.
      variables: ``params`` is the module's whole variables dict (``{"params": ...,
        "batch_stats": ...}``, the zoo ResNets' parameters), applied as it is: the
        module must run in inference mode when called as ``module.apply(variables, x)``
        (the zoo's ResNets do: BatchNorm uses its running averages).

    Returns:
      A :class:`Probe`. ``fn`` takes the same ``params``. Probes of equal
      modules (linen modules compare by their fields) with the same options are equal.
    """
    _check_options(conv_reduce, values, activation_fn, taps=True)
    sown, variables = bool(sown), bool(variables)
    example = jax.ShapeDtypeStruct((1, *(int(d) for d in input_shape)), jnp.float32)
    taps = not sown and calls_neuron_values(module, params, example, variables=variables)
    _check_options(conv_reduce, values, activation_fn, taps=taps)
    fast_conv = measured_faster() if fast_conv is None else bool(fast_conv)
    fast_dense = measured_faster() if fast_dense is None else bool(fast_dense)
    tap = values if taps else None
    raw_fn = linen_capture(module, sown, fast_conv, fast_dense, variables=variables, tap=tap)
    raw_gated = (
        None if sown else linen_gated(module, fast_conv, fast_dense, variables=variables, tap=tap)
    )
    default = (lambda a: a) if sown or taps else (lambda a: a[:-1])
    key = ("linen", module, sown, fast_conv, fast_dense, variables, tap)
    return _finish(raw_fn, params, input_shape, layers, default, conv_reduce, values,
                   None if taps else activation_fn, raw_gated, key,
                   call_order=taps)  # fmt: skip


def _nnx_capture(graphdef: Any, layer_paths: frozenset[str]) -> Callable:
    """``(state, x) -> (logits, {name: value})``: the output of each layer in ``layer_paths``,
    ordered by name (numbers compared as numbers)."""

    def capture(state, x):
        model = nnx.merge(graphdef, state)
        logits, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        found = {}
        for path, var in nnx.to_flat_state(inter):
            if path[-1] != "__call__":
                continue
            name = "/".join(map(str, path[:-1]))
            if name in layer_paths:
                value = var.get_value()
                found[name] = value[0] if isinstance(value, tuple) else value
        return logits, dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))

    return capture


def _nnx_outputs(capture: Callable, state: Any, input_shape: Sequence[int]) -> set[str]:
    """The layers whose output is the model's output (on a fixed input): the output layer."""
    shape = (1, *(int(d) for d in input_shape))
    probe_x = jnp.linspace(0.0, 1.0, math.prod(shape), dtype=jnp.float32).reshape(shape)
    logits, found = capture(state, probe_x)
    return {
        name
        for name, v in found.items()
        if v.shape == logits.shape and bool(jnp.array_equal(v, logits))
    }


def _nnx_gated(graphdef: Any, layer_paths: frozenset[str]) -> Callable:
    """``(state, x, edit) -> logits`` with each layer in ``layer_paths`` passed through ``edit``."""

    def raw_gated(state, x, edit):
        model = nnx.merge(graphdef, state)
        for name in sorted(layer_paths, key=_natural_key):
            *parents, last = name.split("/")
            owner = model
            for part in parents:
                owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
            layer = owner[int(last)] if last.isdigit() else getattr(owner, last)
            wrapped = functools.partial(_edited_call, edit, name, layer)
            if last.isdigit():
                owner[int(last)] = wrapped
            else:
                # a plain attribute write: this model copy lives only inside this call
                object.__setattr__(owner, last, wrapped)
        return model(x)

    return raw_gated


def _edited_call(edit, name: str, layer, *args, **kwargs):
    """Calls an NNX layer and passes its output through ``edit(name, value)``."""
    return edit(name, layer(*args, **kwargs))


def nnx_probe(
    graphdef: Any,
    state: Any,
    *,
    input_shape: Sequence[int],
    layers: LayerSelection = None,
    conv_reduce: str = "mean",
    values: str = "pre",
    activation_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Probe:
    """Probes a Flax NNX module through ``nnx.capture`` of its layers' outputs.

    Args:
      graphdef: the module's graph definition (``nnx.split(model)[0]``).
      state: its state (``nnx.split(model)[1]``); the probe's ``params``.
      input_shape: shape of one input.
      layers: layer names, a predicate, or None for every ``nnx.Linear`` /
        ``nnx.LinearGeneral`` / ``nnx.Conv`` but the output layer (the one whose
        output is the model's output). Names are attribute paths joined with
        ``/``; layers are ordered by name, numbers compared as numbers.
      conv_reduce, values, activation_fn: as in :func:`linen_probe`.

    Returns:
      A :class:`Probe` whose ``fn`` takes the NNX state as ``params``. It
      keeps the graph definition, never the state; probes of equal graph
      definitions with the same options are equal.
    """
    _check_options(conv_reduce, values, activation_fn)
    layer_paths = frozenset(
        "/".join(map(str, path))
        for path, mod in nnx.iter_modules(nnx.merge(graphdef, state))
        if isinstance(mod, _NNX_LAYERS)
    )
    capture = _nnx_capture(graphdef, layer_paths)
    outputs = _nnx_outputs(capture, state, input_shape)
    default = lambda available: [n for n in available if n not in outputs]  # noqa: E731
    return _finish(capture, state, input_shape, layers, default, conv_reduce, values,
                   activation_fn, _nnx_gated(graphdef, layer_paths), ("nnx", graphdef))  # fmt: skip


def function_probe(
    fn: Callable[[Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]],
    params: Any,
    *,
    input_shape: Sequence[int],
    layers: LayerSelection = None,
    conv_reduce: str = "mean",
    values: str = "pre",
    activation_fn: Callable[[jax.Array], jax.Array] | None = None,
    gated_fn: Callable[..., jax.Array] | None = None,
) -> Probe:
    """Probes any function ``fn(params, x) -> (logits, {name: activation})``.

    Every named activation is a layer (in the mapping's order); use this for
    Equinox, Haiku or hand-written models.

    Args:
      fn: pure and jit-able; activations are ``[batch, units]`` or
        ``[batch, ..., channels]``.
      params: its parameters (concrete or abstract; used for shapes).
      input_shape, layers, conv_reduce, values, activation_fn: as in
        :func:`linen_probe` (the default selects every named activation).
      gated_fn: optional ``(params, x, edit) -> logits``: the same model, with
        each named activation ``value`` replaced by ``edit(name, value)``
        before later layers use it. It gives the probe gates (attribution
        statistics, exact ablation). Probes of the same ``fn`` and ``gated_fn``
        objects and options are equal (``fn`` should not read globals that change).
    """
    _check_options(conv_reduce, values, activation_fn)

    def raw_fn(params, x):
        logits, acts = fn(params, x)
        return logits, dict(acts)

    return _finish(raw_fn, params, input_shape, layers, lambda a: a, conv_reduce, values,
                   activation_fn, gated_fn, ("function", fn, gated_fn))  # fmt: skip


def model_probe(
    model: Any,
    params: Any,
    *,
    layers: LayerSelection = None,
    conv_reduce: str = "mean",
    values: str = "pre",
    fast_conv: bool | None = None,
    fast_dense: bool | None = None,
) -> Probe:
    """Probes a zoo :class:`~deepfault_jax.zoo.Model` (linen or NNX).

    The model's own activation function serves ``values="post"``; the
    default layers are every hidden Dense/Conv (``conv_i``, ``dense_i``);
    ``fast_conv`` and ``fast_dense`` are :func:`linen_probe`'s (linen models only).

    A ResNet (``resnet20``, ``resnet18``) is probed through its taps: every conv+BN
    layer ``conv_i`` in call order, its channels the neurons; ``values="pre"`` is the
    BatchNorm output (inference mode: the running averages), ``"post"`` the output
    after the activation (after the residual add and the activation in a block's
    second layer); gates multiply that value. ``params`` are its variables
    ``{"params": ..., "batch_stats": ...}``.
    """
    from deepfault_jax.zoo import ACTIVATIONS

    act = ACTIVATIONS[model.activation]
    if model.is_nnx:
        return nnx_probe(model.module, params, input_shape=model.input_shape, layers=layers,
                         conv_reduce=conv_reduce, values=values, activation_fn=act)  # fmt: skip
    return linen_probe(model.module, params, input_shape=model.input_shape, layers=layers,
                       conv_reduce=conv_reduce, values=values, activation_fn=act,
                       fast_conv=fast_conv, fast_dense=fast_dense,
                       variables=model.has_batch_stats)  # fmt: skip
