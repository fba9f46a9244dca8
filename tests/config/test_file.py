"""Defaults, a complete file, and the shipped example."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from config import (
    AdminSettings,
    GatewaySettings,
    ListenAddress,
    ListenerSettings,
    PoolSettings,
    Settings,
    StorageSettings,
    Users,
)
from core.endpoints import Endpoint, Scheme, parse_upstream_url
from core.models import Pool, Selector
from tests.config.helpers import WriteFile, load

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "proxygate.toml"

FULL = """
[gateway]
listen = ["127.0.0.1:8899", "[::1]:8899"]
default_pool = "residential"
acquire_timeout = 2
connect_timeout = 3.5
idle_timeout = 60.0
header_timeout = 4.0
drain_timeout = 5.0
users = { alice = "s3cret", "bob.smith" = "hunter2" }
deny_destinations = ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]
connect_ports = [443, 8443, 443]
log_level = "DEBUG"

[storage]
url = "postgresql://app:dbpass@db.internal/proxygate"

[admin]
listen = "localhost:8900"
token = "t0ken"

[[pools]]
name = "residential"
selector = "least_used"
sticky_ttl = 120
retries = 0
max_concurrency = 16
description = "home IPs"
proxies = ["socks5://user:pw@203.0.113.7:1080", "http://198.51.100.2:3128"]
proxies_file = "residential.txt"

[[pools]]
name = "dc.eu_1"

[[listeners]]
listen = "127.0.0.1:24001"
pool = "residential"

