"""Outgoing TCP streams and UDP sockets, opened in the target's network namespace.

One :class:`Outgoing` per client connection owns that client's streams and
sockets and closes them all when the client goes away.

A TCP stream is two pumps over the raw socket:

* target -> client: the socket is read only while the client has granted
  credit *and* the connection's :data:`MAX_BYTES_TO_CLIENT` has room, and what
  was read is held only until its ``StreamData`` is handed to the connection
  (which takes a frame only while its send buffer is below the high-water
  mark). A client that stops reading therefore stops the reads of every
  stream it has: TCP itself pushes back on the remote peers, and the agent
  holds at most that budget, however many streams there are;
* client -> target: ``StreamData`` from the client is queued (never more than
  the stream's window, else the stream is reset with EPROTO), written to the
  socket, and credit is returned once the socket took it. The windows of all
  of a connection's streams (incoming ones too, for a protocol-3 client:
  :meth:`Outgoing.adopt`) come out of one :class:`WindowPool`: a stream
  starts small and grows its window as it flows while the pool has room, and
  gives window back (returns less credit than it consumed) while the pool is
  over, never below :data:`MIN_STREAM_WINDOW`.

Datagrams are not flow controlled: the receive loop waits for the client
connection to drain, and the kernel drops what does not fit in the socket
buffer meanwhile, as UDP may.
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
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .aio import ByteBudget, sock_recvfrom, sock_sendto, wait_readable
from .files import RootResolver
from .logs import event
from .protocol import (
    DEFAULT_WINDOW,
    INCOMING_INITIAL_CREDIT,
    Datagram,
    StreamCredit,
    StreamData,
    StreamEof,
    StreamReset,
    TcpConnect,
    TcpConnected,
    UdpOpen,
    UdpOpened,
    UdpSend,
    UnixConnect,
    _Message,
)

logger = logging.getLogger("mtrace.agent.net")

#: Largest StreamData the agent sends (smaller than the frame limit on purpose:
#: latency of other streams sharing the connection).
STREAM_CHUNK = 256 * 1024
MAX_DATAGRAM = 65535
MAX_STREAMS = 4096
MAX_UDP_SOCKETS = 1024
#: After the client closes a stream, how long the agent keeps flushing its data.
CLOSE_FLUSH_TIMEOUT = 30.0
#: Bytes read from a connection's streams and not yet handed to the connection.
MAX_BYTES_TO_CLIENT = 16 * 1024 * 1024
#: The sum of the windows a connection's streams grant the client: what the
#: agent may have to hold of the client's data while targets do not read it.
MAX_STREAM_WINDOWS = 16 * 1024 * 1024
#: A new stream's window (it doubles as the stream flows, up to DEFAULT_WINDOW).
INITIAL_STREAM_WINDOW = 64 * 1024
#: No window shrinks below this, and a stream opened while the pool is spent
#: gets this much beyond it: every stream can always make progress.
MIN_STREAM_WINDOW = 4 * 1024

Send = Callable[[_Message], Awaitable[None]]
SendNowait = Callable[[_Message], None]
ResolveHost = Callable[[str], Awaitable[str]]


def _oserror(code: int, detail: str | None = None) -> OSError:
    return OSError(code, detail or os.strerror(code))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


class WindowPool:
    """The windows one connection's streams grant the client, out of one total.

    The total is exceeded only by :data:`MIN_STREAM_WINDOW` per stream (a
    stream opened while the pool is spent) and by the incoming streams of a
    protocol-2 client, whose first window that protocol fixes at
    ``DEFAULT_WINDOW``; both shrink back as they flow.
    """

    def __init__(self, limit: int = MAX_STREAM_WINDOWS) -> None:
        self.limit = limit
        self.granted = 0

    def take(self, fixed: int | None = None) -> int:
        """A new stream's window: :data:`INITIAL_STREAM_WINDOW` while the pool
        has room for it, else :data:`MIN_STREAM_WINDOW`; ``fixed`` when the
        protocol already told the client what it is (a protocol-2 client's
        incoming streams)."""
        if fixed is not None:
            window = fixed
        elif self.granted + INITIAL_STREAM_WINDOW <= self.limit:
            window = INITIAL_STREAM_WINDOW
        else:
            window = MIN_STREAM_WINDOW
        self.granted += window
        return window

    def adjust(self, window: int, consumed: int) -> int:
        """How much a stream with ``window`` that just consumed ``consumed``
        bytes changes its window by: grows (doubling at most, up to
        DEFAULT_WINDOW) while the pool has room, shrinks (by at most what it
        consumed, so the credit it returns is never negative) while it is over."""
        if self.granted > self.limit:
            change = -min(consumed, max(0, window - MIN_STREAM_WINDOW), self.granted - self.limit)
        else:
            change = max(0, min(window, DEFAULT_WINDOW - window, self.limit - self.granted))
        self.granted += change
        return change

    def give_back(self, window: int) -> None:
        self.granted -= window


class TcpStream:
    """One TCP stream: the socket and its two pumps."""

    def __init__(
        self,
        stream_id: int,
        sock: socket.socket,
        *,
        send_window: int,
        receive_window: int,
        outgoing: Outgoing,
    ) -> None:
        self.id = stream_id
        self._sock = sock
        self._outgoing = outgoing
        self._credit = send_window
        self._credit_changed = asyncio.Event()
        self._receive_window = receive_window
        self._queued: deque[bytes] = deque()
        self._queued_bytes = 0
        self._unacknowledged = 0  # bytes taken from the queue, not yet taken by the socket
        self._inbound_changed = asyncio.Event()
        self._shutdown_requested = False
        self._close_requested = False
        self._done = False
        self._to_client = asyncio.create_task(self._pump_to_client(), name=f"stream-{stream_id}-out")
        self._to_target = asyncio.create_task(self._pump_to_target(), name=f"stream-{stream_id}-in")

    @property
    def receive_window(self) -> int:
        """What the client may send now beyond what the agent holds of it."""
        return self._receive_window

    def reset(self, code: int, message: str) -> None:
        """End the stream from the agent's side: the client gets ``StreamReset``."""
        self._fail(code, message)

    # --- events from the client ---

    def on_data(self, data: bytes) -> None:
        if self._shutdown_requested or self._close_requested:
            self._fail(errno.EPIPE, "data after shutdown")
            return
        if self._queued_bytes + self._unacknowledged + len(data) > self._receive_window:
            self._fail(errno.EPROTO, "client sent beyond its credit")
            return
        self._queued.append(data)
        self._queued_bytes += len(data)
        self._inbound_changed.set()

    def on_credit(self, size: int) -> None:
        if size <= 0:
            self._fail(errno.EPROTO, "non-positive credit")
            return
        self._credit += size
        self._credit_changed.set()

    def on_shutdown(self) -> None:
        self._shutdown_requested = True
        self._inbound_changed.set()

    def on_close(self) -> None:
        """The client is done: stop sending to it, flush what it sent, then close."""
        self._close_requested = True
        self._to_client.cancel()
        self._inbound_changed.set()
        # A peer that never reads must not keep the socket forever.
        asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, self._abort)

    def _abort(self) -> None:
        if not self._done:
            self._reset_on_close()
            self.close()

    def _reset_on_close(self) -> None:
        # Closing with a zero linger sends RST and drops what the kernel still holds.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        """Forget the stream: stop both pumps and close the socket."""
        if self._done:
            return
        self._done = True
        self._outgoing.forget_stream(self.id)
        self._outgoing.windows.give_back(self._receive_window)
        self._queued.clear()
        current = asyncio.current_task()
        pumps = (self._to_client, self._to_target)
        for task in pumps:
            if task is not current:
                task.cancel()
        pending = [task for task in pumps if not task.done()]
        if pending:
            # Only once the pumps have let go of the fd (their reader/writer hooks
            # are removed as they unwind): closing first could let a new socket
            # reuse the number and lose its hooks.
            self._outgoing.spawn(self._close_socket_after(pending))
        else:
            self._sock.close()

    async def _close_socket_after(self, pumps: list[asyncio.Task[None]]) -> None:
        try:
            await asyncio.wait(pumps)
        finally:
            self._sock.close()

    # --- pumps ---

    async def _pump_to_client(self) -> None:
        budget = self._outgoing.to_client
        try:
            while True:
                while self._credit <= 0:
                    self._credit_changed.clear()
                    await self._credit_changed.wait()
                # Bytes are taken from the budget only with something to read, so
                # idle streams hold none of it.
                held = await budget.acquire(min(self._credit, STREAM_CHUNK))
                try:
                    try:
                        data = self._sock.recv(held)
                    except (BlockingIOError, InterruptedError):
                        budget.release(held)
                        held = 0
                        await wait_readable(self._sock)
                        continue
                    budget.release(held - len(data))
                    held = len(data)
                    if not data:
                        self._outgoing.send_nowait(StreamEof(stream=self.id))
                        return
                    self._credit -= len(data)
                    await self._outgoing.send(StreamData(stream=self.id, data=data))
                finally:
                    budget.release(held)
        except OSError as error:
            self._fail(error.errno or errno.EIO, error.strerror or str(error))
        finally:
            self._maybe_finished()

    async def _pump_to_target(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not (self._queued or self._shutdown_requested or self._close_requested):
                    self._inbound_changed.clear()
                    await self._inbound_changed.wait()
                if self._queued:
                    data = self._queued.popleft()
                    self._queued_bytes -= len(data)
                    self._unacknowledged += len(data)
                    await loop.sock_sendall(self._sock, data)
                    self._unacknowledged -= len(data)
                    if not self._close_requested:
                        self._return_credit(len(data))
                    continue
                if self._close_requested:
                    self.close()
                    return
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)
                return
        except OSError as error:
            self._fail(error.errno or errno.EIO, error.strerror or str(error))
        finally:
            self._maybe_finished()

    def _return_credit(self, consumed: int) -> None:
        # The window changes with the credit that carries the change: the client
        # can never have more in flight than the window the agent checks against.
        change = self._outgoing.windows.adjust(self._receive_window, consumed)
        self._receive_window += change
        if consumed + change > 0:
            self._outgoing.send_nowait(StreamCredit(stream=self.id, size=consumed + change))

    def _maybe_finished(self) -> None:
        # Called as a pump ends: once both have, nothing more can happen on the stream.
        current = asyncio.current_task()
        if all(task.done() for task in (self._to_client, self._to_target) if task is not current):
            self.close()

    def _fail(self, code: int, message: str) -> None:
        if self._done:
            return
        event(logger, logging.INFO, "stream_reset", stream=self.id, errno=code, message=message)
        self._outgoing.send_nowait(StreamReset(stream=self.id, errno=code, message=message))
        self._reset_on_close()
        self.close()


