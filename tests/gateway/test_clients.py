"""Real clients through the gateway: the `curl` command (`-x`, `-p`, `--socks5-hostname`) and
the `requests` library configured the HTTP_PROXY way."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import shutil
from types import ModuleType

import pytest

from gateway.app import Gateway
from tests.conftest import skip_or_fail
from tests.gateway.conftest import StartGateway, proxy_url
from tests.support.fixtures import FakeHttpProxyFactory, FakeSocks5ProxyFactory
from tests.support.origin import Origin, TlsMaterial, pattern
from tests.support.proxying import pool_toml

#: Proxy settings of the environment must not steer (or bypass) the clients under test.
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}


# -- curl -----------------------------------------------------------------------------------------


@pytest.fixture
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        skip_or_fail("the curl command is not installed")
    assert path is not None
    return path


async def run_curl(curl: str, *args: str) -> tuple[int, bytes]:
    """Run curl; (HTTP status, body). Fails on any curl error."""
    process = await asyncio.create_subprocess_exec(
        curl,
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--write-out",
        "\n%{http_code}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode(errors="replace")
    body, _, code = out.rpartition(b"\n")
    return int(code), body


def gateway_address(gateway: Gateway) -> str:
    host, port = gateway.listen_addresses[0]
    return f"{host}:{port}"


async def test_curl_plain_http_through_x(
    start_gateway: StartGateway,
    origin: Origin,
    curl: str,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    upstream = await fake_http_proxy_factory()
    gateway = await start_gateway(pool_toml(upstream.url))
    status, body = await run_curl(curl, "-x", proxy_url(gateway), origin.url_for("/echo?c=1"))
    assert status == 200
    echo = json.loads(body)
    assert (echo["peer"], echo["path"]) == (upstream.egress, "/echo?c=1")
    assert upstream.requests[-1].method == "GET"
    # A body with Expect: 100-continue, as curl sends it for large uploads.
    upload = pattern(200_000)
    process = await asyncio.create_subprocess_exec(
        curl,
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "-x",
        proxy_url(gateway),
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "@-",
        origin.url_for("/upload"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(upload), 15)
    assert process.returncode == 0, err
    assert json.loads(out) == {"sha256": hashlib.sha256(upload).hexdigest(), "length": len(upload)}


async def test_curl_tunnels_with_p(
    start_gateway: StartGateway,
    origin: Origin,
    curl: str,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    upstream = await fake_http_proxy_factory()
    gateway = await start_gateway(pool_toml(upstream.url))
    status, body = await run_curl(
        curl, "-p", "-x", proxy_url(gateway), origin.url_for("/bytes/100000")
    )
    assert status == 200
    assert body == pattern(100_000)
    assert upstream.requests[-1].method == "CONNECT"
    assert upstream.requests[-1].target == f"{origin.host}:{origin.port}"


async def test_curl_https_through_the_gateway(
    start_gateway: StartGateway, tls_origin: Origin, tls_material: TlsMaterial, curl: str
) -> None:
    gateway = await start_gateway()
    status, body = await run_curl(
        curl,
        "--cacert",
        str(tls_material.ca_path),
        "-x",
        proxy_url(gateway),
        tls_origin.url_for("/echo"),
    )
    assert status == 200
    assert json.loads(body)["path"] == "/echo"


async def test_curl_socks5_hostname_lets_the_upstream_resolve(
    start_gateway: StartGateway,
    origin: Origin,
    curl: str,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    upstream = await fake_socks5_proxy_factory()
    gateway = await start_gateway(pool_toml(upstream.url))
    url = f"http://localhost:{origin.port}/echo?s=5"
    status, body = await run_curl(curl, "--socks5-hostname", gateway_address(gateway), url)
    assert status == 200
    assert json.loads(body)["peer"] == upstream.egress
    request = upstream.requests[-1]
    assert (request.host, request.port, request.atyp) == ("localhost", origin.port, 3)


async def test_curl_with_proxy_credentials(
    start_gateway: StartGateway,
    origin: Origin,
    curl: str,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    a, b = await fake_http_proxy_factory(), await fake_http_proxy_factory()
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nusers = { alice = "pw" }\ndefault_pool = "pa"\n'
        + pool_toml(a.url, name="pa")
        + pool_toml(b.url, name="pb")
    )
    status, _ = await run_curl(curl, "-x", proxy_url(gateway), origin.url_for("/echo"))
    assert status == 407
    for option in ("-x", "--socks5-hostname"):
        proxy = proxy_url(gateway) if option == "-x" else gateway_address(gateway)
        status, body = await run_curl(
            curl, option, proxy, "--proxy-user", "alice-pool-pb:pw", origin.url_for("/echo")
        )
        assert status == 200, option
        assert json.loads(body)["peer"] == b.egress


# -- requests -------------------------------------------------------------------------------------


@pytest.fixture
def requests_module() -> ModuleType:
    try:
        return importlib.import_module("requests")
    except ImportError:
        skip_or_fail("the requests library is not installed")
        raise


async def test_requests_with_http_proxy_settings(
    start_gateway: StartGateway,
    origin: Origin,
    tls_origin: Origin,
    tls_material: TlsMaterial,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    requests_module: ModuleType,
) -> None:
    upstreams = [await fake_http_proxy_factory() for _ in range(2)]
    gateway = await start_gateway(pool_toml(*(u.url for u in upstreams)))
    proxy = proxy_url(gateway)
    upload = pattern(300_000)

    def client() -> tuple[list[str], object, str, list[str]]:
        with requests_module.Session() as session:
            session.trust_env = False  # only the settings below, not the environment's
            session.proxies = {"http": proxy, "https": proxy}
            peers = [session.get(origin.url_for("/echo"), timeout=10).json()["peer"] for _ in "ab"]
            uploaded = session.post(origin.url_for("/upload"), data=upload, timeout=10).json()
            secure = session.get(
                tls_origin.url_for("/echo"), verify=str(tls_material.ca_path), timeout=10
            )
            sticky = [
                session.get(
                    origin.url_for("/echo"),
                    proxies={"http": proxy_url(gateway, auth="bob-session-r1:x@")},
                    timeout=10,
                ).json()["peer"]
                for _ in "abc"
            ]
            return peers, uploaded, secure.json()["path"], sticky

    peers, uploaded, secure_path, sticky = await asyncio.to_thread(client)
    assert sorted(peers) == sorted(str(u.egress) for u in upstreams)
    assert uploaded == {"sha256": hashlib.sha256(upload).hexdigest(), "length": len(upload)}
    assert secure_path == "/echo"
    assert len(set(sticky)) == 1
    assert any(r.method == "CONNECT" for u in upstreams for r in u.requests)
