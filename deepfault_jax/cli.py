"""The ``deepfault-jax`` command line.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the
expected and the actual value, no traceback); 1 an internal error; 130
interrupted. Every option value is checked as the command line is read, before
any work. Every command takes ``--json``: one JSON object on stdout with the
result; progress bars and messages go to stderr.

One vocabulary: ``--activation relu|leaky_relu`` is the model's nonlinearity;
``--values pre|post`` says which neuron values are counted (before or after it).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deepfault_jax import data, errors, measures, pipeline, probe, spectrum_io, zoo
from deepfault_jax.attribution import LINEARISED
from deepfault_jax.errors import InputError
from deepfault_jax.faultbench import FaultbenchConfig, default_methods
from deepfault_jax.faults import FAULT_KINDS
from deepfault_jax.spectrum import layer_summary
from deepfault_jax.streaming import compute_spectrum, data_mesh
from deepfault_jax.synthesis import DIRECTIONS, MODES

__all__ = ["main"]

_RUN = pipeline.RunConfig()  # the defaults of run, and of spectrum's model and probe options
_BENCH = FaultbenchConfig()  # the defaults of faultbench
_TRAIN = {n: p.default for n, p in inspect.signature(zoo.train).parameters.items()}
_SPECTRUM = {n: p.default for n, p in inspect.signature(compute_spectrum).parameters.items()}
_UNSET = object()
_DATASET_HELP = "data set: digits, fashion-mnist, idx:DIR, tfds:NAME[:SPLIT] or npz:PATH"
_CONV_REDUCE_HELP = {"mean": "spatial mean (the paper's)", "max": "spatial max",
                     "none": "every position its own neuron"}  # fmt: skip


class UsageError(InputError):
    """Bad command-line usage (exit code 2); ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, raised not printed."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        # "argument --d: --d must be ..." -> "--d must be ..." (the option's type names it)
        head, sep, rest = message.partition(": ")
        option = head.removeprefix("argument ")
        if sep and head != option and rest.startswith((f"{option} ", f"{option}:")):
            message = rest
        raise UsageError(message, self.prog)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _emit(args: argparse.Namespace, result: dict, human: Sequence[str]) -> None:
    """Prints the result: one JSON object with ``--json``, else the ``human`` lines."""
    print(json.dumps(result, sort_keys=True) if args.json else "\n".join(human), flush=True)


# --------------------------------------------------------------------------- option values
# Each kind below is ``kind(option, text) -> value``, raising InputError naming the option;
# :func:`_add` makes it the option's argparse ``type``.


def _int(*, lo: int | None = None, seed: bool = False) -> Callable[[str, Any], int]:
    """An integer ``>= lo``, or a PRNG seed: an integer in ``[0, 2**63 - 1]``."""

    def kind(option: str, text: Any) -> int:
        try:
            value = int(text)
        except ValueError:
            raise InputError(f"{option} must be an integer; got {text!r}") from None
        if seed:
            return errors.check_seed(value, name=option)
        return errors.check_int(option, value, lo=lo)

    return kind


