"""No gateway process outlives its purpose: workers die with their parent however it dies (SIGKILL
included, even while still starting), a worker that crashes stops the others (SIGKILL for one
that ignores SIGTERM), and a stop finishes within drain_timeout + EXIT_GRACE even when a task
swallows every cancellation, the process then naming that task; a second signal does not wait
for the drain. Every port is free afterwards.

The misbehaviour comes from a `sitecustomize` the test writes (`tests.support.processes.hooks`),
loaded into every process of the tree: nothing of the kind is in the product."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from gateway.workers import EXIT_GRACE, STOP_GRACE
from tests.support.processes import (
    Ports,
    RunningGateway,
    all_gone,
    gateway_env,
    gateway_toml,
    hooks,
    port_free,
    proxygate_run,
    sqlite_storage,
)

pytestmark = pytest.mark.slow
#: The drain timeout of these tests' gateways: short, so that every bound below is too.
DRAIN = 1.0
#: What a test allows beyond a bound the gateway sets itself (a busy machine's scheduling).
SLACK = 3.0

#: After start-up, a task that swallows every cancellation; it says so once it runs, which is
#: after the process handles its signals (start-up runs to the first wait in one go).
STUBBORN = """
import asyncio
import sys

from gateway.app import Gateway

_start = Gateway.start
_tasks = set()


