"""Cost of the attribution pass: against the count-only spectrum and the forward-only limit.

For each model, the same inputs (real Fashion-MNIST for 28x28x1 models when
installed, else uniform noise; uniform 32x32x3 noise for ``cifar-convnet``)
stream in fixed-shape batches through:

* ``forward``:     a jitted forward pass returning the logits only (forward-only);
* ``limit``:       a jitted forward pass returning the logits and the probed values;
* ``counts``:      ``streaming.accumulate_spectrum`` (hit counts only);
* ``attribution``: ``streaming.accumulate_spectrum(..., attribution=True)`` (counts, activation
                   sums, gradient x activation and linearised ablation: one forward
                   and one backward pass per class);
* ``ablation``:    exact single-neuron ablation (``ablation.exact_ablation``) on
                   ``--ablation-inputs`` inputs, reported per input, for scale.

Each is warmed up (compilation excluded) and timed ``--repeats`` times; the
medians and ratios come from one run.

    python benchmarks/attribution.py --quick
    python benchmarks/attribution.py --models mlp-3x50,lenet5 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from deepfault_jax import ablation, data, probe, streaming, zoo

sys.path.insert(0, str(Path(__file__).parent))
from spectrum import environment, inputs_for, timed, trained_params  # noqa: E402

MODELS = ("mlp-3x50", "mlp-8x20", "lenet5", "cifar-convnet")


def bench_model(name: str, *, n: int, batch_size: int, repeats: int, ablation_inputs: int) -> dict:
    x, y, source = inputs_for(name, n)
    model = zoo.create_model(name, input_shape=x.shape[1:], num_classes=10)
    params = trained_params(model)
    prb = probe.model_probe(model, params)
    batches = list(data.iterate_batches(x, y, batch_size=batch_size))
    limit_fn, forward_fn = jax.jit(prb.flat), jax.jit(model.apply)

    def stream(fn):
        def run():
            out = None
            for b in batches:
                out = fn(params, b.x)
            jax.block_until_ready(out)

        return run

    def run_counts():
        jax.block_until_ready(streaming.accumulate_spectrum(prb, params, batches))

    def run_attribution():
        jax.block_until_ready(streaming.accumulate_spectrum(prb, params, batches, attribution=True))

    runners = {
        "forward": stream(forward_fn),
        "limit": stream(limit_fn),
        "counts": run_counts,
        "attribution": run_attribution,
    }
    result = {"model": name, "data": source, "inputs": n, "batch_size": batch_size,
              "neurons": prb.index.num_neurons, "impls": {}}  # fmt: skip
    for impl, run in runners.items():
        t = timed(run, repeats)
        t["samples_per_second"] = n / t["median_seconds"]
        result["impls"][impl] = t
    if ablation_inputs:
        xa, ya = x[:ablation_inputs], y[:ablation_inputs]

        def run_ablation():
            ablation.exact_ablation(prb, params, xa, ya, batch_size=min(batch_size, 512))

        t = timed(run_ablation, 1)
        t["samples_per_second"] = ablation_inputs / t["median_seconds"]
        t["inputs"] = ablation_inputs
        result["impls"]["ablation"] = t
    sps = {k: v["samples_per_second"] for k, v in result["impls"].items()}
    result["ratios"] = {
        "attribution/forward": sps["attribution"] / sps["forward"],
        "attribution/limit": sps["attribution"] / sps["limit"],
        "attribution/counts": sps["attribution"] / sps["counts"],
        "counts/limit": sps["counts"] / sps["limit"],
    }
    if "ablation" in sps:
        result["ratios"]["ablation/attribution"] = sps["ablation"] / sps["attribution"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    parser.add_argument(
        "--inputs", type=int, default=10_000, help="inputs per pass (default 10000)"
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="(default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--ablation-inputs", type=int, default=1000,
                        help="inputs for the exact ablation, 0 to skip (default 1000)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="mlp-3x50 and lenet5, 2048 inputs, under a minute")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        models, args.inputs, args.repeats, args.ablation_inputs = (
            ["mlp-3x50", "lenet5"],
            2048,
            3,
            256,
        )
    results = []
    for name in models:
        r = bench_model(name, n=args.inputs, batch_size=args.batch_size, repeats=args.repeats,
                        ablation_inputs=args.ablation_inputs)  # fmt: skip
        results.append(r)
        if not args.json:
            sps = " ".join(f"{k} {v['samples_per_second']:.0f}" for k, v in r["impls"].items())
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
            print(f"{name:<14} {args.batch_size:>5} samples/s: {sps}\n    {ratios}", flush=True)
    report = {**environment("attribution"), "results": results}
    if args.json:
        json.dump(report, sys.stdout)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
