"""Planted-fault repair: how much of a planted accuracy drop does repairing k neurons recover?

For every trial (a zoo model trained on the data set, one fault of each kind
planted with faultbench v2's ``plant_faults``, its strength calibrated into a
window of accuracy drop), the same step budget is spent on:

* ``top-k METHOD``: the top k neurons of each localizer (localized on held-out
  training inputs), incoming weights, bias and outgoing weights;
* ``top-k METHOD (outgoing)``: the default localizer's top k, outgoing weights only;
* ``random k``: k random neurons (``--random-repeats`` draws, averaged);
* ``output layer`` and ``full fine-tuning``.

Data: drops are calibrated on the first half of the test split; the repair is
measured on the second half, which neither planting nor fitting sees; the
repair fits on the training split without its last ``--validation`` inputs,
which early-stop it and feed the localizer.

Reported per repair: ``recovered`` = (accuracy after - faulty) / (clean - faulty)
on the measure half (above 1 when the repair also improves what training left),
``restored`` = the share of the inputs the fault broke (right before it, wrong
after it) that the repair makes right again, ``broken`` = the share of inputs
right under the faulty model that the repair makes wrong, and parameters changed.

    python benchmarks/repair.py --quick
    python benchmarks/repair.py --out benchmarks/repair-planted
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from deepfault_jax import checkpoints, data, faultbench, localizers, repair, report
from deepfault_jax.faults import FAULT_FAMILIES, FAULT_KINDS, plant_faults
from deepfault_jax.localize import top_k_neurons


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp-3x50,mlp-5x30:leaky_relu")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--kinds", default=",".join(FAULT_KINDS))
    p.add_argument("--drops", default="0.005:0.01,0.01:0.05")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default="consensus,gradxact,grad_snr")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--random-repeats", type=int, default=2)
    p.add_argument("--validation", type=int, default=5000)
    p.add_argument("--localize-inputs", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="one model, three kinds, one window")
    p.add_argument("--out", default=None, help="directory for repair.json, repair.md, repair.png")
    p.add_argument("--report", metavar="JSON", help="only re-render a result file's tables")
    return p.parse_args(argv)


def _rates(prb, params, clean_pred, faulty_pred, x, y):
    pred = repair.predictions(prb, params, x)
    broke = (clean_pred == y) & (faulty_pred != y)
    right = faulty_pred == y
    return {
        "accuracy": float(np.mean(pred == y)),
        "restored": float(np.mean(pred[broke] == y[broke])) if broke.any() else float("nan"),
        "broken": float(np.mean(pred[right] != y[right])),
    }


def run_trial(key, model, params, prb, kind, drop, split, args, methods):
    (xp, yp), (xm, ym), fit, val, loc = split
    planting = plant_faults(key, model, params, prb, xp, yp, kind=kind, count=1, drop=drop,
                            tries=16)  # fmt: skip
    if not planting.faults:
        return None
    faulty = planting.params
    clean_pred = repair.predictions(prb, params, xm)
    faulty_pred = repair.predictions(prb, faulty, xm)
    clean_acc, faulty_acc = float(np.mean(clean_pred == ym)), float(np.mean(faulty_pred == ym))
    planted = planting.faults[0].neuron
    evidence = localizers.Evidence(prb, faulty, *loc)
    fit_options = {"steps": args.budget, "learning_rate": args.learning_rate,
                   "eval_every": min(25, args.budget), "patience": 4}  # fmt: skip
    total = repair.total_parameters(params)
    rows = {}

    def judge(name, view, fold):
        fitted = repair.fine_tune(jax.random.fold_in(key, fold), prb, faulty, view, fit, val,
                                  **fit_options)  # fmt: skip
        r = _rates(prb, fitted.params, clean_pred, faulty_pred, xm, ym)
        gap = clean_acc - faulty_acc
        r["recovered"] = (r["accuracy"] - faulty_acc) / gap if gap > 0 else float("nan")
        r["changed_share"] = repair.changed_parameters(faulty, fitted.params) / total
        r["seconds"] = fitted.seconds
        rows[name] = r

    for i, method in enumerate(methods):
        top = top_k_neurons(evidence.scores(method), args.k)
        judge(f"top-{args.k} {method}", repair.neuron_view(prb, faulty, top), 10 + i)
        rows[f"top-{args.k} {method}"]["found"] = bool(planted in set(top.tolist()))
        if i == 0:
            judge(f"top-{args.k} {method} (outgoing)",
                  repair.neuron_view(prb, faulty, top, part="outgoing"), 50)  # fmt: skip
    runs = []
    for r in range(args.random_repeats):
        ids = repair.random_neurons(jax.random.fold_in(key, 100 + r), prb.index.num_neurons,
                                    args.k)  # fmt: skip
        judge("_random", repair.neuron_view(prb, faulty, ids), 200 + r)
        runs.append(rows.pop("_random"))
    rows[f"random {args.k}"] = {k: float(np.nanmean([r[k] for r in runs])) for k in runs[0]}
    judge("output layer", repair.layer_view(faulty, layers=[repair.output_layer(faulty)]), 300)
    judge("full fine-tuning", repair.layer_view(faulty), 400)
    return {
        "kind": kind, "family": FAULT_FAMILIES[kind], "drop": list(drop), "neuron": planted,
        "clean": clean_acc, "faulty": faulty_acc, "repairs": rows,
    }  # fmt: skip


def summarize(trials):
    """Per repair: the mean of every per-trial figure, the pooled recovery (the summed gain
    over the summed planted drop: weak trials' tiny drops do not dominate it) and the median
    per-trial recovery."""
    names = list(trials[0]["repairs"])
    out = {}
    drop = sum(t["clean"] - t["faulty"] for t in trials)
    for name in names:
        vals = {k: [t["repairs"][name][k] for t in trials] for k in trials[0]["repairs"][name]}
        out[name] = {k: float(np.nanmean(np.asarray(v, float))) for k, v in vals.items()}
        gain = sum(t["repairs"][name]["accuracy"] - t["faulty"] for t in trials)
        out[name]["recovered_pooled"] = gain / drop if drop > 0 else float("nan")
        out[name]["recovered_median"] = float(np.nanmedian(vals["recovered"]))
    return out


def markdown(result) -> str:
    s = result["summary"]
    lines = [
        f"Planted-fault repair on {result['dataset']} ({result['trials']} trials: "
        f"{', '.join(result['config']['models'])}; {result['config']['budget']} steps each)",
        "",
        "| repair | recovered (pooled) | median | restored | broken | changed params "
        "| planted neuron among them |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        found = f"{100 * r['found']:.0f}%" if "found" in r else ""
        lines.append(f"| {name} | {100 * r['recovered_pooled']:.0f}% | "
                     f"{100 * r['recovered_median']:.0f}% | {100 * r['restored']:.0f}% | "
                     f"{100 * r['broken']:.1f}% | {100 * r['changed_share']:.2f}% | {found} |")  # fmt: skip
    lines += ["", "By kind, recovered (pooled):", ""]
    kinds = sorted({t["kind"] for t in result["per_trial"]})
    names = list(s)
    lines.append("| kind | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for kind in kinds:
        ts = [t for t in result["per_trial"] if t["kind"] == kind]
        drop = sum(t["clean"] - t["faulty"] for t in ts)
        cells = [f"{100 * sum(t['repairs'][n]['accuracy'] - t['faulty'] for t in ts) / drop:.0f}%"
                 for n in names]  # fmt: skip
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = list(s)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(names[::-1], [100 * s[n]["recovered_pooled"] for n in names[::-1]], color="tab:blue")
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.set_xlabel("share of the planted accuracy drop recovered, pooled over trials (%)")
    ax.set_title(f"Planted-fault repair, {result['dataset']}, {result['trials']} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    report.write_bytes(out / "repair.json", text.encode())
    report.write_bytes(out / "repair.md", markdown(result).encode())
    plot(result, out / "repair.png")


def main(argv=None):
    args = _args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        result["summary"] = summarize(result["per_trial"])
        print(markdown(result))
        write(result, Path(args.out or Path(args.report).parent))
        return
    models = args.models.split(",")
    kinds = args.kinds.split(",")
    drops = [tuple(float(v) for v in w.split(":")) for w in args.drops.split(",")]
    if args.quick:
        models, kinds, drops = models[:1], ["in_scale", "out_swap", "dying"], drops[1:]
    methods = args.methods.split(",")
    ds = data.load_dataset(args.dataset)
    half = len(ds.y_test) // 2
    n, v = len(ds.y_train), min(args.validation, len(ds.y_train) // 2)
    val = (ds.x_train[n - v :], ds.y_train[n - v :])
    split = ((ds.x_test[:half], ds.y_test[:half]), (ds.x_test[half:], ds.y_test[half:]),
             (ds.x_train[: n - v], ds.y_train[: n - v]), val,
             (val[0][: args.localize_inputs], val[1][: args.localize_inputs]))  # fmt: skip
    cfg = faultbench.FaultbenchConfig(dataset=args.dataset)
    trials, start = [], time.perf_counter()
    for spec in models:
        name, activation = faultbench._model_spec(spec)
        model, params, _ = checkpoints.load_or_train(name, ds, seed=0, activation=activation)
        prb = cfg.probe(model, params)
        for kind in kinds:
            for w, drop in enumerate(drops):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    key = faultbench._trial_key(seed, kind, w, 1, 0)
                    t = run_trial(key, model, params, prb, kind, drop, split, args, methods)
                    if t is not None:
                        trials.append({"model": spec, "seed": seed, **t})
                        best = t["repairs"][f"top-{args.k} {methods[0]}"]
                        print(f"{spec} {kind} {drop}: clean {t['clean']:.4f} faulty "
                              f"{t['faulty']:.4f} top-k recovered {best['recovered']:.2f} "
                              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    result = {
        "dataset": ds.name, "config": {**vars(args), "models": models, "kinds": kinds},
        "trials": len(trials), "summary": summarize(trials), "per_trial": trials,
        "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
        "versions": checkpoints.package_versions(),
    }  # fmt: skip
    text = markdown(result)
    print(text)
    if args.out:
        write(result, Path(args.out))


if __name__ == "__main__":
    main()
