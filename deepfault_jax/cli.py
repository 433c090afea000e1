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
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from deepfault_jax import (
    commands,
    errors,
    foreign,
    keras_models,
    localizers,
    measures,
    model_source,
    pipeline,
    probe,
    repair,
    repair_job,
    training,
    zoo,
)
from deepfault_jax.attribution import LINEARISED
from deepfault_jax.commands import UsageError
from deepfault_jax.errors import InputError
from deepfault_jax.faultbench import FaultbenchConfig, default_methods
from deepfault_jax.faults import FAULT_KINDS
from deepfault_jax.streaming import compute_spectrum
from deepfault_jax.synthesis import DIRECTIONS, MODES

__all__ = ["main"]

_RUN = pipeline.RunConfig()  # the defaults of run, and of spectrum's model and probe options
_BENCH = FaultbenchConfig()  # the defaults of faultbench
_TRAIN = {n: p.default for n, p in inspect.signature(training.train).parameters.items()}
_SPECTRUM = {n: p.default for n, p in inspect.signature(compute_spectrum).parameters.items()}
_LOCALIZE = {
    n: p.default for n, p in inspect.signature(localizers.localize_neurons).parameters.items()
}
_UNSET = object()
_DATASET_HELP = "data set: digits, fashion-mnist, idx:DIR, tfds:NAME[:SPLIT] or npz:PATH"
_CONV_REDUCE_HELP = {"mean": "spatial mean (the paper's)", "max": "spatial max",
                     "none": "every position its own neuron"}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, raised not printed."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        # "argument --d: --d must be ..." -> "--d must be ..." (the option's type names it)
        head, sep, rest = message.partition(": ")
        option = head.removeprefix("argument ")
        if sep and head != option and rest.startswith((f"{option} ", f"{option}:")):
            message = rest
        raise UsageError(message, self.prog)


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


def _classes(flag: str, text: str) -> Any:
    """``--classes``: ``pooled`` or distinct non-negative class ids."""
    if text == "pooled":
        return text
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise InputError(
            f"{flag} must be 'pooled' or comma-separated class ids; got {text!r}"
        ) from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise InputError(f"{flag} must name distinct class ids >= 0; got {text!r}")
    return ids


def _add(
    p, flag: str, default: Any, help: str, kind=None, *, shown: Any = _UNSET, aliases=(), **kw
) -> None:
    """Adds option ``flag`` (also spelt as each of ``aliases``): its value read by ``kind``;
    its help ends with its default."""
    if kind is not None:

        def parse(text: str) -> Any:
            try:
                return kind(flag, text)
            except InputError as e:
                raise argparse.ArgumentTypeError(commands.one_line(e)) from None

        kw["type"] = parse
    shown = _shown(default) if shown is _UNSET else shown
    p.add_argument(flag, *aliases, default=default, help=f"{help} (default: {shown})", **kw)


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- parser


