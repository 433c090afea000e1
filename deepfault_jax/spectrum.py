"""Hit spectra: per class and neuron, how often a neuron was active on passing and failing inputs.

For true class ``c`` and neuron ``n`` (DESIGN section 2):

* ``a_pass[c, n]``: inputs of class c, classified correctly, with ``value > threshold``;
* ``a_fail[c, n]``: inputs of class c, misclassified, with ``value > threshold``;
* ``n_pass[c]``, ``n_fail[c]``: all correctly / wrongly classified inputs of class c.

The paper's four counts follow: A_s = a_pass, A_f = a_fail, N_s = n_pass - a_pass,
N_f = n_fail - a_fail. A neuron whose value equals the threshold is inactive.

One jitted pass computes every class at once (DESIGN 4.1): per batch,
``active = acts > threshold`` (``[B, N]``), ``pass = onehot(y) * correct`` and
``fail = onehot(y) * ~correct`` (``[B, C]``), then ``a_pass += pass.T @ active``
and ``a_fail += fail.T @ active``. The float32 matmul of 0/1 values is exact
below 2**24 rows per batch; counts accumulate in int32 and a run refuses to
start when a counter could pass 2**31 - 1. Memory is O(classes x neurons),
whatever the data size; the last batch is padded and masked, so one
compilation serves a run. Counts are integer sums, so any batch size, device
count, process count or resume point gives the same, bit-identical spectrum.

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

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepfault_jax.data import Batch, iterate_batches
from deepfault_jax.files import write_atomic
from deepfault_jax.probe import NeuronIndex, Probe

__all__ = [
    "LINEARISED",
    "Attribution",
    "AttributionSums",
    "Counts",
    "Spectrum",
    "SpectrumMetric",
    "accumulate",
    "batch_counts",
    "compute_spectrum",
    "data_mesh",
    "init_spectrum",
    "layer_summary",
    "load_spectrum",
    "merge",
    "save_spectrum",
    "update",
]

SPECTRUM_FORMAT = "deepfault-jax-spectrum"
SPECTRUM_VERSION = 1
_MAX_COUNT = 2**31 - 1
_MAX_BATCH = 2**24


class Counts(NamedTuple):
    """The paper's four counts of a set of neurons (``[neurons]`` or ``[classes, neurons]``).

    Attributes:
      a_s: active on passing (correctly classified) inputs.
      a_f: active on failing (misclassified) inputs.
      n_s: not active on passing inputs.
      n_f: not active on failing inputs.
    """

    a_s: jax.Array
    a_f: jax.Array
    n_s: jax.Array
    n_f: jax.Array


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


def _attribution_mode(attribution: bool | str) -> str | None:
    """``False`` -> None; ``True`` -> ``"margin"``; a mode name -> itself."""
    if attribution is False or attribution is None:
        return None
    if attribution is True:
        return "margin"
    if attribution not in LINEARISED:
        raise ValueError(
            f"attribution must be True, False or one of {', '.join(LINEARISED)}; got {attribution!r}"
        )
    return str(attribution)


def _zero_attribution(c: int, n: int, linearised: str) -> Attribution:
    # distinct arrays: a step that donates them must not see one buffer twice
    floats = [jnp.zeros((c, n), jnp.float32) for _ in range(4)]
    ints = [jnp.zeros((c, n), jnp.int32) for _ in range(2)]
    return Attribution(*floats, *ints, linearised)


_ATTRIBUTION_FIELDS = ("act_pass", "act_fail", "gxa_pass", "gxa_fail", "fixes", "breaks")


@struct.dataclass
class Spectrum:
    """The all-class hit spectrum of a set of neurons: a pytree of int32 counts, and
    optionally the :class:`Attribution` sums of the same inputs.

    Attributes:
      a_pass: ``int32[classes, neurons]``, active on correctly classified inputs of each class.
      a_fail: ``int32[classes, neurons]``, active on misclassified inputs of each class.
      n_pass: ``int32[classes]``, correctly classified inputs of each class.
      n_fail: ``int32[classes]``, misclassified inputs of each class.
      index: the neuron layout (static).
      threshold: a neuron is active when its value is ``> threshold`` (static).
      attribution: the :class:`Attribution` sums of the same inputs, or None
        (a count-only spectrum).

    Example:
      >>> s = init_spectrum(NeuronIndex(("dense_0",), (4,)), num_classes=3)
      >>> s.pooled().a_s.shape
      (4,)
    """

    a_pass: jax.Array
    a_fail: jax.Array
    n_pass: jax.Array
    n_fail: jax.Array
    index: NeuronIndex = struct.field(pytree_node=False)
    threshold: float = struct.field(pytree_node=False, default=0.0)
    attribution: Attribution | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (rows)."""
        return int(self.n_pass.shape[0])

    @property
    def num_inputs(self) -> int:
        """Number of inputs counted."""
        return int(
            np.sum(np.asarray(self.n_pass), dtype=np.int64)
            + np.sum(np.asarray(self.n_fail), dtype=np.int64)
        )

    def counts(self) -> Counts:
        """The four counts per class, each ``int32[classes, neurons]``."""
        return Counts(
            self.a_pass,
            self.a_fail,
            self.n_pass[:, None] - self.a_pass,
            self.n_fail[:, None] - self.a_fail,
        )

    def for_class(self, c: int) -> Counts:
        """The four counts of inputs whose true class is ``c``, each ``int32[neurons]``."""
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"class must lie in [0, {self.num_classes}); got {c}")
        return Counts(*(a[int(c)] for a in self.counts()))

    def pooled(self) -> Counts:
        """The four counts over all classes together, each ``int32[neurons]``."""
        return Counts(*(jnp.sum(a, axis=0) for a in self.counts()))

    def attribution_sums(self, *, pooled: bool = False) -> AttributionSums:
        """The attribution sums per class (``[classes, neurons]``) or over all classes (``[neurons]``).

        Raises:
          ValueError: the spectrum was computed without ``attribution=True``.
        """
        if self.attribution is None:
            raise ValueError(
                "attribution measures need attribution sums: compute the spectrum with "
                "attribution=True (CLI: --attribution); got a count-only spectrum"
            )
        sums = [getattr(self.attribution, f) for f in _ATTRIBUTION_FIELDS]
        n_pass, n_fail = self.n_pass[:, None], self.n_fail[:, None]
        if pooled:
            sums = [jnp.sum(a, axis=0) for a in sums]
            n_pass, n_fail = jnp.sum(n_pass, axis=0), jnp.sum(n_fail, axis=0)
        return AttributionSums(*sums, n_pass, n_fail)

    def layer(self, name: str) -> Spectrum:
        """The spectrum restricted to one layer's neurons."""
        cols = self.index.layer_slice(name)
        attribution = None
        if self.attribution is not None:
            attribution = jax.tree.map(lambda a: a[:, cols], self.attribution)
        return Spectrum(
            self.a_pass[:, cols],
            self.a_fail[:, cols],
            self.n_pass,
            self.n_fail,
            NeuronIndex((name,), (self.index.layer_sizes[self.index.layer_names.index(name)],)),
            self.threshold,
            attribution,
        )


