"""One DeepFault run, end to end, as named steps: model, spectrum, suspicious sets, synthesis,
evaluation, report.

:func:`run` is what ``deepfault-jax run`` calls; it composes the steps below,
each usable alone:

1. :meth:`RunConfig.validate` refuses a configuration that cannot run, before
   any work; :func:`load_model` trains the zoo model (cached) or loads a
   checkpoint; :func:`build_probe` probes it and checks the layers and k;
2. ``compute_spectrum`` (:mod:`deepfault_jax.streaming`) counts the test split;
3. :func:`select_inputs` picks up to ``inputs_per_class`` correctly
   classified test inputs of each class (with a key from the seed); a class
   with none is reported and skipped;
4. :func:`run_scores` scores the neurons with every localizer of the run (count and
   attribution measures on the spectrum, per class; any other localizer on the
   same inputs with :class:`~deepfault_jax.localizers.Evidence`, per class where
   it has a per-class variant, else pooled), :func:`select_sets` (and
   :func:`suspicious_sets`) gives each one's ``[classes, k]`` table, and
   :func:`random_sets` the random baseline's tables of the same size from the
   same layers (excluding the localizers' neurons);
5. :func:`synthesize_inputs` synthesizes toward a table, and
   ``evaluate_synthesis`` (:mod:`deepfault_jax.evaluate`) measures the result;
6. :func:`build_report` gathers everything into a typed :class:`RunReport`;
   :func:`write_outputs` writes ``report.json``, ``report.md``,
   ``synthesized.npz``, ``spectrum.npz`` and PNG figures into the output
   directory as one unit (a failed run leaves an earlier output set as it was).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepfault_jax import (
    checkpoints,
    data,
    evaluate,
    foreign,
    localize,
    localizers,
    measures,
    model_source,
    probe,
    report,
    spectrum,
    spectrum_io,
    streaming,
    synthesis,
    zoo,
)
from deepfault_jax import faultbench as faultbench_lib
from deepfault_jax.errors import InputError, check_finite, check_int, check_seed
from deepfault_jax.files import check_replaceable, replace_directory
from deepfault_jax.interrupts import Interrupt, deferred_interrupt, stop_if_interrupted
from deepfault_jax.progress import Progress, notify
from deepfault_jax.report import (
    REPORT_FORMAT,
    MeasureResult,
    RandomRun,
    RunReport,
    Selection,
)

__all__ = [
    "RUN_FILES",
    "RunConfig",
    "build_probe",
    "build_report",
    "faultbench",
    "load_model",
    "random_sets",
    "run",
    "run_scores",
    "select_inputs",
    "select_sets",
    "suspicious_sets",
    "synthesize_inputs",
    "write_outputs",
]

#: The files of a run's output directory.
RUN_FILES = (
    "report.json",
    "report.md",
    "synthesized.npz",
    "spectrum.npz",
    "misclassification.png",
    "examples.png",
)
FAULTBENCH_FILES = ("faultbench.json", "faultbench.md", "faultbench.png")
FAULTBENCH_FORMAT = "deepfault-jax-faultbench"
_MEASURE_FAMILIES = ("counts", "attribution")  # localizers that read the run's spectrum


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (defaults: the quickstart's run on ``digits``).

    Attributes:
      model: zoo architecture (trained on first use and cached), unless ``checkpoint``;
        or a model from outside the zoo: ``keras:PATH`` (a .keras/.h5 file) or
        ``flax:MODULE:FACTORY`` (:mod:`deepfault_jax.foreign`).
      activation: its hidden activation (``relu`` or ``leaky_relu``).
      dataset: data set spec.
      checkpoint: a checkpoint directory to use instead of the zoo model.
      trust_model_file: load a ``keras:`` file with Keras's safe mode off (runs code
        stored in it: Lambda layers); only for files you trust.
      measures: the localizers that choose the suspicious neurons
        (:func:`~deepfault_jax.localizers.localizer_names`): count and attribution
        measures, or any other localizer.
      k: suspicious set sizes.
      classes: the classes to synthesize from (None: all).
      mode: ``"deepfault"`` or ``"pgd"``.
      d: maximum L-inf distance.
      step_size: gradient multiplier (None: 1 for deepfault; 2.5 d / steps for pgd).
      steps: pgd steps.
      direction: pgd direction (``raw``, ``sign``, ``l2``, or ``adam``).
      stop_when_misclassified: pgd: stop each input once misclassified.
      inputs_per_class: originals per class, at most.
      random_repeats: random baselines per k.
      seed: seeds training, input selection and the random baseline.
      layers: probed layers (None: every hidden Dense/Conv).
      conv_reduce: conv neuron reduction.
      values: ``"pre"`` or ``"post"`` activation, for the spectrum and the objective;
        ``"layer"`` (each layer's Keras output) for ``keras:`` models only.
      threshold: activity threshold.
      star: DStar's exponent.
      batch_size: inputs per compiled step.
    """

    model: str = "mlp-3x50"
    activation: str = "relu"
    dataset: str = "digits"
    checkpoint: str | None = None
    trust_model_file: bool = False
    measures: tuple[str, ...] = ("tarantula", "ochiai", "dstar")
    k: tuple[int, ...] = (1, 5, 10)
    classes: tuple[int, ...] | None = None
    mode: str = "deepfault"
    d: float = 0.1
    step_size: float | None = None
    steps: int = 10
    direction: str = "sign"
    stop_when_misclassified: bool = False
    inputs_per_class: int = 20
    random_repeats: int = 3
    seed: int = 0
    layers: tuple[str, ...] | None = None
    conv_reduce: str = "mean"
    values: str = "pre"
    threshold: float = 0.0
    star: float = 3.0
    batch_size: int = 256

    def validate(self) -> None:
        """Raises :class:`InputError` for a configuration that cannot run (before any work)."""
        if not self.measures:
            raise InputError("measures must name at least one localizer; got none")
        for name in self.measures:
            if localizers.localizer_info(name).family in _MEASURE_FAMILIES:
                measures.get_measure(name, **self.measure_params(name))
        if not self.k or len(set(self.k)) != len(self.k):
            raise InputError(f"k must list distinct positive integers; got {list(self.k)}")
        for k in self.k:
            check_int("k", k, lo=1)
        if self.classes is not None:
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise InputError(f"classes must list distinct classes; got {list(self.classes)}")
            for c in self.classes:
                check_int("classes", c, lo=0)
        _check_choice("mode", self.mode, synthesis.MODES)
        # inputs lie in [0, 1]: a larger distance allows any input
        check_finite("d (the maximum L-inf distance)", self.d, lo=0.0, hi=1.0, lo_open=True)
        if self.step_size is not None:
            check_finite("step_size", self.step_size, lo=0.0, lo_open=True)
        _check_choice("direction", self.direction, (*synthesis.DIRECTIONS, "adam"))
        check_int("inputs_per_class", self.inputs_per_class, lo=1)
        check_int("random_repeats", self.random_repeats, lo=1)
        check_int("steps", self.steps, lo=1)
        check_int("batch_size", self.batch_size, lo=1)
        check_seed(self.seed)
        check_finite("threshold", self.threshold)
        check_finite("star", self.star, lo=0.0, lo_open=True)
        _check_choice("conv_reduce", self.conv_reduce, probe.CONV_REDUCTIONS)
        model_source.check_source(self)

    def resolved_step_size(self) -> float:
        """The step size in use."""
        if self.step_size is not None:
            return float(self.step_size)
        return 1.0 if self.mode == "deepfault" else 2.5 * self.d / self.steps

    def measure_params(self, name: str) -> dict:
        """The hyperparameters this run passes to measure ``name`` (DStar's ``star``)."""
        return {"star": self.star} if "star" in measures.measure_parameters(name) else {}

    def localizer_options(self, name: str) -> dict:
        """The options this run passes to localizer ``name``: DStar's ``star``, and the
        run's ``threshold`` to those that take one; the others keep their defaults."""
        info = localizers.localizer_info(name)
        options = {"star": self.star} if "star" in info.options else {}
        if "threshold" in info.options:
            options["threshold"] = float(self.threshold)
        return options

    def needs_attribution(self) -> bool:
        """Whether a measure of the run reads attribution sums (then the spectrum gathers them)."""
        return any(
            localizers.localizer_info(name).family == "attribution" for name in self.measures
        )


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# --------------------------------------------------------------------------- steps


