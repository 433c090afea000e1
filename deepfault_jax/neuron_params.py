"""Each neuron's own parameters: where they lie in a parameter tree, and per-neuron reductions.

A probed neuron (a Dense unit or a conv channel) owns three pieces of the
parameters: its *incoming* weights (the unit's column of its layer's kernel,
``kernel[..., unit]``), its *bias* (``bias[unit]``), and its *outgoing*
weights (the weights of the next layer that read it: ``kernel[unit, :]`` of a
Dense consumer, ``kernel[:, :, unit, :]`` of a conv consumer, and the rows
``unit, unit + C, unit + 2C, ...`` of a Dense layer reading a flattened map of
``C`` channels in height-width-channel order).

The layout is read from the parameter tree itself, for models whose
parameters are laid out by layer the way the zoo's are (linen dicts or NNX
states): a ``kernel`` and a ``bias`` per layer, the layers called in the order
``conv_*``, ``dense_*``, then the output layer, each reading the previous
one's output (through activations, pooling and a flatten). Models laid out
otherwise are refused with a message; the localizers that need no parameters
(count and attribution measures, ablations) serve them.

Models with BatchNorm (the zoo's ``resnet20`` and ``resnet18``, whose parameters
are the variables ``{"params": ..., "batch_stats": ...}``) are refused too: a
conv+BN neuron's parameters (a kernel slice and a BatchNorm scale and bias) and
its readers (the next layer and, through the shortcuts, later blocks) are not
mapped yet, so repair, fault planting and the gradient localizers do not serve
them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepfault_jax.errors import InputError
from deepfault_jax.probe import Probe

__all__ = [
    "LayerParams",
    "NeuronLayout",
    "layer_order",
    "neuron_layout",
    "pure_params",
    "rebuild_params",
]


def layer_order(name: str):
    """Sort key of zoo layer names: conv_*, then dense_*, then the rest (the output), each
    in natural order."""
    kind = 0 if name.startswith("conv") else 1 if name.startswith("dense") else 2
    return kind, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _has_batch_stats(params: Any) -> bool:
    """Whether ``params`` are the linen variables of a model with BatchNorm."""
    return isinstance(params, Mapping) and "params" in params and "batch_stats" in params


def _refuse_batch_norm(params: Any, what: str) -> None:
    """Raises InputError naming ``what`` for the variables of a model with BatchNorm."""
    if _has_batch_stats(params):
        raise InputError(
            f"{what} needs parameters laid out by layer as the zoo's MLPs, LeNets and "
            "cifar-convnet have; got the variables of a model with BatchNorm ('params' and "
            "'batch_stats', as resnet20 and resnet18 have), whose neurons are not mapped to "
            f"their parameters: {what} works on models without BatchNorm, while the "
            "localizers that read no parameters (count measures such as ochiai, attribution, "
            "ablation) work on any model"
        )


def pure_params(params: Any, *, what: str = "this") -> dict:
    """``params`` as a plain ``{layer: {"kernel": array, "bias": array}}`` dict (an NNX state
    becomes its pure dict; a linen dict is returned as a dict).

    Raises:
      InputError: ``params`` are not a dict or an NNX state, or they are the variables of a
        model with BatchNorm (``{"params", "batch_stats"}``: ``resnet20``, ``resnet18``),
        which no per-layer view serves; ``what`` names who needs them.
    """
    _refuse_batch_norm(params, what)
    if isinstance(params, nnx.State):
        return dict(nnx.to_pure_dict(params))
    if not isinstance(params, dict):
        raise InputError(
            f"parameters must be a dict of layers or an NNX state; got {type(params).__name__}"
        )
    return dict(params)


def rebuild_params(params: Any, tree: dict) -> Any:
    """``tree`` (a pure dict, as :func:`pure_params` gives) in the form of ``params``: an NNX
    state is filled with it; a linen dict is ``tree`` itself."""
    if isinstance(params, nnx.State):
        state = jax.tree.map(lambda a: a, params)
        nnx.replace_by_pure_dict(state, tree)
        return state
    return tree


@dataclasses.dataclass(frozen=True)
class LayerParams:
    """Where the neurons of one probed layer keep their parameters.

    Attributes:
      name: the layer (its key in the parameter tree).
      units: its units or channels.
      consumer: the layer that reads it.
      outgoing: ``"dense"`` (``kernel[unit, :]``), ``"conv"`` (``kernel[..., unit, :]``)
        or ``"flatten"`` (rows ``unit::units`` of a Dense kernel).
    """

    name: str
    units: int
    consumer: str
    outgoing: str


@dataclasses.dataclass(frozen=True)
class NeuronLayout:
    """The probed layers' :class:`LayerParams`, in neuron-id order."""

    layers: tuple[LayerParams, ...]

    @property
    def num_neurons(self) -> int:
        return sum(layer.units for layer in self.layers)

    def per_neuron(self, tree: dict, reduce=jnp.sum) -> jax.Array:
        """``float32[neurons]``: ``reduce`` over each neuron's incoming weights, bias and
        outgoing weights in ``tree`` (a pure dict shaped like the parameters, e.g. their
        gradient), with ``reduce(array, axis)``."""
        parts = [self.pieces(tree, layer) for layer in self.layers]
        return jnp.concatenate(
            [reduce(jnp.concatenate(p, axis=-1), axis=-1) for p in parts]
        ).astype(jnp.float32)

    def sizes(self, tree: dict) -> jax.Array:
        """How many parameters each neuron owns (``float32[neurons]``)."""
        return self.per_neuron(jax.tree.map(jnp.ones_like, tree), jnp.sum)

    @staticmethod
    def pieces(tree: dict, layer: LayerParams) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(incoming [units, fan_in], bias [units, 1], outgoing [units, fan_out])`` of one
        layer's neurons in ``tree``."""
        kernel = jnp.asarray(tree[layer.name]["kernel"])
        units = layer.units
        incoming = kernel.reshape(-1, units).T
        bias = jnp.asarray(tree[layer.name]["bias"]).reshape(units, 1)
        out = jnp.asarray(tree[layer.consumer]["kernel"])
        if layer.outgoing == "dense":
            outgoing = out
        elif layer.outgoing == "conv":
            outgoing = jnp.moveaxis(out, -2, 0).reshape(units, -1)
        else:  # flatten: rows unit::units
            outgoing = jnp.swapaxes(out.reshape(-1, units, out.shape[-1]), 0, 1).reshape(units, -1)
        return incoming, bias, outgoing