def init_spectrum(
    index: NeuronIndex,
    *,
    num_classes: int,
    threshold: float = 0.0,
    attribution: bool | str = False,
) -> Spectrum:
    """An all-zero spectrum for ``index`` and ``num_classes`` classes.

    ``attribution``: False for counts only; True (``"margin"``) or
    ``"all-classes"`` for zero :class:`Attribution` sums of that kind.
    """
    mode = _attribution_mode(attribution)
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    c, n = int(num_classes), index.num_neurons
    return Spectrum(
        jnp.zeros((c, n), jnp.int32),
        jnp.zeros((c, n), jnp.int32),
        jnp.zeros((c,), jnp.int32),
        jnp.zeros((c,), jnp.int32),
        index,
        float(threshold),
        _zero_attribution(c, n, mode) if mode else None,
    )


def batch_counts(
    logits: jax.Array,
    activations: jax.Array | Sequence[jax.Array],
    labels: jax.Array,
    mask: jax.Array,
    *,
    threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The spectrum counts of one batch (the body of :func:`update`).

    Args:
      logits: ``float[batch, classes]``.
      activations: ``float[batch, neurons]``, or one ``float[batch, units]``
        per layer in neuron-id order (faster: no concatenated copy).
      labels: ``int[batch]`` true classes.
      mask: ``bool[batch]``; False rows are not counted.
      threshold: active means ``> threshold``.

    Returns:
      ``(a_pass[classes, neurons], a_fail[classes, neurons], n_pass[classes],
      n_fail[classes])`` as int32.
    """
    counts, _ = _counts_and_nonfinite(logits, activations, labels, mask, threshold)
    return counts


def _counts_and_nonfinite(logits, activations, labels, mask, threshold):
    """:func:`batch_counts`, and the number of non-finite values seen (logits of
    counted rows, activations of any row), found at the cost of small arrays."""
    num_classes = logits.shape[-1]
    parts = [activations] if isinstance(activations, jax.Array | np.ndarray) else list(activations)
    weights, _ = _slot_weights(logits, labels, mask)
    # (a - a) is 0 for a finite value and NaN otherwise: a non-finite activation
    # turns its column of the small count matrix into NaN, where it is detected
    raw = jnp.concatenate(
        [_dot(weights.T, (a > threshold).astype(jnp.float32) + (a - a)) for a in parts], axis=-1
    )
    finite = jnp.isfinite(raw)
    bad_logits = mask & ~jnp.isfinite(jnp.sum(logits, axis=-1))
    nonfinite = jnp.sum(~finite, dtype=jnp.int32) + jnp.sum(bad_logits, dtype=jnp.int32)
    counts = jnp.where(finite, raw, 0.0).astype(jnp.int32)
    totals = jnp.sum(weights, axis=0).astype(jnp.int32)
    split = (counts[:num_classes], counts[num_classes:], totals[:num_classes], totals[num_classes:])
    return split, nonfinite


_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _slot_weights(logits, labels, mask):
    """``float32[batch, 2 * classes]`` one-hot rows (its class's pass slot, or its
    class's fail slot; none for padding) and ``bool[batch]`` correct."""
    num_classes = logits.shape[-1]
    correct = _predicts(logits, labels)
    # each row goes to one of 2C slots: its class's pass row, its class's fail
    # row, or (padding) slot 2C, which no output reads
    slot = jnp.where(mask, labels + num_classes * (~correct).astype(labels.dtype), 2 * num_classes)
    weights = (slot[:, None] == jnp.arange(2 * num_classes)[None, :]).astype(jnp.float32)
    return weights, correct


def _attribution_batch(probe: Probe, params: Any, x, labels, mask, linearised: str):
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
    weights, correct = _slot_weights(logits, labels, mask)
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
    act_sums, gxa_sums = _dot(weights.T, act), _dot(weights.T, gxa)
    cat = {
        "act_pass": act_sums[:num_classes],
        "act_fail": act_sums[num_classes:],
        "gxa_pass": gxa_sums[:num_classes],
        "gxa_fail": gxa_sums[num_classes:],
        "fixes": _dot(weights.T[num_classes:], fix).astype(jnp.int32),
        "breaks": _dot(weights.T[:num_classes], brk).astype(jnp.int32),
    }
    return logits, act, Attribution(**cat, linearised=linearised)


def _predicts(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``argmax(logits, -1) == labels`` (first maximum wins), without a variadic reduction.

    A label is the argmax when no logit is larger and no earlier logit is equal.
    """
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    earlier = jnp.arange(logits.shape[-1])[None, :] < labels[:, None]
    beaten = (logits > own) | ((logits == own) & earlier)
    return ~jnp.any(beaten, axis=-1)


def _add(spectrum: Spectrum, counts, attribution: Attribution | None = None) -> Spectrum:
    a_pass, a_fail, n_pass, n_fail = counts
    if attribution is not None:
        attribution = jax.tree.map(jnp.add, spectrum.attribution, attribution)
    return spectrum.replace(
        a_pass=spectrum.a_pass + a_pass,
        a_fail=spectrum.a_fail + a_fail,
        n_pass=spectrum.n_pass + n_pass,
        n_fail=spectrum.n_fail + n_fail,
        attribution=attribution if attribution is not None else spectrum.attribution,
    )


def _layer_list(spectrum: Spectrum, activations) -> jax.Array | list[jax.Array]:
    if isinstance(activations, Mapping):
        return [activations[name] for name in spectrum.index.layer_names]
    return activations


def update(
    spectrum: Spectrum,
    logits: jax.Array,
    activations: jax.Array | Mapping[str, jax.Array],
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> Spectrum:
    """Adds one batch to ``spectrum``; pure and jit-able.

    Args:
      spectrum: the running spectrum.
      logits: ``float[batch, classes]``.
      activations: ``float[batch, neurons]`` in neuron-id order, or a probe's
        mapping layer -> ``[batch, units]``.
      labels: ``int[batch]`` true classes.
      mask: optional ``bool[batch]``; False rows (padding) are not counted.

    Returns:
      The new spectrum.
    """
    if spectrum.attribution is not None:
        raise ValueError(
            "update adds counts only, and this spectrum carries attribution sums that would no "
            "longer cover its inputs; expected a count-only spectrum (use accumulate or "
            "compute_spectrum with attribution=True to add inputs to one with sums)"
        )
    acts = _layer_list(spectrum, activations)
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    return _add(spectrum, batch_counts(logits, acts, labels, mask, threshold=spectrum.threshold))


def merge(a: Spectrum, b: Spectrum) -> Spectrum:
    """The spectrum of the union of two disjoint data sets.

    Raises:
      ValueError: the spectra have another layout (layers, sizes), number of
        classes or threshold.
    """
    _check_same_layout(a, b, "merge")
    _check_same_attribution(a, b, "merge")
    return _add(a, (b.a_pass, b.a_fail, b.n_pass, b.n_fail), b.attribution)


def _check_same_layout(a: Spectrum, b: Spectrum, what: str) -> None:
    if a.index != b.index:
        raise ValueError(
            f"cannot {what} spectra of different layouts: expected layers "
            f"{list(zip(a.index.layer_names, a.index.layer_sizes, strict=True))}, got "
            f"{list(zip(b.index.layer_names, b.index.layer_sizes, strict=True))}"
        )
    if a.num_classes != b.num_classes:
        raise ValueError(
            f"cannot {what} spectra: expected {a.num_classes} classes, got {b.num_classes}"
        )
    if a.threshold != b.threshold:
        raise ValueError(
            f"cannot {what} spectra: expected threshold {a.threshold}, got {b.threshold}"
        )


def _describe(s: Spectrum) -> str:
    if s.attribution is None:
        return "without attribution sums"
    return f"with {s.attribution.linearised!r} attribution sums"


def _check_same_attribution(a: Spectrum, b: Spectrum, what: str) -> None:
    if _describe(a) != _describe(b):
        raise ValueError(
            f"cannot {what}: expected a spectrum {_describe(a)}, got one {_describe(b)}"
        )


# --------------------------------------------------------------------------- streaming


def data_mesh(*, devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over all global devices, or the first ``devices`` local ones.

    Args:
      devices: None for every device of every process; an int for that many
        local devices (one process); or explicit devices.
    """
    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, int):
        local = jax.local_devices()
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices must lie in [1, {len(local)}] (the {local[0].platform} devices here); "
                f"got {devices}. On CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "before starting Python for more"
            )
        devs = local[:devices]
    else:
        devs = list(devices)
    return Mesh(np.asarray(devs), ("data",))


def _count_step(spectrum: Spectrum, nonfinite: jax.Array, params: Any, x, y, mask, probe: Probe):
    """One batch: its counts (and attribution sums when the spectrum has them), and the
    running count of non-finite logits, activations and attribution sums (NaN or
    infinite inputs or weights)."""
    attribution = None
    if spectrum.attribution is None:
        logits, by_layer = probe(params, x)
        acts = [by_layer[name] for name in probe.index.layer_names]
    else:
        # all layers side by side ([batch, neurons]): one count matmul
        logits, acts, attribution = _attribution_batch(
            probe, params, x, y, mask, spectrum.attribution.linearised
        )
    counts, bad = _counts_and_nonfinite(logits, acts, y, mask, spectrum.threshold)
    if attribution is not None:
        bad = bad + jnp.sum(
            ~jnp.isfinite(attribution.gxa_pass + attribution.gxa_fail), dtype=jnp.int32
        )
    return (counts, attribution), nonfinite + bad


@functools.partial(jax.jit, static_argnames=("probe",), donate_argnums=(0, 1))
def _step(spectrum: Spectrum, nonfinite, params: Any, x, y, mask, *, probe: Probe):
    (counts, attribution), nonfinite = _count_step(spectrum, nonfinite, params, x, y, mask, probe)
    return _add(spectrum, counts, attribution), nonfinite


@functools.lru_cache(maxsize=32)
def _sharded_step(probe: Probe, mesh: Mesh) -> Callable:
    """``jit(shard_map(...))`` of one step over ``mesh``; built once per (probe, mesh)."""

    def body(spectrum, nonfinite, params, x, y, mask):
        local, bad = _count_step(spectrum, jnp.zeros((), jnp.int32), params, x, y, mask, probe)
        (counts, attribution), bad = jax.lax.psum((local, bad), "data")
        return _add(spectrum, counts, attribution), nonfinite + bad

    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(), P(), P("data"), P("data"), P("data")),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=(0, 1))


