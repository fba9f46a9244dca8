"""The modules setup.py compiles with mypyc: compiled where the build says, never stale, and
free of the one construct mypyc gets wrong."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
COMPILED: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["proxygate"][
    "compiled"
]
#: `PROXYGATE_COMPILE=0` installs pure Python on purpose (setup.py).
PURE_ON_PURPOSE = os.environ.get("PROXYGATE_COMPILE", "1") == "0"


def source_of(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def loaded_from_extension(name: str) -> Path | None:
    """The extension the module was imported from, or None when it runs from its source."""
    origin = importlib.import_module(name).__spec__.origin  # type: ignore[union-attr]
    assert origin is not None
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return Path(origin) if origin.endswith(suffixes) else None


def awaits_in_finally(path: Path) -> list[int]:
    """Lines of `await`, `async with` and `async for` inside a `finally` block."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Try | ast.TryStar):
            for statement in node.finalbody:
                lines += [
                    inner.lineno
                    for inner in ast.walk(statement)
                    if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor)
                ]
    return lines


def test_every_module_named_for_compiling_exists() -> None:
    assert len(set(COMPILED)) == len(COMPILED)
    missing = [name for name in COMPILED if not source_of(name).is_file()]
    assert not missing


@pytest.mark.parametrize("name", COMPILED)
def test_a_compiled_module_awaits_nothing_in_a_finally_block(name: str) -> None:
    # mypyc (2.4) re-raises an exception already handled (by this function or any caller up
    # the chain) once an await in a `finally` block resumes: the code after it never runs.
    assert awaits_in_finally(source_of(name)) == []


def test_the_check_finds_an_await_in_a_finally_block(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "async def f(g):\n"
        "    try:\n"
        "        pass\n"
        "    finally:\n"
        "        await g()\n"
        "        async with g():\n"
        "            pass\n"
    )
    assert awaits_in_finally(module) == [5, 6]


def test_the_request_path_runs_compiled_unless_installed_pure_on_purpose() -> None:
    compiled = {name: loaded_from_extension(name) for name in COMPILED}
    if PURE_ON_PURPOSE:
        assert not any(compiled.values()), "PROXYGATE_COMPILE=0, yet compiled modules load"
        return
    pure = [name for name, extension in compiled.items() if extension is None]
    if pure:
        skip_or_fail(f"installed as pure Python (no mypyc or no C compiler): {', '.join(pure)}")
    stale = [
        name
        for name, extension in compiled.items()
        if extension is not None and extension.stat().st_mtime < source_of(name).stat().st_mtime
    ]
    assert not stale, f"sources changed since they were compiled: `pip install -e .` ({stale})"


def build_wheel(tmp_path: Path, **env: str) -> tuple[list[str], str]:
    """Build a wheel of a copy of the sources with this environment's setuptools and mypy: its
    file names, and the build's output."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", ".*", "results")
    for package in ("core", "gateway", "config", "loadtest"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*command, "--verbose", "--wheel-dir", str(tmp_path), str(source)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("proxygate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist(), done.stdout + done.stderr


@pytest.mark.slow
def test_without_a_working_c_compiler_the_package_installs_as_pure_python(
    tmp_path: Path,
) -> None:
    names, output = build_wheel(tmp_path, CC="/bin/false", PROXYGATE_COMPILE="1")
    assert "proxygate: not compiled (" in output
    assert "gateway/http_lane.py" in names
    assert not [name for name in names if name.endswith(".so")]


def test_proxygate_compile_0_installs_pure_python(tmp_path: Path) -> None:
    names, _ = build_wheel(tmp_path, PROXYGATE_COMPILE="0")
    assert "gateway/http_lane.py" in names
    assert not [name for name in names if name.endswith(".so")]
