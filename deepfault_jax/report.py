"""Outputs of a run: the typed :class:`RunReport`, JSON for machines, Markdown for people, PNG
figures; all written atomically."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from deepfault_jax.files import write_atomic

__all__ = [
    "REPORT_FORMAT",
    "MeasureResult",
    "RandomRun",
    "RunReport",
    "Selection",
    "markdown_report",
    "plot_examples",
    "plot_misclassification",
    "plot_run_examples",
    "write_bytes",
    "write_json",
    "write_npz",
]

REPORT_FORMAT = "deepfault-jax-run-report"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The correctly classified test inputs synthesized from.

    Attributes:
      rows: ``int64[n]`` test-set rows, sorted within each class.
      per_class: class -> inputs chosen.
      skipped: ``{"class", "reason"}`` for each class without any.
    """

    rows: np.ndarray
    per_class: dict[int, int]
    skipped: list[dict]


@dataclasses.dataclass(frozen=True)
class MeasureResult:
    """Synthesis toward one localizer's suspicious sets of size ``k``, beside the random
    baseline.

    Attributes:
      measure: the localizer's name (a measure's, or any other localizer's).
      k: suspicious neurons per class.
      metrics: :func:`~deepfault_jax.evaluate.evaluate_synthesis`'s numbers.
      random: the random baseline of the same k: metric -> ``{"mean", "std"}``
        over the repeats.
    """

    measure: str
    k: int
    metrics: dict[str, Any]
    random: dict[str, dict[str, float | None]]


