"""Planted-fault repair: how much of a planted accuracy drop does repairing k neurons recover?

For every trial (a zoo model trained on the data set, one fault of each kind
planted with faultbench v2's ``plant_faults``, its strength calibrated into a
window of accuracy drop), the same step budget is spent on:

* ``top-k METHOD``: the top k neurons of each localizer (localized on held-out
  training inputs), incoming weights, bias and outgoing weights;
* ``top-k METHOD (outgoing)``: the default localizer's top k, outgoing weights only;
* ``top-k METHOD (search)`` with ``--search``: the default localizer's top k, repaired by
  differential evolution (:func:`deepfault_jax.search_repair`) on the same budget;
* ``random k``: k random neurons (``--random-repeats`` draws, averaged);
* ``output layer``, and ``full fine-tuning`` (at a tenth of the learning rate, as
  :func:`deepfault_jax.compare_repairs` runs it).

Data: drops are calibrated on the first half of the test split; the repair is
measured on the second half, which neither planting nor fitting sees; the
repair fits on the training split without its last ``--validation`` inputs,
which early-stop it and feed the localizer.

Reported per repair: ``recovered`` = (accuracy after - faulty) / (clean - faulty)
on the measure half (above 1 when the repair also improves what training left),
``restored`` = the share of the inputs the fault broke (right before it, wrong
after it) that the repair makes right again, ``broken`` = the share of inputs
right under the faulty model that the repair makes wrong, and parameters changed.
The same repairs of each clean model (the control) show what they gain without any
fault; ``recovered net of it`` subtracts that gain from every trial's before pooling.

    python benchmarks/repair.py --quick
    python benchmarks/repair.py --out benchmarks/repair-planted
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from deepfault_jax import checkpoints, data, faultbench, localizers, repair, repair_search, report
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
    p.add_argument("--search", action="store_true", help="also the search-based repair")
    p.add_argument("--quick", action="store_true", help="one model, three kinds, one window")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="directory for repair.json, repair.md, repair.png")
    p.add_argument("--report", metavar="JSON", help="only re-render a result file's tables")
    p.add_argument(
        "--add-control",
        action="store_true",
        help="with --report: compute the clean-model control of a result file",
    )
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


def _repairs(key, prb, start, evidence, split, args, methods, preds, planted=None):
    """Every repair of ``start`` (the faulty model, or the clean one as a control) on the same
    budget: ``{name: {accuracy, restored, broken, recovered, changed_share, seconds}}``."""
    (_, ym), fit, val = split[1], split[2], split[3]
    xm = split[1][0]
    clean_pred, start_pred = preds
    clean_acc, start_acc = float(np.mean(clean_pred == ym)), float(np.mean(start_pred == ym))
    fit_options = {"steps": args.budget, "learning_rate": args.learning_rate,
                   "eval_every": min(25, args.budget), "patience": 4}  # fmt: skip
    total = repair.total_parameters(start)
    rows = {}

    def judge(name, view, fold, how=repair.fine_tune):
        options = dict(fit_options)
        if how is not repair.fine_tune:  # the search has no learning rate
            options.pop("learning_rate")
        fitted = how(jax.random.fold_in(key, fold), prb, start, view, fit, val, **options)
        r = _rates(prb, fitted.params, clean_pred, start_pred, xm, ym)
        gap = clean_acc - start_acc
        r["recovered"] = (r["accuracy"] - start_acc) / gap if gap > 0 else float("nan")
        r["changed_share"] = repair.changed_parameters(start, fitted.params) / total
        r["seconds"] = fitted.seconds
        rows[name] = r

    for i, method in enumerate(methods):
        top = top_k_neurons(evidence.scores(method), args.k)
        judge(f"top-{args.k} {method}", repair.neuron_view(prb, start, top), 10 + i)
        if planted is not None:
            rows[f"top-{args.k} {method}"]["found"] = bool(planted in set(top.tolist()))
        if i == 0:
            judge(f"top-{args.k} {method} (outgoing)",
                  repair.neuron_view(prb, start, top, part="outgoing"), 50)  # fmt: skip
            if args.search:
                judge(f"top-{args.k} {method} (search)", repair.neuron_view(prb, start, top),
                      60, how=repair_search.search_repair)  # fmt: skip
    runs = []
    for r in range(args.random_repeats):
        ids = repair.random_neurons(jax.random.fold_in(key, 100 + r), prb.index.num_neurons,
                                    args.k)  # fmt: skip
        judge("_random", repair.neuron_view(prb, start, ids), 200 + r)
        runs.append(rows.pop("_random"))
    with warnings.catch_warnings():  # "restored" is NaN throughout for the clean control
        warnings.simplefilter("ignore", RuntimeWarning)
        rows[f"random {args.k}"] = {k: float(np.nanmean([r[k] for r in runs])) for k in runs[0]}
    judge("output layer", repair.layer_view(start, layers=[repair.output_layer(start)]), 300)
    fit_options["learning_rate"] = args.learning_rate / 10  # as compare_repairs does
    judge("full fine-tuning", repair.layer_view(start), 400)
    return rows


def run_trial(key, model, params, prb, kind, drop, split, args, methods):
    (xp, yp), (xm, ym) = split[0], split[1]
    planting = plant_faults(key, model, params, prb, xp, yp, kind=kind, count=1, drop=drop,
                            tries=16)  # fmt: skip
    if not planting.faults:
        return None
    faulty = planting.params
    preds = (repair.predictions(prb, params, xm), repair.predictions(prb, faulty, xm))
    planted = planting.faults[0].neuron
    evidence = localizers.Evidence(prb, faulty, *split[4])
    rows = _repairs(key, prb, faulty, evidence, split, args, methods, preds, planted)
    return {
        "kind": kind, "family": FAULT_FAMILIES[kind], "drop": list(drop), "neuron": planted,
        "clean": float(np.mean(preds[0] == ym)), "faulty": float(np.mean(preds[1] == ym)),
        "repairs": rows,
    }  # fmt: skip


def control(prb, params, split, args, methods) -> dict:
    """The same repairs of the clean model: what they gain without any fault (the models are
    trained for a fixed number of epochs, so some of every recovery is this)."""
    pred = repair.predictions(prb, params, split[1][0])
    evidence = localizers.Evidence(prb, params, *split[4])
    rows = _repairs(jax.random.key(12345), prb, params, evidence, split, args, methods,
                    (pred, pred))  # fmt: skip
    clean = float(np.mean(pred == split[1][1]))
    return {"clean": clean, "gain": {n: r["accuracy"] - clean for n, r in rows.items()}}


def _order(name: str) -> tuple:
    """Targeted repairs first, then random neurons, the output layer, full fine-tuning."""
    rank = 0 if name.startswith("top-") else 1 if name.startswith("random") else 2
    rank += name == "full fine-tuning"
    return rank, name


def summarize(trials, controls=None):
    """Per repair: the mean of every per-trial figure, the pooled recovery (the summed gain
    over the summed planted drop: weak trials' tiny drops do not dominate it), the median
    per-trial recovery, and with ``controls`` the pooled recovery net of the clean-model
    control (each trial's gain less what the same repair gains on its clean model: what
    the repair undoes of the fault itself, not what further training would give anyway)."""
    names = sorted(trials[0]["repairs"], key=_order)
    out = {}
    drop = sum(t["clean"] - t["faulty"] for t in trials)
    for name in names:
        vals = {k: [t["repairs"][name][k] for t in trials] for k in trials[0]["repairs"][name]}
        out[name] = {k: float(np.nanmean(np.asarray(v, float))) for k, v in vals.items()}
        gain = sum(t["repairs"][name]["accuracy"] - t["faulty"] for t in trials)
        out[name]["recovered_pooled"] = gain / drop if drop > 0 else float("nan")
        out[name]["recovered_median"] = float(np.nanmedian(vals["recovered"]))
        if controls and all(name in controls[t["model"]]["gain"] for t in trials):
            base = sum(controls[t["model"]]["gain"][name] for t in trials)
            out[name]["recovered_net"] = (gain - base) / drop if drop > 0 else float("nan")
    return out


def markdown(result) -> str:
    s = result["summary"]
    lines = [
        f"Planted-fault repair on {result['dataset']} ({result['trials']} trials: "
        f"{', '.join(result['config']['models'])}; {result['config']['budget']} steps each)",
        "",
        "| repair | recovered (pooled) | median | restored | broken | changed params "
        "| planted neuron among them | same repair of the clean model | recovered net of it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    controls = result.get("control", {})
    for name, r in s.items():
        found = f"{100 * r['found']:.0f}%" if "found" in r else ""
        gains = [c["gain"][name] for c in controls.values() if name in c["gain"]]
        gain = f"{100 * np.mean(gains):+.2f} points" if gains else ""
        net = f"{100 * r['recovered_net']:.0f}%" if "recovered_net" in r else ""
        lines.append(f"| {name} | {100 * r['recovered_pooled']:.0f}% | "
                     f"{100 * r['recovered_median']:.0f}% | {100 * r['restored']:.0f}% | "
                     f"{100 * r['broken']:.1f}% | {100 * r['changed_share']:.2f}% | {found} "
                     f"| {gain} | {net} |")  # fmt: skip
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


def _data(args):
    ds = data.load_dataset(args.dataset)
    half = len(ds.y_test) // 2
    n, v = len(ds.y_train), min(args.validation, len(ds.y_train) // 2)
    val = (ds.x_train[n - v :], ds.y_train[n - v :])
    split = ((ds.x_test[:half], ds.y_test[:half]), (ds.x_test[half:], ds.y_test[half:]),
             (ds.x_train[: n - v], ds.y_train[: n - v]), val,
             (val[0][: args.localize_inputs], val[1][: args.localize_inputs]))  # fmt: skip
    return ds, split


def _model(spec, ds, cfg):
    name, activation = faultbench._model_spec(spec)
    model, params, _ = checkpoints.load_or_train(name, ds, seed=0, activation=activation)
    return model, params, cfg.probe(model, params)


def _controls(args) -> dict:
    ds, split = _data(args)
    cfg = faultbench.FaultbenchConfig(dataset=args.dataset)
    out = {}
    for spec in args.models:
        _, params, prb = _model(spec, ds, cfg)
        out[spec] = control(prb, params, split, args, args.methods.split(","))
    return out


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
        if args.add_control:
            done = argparse.Namespace(
                **{**result["config"], "search": result["config"].get("search", False)}
            )
            result["control"] = _controls(done)
        result["summary"] = summarize(result["per_trial"], result.get("control"))
        print(json.dumps(result, sort_keys=True) if args.json else markdown(result))
        write(result, Path(args.out or Path(args.report).parent))
        return
    models = args.models.split(",")
    kinds = args.kinds.split(",")
    drops = [tuple(float(v) for v in w.split(":")) for w in args.drops.split(",")]
    if args.quick:
        models, kinds, drops = models[:1], ["in_scale", "out_swap", "dying"], drops[1:]
    methods = args.methods.split(",")
    ds, split = _data(args)
    cfg = faultbench.FaultbenchConfig(dataset=args.dataset)
    trials, controls, start = [], {}, time.perf_counter()
    for spec in models:
        model, params, prb = _model(spec, ds, cfg)
        controls[spec] = control(prb, params, split, args, methods)
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
        "trials": len(trials), "summary": summarize(trials, controls), "per_trial": trials,
        "control": controls,
        "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
        "versions": checkpoints.package_versions(),
    }  # fmt: skip
    print(json.dumps(result, sort_keys=True) if args.json else markdown(result))
    if args.out:
        write(result, Path(args.out))


if __name__ == "__main__":
    main()
