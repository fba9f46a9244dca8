"""Builds proxygate with the modules on its request path compiled to C by mypyc.

The compiled modules are the same typed source (`[tool.proxygate] compiled` in pyproject.toml),
turned into C extensions that do in machine code what the interpreter would do op by op; the
package behaves the same either way. Where mypyc or a C compiler is missing, or
`PROXYGATE_COMPILE=0` asks for it, the package installs as pure Python, slower.
"""

from __future__ import annotations

import os
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

ROOT = Path(__file__).resolve().parent
#: The shared library of the compiled modules: `proxygate__mypyc.<abi>.so` beside the packages.
GROUP = "proxygate"


def compiled_modules() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        names: list[str] = tomllib.load(file)["tool"]["proxygate"]["compiled"]
    return names


def _say(message: str) -> None:
    print(f"proxygate: {message}", file=sys.stderr)


def _remove_compiled(names: list[str]) -> None:
    """An editable install imports from the source tree, where an earlier compiled build left
    its extensions: they would shadow the sources."""
    for name in names:
        module = ROOT / Path(*name.split("."))
        for built in module.parent.glob(f"{module.name}.*.so"):
            built.unlink()
    for built in ROOT.glob(f"{GROUP}__mypyc.*.so"):
        built.unlink()


class _BuildOptionalExt(build_ext):
    """Compiles an extension's C files in parallel, one compiler process per core; falls back
    to the pure-Python package when the C compiler fails or is missing."""

    def build_extension(self, ext: Any) -> None:
        # distutils compiles an extension's sources one after another; the compiled modules'
        # shared library is most of the build, split into a C file per module (mypyc's
        # `multi_file`) so that its files can go to the cores together.
        compiler = self.compiler
        one_by_one = compiler.compile

        def compile_together(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            if len(sources) < 2:
                return list(one_by_one(sources, *args, **kwargs))
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                parts = pool.map(lambda source: one_by_one([source], *args, **kwargs), sources)
                return [obj for objects in parts for obj in objects]

        compiler.compile = compile_together
        try:
            super().build_extension(ext)
        finally:
            compiler.compile = one_by_one

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            # Compiled modules import the shared library: with any one missing, none may stay.
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            _remove_compiled(compiled_modules())
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            _say(f"not compiled ({reason}); installing pure Python")


#: The setup.py commands that build: the others (pip's metadata steps) need no C, and are
#: spared translating the modules again (a few seconds each).
_BUILDING = frozenset({"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"})


def _extensions() -> list[Any]:
    names = compiled_modules()
    if os.environ.get("PROXYGATE_COMPILE", "1") == "0":
        _remove_compiled(names)
        return []
    if _BUILDING.isdisjoint(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not installed; installing pure Python")
        return []
    paths = [str(Path(*name.split("."))) + ".py" for name in names]
    options = [
        # Only the compiled modules are read for their types: everything they import is
        # seen as Any (as the interpreter sees it), so the build needs no dependencies.
        "--follow-imports=skip",
        "--ignore-missing-imports",
        "--no-warn-return-any",
        "--no-warn-unused-ignores",
    ]
    try:
        extensions: list[Any] = mypycify(
            [*options, *paths], group_name=GROUP, multi_file=True
        )
    except (Exception, SystemExit) as exc:
        _say(f"mypyc could not compile ({exc}); installing pure Python")
        return []
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": _BuildOptionalExt})
