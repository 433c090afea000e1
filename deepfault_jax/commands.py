"""The ``deepfault-jax`` commands: each reads its parsed options, runs the library, and prints
a table for people or one JSON object (``--json``); progress bars go to stderr.

The parsers and ``main`` are in :mod:`deepfault_jax.cli`; the helpers here
check output paths before any work (an output is never written over something
the package did not write) and draw progress bars from the core's progress
callbacks (:mod:`deepfault_jax.progress`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deepfault_jax import (
    checkpoints,
    data,
    files,
    measures,
    pipeline,
    probe,
    spectrum_io,
    training,
    zoo,
)
from deepfault_jax.errors import InputError
from deepfault_jax.faultbench import FaultbenchConfig
from deepfault_jax.spectrum import layer_summary
from deepfault_jax.streaming import compute_spectrum, data_mesh

__all__ = [
    "ProgressBars",
    "UsageError",
    "check_out_dir",
    "cmd_faultbench",
    "cmd_info",
    "cmd_localize",
    "cmd_run",
    "cmd_spectrum",
    "cmd_train",
    "config_from",
    "emit",
    "one_line",
]


class UsageError(InputError):
    """Bad command-line usage (exit code 2); ``prog`` names the (sub)command."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def emit(args: argparse.Namespace, result: dict, human: Sequence[str]) -> None:
    """Prints the result: one JSON object with ``--json``, else the ``human`` lines."""
    print(json.dumps(result, sort_keys=True) if args.json else "\n".join(human), flush=True)


