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
    localizers,
    measures,
    model_source,
    pipeline,
    sources,
    spectrum_io,
    training,
    zoo,
)
from deepfault_jax.errors import InputError
from deepfault_jax.faultbench import FaultbenchConfig
from deepfault_jax.spectrum import layer_summary
from deepfault_jax.streaming import compute_spectrum, data_mesh, stream_spectrum

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
    stream = sources.open_source(args.dataset, split=args.split) if args.stream else None
    dataset = _dataset_for_model(args, stream)
    model, params, meta = model_source.load_model(args, dataset, progress=progress_bars(args))
    source = meta["source"]
    prb = model_source.model_probe(args, model, params)
    options = dict(batch_size=args.batch_size, threshold=args.threshold,
                   attribution=args.attribution, mesh=mesh, checkpoint_path=partial,
                   checkpoint_every=args.save_every or 1, progress=progress_bars(args),
                   classes=args.classes)  # fmt: skip
    start = time.perf_counter()
    if stream is not None:
        spec = stream_spectrum(prb, params, stream, **options)
    else:
        spec = compute_spectrum(prb, params, *dataset.split(args.split), **options)
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
        "streamed": bool(args.stream),
        "rows": "per class" if spec.classes is None else "pooled" if spec.pooled_only else list(spec.classes),
        "spectrum": str(out.absolute()),
    }  # fmt: skip
    emit(args, report, _spectrum_lines(report, out))
    return 0


class _StreamedDataset:
    """What loading a model needs of a streamed data set: its name, input shape and
    class count. Its arrays (``x_train``, ...) are loaded whole only when asked
    for, which happens only when a zoo model has to be trained on first use."""

    def __init__(self, name: str, input_shape: tuple[int, int, int], num_classes: int):
        self.name, self.input_shape, self.num_classes = name, input_shape, num_classes

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "_loaded":
            raise AttributeError(attr)
        if "_loaded" not in self.__dict__:
            self._loaded = _whole_dataset(self.name, self.num_classes)
        return getattr(self._loaded, attr)


def _whole_dataset(spec: str, num_classes: int) -> data.Dataset:
    """Both splits of a streamable data set in memory (``npy:DIR`` through its
    sources, which only streaming reads; every other spec by its loader)."""
    if not spec.startswith("npy:"):
        return data.load_dataset(spec)
    parts = []
    for split in ("train", "test"):
        src = sources.open_source(spec, split=split)
        parts.extend(src.read(0, len(src)))
    return data.make_dataset(spec, *parts, num_classes=num_classes)


def _dataset_for_model(args: argparse.Namespace, stream: Any) -> Any:
    """The data set a model is loaded against: the whole one unless streaming; when
    streaming, only its name, shape and classes (a zoo model that is not cached yet
    loads the whole set to train on, once)."""
    if stream is None:
        return data.load_dataset(args.dataset)
    return _StreamedDataset(args.dataset, stream.input_shape, stream.num_classes)


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


def _localize_method(args: argparse.Namespace) -> tuple:
    """``(info, options)`` of localize's --method (or --measure), --option and --star, checked
    before any file is read: unknown options, --class without a per-class variant, and the
    measures' hyperparameters."""
    flag = "--measure" if args.measure else "--method"
    info = localizers.localizer_info(args.measure or args.method or localizers.DEFAULT_LOCALIZER)
    options: dict[str, Any] = {}
    for key, value in args.option or ():
        if key in options:
            raise UsageError(f"--option must give each key once; got {key!r} twice")
        options[key] = value
    if args.star is not None:
        if "star" not in info.options:
            have = [n for n in localizers.localizer_names()
                    if "star" in localizers.localizer_info(n).options]  # fmt: skip
            raise UsageError(f"--star is a parameter of {', '.join(have)}; got {flag} {info.name}")
        if "star" in options:
            raise UsageError("--star is --option star=S; got both")
        options["star"] = args.star
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise UsageError(f"--option: localizer {info.name!r} takes options [{accepted}]; "
                         f"got {', '.join(unknown)}")  # fmt: skip
    if args.class_index is not None and not info.per_class:
        raise UsageError(f"--class needs a method with a per-class variant; {info.name} has "
                         "none (rank with --pooled)")  # fmt: skip
    if info.family in ("counts", "attribution"):  # its hyperparameters, checked now
        measures.get_measure(info.name, **{k: v for k, v in options.items() if k != "threshold"})
    return info, options


