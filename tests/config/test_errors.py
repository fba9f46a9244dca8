"""Every kind of invalid file: one ConfigError naming the source, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_settings
from tests.config.helpers import WriteFile, assert_message, config_error

POOL = '[[pools]]\nname = "default"\n'


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert_message(
        config_error(path), str(path), None, "cannot read the configuration file", "No such file"
    )


def test_invalid_toml_gives_the_position_not_the_text(write: WriteFile) -> None:
    path = write('[gateway]\nusers = { alice = "hunter2" \n')
    error = config_error(path)
    assert_message(error, str(path), None, "invalid TOML", "line 2")
    assert "hunter2" not in str(error)


def test_not_utf8(write: WriteFile) -> None:
    path = write("")
    path.write_bytes(b'[gateway]\nlog_level = "\xff"\n')
    assert_message(config_error(path), str(path), None, "not UTF-8")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[gatway]\n", "gatway", "unknown table (did you mean gateway?)"),
        ("[gateway]\nacquire_timout = 1\n", "gateway.acquire_timout", "did you mean"),
        ("[gateway]\nfoo = 1\n", "gateway.foo", "unknown key"),
        ("log_level = 'info'\n", "log_level", "unknown key"),
        ("[storage]\nuri = 'memory://'\n", "storage.uri", "unknown key (did you mean url?)"),
        ("[admin]\ntokn = 'x'\n", "admin.tokn", "unknown key (did you mean token?)"),
        (POOL + "selecter = 'random'\n", "pools[0].selecter", "did you mean selector?"),
        ("[[listeners]]\nlisten='127.0.0.1:1'\npol='x'\n", "listeners[0].pol", "did you mean"),
        ("gateway = 3\n", "gateway", "expected a table ([gateway]), got an integer"),
        ("[pools]\nname = 'x'\n", "pools", "expected an array of tables ([[pools]])"),
        ("pools = [1]\n", "pools[0]", "expected a table, got an integer"),
    ],
)
def test_shape_errors(write: WriteFile, text: str, key: str, reason: str) -> None:
    path = write(text)
    assert_message(config_error(path), str(path), key, reason)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[gateway]\nacquire_timeout = true\n", "gateway.acquire_timeout", "got a boolean"),
        ("[gateway]\nacquire_timeout = '5'\n", "gateway.acquire_timeout", "got a string"),
        ("[gateway]\nconnect_timeout = 0\n", "gateway.connect_timeout", "greater than 0, got 0"),
        ("[gateway]\nidle_timeout = -1.5\n", "gateway.idle_timeout", "greater than 0"),
        ("[gateway]\nheader_timeout = inf\n", "gateway.header_timeout", "greater than 0"),
        ("[gateway]\ndrain_timeout = nan\n", "gateway.drain_timeout", "greater than 0"),
        ("[gateway]\nlisten = 8899\n", "gateway.listen", "expected an array of strings"),
        ("[gateway]\nlisten = ['127.0.0.1:1', 2]\n", "gateway.listen[1]", "expected a string"),
        ("[gateway]\nlog_level = 'verbose'\n", "gateway.log_level", "'verbose' is not one of"),
        ("[gateway]\nlog_level = 'warn'\n", "gateway.log_level", "did you mean warning?"),
        ("[gateway]\ndefault_pool = 'a-b'\n", "gateway.default_pool", "not a valid name"),
        ("[gateway]\nusers = ['alice']\n", "gateway.users", "expected a table"),
        ("[gateway]\nusers = { alice = 1 }\n", "gateway.users.alice", "expected a password"),
        ("[gateway]\nusers = { alice = '' }\n", "gateway.users.alice", "the password is empty"),
        ("[gateway]\nusers = { 'a-b' = 'x' }\n", "gateway.users.a-b", "not a valid name"),
        ("[gateway]\nusers = { 'a b' = 'x' }\n", 'gateway.users."a b"', "not a valid name"),
        (
            "[gateway]\ndeny_destinations = ['10.0.0.1/8']\n",
            "gateway.deny_destinations[0]",
            "host bits",
        ),
        ("[gateway]\ndeny_destinations = ['intranet']\n", "gateway.deny_destinations[0]", "CIDR"),
        ("[gateway]\nconnect_ports = 443\n", "gateway.connect_ports", "expected an array of ports"),
        ("[gateway]\nconnect_ports = [0]\n", "gateway.connect_ports[0]", "at least 1"),
        ("[gateway]\nconnect_ports = [70000]\n", "gateway.connect_ports[0]", "1-65535"),
        ("[gateway]\nconnect_ports = [true]\n", "gateway.connect_ports[0]", "got a boolean"),
        ("[storage]\nurl = 'redis://h'\n", "storage.url", "unsupported storage URL 'redis://h'"),
        ("[storage]\nurl = 'memory'\n", "storage.url", "expected memory://"),
        ("[admin]\nlisten = 8900\n", "admin.listen", "expected a string, got an integer"),
        ("[admin]\nlisten = '127.0.0.1'\n", "admin.listen", "expected host:port"),
        ("[admin]\ntoken = 5\n", "admin.token", "expected a string, got an integer"),
    ],
)
def test_value_errors(write: WriteFile, text: str, key: str, reason: str) -> None:
    path = write(text)
    assert_message(config_error(path), str(path), key, reason)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("selector = 'fastest'\n", "pools[0].selector", "'fastest' is not one of first_available"),
        ("selector = 'round-robin'\n", "pools[0].selector", "did you mean round_robin?"),
        ("sticky_ttl = 0\n", "pools[0].sticky_ttl", "greater than 0"),
        ("retries = -1\n", "pools[0].retries", "at least 0"),
        ("retries = 1.0\n", "pools[0].retries", "expected an integer, got a float"),
        ("max_concurrency = 0\n", "pools[0].max_concurrency", "at least 1"),
        ("max_concurrency = false\n", "pools[0].max_concurrency", "got a boolean"),
        ("description = 1\n", "pools[0].description", "expected a string"),
        ("proxies = 'http://h'\n", "pools[0].proxies", "expected an array of strings"),
        ("proxies = ['h:1', 2]\n", "pools[0].proxies[1]", "expected a string"),
        ("proxies = ['h:1', 'ftp://h']\n", "pools[0].proxies[1]", "scheme must be one of"),
        ("proxies_file = 3\n", "pools[0].proxies_file", "expected a string"),
    ],
)
def test_pool_value_errors(write: WriteFile, text: str, key: str, reason: str) -> None:
    path = write(POOL + text)
    assert_message(config_error(path), str(path), key, reason)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[[pools]]\nretries = 1\n", "pools[0]", "the pool has no name"),
        ("[[pools]]\nname = ''\n", "pools[0].name", "'' is not a valid name"),
        ("[[pools]]\nname = 'eu-west'\n", "pools[0].name", "use letters, digits, '_' and '.'"),
        (POOL + POOL, "pools[1].name", "pool 'default' is already defined at pools[0]"),
        (POOL + "[[pools]]\nname = 'DEFAULT'\n", "pools[1].name", "already defined"),
        (POOL + "[[listeners]]\npool = 'default'\n", "listeners[0]", "no address"),
        (
            POOL + "[[listeners]]\nlisten = '127.0.0.1:1'\npool = 'nope'\n",
            "listeners[0].pool",
            "no pool is named 'nope' (pools: 'default')",
        ),
        (
            "[gateway]\ndefault_pool = 'main'\n[[pools]]\nname = 'other'\n",
            "gateway.default_pool",
            "no pool is named 'main' (pools: 'other'): set gateway.default_pool",
        ),
        (
            "[[pools]]\nname = 'residential'\n",
            "gateway.default_pool",
            "no pool is named 'default'",
        ),
        (
            "[gateway]\nlisten = []\n",
            "gateway.listen",
            "no listen address: set it or add [[listeners]]",
        ),
    ],
)
def test_reference_errors(write: WriteFile, text: str, key: str, reason: str) -> None:
    path = write(text)
    assert_message(config_error(path), str(path), key, reason)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "[gateway]\nlisten = ['127.0.0.1:1', 'localhost:1']\n",
            "gateway.listen[1]",
            "127.0.0.1:1 is the same address as gateway.listen[0]",
        ),
        (
            "[gateway]\nlisten = ['127.0.0.1:1']\n[[listeners]]\nlisten = '127.0.0.1:1'\n",
            "listeners[0].listen",
            "is the same address as gateway.listen[0]",
        ),
        (
            "[gateway]\nlisten = ['[::1]:8900']\n[admin]\nlisten = '[::1]:8900'\n",
            "admin.listen",
            "[::1]:8900 is the same address as gateway.listen[0]",
        ),
        (
            "[gateway]\nlisten = ['127.0.0.1:8900']\n",
            "admin.listen",
            "127.0.0.1:8900 is the same address as gateway.listen[0]",
        ),
        (
            "[gateway]\nlisten = ['127.0.0.1:1', '0.0.0.0:1']\nusers = { a = 'b' }\n",
            "gateway.listen[1]",
            "0.0.0.0:1 overlaps 127.0.0.1:1 of gateway.listen[0]",
        ),
    ],
)
def test_duplicate_listen_addresses(write: WriteFile, text: str, key: str, reason: str) -> None:
    path = write(text)
    assert_message(config_error(path), str(path), key, reason)


def test_ipv4_and_ipv6_wildcards_on_one_port_do_not_clash(write: WriteFile) -> None:
    path = write("[gateway]\nlisten = ['0.0.0.0:1', '[::]:1']\nusers = { a = 'b' }\n")
    assert len(load_settings(path, env={}).gateway.listen) == 2


def test_duplicate_across_sources_names_the_other_source(write: WriteFile) -> None:
    path = write("[[listeners]]\nlisten = '127.0.0.1:5'\n")
    error = config_error(path, env={"PROXYGATE_GATEWAY__LISTEN": "127.0.0.1:5"})
    assert_message(
        error,
        str(path),
        "listeners[0].listen",
        "same address as gateway.listen[0] (environment variable PROXYGATE_GATEWAY__LISTEN)",
    )


def test_messages_never_hold_passwords(write: WriteFile) -> None:
    secret = "Hunter2Secret"
    cases = [
        f"[storage]\nurl = 'mysql://me:{secret}@db/x'\n",
        f"[storage]\nurl = 'pg://me:{secret}/x@db/x'\n",
        f"[[pools]]\nname = 'default'\nproxies = ['socks6://me:{secret}@h:1']\n",
        f"[[pools]]\nname = 'default'\nproxies = ['http://me:{secret}@h:1/path']\n",
        f"[[pools]]\nname = 'default'\nproxies = ['http://me:{secret}@h:99999']\n",
        f"[[pools]]\nname = 'default'\nproxies = ['h:1:me:{secret}', 'http://me:{secret}@h:1']\n",
        f"[gateway]\nusers = {{ alice = '{secret}', bob = 3 }}\n",
        f"[gateway]\nusers = {{ alice = '{secret}' }}\nlisten = 'example.com:1'\n",
        f"[gateway]\nusers = {{ 'bad name' = '{secret}' }}\n",
        f"[admin]\ntoken = '{secret}'\nlisten = 'nowhere:1'\n",
    ]
    for text in cases:
        error = config_error(write(text))
        assert secret not in str(error), str(error)
        assert secret not in repr(error.args), str(error)
        assert error.__cause__ is None
        assert error.__suppress_context__ or error.__context__ is None


def test_config_error_is_a_value_error() -> None:
    error = ConfigError("f.toml", "gateway.listen", "bad")
    assert isinstance(error, ValueError)
    assert str(error) == "f.toml: gateway.listen: bad"
    assert str(ConfigError("f.toml", None, "bad")) == "f.toml: bad"
