"""Header helpers for the forwarder: hop-by-hop filtering, routing fields, Basic credentials."""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.protocols._http_common import Headers, HttpProtocolError

__all__ = ["BadCredentials", "ForwardHeaders", "parse_basic_auth", "split_proxy_headers"]

# RFC 9110 §7.6.1, plus Proxy-Connection (pre-standard, still sent) and the proxy auth fields,
# which are addressed to us and must never reach the next hop.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
    }
)
# A client may name any field in Connection, but dropping these would change the framing or the
# target of the forwarded request; RFC 9110 §7.6.1 forbids naming them anyway.
_NOT_DROPPABLE = frozenset({b"content-length", b"host"})
_ROUTING_PREFIX = b"x-proxy-"
_POOL, _SESSION, _COUNTRY = b"x-proxy-pool", b"x-proxy-session", b"x-proxy-country"
_AUTHORIZATION = b"proxy-authorization"
_EXTRACTED = {
    _POOL: "X-Proxy-Pool",
    _SESSION: "X-Proxy-Session",
    _COUNTRY: "X-Proxy-Country",
    _AUTHORIZATION: "Proxy-Authorization",
}

# What split_proxy_headers does with a field. The usual spellings hit `_ACTION` directly; only a
# name with the length of a listed one pays for lower() (bytes cache their hash, lower allocates).
_KEEP, _DROP, _CONNECTION, _EXTRACT, _VIA = range(5)
_ACTION_LOWER = {
    **dict.fromkeys(_HOP_BY_HOP, _DROP),
    b"connection": _CONNECTION,
    **dict.fromkeys(_EXTRACTED, _EXTRACT),
    b"via": _VIA,
}
_ACTION = {**_ACTION_LOWER, **{k.title(): v for k, v in _ACTION_LOWER.items()}, b"TE": _DROP}
_ACTION_LENGTHS = frozenset(len(k) for k in _ACTION_LOWER)
_X = frozenset(b"Xx")
# Connection values that name no field to drop: the common case skips token parsing.
_PLAIN_CONNECTION = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"}
)

_MAX_CREDENTIALS = 4096
_BASIC = re.compile(rb"[Bb][Aa][Ss][Ii][Cc] +([A-Za-z0-9+/]+=*) *")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True, frozen=True)
class ForwardHeaders:
    """`headers` to forward (order and case kept) and what was addressed to the gateway.

    Routing values are decoded as Latin-1 (lossless); validating them is the caller's job.
    `proxy_authorization` is the raw field value, kept out of `repr`. `via` holds the values of
    the Via fields (which are forwarded too), for loop detection without another pass.
    """

    headers: Headers
    pool: str | None
    session: str | None
    country: str | None
    proxy_authorization: bytes | None = field(default=None, repr=False)
    via: tuple[bytes, ...] = ()


class BadCredentials(ValueError):
    """A Proxy-Authorization value that is not well-formed Basic credentials.

    The gateway answers 407. The message never contains any part of the value.
    """


def split_proxy_headers(headers: Iterable[tuple[bytes, bytes]]) -> ForwardHeaders:
    """Split a request's fields into what to forward and what is addressed to the gateway.

    Removes hop-by-hop fields, every field named in Connection (except Content-Length and Host)
    and every `X-Proxy-*` field. A repeated X-Proxy-Pool, X-Proxy-Session, X-Proxy-Country or
    Proxy-Authorization is ambiguous and raises HttpProtocolError (400).
    """
    kept: list[tuple[bytes, bytes]] = []
    extracted: dict[bytes, bytes] = {}
    via: list[bytes] = []
    options: set[bytes] | None = None
    for pair in headers:
        name = pair[0]
        action = _ACTION.get(name)
        if action is None:
            action = _KEEP
            if len(name) in _ACTION_LENGTHS:
                action = _ACTION_LOWER.get(name.lower(), _KEEP)
            if (
                action == _KEEP
                and name[:1]
                and name[0] in _X
                and name[:8].lower() == _ROUTING_PREFIX
            ):
                action = _DROP
        if action == _KEEP:
            kept.append(pair)
        elif action == _VIA:
            kept.append(pair)
            via.append(pair[1])
        elif action == _CONNECTION and pair[1] not in _PLAIN_CONNECTION:
            tokens = [t.strip(b" \t") for t in pair[1].lower().split(b",")]
            options = set(tokens) if options is None else options.union(tokens)
        elif action == _EXTRACT:
            lname = name.lower()
            if lname in extracted:
                raise HttpProtocolError(f"repeated {_EXTRACTED[lname]} field")
            extracted[lname] = pair[1]
    if options:
        # Most clients only name hop-by-hop fields (keep-alive, close): nothing left to do.
        options -= _HOP_BY_HOP
        options -= _NOT_DROPPABLE
        if options:
            kept = [pair for pair in kept if pair[0].lower() not in options]
    return ForwardHeaders(
        tuple(kept),
        _text(extracted.get(_POOL)),
        _text(extracted.get(_SESSION)),
        _text(extracted.get(_COUNTRY)),
        extracted.get(_AUTHORIZATION),
        tuple(via),
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def parse_basic_auth(value: bytes | str) -> tuple[str, str]:
    """(username, password) from a `Basic <base64>` value (RFC 7617, UTF-8).

    Missing base64 padding is tolerated. Raises BadCredentials for any other scheme, bad base64,
    a missing colon, invalid UTF-8 or control characters.
    """
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    if len(raw) > _MAX_CREDENTIALS:
        raise BadCredentials("credentials too long")
    match = _BASIC.fullmatch(raw.strip(b" \t"))
    if match is None:
        raise BadCredentials("not Basic credentials")
    token = match[1].rstrip(b"=")
    token += b"=" * (-len(token) % 4)
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadCredentials("undecodable Basic credentials") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise BadCredentials("Basic credentials without a colon")
    if _CONTROL.search(decoded):
        raise BadCredentials("control character in Basic credentials")
    return username, password
