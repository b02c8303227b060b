"""Incoming traffic: the target's ports the client subscribed to (mirror or steal).

One :class:`Incoming` per client connection owns that client's subscriptions
and removes them all when the client goes away.

* **steal**: redirect rules (:mod:`mtrace.agent.redirect`) send new
  connections to the target's port to a listener of the agent; each accepted
  connection becomes a stream to the client (``IncomingConnection``, then the
  ordinary stream messages and flow control), with the real peer address and
  the original destination (``SO_ORIGINAL_DST``).
* **steal with an HTTP filter**: the agent speaks HTTP/1.1 on the stolen
  connection (h11); each request that matches goes to the client's stream,
  each other one to the target's process over the agent's own connection to
  the original destination (marked, so not redirected again), and the
  answers go back in order, so keep-alive and pipelined requests mix freely.
  An HTTP/2 connection (its preface, or an ``Upgrade: h2c`` the chosen side
  accepts) is sorted per stream the same way, with h2. The agent's connections
  to the target leave from the client's address where the redirect table can
  route the answers back (``IP_TRANSPARENT``), so the target sees its real peer.
* **mirror**: nothing in the target's path changes. An ``AF_PACKET`` socket
  with a BPF filter on the subscribed ports sees the packets the target
  receives; a small TCP reassembly per connection (from its SYN) turns them
  back into the byte stream the peer sent, which goes to the client as a
  stream whose answers are dropped.

Each of these ends in :meth:`mtrace.agent.net.Outgoing.adopt`: a connected
socket (the stolen one, or the agent's end of a socketpair) is pumped to the
client exactly like an outgoing stream, with its windows from the same pool
(a protocol-3 client) and within the same :data:`~mtrace.agent.net.MAX_STREAMS`.
So a stolen connection whose program does not read stops being read (its
peer's TCP pushes back), and the steal stops accepting while the client has
``MAX_STREAMS`` streams. A mirror copy cannot push back (the target's own
traffic must not wait for it): once its stream's window is spent and its
small backlog full, the copy of that connection is dropped (``StreamReset``
with ENOBUFS, logged once per connection); the capture holds at most
:data:`MAX_MIRROR_HELD` bytes for all connections together.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .aio import sock_connect
from .logs import event
from .net import Outgoing
from .protocol import (
    AGENT_STREAM_BASE,
    DEFAULT_WINDOW,
    INCOMING_WINDOWS_VERSION,
    PROTOCOL_VERSION,
    HttpRequestFilter,
    IncomingConnection,
    IncomingSubscribe,
    IncomingSubscribed,
)
from .redirect import AGENT_MARK, NEEDS_NET_ADMIN, RedirectError, Redirector

logger = logging.getLogger("mtrace.agent.incoming")

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
MAX_SUBSCRIPTIONS = 64
#: Out-of-order bytes a mirrored connection may hold before it is dropped.
MAX_REORDER = 4 * 1024 * 1024
#: What a mirrored connection may hold, in order, beyond its socketpair while
#: its stream waits for the client's credit; past it the copy is dropped.
MIRROR_BACKLOG = 256 * 1024
#: What the capture holds for all mirrored connections together (in-order
#: backlogs and out-of-order segments); the connection that would pass it is dropped.
MAX_MIRROR_HELD = 16 * 1024 * 1024
#: Largest HTTP head or buffered body a filtered steal keeps.
MAX_HTTP_BUFFER = 16 * 1024 * 1024
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _oserror(code: int, detail: str) -> OSError:
    return OSError(code, detail)


def _unmapped(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


def target_listens(port: int) -> bool:
    """Whether some socket in this network namespace listens on TCP ``port``."""
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A" \
                            and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where a redirected connection was going (conntrack's SO_ORIGINAL_DST)."""
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv4Address(raw[4:8])), port
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    return None


# -- the HTTP filter -------------------------------------------------------------------

