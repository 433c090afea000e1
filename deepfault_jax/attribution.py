"""Attribution sums gathered beside the counts: their types and the gated VJP kernel of one batch.

With ``attribution=True`` the same jitted pass also gathers an
:class:`Attribution` (DESIGN section 7): per class and neuron, float sums over
passing and failing inputs of the neuron's value and of ``activation * d loss /
d activation`` (cross-entropy with the true label), and the linearised
ablation's predicted fixes and breaks. They come from the gradient of the
logits with respect to the probe's gates (``probe.gated``): one forward pass
and one vmapped backward pass per batch, with two cotangents per input (the
loss, and the margin between the true class and its strongest rival), or one
per class with ``attribution="all-classes"`` (the full Jacobian). The float
sums depend on the summation order, so across batch sizes, device counts and
resume points they agree within float32 rounding (relative 1e-5 of the
largest magnitude of each array in the tests), not bit for bit; the fix and
break counts are integer sums of per-input decisions and are equal whenever
each input's first-order values are (the tests check equality across batch
sizes and devices on real data).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from deepfault_jax.errors import InputError
from deepfault_jax.kernels import exact_dot, slot_weights
from deepfault_jax.probe import Probe

__all__ = [
    "ATTRIBUTION_FIELDS",
    "Attribution",
    "AttributionSums",
    "LINEARISED",
    "attribution_batch",
    "attribution_mode",
    "zero_attribution",
]


class AttributionSums(NamedTuple):
    """What an attribution measure reads: per-neuron sums (``[neurons]`` or ``[classes, neurons]``)
    and the input counts they were taken over (``[1]`` or ``[classes, 1]``, broadcastable).

    Attributes:
      act_pass: sum of the neuron's value over passing inputs.
      act_fail: sum of the neuron's value over failing inputs.
      gxa_pass: sum of ``activation * d loss / d activation`` over passing inputs.
      gxa_fail: the same over failing inputs.
      fixes: failing inputs that zeroing the neuron would make correct (first order).
      breaks: passing inputs that zeroing the neuron would make wrong (first order).
      n_pass: passing inputs.
      n_fail: failing inputs.
    """

    act_pass: jax.Array
    act_fail: jax.Array
    gxa_pass: jax.Array
    gxa_fail: jax.Array
    fixes: jax.Array
    breaks: jax.Array
    n_pass: jax.Array
    n_fail: jax.Array


@struct.dataclass
class Attribution:
    """Per class (true label) and neuron: attribution sums gathered beside the counts.

    For an input with logits ``z``, label ``y`` and a neuron with value ``a``
    (its layer's output, reduced like the counts for conv channels), let ``g``
    be a gate multiplying the neuron's output (1 in the model as it is) and
    ``J = d z / d g`` at ``g = 1`` (``a * d z / d a`` summed over the
    neuron's positions).

    Attributes:
      act_pass: ``float32[classes, neurons]``, sum of ``a`` over passing inputs.
      act_fail: the same over failing inputs.
      gxa_pass: sum over passing inputs of ``d loss / d g = a * d loss / d a``,
        the loss being the cross-entropy with the true label: the first-order
        drop of the loss when the neuron is zeroed.
      gxa_fail: the same over failing inputs.
      fixes: ``int32[classes, neurons]``, failing inputs that zeroing the
        neuron would make correct, to first order (see ``linearised``).
      breaks: passing inputs that zeroing the neuron would make wrong.
      linearised: how a fix or break is predicted (static).
        ``"margin"`` (the default): from the margin ``m = z_y - z_r`` between
        the true class ``y`` and its strongest rival ``r`` (the predicted
        class of a failing input, the runner-up of a passing one): the input
        is right after zeroing when ``m - J_m > 0``, ``J_m = J_y - J_r``; a
        third class overtaking both is not modelled. Two cotangents per input.
        ``"all-classes"``: from every class's first-order logit, ``z - J``
        picks the true class; one cotangent per class (``classes`` times the
        backward work).
    """

    act_pass: jax.Array
    act_fail: jax.Array
    gxa_pass: jax.Array
    gxa_fail: jax.Array
    fixes: jax.Array
    breaks: jax.Array
    linearised: str = struct.field(pytree_node=False, default="margin")


#: How the linearised ablation predicts fixes and breaks (see :class:`Attribution`).
LINEARISED = ("margin", "all-classes")


def attribution_mode(attribution: bool | str) -> str | None:
    """``False`` -> None; ``True`` -> ``"margin"``; a mode name -> itself."""
    if attribution is False or attribution is None:
        return None
    if attribution is True:
        return "margin"
    if attribution not in LINEARISED:
        raise InputError(
            f"attribution must be True, False or one of {', '.join(LINEARISED)}; got {attribution!r}"
        )
    return str(attribution)


def zero_attribution(c: int, n: int, linearised: str) -> Attribution:
    # distinct arrays: a step that donates them must not see one buffer twice
    floats = [jnp.zeros((c, n), jnp.float32) for _ in range(4)]
    ints = [jnp.zeros((c, n), jnp.int32) for _ in range(2)]
    return Attribution(*floats, *ints, linearised)


ATTRIBUTION_FIELDS = ("act_pass", "act_fail", "gxa_pass", "gxa_fail", "fixes", "breaks")


def attribution_batch(probe: Probe, params: Any, x, labels, mask, linearised: str, rows=None):
    """Logits, activations (``[batch, neurons]``, every layer side by side) and the
    :class:`Attribution` sums of one batch: one forward
    pass, then one vmapped backward pass through the gates with two cotangents per
    input (``"margin"``) or one per class (``"all-classes"``)."""
    # gates of 1, built from the labels so that they carry their type: under
    # shard_map a gradient with respect to a replicated value would be summed
    # over the devices, and each input's own Jacobian is wanted
    row = (labels * 0).astype(jnp.float32)[:, None]
    gates = {name: g + row for name, g in probe.ones(1).items()}
    logits, jvp_back, acts = jax.vjp(lambda g: probe.gated(params, x, g), gates, has_aux=True)
    num_classes = logits.shape[-1]
    weights, correct = slot_weights(logits, labels, mask, rows)
    num_rows = weights.shape[1] // 2
    onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    # d loss / d logits of the cross-entropy with the true label
    residual = jax.nn.softmax(logits, axis=-1) - onehot
    names = probe.index.layer_names
    if linearised == "margin":
        # the strongest other class (the first of equals): the predicted class of a
        # failing input, the runner-up of a passing one
        rival = jnp.argmax(jnp.where(onehot > 0, -jnp.inf, logits), axis=-1)
        toward_rival = onehot - jax.nn.one_hot(rival, num_classes, dtype=logits.dtype)
        (grads,) = jax.vmap(jvp_back)(jnp.stack([residual, toward_rival]))  # layer -> [2, B, U]
        grad = jnp.concatenate([grads[name] for name in names], axis=-1)  # [2, B, N]
        gxa = grad[0]
        # first-order margin z_y - z_rival with each neuron zeroed (its gate from 1 to 0)
        margin = jnp.sum(logits * toward_rival, axis=-1, keepdims=True)
        moved = margin - grad[1]
        right = (moved > 0) | ((moved == 0) & (labels < rival)[:, None])
    else:
        # one cotangent per class; built from the logits so that it carries their
        # type (under shard_map: varying over the data axis)
        cotangents = jnp.eye(num_classes, dtype=logits.dtype)[:, None, :] + jnp.zeros_like(logits)
        (grads,) = jax.vmap(jvp_back)(cotangents)  # layer -> [classes, B, U]
        jac = jnp.concatenate([grads[name] for name in names], axis=-1)  # [C, B, N]
        gxa = jnp.einsum("cbn,bc->bn", jac, residual, precision=jax.lax.Precision.HIGHEST)
        # first-order logits with each neuron zeroed: logits - J; the true class's value
        # is read from the same array (a recomputed one may differ in the last bit under
        # XLA's fusions), and never competes with itself
        classes = jnp.arange(num_classes)[:, None, None]
        earlier = classes < labels[None, :, None]
        other = classes != labels[None, :, None]
        moved = logits.T[:, :, None] - jac
        own = jnp.take_along_axis(moved, labels[None, :, None], axis=0)
        beaten = other & ((moved > own) | ((moved == own) & earlier))
        right = ~jnp.any(beaten, axis=0)  # [B, N]
    act = jnp.concatenate([acts[name] for name in names], axis=-1)
    fix = (right & ~correct[:, None]).astype(jnp.float32)
    brk = (~right & correct[:, None]).astype(jnp.float32)
    act_sums, gxa_sums = exact_dot(weights.T, act), exact_dot(weights.T, gxa)
    cat = {
        "act_pass": act_sums[:num_rows],
        "act_fail": act_sums[num_rows:],
        "gxa_pass": gxa_sums[:num_rows],
        "gxa_fail": gxa_sums[num_rows:],
        "fixes": exact_dot(weights.T[num_rows:], fix).astype(jnp.int32),
        "breaks": exact_dot(weights.T[:num_rows], brk).astype(jnp.int32),
    }
    return logits, act, Attribution(**cat, linearised=linearised)
