"""Outputs of a run: JSON for machines, Markdown for people, PNG figures; all written atomically."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from deepfault_jax.files import write_atomic

__all__ = [
    "markdown_report",
    "plot_examples",
    "plot_misclassification",
    "write_bytes",
    "write_json",
    "write_npz",
]


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


def plot_misclassification(report: dict, path: str | os.PathLike) -> Path:
    """Bar chart: misclassification rate per measure and k, beside the random baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in report["results"]})
    measures = list(dict.fromkeys(r["measure"] for r in report["results"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(ks) * (len(measures) + 1) / 3, 3.6), dpi=120)
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
                values.append(row["random"]["misclassification_rate"]["mean"])
                errors.append(row["random"]["misclassification_rate"]["std"])
            else:
                values.append(row["misclassification_rate"])
                errors.append(0.0)
        xs = np.arange(len(ks)) + (j - len(measures) / 2) * width
        ax.bar(xs, values, width, yerr=errors if name == "random" else None, label=name,
               color="0.6" if name == "random" else None)  # fmt: skip
    ax.set_xticks(np.arange(len(ks)), [f"k = {k}" for k in ks])
    ax.set_ylabel("misclassified synthesized inputs")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['model']['name']} on {report['dataset']['name']}, {report['config']['mode']}, "
                 f"d = {report['config']['d']}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def plot_examples(
    originals: np.ndarray,
    synthesized: dict[str, np.ndarray],
    labels: np.ndarray,
    predictions: dict[str, np.ndarray],
    path: str | os.PathLike,
    *,
    rows: int = 6,
) -> Path:
    """Grid: original, then synthesized input and its difference for each configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, len(originals))
    names = list(synthesized)
    cols = 1 + 2 * len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.35 * rows), dpi=110, squeeze=False)

    def show(ax, image, title, cmap="gray", vmin=0.0, vmax=1.0):
        image = image[..., 0] if image.shape[-1] == 1 else image
        ax.imshow(
            np.clip(image, vmin, vmax) if image.ndim == 3 else image,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
        )
        ax.set_title(title, fontsize=6)
        ax.axis("off")

    for i in range(rows):
        show(axes[i, 0], originals[i], f"original, class {labels[i]}")
        for j, name in enumerate(names):
            x = synthesized[name][i]
            show(axes[i, 1 + 2 * j], x, f"{name}: pred {predictions[name][i]}")
            diff = (x - originals[i]).mean(axis=-1, keepdims=True)
            bound = max(float(np.abs(diff).max()), 1e-6)
            show(axes[i, 2 + 2 * j], diff, "difference", cmap="coolwarm", vmin=-bound, vmax=bound)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())
