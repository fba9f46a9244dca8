"""`python -m loadtest.bench_core --storage URL`, briefly and without pharox: it measures every
case, leaves no database behind, and ends with its summary line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import skip_or_fail
from tests.loadtest.harness import REPO
from tests.storage.scratch import POSTGRES_URL, postgres_unavailable

SUMMARY = re.compile(
    r"sql: proxygate (?P<n>\d+|n/a) pairs/s, pharox (?P<m>\d+|n/a) pairs/s, "
    r"ratio (?P<r>[\d.]+|n/a) \(postgres, 16 tasks\)"
)


def bench(tmp_path: Path, *urls: str) -> tuple[re.Match[str], dict[str, Any]]:
    """Run the SQL section on `urls` with short cases; its summary line and JSON figures."""
    figures = tmp_path / "sql.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "loadtest.bench_core", "--quick", "--no-peer"]
    command += ["--seconds", "0.2", "--json", str(figures)]
    for url in urls:
        command += ["--storage", url]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = SUMMARY.fullmatch(last)
    assert match is not None, last
    return match, json.loads(figures.read_text())


def assert_measured(document: dict[str, Any], kind: str) -> None:
    for tasks in ("1 task", "16 tasks"):
        case = document["figures"][f"proxygate {kind}, {tasks}"]
        assert case["rate"] > 0
        assert case["leases_held_after"] == 0  # every pair counted gave its lease back


def test_the_sqlite_section_measures_both_cases_on_a_temporary_file(tmp_path: Path) -> None:
    before = bench_files()
    match, document = bench(tmp_path, "sqlite:///")
    assert_measured(document, "sqlite")
    # No PostgreSQL, no peer: the summary says so rather than inventing figures.
    assert match.group("n", "m", "r") == ("n/a", "n/a", "n/a")
    assert bench_files() <= before  # each case's file was removed


def bench_files() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("proxygate-bench-*"))


async def test_the_postgres_section_measures_and_drops_its_schemas(tmp_path: Path) -> None:
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    before = await bench_schemas()
    match, document = bench(tmp_path, POSTGRES_URL)
    assert_measured(document, "postgres")
    assert float(match.group("n")) == pytest.approx(
        document["figures"]["proxygate postgres, 16 tasks"]["rate"], abs=1
    )
    assert match.group("m", "r") == ("n/a", "n/a")
    assert await bench_schemas() <= before  # each case's schema was dropped


async def bench_schemas() -> set[str]:
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        rows = await connection.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\\_proxygate\\_%'"
        )
    finally:
        await connection.close()
    return {row["nspname"] for row in rows}
