"""Spectrum throughput: deepfault-jax against the forward-pass limit, PyTorch and the original.

For each model, a data set (the real Fashion-MNIST for 28x28x1 models when
installed, else uniform noise; uniform noise of 32x32x3 for ``cifar-convnet``)
is streamed in fixed-shape batches through:

* ``limit``:         a jitted forward pass returning the logits and every probed
                     pre-activation (what any spectrum must compute);
* ``forward``:       a jitted forward pass returning the logits only;
* ``ours``:          ``deepfault_jax.spectrum.accumulate``, everything included;
* ``torch-eager``:   PyTorch (CPU) with forward hooks counting the same spectrum,
                     the same weights copied across;
* ``torch-compile``: the same step under ``torch.compile``;
* ``original``:      the original DeepFault's counting ported to Python/NumPy
                     (per input, per neuron, list membership tests) over
                     precomputed activations, at ``--original-sizes`` inputs,
                     against ``ours`` on the same inputs (forward pass included
                     for ours only).

Each implementation is warmed up (first pass, compilation included, reported
apart), then timed ``--repeats`` times; medians and ratios come from one run.
The PyTorch spectra are compared with ours cell by cell; cells that differ are
counted, with the largest |pre-activation| among the inputs whose activity
differs between the frameworks (values within float rounding of the threshold).

    python benchmarks/spectrum.py --quick
    python benchmarks/spectrum.py                       # all models, batch 1024
    python benchmarks/spectrum.py --batch-sizes 256,1024,4096 --json
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

from deepfault_jax import data, probe, streaming, training, zoo

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import peers  # noqa: E402

MODELS = ("mlp-3x50", "mlp-8x20", "lenet5", "cifar-convnet")
IMPLS = ("limit", "forward", "ours", "torch-eager", "torch-compile")


def inputs_for(name: str, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``n`` inputs and labels for ``name``'s input shape, and where they come from."""
    rng = np.random.default_rng(0)
    if name == "cifar-convnet":
        x = rng.random((n, 32, 32, 3), dtype=np.float32)
        return x, rng.integers(0, 10, n).astype(np.int32), "uniform noise 32x32x3"
    if data.FASHION_MNIST_DIR.is_dir():
        ds = data.load_dataset("fashion-mnist")
        x = np.concatenate([ds.x_test, ds.x_train])
        y = np.concatenate([ds.y_test, ds.y_train])
        reps = -(-n // len(x))
        return np.tile(x, (reps, 1, 1, 1))[:n], np.tile(y, reps)[:n], "fashion-mnist"
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    return x, rng.integers(0, 10, n).astype(np.int32), "uniform noise 28x28x1"


def environment(benchmark: str) -> dict:
    """The benchmark's name, the machine, the JAX backend and devices, and the date."""
    return {
        "benchmark": benchmark,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.local_devices()],
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": __import__("os").cpu_count(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
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
    return {"first_pass_seconds": first, "median_seconds": statistics.median(times), "times": times}


def trained_params(model):
    """Parameters trained briefly on the model's data, so that passing and failing inputs mix."""
    x, y, _ = inputs_for(model.name, 4096)
    ds = data.make_dataset("bench", x[:3072], y[:3072], x[3072:], y[3072:], num_classes=10)
    return training.train(jax.random.key(0), model, ds, epochs=1, batch_size=128).params


def bench_model(
    name: str, *, n: int, batch_size: int, repeats: int, impls, original_sizes, torch_device="cpu"
) -> dict:
    x, y, source = inputs_for(name, n)
    model = zoo.create_model(name, input_shape=x.shape[1:], num_classes=10)
    params = trained_params(model)
    prb = probe.model_probe(model, params)
    batches = list(data.iterate_batches(x, y, batch_size=batch_size))
    result = {"model": name, "data": source, "inputs": n, "batch_size": batch_size,
              "neurons": prb.index.num_neurons, "impls": {}}  # fmt: skip
    limit_fn, forward_fn = jax.jit(prb.flat), jax.jit(model.apply)

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

    ours_spectrum = {}

    def run_ours():
        ours_spectrum["s"] = jax.block_until_ready(
            streaming.accumulate_spectrum(prb, params, batches)
        )

    runners = {"limit": run_limit, "forward": run_forward, "ours": run_ours}
    torch_counts = {}
    if any(i.startswith("torch") for i in impls):
        import torch

        torch.set_num_threads(2)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        yt = torch.from_numpy(y.astype(np.int64))
        # fresh tensors: views at different storage offsets make torch.compile recompile
        tbatches = [
            (
                xt[i : i + batch_size].clone().to(torch_device),
                yt[i : i + batch_size].clone().to(torch_device),
            )
            for i in range(0, n, batch_size)
        ]
        tbatches = [
            tb for tb in tbatches if len(tb[1]) == batch_size
        ]  # full batches (the same work)
        for impl in ("torch-eager", "torch-compile"):
            if impl in impls:
                net, hidden, _ = peers.torch_model(model, params)
                net = net.to(torch_device)
                counter = peers.TorchSpectrum(net, hidden, 10, compile=impl == "torch-compile")
                counter.counts = counter.counts.to(torch_device)

                def run_torch(counter=counter, impl=impl):
                    counter.counts.zero_()
                    torch_counts[impl] = counter.run(tbatches).cpu().numpy().astype(np.int64)

                runners[impl] = run_torch
        result["torch_inputs"] = len(tbatches) * batch_size
    for impl in impls:
        timing = timed(runners[impl], repeats)
        rows = result.get("torch_inputs", n) if impl.startswith("torch") else n
        timing["samples_per_second"] = rows / timing["median_seconds"]
        result["impls"][impl] = timing
    ours = result["impls"]["ours"]["samples_per_second"]
    result["ratios"] = {
        f"ours/{impl}": ours / t["samples_per_second"]
        for impl, t in result["impls"].items()
        if impl != "ours"
    }
    if torch_counts:
        result["agreement"] = agreement(
            prb, params, x, y, ours_spectrum, torch_counts, result, batch_size
        )
    if original_sizes:
        result["original"] = bench_original(prb, params, name, original_sizes, batch_size)
    return result


def agreement(prb, params, x, y, ours_spectrum, torch_counts, result, batch_size) -> dict:
    """Cells where PyTorch's spectrum differs from ours, and why (values at the threshold)."""
    rows = result["torch_inputs"]
    s = streaming.compute_spectrum(prb, params, x[:rows], y[:rows], batch_size=batch_size)
    ours = np.concatenate([np.asarray(s.a_pass), np.asarray(s.a_fail)]).astype(np.int64)
    out = {}
    for impl, counts in torch_counts.items():
        differing = int((counts != ours).sum())
        entry = {"cells": int(ours.size), "differing_cells": differing}
        if differing:
            import torch

            net, hidden, _ = peers.torch_model(
                zoo.create_model(result["model"], input_shape=x.shape[1:], num_classes=10), params
            )
            counter = peers.TorchSpectrum(net, hidden, 10)
            t_acts = np.concatenate(
                counter.activations(
                    torch.from_numpy(np.ascontiguousarray(x[:rows].transpose(0, 3, 1, 2)))
                ),
                axis=1,
            )
            j_acts = np.asarray(prb.flat(params, x[:rows])[1])
            flips = (t_acts > 0) != (j_acts > 0)
            entry["inputs_with_flipped_activity"] = int(flips.any(axis=1).sum())
            entry["largest_abs_value_involved"] = float(
                max(np.abs(t_acts[flips]).max(), np.abs(j_acts[flips]).max())
            )
        out[impl] = entry
    return out


def bench_original(prb, params, name, sizes, batch_size) -> list[dict]:
    rows = []
    for size in sizes:
        x, y, _ = inputs_for(name, size)
        run = jax.jit(prb)
        parts = [run(params, b.x) for b in data.iterate_batches(x, y, batch_size=1024)]
        values = [
            np.concatenate([np.asarray(p[1][layer]) for p in parts])[:size]
            for layer in prb.index.layer_names
        ]
        pred = np.concatenate([np.asarray(p[0]) for p in parts])[:size].argmax(-1)
        start = time.perf_counter()
        counts = peers.original_counts(values, pred, y)
        original_seconds = time.perf_counter() - start
        batches = list(data.iterate_batches(x, y, batch_size=min(batch_size, size)))
        ours = timed(
            lambda b=batches: jax.block_until_ready(streaming.accumulate_spectrum(prb, params, b)),
            3,
        )
        s = streaming.accumulate_spectrum(prb, params, batches).pooled()
        same = np.array_equal(np.concatenate(counts[0]), np.asarray(s.a_s)) and np.array_equal(
            np.concatenate(counts[2]), np.asarray(s.a_f)
        )
        rows.append({
            "inputs": size,
            "original_seconds": original_seconds,
            "original_per_input_us": 1e6 * original_seconds / size,
            "ours_seconds": ours["median_seconds"],
            "ratio_ours_over_original": original_seconds / ours["median_seconds"],
            "same_counts": bool(same),
        })  # fmt: skip
    return rows


def print_result(r: dict, impls) -> None:
    line = f"{r['model']:<14} {r['batch_size']:>5} " + " ".join(
        f"{i} {r['impls'][i]['samples_per_second']:.0f}" for i in impls
    )
    ratios = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in r["ratios"].items())
    print(f"{line}\n    ours / x: {ratios}", flush=True)
    for impl, a in r.get("agreement", {}).items():
        extra = ""
        if a["differing_cells"]:
            extra = (f" ({a['inputs_with_flipped_activity']} inputs with a value at the threshold, "
                     f"largest |value| {a['largest_abs_value_involved']:.2g})")  # fmt: skip
        print(
            f"    {impl}: {a['differing_cells']} of {a['cells']} cells differ from ours{extra}",
            flush=True,
        )
    for o in r.get("original", []):
        print(f"    original counting at {o['inputs']} inputs: {o['original_seconds']:.2f} s "
              f"({o['original_per_input_us']:.0f} us/input), ours {o['ours_seconds'] * 1e3:.1f} ms: "
              f"{o['ratio_ours_over_original']:.0f}x; same counts: {o['same_counts']}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"of {', '.join(IMPLS)}")
    parser.add_argument(
        "--inputs", type=int, default=10_000, help="inputs per pass (default 10000)"
    )
    parser.add_argument("--batch-sizes", default="1024", help="comma-separated (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--original-sizes", default="1000,10000,60000",
                        help="data sizes for the original's counting, '' to skip")  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="mlp-3x50 and lenet5, 2048 inputs, under a minute"
    )
    parser.add_argument("--original-models", default="mlp-3x50,lenet5",
                        help="models whose original counting is timed")  # fmt: skip
    parser.add_argument("--torch-device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if "ours" not in impls:
        impls.append("ours")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impls must be among {', '.join(IMPLS)}; got {unknown}")
    skipped = peers.missing_peers()
    if "torch" in skipped and any(i.startswith("torch") for i in impls):
        impls = [i for i in impls if not i.startswith("torch")]
        print(
            f"note: torch skipped: {skipped['torch']}", file=sys.stderr if args.json else sys.stdout
        )
    sizes = [int(s) for s in args.original_sizes.split(",") if s.strip()]
    original_models = {m.strip() for m in args.original_models.split(",")}
    if args.quick:
        models, args.inputs, args.repeats, sizes = ["mlp-3x50", "lenet5"], 2048, 3, [1000]
    results = []
    first_bs = int(args.batch_sizes.split(",")[0])
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        for name in models:
            result = bench_model(
                name, n=args.inputs, batch_size=bs, repeats=args.repeats, impls=impls,
                original_sizes=sizes if bs == first_bs and name in original_models else [],
                torch_device=args.torch_device,
            )  # fmt: skip
            results.append(result)
            if not args.json:
                print_result(result, impls)
    report = {**environment("spectrum"), "results": results, "skipped_peers": skipped}
    if args.json:
        json.dump(report, sys.stdout)
        print()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
