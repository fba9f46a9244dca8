"""Command-line flags: applied last, over the environment and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ListenAddress, Overrides, PoolSettings
from core.endpoints import parse_upstream_url
from core.models import Selector
from tests.config.helpers import WriteFile, assert_message, config_error, load

FILE = """
[gateway]
listen = ["127.0.0.1:1000"]
log_level = "error"
default_pool = "main"

[storage]
url = "sqlite:///file.db"

[admin]
listen = "127.0.0.1:2000"

[[pools]]
name = "main"
selector = "random"
proxies = ["http://10.0.0.1:80"]
proxies_file = "main.txt"

[[pools]]
name = "other"
proxies = ["http://10.0.0.9:80"]
"""


@pytest.fixture
def config(write: WriteFile) -> Path:
    write("10.0.0.2:80\n", "main.txt")
    return write(FILE)


def test_flags_override_env_which_overrides_the_file(config: Path) -> None:
    env = {
        "PROXYGATE_GATEWAY__LISTEN": "127.0.0.1:1001",
        "PROXYGATE_GATEWAY__LOG_LEVEL": "warning",
        "PROXYGATE_STORAGE__URL": "sqlite:///env.db",
        "PROXYGATE_ADMIN__LISTEN": "127.0.0.1:2001",
    }
    from_env = load(config, env)
    assert from_env.gateway.listen == (ListenAddress("127.0.0.1", 1001),)
    assert from_env.gateway.log_level == "warning"
    assert from_env.storage.url == "sqlite:///env.db"
    assert from_env.admin.listen == ListenAddress("127.0.0.1", 2001)

    flags = Overrides(
        listen=("127.0.0.1:1002", "[::1]:1002"),
        log_level="DEBUG",
        storage_url="memory://",
        admin="127.0.0.1:2002",
    )
    settings = load(config, env, flags)
    assert settings.gateway.listen == (
        ListenAddress("127.0.0.1", 1002),
        ListenAddress("::1", 1002),
    )
    assert settings.gateway.log_level == "debug"
    assert settings.storage.url == "memory://"
    assert settings.admin.listen == ListenAddress("127.0.0.1", 2002)


def test_admin_flag_empty_disables_admin(config: Path) -> None:
    assert load(config, overrides=Overrides(admin="")).admin.listen is None


def test_upstream_flags_replace_the_default_pools_proxies(config: Path) -> None:
    settings = load(config, overrides=Overrides(upstreams=("socks5://10.1.0.1", "10.1.0.2:81")))
    main = settings.pool("main")
    # The pool keeps its own options; only its upstreams are replaced (file list included).
    assert main.selector is Selector.RANDOM
    assert main.upstreams == (
        parse_upstream_url("socks5://10.1.0.1:1080"),
        parse_upstream_url("http://10.1.0.2:81"),
    )
    assert settings.pool("other").upstreams == (parse_upstream_url("http://10.0.0.9:80"),)


def test_proxies_file_flag_is_relative_to_the_working_directory(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "flag.txt").write_text("10.2.0.1:80\n")
    monkeypatch.chdir(elsewhere)
    settings = load(config, overrides=Overrides(proxies_file="flag.txt"))
    assert settings.pool("main").upstreams == (parse_upstream_url("http://10.2.0.1:80"),)


def test_upstream_and_proxies_file_flags_together(tmp_path: Path) -> None:
    listed = tmp_path / "flag.txt"
    listed.write_text("10.2.0.1:80\n")
    flags = Overrides(upstreams=("10.2.0.0:80",), proxies_file=str(listed))
    settings = load(overrides=flags)
    assert settings.pools == (
        PoolSettings(
            "default",
            upstreams=(
                parse_upstream_url("http://10.2.0.0:80"),
                parse_upstream_url("http://10.2.0.1:80"),
            ),
        ),
    )


def test_upstream_flag_creates_the_default_pool(write: WriteFile) -> None:
    path = write('[[pools]]\nname = "other"\nproxies = ["10.0.0.9:80"]\n')
    settings = load(path, overrides=Overrides(upstreams=("10.0.0.5:80",)))
    assert [pool.name for pool in settings.pools] == ["other", "default"]
    assert settings.pool("default") == PoolSettings(
        "default", upstreams=(parse_upstream_url("http://10.0.0.5:80"),)
    )


def test_upstream_flag_without_a_file_replaces_the_direct_pool() -> None:
    settings = load(overrides=Overrides(upstreams=("http://10.0.0.5:80",)))
    assert settings.pools == (
        PoolSettings("default", upstreams=(parse_upstream_url("http://10.0.0.5:80"),)),
    )


def test_upstream_flag_fills_the_default_pool_named_by_env(config: Path) -> None:
    env = {"PROXYGATE_GATEWAY__DEFAULT_POOL": "other"}
    settings = load(config, env, Overrides(upstreams=("10.3.0.1:80",)))
    assert settings.pool("other").upstreams == (parse_upstream_url("http://10.3.0.1:80"),)
    assert len(settings.pool("main").upstreams) == 2


def test_bad_flag_values_name_the_flag(config: Path) -> None:
    error = config_error(config, overrides=Overrides(listen=("127.0.0.1:80", "0.0.0.0")))
    assert_message(
        error, "command line --listen", "gateway.listen[1]", "expected host:port", "'0.0.0.0'"
    )
    error = config_error(config, overrides=Overrides(log_level="loud"))
    assert_message(error, "command line --log-level", "gateway.log_level", "'loud' is not one of")
    error = config_error(config, overrides=Overrides(storage_url="mysql://u:pw@h/db"))
    assert_message(
        error, "command line --storage", "storage.url", "unsupported storage URL", "u:***@h"
    )
    assert "pw" not in str(error)
    error = config_error(config, overrides=Overrides(admin="admin.example:80"))
    assert_message(error, "command line --admin", "admin.listen", "must be an IP address")


def test_bad_upstream_flag_names_the_flag_and_hides_the_password(config: Path) -> None:
    flags = Overrides(upstreams=("10.0.0.1:80", "ftp://me:hunter2@10.0.0.2"))
    error = config_error(config, overrides=flags)
    assert_message(error, "command line --upstream", "pools[0].proxies[1]", "scheme must be")
    assert "hunter2" not in str(error)


def test_missing_proxies_file_flag(config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    error = config_error(config, overrides=Overrides(proxies_file=str(missing)))
    assert_message(
        error,
        "command line --proxies-file",
        "pools[0].proxies_file",
        f"cannot read proxies file {str(missing)!r}",
        "No such file",
    )


def test_duplicate_between_file_and_flag_names_both(tmp_path: Path) -> None:
    listed = tmp_path / "flag.txt"
    listed.write_text("# one\n\nhttp://u:hunter2@10.0.0.1:80\n")
    flags = Overrides(upstreams=("10.0.0.1:80:u:hunter2",), proxies_file=str(listed))
    error = config_error(overrides=flags)
    assert_message(
        error,
        f"{listed}:3",
        "pools[0].proxies_file",
        "duplicate upstream http://***@10.0.0.1:80",
        "already at pools[0].proxies[0] (command line --upstream)",
    )
    assert "hunter2" not in str(error)
