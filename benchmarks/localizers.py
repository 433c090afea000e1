"""Cost of every localizer against a count-spectrum pass and a forward pass, side by side.

For each model, the same inputs (real Fashion-MNIST when installed, else
uniform noise) go through:

* ``forward``: a jitted forward pass returning the logits only;
* ``counts``: ``compute_spectrum`` (the hit counts, what DeepFault's measures read);
* every localizer: ``localize_neurons(name, ...)``, each call from scratch (no pass shared).

Each is warmed up once (compilation excluded) and timed ``--repeats`` times;
the table gives the median seconds, the ratio to the count-spectrum pass and,
for the methods whose work grows with the neurons, the seconds per neuron.

    python benchmarks/localizers.py --quick
    python benchmarks/localizers.py --models mlp-3x50,lenet5 --inputs 2000 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from deepfault_jax import data, localizers, probe, streaming, zoo

sys.path.insert(0, str(Path(__file__).parent))
from spectrum import environment, inputs_for, timed, trained_params  # noqa: E402

MODELS = ("mlp-3x50", "lenet5")
#: Options that keep the exact methods' run short enough to time.
OPTIONS = {"refit": {"steps": 20, "inputs": 1024}}
PER_NEURON = {"ablation", "ablation_loss", "gain_ablation", "refit"}


def bench_model(name: str, *, n: int, batch_size: int, repeats: int, methods) -> dict:
    x, y, source = inputs_for(name, n)
    model = zoo.create_model(name, input_shape=x.shape[1:], num_classes=10)
    params = trained_params(model)
    prb = probe.model_probe(model, params)
    batches = list(data.iterate_batches(x, y, batch_size=batch_size))
    forward_fn = jax.jit(model.apply)
    neurons = prb.index.num_neurons

    def run_forward():
        out = None
        for b in batches:
            out = forward_fn(params, b.x)
        jax.block_until_ready(out)

    def run_counts():
        s = streaming.compute_spectrum(prb, params, x, y, batch_size=batch_size)
        jax.block_until_ready(s.a_pass)

    def runner(method):
        def run():
            localizers.localize_neurons(method, prb, params, x, y, batch_size=batch_size,
                                        **OPTIONS.get(method, {}))  # fmt: skip

        return run

    result = {"model": name, "data": source, "inputs": n, "batch_size": batch_size,
              "neurons": neurons, "impls": {}}  # fmt: skip
    result["impls"]["forward"] = timed(run_forward, repeats)
    result["impls"]["counts"] = timed(run_counts, repeats)
    for method in methods:
        costly = method in PER_NEURON
        result["impls"][method] = timed(runner(method), 1 if costly else repeats)
    counts = result["impls"]["counts"]["median_seconds"]
    for method, t in result["impls"].items():
        t["per_counts"] = t["median_seconds"] / counts
        if method in PER_NEURON:
            t["seconds_per_neuron"] = t["median_seconds"] / neurons
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    parser.add_argument("--inputs", type=int, default=2000, help="inputs (default 2000)")
    parser.add_argument("--batch-size", type=int, default=500, help="(default 500)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated localizers (default: every one but the count "
                             "measures beyond ochiai, dstar and tarantula)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="mlp-3x50, 512 inputs, 2 repeats")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    counts = set(localizers.localizer_names(family="counts")) - {"tarantula", "ochiai", "dstar"}
    methods = (
        [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.methods
        else [m for m in localizers.localizer_names() if m not in counts]
    )
    if args.quick:
        models, args.inputs, args.repeats = ["mlp-3x50"], 512, 2
    results = []
    for name in models:
        r = bench_model(name, n=args.inputs, batch_size=args.batch_size, repeats=args.repeats,
                        methods=methods)  # fmt: skip
        results.append(r)
        if not args.json:
            print(f"{name} ({r['neurons']} neurons, {r['inputs']} inputs)")
            for impl, t in r["impls"].items():
                extra = (
                    f"  {1000 * t['seconds_per_neuron']:.2f} ms/neuron"
                    if "seconds_per_neuron" in t
                    else ""
                )
                print(f"  {impl:<16} {t['median_seconds']:9.4f} s  x{t['per_counts']:8.1f}{extra}",
                      flush=True)  # fmt: skip
    report = {**environment("localizers"), "results": results}
    if args.json:
        json.dump(report, sys.stdout)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
