"""What a run prints and writes: the live progress line, the final table, the summary line,
the JSON results, and the chart (drawn by `_chart.py` in the harness's virtualenv)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from loadtest.loadgen import Progress
from loadtest.peers import CHART, ensure, isolated_env
from loadtest.runner import TargetRun, aggregate

__all__ = ["ProgressLine", "draw_chart", "summary_line", "table", "write_json"]

CHART_SCRIPT = Path(__file__).resolve().parent / "_chart.py"


class ProgressLine:
    """One line, rewritten in place on a terminal; on a pipe, a line every few seconds."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self._count = 0

    def __call__(self, who: str, p: Progress) -> None:
        if self.quiet:
            return
        self._count += 1
        text = (
            f"[{who}] {p.phase} {p.elapsed:4.0f}/{p.total:.0f}s  {p.rate:9,.0f} req/s  "
            f"{p.bytes_rate / 1e6:8.1f} MB/s  errors {p.errors:,}  in flight {p.in_flight}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + text)
        elif self._count % 5 == 0:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and not self.quiet and self._count:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _per_unit(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} {unit}" if unit == "cpu-s/GB" else f"{value:.1f} {unit}"


def table(runs: Sequence[TargetRun]) -> str:
    head = (
        "target", "round", "req/s", "MB/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
        "errors", "cpu s", "gateway cpu", "peak RSS", "leases acq/rel/leaked",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    for run in runs:
        name = f"{run.target} {run.label}".strip()
        if run.refused or run.failed or run.load is None:
            why = "REFUSED: " + (run.refused or "") if run.refused else f"FAILED: {run.failed}"
            rows.append((name, str(run.round), why))
            continue
        load = run.load
        pct = load.histogram.percentiles((50, 90, 99, 99.9))
        leases = run.leases
        rows.append(
            (
                name,
                str(run.round),
                _num(load.rate),
                _num(load.bytes_rate / 1e6, 1),
                *(f"{pct[k] / 1e6:.2f}" for k in ("p50", "p90", "p99", "p99.9")),
                f"{sum(load.errors.values()):,}",
                _num(run.cpu, 2),
                _per_unit(run.cpu_per_unit, run.unit),
                f"{run.end_sample.hwm / 2**20:.0f} MiB" if run.end_sample else "n/a",
                (
                    f"{leases['acquired']:,}/{leases['released']:,}/{leases['leaked']}"
                    if leases
                    else "-"
                ),
            )
        )
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(r[i]) for r in full) for i in range(len(head))]
    widths[0] = max(widths[0], *(len(r[0]) for r in rows))
    lines = []
    for row in rows:
        if len(row) < len(head):  # a refused or failed run: the reason takes the rest
            lines.append(
                "  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:2])) + "  " + row[2]
            )
            continue
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def errors_text(runs: Sequence[TargetRun]) -> list[str]:
    out = []
    for run in runs:
        if run.load is not None and run.load.errors:
            kinds = ", ".join(f"{k} {n:,}" for k, n in run.load.errors.most_common())
            name = f"{run.target} {run.label}".strip()
            out.append(f"  {name}, round {run.round}: {kinds}")
    return out


def summary_line(scenario: str, runs: Sequence[TargetRun], compare: Sequence[str]) -> str:
    """The run's last line, for scripts."""
    by_target: dict[str, list[TargetRun]] = {}
    for run in runs:
        by_target.setdefault(f"{run.target}\0{run.label}", []).append(run)
    rows = [aggregate(group) for group in by_target.values()]
    unit = runs[0].unit if runs else "us/req"
    ours = next((r for r in rows if r["target"] == "proxygate"), None)

    def fmt(row: dict[str, Any] | None) -> str:
        if row is None or row["cpu_per_unit"] is None:
            return "n/a"
        value = row["cpu_per_unit"]
        return f"{value:.2f}" if unit == "cpu-s/GB" else f"{value:.1f}"

    if scenario in ("storage", "scale"):
        parts = []
        first = rows[0] if rows else None
        for row in rows:
            if row["refused"]:
                parts.append(f"{row['label']} REFUSED")
            elif row["failed"]:
                parts.append(f"{row['label']} FAILED")
            else:
                parts.append(f"{row['label']} {_num(row['requests_per_s'])} req/s")
        last = rows[-1] if rows else None
        ratio = "n/a"
        if first and last and first is not last and first["requests_per_s"]:
            ratio = _num(_div(last["requests_per_s"], first["requests_per_s"]), 2)
        return f"{scenario}: {', '.join(parts)}, ratio {ratio}"
    if compare:
        theirs = next((r for r in rows if r["target"] == "pproxy"), None)
        ratio = "n/a"
        if ours and theirs and ours["cpu_per_unit"] and theirs["cpu_per_unit"]:
            ratio = f"{ours['cpu_per_unit'] / theirs['cpu_per_unit']:.2f}"
        return (
            f"{scenario}: proxygate {fmt(ours)} {unit}, pproxy {fmt(theirs)} {unit}, ratio {ratio}"
        )
    if ours is None:
        return f"{scenario}: no proxygate run"
    return (
        f"{scenario}: proxygate {fmt(ours)} {unit}, {_num(ours['requests_per_s'])} req/s, "
        f"{_num((ours['bytes_per_s'] or 0) / 1e6, 1)} MB/s, leases leaked {ours['leaked']}"
    )


def compare_lines(runs: Sequence[TargetRun]) -> list[str]:
    """Every target against proxygate: CPU per unit, throughput, p99."""
    groups: dict[str, list[TargetRun]] = {}
    for run in runs:
        groups.setdefault(run.target, []).append(run)
    rows = {name: aggregate(group) for name, group in groups.items()}
    ours = rows.get("proxygate")
    if ours is None:
        return []
    out = []
    for name, row in rows.items():
        if name == "proxygate":
            continue
        if row["failed"]:
            out.append(f"  {name}: NOT MEASURED: {row['failed']}")
            continue
        cost = (
            "n/a (not a process of its own)"
            if row["cpu_per_unit"] is None
            else (_per_unit(row["cpu_per_unit"], row["unit"]))
        )
        line = f"  {name}: cpu {cost}"
        if ours["cpu_per_unit"] and row["cpu_per_unit"]:
            line += f" (proxygate/{name} {ours['cpu_per_unit'] / row['cpu_per_unit']:.2f})"
        if ours["requests_per_s"] and row["requests_per_s"]:
            line += (
                f"; throughput proxygate/{name} "
                f"{ours['requests_per_s'] / row['requests_per_s']:.2f} (req/s)"
            )
            if ours["bytes_per_s"] and row["bytes_per_s"] and row["unit"] == "cpu-s/GB":
                line += f", {ours['bytes_per_s'] / row['bytes_per_s']:.2f} (bytes/s)"
        p99_ours, p99_theirs = ours["latency_us"].get("p99"), row["latency_us"].get("p99")
        if p99_ours is not None and p99_theirs is not None:
            line += f"; p99 {p99_ours / 1e3:.2f} ms vs {p99_theirs / 1e3:.2f} ms"
        out.append(line)
    return out


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def draw_chart(results: Path, chart: Path, *, install: bool) -> str:
    """Draw `chart` from the JSON `results`; what happened, in words."""
    python, why = ensure(CHART, install=install)
    if python is None:
        return f"no chart: {why}"
    done = subprocess.run(
        [str(python), str(CHART_SCRIPT), str(results), str(chart)],
        capture_output=True,
        text=True,
        env=isolated_env(),
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        return f"no chart: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return f"chart written to {chart}"


def say(text: str = "") -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
