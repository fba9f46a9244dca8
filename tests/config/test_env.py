"""PROXYGATE_<SECTION>__<KEY> and PROXYGATE_POOLS__<NAME>__<KEY> over the file."""

from __future__ import annotations

import ipaddress

import pytest

from config import ListenAddress, Overrides
from core.endpoints import parse_upstream_url
from core.models import Selector
from tests.config.helpers import WriteFile, assert_message, config_error, load

POOLS = """
[[pools]]
name = "Residential"
proxies = ["http://198.51.100.1:3128"]

[[pools]]
name = "default"
"""


def test_scalar_overrides_of_every_section() -> None:
    settings = load(
        env={
            "PROXYGATE_GATEWAY__ACQUIRE_TIMEOUT": "2.5",
            "PROXYGATE_GATEWAY__IDLE_TIMEOUT": "30",
            "PROXYGATE_GATEWAY__LOG_LEVEL": "warning",
            "PROXYGATE_STORAGE__URL": "sqlite:///x.db",
            "PROXYGATE_ADMIN__TOKEN": "123456",
            "PROXYGATE_ADMIN__LISTEN": "[::1]:9000",
        }
    )
    assert settings.gateway.acquire_timeout == 2.5
    assert settings.gateway.idle_timeout == 30.0
    assert settings.gateway.log_level == "warning"
    assert settings.storage.url == "sqlite:///x.db"
    # A string key keeps the text even when it reads as a TOML number.
    assert settings.admin.token == "123456"
    assert settings.admin.listen == ListenAddress("::1", 9000)


def test_quoted_toml_strings_are_unquoted() -> None:
    settings = load(env={"PROXYGATE_ADMIN__TOKEN": '"a b"'})
    assert settings.admin.token == "a b"


def test_env_overrides_the_file(write: WriteFile) -> None:
    path = write('[gateway]\nacquire_timeout = 9.0\nlog_level = "error"\n')
    settings = load(path, env={"PROXYGATE_GATEWAY__ACQUIRE_TIMEOUT": "1"})
    assert settings.gateway.acquire_timeout == 1.0
    assert settings.gateway.log_level == "error"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["127.0.0.1:1", "[::1]:2"]', ("127.0.0.1:1", "[::1]:2")),
        ("127.0.0.1:1, [::1]:2", ("127.0.0.1:1", "[::1]:2")),
        ("localhost:3", ("127.0.0.1:3",)),
    ],
)
def test_list_values_as_toml_or_comma_separated(value: str, expected: tuple[str, ...]) -> None:
    settings = load(env={"PROXYGATE_GATEWAY__LISTEN": value})
    assert tuple(str(address) for address in settings.gateway.listen) == expected


def test_int_and_cidr_lists() -> None:
    settings = load(
        env={
            "PROXYGATE_GATEWAY__CONNECT_PORTS": "443,8443",
            "PROXYGATE_GATEWAY__DENY_DESTINATIONS": '["10.0.0.0/8", "::1"]',
        }
    )
    assert settings.gateway.connect_ports == frozenset({443, 8443})
    assert settings.gateway.deny_destinations == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


def test_an_empty_list_value_clears_the_list(write: WriteFile) -> None:
    path = write("[gateway]\nconnect_ports = [443]\n")
    settings = load(path, env={"PROXYGATE_GATEWAY__CONNECT_PORTS": ""})
    assert settings.gateway.connect_ports == frozenset()


def test_users_as_an_inline_table() -> None:
    env = {"PROXYGATE_GATEWAY__USERS": '{alice = "x", bob = "y"}'}
    assert dict(load(env=env).gateway.users) == {"alice": "x", "bob": "y"}


def test_pool_overrides_match_the_name_ignoring_case(write: WriteFile) -> None:
    env = {
        "PROXYGATE_POOLS__RESIDENTIAL__RETRIES": "5",
        "PROXYGATE_POOLS__residential__SELECTOR": "random",
        "PROXYGATE_POOLS__DEFAULT__PROXIES": "socks5://10.0.0.1:1080,10.0.0.2:3128",
        "PROXYGATE_POOLS__DEFAULT__MAX_CONCURRENCY": "4",
    }
    settings = load(write(POOLS), env=env)
    residential = settings.pool("Residential")
    assert (residential.retries, residential.selector) == (5, Selector.RANDOM)
    assert residential.upstreams == (parse_upstream_url("http://198.51.100.1:3128"),)
    default = settings.pool("default")
    assert default.max_concurrency == 4
    assert default.upstreams == (
        parse_upstream_url("socks5://10.0.0.1:1080"),
        parse_upstream_url("http://10.0.0.2:3128"),
    )


def test_pool_names_with_double_underscores(write: WriteFile) -> None:
    path = write('[[pools]]\nname = "a__b"\n[[pools]]\nname = "default"\n')
    settings = load(path, env={"PROXYGATE_POOLS__A__B__RETRIES": "7"})
    assert settings.pool("a__b").retries == 7


