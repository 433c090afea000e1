"""The planted-fault benchmark v2: trials, tie-aware recall, leave-one-kind-out, the run.

A trial plants faults of one kind (:mod:`deepfault_jax.faults`) into a trained
model, each fault's strength calibrated so that it lowers the accuracy on the
*measure* inputs by an amount inside a drop window, and asks every localizer
(:mod:`deepfault_jax.localizers`) to rank the probed neurons on the
*localization* inputs, a disjoint part of the test split (the first
``inputs`` test inputs localize, the next ``measure_inputs`` measure drops).

Scores of a method on a trial: recall at top-k (the share of planted neurons
among its first k) for each k of ``top_k``, recall at top-p% (k = ceil(p% of
the probed neurons), so that small and large models compare) and the mean
rank of the planted neurons. A planted neuron tied with others counts as the
expectation over random tie-breaking. The random ranking's expected recall
is ``k / N``.

Leave-one-kind-out (:func:`leave_one_out`): for each fault kind, the method
chosen among ``candidates`` by its mean top-10 recall on the *other* kinds is
reported on the held-out kind; the mean over kinds is the benchmark's honest
number for "pick the best method on the faults you know". The same is done
leaving out whole fault families.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from deepfault_jax import checkpoints, data, zoo
from deepfault_jax.errors import InputError, check_finite, check_int, check_seed
from deepfault_jax.faults import FAULT_FAMILIES, FAULT_KINDS, PlantedFault, plant_faults
from deepfault_jax.localize import Ranks, tie_ranks
from deepfault_jax.localizers import DEFAULT_LOCALIZER, Evidence, localizer_info
from deepfault_jax.probe import VALUES, Probe, model_probe
from deepfault_jax.progress import Progress, notify
from deepfault_jax.zoo import Model

__all__ = [
    "FaultbenchConfig",
    "Trial",
    "default_methods",
    "leave_one_out",
    "recall_and_rank",
    "run_faultbench",
    "run_trial",
    "summarize",
]


def _best_class_rank(per_class: np.ndarray) -> Ranks:
    """:class:`Ranks` from ``[classes, neurons]`` scores: by the best (middle of tie) rank
    any class gives a neuron; a class whose scores are all equal carries no evidence and
    is left out (no such class left: every neuron is tied)."""
    best = np.zeros(per_class.shape[-1])
    informative = [row for row in np.asarray(per_class) if np.ptp(row) > 0]
    if informative:
        middles = []
        for row in informative:
            r = tie_ranks(row)
            middles.append((r.first + r.last) / 2)
        best = np.min(middles, axis=0)
    return tie_ranks(-best)


#: The methods of :func:`default_methods`: every family, the exact ones included.
_DEFAULT_METHODS = (
    "tarantula", "ochiai", "dstar", "gradxact", "actdiff", "linear_ablation",
    "gradxact/per-class", "ablation", "ablation_loss", "gain_ablation", "grad_norm",
    "grad_snr", "confusion", "aggregate", "consensus",
)  # fmt: skip

#: Candidates for the recommended default: methods costing at most a few passes.
_DEFAULT_CANDIDATES = (
    "ochiai", "dstar", "gradxact", "linear_ablation", "gradxact/per-class", "grad_norm",
    "grad_snr", "confusion", "aggregate", "consensus",
)  # fmt: skip


def default_methods() -> tuple[str, ...]:
    """The methods faultbench scores by default (``NAME`` pooled, ``NAME/per-class``)."""
    return _DEFAULT_METHODS


def method_ranks(evidence: Evidence, method: str) -> Ranks:
    """The tie-aware :class:`Ranks` of every neuron under ``method`` (``NAME`` or
    ``NAME/per-class``: a neuron's best rank in any class)."""
    name, per_class = _split_method(method)
    score = evidence.scores(name, per_class=per_class)
    return _best_class_rank(score) if per_class else tie_ranks(score)


def _split_method(method: str) -> tuple[str, bool]:
    name, _, scope = method.partition("/")
    if scope not in ("", "pooled", "per-class"):
        raise InputError(f"a method must be NAME, NAME/pooled or NAME/per-class; got {method!r}")
    info = localizer_info(name)
    if scope == "per-class" and not info.per_class:
        raise InputError(f"{name} has no per-class variant; got {method!r}")
    return info.name, scope == "per-class"


def cutoffs(neurons: int, top_k: Sequence[int], top_percent: Sequence[float]) -> dict[str, int]:
    """Score name -> k: ``top5`` -> 5, ``top10%`` -> ceil(10% of ``neurons``)."""
    out = {f"top{k}": min(int(k), neurons) for k in top_k}
    for p in top_percent:
        out[f"top{p:g}%"] = max(1, math.ceil(neurons * p / 100))
    return out


def recall_and_rank(ranks: Ranks, planted: Sequence[int], ks: dict[str, int]) -> dict[str, float]:
    """Recall at each cutoff of ``ks`` and the mean rank of the ``planted`` neuron ids.

    A planted neuron tied with others counts as the expectation over random
    tie-breaking: its rank is the middle of the tie, and its recall at k the
    share of the tie's ranks within the first k.
    """
    ids = np.asarray(planted, np.int64)
    first = np.asarray(ranks.first, np.float64)[ids]
    last = np.asarray(ranks.last, np.float64)[ids]
    out = {
        name: float(np.mean(np.clip((k - first + 1) / (last - first + 1), 0.0, 1.0)))
        for name, k in ks.items()
    }
    out["mean_rank"] = float(np.mean((first + last) / 2))
    return out


@dataclasses.dataclass(frozen=True)
class Trial:
    """One planted-fault trial: what was planted and how each method ranked it."""

    model: str
    model_seed: int
    kind: str
    family: str
    drop: tuple[float, float]
    count: int
    seed: int
    neurons: int
    faults: tuple[PlantedFault, ...]
    rejected: int
    accuracy_before: float
    accuracy_after: float
    scores: dict[str, dict[str, float]]
    method_seconds: dict[str, float]
    notes: tuple[str, ...]
    seconds: float
    skipped: str | None = None


def run_trial(
    key: jax.Array,
    model: Model,
    params: Any,
    probe: Probe,
    localize_xy: tuple[np.ndarray, np.ndarray],
    measure_xy: tuple[np.ndarray, np.ndarray],
    *,
    kind: str,
    drop: tuple[float, float],
    count: int,
    methods: Sequence[str],
    cut: dict[str, int],
    batch_size: int = 512,
    tries: int = 16,
    labels: dict[str, Any] | None = None,
) -> Trial:
    """Plants ``count`` faults of ``kind`` (drops measured on ``measure_xy``), then scores every
    method on ``localize_xy``; ``tries``: neurons tried per fault; ``labels`` (model_seed,
    seed) are recorded as given."""
    labels = labels or {}
    start = time.perf_counter()
    xm, ym = measure_xy
    before = zoo.accuracy(model, params, xm, ym)
    planting = plant_faults(
        key, model, params, probe, xm, ym, kind=kind, count=count, drop=drop, tries=tries
    )
    n = probe.index.num_neurons
    base = {
        "model": model.name, "model_seed": int(labels.get("model_seed", 0)), "kind": kind,
        "family": FAULT_FAMILIES[kind], "drop": tuple(drop), "count": count,
        "seed": int(labels.get("seed", 0)), "neurons": n, "rejected": int(planting.rejected),
    }  # fmt: skip
    if len(planting.faults) < count:
        return Trial(
            **base, faults=tuple(planting.faults), accuracy_before=before, accuracy_after=before,
            scores={}, method_seconds={}, notes=tuple(planting.notes),
            seconds=time.perf_counter() - start,
            skipped=f"planted {len(planting.faults)} of {count} faults in the drop window",
        )  # fmt: skip
    evidence = Evidence(probe, planting.params, *localize_xy, batch_size=batch_size)
    ids = [f.neuron for f in planting.faults]
    scores, seconds = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        scores[method] = recall_and_rank(method_ranks(evidence, method), ids, cut)
        seconds[method] = time.perf_counter() - t0
    expected = {name: min(k, n) / n for name, k in cut.items()}
    scores["random (expected)"] = {**expected, "mean_rank": (n + 1) / 2}
    after = zoo.accuracy(model, planting.params, xm, ym)
    return Trial(
        **base, faults=tuple(planting.faults), accuracy_before=before, accuracy_after=after,
        scores=scores, method_seconds=seconds, notes=tuple(planting.notes),
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _complete(trials: Sequence[dict]) -> list[dict]:
    return [t for t in trials if not t["skipped"]]


def summarize(trials: Sequence[dict], group: Sequence[str] = ("model", "drop", "count")) -> list:
    """Per ``group`` values and method: the trials and the mean and (population) standard
    deviation of each score over the complete trials (``trials`` as JSON dicts)."""
    groups: dict[tuple, list[dict]] = {}
    for t in _complete(trials):
        for method, s in t["scores"].items():
            key = (*(_hashable(t[g]) for g in group), method)
            groups.setdefault(key, []).append(s)
    rows = []
    for key, items in groups.items():
        row = dict(zip((*group, "method"), key, strict=True)) | {"trials": len(items)}
        for name in items[0]:
            v = np.asarray([s[name] for s in items])
            row[name] = float(v.mean())
            row[f"{name}_std"] = float(v.std())
        rows.append(row)
    return rows


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def leave_one_out(
    trials: Sequence[dict], candidates: Sequence[str], *, by: str = "kind", score: str = "top10"
) -> list[dict]:
    """For each value of ``by`` (``"kind"`` or ``"family"``): the candidate with the best mean
    ``score`` on the trials of the other values, and its mean on the held-out ones, beside
    the best candidate on the held-out trials themselves (in hindsight)."""
    done = _complete(trials)
    values = sorted({t[by] for t in done})
    rows = []
    for held in values:
        train = [t for t in done if t[by] != held]
        test = [t for t in done if t[by] == held]

        def mean(ts, method):
            got = [t["scores"][method][score] for t in ts if method in t["scores"]]
            return float(np.mean(got)) if got else float("nan")

        if not train:
            continue
        chosen = max(candidates, key=lambda m: (np.nan_to_num(mean(train, m), nan=-1.0), -candidates.index(m)))  # fmt: skip
        best = max(candidates, key=lambda m: np.nan_to_num(mean(test, m), nan=-1.0))
        default = mean(test, DEFAULT_LOCALIZER)
        rows.append({
            by: held, "trials": len(test), "chosen": chosen,
            "chosen_on_others": mean(train, chosen), "chosen_held_out": mean(test, chosen),
            "best_held_out": best, "best_held_out_score": mean(test, best),
            "default": DEFAULT_LOCALIZER,
            "default_held_out": None if np.isnan(default) else default,
        })  # fmt: skip
    return rows


def _model_spec(spec: str) -> tuple[str, str]:
    """``"mlp-5x30:leaky_relu"`` -> (name, activation); no activation: relu."""
    name, _, activation = str(spec).partition(":")
    return name, activation or "relu"


@dataclasses.dataclass(frozen=True)
class FaultbenchConfig:
    """What ``deepfault-jax faultbench`` runs.

    Attributes:
      models: zoo models as ``NAME`` or ``NAME:ACTIVATION`` (``mlp-5x30:leaky_relu``),
        each trained once per model seed and cached.
      dataset: data set spec; faults are planted and localized on its test split.
      model_seeds: training seeds of every model.
      kinds: fault kinds (:data:`deepfault_jax.faults.FAULT_KINDS`).
      drops: accuracy-drop windows ``(lo, hi)``; every fault's strength is calibrated
        into one (a trial per window).
      faults: numbers of faults planted together per trial.
      seeds: trial seeds (neurons, target classes, noise).
      inputs: localization inputs (the first test inputs; at most half of the split).
      measure_inputs: inputs the drops are measured on (the test inputs after the
        localization ones; fewer when the split ends).
      methods: localizers (``NAME`` pooled or ``NAME/per-class``); None: :func:`default_methods`.
      candidates: the methods leave-one-kind-out chooses among (None: the cheap defaults
        that are in ``methods``).
      top_k: recall cutoffs in neurons; top_percent: in percent of the probed neurons.
      tries: neurons tried per fault before a trial is given up (weak kinds such as
        ``out_swap`` in wide layers reject many).
      layers: probed layers (None: every hidden Dense/Conv).
      conv_reduce: one of :attr:`CONV_REDUCTIONS` (faults are planted in whole channels).
      values: ``"pre"`` or ``"post"`` activation values.
      batch_size: inputs per compiled step.
    """

    #: The conv reductions a fault can be planted under (not ``"none"``: whole channels).
    CONV_REDUCTIONS = ("mean", "max")
    #: The fewest localization (and measure) inputs a benchmark runs on.
    MIN_INPUTS = 10

    models: tuple[str, ...] = ("mlp-3x50",)
    dataset: str = "digits"
    model_seeds: tuple[int, ...] = (0,)
    kinds: tuple[str, ...] = FAULT_KINDS
    drops: tuple[tuple[float, float], ...] = ((0.005, 0.01), (0.01, 0.05))
    faults: tuple[int, ...] = (1, 3)
    seeds: tuple[int, ...] = (0, 1, 2)
    inputs: int = 2000
    measure_inputs: int = 5000
    methods: tuple[str, ...] | None = None
    candidates: tuple[str, ...] | None = None
    top_k: tuple[int, ...] = (5, 10)
    top_percent: tuple[float, ...] = (5.0, 10.0)
    tries: int = 16
    layers: tuple[str, ...] | None = None
    conv_reduce: str = "mean"
    values: str = "pre"
    batch_size: int = 500

    def validate(self, *, dataset: data.Dataset | None = None) -> None:
        """Raises :class:`InputError` for a configuration that cannot run (before any work).

        Args:
          dataset: the loaded data set, to check also what depends on it: enough test
            inputs for both parts, the probed layers exist, and no fault count exceeds
            the probed neurons of a model (built untrained: nothing is trained here).
        """
        for field in ("models", "model_seeds", "kinds", "drops", "faults", "seeds", "top_k"):
            values = getattr(self, field)
            if not values:
                raise InputError(f"{field} must list at least one value; got none")
            if len(set(values)) != len(values):
                raise InputError(f"{field} must list distinct values; got {list(values)}")
        for spec in self.models:
            self.check_model(spec)
        for kind in self.kinds:
            if kind not in FAULT_KINDS:
                raise InputError(
                    f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}"
                )
        for lo, hi in self.drops:
            lo = check_finite("drop", lo, lo=0.0, lo_open=True)
            hi = check_finite("drop", hi, hi=1.0, hi_open=True)
            if not lo < hi:
                raise InputError(f"a drop window must be LO:HI with LO < HI; got {lo}:{hi}")
        for count in self.faults:
            check_int("faults", count, lo=1)
        for seed in self.seeds:
            check_seed(seed, name="seeds")
        for seed in self.model_seeds:
            check_seed(seed, name="model_seeds")
        for k in self.top_k:
            check_int("top_k", k, lo=1)
        for p in self.top_percent:
            check_finite("top_percent", p, lo=0.0, hi=100.0, lo_open=True)
        check_int("inputs", self.inputs, lo=self.MIN_INPUTS)
        check_int("measure_inputs", self.measure_inputs, lo=self.MIN_INPUTS)
        check_int("batch_size", self.batch_size, lo=1)
        check_int("tries", self.tries, lo=1)
        if self.conv_reduce not in self.CONV_REDUCTIONS:
            raise InputError(
                f"conv_reduce must be one of {', '.join(self.CONV_REDUCTIONS)} (faults are "
                f"planted in whole channels); got {self.conv_reduce!r}"
            )
        if self.values not in VALUES:
            raise InputError(f"values must be one of {', '.join(VALUES)}; got {self.values!r}")
        methods = self.resolved_methods()
        for method in methods:
            self.check_method(method)
        for method in self.resolved_candidates():
            if method not in methods:
                raise InputError(f"candidates must be among the methods; got {method!r}")
        if dataset is not None:
            self._validate_data(dataset)

    @staticmethod
    def check_method(method: str) -> None:
        """Raises :class:`InputError` unless ``method`` is ``NAME`` or ``NAME/per-class`` of a
        registered localizer (per class only where it has that variant)."""
        _split_method(method)

    @staticmethod
    def check_model(spec: str) -> None:
        """Raises :class:`InputError` unless ``spec`` is ``NAME`` or ``NAME:ACTIVATION`` of
        the zoo (faultbench plants faults into zoo models it trains itself: ``keras:`` and
        ``flax:`` models are refused)."""
        if str(spec).startswith(("keras:", "flax:")):
            raise InputError(
                f"faultbench plants faults into zoo models it trains itself; got {spec!r}: "
                "keras: and flax: models go with spectrum, localize, run and repair"
            )
        name, activation = _model_spec(spec)
        if name not in zoo.MODEL_NAMES:
            raise InputError(
                f"unknown model {name!r}; expected one of {', '.join(zoo.MODEL_NAMES)}"
            )
        if activation not in zoo.ACTIVATIONS:
            raise InputError(
                f"unknown activation {activation!r} in {spec!r}; expected one of "
                f"{', '.join(zoo.ACTIVATIONS)}"
            )

    def _validate_data(self, dataset: data.Dataset) -> None:
        have = len(dataset.x_test)
        if have < 2 * self.MIN_INPUTS:
            raise InputError(
                f"faultbench needs at least {2 * self.MIN_INPUTS} test inputs (half to localize "
                f"on, half to measure drops on); {dataset.name} has {have}"
            )
        neurons = self.probed_neurons(dataset)
        smallest = min(neurons, key=neurons.__getitem__)
        if max(self.faults) > neurons[smallest]:
            raise InputError(
                f"faults must be <= {neurons[smallest]}, the probed neurons of {smallest}; "
                f"got {max(self.faults)}"
            )

    def split(self, count: int) -> tuple[slice, slice]:
        """The test inputs that localize and those that measure drops, of ``count``: the first
        ``inputs`` and the next ``measure_inputs``, each at most half of the split."""
        n = min(self.inputs, count // 2)
        return slice(0, n), slice(n, n + min(self.measure_inputs, count - n))

    def probed_neurons(self, dataset: data.Dataset) -> dict[str, int]:
        """How many neurons the probe of each model has on ``dataset`` (counted on untrained
        copies; raises :class:`InputError` for a layer a model lacks)."""
        counts = {}
        for spec in self.models:
            model = self.model(spec, dataset)
            if model.has_batch_stats:
                raise InputError(
                    "models must have per-layer parameters to plant faults in; got "
                    f"{spec!r}, a model with BatchNorm whose neurons are not mapped to their "
                    "parameters (choose "
                    f"among {', '.join(n for n in zoo.MODEL_NAMES if n not in zoo.BATCH_NORM_MODELS)})"
                )
            counts[spec] = self.probe(model, None).index.num_neurons
        return counts

    @staticmethod
    def model(spec: str, dataset: data.Dataset) -> Model:
        name, activation = _model_spec(spec)
        return zoo.create_model(
            name, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
            activation=activation,
        )  # fmt: skip

    def probe(self, model: Model, params: Any) -> Probe:
        """The probe of ``model`` (``params`` None: untrained parameters serve its shapes)."""
        if params is None:
            params = zoo.init_params(jax.random.key(0), model)
        return model_probe(
            model, params, layers=list(self.layers) if self.layers else None,
            conv_reduce=self.conv_reduce, values=self.values,
        )  # fmt: skip

    def resolved_methods(self) -> tuple[str, ...]:
        """The methods in use (default: :func:`default_methods`)."""
        return tuple(self.methods) if self.methods is not None else default_methods()

    def resolved_candidates(self) -> tuple[str, ...]:
        """The methods leave-one-kind-out chooses among."""
        if self.candidates is not None:
            return tuple(self.candidates)
        methods = self.resolved_methods()
        return tuple(m for m in _DEFAULT_CANDIDATES if m in methods) or methods


def _trial_key(seed: int, kind: str, window: int, count: int, model_seed: int) -> jax.Array:
    key = jax.random.key(seed)
    for part in (FAULT_KINDS.index(kind), window, count, model_seed):
        key = jax.random.fold_in(key, part)
    return key


def standalone_seconds(
    probe: Probe,
    params: Any,
    xy: tuple[np.ndarray, np.ndarray],
    methods: Sequence[str],
    *,
    batch_size: int,
) -> dict[str, float]:
    """Seconds of each method alone (a fresh :class:`Evidence`, nothing shared), on ``xy``,
    after one warm-up call (compilation excluded)."""
    out = {}
    for method in methods:
        name, per_class = _split_method(method)
        for _ in range(2):  # the first call compiles
            evidence = Evidence(probe, params, *xy, batch_size=batch_size)
            start = time.perf_counter()
            evidence.scores(name, per_class=per_class)
            out[method] = time.perf_counter() - start
    return out


def _model_info(model: Model, params: Any, prb: Probe, meta: dict, xy) -> dict:
    index = prb.index
    return {
        "checkpoint": meta.get("checkpoint"),
        "layers": list(index.layer_names),
        "layer_sizes": list(index.layer_sizes),
        "neurons": index.num_neurons,
        "accuracy": float(np.mean(zoo.predict(model, params, xy[0]) == xy[1])),
    }


def run_faultbench(config: FaultbenchConfig, *, progress: Progress | None = None) -> dict:
    """Plants faults in trained models and scores every localizer on them.

    Args:
      config: what to run (validated first, before any work).
      progress: called as ``progress(stage, done, total)`` while models train
        (stage ``"train"``) and after each trial (stage ``"faultbench"``).

    Returns:
      The result as a JSON-ready dict: ``config``, ``versions``, ``dataset``, ``models``,
      ``trials``, ``summary``, ``by_kind``, ``leave_one_kind_out``,
      ``leave_one_family_out``, ``leave_one_kind_out_percent`` (by top-10% recall),
      ``method_seconds``, ``rejected``, ``skipped``, ``seconds``.
    """
    config.validate()
    start = time.perf_counter()
    dataset = data.load_dataset(config.dataset)
    config.validate(dataset=dataset)  # inputs, layers and fault counts, before any training
    localize, measure = config.split(len(dataset.x_test))
    localize_xy = (dataset.x_test[localize], dataset.y_test[localize])
    measure_xy = (dataset.x_test[measure], dataset.y_test[measure])
    methods = config.resolved_methods()
    trials, models = [], {}
    per_model = len(config.kinds) * len(config.drops) * len(config.faults) * len(config.seeds)
    total = len(config.models) * len(config.model_seeds) * per_model
    for spec in config.models:
        name, activation = _model_spec(spec)
        for model_seed in config.model_seeds:
            model, params, meta = checkpoints.load_or_train(
                name, dataset, seed=model_seed, activation=activation, progress=progress
            )
            prb = config.probe(model, params)
            info = _model_info(model, params, prb, meta, measure_xy)
            info["method_seconds"] = standalone_seconds(
                prb, params, localize_xy, methods, batch_size=config.batch_size
            )
            models[f"{spec}@{model_seed}"] = info
            cut = cutoffs(prb.index.num_neurons, config.top_k, config.top_percent)
            for kind in config.kinds:
                for w, drop in enumerate(config.drops):
                    for count in config.faults:
                        for seed in config.seeds:
                            trial = run_trial(
                                _trial_key(seed, kind, w, count, model_seed), model, params,
                                prb, localize_xy, measure_xy, kind=kind, drop=tuple(drop),
                                count=count, methods=methods, cut=cut,
                                batch_size=config.batch_size, tries=config.tries,
                                labels={"model_seed": model_seed, "seed": seed},
                            )  # fmt: skip
                            trials.append(dataclasses.asdict(trial) | {"model": spec})
                            notify(progress, "faultbench", len(trials), total)
    parts = (len(localize_xy[0]), len(measure_xy[0]))
    return _result(config, dataset, models, trials, methods, start, parts)


def _result(config, dataset, models, trials, methods, start, parts) -> dict:
    candidates = config.resolved_candidates()
    return {
        "config": dataclasses.asdict(config)
        | {"methods": list(methods), "candidates": list(candidates)},
        "versions": checkpoints.package_versions(),
        "dataset": {"name": dataset.name, "inputs": parts[0], "measure_inputs": parts[1]},
        "models": models,
        "trials": trials,
        "summary": summarize(trials),
        "by_kind": summarize(trials, ("kind",)),
        "by_model_kind": summarize(trials, ("model", "kind")),
        "leave_one_kind_out": leave_one_out(trials, candidates, by="kind"),
        "leave_one_family_out": leave_one_out(trials, candidates, by="family"),
        "leave_one_kind_out_percent": leave_one_out(trials, candidates, score="top10%"),
        "method_seconds": {model: info["method_seconds"] for model, info in models.items()},
        "rejected": int(sum(t["rejected"] for t in trials)),
        "skipped": [
            {k: t[k] for k in ("model", "model_seed", "kind", "drop", "count", "seed", "skipped")}
            | {"notes": list(t["notes"])}
            for t in trials
            if t["skipped"]
        ],
        "seconds": round(time.perf_counter() - start, 3),
    }