def neuron_layout(probe: Probe, params: Any, *, what: str = "this localizer") -> NeuronLayout:
    """The :class:`NeuronLayout` of ``probe``'s neurons in ``params``.

    Raises:
      InputError: parameters not laid out by layer as the zoo's are (``what`` names
        who needs them), the variables of a model with BatchNorm (resnet20, resnet18),
        a probed layer without a kernel and bias, or conv channels probed without a
        channel reduction.
    """
    _refuse_batch_norm(params, what)
    tree = pure_params(params)
    how = (
        f"{what} needs parameters laid out by layer as the zoo models' are (a kernel and a "
        "bias per probed layer, called in the order conv_*, dense_*, output)"
    )
    order = sorted(tree, key=layer_order)
    layers = []
    for name, units in zip(probe.index.layer_names, probe.index.layer_sizes, strict=True):
        entry = tree.get(name)
        if not isinstance(entry, dict) or "kernel" not in entry or "bias" not in entry:
            hint = ""
            if isinstance(entry, dict) and "kernel" in entry:  # Keras Dense(use_bias=False)
                hint = (" (it has a kernel but no bias; localizers that read no parameters "
                        "serve it: the count measures such as ochiai, or ablation)")  # fmt: skip
            raise InputError(f"{how}; got no kernel and bias for probed layer {name!r}{hint}")
        kernel = np.shape(entry["kernel"])
        if kernel[-1] != units or np.shape(entry["bias"]) != (units,):
            raise InputError(
                f"{how}; probed layer {name!r} has {units} neurons but a kernel of shape "
                f"{list(kernel)} (neurons must be its last axis; conv_reduce 'none' is not "
                "supported)"
            )
        at = order.index(name)
        if at + 1 >= len(order) or "kernel" not in tree[order[at + 1]]:
            raise InputError(f"{how}; got no layer after {name!r} (it must not be the output)")
        consumer = order[at + 1]
        out = np.shape(tree[consumer]["kernel"])
        if len(out) == 4:
            kind = "conv"
            ok = out[-2] == units
        elif len(kernel) == 4:
            kind = "flatten"
            ok = len(out) == 2 and out[0] % units == 0
        else:
            kind = "dense"
            ok = len(out) == 2 and out[0] == units
        if not ok:
            raise InputError(
                f"{how}; {consumer!r} (kernel {list(out)}) does not read the {units} "
                f"neurons of {name!r}"
            )
        layers.append(LayerParams(name, int(units), consumer, kind))
    return NeuronLayout(tuple(layers))
