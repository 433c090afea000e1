"""Spectrum throughput: deepfault-jax `accumulate` against the forward-pass limit.

For each model, one data set of Fashion-MNIST size (the real Fashion-MNIST test
or train split when installed, else uniform noise of the same shape) is streamed
in fixed-shape batches through

* ``limit``:   a jitted forward pass that returns the logits and every probed
               pre-activation (what any spectrum needs to compute), blocked on
               each batch's result;
* ``forward``: a jitted forward pass returning the logits only;
* ``ours``:    ``deepfault_jax.spectrum.accumulate`` (host checks of each batch,
               the forward pass, the counting, donated counts).

Each implementation is warmed up (compilation reported apart), then timed over
``--repeats`` full passes; the median samples per second and the ratios
ours / limit and ours / forward are reported, measured in the same run.

    python benchmarks/spectrum.py                 # mlp-3x50 and lenet5, 10k inputs
    python benchmarks/spectrum.py --quick         # under a minute
    python benchmarks/spectrum.py --json          # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import numpy as np

from deepfault_jax import data, probe, spectrum, zoo


def _inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if data.FASHION_MNIST_DIR.is_dir():
        ds = data.load_dataset("fashion-mnist")
        x = np.concatenate([ds.x_test, ds.x_train])[:n]
        y = np.concatenate([ds.y_test, ds.y_train])[:n]
        return x, y, "fashion-mnist"
    rng = np.random.default_rng(seed)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    return x, rng.integers(0, 10, n).astype(np.int32), "uniform noise 28x28x1"


def _time(run, repeats: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    run()  # warm-up: compiles
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return compile_and_first, times


def bench_model(name: str, x, y, *, batch_size: int, repeats: int) -> dict:
    model = zoo.create_model(name, input_shape=x.shape[1:], num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, params)
    n = len(x)
    batches = list(data.iterate_batches(x, y, batch_size=batch_size))

    limit_fn = jax.jit(prb.flat)
    forward_fn = jax.jit(model.apply)

    def run_limit():
        out = None
        for b in batches:
            out = limit_fn(params, b.x)
        jax.block_until_ready(out)

    def run_forward():
        out = None
        for b in batches:
            out = forward_fn(params, b.x)
        jax.block_until_ready(out)

    def run_ours():
        s = spectrum.accumulate(prb, params, batches)
        jax.block_until_ready(s)

    result = {
        "model": name,
        "inputs": n,
        "batch_size": batch_size,
        "neurons": prb.index.num_neurons,
    }
    for impl, run in (("limit", run_limit), ("forward", run_forward), ("ours", run_ours)):
        first, times = _time(run, repeats)
        median = statistics.median(times)
        result[impl] = {
            "samples_per_second": n / median,
            "median_seconds": median,
            "first_pass_seconds": first,
            "times": times,
        }
    ours = result["ours"]["samples_per_second"]
    result["ratio_ours_limit"] = ours / result["limit"]["samples_per_second"]
    result["ratio_ours_forward"] = ours / result["forward"]["samples_per_second"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp-3x50,lenet5", help="comma-separated zoo models")
    parser.add_argument("--inputs", type=int, default=10_000, help="data set size (default 10000)")
    parser.add_argument("--batch-size", type=int, default=1024, help="(default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--quick", action="store_true", help="2,048 inputs, 3 repeats")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.quick:
        args.inputs, args.repeats = 2048, 3
    x, y, source = _inputs(args.inputs, 0)
    results = [
        bench_model(m.strip(), x, y, batch_size=args.batch_size, repeats=args.repeats)
        for m in args.models.split(",")
    ]
    report = {
        "benchmark": "spectrum",
        "data": source,
        "inputs": len(x),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.local_devices()],
        "machine": platform.platform(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    if args.json:
        json.dump(report, sys.stdout)
        print()
        return 0
    print(f"spectrum throughput on {source}, {len(x)} inputs, batch {args.batch_size}, "
          f"{jax.default_backend()} ({report['devices'][0]}), median of {args.repeats}")  # fmt: skip
    print(f"{'model':<10} {'limit/s':>10} {'forward/s':>10} {'ours/s':>10} "
          f"{'ours/limit':>10} {'ours/fwd':>9} {'compile+1st (ours)':>19}")  # fmt: skip
    for r in results:
        print(
            f"{r['model']:<10} {r['limit']['samples_per_second']:>10.0f} "
            f"{r['forward']['samples_per_second']:>10.0f} {r['ours']['samples_per_second']:>10.0f} "
            f"{r['ratio_ours_limit']:>10.3f} {r['ratio_ours_forward']:>9.3f} "
            f"{r['ours']['first_pass_seconds']:>18.2f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