def load_model(config: RunConfig, dataset: data.Dataset, *, progress: Progress | None = None):
    """The run's model: ``(model, params, meta)`` from ``config.checkpoint`` or the zoo (cached);
    :func:`build_probe` checks the layers and k on it (on the untrained zoo model: before any
    training)."""
    return model_source.load_model(
        config, dataset, check=lambda model, params: build_probe(config, model, params),
        progress=progress,
    )  # fmt: skip


def build_probe(config: RunConfig, model: zoo.Model, params: Any) -> probe.Probe:
    """The run's probe of ``model``, after checking that its layers are hidden layers and
    that every k fits its neurons."""
    if config.layers and isinstance(model, foreign.ForeignModel):
        model.check_layers(params, config.layers)
    elif config.layers:
        hidden = probe.model_probe(model, params).index.layer_names
        other = [name for name in config.layers if name not in hidden]
        if other:
            raise InputError(
                f"layers must be hidden layers of {model.name} ({', '.join(hidden)}); got "
                f"{', '.join(map(repr, other))} (the output layer's values are the logits "
                "whose classification is being localised)"
            )
    prb = model_source.model_probe(config, model, params)
    for k in config.k:
        if k > prb.index.num_neurons:
            raise InputError(
                f"k must be <= {prb.index.num_neurons}, the neurons of the probed layers "
                f"{', '.join(prb.index.layer_names)}; got {k}"
            )
    return prb


