"""Relays: the supervisor-side ends of the tracee's outgoing sockets.

A tracee socket whose traffic leaves from the target is connected (by the
supervisor, through ``pidfd_getfd``) to a relay on this machine's loopback,
and the relay moves bytes between that loopback socket and the agent:

* TCP (:func:`connect_to_relay`, :func:`relay_tcp`): a one-shot loopback
  listener accepts exactly the tracee's socket; two pumps then copy bytes
  both ways with backpressure (a pump reads only after the previous chunk was
  written, and the agent stream is credit based), and a half-close on one side
  becomes a half-close on the other. A reset or a lost agent resets the
  tracee's socket (``SO_LINGER`` 0), so the tracee reads ``ECONNRESET``.
* UDP (:class:`UdpRelay`, one per tracee socket): datagrams go out through an
  agent UDP socket; each remote peer gets its own loopback "peer socket" that
  hands the peer's replies to the tracee's socket, so the datagram's source
  tells which peer sent it (the trapped recvfrom/recvmsg put the peer's real
  address in ``src_addr``). A connected tracee socket is connected to the
  peer socket of its peer, which also takes the datagrams it sends.

Everything here runs on the async side's event loop; nothing blocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any, Protocol

import msgspec

from ...agent.aio import sock_recvfrom
from ...agent.errors import AgentUnavailable, RemoteError
from .dns import DnsSetup, IPAddress, unmapped

log = logging.getLogger("mtrace.tracer.features.relay")

#: Largest chunk a TCP pump moves at once (also the most one pump holds).
TCP_CHUNK = 64 * 1024
MAX_DATAGRAM = 65535
ACCEPT_TIMEOUT = 10.0


class Endpoint(msgspec.Struct, frozen=True):
    """An IP address and port; IPv4-mapped IPv6 addresses are stored as IPv4."""

    address: IPAddress
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> Endpoint:
        return cls(unmapped(ipaddress.ip_address(host.split("%", 1)[0])), port)

    @property
    def host(self) -> str:
        return str(self.address)

    @property
    def family(self) -> int:
        return socket.AF_INET if self.address.version == 4 else socket.AF_INET6

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else \
            f"{self.address}:{self.port}"


# -- sockaddr bytes ---------------------------------------------------------------

def parse_sockaddr(data: bytes) -> tuple[int, Endpoint] | None:
    """(family, endpoint) of a ``sockaddr_in``/``sockaddr_in6``; None for others."""
    if len(data) < 2:
        return None
    (family,) = struct.unpack_from("=H", data)
    if family == socket.AF_INET and len(data) >= 8:
        (port,) = struct.unpack_from("!H", data, 2)
        return family, Endpoint(ipaddress.IPv4Address(data[4:8]), port)
    if family == socket.AF_INET6 and len(data) >= 24:
        (port,) = struct.unpack_from("!H", data, 2)
        return family, Endpoint(unmapped(ipaddress.IPv6Address(data[8:24])), port)
    return None


def build_sockaddr(family: int, endpoint: Endpoint) -> bytes:
    """The sockaddr the kernel would report for ``endpoint`` on a ``family``
    socket (an IPv4 address on an IPv6 socket is IPv4-mapped)."""
    if family == socket.AF_INET:
        if endpoint.address.version != 4:
            raise ValueError(f"{endpoint} on an AF_INET socket")
        return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", endpoint.port)
                + endpoint.address.packed + bytes(8))
    address = endpoint.address
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", endpoint.port)
            + bytes(4) + address.packed + bytes(4))


def endpoint_of(address: Any) -> Endpoint | None:
    """A Python socket address tuple as an Endpoint (None for other families)."""
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str):
        try:
            return Endpoint.of(address[0], int(address[1]))
        except ValueError:
            return None
    return None


# -- loopback -----------------------------------------------------------------------

@cache
def loopback_host(family: int) -> str:
    """Where relays listen for a tracee socket of ``family``: 127.0.0.1, or ::1
    (``::ffff:127.0.0.1`` when this machine's loopback has no IPv6)."""
    if family == socket.AF_INET:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return "::1"
    except OSError:
        return "::ffff:127.0.0.1"


def loopback_socket(family: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((loopback_host(family), 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def reachable_address(family: int, address: Any) -> tuple[Any, ...]:
    """Where to send to a socket bound to ``address``: a wildcard bind is
    reached on the loopback."""
    host, port = address[0], address[1]
    if host in ("0.0.0.0", "::", ""):
        host = loopback_host(family)
    return (host, port) if family == socket.AF_INET else (host, port, 0, 0)


@contextlib.contextmanager
def borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd`` that does not close it (the caller owns the fd)."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def reset(sock: socket.socket) -> None:
    """Close with a RST: the peer's next read or write fails with ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- TCP --------------------------------------------------------------------------------

class RemoteStream(Protocol):
    """What a TCP relay needs of a stream (``mtrace.agent.client.TcpStream``)."""

    async def read(self, n: int = -1) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


async def connect_to_relay(fd: int, family: int) -> tuple[socket.socket, int]:
    """Connect the tracee's socket ``fd`` (a supervisor duplicate) to a fresh
    loopback listener and accept it: (the relay's end, connect's errno: 0 or
    EINPROGRESS for a non-blocking socket, as the kernel answered)."""
    listener = loopback_socket(family, socket.SOCK_STREAM)
    try:
        listener.listen(4)
        with borrowed(fd) as tracee_socket:
            # The tracee's O_NONBLOCK is left alone (the file is shared): a
            # blocking socket blocks here, for the loopback handshake only.
            result = tracee_socket.connect_ex(listener.getsockname())
            if result not in (0, errno.EINPROGRESS):
                raise OSError(result, f"connecting to the relay: {errno.errorcode.get(result)}")
            expected = endpoint_of(tracee_socket.getsockname())
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(ACCEPT_TIMEOUT):
            while True:
                connection, peer = await loop.sock_accept(listener)
                # Only the tracee's socket may use the relay.
                if endpoint_of(peer) == expected:
                    break
                reset(connection)
        connection.setblocking(False)
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, result
    finally:
        listener.close()


async def connect_to_unix_relay(fd: int, directory: str | os.PathLike[str]
                                ) -> tuple[socket.socket, int]:
    """Connect the tracee's Unix stream socket ``fd`` to a fresh listener in the
    session's private ``directory`` and accept it: (the relay's end, connect's
    errno as the kernel answered)."""
    path = os.path.join(directory, f"unix-{os.urandom(8).hex()}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        with borrowed(fd) as tracee_socket:
            result = tracee_socket.connect_ex(path)
            if result not in (0, errno.EINPROGRESS):
                raise OSError(result, f"connecting to the relay: {errno.errorcode.get(result)}")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(ACCEPT_TIMEOUT):
            connection, _ = await loop.sock_accept(listener)
        connection.setblocking(False)
        return connection, result
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


async def relay_tcp(sock: socket.socket, stream: RemoteStream, *,
                    on_agent_lost: Callable[[], None] = lambda: None,
                    chunk: int = TCP_CHUNK) -> None:
    """Copy bytes between the tracee's connection ``sock`` and ``stream`` until
    both directions are done; a failure on one side resets the other."""
    loop = asyncio.get_running_loop()
    outcome: dict[str, str] = {}

    async def to_tracee() -> None:
        try:
            data = await stream.read(chunk)
        except AgentUnavailable:
            on_agent_lost()
            raise
        while data:
            await loop.sock_sendall(sock, data)
            try:
                data = await stream.read(chunk)
            except AgentUnavailable:
                on_agent_lost()
                raise
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def to_target() -> None:
        while data := await loop.sock_recv(sock, chunk):
            stream.write(data)
            try:
                await stream.drain()
            except AgentUnavailable:
                on_agent_lost()
                raise
        stream.shutdown_write()

    tasks = {asyncio.create_task(to_tracee(), name="relay-to-tracee"): "remote",
             asyncio.create_task(to_target(), name="relay-to-target"): "tracee"}
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    continue
                # Who failed: the remote side (stream errors) or the tracee's
                # (errors on the loopback socket).
                remote_failed = isinstance(error, RemoteError | AgentUnavailable)
                outcome["failed"] = "remote" if remote_failed else "tracee"
                for other in pending:
                    other.cancel()
                pending = set()
                break
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        failed = outcome.get("failed")
        if failed == "remote":
            reset(sock)
        else:
            sock.close()
        if failed == "tracee":
            stream.abort()  # the tracee reset or vanished: what it wrote last is moot
        else:
            stream.close()


# -- UDP ----------------------------------------------------------------------------------

class AgentUdp(Protocol):
    """What a UDP relay needs of an agent socket (``mtrace.agent.client.UdpSocket``)."""

    async def sendto(self, data: bytes, address: tuple[str, int]) -> int: ...

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]: ...

    async def close(self) -> None: ...


OpenAgentUdp = Callable[[int], Any]  # family -> awaitable AgentUdp


class PeerSocket:
    """A loopback socket standing for one remote peer of one tracee socket."""

    def __init__(self, relay: UdpRelay, peer: Endpoint) -> None:
        self.relay = relay
        self.peer = peer
        self.sock = loopback_socket(relay.family, socket.SOCK_DGRAM)
        self.address = self.sock.getsockname()
        self.port: int = self.address[1]
        self._task = asyncio.create_task(self._from_tracee(), name=f"udp-peer-{peer}")

    async def _from_tracee(self) -> None:
        """Datagrams the tracee's connected socket sends to this peer."""
        while True:
            try:
                data, source = await sock_recvfrom(self.sock, MAX_DATAGRAM)
            except OSError:
                await asyncio.sleep(0)
                continue
            if not self.relay.is_tracee(source):
                continue  # only the tracee's socket may send through the relay
            try:
                await self.relay.send(data, self.peer)
            except (OSError, AgentUnavailable) as error:
                log.debug("udp datagram to %s dropped: %s", self.peer, error)

    def deliver(self, data: bytes) -> None:
        """Hand ``data`` to the tracee's socket, from this peer."""
        destination = self.relay.tracee_address
        if destination is None:
            return
        try:
            self.sock.sendto(data, destination)
        except OSError as error:  # a full buffer drops it, as UDP may
            log.debug("udp datagram from %s dropped: %s", self.peer, error)

    def close(self) -> None:
        self._task.cancel()
        self.sock.close()


class UdpRelay:
    """The relay of one tracee UDP socket (see the module docstring).

    ``peer_by_port`` and ``family`` are read by the trap loop (to put the real
    source in a received datagram's address); everything else belongs to the
    event loop.
    """

    def __init__(self, family: int, open_agent_udp: OpenAgentUdp, *,
                 dns: DnsSetup | None = None,
                 on_agent_lost: Callable[[], None] = lambda: None,
                 take_tracee_socket: Callable[[], int | None] | None = None) -> None:
        self.family = family
        # A duplicate of the tracee's socket, on demand (see _wake_connected_readers).
        self._take_tracee_socket = take_tracee_socket
        self._open_agent_udp = open_agent_udp
        self._dns = dns
        self._on_agent_lost = on_agent_lost
        # Where the tracee's socket receives (its bound address, on loopback).
        self.tracee_address: tuple[Any, ...] | None = None
        self.connected_peer: Endpoint | None = None
        self.peers: dict[Endpoint, PeerSocket] = {}
        self.peer_by_port: dict[int, Endpoint] = {}
        self._agent: dict[int, asyncio.Future[AgentUdp]] = {}
        self._agent_tasks: list[asyncio.Task[None]] = []
        self._local_forwarders: dict[Endpoint, tuple[socket.socket, asyncio.Task[None]]] = {}
        # Calls setting the relay up (connect, a first sendto) still running:
        # until they end the tracee's socket may be unbound, so not swept.
        self.settling = 0
        self.created = time.monotonic()
        self.failed: OSError | None = None
        self.failure = asyncio.Event()
        self.last_used = time.monotonic()

    # -- trap-loop side (thread-safe reads) --

    def source_of(self, address: Any) -> Endpoint | None:
        """The remote peer a datagram from ``address`` (a peer socket) stands for."""
        found = endpoint_of(address)
        if found is None or not found.address.is_loopback:
            return None
        return self.peer_by_port.get(found.port)

    # -- event-loop side --

    def is_tracee(self, source: Any) -> bool:
        if self.tracee_address is None:
            return False
        return endpoint_of(source) == endpoint_of(self.tracee_address)

    def peer_socket(self, peer: Endpoint) -> PeerSocket:
        existing = self.peers.get(peer)
        if existing is not None:
            return existing
        created = PeerSocket(self, peer)
        self.peers[peer] = created
        self.peer_by_port[created.port] = peer
        return created

    async def agent_socket(self, family: int) -> AgentUdp:
        """The agent socket for ``family`` destinations, opened on first use."""
        if self.failed is not None:
            raise self.failed
        future = self._agent.get(family)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._agent[family] = future
            try:
                udp = await self._open_agent_udp(family)
            except BaseException as error:
                del self._agent[family]
                future.cancel()
                if isinstance(error, AgentUnavailable):
                    self._agent_lost()
                raise
            future.set_result(udp)
            self._agent_tasks.append(asyncio.create_task(self._from_agent(udp),
                                                         name="udp-from-agent"))
            return udp
        return await asyncio.shield(future)

    async def send(self, data: bytes, peer: Endpoint) -> int:
        """Send ``data`` to ``peer`` from the target (or, for a DNS query the
        DNS filter keeps local, to this machine's resolver)."""
        if self.failed is not None:
            raise self.failed
        self.last_used = time.monotonic()
        self.peer_socket(peer)  # replies need it before they can arrive
        if (self._dns is not None and self._dns.is_target_nameserver(peer.address, peer.port)
                and self._dns.resolves_locally(data)):
            return self._send_locally(data, peer)
        udp = await self.agent_socket(peer.family)
        try:
            return await udp.sendto(data, (peer.host, peer.port))
        except AgentUnavailable:
            self._agent_lost()
            raise

    async def _from_agent(self, udp: AgentUdp) -> None:
        try:
            while True:
                data, (host, port) = await udp.recvfrom()
                self.last_used = time.monotonic()
                try:
                    peer = Endpoint.of(host, port)
                except ValueError:
                    continue
                if self.connected_peer is not None and peer != self.connected_peer \
                        and peer not in self.peers:
                    continue  # a connected socket takes nothing from other peers
                self.peer_socket(peer).deliver(data)
        except AgentUnavailable:
            self._agent_lost()
        except RemoteError as error:  # the agent socket was closed
            log.debug("agent udp socket ended: %s", error)

    def _send_locally(self, data: bytes, peer: Endpoint) -> int:
        assert self._dns is not None
        forwarder = self._local_forwarders.get(peer)
        if forwarder is None:
            host, port = self._dns.local_resolvers[0]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            sock.connect((host, port))
            task = asyncio.create_task(self._from_local_resolver(sock, peer),
                                       name="dns-local")
            forwarder = (sock, task)
            self._local_forwarders[peer] = forwarder
        return forwarder[0].send(data)

    async def _from_local_resolver(self, sock: socket.socket, peer: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(sock, MAX_DATAGRAM)
            except OSError:
                await asyncio.sleep(0.05)  # ICMP errors from the resolver: keep going
                continue
            self.peer_socket(peer).deliver(data)

    def _agent_lost(self) -> None:
        self._on_agent_lost()
        if self.failed is None:
            self.fail(OSError(errno.ENETUNREACH, "the agent is gone"))
            self._wake_connected_readers()

    def _wake_connected_readers(self) -> None:
        """Make a connected tracee socket fail with ECONNREFUSED, as it would
        if its peer were gone: its own empty datagram to the (now closed) peer
        socket brings back an ICMP port unreachable, which wakes a ``read``
        blocked on it (those are not trapped)."""
        if self.connected_peer is None or self._take_tracee_socket is None:
            return
        fd = self._take_tracee_socket()
        if fd is None:
            return
        try:
            with borrowed(fd) as sock, contextlib.suppress(OSError):
                sock.send(b"", socket.MSG_DONTWAIT)
        finally:
            os.close(fd)

    def fail(self, error: OSError) -> None:
        """Stop relaying: later sends fail with ``error``, receivers stop waiting."""
        if self.failed is None:
            self.failed = error
            self.failure.set()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for peer_socket in self.peers.values():
            peer_socket.close()
        self.peers.clear()
        for sock, task in self._local_forwarders.values():
            task.cancel()
            sock.close()
        self._local_forwarders.clear()
        for task in self._agent_tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self.fail(OSError(errno.EBADF, "the relay is closed"))
        for future in list(self._agent.values()):
            if future.done() and not future.cancelled():
                with contextlib.suppress(Exception):
                    await future.result().close()
        self._agent.clear()
