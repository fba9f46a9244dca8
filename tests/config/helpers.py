"""Shared helpers of the config tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from config import ConfigError, Overrides, Settings, load_settings

#: The `write` fixture: write(text, name="proxygate.toml") -> path under tmp_path.
WriteFile = Callable[..., Path]


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Settings:
    """`load_settings` with an empty environment unless one is given: tests never read ours."""
    return load_settings(path, env={} if env is None else env, overrides=overrides)


def config_error(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(path, env, overrides)
    return caught.value


def assert_message(error: ConfigError, source: str, key: str | None, *reason: str) -> None:
    """The message is "source: key: reason" and the reason holds every fragment given."""
    message = str(error)
    assert error.source == source, message
    assert error.key == key, message
    expected = f"{source}: {key}: " if key else f"{source}: "
    assert message.startswith(expected), message
    for fragment in reason:
        assert fragment in error.reason, message
