from __future__ import annotations

import pytest

from core.endpoints import Endpoint, Scheme, parse_upstream_url
from core.errors import InvalidUpstreamURL
from core.models import Upstream


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("http://proxy.example:3128", Scheme.HTTP, "proxy.example", 3128),
        ("http://proxy.example", Scheme.HTTP, "proxy.example", 80),
        ("https://proxy.example", Scheme.HTTPS, "proxy.example", 443),
        ("socks4://127.0.0.1:1080", Scheme.SOCKS4, "127.0.0.1", 1080),
        ("socks4a://127.0.0.1", Scheme.SOCKS4A, "127.0.0.1", 1080),
        ("socks5://127.0.0.1", Scheme.SOCKS5, "127.0.0.1", 1080),
        ("SOCKS5H://Proxy.Example:9050/", Scheme.SOCKS5H, "proxy.example", 9050),
        ("socks5://[::1]:1080", Scheme.SOCKS5, "::1", 1080),
        ("http://[2001:DB8::1]", Scheme.HTTP, "2001:db8::1", 80),
    ],
)
def test_parses_every_scheme(url: str, scheme: Scheme, host: str, port: int) -> None:
    endpoint = parse_upstream_url(url)
    assert (endpoint.scheme, endpoint.host, endpoint.port) == (scheme, host, port)
    assert endpoint.username is None


def test_direct_with_and_without_source_address() -> None:
    assert parse_upstream_url("direct://") == Endpoint(Scheme.DIRECT, "", 0)
    assert parse_upstream_url("direct://").source_address is None
    assert parse_upstream_url("direct://127.0.0.5").source_address == "127.0.0.5"
    assert parse_upstream_url("direct://[::1]").source_address == "::1"


def test_percent_encoded_credentials_are_decoded_and_round_trip() -> None:
    endpoint = parse_upstream_url("socks5://us%40er:p%3Ass%2Fw@127.0.0.1:1080")
    assert endpoint.username == "us@er"
    assert endpoint.password == "p:ss/w"
    assert parse_upstream_url(endpoint.url()) == endpoint


def test_credentials_never_appear_in_repr_or_str() -> None:
    endpoint = parse_upstream_url("http://alice:hunter2@10.0.0.1:3128")
    upstream = Upstream(endpoint, "p")
    for text in (repr(endpoint), str(endpoint), repr(upstream), endpoint.redacted()):
        assert "hunter2" not in text
        assert "alice" not in text
    assert "hunter2" in endpoint.url()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://10.0.0.1", "scheme must be one of"),
        ("http://", "a host is required"),
        ("http://10.0.0.1:99999", "invalid upstream URL"),
        ("http://10.0.0.1:0", "port must be"),
        ("http://10.0.0.1:abc", "invalid upstream URL"),
        ("http://10.0.0.1/path", "a path or query is not allowed"),
        ("http://bad_host!:80", "bad host name"),
        ("direct://example.com", "must be an IP address"),
        ("direct://127.0.0.1:80", "takes only a source address"),
        ("socks5://[::1", "invalid upstream URL"),
    ],
)
def test_bad_urls_raise_an_error_naming_them(url: str, reason: str) -> None:
    with pytest.raises(InvalidUpstreamURL, match=reason) as caught:
        parse_upstream_url(url)
    assert "invalid upstream URL" in str(caught.value)


def test_errors_redact_credentials() -> None:
    with pytest.raises(InvalidUpstreamURL) as caught:
        parse_upstream_url("http://alice:hunter2@10.0.0.1:99999")
    assert "hunter2" not in str(caught.value)
    assert "10.0.0.1" in str(caught.value)


def test_upstream_ids_are_stable_and_distinct() -> None:
    a = Upstream.from_url("http://10.0.0.1:8080", "p")
    assert a.id == Upstream.from_url("http://10.0.0.1:8080", "p").id
    assert a.id.startswith("up-")
    assert a.id != Upstream.from_url("http://10.0.0.1:8080", "other").id
    assert a.id != Upstream.from_url("http://u:p@10.0.0.1:8080", "p").id
    assert Upstream.from_url("http://10.0.0.1:8080", "p", id="mine").id == "mine"
