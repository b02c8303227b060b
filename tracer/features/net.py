"""Outgoing network: TCP and UDP that leave from the target's network namespace.

What is trapped and what it becomes (see "what gets trapped" in DESIGN.md):

* ``connect`` to an address the outgoing filter sends to the target:
  TCP: the agent connects in the target first (so ``ECONNREFUSED`` and
  timeouts are the target's), then the tracee's own socket is connected to a
  one-shot loopback relay bound to that stream (``mtrace.tracer.features.relay``). The
  answer is exactly the kernel's for that loopback connect: 0, or
  ``EINPROGRESS`` for a non-blocking socket. Blocking and non-blocking
  callers alike wait for the target's connect (the trap loop never does: it
  is a ``Defer``). UDP: the socket is connected to a relay whose datagrams go
  through an agent UDP socket.
* ``sendto``/``sendmsg`` with a destination (unconnected UDP): the datagram is
  read from tracee memory and sent from the target; the socket is bound first
  if it was not (as the kernel's autobind would), and replies arrive in the
  tracee's own socket from a loopback "peer socket" per remote peer.
* ``recvfrom``/``recvmsg`` on a relayed UDP socket, when the caller wants the
  source address: the datagram is received from the tracee's socket by the
  supervisor and the source becomes the remote peer's real address (musl and
  glibc drop replies whose source is not the nameserver they asked). Every
  other socket continues at once.
* ``getpeername`` on a relayed socket: the address the program connected to.
  ``getsockname`` on a relayed TCP socket: the connection's local address in
  the target (what the program would see running there). UDP sockets keep
  their own (the agent's UDP socket is bound to the wildcard address, which
  says nothing more).

Which connections are relayed (``feature.network.outgoing``): unix sockets
never; with ``tcp``/``udp`` off, none of that protocol; with
``ignore_localhost``, nothing to 127.0.0.0/8 or ::1; then the ``filter``:
with a ``remote`` list only matching destinations, with a ``local`` list all
but matching ones, with none all. Entries are ``[tcp://|udp://]host[:port]``
where host is an IP, a CIDR subnet (``10.0.0.0/8``, ``[fd00::/8]:443``), a
name, or empty/``*`` for any. Names are resolved once at start-up, both in the
target (through the agent) and on this machine, and match any of those
addresses. DNS comes first: port 53 of one of the target's nameservers (its
resolv.conf) always leaves from the target while ``feature.network.dns`` is
enabled, even at 127.0.0.x (see ``mtrace.tracer.features.dns``).

If the agent is lost: open TCP relays reset the tracee's socket
(``ECONNRESET``), UDP receives fail with ``ECONNREFUSED``, and new remote
connects and sends fail with ``ENETUNREACH``; ``context.agent_lost`` is set.

Sockets are recognised by inode (``socket:[N]``): a trapped call on a socket
mtrace never relayed costs one readlink at most.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import os
import re
import select
import socket
import struct
import time
from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import Any

import msgspec

from ...agent.errors import AgentUnavailable, RemoteError
from ...agent.protocol import CAP_UNIX_STREAM
from ..backend import Handler
from ..call import SyscallCall
from ..errors import TracerError
from ..outcome import (
    CONTINUE,
    Defer,
    Errno,
    OnTraceeFd,
    Outcome,
    ReplaceFd,
    ReturnValue,
)
from . import direct as direct_path
from .dns import (
    DnsSetup,
    IPAddress,
    NameRules,
    local_nameservers,
    parse_nameservers,
)
from .policy import OutgoingConfig, compile_pattern
from .relay import (
    MAX_DATAGRAM,
    Endpoint,
    UdpRelay,
    borrowed,
    build_sockaddr,
    connect_to_relay,
    connect_to_unix_relay,
    endpoint_of,
    parse_sockaddr,
    reachable_address,
    relay_tcp,
)
from .remote import RemoteContext

log = logging.getLogger("mtrace.tracer.features.net")

TRAPPED: tuple[str, ...] = (
    "connect", "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
    "getpeername", "getsockname",
)
#: recv() is recvfrom(fd, buf, len, flags, NULL, NULL): only a caller that asks
#: for the source address (argument 4) can need its answer rewritten, so the
#: filter lets every other recvfrom run at full speed. Likewise send() is
#: sendto(fd, buf, len, flags, NULL, 0): only a destination (argument 4) can
#: need relaying (a key-value client's every request is a send()).
TRAP_IF_NONZERO: dict[str, int] = {"recvfrom": 4, "sendto": 4}

#: How long the target may take to connect when the socket sets no SO_SNDTIMEO.
CONNECT_TIMEOUT = 60.0
#: How often UDP relays are checked for a tracee socket that is gone (each
#: holds an agent socket; glibc opens a UDP socket per lookup).
SWEEP_INTERVAL = 5.0
#: Past this many UDP relays, sweeps run every SWEEP_EARLY_DELAY.
SWEEP_EARLY = 64
SWEEP_EARLY_DELAY = 0.5
#: getpeername/getsockname answers kept for sockets whose relay ended.
MAX_REMEMBERED = 16384

_SOCKADDR_MAX = 128
_MSGHDR = struct.Struct("=QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
#: struct mmsghdr: a msghdr, then the unsigned msg_len the kernel fills in (and padding).
_MMSGHDR_SIZE = _MSGHDR.size + 8
_MSG_LEN_OFFSET = _MSGHDR.size
_MSG_LEN = struct.Struct("=I")
#: sendmmsg/recvmmsg take at most this many messages a call (the kernel's UIO_MAXIOV).
_MAX_MESSAGES = 1024
_IOVEC = struct.Struct("=QQ")
_TIMEVAL = struct.Struct("=qq")
_SOCKLEN = struct.Struct("=I")
_MSG_DONTWAIT = socket.MSG_DONTWAIT
_MSG_WAITFORONE = 0x10000
_TIMESPEC = struct.Struct("=qq")
_MAX_IOV = 1024
#: Control data read from a message sent locally on the tracee's behalf.
_MAX_CONTROL = 4096
#: No datagram is larger: a bigger receive buffer is never filled.
_MAX_RECEIVE = 1 << 17


# -- the filter ---------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_RULE = re.compile(r"^(?:(?P<protocol>[a-zA-Z]+)://)?(?P<rest>.*)$")
_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")


class Rule(msgspec.Struct, frozen=True):
    """One filter entry: protocol (None: both), host (networks; None: any), port."""

    text: str
    protocol: str | None
    networks: tuple[Network, ...] | None
    port: int | None
    name: str | None = None

    def matches(self, protocol: str, address: IPAddress, port: int) -> bool:
        if self.protocol is not None and self.protocol != protocol:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.networks is None:
            return True
        return any(address in network for network in self.networks)


def _invalid(text: str, why: str) -> TracerError:
    return TracerError(
        f"invalid outgoing filter entry {text!r}: {why}",
        hint="entries look like tcp://10.0.0.0/8:5432, udp://dns.internal:53, "
             "[fd00::1]:80 or api.internal",
    )


def parse_rule(text: str) -> Rule:
    """``[tcp://|udp://]host-or-subnet[:port]``; a name's addresses come later
    (:meth:`OutgoingRules.resolve_names`)."""
    match = _RULE.match(text.strip())
    assert match is not None
    protocol = match.group("protocol")
    if protocol is not None:
        protocol = protocol.lower()
        if protocol not in ("tcp", "udp"):
            raise _invalid(text, f"unknown protocol {protocol!r} (tcp or udp)")
    rest = match.group("rest")
    port_text: str | None = None
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise _invalid(text, "unclosed [")
        if after.startswith("/"):
            prefix, _, port_part = after[1:].partition(":")
            host += "/" + prefix
            port_text = port_part if _ else None
        elif after.startswith(":"):
            port_text = after[1:]
        elif after:
            raise _invalid(text, f"unexpected {after!r} after ]")
    elif rest.count(":") > 1:
        host = rest  # a bare IPv6 address or subnet: no port
    elif ":" in rest:
        host, port_text = rest.rsplit(":", 1)
    else:
        host = rest
    port: int | None = None
    if port_text not in (None, "", "*"):
        assert port_text is not None
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _invalid(text, f"bad port {port_text!r}")
        port = int(port_text)
    if host in ("", "*"):
        return Rule(text, protocol, None, port)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        if not _NAME.match(host):
            raise _invalid(text, f"{host!r} is neither an address, a subnet nor a name") from None
        return Rule(text, protocol, (), port, name=host.rstrip(".").lower())
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 \
            and network.network_address.ipv4_mapped is not None:
        mapped = network.network_address.ipv4_mapped
        network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return Rule(text, protocol, (network,), port)


def unix_path(sockaddr: bytes) -> bytes | None:
    """The absolute path (or ``\\0``-led abstract name) of a ``sockaddr_un``;
    None for other families, unnamed and relative paths (those stay local)."""
    if len(sockaddr) < 3 or struct.unpack_from("=H", sockaddr)[0] != socket.AF_UNIX:
        return None
    path = sockaddr[2:]
    if path[:1] == b"\0":
        return path if len(path) > 1 else None
    path = path.split(b"\0", 1)[0]
    return path if path.startswith(b"/") else None


def unix_path_text(path: bytes) -> str:
    """What unix_streams patterns match: the path, or ``@name`` for an abstract one."""
    if path[:1] == b"\0":
        return "@" + path[1:].decode(errors="replace")
    return path.decode(errors="replace")


class OutgoingRules:
    """``feature.network.outgoing``, compiled: which destinations leave from the target."""

    def __init__(self, config: OutgoingConfig) -> None:
        self.tcp = config.tcp
        self.udp = config.udp
        self.ignore_localhost = config.ignore_localhost
        self.remote: list[Rule] | None = None
        self.local: list[Rule] | None = None
        if config.filter is not None:
            if config.filter.remote is not None and config.filter.local is not None:
                raise TracerError(
                    "feature.network.outgoing.filter has both a remote and a local list",
                    hint="give only one of them: the other side gets every other destination",
                )
            if config.filter.remote is not None:
                self.remote = [parse_rule(entry) for entry in config.filter.remote]
            if config.filter.local is not None:
                self.local = [parse_rule(entry) for entry in config.filter.local]

    @property
    def names(self) -> list[str]:
        rules = (self.remote or []) + (self.local or [])
        return sorted({rule.name for rule in rules if rule.name is not None})

    def resolve_names(self, addresses: Mapping[str, Sequence[IPAddress]]) -> None:
        """Give name rules their addresses (name -> addresses found anywhere)."""
        def resolved(rule: Rule) -> Rule:
            if rule.name is None:
                return rule
            networks = tuple(ipaddress.ip_network(address)
                             for address in addresses.get(rule.name, ()))
            return Rule(rule.text, rule.protocol, networks, rule.port, rule.name)

        if self.remote is not None:
            self.remote = [resolved(rule) for rule in self.remote]
        if self.local is not None:
            self.local = [resolved(rule) for rule in self.local]

    def is_remote(self, protocol: str, address: IPAddress, port: int) -> bool:
        if (protocol == "tcp" and not self.tcp) or (protocol == "udp" and not self.udp):
            return False
        if self.ignore_localhost and address.is_loopback:
            return False
        if self.remote is not None:
            return any(rule.matches(protocol, address, port) for rule in self.remote)
        if self.local is not None:
            return not any(rule.matches(protocol, address, port) for rule in self.local)
        return True


# -- helpers on tracee sockets ---------------------------------------------------------

def socket_inode(tid: int, fd: int) -> int | None:
    """The inode of the tracee's socket ``fd`` (None if it is not a socket)."""
    try:
        link = os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return None
    if not link.startswith("socket:["):
        return None
    return int(link[8:-1])


def live_udp_inodes() -> set[int]:
    """Inodes of every UDP socket in this network namespace (the tracee's):
    a relayed socket missing here was closed by the tracee."""
    inodes: set[int] = set()
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            with open(table, "rb") as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9:
                        inodes.add(int(fields[9]))
        except OSError:
            continue
    return inodes


def _take_socket(tid: int, fd: int, inode: int) -> int | None:
    """The tracee's socket again (its fd ``fd`` of thread ``tid``), if it still is that one."""
    from ..seccomp import take_tracee_fd

    try:
        local = take_tracee_fd(tid, fd)
    except OSError:
        return None
    if os.fstat(local).st_ino != inode:
        os.close(local)
        return None
    return local


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def _timeout_option(sock: socket.socket, option: int) -> float | None:
    seconds, microseconds = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, option,
                                                            _TIMEVAL.size))
    value = seconds + microseconds / 1e6
    return value if value > 0 else None


