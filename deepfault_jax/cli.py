"""The ``deepfault-jax`` command line.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the
expected and the actual value, no traceback); 1 an internal error.
Every command takes ``--json``: one JSON object on stdout with the result;
progress bars and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from deepfault_jax.errors import InputError, parse_int_list, parse_names

__all__ = ["main"]


class UsageError(InputError):
    """Bad command-line usage (exit code 2); ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str = "deepfault-jax"):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, raised not printed."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(message, self.prog)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _emit(args: argparse.Namespace, result: dict, human: Sequence[str]) -> None:
    if args.json:
        json.dump(result, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for line in human:
            print(line)
    sys.stdout.flush()


def _check_out_dir(path: str) -> Path:
    """Fails early (before any long work) when ``path`` cannot hold an output directory."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a directory path; got existing file {str(out)!r}")
    _check_writable(out, out if out.is_dir() else out.parent)
    return out


def _check_writable(out: Path, directory: Path) -> None:
    """Creates ``directory`` and writes a temporary file there, or raises a UsageError naming ``out``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(
            f"--out must be a writable location; got {str(out)!r} ({e.strerror or e})"
        ) from None


class _Bars:
    """A progress callback (``progress(stage, done, total)``) drawing one tqdm bar per stage
    on stderr; off when stderr is not a terminal."""

    def __init__(self) -> None:
        self._bars: dict = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(stage)
        if bar is None or done < bar.n:  # a new round of this stage
            if bar is not None:
                bar.close()
            bar = self._bars[stage] = tqdm(total=total, desc=stage, leave=False, disable=None)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
            del self._bars[stage]


def _progress(args: argparse.Namespace) -> _Bars | None:
    """The progress callback of a command: bars unless ``--no-progress``."""
    return None if args.no_progress else _Bars()


def _slug(spec: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec)
    return keep.strip("-") or "data"


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    import jax

    from deepfault_jax import data, zoo

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1; got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {args.batch_size}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0; got {args.learning_rate}")
    out_arg = args.out or os.path.join(
        "runs", f"{args.model}-{_slug(args.dataset)}-seed{args.seed}"
    )
    out = _check_out_dir(out_arg)
    dataset = data.load_dataset(args.dataset)
    model = zoo.create_model(
        args.model,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        activation=args.activation,
    )
    epochs = zoo.default_epochs(dataset) if args.epochs is None else args.epochs
    summary = dataset.summary()
    if not args.json:
        h, w, c = dataset.input_shape
        print(
            f"training {model.name} ({model.activation}) on {dataset.name}: "
            f"{summary['num_train']} train / {summary['num_test']} test images of {h}x{w}x{c}, "
            f"{dataset.num_classes} classes; {epochs} epochs, seed {args.seed}",
            flush=True,
        )
    result = zoo.train(
        jax.random.key(args.seed),
        model,
        dataset,
        epochs=epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        progress=not args.no_progress,
    )
    checkpoint = zoo.save_checkpoint(
        out,
        model,
        result.params,
        metadata={
            "dataset": dataset.name,
            "seed": args.seed,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "test_accuracy": result.test_accuracy,
        },
    )
    report = {
        "model": model.name,
        "activation": model.activation,
        "dataset": dataset.name,
        "seed": args.seed,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "num_train": summary["num_train"],
        "num_test": summary["num_test"],
        "input_shape": summary["input_shape"],
        "num_classes": summary["num_classes"],
        "test_accuracy": result.test_accuracy,
        "train_seconds": round(result.seconds, 3),
        "history": result.history,
        "checkpoint": str(checkpoint),
    }
    n_test = summary["num_test"]
    correct = round(result.test_accuracy * n_test)
    _emit(
        args,
        report,
        [
            f"test accuracy {result.test_accuracy:.4f} ({correct}/{n_test}) "
            f"after {epochs} epochs in {result.seconds:.1f} s",
            f"checkpoint {checkpoint}",
        ],
    )
    return 0


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--layers must name at least one layer; got {text!r}")
    return items


def _check_out_file(path: str, suffix: str) -> Path:
    """Fails early when ``path`` cannot be written (its directory is created)."""
    out = Path(path).expanduser()
    if out.suffix != suffix:
        raise UsageError(f"--out must end in {suffix}; got {str(out)!r}")
    if out.is_dir():
        raise UsageError(f"--out must be a file path; got existing directory {str(out)!r}")
    _check_writable(out, out.parent)
    return out


def _cmd_spectrum(args: argparse.Namespace) -> int:
    import time

    from deepfault_jax import data, probe, spectrum_io, streaming, zoo
    from deepfault_jax import spectrum as spectrum_lib

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.devices < 1:
        raise UsageError(f"--devices must be >= 1; got {args.devices}")
    mesh = streaming.data_mesh(devices=args.devices) if args.devices > 1 else None
    if args.batch_size % args.devices:
        raise UsageError(
            f"--batch-size must be a multiple of --devices ({args.devices}); got {args.batch_size}"
        )
    if args.save_every is not None and args.save_every < 1:
        raise UsageError(f"--save-every must be >= 1; got {args.save_every}")
    out = _check_out_file(args.out, ".npz")
    dataset = data.load_dataset(args.dataset)
    if args.checkpoint:
        model, params, meta = zoo.load_checkpoint(args.checkpoint, input_shape=dataset.input_shape)
        if model.num_classes != dataset.num_classes:
            raise InputError(
                f"checkpoint {args.checkpoint} has {model.num_classes} classes; "
                f"data set {dataset.name!r} has {dataset.num_classes}"
            )
        source = str(Path(args.checkpoint).expanduser().absolute())
    else:
        model, params, meta = zoo.load_or_train(
            args.model, dataset, seed=args.seed, progress=not args.no_progress
        )
        source = f"zoo:{args.model}:seed{args.seed}"
    prb = probe.model_probe(
        model,
        params,
        layers=_split_list(args.layers),
        conv_reduce=args.conv_reduce,
        values=args.activation,
    )
    x, y = dataset.split(args.split)
    partial = out.with_name(out.stem + ".partial.npz") if args.save_every else None
    start = time.perf_counter()
    spec = streaming.compute_spectrum(
        prb,
        params,
        x,
        y,
        batch_size=args.batch_size,
        threshold=args.threshold,
        attribution=args.attribution,
        mesh=mesh,
        checkpoint_path=partial,
        checkpoint_every=args.save_every or 1,
        progress=_progress(args),
    )
    seconds = time.perf_counter() - start
    layers = spectrum_lib.layer_summary(spec)
    n_pass, n_fail = int(spec.n_pass.sum()), int(spec.n_fail.sum())
    metadata = {
        "model": model.name,
        "model_source": source,
        "dataset": dataset.name,
        "split": args.split,
        "threshold": args.threshold,
        "conv_reduce": args.conv_reduce,
        "activation": args.activation,
        "attribution": args.attribution or None,
        "num_inputs": n_pass + n_fail,
        "num_pass": n_pass,
        "num_fail": n_fail,
        "versions": zoo.package_versions(),
    }
    spectrum_io.save_spectrum(out, spec, metadata=metadata)
    if partial is not None:
        partial.unlink(missing_ok=True)
    report = {
        **{k: v for k, v in metadata.items() if k != "versions"},
        "accuracy": n_pass / (n_pass + n_fail),
        "num_classes": spec.num_classes,
        "num_neurons": spec.index.num_neurons,
        "layers": layers,
        "devices": args.devices,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 3),
        "spectrum": str(out.absolute()),
    }

    def share(v):
        return "-" if v is None else f"{v:.3f}"

    human = [
        f"spectrum of {model.name} on {dataset.name} ({args.split}): {n_pass + n_fail} inputs, "
        f"{n_pass} passing, {n_fail} failing (accuracy {report['accuracy']:.4f}); "
        f"threshold {args.threshold:g}, {args.activation}-activation, conv_reduce {args.conv_reduce}",
        f"{'layer':<16} {'neurons':>8} {'active|fail':>12} {'active|pass':>12}",
    ]
    human += [
        f"{r['layer']:<16} {r['neurons']:>8} {share(r['active_share_fail']):>12} "
        f"{share(r['active_share_pass']):>12}"
        for r in layers
    ]
    human.append(f"wrote {out} in {seconds:.2f} s")
    _emit(args, report, human)
    return 0


