"""Streaming spectra: a mesh, accumulation over batches, whole data sets, and resume."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepfault_jax.attribution import attribution_batch, attribution_mode
from deepfault_jax.data import Batch, iterate_batches
from deepfault_jax.errors import InputError, InputTypeError, check_finite, check_int
from deepfault_jax.interrupts import deferred_interrupt, stop_if_interrupted
from deepfault_jax.kernels import MAX_BATCH, POOLED, counts_and_nonfinite, row_map
from deepfault_jax.probe import Probe
from deepfault_jax.progress import Progress, notify
from deepfault_jax.spectrum import (
    MAX_COUNT,
    Spectrum,
    add_to_spectrum,
    check_classes,
    check_same_attribution,
    check_same_layout,
    init_spectrum,
)
from deepfault_jax.spectrum_io import load_spectrum, save_spectrum

__all__ = [
    "accumulate_spectrum",
    "check_memory",
    "compute_spectrum",
    "data_mesh",
    "memory_estimate",
    "stream_spectrum",
]


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
            raise InputError(
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
    rows = row_map(probe.num_classes, spectrum.classes)
    if spectrum.attribution is None:
        logits, by_layer = probe(params, x)
        acts = [by_layer[name] for name in probe.index.layer_names]
    else:
        # all layers side by side ([batch, neurons]): one count matmul
        logits, acts, attribution = attribution_batch(
            probe, params, x, y, mask, spectrum.attribution.linearised, rows
        )
    counts, bad = counts_and_nonfinite(logits, acts, y, mask, spectrum.threshold, rows)
    if attribution is not None:
        bad = bad + jnp.sum(
            ~jnp.isfinite(attribution.gxa_pass + attribution.gxa_fail), dtype=jnp.int32
        )
    return (counts, attribution), nonfinite + bad


@functools.partial(jax.jit, static_argnames=("probe",), donate_argnums=(0, 1))
def _step(spectrum: Spectrum, nonfinite, params: Any, x, y, mask, *, probe: Probe):
    (counts, attribution), nonfinite = _count_step(spectrum, nonfinite, params, x, y, mask, probe)
    return add_to_spectrum(spectrum, counts, attribution), nonfinite


@functools.lru_cache(maxsize=32)
def _sharded_step(probe: Probe, mesh: Mesh) -> Callable:
    """``jit(shard_map(...))`` of one step over ``mesh``; built once per (probe, mesh)."""

    def body(spectrum, nonfinite, params, x, y, mask):
        local, bad = _count_step(spectrum, jnp.zeros((), jnp.int32), params, x, y, mask, probe)
        (counts, attribution), bad = jax.lax.psum((local, bad), "data")
        return add_to_spectrum(spectrum, counts, attribution), nonfinite + bad

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
        raise InputError(
            f"inputs must have shape [batch, {', '.join(map(str, probe.input_shape))}]; "
            f"got {list(x.shape)}"
        )
    if y.shape != (x.shape[0],) or mask.shape != (x.shape[0],):
        raise InputError(
            f"labels and mask must have shape [{x.shape[0]}]; got {list(y.shape)} and {list(mask.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise InputTypeError(f"labels must be integers; got dtype {y.dtype}")
    real = y[mask]
    if real.size and (real.min() < 0 or real.max() >= num_classes):
        raise InputError(
            f"labels must lie in [0, {num_classes}); got range [{real.min()}, {real.max()}]"
        )


def _check_rows(rows: int, counted: int) -> int:
    """The inputs counted after a batch of ``rows`` (all processes), or an error when
    the batch is too large for exact counts or the counts would pass int32."""
    if rows > MAX_BATCH:
        raise InputError(f"batch must hold at most {MAX_BATCH} rows for exact counts; got {rows}")
    if counted + rows > MAX_COUNT:
        raise InputError(
            f"counts would pass the int32 limit {MAX_COUNT}: {counted} inputs counted, "
            f"{rows} more in this batch; split the data and merge the spectra in int64"
        )
    return counted + rows


def _local_devices(mesh: Mesh) -> int:
    """The devices of ``mesh`` that belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _starting_spectrum(
    probe: Probe,
    num_classes: Any,
    threshold: Any,
    attribution: bool | str,
    spectrum: Any,
    classes: Any = None,
) -> Spectrum:
    """The spectrum :func:`accumulate_spectrum` starts from, checked against the probe."""
    if num_classes is None:
        num_classes = probe.num_classes
    num_classes = check_int("num_classes", num_classes)
    if num_classes != probe.num_classes:
        raise InputError(
            f"num_classes must match the model's {probe.num_classes} logits; got {num_classes}"
        )
    threshold = check_finite("threshold", threshold)
    if spectrum is None:
        return init_spectrum(probe.index, num_classes=num_classes, threshold=threshold,
                             attribution=attribution, classes=classes)  # fmt: skip
    if not isinstance(spectrum, Spectrum):
        raise InputTypeError(f"spectrum must be a Spectrum or None; got {type(spectrum).__name__}")
    fresh = init_spectrum(probe.index, num_classes=num_classes, threshold=spectrum.threshold,
                          classes="pooled" if spectrum.pooled_only else spectrum.classes)  # fmt: skip
    check_same_layout(fresh, spectrum, "continue")
    return spectrum


