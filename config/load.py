"""Validation: the merged raw layers into `Settings`, every check in one place."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from config.addresses import parse_listen_address
from config.proxies import (
    UpstreamEntry,
    parse_proxies_text,
    parse_proxy_entry,
    read_proxies_text,
    unique_upstreams,
)
from config.schema import (
    LOG_LEVELS,
    AdminSettings,
    CheckSettings,
    GatewaySettings,
    HttpUpstreamMode,
    ListenAddress,
    ListenerSettings,
    PoolSettings,
    Settings,
    StorageSettings,
    Users,
    redact_url,
)
from config.sources import (
    KeyPath,
    Overrides,
    RawConfig,
    apply_env,
    apply_overrides,
    did_you_mean,
    format_path,
    read_file,
    type_name,
)
from core.endpoints import Endpoint
from core.errors import InvalidUpstreamURL
from core.models import HealthPolicy, Selector, StickyFailure

__all__ = ["load_settings"]

# No "-": the gateway reads the account and the pool out of a proxy username split on "-".
_NAME = re.compile(r"[A-Za-z0-9_.]+")
_STORAGE_SCHEMES = ("memory", "sqlite", "postgresql", "postgres")

T = TypeVar("T")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Settings:
    """Read the configuration once, at start-up: the file, then `env`, then `overrides`.

    Later layers win: flags over environment over file over defaults. `path` None reads no
    file. `env` defaults to `os.environ`; only `PROXYGATE_<SECTION>__<KEY>` and
    `PROXYGATE_POOLS__<NAME>__<KEY>` variables are read (see `config.sources.apply_env`).
    `overrides` are the command-line flags; --upstream and --proxies-file replace the
    upstreams of the pool `gateway.default_pool` names, creating it if needed.

    When no pool is configured and no upstream given, one pool named `gateway.default_pool`
    ("default") leads out directly (`direct://`), so the gateway works as a plain forward proxy.

    Raises `ConfigError` for anything invalid, naming the source, the key and the reason.
    """
    raw = read_file(path) if path is not None else RawConfig({})
    # This also supplies the implicit direct pool when no pool is configured.
    apply_env(raw, os.environ if env is None else env)
    overrides = overrides or Overrides()
    apply_overrides(raw, overrides)
    return _Builder(raw).build(overrides)


class _Table:
    """One table of the raw tree, read key by key: absent keys keep their defaults."""

    def __init__(self, at: KeyPath, values: Mapping[str, Any]) -> None:
        self.at = at
        self.values = values

    def get(self, key: str, read: Callable[[KeyPath, Any], T], default: T) -> T:
        return read((*self.at, key), self.values[key]) if key in self.values else default


class _Builder:
    def __init__(self, raw: RawConfig) -> None:
        self.raw = raw
        self.fail = raw.fail

    def build(self, overrides: Overrides) -> Settings:
        gateway = self.gateway()
        storage = self.storage()
        admin = self.admin()
        self.fill_default_pool(gateway.default_pool, overrides)
        pools = self.pools()
        settings = Settings(
            gateway,
            storage,
            admin,
            pools,
            self.listeners(pools),
            self.raw.source,
            checks=self.checks(),
        )
        self.check_default_pool(settings)
        self.check_addresses(settings)
        self.check_exposure(settings)
        return settings

    # Sections.

    def gateway(self) -> GatewaySettings:
        table = _Table(("gateway",), self.raw.data.get("gateway", {}))
        default = GatewaySettings()
        seconds = self.seconds
        return GatewaySettings(
            listen=table.get("listen", self.listen_list, default.listen),
            default_pool=table.get("default_pool", self.name, default.default_pool),
            acquire_timeout=table.get("acquire_timeout", seconds, default.acquire_timeout),
            connect_timeout=table.get("connect_timeout", seconds, default.connect_timeout),
            idle_timeout=table.get("idle_timeout", seconds, default.idle_timeout),
            header_timeout=table.get("header_timeout", seconds, default.header_timeout),
            drain_timeout=table.get("drain_timeout", seconds, default.drain_timeout),
            users=table.get("users", self.users, default.users),
            deny_destinations=table.get(
                "deny_destinations", self.networks, default.deny_destinations
            ),
            connect_ports=table.get("connect_ports", self.ports, default.connect_ports),
            log_level=table.get("log_level", self.log_level, default.log_level),
            retry_budget_percent=table.get(
                "retry_budget_percent", self.percent, default.retry_budget_percent
            ),
            retry_budget_min=table.get("retry_budget_min", self.count, default.retry_budget_min),
            response_timeout=table.get("response_timeout", seconds, default.response_timeout),
            keepalive_max_idle=table.get(
                "keepalive_max_idle", self.count, default.keepalive_max_idle
            ),
            keepalive_max_idle_total=table.get(
                "keepalive_max_idle_total", self.count, default.keepalive_max_idle_total
            ),
            keepalive_idle_timeout=table.get(
                "keepalive_idle_timeout", seconds, default.keepalive_idle_timeout
            ),
            keepalive_max_uses=table.get(
                "keepalive_max_uses", self.positive, default.keepalive_max_uses
            ),
            http_upstream_mode=table.get(
                "http_upstream_mode", self.http_upstream_mode, default.http_upstream_mode
            ),
        )

    def storage(self) -> StorageSettings:
        table = self.raw.data.get("storage", {})
        if "url" not in table:
            return StorageSettings()
        url = self.string(("storage", "url"), table["url"])
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.lower() not in _STORAGE_SCHEMES:
            self.fail(
                ("storage", "url"),
                f"unsupported storage URL {redact_url(url)!r}: expected memory://, "
                "sqlite:///path.db or postgresql://user:password@host/database",
            )
        return StorageSettings(url)

    def admin(self) -> AdminSettings:
        table = self.raw.data.get("admin", {})
        admin = AdminSettings()
        if "listen" in table:
            text = self.string(("admin", "listen"), table["listen"])
            # "" is how a file, a variable or a flag says "no admin listener".
            admin = replace(admin, listen=self.listen(("admin", "listen"), text) if text else None)
        if "token" in table:
            token = self.string(("admin", "token"), table["token"])
            admin = replace(admin, token=token or None)
        return admin

    def checks(self) -> CheckSettings:
        table = _Table(("checks",), self.raw.data.get("checks", {}))
        default = CheckSettings()
        judge = table.get("judge_url", self.http_url, "")
        return CheckSettings(
            enabled=table.get("enabled", self.boolean, default.enabled),
            interval=table.get("interval", self.seconds, default.interval),
            timeout=table.get("timeout", self.seconds, default.timeout),
            concurrency=table.get("concurrency", self.positive, default.concurrency),
            judge_url=judge or None,
            site_reach=tuple(table.get("site_reach", self.http_urls, list(default.site_reach))),
        )

    def fill_default_pool(self, name: str, overrides: Overrides) -> None:
        """Put --upstream/--proxies-file into the default pool, creating it if needed."""
        pools = self.raw.data.setdefault("pools", [])
        if not overrides.upstreams and overrides.proxies_file is None:
            return
        flag = "command line --upstream" if overrides.upstreams else "command line --proxies-file"
        index = next((i for i, pool in enumerate(pools) if pool.get("name") == name), len(pools))
        if index == len(pools):
            self.raw.set(("pools", index), {"name": name}, flag)
        if overrides.upstreams:
            upstreams = list(overrides.upstreams)
            self.raw.set(("pools", index, "proxies"), upstreams, "command line --upstream")
        else:
            self.raw.delete(("pools", index, "proxies"))
        if overrides.proxies_file is not None:
            file = overrides.proxies_file
            self.raw.set(("pools", index, "proxies_file"), file, "command line --proxies-file")
        else:
            self.raw.delete(("pools", index, "proxies_file"))

    def pools(self) -> tuple[PoolSettings, ...]:
        pools: list[PoolSettings] = []
        first: dict[str, int] = {}
        for index, entry in enumerate(self.raw.data["pools"]):
            at = ("pools", index)
            if "name" not in entry:
                self.fail(at, 'the pool has no name: add name = "..."')
            name = self.name((*at, "name"), entry["name"])
            # Names are unique ignoring case, as PROXYGATE_POOLS__<NAME>__* matches them.
            if name.lower() in first:
                other = first[name.lower()]
                self.fail((*at, "name"), f"pool {name!r} is already defined at pools[{other}]")
            first[name.lower()] = index
            table, default = _Table(at, entry), PoolSettings(name)
            pool = PoolSettings(
                name=name,
                selector=table.get("selector", self.selector, default.selector),
                sticky_ttl=table.get("sticky_ttl", self.seconds, default.sticky_ttl),
                retries=table.get("retries", self.retries, default.retries),
                max_concurrency=table.get(
                    "max_concurrency", self.max_concurrency, default.max_concurrency
                ),
                description=table.get("description", self.string, default.description),
                upstreams=self.upstreams(at, entry),
                health=self.health_policy(table, default.health),
                on_sticky_failure=table.get(
                    "on_sticky_failure", self.sticky_failure, default.on_sticky_failure
                ),
            )
            pools.append(pool)
        return tuple(pools)

    def health_policy(self, table: _Table, default: HealthPolicy) -> HealthPolicy:
        seconds = self.seconds
        policy = HealthPolicy(
            failures_to_eject=table.get(
                "failures_to_eject", self.positive, default.failures_to_eject
            ),
            base_ejection_s=table.get("base_ejection_s", seconds, default.base_ejection_s),
            max_ejection_s=table.get("max_ejection_s", seconds, default.max_ejection_s),
            max_ejection_percent=table.get(
                "max_ejection_percent", self.percent, default.max_ejection_percent
            ),
            success_rate_ejection=table.get(
                "success_rate_ejection", self.boolean, default.success_rate_ejection
            ),
        )
        if policy.max_ejection_s < policy.base_ejection_s:
            self.fail(
                (*table.at, "max_ejection_s"),
                f"must be at least base_ejection_s ({policy.base_ejection_s:g}), "
                f"got {policy.max_ejection_s:g}",
            )
        return policy

    def upstreams(self, at: KeyPath, entry: dict[str, Any]) -> tuple[Endpoint, ...]:
        entries: list[UpstreamEntry] = []
        if "proxies" in entry:
            for index, text in enumerate(self.strings((*at, "proxies"), entry["proxies"])):
                path = (*at, "proxies", index)
                try:
                    endpoint = parse_proxy_entry(text)
                except InvalidUpstreamURL as exc:
                    self.fail(path, str(exc))
                source, key = self.raw.source_of(path), format_path(path)
                entries.append(UpstreamEntry(endpoint, source, key, f"{key} ({source})"))
        if "proxies_file" in entry:
            path = (*at, "proxies_file")
            file = self.proxies_path(path, self.string(path, entry["proxies_file"]))
            source, key = self.raw.source_of(path), format_path(path)
            entries += parse_proxies_text(read_proxies_text(file, source, key), str(file), key)
        return unique_upstreams(entries)

    def proxies_path(self, path: KeyPath, text: str) -> Path:
        if not text:
            self.fail(path, "the path is empty")
        file = Path(text).expanduser()
        # The file's paths are relative to the file; a variable's or a flag's to the cwd.
        if self.raw.base_dir is not None and self.raw.origin(path) is None:
            file = self.raw.base_dir / file
        return file

    def listeners(self, pools: tuple[PoolSettings, ...]) -> tuple[ListenerSettings, ...]:
        names = [pool.name for pool in pools]
        listeners = []
        for index, entry in enumerate(self.raw.data.get("listeners", [])):
            at = ("listeners", index)
            if "listen" not in entry:
                self.fail(at, 'the listener has no address: add listen = "127.0.0.1:port"')
            address = self.listen((*at, "listen"), entry["listen"])
            pool = None
            if "pool" in entry:
                pool = self.name((*at, "pool"), entry["pool"])
                if pool not in names:
                    self.fail((*at, "pool"), self.no_such_pool(pool, names))
            listeners.append(ListenerSettings(address, pool))
        return tuple(listeners)

    # Checks across sections.

    def check_default_pool(self, settings: Settings) -> None:
        names = [pool.name for pool in settings.pools]
        name = settings.gateway.default_pool
        if name not in names:
            reason = self.no_such_pool(name, names)
            self.fail(
                ("gateway", "default_pool"),
                f"{reason}: set gateway.default_pool to one of them, add a pool named "
                f"{name!r}, or give upstreams with --upstream",
            )

    def check_addresses(self, settings: Settings) -> None:
        bound: list[tuple[KeyPath, ListenAddress]] = []
        for path, address in self.addresses(settings):
            for other_path, other in bound:
                if _overlap(address, other):
                    where = format_path(other_path)
                    if self.raw.source_of(other_path) != self.raw.source_of(path):
                        where += f" ({self.raw.source_of(other_path)})"
                    same = "is the same address as" if address == other else f"overlaps {other} of"
                    self.fail(path, f"{address} {same} {where}")
            bound.append((path, address))
        if not settings.all_listeners():
            self.fail(("gateway", "listen"), "no listen address: set it or add [[listeners]]")

    def check_exposure(self, settings: Settings) -> None:
        for path, address in self.addresses(settings):
            if address.is_loopback:
                continue
            loopback = "[::1]" if ":" in address.host else "127.0.0.1"
            if path[0] != "admin" and not settings.gateway.users:
                self.fail(
                    path,
                    f"listens on {address}, which is not loopback, and gateway.users is empty: "
                    f"add users or listen on {loopback}",
                )
            if path[0] == "admin" and settings.admin.token is None:
                self.fail(
                    path,
                    f"listens on {address}, which is not loopback, and admin.token is empty: "
                    f"set admin.token (or PROXYGATE_ADMIN__TOKEN) or listen on {loopback}",
                )

    def addresses(self, settings: Settings) -> list[tuple[KeyPath, ListenAddress]]:
        """Every bound address with its key: gateway.listen, [[listeners]], then admin."""
        listen = self.raw.data.get("gateway", {}).get("listen")
        # A single string stands for the whole list: its key has no index.
        single = isinstance(listen, str)
        found: list[tuple[KeyPath, ListenAddress]] = [
            (("gateway", "listen") if single else ("gateway", "listen", index), address)
            for index, address in enumerate(settings.gateway.listen)
        ]
        found += [
            (("listeners", index, "listen"), listener.listen)
            for index, listener in enumerate(settings.listeners)
        ]
        if settings.admin.listen is not None:
            found.append((("admin", "listen"), settings.admin.listen))
        return found

    def no_such_pool(self, name: str, names: list[str]) -> str:
        pools = ", ".join(repr(n) for n in names) or "none"
        return f"no pool is named {name!r} (pools: {pools})"

    # Values. Type errors name the type found, never the value: it may be a secret.

    def string(self, path: KeyPath, value: Any) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {type_name(value)}")
        return value

    def strings(self, path: KeyPath, value: Any) -> list[str]:
        if not isinstance(value, list):
            self.fail(path, f"expected an array of strings, got {type_name(value)}")
        return [self.string((*path, index), item) for index, item in enumerate(value)]

    def integer(self, path: KeyPath, value: Any, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {type_name(value)}")
        if value < minimum:
            self.fail(path, f"must be at least {minimum}, got {value}")
        return value

    def seconds(self, path: KeyPath, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a number of seconds, got {type_name(value)}")
        if not math.isfinite(value) or value <= 0:
            self.fail(path, f"must be a number of seconds greater than 0, got {value}")
        return float(value)

    def choice(self, path: KeyPath, value: Any, choices: Sequence[str]) -> str:
        text = self.string(path, value).lower()
        if text not in choices:
            hint = did_you_mean(text, choices)
            self.fail(path, f"{value!r} is not one of {', '.join(choices)}{hint}")
        return text

    def log_level(self, path: KeyPath, value: Any) -> str:
        return self.choice(path, value, LOG_LEVELS)

    def http_upstream_mode(self, path: KeyPath, value: Any) -> HttpUpstreamMode:
        return HttpUpstreamMode(self.choice(path, value, list(HttpUpstreamMode)))

    def selector(self, path: KeyPath, value: Any) -> Selector:
        return Selector(self.choice(path, value, list(Selector)))

    def sticky_failure(self, path: KeyPath, value: Any) -> StickyFailure:
        return StickyFailure(self.choice(path, value, list(StickyFailure)))

    def boolean(self, path: KeyPath, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {type_name(value)}")
        return value

    def positive(self, path: KeyPath, value: Any) -> int:
        return self.integer(path, value, minimum=1)

    def count(self, path: KeyPath, value: Any) -> int:
        return self.integer(path, value, minimum=0)

    def percent(self, path: KeyPath, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a percentage, got {type_name(value)}")
        if not 0 <= value <= 100:
            self.fail(path, f"must be a percentage from 0 to 100, got {value}")
        return float(value)

    def http_url(self, path: KeyPath, value: Any) -> str:
        text = self.string(path, value)
        if text and not text.lower().startswith(("http://", "https://")):
            self.fail(path, f"expected an http:// or https:// URL, got {text!r}")
        return text

    def http_urls(self, path: KeyPath, value: Any) -> list[str]:
        if not isinstance(value, list):
            self.fail(path, f"expected an array of URLs, got {type_name(value)}")
        return [self.http_url((*path, index), item) for index, item in enumerate(value)]

    def retries(self, path: KeyPath, value: Any) -> int:
        return self.integer(path, value, minimum=0)

    def max_concurrency(self, path: KeyPath, value: Any) -> int | None:
        # Typed as the field, so `_Table.get` accepts None as its default.
        return self.integer(path, value, minimum=1)

    def name(self, path: KeyPath, value: Any) -> str:
        text = self.string(path, value)
        if not _NAME.fullmatch(text):
            self.fail(path, f"{text!r} is not a valid name: use letters, digits, '_' and '.'")
        return text

    def listen(self, path: KeyPath, value: Any) -> ListenAddress:
        try:
            return parse_listen_address(self.string(path, value))
        except ValueError as exc:
            self.fail(path, str(exc))

    def listen_list(self, path: KeyPath, value: Any) -> tuple[ListenAddress, ...]:
        if isinstance(value, str):
            return (self.listen(path, value),)
        texts = self.strings(path, value)
        return tuple(self.listen((*path, index), text) for index, text in enumerate(texts))

    def users(self, path: KeyPath, value: Any) -> Users:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table of user = password, got {type_name(value)}")
        for user, password in value.items():
            self.name((*path, user), user)
            if not isinstance(password, str):
                self.fail((*path, user), f"expected a password string, got {type_name(password)}")
            if not password:
                self.fail((*path, user), "the password is empty")
        return Users(value)

    def networks(
        self, path: KeyPath, value: Any
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        networks = []
        for index, text in enumerate(self.strings(path, value)):
            try:
                networks.append(ipaddress.ip_network(text.strip()))
            except ValueError as exc:
                self.fail((*path, index), f"not a network in CIDR notation: {exc}")
        return tuple(networks)

    def ports(self, path: KeyPath, value: Any) -> frozenset[int]:
        if not isinstance(value, list):
            self.fail(path, f"expected an array of ports, got {type_name(value)}")
        ports = set()
        for index, item in enumerate(value):
            port = self.integer((*path, index), item, minimum=1)
            if port > 65535:
                self.fail((*path, index), f"must be a port (1-65535), got {port}")
            ports.add(port)
        return frozenset(ports)


def _overlap(one: ListenAddress, other: ListenAddress) -> bool:
    """Whether binding both would fail: port 0 picks a free port, so it never collides.

    0.0.0.0 overlaps every IPv4 address of its port and :: every IPv6 one; IPv4 and IPv6 do
    not overlap because asyncio binds IPv6 sockets with IPV6_V6ONLY.
    """
    if one.port != other.port or one.port == 0:
        return False
    if one.host == other.host:
        return True
    same_family = (":" in one.host) == (":" in other.host)
    return same_family and (one.is_unspecified or other.is_unspecified)
