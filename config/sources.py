"""The raw layers: the TOML file, then environment variables, then command-line flags.

Each layer writes plain values into one `RawConfig` tree and records where it wrote, so that
`config.load`, which validates the merged tree, can name the source of a bad value.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from config.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "KEYS",
    "KeyPath",
    "Overrides",
    "RawConfig",
    "apply_env",
    "apply_overrides",
    "did_you_mean",
    "format_path",
    "read_file",
    "supply_default_pool",
    "type_name",
    "unknown",
]

KeyPath = tuple[str | int, ...]
Kind = Literal["str", "float", "int", "bool", "str_list", "int_list", "table"]

#: Every key each table may hold, with the kind of value an environment variable is read as.
KEYS: dict[str, dict[str, Kind]] = {
    "gateway": {
        "listen": "str_list",
        "default_pool": "str",
        "acquire_timeout": "float",
        "connect_timeout": "float",
        "idle_timeout": "float",
        "header_timeout": "float",
        "drain_timeout": "float",
        "users": "table",
        "deny_destinations": "str_list",
        "connect_ports": "int_list",
        "log_level": "str",
        "retry_budget_percent": "float",
        "retry_budget_min": "int",
        "response_timeout": "float",
        "keepalive_max_idle": "int",
        "keepalive_max_idle_total": "int",
        "keepalive_idle_timeout": "float",
        "keepalive_max_uses": "int",
        "http_upstream_mode": "str",
    },
    "storage": {"url": "str"},
    "admin": {"listen": "str", "token": "str"},
    "checks": {
        "enabled": "bool",
        "interval": "float",
        "timeout": "float",
        "concurrency": "int",
        "judge_url": "str",
        "site_reach": "str_list",
    },
    "pools": {
        "name": "str",
        "selector": "str",
        "sticky_ttl": "float",
        "retries": "int",
        "max_concurrency": "int",
        "description": "str",
        "on_sticky_failure": "str",
        "failures_to_eject": "int",
        "base_ejection_s": "float",
        "max_ejection_s": "float",
        "max_ejection_percent": "float",
        "success_rate_ejection": "bool",
        "proxies": "str_list",
        "proxies_file": "str",
    },
    "listeners": {"listen": "str", "pool": "str"},
}
_SECTIONS = ("gateway", "storage", "admin", "checks")
_ARRAYS = ("pools", "listeners")
ENV_PREFIX = "PROXYGATE_"
_MISSING = object()
# TOML's bare keys; other keys are shown quoted, as TOML would need them.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TYPE_NAMES = {
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the command line sets; applied over the file and the environment.

    `listen` replaces `gateway.listen`. `upstreams` and `proxies_file` replace the proxies of
    the default pool (`gateway.default_pool`), which is created if no pool has that name.
    `admin` "" disables the admin listener. Empty values leave the setting alone.
    """

    listen: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    proxies_file: str | None = None
    admin: str | None = None
    log_level: str | None = None
    storage_url: str | None = None


@dataclass(slots=True)
class RawConfig:
    """The merged, not yet validated configuration, and where its values came from."""

    data: dict[str, Any]
    #: Where a value with no recorded origin came from: the file's path, or "defaults".
    source: str = "defaults"
    #: The directory relative paths in the file are resolved against.
    base_dir: Path | None = None
    #: Origins of values written by the environment or the command line, by key path.
    origins: dict[KeyPath, str] = field(default_factory=dict)

    def origin(self, path: KeyPath) -> str | None:
        """The environment variable or flag that wrote `path` (or a parent), None for the file."""
        for end in range(len(path), 0, -1):
            found = self.origins.get(path[:end])
            if found is not None:
                return found
        return None

    def source_of(self, path: KeyPath) -> str:
        return self.origin(path) or self.source

    def fail(self, path: KeyPath, reason: str) -> NoReturn:
        # Called from except blocks too: the user gets the message, not a chained traceback.
        raise ConfigError(self.source_of(path), format_path(path), reason) from None

    def set(self, path: KeyPath, value: object, origin: str) -> None:
        """Write `value` at `path` (a table key or a list index), recording its origin."""
        parent = self._parent(path)
        if isinstance(parent, list) and path[-1] == len(parent):
            parent.append(value)
        else:
            parent[path[-1]] = value
        self._forget(path)
        self.origins[path] = origin

    def delete(self, path: KeyPath) -> None:
        self._parent(path).pop(path[-1], None)
        self._forget(path)

    def _parent(self, path: KeyPath) -> Any:
        node: Any = self.data
        for part, child in itertools.pairwise(path):
            if isinstance(part, str):
                node = node.setdefault(part, [] if isinstance(child, int) else {})
            else:
                node = node[part]
        return node

    def _forget(self, path: KeyPath) -> None:
        # A replaced value takes its children with it, so their origins must go too.
        for known in [known for known in self.origins if known[: len(path)] == path]:
            del self.origins[known]