def _output_options(p, *, help: str, default=None, metavar="DIR", required=False) -> None:
    """--out, --no-progress and --json."""
    p.add_argument("--out", metavar=metavar, default=default, required=required, help=help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _zoo_model(option: str, text: str) -> str:
    """A zoo model's name (train: keras:/flax: models are refused, they come trained)."""
    if foreign.is_foreign(text) or text.startswith(("keras:", "flax:")):
        raise InputError(f"{option} of train names a zoo model ({', '.join(zoo.MODEL_NAMES)}); "
                         f"got {text!r}: keras: and flax: models come trained, use them with "
                         "spectrum, localize, run or repair")  # fmt: skip
    if text not in zoo.MODEL_NAMES:
        raise InputError(f"invalid choice: {text!r} (choose from {', '.join(zoo.MODEL_NAMES)})")
    return text


def _any_model(option: str, text: str) -> str:
    """A zoo model's name, ``keras:PATH`` or ``flax:MODULE:FACTORY`` (its form only: the file
    or module is read by the command)."""
    if text.startswith(("keras:", "flax:")):
        foreign.parse_source(text)
        return text
    if text not in zoo.MODEL_NAMES:
        raise InputError(f"invalid choice: {text!r} (choose from {', '.join(zoo.MODEL_NAMES)}, "
                         "keras:PATH or flax:MODULE:FACTORY)")  # fmt: skip
    return text


_FOREIGN_HELP = (
    "; or keras:PATH, a Keras model saved by model.save() as .keras or legacy .h5 (Sequential "
    "or a Functional chain of Dense, Conv, pooling, Flatten, activation, Dropout, "
    "BatchNormalization layers; loaded in Keras's safe mode), or flax:MODULE:FACTORY, where "
    "MODULE is a dotted module name importable from the current directory or PYTHONPATH, or a "
    "path to a .py file, and FACTORY() returns (linen_module, params[, activation_fn]), an "
    "nnx.Module, or (fn, params[, gated_fn]) with fn(params, x) -> (logits, {name: "
    "activation}). Its input shape and classes must be the data set's"
)


def _model_options(p, *, checkpoint: bool, seed_help: str, model: str | None = _RUN.model):
    """The model: --model (or --checkpoint), --activation, --dataset and --seed, and (with
    ``checkpoint``) --trust-model-file; returns the group of the exclusive model sources (with
    ``checkpoint``). Without ``checkpoint`` (train) --model takes zoo models only."""
    group = p.add_mutually_exclusive_group() if checkpoint else p
    cached = ", trained on the data set on first use and cached" if checkpoint else ""
    more = _FOREIGN_HELP if checkpoint else ""
    _add(group, "--model", model, f"zoo model{cached}: {', '.join(zoo.MODEL_NAMES)}{more}",
         _any_model if checkpoint else _zoo_model, metavar="NAME" if not checkpoint else
         "NAME|keras:PATH|flax:MODULE:FACTORY", shown=_UNSET if model else "none")  # fmt: skip
    if checkpoint:
        group.add_argument("--checkpoint", metavar="DIR",
                           help="a checkpoint from `deepfault-jax train`, instead of --model")  # fmt: skip
        p.add_argument(keras_models.TRUST_OPTION, action="store_true", dest="trust_model_file",
                       help="load a --model keras:PATH file with Keras's safe mode off, so that "
                       "Python code stored in it (Lambda layers, lambda activations) is run: "
                       "only for files you trust (default: safe mode on)")  # fmt: skip
    own = "; a --checkpoint has its own; keras:/flax: models ignore it" if checkpoint else ""
    _add(p, "--activation", _RUN.activation, f"the model's hidden nonlinearity{own}",
         choices=tuple(zoo.ACTIVATIONS))  # fmt: skip
    _add(p, "--dataset", _RUN.dataset, _DATASET_HELP, metavar="SPEC")
    _add(p, "--seed", _RUN.seed, f"{seed_help}, in [0, 2**63 - 1]", _int(seed=True), metavar="N")
    return group


_VALUES_HELP = (
    "count neuron values before (pre) or after (post) the activation function, or (keras: "
    "models only) each layer's output as Keras defines it (layer: the original DeepFault's "
    "neuron; after a layer's built-in activation, e.g. Conv2D(activation='relu'), and equal "
    "to pre for a Dense followed by a separate activation layer). For zoo and flax: models a "
    "layer's output is its pre-activation value, so layer is refused there: use pre"
)


def _probe_options(p, defaults, *, conv_reductions=probe.CONV_REDUCTIONS, threshold=True,
                   layers="layers to probe", keras=True):  # fmt: skip
    """Which neurons and values are counted: --layers, --conv-reduce, --values, --threshold
    (``keras``: --values also takes ``layer``, for keras: models)."""
    more = " (keras: models: also layer types such as Dense, Conv2D)" if keras else ""
    _add(p, "--layers", defaults.layers, layers + more, _listed(), metavar="A,B,...",
         shown="every hidden Dense/Conv")  # fmt: skip
    kinds = "; ".join(f"{r}: {_CONV_REDUCE_HELP.get(r, r)}" for r in conv_reductions)
    _add(p, "--conv-reduce", defaults.conv_reduce, f"a conv channel's value: {kinds}",
         choices=tuple(conv_reductions))  # fmt: skip
    if keras:
        _add(p, "--values", defaults.values, _VALUES_HELP, choices=model_source.VALUES)
    else:
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
    p.set_defaults(func=commands.cmd_train)


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
    _add(p, "--classes", None, "count only these classes, one row each (comma-separated "
         "ids), or 'pooled' for one row of every class together: per-class rows cost 2 x "
         "classes x neurons x 4 bytes, which pooled-only counting avoids for very large neuron "
         "counts", _classes, metavar="pooled|C1,C2,...", shown="every class, one row each")  # fmt: skip
    p.add_argument("--stream", action="store_true", help="read the split a batch at a time "
                   "(memory-mapped npz/npy/idx, chunked gzip idx, TFDS array_record through "
                   "grain) instead of loading it whole; a zoo --model not cached yet loads "
                   "the set once to train on (default: off)")  # fmt: skip
    _output_options(p, metavar="FILE.npz", required=True, help="spectrum file to write (an "
                    "earlier spectrum there is replaced; any other file is kept)")  # fmt: skip
    p.set_defaults(func=commands.cmd_spectrum)


def _method(option: str, text: str) -> str:
    """A localizer's name (``--measure``: a count or attribution measure's)."""
    known = text.lower().replace("-", "_") in localizers.localizer_names()
    try:
        if option == "--measure" and not known:
            measures.measure_kind(text)  # raises with the measures' names
        info = localizers.localizer_info(text)
    except InputError as e:
        raise InputError(f"{option}: {e}") from None
    if option == "--measure" and info.family not in ("counts", "attribution"):
        raise InputError(f"--measure names a count or attribution measure; got {text!r}, a "
                         f"{info.family} localizer: use --method {info.name}")  # fmt: skip
    return info.name


#: localize's options that go with a model source only (not with --spectrum)
_MODEL_ONLY = ("dataset", "activation", "seed", "inputs", "conv_reduce", "values", "batch_size",
               "trust_model_file")  # fmt: skip


def _localize_parser(sub) -> None:
    p = sub.add_parser("localize", help="rank the neurons of a model or a spectrum by a "
                       "localizer", description="Score every neuron with a localizer (see "
                       "--list) and list the top k (ties: lower neuron id first): from a saved "
                       "spectrum (count and attribution measures), or from a model (--checkpoint "
                       "or --model) on the test split of --dataset (every localizer).")  # fmt: skip
    source = _model_options(p, checkpoint=True, seed_help="training seed of a --model",
                            model=None)  # fmt: skip
    source.add_argument("--spectrum", metavar="FILE.npz",
                        help="from `deepfault-jax spectrum`, instead of a model")  # fmt: skip
    _add(p, "--inputs", None, "test inputs to localize on (the first N)", _int(lo=1),
         metavar="N", shown="the whole test split")  # fmt: skip
    _probe_options(p, _RUN, threshold=False, layers="only neurons of these layers (with a "
                   "model: the layers probed)")  # fmt: skip
    _add(p, "--batch-size", _LOCALIZE["batch_size"], "inputs per step", _int(lo=1), metavar="B")
    method = p.add_mutually_exclusive_group()
    _add(method, "--method", None, "localizer (see --list)", _method, metavar="NAME",
         shown=localizers.DEFAULT_LOCALIZER)  # fmt: skip
    _add(method, "--measure", None, "a count or attribution measure, as --method",
         _method, metavar="NAME", shown="--method's")  # fmt: skip
    _add(p, "--option", None, "an option of the method, repeatable; VALUE is read as JSON "
         "where it parses (steps=10, gains=[-1,0,2], methods=[\"gradxact\",\"grad_norm\"]), "
         "else as text", lambda _, text: model_source.parse_option(text), action="append",
         metavar="KEY=VALUE", shown="none")  # fmt: skip
    _add(p, "--star", None, "DStar's exponent, as --option star=S", _float(finite=False),
         metavar="S", shown=_RUN.star)  # fmt: skip
    _add(p, "--k", 10, "neurons to list, at most the probed ones", _int())  # localize checks
    scope = p.add_mutually_exclusive_group()
    _add(scope, "--class", None, "rank by the scores of the inputs of true class C (methods "
         "with a per-class variant)", _int(lo=0), dest="class_index", metavar="C",
         shown="--pooled")  # fmt: skip
    scope.add_argument("--pooled", action="store_true",
                       help="rank by the scores of all classes together (the default)")  # fmt: skip
    p.add_argument(
        "--list", action="store_true", help="list every localizer: family, needs, options, cost"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=commands.cmd_localize,
                   model_only={dest: p.get_default(dest) for dest in _MODEL_ONLY})  # fmt: skip


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole DeepFault job: spectrum, suspicious neurons, "
                       "synthesis, evaluation", description="Train (or load the cached) model, "
                       "compute the test split's spectrum, find each class's suspicious neurons "
                       "per measure and k, synthesize inputs from correctly classified ones, "
                       "evaluate them against a random-neuron baseline, and write "
                       f"{', '.join(pipeline.RUN_FILES)} into --out.")  # fmt: skip
    _model_options(p, checkpoint=True, seed_help="training, selection and baseline seed")
    _add(p, "--measures", _RUN.measures, "localizers that choose the suspicious neurons: "
         "count and attribution measures (from the spectrum, per class) or any other "
         "localizer (see `localize --list`; per class where it has a per-class variant)",
         _listed(check=localizers.localizer_info), metavar="A,B,...",
         aliases=("--methods",))  # fmt: skip
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
    p.set_defaults(func=commands.cmd_run)


