"""One DeepFault run, end to end: model, spectrum, suspicious neurons, synthesis, evaluation, report.

:func:`run` is what ``deepfault-jax run`` calls:

1. load the data set; train the zoo model on it (cached) or load a checkpoint;
2. compute the hit spectrum of the test split;
3. for every measure and k, the suspicious set of every class;
4. pick up to ``inputs_per_class`` correctly classified test inputs of each
   class (with a key from the seed); a class with none is reported and skipped;
5. synthesize from them toward each measure's sets, and toward random sets of
   the same size from the same layers (excluding the measures' neurons),
   ``random_repeats`` times;
6. evaluate against the originals and write ``report.json``, ``report.md``,
   ``synthesized.npz``, ``spectrum.npz`` and PNG figures into the output
   directory.
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
    data,
    evaluate,
    localize,
    measures,
    probe,
    report,
    spectrum,
    spectrum_io,
    streaming,
    synthesis,
    zoo,
)
from deepfault_jax import faultbench as faultbench_lib
from deepfault_jax.errors import InputError
from deepfault_jax.progress import Progress, notify

__all__ = ["RunConfig", "faultbench", "run"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (defaults: the quickstart's run on ``digits``).

    Attributes:
      model: zoo architecture (trained on first use and cached), unless ``checkpoint``.
      activation: its hidden activation (``relu`` or ``leaky_relu``).
      dataset: data set spec.
      checkpoint: a checkpoint directory to use instead of the zoo model.
      measures: measure names.
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
      values: ``"pre"`` or ``"post"`` activation, for the spectrum and the objective.
      threshold: activity threshold.
      star: DStar's exponent.
      batch_size: inputs per compiled step.
    """

    model: str = "mlp-3x50"
    activation: str = "relu"
    dataset: str = "digits"
    checkpoint: str | None = None
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
        """Raises ValueError for a configuration that cannot run (before any work)."""
        if not self.measures:
            raise InputError("measures must name at least one measure; got none")
        for name in self.measures:
            measures.get_measure(name)
        if not self.k or any(int(k) != k or k < 1 for k in self.k):
            raise InputError(f"k must be positive integers; got {list(self.k)}")
        if self.mode not in synthesis.MODES:
            raise InputError(f"mode must be one of {', '.join(synthesis.MODES)}; got {self.mode!r}")
        if not self.d > 0:
            raise InputError(f"d (the maximum L-inf distance) must be > 0; got {self.d}")
        if self.step_size is not None and not self.step_size > 0:
            raise InputError(f"step_size must be > 0; got {self.step_size}")
        if self.direction not in (*synthesis.DIRECTIONS, "adam"):
            raise InputError(
                f"direction must be one of {', '.join((*synthesis.DIRECTIONS, 'adam'))}; got {self.direction!r}"
            )
        if self.inputs_per_class < 1:
            raise InputError(f"inputs_per_class must be >= 1; got {self.inputs_per_class}")
        if self.random_repeats < 1:
            raise InputError(f"random_repeats must be >= 1; got {self.random_repeats}")
        if self.steps < 1:
            raise InputError(f"steps must be >= 1; got {self.steps}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {self.batch_size}")
        if not self.star > 0:
            raise InputError(f"star must be > 0; got {self.star}")

    def resolved_step_size(self) -> float:
        """The step size in use."""
        if self.step_size is not None:
            return float(self.step_size)
        return 1.0 if self.mode == "deepfault" else 2.5 * self.d / self.steps


def _measure_params(name: str, config: RunConfig) -> dict:
    return {"star": config.star} if measures.get_measure(name) is measures.dstar else {}


def _load_model(config: RunConfig, dataset: data.Dataset, progress: Progress | None):
    if config.checkpoint is not None:
        model, params, meta = zoo.load_checkpoint(
            config.checkpoint, input_shape=dataset.input_shape
        )
        if model.num_classes != dataset.num_classes:
            raise InputError(
                f"checkpoint {config.checkpoint} has {model.num_classes} classes; "
                f"data set {dataset.name!r} has {dataset.num_classes}"
            )
        return model, params, meta
    return zoo.load_or_train(
        config.model, dataset, seed=config.seed, activation=config.activation, progress=progress
    )


def _select_inputs(key, y, pred, classes, per_class_max):
    """Up to n correctly classified rows of each class, drawn with ``key``; and the skipped classes."""
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
    return (np.concatenate(chosen) if chosen else np.zeros(0, np.int64)), skipped, per_class


