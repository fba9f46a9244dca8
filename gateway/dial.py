"""Reach a target through one upstream: `dial(upstream, host, port, ...)` returns a `Dialed`.

Per scheme:

- `direct`: the gateway itself resolves `host` (`loop.getaddrinfo`; IP literals skip it), checks
  every address against the `DialPolicy` (deny list, allowed ports, the gateway's own listeners)
  and connects to the first permitted address that accepts, from the endpoint's source address
  when it has one. This is the only case where the gateway resolves a target name.
- `socks4`, `socks4a`, `socks5`, `socks5h`: python-socks runs the handshake on a plain socket
  (always `rdns=True`: the upstream resolves names, so socks4 with a name is sent as 4a and
  socks5 as 5h), then the socket is wrapped in a `Channel`. SOCKS replies have a fixed size and
  python-socks reads exactly the reply, so no tunnel byte can be lost: `early` is empty.
- `http`, `https`: our own `CONNECT host:port` (TLS to the proxy first for https), because the
  python-socks HTTP connector reads the reply with one recv() and drops whatever follows the
  head, and cannot speak TLS to the proxy. Tunnel bytes that came with the reply are `early`.
  With `tunnel=False` no CONNECT is sent: the channel is a FORWARD connection to the proxy,
  which expects absolute-form requests (add `basic_credentials(endpoint)` to each of them).
  For socks* and direct, `tunnel=False` is the same as `tunnel=True`.

Failures raise `UpstreamError` (`next_hop` is the upstream's id; details never name the
upstream's address or credentials; `retryable` is always True since no request byte reached the
target) with the `Outcome` health should hear. Target faults never count against an upstream
that reported them, so a dead target cannot eject the upstreams that carry traffic to it:

=====================================================  ====================================
what happened                                          outcome
=====================================================  ====================================
connecting to the upstream fails (refused, other       CONNECT_REFUSED
OSError; direct: the source address cannot be bound)
timeout anywhere in connect, TLS and handshake         CONNECT_TIMEOUT
TLS to an https upstream fails (bad certificate,       TLS_ERROR
not TLS, connection dropped during the handshake)
credentials rejected: SOCKS5 auth failure or no        PROXY_AUTH_FAILED
acceptable method, CONNECT answered 407 (or 401)
SOCKS5 0x01 0x02 0x07 0x08 or unknown code; CONNECT    PROXY_ERROR
answered 101/3xx/4xx; malformed reply; the upstream
closed cleanly before a complete reply
the upstream reset the connection mid-handshake        RESET
SOCKS5 0x05; direct: the target refused                TARGET_REFUSED
SOCKS5 0x03 0x04 0x06, SOCKS4 0x5B-0x5D, CONNECT       TARGET_UNREACHABLE
answered 5xx, invalid target; direct: resolution
failed, target unreachable
direct: the target did not answer in time              CONNECT_TIMEOUT
=====================================================  ====================================

A direct dial refused by policy raises `DestinationDenied` (`LoopDetected` when the target is
the gateway itself). Nothing is left open when dialing fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks._errors import IncompleteReadError as SocksIncompleteRead
from python_socks.async_.asyncio import Proxy

from core.endpoints import Endpoint, Scheme
from core.models import Outcome, Upstream
from gateway.channel import Channel, ChannelClosed
from gateway.dialed import Dialed, DialMode
from gateway.errors import DestinationDenied, GatewayError, LoopDetected, UpstreamError
from gateway.protocols import (
    HttpProtocolError,
    ResponseHead,
    ResponseParser,
    serialize_request_head,
)

__all__ = ["DialMode", "DialPolicy", "Dialed", "basic_credentials", "dial"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class DialPolicy:
    """Where direct dials may go, checked on the resolved addresses.

    `deny`: networks never dialled (IPv4-mapped IPv6 addresses are checked as IPv4).
    `allowed_ports`: the only ports tunnels (CONNECT, SOCKS) may reach; empty allows all.
    Plain HTTP requests (`tunnel=False`) may reach any port. `own_addresses`: the gateway's
    listeners as (ip, port), where a dial would loop back into the gateway; a wildcard listener
    ("0.0.0.0" or "::") matches the loopback and unspecified addresses on its port.
    """

    deny: tuple[IPNetwork, ...] = ()
    allowed_ports: frozenset[int] = frozenset()
    own_addresses: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        # Canonical text ("::1", not "0::1") so the check per dial is one set membership test.
        own = frozenset((_canonical(host), port) for host, port in self.own_addresses)
        object.__setattr__(self, "own_addresses", own)

    def port_refusal(self, port: int, *, tunnel: bool = True) -> DestinationDenied | None:
        if tunnel and self.allowed_ports and port not in self.allowed_ports:
            return DestinationDenied(f"port {port} is not allowed for tunnels")
        return None

    def refusal(self, address: IPAddress, port: int, *, tunnel: bool = True) -> GatewayError | None:
        """The error refusing a dial to address:port, or None when it is allowed."""
        refused = self.port_refusal(port, tunnel=tunnel)
        if refused is not None:
            return refused
        address = _unmapped(address)
        if address.is_unspecified:
            # Connecting to 0.0.0.0 or :: reaches this host: never a destination of a proxy.
            return DestinationDenied("unspecified destination address")
        if self._is_own(address, port):
            return LoopDetected("the destination is this gateway")
        if any(address in network for network in self.deny):
            return DestinationDenied("destination address is denied by policy")
        return None

    def check(self, address: str | IPAddress, port: int, *, tunnel: bool = True) -> None:
        """Raise the refusal of a dial to address:port (an IP, not a name), if any."""
        if isinstance(address, str):
            address = ipaddress.ip_address(address)
        refused = self.refusal(address, port, tunnel=tunnel)
        if refused is not None:
            raise refused

    def _is_own(self, address: IPAddress, port: int) -> bool:
        own = self.own_addresses
        if not own:
            return False
        if (str(address), port) in own:
            return True
        local = address.is_loopback or address.is_unspecified
        return local and (("0.0.0.0", port) in own or ("::", port) in own)


async def dial(
    upstream: Upstream,
    host: str,
    port: int,
    *,
    tunnel: bool,
    connect_timeout: float,
    policy: DialPolicy | None = None,
    ssl_context: ssl.SSLContext | None = None,
    via: bytes | None = None,
) -> Dialed:
    """Connect to host:port (`host` a name or an IP literal without brackets) via `upstream`.

    `connect_timeout` bounds the whole dial: connect, TLS and handshake. `policy` applies to
    direct dials only (the caller checks literal IP targets of proxied dials itself), with its
    port list for tunnels only.
    `ssl_context` replaces the default verifying context for TLS to an https upstream.
    `via` goes into the CONNECT sent to an HTTP upstream, so a chain that leads back here is
    seen as a loop.
    """
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    _check_target(upstream, host, port)
    scheme = upstream.endpoint.scheme
    early = b""
    mode = DialMode.TUNNEL
    if scheme is Scheme.HTTP or scheme is Scheme.HTTPS:
        request = _connect_request(upstream.endpoint, host, port, via) if tunnel else None
        channel, early, mode = await _dial_http(
            loop, upstream, request, connect_timeout, ssl_context
        )
    elif scheme is Scheme.DIRECT:
        channel = await _dial_direct(loop, upstream, host, port, tunnel, connect_timeout, policy)
    else:
        channel = await _dial_socks(loop, upstream, host, port, connect_timeout)
    return Dialed(channel, early, mode, time.perf_counter() - started)


@functools.lru_cache(maxsize=4096)
def basic_credentials(endpoint: Endpoint) -> bytes:
    """The `Proxy-Authorization` value (`Basic ...`, UTF-8) for an endpoint with credentials.

    Cached per endpoint: the same few upstreams are dialled over and over.
    """
    if endpoint.username is None:
        raise ValueError("the endpoint has no credentials")
    userpass = f"{endpoint.username}:{endpoint.password or ''}".encode()
    return b"Basic " + base64.b64encode(userpass)


# -- shared ---------------------------------------------------------------------------------------


def _fail(
    upstream: Upstream, outcome: Outcome, details: str, *, socks5_reply: int | None = None
) -> UpstreamError:
    # Always retryable: every dial failure happens before a request byte can reach the target.
    return UpstreamError(
        outcome, details, next_hop=upstream.id, retryable=True, socks5_reply=socks5_reply
    )


def _check_target(upstream: Upstream, host: str, port: int) -> None:
    """Refuse what no upstream could carry (and what could inject lines into a CONNECT)."""
    if not (
        0 < port < 65536
        and 0 < len(host) <= 255
        and host.isascii()
        and host.isprintable()
        and " " not in host
    ):
        raise _fail(upstream, Outcome.TARGET_UNREACHABLE, "invalid target address")


def _canonical(host: str) -> str:
    try:
        return str(_unmapped(ipaddress.ip_address(host)))
    except ValueError:
        return host  # not an IP (never matches a resolved address): kept as given


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _abort(channel: Channel | None) -> None:
    if channel is not None:
        channel.abort()


# -- http / https ---------------------------------------------------------------------------------


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    # Built once: loading the system CA store takes milliseconds, and contexts are shareable.
    return ssl.create_default_context()


async def _dial_http(
    loop: asyncio.AbstractEventLoop,
    upstream: Upstream,
    request: bytes | None,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> tuple[Channel, bytes, DialMode]:
    """Connect to an HTTP(S) proxy; with a CONNECT `request`, also open the tunnel."""
    channel: Channel | None = None
    try:
        async with asyncio.timeout(timeout):
            channel = await _open_proxy(loop, upstream, ssl_context)
            if request is None:
                return channel, b"", DialMode.FORWARD
            channel.write(request)
            early = await _read_connect_reply(channel, upstream)
    except TimeoutError:
        _abort(channel)
        raise _fail(upstream, Outcome.CONNECT_TIMEOUT, "upstream did not answer in time") from None
    except BaseException:
        _abort(channel)
        raise
    return channel, early, DialMode.TUNNEL


def _connect_request(endpoint: Endpoint, host: str, port: int, via: bytes | None) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = [(b"Host", authority.encode("ascii"))]
    if via is not None:
        headers.append((b"Via", via))
    if endpoint.username is not None:
        headers.append((b"Proxy-Authorization", basic_credentials(endpoint)))
    return serialize_request_head("CONNECT", authority, headers)


async def _open_proxy(
    loop: asyncio.AbstractEventLoop, upstream: Upstream, ssl_context: ssl.SSLContext | None
) -> Channel:
    endpoint = upstream.endpoint
    tls = None
    if endpoint.scheme is Scheme.HTTPS:
        tls = ssl_context if ssl_context is not None else _default_tls_context()
    try:
        _, channel = await loop.create_connection(
            lambda: Channel(loop),
            endpoint.host,
            endpoint.port,
            ssl=tls,
            server_hostname=endpoint.host if tls is not None else None,
        )
    except ssl.SSLError as exc:  # includes CertificateError; must come before OSError
        raise _fail(
            upstream, Outcome.TLS_ERROR, f"TLS to the upstream failed: {_ssl_reason(exc)}"
        ) from None
    except ConnectionRefusedError:
        raise _fail(upstream, Outcome.CONNECT_REFUSED, "upstream refused the connection") from None
    except OSError as exc:
        if tls is not None and isinstance(exc, ConnectionError):
            # TCP connect failures are refusals; a reset or abort after it is the handshake's.
            raise _fail(
                upstream, Outcome.TLS_ERROR, "upstream closed the connection during TLS"
            ) from None
        raise _connect_failure(upstream, exc) from None
    return channel


def _ssl_reason(exc: ssl.SSLError) -> str:
    # `reason` is OpenSSL's short code (e.g. CERTIFICATE_VERIFY_FAILED); the message may quote
    # the upstream's host name, so only the code goes into details.
    return str(exc.reason or type(exc).__name__)


def _connect_failure(upstream: Upstream, exc: OSError) -> UpstreamError:
    """A failed TCP connect to the upstream itself."""
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return _fail(upstream, Outcome.CONNECT_TIMEOUT, "connecting to the upstream timed out")
    code = errno.errorcode.get(exc.errno or 0, "error")
    return _fail(upstream, Outcome.CONNECT_REFUSED, f"cannot connect to the upstream ({code})")


async def _read_connect_reply(channel: Channel, upstream: Upstream) -> bytes:
    """Read the reply head to our CONNECT; return the tunnel bytes that followed it."""
    parser = ResponseParser("CONNECT")
    while True:
        if not channel.buffer:
            try:
                await channel.read_more()
            except ChannelClosed:
                raise _closed_in_handshake(upstream, channel.error) from None
        try:
            events = parser.feed(channel.take_buffer())
        except HttpProtocolError:
            raise _fail(upstream, Outcome.PROXY_ERROR, "malformed reply to CONNECT") from None
        for event in events:
            # Interim 1xx heads come alone and are followed by the real answer.
            if isinstance(event, ResponseHead) and (event.status >= 200 or event.status == 101):
                if 200 <= event.status < 300:
                    return parser.take_buffered()
                raise _connect_status_error(upstream, event.status)  # 101 included


def _closed_in_handshake(upstream: Upstream, error: BaseException | None) -> UpstreamError:
    # A reset says nothing about whose fault it is; a clean close without an answer is the
    # upstream breaking the protocol.
    if isinstance(error, ConnectionError):
        return _fail(upstream, Outcome.RESET, "upstream reset the connection during the handshake")
    return _fail(upstream, Outcome.PROXY_ERROR, "upstream closed the connection without a reply")


def _connect_status_error(upstream: Upstream, status: int) -> UpstreamError:
    details = f"upstream answered CONNECT with {status}"
    if status == 407 or status == 401:
        # 407 is the standard answer; tinyproxy answers wrong credentials with 401.
        return _fail(upstream, Outcome.PROXY_AUTH_FAILED, details)
    if status >= 500:
        # An upstream that answers is alive: the target failed. A dead target must never
        # eject the upstreams that report it.
        return _fail(upstream, Outcome.TARGET_UNREACHABLE, details)
    return _fail(upstream, Outcome.PROXY_ERROR, details)


# -- socks ----------------------------------------------------------------------------------------

_SOCKS_TYPES = {
    Scheme.SOCKS4: ProxyType.SOCKS4,
    Scheme.SOCKS4A: ProxyType.SOCKS4,
    Scheme.SOCKS5: ProxyType.SOCKS5,
    Scheme.SOCKS5H: ProxyType.SOCKS5,
}

# SOCKS5 reply codes (RFC 1928) and SOCKS4 rejections, which cannot say more than "failed".
_SOCKS_REPLY_OUTCOMES = {
    0x01: Outcome.PROXY_ERROR,  # general failure
    0x02: Outcome.PROXY_ERROR,  # not allowed by ruleset
    0x03: Outcome.TARGET_UNREACHABLE,  # network unreachable
    0x04: Outcome.TARGET_UNREACHABLE,  # host unreachable
    0x05: Outcome.TARGET_REFUSED,  # connection refused
    0x06: Outcome.TARGET_UNREACHABLE,  # TTL expired
    0x07: Outcome.PROXY_ERROR,  # command not supported
    0x08: Outcome.PROXY_ERROR,  # address type not supported
    0x5B: Outcome.TARGET_UNREACHABLE,  # SOCKS4: rejected or failed
    0x5C: Outcome.TARGET_UNREACHABLE,  # SOCKS4: identd unreachable
    0x5D: Outcome.TARGET_UNREACHABLE,  # SOCKS4: identd user mismatch
}

#: python-socks' messages for a SOCKS5 credentials rejection (see `_auth_rejection`), with
#: our details for each.
_SOCKS_AUTH_REJECTIONS = {
    # RFC 1929 status other than 0: wrong user name or password.
    "Username and password authentication failure": "upstream rejected the credentials",
    # Method 0xFF: e.g. the upstream demands credentials and none are configured.
    "No acceptable authentication methods were offered": (
        "upstream accepts none of the offered authentication methods"
    ),
}


async def _dial_socks(
    loop: asyncio.AbstractEventLoop, upstream: Upstream, host: str, port: int, timeout: float
) -> Channel:
    endpoint = upstream.endpoint
    proxy = Proxy(
        _SOCKS_TYPES[endpoint.scheme],
        endpoint.host,
        endpoint.port,
        endpoint.username,
        endpoint.password,
        rdns=True,
        loop=loop,
    )
    # python-socks closes its socket itself on every failure and on cancellation.
    try:
        sock = await proxy.connect(dest_host=host, dest_port=port, timeout=timeout)
    except ProxyTimeoutError:
        raise _fail(upstream, Outcome.CONNECT_TIMEOUT, "upstream did not answer in time") from None
    except ProxyConnectionError as exc:
        raise _connect_failure(upstream, exc) from None
    except ProxyError as exc:
        raise _socks_failure(upstream, exc) from None
    except OSError as exc:
        raise _socks_io_failure(upstream, exc) from None
    except ValueError:  # UnicodeError included: python-socks encodes as it sends
        raise _socks_encoding_failure(upstream, host) from None
    return await _wrap_socket(loop, upstream, sock)


def _auth_rejection(exc: ProxyError) -> str | None:
    """Our details when python-socks failed because the upstream rejected (or demanded)
    credentials, else None.

    python-socks raises a plain `ProxyError` without `error_code` for these, just like for a
    malformed reply; its message is the only thing that tells them apart. Kept in this one place
    (and tested against a real SOCKS5 server) so a wording change in python-socks shows up.
    """
    if exc.error_code is not None:
        return None
    return _SOCKS_AUTH_REJECTIONS.get(str(exc))


def _socks_failure(upstream: Upstream, exc: ProxyError) -> UpstreamError:
    code = exc.error_code
    if code is not None:
        outcome = _SOCKS_REPLY_OUTCOMES.get(code, Outcome.PROXY_ERROR)
        # Pass the upstream's own verdict on (03 network, 04 host unreachable, 06 TTL...).
        passed_on = code if 0x03 <= code <= 0x06 else None
        return _fail(
            upstream,
            outcome,
            f"upstream replied SOCKS error 0x{code:02X}",
            socks5_reply=passed_on,
        )
    rejection = _auth_rejection(exc)
    if rejection is not None:
        return _fail(upstream, Outcome.PROXY_AUTH_FAILED, rejection)
    if isinstance(exc.__cause__, SocksIncompleteRead):
        # A clean close mid-handshake: the upstream broke the protocol (a reset is RESET).
        return _fail(
            upstream, Outcome.PROXY_ERROR, "upstream closed the connection during the handshake"
        )
    return _fail(upstream, Outcome.PROXY_ERROR, "malformed SOCKS reply")


def _socks_io_failure(upstream: Upstream, exc: OSError) -> UpstreamError:
    """A socket error after connecting, while python-socks was exchanging the handshake."""
    if isinstance(exc, ConnectionError):
        return _fail(upstream, Outcome.RESET, "upstream reset the connection during the handshake")
    code = errno.errorcode.get(exc.errno or 0, "error")
    return _fail(upstream, Outcome.PROXY_ERROR, f"SOCKS handshake failed ({code})")


def _socks_encoding_failure(upstream: Upstream, host: str) -> UpstreamError:
    # The target goes out IDNA-encoded, the credentials ASCII-encoded: find which one failed.
    try:
        host.encode("idna")
    except UnicodeError:
        return _fail(upstream, Outcome.TARGET_UNREACHABLE, "invalid target address")
    return _fail(upstream, Outcome.PROXY_AUTH_FAILED, "the credentials cannot be sent over SOCKS")


async def _wrap_socket(
    loop: asyncio.AbstractEventLoop, upstream: Upstream, sock: socket.socket
) -> Channel:
    try:
        _, channel = await loop.create_connection(lambda: Channel(loop), sock=sock)
    except OSError:
        sock.close()
        raise _fail(upstream, Outcome.RESET, "connection lost after the handshake") from None
    except BaseException:
        sock.close()  # a no-op when a transport had already taken and closed it
        raise
    return channel


# -- direct ---------------------------------------------------------------------------------------

# Binding the source address failed: the direct upstream's own fault, not the target's.
_BIND_ERRORS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})


async def _dial_direct(
    loop: asyncio.AbstractEventLoop,
    upstream: Upstream,
    host: str,
    port: int,
    tunnel: bool,
    timeout: float,
    policy: DialPolicy | None,
) -> Channel:
    if policy is not None:
        refused = policy.port_refusal(port, tunnel=tunnel)
        if refused is not None:
            raise refused  # before resolving: no lookup for a refused port
    source = upstream.endpoint.source_address
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            addresses = await _resolve(loop, upstream, host, port, source)
    except TimeoutError:
        raise _fail(
            upstream, Outcome.TARGET_UNREACHABLE, "resolving the target timed out"
        ) from None
    if policy is not None:
        addresses = _permitted(policy, addresses, port, tunnel)
    try:
        async with asyncio.timeout_at(deadline):
            return await _connect_direct(loop, upstream, addresses, port, source)
    except TimeoutError:
        raise _fail(
            upstream, Outcome.CONNECT_TIMEOUT, "the target did not answer in time"
        ) from None


async def _resolve(
    loop: asyncio.AbstractEventLoop, upstream: Upstream, host: str, port: int, source: str | None
) -> list[IPAddress]:
    """The target's addresses, of the source address's family when there is one."""
    family = socket.AF_UNSPEC
    if source is not None:
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
    try:
        literal = _unmapped(ipaddress.ip_address(host))
    except ValueError:
        pass
    else:  # no trip through the resolver's thread pool for a literal
        if family == socket.AF_UNSPEC or (literal.version == 6) == (family == socket.AF_INET6):
            return [literal]
        raise _fail(upstream, Outcome.TARGET_UNREACHABLE, "target and source families differ")
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _fail(upstream, Outcome.TARGET_UNREACHABLE, "cannot resolve the target") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _fail(upstream, Outcome.TARGET_UNREACHABLE, "cannot resolve the target")
    return addresses


def _permitted(
    policy: DialPolicy, addresses: list[IPAddress], port: int, tunnel: bool
) -> list[IPAddress]:
    """The addresses the policy allows (only those are dialled); the first refusal if none."""
    allowed: list[IPAddress] = []
    first_refusal: GatewayError | None = None
    for address in addresses:
        refused = policy.refusal(address, port, tunnel=tunnel)
        if refused is None:
            allowed.append(address)
        elif first_refusal is None:
            first_refusal = refused
    if first_refusal is not None and not allowed:
        raise first_refusal
    return allowed


async def _connect_direct(
    loop: asyncio.AbstractEventLoop,
    upstream: Upstream,
    addresses: list[IPAddress],
    port: int,
    source: str | None,
) -> Channel:
    """Connect to the first address that accepts (create_connection closes failed sockets)."""
    local_addr = (source, 0) if source else None
    refused = False
    failure: OSError | None = None
    for address in addresses:
        try:
            _, channel = await loop.create_connection(
                lambda: Channel(loop), str(address), port, local_addr=local_addr
            )
        except OSError as exc:
            if exc.errno in _BIND_ERRORS:
                raise _fail(
                    upstream, Outcome.CONNECT_REFUSED, "cannot use the source address"
                ) from None
            refused = refused or isinstance(exc, ConnectionRefusedError)
            failure = exc
            continue
        return channel
    assert failure is not None  # `addresses` is never empty
    raise _direct_failure(upstream, failure, refused=refused)


def _direct_failure(upstream: Upstream, exc: OSError, *, refused: bool) -> UpstreamError:
    # The target IS the next hop here, but a dead target must not eject the direct upstream.
    if refused:
        return _fail(upstream, Outcome.TARGET_REFUSED, "the target refused the connection")
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return _fail(upstream, Outcome.CONNECT_TIMEOUT, "the target did not answer in time")
    code = errno.errorcode.get(exc.errno or 0, "error")
    network = exc.errno == errno.ENETUNREACH
    return _fail(
        upstream,
        Outcome.TARGET_UNREACHABLE,
        f"cannot reach the target ({code})",
        socks5_reply=0x03 if network else 0x04,
    )
