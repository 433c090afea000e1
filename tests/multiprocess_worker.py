"""One process of a two-process spectrum run over 127.0.0.1 (started by test_spectrum.py).

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz [ATTRIBUTION]
Each process holds 2 forced CPU devices and its own rows of the digits test split
(rows PROCESS_ID::NUM_PROCESSES); process 0 writes the global spectrum (with
attribution sums of that mode when ATTRIBUTION is given).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    attribution = sys.argv[5] if len(sys.argv) > 5 else False
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid
    )
    from deepfault_jax import data, probe, spectrum_io, streaming, zoo

    ds = data.load_dataset("digits")
    model = zoo.create_model("lenet1", input_shape=ds.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(7), model)  # the same on every process
    prb = probe.model_probe(model, params)
    mesh = streaming.data_mesh()
    assert mesh.devices.size == 2 * nproc, mesh
    result = streaming.compute_spectrum(
        prb, params, ds.x_test[pid::nproc], ds.y_test[pid::nproc], batch_size=32, mesh=mesh,
        attribution=attribution,
    )  # fmt: skip
    if pid == 0:
        spectrum_io.save_spectrum(out, result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
