"""The repair job behind ``deepfault-jax repair``: localize, repair, judge, write.

Data: the training split is divided into the repair inputs (all but the last
``validation``) and the validation inputs (the last ``validation``; early
stopping and localization read them). The test split only measures: clean
accuracy before and after, the fix and break rates, and (with
``synthesized``) the accuracy on inputs synthesized from test inputs. With
``synthesized = N``, DeepFault's synthesis (projected gradient ascent on the
repaired neurons' activations within ``d``, :mod:`deepfault_jax.synthesis`)
turns N correctly classified repair inputs, N validation inputs and N test
inputs into synthesized ones labelled with their originals' labels: the first
join the repair data (repeated until they make up ``synthesized_share`` of
it), the second the validation data, the third are the held-out synthesized
inputs.

Outputs (one unit, :func:`deepfault_jax.files.replace_directory`):
``checkpoint/`` (the targeted repair's parameters in the usual checkpoint
format; its model.json records ``repaired_from`` and ``repair``), or for a
``keras:`` model ``model.keras`` (the same Keras model with the repaired
weights: ``--model keras:OUT/model.keras`` loads it), ``repair.json`` and
``repair.md``. A ``flax:`` factory model is refused: the repaired parameters
could not be handed back to the factory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from deepfault_jax import checkpoints, data, foreign, localizers, model_source, repair, synthesis
from deepfault_jax.errors import InputError, check_finite, check_int, check_seed
from deepfault_jax.files import check_replaceable, replace_directory, write_atomic
from deepfault_jax.progress import Progress, notify

__all__ = [
    "KERAS_REPAIR_FILES",
    "REPAIR_FILES",
    "REPAIR_FORMAT",
    "RepairConfig",
    "check_paths",
    "is_repair_dir",
    "repair_lines",
    "run_repair",
]

REPAIR_FORMAT = "deepfault-jax/repair/1"
REPAIR_FILES = ("checkpoint", "repair.json", "repair.md")
#: The files of the repair of a ``keras:`` model: the repaired model as a Keras file.
KERAS_REPAIR_FILES = ("model.keras", "repair.json", "repair.md")
_ROWS = ("targeted", "search", "random", "output", "full")


@dataclasses.dataclass(frozen=True)
class RepairConfig:
    """What ``deepfault-jax repair`` does.

    Attributes:
      model, activation, dataset, checkpoint, trust_model_file, seed, layers, conv_reduce,
        values: the model and its probe, as the other commands take them (``seed``: the zoo
        model's training seed, and the repair's key). ``model`` may be ``keras:PATH``
        (the repaired model is written as ``model.keras``); ``flax:`` factories are refused.
      method: the localizer whose top ``k`` neurons are repaired.
      options: its options, as ``((key, value), ...)``.
      neurons: explicit neuron ids instead of a localizer's choice.
      k: neurons to repair.
      part: ``"both"``, ``"incoming"`` or ``"outgoing"`` (:data:`deepfault_jax.repair.PARTS`).
      budget: optimiser steps of every repair (targeted and baselines alike).
      batch_size, learning_rate, eval_every, patience: the fit (:func:`repair.fine_tune`).
      full_learning_rate: the full fine-tuning baseline's (None: a tenth of ``learning_rate``).
      validation: training inputs held out for validation and localization.
      localize_inputs: validation inputs the localizer reads (the first ones).
      synthesized: inputs synthesized from each of the repair, validation and test sets.
      synthesized_share: the share of the repair data the synthesized inputs make up (they
        are repeated to reach it; 0: each appears once).
      d: the synthesis's L-inf distance.
      baselines: among ``random``, ``output``, ``full``.
      random_repeats: random-neuron repairs (mean and spread).
      search: also run the search-based repair (differential evolution).
    """

    model: str = "mlp-3x50"
    activation: str = "relu"
    dataset: str = "digits"
    checkpoint: str | None = None
    trust_model_file: bool = False
    method: str = localizers.DEFAULT_LOCALIZER
    options: tuple = ()
    neurons: tuple[int, ...] | None = None
    k: int = 10
    part: str = "both"
    budget: int = 300
    batch_size: int = 128
    learning_rate: float = 3e-3
    full_learning_rate: float | None = None
    eval_every: int = 25
    patience: int = 4
    validation: int = 5000
    localize_inputs: int = 2000
    synthesized: int = 0
    synthesized_share: float = 0.25
    d: float = 0.1
    baselines: tuple[str, ...] = repair.BASELINES
    random_repeats: int = 3
    search: bool = False
    seed: int = 0
    layers: tuple[str, ...] | None = None
    conv_reduce: str = "mean"
    values: str = "pre"

    def validate(self) -> None:
        """Raises :class:`InputError` for a configuration that cannot run (before any work)."""
        localizers.localizer_info(self.method)
        if self.neurons is not None:
            if not self.neurons:
                raise InputError("neurons must list at least one neuron id; got none")
            for i in self.neurons:
                check_int("neurons", i, lo=0)
        check_int("k", self.k, lo=1)
        if self.part not in repair.PARTS:
            raise InputError(f"part must be one of {', '.join(repair.PARTS)}; got {self.part!r}")
        check_int("budget", self.budget, lo=1)
        check_int("batch_size", self.batch_size, lo=1)
        check_finite("learning_rate", self.learning_rate, lo=0.0, lo_open=True)
        if self.full_learning_rate is not None:
            check_finite("full_learning_rate", self.full_learning_rate, lo=0.0, lo_open=True)
        check_int("eval_every", self.eval_every, lo=1)
        check_int("patience", self.patience, lo=1)
        check_int("validation", self.validation, lo=1)
        check_int("localize_inputs", self.localize_inputs, lo=1)
        check_int("synthesized", self.synthesized, lo=0)
        check_finite("synthesized_share", self.synthesized_share, lo=0.0, hi=1.0, hi_open=True)
        check_finite("d (the maximum L-inf distance)", self.d, lo=0.0, hi=1.0, lo_open=True)
        unknown = [b for b in self.baselines if b not in repair.BASELINES]
        if unknown:
            raise InputError(
                f"baselines must be among {', '.join(repair.BASELINES)}; got {unknown}"
            )
        check_int("random_repeats", self.random_repeats, lo=1)
        check_seed(self.seed)
        model_source.check_source(self)
        if not self.checkpoint and str(self.model).startswith("flax:"):
            raise InputError(
                "repair writes the repaired model back for every command to load, which a "
                f"flax: factory cannot take (got {self.model}); save the model as a Keras file "
                "(--model keras:PATH) or its parameters in a zoo checkpoint (--checkpoint DIR, "
                "deepfault_jax.save_checkpoint)"
            )


def is_repair_dir(path: Path) -> bool:
    """Whether ``path`` holds the outputs of a repair (its repair.json says so)."""
    try:
        content = json.loads((path / "repair.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("format") == REPAIR_FORMAT


def check_paths(config: RepairConfig, out: Path) -> None:
    """``out`` does not hold (and is not inside) the input checkpoint or Keras file, and may be
    replaced."""
    if config.checkpoint:
        src, dst = Path(config.checkpoint).expanduser().resolve(), out.expanduser().resolve()
        if src == dst or dst in src.parents or src in dst.parents:
            raise InputError(
                f"--out must lie apart from the input checkpoint {config.checkpoint!r} (it is "
                f"never modified); got {str(out)!r}"
            )
    elif str(config.model).startswith("keras:"):
        src = Path(str(config.model)[len("keras:") :]).expanduser().resolve()
        dst = out.expanduser().resolve()
        if src == dst or dst in src.parents:
            raise InputError(
                f"--out must lie apart from the input model {str(src)!r} (it is never "
                f"modified); got {str(out)!r}"
            )
    check_replaceable(out, owned=is_repair_dir, what="--out")


def _splits(dataset: data.Dataset, config: RepairConfig):
    n = len(dataset.y_train)
    if n < 2:
        raise InputError(f"repair needs at least 2 training inputs; {dataset.name} has {n}")
    v = min(config.validation, n // 2)
    fit = (dataset.x_train[: n - v], dataset.y_train[: n - v])
    val = (dataset.x_train[n - v :], dataset.y_train[n - v :])
    return fit, val, (dataset.x_test, dataset.y_test)


def _synthesize(prb, params, xy, neurons, count: int, d: float, classes: int):
    """``count`` synthesized inputs from the first correctly classified inputs of ``xy``."""
    x, y = xy
    right = np.flatnonzero(repair.predictions(prb, params, x) == y)[:count]
    if right.size == 0:
        raise InputError("no correctly classified input to synthesize from")
    synth = synthesis.make_synthesizer(prb, mode="pgd", d=d, step_size=2.5 * d / 10, steps=10)
    table = np.tile(np.asarray(neurons, np.int32), (classes, 1))
    run = jax.jit(lambda p, xb, yb: synthesis.synthesize(synth, p, xb, yb, table))
    out = [
        np.asarray(run(params, x[right[i : i + 256]], y[right[i : i + 256]]))
        for i in range(0, right.size, 256)
    ]
    return np.concatenate(out), y[right]


def _repeated(xy, clean: int, config: RepairConfig):
    """``xy`` repeated so that it makes up ``synthesized_share`` of ``clean`` inputs and it."""
    share = config.synthesized_share
    times = max(1, round(share * clean / ((1 - share) * len(xy[1])))) if share > 0 else 1
    return np.concatenate([xy[0]] * times), np.concatenate([xy[1]] * times)


def _joined(a, b):
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def run_repair(config: RepairConfig, out: str | Path, *, progress: Progress | None = None) -> dict:
    """Localizes, repairs, runs the baselines and writes :data:`REPAIR_FILES` into ``out``.

    Returns:
      The content of ``repair.json``.
    """
    start = time.perf_counter()
    config.validate()
    out = Path(out)
    check_paths(config, out)
    dataset = data.load_dataset(config.dataset)
    options = dict(config.options)
    info = localizers.localizer_info(config.method)

    def check(model, params) -> None:  # before any training
        prb = model_source.model_probe(config, model, params)
        n = prb.index.num_neurons
        if config.neurons is not None:
            bad = [i for i in config.neurons if i >= n]
            if bad:
                raise InputError(f"neurons must lie in [0, {n}) (the probed neurons); got {bad[0]}")
        elif config.k > n:
            raise InputError(f"k must lie in [1, {n}] (the probed neurons); got {config.k}")
        if config.neurons is None:
            model_source.check_needs(info, options, prb, params)
        if isinstance(model, foreign.ForeignModel):
            model.check_repairable()
        repair.neuron_view(prb, params, [0], part=config.part)  # parameters laid out by layer

    model, params, meta = model_source.load_model(config, dataset, check=check, progress=progress)
    prb = model_source.model_probe(config, model, params)
    fit, val, test = _splits(dataset, config)
    loc = (val[0][: config.localize_inputs], val[1][: config.localize_inputs])
    t0 = time.perf_counter()
    if config.neurons is not None:
        neurons = np.asarray(config.neurons, np.int64)
        chosen_by = "explicit ids"
    else:
        evidence = localizers.Evidence(prb, params, *loc, progress=progress is not None)
        score = evidence.scores(info.name, **options)
        from deepfault_jax.localize import top_k_neurons

        neurons = np.asarray(top_k_neurons(score, config.k), np.int64)
        chosen_by = info.name
    localize_seconds = time.perf_counter() - t0
    synth_test = None
    if config.synthesized:
        notify(progress, "synthesize", 0, 3)
        k = dict(prb=prb, params=params, neurons=neurons, count=config.synthesized, d=config.d,
                 classes=prb.num_classes)  # fmt: skip
        fit = _joined(fit, _repeated(_synthesize(xy=fit, **k), len(fit[1]), config))
        val = _joined(val, _synthesize(xy=val, **k))
        synth_test = _synthesize(xy=test, **k)
        notify(progress, "synthesize", 3, 3)
    key = jax.random.key(config.seed)
    fit_options = dict(steps=config.budget, batch_size=config.batch_size,
                       learning_rate=config.learning_rate, eval_every=config.eval_every,
                       patience=config.patience)  # fmt: skip
    rows = repair.compare_repairs(
        key, prb, params, neurons, fit, val, test, synthesized_xy=synth_test,
        baselines=config.baselines, random_repeats=config.random_repeats, part=config.part,
        full_learning_rate=config.full_learning_rate, **fit_options,
    )  # fmt: skip
    repaired = rows.pop("repaired")
    if config.search:
        from deepfault_jax import repair_search

        view = repair.neuron_view(prb, params, neurons, part=config.part)
        found = repair_search.search_repair(
            jax.random.fold_in(key, 700), prb, params, view, fit, val, steps=config.budget,
            batch_size=config.batch_size, eval_every=config.eval_every, patience=config.patience,
        )  # fmt: skip
        metrics = repair.repair_metrics(prb, params, found.params, test, synthesized_xy=synth_test)
        rows["search"] = repair._row(found, metrics, neurons=neurons.tolist())
    targeted = rows["targeted"]
    config_json = {**dataclasses.asdict(config), "options": options}
    result = {
        "format": REPAIR_FORMAT,
        "config": config_json,
        "model": {
            "name": model.name,
            "source": meta["source"],
            "layers": list(prb.index.layer_names),
            "neurons": prb.index.num_neurons,
            "parameters": repair.total_parameters(params),
        },  # fmt: skip
        "dataset": {
            "name": dataset.name,
            "repair_inputs": len(fit[1]),
            "validation_inputs": len(val[1]),
            "test_inputs": len(test[1]),
            "synthesized_test_inputs": 0 if synth_test is None else len(synth_test[1]),
        },  # fmt: skip
        "neurons": [
            {
                "id": int(i),
                "layer": prb.index.locate(int(i))[0],
                "unit": int(prb.index.locate(int(i))[1]),
            }
            for i in neurons
        ],  # fmt: skip
        "chosen_by": chosen_by,
        "localize_seconds": round(localize_seconds, 3),
        "results": rows,
        "kept_original": bool(targeted["kept_original"]),
        "files": {name: str(out / name) for name in _files(model)},
        "versions": checkpoints.package_versions(),
    }
    result["seconds"] = round(time.perf_counter() - start, 3)
    record = {"from": meta["source"], "method": chosen_by, "neurons": neurons.tolist(),
              "part": config.part, "budget": config.budget, "seed": config.seed,
              "kept_original": bool(targeted["kept_original"])}  # fmt: skip

    def fill(tmp: Path) -> None:
        if isinstance(model, foreign.ForeignModel):
            foreign.save_keras_model(model, repaired, tmp / "model.keras")
        else:
            checkpoints.save_checkpoint(
                tmp / "checkpoint", model, repaired,
                metadata={"dataset": dataset.name, "repaired_from": meta["source"],
                          "repair": record},
            )  # fmt: skip
        text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n"
        write_atomic(tmp / "repair.json", text.encode())
        write_atomic(tmp / "repair.md", ("\n".join(repair_markdown(result)) + "\n").encode())

    replace_directory(out, fill, owned=is_repair_dir, what="--out")
    return result


def _files(model) -> tuple[str, ...]:
    keras = isinstance(model, foreign.ForeignModel)
    return KERAS_REPAIR_FILES if keras else REPAIR_FILES


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _table_rows(result: dict) -> list[tuple[str, dict, dict | None]]:
    rows = result["results"]
    out = []
    for name in _ROWS:
        if name not in rows:
            continue
        if name == "random":
            label = f"random {len(rows['random']['runs'][0]['neurons'])} neurons (x{len(rows['random']['runs'])})"
            out.append((label, rows["random"]["mean"], rows["random"]["std"]))
        else:
            label = {"targeted": f"targeted ({result['chosen_by']})",
                     "search": "targeted, search (DE)", "output": "output layer",
                     "full": "full fine-tuning"}[name]  # fmt: skip
            out.append((label, rows[name], None))
    return out


def repair_markdown(result: dict) -> list[str]:
    """repair.md: what was repaired, and every repair's metrics in one table."""
    c, m, d = result["config"], result["model"], result["dataset"]
    synth = d["synthesized_test_inputs"] > 0
    lines = [
        f"# Repair of {m['name']} ({m['source']}) on {d['name']}",
        "",
        f"Neurons ({result['chosen_by']}, part {c['part']}): "
        + ", ".join(f"{n['id']} ({n['layer']}:{n['unit']})" for n in result["neurons"]),
        "",
        f"Budget {c['budget']} steps of {c['batch_size']} inputs; {d['repair_inputs']} repair, "
        f"{d['validation_inputs']} validation, {d['test_inputs']} test inputs"
        + (f", {d['synthesized_test_inputs']} held-out synthesized" if synth else "")
        + ".",
        "",
        "| repair | test acc. before | after | fix rate | break rate |"
        + (" synth. before | synth. after |" if synth else "")
        + " changed params | share | steps | seconds |",
        "|---|---|---|---|---|" + ("---|---|" if synth else "") + "---|---|---|---|",
    ]
    for label, row, std in _table_rows(result):
        spread = (lambda k, std=std: f" ± {_pct(std[k])}") if std else (lambda k: "")
        cells = [_pct(row["accuracy_before"]), _pct(row["accuracy_after"]) + spread("accuracy_after"),
                 _pct(row["fix_rate"]), _pct(row["break_rate"])]  # fmt: skip
        if synth:
            cells += [_pct(row["synthesized_before"]),
                      _pct(row["synthesized_after"]) + spread("synthesized_after")]  # fmt: skip
        cells += [f"{row['changed']:.0f}", _pct(row["changed_share"]), f"{row['steps']:.0f}",
                  f"{row['seconds']:.2f}"]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result["kept_original"]:
        kept = "model.keras" if "model.keras" in result.get("files", {}) else "checkpoint"
        lines += ["", "The targeted repair did not beat the starting validation accuracy: the "
                  f"{kept} holds the original parameters."]  # fmt: skip
    return lines


