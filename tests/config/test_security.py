"""Refusals: a gateway or admin API reachable from the network must require credentials."""

from __future__ import annotations

import pytest

from config import Overrides
from tests.config.helpers import WriteFile, assert_message, config_error, load


@pytest.mark.parametrize(
    ("address", "shown", "advice"),
    [
        ("0.0.0.0:8899", "0.0.0.0:8899", "listen on 127.0.0.1"),
        ("192.0.2.10:8899", "192.0.2.10:8899", "listen on 127.0.0.1"),
        ("[::]:8899", "[::]:8899", "listen on [::1]"),
        ("[::ffff:10.0.0.1]:8899", "[::ffff:a00:1]:8899", "listen on [::1]"),
    ],
)
def test_open_gateway_without_users_is_refused(
    write: WriteFile, address: str, shown: str, advice: str
) -> None:
    path = write(f"[gateway]\nlisten = ['127.0.0.1:1', '{address}']\n")
    assert_message(
        config_error(path),
        str(path),
        "gateway.listen[1]",
        f"listens on {shown}, which is not loopback, and gateway.users is empty: add users or "
        + advice,
    )


def test_open_listener_without_users_is_refused(write: WriteFile) -> None:
    path = write("[[listeners]]\nlisten = '0.0.0.0:24001'\n")
    assert_message(
        config_error(path),
        str(path),
        "listeners[0].listen",
        "listens on 0.0.0.0:24001, which is not loopback, and gateway.users is empty",
    )


def test_open_listen_flag_is_refused_naming_the_flag() -> None:
    error = config_error(overrides=Overrides(listen=("0.0.0.0:8899",)))
    assert_message(
        error, "command line --listen", "gateway.listen[0]", "gateway.users is empty: add users"
    )


def test_open_single_listen_string_is_refused(write: WriteFile) -> None:
    path = write("[gateway]\nlisten = '0.0.0.0:8899'\n")
    assert_message(config_error(path), str(path), "gateway.listen", "not loopback")


def test_open_gateway_with_users_is_allowed(write: WriteFile) -> None:
    path = write("[gateway]\nlisten = '0.0.0.0:8899'\nusers = { alice = 's3cret' }\n")
    assert load(path).gateway.listen[0].host == "0.0.0.0"
    # Users from the environment count as well.
    path = write("[gateway]\nlisten = '0.0.0.0:8899'\n")
    assert load(path, env={"PROXYGATE_GATEWAY__USERS": "{a = 'b'}"}).gateway.users


@pytest.mark.parametrize("token", [None, ""])
def test_open_admin_without_token_is_refused(write: WriteFile, token: str | None) -> None:
    text = "[admin]\nlisten = '0.0.0.0:8900'\n"
    if token is not None:
        text += f"token = '{token}'\n"
    path = write(text)
    assert_message(
        config_error(path),
        str(path),
        "admin.listen",
        "listens on 0.0.0.0:8900, which is not loopback, and admin.token is empty: "
        "set admin.token (or PROXYGATE_ADMIN__TOKEN) or listen on 127.0.0.1",
    )


def test_open_admin_flag_is_refused_naming_the_flag() -> None:
    error = config_error(overrides=Overrides(admin="0.0.0.0:8900"))
    assert_message(error, "command line --admin", "admin.listen", "admin.token is empty")


def test_open_admin_with_a_token_is_allowed() -> None:
    settings = load(env={"PROXYGATE_ADMIN__TOKEN": "t"}, overrides=Overrides(admin="0.0.0.0:8900"))
    assert settings.admin.token == "t"


def test_loopback_needs_nothing(write: WriteFile) -> None:
    path = write(
        "[gateway]\nlisten = ['127.0.0.2:1', '[::1]:1', 'localhost:2']\n"
        "[admin]\nlisten = '127.0.0.1:3'\n"
    )
    assert not load(path).gateway.users
