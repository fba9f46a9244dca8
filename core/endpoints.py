"""Upstream URLs: parsed once where they enter, carried as `Endpoint` values afterwards."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import quote, unquote, urlsplit

from core.errors import InvalidUpstreamURL

__all__ = ["Endpoint", "Scheme", "parse_upstream_url"]


class Scheme(StrEnum):
    HTTP = "http"
    HTTPS = "https"
    SOCKS4 = "socks4"
    SOCKS4A = "socks4a"
    SOCKS5 = "socks5"
    SOCKS5H = "socks5h"
    DIRECT = "direct"


_DEFAULT_PORTS = {
    Scheme.HTTP: 80,
    Scheme.HTTPS: 443,
    Scheme.SOCKS4: 1080,
    Scheme.SOCKS4A: 1080,
    Scheme.SOCKS5: 1080,
    Scheme.SOCKS5H: 1080,
}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an upstream is and how to speak to it.

    `host` is a name or an IP literal without brackets. For `direct`, `host` is the local source
    address to connect from ("" for the system's choice) and `port` is 0.
    """

    scheme: Scheme
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @property
    def is_http_proxy(self) -> bool:
        """An HTTP(S) proxy: it takes absolute-form requests as well as CONNECT."""
        return self.scheme is Scheme.HTTP or self.scheme is Scheme.HTTPS

    @property
    def source_address(self) -> str | None:
        """The local address a `direct` upstream leaves from, if one was given."""
        if self.scheme is not Scheme.DIRECT:
            return None
        return self.host or None

    def url(self) -> str:
        """The full URL, credentials included: for storage and dialing, never for display."""
        return self._format(redact=False)

    def redacted(self) -> str:
        return self._format(redact=True)

    def __str__(self) -> str:
        return self._format(redact=True)

    def __repr__(self) -> str:
        return f"Endpoint({self._format(redact=True)!r})"

    def _format(self, *, redact: bool) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme is Scheme.DIRECT:
            return f"direct://{host}"
        auth = ""
        if self.username is not None:
            if redact:
                auth = "***@"
            else:
                auth = quote(self.username, safe="")
                if self.password is not None:
                    auth += ":" + quote(self.password, safe="")
                auth += "@"
        return f"{self.scheme.value}://{auth}{host}:{self.port}"


def parse_upstream_url(url: str) -> Endpoint:
    """Parse one upstream URL.

    Grammar::

        upstream  = scheme "://" [ userinfo "@" ] host [ ":" port ] [ "/" ]
                  | "direct://" [ source-address ] [ "/" ]
        scheme    = "http" | "https" | "socks4" | "socks4a" | "socks5" | "socks5h"
        userinfo  = user [ ":" password ]          ; percent-encoded
        host      = reg-name | IPv4 | "[" IPv6 "]"
        port      = 1-65535, default 80 (http), 443 (https), 1080 (socks*)

    Errors name the URL with its credentials redacted.
    """
    text = url.strip()
    shown = _redact_raw(text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidUpstreamURL(f"invalid upstream URL {shown!r}: {exc}") from None
    try:
        scheme = Scheme(parts.scheme.lower())
    except ValueError:
        allowed = ", ".join(s.value for s in Scheme)
        raise InvalidUpstreamURL(
            f"invalid upstream URL {shown!r}: scheme must be one of {allowed}"
        ) from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidUpstreamURL(f"invalid upstream URL {shown!r}: a path or query is not allowed")
    host = _check_host(parts.hostname or "", shown, required=scheme is not Scheme.DIRECT)
    if scheme is Scheme.DIRECT:
        if port is not None or parts.username is not None:
            raise InvalidUpstreamURL(
                f"invalid upstream URL {shown!r}: direct:// takes only a source address"
            )
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise InvalidUpstreamURL(
                    f"invalid upstream URL {shown!r}: the source address must be an IP address"
                ) from None
        return Endpoint(Scheme.DIRECT, host, 0)
    if port == 0:
        raise InvalidUpstreamURL(f"invalid upstream URL {shown!r}: port must be 1-65535")
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    if username == "" and password is None:
        username = None
    return Endpoint(scheme, host, port or _DEFAULT_PORTS[scheme], username, password)


def _check_host(host: str, shown: str, *, required: bool) -> str:
    if not host:
        if required:
            raise InvalidUpstreamURL(f"invalid upstream URL {shown!r}: a host is required")
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise InvalidUpstreamURL(f"invalid upstream URL {shown!r}: bad host name")
    return host.lower()


def _redact_raw(text: str) -> str:
    """Hide userinfo in a URL we could not parse: the error message must not leak a password."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text if "@" not in text else "***@" + text.rpartition("@")[2]
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{tail}"
