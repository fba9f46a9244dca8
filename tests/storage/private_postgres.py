"""A PostgreSQL server of a test's own, to stop and start under a running gateway without
touching the machine's shared server: `initdb` in a fresh temporary directory, listening on a
free loopback port (and a Unix socket in that directory), run as the `postgres` OS user when
the tests run as root (the server refuses root). Removed, server and files, on close.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Self

from core.storage.sql import upgrade
from tests.conftest import skip_or_fail
from tests.support.net import free_port

__all__ = ["PrivatePostgres", "private_postgres_missing", "upgraded_private_postgres"]


def _bin_directory() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def private_postgres_missing() -> str | None:
    """Why no private server can be run here, or None when one can."""
    if _bin_directory() is None:
        return "initdb not found (under /usr/lib/postgresql/*/bin or on PATH)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres OS user to run a server as"
        if shutil.which("runuser") is None:
            return "running as root, and runuser is missing"
    return None


class PrivatePostgres:
    def __init__(self) -> None:
        bin_directory = _bin_directory()
        assert bin_directory is not None, private_postgres_missing()
        self._bin = bin_directory
        self.port = free_port()
        self._root = Path(tempfile.mkdtemp(prefix="proxygate-pg-"))
        self._data = self._root / "data"
        self._log = self._root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self._root, account.pw_uid, account.pw_gid)
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def __aenter__(self) -> Self:
        try:
            await self._run(
                "initdb",
                "-D",
                str(self._data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        settings = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self._root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        await self._run(
            "pg_ctl",
            "-D",
            str(self._data),
            "-l",
            str(self._log),
            "-o",
            settings,
            "-w",
            "-t",
            "30",
            "start",
        )
        self.running = True

    async def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` ends open connections at once, as a restart does."""
        await self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    async def close(self) -> None:
        try:
            if self.running or (self._data / "postmaster.pid").exists():
                await self.stop("immediate")
        finally:
            shutil.rmtree(self._root, ignore_errors=True)

    def server_log(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    async def _run(self, program: str, *args: str) -> None:
        command = [str(self._bin / program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        # Output to a file, not a pipe: the server pg_ctl leaves running would hold a pipe open.
        output = self._root / f"{program}.out"
        with output.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self._root,
            )
        try:
            code = await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if code != 0:
            raise RuntimeError(
                f"{program} exited with {code}: {output.read_text(errors='replace')}\n"
                f"{self.server_log()}"
            )


@asynccontextmanager
async def upgraded_private_postgres() -> AsyncIterator[PrivatePostgres]:
    """A private server with the newest schema in its `postgres` database; the test skips (or
    fails under PROXYGATE_REQUIRE_ALL=1) where no server can be run."""
    if reason := private_postgres_missing():
        skip_or_fail(f"no private PostgreSQL server for the restart test: {reason}")
    async with PrivatePostgres() as server:
        await upgrade(server.url)
        yield server