class UdpSocket:
    def __init__(self, socket_id: int, sock: socket.socket, outgoing: Outgoing) -> None:
        self.id = socket_id
        self.sock = sock
        self._outgoing = outgoing
        self._receiver = asyncio.create_task(self._receive(), name=f"udp-{socket_id}")

    async def send(self, host: str, port: int, data: bytes) -> int:
        address = _ip(host)
        if address is None:
            raise _oserror(errno.EINVAL, f"not an IP address: {host!r}")
        if self.sock.family == socket.AF_INET6 and address.version == 4:
            host = f"::ffff:{address}"
        elif self.sock.family == socket.AF_INET and address.version == 6:
            raise _oserror(errno.EAFNOSUPPORT)
        return await sock_sendto(self.sock, data, (host, port))

    async def _receive(self) -> None:
        while True:
            try:
                data, source = await sock_recvfrom(self.sock, MAX_DATAGRAM)
            except OSError as error:
                # ICMP errors surface here on some kernels; they belong to one
                # datagram, not to the socket.
                event(logger, logging.DEBUG, "udp_receive_error", socket=self.id, errno=error.errno)
                await asyncio.sleep(0)
                continue
            host = source[0]
            if host.startswith("::ffff:") and "." in host:
                host = host[len("::ffff:") :]
            try:
                await self._outgoing.send(Datagram(socket=self.id, host=host, port=source[1], data=data))
            except ConnectionError:
                return  # the client is gone; the session tears this socket down

    def close(self) -> None:
        self._receiver.cancel()
        self.sock.close()