def _drop_windows(option: str, text: str) -> tuple[tuple[float, float], ...]:
    """``LO:HI[,LO:HI...]``: accuracy-drop windows, 0 < LO < HI < 1 each."""
    windows = []
    for part in errors.parse_names(text, option):
        lo, sep, hi = part.partition(":")
        if not sep:
            raise InputError(f"{option} must be LO:HI windows such as 0.005:0.01; got {part!r}")
        lo = _float(lo=0.0, hi=1.0, lo_open=True, hi_open=True)(option, lo)
        hi = _float(lo=0.0, hi=1.0, lo_open=True, hi_open=True)(option, hi)
        if not lo < hi:
            raise InputError(f"{option} windows must have LO < HI; got {part!r}")
        windows.append((lo, hi))
    return tuple(windows)


def _faultbench_parser(sub) -> None:
    p = sub.add_parser("faultbench", help="plant known faults in trained models and score "
                       "every localizer on them", description="Plant faulty neurons of "
                       "documented kinds in trained zoo models (each fault's strength calibrated "
                       "so that it lowers the accuracy on held-out test inputs by an amount "
                       "inside a --drop window), localize them with every method on other test "
                       "inputs, and report recall at top-k and top-k%, mean rank, runtime and "
                       "leave-one-kind-out choices against the random ranking, as "
                       f"{', '.join(pipeline.FAULTBENCH_FILES)}.")  # fmt: skip
    _add(p, "--models", _BENCH.models, "zoo models as NAME or NAME:ACTIVATION, trained on first "
         f"use and cached: {', '.join(zoo.MODEL_NAMES)}",
         _listed(check=FaultbenchConfig.check_model), metavar="A,B:leaky_relu,...")  # fmt: skip
    _add(p, "--model-seeds", _BENCH.model_seeds, "training seeds of every model, each in "
         "[0, 2**63 - 1]", _listed(_int(seed=True)), metavar="S1,S2,...")  # fmt: skip
    _add(p, "--dataset", _BENCH.dataset, _DATASET_HELP, metavar="SPEC")
    kinds = FAULT_KINDS
    _add(p, "--kinds", _BENCH.kinds, f"fault kinds: {', '.join(kinds)}",
         _listed(choices=kinds, what="fault kind", all_means=kinds), metavar="all|A,B,...",
         shown="all" if _BENCH.kinds == kinds else _UNSET)  # fmt: skip
    _add(p, "--drop", _BENCH.drops, "accuracy-drop windows per fault, LO:HI each (a trial per "
         "window)", _drop_windows, dest="drops", metavar="LO:HI,...",
         shown=",".join(f"{lo}:{hi}" for lo, hi in _BENCH.drops))  # fmt: skip
    _add(p, "--faults", _BENCH.faults, "faults planted together per trial (at most the "
         "probed neurons of each model)", _listed(_int(lo=1)), metavar="N1,N2,...")  # fmt: skip
    _add(p, "--seeds", _BENCH.seeds, "trial seeds, each in [0, 2**63 - 1]",
         _listed(_int(seed=True)), metavar="S1,S2,...")  # fmt: skip
    _add(p, "--inputs", _BENCH.inputs, "test inputs to localize on (the first ones)",
         _int(lo=FaultbenchConfig.MIN_INPUTS), metavar="N")  # fmt: skip
    _add(p, "--measure-inputs", _BENCH.measure_inputs, "test inputs after those to measure "
         "accuracy drops on", _int(lo=FaultbenchConfig.MIN_INPUTS), metavar="N")  # fmt: skip
    _add(p, "--methods", _BENCH.methods, "localizers, NAME or NAME/per-class (see `localize "
         "--list`)", _listed(check=FaultbenchConfig.check_method), metavar="A,B/per-class,...",
         shown=", ".join(default_methods()))  # fmt: skip
    _add(p, "--candidates", _BENCH.candidates, "the methods leave-one-kind-out chooses among",
         _listed(check=FaultbenchConfig.check_method), metavar="A,B,...",
         shown="the cheap methods among --methods")  # fmt: skip
    _add(p, "--top-k", _BENCH.top_k, "recall cutoffs in neurons", _listed(_int(lo=1)),
         metavar="K1,K2,...")  # fmt: skip
    _add(p, "--tries", _BENCH.tries, "neurons tried per fault before a trial is given up",
         _int(lo=1), metavar="N")  # fmt: skip
    _probe_options(p, _BENCH, conv_reductions=FaultbenchConfig.CONV_REDUCTIONS, threshold=False,
                   keras=False)  # fmt: skip
    _add(p, "--batch-size", _BENCH.batch_size, "inputs per step", _int(lo=1), metavar="B")
    _output_options(
        p, default="runs/faultbench", help="output directory (default: runs/faultbench)"
    )
    p.set_defaults(func=commands.cmd_faultbench)