def _float(*, finite: bool = True, **bounds: Any) -> Callable[[str, str], float]:
    """A finite number within :func:`~deepfault_jax.errors.check_finite`'s ``bounds`` (any
    number with ``finite=False``: a library function checks it)."""

    def kind(option: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{option} must be a number; got {text!r}") from None
        return errors.check_finite(option, value, **bounds) if finite else value

    return kind


def _listed(item=None, *, choices=(), what="", check=None, all_means: Any = _UNSET) -> Callable:
    """A comma-separated list of distinct values: integers checked by the kind ``item``, or
    names among ``choices`` (each a ``what``) or passing ``check`` (which raises InputError);
    with ``all_means``, the word ``all`` stands for it."""

    def kind(option: str, text: str) -> Any:
        if all_means is not _UNSET and text.strip() == "all":
            return all_means
        if item is not None:
            values = tuple(item(option, v) for v in errors.parse_int_list(text, option))
        else:
            values = errors.parse_names(text, option)
            for name in values:
                try:
                    if choices and name not in choices:
                        expected = ", ".join(choices)
                        raise InputError(f"unknown {what} {name!r}; expected one of {expected}")
                    if check is not None:
                        check(name)
                except InputError as e:
                    raise InputError(f"{option}: {e}") from None
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise InputError(f"{option} must list distinct values; got {text!r} ({twice[0]} twice)")
        return values

    return kind


def _add(p, flag: str, default: Any, help: str, kind=None, *, shown: Any = _UNSET, **kw) -> None:
    """Adds option ``flag``: its value read by ``kind``; its help ends with its default."""
    if kind is not None:

        def parse(text: str) -> Any:
            try:
                return kind(flag, text)
            except InputError as e:
                raise argparse.ArgumentTypeError(_one_line(e)) from None

        kw["type"] = parse
    shown = _shown(default) if shown is _UNSET else shown
    p.add_argument(flag, default=default, help=f"{help} (default: {shown})", **kw)


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _config_from(cls: type, args: argparse.Namespace) -> Any:
    """A config dataclass from the options named like its fields (the rest keep their defaults)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


# --------------------------------------------------------------------------- output paths


def _check_writable(out: Path) -> None:
    """Fails early when ``out`` cannot be created: the nearest existing directory above it
    must take a new file (nothing is created here; the writers create the directories)."""
    absolute = out.absolute()
    base = next((p for p in absolute.parents if p.exists()), Path(absolute.anchor))
    try:
        if not base.is_dir():
            raise NotADirectoryError(0, f"{str(base)!r} is not a directory")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UsageError(
            f"--out must be a writable location; got {str(out)!r} ({e.strerror or e})"
        ) from None


def _check_out_dir(path: str, owned: Callable[[Path], bool] | None = None, what="") -> Path:
    """Fails early (before any long work) when ``path`` cannot hold an output directory, or
    is a non-empty directory that ``owned`` does not recognise as holding ``what``."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a directory path; got existing file {str(out)!r}")
    if owned is not None and out.is_dir() and any(out.iterdir()) and not owned(out):
        raise UsageError(f"--out {str(out)!r} is not empty and does not hold {what}; it is "
                         "kept: choose an empty or new directory")  # fmt: skip
    _check_writable(out)
    return out