def format_path(path: KeyPath) -> str:
    """("pools", 1, "selector") -> "pools[1].selector"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            text += f".{name}" if text else name
    return text


def read_file(path: str | os.PathLike[str]) -> RawConfig:
    """Read a TOML configuration file and check its shape: known tables and keys only."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(name, None, f"cannot read the configuration file: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, None, "the configuration file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message gives a position, never the text around it.
        raise ConfigError(name, None, f"invalid TOML: {exc}") from None
    raw = RawConfig(data, name, Path(name).parent)
    _check_shape(raw)
    return raw


def _check_shape(raw: RawConfig) -> None:
    for top, value in raw.data.items():
        if top in _SECTIONS:
            if not isinstance(value, dict):
                raw.fail((top,), f"expected a table ([{top}]), got {type_name(value)}")
            _check_keys(raw, (top,), value, KEYS[top])
        elif top in _ARRAYS:
            if not isinstance(value, list):
                raw.fail((top,), f"expected an array of tables ([[{top}]]), got {type_name(value)}")
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raw.fail((top, index), f"expected a table, got {type_name(item)}")
                _check_keys(raw, (top, index), item, KEYS[top])
        else:
            what = "table" if isinstance(value, dict | list) else "key"
            raw.fail((top,), unknown(what, top, (*_SECTIONS, *_ARRAYS)))


def _check_keys(
    raw: RawConfig, path: KeyPath, table: dict[str, Any], known: Mapping[str, Kind]
) -> None:
    for key in table:
        if key not in known:
            raw.fail((*path, key), unknown("key", key, known))


def unknown(what: str, name: str, known: Iterable[str], env: tuple[str, str] | None = None) -> str:
    """ "unknown key (did you mean x?)"; `env` (prefix, suffix) spells x as a variable name."""
    return f"unknown {what}{did_you_mean(name, known, env)}"


