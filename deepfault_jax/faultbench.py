"""The planted-fault benchmark: trials, rankings, recall, and the ``faultbench`` run.

A trial plants faults (:mod:`deepfault_jax.faults`) in a trained model and
ranks the planted neurons by every localization method.

Localization methods, each giving one ranking of all probed neurons:
count measures (``tarantula``, ``ochiai``, ``dstar``, ...) and attribution
measures (``gradxact``, ``actdiff``, ``linear_ablation``), each pooled over
classes or per class (a neuron's rank is its best rank in any class's
ranking; classes whose scores are all equal carry no evidence and are left
out), exact ablation (``ablation``: fixes minus
breaks; ``ablation_loss``: mean loss drop), and the random ranking (expected
recall ``k / N``, expected mean rank ``(N + 1) / 2``; the empirical mean of
random permutations is reported beside it). Scores: top-5 and top-10 recall
(the share of planted neurons among the first 5 or 10) and the mean rank of
the planted neurons (1 = first). A planted neuron tied with others counts as
the expectation over random tie-breaking (the middle of the tie; the share of
the tie within the first k), so neither its id nor its neighbours' decide.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from deepfault_jax import ablation as ablation_lib
from deepfault_jax import checkpoints, data, localize, measures, zoo
from deepfault_jax.errors import InputError, check_finite, check_int, check_seed
from deepfault_jax.faults import FAULT_KINDS, PlantedFault, plant_faults
from deepfault_jax.probe import VALUES, Probe, model_probe
from deepfault_jax.progress import Progress, notify
from deepfault_jax.spectrum import Spectrum
from deepfault_jax.streaming import compute_spectrum
from deepfault_jax.zoo import Model

__all__ = [
    "FaultbenchConfig",
    "Ranks",
    "Trial",
    "default_methods",
    "method_ranks",
    "recall_and_rank",
    "run_faultbench",
    "run_trial",
    "summarize",
    "tie_ranks",
]


class Ranks(NamedTuple):
    """Tie-aware 1-based ranks of every neuron (``int64[neurons]`` each).

    Neuron ``n`` and the neurons tied with it share the ranks ``first[n] ..
    last[n]`` (``first == last`` without a tie).
    """

    first: np.ndarray
    last: np.ndarray


def tie_ranks(score: np.ndarray) -> Ranks:
    """:class:`Ranks` of ``[neurons]`` scores, higher first (+inf above every finite score)."""
    s = np.asarray(score, np.float64)
    ascending = np.sort(s)
    n = s.size
    greater = n - np.searchsorted(ascending, s, side="right")
    at_least = n - np.searchsorted(ascending, s, side="left")
    return Ranks(greater.astype(np.int64) + 1, at_least.astype(np.int64))


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


def default_methods(*, ablation: bool = True) -> tuple[str, ...]:
    """Every method :func:`method_ranks` knows, as ``name/scope``."""
    names = []
    for m in ("tarantula", "ochiai", "dstar", "gradxact", "actdiff", "linear_ablation"):
        names += [f"{m}/pooled", f"{m}/per-class"]
    if ablation:
        names += ["ablation/pooled", "ablation_loss/pooled"]
    return tuple(names)


def method_ranks(
    spectrum: Spectrum,
    methods: Sequence[str],
    *,
    ablation: ablation_lib.Ablation | None = None,
) -> dict[str, Ranks]:
    """For each method (``"ochiai/pooled"``, ``"gradxact/per-class"``, ``"ablation/pooled"``),
    the tie-aware :class:`Ranks` of every neuron."""
    out = {}
    for method in methods:
        name, _, scope = method.partition("/")
        if scope not in ("pooled", "per-class"):
            raise InputError(f"method must be NAME/pooled or NAME/per-class; got {method!r}")
        pooled = scope == "pooled"
        if name in ("ablation", "ablation_loss"):
            if ablation is None:
                raise InputError(f"{method} needs an exact ablation; got none")
            by = "fixes-breaks" if name == "ablation" else "loss"
            score = ablation_lib.ablation_scores(ablation, by=by, pooled=pooled)
        else:
            measures.get_measure(name)
            score = np.asarray(localize.suspiciousness(spectrum, name, pooled=pooled))
        out[method] = tie_ranks(score) if pooled else _best_class_rank(score)
    return out


def recall_and_rank(ranks: Ranks, planted: Sequence[int]) -> dict[str, float]:
    """Top-5 and top-10 recall and the mean rank of the ``planted`` neuron ids.

    A planted neuron tied with others counts as the expectation over random
    tie-breaking: its rank is the middle of the tie, and its top-k recall the
    share of the tie's ranks within the first k.
    """
    ids = np.asarray(planted, np.int64)
    first = np.asarray(ranks.first, np.float64)[ids]
    last = np.asarray(ranks.last, np.float64)[ids]

    def recall(k):
        return float(np.mean(np.clip((k - first + 1) / (last - first + 1), 0.0, 1.0)))

    return {
        "top5_recall": recall(5),
        "top10_recall": recall(10),
        "mean_rank": float(np.mean((first + last) / 2)),
    }


@dataclasses.dataclass(frozen=True)
class Trial:
    """One planted-fault trial: what was planted and how each method ranked it."""

    model: str
    kind: str
    count: int
    seed: int
    faults: tuple[PlantedFault, ...]
    accuracy_before: float
    accuracy_after: float
    scores: dict[str, dict[str, float]]
    notes: tuple[str, ...]
    seconds: float
    skipped: str | None = None


def run_trial(
    key: jax.Array,
    model: Model,
    params: Any,
    probe: Probe,
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: str,
    count: int,
    seed: int,
    methods: Sequence[str],
    min_drop: float = 0.02,
    batch_size: int = 512,
    random_draws: int = 100,
) -> Trial:
    """Plants faults, computes the spectrum with attribution sums (and the exact ablation if
    a method needs it) on the faulty model, and scores every method.

    ``probe`` is the model's probe; it serves the faulty parameters too (the same
    structure), so its compiled steps are reused from trial to trial.
    """
    if int(random_draws) != random_draws or random_draws < 1:
        raise InputError(f"random_draws must be a positive integer; got {random_draws!r}")
    start = time.perf_counter()
    before = zoo.accuracy(model, params, x, y)
    faulty, planted, notes = plant_faults(
        key, model, params, probe, x, y, kind=kind, count=count, min_drop=min_drop
    )
    if not planted:
        return Trial(
            model.name, kind, count, seed, (), before, before, {}, tuple(notes),
            time.perf_counter() - start, skipped="no fault reached the accuracy drop",
        )  # fmt: skip
    spec = compute_spectrum(probe, faulty, x, y, batch_size=batch_size, attribution=True)
    ablation = None
    if any(m.split("/")[0] in ("ablation", "ablation_loss") for m in methods):
        ablation = ablation_lib.exact_ablation(probe, faulty, x, y, batch_size=batch_size)
    ranks = method_ranks(spec, methods, ablation=ablation)
    ids = [f.neuron for f in planted]
    scores = {m: recall_and_rank(r, ids) for m, r in ranks.items()}
    n = probe.index.num_neurons
    draws = []
    for i in range(random_draws):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 10_000 + i), n)) + 1
        draws.append(recall_and_rank(Ranks(order, order), ids))
    scores["random"] = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    scores["random (expected)"] = {
        "top5_recall": min(5, n) / n,
        "top10_recall": min(10, n) / n,
        "mean_rank": (n + 1) / 2,
    }
    after = zoo.accuracy(model, faulty, x, y)
    if len(planted) < count:
        notes.append(f"planted {len(planted)} of {count} faults")
    return Trial(
        model.name, kind, count, seed, tuple(planted), before, after, scores, tuple(notes),
        time.perf_counter() - start,
    )  # fmt: skip


def summarize(trials: Sequence[Trial]) -> list[dict]:
    """Per (model, number of faults, method): mean and standard deviation over the trials
    that planted every fault (all kinds and seeds together) of each score."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        if t.skipped or len(t.faults) < t.count:
            continue
        for method, s in t.scores.items():
            groups.setdefault((t.model, t.count, method), []).append(s)
    rows = []
    for (model, count, method), items in groups.items():
        row = {"model": model, "faults": count, "method": method, "trials": len(items)}
        for k in ("top5_recall", "top10_recall", "mean_rank"):
            v = np.asarray([s[k] for s in items])
            row[k] = float(v.mean())
            row[f"{k}_std"] = float(v.std())
        rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class FaultbenchConfig:
    """What ``deepfault-jax faultbench`` runs.

    Attributes:
      models: zoo models (each trained once with ``model_seed``, cached).
      dataset: data set spec; faults are planted and localized on its test split.
      kinds: fault kinds (:data:`deepfault_jax.faults.FAULT_KINDS`).
      faults: numbers of faults planted together per trial.
      seeds: trial seeds (neurons, target classes, noise).
      inputs: test inputs used (the first ones of the split).
      min_drop: accuracy drop each planted fault must cause.
      methods: localization methods (``NAME/pooled`` or ``NAME/per-class``;
        ``ablation/pooled`` and ``ablation_loss/pooled`` for exact ablation).
      layers: probed layers (None: every hidden Dense/Conv).
      conv_reduce: one of :attr:`CONV_REDUCTIONS` (faults are planted in whole channels).
      values: ``"pre"`` or ``"post"`` activation values.
      model_seed: training seed of the models.
      batch_size: inputs per compiled step.
    """

    #: The conv reductions a fault can be planted under (not ``"none"``: whole channels).
    CONV_REDUCTIONS = ("mean", "max")
    #: The fewest test inputs a benchmark runs on.
    MIN_INPUTS = 10

    models: tuple[str, ...] = ("mlp-3x50",)
    dataset: str = "digits"
    kinds: tuple[str, ...] = FAULT_KINDS
    faults: tuple[int, ...] = (1, 3)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    inputs: int = 2000
    min_drop: float = 0.02
    methods: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    conv_reduce: str = "mean"
    values: str = "pre"
    model_seed: int = 0
    batch_size: int = 500

    def validate(self, *, dataset: data.Dataset | None = None) -> None:
        """Raises :class:`InputError` for a configuration that cannot run (before any work).

        Args:
          dataset: the loaded data set, to check also what depends on it: the
            probed layers exist, and no fault count exceeds the probed neurons of
            a model (built untrained, so nothing is trained here).
        """
        if not self.models or not self.kinds or not self.faults or not self.seeds:
            raise InputError("models, kinds, faults and seeds must each list at least one value")
        for name in self.models:
            if name not in zoo.MODEL_NAMES:
                raise InputError(
                    f"unknown model {name!r}; expected one of {', '.join(zoo.MODEL_NAMES)}"
                )
        for kind in self.kinds:
            if kind not in FAULT_KINDS:
                raise InputError(
                    f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}"
                )
        for field in ("models", "kinds", "faults", "seeds"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise InputError(f"{field} must list distinct values; got {list(values)}")
        for count in self.faults:
            check_int("faults", count, lo=1)
        for seed in self.seeds:
            check_seed(seed, name="seeds")
        check_seed(self.model_seed, name="model_seed")
        check_int("inputs", self.inputs, lo=self.MIN_INPUTS)
        check_int("batch_size", self.batch_size, lo=1)
        check_finite("min_drop", self.min_drop, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        if self.conv_reduce not in self.CONV_REDUCTIONS:
            raise InputError(
                f"conv_reduce must be one of {', '.join(self.CONV_REDUCTIONS)} (faults are "
                f"planted in whole channels); got {self.conv_reduce!r}"
            )
        if self.values not in VALUES:
            raise InputError(f"values must be one of {', '.join(VALUES)}; got {self.values!r}")
        for method in self.resolved_methods():
            self.check_method(method)
        if dataset is not None:
            neurons = self.probed_neurons(dataset)
            smallest = min(neurons, key=neurons.__getitem__)
            if max(self.faults) > neurons[smallest]:
                raise InputError(
                    f"faults must be <= {neurons[smallest]}, the probed neurons of {smallest}; "
                    f"got {max(self.faults)}"
                )

    @staticmethod
    def check_method(method: str) -> None:
        """Raises :class:`InputError` unless ``method`` is ``NAME/pooled`` or ``NAME/per-class``
        of a known measure, or ``ablation/pooled`` or ``ablation_loss/pooled``."""
        name, _, scope = method.partition("/")
        if scope not in ("pooled", "per-class"):
            raise InputError(f"a method must be NAME/pooled or NAME/per-class; got {method!r}")
        if name not in ("ablation", "ablation_loss"):
            measures.get_measure(name)
        elif scope != "pooled":
            raise InputError(f"exact ablation is ranked pooled only; got {method!r}")

    def probed_neurons(self, dataset: data.Dataset) -> dict[str, int]:
        """How many neurons the probe of each model has on ``dataset``.

        Counted on untrained copies (:func:`zoo.init_params`: cheap, nothing is
        trained or cached); raises :class:`InputError` for a layer a model lacks.
        """
        counts = {}
        for name in self.models:
            model = zoo.create_model(
                name, input_shape=dataset.input_shape, num_classes=dataset.num_classes
            )
            prb = model_probe(
                model, zoo.init_params(jax.random.key(0), model),
                layers=list(self.layers) if self.layers else None,
                conv_reduce=self.conv_reduce, values=self.values,
            )  # fmt: skip
            counts[name] = prb.index.num_neurons
        return counts

    def resolved_methods(self) -> tuple[str, ...]:
        """The methods in use (default: every method of :func:`faults.default_methods`)."""
        return self.methods if self.methods is not None else default_methods()


def run_faultbench(config: FaultbenchConfig, *, progress: Progress | None = None) -> dict:
    """Plants faults in trained models and scores every localizer on them.

    Args:
      config: what to run (validated first, before any work).
      progress: called as ``progress(stage, done, total)`` while models train
        (stage ``"train"``) and after each trial (stage ``"faultbench"``).

    Returns:
      The result as a JSON-ready dict: ``config``, ``versions``, ``dataset``,
      ``models``, ``trials``, ``summary``, ``skipped`` and ``seconds``.
    """
    config.validate()
    start = time.perf_counter()
    dataset = data.load_dataset(config.dataset)
    config.validate(dataset=dataset)  # layers and fault counts, before any training
    x, y = dataset.x_test[: config.inputs], dataset.y_test[: config.inputs]
    methods = config.resolved_methods()
    trials, models = [], {}
    total = len(config.models) * len(config.kinds) * len(config.faults) * len(config.seeds)
    for name in config.models:
        model, params, meta = checkpoints.load_or_train(
            name, dataset, seed=config.model_seed, progress=progress
        )
        prb = model_probe(
            model, params, layers=list(config.layers) if config.layers else None,
            conv_reduce=config.conv_reduce, values=config.values,
        )  # fmt: skip
        index = prb.index
        models[name] = {
            "checkpoint": meta.get("checkpoint"),
            "layers": list(index.layer_names),
            "layer_sizes": list(index.layer_sizes),
            "neurons": index.num_neurons,
            "accuracy": float(np.mean(zoo.predict(model, params, x) == y)),
        }
        for kind in config.kinds:
            for count in config.faults:
                for seed in config.seeds:
                    key = jax.random.fold_in(
                        jax.random.key(seed), FAULT_KINDS.index(kind) * 100 + count
                    )
                    trial = run_trial(
                        key, model, params, prb, x, y, kind=kind, count=count, seed=seed,
                        methods=methods, min_drop=config.min_drop, batch_size=config.batch_size,
                    )  # fmt: skip
                    trials.append(trial)
                    notify(progress, "faultbench", len(trials), total)
    return {
        "config": dataclasses.asdict(config) | {"methods": list(methods)},
        "versions": checkpoints.package_versions(),
        "dataset": {"name": dataset.name, "inputs": int(len(x))},
        "models": models,
        "trials": [dataclasses.asdict(t) for t in trials],
        "summary": summarize(trials),
        "skipped": [
            {
                "model": t.model,
                "kind": t.kind,
                "faults": t.count,
                "seed": t.seed,
                "reason": t.skipped or f"planted {len(t.faults)} of {t.count}",
                "notes": list(t.notes),
            }
            for t in trials
            if t.skipped or len(t.faults) < t.count
        ],  # fmt: skip
        "seconds": round(time.perf_counter() - start, 3),
    }