def _address_reply(call: SyscallCall, address_pointer: int, length_pointer: int,
                   sockaddr: bytes) -> list[tuple[int, bytes]]:
    """The writes that return ``sockaddr`` through (addr, addrlen) as the kernel does."""
    if address_pointer == 0 or length_pointer == 0:
        return []
    (capacity,) = _SOCKLEN.unpack(call.read(length_pointer, 4))
    writes = [(length_pointer, _SOCKLEN.pack(len(sockaddr)))]
    if capacity:
        writes.insert(0, (address_pointer, sockaddr[:capacity]))
    return writes


def _encode_ancillary(ancillary: list[tuple[int, int, bytes]], capacity: int) -> tuple[bytes, bool]:
    """cmsghdr records for the tracee's control buffer; True if some did not fit."""
    out = bytearray()
    for level, kind, data in ancillary:
        length = 16 + len(data)
        record = struct.pack("=Qii", length, level, kind) + data
        record += bytes((-len(record)) % 8)
        if len(out) + length > capacity:
            return bytes(out), True
        out += record[: capacity - len(out)]
    return bytes(out), False


async def _readable(poller: select.epoll, relay: UdpRelay, deadline: float | None) -> None:
    """Until ``poller`` (an epoll fd holding a tracee socket) is readable, the
    relay fails, or ``deadline`` (the loop's clock) passes.

    The event loop watches the epoll fd, never the socket: uvloop (libuv)
    sets O_NONBLOCK on a watched fd, and a dup of the tracee's socket shares
    its file status flags, so the program's blocking socket would turn
    non-blocking (its next receive: EAGAIN at once)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(poller.fileno(), _set_once, readable)
    failure: asyncio.Future[Any] = asyncio.ensure_future(relay.failure.wait())
    try:
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        await asyncio.wait([readable, failure], timeout=remaining,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(poller.fileno())
        failure.cancel()


def _python_address(family: int, endpoint: Endpoint) -> tuple[Any, ...]:
    """``endpoint`` as a ``family`` socket's sendmsg takes it (IPv4 on an IPv6
    socket: IPv4-mapped)."""
    if family == socket.AF_INET:
        return (endpoint.host, endpoint.port)
    host = endpoint.host if endpoint.address.version == 6 else f"::ffff:{endpoint.host}"
    return (host, endpoint.port, 0, 0)


def _decode_ancillary(control: bytes) -> list[tuple[int, int, bytes]]:
    """The cmsghdr records of a control buffer as (level, type, data)."""
    records: list[tuple[int, int, bytes]] = []
    offset = 0
    while offset + 16 <= len(control):
        length, level, kind = struct.unpack_from("=Qii", control, offset)
        if length < 16 or offset + length > len(control):
            break
        records.append((level, kind, control[offset + 16: offset + length]))
        offset += (length + 7) & ~7
    return records


class _Datagram(msgspec.Struct, frozen=True):
    """One message of a sendmmsg: to a remote ``endpoint`` through the relay,
    or (``endpoint`` None) sent by this machine's kernel to ``address``."""

    data: bytes
    endpoint: Endpoint | None = None
    address: tuple[Any, ...] | None = None
    ancillary: list[tuple[int, int, bytes]] = msgspec.field(default_factory=list)


