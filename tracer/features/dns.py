"""DNS for the tracee: which nameservers are the target's, and which names
this machine resolves instead.

The files feature serves the target's ``/etc/resolv.conf`` and ``/etc/hosts``
to the tracee, so every resolver (pure Go, glibc, musl) sends its queries to
the target's nameservers. Those queries are ordinary UDP datagrams (or TCP
streams) and leave through the outgoing path (``mtrace.tracer.features.net``), from
inside the target, whatever the outgoing filter says about their address:
a nameserver at 127.0.0.x means the target's loopback, never this machine's.

A DNS filter (``feature.network.dns.filter``) picks names this machine
resolves: a UDP query for such a name is forwarded, unchanged, to this
machine's resolver (the nameservers of the supervisor's own
``/etc/resolv.conf``), and the reply is handed to the tracee as if the
target's nameserver had sent it. Queries over TCP always go to the target.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

import msgspec

from ..errors import TracerError
from .policy import DnsConfig

log = logging.getLogger("mtrace.tracer.features.dns")

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` as the IPv4 address it stands for."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_nameservers(text: bytes | str) -> list[IPAddress]:
    """The ``nameserver`` lines of a resolv.conf, in order; libc's default
    (127.0.0.1) when there are none."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    found: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = unmapped(ipaddress.ip_address(fields[1].split("%", 1)[0]))
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return found or [ipaddress.IPv4Address("127.0.0.1")]


def local_nameservers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """This machine's resolvers as (host, port), read by the supervisor itself
    (which is not traced, so it sees this machine's file)."""
    try:
        with open(path, "rb") as resolv_conf:
            text = resolv_conf.read()
    except OSError:
        text = b""
    return [(str(address), DNS_PORT) for address in parse_nameservers(text)]


def question_name(message: bytes) -> str | None:
    """The name a DNS query asks about (lower case, no final dot); None if the
    message is not a query with one question."""
    import dns.exception
    import dns.name

    # Header: id, flags, qdcount, ancount, nscount, arcount (2 bytes each).
    if len(message) < 12 or message[2] & 0x80:  # QR set: a response
        return None
    if int.from_bytes(message[4:6], "big") != 1:
        return None
    try:
        name, _ = dns.name.from_wire(message, 12)
    except dns.exception.DNSException:
        return None
    return str(name.to_text(omit_final_dot=True)).lower()


class NamePattern(msgspec.Struct, frozen=True):
    """An exact name, or ``*.suffix`` (any name strictly under suffix)."""

    name: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        text = text.strip().lower().rstrip(".")
        if not text or text == "*":
            raise TracerError(
                f"invalid DNS filter entry {text!r}",
                hint="use an exact name (db.internal) or a *.suffix pattern (*.internal)",
            )
        if text.startswith("*."):
            return cls(text[2:], True)
        return cls(text, False)

    def matches(self, name: str) -> bool:
        if self.wildcard:
            return name.endswith("." + self.name)
        return name == self.name


class NameRules:
    """The DNS filter, compiled: which names this machine resolves."""

    def __init__(self, config: DnsConfig) -> None:
        self.enabled = config.enabled
        self.remote: list[NamePattern] | None = None
        self.local: list[NamePattern] | None = None
        if config.filter is not None:
            if config.filter.remote is not None and config.filter.local is not None:
                raise TracerError(
                    "feature.network.dns.filter has both a remote and a local list",
                    hint="give only one of them: the other side gets every other name",
                )
            if config.filter.remote is not None:
                self.remote = [NamePattern.parse(entry) for entry in config.filter.remote]
            if config.filter.local is not None:
                self.local = [NamePattern.parse(entry) for entry in config.filter.local]

    @property
    def filters(self) -> bool:
        """True when some names may be resolved locally (messages must be parsed)."""
        return self.remote is not None or self.local is not None

    def is_local(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if self.remote is not None:
            return not any(pattern.matches(name) for pattern in self.remote)
        if self.local is not None:
            return any(pattern.matches(name) for pattern in self.local)
        return False


class DnsSetup(msgspec.Struct):
    """What the outgoing path needs to know about DNS for one session."""

    rules: NameRules
    # The target's nameservers (from its resolv.conf): UDP/TCP port 53 to one
    # of them always leaves from the target.
    target_nameservers: Sequence[IPAddress]
    # Where queries for local names go: this machine's resolvers.
    local_resolvers: Sequence[tuple[str, int]]

    def is_target_nameserver(self, address: IPAddress, port: int) -> bool:
        return self.rules.enabled and port == DNS_PORT and address in self.target_nameservers

    def resolves_locally(self, message: bytes) -> bool:
        """True for a query the DNS filter sends to this machine's resolver."""
        if not self.rules.filters or not self.local_resolvers:
            return False
        name = question_name(message)
        return name is not None and self.rules.is_local(name)
