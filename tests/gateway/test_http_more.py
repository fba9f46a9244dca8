"""HTTP/1.1 proxy details over raw sockets: pipelining, HTTP/1.0, 100-continue, bodiless
responses, chunked bodies both ways, origin errors passed through, and CONNECT specifics."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from tests.gateway.conftest import StartGateway, leases_held
from tests.support.fixtures import FakeHttpProxyFactory, FakeSocks5ProxyFactory
from tests.support.net import TcpServer
from tests.support.origin import EchoServer, Origin, pattern, pattern_sha256, trailer
from tests.support.proxying import pool_toml
from tests.support.raw_http import (
    TIMEOUT,
    authority,
    closed_by_peer,
    echo_of,
    raw_connection,
    read_head,
    read_response,
    request,
    stays_open,
)

# -- helpers ------------------------------------------------------------------------------------


class ScriptedOrigin(TcpServer):
    """An origin that answers every request head with the same raw bytes, whatever they say."""

    def __init__(self, answer: bytes) -> None:
        super().__init__("127.0.0.1")
        self.answer = answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer)
            await writer.drain()


# -- plain requests ---------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(
            request("GET", origin.url_for("/echo?n=1"), headers=[("Host", authority(origin))])
            + request("GET", origin.url_for("/bytes/3000"), headers=[("Host", authority(origin))])
            + request("GET", origin.url_for("/echo?n=3"), headers=[("Host", authority(origin))])
        )
        first = await read_response(reader)
        second = await read_response(reader)
        third = await read_response(reader)
        assert echo_of(first)["path"] == "/echo?n=1"
        assert second.body == pattern(3000)
        assert echo_of(third)["path"] == "/echo?n=3"
        assert await stays_open(reader)
    assert [r.path for r in origin.requests] == ["/echo?n=1", "/bytes/3000", "/echo?n=3"]


async def test_http10_without_keep_alive_is_answered_then_closed(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("GET", origin.url_for("/echo"), version="1.0"))
        response = await read_response(reader)
        assert echo_of(response)["path"] == "/echo"
        assert response.framing == "length"
        assert (response.header("Connection") or "").lower() == "close"
        assert await closed_by_peer(reader)


async def test_http10_with_keep_alive_stays_open(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for n in (1, 2):
            writer.write(
                request(
                    "GET",
                    origin.url_for(f"/echo?n={n}"),
                    version="1.0",
                    headers=[("Connection", "keep-alive")],
                )
            )
            response = await read_response(reader)
            assert echo_of(response)["path"] == f"/echo?n={n}"
            assert (response.header("Connection") or "").lower() == "keep-alive"
        assert await stays_open(reader)


@pytest.mark.parametrize("via", ["direct", "http", "socks5"])
async def test_expect_100_continue_gets_the_interim_then_the_final_response(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    via: str,
) -> None:
    if via == "direct":
        gateway = await start_gateway()
    else:
        factory = fake_http_proxy_factory if via == "http" else fake_socks5_proxy_factory
        gateway = await start_gateway(pool_toml((await factory()).url))
    body = pattern(50_000)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(
            request(
                "POST",
                origin.url_for("/upload"),
                headers=[
                    ("Host", authority(origin)),
                    ("Content-Length", str(len(body))),
                    ("Expect", "100-continue"),
                ],
            )
        )
        interim = await read_response(reader, method="POST")
        assert (interim.status, interim.body) == (100, b"")
        writer.write(body)
        final = await read_response(reader, method="POST")
        assert final.status == 200
        assert json.loads(final.body) == {
            "sha256": hashlib.sha256(body).hexdigest(),
            "length": len(body),
        }


async def test_head_has_a_length_but_no_body_and_the_connection_carries_on(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("HEAD", origin.url_for("/bytes/4096")))
        head = await read_response(reader, method="HEAD")
        assert head.status == 200
        assert head.header("Content-Length") == "4096"
        assert head.header("X-Body-Sha256") == pattern_sha256(4096)
        # Were any body byte sent after the head, it would be read as the next status line.
        writer.write(request("GET", origin.url_for("/echo?after=head")))
        assert echo_of(await read_response(reader))["path"] == "/echo?after=head"


async def test_a_head_response_declaring_chunked_gets_no_body(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    # A HEAD response carries the fields a GET would: here Transfer-Encoding, and no body.
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with (
        ScriptedOrigin(answer) as head,
        raw_connection(gateway.listen_addresses[0]) as (reader, writer),
    ):
        writer.write(request("HEAD", f"http://127.0.0.1:{head.port}/x"))
        response = await read_response(reader, method="HEAD")
        assert response.status == 200
        # The connection carries on: the next bytes must be the next response's status line.
        writer.write(request("GET", origin.url_for("/echo?after=head")))
        assert echo_of(await read_response(reader))["path"] == "/echo?after=head"


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses_pass_and_the_connection_carries_on(
    start_gateway: StartGateway, origin: Origin, code: int
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("GET", origin.url_for(f"/status/{code}")))
        response = await read_response(reader)
        assert response.status == code
        assert not response.has("Transfer-Encoding")
        assert not response.has("Proxy-Status")
        writer.write(request("GET", origin.url_for(f"/echo?after={code}")))
        assert echo_of(await read_response(reader))["path"] == f"/echo?after={code}"


async def test_a_chunked_request_body_reaches_the_origin_whole(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    pieces = [pattern(1), pattern(70_000), b"tail" * 1000, pattern(5)]
    body = b"".join(pieces)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(
            request(
                "POST",
                origin.url_for("/upload"),
                headers=[("Host", authority(origin)), ("Transfer-Encoding", "chunked")],
            )
        )
        for piece in pieces:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        response = await read_response(reader, method="POST")
        assert response.status == 200
        assert json.loads(response.body) == {
            "sha256": hashlib.sha256(body).hexdigest(),
            "length": len(body),
        }
        assert await stays_open(reader)


@pytest.mark.parametrize(
    ("version", "framing"), [("1.1", "chunked"), ("1.0", "close")], ids=["http11", "http10"]
)
async def test_a_response_without_length_is_rechunked_or_close_delimited(
    start_gateway: StartGateway, origin: Origin, version: str, framing: str
) -> None:
    gateway = await start_gateway()
    size = 300_001
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("GET", origin.url_for(f"/bytes/{size}?chunked=1"), version=version))
        response = await read_response(reader)
        assert response.status == 200
        assert response.framing == framing
        assert not response.has("Content-Length")
        assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)
        if version == "1.0":
            assert (response.header("Connection") or "").lower() == "close"
        else:
            writer.write(request("GET", origin.url_for("/echo?after=chunked")))
            assert echo_of(await read_response(reader))["path"] == "/echo?after=chunked"


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_origin_errors_pass_through_unchanged(
    start_gateway: StartGateway, origin: Origin, code: int
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("GET", origin.url_for(f"/status/{code}")))
        response = await read_response(reader)
        assert response.status == code
        assert response.body == f"status {code}\n".encode()
        assert not response.has("Proxy-Status")
        assert "proxygate" in (response.header("Via") or "")


# -- CONNECT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["direct", "http", "socks5"])
async def test_bytes_pipelined_after_the_connect_head_reach_the_target(
    start_gateway: StartGateway,
    echo_server: EchoServer,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    via: str,
) -> None:
    if via == "direct":
        gateway = await start_gateway()
    else:
        factory = fake_http_proxy_factory if via == "http" else fake_socks5_proxy_factory
        gateway = await start_gateway(pool_toml((await factory()).url))
    target = authority(echo_server)
    early = b"early bytes, sent before the 200 was read\n"
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("CONNECT", target, headers=[("Host", target)]) + early)
        _, status, _, _ = await read_head(reader)
        assert status == 200
        assert await asyncio.wait_for(reader.readexactly(len(early)), TIMEOUT) == early
        writer.write(b"later")
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert rest == b"later" + trailer(len(early) + 5)


async def test_connect_to_an_ipv6_literal(start_gateway: StartGateway) -> None:
    try:
        echo = await EchoServer("::1").start()
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    try:
        gateway = await start_gateway()
        target = authority(echo)
        assert target.startswith("[::1]:")
        async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
            writer.write(request("CONNECT", target, headers=[("Host", target)]))
            _, status, _, _ = await read_head(reader)
            assert status == 200
            writer.write(b"six")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"six" + trailer(3)
        assert echo.peers == ["::1"]
    finally:
        await echo.close()


async def test_connect_ports_policy_refuses_other_ports_with_403(
    start_gateway: StartGateway, echo_server: EchoServer, origin: Origin
) -> None:
    allowed = echo_server.port
    gateway = await start_gateway(
        f'[gateway]\nlisten = ["127.0.0.1:0"]\nconnect_ports = [443, {allowed}]\n'
    )
    address = gateway.listen_addresses[0]
    async with raw_connection(address) as (reader, writer):
        writer.write(request("CONNECT", authority(origin), headers=[("Host", "x")]))
        denied = await read_response(reader)
        assert denied.status == 403
        assert (denied.header("Proxy-Status") or "").startswith(
            "proxygate; error=destination_ip_prohibited"
        )
        assert f"port {origin.port}".encode() in denied.body
        assert await closed_by_peer(reader)
    async with raw_connection(address) as (reader, writer):
        writer.write(request("CONNECT", authority(echo_server), headers=[("Host", "x")]))
        assert (await read_head(reader))[1] == 200
        writer.write(b"ok")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"ok" + trailer(2)
    # The policy is for tunnels: plain requests to other ports still go.
    async with raw_connection(address) as (reader, writer):
        writer.write(request("GET", origin.url_for("/echo")))
        assert echo_of(await read_response(reader))["path"] == "/echo"
    # SOCKS5 is held to the same ports: "connection not allowed by ruleset".
    with pytest.raises(ProxyError) as caught:
        await Proxy.from_url(f"socks5://{address[0]}:{address[1]}").connect(
            origin.host, origin.port, timeout=TIMEOUT
        )
    assert caught.value.error_code == 0x02
    assert await leases_held(gateway) == 0
