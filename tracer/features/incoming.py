"""Incoming traffic: the target's connections delivered to the tracee's listeners.

What is trapped and what it becomes (``feature.network.incoming``):

* ``listen`` on a TCP socket (IPv4 or IPv6, any address): the supervisor makes
  the call itself on the tracee's socket (so the result is the kernel's), then
  asks the agent to subscribe to the target's port (the same number, or the
  one ``port_mapping`` gives) and only then returns: once the program says it
  is ready, the target's traffic is already on its way. The socket keeps
  listening locally too. A port excluded by ``ports``/``ignore_ports``, a
  loopback-only listener with ``ignore_localhost``, or mode ``off``: plain
  ``listen``.
* for each connection the agent announces (``IncomingConnection``), the
  supervisor connects a loopback socket to the tracee's listener and relays
  bytes between it and the agent stream (:func:`mtrace.tracer.features.relay.relay_tcp`).
  In mirror mode the agent drops what the program answers.
* ``accept``/``accept4`` on a subscribed listener: the supervisor accepts on
  the tracee's behalf and installs the connection in the tracee (``InjectFd``),
  so the peer address it reports is the real remote peer's, not the relay's;
  ``getpeername``/``getsockname`` on that socket then answer the peer and the
  address the peer reached in the target (through the outgoing feature's
  table of relayed sockets). A non-blocking listener with nothing pending gets
  ``EAGAIN``; a blocking one waits on the async side (:class:`AcceptWaiter`),
  never in the trap loop, and never changes the listener's flags.
* a mirror copy the program does not read in time is cut by the agent (its
  connection to the program is reset), said once on stderr, the rest at -v.
* a listener closed (its last fd, ``close`` is not trapped): seen from the
  kernel (:class:`ListenerCloses`), its port is unsubscribed at once.

A subscription fails with one line on stderr (the agent lacks NET_ADMIN, say)
and the program keeps running with its local listener.

A Kubernetes workload with several ready pods (``context.replica_agents``):
at the first subscription an agent is started in each other pod, and every
port is subscribed in all of them, so connections to any replica reach the
program. A replica's failure or loss is said once and costs only its traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from ...agent.aio import sock_connect
from ...agent.client import AgentClient, TcpStream
from ...agent.errors import AgentError, RemoteError
from ...agent.protocol import CAP_INCOMING, HttpRequestFilter, IncomingConnection
from ..backend import Handler
from ..call import SyscallCall
from ..outcome import CONTINUE, AfterResult, Defer, Errno, InjectFd, OnTraceeFd, Outcome, ReturnValue
from .net import Outgoing, Relayed, _address_reply, socket_inode
from .policy import HttpFilter, IncomingConfig
from .relay import Endpoint, borrowed, build_sockaddr, endpoint_of, reachable_address, relay_tcp
from .remote import RemoteContext

log = logging.getLogger("mtrace.tracer.features.incoming")

TRAPPED: tuple[str, ...] = ("listen", "accept", "accept4")
CONNECT_TIMEOUT = 10.0


def protocol_filter(spec: HttpFilter) -> HttpRequestFilter:
    return HttpRequestFilter(
        header=spec.header_filter, path=spec.path_filter, method=spec.method_filter,
        all_of=[protocol_filter(nested) for nested in spec.all_of] if spec.all_of else None,
        any_of=[protocol_filter(nested) for nested in spec.any_of] if spec.any_of else None,
        ports=list(spec.ports) if spec.ports is not None else None)


class Listener(msgspec.Struct, frozen=True):
    """A tracee socket listening on a subscribed port."""

    family: int
    address: tuple[Any, ...]  # where the supervisor reaches it
    local_port: int
    remote_port: int
    cookie: int = 0  # the kernel's SO_COOKIE of the socket (0: unknown)


class _Arrival(msgspec.Struct, frozen=True):
    peer: Endpoint
    local: Endpoint


class IncomingFeature:
    """One session's subscriptions and the handlers of ``TRAPPED``."""

    def __init__(self, context: RemoteContext, outgoing: Outgoing,
                 config: IncomingConfig | None = None) -> None:
        self.context = context
        self.outgoing = outgoing
        self.config = config if config is not None else context.features.network.incoming_config
        self.mapping = {local: remote for local, remote in self.config.port_mapping}
        self.http_filter = (protocol_filter(self.config.http_filter)
                            if self.config.http_filter is not None else None)
        # Read by the trap loop, written on the event loop (single dict operations).
        self.listeners: dict[int, Listener] = {}
        self.by_remote_port: dict[int, Listener] = {}
        # The relay socket's port -> who it stands for, until the tracee accepts it.
        self.arrivals: dict[int, _Arrival] = {}
        # SO_COOKIE -> inode of each listener, to see it closed (ListenerCloses).
        self.cookies: dict[int, int] = {}
        self._closes: ListenerCloses | None = None
        self._accept_waiter: AcceptWaiter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # The agents of the target's other replicas, started at the first subscription.
        self._replicas: asyncio.Future[list[AgentClient]] | None = None
        self._mirror_drop_said = False

    def handlers(self) -> dict[str, Handler]:
        if self.config.mode == "off":
            return {}
        if CAP_INCOMING not in self.context.client.capabilities:
            # An older agent: listening stays local, said once.
            log.warning("incoming: the agent does not serve incoming traffic (an older mtrace); "
                        "the program's listeners stay local")
            return {}
        return {"listen": self.handle_listen, "accept": self.handle_accept,
                "accept4": self.handle_accept}

    # -- listen --

    def wanted(self, host: str, port: int) -> bool:
        if self.config.ports is not None and port not in self.config.ports:
            return False
        if port in self.config.ignore_ports:
            return False
        if self.config.ignore_localhost:
            with contextlib.suppress(ValueError):
                if Endpoint.of(host, port).address.is_loopback:
                    return False
        return True

    def handle_listen(self, call: SyscallCall) -> Outcome:
        return OnTraceeFd(call.int_arg(0), partial(self._listen_action, call.int_arg(1)))

    def _listen_action(self, backlog: int, fd: int) -> Outcome:
        with borrowed(fd) as sock:
            if sock.type != socket.SOCK_STREAM or \
                    sock.family not in (socket.AF_INET, socket.AF_INET6):
                return CONTINUE
            try:
                sock.listen(backlog)
            except OSError as error:
                return Errno(error.errno or errno.EIO)
            family = sock.family
            bound = sock.getsockname()
            cookie = socket_cookie(sock)
        host, port = bound[0], bound[1]
        if not self.wanted(host, port) or self.context.agent_lost:
            return ReturnValue(0)
        remote_port = self.mapping.get(port, port)
        listener = Listener(family, reachable_address(family, bound), port, remote_port, cookie)
        inode = os.fstat(fd).st_ino
        self.listeners[inode] = listener
        if cookie:
            self.cookies[cookie] = inode
        if remote_port in self.by_remote_port:
            self.by_remote_port[remote_port] = listener
            return ReturnValue(0)
        self.by_remote_port[remote_port] = listener
        return Defer(self._subscribe(listener))

    async def _subscribe(self, listener: Listener) -> Outcome:
        mode = self.config.mode
        if self._closes is None:
            self._closes = ListenerCloses.start(self._on_socket_gone)
        try:
            subscribed = await self.context.client.subscribe_incoming(
                listener.remote_port, mode, self._on_connection, http_filter=self.http_filter)
        except (RemoteError, AgentError) as error:
            self.by_remote_port.pop(listener.remote_port, None)
            detail = error.strerror if isinstance(error, RemoteError) else error.message
            _say(f"cannot {mode} port {listener.remote_port} of the target: {detail}; "
                 f"the program listens locally only")
            return ReturnValue(0)
        log.info("incoming: %s of the target's port %d -> local port %d", mode,
                 listener.remote_port, listener.local_port)
        if mode == "mirror" and not subscribed.target_listening:
            _say(f"mirror of port {listener.remote_port}: nothing in the target listens there, "
                 f"so the mirror sees nothing (steal would take new connections)")
        await self._subscribe_replicas(listener)
        return ReturnValue(0)

    # -- a listener closed --

    def _on_socket_gone(self, cookie: int) -> None:
        """A socket of this namespace is gone: if it was a subscribed listener
        (its last fd closed, the program's or a child's), give the port back."""
        inode = self.cookies.pop(cookie, None)
        if inode is None:
            return
        listener = self.listeners.pop(inode, None)
        if listener is None or self.by_remote_port.get(listener.remote_port) is not listener:
            return
        others = [other for other in self.listeners.values()
                  if other.remote_port == listener.remote_port]
        if others:  # another socket listens for that port: it takes the connections
            self.by_remote_port[listener.remote_port] = others[-1]
            return
        del self.by_remote_port[listener.remote_port]
        log.info("incoming: the listener on local port %d closed: the target's port %d is "
                 "given back", listener.local_port, listener.remote_port)
        self._spawn(self._unsubscribe(listener.remote_port))

    async def _unsubscribe(self, remote_port: int) -> None:
        """Give the port back in the target and in every replica that subscribed it."""
        clients: list[AgentClient] = []
        if not self.context.agent_lost:
            clients.append(self.context.client)
        replicas = self._replicas
        if replicas is not None and replicas.done() and not replicas.cancelled() \
                and replicas.exception() is None:
            clients += replicas.result()
        for client in clients:
            try:
                await client.unsubscribe_incoming(remote_port)
            except (RemoteError, AgentError) as error:
                log.info("incoming: unsubscribing port %d: %s", remote_port, error)

    # -- the target's other replicas --

    async def _replica_clients(self) -> list[AgentClient]:
        provider = self.context.replica_agents
        if provider is None:
            return []
        if self._replicas is None:
            async def start() -> list[AgentClient]:
                clients = await provider()
                for client in clients:
                    self._spawn(self._watch_replica(client))
                return clients

            self._replicas = asyncio.ensure_future(start())
        try:
            return await asyncio.shield(self._replicas)
        except Exception as error:  # the API, the agents: the other replicas are a bonus
            if self._replicas.done():  # said once: later listens find none
                _say(f"no agents in the target's other replicas: {getattr(error, 'message', error)}")
                self._replicas = asyncio.get_running_loop().create_future()
                self._replicas.set_result([])
            return []

    async def _subscribe_replicas(self, listener: Listener) -> None:
        clients = await self._replica_clients()
        mode = self.config.mode
        results = await asyncio.gather(
            *(client.subscribe_incoming(listener.remote_port, mode, self._on_replica_connection,
                                        http_filter=self.http_filter) for client in clients),
            return_exceptions=True)
        for client, result in zip(clients, results, strict=True):
            if isinstance(result, (RemoteError, AgentError)):
                detail = result.strerror if isinstance(result, RemoteError) else result.message
                _say(f"cannot {mode} port {listener.remote_port} through the {client.description}: "
                     f"{detail}")
            elif isinstance(result, BaseException):
                raise result

    async def _watch_replica(self, client: AgentClient) -> None:
        await client.wait_closed()
        if not self.context.closing:
            _say(f"lost the {client.description}: that replica's traffic no longer reaches "
                 "the program")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections from the agent --

    def _on_connection(self, connection: IncomingConnection, stream: TcpStream) -> None:
        listener = self.by_remote_port.get(connection.port)
        if listener is None:
            stream.abort()
            return
        task = asyncio.get_running_loop().create_task(self._deliver(listener, connection, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_replica_connection(self, connection: IncomingConnection, stream: TcpStream) -> None:
        listener = self.by_remote_port.get(connection.port)
        if listener is None:
            stream.abort()
            return
        # A replica's agent going away ends its connections, not the session.
        self._spawn(self._deliver(listener, connection, stream, primary=False))

    async def _deliver(self, listener: Listener, connection: IncomingConnection,
                       stream: TcpStream, *, primary: bool = True) -> None:
        sock = socket.socket(listener.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        port = 0
        try:
            sock.setblocking(False)
            sock.bind(("0.0.0.0", 0) if listener.family == socket.AF_INET else ("::", 0))
            port = sock.getsockname()[1]
            self.arrivals[port] = _Arrival(Endpoint.of(connection.peer_host, connection.peer_port),
                                           Endpoint.of(connection.local_host, connection.local_port))
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await sock_connect(sock, listener.address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, TimeoutError, ValueError) as error:
            log.info("incoming connection from %s:%d not delivered: %s", connection.peer_host,
                     connection.peer_port, error)
            self.arrivals.pop(port, None)
            sock.close()
            stream.abort()
            return
        await relay_tcp(sock, stream,
                        on_agent_lost=self.outgoing.agent_lost if primary else lambda: None)
        failure = stream.failure
        if connection.mirror and isinstance(failure, RemoteError) \
                and failure.errno == errno.ENOBUFS:
            log.info("incoming: mirror copy of %s:%d dropped: %s", connection.peer_host,
                     connection.peer_port, failure.strerror)
            if not self._mirror_drop_said:
                self._mirror_drop_said = True
                _say(f"mirror of port {connection.port}: the program did not read the copy of "
                     f"{connection.peer_host}:{connection.peer_port} in time, so that copy was "
                     "cut (a copy never holds up the target's traffic); later ones at -v")

    # -- accept --

    def handle_accept(self, call: SyscallCall) -> Outcome:
        if not self.listeners:
            return CONTINUE
        inode = socket_inode(call.tid, call.int_arg(0))
        listener = self.listeners.get(inode) if inode is not None else None
        if listener is None:
            return CONTINUE
        flags = call.int_arg(3) if call.name == "accept4" else 0
        if flags & ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC):
            return Errno(errno.EINVAL)
        if call.sees_results:
            # ptrace cannot install a socket in the tracee (no reopen through
            # /proc): the kernel accepts, and the peer address is fixed after.
            capacity = 0
            if call.pointer_arg(1) and call.pointer_arg(2):
                capacity = struct.unpack("=I", call.read(call.pointer_arg(2), 4))[0]
            return AfterResult(partial(self._after_accept, call, listener, capacity))
        return OnTraceeFd(call.int_arg(0), partial(self._accept_action, call, listener, flags))

    def _accept_action(self, call: SyscallCall, listener: Listener, flags: int,
                       fd: int) -> Outcome:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
            try:
                accepted, address = _accept_now(fd)
            except BlockingIOError:
                return Errno(errno.EAGAIN)
            except OSError as error:
                return Errno(error.errno or errno.EIO)
            return self._accepted(call, listener, flags, accepted, address)
        return Defer(self._accept_blocking(call, listener, flags, os.dup(fd)))

    async def _accept_blocking(self, call: SyscallCall, listener: Listener, flags: int,
                               fd: int) -> Outcome:
        """A blocking accept, made without blocking: wait until the listener is
        readable, then accept only if a connection is still there (another
        tracee thread may have taken it: then wait for the next, as the
        kernel's accept would)."""
        if self._accept_waiter is None:
            self._accept_waiter = AcceptWaiter()
        try:
            while True:
                await self._accept_waiter.readable(fd)
                try:
                    accepted, address = _accept_now(fd)
                except BlockingIOError:
                    continue
                break
        except OSError as error:
            return Errno(error.errno or errno.EIO)
        finally:
            os.close(fd)
        return self._accepted(call, listener, flags, accepted, address)

    def _accepted(self, call: SyscallCall, listener: Listener, flags: int, fd: int,
                  address: Any) -> Outcome:
        try:
            if flags & socket.SOCK_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            found = endpoint_of(address)
            arrival = self.arrivals.pop(found.port, None) if found is not None else None
            sockaddr = b""
            if arrival is not None:
                with contextlib.suppress(ValueError):
                    sockaddr = build_sockaddr(listener.family, arrival.peer)
                    local = build_sockaddr(listener.family, arrival.local)
                    self.outgoing._remember(os.fstat(fd).st_ino, Relayed(sockaddr, local))
            if not sockaddr and found is not None:
                with contextlib.suppress(ValueError):
                    sockaddr = build_sockaddr(listener.family, found)
            writes = tuple(_address_reply(call, call.pointer_arg(1), call.pointer_arg(2), sockaddr))
        except BaseException:
            os.close(fd)
            raise
        return InjectFd(fd, cloexec=bool(flags & socket.SOCK_CLOEXEC), writes=writes)

    def _after_accept(self, call: SyscallCall, listener: Listener, capacity: int,
                      result: int) -> tuple[tuple[int, bytes], ...]:
        from ..seccomp import take_tracee_fd

        fd = take_tracee_fd(call.tid, result)
        try:
            with borrowed(fd) as sock:
                found = endpoint_of(sock.getpeername())
            arrival = self.arrivals.pop(found.port, None) if found is not None else None
            if arrival is None:
                return ()
            sockaddr = build_sockaddr(listener.family, arrival.peer)
            local = build_sockaddr(listener.family, arrival.local)
            self.outgoing._remember(os.fstat(fd).st_ino, Relayed(sockaddr, local))
        except ValueError:
            return ()
        finally:
            os.close(fd)
        if not (call.pointer_arg(1) and call.pointer_arg(2)):
            return ()
        return ((call.pointer_arg(1), sockaddr[:capacity]),
                (call.pointer_arg(2), struct.pack("=I", len(sockaddr))))

    async def close(self) -> None:
        if self._closes is not None:
            self._closes.close()
        if self._accept_waiter is not None:
            self._accept_waiter.close()
        for task in list(self._tasks):
            task.cancel()
        if self._replicas is not None:
            if not self._replicas.done():
                self._replicas.cancel()
            elif not self._replicas.cancelled() and self._replicas.exception() is None:
                # Each replica's agent exits when its client leaves (its rules go with it).
                for client in self._replicas.result():
                    with contextlib.suppress(Exception):
                        await client.close()


SO_COOKIE = 57
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
#: sock_diag multicast groups SKNLGRP_INET_TCP_DESTROY (1) and SKNLGRP_INET6_TCP_DESTROY (3).
TCP_DESTROY_GROUPS = (1 << 0) | (1 << 2)
#: Where idiag_cookie sits in a SOCK_DIAG_BY_FAMILY message (nlmsghdr, then
#: inet_diag_msg: 4 bytes, then inet_diag_sockid: ports 4, addresses 32, interface 4).
_COOKIE_OFFSET = 16 + 4 + 4 + 32 + 4


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's unique id of a socket (SO_COOKIE, Linux 4.12), 0 if unknown."""
    try:
        return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])
    except OSError:
        return 0


