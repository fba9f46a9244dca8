"""The protocol layer stays pure: no event loop, sockets or logging anywhere in it."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway.protocols

FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "logging", "uvloop", "aiohttp"}


def test_no_io_imports() -> None:
    root = Path(gateway.protocols.__file__).parent
    sources = sorted(root.glob("*.py"))
    assert sources
    for source in sources:
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{source.name} imports {name}"


def test_public_surface_is_exported() -> None:
    for name in gateway.protocols.__all__:
        assert hasattr(gateway.protocols, name), name
