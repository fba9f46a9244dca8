"""The harness's own virtualenv (`loadtest/.bench-venv`, gitignored) and what it holds.

The peers proxygate is compared with (pproxy, proxy.py) and matplotlib for the charts are never
dependencies of proxygate: they are installed into the same benchmark-only virtualenv that
`loadtest.bench_core` makes for pharox, on first use, unless installing is turned off (the test
suite never installs anything).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench_core import BENCH_VENV, bench_python, isolated_env, last_line, shown

__all__ = ["CHART", "PEERS", "Package", "bench_python", "ensure", "installed", "isolated_env"]


@dataclass(frozen=True, slots=True)
class Package:
    name: str  # as the user names it
    module: str  # what must import
    requirements: tuple[str, ...]


PEERS = {
    # pproxy 2.7.9 calls asyncio.get_event_loop() with no loop set, which uvloop 0.22+ refuses.
    "pproxy": Package("pproxy", "pproxy", ("pproxy==2.7.9", "uvloop==0.21.0")),
    "proxy.py": Package("proxy.py", "proxy", ("proxy.py==2.4.10",)),
}
CHART = Package("matplotlib", "matplotlib", ("matplotlib",))


def installed(package: Package) -> bool:
    python = bench_python()
    if not python.exists():
        return False
    done = subprocess.run(
        [str(python), "-c", f"import {package.module}"],
        capture_output=True,
        env=isolated_env(),
        check=False,
        timeout=60,
    )
    return done.returncode == 0


def ensure(package: Package, *, install: bool) -> tuple[Path | None, str]:
    """The bench venv's python with `package` importable, or None and why not."""
    python = bench_python()
    if installed(package):
        return python, f"found in {shown(BENCH_VENV)}"
    if not install:
        return None, f"{package.name} is not installed in {shown(BENCH_VENV)} (installing is off)"
    print(f"[setup] installing {' '.join(package.requirements)} into {shown(BENCH_VENV)}")
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(BENCH_VENV)],
                capture_output=True,
                check=True,
                timeout=300,
            )
        subprocess.run(
            [
                *(str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"),
                *("--retries", "2", "--timeout", "20", *package.requirements),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
            env=isolated_env(),
        )
    except subprocess.CalledProcessError as exc:
        return None, f"installing {package.name} failed: {last_line(exc.stderr or '')}"
    except (subprocess.TimeoutExpired, OSError) as exc:
        return None, f"installing {package.name} failed: {exc}"
    if not installed(package):
        return None, f"{package.name} is still not importable after pip install"
    return python, f"installed into {shown(BENCH_VENV)}"