[[listeners]]
listen = "127.0.0.1:24002"
"""


def test_no_configuration_gives_a_working_forward_proxy() -> None:
    settings = load()
    assert settings == Settings(
        pools=(PoolSettings("default", upstreams=(Endpoint(Scheme.DIRECT, "", 0),)),)
    )
    assert settings.source == "defaults"
    assert settings.gateway.listen == (ListenAddress("127.0.0.1", 8899),)
    assert settings.gateway.default_pool == "default"
    assert settings.admin.listen == ListenAddress("127.0.0.1", 8900)
    assert settings.admin.token is None
    assert settings.storage.url == "memory://"
    assert settings.pool("default").selector is Selector.ROUND_ROBIN
    assert settings.all_listeners() == (ListenerSettings(ListenAddress("127.0.0.1", 8899)),)


def test_an_empty_file_gives_the_defaults_too(write: WriteFile) -> None:
    path = write("")
    assert load(path) == dataclasses.replace(load(), source=str(path))


def test_full_file(write: WriteFile) -> None:
    write("198.51.100.9:8080\n", "residential.txt")
    settings = load(write(FULL))

    gateway = settings.gateway
    assert gateway == GatewaySettings(
        listen=(ListenAddress("127.0.0.1", 8899), ListenAddress("::1", 8899)),
        default_pool="residential",
        acquire_timeout=2.0,
        connect_timeout=3.5,
        idle_timeout=60.0,
        header_timeout=4.0,
        drain_timeout=5.0,
        users=gateway.users,
        deny_destinations=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("fd00::/8"),
            ipaddress.ip_network("192.0.2.1/32"),
        ),
        connect_ports=frozenset({443, 8443}),
        log_level="debug",
    )
    assert isinstance(gateway.acquire_timeout, float)
    assert dict(gateway.users) == {"alice": "s3cret", "bob.smith": "hunter2"}
    assert settings.storage == StorageSettings("postgresql://app:dbpass@db.internal/proxygate")
    assert settings.admin == AdminSettings(ListenAddress("127.0.0.1", 8900), "t0ken")

    residential, dc = settings.pools
    assert residential == PoolSettings(
        name="residential",
        selector=Selector.LEAST_USED,
        sticky_ttl=120.0,
        retries=0,
        max_concurrency=16,
        description="home IPs",
        upstreams=(
            parse_upstream_url("socks5://user:pw@203.0.113.7:1080"),
            parse_upstream_url("http://198.51.100.2:3128"),
            parse_upstream_url("http://198.51.100.9:8080"),
        ),
    )
    assert dc == PoolSettings("dc.eu_1")
    assert settings.listeners == (
        ListenerSettings(ListenAddress("127.0.0.1", 24001), "residential"),
        ListenerSettings(ListenAddress("127.0.0.1", 24002), None),
    )
    assert [(str(item.listen), item.pool) for item in settings.all_listeners()] == [
        ("127.0.0.1:8899", None),
        ("[::1]:8899", None),
        ("127.0.0.1:24001", "residential"),
        ("127.0.0.1:24002", None),
    ]


def test_settings_are_frozen_and_slotted(write: WriteFile) -> None:
    write("", "residential.txt")
    settings = load(write(FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.gateway.default_pool = "x"  # type: ignore[misc]
    assert not hasattr(settings.gateway, "__dict__")
    with pytest.raises(TypeError):
        settings.gateway.users["eve"] = "x"  # type: ignore[index]
    assert hash(settings.gateway.users) == hash(load(write(FULL)).gateway.users)


def test_secrets_stay_out_of_repr(write: WriteFile) -> None:
    write("http://carol:filepass@198.51.100.9:8080\n", "residential.txt")
    settings = load(write(FULL))
    text = repr(settings) + str(settings)
    for secret in ("s3cret", "hunter2", "dbpass", "t0ken", "pw@", "filepass", "carol"):
        assert secret not in text
    assert "alice" in text
    assert "app:***@db.internal" in text
    assert settings.storage.redacted_url() == "postgresql://app:***@db.internal/proxygate"


def test_users_verify() -> None:
    users = Users({"alice": "s3cret"})
    assert users.verify("alice", "s3cret")
    assert not users.verify("alice", "s3cre")
    assert not users.verify("bob", "s3cret")
    assert not users.verify("bob", "")


def test_pool_settings_make_core_models(write: WriteFile) -> None:
    write("", "residential.txt")
    pool = load(write(FULL)).pool("residential")
    assert pool.to_pool() == Pool(
        "residential",
        selector=Selector.LEAST_USED,
        sticky_ttl=120.0,
        retries=0,
        max_concurrency=16,
        description="home IPs",
    )
    upstreams = pool.to_upstreams()
    assert [u.endpoint for u in upstreams] == list(pool.upstreams)
    assert {u.pool for u in upstreams} == {"residential"}
    assert PoolSettings("x").to_pool() == Pool("x")


def test_the_example_file_loads() -> None:
    settings = load(EXAMPLE)
    assert settings.source == str(EXAMPLE)
    assert settings.gateway.default_pool == "residential"
    assert [pool.name for pool in settings.pools] == ["residential", "direct"]
    # proxies first, then residential.txt next to the example
    assert len(settings.pool("residential").upstreams) == 7
    assert {item.pool for item in settings.listeners} == {"residential", "direct"}


def test_ints_are_accepted_for_floats_and_a_single_listen_string(write: WriteFile) -> None:
    settings = load(write('[gateway]\nlisten = "localhost:0"\nidle_timeout = 7\n'))
    assert settings.gateway.listen == (ListenAddress("127.0.0.1", 0),)
    assert settings.gateway.idle_timeout == 7.0


def test_admin_can_be_disabled_and_port_zero_repeats(write: WriteFile) -> None:
    text = """
        [gateway]
        listen = ["127.0.0.1:0", "127.0.0.1:0"]
        [admin]
        listen = ""
        [[listeners]]
        listen = "127.0.0.1:0"
    """
    settings = load(write(text))
    assert settings.admin.listen is None
    assert len(settings.all_listeners()) == 3


def test_no_pools_with_another_default_pool_name(write: WriteFile) -> None:
    settings = load(write('[gateway]\ndefault_pool = "out"\n'))
    assert settings.pools == (PoolSettings("out", upstreams=(parse_upstream_url("direct://"),)),)


def test_storage_schemes(write: WriteFile) -> None:
    for url in ("memory://", "sqlite:///var/lib/pg.db", "postgresql://u@h/db", "postgres://u@h/db"):
        assert load(write(f'[storage]\nurl = "{url}"\n')).storage.url == url
