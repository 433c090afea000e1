"""Localizers from each neuron's own parameters: gradient statistics and the per-neuron refit.

With ``l_i(theta)`` the cross-entropy of input ``i`` (of ``n``) and
``g_i = d l_i / d theta`` its gradient, restricted to the parameters neuron
``k`` owns (its incoming weights, bias and outgoing weights, ``P_k`` of them;
:mod:`deepfault_jax.neuron_params`):

* ``grad_norm``: ``|| (1/n) sum_i g_i ||_2``, the norm of the mean gradient.
  Large for neurons whose parameters the loss would move; large also for
  healthy neurons with large weights or activations.
* ``grad_snr``: ``(1/P_k) sum_p (sum_i g_ip)^2 / (n sum_i g_ip^2)``: per
  parameter, the squared mean gradient over the mean squared gradient (in
  [0, 1]: 1 when every input pushes the parameter the same way, about ``1/n``
  when the per-input gradients are noise around zero, as they are near the
  optimum training reached), averaged over the neuron's parameters. A
  diagonal empirical-Fisher Newton step on the neuron's parameters is
  predicted to lower the loss by ``(n/2) * P_k * grad_snr``: the score asks
  "would the inputs agree on fixing this neuron?", whatever the fault did
  to it. The units ``i`` may be single inputs or groups of inputs (their
  summed gradients, :func:`gradient_stats` ``groups=``): the same question at
  a coarser resolution, at the cost of one batched backward pass per group.
* ``refit``: the held-out loss drop reached by re-fitting only the neuron's
  parameters: ``steps`` Adam steps on the mean loss of one half of the inputs
  (even positions), each parameter moving in units of the RMS of its piece
  (incoming, bias, outgoing), scored as the loss before minus after on the
  other half (odd positions). Every layer's neurons are refit side by side
  (``vmap``); the cost is ``steps`` forward and backward passes of half the
  inputs per neuron.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfault_jax.errors import InputError, check_finite, check_int
from deepfault_jax.neuron_params import NeuronLayout, neuron_layout, pure_params, rebuild_params
from deepfault_jax.probe import Probe

__all__ = ["GradientStats", "gradient_stats", "mean_gradient_norms", "refit_scores"]


class GradientStats:
    """Sums over the inputs of the per-input loss gradient and of its square, per parameter.

    Attributes:
      first: pure dict of ``sum_i g_i`` (float64 numpy arrays).
      second: pure dict of ``sum_i g_i ** 2``.
      n: inputs.
      layout: the probed neurons' :class:`~deepfault_jax.neuron_params.NeuronLayout`.
    """

    def __init__(self, first: dict, second: dict, n: int, layout: NeuronLayout):
        self.first, self.second, self.n, self.layout = first, second, n, layout

    def grad_snr(self) -> np.ndarray:
        """Mean over each neuron's parameters of ``(sum_i g_i)^2 / (n sum_i g_i^2)`` (0 where
        every input's gradient is 0)."""
        ratio = jax.tree.map(
            lambda s1, s2: jnp.asarray(
                np.where(s2 > 0, s1**2 / np.where(s2 > 0, s2 * self.n, 1.0), 0.0), jnp.float32
            ),
            self.first,
            self.second,
        )
        return np.asarray(self.layout.per_neuron(ratio, jnp.mean))


