"""The gateway's error tree. Each error knows how to answer: HTTP status, RFC 9209 error type,
SOCKS5 reply, and (for failed upstream attempts) the health outcome to report.

Library errors are translated into these once, where they are raised (dialing, parsing);
everything above deals only with this tree.
"""

from __future__ import annotations

from core.models import Outcome

__all__ = [
    "AuthRequired",
    "BadRequest",
    "ChannelClosed",
    "DestinationDenied",
    "GatewayError",
    "LoopDetected",
    "NoUpstream",
    "ResponseTimeout",
    "SessionLost",
    "StartupError",
    "StorageDown",
    "UnknownPool",
    "UpstreamError",
]


class ChannelClosed(ConnectionError):
    """The peer closed (or reset) a connection while a reader was waiting for bytes."""


class StartupError(Exception):
    """The gateway cannot start; the message says why (never with a password in it)."""


class GatewayError(Exception):
    """A request the gateway answers with an error of its own making."""

    status = 502
    proxy_error = "proxy_internal_error"
    socks5_reply = 0x01

    def __init__(self, details: str, *, next_hop: str | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.next_hop = next_hop

    def proxy_status(self) -> str:
        """The `Proxy-Status` field value: error type, details, and the upstream's id only."""
        value = f"proxygate; error={self.proxy_error}"
        if self.details:
            value += f'; details="{_quote(self.details)}"'
        if self.next_hop is not None:
            value += f'; next-hop="{_quote(self.next_hop)}"'
        return value


class BadRequest(GatewayError):
    status = 400
    proxy_error = "http_request_error"
    socks5_reply = 0x01

    def __init__(self, details: str, *, status: int = 400) -> None:
        super().__init__(details)
        self.status = status


class AuthRequired(GatewayError):
    status = 407
    proxy_error = "http_request_denied"
    socks5_reply = 0x02


class UnknownPool(GatewayError):
    status = 400
    proxy_error = "http_request_error"
    socks5_reply = 0x02

    def __init__(self, pool: str) -> None:
        super().__init__(f"unknown pool {pool!r}")
        self.pool = pool


class DestinationDenied(GatewayError):
    status = 403
    proxy_error = "destination_ip_prohibited"
    socks5_reply = 0x02


class LoopDetected(GatewayError):
    status = 502
    proxy_error = "proxy_loop_detected"
    socks5_reply = 0x02


class NoUpstream(GatewayError):
    """No upstream could be leased within `acquire_timeout` (or none matches at all)."""

    status = 503
    proxy_error = "connection_limit_reached"
    socks5_reply = 0x01


class ResponseTimeout(GatewayError):
    """A plain HTTP request got no byte of an answer within `response_timeout`."""

    status = 504
    proxy_error = "http_response_timeout"
    socks5_reply = 0x06


class StorageDown(GatewayError):
    """The storage database is unavailable: nothing can be leased until it is back. The
    gateway recovers by itself; the client may retry."""

    status = 503
    proxy_error = "proxy_internal_error"
    socks5_reply = 0x01

    def __init__(self) -> None:
        super().__init__("storage unavailable")


class SessionLost(GatewayError):
    """The session's upstream failed and its pool's `on_sticky_failure` is `fail`: its
    requests fail until the session expires."""

    status = 502
    proxy_error = "destination_unavailable"
    socks5_reply = 0x01

    def __init__(self, upstream_id: str) -> None:
        super().__init__(
            "the session's upstream failed; it fails until it expires (on_sticky_failure = fail)",
            next_hop=upstream_id,
        )


class UpstreamError(GatewayError):
    """One attempt through an upstream failed.

    `outcome` is what health hears of it. `retryable` is True when no request byte can have
    reached the target, so another upstream may try.
    """

    def __init__(
        self,
        outcome: Outcome,
        details: str,
        *,
        next_hop: str | None = None,
        retryable: bool = True,
        socks5_reply: int | None = None,
    ) -> None:
        super().__init__(details, next_hop=next_hop)
        self.outcome = outcome
        self.retryable = retryable
        self.status, self.proxy_error, self.socks5_reply = _ANSWERS[outcome]
        if socks5_reply is not None:
            # Finer than the outcome: e.g. "network unreachable" (0x03) vs "host" (0x04).
            self.socks5_reply = socks5_reply


# How each failed attempt is answered: HTTP status, RFC 9209 error type, SOCKS5 reply.
_ANSWERS: dict[Outcome, tuple[int, str, int]] = {
    Outcome.CONNECT_REFUSED: (502, "connection_refused", 0x05),
    Outcome.CONNECT_TIMEOUT: (504, "connection_timeout", 0x06),
    Outcome.PROXY_AUTH_FAILED: (502, "proxy_configuration_error", 0x01),
    Outcome.PROXY_ERROR: (502, "http_protocol_error", 0x01),
    Outcome.TLS_ERROR: (502, "tls_protocol_error", 0x01),
    Outcome.RESET: (502, "connection_terminated", 0x01),
    Outcome.READ_TIMEOUT: (504, "connection_read_timeout", 0x06),
    Outcome.TARGET_REFUSED: (502, "connection_refused", 0x05),
    Outcome.TARGET_UNREACHABLE: (502, "destination_unavailable", 0x04),
    Outcome.TARGET_ERROR: (502, "destination_unavailable", 0x04),
    Outcome.OK: (502, "proxy_internal_error", 0x01),
}


def _quote(text: str) -> str:
    """An RFC 8941 sf-string body: printable ASCII, with backslash and quote escaped."""
    printable = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return printable.replace("\\", "\\\\").replace('"', '\\"')
