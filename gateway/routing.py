"""Which pool, session and country a request asks for. Pure functions, no I/O.

First match wins, per key: request headers (`X-Proxy-Pool`, `X-Proxy-Session`,
`X-Proxy-Country`), then parameters in the proxy username, then the listener's own pool, then
the gateway's default pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from gateway.errors import BadRequest

__all__ = ["Route", "UsernameParams", "choose_route", "parse_username"]

_KEYS: Final = frozenset({"pool", "session", "country", "sessttl"})
_VALUE: Final = re.compile(r"[A-Za-z0-9_.]{1,128}")
_COUNTRY: Final = re.compile(r"[A-Za-z]{2}")
_MAX_SESSION_TTL: Final = 7 * 24 * 3600.0


@dataclass(slots=True, frozen=True)
class UsernameParams:
    account: str
    pool: str | None = None
    session: str | None = None
    country: str | None = None
    session_ttl: float | None = None


@dataclass(slots=True, frozen=True)
class Route:
    pool: str
    consumer: str
    session: str | None
    country: str | None
    session_ttl: float | None


def parse_username(username: str) -> UsernameParams:
    """Split a proxy username into its account and routing parameters.

    Grammar (the commercial gateways' convention; values hold no ``-``)::

        username = account *( "-" key "-" value )
        key      = "pool" | "session" | "country" | "sessttl"

    Keys come in any order after the account. A username whose tail is not a sequence of known
    key/value pairs is just the account (``bob-smith`` is the account "bob-smith"). Raises
    BadRequest for a known key with a malformed value, or a key given twice.
    """
    account, sep, rest = username.partition("-")
    if not sep:
        return UsernameParams(username)
    parts = rest.split("-")
    if len(parts) % 2 or any(key not in _KEYS for key in parts[::2]):
        return UsernameParams(username)
    found: dict[str, str] = {}
    for key, value in zip(parts[::2], parts[1::2], strict=True):
        if key in found:
            raise BadRequest(f"username parameter {key!r} given twice")
        if not _VALUE.fullmatch(value):
            raise BadRequest(f"username parameter {key!r} has a malformed value")
        found[key] = value
    return UsernameParams(
        account,
        pool=found.get("pool"),
        session=found.get("session"),
        country=_country(found.get("country")),
        session_ttl=_session_ttl(found.get("sessttl")),
    )


def choose_route(
    *,
    header_pool: str | None,
    header_session: str | None,
    header_country: str | None,
    username: UsernameParams | None,
    listener_pool: str | None,
    default_pool: str,
) -> Route:
    """Apply the precedence: headers, username parameters, listener pool, default pool."""
    params = username or _ANONYMOUS
    pool = header_pool or params.pool or listener_pool or default_pool
    session = header_session if header_session is not None else params.session
    if session is not None and not _VALUE.fullmatch(session):
        raise BadRequest("session id must be 1-128 letters, digits, '_' or '.'")
    if header_pool is not None and not _VALUE.fullmatch(header_pool):
        raise BadRequest("malformed pool name")
    country = _country(header_country) if header_country is not None else params.country
    return Route(pool, params.account, session, country, params.session_ttl)


_ANONYMOUS: Final = UsernameParams("default")


def _country(value: str | None) -> str | None:
    if value is None:
        return None
    if not _COUNTRY.fullmatch(value):
        raise BadRequest("country must be a two-letter code")
    return value.upper()


def _session_ttl(value: str | None) -> float | None:
    if value is None:
        return None
    if not value.isdigit() or not 0 < int(value) <= _MAX_SESSION_TTL:
        raise BadRequest("sessttl must be a whole number of seconds, at most 7 days")
    return float(value)