async def _stubborn():
    print("hook: stubborn task running", file=sys.stderr, flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # swallowed: this task never ends


async def _start_stubborn(self):
    await _start(self)
    _tasks.add(asyncio.get_running_loop().create_task(_stubborn(), name="stubborn"))


Gateway.start = _start_stubborn
"""

#: Blocks the event loop of worker INDEX for an hour, as TEST_WEDGE="INDEX:start" or
#: "INDEX:serving" says: while it starts (before it handles any signal), or once it serves
#: (its SIGTERM handler then never runs).
WEDGE = """
import os
import sys
import time

from gateway.app import Gateway

_start = Gateway.start
_index, _when = os.environ["TEST_WEDGE"].split(":")


def _wedge():
    print("hook: event loop blocked", file=sys.stderr, flush=True)
    time.sleep(3600)


def _wedged_here():
    if "--worker-of" not in sys.argv:
        return False
    return sys.argv[sys.argv.index("--worker-of") + 1].split(":")[0] == _index


async def _start_wedged(self):
    if _wedged_here() and _when == "start":
        _wedge()
    await _start(self)
    if _wedged_here() and _when == "serving":
        self.loop.call_later(0.2, _wedge)


Gateway.start = _start_wedged
"""


def assert_ports_free(ports: Ports) -> None:
    taken = [port for port in ports.all() if not port_free(port)]
    assert not taken, f"ports still taken: {taken}"


async def serving_workers(gateway: RunningGateway) -> tuple[int, int]:
    first, second = await gateway.workers_serving()
    return first, second


async def test_workers_and_their_ports_do_not_outlive_a_parent_killed_with_sigkill(
    tmp_path: Path,
) -> None:
    ports = Ports.free()
    toml = gateway_toml(await sqlite_storage(tmp_path), ports, drain_timeout=DRAIN)
    async with proxygate_run(tmp_path, toml, "--workers", "2") as gateway:
        workers = await serving_workers(gateway)
        gateway.process.kill()
        await gateway.exit_code()
        assert await all_gone(list(workers), DRAIN + EXIT_GRACE + SLACK), gateway.text()
        assert_ports_free(ports)
        log = gateway.text()
        # The kernel's SIGTERM (PR_SET_PDEATHSIG) and the lifeline's end tell the same.
        assert log.count("the parent's exit received: draining") == 2, log
        assert "Traceback" not in log


async def test_a_worker_still_starting_dies_with_a_parent_killed_with_sigkill(
    tmp_path: Path,
) -> None:
    # Worker 0 blocks in its start-up: no event loop reads the lifeline, no signal handler is
    # installed. Only the kernel's parent-death signal can end it.
    env = gateway_env(TEST_WEDGE="0:start", **hooks(tmp_path / "hooks", WEDGE))
    toml = gateway_toml(await sqlite_storage(tmp_path), Ports.free(), drain_timeout=DRAIN)
    async with proxygate_run(tmp_path, toml, "--workers", "2", env=env) as gateway:
        await gateway.logged("hook: event loop blocked")
        worker = [pid for pid in gateway.pids() if pid != gateway.process.pid]
        assert len(worker) == 1, gateway.text()
        gateway.process.kill()
        await gateway.exit_code()
        assert await all_gone(worker, SLACK), gateway.text()


async def test_a_worker_killed_by_sigsegv_stops_the_others_and_the_parent_exits_1(
    tmp_path: Path,
) -> None:
    ports = Ports.free()
    toml = gateway_toml(await sqlite_storage(tmp_path), ports, drain_timeout=DRAIN)
    async with proxygate_run(tmp_path, toml, "--workers", "2") as gateway:
        first, second = await serving_workers(gateway)
        os.kill(first, signal.SIGSEGV)
        assert await gateway.exit_code(DRAIN + STOP_GRACE + SLACK) == 1
        # The parent reaped both before it exited: nothing of the tree is left, zombies neither.
        assert gateway.pids() == []
        assert await all_gone([first, second], SLACK)
        assert_ports_free(ports)
        log = gateway.text()
        assert "worker 0 exited with -11 (died of SIGSEGV): stopping the others" in log, log
        assert "worker-1 proxygate: SIGTERM received: draining" in log
        assert "worker-1 proxygate: stopped" in log


async def test_a_worker_that_does_not_stop_on_sigterm_is_killed_after_the_grace(
    tmp_path: Path,
) -> None:
    env = gateway_env(TEST_WEDGE="1:serving", **hooks(tmp_path / "hooks", WEDGE))
    ports = Ports.free()
    toml = gateway_toml(await sqlite_storage(tmp_path), ports, drain_timeout=DRAIN)
    async with proxygate_run(tmp_path, toml, "--workers", "2", env=env) as gateway:
        first, second = await serving_workers(gateway)
        await gateway.logged("hook: event loop blocked")
        os.kill(first, signal.SIGSEGV)
        assert await gateway.exit_code(DRAIN + STOP_GRACE + SLACK) == 1
        assert await all_gone([first, second], SLACK)
        assert_ports_free(ports)
        log = gateway.text()
        assert f"worker 1 did not stop in {DRAIN + STOP_GRACE:g}s: killed" in log, log


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_task_that_swallows_cancellation_cannot_hold_the_process(
    tmp_path: Path, workers: int
) -> None:
    env = gateway_env(**hooks(tmp_path / "hooks", STUBBORN))
    ports = Ports.free()
    storage = "memory://" if workers == 1 else await sqlite_storage(tmp_path)
    toml = gateway_toml(storage, ports, drain_timeout=DRAIN)
    async with proxygate_run(tmp_path, toml, "--workers", str(workers), env=env) as gateway:
        await gateway.logged(rf"(?s)(hook: stubborn task running.*){{{workers}}}")
        pids = gateway.pids()
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        gateway.process.send_signal(signal.SIGTERM)
        code = await gateway.exit_code(DRAIN + EXIT_GRACE + SLACK)
        took = loop.time() - signalled
        log = gateway.text()
        assert code == 1, log
        assert took >= DRAIN + EXIT_GRACE, log  # not cut short: only the watchdog ended it
        assert await all_gone(pids, SLACK)
        assert_ports_free(ports)
        held = re.findall(
            rf"ERROR .*not finished {DRAIN + EXIT_GRACE:g}s after SIGTERM: exiting now, "
            r"held by .*stubborn \(_stubborn line \d+",
            log,
        )
        assert len(held) == workers, log
        assert "Traceback" not in log


async def test_a_second_signal_ends_a_single_gateway_at_once(tmp_path: Path) -> None:
    env = gateway_env(**hooks(tmp_path / "hooks", STUBBORN))
    ports = Ports.free()
    toml = gateway_toml("memory://", ports, drain_timeout=60.0)
    async with proxygate_run(tmp_path, toml, env=env) as gateway:
        await gateway.logged("hook: stubborn task running")
        gateway.process.send_signal(signal.SIGTERM)
        await gateway.logged("still running after the stop, cancelled: stubborn")
        gateway.process.send_signal(signal.SIGINT)
        assert await gateway.exit_code(SLACK) == 1  # far below the drain timeout
        assert_ports_free(ports)
        assert re.search(
            r"ERROR .*SIGINT received while draining: exiting now, held by .*stubborn",
            gateway.text(),
        )


async def test_a_second_signal_to_the_parent_kills_the_draining_workers(tmp_path: Path) -> None:
    env = gateway_env(**hooks(tmp_path / "hooks", STUBBORN))
    ports = Ports.free()
    toml = gateway_toml(await sqlite_storage(tmp_path), ports, drain_timeout=60.0)
    async with proxygate_run(tmp_path, toml, "--workers", "2", env=env) as gateway:
        workers = await serving_workers(gateway)
        await gateway.logged("(?s)(hook: stubborn task running.*){2}")
        gateway.process.send_signal(signal.SIGTERM)
        await gateway.logged("(?s)(still running after the stop, cancelled: stubborn.*){2}")
        gateway.process.send_signal(signal.SIGTERM)
        assert await gateway.exit_code(SLACK) == 1  # far below the drain timeout
        assert await all_gone(list(workers), SLACK)
        assert_ports_free(ports)
        assert "SIGTERM received again: killing the workers" in gateway.text()
