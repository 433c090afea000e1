"""Streaming spectra: a mesh, accumulation over batches, whole data sets, and resume."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepfault_jax.attribution import attribution_batch
from deepfault_jax.data import Batch, iterate_batches
from deepfault_jax.errors import InputError, InputTypeError
from deepfault_jax.kernels import MAX_BATCH, counts_and_nonfinite
from deepfault_jax.probe import Probe
from deepfault_jax.progress import Progress, notify
from deepfault_jax.spectrum import (
    MAX_COUNT,
    Spectrum,
    add_to_spectrum,
    check_same_attribution,
    check_same_layout,
    init_spectrum,
)
from deepfault_jax.spectrum_io import load_spectrum, save_spectrum

__all__ = [
    "accumulate_spectrum",
    "compute_spectrum",
    "data_mesh",
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
    if spectrum.attribution is None:
        logits, by_layer = probe(params, x)
        acts = [by_layer[name] for name in probe.index.layer_names]
    else:
        # all layers side by side ([batch, neurons]): one count matmul
        logits, acts, attribution = attribution_batch(
            probe, params, x, y, mask, spectrum.attribution.linearised
        )
    counts, bad = counts_and_nonfinite(logits, acts, y, mask, spectrum.threshold)
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
      progress: called as ``progress("spectrum", batches done, total)`` after each batch.
      total: number of batches, handed to ``progress``.
      on_batch: called after each batch with (batches done, spectrum).

    Returns:
      The spectrum, as arrays on this process.
    """
    num_classes = probe.num_classes if num_classes is None else int(num_classes)
    if num_classes != probe.num_classes:
        raise InputError(
            f"num_classes must match the model's {probe.num_classes} logits; got {num_classes}"
        )
    if spectrum is None:
        spectrum = init_spectrum(
            probe.index, num_classes=num_classes, threshold=threshold, attribution=attribution
        )
    elif spectrum.index != probe.index or spectrum.num_classes != num_classes:
        check_same_layout(
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
    done = 0
    for batch in batches:
        _check_batch(batch, probe, num_classes)
        rows = len(batch.y) * processes
        if rows > MAX_BATCH:
            raise InputError(
                f"batch must hold at most {MAX_BATCH} rows for exact counts; got {rows}"
            )
        if counted + rows > MAX_COUNT:
            raise InputError(
                f"counts would pass the int32 limit {MAX_COUNT}: {counted} inputs counted, "
                f"{rows} more in this batch; split the data and merge the spectra in int64"
            )
        counted += rows
        if mesh is None:
            spectrum, nonfinite = _step(
                spectrum, nonfinite, params, batch.x, batch.y, batch.mask, probe=probe
            )
        else:
            if len(batch.y) % local_devices:
                raise InputError(
                    f"batch size must be a multiple of the {local_devices} local devices of the mesh; "
                    f"got {len(batch.y)}"
                )
            x, y, mask = (
                jax.make_array_from_process_local_data(data_sharding, np.asarray(a))
                for a in (batch.x, batch.y, batch.mask)
            )
            spectrum, nonfinite = step(spectrum, nonfinite, params, x, y, mask)
        done += 1
        notify(progress, "spectrum", done, total)
        if on_batch is not None:
            _check_finite(nonfinite)  # never hand on (or save) counts of non-finite values
            on_batch(done, spectrum)
    _check_finite(nonfinite)
    return _to_local(spectrum) if mesh is not None else spectrum


def _check_finite(nonfinite: jax.Array) -> None:
    bad = int(np.asarray(nonfinite.addressable_data(0)))
    if bad:
        raise InputError(
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
    progress: Progress | None = None,
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
      attribution: also gather the :class:`Attribution` sums (as in :func:`accumulate_spectrum`).
      mesh: as in :func:`accumulate_spectrum`.
      checkpoint_path: if given, the spectrum and position are saved there
        (atomically) every ``checkpoint_every`` batches; a run started again
        with the same path, data and probe layout continues from it and ends
        bit-identical to an uninterrupted run. Single-process only.
      checkpoint_every: batches between saves.
      progress: as in :func:`accumulate_spectrum`.
      callback: called after each batch (after any save) with (batches done
        in this call, spectrum); an exception it raises stops the run, and a
        run with ``checkpoint_path`` resumes from the last save.

    Returns:
      The spectrum.
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise InputError(f"x and y must have the same length; got {len(x)} and {len(y)}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    if x.shape[1:] != probe.input_shape:
        raise InputError(
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
            raise InputError("checkpoint_path is for single-process runs; got a multi-process mesh")
        if int(checkpoint_every) < 1:
            raise InputError(f"checkpoint_every must be >= 1; got {checkpoint_every}")
        checkpoint_path = Path(checkpoint_path)
        fingerprint = _fingerprint(x, y)
        if checkpoint_path.exists():
            saved, meta = load_spectrum(checkpoint_path, with_metadata=True)
            check_same_layout(spectrum, saved, "resume")
            check_same_attribution(spectrum, saved, f"resume from {checkpoint_path}")
            if meta.get("data_fingerprint") != fingerprint:
                raise InputError(
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

    result = accumulate_spectrum(
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
