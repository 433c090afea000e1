"""The planted-fault benchmark's Markdown page and figure, from its JSON result."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deepfault_jax.files import write_atomic

__all__ = ["faultbench_lines", "faultbench_markdown", "plot_faultbench"]


def _window(drop) -> str:
    lo, hi = drop
    return f"{100 * lo:g}-{100 * hi:g} pts"


def _methods(result: dict) -> list[str]:
    return [*result["config"]["methods"], "random (expected)"]


def _cell(row: dict | None, score: str) -> str:
    return "-" if row is None else f"{row[score]:.2f}"


def _maybe(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def leave_one_out_table(rows: list[dict], by: str) -> list[str]:
    """Markdown rows: per held-out kind (or family), the method chosen on the others, its
    top-10 recall there and on the held-out trials, the best method in hindsight and the
    default's recall; the last row is the mean over the held-out values."""
    lines = [
        f"| held-out {by} | trials | chosen on the others | recall there | recall held out "
        "| best held out (hindsight) | default held out |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r[by]} | {r['trials']} | {r['chosen']} | {r['chosen_on_others']:.2f} "
            f"| {r['chosen_held_out']:.2f} | {r['best_held_out']} "
            f"({r['best_held_out_score']:.2f}) | {_maybe(r['default_held_out'])} |"
        )
    if rows:
        chosen = np.mean([r["chosen_held_out"] for r in rows])
        defaults = [r["default_held_out"] for r in rows]
        default = None if None in defaults else float(np.mean(defaults))
        best = np.mean([r["best_held_out_score"] for r in rows])
        lines.append(
            f"| **mean** | {sum(r['trials'] for r in rows)} | | | **{chosen:.2f}** | "
            f"({best:.2f}) | **{_maybe(default)}** |"
        )
    return lines