def _stepper(probe: Probe, params: Any, spectrum: Spectrum, mesh: Mesh | None):
    """The running state ``(spectrum, non-finite count)`` placed for the run, a function
    ``step(state, batch) -> state``, and the number of processes feeding each batch."""
    if mesh is None:

        def step(state, batch: Batch):
            return _step(*state, params, batch.x, batch.y, batch.mask, probe=probe)

        # a private copy: the step donates it
        return (jax.tree.map(jnp.array, spectrum), jnp.zeros((), jnp.int32)), step, 1
    local_devices = _local_devices(mesh)
    sharded = _sharded_step(probe, mesh)
    data_sharding = NamedSharding(mesh, P("data"))
    placed_params = _replicate(params, mesh)

    def step(state, batch: Batch):
        if len(batch.y) % local_devices:
            raise InputError(
                f"batch size must be a multiple of the {local_devices} local devices of the mesh; "
                f"got {len(batch.y)}"
            )
        x, y, mask = (
            jax.make_array_from_process_local_data(data_sharding, np.asarray(a))
            for a in (batch.x, batch.y, batch.mask)
        )
        return sharded(*state, placed_params, x, y, mask)

    state = (_replicate(spectrum, mesh), _replicate(np.zeros((), np.int32), mesh))
    return state, step, len({d.process_index for d in mesh.devices.flat})


