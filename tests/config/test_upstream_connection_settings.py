"""Settings of kept upstream connections, of how plain HTTP goes through HTTP upstreams, and
of the response timeout."""

from __future__ import annotations

import pytest

from config import HttpUpstreamMode
from tests.config.helpers import WriteFile, assert_message, config_error, load


def test_defaults() -> None:
    gateway = load().gateway
    assert gateway.response_timeout == 30.0
    assert (
        gateway.keepalive_max_idle,
        gateway.keepalive_max_idle_total,
        gateway.keepalive_idle_timeout,
        gateway.keepalive_max_uses,
    ) == (32, 256, 15.0, 1000)
    assert gateway.http_upstream_mode is HttpUpstreamMode.FORWARD


def test_every_key_is_read_from_the_file_and_the_environment(write: WriteFile) -> None:
    path = write(
        "[gateway]\nresponse_timeout = 5\nkeepalive_max_idle = 0\nkeepalive_idle_timeout = 2.5\n"
        "keepalive_max_idle_total = 9\n"
    )
    gateway = load(path, env={"PROXYGATE_GATEWAY__KEEPALIVE_MAX_USES": "7"}).gateway
    assert (gateway.response_timeout, gateway.keepalive_max_idle) == (5.0, 0)
    assert (gateway.keepalive_idle_timeout, gateway.keepalive_max_uses) == (2.5, 7)
    assert gateway.keepalive_max_idle_total == 9


def test_http_upstream_mode_is_read_from_the_file_and_the_environment(write: WriteFile) -> None:
    path = write('[gateway]\nhttp_upstream_mode = "connect"\n')
    assert load(path).gateway.http_upstream_mode is HttpUpstreamMode.CONNECT
    env = {"PROXYGATE_GATEWAY__HTTP_UPSTREAM_MODE": "forward"}
    assert load(path, env=env).gateway.http_upstream_mode is HttpUpstreamMode.FORWARD


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ("response_timeout = 0", "response_timeout", "greater than 0"),
        ("keepalive_max_idle = -1", "keepalive_max_idle", "at least 0"),
        ('keepalive_idle_timeout = "soon"', "keepalive_idle_timeout", "number of seconds"),
        ("keepalive_max_uses = 0", "keepalive_max_uses", "at least 1"),
        ('http_upstream_mode = "tunnel"', "http_upstream_mode", "not one of forward, connect"),
    ],
)
def test_bad_values_name_file_key_and_reason(
    write: WriteFile, line: str, key: str, reason: str
) -> None:
    path = write(f"[gateway]\n{line}\n")
    assert_message(config_error(path), str(path), f"gateway.{key}", reason)