@dataclass
class CompiledFilter:
    header: re.Pattern[str] | None = None
    path: re.Pattern[str] | None = None
    method: re.Pattern[str] | None = None
    all_of: list[CompiledFilter] = field(default_factory=list)
    any_of: list[CompiledFilter] = field(default_factory=list)
    ports: set[int] | None = None

    @classmethod
    def of(cls, spec: HttpRequestFilter) -> CompiledFilter:
        def compiled(pattern: str | None, what: str) -> re.Pattern[str] | None:
            if pattern is None:
                return None
            try:
                return re.compile(pattern)
            except re.error as error:
                raise _oserror(errno.EINVAL, f"bad {what} regular expression {pattern!r}: {error}")\
                    from None

        return cls(compiled(spec.header, "header"), compiled(spec.path, "path"),
                   compiled(spec.method, "method"),
                   [cls.of(nested) for nested in spec.all_of or []],
                   [cls.of(nested) for nested in spec.any_of or []],
                   set(spec.ports) if spec.ports is not None else None)

    def applies_to(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def matches(self, method: str, target: str, headers: list[str]) -> bool:
        """Every condition given holds (no condition at all: matches nothing)."""
        conditions: list[bool] = []
        if self.header is not None:
            header = self.header
            conditions.append(any(header.search(line) for line in headers))
        if self.path is not None:
            conditions.append(self.path.search(target) is not None)
        if self.method is not None:
            conditions.append(self.method.search(method) is not None)
        if self.all_of:
            conditions.append(all(nested.matches(method, target, headers) for nested in self.all_of))
        if self.any_of:
            conditions.append(any(nested.matches(method, target, headers) for nested in self.any_of))
        return bool(conditions) and all(conditions)


# -- subscriptions ----------------------------------------------------------------------

@dataclass
class Subscription:
    port: int
    mode: str
    http_filter: CompiledFilter | None
    listener: socket.socket | None = None
    task: asyncio.Task[None] | None = None


class Incoming:
    """A client's subscriptions (see the module docstring)."""

    def __init__(self, outgoing: Outgoing) -> None:
        self._outgoing = outgoing
        self._subscriptions: dict[int, Subscription] = {}
        self._redirector: Redirector | None = None
        self._capture: MirrorCapture | None = None
        self._stream_ids = itertools.count(AGENT_STREAM_BASE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: The protocol the client speaks (set by the session after the handshake).
        self.client_version = PROTOCOL_VERSION
        self._full_said = False

    async def subscribe(self, request: IncomingSubscribe) -> IncomingSubscribed:
        port = request.port
        if not 0 < port < 65536:
            raise _oserror(errno.EINVAL, f"invalid port {port}")
        if request.mode not in ("steal", "mirror"):
            raise _oserror(errno.EINVAL, f"unknown incoming mode {request.mode!r}")
        if port in self._subscriptions:
            await self.unsubscribe(port)
        if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
            raise _oserror(errno.EMFILE, "too many subscribed ports")
        http_filter = None
        if request.http_filter is not None:
            if request.mode != "steal":
                raise _oserror(errno.EINVAL, "an HTTP filter needs steal mode")
            http_filter = CompiledFilter.of(request.http_filter)
        subscription = Subscription(port, request.mode, http_filter)
        listening = target_listens(port)
        if request.mode == "steal":
            await self._steal(subscription)
        else:
            await self._mirror(subscription)
        self._subscriptions[port] = subscription
        event(logger, logging.INFO, "incoming_subscribed", port=port, mode=request.mode,
              filtered=http_filter is not None, target_listening=listening)
        return IncomingSubscribed(port=port, target_listening=listening)

    async def unsubscribe(self, port: int) -> None:
        subscription = self._subscriptions.pop(port, None)
        if subscription is None:
            raise _oserror(errno.ENOENT, f"port {port} is not subscribed")
        if subscription.mode == "steal" and self._redirector is not None:
            with contextlib.suppress(RedirectError):
                await asyncio.to_thread(self._redirector.remove, port)
        if subscription.task is not None:
            subscription.task.cancel()
        if subscription.listener is not None:
            subscription.listener.close()
        if self._capture is not None:
            self._capture.set_ports(self._mirrored_ports())
        event(logger, logging.INFO, "incoming_unsubscribed", port=port)

    def _mirrored_ports(self) -> set[int]:
        return {port for port, found in self._subscriptions.items() if found.mode == "mirror"}

    def close_all(self) -> None:
        self._closed = True
        if self._redirector is not None:
            self._redirector.close()  # first: the target gets its ports back at once
        for subscription in self._subscriptions.values():
            if subscription.task is not None:
                subscription.task.cancel()
            if subscription.listener is not None:
                subscription.listener.close()
        self._subscriptions.clear()
        if self._capture is not None:
            self._capture.close()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _new_stream(self, sock: socket.socket, port: int, peer: tuple[str, int],
                    local: tuple[str, int], *, mirror: bool = False) -> int | None:
        """Pump ``sock`` as a new stream and announce it to the client; its id,
        or None (``sock`` closed) when the client has no room for one more."""
        stream_id = next(self._stream_ids)
        pooled = self.client_version >= INCOMING_WINDOWS_VERSION
        stream = self._outgoing.adopt(stream_id, sock, pooled=pooled)
        if stream is None:
            if not self._full_said and not self._closed:
                self._full_said = True
                event(logger, logging.WARNING, "incoming_streams_full", port=port,
                      peer=f"{peer[0]}:{peer[1]}", mirror=mirror)
            return None
        # Before the stream's pumps first run: the client hears of the stream first.
        self._outgoing.send_nowait(IncomingConnection(
            stream=stream_id, port=port, peer_host=_unmapped(peer[0]), peer_port=peer[1],
            local_host=_unmapped(local[0]), local_port=local[1], mirror=mirror,
            window=stream.receive_window if pooled else DEFAULT_WINDOW))
        return stream_id

    def _drop_mirror(self, stream_id: int, port: int, peer: tuple[str, int], reason: str) -> None:
        """A mirrored connection's copy is dropped (see the module docstring)."""
        event(logger, logging.INFO, "mirror_copy_dropped", stream=stream_id, port=port,
              peer=f"{peer[0]}:{peer[1]}", reason=reason)
        stream = self._outgoing.stream(stream_id)
        if stream is not None:
            stream.reset(errno.ENOBUFS, f"mirror copy dropped: {reason}")

    # -- steal --

    async def _steal(self, subscription: Subscription) -> None:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(("::", 0))
            listener.listen(1024)
            listener.setblocking(False)
            if self._redirector is None:
                self._redirector = await asyncio.to_thread(Redirector)
            redirector = self._redirector
            await asyncio.to_thread(redirector.set, subscription.port, listener.getsockname()[1])
        except RedirectError as error:
            listener.close()
            code = errno.EPERM if NEEDS_NET_ADMIN in error.message else errno.EOPNOTSUPP
            raise _oserror(code, error.message) from None
        except BaseException:
            listener.close()
            raise
        subscription.listener = listener
        subscription.task = asyncio.create_task(self._accept_loop(subscription),
                                                name=f"steal-{subscription.port}")

    async def _accept_loop(self, subscription: Subscription) -> None:
        loop = asyncio.get_running_loop()
        assert subscription.listener is not None
        while True:
            # Full: the connections wait in the listener's backlog (TCP pushes back).
            await self._outgoing.stream_room()
            try:
                connection, peer = await loop.sock_accept(subscription.listener)
            except OSError as error:
                event(logger, logging.WARNING, "steal_accept_failed", errno=error.errno)
                await asyncio.sleep(0.05)
                continue
            connection.setblocking(False)
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local = original_destination(connection) or connection.getsockname()[:2]
            peer_address = (peer[0], peer[1])
            event(logger, logging.DEBUG, "steal_connection", port=subscription.port,
                  peer=f"{peer[0]}:{peer[1]}")
            http_filter = subscription.http_filter
            if http_filter is not None and http_filter.applies_to(subscription.port):
                self._spawn(FilteredConnection(self, subscription.port, connection, peer_address,
                                               (local[0], local[1]), http_filter).run())
            else:
                self._new_stream(connection, subscription.port, peer_address, (local[0], local[1]))

    # -- mirror --

    async def _mirror(self, subscription: Subscription) -> None:
        if self._capture is None:
            try:
                self._capture = MirrorCapture(self._on_mirrored, self._drop_mirror)
            except PermissionError:
                raise _oserror(errno.EPERM, f"cannot capture packets: {NEEDS_NET_ADMIN}") from None
        self._capture.set_ports(self._mirrored_ports() | {subscription.port})

    def _on_mirrored(self, port: int, peer: tuple[str, int], local: tuple[str, int]
                     ) -> tuple[socket.socket, int] | None:
        """A new mirrored connection: the capture's end of its socketpair and
        the stream's id (None: not mirrored, the client has no room)."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        stream_id = self._new_stream(theirs, port, peer, local, mirror=True)
        if stream_id is None:
            ours.close()
            return None
        # What the client writes back on a mirror is dropped; the socket closes
        # once the client's side is done with it.
        self._spawn(_drain_and_close(ours))
        return ours, stream_id


# -- filtered steal (HTTP/1.1) ---------------------------------------------------------------

class _Upstream:
    """One side requests can go to: the client's stream or the target's process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h11

        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HTTP_BUFFER)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class FilteredConnection:
    """A stolen connection whose requests are sorted by the HTTP filter."""

    def __init__(self, incoming: Incoming, port: int, sock: socket.socket,
                 peer: tuple[str, int], local: tuple[str, int], http_filter: CompiledFilter) -> None:
        self.incoming = incoming
        self.port = port
        self.sock = sock
        self.peer = peer
        self.local = local
        self.filter = http_filter
        self._client: _Upstream | None = None
        self._target: _Upstream | None = None

    async def run(self) -> None:
        import h11

        reader, writer = await asyncio.open_connection(sock=self.sock, limit=1 << 16)
        downstream = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_BUFFER)
        try:
            first = await reader.read(1 << 16)
            while first and len(first) < len(HTTP2_PREFACE) \
                    and HTTP2_PREFACE.startswith(first):
                more = await reader.read(1 << 16)
                if not more:
                    break
                first += more
            if first.startswith(HTTP2_PREFACE):
                await FilteredHttp2(self).run(first, reader, writer)
                return
            downstream.receive_data(first)
            while True:
                events = await self._read_request(downstream, reader)
                if events is None:
                    return
                request = events[0]
                assert isinstance(request, h11.Request)
                headers = [f"{name.decode('latin-1')}: {value.decode('latin-1')}"
                           for name, value in request.headers.raw_items()]
                matched = self.filter.matches(request.method.decode("latin-1"),
                                              request.target.decode("latin-1"), headers)
                upstream = await (self._to_client() if matched else self._to_target())
                event(logger, logging.DEBUG, "filtered_request", port=self.port,
                      to="client" if matched else "target", method=request.method.decode(),
                      target=request.target.decode("latin-1"))
                peer_settings = _h2c_upgrade_settings(request)
                if peer_settings is not None:
                    # Asked upstream with our own HTTP2-Settings: if it agrees
                    # (101), its connection and the peer's both become ours.
                    events = [_with_settings(request, _H2Side.upgrade_settings()), *events[1:]]
                if await self._exchange(upstream, events, downstream, writer):
                    assert peer_settings is not None
                    if upstream is self._client:
                        self._client = None
                    else:
                        self._target = None
                    await FilteredHttp2(self).run_upgraded(
                        "client" if matched else "target", upstream, peer_settings,
                        downstream.trailing_data[0], reader, writer)
                    return
                if downstream.our_state is h11.MUST_CLOSE or downstream.their_state is h11.MUST_CLOSE:
                    return
                if downstream.our_state is not h11.DONE:
                    return
                downstream.start_next_cycle()
        except (h11.ProtocolError, OSError, asyncio.IncompleteReadError) as error:
            event(logger, logging.DEBUG, "filtered_connection_ended", port=self.port,
                  error=str(error))
        finally:
            for side in (self._client, self._target):
                if side is not None:
                    side.close()
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, downstream: Any, reader: asyncio.StreamReader
                            ) -> list[Any] | None:
        """One whole request (head, body, end) from the peer; None at a clean end."""
        import h11

        events: list[Any] = []
        size = 0
        while True:
            found = downstream.next_event()
            if found is h11.NEED_DATA:
                data = await reader.read(1 << 16)
                if not data and not events:
                    return None
                downstream.receive_data(data)
                continue
            if isinstance(found, h11.ConnectionClosed):
                return None
            if isinstance(found, h11.Data):
                size += len(found.data)
                if size > MAX_HTTP_BUFFER:
                    raise _oserror(errno.EMSGSIZE, "request body too large to filter")
            events.append(found)
            if isinstance(found, h11.EndOfMessage):
                return events

    async def _exchange(self, upstream: _Upstream, events: list[Any], downstream: Any,
                        writer: asyncio.StreamWriter) -> bool:
        """Send the request upstream; relay its whole response back. True when
        the answer was ``101 Switching Protocols`` (both connections switched)."""
        import h11

        if upstream.http.our_state is h11.DONE and upstream.http.their_state is h11.DONE:
            upstream.http.start_next_cycle()
        for found in events:
            upstream.writer.write(upstream.http.send(found) or b"")
        await upstream.writer.drain()
        while True:
            found = upstream.http.next_event()
            if found is h11.NEED_DATA:
                data = await upstream.reader.read(1 << 16)
                upstream.http.receive_data(data)
                continue
            if isinstance(found, h11.ConnectionClosed):
                raise _oserror(errno.ECONNRESET, "the upstream closed mid-response")
            writer.write(downstream.send(found) or b"")
            await writer.drain()
            if isinstance(found, h11.InformationalResponse) and found.status_code == 101:
                return True
            if isinstance(found, h11.EndOfMessage):
                return False

    async def _to_client(self) -> _Upstream:
        if self._client is None:
            reader, writer = await self.client_socket()
            self._client = _Upstream(reader, writer)
        return self._client

    async def _connect_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = _unmapped(self.local[0])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
            redirector = self.incoming._redirector
            if redirector is not None and redirector.local_routing:
                _bind_as_peer(sock, family, _unmapped(self.peer[0]))
            sock.setblocking(False)
            await sock_connect(sock, (host, self.local[1]))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=1 << 16)

    async def _to_target(self) -> _Upstream:
        if self._target is None:
            reader, writer = await self._connect_target()
            self._target = _Upstream(reader, writer)
        return self._target

    async def client_socket(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to the client for this connection (HTTP/2: one, lazily)."""
        await self.incoming._outgoing.stream_room()
        ours, theirs = socket.socketpair()
        if self.incoming._new_stream(theirs, self.port, self.peer, self.local) is None:
            ours.close()
            raise _oserror(errno.EMFILE, "the client has too many streams")
        return await asyncio.open_connection(sock=ours, limit=1 << 16)


IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def _bind_as_peer(sock: socket.socket, family: int, peer_host: str) -> None:
    """Make ``sock``'s connection leave from the real client's address, so the
    target's process sees its real peer (the port is a new one: the client's
    own is taken by its connection to the agent). The target's answers come
    back through the redirect table's marks and local route. Left as it is
    (the agent's address) when the peer is of the other family or the bind
    is refused."""
    if (":" in peer_host) != (family == socket.AF_INET6):
        return
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((peer_host, 0))
    except OSError as error:
        event(logger, logging.DEBUG, "transparent_bind_failed", peer=peer_host, errno=error.errno)


def _h2c_upgrade_settings(request: Any) -> bytes | None:
    """The ``HTTP2-Settings`` of an HTTP/1.1 request asking to switch to h2c, else None."""
    upgrade = b""
    settings = None
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade += b"," + value.lower()
        elif name == b"http2-settings":
            settings = bytes(value)
    if settings is None or b"h2c" not in [token.strip() for token in upgrade.split(b",")]:
        return None
    return settings


def _with_settings(request: Any, settings: bytes) -> Any:
    import h11

    headers = [(name, settings if name.lower() == b"http2-settings" else value)
               for name, value in request.headers.raw_items()]
    return h11.Request(method=request.method, target=request.target, headers=headers,
                       http_version=request.http_version)


class _H2Side:
    """One HTTP/2 connection of a filtered steal (the peer's, the target's or the client's)."""

    def __init__(self, name: str, client_side: bool, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.name = name
        self.reader = reader
        self.writer = writer
        self.http = self.connection(client_side)
        # Data waiting for flow-control window: stream -> [bytes, end the stream after].
        self.pending: dict[int, list[Any]] = {}
        # Streams whose end was already sent (trailers end a stream themselves).
        self.ended: set[int] = set()

    @staticmethod
    def connection(client_side: bool) -> Any:
        import h2.config
        import h2.connection

        return h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False, validate_outbound_headers=False,
            normalize_outbound_headers=False))

    @classmethod
    def upgrade_settings(cls) -> bytes:
        """The HTTP2-Settings value our client side announces (its settings are fixed)."""
        return bytes(cls.connection(True).initiate_upgrade_connection())

    def flush(self) -> None:
        data = self.http.data_to_send()
        if data:
            self.writer.write(data)

    def send_data(self, stream_id: int, data: bytes) -> None:
        if not data:
            return
        entry = self.pending.setdefault(stream_id, [bytearray(), False])
        entry[0] += data
        self.push(stream_id)

    def finish(self, stream_id: int) -> None:
        """End the stream once its pending data is sent."""
        if stream_id in self.ended:
            return
        if stream_id in self.pending:
            self.pending[stream_id][1] = True
            self.push(stream_id)
            return
        self.ended.add(stream_id)
        with contextlib.suppress(Exception):
            self.http.end_stream(stream_id)

    def trailers(self, stream_id: int, headers: list[Any]) -> None:
        self.ended.add(stream_id)
        with contextlib.suppress(Exception):
            self.http.send_headers(stream_id, headers, end_stream=True)

    def push(self, stream_id: int) -> None:
        """Send what the windows allow of ``stream_id``'s pending data."""
        entry = self.pending.get(stream_id)
        if entry is None:
            return
        buffer, end = entry
        try:
            while buffer:
                window = min(self.http.local_flow_control_window(stream_id),
                             self.http.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = bytes(buffer[:window])
                del buffer[:window]
                last = end and not buffer
                self.http.send_data(stream_id, chunk, end_stream=last)
                if last:
                    self.ended.add(stream_id)
        except Exception:  # the stream was reset or closed meanwhile
            pass
        self.pending.pop(stream_id, None)


class FilteredHttp2:
    """An HTTP/2 connection whose requests (streams) are sorted by the filter.

    Each request stream of the peer's connection is opened again on the
    target's connection or on the client's, with the same headers; data,
    trailers, ends and resets follow it in order, and the answer comes back on
    the peer's stream. Flow control is each connection's own (h2): data waits
    for window before it is sent on.
    """

    def __init__(self, owner: FilteredConnection) -> None:
        self.owner = owner
        self.peer: _H2Side | None = None
        self.sides: dict[str, _H2Side] = {}
        # (side name, its stream) <-> the peer's stream.
        self.to_peer: dict[tuple[str, int], int] = {}
        self.from_peer: dict[int, tuple[str, int]] = {}
        # Events of peer streams whose other side is still being opened.
        self.waiting: dict[int, list[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, first: bytes, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
        self.peer = _H2Side("peer", False, reader, writer)
        self.peer.http.initiate_connection()
        self._handle(self.peer, first)
        try:
            await self._pump(self.peer)
        finally:
            for task in self._tasks:
                task.cancel()
            for side in self.sides.values():
                with contextlib.suppress(Exception):
                    side.writer.close()

    async def run_upgraded(self, name: str, upstream: _Upstream, peer_settings: bytes,
                           peer_rest: bytes, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """After a ``101`` to an ``Upgrade: h2c`` request: the request is stream 1
        of both the peer's connection and ``upstream``'s (whose answer it
        awaits); later streams are sorted as on any HTTP/2 connection."""
        self.peer = _H2Side("peer", False, reader, writer)
        self.peer.http.initiate_upgrade_connection(peer_settings)
        side = _H2Side(name, True, upstream.reader, upstream.writer)
        side.http.initiate_upgrade_connection()
        self.sides[name] = side
        self.from_peer[1] = (name, 1)
        self.to_peer[(name, 1)] = 1
        side_rest = upstream.http.trailing_data[0]
        if side_rest:
            self._handle(side, side_rest)
        self._tasks.append(asyncio.create_task(self._pump_side(side)))
        if peer_rest:
            self._handle(self.peer, peer_rest)
        self._flush_all()
        try:
            await self._pump(self.peer)
        finally:
            for task in self._tasks:
                task.cancel()
            for each in self.sides.values():
                with contextlib.suppress(Exception):
                    each.writer.close()

    async def _pump(self, side: _H2Side) -> None:
        while data := await side.reader.read(1 << 16):
            self._handle(side, data)
            for each in (self.peer, *self.sides.values()):
                if each is not None:
                    await each.writer.drain()

    async def _side(self, name: str) -> _H2Side:
        side = self.sides.get(name)
        if side is None:
            if name == "client":
                reader, writer = await self.owner.client_socket()
            else:
                reader, writer = await self.owner._connect_target()
            side = self.sides.get(name)  # another stream may have opened it meanwhile
            if side is not None:
                writer.close()
                return side
            side = _H2Side(name, True, reader, writer)
            side.http.initiate_connection()
            side.flush()
            self.sides[name] = side
            self._tasks.append(asyncio.create_task(self._pump_side(side)))
        return side

    async def _pump_side(self, side: _H2Side) -> None:
        with contextlib.suppress(OSError):
            await self._pump(side)

    def _handle(self, side: _H2Side, data: bytes) -> None:
        import h2.events

        assert self.peer is not None
        for found in side.http.receive_data(data):
            if side is self.peer:
                self._from_peer(found)
            else:
                self._from_side(side, found)
            if isinstance(found, h2.events.WindowUpdated) and found.stream_id:
                side.push(found.stream_id)
            elif isinstance(found, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for stream_id in list(side.pending):
                    side.push(stream_id)
        self._flush_all()

    def _flush_all(self) -> None:
        for each in (self.peer, *self.sides.values()):
            if each is not None:
                each.flush()

    def _from_peer(self, found: Any) -> None:
        import h2.events

        if isinstance(found, h2.events.RequestReceived):
            headers = [(bytes(name), bytes(value)) for name, value in found.headers]
            fields = {name: value.decode("latin-1") for name, value in headers}
            lines = [f"{name.decode('latin-1')}: {value.decode('latin-1')}"
                     for name, value in headers if not name.startswith(b":")]
            matched = self.owner.filter.matches(fields.get(b":method", ""),
                                                fields.get(b":path", ""), lines)
            event(logger, logging.DEBUG, "filtered_request", port=self.owner.port,
                  to="client" if matched else "target", method=fields.get(b":method", ""),
                  target=fields.get(b":path", ""), http=2)
            self.waiting[found.stream_id] = []
            self._tasks.append(asyncio.create_task(
                self._open("client" if matched else "target", found.stream_id, headers)))
            return
        stream_id = getattr(found, "stream_id", None)
        if stream_id in self.from_peer:
            self._forward(found)
        elif stream_id in self.waiting:
            self.waiting[stream_id].append(found)

    async def _open(self, name: str, peer_stream: int, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            side = await self._side(name)
        except OSError:
            assert self.peer is not None
            self.waiting.pop(peer_stream, None)
            with contextlib.suppress(Exception):
                self.peer.http.reset_stream(peer_stream, 0x7)  # REFUSED_STREAM
            self._flush_all()
            return
        stream_id = side.http.get_next_available_stream_id()
        self.from_peer[peer_stream] = (name, stream_id)
        self.to_peer[(name, stream_id)] = peer_stream
        side.http.send_headers(stream_id, headers)
        for found in self.waiting.pop(peer_stream, []):
            self._forward(found)
        self._flush_all()

    def _forward(self, found: Any) -> None:
        """An event of a peer stream, carried over to its other side."""
        import h2.events

        assert self.peer is not None
        name, stream_id = self.from_peer[found.stream_id]
        side = self.sides[name]
        if isinstance(found, h2.events.DataReceived):
            self.peer.http.acknowledge_received_data(found.flow_controlled_length, found.stream_id)
            side.send_data(stream_id, found.data)
        elif isinstance(found, h2.events.TrailersReceived):
            side.trailers(stream_id, list(found.headers))
        elif isinstance(found, h2.events.StreamEnded):
            side.finish(stream_id)
        elif isinstance(found, h2.events.StreamReset):
            with contextlib.suppress(Exception):
                side.http.reset_stream(stream_id, found.error_code)

    def _from_side(self, side: _H2Side, found: Any) -> None:
        import h2.events

        assert self.peer is not None
        stream_id = getattr(found, "stream_id", None)
        peer_stream = self.to_peer.get((side.name, stream_id)) if stream_id else None
        if peer_stream is None:
            return
        if isinstance(found, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            with contextlib.suppress(Exception):
                self.peer.http.send_headers(peer_stream, list(found.headers))
        elif isinstance(found, h2.events.DataReceived):
            side.http.acknowledge_received_data(found.flow_controlled_length, found.stream_id)
            self.peer.send_data(peer_stream, found.data)
        elif isinstance(found, h2.events.TrailersReceived):
            self.peer.trailers(peer_stream, list(found.headers))
        elif isinstance(found, h2.events.StreamEnded):
            self.peer.finish(peer_stream)
        elif isinstance(found, h2.events.StreamReset):
            with contextlib.suppress(Exception):
                self.peer.http.reset_stream(peer_stream, found.error_code)


# -- mirror: capture and reassembly -------------------------------------------------------------

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
_SKF_AD_PROTOCOL = (-0x1000 + 0) & 0xFFFFFFFF
_SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF
# Classic BPF opcodes.
_LD_H_ABS, _LD_B_ABS, _LDX_B_MSH, _LD_H_IND, _LD_B_IND = 0x28, 0x30, 0xB1, 0x48, 0x50
_JEQ_K, _JSET_K, _JGT_K, _RET_K = 0x15, 0x45, 0x25, 0x06
_AND_K, _RSH_K, _ADD_X, _SUB_X, _TAX = 0x54, 0x74, 0x0C, 0x1C, 0x07
_TCP_SYN_FIN_RST = 0x07

Instruction = tuple[int, int, int, int]


def _assemble(program: list[tuple[int, str | int, str | int, int] | str]) -> list[Instruction]:
    """Resolve label names (strings in the list) into classic BPF jump offsets."""
    labels: dict[str, int] = {}
    index = 0
    for item in program:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    out: list[Instruction] = []
    for item in program:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        here = len(out) + 1
        true = labels[jt] - here if isinstance(jt, str) else jt
        false = labels[jf] - here if isinstance(jf, str) else jf
        assert 0 <= true < 256 and 0 <= false < 256, "a BPF jump out of reach"
        out.append((code, true, false, k))
    return out


def bpf_for_ports(ports: set[int]) -> list[Instruction]:
    """TCP to one of ``ports`` over IPv4 (unfragmented) or IPv6 (no extension
    header), on a cooked (SOCK_DGRAM) packet socket: accept, else drop.

    Only what the reassembly needs wakes the agent: a segment with data, SYN,
    FIN or RST. Pure ACKs (half of a connection's packets) and the outgoing
    copy of each loopback packet (the incoming one follows) are dropped in the
    kernel; every packet the filter passes is a wake-up of the agent that
    competes with the target for a CPU.
    """
    ordered = sorted(ports)[:200]

    def port_tests(matched: str) -> list[tuple[int, str | int, str | int, int] | str]:
        # The destination port is in A; no port matches: drop.
        tests: list[tuple[int, str | int, str | int, int] | str] = [
            (_JEQ_K, matched, 0, port) for port in ordered]
        return [*tests, (_RET_K, 0, 0, 0)]

    # Jumps go forward only, by at most 255: each block has its own exits.
    return _assemble([
        (_LD_H_ABS, 0, 0, _SKF_AD_PKTTYPE), (_JEQ_K, "drop", 0, PACKET_OUTGOING),
        (_LD_H_ABS, 0, 0, _SKF_AD_PROTOCOL),
        (_JEQ_K, "v4", 0, ETH_P_IP), (_JEQ_K, "v6", "drop", ETH_P_IPV6),
        "drop",
        (_RET_K, 0, 0, 0),
        "v4",
        (_LD_B_ABS, 0, 0, 9), (_JEQ_K, 0, "v4 drop", socket.IPPROTO_TCP),
        (_LD_H_ABS, 0, 0, 6), (_JSET_K, "v4 drop", 0, 0x1FFF),
        (_LDX_B_MSH, 0, 0, 0), (_LD_H_IND, 0, 0, 2), *port_tests("v4 flags"),
        "v4 flags",
        (_LD_B_IND, 0, 0, 13), (_JSET_K, "v4 accept", 0, _TCP_SYN_FIN_RST),
        # payload = IP total length - IP header - TCP header
        (_LD_B_IND, 0, 0, 12), (_AND_K, 0, 0, 0xF0), (_RSH_K, 0, 0, 2), (_ADD_X, 0, 0, 0),
        (_TAX, 0, 0, 0), (_LD_H_ABS, 0, 0, 2), (_SUB_X, 0, 0, 0),
        (_JGT_K, "v4 accept", "v4 drop", 0),
        "v4 drop",
        (_RET_K, 0, 0, 0),
        "v4 accept",
        (_RET_K, 0, 0, 0x40000),
        "v6",
        (_LD_B_ABS, 0, 0, 6), (_JEQ_K, 0, "v6 drop", socket.IPPROTO_TCP),
        (_LD_H_ABS, 0, 0, 42), *port_tests("v6 flags"),
        "v6 flags",
        (_LD_B_ABS, 0, 0, 53), (_JSET_K, "v6 accept", 0, _TCP_SYN_FIN_RST),
        # payload = IPv6 payload length - TCP header
        (_LD_B_ABS, 0, 0, 52), (_AND_K, 0, 0, 0xF0), (_RSH_K, 0, 0, 2), (_TAX, 0, 0, 0),
        (_LD_H_ABS, 0, 0, 4), (_SUB_X, 0, 0, 0),
        (_JGT_K, "v6 accept", "v6 drop", 0),
        "v6 drop",
        (_RET_K, 0, 0, 0),
        "v6 accept",
        (_RET_K, 0, 0, 0x40000),
    ])


@dataclass
class _Flow:
    sock: socket.socket
    stream_id: int
    port: int
    peer: tuple[str, int]
    next_seq: int
    pending: dict[int, bytes] = field(default_factory=dict)
    pending_bytes: int = 0
    fin_seq: int | None = None
    outbox: bytearray = field(default_factory=bytearray)
    done: bool = False


_SEQ = 1 << 32


class MirrorCapture:
    """Packets to the mirrored ports, reassembled per connection (see the module docstring)."""

    def __init__(self, on_connection: Callable[[int, tuple[str, int], tuple[str, int]],
                                               tuple[socket.socket, int] | None],
                 on_dropped: Callable[[int, int, tuple[str, int], str], None]) -> None:
        self._on_connection = on_connection
        self._on_dropped = on_dropped
        #: Bytes held in every flow's outbox and out-of-order segments.
        self.held = 0
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.ports: set[int] = set()
        self._flows: dict[tuple[str, int, str, int], _Flow] = {}
        self._filter_buffer: Any = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def set_ports(self, ports: set[int]) -> None:
        import ctypes

        self.ports = set(ports)
        program = bpf_for_ports(self.ports) if self.ports else [(_RET_K, 0, 0, 0)]
        raw = b"".join(struct.pack("HBBI", code, jt, jf, k) for code, jt, jf, k in program)
        self._filter_buffer = ctypes.create_string_buffer(raw)
        fprog = struct.pack("HL", len(program), ctypes.addressof(self._filter_buffer))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for flow in self._flows.values():
            self._end(flow)
        self._flows.clear()

    def _readable(self) -> None:
        for _ in range(256):
            try:
                packet, address = self.sock.recvfrom(1 << 18)
            except BlockingIOError:
                return
            except OSError:
                return
            if address[2] == PACKET_OUTGOING:
                continue  # on lo each packet shows twice; the incoming copy is enough
            with contextlib.suppress(ValueError, IndexError, struct.error):
                self._packet(address[1], packet)

    def _packet(self, protocol: int, packet: bytes) -> None:
        if protocol == ETH_P_IP:
            header_length = (packet[0] & 0xF) * 4
            total = struct.unpack_from("!H", packet, 2)[0]
            source = str(ipaddress.IPv4Address(packet[12:16]))
            destination = str(ipaddress.IPv4Address(packet[16:20]))
            segment = packet[header_length:total]
        elif protocol == ETH_P_IPV6:
            payload_length = struct.unpack_from("!H", packet, 4)[0]
            source = str(ipaddress.IPv6Address(packet[8:24]))
            destination = str(ipaddress.IPv6Address(packet[24:40]))
            segment = packet[40:40 + payload_length]
        else:
            return
        source_port, destination_port, seq = struct.unpack_from("!HHI", segment, 0)
        if destination_port not in self.ports:
            return
        offset = (segment[12] >> 4) * 4
        flags = segment[13]
        data = segment[offset:]
        key = (source, source_port, destination, destination_port)
        flow = self._flows.get(key)
        syn, fin, rst, ack = flags & 0x02, flags & 0x01, flags & 0x04, flags & 0x10
        if syn and not ack:
            if flow is not None:
                if flow.next_seq == (seq + 1) % _SEQ:
                    return  # a retransmitted SYN
                self._end(flow)
            mirrored = self._on_connection(destination_port, (source, source_port),
                                           (destination, destination_port))
            if mirrored is not None:
                sock, stream_id = mirrored
                self._flows[key] = _Flow(sock, stream_id, destination_port,
                                         (source, source_port), (seq + 1) % _SEQ)
            return
        if flow is None:
            return  # began before the subscription: its start is unknown
        if rst or (fin and flow.done):
            self._end(flow)
            del self._flows[key]
            return
        if data:
            self._segment(flow, seq, data)
        if fin:
            flow.fin_seq = (seq + len(data)) % _SEQ
        if flow.fin_seq is not None and flow.next_seq == flow.fin_seq:
            self._end(flow)
            del self._flows[key]

    def _segment(self, flow: _Flow, seq: int, data: bytes) -> None:
        if flow.done:
            return  # dropped: forgotten at its FIN or RST
        behind = (flow.next_seq - seq) % _SEQ
        if behind and behind < (1 << 31):  # starts before what we have: trim
            if behind >= len(data):
                return
            data, seq = data[behind:], flow.next_seq
        if seq != flow.next_seq:
            if seq not in flow.pending:
                flow.pending[seq] = data
                flow.pending_bytes += len(data)
                self.held += len(data)
                if flow.pending_bytes > MAX_REORDER:
                    self._drop(flow, "too many out-of-order bytes (a segment was missed)")
                elif self.held > MAX_MIRROR_HELD:
                    self._drop(flow, "the mirror's buffers are full")
            return
        self._deliver(flow, data)
        while flow.next_seq in flow.pending:
            following = flow.pending.pop(flow.next_seq)
            flow.pending_bytes -= len(following)
            self.held -= len(following)
            self._deliver(flow, following)

    def _deliver(self, flow: _Flow, data: bytes) -> None:
        flow.next_seq = (flow.next_seq + len(data)) % _SEQ
        if flow.done:
            return
        flow.outbox += data
        self.held += len(data)
        self._flush(flow)

    def _flush(self, flow: _Flow) -> None:
        while flow.outbox:
            try:
                sent = flow.sock.send(flow.outbox)
            except BlockingIOError:
                # The stream's window is spent and the socketpair full: a little
                # backlog (the client's credit may be on its way), never more.
                if len(flow.outbox) > MIRROR_BACKLOG:
                    self._drop(flow, "the program did not read it in time")
                elif self.held > MAX_MIRROR_HELD:
                    self._drop(flow, "the mirror's buffers are full")
                else:
                    self._loop.add_writer(flow.sock.fileno(), self._writable, flow)
                return
            except OSError:  # the stream is gone (the client closed it)
                self._drop(flow, None)
                return
            del flow.outbox[:sent]
            self.held -= sent

    def _drop(self, flow: _Flow, reason: str | None) -> None:
        """Stop copying ``flow`` and free what it holds; ``reason``: tell the client."""
        if flow.done:
            return
        flow.done = True
        self.held -= len(flow.outbox) + flow.pending_bytes
        flow.outbox = bytearray()
        flow.pending.clear()
        flow.pending_bytes = 0
        with contextlib.suppress(Exception):
            self._loop.remove_writer(flow.sock.fileno())
        if reason is not None:
            self._on_dropped(flow.stream_id, flow.port, flow.peer, reason)

    def _writable(self, flow: _Flow) -> None:
        self._loop.remove_writer(flow.sock.fileno())
        self._flush(flow)
        if not flow.outbox and flow.fin_seq is not None and flow.next_seq == flow.fin_seq:
            self._close_flow(flow)

    def _end(self, flow: _Flow) -> None:
        """The connection is over (or forgotten): what is still out of order never comes."""
        self.held -= flow.pending_bytes
        flow.pending.clear()
        flow.pending_bytes = 0
        if flow.outbox:
            flow.fin_seq = flow.next_seq
            return  # closed once flushed (_writable)
        self._close_flow(flow)

    def _close_flow(self, flow: _Flow) -> None:
        with contextlib.suppress(OSError):
            flow.sock.shutdown(socket.SHUT_WR)


async def _drain_and_close(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(sock, 1 << 16):
            pass
    except OSError:
        pass
    finally:
        sock.close()
