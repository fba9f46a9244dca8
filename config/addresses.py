"""Listen addresses: where the gateway and the admin API bind."""

from __future__ import annotations

import ipaddress
import re

from config.schema import ListenAddress

__all__ = ["parse_listen_address"]

_PORT = re.compile(r"[0-9]{1,5}")


def parse_listen_address(text: str) -> ListenAddress:
    """Parse one listen address; raise ValueError with the reason when it is not one.

    Grammar::

        address = host ":" port
                | "[" IPv6 "]" ":" port
        host    = IPv4 | "localhost"         ; localhost binds 127.0.0.1
        port    = 0-65535                    ; 0 binds any free port

    Host names other than `localhost` are refused: binding must not depend on name resolution.
    IPv6 zone ids ("%eth0") are refused too.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"invalid listen address {text!r}: missing ']'")
        if not rest.startswith(":"):
            raise ValueError(f"invalid listen address {text!r}: expected [IPv6]:port")
        port_text = rest[1:]
        try:
            ipv6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid listen address {text!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipv6
        if ipv6.scope_id is not None:
            raise ValueError(f"invalid listen address {text!r}: IPv6 zone ids are not supported")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"invalid listen address {text!r}: expected host:port")
        if ":" in host:
            raise ValueError(
                f"invalid listen address {text!r}: write an IPv6 address in brackets, "
                "as in [::1]:8899"
            )
        if host.lower() == "localhost":
            host = "127.0.0.1"
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"invalid listen address {text!r}: the host must be an IP address or localhost"
            ) from None
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"invalid listen address {text!r}: the port must be 0-65535")
    return ListenAddress(str(address), int(port_text))
