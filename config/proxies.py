"""Upstream lists: one entry per line of a proxies file, or per item of a pool's `proxies`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from config.errors import ConfigError
from core.endpoints import Endpoint, parse_upstream_url
from core.errors import InvalidUpstreamURL

__all__ = [
    "UpstreamEntry",
    "parse_proxies_file",
    "parse_proxies_text",
    "parse_proxy_entry",
    "unique_upstreams",
]

# Checked before the short forms are turned into URLs: an "@", "/" or "?" slipping into the host
# or port would otherwise be read as URL structure (userinfo, path) by the URL parser.
_SHORT_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")
_SHORT_PORT = re.compile(r"[0-9]{1,5}")
# "#" opens a comment only at the start of a line or after blank space, so a password such as
# "p#ss" in the host:port:user:password form survives.
_COMMENT = re.compile(r"(?:^|\s)#.*")
_SHAPES = "expected a URL (scheme://host:port), host:port or host:port:user:password"


def parse_proxy_entry(text: str) -> Endpoint:
    """Parse one upstream entry; raise `InvalidUpstreamURL` (a ValueError) if it is not one.

    Grammar::

        entry = URL                                   ; scheme://[user[:password]@]host[:port]
              | host ":" port                         ; means http://host:port
              | host ":" port ":" user ":" password   ; means http://user:password@host:port
        host  = name | IPv4 | "[" IPv6 "]"

    URLs take every scheme `core.endpoints.Scheme` knows (see `parse_upstream_url`), with
    percent-encoded credentials. In the last form the user and password are taken literally
    (no percent-decoding) and the password runs to the end of the entry, so it may hold ":".
    Messages never hold the credentials.
    """
    text = text.strip()
    if "://" in text:
        return parse_upstream_url(text)
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[: close + 1], text[close + 1 :]
        if close < 0 or not rest.startswith(":"):
            raise InvalidUpstreamURL(f"invalid upstream: {_SHAPES}")
        fields = rest[1:].split(":", 2)
    else:
        host, colon, rest = text.partition(":")
        if not colon:
            raise InvalidUpstreamURL(f"invalid upstream: {_SHAPES}")
        fields = rest.split(":", 2)
    if len(fields) == 2:
        raise InvalidUpstreamURL(f"invalid upstream: {_SHAPES} (the password is missing)")
    port = fields[0]
    if not _SHORT_HOST.fullmatch(host) or not _SHORT_PORT.fullmatch(port):
        raise InvalidUpstreamURL(f"invalid upstream: {_SHAPES}")
    if len(fields) == 1:
        return parse_upstream_url(f"http://{host}:{port}")
    user, password = fields[1], fields[2]
    if not user:
        raise InvalidUpstreamURL("invalid upstream: the user name is empty")
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return parse_upstream_url(f"http://{auth}@{host}:{port}")


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    """An upstream and where it was written, to name both places of a duplicate."""

    endpoint: Endpoint
    #: For `ConfigError`: "file:line" for a proxies file, else the configuration source.
    source: str
    key: str | None
    #: How another message points here, e.g. "list.txt:3" or "pools[0].proxies[1] (file.toml)".
    position: str


def parse_proxies_text(text: str, name: str, key: str | None = None) -> list[UpstreamEntry]:
    """Parse the text of a proxies file called `name` (see `parse_proxies_file`).

    Errors are `ConfigError`s whose source is "name:line"; `key` is the configuration key that
    named the file, if any. Duplicates are left to `unique_upstreams`.
    """
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = _COMMENT.sub("", line).strip()
        if not entry:
            continue
        where = f"{name}:{number}"
        try:
            endpoint = parse_proxy_entry(entry)
        except InvalidUpstreamURL as exc:
            raise ConfigError(where, key, str(exc)) from None
        entries.append(UpstreamEntry(endpoint, where, key, where))
    return entries


def parse_proxies_file(path: str | os.PathLike[str]) -> tuple[Endpoint, ...]:
    """Read a proxies file: one upstream per line, in file order.

    Grammar::

        file    = { line }
        line    = [ entry ] [ comment ]
        comment = "#" { any character }   ; at the start of a line or after blank space
        entry   = URL | host ":" port | host ":" port ":" user ":" password

    Blank lines and comments are skipped; `entry` is `parse_proxy_entry`'s. The file is UTF-8
    (a byte-order mark is allowed). Raises `ConfigError` naming "path:line" for a bad entry or
    a duplicate (naming the first line too), or the path when the file cannot be read.
    """
    name = os.fspath(path)
    text = read_proxies_text(Path(name), name, None)
    return unique_upstreams(parse_proxies_text(text, name))


def read_proxies_text(path: Path, source: str, key: str | None) -> str:
    """A proxies file's text; `source` and `key` name who asked for it, for the error."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        reason = f"cannot read proxies file {str(path)!r}: {cause}"
    except UnicodeDecodeError:
        reason = f"proxies file {str(path)!r} is not UTF-8 text"
    raise ConfigError(source, key, reason)


def unique_upstreams(entries: Iterable[UpstreamEntry]) -> tuple[Endpoint, ...]:
    """The endpoints in order; `ConfigError` at the second place an upstream is written.

    Upstreams are the same when their parsed endpoints are, so "http://h" repeats "http://h:80";
    the same host and port with other credentials is another upstream.
    """
    first: dict[Endpoint, UpstreamEntry] = {}
    for entry in entries:
        seen = first.setdefault(entry.endpoint, entry)
        if seen is not entry:
            raise ConfigError(
                entry.source,
                entry.key,
                f"duplicate upstream {entry.endpoint.redacted()}, already at {seen.position}",
            )
    return tuple(first)