@functools.partial(jax.jit, static_argnums=(0,))
def _synthesize_batch(synth: synthesis.Synthesizer, params, x, y, table):
    return synthesis.synthesize(synth, params, x, y, table)


def _synthesize_all(synth, params, x0, y, table, batch_size):
    """Runs :func:`synthesis.synthesize` over fixed-shape, padded batches."""
    out = []
    for batch in data.iterate_batches(x0, y, batch_size=batch_size):
        xs = _synthesize_batch(synth, params, batch.x, batch.y, jnp.asarray(table))
        out.append(np.asarray(xs)[batch.mask])
    return np.concatenate(out)


def run(
    config: RunConfig,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> dict:
    """Runs DeepFault end to end and writes the outputs into ``out_dir``.

    Args:
      config: the run's configuration (validated first).
      out_dir: directory for ``report.json``, ``report.md``, ``synthesized.npz``,
        ``spectrum.npz``, ``misclassification.png`` and ``examples.png``.
      progress: a progress callback (:mod:`deepfault_jax.progress`).

    Returns:
      The report (the content of ``report.json``).
    """
    config.validate()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    dataset = data.load_dataset(config.dataset)
    classes = tuple(range(dataset.num_classes)) if config.classes is None else tuple(config.classes)
    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad:
        raise InputError(f"classes must lie in [0, {dataset.num_classes}); got {bad}")
    model, params, model_meta = _load_model(config, dataset, progress)
    prb = probe.model_probe(
        model, params, layers=list(config.layers) if config.layers else None,
        conv_reduce=config.conv_reduce, values=config.values,
    )  # fmt: skip
    for k in config.k:
        if k > prb.index.num_neurons:
            raise InputError(
                f"k must be <= {prb.index.num_neurons}, the neurons of the probed layers "
                f"{', '.join(prb.index.layer_names)}; got {k}"
            )
    x_test, y_test = dataset.x_test, dataset.y_test
    attribution = any(measures.measure_kind(name) == "attribution" for name in config.measures)
    spec = streaming.compute_spectrum(
        prb, params, x_test, y_test, batch_size=config.batch_size, threshold=config.threshold,
        attribution=attribution,
    )  # fmt: skip
    pred = zoo.predict(model, params, x_test)
    key = jax.random.key(config.seed)
    select_key, random_key = jax.random.split(key)
    rows, skipped, per_class = _select_inputs(
        select_key, y_test, pred, classes, config.inputs_per_class
    )
    if rows.size == 0:
        raise InputError(
            f"no class has a correctly classified test input to synthesize from; skipped {skipped}"
        )
    x0, y0 = x_test[rows], y_test[rows]
    step_size = config.resolved_step_size()
    direction: Any = config.direction
    if direction == "adam":
        import optax

        direction = optax.adam(step_size)
    synth = synthesis.make_synthesizer(
        prb, mode=config.mode, d=config.d, step_size=step_size, steps=config.steps,
        direction=direction, stop_when_misclassified=config.stop_when_misclassified,
    )  # fmt: skip
    arrays: dict[str, np.ndarray] = {
        "x_original": x0,
        "y": y0.astype(np.int32),
        "test_index": rows.astype(np.int64),
        "pred_original": pred[rows].astype(np.int32),
    }
    results, random_runs = [], []
    jobs = [(m, k) for k in config.k for m in config.measures]
    total = len(jobs) + len(config.k) * config.random_repeats
    done = [0]

    def synthesize_and_measure(tag: str, table: np.ndarray) -> dict:
        """Synthesizes toward ``table``, stores the arrays under ``tag``, returns the metrics."""
        xs = _synthesize_all(synth, params, x0, y0, table, config.batch_size)
        metrics = evaluate.evaluate_synthesis(
            prb, params, x0, xs, y0, table, threshold=config.threshold
        )
        arrays[f"{tag}__x"] = xs
        arrays[f"{tag}__pred"] = np.asarray(metrics.pop("predictions"), np.int32)
        arrays[f"{tag}__table"] = table
        done[0] += 1
        notify(progress, "synthesis", done[0], total)
        return metrics

    for k in config.k:
        tables = {}
        for name in config.measures:
            tables[name] = np.asarray(
                localize.suspicious_neurons(spec, name, k, **_measure_params(name, config)),
                np.int32,
            )
            metrics = synthesize_and_measure(f"{name}_k{k}", tables[name])
            results.append({"measure": name, "k": k, **metrics})
        repeats = []
        for r in range(config.random_repeats):
            rkey = jax.random.fold_in(jax.random.fold_in(random_key, k), r)
            table = np.stack([
                localize.random_neurons(jax.random.fold_in(rkey, c), prb.index, k,
                                        exclude=[t[c] for t in tables.values()])
                for c in range(dataset.num_classes)
            ]).astype(np.int32)  # fmt: skip
            metrics = synthesize_and_measure(f"random_k{k}_r{r}", table)
            repeats.append(metrics)
            random_runs.append({"k": k, "repeat": r, **metrics})
        summary = evaluate.summarize_repeats(repeats)
        for row in results:
            if row["k"] == k:
                row["random"] = {
                    m: {"mean": s["mean"], "std": s["std"]} for m, s in summary.items()
                }

    out_dir.mkdir(parents=True, exist_ok=True)
    spectrum_io.save_spectrum(
        out_dir / "spectrum.npz", spec, metadata={"model": model.name, "dataset": dataset.name}
    )
    probe_config = {
        "layers": list(prb.index.layer_names),
        "layer_sizes": list(prb.index.layer_sizes),
        "conv_reduce": config.conv_reduce,
        "values": config.values,
        "threshold": config.threshold,
    }
    arrays["meta"] = np.str_(
        json.dumps({"probe": probe_config, "checkpoint": model_meta.get("checkpoint")})
    )
    report.write_npz(out_dir / "synthesized.npz", arrays)
    n_pass, n_fail = int(spec.n_pass.sum()), int(spec.n_fail.sum())
    out = {
        "config": {**dataclasses.asdict(config), "classes": list(classes)},
        "versions": zoo.package_versions(),
        "dataset": dataset.summary(),
        "model": {
            "name": model.name,
            "activation": model.activation,
            "checkpoint": model_meta.get("checkpoint"),
            "test_accuracy": n_pass / (n_pass + n_fail),
        },
        "probe": probe_config,
        "spectrum": {
            "num_pass": n_pass,
            "num_fail": n_fail,
            "layers": spectrum.layer_summary(spec),
        },
        "synthesis": {
            "mode": config.mode,
            "d": config.d,
            "step_size": step_size,
            "steps": synth.num_steps,
            "direction": config.direction if config.mode == "pgd" else None,
        },  # fmt: skip
        "selection": {"inputs": int(rows.size), "per_class": per_class, "skipped_classes": skipped},
        "results": results,
        "random_runs": random_runs,
        "files": {
            name: str(out_dir / name)
            for name in (
                "report.json",
                "report.md",
                "synthesized.npz",
                "spectrum.npz",
                "misclassification.png",
                "examples.png",
            )  # fmt: skip
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    report.write_json(out_dir / "report.json", out)
    report.write_bytes(out_dir / "report.md", report.markdown_report(out).encode())
    report.plot_misclassification(out, out_dir / "misclassification.png")
    top_k = max(config.k)
    shown = np.unique(y0, return_index=True)[1][:6]  # the first input of up to six classes
    names = [*config.measures, "random"]
    tags = {m: (f"{m}_k{top_k}" if m != "random" else f"random_k{top_k}_r0") for m in names}
    report.plot_examples(
        x0[shown],
        {f"{m} k={top_k}": arrays[f"{tags[m]}__x"][shown] for m in names},
        y0[shown],
        {f"{m} k={top_k}": arrays[f"{tags[m]}__pred"][shown] for m in names},
        out_dir / "examples.png",
    )
    return out



def faultbench(
    config: faultbench_lib.FaultbenchConfig,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> dict:
    """Runs :func:`~deepfault_jax.faultbench.run_faultbench` and writes its outputs.

    Writes ``faultbench.json`` (configuration, every trial, the summary),
    ``faultbench.md`` (tables) and ``faultbench.png`` (top-10 recall per
    method) into ``out_dir``.

    Returns:
      The content of ``faultbench.json``.
    """
    out_dir = Path(out_dir)
    result = faultbench_lib.run_faultbench(config, progress=progress)
    names = ("faultbench.json", "faultbench.md", "faultbench.png")
    result["files"] = {n: str(out_dir / n) for n in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "faultbench.json", result)
    report.write_bytes(out_dir / "faultbench.md", report.faultbench_markdown(result).encode())
    report.plot_faultbench(result, out_dir / "faultbench.png")
    return result
