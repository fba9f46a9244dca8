"""Draws a loadtest results file as a PNG: `python _chart.py RESULTS.json OUT.png`.

Runs in the harness's own virtualenv (where matplotlib lives), as a plain script: it imports
nothing of the project. Panels: throughput over time for every run; latency percentiles per
run; and, when there is more than one target or variant, the gateway CPU per unit of work
relative to proxygate's first run (or, for scale and storage, the request rate relative to the
first variant). A soak run adds the gateway's RSS over time.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

# Imported by name: matplotlib lives only in the harness's virtualenv, not the project's (and
# so not where mypy looks). The Agg backend draws without a display.
matplotlib: Any = importlib.import_module("matplotlib")
matplotlib.use("Agg")
plt: Any = importlib.import_module("matplotlib.pyplot")


def main(source: str, target: str) -> None:
    with open(source) as handle:
        results = json.load(handle)
    runs = [r for r in results["runs"] if r.get("timeline")]
    scenario = results["scenario"]
    bulk = bool(runs) and runs[0]["unit"] == "cpu-s/GB"
    soak = scenario == "soak" and any(r.get("process_samples") for r in runs)
    panels = 2 + (len(runs) > 1) + soak
    figure, axes = plt.subplots(panels, 1, figsize=(10, 3.4 * panels))
    names = [f"{r['target']} {r['label']} r{r['round']}".replace("  ", " ") for r in runs]

    ax = axes[0]
    for name, run in zip(names, runs, strict=True):
        times = [s["t"] for s in run["timeline"]]
        values = [s["bytes_per_s"] / 1e6 if bulk else s["requests_per_s"] for s in run["timeline"]]
        ax.plot(times, values, label=name)
    ax.set_title(f"{scenario}: throughput over time")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB/s" if bulk else "requests/s")
    ax.legend(fontsize="small")

    ax = axes[1]
    keys = ["p50", "p90", "p99", "p99.9"]
    width = 0.8 / max(1, len(runs))
    for i, (name, run) in enumerate(zip(names, runs, strict=True)):
        values = [run["latency_us"][k] / 1e3 for k in keys]
        ax.bar([k + i * width for k in range(len(keys))], values, width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys)
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("latency percentiles (HDR histogram)")
    ax.legend(fontsize="small")

    next_panel = 2
    if len(runs) > 1:
        ax = axes[next_panel]
        next_panel += 1
        if scenario in ("scale", "storage"):
            base = runs[0]["requests_per_s"] or 1.0
            ratios = [r["requests_per_s"] / base for r in runs]
            ax.set_title("requests/s relative to the first variant")
        else:
            base = next((r["cpu_per_unit"] for r in runs if r["target"] == "proxygate"), None)
            ratios = [
                (r["cpu_per_unit"] / base) if base and r["cpu_per_unit"] else 0.0 for r in runs
            ]
            ax.set_title(f"gateway CPU per unit ({runs[0]['unit']}) relative to proxygate")
        ax.bar(names, ratios)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.tick_params(axis="x", labelrotation=20)
    if soak:
        ax = axes[next_panel]
        for name, run in zip(names, runs, strict=True):
            samples = run.get("process_samples") or []
            rss = [s["rss_bytes"] / 2**20 for s in samples]
            ax.plot([s["t"] for s in samples], rss, label=name)
        ax.set_title("gateway RSS")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
