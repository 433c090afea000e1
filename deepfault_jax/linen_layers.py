"""Flax linen modules as the linen probe runs them: Dense/Conv outputs captured, or gated.

:func:`linen_capture` and :func:`linen_gated` run a linen module capturing, or
passing through an edit, the output of each Dense/Conv layer (linen
interceptors). The probe's gate runs outside the CPU rewrites of
:mod:`deepfault_jax.cpu_layers`, so it sees what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax

from deepfault_jax.cpu_layers import fast_layers

__all__ = ["LINEN_LAYERS", "linen_capture", "linen_gated"]


#: The linen layers whose outputs the probe captures and gates.
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


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


def linen_capture(module: nn.Module, sown: bool, fast_conv: bool, fast_dense: bool) -> Callable:
    """``(params, x) -> (logits, {name: value})``: every Dense/Conv output, or sown value."""

    def capture_filter(mdl: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and isinstance(mdl, LINEN_LAYERS)

    def raw_fn(params, x):
        with fast_layers(fast_conv, fast_dense):
            logits, state = module.apply(
                {"params": params},
                x,
                capture_intermediates=False if sown else capture_filter,
                mutable=["intermediates"],
            )
        return logits, _linen_intermediates(state.get("intermediates", {}))

    return raw_fn


def linen_gated(module: nn.Module, fast_conv: bool, fast_dense: bool) -> Callable:
    """``(params, x, edit) -> logits`` with every Dense/Conv output passed through ``edit``."""

    def raw_gated(params, x, edit):
        def gate(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, LINEN_LAYERS):
                out = edit("/".join(context.module.path), out)
            return out

        # the gate runs outermost, so it sees what the fast rewrites return
        with nn.intercept_methods(gate), fast_layers(fast_conv, fast_dense):
            return module.apply({"params": params}, x)

    return raw_gated
