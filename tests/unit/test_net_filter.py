"""The outgoing filter, the DNS rules and sockaddr handling (no privileges needed)."""

from __future__ import annotations

import ipaddress
import socket

import dns.message
import pytest

from mtrace.tracer.errors import TracerError
from mtrace.tracer.features.dns import (
    DnsSetup,
    NameRules,
    parse_nameservers,
    question_name,
)
from mtrace.tracer.features.net import OutgoingRules, parse_rule
from mtrace.tracer.features.policy import DnsConfig, DnsFilter, OutgoingConfig, OutgoingFilter
from mtrace.tracer.features.relay import Endpoint, build_sockaddr, parse_sockaddr


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# --- parsing entries -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "protocol", "networks", "port", "name"), [
    ("10.0.0.1", None, ["10.0.0.1/32"], None, None),
    ("tcp://10.0.0.0/8:5432", "tcp", ["10.0.0.0/8"], 5432, None),
    ("UDP://1.2.3.4:53", "udp", ["1.2.3.4/32"], 53, None),
    ("[fd00::1]:80", None, ["fd00::1/128"], 80, None),
    ("[fd00::]/8:443", None, ["fd00::/8"], 443, None),
    ("[fd00::/16]:443", None, ["fd00::/16"], 443, None),
    ("fd00::/16", None, ["fd00::/16"], None, None),
    ("::1", None, ["::1/128"], None, None),
    ("[::ffff:127.0.0.1]", None, ["127.0.0.1/32"], None, None),
    (":53", None, None, 53, None),
    ("udp://*:53", "udp", None, 53, None),
    ("tcp://", "tcp", None, None, None),
    ("api.internal", None, [], None, "api.internal"),
    ("tcp://Db.Internal.:5432", "tcp", [], 5432, "db.internal"),
])
def test_parse_rule(text: str, protocol: str | None, networks: list[str] | None,
                    port: int | None, name: str | None) -> None:
    rule = parse_rule(text)
    assert rule.protocol == protocol
    assert rule.port == port
    assert rule.name == name
    if networks is None:
        assert rule.networks is None
    else:
        assert [str(network) for network in rule.networks or ()] == networks


