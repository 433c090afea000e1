"""A RESULTS.md section (Markdown, absolute figures) from the JSON files that
``benchmarks/gpu.sh`` writes: spectrum, synthesis, attribution and scale throughput.

    python benchmarks/gpu_section.py benchmarks/gpu-results > section.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rate(impl: dict | None) -> str:
    return f"{impl['samples_per_second']:,.0f}" if impl else "-"


def section(folder: Path) -> str:
    spectrum = json.loads((folder / "spectrum.json").read_text())
    synthesis = json.loads((folder / "synthesis.json").read_text())
    attribution = json.loads((folder / "attribution.json").read_text())
    devices = (folder / "devices.txt").read_text().strip()
    lines = [
        f"## Accelerator run (`benchmarks/gpu.sh`, backend {spectrum['backend']})",
        "",
        f"Devices: {devices}. JAX {spectrum['jax']}. Date: {spectrum['date']}. "
        "Samples per second, median of the timed passes after a warm-up "
        "(first pass, compilation included, in the JSON files).",
        "",
        "Spectrum (`benchmarks/spectrum.py`):",
        "",
        "| model | batch | limit | forward | ours | ours / limit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in spectrum["results"]:
        i = r["impls"]
        lines.append(f"| `{r['model']}` | {r['batch_size']} | {_rate(i.get('limit'))} | "
                     f"{_rate(i.get('forward'))} | {_rate(i.get('ours'))} | "
                     f"{r['ratios'].get('ours/limit', float('nan')):.2f} |")  # fmt: skip
    lines += [
        "",
        "Attribution (`benchmarks/attribution.py`):",
        "",
        "| model | counts | attribution | exact ablation | attribution / limit |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in attribution["results"]:
        i = r["impls"]
        lines.append(f"| `{r['model']}` | {_rate(i.get('counts'))} | "
                     f"{_rate(i.get('attribution'))} | {_rate(i.get('ablation'))} | "
                     f"{r['ratios'].get('attribution/limit', float('nan')):.2f} |")  # fmt: skip
    lines += [
        "",
        "Synthesis (`benchmarks/synthesis.py`), inputs per second:",
        "",
        "| model | mode | steps | ours | the original's way, jitted |",
        "|---|---|---:|---:|---:|",
    ]
    for r in synthesis["results"]:
        jit = r.get("original_jit_inputs_per_second")
        lines.append(f"| `{r['model']}` | {r['mode']} | {r['steps']} | "
                     f"{r['ours_inputs_per_second']:,.0f} | "
                     f"{f'{jit:,.0f}' if jit else '-'} |")  # fmt: skip
    scale_file = folder / "scale.json"
    if scale_file.exists():
        scale = json.loads(scale_file.read_text())
        lines += [
            "",
            "Scale (`benchmarks/scale.py`), inputs per second:",
            "",
            "| model | classes | neurons | limit | spectrum | attribution | spectrum / limit | attribution / limit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in scale.get("classes", []):
            lines.append(f"| `{r['model']}` | {r['classes']} | {r['neurons']} | "
                         f"{r['limit']['inputs_per_s']:,.0f} | {r['spectrum']['inputs_per_s']:,.0f} | "
                         f"{r['attribution']['inputs_per_s']:,.0f} | {r['spectrum_vs_limit']:.2f} | "
                         f"{r['attribution_vs_limit']:.2f} |")  # fmt: skip
        stream = scale.get("stream")
        if stream:
            lines += ["", "Streamed array_record (mlp-3x50, 8x8x1): " + "; ".join(
                f"{r['rows']:,} rows {r['us_per_input']:.2f} us/input, peak RSS "
                f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" for r in stream["rows"]) + "."]  # fmt: skip
    skipped = {**spectrum.get("skipped_peers", {}), **synthesis.get("skipped_peers", {})}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/gpu_section.py RESULTS_DIR")
    print(section(Path(sys.argv[1])), end="")
