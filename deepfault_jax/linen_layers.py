"""Flax linen modules as the linen probe runs them: layer outputs captured, or gated.

:func:`linen_capture` and :func:`linen_gated` run a linen module capturing, or
passing through an edit, the value of each probed layer (linen interceptors):
the output of each Dense/Conv layer, or, in a module that marks its neuron
values with :class:`NeuronValue` taps (the zoo's ResNets), what passes
through the taps of one side (``"pre"`` or ``"post"``). The probe's gate runs
outside the CPU rewrites of :mod:`deepfault_jax.cpu_layers`, so it sees what
they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from deepfault_jax.cpu_layers import fast_layers

__all__ = [
    "LINEN_LAYERS",
    "TAP_SIDES",
    "NeuronValue",
    "calls_neuron_values",
    "linen_capture",
    "linen_gated",
]


#: The linen layers whose outputs the probe captures and gates.
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)

#: The names a :class:`NeuronValue` tap may have: the side of the value it marks.
TAP_SIDES = ("pre", "post")


class NeuronValue(nn.Module):
    """An identity layer that marks a layer's neuron values for the linen probe.

    A layer module (e.g. the zoo's :class:`~deepfault_jax.zoo.ConvBN`) passes
    its value before the activation through ``NeuronValue(name="pre")`` and
    after it through ``NeuronValue(name="post")``; the linen probe then
    counts, for ``values="pre"`` or ``"post"``, what passes through the taps of
    that name, as the neurons of the layer module that holds them (named by
    its path, ``"conv_3"``), and its gates multiply that value.

    Example:
      >>> y = NeuronValue(name="pre")(batch_norm_output)
      >>> y = NeuronValue(name="post")(jax.nn.relu(y + shortcut))
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``, unchanged."""
        return x


def _is_tap(mdl: nn.Module, side: str) -> bool:
    return isinstance(mdl, NeuronValue) and mdl.name == side


def _linen_intermediates(tree: Mapping) -> dict[str, jax.Array]:
    """A linen ``intermediates`` collection as ``{name: value}`` (``name#j``: the j-th call)."""
    found: dict[str, jax.Array] = {}

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, (*path, key))
            elif isinstance(value, tuple):
                # a sown name or a captured method: one value per call
                base = "/".join(path) if key == "__call__" else "/".join((*path, key))
                for j, v in enumerate(value):
                    found[base if len(value) == 1 else f"{base}#{j}"] = v

    walk(tree, ())
    return found


def _variables(params: Any, variables: bool) -> Any:
    return params if variables else {"params": params}


def linen_capture(
    module: nn.Module,
    sown: bool,
    fast_conv: bool,
    fast_dense: bool,
    *,
    variables: bool = False,
    tap: str | None = None,
) -> Callable:
    """``(params, x) -> (logits, {name: value})``: every Dense/Conv output, or sown value, or
    (``tap`` ``"pre"`` or ``"post"``) every value through a :class:`NeuronValue` of that name,
    named by the path of the module that holds it. ``variables``: ``params`` is the whole
    variables dict (``{"params": ..., "batch_stats": ...}``), applied as it is."""

    def capture_filter(mdl: nn.Module, method_name: str) -> bool:
        if method_name != "__call__":
            return False
        return _is_tap(mdl, tap) if tap is not None else isinstance(mdl, LINEN_LAYERS)

    def raw_fn(params, x):
        with fast_layers(fast_conv, fast_dense):
            logits, state = module.apply(
                _variables(params, variables),
                x,
                capture_intermediates=False if sown else capture_filter,
                mutable=["intermediates"],
            )
        found = _linen_intermediates(state.get("intermediates", {}))
        if tap is not None:
            found = {name.rpartition("/")[0]: value for name, value in found.items()}
        return logits, found

    return raw_fn


def linen_gated(
    module: nn.Module,
    fast_conv: bool,
    fast_dense: bool,
    *,
    variables: bool = False,
    tap: str | None = None,
) -> Callable:
    """``(params, x, edit) -> logits`` with every Dense/Conv output (or, with ``tap``, every
    value through a :class:`NeuronValue` of that name, named by its holder's path) passed
    through ``edit``; ``variables`` as in :func:`linen_capture`."""

    def raw_gated(params, x, edit):
        def gate(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__":
                return out
            mdl = context.module
            if tap is not None and _is_tap(mdl, tap):
                out = edit("/".join(mdl.path[:-1]), out)
            elif tap is None and isinstance(mdl, LINEN_LAYERS):
                out = edit("/".join(mdl.path), out)
            return out

        # the gate runs outermost, so it sees what the fast rewrites return
        with nn.intercept_methods(gate), fast_layers(fast_conv, fast_dense):
            return module.apply(_variables(params, variables), x)

    return raw_gated


def calls_neuron_values(
    module: nn.Module, params: Any, x: jax.ShapeDtypeStruct, *, variables: bool = False
) -> bool:
    """Whether ``module`` passes any value through a :class:`NeuronValue` tap (traced
    abstractly, on inputs shaped like ``x``)."""

    def taps(params, x):
        _, state = module.apply(
            _variables(params, variables),
            x,
            capture_intermediates=lambda mdl, method: isinstance(mdl, NeuronValue),
            mutable=["intermediates"],
        )
        return _linen_intermediates(state.get("intermediates", {}))

    return bool(jax.eval_shape(taps, params, x))
