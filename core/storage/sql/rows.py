"""Rows to models and back: the only place that knows how a model is laid out in the tables."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

from core.endpoints import Endpoint, Scheme
from core.models import (
    HealthPolicy,
    HealthStatus,
    Lease,
    Pool,
    Selector,
    StickyFailure,
    Upstream,
)
from core.storage.sql.tables import TAG_SEPARATOR, UNLIMITED

__all__ = [
    "HEALTH_FIELDS",
    "decode_pool",
    "decode_tags",
    "encode_pool",
    "encode_tags",
    "lease_from_row",
    "limit_of",
    "upstream_from_row",
    "upstream_values",
]

#: The Upstream fields that `record_outcome`, ejection and re-admission write.
HEALTH_FIELDS = (
    "status",
    "failure_streak",
    "latency_ewma",
    "last_error",
    "checked_at",
    "ejected_until",
    "times_ejected",
    "window_start",
    "window_ok",
    "window_failed",
    "previous_ok",
    "previous_failed",
)
_ATTRIBUTES = (
    "country",
    "city",
    "asn",
    "isp",
    "source",
    "weight",
    "max_concurrency",
    "latitude",
    "longitude",
)


def encode_tags(tags: Iterable[str]) -> str:
    ordered = sorted(tags)
    if not ordered:
        return ""
    return TAG_SEPARATOR + TAG_SEPARATOR.join(ordered) + TAG_SEPARATOR


def decode_tags(text: str) -> frozenset[str]:
    if not text:
        return frozenset()
    return frozenset(text[1:-1].split(TAG_SEPARATOR))


def limit_of(upstream_limit: int | None, pool_limit: int | None) -> int:
    """The effective concurrency limit stored in `upstreams.lim`."""
    limit = upstream_limit if upstream_limit is not None else pool_limit
    return UNLIMITED if limit is None else limit


def upstream_values(upstream: Upstream, pool_limit: int | None) -> dict[str, Any]:
    """An upstream as an `upstreams` row (leasing state at its defaults)."""
    endpoint = upstream.endpoint
    values: dict[str, Any] = {
        "id": upstream.id,
        "pool": upstream.pool,
        "scheme": endpoint.scheme.value,
        "host": endpoint.host,
        "port": endpoint.port,
        "username": endpoint.username,
        "password": endpoint.password,
        "tags": encode_tags(upstream.tags),
        "lim": limit_of(upstream.max_concurrency, pool_limit),
    }
    for name in _ATTRIBUTES:
        values[name] = getattr(upstream, name)
    for name in HEALTH_FIELDS:
        values[name] = getattr(upstream, name)
    values["status"] = upstream.status.value
    return values


def upstream_from_row(row: Any) -> Upstream:
    """Build an Upstream from an `upstreams` row: a SQLAlchemy Row, or any mapping of its
    columns (asyncpg's records on the fast paths)."""
    m = getattr(row, "_mapping", row)
    endpoint = Endpoint(Scheme(m["scheme"]), m["host"], m["port"], m["username"], m["password"])
    tags = m["tags"]
    return Upstream(
        endpoint,
        m["pool"],
        id=m["id"],
        country=m["country"],
        city=m["city"],
        asn=m["asn"],
        isp=m["isp"],
        source=m["source"],
        tags=decode_tags(tags) if tags else frozenset(),
        weight=m["weight"],
        max_concurrency=m["max_concurrency"],
        latitude=m["latitude"],
        longitude=m["longitude"],
        status=HealthStatus(m["status"]),
        failure_streak=m["failure_streak"],
        latency_ewma=m["latency_ewma"],
        last_error=m["last_error"],
        checked_at=m["checked_at"],
        ejected_until=m["ejected_until"],
        times_ejected=m["times_ejected"],
        window_start=m["window_start"],
        window_ok=m["window_ok"],
        window_failed=m["window_failed"],
        previous_ok=m["previous_ok"],
        previous_failed=m["previous_failed"],
    )


def lease_from_row(row: Any, upstream: Upstream) -> Lease:
    """Build a Lease from a `leases` row whose id column is labelled `lease_id`."""
    return Lease(
        str(row.lease_id),
        upstream,
        row.lease_pool,
        row.consumer,
        row.session,
        row.acquired_at,
        row.expires_at,
        row.holder,
        idle_ttl=row.idle_ttl,
        uses=row.uses,
        rebound_from=row.rebound_from,
    )


# -- pools: every setting but the name, as JSON, so a new Pool field needs no new column --------


def encode_pool(pool: Pool) -> dict[str, Any]:
    settings = {
        f.name: _plain(getattr(pool, f.name)) for f in dataclasses.fields(pool) if f.name != "name"
    }
    return {
        "name": pool.name,
        "selector": pool.selector.value,
        "max_concurrency": pool.max_concurrency,
        "settings": json.dumps(settings, sort_keys=True),
    }


def decode_pool(name: str, settings_json: str) -> Pool:
    settings: Mapping[str, Any] = json.loads(settings_json)
    known = {f.name for f in dataclasses.fields(Pool)}
    values = {key: value for key, value in settings.items() if key in known}
    if "selector" in values:
        values["selector"] = Selector(values["selector"])
    if "on_sticky_failure" in values:
        values["on_sticky_failure"] = StickyFailure(values["on_sticky_failure"])
    if "health" in values:
        policy_fields = {f.name for f in dataclasses.fields(HealthPolicy)}
        values["health"] = HealthPolicy(
            **{k: v for k, v in values["health"].items() if k in policy_fields}
        )
    return Pool(name, **values)


def _plain(value: object) -> object:
    """A JSON-ready copy of a setting: enums by value, dataclasses as objects."""
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
