"""proxygate's settings: parsed once at start-up into frozen values (see `load_settings`)."""

from __future__ import annotations

from config.addresses import parse_listen_address
from config.errors import ConfigError
from config.load import load_settings
from config.proxies import parse_proxies_file, parse_proxy_entry
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
from config.sources import Overrides

__all__ = [
    "LOG_LEVELS",
    "AdminSettings",
    "CheckSettings",
    "ConfigError",
    "GatewaySettings",
    "HttpUpstreamMode",
    "ListenAddress",
    "ListenerSettings",
    "Overrides",
    "PoolSettings",
    "Settings",
    "StorageSettings",
    "Users",
    "load_settings",
    "parse_listen_address",
    "parse_proxies_file",
    "parse_proxy_entry",
    "redact_url",
]