def _replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (the same on every process) replicated over ``mesh``."""
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def _to_local(spectrum: Spectrum) -> Spectrum:
    """A replicated (possibly multi-process) spectrum as arrays on this process."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a.addressable_data(0))), spectrum)


def _check_batch(batch: Batch, probe: Probe, num_classes: int) -> None:
    x, y, mask = np.asarray(batch.x), np.asarray(batch.y), np.asarray(batch.mask)
    if x.shape[1:] != probe.input_shape:
        raise ValueError(
            f"inputs must have shape [batch, {', '.join(map(str, probe.input_shape))}]; "
            f"got {list(x.shape)}"
        )
    if y.shape != (x.shape[0],) or mask.shape != (x.shape[0],):
        raise ValueError(
            f"labels and mask must have shape [{x.shape[0]}]; got {list(y.shape)} and {list(mask.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {y.dtype}")
    real = y[mask]
    if real.size and (real.min() < 0 or real.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got range [{real.min()}, {real.max()}]"
        )
    # finiteness is checked on the device, from the logits and activations of each row


def accumulate(
    probe: Probe,
    params: Any,
    batches: Iterable[Batch],
    *,
    num_classes: int | None = None,
    threshold: float = 0.0,
    attribution: bool | str = False,
    spectrum: Spectrum | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
    total: int | None = None,
    on_batch: Callable[[int, Spectrum], None] | None = None,
) -> Spectrum:
    """Streams batches through ``probe`` and adds them to a spectrum.

    One compilation serves the whole stream (every batch has the same shape;
    the padded tail is masked); the running counts are donated to each step.
    Each batch's input shape and label range are checked on the host before it
    is counted; rows whose logits or activations are not finite (NaN or
    infinite inputs) are counted on the device and fail the run before any
    spectrum is returned or handed to ``on_batch``.

    Args:
      probe: the model's probe.
      params: its parameters.
      batches: :class:`~deepfault_jax.data.Batch` es of one fixed shape (from
        :func:`~deepfault_jax.data.iterate_batches`). With a ``mesh`` over
        several processes, each process passes its own rows, and every
        process must pass the same number of batches.
      num_classes: classes (default: the probe's number of logits).
      threshold: active means ``> threshold``; ignored when ``spectrum`` is given.
      attribution: also gather the :class:`Attribution` sums (needs a probe
        with gates): True or ``"margin"`` (two cotangents per input), or
        ``"all-classes"`` (one per class; see :class:`Attribution`); ignored
        when ``spectrum`` is given (its own sums, or none, decide).
      spectrum: continue from this spectrum instead of zeros.
      mesh: a 1-D ``("data",)`` mesh (:func:`data_mesh`) to split each batch
        over its devices with ``shard_map`` and sum with ``psum``; None runs on
        the default device.
      progress: show a progress bar on stderr.
      total: number of batches, for the progress bar.
      on_batch: called after each batch with (batches done, spectrum).

    Returns:
      The spectrum, as arrays on this process.
    """
    from tqdm.auto import tqdm

    num_classes = probe.num_classes if num_classes is None else int(num_classes)
    if num_classes != probe.num_classes:
        raise ValueError(
            f"num_classes must match the model's {probe.num_classes} logits; got {num_classes}"
        )
    if spectrum is None:
        spectrum = init_spectrum(
            probe.index, num_classes=num_classes, threshold=threshold, attribution=attribution
        )
    elif spectrum.index != probe.index or spectrum.num_classes != num_classes:
        _check_same_layout(
            init_spectrum(probe.index, num_classes=num_classes, threshold=spectrum.threshold),
            spectrum,
            "continue",
        )
    if spectrum.attribution is not None:
        probe.require_gates(f"attribution={spectrum.attribution.linearised!r}")
    counted = spectrum.num_inputs
    processes = 1
    if mesh is not None:
        processes = len({d.process_index for d in mesh.devices.flat})
        local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        step = _sharded_step(probe, mesh)
        data_sharding = NamedSharding(mesh, P("data"))
        spectrum = _replicate(spectrum, mesh)
        params = _replicate(params, mesh)
        nonfinite = _replicate(np.zeros((), np.int32), mesh)
    else:
        spectrum = jax.tree.map(jnp.array, spectrum)  # a private copy: the step donates it
        nonfinite = jnp.zeros((), jnp.int32)
    bar = tqdm(
        batches,
        total=total,
        desc="spectrum",
        unit="batch",
        disable=None if progress else True,
        leave=False,
    )
    done = 0
    for batch in bar:
        _check_batch(batch, probe, num_classes)
        rows = len(batch.y) * processes
        if rows > _MAX_BATCH:
            raise ValueError(
                f"batch must hold at most {_MAX_BATCH} rows for exact counts; got {rows}"
            )
        if counted + rows > _MAX_COUNT:
            raise ValueError(
                f"counts would pass the int32 limit {_MAX_COUNT}: {counted} inputs counted, "
                f"{rows} more in this batch; split the data and merge the spectra in int64"
            )
        counted += rows
        if mesh is None:
            spectrum, nonfinite = _step(
                spectrum, nonfinite, params, batch.x, batch.y, batch.mask, probe=probe
            )
        else:
            if len(batch.y) % local_devices:
                raise ValueError(
                    f"batch size must be a multiple of the {local_devices} local devices of the mesh; "
                    f"got {len(batch.y)}"
                )
            x, y, mask = (
                jax.make_array_from_process_local_data(data_sharding, np.asarray(a))
                for a in (batch.x, batch.y, batch.mask)
            )
            spectrum, nonfinite = step(spectrum, nonfinite, params, x, y, mask)
        done += 1
        if on_batch is not None:
            _check_finite(nonfinite)  # never hand on (or save) counts of non-finite values
            on_batch(done, spectrum)
    _check_finite(nonfinite)
    return _to_local(spectrum) if mesh is not None else spectrum


