"""Active checks over real upstreams to a judge on loopback, and `proxygate check`."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from config import load_settings
from core.checks import CheckContext, CheckResult, run_pipeline
from core.models import Outcome, Upstream
from gateway.check_command import run_check
from gateway.checkers import JudgeCheck, judge_answer
from gateway.retry_budget import RetryBudget
from tests.support.fixtures import DebianProxyFactory, FakeHttpProxyFactory
from tests.support.net import closed_port


@pytest.fixture
async def judge() -> AsyncIterator[str]:
    """An httpbin-style judge: the caller's address and the fields it sent, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        headers = {name: value for name, value in request.headers.items()}
        return web.json_response({"origin": request.remote, "headers": headers})

    app = web.Application()
    app.router.add_get("/judge", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/judge"
    await runner.cleanup()


def config(tmp_path: Path, judge: str, *urls: str) -> Path:
    proxies = ", ".join(json.dumps(url) for url in urls)
    path = tmp_path / "check.toml"
    path.write_text(
        f'[checks]\njudge_url = "{judge}"\ntimeout = 2\n'
        f'\n[[pools]]\nname = "default"\nproxies = [{proxies}]\n'
    )
    return path


async def test_check_reports_exit_address_and_anonymity_of_real_proxies(
    tmp_path: Path,
    judge: str,
    microsocks_factory: DebianProxyFactory,
    tinyproxy_factory: DebianProxyFactory,
) -> None:
    socks = await microsocks_factory(egress="127.0.0.21")
    http = await tinyproxy_factory(egress="127.0.0.22")
    settings = load_settings(config(tmp_path, judge, socks.url, http.url))
    out, err = io.StringIO(), io.StringIO()
    assert await run_check(settings, None, as_json=True, out=out, err=err) == 0
    rows = {row["address"]: row for row in json.loads(out.getvalue())}
    socks_row = rows[Upstream.from_url(socks.url, "default").endpoint.redacted()]
    http_row = rows[Upstream.from_url(http.url, "default").endpoint.redacted()]
    assert (socks_row["status"], socks_row["exit_ip"], socks_row["anonymity"]) == (
        "pass",
        "127.0.0.21",
        "elite",
    )
    # The rig's tinyproxy runs with DisableViaHeader: nothing tells the judge of a proxy.
    assert (http_row["status"], http_row["exit_ip"], http_row["anonymity"]) == (
        "pass",
        "127.0.0.22",
        "elite",
    )
    assert socks_row["latency_ms"] > 0
    assert "2/2" in err.getvalue()


async def test_check_names_the_failing_stage_and_exits_1(
    tmp_path: Path, judge: str, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    good = await fake_http_proxy_factory()
    rejecting = await fake_http_proxy_factory()
    rejecting.faults.connect_status = 403
    dead = f"socks5://127.0.0.1:{closed_port()}"
    settings = load_settings(config(tmp_path, judge, good.url, rejecting.url, dead))
    out, err = io.StringIO(), io.StringIO()
    assert await run_check(settings, "default", as_json=False, out=out, err=err) == 1
    table = out.getvalue()
    lines = {line.split()[0]: line for line in table.splitlines() if line.startswith("up-")}
    assert "pass" in lines[Upstream.from_url(good.url, "default").id]
    dead_line = lines[Upstream.from_url(dead, "default").id]
    assert "fail" in dead_line
    assert "tcp_connect" in dead_line
    assert "connection refused" in dead_line
    assert "handshake" in lines[Upstream.from_url(rejecting.url, "default").id]
    assert "1 of 3 upstreams passed" in table


@pytest.mark.parametrize(
    ("added", "anonymity"),
    [
        ((("X-Forwarded-For", "127.0.0.1"),), "transparent"),
        ((("Via", "1.1 squid"),), "anonymous"),
        ((), "elite"),
    ],
)
async def test_anonymity_follows_the_fields_the_judge_saw(
    judge: str,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    added: tuple[tuple[str, str], ...],
    anonymity: str,
) -> None:
    proxy = await fake_http_proxy_factory()
    proxy.added_headers = added
    upstream = Upstream.from_url(proxy.url, "p")
    checkers = [JudgeCheck(judge, 2.0, None)]
    report = await run_pipeline(checkers, upstream, CheckContext("127.0.0.1"))
    assert report.passed
    assert (report.context.exit_ip, report.context.anonymity) == (proxy.egress, anonymity)


async def test_in_connect_mode_the_judge_is_asked_through_a_tunnel_as_traffic_goes(
    tmp_path: Path, judge: str, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxy = await fake_http_proxy_factory()
    path = config(tmp_path, judge, proxy.url)
    path.write_text('[gateway]\nhttp_upstream_mode = "connect"\n' + path.read_text())
    out, err = io.StringIO(), io.StringIO()
    assert await run_check(load_settings(path), None, as_json=True, out=out, err=err) == 0
    assert json.loads(out.getvalue())[0]["exit_ip"] == proxy.egress
    # The handshake stage's CONNECT, then the judge's own: no absolute-form request.
    assert [r.method for r in proxy.requests] == ["CONNECT", "CONNECT"]
    # The judge stage alone, built both ways: absolute form by default, else a tunnel.
    both = [JudgeCheck(judge, 2.0, None), JudgeCheck(judge, 2.0, None, http_tunnels=True)]
    for checker in both:
        report = await run_pipeline([checker], Upstream.from_url(proxy.url, "p"), CheckContext())
        assert report.passed
    assert [r.method for r in proxy.requests[2:]] == ["GET", "CONNECT"]


async def test_the_cli_runs_check_and_prints_json(
    tmp_path: Path, judge: str, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    good = await fake_http_proxy_factory()
    path = config(tmp_path, judge, good.url)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "check",
        "--config",
        str(path),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    (row,) = json.loads(stdout)
    assert (row["status"], row["exit_ip"]) == ("pass", good.egress)
    command = ["-m", "gateway", "check", "--config", str(path), "--pool", "nope"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert b"no pool is named 'nope'" in stderr


# -- the pipeline itself --------------------------------------------------------------------


class _Stub:
    def __init__(self, name: str, stage: int, result: CheckResult, delay: float = 0.0) -> None:
        self.name, self.stage, self.priority, self.timeout = name, stage, 0, 0.5
        self.result, self.delay, self.ran = result, delay, False

    def should_skip(self, upstream: Upstream) -> bool:
        return self.name.startswith("skip")

    async def check(self, upstream: Upstream, context: CheckContext) -> CheckResult:
        self.ran = True
        context.extra[self.name] = self.stage
        await asyncio.sleep(self.delay)
        return self.result


async def test_the_first_failing_stage_stops_the_pipeline() -> None:
    ok = CheckResult.ok(0.01)
    first = _Stub("a", 0, ok)
    skipped = _Stub("skip", 0, CheckResult.failed(Outcome.PROXY_ERROR, "never"))
    slow = _Stub("slow", 1, ok, delay=5)
    failing = _Stub("b", 1, CheckResult.failed(Outcome.CONNECT_REFUSED, "no"))
    later = _Stub("c", 2, ok)
    upstream = Upstream.from_url("http://127.0.0.1:1", "p")
    report = await run_pipeline([later, failing, slow, skipped, first], upstream)
    assert not report.passed
    # One stage runs at once; its results keep priority, then the given order.
    assert [name for name, _ in report.results] == ["a", "b", "slow"]
    assert report.results[2][1].outcome is Outcome.CONNECT_TIMEOUT  # cut off at 0.5 s
    assert report.failure == ("b", report.results[1][1])
    assert (skipped.ran, later.ran) == (False, False)


def test_judge_answers_in_both_styles() -> None:
    body = b'{"origin": "10.1.2.3", "headers": {"Via": "1.1 x"}}'
    assert judge_answer(body) == ("10.1.2.3", {"via": "1.1 x"})
    text = b"REMOTE_ADDR = 10.9.8.7\nHTTP_X_FORWARDED_FOR = 1.2.3.4\nHTTP_HOST = judge\n"
    assert judge_answer(text) == ("10.9.8.7", {"x-forwarded-for": "1.2.3.4", "host": "judge"})
    assert judge_answer(b"nothing useful")[0] is None


def test_retry_budget_allows_a_share_of_active_requests_and_a_floor() -> None:
    budget = RetryBudget(percent=20, minimum=3)
    for _ in range(30):
        budget.request_started("p")
    granted = sum(budget.try_retry("p") for _ in range(10))
    assert granted == 6  # 20% of 30
    budget.retry_ended("p")
    assert budget.try_retry("p")
    small = RetryBudget(percent=20, minimum=3)
    small.request_started("q")
    assert sum(small.try_retry("q") for _ in range(5)) == 3
    assert (small.denied, small.peak) == (2, 3)
