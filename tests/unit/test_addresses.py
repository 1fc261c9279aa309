"""HOST:PORT as every entry point reads and writes it."""
import pytest

from livemig.addresses import DEFAULT_HOST, format_hostport, is_loopback, parse_hostport
from livemig.errors import ConfigError


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:7400", ("127.0.0.1", 7400)),
    ("example.org:0", ("example.org", 0)),
    (":7400", (DEFAULT_HOST, 7400)),
    ("[::1]:7400", ("::1", 7400)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
])
def test_parse(text, want):
    assert parse_hostport(text) == want


@pytest.mark.parametrize("text", ["7400", "host:", "host:port", "host:65536", "host:-1", ""])
def test_parse_refuses_with_the_name_of_what_was_given(text):
    with pytest.raises(ConfigError, match="--to"):
        parse_hostport(text, what="--to")


@pytest.mark.parametrize("host", ["127.0.0.1", "example.org", "::1", "fe80::1"])
def test_format_is_what_parse_reads(host):
    assert parse_hostport(format_hostport(host, 7400)) == (host, 7400)


def test_ipv6_literals_are_bracketed():
    assert format_hostport("::1", 1) == "[::1]:1" and format_hostport("10.0.0.1", 1) == "10.0.0.1:1"


@pytest.mark.parametrize("host, want", [
    ("localhost", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
    ("10.0.0.1", False), ("0.0.0.0", False), ("example.org", False),
])
def test_is_loopback(host, want):
    assert is_loopback(host) is want
