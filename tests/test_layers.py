"""The layers stay apart: `core/` (leasing, storage, health) knows nothing of the gateway or its
configuration, and nothing outside the lease manager reaches its private parts or the storage
behind it: the gateway takes, gives back and reads through the manager's methods."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The lease manager's private modules: imported by `core.leasing` alone.
LEASING_PRIVATE = (
    "core.leasing.holdings",
    "core.leasing.health_feed",
    "core.leasing.line",
    "core.leasing.outages",
    "core.leasing.unanswered",
    "core.leasing.manager",
)


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file, `from x import y` as `x.y` and `x`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def named(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("path", modules("core"), ids=named)
def test_core_imports_nothing_of_the_gateway_or_its_configuration(path: Path) -> None:
    wrong = [
        f"{named(path)}:{line} imports {module}"
        for line, module in imported(path)
        if module.split(".")[0] in {"gateway", "config"}
    ]
    assert not wrong


@pytest.mark.parametrize(
    "path", [*modules("gateway"), *modules("config"), *modules("core")], ids=named
)
def test_the_lease_managers_parts_are_its_own(path: Path) -> None:
    if named(path).startswith("core.leasing"):
        return
    wrong = [
        f"{named(path)}:{line} imports {module}"
        for line, module in imported(path)
        if any(module == part or module.startswith(part + ".") for part in LEASING_PRIVATE)
    ]
    assert not wrong


@pytest.mark.parametrize("path", [*modules("gateway"), *modules("config")], ids=named)
def test_the_gateway_never_reaches_behind_the_lease_manager(path: Path) -> None:
    """No `manager.storage`, `manager._anything`: what the gateway needs, the manager offers."""
    wrong = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if owner_name == "manager" and (node.attr.startswith("_") or node.attr == "storage"):
            wrong.append(f"{named(path)}:{node.lineno} reads manager.{node.attr}")
    assert not wrong