def _check_classes(config: RunConfig, dataset: data.Dataset) -> tuple[int, ...]:
    """The classes to synthesize from, checked against the data set (before any training)."""
    classes = tuple(range(dataset.num_classes)) if config.classes is None else config.classes
    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad:
        raise InputError(f"classes must lie in [0, {dataset.num_classes}); got {bad}")
    return tuple(int(c) for c in classes)


def select_inputs(key: jax.Array, y: np.ndarray, pred: np.ndarray, classes, per_class_max: int):
    """Up to ``per_class_max`` correctly classified rows of each class, drawn with ``key``.

    Returns:
      A :class:`Selection`; a class without a correctly classified input is skipped, with
      the reason.
    """
    chosen, skipped, per_class = [], [], {}
    for c in classes:
        rows = np.flatnonzero((y == c) & (pred == c))
        if rows.size == 0:
            total = int(np.sum(y == c))
            reason = (
                "no test input"
                if total == 0
                else f"none of its {total} test inputs is classified correctly"
            )
            skipped.append({"class": int(c), "reason": reason})
            continue
        n = min(per_class_max, rows.size)
        pick = np.asarray(
            jax.random.choice(jax.random.fold_in(key, int(c)), rows.size, (n,), replace=False)
        )
        chosen.append(np.sort(rows[pick]))
        per_class[int(c)] = int(n)
    rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return Selection(rows, per_class, skipped)


def run_scores(
    config: RunConfig,
    spec: spectrum.Spectrum,
    evidence: localizers.Evidence | None = None,
    *,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Every localizer's scores: name -> ``float32[classes, neurons]`` (per class) or
    ``float32[neurons]`` (pooled, for a localizer without a per-class variant).

    Count and attribution measures score ``spec`` per class (as the paper); the other
    localizers score ``evidence``: the model on the inputs ``spec`` counted (its spectrum
    pass is not repeated when ``spec`` has attribution sums).
    """
    scores, others = {}, [n for n in config.measures if not _is_measure(n)]
    if others and evidence is None:
        raise InputError(f"localizers {others} need the model: give evidence")
    if others and spec.attribution is not None:
        evidence.memo(("spectrum", float(spec.threshold)), lambda: spec)
    for name in config.measures:
        info, options = localizers.localizer_info(name), config.localizer_options(name)
        if info.family in _MEASURE_FAMILIES:
            scores[name] = localizers.spectrum_scores(name, spec, per_class=True, **options)
        else:
            scores[name] = evidence.scores(name, per_class=info.per_class, **options)
            notify(progress, "localizers", others.index(name) + 1, len(others))
    return scores


def select_sets(scores: dict[str, np.ndarray], k: int, num_classes: int) -> dict[str, np.ndarray]:
    """The suspicious sets of size ``k`` from each localizer's scores: name ->
    ``int32[classes, k]``, each class's own top k (per-class scores) or the same pooled
    top k for every class (``[neurons]`` scores); ties: lower neuron id first."""
    tables = {}
    for name, score in scores.items():
        top = localize.top_k_neurons(score, k)
        tables[name] = np.asarray(np.broadcast_to(top, (num_classes, k)), np.int32)
    return tables


def suspicious_sets(
    config: RunConfig, spec: spectrum.Spectrum, k: int, *, scores: dict | None = None
) -> dict[str, np.ndarray]:
    """Every localizer's suspicious sets of size ``k``: name -> ``int32[classes, k]`` (from
    ``scores`` of :func:`run_scores`; without, the measures' on ``spec``)."""
    scores = run_scores(config, spec) if scores is None else scores
    return select_sets(scores, k, spec.num_classes)


def _is_measure(name: str) -> bool:
    return localizers.localizer_info(name).family in _MEASURE_FAMILIES


def random_sets(
    key: jax.Array, index: probe.NeuronIndex, k: int, num_classes: int, exclude: list[np.ndarray]
) -> np.ndarray:
    """The random baseline's ``int32[classes, k]`` table: per class, k neurons drawn with
    ``key`` from the probed layers, excluding that class's row of every table in ``exclude``."""
    return np.stack([
        localize.random_neurons(jax.random.fold_in(key, c), index, k,
                                exclude=[t[c] for t in exclude])
        for c in range(num_classes)
    ]).astype(np.int32)  # fmt: skip


def make_run_synthesizer(config: RunConfig, prb: probe.Probe) -> synthesis.Synthesizer:
    """The run's synthesizer (mode, d, step size, steps, direction)."""
    step_size = config.resolved_step_size()
    direction: Any = config.direction
    if direction == "adam":
        import optax

        direction = optax.adam(step_size)
    return synthesis.make_synthesizer(
        prb, mode=config.mode, d=config.d, step_size=step_size, steps=config.steps,
        direction=direction, stop_when_misclassified=config.stop_when_misclassified,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0,))
