"""One process of a two-process streamed spectrum run over 127.0.0.1 (test_sources.py).

Usage: python stream_worker.py PROCESS_ID NUM_PROCESSES PORT SPEC CHECKPOINT OUT
       [--die-at N] [--every N] [--batch-size B]

Each process holds 2 forced CPU devices, opens the data set SPEC for streaming
and reads its own block of rows; resume files go beside CHECKPOINT. With
--die-at N, each process kills itself (SIGKILL) after batch N. A read that
fails exits with code 3. Process 0 writes the spectrum to OUT.
"""

import argparse
import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("pid", "nproc", "port"):
        p.add_argument(name, type=int)
    p.add_argument("spec")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--die-at", type=int)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{a.port}", num_processes=a.nproc, process_id=a.pid
    )
    from deepfault_jax import probe, sources, spectrum_io, streaming, zoo
    from deepfault_jax.errors import InputError

    src = sources.open_source(a.spec)
    model = zoo.create_model("mlp-3x50", input_shape=src.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(3), model)  # the same on every process
    prb = probe.model_probe(model, params)
    mesh = streaming.data_mesh()

    def die(done, _):
        if done == a.die_at:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        result = streaming.stream_spectrum(
            prb, params, src, batch_size=a.batch_size, mesh=mesh, checkpoint_path=a.checkpoint,
            checkpoint_every=a.every, callback=die if a.die_at else None,
        )  # fmt: skip
    except InputError as e:
        print(e, file=sys.stderr, flush=True)
        os._exit(3)  # the peer is gone or going: no orderly shutdown
    if a.pid == 0:
        spectrum_io.save_spectrum(a.out, result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
