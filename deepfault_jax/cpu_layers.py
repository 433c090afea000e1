"""CPU-specific rewrites of Flax linen layers, applied by the linen probe as interceptors.

Each rewrite computes the same values as the plain layer (bit-identical on the
tested models) in a form that XLA's CPU backend runs faster, measured in
``benchmarks/RESULTS.md``:

* a stride-1 ``SAME`` ``nn.Conv`` with one input channel as shifted
  multiply-adds, with a custom VJP (LeNet-5 spectrum ~28k -> ~54k samples/s);
* an ``nn.Dense`` whose width is not a multiple of 32 with its kernel
  zero-padded to the next multiple and the output sliced back.

:func:`fast_layers` switches them on for the duration of a ``with`` block;
:func:`measured_faster` says where they are on by default (the CPU backend).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["fast_layers", "measured_faster", "pads_dense", "padded_dense", "single_channel_conv"]


def measured_faster() -> bool:
    """Whether the rewrites (and unrolled synthesis steps) are on by default: only on
    XLA's CPU backend, the one they were measured faster on; elsewhere the plain layers
    run unless a caller asks for the rewrites."""
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def fast_layers(conv: bool, dense: bool):
    """The probe's rewrites of Flax layers, as linen interceptors (none when both are off)."""
    chosen = [f for f, on in ((_single_channel_conv, conv), (_padded_dense, dense)) if on]
    with contextlib.ExitStack() as stack:
        for interceptor in chosen:
            stack.enter_context(nn.intercept_methods(interceptor))
        yield


_DENSE_MULTIPLE = 32


def _padded_dense(next_fun, args, kwargs, context):
    """A linen interceptor: ``nn.Dense`` of a width that is not a multiple of 32, computed
    with the kernel zero-padded to the next multiple and the output sliced back."""
    mod = context.module
    if context.method_name != "__call__" or type(mod) is not nn.Dense or kwargs or len(args) != 1:
        return next_fun(*args, **kwargs)
    x = args[0]
    plain = (
        mod.use_bias
        and mod.precision is None
        and mod.dot_general is None
        and mod.dot_general_cls is None
        and mod.dtype in (None, jnp.float32)
        and not mod.is_initializing()
        and pads_dense(mod.features)
    )
    if not plain or getattr(x, "ndim", 0) != 2 or x.dtype != jnp.float32:
        return next_fun(*args, **kwargs)
    kernel = mod.get_variable("params", "kernel")
    bias = mod.get_variable("params", "bias")
    if kernel is None or bias is None or kernel.dtype != jnp.float32:
        return next_fun(*args, **kwargs)
    return padded_dense(x, kernel, bias)


def pads_dense(features: int) -> bool:
    """Whether a Dense layer of ``features`` outputs is computed padded (:func:`padded_dense`):
    a width above 24 that is not a multiple of 32 (narrower layers gained ~2% and were not
    bit-identical)."""
    return features > 24 and features % _DENSE_MULTIPLE != 0


def padded_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` with the kernel zero-padded to a width that is a multiple of 32
    and the output sliced back: the same values, faster on XLA's CPU backend."""
    features = kernel.shape[-1]
    width = -(-features // _DENSE_MULTIPLE) * _DENSE_MULTIPLE
    padded = jnp.pad(kernel, ((0, 0), (0, width - features)))
    return (x @ padded)[:, :features] + bias


def _single_channel_conv(next_fun, args, kwargs, context):
    """A linen interceptor: a stride-1 SAME ``nn.Conv`` of one input channel as shifted
    multiply-adds (the same sum, in another order); any other call passes through."""
    mod = context.module
    if context.method_name != "__call__" or type(mod) is not nn.Conv or kwargs or len(args) != 1:
        return next_fun(*args, **kwargs)
    x = args[0]
    plain = (
        mod.padding == "SAME"
        and mod.strides in (None, 1, (1, 1))
        and mod.input_dilation in (None, 1, (1, 1))
        and mod.kernel_dilation in (None, 1, (1, 1))
        and mod.feature_group_count == 1
        and mod.use_bias
        and mod.mask is None
        and not mod.is_initializing()
    )
    if not plain or getattr(x, "ndim", 0) != 4 or x.shape[-1] != 1 or len(mod.kernel_size) != 2:
        return next_fun(*args, **kwargs)
    kernel = mod.get_variable("params", "kernel")
    bias = mod.get_variable("params", "bias")
    if kernel is None or bias is None:
        return next_fun(*args, **kwargs)
    return single_channel_conv(x, kernel, bias)


def single_channel_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A stride-1 ``SAME`` convolution of ``x[b, h, w, 1]`` with ``kernel[kh, kw, 1, c]``
    plus ``bias[c]``, as shifted multiply-adds: ``[b, h, w, c]``, the plain convolution's
    values in the form XLA's CPU backend runs faster (also for Keras's ``Conv2D``)."""
    return _single_channel_conv_same(x[..., 0], kernel[:, :, 0, :], bias)


@jax.custom_vjp
def _single_channel_conv_same(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``SAME`` stride-1 convolution of ``x[b, h, w]`` with ``kernel[kh, kw, c]``, plus ``bias[c]``."""
    kh, kw, _ = kernel.shape
    h, w = x.shape[1], x.shape[2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left)))
    # accumulated channel-major, then moved to NHWC: summed the same way as the
    # NHWC form (bit-identical), but XLA's CPU layouts then keep the pooling
    # that follows fast (the NHWC form made a following 2x2 max pool ~15x slower
    # whenever the conv output had no other consumer)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, None, i : i + h, j : j + w] * kernel[i, j, :, None, None]
            out = term if out is None else out + term
    return jnp.transpose(out, (0, 2, 3, 1)) + bias


def _single_channel_conv_fwd(x, kernel, bias):
    return _single_channel_conv_same(x, kernel, bias), (x, kernel)


def _single_channel_conv_bwd(residuals, dy):
    """Gradients by one matmul per operand and slices (no per-tap pads of the output)."""
    x, kernel = residuals
    kh, kw, c = kernel.shape
    h, w = x.shape[1], x.shape[2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    taps = kernel.reshape(kh * kw, c)
    # d out / d x: each tap's share of dy, shifted back by the tap's offset
    per_tap = jnp.einsum("bhwc,tc->bhwt", dy, taps)
    padded = jnp.pad(per_tap, ((0, 0), (kh - 1 - top, top), (kw - 1 - left, left), (0, 0)))
    dx = None
    for i in range(kh):
        for j in range(kw):
            part = padded[:, kh - 1 - i : kh - 1 - i + h, kw - 1 - j : kw - 1 - j + w, i * kw + j]
            dx = part if dx is None else dx + part
    # d out / d kernel: the input patches against dy
    xp = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left)))
    patches = jnp.stack(
        [xp[:, i : i + h, j : j + w] for i in range(kh) for j in range(kw)], axis=-1
    )
    dkernel = jnp.einsum("bhwt,bhwc->tc", patches, dy).reshape(kh, kw, c)
    return dx, dkernel, jnp.sum(dy, axis=(0, 1, 2))


_single_channel_conv_same.defvjp(_single_channel_conv_fwd, _single_channel_conv_bwd)
