"""One process of a two-process checkpoint run over 127.0.0.1 (started by
test_multiprocess_checkpoints.py).

Usage: python multiprocess_checkpoint_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

WORKDIR holds ``original/`` (a lenet1 checkpoint for digits, saved by one process) and
``cache/models/lenet1-relu-digits-seed0/`` (the same checkpoint as a cached model). Each
process holds 2 forced CPU devices (gloo collectives) and:

1. loads ``original/`` with ``load_checkpoint`` and the cached model with
   ``load_or_train``, and checks that both hold the same parameters;
2. computes the spectrum of its rows of the digits test split (rows
   PROCESS_ID::NUM_PROCESSES) over a mesh of every process's devices; process 0 writes
   it to ``spectrum.npz``;
3. saves the parameters, replicated over that mesh, to ``saved/`` (process 0 writes,
   the others wait) and loads them back;
4. calls ``load_or_train`` on the empty cache ``fresh-cache/`` (process 0 trains, the
   others wait) and writes the digest of what it loaded to ``trained-PROCESS_ID.txt``.
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _same(a, b) -> bool:
    import numpy as np

    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _replicated(params, mesh):
    """``params`` as global arrays, whole on every device of every process."""
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec())

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, params)


def main() -> None:
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    work = Path(sys.argv[4])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid
    )
    from deepfault_jax import checkpoints, data, probe, spectrum_io, streaming

    ds = data.load_dataset("digits")
    # 1. load, directly and through the model cache
    model, params, _ = checkpoints.load_checkpoint(work / "original", model="lenet1")
    cached_model, cached, meta = checkpoints.load_or_train("lenet1", ds, cache_dir=work / "cache")
    assert cached_model.name == model.name, (cached_model, model)
    assert _same(params, cached), "load_checkpoint and load_or_train disagree"
    assert meta["checkpoint"] == str(work / "cache" / "models" / "lenet1-relu-digits-seed0")

    # 2. the spectrum over both processes
    mesh = streaming.data_mesh()
    assert mesh.devices.size == 2 * nproc, mesh
    result = streaming.compute_spectrum(
        probe.model_probe(model, cached), cached, ds.x_test[pid::nproc], ds.y_test[pid::nproc],
        batch_size=32, mesh=mesh,
    )  # fmt: skip
    if pid == 0:
        spectrum_io.save_spectrum(work / "spectrum.npz", result)

    # 3. save from every process (process 0 writes), then load back
    replicated = _replicated(cached, mesh)
    assert not jax.tree.leaves(replicated)[0].is_fully_addressable
    saved = checkpoints.save_checkpoint(work / "saved", model, replicated, metadata={"by": nproc})
    assert saved == work / "saved", saved
    _, again, meta = checkpoints.load_checkpoint(saved, model="lenet1")
    assert meta["by"] == nproc, meta
    assert _same(params, again), "the checkpoint saved by the processes holds other parameters"

    # 4. a model missing from the cache: process 0 trains it, every process loads it
    _, trained, meta = checkpoints.load_or_train("lenet1", ds, cache_dir=work / "fresh-cache")
    (work / f"trained-{pid}.txt").write_text(meta["params_digest"])
    print(f"process {pid}: ok", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