def config_from(cls: type, args: argparse.Namespace) -> Any:
    """A config dataclass from the options named like its fields (the rest keep their defaults)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def check_writable(out: Path) -> None:
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


def check_out_dir(path: str, owned: Callable[[Path], bool] | None = None) -> Path:
    """Fails early (before any long work) when ``path`` cannot hold an output directory: an
    existing file, a link, or (with ``owned``) a non-empty directory ``owned`` does not
    recognise (:func:`deepfault_jax.files.check_replaceable`), or no writable place."""
    out = Path(path).expanduser()
    files.check_replaceable(out, owned=owned or (lambda _: True), what="--out")
    check_writable(out)
    return out


def check_spectrum_path(path: Path, what: str) -> None:
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


class ProgressBars:
    """A progress callback (``progress(stage, done, total, **info)``) drawing one tqdm bar per
    stage on stderr (off when stderr is not a terminal), and printing a line for ``info``
    (``epoch 3/40: loss 0.0610, test accuracy 0.9688``) on stderr in any case."""

    def __init__(self) -> None:
        self._bars: dict = {}

    def __call__(self, stage: str, done: int, total: int | None, **info: float) -> None:
        from tqdm.auto import tqdm

        if info:
            unit = "epoch" if stage == "train" else stage
            numbers = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in info.items())
            tqdm.write(f"{unit} {done}/{total}: {numbers}", file=sys.stderr)

        bar = self._bars.get(stage)
        if bar is None or done < bar.n:  # a new round of this stage
            if bar is not None:
                bar.close()
            bar = self._bars[stage] = tqdm(total=total, desc=stage, leave=False, disable=None)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
            del self._bars[stage]


def progress_bars(args: argparse.Namespace) -> ProgressBars | None:
    """The progress callback of a command: bars unless ``--no-progress``."""
    return None if args.no_progress else ProgressBars()


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in args.dataset).strip("-")
    out_arg = args.out or os.path.join("runs", f"{args.model}-{slug}-seed{args.seed}")
    out = check_out_dir(out_arg, checkpoints.is_checkpoint_dir)
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
    result = training.train(jax.random.key(args.seed), model, dataset, epochs=epochs,
                            batch_size=args.batch_size, learning_rate=args.learning_rate,
                            progress=progress_bars(args))  # fmt: skip
    metadata = {"dataset": dataset.name, **settings, "test_accuracy": result.test_accuracy}
    checkpoint = checkpoints.save_checkpoint(out, model, result.params, metadata=metadata)
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
    emit(args, report, human)
    return 0


def _spectrum_model(args: argparse.Namespace, dataset: data.Dataset) -> tuple:
    """``(model, params, source)`` of the spectrum command: its --checkpoint, or the zoo
    model (its probe options checked on an untrained copy first, before any training)."""
    if args.checkpoint:
        model, params, _ = checkpoints.load_checkpoint(
            args.checkpoint, input_shape=dataset.input_shape
        )
        if model.num_classes != dataset.num_classes:
            raise InputError(f"checkpoint {args.checkpoint} has {model.num_classes} classes; "
                             f"data set {dataset.name!r} has {dataset.num_classes}")  # fmt: skip
        return model, params, str(Path(args.checkpoint).expanduser().absolute())
    import jax

    untrained = zoo.create_model(args.model, input_shape=dataset.input_shape,
                                 num_classes=dataset.num_classes, activation=args.activation)  # fmt: skip
    _spectrum_probe(args, untrained, zoo.init_params(jax.random.key(0), untrained))
    model, params, _ = checkpoints.load_or_train(args.model, dataset, seed=args.seed,
                                                 activation=args.activation,
                                                 progress=progress_bars(args))  # fmt: skip
    return model, params, f"zoo:{args.model}:{args.activation}:seed{args.seed}"


def _spectrum_probe(args: argparse.Namespace, model: zoo.Model, params: Any) -> probe.Probe:
    return probe.model_probe(model, params, layers=list(args.layers) if args.layers else None,
                             conv_reduce=args.conv_reduce, values=args.values)  # fmt: skip


def cmd_spectrum(args: argparse.Namespace) -> int:
    mesh = data_mesh(devices=args.devices) if args.devices > 1 else None
    if args.batch_size % args.devices:
        raise UsageError(
            f"--batch-size must be a multiple of --devices ({args.devices}); got {args.batch_size}"
        )
    out = Path(args.out).expanduser()
    if out.suffix != ".npz":
        raise UsageError(f"--out must end in .npz; got {str(out)!r}")
    check_spectrum_path(out, "--out")
    check_writable(out)
    partial = out.with_name(out.stem + ".partial.npz") if args.save_every else None
    if partial is not None:
        check_spectrum_path(partial, "--save-every's progress file")
    dataset = data.load_dataset(args.dataset)
    model, params, source = _spectrum_model(args, dataset)
    x, y = dataset.split(args.split)
    start = time.perf_counter()
    spec = compute_spectrum(
        _spectrum_probe(args, model, params), params, x, y, batch_size=args.batch_size,
        threshold=args.threshold, attribution=args.attribution, mesh=mesh,
        checkpoint_path=partial, checkpoint_every=args.save_every or 1, progress=progress_bars(args),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    n_pass, n_fail = int(spec.n_pass.sum()), int(spec.n_fail.sum())
    metadata = {
        "model": model.name, "model_source": source, "activation": model.activation,
        "dataset": dataset.name, "split": args.split, "threshold": args.threshold,
        "conv_reduce": args.conv_reduce, "values": args.values,
        "attribution": args.attribution or None, "num_inputs": n_pass + n_fail,
        "num_pass": n_pass, "num_fail": n_fail, "versions": checkpoints.package_versions(),
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
    emit(args, report, _spectrum_lines(report, out))
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


def cmd_localize(args: argparse.Namespace) -> int:
    from deepfault_jax import localize

    params = {}
    if args.star is not None:
        if "star" not in measures.measure_parameters(args.measure):
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
    emit(args, report, human)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from(pipeline.RunConfig, args)
    config.validate()
    out = check_out_dir(args.out)
    result = pipeline.run(config, out, progress=progress_bars(args))
    emit(args, result.to_json(), _run_lines(result, out))
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


def cmd_faultbench(args: argparse.Namespace) -> int:
    from deepfault_jax import report as report_lib

    config = config_from(FaultbenchConfig, args)
    config.validate()
    out = check_out_dir(args.out)
    neurons = config.probed_neurons(data.load_dataset(config.dataset))  # untrained: cheap
    smallest = min(neurons, key=neurons.__getitem__)
    if max(config.faults) > neurons[smallest]:
        raise UsageError(f"--faults must be <= {neurons[smallest]}, the probed neurons of "
                         f"{smallest}; got {max(config.faults)}")  # fmt: skip
    result = pipeline.faultbench(config, out, progress=progress_bars(args))
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
    emit(args, result, human)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import jax

    versions, datasets = checkpoints.package_versions(), data.available_datasets()
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
    emit(args, report, human)
    return 0
