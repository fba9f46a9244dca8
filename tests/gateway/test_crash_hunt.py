"""The crash hunt's bounded tier: `loadtest.crash_hunt` against the installed (compiled) gateway,
a short run per storage x workers combination, each judged as the long hunt judges it: no
gateway process died of a signal, every lease came back, fds and tasks back to their baseline,
no traceback in its output, exit 0 on SIGTERM (`python -m loadtest crash-hunt` for long hunts).

About 20-30 s per combination on a 2-core machine (PostgreSQL: a private server of its own,
restarted mid-run; SQLite: locked out by another process mid-run). Needs
Debian's tinyproxy and microsocks (the honest upstreams beside the fault injectors) and, for
PostgreSQL, `initdb` (skip, or fail under PROXYGATE_REQUIRE_ALL=1).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loadtest._crash_report import report_lines, totals
from loadtest.crash_hunt import COMBINATIONS, HuntOptions, hunt
from tests.conftest import skip_or_fail
from tests.storage.private_postgres import private_postgres_missing
from tests.support.debian_proxies import require_program

pytestmark = pytest.mark.slow

#: Seconds of load per combination: long enough for the old build's crash (it came within
#: 2 s of load on PostgreSQL with 2 workers) and for two database restarts; short enough that
#: the five combinations stay under 3 minutes.
SECONDS = 12.0


@pytest.mark.parametrize(
    ("storage", "workers"), COMBINATIONS, ids=[f"{s}-x{w}" for s, w in COMBINATIONS]
)
async def test_the_gateway_survives_faults_aborts_and_outages(
    storage: str, workers: int, tmp_path: Path
) -> None:
    require_program("tinyproxy")
    require_program("microsocks")
    if storage == "postgresql" and (reason := private_postgres_missing()):
        skip_or_fail(f"no private PostgreSQL server to restart mid-run: {reason}")
    seed = random.randrange(1 << 32)
    options = HuntOptions(
        seconds=SECONDS,
        combinations=[(storage, workers)],
        seed=seed,
        run_length=SECONDS,
        postgres="private",
        workdir=tmp_path,
        say=lambda _: None,
    )
    results = await hunt(options)
    lines, failed = report_lines(results)
    report = f"seed {seed}, logs under {tmp_path}:" + "\n".join(lines)
    assert not failed, report
    figures = totals(results)
    # The hunt did hunt: load went through, faults were injected, clients walked away.
    assert figures["requests"], report
    assert figures["faults"], report
    assert figures["aborts"], report
    if storage == "sqlite":
        assert figures["db_outages"], report
    if storage == "postgresql":
        assert figures["db_restarts"], report
