"""Checkpoints (orbax parameters + ``model.json``) and the model cache.

A checkpoint directory holds ``model.json`` (``"format":
"deepfault-jax-checkpoint"``, the architecture, input shape, classes,
activation, a sha256 digest of the parameters and free metadata) and
``params/`` (orbax). It is written as one unit and replaces only an empty
directory or an earlier checkpoint; loading checks every key of ``model.json``,
restores the parameters against the architecture and verifies the digest.

Several processes (``jax.distributed``): every process holds the full
parameters. Saving gathers them to the host in every process; process 0 alone
writes the directory (atomically, as one process would), the others wait for it
at a barrier of the distributed runtime and then check that it holds their own
parameters. Loading reads the checkpoint in every process, independently of the
others (orbax without its cross-process synchronisation), as arrays on the
process's first local device; the spectrum code replicates them over its mesh.
:func:`load_or_train` trains a missing model in process 0 only; the others wait
and then load what it saved. The directory must be on a file system that every
process sees.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from deepfault_jax.data import Dataset
from deepfault_jax.errors import (
    InputError,
    InputTypeError,
    check_seed,
    describe_os_error,
    env_path,
)
from deepfault_jax.files import check_replaceable, replace_directory, write_atomic
from deepfault_jax.interrupts import deferred_interrupt
from deepfault_jax.progress import Progress
from deepfault_jax.training import train
from deepfault_jax.zoo import ACTIVATIONS, MODEL_NAMES, Model, create_model, init_params

__all__ = [
    "CHECKPOINT_FORMAT",
    "default_cache_dir",
    "is_checkpoint_dir",
    "load_checkpoint",
    "load_or_train",
    "package_versions",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "deepfault-jax-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_ENTRIES = frozenset({"model.json", "params"})


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "deepfault-jax",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "tensorflow-datasets",
        "scikit-learn",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _leaf_name(path: tuple) -> str:
    """A pytree path as ``dense_0/kernel`` (dict keys, attribute names, sequence indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _host_params(params: Any) -> Any:
    """``params`` with every array copied to the host (numpy), in every process.

    An array spread over several processes must be replicated: each process then
    holds all of it, and its local copy is taken.

    Raises:
      InputError: an array that no process holds whole (sharded), naming it.
    """

    def host(path: tuple, leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        raise InputError(
            f"parameter {_leaf_name(path)} must be replicated on every process to be saved; "
            f"got an array of shape {tuple(leaf.shape)} sharded as {leaf.sharding}"
        )

    return jax.tree_util.tree_map_with_path(host, params)


def _params_digest(params: Any) -> str:
    """``"sha256:<hex>"`` over every parameter array: its path, shape, dtype and bytes, in
    the order of the paths (so a dict's key order, and orbax's file layout, do not matter)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    named = sorted(((_leaf_name(path), leaf) for path, leaf in leaves), key=lambda item: item[0])
    digest = hashlib.sha256()
    for name, leaf in named:
        array = np.ascontiguousarray(jax.device_get(leaf))
        header = json.dumps([name, list(array.shape), array.dtype.str]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(array.tobytes())
    return f"sha256:{digest.hexdigest()}"


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`save_checkpoint`: its
    ``model.json`` carries the checkpoint format marker (as every version wrote it)
    and the directory holds nothing but ``model.json`` and ``params/``.

    :func:`save_checkpoint` replaces only such a directory (or an empty one), so a
    user's files are never deleted.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "model.json").read_text())
        names = {entry.name for entry in path.iterdir()}
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == CHECKPOINT_FORMAT
        and names <= _CHECKPOINT_ENTRIES
    )


def _this_process_only() -> Any:
    """orbax's options for a checkpointer that this process uses on its own: it is the
    primary host and the only active process, so orbax waits for no other process (its
    supported way to read or write from a subset of the processes of a distributed run)."""
    import orbax.checkpoint as ocp

    pid = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid})


#: Numbers the barriers of this module; every process passes the same ones in the same order.
_BARRIERS = itertools.count()
#: How long a process waits at a barrier for another to write a checkpoint, and to train.
_SAVE_WAIT_S = 600
_TRAIN_WAIT_S = 24 * 3600


def _wait_for_every_process(what: str, *, timeout_s: int) -> None:
    """A barrier of all processes (the distributed runtime's, through orbax): no device
    collective, so a process may wait for another that trains or writes for a long time.

    Raises:
      RuntimeError: the barrier failed (a process ended, or ``timeout_s`` passed).
    """
    import orbax.checkpoint as ocp

    key = f"deepfault_jax.checkpoints.{next(_BARRIERS)}"
    try:
        ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)
    except Exception as e:  # the runtime raises its own error types
        raise RuntimeError(
            f"process {jax.process_index()} of {jax.process_count()}: waiting for every "
            f"process {what} failed ({_error_text(e)})"
        ) from e


def _orbax_save(path: Path, params: Any) -> None:
    """Saves ``params`` to ``path`` with orbax, returning (or raising) only once orbax has
    stopped writing: after a failed save its background threads would otherwise go on
    creating files in a directory that is being removed."""
    import orbax.checkpoint as ocp

    before = set(threading.enumerate())
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
    try:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    except BaseException:
        with _QuietOrbax():  # its threads complain as the checkpointer closes under them
            checkpointer.close()
            _wait_for_new_threads(before, limit_s=5.0)
        raise
    checkpointer.close()


def _wait_for_new_threads(before: set[threading.Thread], *, limit_s: float) -> None:
    """Waits (at most ``limit_s``) until every thread not in ``before`` has ended."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        new = [t for t in threading.enumerate() if t not in before]
        if not new:
            return
        for thread in new:
            try:
                thread.join(timeout=0.05)
            except RuntimeError:  # started, but not running yet
                time.sleep(0.01)


def save_checkpoint(
    directory: str | os.PathLike, model: Model, params: Any, *, metadata: dict | None = None
) -> Path:
    """Saves ``params`` with orbax and a ``model.json`` describing ``model``.

    The directory is assembled beside its destination and renamed into place
    (:func:`~deepfault_jax.files.replace_directory`), so a reader never sees
    half a checkpoint. An existing destination is replaced only when it is an
    empty directory or an earlier checkpoint (:func:`is_checkpoint_dir`);
    anything else is refused and left untouched. ``model.json`` records a
    digest of the parameters (``params_digest``), checked on load.

    Under several processes (``jax.distributed``) every process calls this with
    the same, replicated parameters: process 0 writes the directory, the others
    wait for it and then check that it holds their parameters (its digest), so
    all of them return once the checkpoint is in place. ``directory`` must be on
    a file system that every process sees.

    Args:
      directory: destination; parent directories are created.
      model: the architecture the parameters belong to.
      params: the parameter pytree (arrays spread over processes must be replicated).
      metadata: extra JSON-ready facts (data set, seed, accuracy, ...); the
        keys this function writes itself take precedence.

    Returns:
      The absolute checkpoint directory.

    Raises:
      InputError: ``directory`` is an existing file, or a non-empty directory
        that is not a checkpoint (nothing is changed), or cannot be created; a
        parameter sharded over processes; under several processes, a
        checkpoint that process 0 did not write or that holds other parameters.
      InputTypeError: ``metadata`` is not JSON-ready.
      KeyboardInterrupt: Ctrl-C during the write; held until orbax has
        finished, then raised with nothing replaced.
      RuntimeError: under several processes, another process did not reach
        the barrier (it failed, or did not save).
    """
    host = _host_params(params)
    text, digest = _model_json(model, host, metadata)
    if jax.process_count() == 1:
        return _write_checkpoint(directory, host, text)
    # Every process refuses the same destination alike, before anyone waits for anyone.
    target = check_replaceable(directory, owned=is_checkpoint_dir, what="checkpoint directory")
    if jax.process_index() == 0:
        try:
            _write_checkpoint(target, host, text)
        finally:  # the others wait for this barrier, whether the write worked or not
            _wait_for_every_process(f"while process 0 saves {target}", timeout_s=_SAVE_WAIT_S)
        return target
    _wait_for_every_process(f"while process 0 saves {target}", timeout_s=_SAVE_WAIT_S)
    _check_written(target, digest)
    return target


def _model_json(model: Model, host_params: Any, metadata: dict | None) -> tuple[str, str]:
    """``model.json``'s text for ``model`` and its parameters, and their digest.

    Raises:
      InputTypeError: ``metadata`` is not JSON-ready.
    """
    digest = _params_digest(host_params)
    meta = {
        **(metadata or {}),
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": model.name,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "activation": model.activation,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params_digest": digest,
    }
    try:
        return json.dumps(meta, indent=2, sort_keys=True) + "\n", digest
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"metadata must be JSON-ready; got {metadata!r} ({e})") from None


def _save_here(
    directory: str | os.PathLike, model: Model, params: Any, metadata: dict | None
) -> Path:
    """:func:`save_checkpoint` by this process alone, whatever the other processes do."""
    host = _host_params(params)
    return _write_checkpoint(directory, host, _model_json(model, host, metadata)[0])


def _write_checkpoint(directory: str | os.PathLike, host_params: Any, text: str) -> Path:
    """Writes the checkpoint directory (this process alone): orbax ``params/`` and
    ``model.json`` (``text``), as one unit."""

    def fill(staging: Path) -> None:
        with deferred_interrupt():
            _orbax_save(staging / "params", host_params)
        write_atomic(staging / "model.json", text.encode())

    return replace_directory(directory, fill, owned=is_checkpoint_dir, what="checkpoint directory")


def _check_written(directory: Path, digest: str) -> None:
    """Checks, in a process other than 0, that process 0 left a checkpoint of this process's
    parameters (``digest``) at ``directory``.

    Raises:
      InputError: no checkpoint there, or one of other parameters.
    """
    pid = jax.process_index()
    try:
        meta = json.loads((directory / "model.json").read_text())
        saved = meta.get("params_digest") if isinstance(meta, dict) else None
    except (OSError, ValueError) as e:
        raise InputError(
            f"checkpoint {directory}: process 0 did not write it, as process {pid} sees it "
            f"(see process 0's error; the directory must be on a file system every process "
            f"sees) ({describe_os_error(e) if isinstance(e, OSError) else e})"
        ) from None
    if saved != digest:
        raise InputError(
            f"checkpoint {directory}: process 0 did not write process {pid}'s parameters: "
            f"parameter digest expected {digest}, got {saved} (every process must save the "
            "same parameters; else see process 0's error)"
        )


def _is_count(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


#: model.json keys: (required, check, what the check expects).
_META_KEYS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "model": (
        True,
        lambda v: isinstance(v, str) and v in MODEL_NAMES,
        f"one of {', '.join(MODEL_NAMES)}",
    ),
    "input_shape": (
        True,
        lambda v: isinstance(v, list) and len(v) == 3 and all(_is_count(d, 1) for d in v),
        "a list of 3 positive integers [height, width, channels]",
    ),
    "num_classes": (True, lambda v: _is_count(v, 2), "an integer >= 2"),
    "activation": (
        False,
        lambda v: isinstance(v, str) and v in ACTIVATIONS,
        f"one of {', '.join(ACTIVATIONS)}",
    ),
    "params_digest": (
        False,
        lambda v: isinstance(v, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", v) is not None,
        "'sha256:' followed by 64 hexadecimal digits",
    ),
}


def _read_model_json(directory: Path) -> dict:
    """The checkpoint's ``model.json``, every key this module relies on checked.

    Raises:
      InputError: a missing, unreadable or malformed file, naming it and the key.
    """
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise InputError(
            f"{directory} must be a checkpoint directory holding model.json; it does not"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{meta_path}: format must be {CHECKPOINT_FORMAT!r}; got {got!r}")
    for key, (required, check, expected) in _META_KEYS.items():
        if key not in meta:
            if required:
                raise InputError(f"{meta_path}: missing key {key!r} (expected {expected})")
        elif not check(meta[key]):
            shown = json.dumps(meta[key])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise InputError(f"{meta_path}: key {key!r} must be {expected}; got {shown}")
    return meta


def _error_text(error: BaseException) -> str:
    """The telling line of an orbax/TensorStore error: orbax's wrapper ("Encountered error
    while reading array index ... See full TensorStore details") gives way to its cause."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    chosen = next(
        (e for e in chain if str(e).strip() and "See full TensorStore details" not in str(e)),
        chain[0],
    )
    text = str(chosen).strip()
    line = text.splitlines()[0].split(" [tensorstore_spec")[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(chosen).__name__}: {line}" if line else type(chosen).__name__


class _QuietOrbax:
    """Keeps orbax's noise off stderr while it reads: its log lines (absl), the tasks its
    asyncio loop never retrieved ("Task exception was never retrieved", logged by asyncio as
    they are freed), and the errors its background threads report after a failed read
    ("Event loop is closed", "Exception ignored in <coroutine ...>", through
    ``sys.unraisablehook``). The failure itself reaches the caller as the text :meth:`call`
    returns. After a failure, exiting collects the leftovers and waits (at most 3 s) until
    the background threads have been silent for half a second."""

    _LOGGERS = ("absl", "asyncio")

    def __enter__(self) -> _QuietOrbax:
        self.failed = False
        self._strays: list[float] = []
        self._loggers = [logging.getLogger(name) for name in self._LOGGERS]
        self._levels = [logger.level for logger in self._loggers]
        self._hook = sys.unraisablehook
        for logger in self._loggers:
            logger.setLevel(logging.CRITICAL)
        sys.unraisablehook = lambda unraisable: self._strays.append(time.monotonic())
        return self

    def call(self, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        """``(fn(), None)``, or ``(None, what went wrong)`` when ``fn`` raises."""
        try:
            return fn(), None
        except Exception as e:  # orbax and TensorStore raise many types
            self.failed = True
            return None, _error_text(e)

    def __exit__(self, *exc_info) -> None:
        try:
            start = time.monotonic()
            while self.failed or self._strays or exc_info[0] is not None:
                gc.collect()  # coroutines left by a failed read report as they are freed
                now = time.monotonic()
                if now - max([start, *self._strays]) >= 0.5 or now - start >= 3.0:
                    break
                time.sleep(0.05)
        finally:
            sys.unraisablehook = self._hook
            for logger, level in zip(self._loggers, self._levels, strict=True):
                logger.setLevel(level)


def _leaf_shapes(tree: Any) -> list[tuple] | None:
    """The sorted ``(shape, dtype)`` of every array in ``tree``; ``None`` when a leaf tells
    neither (then the shapes are unknown, not different)."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: hasattr(a, "shape"))
    try:
        return sorted((tuple(a.shape), str(np.dtype(a.dtype))) for a in leaves)
    except (AttributeError, TypeError):
        return None


def _restore_params(directory: Path, arch: Model) -> Any:
    """The parameters in ``directory/params``, restored as ``arch``'s pytree.

    Each process reads on its own (no cross-process synchronisation), placing the
    arrays on its first local device, whatever devices or processes saved them.

    Raises:
      InputError: orbax cannot restore them; the message names orbax's reason and,
        only when orbax's metadata shows arrays of other shapes than ``arch``'s,
        both sets of shapes.
    """
    import orbax.checkpoint as ocp

    params_dir = directory / "params"
    failed = f"checkpoint {directory}: restoring the parameters from {params_dir} failed"
    if not params_dir.is_dir():
        raise InputError(f"{failed} ({'not a directory' if params_dir.exists() else 'missing'})")
    abstract = jax.eval_shape(lambda key: init_params(key, arch), jax.random.key(0))
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract)
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only())
    with _QuietOrbax() as quiet, checkpointer:
        params, failure = quiet.call(lambda: checkpointer.restore(params_dir, target))
        if failure is None:
            return params
        # Why? Blame the architecture only when orbax's metadata names other shapes.
        saved, unreadable = quiet.call(lambda: checkpointer.metadata(params_dir).item_metadata)
    expected = _leaf_shapes(abstract)
    saved = None if unreadable else _leaf_shapes(getattr(saved, "tree", saved))
    if saved and expected is not None and saved != expected:
        raise InputError(
            f"checkpoint {directory}: parameters do not fit {arch.name} with input "
            f"{arch.input_shape} and {arch.num_classes} classes: expected arrays {expected}, "
            f"got {saved} ({failure})"
        )
    raise InputError(f"{failed} ({failure})")


def _verify_digest(directory: Path, meta: dict, params: Any) -> None:
    """Checks the restored ``params`` against ``model.json``'s ``params_digest``.

    A checkpoint without a digest (written before digests existed) is loaded
    with a ``UserWarning``, not refused: it is the user's trained model, and
    saving it again adds the digest.
    """
    expected = meta.get("params_digest")
    if expected is None:
        warnings.warn(
            f"checkpoint {directory} has no parameter digest (written by an older "
            "deepfault-jax): its parameters are loaded unverified; save it again to add one",
            UserWarning,
            stacklevel=3,
        )
        return
    actual = _params_digest(params)
    if actual != expected:
        raise InputError(
            f"checkpoint {directory} is corrupt: parameter digest expected {expected}, got {actual}"
        )


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[Model, Any, dict]:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    The restored parameters are checked against the digest in ``model.json``.
    A checkpoint of an older version, which has no digest, loads with a
    ``UserWarning`` (its parameters unverified) rather than being refused.

    Args:
      directory: the checkpoint directory.
      model: if given, the architecture the caller expects.
      input_shape: if given, the input shape the caller expects.

    Returns:
      ``(model, params, metadata)``.

    Raises:
      InputError: a missing or unreadable checkpoint; a ``model.json`` with a
        missing or malformed key (the file and the key are named); parameters
        that do not fit the architecture, that orbax cannot restore (the
        reason is named), or whose digest differs (the checkpoint is corrupt);
        an architecture or input shape other than the expected one.
    """
    directory = Path(directory).expanduser().absolute()
    meta = _read_model_json(directory)
    saved_shape = tuple(meta["input_shape"])
    if model is not None and model != meta["model"]:
        raise InputError(
            f"checkpoint {directory} holds architecture {meta['model']!r}; expected {model!r}"
        )
    if input_shape is not None and tuple(int(d) for d in input_shape) != saved_shape:
        raise InputError(
            f"checkpoint {directory} was trained on input shape {saved_shape}; "
            f"expected {tuple(input_shape)}"
        )
    arch = create_model(
        meta["model"],
        input_shape=saved_shape,
        num_classes=meta["num_classes"],
        activation=meta.get("activation", "relu"),
    )
    params = _restore_params(directory, arch)
    _verify_digest(directory, meta, params)
    meta["checkpoint"] = str(directory)
    return arch, params, meta


# --------------------------------------------------------------------------- the model cache


def default_cache_dir() -> Path:
    """Where :func:`load_or_train` keeps trained models: ``$DEEPFAULT_JAX_CACHE`` or
    ``~/.cache/deepfault-jax`` (also when the variable is set but empty)."""
    value = env_path("DEEPFAULT_JAX_CACHE")
    return Path(value) if value is not None else Path.home() / ".cache" / "deepfault-jax"


def _cache_root(cache_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """The cache directory, and how a message names where it came from."""
    if cache_dir is not None:
        return Path(cache_dir), f"cache_dir must name a writable directory; got {str(cache_dir)!r}"
    value = env_path("DEEPFAULT_JAX_CACHE")
    if value is not None:
        return Path(value), f"DEEPFAULT_JAX_CACHE must name a writable directory; got {value!r}"
    root = default_cache_dir()
    return root, (
        f"the model cache must be a writable directory (set DEEPFAULT_JAX_CACHE to choose "
        f"another); got {str(root)!r}"
    )


def _check_cache_writable(models: Path, complaint: str) -> None:
    """Creates ``models`` and writes a temporary file there, or raises :class:`InputError`."""
    try:
        models.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=models):
            pass
    except OSError as e:
        raise InputError(f"{complaint} ({describe_os_error(e)})") from None


_SAVED_KEYS = ("format", "format_version", "model", "input_shape", "num_classes", "activation",
               "versions", "created", "params_digest", "checkpoint")  # fmt: skip


def _upgrade_cached(path: Path, name: str, dataset: Dataset) -> None:
    """A cached checkpoint written before parameter digests existed gets its digest added
    (the cache is the package's own), so it is verified from then on (this process alone)."""
    meta = json.loads((path / "model.json").read_text()) if is_checkpoint_dir(path) else {}
    if isinstance(meta, dict) and "params_digest" not in meta:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the digest is added right here
            model, params, meta = load_checkpoint(path, model=name, input_shape=dataset.input_shape)
        extra = {k: v for k, v in meta.items() if k not in _SAVED_KEYS}
        _save_here(path, model, params, extra)


def load_or_train(
    name: str,
    dataset: Dataset,
    *,
    seed: int = 0,
    activation: str = "relu",
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> tuple[Model, Any, dict]:
    """The cached model for (architecture, data set, activation, seed), trained on first use.

    Training uses the defaults of :func:`train` with ``jax.random.key(seed)``;
    the checkpoint is kept in ``cache_dir/models/`` (default
    :func:`default_cache_dir`). Before training, the cache is checked to be
    writable and the model's entry to be new, empty or a checkpoint.

    Under several processes (``jax.distributed``) every process calls this
    alike: process 0 alone trains a missing model (reporting to ``progress``)
    and saves it, while the others wait at a barrier; then every process loads
    the same checkpoint, so all hold the same parameters (training in every
    process would cost as much and could differ from machine to machine). The
    cache must be on a file system that every process sees.

    Returns:
      ``(model, params, metadata)`` as :func:`load_checkpoint`.

    Raises:
      InputError: a bad name, activation or seed (an integer in
        ``[0, 2**63 - 1]``); a cache that cannot be written (naming
        ``DEEPFAULT_JAX_CACHE`` or ``cache_dir`` and its value); a cache entry
        that holds other files; or a cached checkpoint that fails to load;
        under several processes, in processes other than 0, a model that
        process 0 did not provide (its own error says why).
      RuntimeError: under several processes, a process did not reach the
        barrier within a day.
    """
    seed = check_seed(seed)
    model = create_model(
        name,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        activation=activation,
    )
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in dataset.name).strip("-")
    root, complaint = _cache_root(cache_dir)
    path = root / "models" / f"{name}-{activation}-{slug}-seed{seed}"

    def provide() -> None:
        """Leaves a checkpoint with a digest at ``path`` (this process alone)."""
        if (path / "model.json").is_file():
            _upgrade_cached(path, name, dataset)
            return
        _check_cache_writable(root / "models", complaint)
        check_replaceable(path, owned=is_checkpoint_dir, what="cached model directory")
        result = train(jax.random.key(seed), model, dataset, progress=progress)
        meta = {
            "dataset": dataset.name,
            "seed": seed,
            "epochs": len(result.history),
            "test_accuracy": result.test_accuracy,
        }
        _save_here(path, model, result.params, meta)

    pid = jax.process_index()
    if jax.process_count() == 1:
        provide()
    elif pid == 0:
        try:
            provide()
        finally:  # the others wait for this barrier, whether it worked or not
            _wait_for_every_process(
                f"while process 0 provides the cached model {path}", timeout_s=_TRAIN_WAIT_S
            )
    else:
        _wait_for_every_process(
            f"while process 0 provides the cached model {path}", timeout_s=_TRAIN_WAIT_S
        )
        if not (path / "model.json").is_file():
            raise InputError(
                f"cached model {path}: process 0 did not provide it, as process {pid} sees it "
                "(see process 0's error; the cache must be on a file system every process sees)"
            )
    return load_checkpoint(path, model=name, input_shape=dataset.input_shape)
