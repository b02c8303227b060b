"""Name resolution the way the target resolves names.

The target's own ``/etc/hosts`` is consulted first, then DNS with the target's
``/etc/resolv.conf`` (nameservers, search list, ndots, timeout), both read
through the target's root; the queries leave from the agent, which lives in the
target's network namespace, so ``nameserver 127.0.0.1`` means the target's
loopback. (``nsswitch.conf`` is not interpreted: "files, then dns" is what
almost every container image uses.)

Failures are errnos, following getaddrinfo's meanings:

=========== ====================================================
ENOENT      no such name (NXDOMAIN; EAI_NONAME)
ENODATA     the name exists but has no address of that family
EAGAIN      the nameservers failed (SERVFAIL, REFUSED; EAI_AGAIN)
ETIMEDOUT   no nameserver answered in time
=========== ====================================================
"""

from __future__ import annotations

import asyncio
import errno
import io
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .protocol import Addresses

if TYPE_CHECKING:
    import dns.asyncresolver

# dnspython is imported on the first name that reaches DNS, not at start-up:
# its import is about 50 ms of every agent's start.

HOSTS_PATH = b"/etc/hosts"
RESOLV_CONF_PATH = b"/etc/resolv.conf"
_MAX_LIFETIME = 30.0

ReadTargetFile = Callable[[bytes], Awaitable[bytes | None]]


def _error(code: int, name: str, detail: str) -> OSError:
    return OSError(code, f"{name}: {detail}")


def parse_hosts(text: str, name: str, family: int) -> list[str]:
    """Addresses for ``name`` in a hosts file, in file order."""
    wanted = name.rstrip(".").lower()
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or wanted not in (alias.rstrip(".").lower() for alias in fields[1:]):
            continue
        try:
            address = ipaddress.ip_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        if _family_matches(address, family) and str(address) not in found:
            found.append(str(address))
    return found


def _family_matches(address: ipaddress.IPv4Address | ipaddress.IPv6Address, family: int) -> bool:
    if family == socket.AF_INET:
        return address.version == 4
    if family == socket.AF_INET6:
        return address.version == 6
    return True


def _ipv4_first(addresses: list[str]) -> list[str]:
    return sorted(addresses, key=lambda text: ipaddress.ip_address(text).version)


class TargetNameResolver:
    def __init__(self, read_target_file: ReadTargetFile) -> None:
        self._read = read_target_file

    async def resolve(self, name: str, family: int) -> Addresses:
        if family not in (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6):
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        if not name or len(name) > 253:
            raise _error(errno.EINVAL, name, "invalid name")
        try:
            literal = ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            if not _family_matches(literal, family):
                raise _error(errno.ENODATA, name, "address of another family")
            return Addresses(addresses=[str(literal)], canonical_name=name)

        hosts = await self._read(HOSTS_PATH)
        if hosts is not None:
            found = parse_hosts(hosts.decode("utf-8", "replace"), name, family)
            if found:
                return Addresses(addresses=_ipv4_first(found), canonical_name=name.rstrip("."))
        return await self._query_dns(name, family)

    async def _resolver(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver
        import dns.resolver

        resolver = dns.asyncresolver.Resolver(configure=False)
        conf = await self._read(RESOLV_CONF_PATH)
        try:
            resolver.read_resolv_conf(io.StringIO((conf or b"").decode("utf-8", "replace")))
        except dns.resolver.NoResolverConfiguration:
            resolver.nameservers = ["127.0.0.1"]  # what libc does without nameservers
        resolver.lifetime = min(max(resolver.timeout * 2, 1.0), _MAX_LIFETIME)
        return resolver

    async def _query_dns(self, name: str, family: int) -> Addresses:
        resolver = await self._resolver()
        record_types = {int(socket.AF_INET): ["A"], int(socket.AF_INET6): ["AAAA"]}.get(family, ["A", "AAAA"])
        outcomes = await asyncio.gather(
            *(resolver.resolve(name, record_type, search=True) for record_type in record_types),
            return_exceptions=True,
        )
        addresses: list[str] = []
        canonical_name = name.rstrip(".")
        failures: list[BaseException] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                failures.append(outcome)
                continue
            canonical_name = outcome.canonical_name.to_text(omit_final_dot=True)
            addresses.extend(record.to_text() for record in outcome)
        if addresses:
            return Addresses(addresses=_ipv4_first(addresses), canonical_name=canonical_name)
        raise _failure(name, failures)


def _failure(name: str, failures: list[BaseException]) -> OSError:
    import dns.exception
    import dns.name
    import dns.resolver

    # The most informative failure wins: a name that exists beats NXDOMAIN.
    kinds = {type(failure) for failure in failures}
    invalid_name = (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong)
    if any(isinstance(failure, invalid_name) for failure in failures):
        return _error(errno.EINVAL, name, "invalid name")
    if dns.resolver.NoAnswer in kinds:
        return _error(errno.ENODATA, name, "no address of the requested family")
    if dns.resolver.NXDOMAIN in kinds and len(kinds) == 1:
        return _error(errno.ENOENT, name, "no such name")
    if any(issubclass(kind, dns.exception.Timeout) for kind in kinds):
        return _error(errno.ETIMEDOUT, name, "no nameserver answered in time")
    if dns.resolver.NXDOMAIN in kinds:
        return _error(errno.ENOENT, name, "no such name")
    for failure in failures:
        if not isinstance(failure, dns.exception.DNSException):
            raise failure
    detail = "; ".join(str(failure) for failure in failures) or "resolution failed"
    return _error(errno.EAGAIN, name, detail)