def _check_finite(nonfinite: jax.Array) -> None:
    bad = int(np.asarray(nonfinite.addressable_data(0)))
    if bad:
        raise ValueError(
            f"inputs must give finite logits and activations; got {bad} NaN or infinite results "
            "(check the inputs for NaN/inf values, and the parameters)"
        )


def _fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A cheap identity of a data set: shapes, every label, and a strided sample of inputs."""
    h = hashlib.sha256()
    h.update(repr((x.shape, str(x.dtype), y.shape)).encode())
    h.update(np.ascontiguousarray(y).tobytes())
    flat = x.reshape(len(x), -1)
    step = max(1, flat.shape[1] // 64)
    h.update(np.ascontiguousarray(flat[:, ::step]).tobytes())
    return h.hexdigest()[:32]


def compute_spectrum(
    probe: Probe,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 512,
    threshold: float = 0.0,
    attribution: bool | str = False,
    mesh: Mesh | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    progress: bool = False,
    callback: Callable[[int, Spectrum], None] | None = None,
) -> Spectrum:
    """The spectrum of a whole data set, resumable.

    Args:
      probe: the model's probe.
      params: its parameters.
      x: ``float32[n, *input_shape]``; with a multi-process mesh, this process's rows.
      y: ``int[n]`` true classes.
      batch_size: rows per step (per process); a multiple of the local device count.
      threshold: active means ``> threshold``.
      attribution: also gather the :class:`Attribution` sums (as in :func:`accumulate`).
      mesh: as in :func:`accumulate`.
      checkpoint_path: if given, the spectrum and position are saved there
        (atomically) every ``checkpoint_every`` batches; a run started again
        with the same path, data and probe layout continues from it and ends
        bit-identical to an uninterrupted run. Single-process only.
      checkpoint_every: batches between saves.
      progress: show a progress bar.
      callback: called after each batch (after any save) with (batches done
        in this call, spectrum); an exception it raises stops the run, and a
        run with ``checkpoint_path`` resumes from the last save.

    Returns:
      The spectrum.
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length; got {len(x)} and {len(y)}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if x.shape[1:] != probe.input_shape:
        raise ValueError(
            f"x must have shape [n, {', '.join(map(str, probe.input_shape))}]; got {list(x.shape)}"
        )
    spectrum = init_spectrum(
        probe.index, num_classes=probe.num_classes, threshold=threshold, attribution=attribution
    )
    multi = mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1
    start = 0
    fingerprint = None
    if checkpoint_path is not None:
        if multi:
            raise ValueError("checkpoint_path is for single-process runs; got a multi-process mesh")
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1; got {checkpoint_every}")
        checkpoint_path = Path(checkpoint_path)
        fingerprint = _fingerprint(x, y)
        if checkpoint_path.exists():
            saved, meta = load_spectrum(checkpoint_path, with_metadata=True)
            _check_same_layout(spectrum, saved, "resume")
            _check_same_attribution(spectrum, saved, f"resume from {checkpoint_path}")
            if meta.get("data_fingerprint") != fingerprint:
                raise ValueError(
                    f"cannot resume from {checkpoint_path}: it was computed on other data "
                    f"(expected fingerprint {fingerprint}, got {meta.get('data_fingerprint')})"
                )
            spectrum, start = saved, int(meta["position"])
    n_batches = -(-(len(x) - start) // batch_size)
    if multi:
        from jax.experimental import multihost_utils

        n_batches = int(np.max(multihost_utils.process_allgather(np.array([n_batches]))))
    batches = (
        _padded_batches(x[start:], y[start:], batch_size, n_batches) if n_batches else iter(())
    )

    def after_batch(done: int, current: Spectrum) -> None:
        if checkpoint_path is not None and done % checkpoint_every == 0:
            position = min(len(x), start + done * batch_size)
            meta = {
                "position": position,
                "data_fingerprint": fingerprint,
                "complete": position == len(x),
            }
            save_spectrum(
                checkpoint_path, _to_local(current) if mesh is not None else current, metadata=meta
            )
        if callback is not None:
            callback(done, current)

    result = accumulate(
        probe,
        params,
        batches,
        spectrum=spectrum,
        mesh=mesh,
        progress=progress,
        total=n_batches,
        on_batch=after_batch if checkpoint_path is not None or callback is not None else None,
    )
    if checkpoint_path is not None:
        meta = {"position": len(x), "data_fingerprint": fingerprint, "complete": True}
        save_spectrum(checkpoint_path, result, metadata=meta)
    return result


def _padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int, n_batches: int):
    """``n_batches`` fixed-shape batches; all-masked ones after the data runs out."""
    count = 0
    if len(x):
        for batch in iterate_batches(x, y, batch_size=batch_size):
            yield batch
            count += 1
    for _ in range(n_batches - count):
        yield Batch(
            np.zeros((batch_size, *x.shape[1:]), np.float32),
            np.zeros((batch_size,), np.int32),
            np.zeros((batch_size,), bool),
        )


