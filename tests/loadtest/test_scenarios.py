"""A short smoke run of every scenario: the report's structure and the zero-leak check."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import asyncpg
import pytest

from loadtest.peers import PEERS, installed
from tests.conftest import skip_or_fail
from tests.loadtest.harness import SHORT, assert_no_leak, assert_run_record, run_loadtest
from tests.storage.scratch import POSTGRES_URL, postgres_unavailable
from tests.support.debian_proxies import require_program

NUMBER = r"[\d,]+(?:\.\d+)?"


@pytest.mark.parametrize(
    ("scenario", "extra", "unit"),
    [
        ("http-keepalive", ["-c", "4"], "us/req"),
        ("http-newconn", ["-c", "4"], "us/req"),
        ("connect-throughput", ["-c", "2", "--body-size", "1048576"], "cpu-s/GB"),
        ("socks5", ["-c", "2", "--body-size", "1048576"], "cpu-s/GB"),
    ],
)
def test_scenario_reports_and_leaks_nothing(
    tmp_path: Path, scenario: str, extra: list[str], unit: str
) -> None:
    outcome = run_loadtest(tmp_path, scenario, *SHORT, *extra)
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert outcome.results is not None
    assert outcome.results["scenario"] == scenario
    assert outcome.results["exit_code"] == 0
    (run,) = outcome.proxygate_runs()
    assert_run_record(run)
    assert run["unit"] == unit
    assert run["requests_total"] > 0
    assert_no_leak(outcome)
    assert re.fullmatch(
        rf"{scenario}: proxygate ({NUMBER}|n/a) {re.escape(unit)}, {NUMBER} req/s, {NUMBER} MB/s, "
        r"leases leaked 0",
        outcome.last_line,
    ), outcome.last_line
    assert outcome.results["summary_line"] == outcome.last_line


def test_sticky_sessions_stay_on_one_upstream(tmp_path: Path) -> None:
    # A short session TTL: the zero-leak check waits for idle sessions to give their leases back.
    outcome = run_loadtest(
        tmp_path, "sticky", *SHORT, "-c", "4", "--sessions", "10", "--sticky-ttl", "0.3"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    assert_run_record(run)
    assert run["sticky"]["sessions"] == 10
    assert run["sticky"]["moved"] == 0
    assert run["leases"]["acquired"] == 10  # one lease per session
    assert_no_leak(outcome)


def test_soak_samples_the_gateway(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path, "soak", *SHORT[4:], "--duration", "1.5", "--warmup", "0.2", "-c", "2"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    assert_run_record(run)
    assert_no_leak(outcome)
    assert run["process_samples"], run.keys()
    assert {"rss_bytes", "fds", "threads"} <= set(run["process_samples"][0])
    assert any("tasks" in sample for sample in run["process_samples"])
    assert "soak: RSS" in outcome.stdout
    assert "asyncio tasks " in outcome.stdout


def test_idle_tunnels_are_held_counted_and_given_back(tmp_path: Path) -> None:
    # Held a whole second: the gateway's tasks are counted twice a second.
    outcome = run_loadtest(
        tmp_path, "idle-tunnels", *SHORT[4:], "--tunnels", "50", "--duration", "1",
        "--warmup", "0.2", "-c", "8",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    figures = run["idle_tunnels"]
    assert figures["tunnels_asked"] == figures["tunnels_open"] == 50
    assert figures["errors"] == {}
    assert figures["closed_while_idle"] == 0
    assert figures["leases_held_open"] == 50
    before, held, closed = figures["before"], figures["open"], figures["closed"]
    assert held["fds"] - before["fds"] >= 100  # a client and an upstream connection each
    assert held["tasks"] - before["tasks"] >= 50
    assert closed["fds"] <= before["fds"]
    assert figures["rss_per_tunnel_kib"] is not None
    assert figures["gateway_idle_timeout"] > 600
    assert run["process_samples"]
    assert_no_leak(outcome)
    assert "proxygate with them open:" in outcome.stdout
    assert re.fullmatch(
        rf"idle-tunnels: proxygate -?{NUMBER} KiB/tunnel \(50 tunnels\), fds \d+ -> \d+, "
        r"leases held 50, leases leaked 0",
        outcome.last_line,
    ), outcome.last_line
    assert outcome.results is not None
    assert outcome.results["summary_line"] == outcome.last_line


def test_idle_tunnels_say_when_the_open_files_limit_is_too_low(tmp_path: Path) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    # 300 files: the harness and the origin hold 150 tunnels, the fleet is spread over two
    # processes, but the gateway would need two files a tunnel and its own.
    outcome = run_loadtest(
        tmp_path, "idle-tunnels", *SHORT[4:], "--tunnels", "150", "--duration", "0.2",
        "--warmup", "0.2", open_files=300,
    )  # fmt: skip
    assert outcome.code == 1, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    assert run["idle_tunnels"]["fleet_processes"] == 2
    assert "tunnels_open" not in run["idle_tunnels"]
    assert re.search(
        r"150 tunnels need [\d,]+ open files in proxygate, which may have 300 \(the hard limit "
        r"here.*at most \d+ tunnels fit",
        outcome.stdout,
    ), outcome.stdout
    assert run["leases"]["leaked"] == 0
    assert outcome.last_line.startswith("idle-tunnels: proxygate n/a KiB/tunnel (0 tunnels)")
    outcome = run_loadtest(tmp_path, "idle-tunnels", *SHORT[4:], "--tunnels", "400", open_files=300)
    assert outcome.code == 1, outcome.stdout + outcome.stderr
    assert "in the harness and in the origin's process, which may have 300" in outcome.stdout


def test_idle_tunnels_take_no_request_load(tmp_path: Path) -> None:
    outcome = run_loadtest(tmp_path, "idle-tunnels", *SHORT, "--rate", "10")
    assert outcome.code == 2
    assert "--rate" in outcome.stderr
    outcome = run_loadtest(tmp_path, "http-keepalive", *SHORT, "--tunnels", "10")
    assert outcome.code == 2
    assert "--tunnels is for the idle-tunnels scenario" in outcome.stderr


def test_storage_urls_are_for_the_storage_scenario(tmp_path: Path) -> None:
    outcome = run_loadtest(tmp_path, "faults", *SHORT, "--storage", "sqlite:///")
    assert outcome.code == 2
    assert "--storage is for the storage scenario" in outcome.stderr


def test_faults_follow_the_schedule_and_leak_nothing(tmp_path: Path) -> None:
    # The default schedule over a short run; requests to the blackholed upstream give up at 1 s.
    outcome = run_loadtest(
        tmp_path, "faults", *SHORT[4:], "--duration", "1.5", "--warmup", "0.2", "--timeout", "1"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert outcome.results is not None
    assert any("down" in step for step in outcome.results["faults"])
    (run,) = outcome.proxygate_runs()
    assert_run_record(run)
    assert_no_leak(outcome)


def test_custom_fault_steps(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path,
        "http-keepalive",
        *SHORT,
        "-c",
        "4",
        "--fault",
        "0:0:down",
        "--fault",
        "0.3:1:reset_peer=0",
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert outcome.results is not None
    assert outcome.results["faults"] == ["0s upstreams 0: down", "0.3s upstreams 1: reset_peer=0"]
    assert_no_leak(outcome)


def test_a_bad_fault_is_a_usage_error(tmp_path: Path) -> None:
    outcome = run_loadtest(tmp_path, "http-keepalive", *SHORT, "--fault", "1:9:down")
    assert outcome.code == 2
    assert "out of range" in outcome.stderr


def test_storage_runs_memory_and_reports_a_refused_storage(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path,
        "storage",
        *SHORT,
        "-c",
        "4",
        "--storage",
        "memory://",
        "--storage",
        "nosuch://anywhere",
    )
    assert outcome.code == 3, outcome.stdout + outcome.stderr
    memory, refused = outcome.proxygate_runs()
    assert memory["label"] == "memory://"
    assert_run_record(memory)
    assert memory["leases"]["leaked"] == 0
    assert refused["label"] == "nosuch://anywhere"
    assert refused["refused"]
    assert "REFUSED" in outcome.stdout
    assert outcome.last_line.startswith("storage: memory:// ")
    assert "nosuch://anywhere REFUSED" in outcome.last_line


def test_scale_runs_each_pool_size(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path, "scale", *SHORT, "-c", "4", "--pool-sizes", "4,200", "--rounds", "2"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    runs = outcome.proxygate_runs()
    assert [run["label"] for run in runs] == ["pool 4", "pool 200"] * 2  # sizes alternate
    # Pool size is all that changes: no kept upstream connections, no active checks.
    assert "new upstream connection per request" in outcome.stdout
    for run in runs:
        assert_run_record(run)
    assert_no_leak(outcome)
    assert re.fullmatch(
        rf"scale: pool 4 {NUMBER} req/s, pool 200 {NUMBER} req/s, ratio {NUMBER}",
        outcome.last_line,
    ), outcome.last_line


def test_upstream_keepalive_can_be_set(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path, "scale", *SHORT, "-c", "2", "--pool-sizes", "4", "--upstream-keepalive", "8"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert "keeps up to 8 connections per upstream" in outcome.stdout


def test_plain_http_can_go_through_http_upstreams_in_tunnels(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path, "http-keepalive", *SHORT, "-c", "2", "--http-upstream-mode", "connect"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert "plain HTTP through HTTP upstreams in kept CONNECT tunnels" in outcome.stdout
    assert_no_leak(outcome)


def test_open_loop_at_a_fixed_rate(tmp_path: Path) -> None:
    outcome = run_loadtest(tmp_path, "http-keepalive", *SHORT, "--rate", "200", "-c", "8")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    assert_run_record(run)
    assert_no_leak(outcome)


def test_tls_through_tunnels(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: the origin has no TLS port")
    outcome = run_loadtest(
        tmp_path, "connect-throughput", *SHORT, "-c", "2", "--tls", "--body-size", "65536"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    assert run["errors"] == {}
    assert run["requests_total"] > 0


def test_compare_with_direct_needs_no_peer(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path, "http-keepalive", *SHORT, "-c", "4", "--compare", "direct", "--rounds", "1"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert outcome.results is not None
    targets = [run["target"] for run in outcome.results["runs"]]
    assert targets == ["proxygate", "direct"]
    # No pproxy in this run: its half of the line says so.
    assert re.fullmatch(
        rf"http-keepalive: proxygate {NUMBER} us/req, pproxy n/a us/req, ratio n/a",
        outcome.last_line,
    ), outcome.last_line


def test_compare_with_the_relay_floor_needs_no_peer(tmp_path: Path) -> None:
    outcome = run_loadtest(
        tmp_path, "http-keepalive", *SHORT, "-c", "4", "--compare", "floor", "--rounds", "1"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert outcome.results is not None
    assert [run["target"] for run in outcome.results["runs"]] == ["proxygate", "floor"]
    floor = outcome.results["runs"][1]
    assert_run_record(floor)
    assert floor["errors"] == {}
    assert floor["cpu_seconds"] is not None
    assert "floor: cpu" in outcome.stdout


@pytest.mark.parametrize("peer", ["pproxy", "proxy.py"])
def test_compare_with_a_peer(tmp_path: Path, peer: str) -> None:
    if not installed(PEERS[peer]):
        pytest.skip(
            f"{peer} is not installed in loadtest/.bench-venv (the suite never installs it; "
            f"`python -m loadtest http-keepalive --compare {peer}` does)"
        )
    outcome = run_loadtest(
        tmp_path, "http-keepalive", *SHORT, "-c", "4", "--compare", peer, "--rounds", "1"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert outcome.results is not None
    assert [run["target"] for run in outcome.results["runs"]] == ["proxygate", peer]
    theirs = outcome.results["runs"][1]
    assert_run_record(theirs)
    assert theirs["cpu_seconds"] is not None
    if peer == "pproxy":
        assert re.fullmatch(
            rf"http-keepalive: proxygate {NUMBER} us/req, pproxy {NUMBER} us/req, ratio {NUMBER}",
            outcome.last_line,
        ), outcome.last_line


def test_a_missing_peer_is_reported_not_installed(tmp_path: Path) -> None:
    if installed(PEERS["proxy.py"]):
        pytest.skip("proxy.py is installed here: nothing to report missing")
    outcome = run_loadtest(
        tmp_path, "http-keepalive", *SHORT, "-c", "2", "--compare", "proxy.py", "--rounds", "1"
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert "NOT MEASURED proxy.py" in outcome.stdout
    assert re.fullmatch(
        rf"http-keepalive: proxygate {NUMBER} us/req, pproxy n/a us/req, ratio n/a",
        outcome.last_line,
    ), outcome.last_line


def test_debian_fleet(tmp_path: Path) -> None:
    for program in ("microsocks", "tinyproxy"):
        if shutil.which(program) is None:
            skip_or_fail(f"{program} is not installed (apt-get install {program})")
    outcome = run_loadtest(tmp_path, "socks5", *SHORT, "-c", "2", "--fleet", "debian")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert_no_leak(outcome)
    outcome = run_loadtest(tmp_path, "http-newconn", *SHORT, "-c", "2", "--fleet", "debian")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert_no_leak(outcome)


def test_nginx_origin(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed: the harness's own origin serves instead")
    outcome = run_loadtest(tmp_path, "http-keepalive", *SHORT, "-c", "2", "--origin", "nginx")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    (run,) = outcome.proxygate_runs()
    assert run["errors"] == {}
    assert_no_leak(outcome)


@pytest.mark.parametrize("url", ["sqlite:///", POSTGRES_URL])
def test_storage_runs_an_sql_storage_on_a_fresh_schema_and_cleans_up(
    tmp_path: Path, url: str
) -> None:
    postgres = url.startswith("postgres")
    if postgres and (reason := asyncio.run(postgres_unavailable())) is not None:
        skip_or_fail(reason)
    before = _loadtest_schemas() if postgres else set()
    outcome = run_loadtest(
        tmp_path, "storage", *SHORT, "-c", "4", "--storage", "memory://", "--storage", url
    )
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    runs = outcome.proxygate_runs()
    assert [run["label"] for run in runs] == ["memory://", url]
    for run in runs:
        assert_run_record(run)
        assert run["leases"]["leaked"] == 0
    if postgres:
        assert _loadtest_schemas() == before  # the run's own schema is gone again


def _loadtest_schemas() -> set[str]:
    async def names() -> set[str]:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await connection.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'loadtest_%'"
            )
        finally:
            await connection.close()
        return {row["nspname"] for row in rows}

    return asyncio.run(names())


@pytest.mark.parametrize("scenario", ["http-keepalive", "http-newconn"])
def test_wrk_makes_the_load(tmp_path: Path, scenario: str) -> None:
    require_program("wrk")
    outcome = run_loadtest(tmp_path, scenario, *SHORT, "-c", "4", "--loadgen", "wrk")
    assert outcome.code == 0, outcome.stdout + outcome.stderr
    assert "load from wrk" in outcome.stdout
    (run,) = outcome.proxygate_runs()
    assert_run_record(run)
    assert run["requests"] > 0
    assert run["histogram_ns"]["count"] >= run["requests"]  # every answer has its latency
    assert_no_leak(outcome)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["socks5"], "--loadgen wrk serves http-keepalive and http-newconn, not socks5"),
        (["http-keepalive", "--rate", "100"], "--loadgen wrk takes no --rate"),
        (["sticky"], "not sticky"),
    ],
)
def test_wrk_refuses_what_it_cannot_do(tmp_path: Path, args: list[str], message: str) -> None:
    outcome = run_loadtest(tmp_path, *args, *SHORT, "--loadgen", "wrk")
    assert outcome.code == 2, outcome.stdout + outcome.stderr
    assert message in outcome.stderr