def did_you_mean(name: str, known: Iterable[str], env: tuple[str, str] | None = None) -> str:
    """ " (did you mean x?)" for the closest of `known`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if not close:
        return ""
    hint = f"{env[0]}{close[0].upper()}{env[1]}" if env else close[0]
    return f" (did you mean {hint}?)"


def type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(value), "a date or time")


def apply_env(raw: RawConfig, env: Mapping[str, str]) -> None:
    """Apply `PROXYGATE_<SECTION>__<KEY>` and `PROXYGATE_POOLS__<NAME>__<KEY>` variables.

    Variables with the prefix but no "__" (such as PROXYGATE_REQUIRE_ALL) are not settings and
    are ignored. Values are read according to the key's kind:

    - strings: the raw text, unless it is a quoted TOML string;
    - numbers and tables: a TOML value (`2.5`, `{alice = "pw"}`), else the raw text, which then
      fails validation with the variable named;
    - lists: a TOML array (`["a", "b"]`), else comma-separated items (`a,b`; "" is empty).

    Pool variables come last, after `supply_default_pool`, so that without configured pools
    they tune the implicit default pool (named by a variable, perhaps).
    """
    names = [name for name in env if name.startswith(ENV_PREFIX) and "__" in name]
    sections = sorted(name for name in names if not _is_pool_variable(name))
    pools = sorted(name for name in names if _is_pool_variable(name))
    written: dict[KeyPath, str] = {}
    for name in sections:
        _apply_variable(raw, name, env[name], written)
    supply_default_pool(raw)
    for name in pools:
        _apply_variable(raw, name, env[name], written)


def supply_default_pool(raw: RawConfig) -> None:
    """Without any pool, add the one `gateway.default_pool` names, leading out directly.

    This is what makes the gateway work as a plain forward proxy with no configuration. A
    default_pool of the wrong type is left for validation to report.
    """
    if raw.data.get("pools"):
        return
    name = raw.data.get("gateway", {}).get("default_pool", "default")
    if isinstance(name, str):
        raw.set(("pools", 0), {"name": name, "proxies": ["direct://"]}, "defaults")


def _is_pool_variable(name: str) -> bool:
    return name[len(ENV_PREFIX) :].partition("__")[0].lower() == "pools"


def _apply_variable(raw: RawConfig, name: str, value: str, written: dict[KeyPath, str]) -> None:
    origin = f"environment variable {name}"
    path, kind = _env_target(raw, name, origin)
    if path in written:
        raise ConfigError(origin, format_path(path), f"{written[path]} sets it too")
    written[path] = name
    raw.set(path, _env_value(value, kind), origin)


def _env_target(raw: RawConfig, name: str, origin: str) -> tuple[KeyPath, Kind]:
    section, _, rest = name[len(ENV_PREFIX) :].partition("__")
    section = section.lower()
    if section in _SECTIONS:
        key = rest.lower()
        known = KEYS[section]
        if key not in known:
            env = (f"{ENV_PREFIX}{section.upper()}__", "")
            raise ConfigError(origin, f"{section}.{key}", unknown("key", key, known, env))
        return (section, key), known[key]
    if section == "pools":
        pool, sep, key = rest.rpartition("__")
        key = key.lower()
        if not sep or not pool:
            raise ConfigError(origin, None, f"expected {ENV_PREFIX}POOLS__<NAME>__<KEY>")
        index = _find_pool(raw, pool, origin)
        known = {k: v for k, v in KEYS["pools"].items() if k != "name"}
        if key not in known:
            env = (f"{ENV_PREFIX}POOLS__{pool}__", "")
            raise ConfigError(origin, f"pools[{index}].{key}", unknown("key", key, known, env))
        return ("pools", index, key), known[key]
    reason = unknown("section", section, (*_SECTIONS, "pools"), (ENV_PREFIX, "__..."))
    raise ConfigError(
        origin, None, f"{reason}; the environment sets keys of gateway, storage, admin and pools"
    )


def _find_pool(raw: RawConfig, wanted: str, origin: str) -> int:
    pools = raw.data.get("pools", [])
    matches = [
        index
        for index, pool in enumerate(pools)
        if isinstance(pool.get("name"), str) and pool["name"].lower() == wanted.lower()
    ]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(repr(p["name"]) for p in pools if isinstance(p.get("name"), str)) or "none"
    if not matches:
        raise ConfigError(origin, "pools", f"no pool is named {wanted!r} (pools: {names})")
    raise ConfigError(origin, "pools", f"more than one pool is named {wanted!r} (ignoring case)")


def _env_value(text: str, kind: Kind) -> object:
    parsed = _toml_value(text)
    if kind == "str":
        return parsed if isinstance(parsed, str) else text
    if kind in ("str_list", "int_list"):
        if isinstance(parsed, list):
            return parsed
        items = [item.strip() for item in text.split(",") if item.strip()]
        item_kind: Kind = "str" if kind == "str_list" else "int"
        return [_env_value(item, item_kind) for item in items]
    return text if parsed is _MISSING else parsed


def _toml_value(text: str) -> object:
    try:
        document = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return _MISSING
    # A newline in the text could smuggle in further keys: then it was no single value.
    return document["value"] if list(document) == ["value"] else _MISSING


def apply_overrides(raw: RawConfig, overrides: Overrides) -> None:
    """Apply the command line's scalar settings.

    `upstreams` and `proxies_file` wait for validation: the default pool they fill is only
    known once `gateway.default_pool` is.
    """
    if overrides.listen:
        raw.set(("gateway", "listen"), list(overrides.listen), "command line --listen")
    if overrides.admin is not None:
        raw.set(("admin", "listen"), overrides.admin, "command line --admin")
    if overrides.log_level is not None:
        raw.set(("gateway", "log_level"), overrides.log_level, "command line --log-level")
    if overrides.storage_url is not None:
        raw.set(("storage", "url"), overrides.storage_url, "command line --storage")
