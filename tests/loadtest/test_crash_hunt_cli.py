"""`python -m loadtest crash-hunt`: its options, and how it reads a gateway's output (the runs
themselves: tests/gateway/test_crash_hunt.py)."""

from __future__ import annotations

import pytest

from loadtest import cli
from loadtest._crash_gateway import log_problems, signal_deaths
from loadtest.crash_hunt import combinations


def test_memory_takes_one_worker_and_the_order_is_fixed() -> None:
    assert combinations(["postgresql", "memory", "sqlite"], [2, 1]) == [
        ("memory", 1),
        ("sqlite", 1),
        ("sqlite", 2),
        ("postgresql", 1),
        ("postgresql", 2),
    ]
    assert combinations(["memory"], [2]) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--storages", "memory", "--workers", "2"],
        ["--storages", "oracle"],
        ["--workers", "two"],
        ["--duration", "0"],
    ],
)
def test_nothing_to_run_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["crash-hunt", *argv]) == 2
    assert "crash-hunt:" in capsys.readouterr().err


def test_a_worker_killed_by_a_signal_is_a_crash() -> None:
    log = (
        "Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n"
        "2026-01-01 ERROR proxygate.workers: worker 1 exited with -11 (died of SIGSEGV): "
        "stopping the others\n"
    )
    assert signal_deaths(log, 1) == ["worker 1 killed by signal 11"]
    assert signal_deaths("worker 0 exited with 1: stopping the others", 1) == []
    assert signal_deaths("", -6) == ["the gateway (parent) killed by signal 6"]
    assert signal_deaths("Fatal Python error: Aborted\n", 0) == ["Fatal Python error in the output"]


def test_tracebacks_are_counted_once_per_kind_with_the_first_in_full() -> None:
    log = "\n".join(
        [
            "INFO fine",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in f',
            "ValueError: no",
            "Traceback (most recent call last):",
            "Task exception was never retrieved",
        ]
    )
    found = log_problems(log)
    assert len(found) == 2
    assert found[0].startswith("2 x 'Traceback'")
    assert "ValueError: no" in found[0]
    assert found[1].startswith("1 x 'Task exception was never retrieved'")
    assert log_problems("INFO all well\n") == []