def _synthesize_batch(synth: synthesis.Synthesizer, params, x, y, table):
    return synthesis.synthesize(synth, params, x, y, table)


def synthesize_inputs(
    synth: synthesis.Synthesizer, params: Any, x0: np.ndarray, y: np.ndarray, table: np.ndarray,
    *, batch_size: int,
) -> np.ndarray:  # fmt: skip
    """Synthesizes from ``x0`` toward ``table`` in fixed-shape, padded batches (one compilation);
    the table and labels are checked on the host first (under jit a bad id would be clamped)."""
    table = synthesis.check_table(synth.probe, table)
    synthesis.check_labels(synth.probe, y, batch=len(y))
    out = []
    for batch in data.iterate_batches(x0, y, batch_size=batch_size):
        xs = _synthesize_batch(synth, params, batch.x, batch.y, jnp.asarray(table))
        out.append(np.asarray(xs)[batch.mask])
    return np.concatenate(out)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Synthesis:
    """The synthesis stage's running state: its arrays (for synthesized.npz) and rows."""

    arrays: dict[str, np.ndarray]
    results: list[MeasureResult] = dataclasses.field(default_factory=list)
    random_runs: list[RandomRun] = dataclasses.field(default_factory=list)
    done: int = 0
    interrupt: Interrupt | None = None


def _synthesize_all_sets(config, synth, prb, params, scores, x0, y0, key, state, progress):
    """For every k: synthesis toward each localizer's sets and the random repeats."""
    total = len(config.k) * (len(config.measures) + config.random_repeats)

    def measure(tag: str, table: np.ndarray) -> dict:
        xs = synthesize_inputs(synth, params, x0, y0, table, batch_size=config.batch_size)
        metrics = evaluate.evaluate_synthesis(
            prb, params, x0, xs, y0, table, threshold=config.threshold
        )
        state.arrays[f"{tag}__x"] = xs
        state.arrays[f"{tag}__pred"] = np.asarray(metrics.pop("predictions"), np.int32)
        state.arrays[f"{tag}__table"] = table
        state.done += 1
        notify(progress, "synthesis", state.done, total)
        if state.interrupt is not None:
            stop_if_interrupted(state.interrupt)  # Ctrl-C: here, with nothing in flight
        return metrics

    for k in config.k:
        tables = select_sets(scores, k, prb.num_classes)
        rows = [(name, k, measure(f"{name}_k{k}", table)) for name, table in tables.items()]
        repeats = []
        for r in range(config.random_repeats):
            rkey = jax.random.fold_in(jax.random.fold_in(key, k), r)
            table = random_sets(rkey, prb.index, k, prb.num_classes, list(tables.values()))
            metrics = measure(f"random_k{k}_r{r}", table)
            repeats.append(metrics)
            state.random_runs.append(RandomRun(k, r, metrics))
        summary = evaluate.summarize_repeats(repeats)
        random = {m: {"mean": s["mean"], "std": s["std"]} for m, s in summary.items()}
        state.results += [MeasureResult(name, k, metrics, random) for name, k, metrics in rows]


