"""Relays between a tracee socket and the agent, with fake agent streams and
sockets (no privileges, no agent)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import dns.message
import pytest

from mtrace.agent.errors import AgentUnavailable, RemoteError
from mtrace.tracer.features.dns import DnsSetup, NameRules
from mtrace.tracer.features.policy import DnsConfig, DnsFilter
from mtrace.tracer.features.relay import Endpoint, UdpRelay, connect_to_relay, relay_tcp

pytestmark = pytest.mark.timeout(30)

CHUNK = 4096


class FakeStream:
    """A remote stream: ``incoming`` feeds reads (bytes, b"" for EOF, or an
    exception); writes land in ``written``; ``drain`` waits on ``credit``."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self.written = bytearray()
        self.credit = asyncio.Event()
        self.credit.set()
        self.shut_down = False
        self.closed = False
        self.aborted = False

    async def read(self, n: int = -1) -> bytes:
        item = await self.incoming.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        await self.credit.wait()

    def shutdown_write(self) -> None:
        self.shut_down = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(relay end, tracee end) of a real loopback TCP connection (RST needs TCP)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        tracee = socket.create_connection(listener.getsockname())
        relay_end, _ = listener.accept()
    relay_end.setblocking(False)
    tracee.setblocking(False)
    return relay_end, tracee


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 20))


async def receive_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        data += chunk
    return bytes(data)


# --- TCP --------------------------------------------------------------------------------


def test_bytes_flow_both_ways_and_half_closes_propagate() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        relay_end, tracee = tcp_pair()
        stream = FakeStream()
        task = asyncio.create_task(relay_tcp(relay_end, stream, chunk=CHUNK))
        await loop.sock_sendall(tracee, b"request" * 1000)
        tracee.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if stream.shut_down:
                break
            await asyncio.sleep(0.01)
        assert bytes(stream.written) == b"request" * 1000
        assert stream.shut_down  # the tracee's half-close reached the target
        stream.incoming.put_nowait(b"reply-1 ")
        stream.incoming.put_nowait(b"reply-2")
        stream.incoming.put_nowait(b"")
        assert await receive_all(loop, tracee) == b"reply-1 reply-2"
        await task
        assert stream.closed
        tracee.close()

    run(body)


def test_tracee_to_target_is_bounded_by_credit() -> None:
    async def body() -> None:
        relay_end, tracee = tcp_pair()
        stream = FakeStream()
        stream.credit.clear()  # the target grants nothing
        task = asyncio.create_task(relay_tcp(relay_end, stream, chunk=CHUNK))
        sent = 0
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):
                sent += tracee.send(b"x" * 65536)
                await asyncio.sleep(0)
        # The relay took one chunk and waits: the rest stays in kernel buffers,
        # so the tracee's writes block, as with a slow peer.
        assert len(stream.written) <= CHUNK
        assert sent > CHUNK
        stream.credit.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        tracee.close()

    run(body)


def test_target_to_tracee_is_bounded_by_the_tracee_reading() -> None:
    async def body() -> None:
        relay_end, tracee = tcp_pair()
        stream = FakeStream()
        for _ in range(2000):
            stream.incoming.put_nowait(b"y" * CHUNK)  # 8 MB the tracee never reads
        task = asyncio.create_task(relay_tcp(relay_end, stream, chunk=CHUNK))
        await asyncio.sleep(0.5)
        taken = 2000 - stream.incoming.qsize()
        assert 0 < taken < 2000  # stopped reading the stream once the socket was full
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        tracee.close()

    run(body)


@pytest.mark.parametrize("failure", [RemoteError(errno.ECONNRESET, "reset by peer"),
                                     AgentUnavailable("agent died")],
                         ids=["remote-reset", "agent-lost"])
def test_remote_failure_resets_the_tracee(failure: BaseException) -> None:
    async def body() -> list[str]:
        loop = asyncio.get_running_loop()
        relay_end, tracee = tcp_pair()
        stream = FakeStream()
        lost: list[str] = []
        task = asyncio.create_task(relay_tcp(relay_end, stream, chunk=CHUNK,
                                             on_agent_lost=lambda: lost.append("lost")))
        stream.incoming.put_nowait(b"partial")
        assert await loop.sock_recv(tracee, 100) == b"partial"
        stream.incoming.put_nowait(failure)
        with pytest.raises(ConnectionResetError):
            await loop.sock_recv(tracee, 100)
        await task
        assert stream.closed
        tracee.close()
        return lost

    lost = run(body)
    assert lost == (["lost"] if isinstance(failure, AgentUnavailable) else [])


def test_tracee_reset_closes_the_stream() -> None:
    async def body() -> None:
        relay_end, tracee = tcp_pair()
        stream = FakeStream()
        task = asyncio.create_task(relay_tcp(relay_end, stream, chunk=CHUNK))
        tracee.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        tracee.close()
        await task
        assert stream.aborted and not stream.closed

    run(body)


@pytest.mark.parametrize("blocking", [True, False])
def test_connect_to_relay_accepts_only_the_tracee_socket(blocking: bool) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        tracee = socket.socket()
        tracee.setblocking(blocking)
        connection, result = await connect_to_relay(tracee.fileno(), socket.AF_INET)
        assert result in ((0,) if blocking else (0, errno.EINPROGRESS))
        assert connection.getpeername() == tracee.getsockname()
        tracee.setblocking(False)
        await loop.sock_sendall(connection, b"hello")
        assert await loop.sock_recv(tracee, 10) == b"hello"
        connection.close()
        tracee.close()

    run(body)