def _check_class(args: argparse.Namespace, num_classes: int) -> None:
    c = args.class_index
    if c is not None and not 0 <= c < num_classes:
        raise UsageError(f"--class must lie in [0, {num_classes}); got {c}")


def _localize_spectrum(args: argparse.Namespace, info, options: dict) -> dict:
    """localize from a saved spectrum: count and attribution measures."""
    from deepfault_jax import localize

    given = [d for d, default in args.model_only.items() if getattr(args, d) != default]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} goes with a model (--checkpoint or --model); got --spectrum")
    if info.needs not in ("spectrum", "attribution") and (args.method or args.measure):
        raise UsageError(f"--method {info.name} needs the model ({info.needs}), not a saved "
                         "spectrum: pass --checkpoint DIR or --model NAME --dataset SPEC "
                         "instead of --spectrum")  # fmt: skip
    spec = spectrum_io.load_spectrum(args.spectrum)  # a missing or damaged file first
    if info.needs not in ("spectrum", "attribution"):
        raise UsageError(f"the default method {info.name} needs the model, not a saved spectrum: "
                         "pass --checkpoint DIR or --model NAME --dataset SPEC, or name a "
                         "measure of the spectrum (--method ochiai; --method gradxact for one "
                         "computed with --attribution)")  # fmt: skip
    if (
        info.needs == "attribution"
        and spec.attribution is None
        and not (args.method or args.measure)
    ):
        raise UsageError(f"the default method {info.name} needs a spectrum computed with "
                         f"--attribution; got a count-only spectrum {args.spectrum}: compute it "
                         "with --attribution, or name a count measure (--method ochiai)")  # fmt: skip
    row = args.class_index
    if spec.classes is None:
        _check_class(args, spec.num_classes)
    elif row is not None:  # a class subset or a pooled-only spectrum
        row = spec.row_of(args.class_index)
    computed = dict(options)
    if "threshold" in info.options:  # the spectrum's own, unless the options say otherwise
        computed.setdefault("threshold", float(spec.threshold))
    start = time.perf_counter()
    scores = localizers.spectrum_scores(
        info.name, spec, per_class=args.class_index is not None, **computed
    )
    seconds = time.perf_counter() - start
    score = scores if args.class_index is None else scores[row]
    ids = localize.top_k_neurons(
        score, args.k, allowed=localize.allowed_neurons(spec.index, args.layers)
    )
    rows = localize.ranking_table(spec, score, ids, class_index=args.class_index)
    return {"source": {"spectrum": str(Path(args.spectrum).absolute()), "model_source": None,
                       "dataset": None, "inputs": None},
            "rows": rows, "seconds": seconds, "counts": True,
            "layers": list(args.layers or spec.index.layer_names),
            "counted": None if spec.classes is None or spec.pooled_only else list(spec.classes)}  # fmt: skip


def _spectrum_at_hand(evidence, info, options: dict):
    """The spectrum the localizer computed on the way (then its counts cost nothing), or None."""
    return evidence.held_spectrum(threshold=options.get("threshold", 0.0))