class Outgoing:
    """A client's streams and sockets."""

    def __init__(self, send: Send, send_nowait: SendNowait, resolve_host: ResolveHost) -> None:
        self.send = send
        self.send_nowait = send_nowait
        self._resolve_host = resolve_host
        self._streams: dict[int, TcpStream] = {}
        self._connecting: set[int] = set()
        self._udp: dict[int, UdpSocket] = {}
        self._closed = False
        #: What the streams may hold of the target's data (see the module docstring).
        self.to_client = ByteBudget(MAX_BYTES_TO_CLIENT)
        #: What the streams may hold of the client's data.
        self.windows = WindowPool()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream_closed = asyncio.Event()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a clean-up task that must not be garbage-collected half way."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def connect(self, request: TcpConnect) -> TcpConnected:
        if request.stream in self._streams or request.stream in self._connecting:
            raise _oserror(errno.EEXIST, f"stream {request.stream} is already in use")
        if len(self._streams) + len(self._connecting) >= MAX_STREAMS:
            raise _oserror(errno.EMFILE, "too many streams on this connection")
        if not 0 < request.port < 65536:
            raise _oserror(errno.EINVAL, f"invalid port {request.port}")
        if request.window <= 0:
            raise _oserror(errno.EINVAL, "window must be positive")
        self._connecting.add(request.stream)
        try:
            host = request.host
            if _ip(host) is None:
                host = await self._resolve_host(host)
            address = _ip(host)
            assert address is not None
            sock = socket.socket(
                socket.AF_INET if address.version == 4 else socket.AF_INET6, socket.SOCK_STREAM
            )
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                loop = asyncio.get_running_loop()
                try:
                    async with asyncio.timeout(request.timeout if request.timeout > 0 else None):
                        await loop.sock_connect(sock, (host, request.port))
                except TimeoutError:
                    raise _oserror(
                        errno.ETIMEDOUT, f"{os.strerror(errno.ETIMEDOUT)} ({host}:{request.port})"
                    ) from None
                except OSError as error:
                    # asyncio's message ("Connect call failed") hides the reason.
                    code = error.errno or errno.EIO
                    raise _oserror(code, f"{os.strerror(code)} ({host}:{request.port})") from None
            except BaseException:
                sock.close()
                raise
        finally:
            self._connecting.discard(request.stream)
        try:
            local = sock.getsockname()
            peer = sock.getpeername()
        except OSError:
            sock.close()
            raise
        if self._closed:
            sock.close()
            raise _oserror(errno.ECONNABORTED, "client went away")
        window = self.windows.take()
        self._streams[request.stream] = TcpStream(
            request.stream,
            sock,
            send_window=request.window,
            receive_window=window,
            outgoing=self,
        )
        event(
            logger,
            logging.DEBUG,
            "stream_open",
            stream=request.stream,
            peer=f"{host}:{request.port}",
        )
        return TcpConnected(
            stream=request.stream,
            local_host=local[0],
            local_port=local[1],
            peer_host=peer[0],
            peer_port=peer[1],
            window=window,
        )

    async def connect_unix(self, request: UnixConnect, resolver: RootResolver) -> TcpConnected:
        """A stream to the target's Unix socket ``request.path``: a path is
        resolved under the target's root (never outside it) and connected
        through its directory's fd; an abstract name lives in the network
        namespace the agent is in."""
        if request.stream in self._streams or request.stream in self._connecting:
            raise _oserror(errno.EEXIST, f"stream {request.stream} is already in use")
        if len(self._streams) + len(self._connecting) >= MAX_STREAMS:
            raise _oserror(errno.EMFILE, "too many streams on this connection")
        if request.window <= 0:
            raise _oserror(errno.EINVAL, "window must be positive")
        path = request.path
        shown = path.decode(errors="replace")
        if not (path.startswith(b"/") or path.startswith(b"\0")) or len(path) > 107:
            raise _oserror(errno.EINVAL, f"not an absolute or abstract socket path: {shown!r}")
        self._connecting.add(request.stream)
        directory = -1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if path.startswith(b"\0"):
                address = path
            else:
                loop = asyncio.get_running_loop()
                directory, name = await loop.run_in_executor(None, resolver.parent, path)
                address = f"/proc/self/fd/{directory}/".encode() + name
            try:
                async with asyncio.timeout(request.timeout if request.timeout > 0 else None):
                    await asyncio.get_running_loop().sock_connect(sock, address)
            except TimeoutError:
                raise _oserror(errno.ETIMEDOUT, f"{os.strerror(errno.ETIMEDOUT)} ({shown})") from None
            except OSError as error:
                code = error.errno or errno.EIO
                raise _oserror(code, f"{os.strerror(code)} ({shown})") from None
        except BaseException:
            sock.close()
            raise
        finally:
            if directory >= 0:
                os.close(directory)
            self._connecting.discard(request.stream)
        if self._closed:
            sock.close()
            raise _oserror(errno.ECONNABORTED, "client went away")
        window = self.windows.take()
        self._streams[request.stream] = TcpStream(
            request.stream, sock, send_window=request.window, receive_window=window, outgoing=self,
        )
        event(logger, logging.DEBUG, "stream_open", stream=request.stream, peer=shown)
        return TcpConnected(stream=request.stream, local_host="", local_port=0,
                            peer_host=shown, peer_port=0, window=window)

    def adopt(self, stream_id: int, sock: socket.socket, *, pooled: bool) -> TcpStream | None:
        """Pump an already connected socket as stream ``stream_id`` (incoming
        connections: the caller announces it with an ``IncomingConnection``
        before it yields to the loop). ``pooled`` (a protocol-3 client): its
        window comes from the pool, and the agent sends INCOMING_INITIAL_CREDIT
        before the client's first credit; else both windows are
        ``DEFAULT_WINDOW``. None (``sock``
        closed): the client went away or has :data:`MAX_STREAMS` streams."""
        if self._closed or len(self._streams) + len(self._connecting) >= MAX_STREAMS:
            sock.close()
            return None
        sock.setblocking(False)
        stream = TcpStream(stream_id, sock, send_window=INCOMING_INITIAL_CREDIT if pooled else DEFAULT_WINDOW,
                           receive_window=self.windows.take(None if pooled else DEFAULT_WINDOW),
                           outgoing=self)
        self._streams[stream_id] = stream
        return stream

    async def stream_room(self) -> None:
        """Until the connection may open one more stream (under :data:`MAX_STREAMS`)."""
        while len(self._streams) + len(self._connecting) >= MAX_STREAMS and not self._closed:
            self._stream_closed.clear()
            await self._stream_closed.wait()

    def stream(self, stream_id: int) -> TcpStream | None:
        return self._streams.get(stream_id)

    def forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._stream_closed.set()

    async def udp_open(self, request: UdpOpen) -> UdpOpened:
        if request.socket in self._udp:
            raise _oserror(errno.EEXIST, f"socket {request.socket} is already in use")
        if len(self._udp) >= MAX_UDP_SOCKETS:
            raise _oserror(errno.EMFILE, "too many UDP sockets on this connection")
        if request.family not in (socket.AF_INET, socket.AF_INET6):
            raise _oserror(errno.EAFNOSUPPORT)
        sock = socket.socket(request.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if request.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            default_host = "0.0.0.0" if request.family == socket.AF_INET else "::"
            sock.bind((request.bind_host or default_host, request.bind_port))
            local = sock.getsockname()
        except BaseException:
            sock.close()
            raise
        if self._closed:
            sock.close()
            raise _oserror(errno.ECONNABORTED, "client went away")
        self._udp[request.socket] = UdpSocket(request.socket, sock, self)
        return UdpOpened(socket=request.socket, local_host=local[0], local_port=local[1])

    async def udp_send(self, request: UdpSend) -> int:
        udp = self._udp.get(request.socket)
        if udp is None:
            raise _oserror(errno.EBADF, f"no UDP socket {request.socket}")
        return await udp.send(request.host, request.port, request.data)

    def udp_close(self, socket_id: int) -> None:
        udp = self._udp.pop(socket_id, None)
        if udp is None:
            raise _oserror(errno.EBADF, f"no UDP socket {socket_id}")
        udp.close()

    def close_all(self) -> None:
        self._closed = True
        self._stream_closed.set()
        for stream in list(self._streams.values()):
            stream.close()
        for udp in list(self._udp.values()):
            udp.close()
        self._udp.clear()

    @property
    def open_count(self) -> int:
        return len(self._streams) + len(self._udp)