def _json_score(value: float):
    """JSON has no infinity: +inf (DStar's x/0) is written as the string "inf"."""
    return "inf" if value == float("inf") else value


def _cmd_localize(args: argparse.Namespace) -> int:
    from deepfault_jax import localize, measures, spectrum_io

    params = {}
    if args.star is not None:
        if args.measure.lower() != "dstar":
            raise UsageError(f"--star is a parameter of dstar; got --measure {args.measure}")
        params["star"] = args.star
    measures.get_measure(args.measure, **params)  # unknown names fail before the file is read
    spec = spectrum_io.load_spectrum(args.spectrum)
    layers = _split_list(args.layers)
    pooled = args.class_index is None
    if not pooled and not 0 <= args.class_index < spec.num_classes:
        raise UsageError(f"--class must lie in [0, {spec.num_classes}); got {args.class_index}")
    score_all = localize.suspiciousness(spec, args.measure, pooled=pooled, **params)
    score = score_all if pooled else score_all[args.class_index]
    ids = localize.top_k_neurons(score, args.k, allowed=localize.allowed_neurons(spec.index, layers))
    rows = localize.ranking_table(
        spec, score, ids, class_index=None if pooled else args.class_index
    )
    report = {
        "spectrum": str(Path(args.spectrum).absolute()),
        "measure": args.measure.lower(),
        "params": params,
        "k": args.k,
        "class": None if pooled else args.class_index,
        "pooled": pooled,
        "layers": list(layers) if layers else list(spec.index.layer_names),
        "neurons": [{**r, "score": _json_score(r["score"])} for r in rows],
    }
    scope = "all classes pooled" if pooled else f"class {args.class_index}"
    human = [
        f"top {args.k} neurons by {args.measure.lower()} ({scope}) of {args.spectrum}",
        f"{'rank':>4} {'id':>6} {'layer':<14} {'unit':>5} {'A_s':>7} {'A_f':>7} {'N_s':>7} "
        f"{'N_f':>7} {'score':>12}",
    ]
    human += [
        f"{r['rank']:>4} {r['id']:>6} {r['layer']:<14} {r['unit']:>5} {r['a_s']:>7} {r['a_f']:>7} "
        f"{r['n_s']:>7} {r['n_f']:>7} {r['score']:>12.6g}"
        for r in rows
    ]
    _emit(args, report, human)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from deepfault_jax import pipeline

    classes = None
    if args.classes != "all":
        classes = parse_int_list(args.classes, "--classes")
    config = pipeline.RunConfig(
        model=args.model,
        activation=args.activation,
        dataset=args.dataset,
        checkpoint=args.checkpoint,
        measures=parse_names(args.measures, "--measures"),
        k=parse_int_list(args.k, "--k"),
        classes=classes,
        mode=args.mode,
        d=args.d,
        step_size=args.step_size,
        steps=args.steps,
        direction=args.direction,
        stop_when_misclassified=args.stop_when_misclassified,
        inputs_per_class=args.inputs_per_class,
        random_repeats=args.random_repeats,
        seed=args.seed,
        layers=tuple(_split_list(args.layers)) if args.layers else None,
        conv_reduce=args.conv_reduce,
        values=args.values,
        star=args.star,
    )
    config.validate()
    out = _check_out_dir(args.out)
    result = pipeline.run(config, out, progress=_progress(args))

    def pct(v):
        return f"{100 * v:5.1f}%"

    human = [
        f"DeepFault on {result['dataset']['name']} with {result['model']['name']} "
        f"(test accuracy {result['model']['test_accuracy']:.4f}), mode {config.mode}, d {config.d}: "
        f"{result['selection']['inputs']} correctly classified inputs synthesized",
        f"{'measure':<12} {'k':>3} {'misclassified':>13} {'random':>16} {'L-inf':>6} {'act. rose':>9}",
    ]
    for r in result["results"]:
        rnd = r["random"]["misclassification_rate"]
        human.append(
            f"{r['measure']:<12} {r['k']:>3} {pct(r['misclassification_rate']):>13} "
            f"{pct(rnd['mean'])} +- {pct(rnd['std']).strip():>6} {r['linf']:>6.3f} "
            f"{pct(r['activation_rose']):>9}"
        )
    for s in result["selection"]["skipped_classes"]:
        human.append(f"class {s['class']} skipped: {s['reason']}")
    human.append(
        f"wrote {out}/report.md, report.json, synthesized.npz, figures in {result['seconds']:.1f} s"
    )
    _emit(args, result, human)
    return 0


