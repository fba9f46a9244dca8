"""Proxies files and the short upstream forms."""

from __future__ import annotations

import pytest

from config import ConfigError, parse_proxies_file, parse_proxy_entry
from core.endpoints import Endpoint, Scheme, parse_upstream_url
from core.errors import InvalidUpstreamURL
from tests.config.helpers import WriteFile, assert_message, config_error, load


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("socks5h://10.0.0.1:9050", Endpoint(Scheme.SOCKS5H, "10.0.0.1", 9050)),
        ("proxy.example:3128", Endpoint(Scheme.HTTP, "proxy.example", 3128)),
        ("[2001:db8::1]:3128", Endpoint(Scheme.HTTP, "2001:db8::1", 3128)),
        ("10.0.0.1:80:alice:s3cret", Endpoint(Scheme.HTTP, "10.0.0.1", 80, "alice", "s3cret")),
        # The password runs to the end of the line, ":", "@" and "%" included, taken literally.
        ("h.example:80:bob:a:b@c%41", Endpoint(Scheme.HTTP, "h.example", 80, "bob", "a:b@c%41")),
        ("[::1]:8080:u:p", Endpoint(Scheme.HTTP, "::1", 8080, "u", "p")),
        ("  direct://  ", Endpoint(Scheme.DIRECT, "", 0)),
    ],
)
def test_entry_forms(entry: str, expected: Endpoint) -> None:
    endpoint = parse_proxy_entry(entry)
    assert endpoint == expected
    assert (endpoint.username, endpoint.password) == (expected.username, expected.password)


@pytest.mark.parametrize(
    "entry",
    [
        "proxy.example",
        "10.0.0.1:80:alice",
        "10.0.0.1:80::secret",
        "10.0.0.1:http",
        "10.0.0.1:99999",
        "a@b:80",
        "10.0.0.1:80@evil",
        "[::1:80",
        "2001:db8::1:80",
        "ftp://10.0.0.1",
    ],
)
def test_bad_entries(entry: str) -> None:
    with pytest.raises(InvalidUpstreamURL):
        parse_proxy_entry(entry)


def test_a_file_with_every_form_comments_and_blank_lines(write: WriteFile) -> None:
    path = write(
        "\ufeff# a header comment\n"
        "\n"
        "   \n"
        "socks5://user:pw@203.0.113.7:1080   # trailing comment\n"
        "198.51.100.2:3128\n"
        "\t# indented comment\n"
        "198.51.100.3:8080:carol:pa#ss\r\n"
        "[2001:db8::2]:3128#not-a-comment-without-space\n",
        "list.txt",
    )
    with pytest.raises(ConfigError) as caught:
        parse_proxies_file(path)
    # "#" glued to an entry is part of it, so the last line is not an upstream.
    assert_message(caught.value, f"{path}:8", None, "invalid upstream")

    path.write_text(path.read_text().replace("#not-a-comment-without-space", " # ok"))
    assert parse_proxies_file(path) == (
        parse_upstream_url("socks5://user:pw@203.0.113.7:1080"),
        parse_upstream_url("http://198.51.100.2:3128"),
        Endpoint(Scheme.HTTP, "198.51.100.3", 8080, "carol", "pa#ss"),
        parse_upstream_url("http://[2001:db8::2]:3128"),
    )


def test_an_empty_file_is_an_empty_list(write: WriteFile) -> None:
    assert parse_proxies_file(write("# nothing yet\n", "list.txt")) == ()


def test_error_names_the_file_and_line_and_hides_the_password(write: WriteFile) -> None:
    path = write("10.0.0.1:80\n\n10.0.0.2:80:dave:hunter2\nsocks9://dave:hunter2@h\n", "l.txt")
    with pytest.raises(ConfigError) as caught:
        parse_proxies_file(path)
    assert_message(caught.value, f"{path}:4", None, "scheme must be one of")
    assert "hunter2" not in str(caught.value)
    assert "dave" not in str(caught.value)


