from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.helpers import WriteFile


@pytest.fixture
def write(tmp_path: Path) -> WriteFile:
    """Write `text` to `name` under tmp_path and return its path."""

    def write(text: str, name: str = "proxygate.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