def _is_checkpoint(directory: Path) -> bool:
    try:
        meta = json.loads((directory / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == zoo.CHECKPOINT_FORMAT


def _check_spectrum_path(path: Path, what: str) -> None:
    """Refuses a ``path`` that exists and is not a spectrum file: it is never replaced."""
    if path.is_dir():
        raise UsageError(f"{what} must be a file path; got existing directory {str(path)!r}")
    if path.exists():
        try:
            spectrum_io.load_spectrum(path)
        except InputError:
            raise UsageError(
                f"{what} {str(path)!r} exists and is not a deepfault-jax spectrum file; "
                "it is kept: remove it or choose another path"
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


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    import jax

    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in args.dataset).strip("-")
    out_arg = args.out or os.path.join("runs", f"{args.model}-{slug}-seed{args.seed}")
    out = _check_out_dir(out_arg, _is_checkpoint, "a deepfault-jax checkpoint")
    dataset = data.load_dataset(args.dataset)
    model = zoo.create_model(args.model, input_shape=dataset.input_shape,
                             num_classes=dataset.num_classes, activation=args.activation)  # fmt: skip
    epochs = zoo.default_epochs(dataset) if args.epochs is None else args.epochs
    summary = dataset.summary()
    if not args.json:
        h, w, c = dataset.input_shape
        print(f"training {model.name} ({model.activation}) on {dataset.name}: "
              f"{summary['num_train']} train / {summary['num_test']} test images of {h}x{w}x{c}, "
              f"{dataset.num_classes} classes; {epochs} epochs, seed {args.seed}", flush=True)  # fmt: skip
    settings = {"seed": args.seed, "epochs": epochs, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate}  # fmt: skip
    result = zoo.train(jax.random.key(args.seed), model, dataset, epochs=epochs,
                       batch_size=args.batch_size, learning_rate=args.learning_rate,
                       progress=not args.no_progress)  # fmt: skip
    metadata = {"dataset": dataset.name, **settings, "test_accuracy": result.test_accuracy}
    checkpoint = zoo.save_checkpoint(out, model, result.params, metadata=metadata)
    report = {
        "model": model.name, "activation": model.activation, "dataset": dataset.name, **settings,
        **{k: summary[k] for k in ("num_train", "num_test", "input_shape", "num_classes")},
        "test_accuracy": result.test_accuracy, "train_seconds": round(result.seconds, 3),
        "history": result.history, "checkpoint": str(checkpoint),
    }  # fmt: skip
    n_test = summary["num_test"]
    human = [f"test accuracy {result.test_accuracy:.4f} ({round(result.test_accuracy * n_test)}/"
             f"{n_test}) after {epochs} epochs in {result.seconds:.1f} s",
             f"checkpoint {checkpoint}"]  # fmt: skip
    _emit(args, report, human)
    return 0


def _spectrum_model(args: argparse.Namespace, dataset: data.Dataset) -> tuple:
    """``(model, params, source)`` of the spectrum command: its --checkpoint, or the zoo
    model (its probe options checked on an untrained copy first, before any training)."""
    if args.checkpoint:
        model, params, _ = zoo.load_checkpoint(args.checkpoint, input_shape=dataset.input_shape)
        if model.num_classes != dataset.num_classes:
            raise InputError(f"checkpoint {args.checkpoint} has {model.num_classes} classes; "
                             f"data set {dataset.name!r} has {dataset.num_classes}")  # fmt: skip
        return model, params, str(Path(args.checkpoint).expanduser().absolute())
    import jax

    untrained = zoo.create_model(args.model, input_shape=dataset.input_shape,
                                 num_classes=dataset.num_classes, activation=args.activation)  # fmt: skip
    _spectrum_probe(args, untrained, zoo.init_params(jax.random.key(0), untrained))
    model, params, _ = zoo.load_or_train(args.model, dataset, seed=args.seed,
                                         activation=args.activation, progress=not args.no_progress)  # fmt: skip
    return model, params, f"zoo:{args.model}:{args.activation}:seed{args.seed}"


def _spectrum_probe(args: argparse.Namespace, model: zoo.Model, params: Any) -> probe.Probe:
    return probe.model_probe(model, params, layers=list(args.layers) if args.layers else None,
                             conv_reduce=args.conv_reduce, values=args.values)  # fmt: skip


def _cmd_spectrum(args: argparse.Namespace) -> int:
    mesh = data_mesh(devices=args.devices) if args.devices > 1 else None
    if args.batch_size % args.devices:
        raise UsageError(
            f"--batch-size must be a multiple of --devices ({args.devices}); got {args.batch_size}"
        )
    out = Path(args.out).expanduser()
    if out.suffix != ".npz":
        raise UsageError(f"--out must end in .npz; got {str(out)!r}")
    _check_spectrum_path(out, "--out")
    _check_writable(out)
    partial = out.with_name(out.stem + ".partial.npz") if args.save_every else None
    if partial is not None:
        _check_spectrum_path(partial, "--save-every's progress file")
    dataset = data.load_dataset(args.dataset)
    model, params, source = _spectrum_model(args, dataset)
    x, y = dataset.split(args.split)
    start = time.perf_counter()
    spec = compute_spectrum(
        _spectrum_probe(args, model, params), params, x, y, batch_size=args.batch_size,
        threshold=args.threshold, attribution=args.attribution, mesh=mesh,
        checkpoint_path=partial, checkpoint_every=args.save_every or 1, progress=_progress(args),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    n_pass, n_fail = int(spec.n_pass.sum()), int(spec.n_fail.sum())
    metadata = {
        "model": model.name, "model_source": source, "activation": model.activation,
        "dataset": dataset.name, "split": args.split, "threshold": args.threshold,
        "conv_reduce": args.conv_reduce, "values": args.values,
        "attribution": args.attribution or None, "num_inputs": n_pass + n_fail,
        "num_pass": n_pass, "num_fail": n_fail, "versions": zoo.package_versions(),
    }  # fmt: skip
    spectrum_io.save_spectrum(out, spec, metadata=metadata)
    if partial is not None:
        partial.unlink(missing_ok=True)
    report = {
        **{k: v for k, v in metadata.items() if k != "versions"},
        "accuracy": n_pass / (n_pass + n_fail), "num_classes": spec.num_classes,
        "num_neurons": spec.index.num_neurons, "layers": layer_summary(spec),
        "devices": args.devices, "batch_size": args.batch_size, "seconds": round(seconds, 3),
        "spectrum": str(out.absolute()),
    }  # fmt: skip
    _emit(args, report, _spectrum_lines(report, out))
    return 0


def _spectrum_lines(r: dict, out: Path) -> list[str]:
    """The spectrum command's summary for people: counts, options, a row per layer."""

    def share(v):
        return "-" if v is None else f"{v:.3f}"

    human = [
        f"spectrum of {r['model']} on {r['dataset']} ({r['split']}): {r['num_inputs']} inputs, "
        f"{r['num_pass']} passing, {r['num_fail']} failing (accuracy {r['accuracy']:.4f}); "
        f"threshold {r['threshold']:g}, {r['values']}-activation values, "
        f"conv_reduce {r['conv_reduce']}",
        f"{'layer':<16} {'neurons':>8} {'active|fail':>12} {'active|pass':>12}",
    ]
    human += [
        f"{row['layer']:<16} {row['neurons']:>8} {share(row['active_share_fail']):>12} "
        f"{share(row['active_share_pass']):>12}"
        for row in r["layers"]
    ]
    return [*human, f"wrote {out} in {r['seconds']:.2f} s"]


def _json_score(value: float):
    """JSON has no infinity: +inf (DStar's x/0) is written as the string "inf"."""
    return "inf" if value == float("inf") else value


def _cmd_localize(args: argparse.Namespace) -> int:
    from deepfault_jax import localize

    params = {}
    if args.star is not None:
        if args.measure.lower() != "dstar":
            raise UsageError(f"--star is a parameter of dstar; got --measure {args.measure}")
        params["star"] = args.star
    measures.get_measure(args.measure, **params)  # unknown names fail before the file is read
    spec = spectrum_io.load_spectrum(args.spectrum)
    pooled, c = args.class_index is None, args.class_index
    if not pooled and not 0 <= c < spec.num_classes:
        raise UsageError(f"--class must lie in [0, {spec.num_classes}); got {c}")
    score_all = localize.suspiciousness(spec, args.measure, pooled=pooled, **params)
    score = score_all if pooled else score_all[c]
    allowed = localize.allowed_neurons(spec.index, args.layers)
    ids = localize.top_k_neurons(score, args.k, allowed=allowed)
    rows = localize.ranking_table(spec, score, ids, class_index=None if pooled else c)
    report = {
        "spectrum": str(Path(args.spectrum).absolute()), "measure": args.measure.lower(),
        "params": params, "k": args.k, "class": None if pooled else c, "pooled": pooled,
        "layers": list(args.layers or spec.index.layer_names),
        "neurons": [{**r, "score": _json_score(r["score"])} for r in rows],
    }  # fmt: skip
    scope = "all classes pooled" if pooled else f"class {c}"
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
    config = _config_from(pipeline.RunConfig, args)
    config.validate()
    out = _check_out_dir(args.out)
    result = pipeline.run(config, out, progress=_progress(args))
    _emit(args, result.to_json(), _run_lines(result, out))
    return 0


def _run_lines(result, out: Path) -> list[str]:
    """The run's table for people: misclassification per measure and k beside random."""
    from deepfault_jax import pipeline

    def pct(v):
        return f"{100 * v:5.1f}%"

    config = result.config
    human = [
        f"DeepFault on {result.dataset['name']} with {result.model['name']} "
        f"(test accuracy {result.model['test_accuracy']:.4f}), mode {config.mode}, d {config.d}: "
        f"{result.selection.rows.size} correctly classified inputs synthesized",
        f"{'measure':<12} {'k':>3} {'misclassified':>13} {'random':>16} {'L-inf':>6} {'act. rose':>9}",
    ]
    for r in result.results:
        rnd = r.random["misclassification_rate"]
        human.append(
            f"{r.measure:<12} {r.k:>3} {pct(r.metrics['misclassification_rate']):>13} "
            f"{pct(rnd['mean'])} +- {pct(rnd['std']).strip():>6} {r.metrics['linf']:>6.3f} "
            f"{pct(r.metrics['activation_rose']):>9}"
        )
    for s in result.selection.skipped:
        human.append(f"class {s['class']} skipped: {s['reason']}")
    human.append(f"wrote {out}/{', '.join(pipeline.RUN_FILES)} in {result.seconds:.1f} s")
    return human


def _cmd_faultbench(args: argparse.Namespace) -> int:
    from deepfault_jax import report as report_lib

    config = _config_from(FaultbenchConfig, args)
    config.validate()
    out = _check_out_dir(args.out)
    neurons = config.probed_neurons(data.load_dataset(config.dataset))  # untrained: cheap
    smallest = min(neurons, key=neurons.__getitem__)
    if max(config.faults) > neurons[smallest]:
        raise UsageError(f"--faults must be <= {neurons[smallest]}, the probed neurons of "
                         f"{smallest}; got {max(config.faults)}")  # fmt: skip
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
    files = ", ".join(pipeline.FAULTBENCH_FILES)
    human.append(f"wrote {out}/{files} in {result['seconds']:.1f} s")
    _emit(args, result, human)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import jax

    versions, datasets = zoo.package_versions(), data.available_datasets()
    devices = [{"id": d.id, "platform": d.platform, "kind": d.device_kind,
                "process": d.process_index} for d in jax.devices()]  # fmt: skip
    report = {"versions": versions, "backend": jax.default_backend(), "devices": devices,
              "datasets": datasets, "dataset_specs": list(data.DATASET_SPECS),
              "models": list(zoo.MODEL_NAMES)}  # fmt: skip
    human = ["versions:", *(f"  {k:<20} {v}" for k, v in versions.items())]
    human += [f"devices ({jax.default_backend()}):"]
    human += [f"  {d['id']}: {d['platform']} {d['kind']}" for d in devices] + ["data sets:"]
    human += [f"  {name:<14} {'yes' if d['available'] else 'no ':<4} {d['detail']}"
              for name, d in datasets.items()]  # fmt: skip
    human += ["  also: idx:DIR (MNIST-format directory), npz:PATH (x_train, y_train, x_test, "
              "y_test)", f"models: {', '.join(zoo.MODEL_NAMES)}"]  # fmt: skip
    _emit(args, report, human)
    return 0


# --------------------------------------------------------------------------- parser


def _output_options(p, *, help: str, default=None, metavar="DIR", required=False) -> None:
    """--out, --no-progress and --json."""
    p.add_argument("--out", metavar=metavar, default=default, required=required, help=help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _model_options(p, *, checkpoint: bool, seed_help: str) -> None:
    """The model: --model (or --checkpoint), --activation, --dataset and --seed."""
    group = p.add_mutually_exclusive_group() if checkpoint else p
    cached = ", trained on the data set on first use and cached" if checkpoint else ""
    _add(group, "--model", _RUN.model, f"zoo model{cached}: {', '.join(zoo.MODEL_NAMES)}",
         choices=zoo.MODEL_NAMES, metavar="NAME")  # fmt: skip
    if checkpoint:
        group.add_argument("--checkpoint", metavar="DIR",
                           help="a checkpoint from `deepfault-jax train`, instead of --model")  # fmt: skip
    own = "; a --checkpoint has its own" if checkpoint else ""
    _add(p, "--activation", _RUN.activation, f"the model's hidden nonlinearity{own}",
         choices=tuple(zoo.ACTIVATIONS))  # fmt: skip
    _add(p, "--dataset", _RUN.dataset, _DATASET_HELP, metavar="SPEC")
    _add(p, "--seed", _RUN.seed, f"{seed_help}, in [0, 2**63 - 1]", _int(seed=True), metavar="N")


def _probe_options(p, defaults, *, conv_reductions=probe.CONV_REDUCTIONS, threshold=True):
    """Which neurons and values are counted: --layers, --conv-reduce, --values, --threshold."""
    _add(p, "--layers", defaults.layers, "layers to probe", _listed(), metavar="A,B,...",
         shown="every hidden Dense/Conv")  # fmt: skip
    kinds = "; ".join(f"{r}: {_CONV_REDUCE_HELP.get(r, r)}" for r in conv_reductions)
    _add(p, "--conv-reduce", defaults.conv_reduce, f"a conv channel's value: {kinds}",
         choices=tuple(conv_reductions))  # fmt: skip
    _add(p, "--values", defaults.values, "count neuron values before (pre) or after (post) "
         "the activation function", choices=probe.VALUES)  # fmt: skip
    if threshold:
        _add(p, "--threshold", defaults.threshold, "a neuron is active when its value is > T",
             _float(), metavar="T")  # fmt: skip


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a zoo model and save a checkpoint",
                       description="Train a zoo model with optax Adam and save an orbax "
                       "checkpoint with a model.json describing it.")  # fmt: skip
    _model_options(p, checkpoint=False, seed_help="seed of initialisation and shuffling")
    _add(
        p, "--epochs", None, "epochs", _int(lo=1), shown="40 below 10,000 training images, else 10"
    )
    _add(p, "--batch-size", _TRAIN["batch_size"], "images per step", _int(lo=1), metavar="B")
    _add(
        p,
        "--learning-rate",
        _TRAIN["learning_rate"],
        "Adam step",
        _float(lo=0.0, lo_open=True),
        metavar="LR",
    )
    _output_options(p, help="checkpoint directory (default: runs/MODEL-DATASET-seedN)")
    p.set_defaults(func=_cmd_train)


def _spectrum_parser(sub) -> None:
    p = sub.add_parser("spectrum", help="compute the hit spectrum of a model on a data set",
                       description="Compute the all-class hit spectrum (DeepFault's A_s, A_f, "
                       "N_s, N_f for every class and neuron) in one streaming jitted pass and "
                       "write it as .npz.")  # fmt: skip
    _model_options(p, checkpoint=True, seed_help="training seed of a --model")
    _add(p, "--split", "test", "the data set's split", choices=("train", "test"))
    _probe_options(p, _RUN)
    _add(p, "--batch-size", _SPECTRUM["batch_size"], "inputs per step", _int(lo=1), metavar="B")
    linearised = LINEARISED
    _add(p, "--attribution", False, "also gather the attribution sums (activation, gradient x "
         "activation, linearised ablation) that the measures gradxact, actdiff and "
         "linear_ablation read; the linearised ablation from the margin to the strongest rival "
         f"class ({linearised[0]}, when no value is given) or from all classes' logits", nargs="?",
         const=linearised[0], choices=linearised, metavar="|".join(linearised), shown="off")  # fmt: skip
    _add(p, "--devices", 1, "split each batch over N local devices with shard_map",
         _int(lo=1), metavar="N")  # fmt: skip
    _add(p, "--save-every", None, "save progress to OUT.partial.npz every N batches; the "
         "same command started again resumes from it", _int(lo=1), metavar="N", shown="never")  # fmt: skip
    _output_options(p, metavar="FILE.npz", required=True, help="spectrum file to write (an "
                    "earlier spectrum there is replaced; any other file is kept)")  # fmt: skip
    p.set_defaults(func=_cmd_spectrum)


def _localize_parser(sub) -> None:
    p = sub.add_parser("localize", help="rank neurons of a spectrum by a suspiciousness measure",
                       description="Score every neuron of a spectrum with a suspiciousness "
                       "measure and list the top k (ties: lower neuron id first).")  # fmt: skip
    p.add_argument("--spectrum", metavar="FILE.npz", required=True,
                   help="from `deepfault-jax spectrum`")  # fmt: skip
    _add(p, "--measure", "tarantula", f"one of {', '.join(measures.measure_names())}",
         metavar="NAME")  # fmt: skip
    _add(p, "--star", None, "DStar's exponent", _float(finite=False), shown=_RUN.star)
    _add(p, "--k", 10, "neurons to list, at most the spectrum's", _int())  # localize checks both
    scope = p.add_mutually_exclusive_group()
    _add(scope, "--class", None, "rank by the counts of inputs of true class C", _int(lo=0),
         dest="class_index", metavar="C", shown="--pooled")  # fmt: skip
    scope.add_argument("--pooled", action="store_true",
                       help="rank by the counts of all classes together (the default)")  # fmt: skip
    _add(p, "--layers", None, "only neurons of these layers", _listed(), metavar="A,B,...",
         shown="all")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_cmd_localize)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole DeepFault job: spectrum, suspicious neurons, "
                       "synthesis, evaluation", description="Train (or load the cached) model, "
                       "compute the test split's spectrum, find each class's suspicious neurons "
                       "per measure and k, synthesize inputs from correctly classified ones, "
                       "evaluate them against a random-neuron baseline, and write "
                       f"{', '.join(pipeline.RUN_FILES)} into --out.")  # fmt: skip
    _model_options(p, checkpoint=True, seed_help="training, selection and baseline seed")
    _add(p, "--measures", _RUN.measures, "suspiciousness measures: count measures and the "
         "attribution measures gradxact, actdiff, linear_ablation",
         _listed(check=measures.get_measure), metavar="A,B,...")  # fmt: skip
    _add(p, "--star", _RUN.star, "DStar's exponent", _float(lo=0.0, lo_open=True), metavar="S")
    _add(p, "--k", _RUN.k, "suspicious set sizes", _listed(_int(lo=1)), metavar="K1,K2,...")
    _add(p, "--classes", _RUN.classes, "classes to synthesize from",
         _listed(_int(lo=0), all_means=None), metavar="all|C1,C2,...", shown="all")  # fmt: skip
    _add(p, "--mode", _RUN.mode, "one clipped step as the original (deepfault), or projected "
         "gradient ascent (pgd)", choices=MODES)  # fmt: skip
    _add(p, "--d", _RUN.d, "maximum L-inf distance, in (0, 1]",
         _float(lo=0.0, hi=1.0, lo_open=True))  # fmt: skip
    _add(p, "--step-size", _RUN.step_size, "gradient multiplier", _float(lo=0.0, lo_open=True),
         shown="1 for deepfault, 2.5 d / steps for pgd")  # fmt: skip
    _add(p, "--steps", _RUN.steps, "pgd steps", _int(lo=1), metavar="T")
    _add(p, "--direction", _RUN.direction, "pgd direction",
         choices=(*DIRECTIONS, "adam"))  # fmt: skip
    p.add_argument("--stop-when-misclassified", action="store_true",
                   help="pgd: stop each input once the model misclassifies it")  # fmt: skip
    _add(p, "--inputs-per-class", _RUN.inputs_per_class,
         "correctly classified originals per class, at most", _int(lo=1))  # fmt: skip
    _add(p, "--random-repeats", _RUN.random_repeats, "random-neuron baselines per k", _int(lo=1))
    _probe_options(p, _RUN)
    _output_options(p, default="runs/deepfault", help="output directory (default: runs/deepfault)")
    p.set_defaults(func=_cmd_run)


def _faultbench_parser(sub) -> None:
    p = sub.add_parser("faultbench", help="plant known faults in trained models and score "
                       "every localizer on them", description="Plant faulty neurons of "
                       "documented kinds in trained zoo models (each lowering the accuracy by at "
                       "least --min-drop), localize them with every method (count measures, "
                       "attribution measures, exact ablation) and report top-5/top-10 recall and "
                       "mean rank against the random ranking, as "
                       f"{', '.join(pipeline.FAULTBENCH_FILES)}.")  # fmt: skip
    _add(p, "--models", _BENCH.models, "zoo models, trained on first use and cached: "
         f"{', '.join(zoo.MODEL_NAMES)}", _listed(choices=zoo.MODEL_NAMES, what="model"),
         metavar="A,B,...")  # fmt: skip
    _add(p, "--dataset", _BENCH.dataset, _DATASET_HELP, metavar="SPEC")
    kinds = FAULT_KINDS
    _add(p, "--kinds", _BENCH.kinds, f"fault kinds: {', '.join(kinds)}",
         _listed(choices=kinds, what="fault kind", all_means=kinds), metavar="all|A,B,...",
         shown="all" if _BENCH.kinds == kinds else _UNSET)  # fmt: skip
    _add(p, "--faults", _BENCH.faults, "faults planted together per trial (at most the "
         "probed neurons of each model)", _listed(_int(lo=1)), metavar="N1,N2,...")  # fmt: skip
    _add(p, "--seeds", _BENCH.seeds, "trial seeds, each in [0, 2**63 - 1]",
         _listed(_int(seed=True)), metavar="S1,S2,...")  # fmt: skip
    _add(p, "--inputs", _BENCH.inputs, "test inputs to plant and localize on",
         _int(lo=FaultbenchConfig.MIN_INPUTS), metavar="N")  # fmt: skip
    _add(p, "--min-drop", _BENCH.min_drop, "accuracy drop each fault must cause, in (0, 1)",
         _float(lo=0.0, hi=1.0, lo_open=True, hi_open=True), metavar="D")  # fmt: skip
    _add(p, "--methods", _BENCH.methods, "methods", _listed(check=FaultbenchConfig.check_method),
         metavar="M/pooled,M/per-class,...", shown=", ".join(default_methods()))  # fmt: skip
    _probe_options(p, _BENCH, conv_reductions=FaultbenchConfig.CONV_REDUCTIONS, threshold=False)
    _add(p, "--model-seed", _BENCH.model_seed, "training seed, in [0, 2**63 - 1]",
         _int(seed=True), metavar="N")  # fmt: skip
    _output_options(
        p, default="runs/faultbench", help="output directory (default: runs/faultbench)"
    )
    p.set_defaults(func=_cmd_faultbench)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and the data sets available here",
                       description="Show package versions, JAX devices, and which data sets "
                       "can be loaded here.")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_cmd_info)