def run(config: RunConfig, out_dir: str | Path, *, progress: Progress | None = None) -> RunReport:
    """Runs DeepFault end to end and writes the outputs into ``out_dir`` as one unit.

    Args:
      config: the run's configuration (validated first, with the data set, the
        probe's layers and ``out_dir``, before any training or output).
      out_dir: directory for :data:`RUN_FILES`; an existing one is replaced
        only when it is empty or holds an earlier run's outputs.
      progress: a progress callback (:mod:`deepfault_jax.progress`).

    Returns:
      The :class:`RunReport` (its :meth:`~RunReport.to_json` is ``report.json``).
    """
    config.validate()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_replaceable(out_dir, owned=_is_run_dir)  # before any work
    dataset = data.load_dataset(config.dataset)
    classes = _check_classes(config, dataset)
    model, params, model_meta = load_model(config, dataset, progress=progress)
    prb = build_probe(config, model, params)
    spec = streaming.compute_spectrum(
        prb, params, dataset.x_test, dataset.y_test, batch_size=config.batch_size,
        threshold=config.threshold, attribution=config.needs_attribution(), progress=progress,
    )  # fmt: skip
    scores, seconds = _localize_all(config, prb, params, spec, dataset, progress)
    if isinstance(model, foreign.ForeignModel):
        from deepfault_jax.repair import predictions

        pred = predictions(prb, params, dataset.x_test, batch_size=config.batch_size)
    else:
        pred = zoo.predict(model, params, dataset.x_test)
    select_key, random_key = jax.random.split(jax.random.key(config.seed))
    selection = select_inputs(select_key, dataset.y_test, pred, classes, config.inputs_per_class)
    if selection.rows.size == 0:
        raise InputError(
            "no class has a correctly classified test input to synthesize from; "
            f"skipped {selection.skipped}"
        )
    rows = selection.rows
    x0, y0 = dataset.x_test[rows], dataset.y_test[rows]
    arrays = {"x_original": x0, "y": y0.astype(np.int32), "test_index": rows.astype(np.int64),
              "pred_original": pred[rows].astype(np.int32)}  # fmt: skip
    state = _Synthesis(arrays)
    synth = make_run_synthesizer(config, prb)
    with deferred_interrupt() as state.interrupt:
        _synthesize_all_sets(config, synth, prb, params, scores, x0, y0, random_key, state,
                             progress)  # fmt: skip
    out = build_report(
        config, classes, dataset, model, model_meta, prb, spec, selection, state.results,
        state.random_runs, out_dir, time.perf_counter() - start, steps=synth.num_steps,
        chosen_by=_localizers_summary(config, scores, seconds),
    )  # fmt: skip
    state.arrays["meta"] = np.str_(
        json.dumps({"probe": out.probe, "checkpoint": out.model["checkpoint"]})
    )
    write_outputs(out, spec, state.arrays, out_dir)
    return out


def _localize_all(config, prb, params, spec, dataset, progress) -> tuple[dict, dict]:
    """:func:`run_scores` on the test split (the inputs the spectrum counted), and the
    seconds each localizer other than the measures took."""
    evidence = None
    if not all(_is_measure(name) for name in config.measures):
        evidence = localizers.Evidence(prb, params, dataset.x_test, dataset.y_test,
                                       batch_size=config.batch_size)  # fmt: skip
    scores = run_scores(config, spec, evidence, progress=progress)
    return scores, ({} if evidence is None else dict(evidence.seconds))


def _localizers_summary(config: RunConfig, scores: dict, seconds: dict) -> dict:
    """Per localizer of the run: family, options, how it chose the sets, seconds."""
    summary = {}
    for name, score in scores.items():
        info = localizers.localizer_info(name)
        summary[name] = {
            "family": info.family,
            "options": config.localizer_options(name),
            "selection": "per-class" if score.ndim == 2 else "pooled",
            "seconds": round(seconds[info.name], 3) if info.name in seconds else None,
        }
    return summary


