"""A port in use at start-up, whichever listener's (`gateway.listen`, a `[[listeners]]` entry, the
admin API): one line on stderr naming the address, the listener and the reason, exit status 2,
no traceback, and nothing left running or bound, with one process or several workers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config import load_settings
from gateway.app import Gateway, ListenError, open_storage
from tests.support.processes import (
    Ports,
    gateway_toml,
    occupied_port,
    port_free,
    proxygate_run,
    sqlite_storage,
)

#: What the line calls each kind of listener, by its field in `Ports`.
LISTENERS = {"proxy": "proxy", "listener": "listener for pool default", "admin": "admin"}


def ports_with(busy: int, kind: str) -> Ports:
    """Free ports, but `busy` for the listener `kind`."""
    return dataclasses.replace(Ports.free(), **{kind: busy})


def others_free(ports: Ports, busy: int) -> list[int]:
    """The ports besides `busy` that a listener cannot take: none, when all was closed."""
    return [port for port in ports.all() if port != busy and not port_free(port)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", list(LISTENERS))
async def test_a_port_in_use_is_one_line_and_exit_2(
    tmp_path: Path, kind: str, workers: int
) -> None:
    storage = "memory://" if workers == 1 else await sqlite_storage(tmp_path)
    with occupied_port() as busy:
        ports = ports_with(busy, kind)
        toml = gateway_toml(storage, ports, drain_timeout=1.0)
        async with proxygate_run(tmp_path, toml, "--workers", str(workers)) as gateway:
            code = await gateway.exit_code()
            left = gateway.pids()
        assert others_free(ports, busy) == []
    assert (code, left) == (2, [])
    assert gateway.text() == (
        f"proxygate: cannot start: cannot listen on 127.0.0.1:{busy} ({LISTENERS[kind]}): "
        "address already in use\n"
    )


@pytest.mark.parametrize("kind", list(LISTENERS))
async def test_a_start_that_cannot_bind_closes_what_it_had_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    url = await sqlite_storage(tmp_path)
    storage = open_storage(url)
    closed: list[bool] = []
    close = storage.close

    async def close_and_note() -> None:
        closed.append(True)
        await close()

    monkeypatch.setattr(storage, "close", close_and_note)
    config = tmp_path / "gateway.toml"
    with occupied_port() as busy:
        ports = ports_with(busy, kind)
        config.write_text(gateway_toml(url, ports, drain_timeout=1.0))
        gateway = Gateway(load_settings(config), storage=storage)
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{busy} \({LISTENERS[kind]}\)"):
            await gateway.start()
        # The listeners bound before the failing one are closed by the time start() raises.
        assert others_free(ports, busy) == []
    assert closed == [True]