@functools.partial(jax.jit, static_argnames=("probe",))
def _grad_sums(params, tree, x, y, mask, *, probe: Probe):
    def loss(t, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(
            probe.fn(rebuild_params(params, t), xi[None])[0], yi[None]
        )[0]

    per = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(tree, x, y)
    weight = mask.astype(jnp.float32)

    def sums(g):
        w = weight.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.sum(g * w, axis=0), jnp.sum(g * g * w, axis=0)

    out = jax.tree.map(sums, per)
    first = jax.tree.map(lambda pair: pair[0], out, is_leaf=lambda v: isinstance(v, tuple))
    second = jax.tree.map(lambda pair: pair[1], out, is_leaf=lambda v: isinstance(v, tuple))
    return first, second


@functools.partial(jax.jit, static_argnames=("probe",))
def _grad_sum(params, tree, x, y, mask, *, probe: Probe):
    def loss(t):
        per = optax.softmax_cross_entropy_with_integer_labels(
            probe.fn(rebuild_params(params, t), x)[0], y
        )
        return jnp.sum(per * mask.astype(jnp.float32))

    return jax.grad(loss)(tree)


def mean_gradient_norms(
    probe: Probe, params: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """``float32[neurons]``: ``|| (1/n) sum_i g_i ||`` over each neuron's own parameters, from
    one batched backward pass (the ``grad_norm`` localizer)."""
    from deepfault_jax.data import iterate_batches

    layout = neuron_layout(probe, params, what="grad_norm")
    tree = pure_params(params)
    total = None
    for batch in iterate_batches(x, y, batch_size=batch_size):
        g = _relevant(_grad_sum(params, tree, batch.x, batch.y, batch.mask, probe=probe), layout)
        g = jax.tree.map(lambda a: np.asarray(a, np.float64), g)
        total = g if total is None else jax.tree.map(np.add, total, g)
    mean = jax.tree.map(lambda a: jnp.asarray(np.square(a / len(x)), jnp.float32), total)
    return np.sqrt(np.asarray(layout.per_neuron(mean)))


def _relevant(tree: dict, layout: NeuronLayout) -> dict:
    """The layers holding the neurons' parameters (probed layers and their consumers)."""
    names = {layer.name for layer in layout.layers} | {layer.consumer for layer in layout.layers}
    return {name: tree[name] for name in names}


def gradient_stats(
    probe: Probe,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 512,
    groups: int | None = None,
) -> GradientStats:
    """:class:`GradientStats` of the cross-entropy over ``(x, y)`` (the probed layers and
    their consumers).

    With ``groups=None`` the units are single inputs: one backward pass per input
    (vmapped in chunks). With ``groups=m`` the inputs are cut into ``m`` consecutive
    groups of equal size (the last one padded) and the units are the groups' summed
    gradients: ``m`` batched backward passes, the same statistics at the resolution of
    groups (``n`` of the result is ``m``).
    """
    from deepfault_jax.data import iterate_batches

    layout = neuron_layout(probe, params, what="a gradient localizer")
    tree = pure_params(params)
    first = second = None

    def add(f, s):
        nonlocal first, second
        f, s = (jax.tree.map(lambda a: np.asarray(a, np.float64), _relevant(t, layout)) for t in (f, s))  # fmt: skip
        first = f if first is None else jax.tree.map(np.add, first, f)
        second = s if second is None else jax.tree.map(np.add, second, s)

    if groups is not None:
        groups = check_int("groups", groups, lo=2)
        if len(x) < groups:
            raise InputError(f"groups must be at most the {len(x)} inputs; got {groups}")
        size = -(-len(x) // groups)
        count = 0
        for batch in iterate_batches(x, y, batch_size=size):
            g = _grad_sum(params, tree, batch.x, batch.y, batch.mask, probe=probe)
            add(g, jax.tree.map(jnp.square, g))
            count += 1
        return GradientStats(first, second, count, layout)
    size = sum(int(np.size(a)) for a in jax.tree.leaves(_relevant(tree, layout)))
    # per-input gradients take chunk * size floats: keep them near 2**24
    chunk = max(1, min(int(batch_size), (1 << 24) // max(size, 1)))
    for batch in iterate_batches(x, y, batch_size=chunk):
        add(*_grad_sums(params, tree, batch.x, batch.y, batch.mask, probe=probe))
    return GradientStats(first, second, len(x), layout)


@functools.partial(jax.jit, static_argnames=("probe", "layer", "steps"))
def _refit_layer(params, tree, units, xa, ya, xb, yb, lr, *, probe, layer, steps):
    """Held-out loss drops ``[len(units)]`` of refitting each unit of ``layer`` alone."""
    name, consumer, kind, count = layer

    def pieces(t, u):
        inc = t[name]["kernel"][..., u]
        bias = t[name]["bias"][u]
        out = t[consumer]["kernel"]
        if kind == "dense":
            outgoing = out[u]
        elif kind == "conv":
            outgoing = out[..., u, :]
        else:
            outgoing = out.reshape(-1, count, out.shape[-1])[:, u, :]
        return inc, bias, outgoing

    def substitute(t, u, theta):
        inc, bias, outgoing = theta
        layer_kernel = t[name]["kernel"].at[..., u].set(inc)
        layer_bias = t[name]["bias"].at[u].set(bias)
        out = t[consumer]["kernel"]
        if kind == "dense":
            out = out.at[u].set(outgoing)
        elif kind == "conv":
            out = out.at[..., u, :].set(outgoing)
        else:
            out = out.reshape(-1, count, out.shape[-1]).at[:, u, :].set(outgoing).reshape(out.shape)
        return {
            **t,
            name: {**t[name], "kernel": layer_kernel, "bias": layer_bias},
            consumer: {**t[consumer], "kernel": out},
        }

    def loss(theta, u, x, y):
        logits = probe.fn(rebuild_params(params, substitute(tree, u, theta)), x)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def one(u):
        start = pieces(tree, u)
        scale = jax.tree.map(lambda a: jnp.sqrt(jnp.mean(a * a)) + 1e-6, start)
        opt = optax.adam(lr)

        def relative_loss(delta, x, y):
            theta = jax.tree.map(lambda s, d, c: s + d * c, start, delta, scale)
            return loss(theta, u, x, y)

        def step(carry, _):
            delta, state = carry
            grad = jax.grad(relative_loss)(delta, xa, ya)
            updates, state = opt.update(grad, state)
            return (optax.apply_updates(delta, updates), state), None

        zero = jax.tree.map(jnp.zeros_like, start)
        (delta, _), _ = jax.lax.scan(step, (zero, opt.init(zero)), None, length=steps)
        return relative_loss(zero, xb, yb) - relative_loss(delta, xb, yb)

    return jax.lax.map(one, units, batch_size=8)


def refit_scores(
    probe: Probe,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 20,
    learning_rate: float = 0.05,
    inputs: int = 1024,
) -> np.ndarray:
    """``float32[neurons]``: the held-out loss drop of refitting each neuron alone (see the module
    docstring); ``inputs``: at most this many inputs, the first ones (half fit, half scored)."""
    steps = check_int("steps", steps, lo=1)
    lr = check_finite("learning_rate", learning_rate, lo=0.0, lo_open=True)
    inputs = check_int("inputs", inputs, lo=2)
    layout = neuron_layout(probe, params, what="refit")
    x, y = x[:inputs], y[:inputs]
    if len(x) < 2:
        raise InputError(
            f"refit needs at least 2 inputs (half to fit, half to score); got {len(x)}"
        )
    xa, ya, xb, yb = (jnp.asarray(a) for a in (x[0::2], y[0::2], x[1::2], y[1::2]))
    tree = jax.tree.map(jnp.asarray, pure_params(params))
    out = []
    for layer in layout.layers:
        static = (layer.name, layer.consumer, layer.outgoing, layer.units)
        drops = _refit_layer(params, tree, jnp.arange(layer.units), xa, ya, xb, yb,
                             jnp.float32(lr), probe=probe, layer=static, steps=steps)  # fmt: skip
        out.append(np.asarray(drops, np.float32))
    return np.concatenate(out)