@pytest.mark.parametrize("text", [
    "http://10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "10.0.0.1:http", "[fd00::1",
    "[fd00::1]x", "bad host!", "10.0.0.0/33",
])
def test_bad_entries_are_config_errors(text: str) -> None:
    with pytest.raises(TracerError) as caught:
        parse_rule(text)
    assert caught.value.hint


# --- deciding ---------------------------------------------------------------------------


def rules(**config: object) -> OutgoingRules:
    return OutgoingRules(OutgoingConfig(**config))  # type: ignore[arg-type]


def test_everything_is_remote_by_default() -> None:
    default = rules()
    assert default.is_remote("tcp", ip("10.1.2.3"), 80)
    assert default.is_remote("udp", ip("127.0.0.1"), 53)
    assert default.is_remote("tcp", ip("::1"), 80)


def test_protocol_toggles_and_localhost() -> None:
    assert not rules(tcp=False).is_remote("tcp", ip("10.0.0.1"), 80)
    assert rules(tcp=False).is_remote("udp", ip("10.0.0.1"), 80)
    assert not rules(udp=False).is_remote("udp", ip("10.0.0.1"), 80)
    keep = rules(ignore_localhost=True)
    assert not keep.is_remote("tcp", ip("127.0.0.1"), 80)
    assert not keep.is_remote("tcp", ip("127.5.6.7"), 80)
    assert not keep.is_remote("udp", ip("::1"), 80)
    assert keep.is_remote("tcp", ip("10.0.0.1"), 80)


def test_remote_list_sends_only_matches() -> None:
    remote = rules(filter=OutgoingFilter(remote=["tcp://10.0.0.0/8:5432", "udp://:53"]))
    assert remote.is_remote("tcp", ip("10.9.9.9"), 5432)
    assert not remote.is_remote("tcp", ip("10.9.9.9"), 5433)
    assert not remote.is_remote("udp", ip("10.9.9.9"), 5432)
    assert remote.is_remote("udp", ip("8.8.8.8"), 53)
    assert not remote.is_remote("tcp", ip("8.8.8.8"), 53)


def test_local_list_keeps_matches() -> None:
    local = rules(filter=OutgoingFilter(local=["192.168.0.0/16", "[fd00::]/8"]))
    assert not local.is_remote("tcp", ip("192.168.1.1"), 80)
    assert not local.is_remote("udp", ip("fd12::1"), 80)
    assert local.is_remote("tcp", ip("10.0.0.1"), 80)


def test_ignore_localhost_wins_over_a_remote_list() -> None:
    both = rules(ignore_localhost=True, filter=OutgoingFilter(remote=["127.0.0.1"]))
    assert not both.is_remote("tcp", ip("127.0.0.1"), 80)


def test_names_match_their_resolved_addresses() -> None:
    named = rules(filter=OutgoingFilter(remote=["db.internal:5432"]))
    assert named.names == ["db.internal"]
    assert not named.is_remote("tcp", ip("10.0.0.5"), 5432)  # not resolved yet: nothing
    named.resolve_names({"db.internal": [ip("10.0.0.5"), ip("fd00::5")]})
    assert named.is_remote("tcp", ip("10.0.0.5"), 5432)
    assert named.is_remote("tcp", ip("fd00::5"), 5432)
    assert not named.is_remote("tcp", ip("10.0.0.6"), 5432)


def test_both_lists_is_an_error() -> None:
    with pytest.raises(TracerError):
        rules(filter=OutgoingFilter(remote=["10.0.0.1"], local=["10.0.0.2"]))


# --- DNS --------------------------------------------------------------------------------


def test_parse_nameservers() -> None:
    text = (b"# comment\nsearch a.test\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
            b"nameserver ::ffff:10.0.0.3\nnameserver bogus\nnameserver 10.0.0.2\n")
    assert parse_nameservers(text) == [ip("10.0.0.2"), ip("fe80::1"), ip("10.0.0.3")]
    assert parse_nameservers(b"search only\n") == [ip("127.0.0.1")]


def test_question_name() -> None:
    query = dns.message.make_query("Api.Target.Test.", "A").to_wire()
    assert question_name(query) == "api.target.test"
    response = dns.message.make_response(dns.message.from_wire(query)).to_wire()
    assert question_name(response) is None
    assert question_name(b"\x00" * 5) is None
    assert question_name(query[:14]) is None


@pytest.mark.parametrize(("dns_filter", "name", "local"), [
    (None, "anything.test", False),
    (DnsFilter(local=["*.corp.example"]), "db.corp.example", True),
    (DnsFilter(local=["*.corp.example"]), "corp.example", False),
    (DnsFilter(local=["corp.example"]), "CORP.example.", True),
    (DnsFilter(remote=["*.svc.cluster.local"]), "api.ns.svc.cluster.local", False),
    (DnsFilter(remote=["*.svc.cluster.local"]), "example.com", True),
])
def test_name_rules(dns_filter: DnsFilter | None, name: str, local: bool) -> None:
    assert NameRules(DnsConfig(filter=dns_filter)).is_local(name) is local


def test_dns_setup_routes_only_target_nameservers() -> None:
    setup = DnsSetup(NameRules(DnsConfig(filter=DnsFilter(local=["*.here"]))),
                     [ip("127.0.0.1")], [("10.0.0.53", 53)])
    assert setup.is_target_nameserver(ip("127.0.0.1"), 53)
    assert not setup.is_target_nameserver(ip("127.0.0.1"), 5353)
    assert not setup.is_target_nameserver(ip("127.0.0.2"), 53)
    assert setup.resolves_locally(dns.message.make_query("x.here", "A").to_wire())
    assert not setup.resolves_locally(dns.message.make_query("x.there", "A").to_wire())
    disabled = DnsSetup(NameRules(DnsConfig(enabled=False)), [ip("127.0.0.1")], [])
    assert not disabled.is_target_nameserver(ip("127.0.0.1"), 53)


# --- sockaddrs ----------------------------------------------------------------------------


def test_sockaddr_round_trips_like_the_kernel() -> None:
    v4 = Endpoint(ip("10.1.2.3"), 8080)
    raw = build_sockaddr(socket.AF_INET, v4)
    assert len(raw) == 16
    assert parse_sockaddr(raw) == (socket.AF_INET, v4)
    mapped = build_sockaddr(socket.AF_INET6, v4)
    assert len(mapped) == 28
    assert parse_sockaddr(mapped) == (socket.AF_INET6, v4)  # mapped is stored as IPv4
    v6 = Endpoint(ip("fd00::7"), 53)
    assert parse_sockaddr(build_sockaddr(socket.AF_INET6, v6)) == (socket.AF_INET6, v6)
    with pytest.raises(ValueError):
        build_sockaddr(socket.AF_INET, v6)
    assert parse_sockaddr(b"\x01\x00/tmp/x") is None
    assert parse_sockaddr(b"\x02") is None
    # What Python (and so the kernel) would encode.
    assert build_sockaddr(socket.AF_INET, Endpoint(ip("127.0.0.1"), 53))[:8] == \
        b"\x02\x00\x00\x35\x7f\x00\x00\x01"