class Relayed(msgspec.Struct, frozen=True):
    """What getpeername/getsockname answer for a relayed socket."""

    peer: bytes
    local: bytes | None  # None: the socket's own address


class _Receive(msgspec.Struct, frozen=True):
    """A trapped recvfrom/recvmsg: where the datagram, its source and the rest go."""

    iov: tuple[tuple[int, int], ...]
    flags: int
    address_pointer: int
    # recvfrom: a pointer to the socklen_t; recvmsg: the msghdr (namelen, controllen, flags).
    length_pointer: int
    capacity_of_address: int
    msghdr: int = 0
    control_pointer: int = 0
    control_capacity: int = 0

    @property
    def size(self) -> int:
        return min(sum(length for _, length in self.iov), _MAX_RECEIVE)


# -- the handlers ----------------------------------------------------------------------------

class Outgoing:
    """The state of one session's outgoing network and its syscall handlers."""

    def __init__(self, context: RemoteContext, rules: OutgoingRules, dns: DnsSetup,
                 target_network: direct_path.TargetNetwork | None = None) -> None:
        self.context = context
        self.rules = rules
        self.dns = dns
        # Local targets: TCP sockets are made in the target's namespace and
        # handed to the program (mtrace.tracer.features.direct), no relay.
        self.target_network = target_network
        # Written on the event loop, read by the trap loop (single dict operations).
        self.relayed: dict[int, Relayed] = {}
        self.udp_relays: dict[int, UdpRelay] = {}
        # Inodes of the UDP sockets the direct path made (insertion ordered, bounded):
        # their datagrams are the kernel's, never a relay's.
        self.direct_udp: dict[int, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeping = False
        self._lost_reported = False
        unix_streams = context.features.network.outgoing.unix_streams
        self.unix_streams = (compile_pattern("|".join(f"(?:{pattern})" for pattern in unix_streams))
                             if unix_streams else None)
        if self.unix_streams is not None and CAP_UNIX_STREAM not in context.client.capabilities:
            log.warning("the agent cannot connect Unix sockets (an older mtrace): "
                        "feature.network.outgoing.unix_streams is ignored")
            self.unix_streams = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "connect": self.handle_connect,
            "sendto": self.handle_sendto,
            "sendmsg": self.handle_sendmsg,
            "sendmmsg": self.handle_sendmmsg,
            "recvfrom": self.handle_recvfrom,
            "recvmsg": self.handle_recvmsg,
            "recvmmsg": self.handle_recvmmsg,
            "getpeername": self.handle_getpeername,
            "getsockname": self.handle_getsockname,
        }

    # -- decisions --

    def remote_for(self, protocol: str, endpoint: Endpoint) -> bool:
        if self.dns.is_target_nameserver(endpoint.address, endpoint.port):
            return True
        return self.rules.is_remote(protocol, endpoint.address, endpoint.port)

    def agent_gone(self) -> bool:
        if not self.context.agent_lost and self.context.client.closed:
            self.agent_lost()
        return self.context.agent_lost

    def agent_lost(self) -> None:
        self.context.agent_lost = True
        if not self._lost_reported:
            # The CLI tells the user (its watcher); this is the detail for -v.
            self._lost_reported = True
            log.info("the agent is gone: remote connections now fail "
                     "(ECONNRESET on open ones, ENETUNREACH on new ones)")

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _remember(self, inode: int, relayed: Relayed) -> None:
        self.relayed.pop(inode, None)
        self.relayed[inode] = relayed
        while len(self.relayed) > MAX_REMEMBERED:
            oldest = next(iter(self.relayed))
            if oldest in self.udp_relays:
                break
            del self.relayed[oldest]

    # -- connect --

    def handle_connect(self, call: SyscallCall) -> Outcome:
        length = min(call.uint_arg(2), _SOCKADDR_MAX)
        if call.pointer_arg(1) == 0 or length < 2:
            return CONTINUE
        raw = call.read(call.pointer_arg(1), length)
        parsed = parse_sockaddr(raw)
        if parsed is None and self.unix_streams is not None:
            path = unix_path(raw)
            if path is not None and self.unix_streams.search(unix_path_text(path)):
                return OnTraceeFd(call.int_arg(0), partial(self._connect_unix_action, path))
        if parsed is None:
            if self.relayed and struct.unpack_from("=H", raw)[0] == socket.AF_UNSPEC:
                self._forget(call.tid, call.int_arg(0))  # UDP "disconnect"
            return CONTINUE
        family, endpoint = parsed
        tcp, udp = self.remote_for("tcp", endpoint), self.remote_for("udp", endpoint)
        if not (tcp or udp):
            if self.relayed:
                self._forget(call.tid, call.int_arg(0))
            return CONTINUE
        direct = self.target_network is not None and not call.sees_results
        return OnTraceeFd(call.int_arg(0), partial(self._connect_action, call.tid,
                                                   call.int_arg(0), family, endpoint, tcp, udp,
                                                   raw if direct else None))

    def _forget(self, tid: int, fd: int) -> None:
        inode = socket_inode(tid, fd)
        if inode is not None and inode in self.relayed and inode not in self.udp_relays:
            return  # a TCP socket: the kernel answers EISCONN and keeps it relayed
        if inode is not None:
            self.relayed.pop(inode, None)
            relay = self.udp_relays.get(inode)
            if relay is not None:
                relay.connected_peer = None

    def _stream_connect_preamble(self, sock: socket.socket, fd: int,
                                 agent_gone_errno: int) -> Outcome | tuple[float, int]:
        """What a stream connect (TCP or Unix) decides before it needs the agent:
        an early outcome (already connected: the kernel's EISCONN; the agent
        gone: ``agent_gone_errno``), or the connect timeout (the socket's
        SO_SNDTIMEO, as the kernel uses it) and the socket's inode."""
        try:
            sock.getpeername()
            return CONTINUE  # already connected: the kernel says EISCONN
        except OSError:
            pass
        if self.agent_gone():
            return Errno(agent_gone_errno)
        timeout = _timeout_option(sock, socket.SO_SNDTIMEO) or CONNECT_TIMEOUT
        return timeout, os.fstat(fd).st_ino

    def _connect_action(self, tid: int, tracee_fd: int, family: int, endpoint: Endpoint,
                        tcp: bool, udp: bool, sockaddr: bytes | None, fd: int) -> Outcome:
        with borrowed(fd) as sock:
            if sock.family != family:
                return CONTINUE  # the kernel's EAFNOSUPPORT / EINVAL
            # What the socket object read from the fd as it was made
            # (SO_TYPE, SO_PROTOCOL): no second getsockopt of each.
            kind, protocol = sock.type, sock.proto
            if kind == socket.SOCK_STREAM and tcp and protocol == socket.IPPROTO_TCP:
                ready = self._stream_connect_preamble(sock, fd, errno.ENETUNREACH)
                if not isinstance(ready, tuple):
                    return ready
                timeout, inode = ready
                if sockaddr is not None:
                    outcome = self._connect_direct(tid, tracee_fd, sock, inode, sockaddr,
                                                   endpoint, timeout)
                    if outcome is not None:
                        return outcome
                return Defer(self._connect_tcp(os.dup(fd), family, endpoint, inode, timeout))
            if kind == socket.SOCK_DGRAM and udp and protocol in (0, socket.IPPROTO_UDP):
                inode = os.fstat(fd).st_ino
                if inode in self.direct_udp:
                    return CONTINUE  # a socket of the target: the kernel connects it there
                if self.agent_gone():
                    return Errno(errno.ENETUNREACH)
                if sockaddr is not None:
                    outcome = self._connect_udp_direct(tid, tracee_fd, sock, inode, sockaddr,
                                                       endpoint)
                    if outcome is not None:
                        return outcome
                return Defer(self._connect_udp(os.dup(fd), family, endpoint, inode,
                                               tid, tracee_fd))
        return CONTINUE

    async def _connect_tcp(self, fd: int, family: int, endpoint: Endpoint, inode: int,
                           timeout: float) -> Outcome:
        try:
            try:
                stream = await self.context.client.open_tcp(endpoint.host, endpoint.port, timeout)
            except AgentUnavailable:
                self.agent_lost()
                return Errno(errno.ENETUNREACH)
            except RemoteError as error:
                return Errno(error.errno or errno.EIO)
            try:
                connection, result = await connect_to_relay(fd, family)
            except (OSError, TimeoutError) as error:
                stream.close()
                return Errno(getattr(error, "errno", None) or errno.ECONNABORTED)
            local = Endpoint.of(*stream.local_address)
            try:
                local_sockaddr: bytes | None = build_sockaddr(family, local)
            except ValueError:
                local_sockaddr = None
            self._remember(inode, Relayed(build_sockaddr(family, endpoint), local_sockaddr))
            self._spawn(relay_tcp(connection, stream, on_agent_lost=self.agent_lost))
            log.debug("tcp %s relayed (inode %d)", endpoint, inode)
            return ReturnValue(0) if result == 0 else Errno(result)
        finally:
            os.close(fd)

    # -- Unix streams (feature.network.outgoing.unix_streams) --

    def _connect_unix_action(self, path: bytes, fd: int) -> Outcome:
        with borrowed(fd) as sock:
            if (sock.family != socket.AF_UNIX
                    or sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM):
                return CONTINUE  # datagram and seqpacket sockets stay local
            ready = self._stream_connect_preamble(sock, fd, errno.ECONNREFUSED)
            if not isinstance(ready, tuple):
                return ready
            timeout, inode = ready
            return Defer(self._connect_unix(os.dup(fd), path, inode, timeout))

    async def _connect_unix(self, fd: int, path: bytes, inode: int, timeout: float) -> Outcome:
        try:
            try:
                stream = await self.context.client.open_unix(path, timeout)
            except AgentUnavailable:
                self.agent_lost()
                return Errno(errno.ECONNREFUSED)
            except RemoteError as error:
                return Errno(error.errno or errno.EIO)
            try:
                connection, result = await connect_to_unix_relay(fd, self.context.session_dir)
            except (OSError, TimeoutError) as error:
                stream.close()
                return Errno(getattr(error, "errno", None) or errno.ECONNABORTED)
            peer = struct.pack("=H", socket.AF_UNIX) + path + (b"" if path[:1] == b"\0" else b"\0")
            self._remember(inode, Relayed(peer, None))
            self._spawn(relay_tcp(connection, stream, on_agent_lost=self.agent_lost))
            log.debug("unix %r relayed (inode %d)", path, inode)
            return ReturnValue(0) if result == 0 else Errno(result)
        finally:
            os.close(fd)

    def _connect_direct(self, tid: int, tracee_fd: int, sock: socket.socket, inode: int,
                        sockaddr: bytes, endpoint: Endpoint, timeout: float) -> Outcome | None:
        """The direct path (see ``mtrace.tracer.features.direct``); None: relay instead."""
        assert self.target_network is not None
        if direct_path.is_bound(sock):
            log.debug("tcp %s relayed: the socket is bound", endpoint)
            return None
        state = direct_path.fd_state(tid, tracee_fd, inode)
        if state is None:
            return Errno(errno.EBADF)
        if state.held_elsewhere:
            log.debug("tcp %s relayed: the socket is in an epoll set or dup'ed", endpoint)
            return None
        cloexec = state.close_on_exec
        kind = (sock.family.value, socket.SOCK_STREAM)  # plain ints: no enum per use
        made = self.target_network.socket(*kind, socket.IPPROTO_TCP)
        try:
            direct_path.copy_socket_state(sock, made, self.target_network.fresh_options(*kind), kind)
            result = direct_path.connect_raw(made, sockaddr)
            if result not in (0, *direct_path.IN_PROGRESS):
                made.close()
                return Errno(result)
            if state.nonblocking:
                then: ReturnValue | Errno = ReturnValue(0) if result == 0 else \
                    Errno(errno.EINPROGRESS)
                log.debug("tcp %s direct (inode %d)", endpoint, inode)
                return ReplaceFd(made.detach(), tracee_fd, then, cloexec=cloexec)
            if result != 0 and direct_path.connected_soon(made):
                result = direct_path.pending_error(made)
                if result:
                    made.close()
                    return Errno(result)
            if result == 0:
                direct_path.set_blocking(made, True)
                return ReplaceFd(made.detach(), tracee_fd, ReturnValue(0), cloexec=cloexec)
        except BaseException:
            made.close()
            raise
        return Defer(self._finish_direct(made, tracee_fd, cloexec, endpoint, timeout))

    def _connect_udp_direct(self, tid: int, tracee_fd: int, sock: socket.socket, inode: int,
                            sockaddr: bytes, endpoint: Endpoint) -> Outcome | None:
        """A connected UDP socket made in the target's namespace (the direct path);
        None: relay instead."""
        assert self.target_network is not None
        if self.dns.is_target_nameserver(endpoint.address, endpoint.port):
            return None  # DNS keeps the relay: the DNS filter sees every query there
        if inode in self.udp_relays:
            log.debug("udp %s relayed: the socket already sent through the relay", endpoint)
            return None
        if direct_path.is_bound(sock):
            log.debug("udp %s relayed: the socket is bound", endpoint)
            return None
        state = direct_path.fd_state(tid, tracee_fd, inode)
        if state is None:
            return Errno(errno.EBADF)
        if state.held_elsewhere:
            log.debug("udp %s relayed: the socket is in an epoll set or dup'ed", endpoint)
            return None
        cloexec = state.close_on_exec
        kind = (sock.family.value, socket.SOCK_DGRAM)  # plain ints: no enum per use
        made = self.target_network.socket(*kind, socket.IPPROTO_UDP)
        try:
            direct_path.copy_socket_state(sock, made, self.target_network.fresh_options(*kind), kind)
            result = direct_path.connect_raw(made, sockaddr)
            if result:
                made.close()
                return Errno(result)  # the target's answer (ENETUNREACH, ...)
            if not state.nonblocking:
                direct_path.set_blocking(made, True)
            self.direct_udp[os.fstat(made.fileno()).st_ino] = None
            while len(self.direct_udp) > MAX_REMEMBERED:
                del self.direct_udp[next(iter(self.direct_udp))]
        except BaseException:
            made.close()
            raise
        log.debug("udp %s direct (inode %d)", endpoint, inode)
        return ReplaceFd(made.detach(), tracee_fd, ReturnValue(0), cloexec=cloexec)

    async def _finish_direct(self, made: socket.socket, tracee_fd: int, cloexec: bool,
                             endpoint: Endpoint, timeout: float) -> Outcome:
        """A blocking caller's direct connect: wait for the target's answer."""
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()
        loop.add_writer(made.fileno(), _set_once, writable)
        try:
            await asyncio.wait_for(writable, timeout)
        except TimeoutError:
            made.close()
            return Errno(errno.ETIMEDOUT)
        finally:
            loop.remove_writer(made.fileno())
        result = direct_path.pending_error(made)
        if result:
            made.close()
            return Errno(result)
        direct_path.set_blocking(made, True)
        log.debug("tcp %s direct, blocking caller", endpoint)
        return ReplaceFd(made.detach(), tracee_fd, ReturnValue(0), cloexec=cloexec)

    # -- UDP relays --

    def _relay_for(self, inode: int, family: int, tid: int, fd: int) -> UdpRelay:
        relay = self.udp_relays.get(inode)
        if relay is not None and relay.failed is not None and not self.agent_gone():
            del self.udp_relays[inode]
            relay = None
        if relay is None:
            client = self.context.client

            async def open_agent_udp(destination_family: int) -> Any:
                return await client.open_udp(destination_family)

            relay = UdpRelay(family, open_agent_udp, dns=self.dns, on_agent_lost=self.agent_lost,
                             take_tracee_socket=partial(_take_socket, tid, fd, inode))
            self.udp_relays[inode] = relay
            if len(self.udp_relays) > SWEEP_EARLY:
                self._schedule_sweep(SWEEP_EARLY_DELAY)
            else:
                self._schedule_sweep(SWEEP_INTERVAL)
        return relay

    async def _connect_udp(self, fd: int, family: int, endpoint: Endpoint, inode: int,
                           tid: int, tracee_fd: int) -> Outcome:
        relay = self._relay_for(inode, family, tid, tracee_fd)
        relay.settling += 1
        try:
            await relay.agent_socket(endpoint.family)  # the target's errors, now
            peer_socket = relay.peer_socket(endpoint)
            with borrowed(fd) as sock:
                result = sock.connect_ex(peer_socket.address)
                if result:
                    return Errno(result)
                relay.tracee_address = reachable_address(family, sock.getsockname())
            relay.connected_peer = endpoint
            self._remember(inode, Relayed(build_sockaddr(family, endpoint), None))
            log.debug("udp %s relayed (inode %d)", endpoint, inode)
            return ReturnValue(0)
        except AgentUnavailable:
            self.agent_lost()
            return Errno(errno.ENETUNREACH)
        except OSError as error:
            return Errno(error.errno or errno.EIO)
        finally:
            relay.settling -= 1
            os.close(fd)

    async def _send_datagram(self, inode: int, family: int, tid: int, tracee_fd: int,
                             tracee_address: tuple[Any, ...], endpoint: Endpoint,
                             data: bytes) -> Outcome:
        relay = self._relay_for(inode, family, tid, tracee_fd)
        relay.tracee_address = tracee_address
        relay.settling += 1
        try:
            await relay.send(data, endpoint)
            return ReturnValue(len(data))
        except AgentUnavailable:
            self.agent_lost()
            return Errno(errno.ENETUNREACH)
        except OSError as error:
            return Errno(error.errno or errno.EIO)
        finally:
            relay.settling -= 1

    # -- sendto / sendmsg --

    def handle_sendto(self, call: SyscallCall) -> Outcome:
        address_pointer, length = call.pointer_arg(4), min(call.uint_arg(5), _SOCKADDR_MAX)
        if address_pointer == 0 or length < 2:
            return CONTINUE
        parsed = parse_sockaddr(call.read(address_pointer, length))
        if parsed is None or not self.remote_for("udp", parsed[1]):
            return CONTINUE
        buffer, size = call.pointer_arg(1), call.args[2]
        return OnTraceeFd(call.int_arg(0), partial(
            self._send_action, call, call.int_arg(0), parsed[0], parsed[1], ((buffer, size),)))

    def handle_sendmsg(self, call: SyscallCall) -> Outcome:
        header = _MSGHDR.unpack(call.read(call.pointer_arg(1), _MSGHDR.size))
        parsed = self._remote_destination(call, header[0], header[1])
        if parsed is None:
            return CONTINUE
        iov_pointer, iov_count = header[2], header[3]
        if iov_count > _MAX_IOV:
            return Errno(errno.EMSGSIZE)
        vectors = call.read(iov_pointer, _IOVEC.size * iov_count) if iov_count else b""
        iov = tuple(_IOVEC.iter_unpack(vectors))
        return OnTraceeFd(call.int_arg(0), partial(
            self._send_action, call, call.int_arg(0), parsed[0], parsed[1], iov))

    def _remote_destination(self, call: SyscallCall, name: int,
                            name_length: int) -> tuple[int, Endpoint] | None:
        """A message's destination (msg_name) when it is one the target sends to."""
        if name == 0 or name_length < 2:
            return None
        parsed = parse_sockaddr(call.read(name, min(name_length, _SOCKADDR_MAX)))
        if parsed is None or not self.remote_for("udp", parsed[1]):
            return None
        return parsed

    def _relayable(self, sock: socket.socket, fd: int) -> bool:
        """Whether the tracee's socket sends its datagrams with a destination
        through a relay: an IP datagram socket the direct path did not make."""
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_DGRAM:
            return False  # a stream socket ignores the address
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        # A socket of the target (the direct path) sends from there itself.
        return os.fstat(fd).st_ino not in self.direct_udp

    @staticmethod
    def _bound_for_relay(sock: socket.socket) -> tuple[Any, ...]:
        """Where the socket receives the relay's replies, bound first if it was
        not, as the kernel's autobind would bind it for the first datagram."""
        bound = sock.getsockname()
        if bound[1] == 0:
            sock.bind(("0.0.0.0", 0) if sock.family == socket.AF_INET else ("::", 0))
            bound = sock.getsockname()
        return reachable_address(sock.family, bound)

    def _send_action(self, call: SyscallCall, tracee_fd: int, family: int, endpoint: Endpoint,
                     iov: tuple[tuple[int, int], ...], fd: int) -> Outcome:
        with borrowed(fd) as sock:
            if not self._relayable(sock, fd):
                return CONTINUE
            if sock.family == socket.AF_INET and family != socket.AF_INET:
                return CONTINUE  # the kernel's EAFNOSUPPORT
            if self.agent_gone():
                return Errno(errno.ENETUNREACH)
            size = sum(length for _, length in iov)
            if size > MAX_DATAGRAM:
                return Errno(errno.EMSGSIZE)
            data = b"".join(call.read(base, length) for base, length in iov if length)
            tracee_address = self._bound_for_relay(sock)
            inode = os.fstat(fd).st_ino
            return Defer(self._send_datagram(inode, sock.family, call.tid, tracee_fd,
                                             tracee_address, endpoint, data))

    # -- sendmmsg --

    def handle_sendmmsg(self, call: SyscallCall) -> Outcome:
        """sendmmsg on an unconnected socket: each message with a destination
        the target sends to goes as sendmsg's would; the rest of the call is
        the kernel's (see ``_send_many``)."""
        vector, count = call.pointer_arg(1), min(call.uint_arg(2), _MAX_MESSAGES)
        if vector == 0 or count == 0:
            return CONTINUE
        raw = call.read(vector, _MMSGHDR_SIZE * count)
        headers = [_MSGHDR.unpack_from(raw, index * _MMSGHDR_SIZE) for index in range(count)]
        destinations = [self._remote_destination(call, header[0], header[1])
                        for header in headers]
        if not any(destinations):
            return CONTINUE  # no message leaves from the target: the kernel sends them all
        return OnTraceeFd(call.int_arg(0), partial(
            self._send_many_action, call, call.int_arg(0), vector, headers, destinations,
            call.int_arg(3)))

    def _send_many_action(self, call: SyscallCall, tracee_fd: int, vector: int,
                          headers: list[tuple[int, ...]],
                          destinations: list[tuple[int, Endpoint] | None], flags: int,
                          fd: int) -> Outcome:
        with borrowed(fd) as sock:
            if not self._relayable(sock, fd):
                return CONTINUE
            if self.agent_gone():
                return Errno(errno.ENETUNREACH)
            messages: list[_Datagram] = []
            failure = 0
            for header, destination in zip(headers, destinations, strict=True):
                try:
                    message = self._datagram(call, sock, header, destination)
                except OSError as error:
                    failure = error.errno or errno.EIO
                    break
                if isinstance(message, int):
                    failure = message
                    break
                messages.append(message)
            if not messages:
                return Errno(failure)
            tracee_address = self._bound_for_relay(sock)
            inode = os.fstat(fd).st_ino
            return Defer(self._send_many(inode, sock.family, call.tid, tracee_fd, tracee_address,
                                         os.dup(fd), vector, messages, flags))

    def _datagram(self, call: SyscallCall, sock: socket.socket, header: tuple[int, ...],
                  destination: tuple[int, Endpoint] | None) -> _Datagram | int:
        """One message of a sendmmsg, read from the tracee; an int: the errno
        the kernel would stop at for it."""
        name, name_length, iov_pointer, iov_count, control, control_length = header[:6]
        if iov_count > _MAX_IOV:
            return errno.EMSGSIZE
        vectors = call.read(iov_pointer, _IOVEC.size * iov_count) if iov_count else b""
        iov = tuple(_IOVEC.iter_unpack(vectors))
        if sum(length for _, length in iov) > MAX_DATAGRAM:
            return errno.EMSGSIZE
        data = b"".join(call.read(base, length) for base, length in iov if length)
        if destination is not None:
            family, endpoint = destination
            if sock.family == socket.AF_INET and family != socket.AF_INET:
                return errno.EAFNOSUPPORT
            return _Datagram(data, endpoint=endpoint)
        # Sent from this machine by the supervisor, on the tracee's own socket.
        address: tuple[Any, ...] | None = None
        if name and name_length:
            parsed = parse_sockaddr(call.read(name, min(name_length, _SOCKADDR_MAX)))
            if parsed is None:
                return errno.EAFNOSUPPORT if name_length >= 2 else errno.EINVAL
            address = _python_address(sock.family, parsed[1])
        ancillary = _decode_ancillary(call.read(control, min(control_length, _MAX_CONTROL))
                                      if control and control_length else b"")
        return _Datagram(data, address=address, ancillary=ancillary)

    async def _send_many(self, inode: int, family: int, tid: int, tracee_fd: int,
                         tracee_address: tuple[Any, ...], fd: int, vector: int,
                         messages: list[_Datagram], flags: int) -> Outcome:
        """The messages in order, as the kernel sends them: the count sent and
        each one's msg_len; an error stops the call, which reports it only
        when nothing was sent (a message the tracee's memory did not give,
        after the last in ``messages``, stopped it too: it is not sent)."""
        relay = self._relay_for(inode, family, tid, tracee_fd)
        relay.tracee_address = tracee_address
        relay.settling += 1
        sent: list[int] = []
        failure = errno.EIO
        try:
            with borrowed(fd) as sock:
                for message in messages:
                    try:
                        if message.endpoint is not None:
                            await relay.send(message.data, message.endpoint)
                            sent.append(len(message.data))
                        else:
                            # Never block the event loop: a full send buffer is EAGAIN.
                            sent.append(sock.sendmsg([message.data], message.ancillary,
                                                     flags | _MSG_DONTWAIT, message.address)
                                        if message.address is not None else
                                        sock.sendmsg([message.data], message.ancillary,
                                                     flags | _MSG_DONTWAIT))
                    except AgentUnavailable:
                        self.agent_lost()
                        failure = errno.ENETUNREACH
                        break
                    except OSError as error:
                        failure = error.errno or errno.EIO
                        break
        finally:
            relay.settling -= 1
            os.close(fd)
        if not sent:
            return Errno(failure)
        return ReturnValue(len(sent), writes=tuple(
            (vector + index * _MMSGHDR_SIZE + _MSG_LEN_OFFSET, _MSG_LEN.pack(length))
            for index, length in enumerate(sent)))

    # -- recvfrom / recvmsg --

    def handle_recvfrom(self, call: SyscallCall) -> Outcome:
        address_pointer = call.pointer_arg(4)
        if not self.udp_relays or address_pointer == 0 or call.pointer_arg(5) == 0:
            return CONTINUE
        inode = socket_inode(call.tid, call.int_arg(0))
        relay = self.udp_relays.get(inode) if inode is not None else None
        if relay is None:
            return CONTINUE
        (capacity,) = _SOCKLEN.unpack(call.read(call.pointer_arg(5), 4))
        receive = _Receive(((call.pointer_arg(1), min(call.args[2], _MAX_RECEIVE)),),
                           call.int_arg(3), address_pointer, call.pointer_arg(5), capacity)
        return OnTraceeFd(call.int_arg(0), partial(self._receive_action, call, relay, receive))

    def handle_recvmsg(self, call: SyscallCall) -> Outcome:
        if not self.udp_relays:
            return CONTINUE
        header_pointer = call.pointer_arg(1)
        header = _MSGHDR.unpack(call.read(header_pointer, _MSGHDR.size))
        name, name_length, iov_pointer, iov_count, control, control_length = header[:6]
        if name == 0:
            return CONTINUE
        inode = socket_inode(call.tid, call.int_arg(0))
        relay = self.udp_relays.get(inode) if inode is not None else None
        if relay is None:
            return CONTINUE
        if iov_count > _MAX_IOV:
            return Errno(errno.EMSGSIZE)
        vectors = call.read(iov_pointer, _IOVEC.size * iov_count) if iov_count else b""
        receive = _Receive(tuple(_IOVEC.iter_unpack(vectors)), call.int_arg(2), name,
                           header_pointer + 8, name_length, msghdr=header_pointer,
                           control_pointer=control, control_capacity=control_length)
        return OnTraceeFd(call.int_arg(0), partial(self._receive_action, call, relay, receive))

    def _receive_action(self, call: SyscallCall, relay: UdpRelay, receive: _Receive,
                        fd: int) -> Outcome:
        outcome = self._try_receive(call, relay, receive, fd)
        if outcome is not None:
            return outcome
        if receive.flags & _MSG_DONTWAIT or _nonblocking(fd):
            return Errno(errno.EAGAIN)
        with borrowed(fd) as sock:
            timeout = _timeout_option(sock, socket.SO_RCVTIMEO)
        return Defer(self._wait_and_receive(call, relay, receive, os.dup(fd), timeout))

    def _try_receive(self, call: SyscallCall, relay: UdpRelay, receive: _Receive,
                     fd: int) -> Outcome | None:
        """The datagram waiting in the tracee's socket, returned as the call's
        result; None when there is none."""
        ancillary_space = receive.control_capacity if receive.msghdr else 0
        with borrowed(fd) as sock:
            try:
                data, ancillary, message_flags, source = sock.recvmsg(
                    receive.size, ancillary_space, receive.flags | _MSG_DONTWAIT)
            except BlockingIOError:
                if relay.failed is not None:
                    return Errno(errno.ECONNREFUSED)
                return None
        peer = relay.source_of(source)
        if peer is not None:
            sockaddr = build_sockaddr(relay.family, peer)
        else:
            found = endpoint_of(source)
            sockaddr = build_sockaddr(relay.family, found) if found is not None else b""
        writes: list[tuple[int, bytes]] = []
        offset = 0
        for base, length in receive.iov:
            if offset >= len(data):
                break
            piece = data[offset: offset + length]
            writes.append((base, piece))
            offset += len(piece)
        if receive.msghdr == 0:
            writes += [(address, chunk) for address, chunk in
                       _address_reply(call, receive.address_pointer, receive.length_pointer,
                                      sockaddr)]
            return ReturnValue(len(data), writes=tuple(writes))
        if receive.capacity_of_address:
            writes.append((receive.address_pointer, sockaddr[: receive.capacity_of_address]))
        if receive.address_pointer:  # no msg_name: the kernel leaves msg_namelen alone
            writes.append((receive.msghdr + 8, _SOCKLEN.pack(len(sockaddr))))
        control, truncated = _encode_ancillary(ancillary, receive.control_capacity)
        if control:
            writes.append((receive.control_pointer, control))
        if truncated:
            message_flags |= socket.MSG_CTRUNC
        writes.append((receive.msghdr + 40, struct.pack("=Q", len(control))))
        writes.append((receive.msghdr + 48, struct.pack("=i", message_flags)))
        return ReturnValue(len(data), writes=tuple(writes))

    async def _wait_and_receive(self, call: SyscallCall, relay: UdpRelay, receive: _Receive,
                                fd: int, timeout: float | None) -> Outcome:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        poller = select.epoll(1)
        try:
            poller.register(fd, select.EPOLLIN)
            while True:
                await _readable(poller, relay, deadline)
                outcome = self._try_receive(call, relay, receive, fd)
                if outcome is not None:
                    return outcome
                if deadline is not None and loop.time() >= deadline:
                    return Errno(errno.EAGAIN)
        finally:
            poller.close()
            os.close(fd)

    # -- recvmmsg --

    def handle_recvmmsg(self, call: SyscallCall) -> Outcome:
        """recvmmsg on a relayed socket, when a message asks for its source:
        each datagram as recvmsg's would be (the remote peer's address)."""
        if not self.udp_relays:
            return CONTINUE
        vector, count = call.pointer_arg(1), min(call.uint_arg(2), _MAX_MESSAGES)
        if vector == 0 or count == 0:
            return CONTINUE
        inode = socket_inode(call.tid, call.int_arg(0))
        relay = self.udp_relays.get(inode) if inode is not None else None
        if relay is None:
            return CONTINUE
        raw = call.read(vector, _MMSGHDR_SIZE * count)
        headers = [_MSGHDR.unpack_from(raw, index * _MMSGHDR_SIZE) for index in range(count)]
        if not any(header[0] for header in headers):
            return CONTINUE  # no source asked for: the kernel's answer is right
        flags = call.int_arg(3)
        receives: list[_Receive] = []
        for index, header in enumerate(headers):
            name, name_length, iov_pointer, iov_count, control, control_length = header[:6]
            if iov_count > _MAX_IOV:
                return Errno(errno.EMSGSIZE)
            vectors = call.read(iov_pointer, _IOVEC.size * iov_count) if iov_count else b""
            message = vector + index * _MMSGHDR_SIZE
            receives.append(_Receive(
                tuple(_IOVEC.iter_unpack(vectors)), flags & ~_MSG_WAITFORONE, name,
                message + 8, name_length if name else 0, msghdr=message,
                control_pointer=control, control_capacity=control_length))
        timeout: float | None = None
        if call.pointer_arg(4):
            seconds, nanoseconds = _TIMESPEC.unpack(call.read(call.pointer_arg(4), _TIMESPEC.size))
            if seconds < 0 or not 0 <= nanoseconds < 1_000_000_000:
                return Errno(errno.EINVAL)
            timeout = seconds + nanoseconds / 1e9
        return OnTraceeFd(call.int_arg(0), partial(self._receive_many_action, call, relay,
                                                   vector, receives, flags, timeout))

    def _receive_many_action(self, call: SyscallCall, relay: UdpRelay, vector: int,
                             receives: list[_Receive], flags: int, timeout: float | None,
                             fd: int) -> Outcome:
        waits = not (flags & _MSG_DONTWAIT or _nonblocking(fd))
        with borrowed(fd) as sock:
            wait_limit = _timeout_option(sock, socket.SO_RCVTIMEO)
        return Defer(self._receive_many(call, relay, vector, receives, flags, waits, wait_limit,
                                        timeout, os.dup(fd)))

    async def _receive_many(self, call: SyscallCall, relay: UdpRelay, vector: int,
                            receives: list[_Receive], flags: int, waits: bool,
                            wait_limit: float | None, timeout: float | None,
                            fd: int) -> Outcome:
        """The kernel's recvmmsg: datagram after datagram, waiting for each on a
        blocking socket (for the first only with MSG_WAITFORONE), until the
        vector is full, a wait runs out (SO_RCVTIMEO), an error, or, checked
        after each datagram, ``timeout``; the count, or the first error when
        nothing came."""
        loop = asyncio.get_running_loop()
        ends = None if timeout is None else loop.time() + timeout
        writes: list[tuple[int, bytes]] = []
        received = 0
        failure = errno.EAGAIN
        poller = select.epoll(1)
        try:
            poller.register(fd, select.EPOLLIN)
            for index, receive in enumerate(receives):
                deadline = None if wait_limit is None else loop.time() + wait_limit
                while True:
                    outcome = self._try_receive(call, relay, receive, fd)
                    if outcome is not None:
                        break
                    if not waits or (received and flags & _MSG_WAITFORONE) \
                            or (deadline is not None and loop.time() >= deadline):
                        break
                    await _readable(poller, relay, deadline)
                if not isinstance(outcome, ReturnValue):
                    if isinstance(outcome, Errno):
                        failure = outcome.errno
                    break
                writes += outcome.writes
                writes.append((vector + index * _MMSGHDR_SIZE + _MSG_LEN_OFFSET,
                               _MSG_LEN.pack(outcome.value)))
                received += 1
                if ends is not None and loop.time() >= ends:
                    break
        finally:
            poller.close()
            os.close(fd)
        if not received:
            return Errno(failure)
        return ReturnValue(received, writes=tuple(writes))

    # -- getpeername / getsockname --

    def _relayed(self, call: SyscallCall) -> Relayed | None:
        if not self.relayed:
            return None
        inode = socket_inode(call.tid, call.int_arg(0))
        return self.relayed.get(inode) if inode is not None else None

    def handle_getpeername(self, call: SyscallCall) -> Outcome:
        relayed = self._relayed(call)
        if relayed is None:
            return CONTINUE
        writes = _address_reply(call, call.pointer_arg(1), call.pointer_arg(2), relayed.peer)
        return ReturnValue(0, writes=tuple(writes)) if writes else Errno(errno.EFAULT)

    def handle_getsockname(self, call: SyscallCall) -> Outcome:
        relayed = self._relayed(call)
        if relayed is None or relayed.local is None:
            return CONTINUE
        writes = _address_reply(call, call.pointer_arg(1), call.pointer_arg(2), relayed.local)
        return ReturnValue(0, writes=tuple(writes)) if writes else Errno(errno.EFAULT)

    # -- housekeeping --

    def _schedule_sweep(self, delay: float) -> None:
        """Sweep within ``delay`` (an earlier sweep already due stays)."""
        if self._sweeping:
            return  # it reschedules itself when done
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._sweeper is not None:
            if self._sweeper.when() <= when:
                return
            self._sweeper.cancel()
        # A timer, not a sleeping task: nothing is left pending when the
        # session's loop stops.
        self._sweeper = loop.call_at(when, lambda: self._spawn(self._sweep()))

    async def _sweep(self) -> None:
        """Close UDP relays whose tracee socket is gone (close() is not trapped)."""
        self._sweeping = True
        try:
            started = time.monotonic()
            live = await asyncio.to_thread(live_udp_inodes)
            for inode, relay in list(self.udp_relays.items()):
                if relay.settling or relay.created >= started:
                    continue  # the tracee's socket may not be bound yet
                if relay.failed is not None or inode not in live:
                    self.udp_relays.pop(inode, None)
                    self.relayed.pop(inode, None)
                    await relay.close()
        finally:
            self._sweeping = False
            self._sweeper = None
            if self.udp_relays:
                self._schedule_sweep(SWEEP_EARLY_DELAY if len(self.udp_relays) > SWEEP_EARLY
                                     else SWEEP_INTERVAL)

    async def close(self) -> None:
        """Close every relay (the end of the session)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for relay in list(self.udp_relays.values()):
            await relay.close()
        self.udp_relays.clear()
        if self.target_network is not None:
            self.target_network.close()


# -- set-up -------------------------------------------------------------------------------------

async def _target_nameservers(context: RemoteContext) -> list[IPAddress]:
    try:
        contents = await context.client.read_file("/etc/resolv.conf")
    except RemoteError:
        return parse_nameservers(b"")
    return parse_nameservers(contents.data)


async def _resolve_in_target(context: RemoteContext, names: Sequence[str]
                             ) -> dict[str, list[IPAddress]]:
    found: dict[str, list[IPAddress]] = {}
    for name in names:
        try:
            addresses = await context.client.resolve(name)
        except RemoteError as error:
            log.warning("outgoing filter: %s does not resolve in the target (%s)", name, error)
            continue
        found[name] = [ipaddress.ip_address(address) for address in addresses]
    return found


def _resolve_here(name: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def setup(context: RemoteContext, *, local_resolvers: Sequence[tuple[str, int]] | None = None
          ) -> Outgoing:
    """The session's outgoing network state: the filter compiled (names
    resolved), the target's nameservers read. Start-up work: it waits on the
    agent, so it runs before the tracee does."""
    network = context.features.network
    rules = OutgoingRules(network.outgoing)
    names = NameRules(network.dns)
    nameservers: list[IPAddress] = []
    if names.enabled:
        nameservers = context.run(_target_nameservers(context), timeout=15)
    if rules.names:
        addresses = context.run(_resolve_in_target(context, rules.names), timeout=30)
        for name in rules.names:
            addresses.setdefault(name, []).extend(_resolve_here(name))
        rules.resolve_names(addresses)
    dns = DnsSetup(names, nameservers,
                   list(local_resolvers) if local_resolvers is not None else local_nameservers())
    log.debug("target nameservers: %s", ", ".join(map(str, nameservers)) or "none")
    target_network = None
    if context.target_network is not None and network.outgoing.direct:
        try:
            target_network = direct_path.TargetNetwork(context.target_network)
        except OSError as error:
            log.info("no direct path (%s): every connection is relayed", error)
    return Outgoing(context, rules, dns, target_network)


def handlers(context: RemoteContext, *,
             local_resolvers: Sequence[tuple[str, int]] | None = None) -> dict[str, Handler]:
    """The outgoing network's handlers (trap ``TRAPPED``)."""
    return setup(context, local_resolvers=local_resolvers).handlers()