def test_connect_to_relay_ipv6() -> None:
    async def body() -> None:
        tracee = socket.socket(socket.AF_INET6)
        connection, result = await connect_to_relay(tracee.fileno(), socket.AF_INET6)
        assert result == 0
        assert connection.getpeername()[:2] == tracee.getsockname()[:2]
        connection.close()
        tracee.close()

    run(body)


# --- UDP ----------------------------------------------------------------------------------


class FakeAgentUdp:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.replies: asyncio.Queue[tuple[bytes, tuple[str, int]] | BaseException] = \
            asyncio.Queue()
        self.closed = False

    async def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        self.sent.append((data, address))
        return len(data)

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        item = await self.replies.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self.closed = True


def udp_relay(**kwargs: Any) -> tuple[UdpRelay, dict[int, FakeAgentUdp]]:
    opened: dict[int, FakeAgentUdp] = {}

    async def open_udp(family: int) -> FakeAgentUdp:
        opened[family] = FakeAgentUdp()
        return opened[family]

    return UdpRelay(socket.AF_INET, open_udp, **kwargs), opened


def tracee_udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


NAMESERVER = Endpoint(ipaddress.ip_address("10.0.0.53"), 53)


def test_unconnected_datagrams_and_replies_keep_their_peer() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        relay, opened = udp_relay()
        tracee = tracee_udp()
        relay.tracee_address = tracee.getsockname()
        other = Endpoint(ipaddress.ip_address("10.0.0.54"), 53)
        await relay.send(b"query-1", NAMESERVER)
        await relay.send(b"query-2", other)
        agent = opened[socket.AF_INET]
        assert agent.sent == [(b"query-1", ("10.0.0.53", 53)), (b"query-2", ("10.0.0.54", 53))]
        agent.replies.put_nowait((b"answer-2", ("10.0.0.54", 53)))
        agent.replies.put_nowait((b"answer-1", ("10.0.0.53", 53)))
        first, source_1 = await loop.sock_recvfrom(tracee, 100)
        second, source_2 = await loop.sock_recvfrom(tracee, 100)
        assert (first, relay.source_of(source_1)) == (b"answer-2", other)
        assert (second, relay.source_of(source_2)) == (b"answer-1", NAMESERVER)
        assert relay.source_of(("127.0.0.1", 1)) is None
        await relay.close()
        assert agent.closed
        tracee.close()

    run(body)


def test_connected_socket_sends_through_its_peer_socket_only_from_the_tracee() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        relay, opened = udp_relay()
        await relay.agent_socket(socket.AF_INET)
        tracee = tracee_udp()
        peer_socket = relay.peer_socket(NAMESERVER)
        tracee.connect(peer_socket.address)
        relay.tracee_address = tracee.getsockname()
        relay.connected_peer = NAMESERVER
        intruder = tracee_udp()
        intruder.sendto(b"not from the tracee", peer_socket.address)
        tracee.send(b"from the tracee")
        agent = opened[socket.AF_INET]
        for _ in range(100):
            if agent.sent:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert agent.sent == [(b"from the tracee", ("10.0.0.53", 53))]
        agent.replies.put_nowait((b"stranger", ("10.9.9.9", 53)))  # not the connected peer
        agent.replies.put_nowait((b"reply", ("10.0.0.53", 53)))
        assert await loop.sock_recv(tracee, 100) == b"reply"
        await relay.close()
        for sock in (tracee, intruder):
            sock.close()

    run(body)


def test_lost_agent_fails_the_relay() -> None:
    async def body() -> list[str]:
        lost: list[str] = []
        relay, opened = udp_relay(on_agent_lost=lambda: lost.append("lost"))
        await relay.send(b"x", NAMESERVER)
        opened[socket.AF_INET].replies.put_nowait(AgentUnavailable("gone"))
        await asyncio.wait_for(relay.failure.wait(), 5)
        with pytest.raises(OSError) as caught:
            await relay.send(b"y", NAMESERVER)
        assert caught.value.errno == errno.ENETUNREACH
        return lost

    assert run(body) == ["lost"]


def test_dns_filter_sends_local_names_to_the_local_resolver() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        resolver = tracee_udp()
        setup = DnsSetup(NameRules(DnsConfig(filter=DnsFilter(local=["*.here.test"]))),
                         [NAMESERVER.address], [resolver.getsockname()])
        relay, opened = udp_relay(dns=setup)
        tracee = tracee_udp()
        relay.tracee_address = tracee.getsockname()
        local_query = dns.message.make_query("box.here.test", "A").to_wire()
        remote_query = dns.message.make_query("api.there.test", "A").to_wire()
        await relay.send(local_query, NAMESERVER)
        await relay.send(remote_query, NAMESERVER)
        received, forwarder = await loop.sock_recvfrom(resolver, 512)
        assert received == local_query
        assert opened[socket.AF_INET].sent == [(remote_query, ("10.0.0.53", 53))]
        resolver.sendto(b"local answer", forwarder)
        answer, source = await loop.sock_recvfrom(tracee, 512)
        assert (answer, relay.source_of(source)) == (b"local answer", NAMESERVER)
        await relay.close()
        resolver.close()
        tracee.close()

    run(body)