def repair_lines(result: dict, out: Path) -> list[str]:
    """The repair command's summary for people."""
    m, d = result["model"], result["dataset"]
    synth = d["synthesized_test_inputs"] > 0
    lines = [
        f"repair of {m['name']} on {d['name']}: {len(result['neurons'])} neurons by "
        f"{result['chosen_by']}: {', '.join(str(n['id']) for n in result['neurons'])}",
        f"{'repair':<28} {'test acc.':>17} {'fix':>7} {'break':>7}"
        + (f" {'synth. acc.':>17}" if synth else "")
        + f" {'changed':>9} {'seconds':>8}",
    ]
    for label, row, _ in _table_rows(result):
        text = (f"{label:<28} {_pct(row['accuracy_before']):>8}>{_pct(row['accuracy_after']):<8} "
                f"{_pct(row['fix_rate']):>7} {_pct(row['break_rate']):>7}")  # fmt: skip
        if synth:
            text += f" {_pct(row['synthesized_before']):>8}>{_pct(row['synthesized_after']):<8}"
        text += f" {_pct(row['changed_share']):>9} {row['seconds']:>8.2f}"
        lines.append(text)
    if result["kept_original"]:
        lines.append("the targeted repair did not beat the starting validation accuracy: "
                     "the original parameters were kept")  # fmt: skip
    lines.append(f"wrote {out}/{', '.join(result['files'])} in {result['seconds']:.1f} s")
    return lines


def parse_neurons(text: str) -> tuple[int, ...]:
    """``"3,17,42"`` as neuron ids."""
    try:
        ids = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        raise InputError(f"--neurons must be comma-separated neuron ids; got {text!r}") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise InputError(f"--neurons must be distinct ids >= 0; got {text!r}")
    return ids