class ListenerCloses:
    """TCP sockets of this network namespace as they are destroyed.

    ``close`` is not trapped (it is far too frequent), so a listener closed by
    the program is seen from the kernel's side: sock_diag broadcasts each
    destroyed TCP socket (``SKNLGRP_INET*_TCP_DESTROY``, CAP_NET_ADMIN) with its
    cookie, the moment its last reference goes. The inode is 0 by then, hence
    the cookie.
    """

    def __init__(self, sock: socket.socket, on_gone: Callable[[int], None]) -> None:
        self.sock = sock
        self._on_gone = on_gone
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def start(cls, on_gone: Callable[[int], None]) -> ListenerCloses | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_SOCK_DIAG)
        except OSError as error:
            log.info("incoming: no sock_diag (%s): a closed listener keeps its subscription "
                     "until the session ends", error)
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, TCP_DESTROY_GROUPS))
        except OSError as error:
            sock.close()
            log.info("incoming: cannot watch for closed listeners (%s): a closed listener "
                     "keeps its subscription until the session ends", error)
            return None
        return cls(sock, on_gone)

    def _readable(self) -> None:
        for _ in range(256):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as error:  # ENOBUFS: events were lost; later ones still come
                log.debug("incoming: sock_diag: %s", error)
                continue
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind == SOCK_DIAG_BY_FAMILY and offset + _COOKIE_OFFSET + 8 <= len(data):
                    self._on_gone(struct.unpack_from("=Q", data, offset + _COOKIE_OFFSET)[0])
                offset += (length + 3) & ~3

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