def accumulate_spectrum(
    probe: Probe,
    params: Any,
    batches: Iterable[Batch],
    *,
    num_classes: int | None = None,
    threshold: float = 0.0,
    attribution: bool | str = False,
    spectrum: Spectrum | None = None,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
    total: int | None = None,
    on_batch: Callable[[int, Spectrum], None] | None = None,
    classes: Sequence[int] | str | None = None,
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
      threshold: active means ``> threshold``, a finite number; ignored (but
        still checked) when ``spectrum`` is given.
      attribution: also gather the :class:`Attribution` sums (needs a probe
        with gates): True or ``"margin"`` (two cotangents per input), or
        ``"all-classes"`` (one per class; see :class:`Attribution`); ignored
        when ``spectrum`` is given (its own sums, or none, decide).
      spectrum: continue from this spectrum instead of zeros.
      mesh: a 1-D ``("data",)`` mesh (:func:`data_mesh`) to split each batch
        over its devices with ``shard_map`` and sum with ``psum``; None runs on
        the default device.
      progress: called as ``progress("spectrum", batches done, total)`` after each batch.
      total: number of batches, handed to ``progress``.
      on_batch: called after each batch with (batches done, spectrum).
      classes: None for a row per class; ``"pooled"`` to count every class in
        one row (pooled-only: per-class rows are not kept, for very large
        neuron counts); or a list of class ids (a class subset: inputs of
        other classes are not counted); ignored when ``spectrum`` is given.

    Returns:
      The spectrum, as arrays on this process.

    Raises:
      InputError: ``num_classes`` or ``total`` is not an integer, or
        ``num_classes`` differs from the probe's; ``threshold`` is not
        finite; ``spectrum`` has another layout; a batch has another input
        shape, labels out of range, too many rows, or gives non-finite values;
        the counts would pass the int32 limit.
    """
    spectrum = _starting_spectrum(probe, num_classes, threshold, attribution, spectrum, classes)
    if total is not None:
        total = check_int("total", total, lo=0)
    if spectrum.attribution is not None:
        probe.require_gates(f"attribution={spectrum.attribution.linearised!r}")
    state, step, processes = _stepper(probe, params, spectrum, mesh)
    counted, done = spectrum.num_inputs, 0
    with deferred_interrupt() as interrupt:  # Ctrl-C: after the batch in flight
        for batch in batches:
            _check_batch(batch, probe, probe.num_classes)
            counted = _check_rows(len(batch.y) * processes, counted)
            state = step(state, batch)
            done += 1
            notify(progress, "spectrum", done, total)
            if on_batch is not None:
                _check_finite(state[1])  # never hand on (or save) counts of non-finite values
                on_batch(done, state[0])
            stop_if_interrupted(interrupt, state)
    _check_finite(state[1])
    return _to_local(state[0]) if mesh is not None else state[0]


def _check_finite(nonfinite: jax.Array) -> None:
    bad = int(np.asarray(nonfinite.addressable_data(0)))
    if bad:
        raise InputError(
            f"inputs must give finite logits and activations; got {bad} NaN or infinite results "
            "(check the inputs for NaN/inf values, and the parameters)"
        )


# --------------------------------------------------------------------------- memory


def memory_estimate(
    num_classes: int, num_neurons: int, batch_size: int, *, attribution: bool | str = False
) -> dict:
    """Bytes a spectrum run holds on its device, by part (a lower bound; the model's
    own activations come on top).

    * ``spectrum``: ``a_pass``, ``a_fail`` (int32 ``[classes, neurons]``) and
      ``n_pass``, ``n_fail``, twice (the running counts and the step's output);
    * ``attribution``: the six attribution sums ``[classes, neurons]``, twice;
    * ``batch``: per step, the probed values ``[batch, neurons]`` (float32) with
      their 0/1 activity, the one-hot pass/fail slots ``[batch, 2 x classes]``,
      and the per-input cotangents of attribution (``[batch, classes, neurons]``
      for ``"all-classes"``, two per input otherwise).
    """
    c = check_int("num_classes", num_classes, lo=1)
    n = check_int("num_neurons", num_neurons, lo=1)
    b = check_int("batch_size", batch_size, lo=1)
    attribution = attribution_mode(attribution)
    spectrum = 2 * (2 * c * n + 2 * c) * 4
    extra = 0 if not attribution else 2 * 6 * c * n * 4
    batch = b * n * 4 * 2 + b * 2 * c * 4
    if attribution == "all-classes":
        batch += b * c * n * 4
    elif attribution:
        batch += 2 * b * n * 4
    return {"spectrum": spectrum, "attribution": extra, "batch": batch,
            "total": spectrum + extra + batch}  # fmt: skip


def _device_bytes(device: jax.Device) -> tuple[int, str]:
    """Memory of ``device``: its allocator's limit where it reports one (GPU, TPU),
    else the host's physical memory (CPU)."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} device {device.id}"
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 0, "host memory"


def check_memory(
    num_classes: int,
    num_neurons: int,
    batch_size: int,
    *,
    attribution: bool | str = False,
    device: jax.Device | None = None,
) -> dict:
    """:func:`memory_estimate`, refused before anything is allocated when it exceeds
    the device's memory.

    Raises:
      InputError: the estimate (by part) is larger than the device's memory;
        the message names both and what shrinks each part.
    """
    est = memory_estimate(num_classes, num_neurons, batch_size, attribution=attribution)
    have, where = _device_bytes(device or jax.local_devices()[0])
    if have and est["total"] > have:
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        raise InputError(
            f"a spectrum of {num_classes} classes x {num_neurons} neurons with batch "
            f"{batch_size} needs at least {gib(est['total'])} (counts {gib(est['spectrum'])}, "
            f"attribution sums {gib(est['attribution'])}, per batch {gib(est['batch'])}); "
            f"the {where} holds {gib(have)}: probe fewer layers or reduce conv channels "
            "(conv_reduce), use a smaller batch, or leave out attribution"
        )
    return est


def _empty(probe: Probe, threshold, attribution, classes, batch_size: int) -> Spectrum:
    """The zero spectrum of a run, after checking that the run fits the device."""
    rows = check_classes(classes, probe.num_classes)
    num_rows = probe.num_classes if rows is None else len(rows)
    check_memory(num_rows, probe.index.num_neurons, batch_size, attribution=attribution)
    return init_spectrum(probe.index, num_classes=probe.num_classes, threshold=threshold,
                         attribution=attribution, classes=classes)  # fmt: skip


# --------------------------------------------------------------------------- resume files


def _fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A cheap identity of a data set: shapes, every label, and a strided sample of inputs."""
    h = hashlib.sha256()
    h.update(repr((x.shape, str(x.dtype), y.shape)).encode())
    h.update(np.ascontiguousarray(y).tobytes())
    flat = x.reshape(len(x), -1)
    step = max(1, flat.shape[1] // 64)
    h.update(np.ascontiguousarray(flat[:, ::step]).tobytes())
    return h.hexdigest()[:32]


def _params_digest(params: Any) -> str:
    """The identity of a model's parameters: every leaf's path, shape, dtype and bytes,
    in the pytree's (fixed) order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)
        h.update(repr((jax.tree_util.keystr(path), a.shape, str(a.dtype))).encode())
        h.update(repr(leaf).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _run_identity(probe: Probe, params: Any, data_fingerprint: Any, spectrum: Spectrum):
    """Everything a resume file's counts depend on, but the batch size (counts are
    order-free): one JSON value per part, stored in the file's metadata."""
    index = probe.index
    return {
        "data_fingerprint": data_fingerprint,
        "params_digest": _params_digest(params),
        "layers": [[n, s] for n, s in zip(index.layer_names, index.layer_sizes, strict=True)],
        "input_shape": list(probe.input_shape),
        "num_classes": probe.num_classes,
        "values": probe.values,
        "conv_reduce": probe.conv_reduce,
        "threshold": spectrum.threshold,
        "attribution": None if spectrum.attribution is None else spectrum.attribution.linearised,
        # only when set: resume files of row-per-class runs stay as they were
        **({} if spectrum.classes is None else {"classes": list(spectrum.classes)}),
    }


def _resume_metadata(identity: dict, position: int, rows: int) -> dict:
    return {**identity, "position": position, "complete": position == rows}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _check_kind(where: str, meta: dict, identity: dict, *, streamed: bool) -> dict:
    """The resume file's ``meta`` after checking it is one of this kind of run: a
    streamed run's (``history``) or an in-memory run's (``position``); a file without
    ``classes`` counted every class in a row of its own."""
    if "classes" in identity and "classes" not in meta:
        meta = {**meta, "classes": None}
    ours, other = ("history", "position") if streamed else ("position", "history")
    if ours not in meta and other in meta:
        how = ("run over data in memory (compute_spectrum; spectrum without --stream)"
               if streamed else "streamed run (stream_spectrum; spectrum --stream)")  # fmt: skip
        raise InputError(f"{where}: it is the progress file of a {how}; resume it that way, "
                         "or delete it to start over")  # fmt: skip
    return meta


def _rows_text(classes: Any) -> str:
    """The rows a resume file or a run counts, for messages (a crafted value as it is)."""
    if classes is None:
        return "every class, one row each"
    if isinstance(classes, list) and all(type(c) is int for c in classes):
        return "all classes pooled in one row" if classes == [POOLED] else f"classes {classes}"
    return f"rows {classes!r}"


def _check_identity(where: str, meta: dict, identity: dict) -> None:
    """Raises naming the first part of ``identity`` the resume file's ``meta`` differs in."""
    for key, ours in identity.items():
        theirs = meta[key]
        if _same(theirs, ours):
            continue
        if key == "classes":
            raise InputError(f"{where}: it counted {_rows_text(theirs)}; this run counts {_rows_text(ours)}")  # fmt: skip
        if key == "data_fingerprint":
            raise InputError(
                f"{where}: it was computed on other data "
                f"(expected fingerprint {ours}, got {theirs})"
            )
        if key == "params_digest":
            raise InputError(
                f"{where}: it was computed with other parameters (digest {theirs} vs {ours})"
            )
        raise InputError(f"{where}: it was computed with {key} {theirs!r}, this run uses {ours!r}")


def _check_position(where: str, meta: dict, rows: int, saved: Spectrum) -> int:
    """The resume file's position, checked against the data, its counts and ``complete``."""
    try:
        position = check_int("position", meta["position"], lo=0, hi=rows)
    except InputError as e:
        raise type(e)(f"{where}: {e}") from None
    complete = meta["complete"]
    if not isinstance(complete, bool):
        raise InputError(
            f"{where}: complete must be true or false; got {type(complete).__name__} {complete!r}"
        )
    if saved.num_inputs != position:
        raise InputError(
            f"{where}: its counts cover {saved.num_inputs} inputs, its position says {position}"
        )
    if complete != (position == rows):
        raise InputError(f"{where}: complete is {complete} at position {position} of {rows}")
    return position


def _resume(path: Path, fresh: Spectrum, identity: dict, rows: int) -> tuple[Spectrum, int]:
    """The spectrum and position saved in the resume file ``path``, after checking that
    it belongs to this run (``fresh`` is the run's empty spectrum)."""
    saved, meta = load_spectrum(path, with_metadata=True)
    where = f"cannot resume from {path}"
    meta = _check_kind(where, meta, identity, streamed=False)
    keys = ("position", "complete", *identity)
    missing = [k for k in keys if k not in meta]
    if len(missing) == len(keys):
        raise InputError(
            f"{where}: it is not a resume file (its metadata lacks {missing}); expected the "
            "progress file of an interrupted run, or delete it to start over"
        )
    if missing:
        raise InputError(
            f"{where}: its metadata lacks {missing} (written by another version of "
            "deepfault-jax?); delete it to start over"
        )
    check_same_layout(fresh, saved, "resume")
    check_same_attribution(fresh, saved, f"resume from {path}")
    _check_identity(where, meta, identity)
    return saved, _check_position(where, meta, rows, saved)


# --------------------------------------------------------------------------- whole data sets


def _positive_int(name: str, value: Any) -> int:
    try:
        return check_int(name, value, lo=1)
    except InputError as e:
        raise type(e)(f"{name} must be a positive integer; got {value!r}") from None


def _check_run(probe: Any, checkpoint_path: Any, callback: Any, progress: Any) -> None:
    """The arguments every spectrum run shares, checked before any work."""
    if not isinstance(probe, Probe):
        raise InputTypeError(f"probe must be a deepfault_jax Probe; got {type(probe).__name__}")
    if checkpoint_path is not None:
        if not isinstance(checkpoint_path, str | os.PathLike):
            raise InputTypeError(f"checkpoint_path must be a path or None; got {type(checkpoint_path).__name__} {checkpoint_path!r}")  # fmt: skip
        if not os.fspath(checkpoint_path):
            raise InputError("checkpoint_path must name a file; got ''")
    for name, fn in (("callback", callback), ("progress", progress)):
        if fn is not None and not callable(fn):
            raise InputTypeError(f"{name} must be callable or None; got {type(fn).__name__} {fn!r}")  # fmt: skip


def _check_data(probe: Probe, x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1:] != probe.input_shape:
        raise InputError(
            f"x must have shape [n, {', '.join(map(str, probe.input_shape))}]; got {list(x.shape)}"
        )
    if y.ndim != 1:
        raise InputError(f"y must have shape [n]; got {list(y.shape)}")
    if len(x) != len(y):
        raise InputError(f"x and y must have the same length; got {len(x)} and {len(y)}")


def _clamp_batch(batch_size: int, rows: int, mesh: Mesh | None, multi: bool) -> tuple[int, int]:
    """The batch size, no larger than the data needs, and the rows of the largest process.

    A batch never holds more than the (largest process's) rows, rounded up to a
    multiple of the local device count; counts are order-free, so the clamped
    size gives the same spectrum.
    """
    local = 1 if mesh is None else _local_devices(mesh)
    if multi:
        from jax.experimental import multihost_utils

        both = np.asarray(multihost_utils.process_allgather(np.array([rows, local]))).reshape(-1, 2)
        rows, local = int(both[:, 0].max()), int(np.lcm.reduce(both[:, 1]))
    cap = max(1, -(-rows // local)) * local
    return min(batch_size, cap), rows


def _saver(
    path: Path | None,
    identity: dict | None,
    rows: int,
    start: int,
    batch_size: int,
    every: int,
    mesh: Mesh | None,
    callback: Callable[[int, Spectrum], None] | None,
) -> Callable[[int, Spectrum], None] | None:
    """The ``on_batch`` of :func:`compute_spectrum`: saves the resume file, calls back."""
    if path is None and callback is None:
        return None

    def after_batch(done: int, current: Spectrum) -> None:
        if path is not None and done % every == 0:
            position = min(rows, start + done * batch_size)
            local = _to_local(current) if mesh is not None else current
            save_spectrum(path, local, metadata=_resume_metadata(identity, position, rows))
        if callback is not None:
            callback(done, current)

    return after_batch


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
    progress: Progress | None = None,
    callback: Callable[[int, Spectrum], None] | None = None,
    classes: Sequence[int] | str | None = None,
) -> Spectrum:
    """The spectrum of a whole data set, resumable.

    Args:
      probe: the model's probe.
      params: its parameters.
      x: ``float32[n, *input_shape]``; with a multi-process mesh, this process's rows.
      y: ``int[n]`` true classes.
      batch_size: rows per step (per process); a multiple of the local device
        count. A size beyond the data is clamped to the rows (rounded up to a
        multiple of the local device count): the same spectrum, less memory.
      threshold: active means ``> threshold``, a finite number.
      attribution: also gather the :class:`Attribution` sums (as in :func:`accumulate_spectrum`).
      mesh: as in :func:`accumulate_spectrum`.
      checkpoint_path: if given, the spectrum and position are saved there
        (atomically) every ``checkpoint_every`` batches; a run started again
        with the same path continues from it and ends bit-identical to an
        uninterrupted run, with any batch size. The file records what its
        counts depend on (the data, the parameters, the probe's layers, values
        and conv reduction, the threshold, the attribution mode) and a run
        that differs in any of them refuses it. Single-process only.
      checkpoint_every: batches between saves, a positive integer.
      progress: as in :func:`accumulate_spectrum`.
      callback: called after each batch (after any save) with (batches done
        in this call, spectrum); an exception it raises stops the run, and a
        run with ``checkpoint_path`` resumes from the last save.
      classes: the rows, as in :func:`accumulate_spectrum` (``"pooled"`` or a class subset).

    Returns:
      The spectrum.

    Raises:
      InputError: ``x`` or ``y`` of the wrong shape; ``batch_size`` or
        ``checkpoint_every`` not a positive integer; a non-finite
        ``threshold``; a resume file that is damaged, crafted, or from
        another run (the message names the part that differs); and the
        errors of :func:`accumulate_spectrum`.
    """
    _check_run(probe, checkpoint_path, callback, progress)
    x, y = np.asarray(x), np.asarray(y)
    _check_data(probe, x, y)
    batch_size = _positive_int("batch_size", batch_size)
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    spectrum = _empty(probe, threshold, attribution, classes, max(1, min(batch_size, len(x))))
    multi = mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1
    if checkpoint_path is not None and multi:
        raise InputError("checkpoint_path is for single-process runs; got a multi-process mesh")
    batch_size, rows = _clamp_batch(batch_size, len(x), mesh, multi)
    start, identity = 0, None
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        identity = _run_identity(probe, params, _fingerprint(x, y), spectrum)
        if checkpoint_path.exists():
            spectrum, start = _resume(checkpoint_path, spectrum, identity, len(x))
    n_batches = -(-(rows - start) // batch_size)
    batches = (
        _padded_batches(x[start:], y[start:], batch_size, n_batches) if n_batches else iter(())
    )
    on_batch = _saver(checkpoint_path, identity, len(x), start, batch_size, checkpoint_every,
                      mesh, callback)  # fmt: skip
    result = accumulate_spectrum(probe, params, batches, spectrum=spectrum, mesh=mesh,
                                 progress=progress, total=n_batches, on_batch=on_batch)  # fmt: skip
    if checkpoint_path is not None:
        save_spectrum(checkpoint_path, result, metadata=_resume_metadata(identity, len(x), len(x)))
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


# --------------------------------------------------------------------------- streamed data sets


def process_blocks(rows: int, processes: int) -> list[tuple[int, int]]:
    """Each process's contiguous rows ``[lo, hi)``: an even split, the first
    ``rows % processes`` blocks one row longer (as grain's JAX-process sharding)."""
    return [(q * rows // processes, (q + 1) * rows // processes) for q in range(processes)]


def _process_file(path: Path, process: int, processes: int) -> Path:
    """Process ``process``'s resume file: ``path`` itself for one process, else
    ``STEM.process-I-of-N.SUFFIX`` beside it."""
    if processes == 1:
        return path
    return path.with_name(f"{path.stem}.process-{process}-of-{processes}{path.suffix}")


def _allgather(tree: Any) -> Any:
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


def _saved_state(path: Path, fresh: Spectrum, identity: dict, block: tuple[int, int]):
    """``(spectrum, history)`` of this process's resume file, or ``(None, [[0, lo]])``
    without one. ``history`` lists ``[inputs counted (all processes), position]``
    of every save, so that processes can agree on a common point."""
    lo, hi = block
    if not path.exists():
        return None, [[0, lo]]
    saved, meta = load_spectrum(path, with_metadata=True)
    where = f"cannot resume from {path}"
    meta = _check_kind(where, meta, identity, streamed=True)
    keys = ("history", *identity)
    missing = [k for k in keys if k not in meta]
    if missing:
        raise InputError(
            f"{where}: it is not the resume file of a streamed run (its metadata lacks "
            f"{missing}); delete it to start over"
        )
    check_same_layout(fresh, saved, "resume")
    check_same_attribution(fresh, saved, f"resume from {path}")
    _check_identity(where, meta, identity)
    history = meta["history"]
    ok = isinstance(history, list) and all(
        isinstance(h, list) and len(h) == 2 and all(type(v) is int for v in h) for h in history
    )
    if not ok or not history or history[0] != [0, lo]:
        raise InputError(f"{where}: its history must list [inputs, position] pairs from [0, {lo}]; got {history!r}")  # fmt: skip
    if history[-1][0] != saved.num_inputs or not lo <= history[-1][1] <= hi:
        raise InputError(
            f"{where}: its counts cover {saved.num_inputs} inputs at position {history[-1][1]} "
            f"of rows [{lo}, {hi}), its history says {history[-1]}"
        )
    return saved, history


def _agree(fresh: Spectrum, saved: Spectrum | None, history: list, multi: bool, where: Path):
    """The spectrum and history every process continues from: the save with the
    fewest inputs counted among the processes' latest ones (a process stopped
    between two processes' saves, or by a failed read, is behind or ahead by whole
    saves; all processes saved at that point), with this process's position there."""
    latest = history[-1][0]
    if not multi:
        return (fresh if saved is None else saved), history
    latests = _allgather(np.array([latest], np.int64)).reshape(-1)
    target, holder = int(latests.min()), int(latests.argmin())
    mine = [h for h in history if h[0] == target]
    ok = np.asarray(_allgather(np.array([bool(mine)])).reshape(-1))
    if not ok.all():
        raise InputError(
            f"cannot resume from {where} and its sibling files: process(es) "
            f"{np.flatnonzero(~ok).tolist()} never saved the point of {target} inputs that "
            f"process {holder} stopped at; delete the files to start over"
        )
    history = history[: history.index(mine[0]) + 1]
    if target == 0:
        return fresh, history
    ours = saved if saved is not None else fresh
    every = _allgather(ours)  # small: [classes, neurons] per process
    chosen = jax.tree.map(lambda a: jnp.asarray(a[holder]), every)
    return chosen, history


def stream_spectrum(
    probe: Probe,
    params: Any,
    source: Any,
    *,
    batch_size: int = 512,
    threshold: float = 0.0,
    attribution: bool | str = False,
    mesh: Mesh | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    progress: Progress | None = None,
    callback: Callable[[int, Spectrum], None] | None = None,
    threads: int = 2,
    prefetch: int = 4,
    classes: Sequence[int] | str | None = None,
) -> Spectrum:
    """The spectrum of a streamed data set (:class:`~deepfault_jax.sources.Source`), resumable,
    also over several processes.

    Rows are read a batch at a time through grain (worker threads read ahead);
    memory is the running counts plus a few batches, whatever the data size.
    With a ``mesh`` over several processes, process ``i`` of ``n`` reads the
    contiguous block :func:`process_blocks` gives it (every process opens the
    same source), and every process steps through the same number of batches
    (all-masked ones once its block is done).

    Resume: with ``checkpoint_path``, each process saves its position and the
    (global) counts every ``checkpoint_every`` batches to its own file
    (``checkpoint_path`` for one process, ``STEM.process-I-of-N.npz`` for
    several), with the history of its saves. Started again with the same
    arguments (any batch size), the processes agree on the latest point that
    all of them saved and continue from it; the result is bit-identical to an
    uninterrupted run. A read that fails mid-stream (a lost file, a corrupt
    record, a grain worker error) stops the run after saving the position of
    the last batch counted, so that the run resumes there. (With several
    processes the others then stop on their next collective; start all again.)

    Args:
      probe: the model's probe.
      params: its parameters (the same on every process).
      source: the data.
      batch_size: rows per step per process; a multiple of the local devices.
      threshold, attribution, mesh, progress: as in :func:`compute_spectrum`.
      checkpoint_path: the resume file (``.npz``), or None.
      checkpoint_every: batches between saves.
      callback: called after each batch with (batches done in this call, spectrum).
      threads, prefetch: grain reader threads and batches read ahead.
      classes: the rows, as in :func:`accumulate_spectrum` (``"pooled"`` or a class subset).

    Returns:
      The spectrum, as arrays on this process.

    Raises:
      InputError: the source's input shape or class count differs from the
        model's (both named); a bad batch size; a resume file of another run
        (the part that differs is named); a read that failed (its rows and
        reason named, and where the progress was saved); and the errors of
        :func:`accumulate_spectrum`.
    """
    from deepfault_jax.sources import Source, stream_batches

    _check_run(probe, checkpoint_path, callback, progress)
    if not isinstance(source, Source):
        raise InputTypeError(
            f"source must be a deepfault_jax.sources.Source; got {type(source).__name__}"
        )
    if source.input_shape != probe.input_shape:
        raise InputError(
            f"{source.name} has images of shape {source.input_shape}; the model expects "
            f"{probe.input_shape}"
        )
    if source.num_classes != probe.num_classes:
        raise InputError(
            f"{source.name} has {source.num_classes} classes; the model has "
            f"{probe.num_classes} logits"
        )
    batch_size = _positive_int("batch_size", batch_size)
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    threads = check_int("threads", threads, lo=1)
    prefetch = check_int("prefetch", prefetch, lo=1)
    # a batch never holds more than the rows: the memory check counts no more
    spectrum = _empty(probe, threshold, attribution, classes, max(1, min(batch_size, len(source))))
    processes = 1 if mesh is None else len({d.process_index for d in mesh.devices.flat})
    multi, me = processes > 1, (jax.process_index() if processes > 1 else 0)
    block = process_blocks(len(source), processes)[me]
    path, history = None, [[0, block[0]]]
    if checkpoint_path is not None:
        base = Path(checkpoint_path)
        path = _process_file(base, me, processes)
        identity = {
            **_run_identity(probe, params, source.identity(), spectrum),
            "processes": processes,
            "process": me,
        }
        saved, history = _saved_state(path, spectrum, identity, block)
        spectrum, history = _agree(spectrum, saved, history, multi, path)
    start = history[-1][1]
    left = block[1] - start
    if multi:
        left = int(_allgather(np.array([left], np.int64)).max())
    batch_size, _ = _clamp_batch(batch_size, max(left, 1), mesh, multi)  # as in memory
    n_batches = -(-left // batch_size)
    failure: list[BaseException] = []
    position = [start]

    def batches():
        it = stream_batches(source, start=start, stop=block[1], batch_size=batch_size,
                            n_batches=n_batches, threads=threads, prefetch=prefetch)  # fmt: skip
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:  # the reader's own: OSError, EOFError, grain's, corrupt data
                failure.append(e)
                return
            yield batch

    def save(current: Spectrum, complete: bool) -> None:
        local = _to_local(current) if mesh is not None else current
        point = [local.num_inputs, position[0]]
        if point != history[-1]:
            history.append(point)
        meta = {**identity, "history": history, "complete": complete}
        save_spectrum(path, local, metadata=meta)

    def after_batch(done: int, current: Spectrum) -> None:
        position[0] = min(block[1], start + done * batch_size)
        if path is not None and done % checkpoint_every == 0:
            save(current, False)
        if callback is not None:
            callback(done, current)

    result = accumulate_spectrum(probe, params, batches(), spectrum=spectrum, mesh=mesh,
                                 progress=progress, total=n_batches, on_batch=after_batch)  # fmt: skip
    if failure:
        e = failure[0]
        at = position[0]
        kept = "progress is not saved (pass checkpoint_path to keep it)"
        if path is not None:
            save(result, False)
            kept = f"progress to row {at} is saved in {path}; run again to resume"
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, InputError) else str(e)
        raise InputError(f"reading {source.name} failed after row {at}: {reason}; {kept}") from e
    if path is not None:
        position[0] = block[1]
        save(result, True)
    return result
