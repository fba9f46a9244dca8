"""Storage URLs in the gateway and `proxygate db upgrade`: every URL opens the storage it names or
fails at start naming `storage.url` and the reason (never the password); memory users never load
SQLAlchemy; `db upgrade` builds an empty database, then finds it up to date; `run` refuses a
database whose schema is behind, pointing at `proxygate db upgrade`; a gateway serves on SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.storage.memory import MemoryStorage
from core.storage.sql import SQLStorage, head_revision, upgrade
from gateway.app import StartupError, open_storage
from gateway.cli import main
from tests.conftest import skip_or_fail
from tests.gateway.conftest import StartGateway, proxy_url

# The command reads PROXYGATE_<SECTION>__<KEY>: this autouse fixture starts every test from none.
from tests.gateway.test_cli import (
    _no_proxygate_environment,  # noqa: F401
    assert_one_clean_line,
    run_main,
)
from tests.storage.scratch import POSTGRES_URL, drop_schema, make_schema, postgres_unavailable
from tests.support.net import closed_port
from tests.support.origin import Origin
from tests.support.proxying import fetch

REPO = Path(__file__).resolve().parents[2]
SECRET = "TopSecret9"


@pytest.fixture
async def empty_schema() -> AsyncIterator[str]:
    """A PostgreSQL URL whose search path is a new, empty schema of its own."""
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    schema = await make_schema("pgcli")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        await drop_schema(schema)


def with_password(url: str) -> str:
    """`url` with the SECRET password, which the trust-auth test server ignores."""
    return url.replace("postgres@", f"postgres:{SECRET}@", 1)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryStorage),
        ("sqlite:///var/lib/proxygate/proxygate.db", SQLStorage),
        (f"postgresql://gw:{SECRET}@127.0.0.1/proxygate", SQLStorage),
        (f"postgres://gw:{SECRET}@127.0.0.1:5433/proxygate", SQLStorage),
        ("postgresql://gw@127.0.0.1/proxygate?options=-csearch_path%3Dfleet_a", SQLStorage),
    ],
)
def test_each_url_names_its_storage(url: str, kind: type) -> None:
    assert isinstance(open_storage(url), kind)  # nothing opened or connected yet


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"mysql://gw:{SECRET}@127.0.0.1/proxygate", "unsupported storage URL scheme 'mysql'"),
        (f"postgresql://gw:{SECRET}@127.0.0.1:port/db", "not a valid URL"),
        ("sqlite:///", "sqlite storage needs a file"),
        (f"postgresql://gw:{SECRET}@h/db?options=-x", "only -c name=value settings"),
    ],
)
def test_a_bad_url_names_the_key_and_the_reason_without_the_password(url: str, reason: str) -> None:
    with pytest.raises(StartupError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert message.startswith("storage.url '")
    assert reason in message
    assert SECRET not in message


def test_memory_storage_never_loads_sqlalchemy() -> None:
    probe = (
        "import sys, gateway.cli\n"
        "from gateway.app import open_storage\n"
        "open_storage('memory://')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sqlalchemy', 'asyncpg', 'aiosqlite', 'alembic')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_db_upgrade_builds_an_empty_database_then_finds_it_up_to_date(
    empty_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = with_password(empty_schema)
    assert main(["db", "upgrade", "--storage", url]) == 0
    first = capsys.readouterr()
    assert first.out.endswith(f"upgraded from an empty database to {head_revision()}\n")
    assert main(["db", "upgrade", "--storage", url]) == 0
    again = capsys.readouterr()
    assert again.out.endswith(f"already up to date (revision {head_revision()})\n")
    for output in (first, again):
        assert SECRET not in output.out + output.err
        assert "Traceback" not in output.err


def test_db_upgrade_on_sqlite_from_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxygate.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path / "gw.db"}"\n')
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"upgraded from an empty database to {head_revision()}" in capsys.readouterr().out
    assert (tmp_path / "gw.db").exists()


def test_db_upgrade_without_a_database_exits_1_with_one_clean_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql://gw:{SECRET}@127.0.0.1:{closed_port()}/proxygate"
    code = main(["db", "upgrade", "--storage", url])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith("proxygate: cannot upgrade the storage at postgresql://gw:***@")
    assert "refused" in captured.err.lower()
    assert_one_clean_line(captured.err)


def test_run_refuses_a_database_whose_schema_is_behind(
    empty_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = with_password(empty_schema)
    code, err = run_main(
        ["run", "--storage", url, "--listen", "127.0.0.1:0", "--admin", ""], capsys
    )
    assert code == 1
    assert err.startswith("proxygate: cannot start: storage.url 'postgresql://postgres:***@")
    assert "run `proxygate db upgrade`" in err
    assert_one_clean_line(err)


def test_run_refuses_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://gw:{SECRET}@127.0.0.1:{closed_port()}/proxygate"
    code, err = run_main(
        ["run", "--storage", url, "--listen", "127.0.0.1:0", "--admin", ""], capsys
    )
    assert code == 1
    assert err.startswith("proxygate: cannot start: storage.url 'postgresql://gw:***@")
    assert_one_clean_line(err)


async def test_a_gateway_serves_on_sqlite_and_keeps_its_pools_in_the_file(
    start_gateway: StartGateway, origin: Origin, tmp_path: Path
) -> None:
    database = tmp_path / "gw.db"
    await upgrade(f"sqlite:///{database}")
    gateway = await start_gateway(
        f'[storage]\nurl = "sqlite:///{database}"\n'
        '[[pools]]\nname = "default"\nproxies = ["direct://"]\n'
    )
    assert isinstance(gateway.storage, SQLStorage)
    for _ in range(3):
        status, _, body = await fetch(origin.url_for("/echo"), proxy_url(gateway))
        assert status == 200
        assert json.loads(body)["path"] == "/echo"
    stats = await gateway.storage.stats("default", 0)
    assert (stats.total_leases, stats.leases_held) == (3, 0)


async def test_a_gateway_on_postgresql_keeps_its_tables_in_the_url_schema(
    empty_schema: str, start_gateway: StartGateway, origin: Origin
) -> None:
    # (`empty_schema` first: its schema is dropped after the gateway has stopped.)
    await upgrade(empty_schema)
    gateway = await start_gateway(
        f'[storage]\nurl = "{empty_schema}"\n[[pools]]\nname = "default"\nproxies = ["direct://"]\n'
    )
    status, _, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 200
    schema = empty_schema.rpartition("%3D")[2]
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        total = await connection.fetchval(f'SELECT total_leases FROM "{schema}".upstreams')
    finally:
        await connection.close()
    assert total == 1