_REPAIR = repair_job.RepairConfig()  # the defaults of repair


def _repair_parser(sub) -> None:
    p = sub.add_parser("repair", help="retrain only a localizer's top-k neurons, beside "
                       "random neurons, the output layer and full fine-tuning",
                       description="Localize (any localizer, on held-out training inputs), "
                       "fine-tune only the chosen neurons' parameters with optax Adam on the "
                       "training split (early-stopped on held-out training inputs), run the "
                       "baselines on the same step budget, and write a repaired checkpoint, "
                       "repair.json and repair.md into --out. The test split only measures; "
                       "the input checkpoint is never modified.")  # fmt: skip
    source = _model_options(p, checkpoint=True, seed_help="training seed of a --model, and "
                            "the repair's seed")  # fmt: skip
    del source
    chosen = p.add_mutually_exclusive_group()
    _add(chosen, "--method", _REPAIR.method, "localizer choosing the neurons (see `localize "
         "--list`)", _method, metavar="NAME")  # fmt: skip
    _add(chosen, "--neurons", None, "repair these neuron ids instead",
         lambda _, text: repair_job.parse_neurons(text), metavar="ID,ID,...", shown="none")  # fmt: skip
    _add(p, "--option", None, "an option of the method, repeatable (as localize's)",
         lambda _, text: model_source.parse_option(text), action="append",
         metavar="KEY=VALUE", shown="none")  # fmt: skip
    _add(p, "--k", _REPAIR.k, "neurons to repair, at most the probed ones", _int(lo=1))
    _add(p, "--part", _REPAIR.part, "what of each neuron is trained",
         choices=repair.PARTS)  # fmt: skip
    _add(p, "--budget", _REPAIR.budget, "optimiser steps of every repair", _int(lo=1),
         metavar="STEPS")  # fmt: skip
    _add(p, "--batch-size", _REPAIR.batch_size, "inputs per step", _int(lo=1), metavar="B")
    _add(p, "--learning-rate", _REPAIR.learning_rate, "Adam step",
         _float(lo=0.0, lo_open=True), metavar="LR")  # fmt: skip
    _add(p, "--full-learning-rate", _REPAIR.full_learning_rate, "Adam step of the full "
         "fine-tuning baseline", _float(lo=0.0, lo_open=True), metavar="LR",
         shown="a tenth of --learning-rate")  # fmt: skip
    _add(p, "--validation", _REPAIR.validation, "training inputs held out for early stopping "
         "and localization (the last N; at most half)", _int(lo=1), metavar="N")  # fmt: skip
    _add(p, "--synthesized", _REPAIR.synthesized, "synthesize N inputs from each of the "
         "repair, validation and test inputs (projected gradient ascent on the chosen "
         "neurons, labelled as their originals): repair data, validation data, and held-out "
         "measure", _int(lo=0), metavar="N")  # fmt: skip
    _add(p, "--synthesized-share", _REPAIR.synthesized_share, "the share of the repair data "
         "the synthesized inputs make up (repeated to reach it), in [0, 1)",
         _float(lo=0.0, hi=1.0, hi_open=True), metavar="S")  # fmt: skip
    _add(p, "--d", _REPAIR.d, "the synthesis's maximum L-inf distance, in (0, 1]",
         _float(lo=0.0, hi=1.0, lo_open=True))  # fmt: skip
    _add(p, "--baselines", _REPAIR.baselines, "among random, output, full",
         _listed(choices=repair.BASELINES, what="baseline"), metavar="A,B,...")  # fmt: skip
    _add(p, "--random-repeats", _REPAIR.random_repeats, "random-neuron repairs", _int(lo=1))
    p.add_argument("--search", action="store_true",
                   help="also repair by differential evolution (evosax) on the same budget")  # fmt: skip
    _probe_options(p, _RUN, threshold=False)
    _output_options(p, default="runs/repair", help="output directory (default: runs/repair)")
    p.set_defaults(func=commands.cmd_repair)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and the data sets available here",
                       description="Show package versions, JAX devices, and which data sets "
                       "can be loaded here.")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=commands.cmd_info)


def _parser() -> argparse.ArgumentParser:
    from deepfault_jax import __version__

    parser = _Parser(prog="deepfault-jax",
                     description="DeepFault fault localization for deep neural networks, in JAX.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"deepfault-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for build in (_train_parser, _spectrum_parser, _localize_parser, _run_parser,
                  _faultbench_parser, _repair_parser, _info_parser):  # fmt: skip
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
        reason = commands.one_line(str(e).split(" (set JAX_PLATFORMS")[0]) or "no such device here"
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
        sys.stderr.write(f"{getattr(e, 'prog', None) or command}: error: {commands.one_line(e)}\n")
        return 2
    except BrokenPipeError:  # `... --json | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("deepfault-jax: interrupted\n")
        return 130
    except Exception as e:  # an internal error: show everything
        traceback.print_exc()
        sys.stderr.write(f"deepfault-jax: internal error: {commands.one_line(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