#: Every accept the supervisor makes on a tracee's listener, from the trap
#: thread or the async side, holds this lock: the readiness check and the
#: accept are then one step, so an accept on a blocking listener never blocks.
_accepting = threading.Lock()


def _accept_now(fd: int) -> tuple[int, Any]:
    """Accept a connection waiting on listener ``fd``, never blocking: raises
    BlockingIOError when none is waiting (whatever the socket's O_NONBLOCK,
    which is the tracee's and is left alone)."""
    with _accepting:
        ready = select.poll()
        ready.register(fd, select.POLLIN)
        if not ready.poll(0):
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        with borrowed(fd) as sock:
            accepted, address = sock._accept()  # type: ignore[attr-defined]
    return int(accepted), address


class AcceptWaiter:
    """Waits for tracee listeners to become readable, in a thread of its own.

    Not the event loop's ``add_reader``: uvloop (libuv) sets O_NONBLOCK on the
    fd it watches, and a dup of the tracee's listener shares the tracee's file
    status flags, so the program's blocking listener would turn non-blocking
    under it (its next ``accept`` failing with EAGAIN). ``epoll`` leaves the
    flags alone. One thread for every waiting accept: none blocks a worker of
    the loop's executor.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mtrace-accept", daemon=True)
        self._thread.start()

    async def readable(self, fd: int) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            self._waiting[fd] = future
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        try:
            await future
        finally:
            with self._lock:
                self._waiting.pop(fd, None)
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed
                return
            for fd, _ in events:
                if fd == self._wake:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(self._wake)
                    continue
                with self._lock:
                    future = self._waiting.get(fd)
                if future is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is gone
                        self._loop.call_soon_threadsafe(_set_once, future)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=5)
        self._epoll.close()
        os.close(self._wake)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _say(message: str) -> None:
    sys.stderr.write(f"mtrace: incoming: {message}\n")
    sys.stderr.flush()


def setup(context: RemoteContext, outgoing: Outgoing) -> IncomingFeature:
    return IncomingFeature(context, outgoing)