def build_report(
    config: RunConfig, classes, dataset: data.Dataset, model: zoo.Model, model_meta: dict,
    prb: probe.Probe, spec: spectrum.Spectrum, selection: Selection,
    results: list[MeasureResult], random_runs: list[RandomRun], out_dir: Path, seconds: float,
    *, steps: int, chosen_by: dict | None = None,
) -> RunReport:  # fmt: skip
    """Gathers a run's parts into its :class:`RunReport` (``steps``: the synthesizer's steps;
    ``chosen_by``: per localizer, how it chose the suspicious sets)."""
    n_pass, n_fail = int(spec.n_pass.sum()), int(spec.n_fail.sum())
    return RunReport(
        config=config, classes=tuple(classes), dataset=dataset.summary(),
        model={"name": model.name, "activation": model.activation,
               "checkpoint": model_meta.get("checkpoint"), "source": model_meta.get("source"),
               "test_accuracy": n_pass / (n_pass + n_fail)},
        probe={"layers": list(prb.index.layer_names), "layer_sizes": list(prb.index.layer_sizes),
               "conv_reduce": config.conv_reduce, "values": config.values,
               "threshold": config.threshold},
        spectrum={"num_pass": n_pass, "num_fail": n_fail, "layers": spectrum.layer_summary(spec)},
        synthesis={"mode": config.mode, "d": config.d, "step_size": config.resolved_step_size(),
                   "steps": steps, "direction": config.direction if config.mode == "pgd" else None},
        selection=selection, results=results, random_runs=random_runs,
        files={name: str(out_dir / name) for name in RUN_FILES}, seconds=round(seconds, 3),
        versions=checkpoints.package_versions(), localizers=chosen_by or {},
    )  # fmt: skip


def write_outputs(
    out: RunReport, spec: spectrum.Spectrum, arrays: dict[str, np.ndarray], out_dir: Path
) -> None:
    """Writes :data:`RUN_FILES` into ``out_dir`` as one unit: into a temporary sibling first,
    then swapped in, so a failure leaves an earlier output set untouched."""
    report_json = out.to_json()

    def fill(tmp: Path) -> None:
        metadata = {"model": out.model["name"], "dataset": out.dataset["name"]}
        spectrum_io.save_spectrum(tmp / "spectrum.npz", spec, metadata=metadata)
        report.write_npz(tmp / "synthesized.npz", arrays)
        report.write_json(tmp / "report.json", report_json)
        report.write_bytes(tmp / "report.md", report.markdown_report(report_json).encode())
        report.plot_misclassification(report_json, tmp / "misclassification.png")
        report.plot_run_examples(report_json, arrays, tmp / "examples.png")

    replace_directory(out_dir, fill, owned=_is_run_dir)


# --------------------------------------------------------------------------- output directories


def _has_json(path: Path, name: str, fmt: str, legacy_keys: set[str]) -> bool:
    try:
        content = json.loads((path / name).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(content, dict):
        return False
    return content.get("format") == fmt or legacy_keys <= set(content)


def _is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's outputs (its report.json says so)."""
    return _has_json(path, "report.json", REPORT_FORMAT, {"config", "results", "random_runs"})


def _is_faultbench_dir(path: Path) -> bool:
    """Whether ``path`` holds faultbench outputs (its faultbench.json says so)."""
    return _has_json(path, "faultbench.json", FAULTBENCH_FORMAT, {"config", "trials", "summary"})


def faultbench(
    config: faultbench_lib.FaultbenchConfig,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> dict:
    """Runs :func:`~deepfault_jax.faultbench.run_faultbench` and writes its outputs as one unit.

    Writes ``faultbench.json`` (configuration, every trial, the summary),
    ``faultbench.md`` (tables) and ``faultbench.png`` (top-10 recall per
    method) into ``out_dir``; an existing directory is replaced only when it is
    empty or holds earlier faultbench outputs.

    Returns:
      The content of ``faultbench.json``.
    """
    from deepfault_jax.faultbench_report import faultbench_markdown, plot_faultbench

    out_dir = Path(out_dir)
    config.validate()
    check_replaceable(out_dir, owned=_is_faultbench_dir)  # before any work
    result = faultbench_lib.run_faultbench(config, progress=progress)
    result = {"format": FAULTBENCH_FORMAT, **result}
    result["files"] = {n: str(out_dir / n) for n in FAULTBENCH_FILES}

    def fill(tmp: Path) -> None:
        report.write_json(tmp / "faultbench.json", result)
        report.write_bytes(tmp / "faultbench.md", faultbench_markdown(result).encode())
        plot_faultbench(result, tmp / "faultbench.png")

    replace_directory(out_dir, fill, owned=_is_faultbench_dir)
    return result
