"""Runs `python -m loadtest` as users do, in a subprocess, and reads its JSON results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: Short, small runs: the smoke tests check structure and the zero-leak check, never timings.
SHORT = ["--duration", "0.5", "--warmup", "0.1", "--quiet", "--no-pin", "--no-install"]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    results: dict[str, Any] | None

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def proxygate_runs(self) -> list[dict[str, Any]]:
        assert self.results is not None, self.stdout + self.stderr
        return [run for run in self.results["runs"] if run["target"] == "proxygate"]


def run_loadtest(
    tmp_path: Path, *args: str, timeout: float = 90.0, open_files: int | None = None
) -> Outcome:
    """`open_files` lowers the run's limit of open files (soft and hard) to that."""
    results = tmp_path / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "loadtest", *args, "--json", str(results)]
    if open_files is not None:
        # prlimit(1) runs the command with the limit: no code runs between fork and exec here.
        command = ["prlimit", f"--nofile={open_files}:{open_files}", *command]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        check=False,
    )
    document = json.loads(results.read_text()) if results.exists() else None
    return Outcome(done.returncode, done.stdout, done.stderr, document)


def assert_run_record(run: dict[str, Any]) -> None:
    """The structure every measured run reports (values are not judged: no timings)."""
    for key in (
        "requests",
        "requests_per_s",
        "bytes",
        "bytes_per_s",
        "latency_us",
        "errors",
        "cpu_seconds",
        "cpu_per_unit",
        "unit",
        "timeline",
        "histogram_ns",
    ):
        assert key in run, f"{key} missing from {sorted(run)}"
    assert set(run["latency_us"]) >= {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert run["unit"] in ("us/req", "cpu-s/GB")
    assert isinstance(run["errors"], dict)


def assert_no_leak(outcome: Outcome) -> None:
    runs = outcome.proxygate_runs()
    assert runs, outcome.stdout + outcome.stderr
    for run in runs:
        leases = run["leases"]
        assert leases is not None, run
        assert leases["leaked"] == 0
        assert leases["held_after_drain"] == 0
        assert leases["acquired"] == leases["released"]
        assert run["exit_code"] == 0
    assert "zero-leak check passed" in outcome.stdout