def _localize_model(args: argparse.Namespace, info, options: dict) -> dict:
    """localize from a model (--checkpoint or --model) on the test split: every localizer."""
    from deepfault_jax import localize

    dataset = data.load_dataset(args.dataset)
    _check_class(args, dataset.num_classes)
    n_test = len(dataset.y_test)
    n = n_test if args.inputs is None else args.inputs
    if n > n_test:
        raise UsageError(f"--inputs must be <= {n_test}, the test inputs of {dataset.name}; "
                         f"got {n}")  # fmt: skip

    def check(model, params) -> None:  # before any training
        prb = model_source.model_probe(args, model, params)
        if not 1 <= args.k <= prb.index.num_neurons:
            raise UsageError(f"--k must lie in [1, {prb.index.num_neurons}] (the neurons of "
                             f"{', '.join(prb.index.layer_names)}); got {args.k}")  # fmt: skip
        model_source.check_needs(info, options, prb, params)

    model, params, meta = model_source.load_model(args, dataset, check=check,
                                                  progress=progress_bars(args))  # fmt: skip
    prb = model_source.model_probe(args, model, params)
    x, y = dataset.x_test[:n], dataset.y_test[:n]
    evidence = localizers.Evidence(
        prb, params, x, y, batch_size=args.batch_size, progress=not args.no_progress
    )
    start = time.perf_counter()
    scores = evidence.scores(info.name, per_class=args.class_index is not None, **options)
    seconds = time.perf_counter() - start
    score = scores if args.class_index is None else scores[args.class_index]
    ids = localize.top_k_neurons(score, args.k)
    spec = _spectrum_at_hand(evidence, info, options)
    if spec is not None:
        rows = localize.ranking_table(spec, score, ids, class_index=args.class_index)
    else:
        rows = [{"rank": rank, "id": int(i), "layer": prb.index.locate(i)[0],
                 "unit": prb.index.locate(i)[1], "a_s": None, "a_f": None, "n_s": None,
                 "n_f": None, "score": float(score[i])}
                for rank, i in enumerate(ids.tolist(), start=1)]  # fmt: skip
    return {"source": {"spectrum": None, "model_source": meta["source"], "dataset": dataset.name,
                       "inputs": n},
            "rows": rows, "seconds": seconds, "counts": spec is not None,
            "layers": list(prb.index.layer_names)}  # fmt: skip


def _list_localizers(args: argparse.Namespace) -> int:
    """localize --list: every localizer, with family, needs, per-class, options and cost."""
    rows = []
    for name in localizers.localizer_names():
        info = localizers.localizer_info(name)
        rows.append({"name": name, "family": info.family, "needs": info.needs,
                     "per_class": info.per_class, "options": dict(info.options),
                     "cost": info.cost, "summary": info.summary,
                     "default": name == localizers.DEFAULT_LOCALIZER})  # fmt: skip
    human = [f"{'name':<16} {'family':<12} {'needs':<11} {'per-class':<9} {'options':<44} cost"]
    for r in rows:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["options"].items()) or "-"
        star = "*" if r["default"] else ""
        human.append(f"{r['name'] + star:<16} {r['family']:<12} {r['needs']:<11} "
                     f"{'yes' if r['per_class'] else 'no':<9} {shown:<44} {r['cost']}")  # fmt: skip
    human.append(f"* the default ({localizers.DEFAULT_LOCALIZER}); `needs`: spectrum and "
                 "attribution localizers also read a saved spectrum (attribution: one computed "
                 "with --attribution), the others need the model")  # fmt: skip
    emit(args, {"localizers": rows, "default": localizers.DEFAULT_LOCALIZER}, human)
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    if args.list:
        return _list_localizers(args)
    if not (args.spectrum or args.checkpoint or args.model):
        raise UsageError("localize needs a source: --spectrum FILE, or --checkpoint DIR or "
                         "--model NAME (with --dataset SPEC)")  # fmt: skip
    info, options = _localize_method(args)
    found = (_localize_spectrum if args.spectrum else _localize_model)(args, info, options)
    rows, pooled, c = found["rows"], args.class_index is None, args.class_index
    report = {
        **found["source"], "method": info.name, "measure": info.name, "family": info.family,
        "options": options, "params": options, "k": args.k, "class": c, "pooled": pooled,
        "layers": found["layers"], "counts": found["counts"],
        "seconds": round(found["seconds"], 3),
        "counted_classes": found.get("counted"),
        "neurons": [{**r, "score": _json_score(r["score"])} for r in rows],
    }  # fmt: skip
    emit(args, report, _localize_lines(report))
    return 0