def overview_table(result: dict, scores=("top10", "top10%", "mean_rank")) -> list[str]:
    """Markdown rows: per method, the given scores per drop window and number of faults,
    all models together (means over trials)."""
    cfg = result["config"]
    panels = [(tuple(d), c) for d in cfg["drops"] for c in cfg["faults"]]
    rows = _summary(result, ("drop", "count"))
    head = " | ".join(f"{_window(d)}, {c} fault{'s' if c > 1 else ''}" for d, c in panels)
    lines = [
        f"Each cell: {' / '.join(scores)}.",
        "",
        f"| method | {head} |",
        "|---|" + "---:|" * len(panels),
    ]
    for method in _methods(result):
        cells = []
        for d, c in panels:
            r = rows.get((d, c, method))
            cells.append(
                "-"
                if r is None
                else " / ".join(
                    f"{r[s]:.2f}" if s != "mean_rank" else f"{r[s]:.1f}" for s in scores
                )  # fmt: skip
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _summary(result: dict, group: tuple[str, ...]) -> dict[tuple, dict]:
    from deepfault_jax.faultbench import summarize

    return {
        (*(tuple(r[g]) if isinstance(r[g], list) else r[g] for g in group), r["method"]): r
        for r in summarize(result["trials"], group)
    }


def by_kind_table(result: dict, model: str | None = None) -> list[str]:
    """Markdown rows: top-10 recall per fault kind (columns grouped by family) and method,
    over every model (or one), window and fault count."""
    from deepfault_jax.faults import FAULT_FAMILIES

    kinds = sorted(result["config"]["kinds"], key=lambda k: (FAULT_FAMILIES[k], k))
    trials = [t for t in result["trials"] if model is None or t["model"] == model]
    rows = _summary({**result, "trials": trials}, ("kind",))
    head = " | ".join(f"{k} ({FAULT_FAMILIES[k]})" for k in kinds)
    lines = [f"| method | {head} | worst |", "|---|" + "---:|" * (len(kinds) + 1)]
    for method in _methods(result):
        values = [rows.get((k, method)) for k in kinds]
        worst = min((v["top10"] for v in values if v is not None), default=float("nan"))
        cells = [_cell(v, "top10") for v in values]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {worst:.2f} |")
    return lines


def seconds_table(result: dict) -> list[str]:
    """Markdown rows: seconds of every method alone on the localization inputs of each
    clean model (after a warm-up call)."""
    models = list(result["method_seconds"])
    lines = ["| method | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for method in result["config"]["methods"]:
        cells = [
            f"{result['method_seconds'][m][method]:.3f}"
            if method in result["method_seconds"][m]
            else "-"
            for m in models
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def faultbench_lines(result: dict) -> list[str]:
    """The short summary a command prints: leave-one-kind-out and the overview."""
    return [
        *leave_one_out_table(result["leave_one_kind_out"], "kind"),
        "",
        *overview_table(result, ("top10",)),
    ]


def faultbench_markdown(result: dict) -> str:
    """The planted-fault benchmark as a Markdown page."""
    from deepfault_jax.faults import FAULT_FAMILIES

    cfg = result["config"]
    trials = result["trials"]
    done = [t for t in trials if not t["skipped"]]
    families: dict[str, list[str]] = {}
    for kind in cfg["kinds"]:
        families.setdefault(FAULT_FAMILIES[kind], []).append(kind)
    lines = [
        "# Planted-fault benchmark",
        "",
        f"Data: `{result['dataset']['name']}`: faults are localized on the first "
        f"{result['dataset']['inputs']} test inputs; their accuracy drops are measured on the "
        f"next {result['dataset']['measure_inputs']}. Models: "
        + ", ".join(
            f"`{m}` ({i['neurons']} neurons, accuracy {i['accuracy']:.3f})"
            for m, i in result["models"].items()
        )  # fmt: skip
        + ". Fault kinds by family: "
        + "; ".join(f"{f}: {', '.join(ks)}" for f, ks in families.items())
        + f". Drop windows: {', '.join(_window(d) for d in cfg['drops'])} per fault; "
        f"{', '.join(map(str, cfg['faults']))} fault(s) per trial; seeds "
        f"{', '.join(map(str, cfg['seeds']))}. {len(done)} of {len(trials)} trials planted "
        f"every fault; {result['rejected']} planting attempts were rejected (no strength put "
        "the neuron's drop into the window). Scores: recall at top-k (`top10`) and at top-k% "
        "of the probed neurons (`top10%`), mean rank of the planted neurons; ties count as "
        "the expectation over random tie-breaking.",
        "",
        "## Leave one fault kind out",
        "",
        "For each kind, the method with the best top-10 recall on the other kinds (among "
        f"{', '.join(cfg['candidates'])}) is scored on the held-out kind: the number that "
        "counts.",
        "",
        *leave_one_out_table(result["leave_one_kind_out"], "kind"),
        "",
        "The same by top-10% recall (k = 10% of each model's probed neurons; fairer to "
        "small models):",
        "",
        *leave_one_out_table(result["leave_one_kind_out_percent"], "kind"),
        "",
        "## Leave one fault family out",
        "",
        *leave_one_out_table(result["leave_one_family_out"], "family"),
        "",
        "## Overview (all models)",
        "",
        *overview_table(result),
        "",
        "## Top-10 recall by fault kind (all models)",
        "",
        *by_kind_table(result),
        "",
    ]
    for model in result["models"]:
        name = model.split("@")[0]
        lines += [f"### {name}", "", *by_kind_table(result, name), ""]
    lines += [
        "## Seconds per method",
        "",
        "Each method alone (nothing shared with the others) on the localization inputs of "
        "the clean model, after a warm-up call. Within a trial the methods share their passes "
        "(the spectrum, the ablations, the gradients): each trial's `method_seconds` holds "
        "what each method added.",
        "",
        *seconds_table(result),
        "",
    ]
    if result["skipped"]:
        lines += ["## Skipped trials", ""]
        for s in result["skipped"]:
            lines.append(
                f"- {s['model']} seed {s['model_seed']}, {s['kind']}, window "
                f"{_window(s['drop'])}, {s['count']} fault(s), seed {s['seed']}: {s['skipped']}"
            )
        lines.append("")
    return "\n".join(lines)


def _figure(result: dict):
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from deepfault_jax.localizers import localizer_info

    cfg = result["config"]
    methods = list(cfg["methods"])
    families = [localizer_info(m.split("/")[0]).family for m in methods]
    palette = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(families))}
    windows = [tuple(d) for d in cfg["drops"]]
    rows = _summary(result, ("drop",))
    fig = Figure(figsize=(max(6.0, 0.5 * len(methods)), 2.6 * len(windows) + 1.0), dpi=110,
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(len(windows), 1, squeeze=False)[:, 0]
    for ax, window in zip(axes, windows, strict=True):
        values = [rows[(window, m)]["top10"] if (window, m) in rows else np.nan for m in methods]
        errors = [rows[(window, m)]["top10_std"] if (window, m) in rows else 0.0 for m in methods]
        ax.bar(np.arange(len(methods)), values, yerr=errors, capsize=2,
               color=[palette[f] for f in families])  # fmt: skip
        chance = rows.get((window, "random (expected)"))
        if chance is not None:
            ax.axhline(chance["top10"], color="0.4", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("top-10 recall", fontsize=8)
        n = rows.get((window, methods[0]), {}).get("trials", 0)
        ax.set_title(f"accuracy drop {_window(window)} per fault ({n} trials)", fontsize=9)
    handles = [Patch(color=c, label=f) for f, c in palette.items()]
    handles.append(Patch(color="0.4", label="dashed: random ranking (expected)"))
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=7)
    return fig


def plot_faultbench(result: dict, path: str | os.PathLike) -> Path:
    """Bars: top-10 recall of every method per drop window (all models, kinds and counts),
    coloured by localizer family, ±1 population standard deviation, random as a line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _figure(result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())