def _parser() -> argparse.ArgumentParser:
    from deepfault_jax import __version__

    parser = _Parser(prog="deepfault-jax",
                     description="DeepFault fault localization for deep neural networks, in JAX.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"deepfault-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for build in (_train_parser, _spectrum_parser, _localize_parser, _run_parser,
                  _faultbench_parser, _info_parser):  # fmt: skip
        build(sub)
    return parser


# --------------------------------------------------------------------------- main


def _check_backend() -> None:
    """Fails with one line, before any work, when ``JAX_PLATFORMS`` names no backend that
    works here (``cuda`` without a GPU, a typo like ``cpux``); names the ones that do."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:  # jax asserts when no platform found a device
        platforms = os.environ.get("JAX_PLATFORMS", "")
        if not platforms:
            raise
        reason = _one_line(str(e).split(" (set JAX_PLATFORMS")[0]) or "no such device here"
        from jax.extend.backend import backends

        jax.config.update("jax_platforms", "")  # to say what works here
        available = ", ".join(sorted(backends()))
        raise InputError(
            f"JAX_PLATFORMS={platforms!r} names no usable backend ({reason}); "
            f"available here: {available}; unset JAX_PLATFORMS or set it to one of those"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (also used as the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "deepfault-jax"
    try:
        args = _parser().parse_args(argv)
        command = f"deepfault-jax {args.command}"
        _check_backend()
        return args.func(args)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except InputError as e:
        sys.stderr.write(f"{getattr(e, 'prog', None) or command}: error: {_one_line(e)}\n")
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