def _localize_lines(r: dict) -> list[str]:
    """The localize command's table for people (the counts when a spectrum is at hand)."""
    pooled = "all classes" if r["counted_classes"] is None else f"classes {r['counted_classes']}"
    scope = f"{pooled} pooled" if r["pooled"] else f"class {r['class']}"
    source = r["spectrum"] or f"{r['model_source']} on {r['dataset']} ({r['inputs']} test inputs)"
    options = "".join(f", {k}={json.dumps(v)}" for k, v in r["options"].items())
    counts = f" {'A_s':>7} {'A_f':>7} {'N_s':>7} {'N_f':>7}" if r["counts"] else ""
    human = [f"top {r['k']} neurons by {r['method']}{options} ({scope}) of {source}",
             f"{'rank':>4} {'id':>6} {'layer':<14} {'unit':>5}{counts} {'score':>12}"]  # fmt: skip
    for row in r["neurons"]:
        counts = (
            "".join(f" {row[k]:>7}" for k in ("a_s", "a_f", "n_s", "n_f")) if r["counts"] else ""
        )
        score = float(row["score"])
        human.append(f"{row['rank']:>4} {row['id']:>6} {row['layer']:<14} {row['unit']:>5}"
                     f"{counts} {score:>12.6g}")  # fmt: skip
    if not r["counts"]:
        human.append(f"(no A_s/A_f/N_s/N_f: {r['method']} computes no spectrum)")
    human.append(f"scored in {r['seconds']:.2f} s")
    return human


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
        f"{'localizer':<15} {'k':>3} {'misclassified':>13} {'random':>16} {'L-inf':>6} "
        f"{'act. rose':>9}",
    ]
    for r in result.results:
        rnd = r.random["misclassification_rate"]
        human.append(
            f"{r.measure:<15} {r.k:>3} {pct(r.metrics['misclassification_rate']):>13} "
            f"{pct(rnd['mean'])} +- {pct(rnd['std']).strip():>6} {r.metrics['linf']:>6.3f} "
            f"{pct(r.metrics['activation_rose']):>9}"
        )
    for s in result.selection.skipped:
        human.append(f"class {s['class']} skipped: {s['reason']}")
    human.append(f"wrote {out}/{', '.join(pipeline.RUN_FILES)} in {result.seconds:.1f} s")
    return human


def cmd_faultbench(args: argparse.Namespace) -> int:
    from deepfault_jax.faultbench_report import faultbench_lines

    config = config_from(FaultbenchConfig, args)
    config.validate()
    out = check_out_dir(args.out)
    dataset = data.load_dataset(config.dataset)
    config.validate(dataset=dataset)  # inputs, layers, fault counts: untrained, cheap
    result = pipeline.faultbench(config, out, progress=progress_bars(args))
    done = sum(1 for t in result["trials"] if not t["skipped"])
    human = [
        f"planted-fault benchmark on {result['dataset']['name']}: {done} of "
        f"{len(result['trials'])} trials planted every fault ({result['rejected']} attempts "
        "rejected)",
        "",
        *faultbench_lines(result),
        "",
        f"wrote {out}/{', '.join(pipeline.FAULTBENCH_FILES)} in {result['seconds']:.1f} s",
    ]
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


def cmd_repair(args: argparse.Namespace) -> int:
    from deepfault_jax import repair_job

    config = config_from(repair_job.RepairConfig, args)
    config = dataclasses.replace(config, options=tuple(args.option or ()))
    config.validate()
    repair_job.check_paths(config, Path(args.out).expanduser())
    out = check_out_dir(args.out, repair_job.is_repair_dir)
    result = repair_job.run_repair(config, out, progress=progress_bars(args))
    emit(args, result, repair_job.repair_lines(result, out))
    return 0
