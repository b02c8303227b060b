"""The agent's resolver: hosts-file parsing and how DNS failures become errnos."""

from __future__ import annotations

import asyncio
import errno
import socket

import dns.resolver
import pytest

from mtrace.agent.names import TargetNameResolver, _failure, parse_hosts

HOSTS = """\
# comment 10.0.0.99 commented.test
127.0.0.1   localhost
10.0.0.1    one.test   alias.test   # trailing comment
10.0.0.2    ONE.test
fd00::1     one.test
fe80::1%eth0 linklocal.test
not-an-ip   broken.test
"""


def test_hosts_lookup_follows_file_order_family_and_case() -> None:
    assert parse_hosts(HOSTS, "one.test", socket.AF_UNSPEC) == ["10.0.0.1", "10.0.0.2", "fd00::1"]
    assert parse_hosts(HOSTS, "One.Test.", socket.AF_INET) == ["10.0.0.1", "10.0.0.2"]
    assert parse_hosts(HOSTS, "one.test", socket.AF_INET6) == ["fd00::1"]
    assert parse_hosts(HOSTS, "alias.test", socket.AF_INET) == ["10.0.0.1"]
    assert parse_hosts(HOSTS, "linklocal.test", socket.AF_INET6) == ["fe80::1"]
    assert parse_hosts(HOSTS, "commented.test", socket.AF_UNSPEC) == []
    assert parse_hosts(HOSTS, "broken.test", socket.AF_UNSPEC) == []


def test_dns_failures_map_to_getaddrinfo_like_errnos() -> None:
    nxdomain = dns.resolver.NXDOMAIN()
    no_answer = dns.resolver.NoAnswer()
    timeout = dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])
    servfail = dns.resolver.NoNameservers()
    assert _failure("x", [nxdomain]).errno == errno.ENOENT
    assert _failure("x", [nxdomain, nxdomain]).errno == errno.ENOENT
    assert _failure("x", [nxdomain, no_answer]).errno == errno.ENODATA
    assert _failure("x", [timeout]).errno == errno.ETIMEDOUT
    assert _failure("x", [servfail]).errno == errno.EAGAIN


def _resolver(files: dict[bytes, bytes]) -> TargetNameResolver:
    async def read(path: bytes) -> bytes | None:
        return files.get(path)

    return TargetNameResolver(read)


def test_the_hosts_file_answers_before_dns_and_literals_need_no_lookup() -> None:
    resolver = _resolver({b"/etc/hosts": HOSTS.encode()})
    found = asyncio.run(resolver.resolve("one.test", socket.AF_UNSPEC))
    assert found.addresses == ["10.0.0.1", "10.0.0.2", "fd00::1"]
    assert asyncio.run(resolver.resolve("192.0.2.1", socket.AF_INET)).addresses == ["192.0.2.1"]
    with pytest.raises(OSError) as caught:
        asyncio.run(resolver.resolve("192.0.2.1", socket.AF_INET6))
    assert caught.value.errno == errno.ENODATA
    with pytest.raises(OSError) as caught:
        asyncio.run(resolver.resolve("", socket.AF_INET))
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(OSError) as caught:
        asyncio.run(resolver.resolve("one.test", 12345))
    assert caught.value.errno == errno.EAFNOSUPPORT
