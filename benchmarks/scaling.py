"""Spectrum scaling: batch size, data size (time and peak memory), forced CPU device count.

* throughput against batch size (``--batch-sizes``);
* time against data size: linear (time per input constant);
* peak resident memory against data size: flat. Each size runs in a fresh
  process that streams batches generated on the fly (nothing is held but the
  current batch and the counts), and reports its peak RSS;
* 1 against N forced CPU devices (``shard_map`` over a ``data`` mesh), each in a
  fresh process with ``--xla_force_host_platform_device_count=N``. On a 2-core
  machine this measures the overhead of splitting, not a speed-up.

    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def _stream(n: int, batch_size: int, shape, seed: int = 0):
    """Batches of uniform noise made on the fly (the data set never exists whole)."""
    from deepfault_jax.data import Batch

    rng = np.random.default_rng(seed)
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        x = np.zeros((batch_size, *shape), np.float32)
        x[:m] = rng.random((m, *shape), dtype=np.float32)
        y = np.zeros(batch_size, np.int32)
        y[:m] = rng.integers(0, 10, m)
        mask = np.zeros(batch_size, bool)
        mask[:m] = True
        yield Batch(x, y, mask)


def worker(args) -> dict:
    """One measurement in this process (a fresh one per size or device count)."""
    import jax

    from deepfault_jax import probe, streaming, zoo

    model = zoo.create_model(args.model, input_shape=(28, 28, 1), num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, params)
    mesh = streaming.data_mesh(devices=args.devices) if args.devices > 1 else None
    warm = streaming.accumulate_spectrum(
        prb, params, _stream(args.batch_size, args.batch_size, (28, 28, 1)), mesh=mesh
    )
    jax.block_until_ready(warm)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    s = streaming.accumulate_spectrum(
        prb, params, _stream(args.inputs, args.batch_size, (28, 28, 1)), mesh=mesh
    )
    jax.block_until_ready(s)
    seconds = time.perf_counter() - start
    return {
        "model": args.model,
        "inputs": args.inputs,
        "batch_size": args.batch_size,
        "devices": args.devices,
        "seconds": seconds,
        "samples_per_second": args.inputs / seconds,
        "peak_rss_mib_after_warmup": rss_before / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "counted": s.num_inputs,
    }


def _run_worker(model, inputs, batch_size, devices) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(devices, 1)}"
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--inputs", str(inputs),
           "--batch-size", str(batch_size), "--devices", str(devices)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp-3x50")
    parser.add_argument("--batch-sizes", default="64,256,1024,4096")
    parser.add_argument("--sizes", default="10000,30000,100000", help="data sizes (time, memory)")
    parser.add_argument("--devices", default="1,2,4,8", help="forced CPU device counts")
    parser.add_argument(
        "--inputs", type=int, default=30000, help="inputs for batch and device runs"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1024, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.worker:
        args.devices = int(args.devices)
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.batch_sizes, args.sizes, args.devices, args.inputs = (
            "256,1024",
            "5000,50000",
            "1,2",
            8192,
        )
    batch = [_run_worker(args.model, args.inputs, int(b), 1) for b in args.batch_sizes.split(",")]
    sizes = [_run_worker(args.model, int(n), 1024, 1) for n in args.sizes.split(",")]
    devices = [_run_worker(args.model, args.inputs, 1024, int(d)) for d in args.devices.split(",")]
    first, last = sizes[0], sizes[-1]
    report = {
        "benchmark": "scaling",
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "batch_sizes": batch,
        "data_sizes": sizes,
        "time_per_input_us": [1e6 * s["seconds"] / s["inputs"] for s in sizes],
        "data_ratio": last["inputs"] / first["inputs"],
        "peak_rss_ratio": last["peak_rss_mib"] / first["peak_rss_mib"],
        "devices": devices,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model}, samples/s against batch size:")
    for r in batch:
        print(f"  batch {r['batch_size']:>5}: {r['samples_per_second']:>10.0f}")
    print("time and peak memory against data size (streamed, batch 1024):")
    for r, us in zip(sizes, report["time_per_input_us"], strict=True):
        print(
            f"  {r['inputs']:>7} inputs: {r['seconds']:6.2f} s ({us:.2f} us/input), peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    print(f"  {report['data_ratio']:.0f}x the data: {report['peak_rss_ratio']:.3f}x the peak RSS")
    print("forced CPU devices (shard_map over a data mesh; 2 cores: overhead, not speed-up):")
    for r in devices:
        print(f"  {r['devices']} devices: {r['samples_per_second']:>10.0f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