@dataclasses.dataclass(frozen=True)
class RandomRun:
    """One random baseline: synthesis toward ``k`` random neurons per class (repeat ``repeat``)."""

    k: int
    repeat: int
    metrics: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What a run found: the typed form of ``report.json`` (:meth:`to_json`).

    Attributes:
      config: the run's configuration.
      classes: the classes synthesized from.
      dataset: the data set's summary.
      model: name, activation, checkpoint and test accuracy.
      probe: layers, layer sizes, conv reduction, values and threshold.
      spectrum: passing and failing inputs and the per-layer summary.
      synthesis: mode, d, step size, steps and direction in use.
      selection: the inputs synthesized from.
      results: one :class:`MeasureResult` per localizer (measure) and k.
      random_runs: every :class:`RandomRun`.
      files: file name -> path written.
      seconds: wall time of the run.
      versions: package versions.
      localizers: per localizer of the run: ``family``, ``options``, ``selection``
        (``"per-class"``: each class's own top k; ``"pooled"``: the top k of the scores
        pooled over classes, the same for every class, for a localizer without a per-class
        variant) and ``seconds`` (None for the measures, read off the spectrum).
    """

    config: Any  # the run's RunConfig (a dataclass)
    classes: tuple[int, ...]
    dataset: dict
    model: dict
    probe: dict
    spectrum: dict
    synthesis: dict
    selection: Selection
    results: list[MeasureResult]
    random_runs: list[RandomRun]
    files: dict[str, str]
    seconds: float
    versions: dict[str, str]
    localizers: dict[str, dict] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        """The content of ``report.json`` (strict JSON: no NaN or infinity)."""
        sel = self.selection
        return {
            "format": REPORT_FORMAT,
            "config": {**dataclasses.asdict(self.config), "classes": list(self.classes)},
            "versions": self.versions,
            "dataset": self.dataset,
            "model": self.model,
            "probe": self.probe,
            "spectrum": self.spectrum,
            "synthesis": self.synthesis,
            "selection": {
                "inputs": int(sel.rows.size),
                "per_class": sel.per_class,
                "skipped_classes": sel.skipped,
            },
            "results": [
                {"measure": r.measure, "k": r.k, **r.metrics, "random": r.random}
                for r in self.results
            ],
            "random_runs": [{"k": r.k, "repeat": r.repeat, **r.metrics} for r in self.random_runs],
            "localizers": self.localizers,
            "files": self.files,
            "seconds": self.seconds,
        }


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`deepfault_jax.files.write_atomic`)."""
    return write_atomic(path, data)


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Writes ``obj`` as indented JSON (strict: no NaN or infinity)."""
    return write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    )


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Writes arrays as a compressed ``.npz`` (loadable with ``allow_pickle=False``)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown_report(report: dict) -> str:
    """The run as a Markdown page: configuration, then a table in the paper's shape.

    Rows are measure x k; each column shows the measure's figure beside the
    random baseline's mean (and spread over its repeats).
    """
    cfg = report["config"]
    lines = [
        "# DeepFault run",
        "",
        f"Model `{report['model']['name']}` ({report['model']['activation']}) on "
        f"`{report['dataset']['name']}`, test accuracy {report['model']['test_accuracy']:.4f}; "
        f"mode `{cfg['mode']}`, d = {cfg['d']}, step size {report['synthesis']['step_size']}"
        + (
            f", {cfg['steps']} steps ({report['synthesis']['direction']})"
            if cfg["mode"] == "pgd"
            else ""
        )
        + f"; seed {cfg['seed']}.",
        "",
        f"Synthesized from {report['selection']['inputs']} correctly classified test inputs "
        f"({cfg['inputs_per_class']} per class at most); random baseline: "
        f"{cfg['random_repeats']} draws of k neurons per class from the same layers, "
        "excluding those the measures chose.",
        "",
    ]
    pooled = [n for n, v in report.get("localizers", {}).items() if v["selection"] == "pooled"]
    if pooled:
        lines += [
            f"Suspicious sets of {', '.join(pooled)} (no per-class variant): the top k of the "
            "scores pooled over all classes, the same for every class; the others: each "
            "class's own top k.",
            "",
        ]
    skipped = report["selection"]["skipped_classes"]
    if skipped:
        lines += [
            "Classes skipped: " + ", ".join(f"{s['class']} ({s['reason']})" for s in skipped) + ".",
            "",
        ]
    lines += [
        "| measure | k | misclassified | random | loss | random | L1 | L2 | L-inf | "
        "activation rose | random | became active | random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        rnd = r["random"]

        def both(key, fmt=_pct, r=r, rnd=rnd):
            spread = rnd[key]["std"]
            base = fmt(rnd[key]["mean"])
            return fmt(r[key]), (f"{base} +- {fmt(spread)}" if spread is not None else base)

        mis, mis_r = both("misclassification_rate")
        loss, loss_r = both("loss", fmt=lambda v: "-" if v is None else f"{v:.3f}")
        rose, rose_r = both("activation_rose")
        act, act_r = both("became_active")
        lines.append(
            f"| {r['measure']} | {r['k']} | {mis} | {mis_r} | {loss} | {loss_r} | {r['l1']:.3f} | "
            f"{r['l2']:.3f} | {r['linf']:.3f} | {rose} | {rose_r} | {act} | {act_r} |"
        )
    lines += [
        "",
        "Misclassified: share of synthesized inputs the model gets wrong (all originals were "
        "right). Distances are means over inputs. Activation rose / became active: share of "
        "(input, suspicious neuron) pairs whose value rose / went from <= threshold to above.",
        "",
        "Files: `report.json` (every figure), `synthesized.npz` (originals, synthesized inputs, "
        "labels, predictions, suspicious sets), `spectrum.npz`, `misclassification.png`, "
        "`examples.png`.",
        "",
    ]
    return "\n".join(lines)


def _misclassification_figure(report: dict):
    """The figure :func:`plot_misclassification` writes, as a :class:`matplotlib.figure.Figure`."""
    from matplotlib.figure import Figure

    ks = sorted({r["k"] for r in report["results"]})
    measures = list(dict.fromkeys(r["measure"] for r in report["results"]))
    repeats = report["config"]["random_repeats"]
    fig = Figure(figsize=(3.8 + 1.4 * len(ks) * (len(measures) + 1) / 3, 3.6), dpi=120,
                 layout="constrained")  # fmt: skip
    ax = fig.subplots()
    width = 0.8 / (len(measures) + 1)
    for j, name in enumerate([*measures, "random"]):
        values, errors = [], []
        for k in ks:
            row = next(
                r
                for r in report["results"]
                if r["k"] == k and (name == "random" or r["measure"] == name)
            )
            if name == "random":
                stats = row["random"]["misclassification_rate"]
                values.append(np.nan if stats["mean"] is None else stats["mean"])
                errors.append(0.0 if stats["std"] is None else stats["std"])
            else:
                values.append(row["misclassification_rate"])
        xs = np.arange(len(ks)) + (j - len(measures) / 2) * width
        if name == "random":
            # the report keeps the mean and the population standard deviation (numpy's
            # default, ddof 0) of the random baseline over its repeats
            label = (f"random neurons: mean of {repeats} draw{'s' if repeats != 1 else ''};\n"
                     f"error bars: ±1 std (population)\nover the {repeats} draws")  # fmt: skip
            ax.bar(xs, values, width, yerr=errors, capsize=3, label=label, color="0.6")
        else:
            ax.bar(xs, values, width, label=f"{name} (one run)")
    ax.set_xticks(np.arange(len(ks)), [f"k = {k}" for k in ks])
    ax.set_xlabel("suspicious neurons per class (k)")
    ax.set_ylabel(f"misclassified share of the\n{report['selection']['inputs']} synthesized inputs")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['model']['name']} on {report['dataset']['name']}, {report['config']['mode']}, "
                 f"d = {report['config']['d']}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_misclassification(report: dict, path: str | os.PathLike) -> Path:
    """Bar chart: misclassification rate per measure and k, beside the random baseline
    (its mean over the repeats, error bars ±1 population standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    return write_bytes(path, _figure_bytes(_misclassification_figure(report)))


def plot_run_examples(report: dict, arrays: dict[str, np.ndarray], path: str | os.PathLike):
    """A run's examples.png: the first input of up to six classes, and each localizer's
    synthesis at the largest k beside the first random repeat (``arrays``: synthesized.npz)."""
    top_k = max(report["config"]["k"])
    x0, y0 = arrays["x_original"], arrays["y"]
    shown = np.unique(y0, return_index=True)[1][:6]
    names = [*report["config"]["measures"], "random"]
    tags = {m: (f"{m}_k{top_k}" if m != "random" else f"random_k{top_k}_r0") for m in names}
    return plot_examples(
        x0[shown],
        {f"{m} k={top_k}": arrays[f"{tags[m]}__x"][shown] for m in names},
        y0[shown],
        {f"{m} k={top_k}": arrays[f"{tags[m]}__pred"][shown] for m in names},
        path,
    )


def _examples_figure(
    originals: np.ndarray,
    synthesized: dict[str, np.ndarray],
    labels: np.ndarray,
    predictions: dict[str, np.ndarray],
    *,
    rows: int = 6,
):
    """The figure :func:`plot_examples` writes, as a :class:`matplotlib.figure.Figure`."""
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    rows = min(rows, len(originals))
    names = list(synthesized)
    cols = 1 + 2 * len(names)
    fig = Figure(figsize=(1.25 * cols + 0.9, 1.5 * rows + 0.7), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    diffs = {
        name: (synthesized[name][:rows] - originals[:rows]).mean(axis=-1, keepdims=True)
        for name in names
    }
    # one colour scale for every difference panel, so that the colour bar reads for all
    bound = max([float(np.abs(d).max()) for d in diffs.values()] + [1e-6])
    norm = colors.Normalize(vmin=-bound, vmax=bound)

    def show(ax, image, title, cmap="gray", vmin=0.0, vmax=1.0, color="black"):
        image = image[..., 0] if image.shape[-1] == 1 else image
        ax.imshow(
            np.clip(image, vmin, vmax) if image.ndim == 3 else image,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
        )
        ax.set_title(title, fontsize=6, color=color)
        ax.axis("off")

    for i in range(rows):
        true = int(labels[i])
        show(axes[i, 0], originals[i], f"original\ntrue class {true}")
        for j, name in enumerate(names):
            pred = int(predictions[name][i])
            show(axes[i, 1 + 2 * j], synthesized[name][i], f"{name}\ntrue {true} → pred {pred}",
                 color="black" if pred == true else "tab:red")  # fmt: skip
            show(axes[i, 2 + 2 * j], diffs[name][i], f"difference\n({name})", cmap="coolwarm",
                 vmin=-bound, vmax=bound)  # fmt: skip
    channels = "; mean over channels" if originals.shape[-1] > 1 else ""
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="coolwarm"), ax=axes, shrink=0.5,
                 aspect=30, label=f"difference panels: synthesized − original{channels}")  # fmt: skip
    ks = {name.rpartition(" k=")[2] for name in names if " k=" in name}
    if len(ks) == 1 and all(" k=" in name for name in names):
        shown = (f"measures {', '.join(n.rpartition(' k=')[0] for n in names)}, "
                 f"k = {ks.pop()} suspicious neurons per class")  # fmt: skip
    else:
        shown = ", ".join(names)
    fig.suptitle(
        f"Synthesized inputs for {shown}\nrows: true classes "
        f"{', '.join(str(int(c)) for c in labels[:rows])}; "
        "'true → pred': prediction after synthesis (red: misclassified)",
        fontsize=8,
    )
    return fig


def plot_examples(
    originals: np.ndarray,
    synthesized: dict[str, np.ndarray],
    labels: np.ndarray,
    predictions: dict[str, np.ndarray],
    path: str | os.PathLike,
    *,
    rows: int = 6,
) -> Path:
    """Grid: original, then synthesized input and its difference for each configuration;
    panels name the true class and the prediction after synthesis, one colour bar serves
    every difference panel."""
    import matplotlib

    matplotlib.use("Agg")
    fig = _examples_figure(originals, synthesized, labels, predictions, rows=rows)
    return write_bytes(path, _figure_bytes(fig))


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