def _cmd_faultbench(args: argparse.Namespace) -> int:
    from deepfault_jax import faultbench as faultbench_lib
    from deepfault_jax import faults, pipeline
    from deepfault_jax import report as report_lib

    kinds = (
        faults.FAULT_KINDS if args.kinds == "all" else parse_names(args.kinds, "--kinds")
    )
    seeds = parse_int_list(args.seeds, "--seeds")
    config = faultbench_lib.FaultbenchConfig(
        models=parse_names(args.models, "--models"),
        dataset=args.dataset,
        kinds=tuple(kinds),
        faults=parse_int_list(args.faults, "--faults"),
        seeds=seeds,
        inputs=args.inputs,
        min_drop=args.min_drop,
        methods=parse_names(args.methods, "--methods") if args.methods else None,
        layers=tuple(_split_list(args.layers)) if args.layers else None,
        conv_reduce=args.conv_reduce,
        values=args.values,
        model_seed=args.model_seed,
    )
    config.validate()
    out = _check_out_dir(args.out)
    result = pipeline.faultbench(config, out, progress=_progress(args))
    human = [
        f"planted-fault benchmark on {result['dataset']['name']} "
        f"({result['dataset']['inputs']} test inputs), {len(result['trials'])} trials"
    ]
    for model in result["models"]:
        for count in config.faults:
            human += ["", f"{model}, {count} planted fault(s):"]
            human += report_lib.faultbench_table(result, model, count)
    human += [f"skipped: {s['model']} {s['kind']} x{s['faults']} seed {s['seed']}: {s['reason']}"
              for s in result["skipped"]]  # fmt: skip
    human.append(
        f"wrote {out}/faultbench.md, faultbench.json, faultbench.png in {result['seconds']:.1f} s"
    )
    _emit(args, result, human)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import jax

    from deepfault_jax import data, zoo

    versions = zoo.package_versions()
    devices = [
        {"id": d.id, "platform": d.platform, "kind": d.device_kind, "process": d.process_index}
        for d in jax.devices()
    ]
    datasets = data.available_datasets()
    report = {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": devices,
        "datasets": datasets,
        "dataset_specs": list(data.DATASET_SPECS),
        "models": list(zoo.MODEL_NAMES),
    }
    human = ["versions:"]
    human += [f"  {k:<20} {v}" for k, v in versions.items()]
    human.append(f"devices ({jax.default_backend()}):")
    human += [f"  {d['id']}: {d['platform']} {d['kind']}" for d in devices]
    human.append("data sets:")
    human += [
        f"  {name:<14} {'yes' if d['available'] else 'no ':<4} {d['detail']}"
        for name, d in datasets.items()
    ]
    human.append(
        "  also: idx:DIR (MNIST-format directory), npz:PATH (x_train, y_train, x_test, y_test)"
    )
    human.append(f"models: {', '.join(zoo.MODEL_NAMES)}")
    _emit(args, report, human)
    return 0


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    from deepfault_jax import __version__
    from deepfault_jax.measures import measure_names as _measure_names
    from deepfault_jax.zoo import MODEL_NAMES as model_names

    measure_names = _measure_names()

    dataset_help = (
        "data set: digits, fashion-mnist, idx:DIR, tfds:NAME[:SPLIT] or npz:PATH (default: digits)"
    )
    parser = _Parser(
        prog="deepfault-jax",
        description="DeepFault fault localization for deep neural networks, in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"deepfault-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    def probe_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--layers", metavar="A,B,...", default=None,
                       help="layers to probe (default: every hidden Dense/Conv)")  # fmt: skip
        p.add_argument("--conv-reduce", default="mean", choices=("mean", "max", "none"),
                       help="conv channel value: spatial mean (the paper's), max, or none "
                       "(every position a neuron) (default: mean)")  # fmt: skip

    def model_source(p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", default="mlp-3x50", choices=model_names, metavar="NAME",
                         help="zoo model, trained on the data set on first use and cached "
                         "(default: mlp-3x50)")  # fmt: skip
        src.add_argument(
            "--checkpoint", metavar="DIR", help="a checkpoint from `deepfault-jax train`"
        )
        p.add_argument("--dataset", default="digits", metavar="SPEC", help=dataset_help)

    p = sub.add_parser(
        "train",
        help="train a zoo model and save a checkpoint",
        description="Train a zoo model with optax Adam and save an orbax checkpoint "
        "with a model.json describing it.",
    )
    p.add_argument("--model", default="mlp-3x50", choices=model_names, metavar="NAME",
                   help=f"architecture: {', '.join(model_names)} (default: mlp-3x50)")  # fmt: skip
    p.add_argument("--dataset", default="digits", metavar="SPEC", help=dataset_help)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default: 40 below 10,000 training images, else 10)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step (default: 1e-3)")
    p.add_argument("--activation", default="relu", choices=("relu", "leaky_relu"),
                   help="hidden activation (default: relu)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", default=None,
                   help="checkpoint directory (default: runs/MODEL-DATASET-seedN)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "spectrum",
        help="compute the hit spectrum of a model on a data set",
        description="Compute the all-class hit spectrum (DeepFault's A_s, A_f, N_s, N_f for every "
        "class and neuron) in one streaming jitted pass and write it as .npz.",
    )
    model_source(p)
    p.add_argument("--split", default="test", choices=("train", "test"), help="(default: test)")
    p.add_argument("--seed", type=int, default=0, help="training seed of a --model (default: 0)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="a neuron is active when its value is > T (default: 0)")  # fmt: skip
    probe_options(p)
    p.add_argument("--activation", default="pre", choices=("pre", "post"),
                   help="probe values before or after the activation function (default: pre)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=512, help="inputs per step (default: 512)")
    p.add_argument("--attribution", nargs="?", const="margin", default=False,
                   choices=("margin", "all-classes"), metavar="margin|all-classes",
                   help="also gather the attribution sums (activation, gradient x activation, "
                   "linearised ablation) that the measures gradxact, actdiff and "
                   "linear_ablation read; the linearised ablation from the margin to the "
                   "strongest rival class (the default) or from all classes' logits")  # fmt: skip
    p.add_argument("--devices", type=int, default=1,
                   help="split each batch over N local devices with shard_map (default: 1)")  # fmt: skip
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="save progress to OUT.partial.npz every N batches; the same command "
                   "started again resumes from it")  # fmt: skip
    p.add_argument("--out", metavar="FILE.npz", required=True, help="spectrum file to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_cmd_spectrum)

    p = sub.add_parser(
        "localize",
        help="rank neurons of a spectrum by a suspiciousness measure",
        description="Score every neuron of a spectrum with a suspiciousness measure and list "
        "the top k (ties: lower neuron id first).",
    )
    p.add_argument(
        "--spectrum", metavar="FILE.npz", required=True, help="from `deepfault-jax spectrum`"
    )
    p.add_argument("--measure", default="tarantula", metavar="NAME",
                   help=f"one of {', '.join(measure_names)} (default: tarantula)")  # fmt: skip
    p.add_argument("--star", type=float, default=None, help="DStar's exponent (default: 3)")
    p.add_argument("--k", type=int, default=10, help="neurons to list (default: 10)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--class", dest="class_index", type=int, default=None, metavar="C",
                       help="rank by the counts of inputs of true class C")  # fmt: skip
    scope.add_argument("--pooled", action="store_true",
                       help="rank by the counts of all classes together (the default)")  # fmt: skip
    p.add_argument("--layers", metavar="A,B,...", default=None, help="only neurons of these layers")
    common(p)
    p.set_defaults(func=_cmd_localize)

    p = sub.add_parser(
        "run",
        help="the whole DeepFault job: spectrum, suspicious neurons, synthesis, evaluation",
        description="Train (or load the cached) model, compute the test split's spectrum, find "
        "each class's suspicious neurons per measure and k, synthesize inputs from correctly "
        "classified ones, evaluate them against a random-neuron baseline, and write report.json, "
        "report.md, synthesized.npz, spectrum.npz and PNG figures into --out.",
    )
    model_source(p)
    p.add_argument("--activation", default="relu", choices=("relu", "leaky_relu"),
                   help="hidden activation of a --model (default: relu)")  # fmt: skip
    p.add_argument("--measures", default="tarantula,ochiai,dstar", metavar="A,B,...",
                   help="suspiciousness measures: count measures and the attribution measures "
                   "gradxact, actdiff, linear_ablation (default: tarantula,ochiai,dstar)")  # fmt: skip
    p.add_argument("--star", type=float, default=3.0, help="DStar's exponent (default: 3)")
    p.add_argument("--k", default="1,5,10", metavar="K1,K2,...",
                   help="suspicious set sizes (default: 1,5,10)")  # fmt: skip
    p.add_argument("--classes", default="all", metavar="all|C1,C2,...",
                   help="classes to synthesize from (default: all)")  # fmt: skip
    p.add_argument("--mode", default="deepfault", choices=("deepfault", "pgd"),
                   help="one clipped step as the original, or projected gradient ascent")  # fmt: skip
    p.add_argument("--d", type=float, default=0.1, help="maximum L-inf distance (default: 0.1)")
    p.add_argument("--step-size", type=float, default=None,
                   help="gradient multiplier (default: 1 for deepfault, 2.5 d / steps for pgd)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="pgd steps (default: 10)")
    p.add_argument("--direction", default="sign", choices=("raw", "sign", "l2", "adam"),
                   help="pgd direction (default: sign)")  # fmt: skip
    p.add_argument("--stop-when-misclassified", action="store_true",
                   help="pgd: stop each input once the model misclassifies it")  # fmt: skip
    p.add_argument("--inputs-per-class", type=int, default=20,
                   help="correctly classified originals per class, at most (default: 20)")  # fmt: skip
    p.add_argument("--random-repeats", type=int, default=3,
                   help="random-neuron baselines per k (default: 3)")  # fmt: skip
    probe_options(p)
    p.add_argument("--values", default="pre", choices=("pre", "post"),
                   help="neuron values before or after the activation (default: pre)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="training, selection and baseline seed")
    p.add_argument("--out", metavar="DIR", default="runs/deepfault",
                   help="output directory (default: runs/deepfault)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "faultbench",
        help="plant known faults in trained models and score every localizer on them",
        description="Plant faulty neurons of documented kinds in trained zoo models (each "
        "lowering the accuracy by at least --min-drop), localize them with every method (count "
        "measures, attribution measures, exact ablation) and report top-5/top-10 recall and mean "
        "rank against the random ranking, as faultbench.json, faultbench.md and faultbench.png.",
    )
    p.add_argument("--models", default="mlp-3x50", metavar="A,B,...",
                   help="zoo models, trained on first use and cached (default: mlp-3x50)")  # fmt: skip
    p.add_argument("--dataset", default="digits", metavar="SPEC", help=dataset_help)
    p.add_argument("--kinds", default="all", metavar="all|A,B,...",
                   help="fault kinds: push_last, push_early, always_on, corrupt_in (default: all)")  # fmt: skip
    p.add_argument("--faults", default="1,3", metavar="N1,N2,...",
                   help="faults planted together per trial (default: 1,3)")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2,3,4", metavar="S1,S2,...",
                   help="trial seeds (default: 0,1,2,3,4)")  # fmt: skip
    p.add_argument("--inputs", type=int, default=2000,
                   help="test inputs to plant and localize on (default: 2000)")  # fmt: skip
    p.add_argument("--min-drop", type=float, default=0.02,
                   help="accuracy drop each fault must cause (default: 0.02)")  # fmt: skip
    p.add_argument("--methods", default=None, metavar="M/pooled,M/per-class,...",
                   help="methods (default: tarantula, ochiai, dstar, gradxact, actdiff, "
                   "linear_ablation, each pooled and per-class, and ablation/pooled, "
                   "ablation_loss/pooled)")  # fmt: skip
    probe_options(p)
    p.add_argument("--values", default="pre", choices=("pre", "post"),
                   help="neuron values before or after the activation (default: pre)")  # fmt: skip
    p.add_argument("--model-seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--out", metavar="DIR", default="runs/faultbench",
                   help="output directory (default: runs/faultbench)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=_cmd_faultbench)

    p = sub.add_parser(
        "info",
        help="versions, devices and the data sets available here",
        description="Show package versions, JAX devices, and which data sets can be loaded here.",
    )
    common(p)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (also used as the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except InputError as e:
        prog = getattr(e, "prog", "deepfault-jax")
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        return 2
    except BrokenPipeError:  # `... --json | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("deepfault-jax: interrupted\n")
        return 130
    except Exception as e:  # an internal error: show everything
        traceback.print_exc()
        sys.stderr.write(f"deepfault-jax: internal error: {_one_line(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