def test_duplicates_in_a_file_name_both_lines(write: WriteFile) -> None:
    path = write("http://10.0.0.1\n10.0.0.2:80\n10.0.0.1:80\n", "l.txt")
    with pytest.raises(ConfigError) as caught:
        parse_proxies_file(path)
    assert_message(
        caught.value,
        f"{path}:3",
        None,
        "duplicate upstream http://10.0.0.1:80",
        f"already at {path}:1",
    )


def test_same_address_with_other_credentials_is_another_upstream(write: WriteFile) -> None:
    path = write("10.0.0.1:80:u1:p\n10.0.0.1:80:u2:p\n10.0.0.1:80\n", "l.txt")
    assert len(parse_proxies_file(path)) == 3


def test_unreadable_files(write: WriteFile) -> None:
    missing = write("", "x.txt").parent / "missing.txt"
    with pytest.raises(ConfigError) as caught:
        parse_proxies_file(missing)
    assert_message(caught.value, str(missing), None, "cannot read proxies file", "No such file")
    binary = write("", "bin.txt")
    binary.write_bytes(b"10.0.0.1:80\n\xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        parse_proxies_file(binary)
    assert_message(caught.value, str(binary), None, "is not UTF-8 text")


def test_pool_file_is_relative_to_the_config_file_and_follows_proxies(write: WriteFile) -> None:
    write("10.0.0.2:80\n", "list.txt")
    path = write(
        '[[pools]]\nname = "default"\nproxies = ["10.0.0.1:80"]\nproxies_file = "list.txt"\n'
    )
    assert load(path).pool("default").upstreams == (
        parse_upstream_url("http://10.0.0.1:80"),
        parse_upstream_url("http://10.0.0.2:80"),
    )


def test_pool_file_errors_carry_the_key(write: WriteFile) -> None:
    listed = write("10.0.0.1:80\nnonsense\n", "list.txt")
    config = write('[[pools]]\nname = "default"\nproxies_file = "list.txt"\n')
    assert_message(
        config_error(config),
        f"{listed}:2",
        "pools[0].proxies_file",
        "expected a URL (scheme://host:port), host:port or host:port:user:password",
    )


def test_missing_pool_file_names_the_config_file(write: WriteFile) -> None:
    config = write('[[pools]]\nname = "default"\nproxies_file = "gone.txt"\n')
    assert_message(
        config_error(config),
        str(config),
        "pools[0].proxies_file",
        f"cannot read proxies file {str(config.parent / 'gone.txt')!r}",
    )
    config = write('[[pools]]\nname = "default"\nproxies_file = ""\n')
    assert_message(config_error(config), str(config), "pools[0].proxies_file", "path is empty")


def test_duplicate_between_proxies_and_file_names_both(write: WriteFile) -> None:
    listed = write("10.0.0.5:80\nhttp://eve:hunter2@10.0.0.1:80\n", "list.txt")
    config = write(
        '[[pools]]\nname = "default"\nproxies = ["http://eve:hunter2@10.0.0.1"]\n'
        'proxies_file = "list.txt"\n'
    )
    error = config_error(config)
    assert_message(
        error,
        f"{listed}:2",
        "pools[0].proxies_file",
        "duplicate upstream http://***@10.0.0.1:80",
        f"already at pools[0].proxies[0] ({config})",
    )
    assert "hunter2" not in str(error)


def test_duplicate_within_proxies(write: WriteFile) -> None:
    config = write('[[pools]]\nname = "default"\nproxies = ["10.0.0.1:80", "http://10.0.0.1"]\n')
    assert_message(
        config_error(config),
        str(config),
        "pools[0].proxies[1]",
        "duplicate upstream http://10.0.0.1:80, already at pools[0].proxies[0]",
    )


def test_the_same_upstream_in_two_pools_is_fine(write: WriteFile) -> None:
    config = write(
        '[[pools]]\nname = "default"\nproxies = ["10.0.0.1:80"]\n'
        '[[pools]]\nname = "b"\nproxies = ["10.0.0.1:80"]\n'
    )
    assert len(load(config).pools) == 2
