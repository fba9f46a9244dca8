"""The container's health probe: exit 0 when the gateway answers, 1 when it does not.

    python healthcheck.py [CONFIG]      # CONFIG: /etc/proxygate/proxygate.toml

It reads the configuration the way `proxygate run --config CONFIG` does (the file, then the
`PROXYGATE_*` environment), so it finds the admin API wherever that was moved and sends its
bearer token, then asks `GET /healthz`. With the admin API disabled it connects to the first
proxy listener instead. A wildcard address (0.0.0.0, ::) is probed on loopback. Only the
image's own Python and the installed package are needed: no curl, no wget.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from collections.abc import Mapping, Sequence

from config import ListenAddress, Settings, load_settings

__all__ = ["DEFAULT_CONFIG", "main", "probe", "reachable_host"]

DEFAULT_CONFIG = "/etc/proxygate/proxygate.toml"
TIMEOUT = 3.0


def reachable_host(address: ListenAddress) -> str:
    """Where a client inside the container reaches `address`, ready for a URL."""
    if address.is_unspecified:
        return "[::1]" if ":" in address.host else "127.0.0.1"
    return f"[{address.host}]" if ":" in address.host else address.host


def probe(settings: Settings, timeout: float = TIMEOUT) -> None:
    """Raise OSError (urllib's HTTPError and URLError included) unless the gateway is up."""
    admin = settings.admin
    if admin.listen is None:
        first = settings.all_listeners()[0].listen
        with socket.create_connection((reachable_host(first).strip("[]"), first.port), timeout):
            return
    url = f"http://{reachable_host(admin.listen)}:{admin.listen.port}/healthz"
    headers = {"Authorization": f"Bearer {admin.token}"} if admin.token else {}
    # No ProxyHandler: HTTP_PROXY in the container's environment must not carry the probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        response.read()


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    path = args[0] if args else DEFAULT_CONFIG
    try:
        probe(load_settings(path, env=env))
    except Exception as exc:  # any failure is "unhealthy"; Docker keeps this line in its log
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