# --------------------------------------------------------------------------- files


def _atomic_savez(path: Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def save_spectrum(
    path: str | os.PathLike, spectrum: Spectrum, *, metadata: dict | None = None
) -> Path:
    """Writes ``spectrum`` to an ``.npz`` file, atomically (temp file, then rename).

    The file holds ``a_pass``, ``a_fail`` (int32 ``[classes, neurons]``),
    ``n_pass``, ``n_fail`` (int32 ``[classes]``), ``layer_names`` (str),
    ``layer_sizes`` (int64), ``threshold`` (float64), ``format``,
    ``format_version`` and ``metadata`` (a JSON string), and, for a spectrum
    with attribution sums, ``attribution_act_pass``, ``attribution_act_fail``,
    ``attribution_gxa_pass``, ``attribution_gxa_fail`` (float32) and
    ``attribution_fixes``, ``attribution_breaks`` (int32), each ``[classes,
    neurons]``, and ``attribution_linearised`` (str); every array loads with ``np.load(path, allow_pickle=False)``.

    Returns:
      The path written.
    """
    path = Path(path)
    arrays = {
        "a_pass": np.asarray(spectrum.a_pass, np.int32),
        "a_fail": np.asarray(spectrum.a_fail, np.int32),
        "n_pass": np.asarray(spectrum.n_pass, np.int32),
        "n_fail": np.asarray(spectrum.n_fail, np.int32),
        "layer_names": np.asarray(spectrum.index.layer_names, dtype=np.str_),
        "layer_sizes": np.asarray(spectrum.index.layer_sizes, np.int64),
        "threshold": np.float64(spectrum.threshold),
        "format": np.str_(SPECTRUM_FORMAT),
        "format_version": np.int64(SPECTRUM_VERSION),
        "metadata": np.str_(json.dumps(metadata or {}, sort_keys=True)),
    }
    if spectrum.attribution is not None:
        arrays["attribution_linearised"] = np.str_(spectrum.attribution.linearised)
        for field in _ATTRIBUTION_FIELDS:
            dtype = np.int32 if field in ("fixes", "breaks") else np.float32
            arrays[f"attribution_{field}"] = np.asarray(getattr(spectrum.attribution, field), dtype)
    _atomic_savez(path, arrays)
    return path


def load_spectrum(path: str | os.PathLike, *, with_metadata: bool = False):
    """Reads a spectrum written by :func:`save_spectrum`, checking it is whole and consistent.

    Returns:
      The :class:`Spectrum`, or ``(spectrum, metadata)`` with ``with_metadata=True``.

    Raises:
      ValueError: a missing, unreadable, truncated or inconsistent file (the
        message names what was expected and what was found).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"spectrum file must exist; got {str(path)!r}, which is not a file")
    required = ("a_pass", "a_fail", "n_pass", "n_fail", "layer_names", "layer_sizes", "threshold")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in required if k not in f.files]
            if missing:
                raise ValueError(
                    f"{path}: not a spectrum file: missing {missing}, got {sorted(f.files)}"
                )
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable spectrum file ({e})") from None
    except Exception as e:  # zipfile, zlib and OS errors from a damaged file
        raise ValueError(
            f"{path}: not a readable spectrum file ({type(e).__name__}: {e})"
        ) from None
    fmt = str(arrays.get("format", SPECTRUM_FORMAT))
    if fmt != SPECTRUM_FORMAT:
        raise ValueError(f"{path}: format must be {SPECTRUM_FORMAT!r}; got {fmt!r}")
    index = NeuronIndex(
        tuple(str(s) for s in arrays["layer_names"]), tuple(int(s) for s in arrays["layer_sizes"])
    )
    a_pass, a_fail, n_pass, n_fail = (arrays[k] for k in ("a_pass", "a_fail", "n_pass", "n_fail"))
    c, n = n_pass.shape[0] if n_pass.ndim == 1 else -1, index.num_neurons
    for name, a, shape in (
        ("a_pass", a_pass, (c, n)),
        ("a_fail", a_fail, (c, n)),
        ("n_fail", n_fail, (c,)),
    ):
        if a.shape != shape or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"{path}: {name} must be integer of shape {shape}; got {a.dtype} {a.shape}"
            )
    if not np.issubdtype(n_pass.dtype, np.integer) or c < 2:
        raise ValueError(
            f"{path}: n_pass must be integer of shape [classes >= 2]; got {n_pass.dtype} {n_pass.shape}"
        )
    if min(a.min() for a in (a_pass, a_fail, n_pass, n_fail)) < 0:
        raise ValueError(f"{path}: counts must be >= 0; got a negative count")
    if (a_pass > n_pass[:, None]).any() or (a_fail > n_fail[:, None]).any():
        raise ValueError(f"{path}: active counts must not exceed the input counts of their class")
    try:
        meta = json.loads(str(arrays.get("metadata", "{}")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata must be JSON ({e})") from None
    present = [f for f in _ATTRIBUTION_FIELDS if f"attribution_{f}" in arrays]
    attribution = None
    if present:
        if len(present) != len(_ATTRIBUTION_FIELDS):
            raise ValueError(
                f"{path}: attribution sums must be whole: expected {list(_ATTRIBUTION_FIELDS)}, "
                f"got {present}"
            )
        parts = {}
        for field in _ATTRIBUTION_FIELDS:
            a = arrays[f"attribution_{field}"]
            integer = field in ("fixes", "breaks")
            kind_ok = np.issubdtype(a.dtype, np.integer if integer else np.floating)
            if a.shape != (c, n) or not kind_ok:
                raise ValueError(
                    f"{path}: attribution_{field} must be {'integer' if integer else 'float'} of "
                    f"shape {(c, n)}; got {a.dtype} {a.shape}"
                )
            parts[field] = jnp.asarray(a, jnp.int32 if integer else jnp.float32)
        linearised = str(arrays.get("attribution_linearised", "margin"))
        if linearised not in LINEARISED:
            raise ValueError(
                f"{path}: attribution_linearised must be one of {', '.join(LINEARISED)}; "
                f"got {linearised!r}"
            )
        attribution = Attribution(**parts, linearised=linearised)
    spectrum = Spectrum(
        *(jnp.asarray(a, jnp.int32) for a in (a_pass, a_fail, n_pass, n_fail)),
        index,
        float(arrays["threshold"]),
        attribution,
    )
    return (spectrum, meta) if with_metadata else spectrum


# --------------------------------------------------------------------------- training loops


class SpectrumMetric(nnx.Metric):
    """An ``nnx.Metric`` that accumulates a spectrum: ``update`` / ``compute`` / ``reset``.

    Carry it in an NNX eval step with one extra line::

        metric = SpectrumMetric(probe.index, num_classes=10)
        logits, acts = probe(params, x)
        metric.update(logits=logits, activations=acts, labels=y)
        spectrum = metric.compute()

    Linen users call the pure :func:`init_spectrum` and :func:`update` instead.
    """

    def __init__(self, index: NeuronIndex, *, num_classes: int, threshold: float = 0.0):
        self.index = index
        self.threshold = float(threshold)
        zero = init_spectrum(index, num_classes=num_classes, threshold=threshold)
        self.a_pass = nnx.metrics.MetricState(zero.a_pass)
        self.a_fail = nnx.metrics.MetricState(zero.a_fail)
        self.n_pass = nnx.metrics.MetricState(zero.n_pass)
        self.n_fail = nnx.metrics.MetricState(zero.n_fail)

    def reset(self) -> None:
        """Sets every count to zero."""
        for var in (self.a_pass, self.a_fail, self.n_pass, self.n_fail):
            var[...] = jnp.zeros_like(var[...])

    def update(self, *, logits, activations, labels, mask=None, **_) -> None:  # noqa: D417
        """Adds a batch: ``logits[batch, classes]``, ``activations`` (flat or per layer), ``labels[batch]``."""
        new = update(self.compute(), logits, activations, labels, mask=mask)
        self.a_pass[...], self.a_fail[...] = new.a_pass, new.a_fail
        self.n_pass[...], self.n_fail[...] = new.n_pass, new.n_fail

    def compute(self) -> Spectrum:
        """The spectrum so far."""
        return Spectrum(
            self.a_pass[...],
            self.a_fail[...],
            self.n_pass[...],
            self.n_fail[...],
            self.index,
            self.threshold,
        )


def layer_summary(spectrum: Spectrum) -> list[dict]:
    """Per layer: neurons, and the share of (input, neuron) pairs active on failing and on passing inputs.

    Returns:
      ``[{"layer", "neurons", "active_share_fail", "active_share_pass"}]``;
      a share is None when there is no failing (or passing) input.
    """
    a_pass = np.asarray(spectrum.a_pass, np.int64).sum(axis=0)
    a_fail = np.asarray(spectrum.a_fail, np.int64).sum(axis=0)
    n_pass = int(np.asarray(spectrum.n_pass, np.int64).sum())
    n_fail = int(np.asarray(spectrum.n_fail, np.int64).sum())
    rows = []
    for name, size in zip(spectrum.index.layer_names, spectrum.index.layer_sizes, strict=True):
        cols = spectrum.index.layer_slice(name)
        rows.append(
            {
                "layer": name,
                "neurons": size,
                "active_share_fail": float(a_fail[cols].sum() / (n_fail * size))
                if n_fail
                else None,
                "active_share_pass": float(a_pass[cols].sum() / (n_pass * size))
                if n_pass
                else None,
            }
        )
    return rows
