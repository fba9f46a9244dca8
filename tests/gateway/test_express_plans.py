"""What `gateway.express` plans, and what it leaves to the general path (None)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import express as express_module
from gateway.app import Gateway
from gateway.context import Routed
from gateway.express import ExpressPlans, split_request_line
from gateway.protocols import Headers
from tests.gateway.conftest import StartGateway

USERS = '[gateway]\nlisten = ["127.0.0.1:0"]\nusers = { alice = "s3cret" }\n'
# alice:s3cret and alice-pool-other:s3cret
ALICE = b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway(USERS + '\n[[pools]]\nname = "default"\nproxies = ["direct://"]\n')


def plans_of(gateway: Gateway) -> ExpressPlans:
    return gateway.context.express


@pytest.mark.parametrize(
    "fields",
    [
        b"Host: a\r\nContent-Length: 5\r\n\r\n",
        b"Host: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"Host: a\r\nExpect: 100-continue\r\n\r\n",
        b"Host: a\r\nX-Proxy-Session: s1\r\n\r\n",
        b"Host: a\r\nHost: b\r\n\r\n",
        b"Host: a\r\nBad Name: x\r\n\r\n",
        b"Host: a\r\n\r\n",  # no credentials where users are set: 407 on the general path
        b"Host: a\r\nProxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n\r\n",
    ],
)
async def test_requests_the_general_path_must_judge_get_no_plan(
    gateway: Gateway, fields: bytes
) -> None:
    express = plans_of(gateway)
    plans = express.requests_for(None)
    assert express.plan_request(plans, fields, None) is None
    assert plans[fields] is None  # remembered: the next one goes straight to the general path


async def test_a_plain_request_gets_its_fields_route_and_lease_request(gateway: Gateway) -> None:
    express = plans_of(gateway)
    plans = express.requests_for(None)
    fields = b"Host: a\r\nAccept: */*\r\n" + ALICE + b"X-Proxy-Country: AR\r\nVia: 1.0 x\r\n\r\n"
    plan = express.plan_request(plans, fields, None)
    assert plan is not None
    assert plan.fields == b"Accept: */*\r\nVia: 1.0 x\r\n"
    assert plan.pool == "default"
    assert plan.routed.route.consumer == "alice"
    assert plan.routed.route.country == "AR"
    assert plan.keep_alive
    closing = fields.replace(b"Accept", b"Connection: close\r\nAccept")
    closing_plan = express.plan_request(plans, closing, None)
    assert closing_plan is not None
    assert not closing_plan.keep_alive
    assert closing_plan.fields == plan.fields


async def test_a_target_refused_by_policy_gets_no_plan(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\ndeny_destinations = ["10.0.0.0/8"]\n'
    )
    express = plans_of(gateway)
    assert express.plan_target(b"10.1.2.3:8080") is None
    assert b"10.1.2.3:8080" not in express.targets
    target = express.plan_target(b"example.test:80")
    assert target is not None
    assert (target.host, target.port, target.host_field) == (
        "example.test",
        80,
        b"Host: example.test\r\n",
    )
    assert express.plan_target(b"example.test:99999") is None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # read until the close
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_answers_that_need_judging_get_no_plan(gateway: Gateway, head: bytes) -> None:
    express = plans_of(gateway)
    assert express.plan_response(head) is None
    assert express.responses[head] is None


async def test_a_plain_answer_is_passed_on_without_hop_by_hop_fields(gateway: Gateway) -> None:
    express = plans_of(gateway)
    plan = express.plan_response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n"
    )
    assert plan is not None
    assert (plan.length, plan.keep_alive) == (12, False)
    via = gateway.context.via
    assert plan.head == b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Kept: yes\r\nVia: " + (
        via + b"\r\n\r\n"
    )
    no_content = express.plan_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n")
    assert no_content is not None
    assert (no_content.length, no_content.keep_alive) == (0, True)


async def test_the_caches_stay_bounded(gateway: Gateway) -> None:
    express = plans_of(gateway)
    for n in range(3000):
        express.plan_response(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
    assert 0 < len(express.responses) <= 1024
    # Long heads are planned as well, and not kept.
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Big: " + b"x" * 8000 + b"\r\n\r\n"
    plan = express.plan_response(big)
    assert plan is not None
    assert plan.length == 1
    assert big not in express.responses
    plans = express.requests_for(None)
    fields = b"Host: a\r\n" + ALICE + b"X-Big: " + b"y" * 8000 + b"\r\n\r\n"
    assert express.plan_request(plans, fields, None) is not None
    assert fields not in plans


#: The request lines the plans serve, as a pattern (groups: method, target, authority, path),
#: to check `split_request_line` against: HTTP/1.1, a method whose bodiless requests may be sent
#: again, an `http://name[:port]` target of RFC 3986 characters.
SERVED_LINE = re.compile(
    rb"(GET|OPTIONS|TRACE|PUT|DELETE) "
    rb"([Hh][Tt][Tt][Pp]://"
    rb"((?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?(?::[1-9][0-9]{0,4})?)"
    rb"([/?][A-Za-z0-9\-._~:/?@!$&'()*+,;=%]*)?) HTTP/1\.1"
)


#: Both ways `split_request_line` can be (the module uses one, compiled or not).
SPLITS = [express_module._split_by_searching, express_module._split_by_scanning]


def served(
    express: ExpressPlans, line: bytes, split: Callable[[bytes, int], tuple[int, int]]
) -> tuple[bytes, bytes, bytes] | None:
    """The method, authority and path the lane carries a request with this line on, or None
    (the general path)."""
    method_end, authority_end = split(line + b"\r\n", len(line))
    if authority_end < 0:
        return None
    authority = line[method_end + 8 : authority_end]
    if express.plan_target(authority) is None:
        return None
    return line[:method_end], authority, line[authority_end : len(line) - 9]


@pytest.mark.parametrize(
    ("line", "carried"),
    [
        (b"GET http://a.example:8080/x?y=1 HTTP/1.1", True),
        (b"DELETE http://a/ HTTP/1.1", True),
        (b"GET http://a HTTP/1.1", True),
        (b"GET http://a?q HTTP/1.1", True),
        (b"HEAD http://a/ HTTP/1.1", False),  # no body whatever the answer says
        (b"POST http://a/ HTTP/1.1", False),
        (b"GET http://a/ HTTP/1.0", False),
        (b"GET http://user@a/ HTTP/1.1", False),
        (b"GET http://[::1]:80/ HTTP/1.1", False),
        (b"GET https://a/ HTTP/1.1", False),
        (b"GET HTTP://a/ HTTP/1.1", True),
        (b"GET /a HTTP/1.1", False),
        (b"GET http://a/#frag HTTP/1.1", False),
        (b"GET http://a/b c HTTP/1.1", False),
        (b"GET  http://a/ HTTP/1.1", False),
        (b"GET http:// HTTP/1.1", False),
        (b"GET http://a:0/ HTTP/1.1", False),
        (b"GET http://a:99999/ HTTP/1.1", False),
    ],
)
@pytest.mark.parametrize("split", SPLITS)
def test_the_request_lines_plans_serve(
    gateway: Gateway, line: bytes, carried: bool, split: Callable[[bytes, int], tuple[int, int]]
) -> None:
    assert (served(plans_of(gateway), line, split) is not None) is carried


def test_the_module_splits_one_of_the_two_ways() -> None:
    assert split_request_line in SPLITS


_LINE_PIECES = st.sampled_from(
    [
        *(b"GET ", b"PUT ", b"HEAD ", b"http://", b"hTTp://", b"HTTP/1.1", b" ", b"a", b"b."),
        *(b":80", b":0", b"/", b"?", b"#", b"%", b"@", b"[", b"\xff", b"\t", b"x-y_z~", b"1"),
    ]
)


def never_routed(headers: Headers, pool: str | None) -> Routed:
    raise AssertionError("no header fields are planned here")


@pytest.mark.parametrize("split", SPLITS)
@given(pieces=st.lists(_LINE_PIECES, max_size=12))
def test_split_request_line_serves_what_the_pattern_matches(
    split: Callable[[bytes, int], tuple[int, int]], pieces: list[bytes]
) -> None:
    line = b"".join(pieces)
    express = ExpressPlans(never_routed, lambda host, port: None, b"x")
    match = SERVED_LINE.fullmatch(line)
    expected = None if match is None else (match[1], match[3], match[4] or b"")
    assert served(express, line, split) == expected
