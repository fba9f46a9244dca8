"""The `proxygate` command: configuration errors exit 2 with one line naming the source, key and
reason (no traceback, no password); a listener that cannot bind exits 2 (more in
test_bind_failures); a real process serves, and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from tests.support.net import free_port
from tests.support.origin import Origin
from tests.support.proxying import fetch

REPO = Path(__file__).resolve().parents[2]
SECRET = "TopSecret9"


@pytest.fixture(autouse=True)
def _no_proxygate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command reads PROXYGATE_<SECTION>__<KEY> from the environment: start from none."""
    for name in list(os.environ):
        if name.startswith("PROXYGATE_") and "__" in name:
            monkeypatch.delenv(name)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def assert_one_clean_line(err: str) -> None:
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert SECRET not in err


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        (
            "[gateway]\nacquire_timeout = -1\n",
            "gateway.acquire_timeout",
            "must be a number of seconds greater than 0, got -1",
        ),
        ('[gateway]\nlisten = ["nowhere:80"]\n', "gateway.listen[0]", "invalid listen address"),
        ('[gateway]\nlisten_on = ["127.0.0.1:1"]\n', "gateway.listen_on", "did you mean listen?"),
        (
            '[[pools]]\nname = "p"\nselector = "fastest"\n',
            "pools[0].selector",
            "'fastest' is not one of",
        ),
        (
            f'[[pools]]\nname = "p"\nproxies = ["ftp://u:{SECRET}@192.0.2.1:21"]\n',
            "pools[0].proxies[0]",
            "scheme must be one of",
        ),
        (
            '[gateway]\nlisten = ["0.0.0.0:0"]\n',
            "gateway.listen[0]",
            "not loopback, and gateway.users is empty",
        ),
        ("[gateway\nx = 1\n", "", "invalid TOML"),
    ],
    ids=["seconds", "listen", "unknown-key", "selector", "upstream", "exposure", "toml"],
)
def test_a_bad_configuration_file_exits_2_naming_the_key_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str, reason: str
) -> None:
    path = tmp_path / "proxygate.toml"
    path.write_text(toml)
    code, err = run_main(["run", "--config", str(path)], capsys)
    assert code == 2
    assert err.startswith(f"proxygate: configuration error: {path}: {key}")
    assert reason in err
    assert_one_clean_line(err)


def test_bad_flags_and_environment_exit_2_naming_their_source(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, err = run_main(["run", "--listen", "bogus"], capsys)
    assert code == 2
    assert "command line --listen: gateway.listen[0]: invalid listen address 'bogus'" in err
    assert_one_clean_line(err)

    code, err = run_main(["run", "--upstream", f"socks5://u:{SECRET}@host:99999"], capsys)
    assert code == 2
    assert "command line --upstream: pools[0].proxies[0]: invalid upstream URL" in err
    assert_one_clean_line(err)

    code, err = run_main(["run", "--config", str(tmp_path / "missing.toml")], capsys)
    assert code == 2
    assert "cannot read the configuration file" in err
    assert_one_clean_line(err)

    monkeypatch.setenv("PROXYGATE_GATEWAY__IDLE_TIMEOUT", "abc")
    code, err = run_main(["run"], capsys)
    assert code == 2
    assert "environment variable PROXYGATE_GATEWAY__IDLE_TIMEOUT: gateway.idle_timeout:" in err
    assert_one_clean_line(err)


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_listener_that_cannot_bind_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with occupied_port() as port:
        code, err = run_main(["run", "--listen", f"127.0.0.1:{port}", "--admin", ""], capsys)
    assert code == 2
    assert f"proxygate: cannot start: cannot listen on 127.0.0.1:{port} (proxy)" in err
    assert "Traceback" not in err


async def wait_accepting(
    process: asyncio.subprocess.Process, port: int, timeout: float = 15.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if process.returncode is not None:
            pytest.fail(f"the gateway exited early with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                pytest.fail(f"the gateway did not accept on port {port} within {timeout:g}s")
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def test_the_command_serves_and_exits_0_on_sigterm(origin: Origin, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGATE_")}
    env.pop("PYTHONWARNINGS", None)
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            "",
            "--log-level",
            "info",
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_low_open_files_limit,
        )
    try:
        await wait_accepting(process, port)
        # Started with a low soft limit, the gateway took it up to the hard one.
        soft, hard = _open_files_limits(process.pid)
        assert soft == hard != "256"
        status, headers, body = await fetch(origin.url_for("/echo"), f"http://127.0.0.1:{port}")
        assert status == 200
        assert json.loads(body)["path"] == "/echo"
        assert "proxygate" in headers["Via"]
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 10)
        log = stderr_path.read_text()
        assert code == 0, log
        assert "Traceback" not in log
        assert f"listening on 127.0.0.1:{port}" in log
        assert "SIGTERM received" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _low_open_files_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


def _open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files limit in /proc")
