"""Spectra at scale: many classes on a ResNet, a streamed set of 10^6 inputs, and processes.

Three parts, each side by side in one run (medians after a warm-up pass,
``block_until_ready``):

* ``classes``: a ResNet (default ``resnet18``) on 32x32x3 uniform noise with
  10, 100 and 1,000 classes: ``limit`` (a jitted forward pass returning the
  logits and every probed value: what any spectrum must compute), ``spectrum``
  (:func:`~deepfault_jax.streaming.accumulate_spectrum`, everything included)
  and ``attribution`` (the same with attribution sums); ratios to the limit and
  inputs per second. Random parameters: speed does not depend on training.
* ``stream``: 10^6 generated 8x8x1 inputs written once as a TFDS data set in
  array_record files (in a temporary directory, by TFDS's own builder), then
  :func:`~deepfault_jax.streaming.stream_spectrum` of mlp-3x50 over the first
  10^4, 10^5 and 10^6 rows, each in a fresh process: seconds per input and the
  process's peak RSS.
* ``processes``: the same streamed spectrum over an npz of ``--inputs`` rows
  (memory-mapped) in 1 process and in 2 processes over 127.0.0.1 (gloo), one
  CPU device each: wall time of the slowest process.

    python benchmarks/scale.py --quick                  # under a minute
    python benchmarks/scale.py --parts classes --inputs 512
    python benchmarks/scale.py --parts stream --rows 10000,100000,1000000
    python benchmarks/scale.py --parts processes --inputs 200000
    python benchmarks/scale.py --json > scale.json      # all parts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("classes", "stream", "processes")


def environment() -> dict:
    import jax

    return {
        "benchmark": "scale",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def timed(run, repeats: int) -> dict:
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times), "times_s": times}


# --------------------------------------------------------------------------- classes


def bench_classes(model_name: str, classes: list[int], n: int, batch_size: int, repeats: int):
    import jax
    import numpy as np

    from deepfault_jax import data, probe, streaming, zoo

    rng = np.random.default_rng(0)
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    rows = []
    for c in classes:
        y = rng.integers(0, c, n).astype(np.int32)
        model = zoo.create_model(model_name, input_shape=(32, 32, 3), num_classes=c)
        params = zoo.init_params(jax.random.key(0), model)
        prb = probe.model_probe(model, params)
        batches = list(data.iterate_batches(x, y, batch_size=batch_size))
        limit_fn = jax.jit(prb.flat)

        def run_limit(limit_fn=limit_fn, batches=batches, params=params):
            out = None
            for b in batches:
                out = limit_fn(params, b.x)
            jax.block_until_ready(out)

        def run_spectrum(prb=prb, params=params, batches=batches, attribution=False):
            s = streaming.accumulate_spectrum(prb, params, batches, attribution=attribution)
            jax.block_until_ready(s.a_pass)

        result = {"model": model_name, "classes": c, "neurons": prb.index.num_neurons,
                  "inputs": n, "batch_size": batch_size}  # fmt: skip
        result["limit"] = timed(run_limit, repeats)
        result["spectrum"] = timed(run_spectrum, repeats)
        result["attribution"] = timed(lambda r=run_spectrum: r(attribution=True), repeats)
        lim = result["limit"]["median_s"]
        for k in ("limit", "spectrum", "attribution"):
            result[k]["inputs_per_s"] = n / result[k]["median_s"]
        result["spectrum_vs_limit"] = lim / result["spectrum"]["median_s"]
        result["attribution_vs_limit"] = lim / result["attribution"]["median_s"]
        result["spectrum_bytes"] = 2 * c * prb.index.num_neurons * 4 + 2 * c * 4
        print(f"  {model_name} {c:5d} classes: spectrum/limit {result['spectrum_vs_limit']:.2f}, "
              f"attribution/limit {result['attribution_vs_limit']:.2f}, "
              f"{result['spectrum']['inputs_per_s']:.0f} inputs/s", file=sys.stderr)  # fmt: skip
        rows.append(result)
    return rows


# --------------------------------------------------------------------------- stream


def write_stream_set(data_dir: Path, rows: int) -> float:
    """A TFDS data set ``scale_stream`` (test split of ``rows`` 8x8x1 uint8 images,
    10 classes) in array_record files under ``data_dir``; the seconds it took."""
    import numpy as np
    import tensorflow_datasets as tfds

    class ScaleStream(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),  # fmt: skip
                supervised_keys=("image", "label"),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples(rows)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(0)
            chunk = 10_000
            for lo in range(0, n, chunk):
                k = min(chunk, n - lo)
                images = rng.integers(0, 256, (k, 8, 8, 1), dtype=np.uint8)
                labels = rng.integers(0, 10, k)
                for i in range(k):
                    yield lo + i, {"image": images[i], "label": int(labels[i])}

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress to stdout
        ScaleStream(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return time.perf_counter() - start


def stream_worker(data_dir: str, rows: int, batch_size: int, repeats: int = 1) -> dict:
    """Streamed spectra in this (fresh) process: the median of ``repeats`` passes
    after a warm-up, and the peak RSS."""
    os.environ["TFDS_DATA_DIR"] = data_dir
    import jax

    from deepfault_jax import probe, sources, streaming, zoo

    src = sources.open_source(f"tfds:scale_stream:test[:{rows}]")
    model = zoo.create_model("mlp-3x50", input_shape=src.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, params)
    warm = sources.ArraySource("warm-up", *src.read(0, min(rows, 64)), num_classes=10)
    streaming.stream_spectrum(prb, params, warm, batch_size=batch_size)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        s = streaming.stream_spectrum(prb, params, src, batch_size=batch_size, threads=2,
                                      prefetch=8)  # fmt: skip
        times.append(time.perf_counter() - start)
        assert s.num_inputs == rows, (s.num_inputs, rows)
    seconds = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"rows": rows, "seconds": seconds, "times_s": times,
            "us_per_input": 1e6 * seconds / rows, "peak_rss_bytes": peak}  # fmt: skip


def bench_stream(rows: list[int], batch_size: int, keep: str | None, repeats: int) -> dict:
    if keep:
        return _bench_stream(rows, batch_size, Path(keep), repeats)
    with tempfile.TemporaryDirectory(prefix="deepfault-scale-") as tmp:
        return _bench_stream(rows, batch_size, Path(tmp), repeats)


def _bench_stream(rows: list[int], batch_size: int, data_dir: Path, repeats: int) -> dict:
    top = max(rows)
    written = None
    if not (data_dir / "scale_stream").exists():
        print(f"  writing {top} inputs as array_record in {data_dir} ...", file=sys.stderr)
        written = write_stream_set(data_dir, top)
    results = []
    for n in rows:
        out = subprocess.run([sys.executable, __file__, "--stream-worker", str(data_dir), str(n),
                              str(batch_size), str(repeats)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"stream worker for {n} rows failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {n:8d} rows: {r['us_per_input']:.2f} us/input, peak RSS "
              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip
        results.append(r)
    base = results[0]["us_per_input"]
    for r in results:
        r["cost_vs_smallest"] = r["us_per_input"] / base
    by_rows = {r["rows"]: r for r in results}
    summary = {}
    if 100_000 in by_rows and 1_000_000 in by_rows:
        summary["rss_1e6_vs_1e5"] = (
            by_rows[1_000_000]["peak_rss_bytes"] / by_rows[100_000]["peak_rss_bytes"]
        )
    size = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    return {"rows": results, "write_s": written, "data_bytes": size, "batch_size": batch_size,
            **summary}  # fmt: skip


# --------------------------------------------------------------------------- processes


def process_worker(pid: int, nproc: int, port: int, npz: str, batch_size: int) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=nproc, process_id=pid)  # fmt: skip
    from deepfault_jax import probe, sources, streaming, zoo

    src = sources.open_source(f"npz:{npz}")
    model = zoo.create_model("mlp-3x50", input_shape=src.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, params)
    mesh = streaming.data_mesh() if nproc > 1 else None
    warm = sources.ArraySource("warm-up", *src.read(0, 64), num_classes=10)
    streaming.stream_spectrum(prb, params, warm, batch_size=batch_size, mesh=mesh)
    start = time.perf_counter()
    s = streaming.stream_spectrum(prb, params, src, batch_size=batch_size, mesh=mesh)
    seconds = time.perf_counter() - start
    result = {"process": pid, "seconds": seconds, "inputs": s.num_inputs}
    if nproc > 1:
        jax.distributed.shutdown()
    return result


def bench_processes(n: int, batch_size: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="deepfault-scale-") as tmp:
        npz = Path(tmp) / "rows.npz"
        x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        np.savez(npz, x_train=x[:10], y_train=np.arange(10), x_test=x,
                 y_test=rng.integers(0, 10, n))  # fmt: skip
        del x
        out = {}
        for nproc in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [subprocess.Popen([sys.executable, __file__, "--process-worker", str(i),
                                       str(nproc), str(port), str(npz), str(batch_size)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for i in range(nproc)]  # fmt: skip
            results = []
            for p in procs:
                o, e = p.communicate(timeout=1800)
                if p.returncode:
                    raise RuntimeError(f"process worker failed:\n{e[-3000:]}")
                results.append(json.loads(o.strip().splitlines()[-1]))
            wall = max(r["seconds"] for r in results)
            out[f"{nproc}_process"] = {"seconds": wall, "inputs_per_s": n / wall}
            print(f"  {nproc} process(es): {wall:.2f} s, {n / wall:.0f} inputs/s", file=sys.stderr)
    out["speedup_2_vs_1"] = out["1_process"]["seconds"] / out["2_process"]["seconds"]
    out["inputs"] = n
    out["batch_size"] = batch_size
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--stream-worker":
        print(json.dumps(stream_worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))))
        return 0
    if argv and argv[0] == "--process-worker":
        a = argv[1:]
        print(json.dumps(process_worker(int(a[0]), int(a[1]), int(a[2]), a[3], int(a[4]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated of " + ", ".join(PARTS)
    )
    p.add_argument("--model", default="resnet18")
    p.add_argument("--classes", default="10,100,1000")
    p.add_argument("--inputs", type=int, default=512, help="inputs of the classes part")
    p.add_argument("--batch-size", type=int, default=128, help="batch of the classes part")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", default="10000,100000,1000000", help="rows of the stream part")
    p.add_argument("--stream-batch", type=int, default=4096)
    p.add_argument("--stream-repeats", type=int, default=3, help="timed passes per size (median)")
    p.add_argument("--keep-data", default=None, help="directory to keep (and reuse) the "
                   "array_record set in, instead of a temporary one")  # fmt: skip
    p.add_argument("--process-inputs", type=int, default=200_000)
    p.add_argument("--process-batch", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--quick", action="store_true", help="tiny sizes, under a minute: resnet20 "
                   "at 10 and 100 classes, 2,000 and 5,000 streamed rows, 20,000 rows in processes")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.classes, a.inputs, a.batch_size, a.repeats = "resnet20", "10,100", 64, 32, 1
        a.rows, a.process_inputs, a.stream_repeats = "2000,5000", 20_000, 1
    parts = [s for s in a.parts.split(",") if s]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}; expected some of {', '.join(PARTS)}")
    result = {
        "environment": environment(),
        "command": "python benchmarks/scale.py " + " ".join(argv),
    }
    if "classes" in parts:
        classes = [int(c) for c in a.classes.split(",")]
        result["classes"] = bench_classes(a.model, classes, a.inputs, a.batch_size, a.repeats)
    if "stream" in parts:
        result["stream"] = bench_stream([int(r) for r in a.rows.split(",")], a.stream_batch,
                                        a.keep_data, a.stream_repeats)  # fmt: skip
    if "processes" in parts:
        result["processes"] = bench_processes(a.process_inputs, a.process_batch)
    if a.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