def test_env_proxies_file_is_relative_to_the_working_directory(
    write: WriteFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    list_file = write("10.0.0.3:80\n", "list.txt")
    monkeypatch.chdir(list_file.parent)
    config = write(POOLS)
    settings = load(config, env={"PROXYGATE_POOLS__DEFAULT__PROXIES_FILE": "list.txt"})
    assert settings.pool("default").upstreams == (parse_upstream_url("http://10.0.0.3:80"),)


def test_other_variables_are_ignored() -> None:
    env = {"PROXYGATE_REQUIRE_ALL": "1", "PATH": "/bin", "OTHER__X": "y"}
    assert load(env=env) == load()


def test_unknown_key_names_the_variable_and_suggests() -> None:
    error = config_error(env={"PROXYGATE_GATEWAY__ACQUIRE_TIMOUT": "1"})
    assert_message(
        error,
        "environment variable PROXYGATE_GATEWAY__ACQUIRE_TIMOUT",
        "gateway.acquire_timout",
        "unknown key",
        "did you mean PROXYGATE_GATEWAY__ACQUIRE_TIMEOUT?",
    )


def test_unknown_section() -> None:
    error = config_error(env={"PROXYGATE_GATEWY__LISTEN": "127.0.0.1:1"})
    assert_message(
        error,
        "environment variable PROXYGATE_GATEWY__LISTEN",
        None,
        "unknown section",
        "PROXYGATE_GATEWAY__",
    )
    error = config_error(env={"PROXYGATE_LISTENERS__LISTEN": "127.0.0.1:1"})
    assert "the environment sets keys of gateway, storage, admin and pools" in str(error)


def test_unknown_pool(write: WriteFile) -> None:
    error = config_error(write(POOLS), env={"PROXYGATE_POOLS__NOPE__RETRIES": "1"})
    assert_message(
        error,
        "environment variable PROXYGATE_POOLS__NOPE__RETRIES",
        "pools",
        "no pool is named 'NOPE'",
        "'Residential', 'default'",
    )


def test_unknown_pool_key_and_name_is_not_settable(write: WriteFile) -> None:
    error = config_error(write(POOLS), env={"PROXYGATE_POOLS__DEFAULT__RETRYS": "1"})
    assert_message(
        error,
        "environment variable PROXYGATE_POOLS__DEFAULT__RETRYS",
        "pools[1].retrys",
        "unknown key (did you mean PROXYGATE_POOLS__DEFAULT__RETRIES?)",
    )
    error = config_error(write(POOLS), env={"PROXYGATE_POOLS__DEFAULT__NAME": "x"})
    assert error.reason.startswith("unknown key")


def test_malformed_pool_variable() -> None:
    error = config_error(env={"PROXYGATE_POOLS__RETRIES": "1"})
    assert_message(
        error,
        "environment variable PROXYGATE_POOLS__RETRIES",
        None,
        "expected PROXYGATE_POOLS__<NAME>__<KEY>",
    )


def test_bad_value_names_the_variable(write: WriteFile) -> None:
    error = config_error(env={"PROXYGATE_GATEWAY__ACQUIRE_TIMEOUT": "soon"})
    assert_message(
        error,
        "environment variable PROXYGATE_GATEWAY__ACQUIRE_TIMEOUT",
        "gateway.acquire_timeout",
        "expected a number of seconds, got a string",
    )
    error = config_error(write(POOLS), env={"PROXYGATE_POOLS__DEFAULT__RETRIES": "-1"})
    assert_message(
        error,
        "environment variable PROXYGATE_POOLS__DEFAULT__RETRIES",
        "pools[1].retries",
        "must be at least 0, got -1",
    )
    error = config_error(env={"PROXYGATE_GATEWAY__CONNECT_PORTS": "443,https"})
    assert_message(
        error,
        "environment variable PROXYGATE_GATEWAY__CONNECT_PORTS",
        "gateway.connect_ports[1]",
        "expected an integer, got a string",
    )


def test_the_same_key_twice_is_an_error(write: WriteFile) -> None:
    env = {"PROXYGATE_POOLS__DEFAULT__RETRIES": "1", "PROXYGATE_POOLS__default__RETRIES": "2"}
    error = config_error(write(POOLS), env=env)
    assert_message(
        error,
        "environment variable PROXYGATE_POOLS__default__RETRIES",
        "pools[1].retries",
        "PROXYGATE_POOLS__DEFAULT__RETRIES sets it too",
    )


def test_env_values_that_are_secrets_are_not_echoed() -> None:
    error = config_error(env={"PROXYGATE_GATEWAY__USERS": "alice:hunter2"})
    assert_message(
        error,
        "environment variable PROXYGATE_GATEWAY__USERS",
        "gateway.users",
        "expected a table of user = password, got a string",
    )
    assert "hunter2" not in str(error)


def test_pool_variables_tune_the_implicit_default_pool() -> None:
    env = {
        "PROXYGATE_GATEWAY__DEFAULT_POOL": "out",
        "PROXYGATE_POOLS__OUT__MAX_CONCURRENCY": "8",
    }
    settings = load(env=env)
    assert [pool.name for pool in settings.pools] == ["out"]
    assert settings.pool("out").max_concurrency == 8
    assert settings.pool("out").upstreams == (parse_upstream_url("direct://"),)


def test_pool_variables_and_upstream_flags_without_a_file() -> None:
    env = {"PROXYGATE_POOLS__DEFAULT__SELECTOR": "least_used"}
    settings = load(env=env, overrides=Overrides(upstreams=("10.0.0.1:80",)))
    assert settings.pool("default").selector is Selector.LEAST_USED
    assert settings.pool("default").upstreams == (parse_upstream_url("http://10.0.0.1:80"),)
