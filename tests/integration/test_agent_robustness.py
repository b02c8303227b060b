"""Bad peers, dying peers, slow peers: the agent answers clearly and keeps serving.

These use targetless agents (no namespace, no root needed); traffic stays on
this host's loopback.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_strategies import strategy_for

import mtrace.agent.protocol as p
from mtrace.agent.channel import TAG_SIZE, FrameOpener, FrameSealer, derive_keys
from mtrace.agent.client import (
    AgentClient,
    AgentUnavailable,
    RemoteError,
    agent_argv,
    connect_tcp,
    spawn_stdio,
)
from mtrace.agent.errors import AuthenticationError

pytestmark = pytest.mark.timeout(60)


class RawConnection:
    """A hand-driven client: exact bytes in, decoded frames out.

    After :meth:`handshake`, frames are sealed and opened as the agent's
    channel requires (``send``, ``send_body``, ``receive``); ``sock.sendall``
    still sends exact bytes.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.encoder = p.FrameEncoder()
        self.sealer: FrameSealer | None = None
        self.opener: FrameOpener | None = None

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def receive_body(self) -> bytes | None:
        """The next frame's body (opened), or None when the agent closed the connection."""
        prefix = self._exactly(4)
        if prefix is None:
            return None
        body = self._exactly(int.from_bytes(prefix, "big"))
        if body is None or self.opener is None:
            return body
        return self.opener.open(prefix, body)

    def receive(self) -> Any:
        """The next frame from the agent, or None when it closed the connection."""
        body = self.receive_body()
        return None if body is None else p.decode_from_agent(body)

    def send(self, message: msgspec.Struct) -> None:
        self.send_body(bytes(self.encoder.encode(message))[4:])

    def send_body(self, body: bytes) -> None:
        frame = bytearray(len(body).to_bytes(4, "big") + body)
        self.sock.sendall(frame if self.sealer is None else self.sealer.seal(frame))

    def handshake(
        self,
        secret: str,
        version: int = p.PROTOCOL_VERSION,
        channel: str = p.CHANNEL_CHACHA20_POLY1305,
    ) -> Any:
        hello_body = self.receive_body()
        assert hello_body is not None
        hello = p.decode_from_agent(hello_body)
        assert isinstance(hello, p.AgentHello)
        nonce = os.urandom(p.NONCE_SIZE)
        proof = p.client_proof(secret.encode(), hello.nonce, nonce)
        client_hello = bytes(
            self.encoder.encode(
                p.ClientHello(version=version, capabilities=[], nonce=nonce, proof=proof, channel=channel)
            )
        )
        self.sock.sendall(client_hello)
        reply = self.receive()
        if isinstance(reply, p.Welcome) and channel != p.CHANNEL_PLAIN:
            to_agent, from_agent = derive_keys(
                secret.encode(), hello.nonce, nonce, hello_body, client_hello[4:]
            )
            self.sealer, self.opener = FrameSealer(to_agent), FrameOpener(from_agent)
        return reply

    def drain_until_closed(self) -> list[Any]:
        frames = []
        while (frame := self.receive()) is not None:
            frames.append(frame)
        return frames


def ping_ok(host: str, port: int, secret: str) -> None:
    async def ping() -> None:
        client = await connect_tcp(host, port, secret)
        try:
            await client.ping(b"still alive")
        finally:
            await client.close()

    asyncio.run(ping())


@pytest.fixture(scope="module")
def shared_agent() -> Iterator[Any]:
    """One listening agent for a whole module of abuse (module scope: hypothesis)."""
    from conftest import _listening_agent

    with _listening_agent(secrets.token_hex(16)) as agent:
        yield agent


# --- handshake ----------------------------------------------------------------------


def test_a_wrong_secret_is_refused_and_logged(shared_agent: Any) -> None:
    async def attempt() -> None:
        await connect_tcp(shared_agent.host, shared_agent.port, "wrong-secret")

    with pytest.raises(AuthenticationError, match="wrong secret"):
        asyncio.run(attempt())
    ping_ok(shared_agent.host, shared_agent.port, shared_agent.secret)
    assert "event=handshake_failed" in shared_agent.log()


def test_a_wrong_protocol_version_is_refused(shared_agent: Any) -> None:
    connection = RawConnection(shared_agent.host, shared_agent.port)
    reply = connection.handshake(shared_agent.secret, version=0)
    assert isinstance(reply, p.Goodbye)
    assert reply.code == p.GOODBYE_VERSION
    assert connection.drain_until_closed() == []
    connection.close()


def test_the_client_refuses_an_agent_that_cannot_prove_the_secret() -> None:
    # A fake agent that does not know the secret: the client must not trust it.
    async def fake_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        encoder = p.FrameEncoder()
        hello = p.AgentHello(
            version=2,
            min_version=1,
            capabilities=[],
            nonce=b"n" * 32,
            channels=[p.CHANNEL_CHACHA20_POLY1305],
        )
        writer.write(encoder.encode(hello))
        await reader.readexactly(4)
        writer.write(encoder.encode(p.Welcome(version=1, proof=b"x" * 32)))
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server = await asyncio.start_server(fake_agent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(AuthenticationError, match="could not prove"):
            await connect_tcp("127.0.0.1", port, "secret")
        server.close()

    asyncio.run(main())


def test_garbage_before_the_handshake_is_dropped(shared_agent: Any) -> None:
    connection = RawConnection(shared_agent.host, shared_agent.port)
    assert isinstance(connection.receive(), p.AgentHello)
    connection.sock.sendall(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
    frames = connection.drain_until_closed()
    assert [type(frame) for frame in frames] == [p.Goodbye]
    assert frames[0].code == p.GOODBYE_PROTOCOL
    connection.close()
    ping_ok(shared_agent.host, shared_agent.port, shared_agent.secret)


# --- bad frames after the handshake ------------------------------------------------------


def test_an_oversized_frame_gets_a_clean_disconnect(shared_agent: Any) -> None:
    connection = RawConnection(shared_agent.host, shared_agent.port)
    assert isinstance(connection.handshake(shared_agent.secret), p.Welcome)
    connection.sock.sendall((p.MAX_FRAME_SIZE + TAG_SIZE + 1).to_bytes(4, "big") + b"x" * 100)
    frames = connection.drain_until_closed()
    assert len(frames) == 1 and frames[0].code == p.GOODBYE_PROTOCOL
    assert "exceeds the maximum" in frames[0].message
    connection.close()
    ping_ok(shared_agent.host, shared_agent.port, shared_agent.secret)


def test_a_truncated_frame_is_logged_and_harmless(shared_agent: Any) -> None:
    connection = RawConnection(shared_agent.host, shared_agent.port)
    assert isinstance(connection.handshake(shared_agent.secret), p.Welcome)
    connection.sock.sendall((100).to_bytes(4, "big") + b"only ten b")
    connection.sock.shutdown(socket.SHUT_WR)
    assert connection.drain_until_closed() == []
    connection.close()
    ping_ok(shared_agent.host, shared_agent.port, shared_agent.secret)
    deadline = time.monotonic() + 5
    while "event=truncated_frame" not in shared_agent.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "event=truncated_frame" in shared_agent.log()


def test_unknown_and_malformed_requests_get_error_replies(shared_agent: Any) -> None:
    connection = RawConnection(shared_agent.host, shared_agent.port)
    assert isinstance(connection.handshake(shared_agent.secret), p.Welcome)
    connection.send_body(msgspec.msgpack.encode(["req", 41, ["teleport", b"/mars"]]))
    connection.send_body(msgspec.msgpack.encode(["req", 42, ["stat", 12345]]))
    connection.send(p.Request(id=43, operation=p.Ping(data=b"after")))
    replies = {frame.id: frame.result for frame in (connection.receive() for _ in range(3))}
    assert replies[41].errno == errno.ENOSYS
    assert replies[42].errno == errno.EINVAL
    assert replies[43] == p.Pong(data=b"after")
    connection.close()


def test_paths_outside_the_root_and_closed_ports_are_errors_not_crashes(
    with_agent: Any, tmp_path: Any
) -> None:
    async def body(client: AgentClient) -> None:
        with pytest.raises(RemoteError) as caught:
            await client.open_tcp("127.0.0.1", 1, timeout=5)
        assert caught.value.errno == errno.ECONNREFUSED
        with pytest.raises(RemoteError) as caught:
            await client.read_file("/definitely/not/here")
        assert caught.value.errno == errno.ENOENT
        # targetless: the root is "/", so "/.." is "/" again
        assert (await client.stat("/../../..")).ino == os.stat("/").st_ino
        await client.ping()

    with_agent(body)


# --- pipelining, teardown, death, shutdown ---------------------------------------------


def test_many_requests_in_flight_on_one_connection(with_agent: Any, tmp_path: Any) -> None:
    for index in range(50):
        (tmp_path / f"file{index}").write_bytes(b"x" * index)

    async def body(client: AgentClient) -> None:
        stats = [client.stat(tmp_path / f"file{index % 50}") for index in range(1500)]
        pings = [client.ping(str(index).encode()) for index in range(500)]
        results = await asyncio.gather(*stats, *pings)
        assert [result.size for result in results[:1500]] == [index % 50 for index in range(1500)]

    with_agent(body)


def _agent_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class CountingServer:
    """A loopback TCP server that records when each connection sees EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            while connection.recv(65536):
                pass
        with self._lock:
            self.closed += 1

    def close(self) -> None:
        self.listener.close()


def test_everything_a_client_opened_is_torn_down_when_it_disconnects(
    listening_agent: Any, tmp_path: Any
) -> None:
    (tmp_path / "f").write_bytes(b"data")
    server = CountingServer()
    with listening_agent() as agent:
        ping_ok(agent.host, agent.port, agent.secret)
        baseline = _agent_fds(agent.process.pid)

        async def open_things() -> None:
            client = await connect_tcp(agent.host, agent.port, agent.secret)
            for _ in range(5):
                await client.open(tmp_path / "f")
            streams = [await client.open_tcp("127.0.0.1", server.port) for _ in range(3)]
            for _ in range(2):
                await client.open_udp()
            assert _agent_fds(agent.process.pid) >= baseline + 5 + 3 + 2
            assert server.closed == 0 and streams
            client._writer.transport.abort()  # vanish without a goodbye

        asyncio.run(open_things())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (_agent_fds(agent.process.pid) > baseline or server.closed < 3):
            time.sleep(0.05)
        assert _agent_fds(agent.process.pid) <= baseline
        assert server.closed == 3
    server.close()


def test_a_dead_agent_fails_pending_and_later_calls_promptly(agent_secret: str, tmp_path: Any) -> None:
    os.mkfifo(tmp_path / "fifo")

    async def main() -> None:
        client = await spawn_stdio(agent_argv(), agent_secret)
        server = CountingServer()
        stream = await client.open_tcp("127.0.0.1", server.port)
        # Opening a FIFO for reading blocks until a writer comes: a call that hangs.
        pending = asyncio.create_task(client.open(tmp_path / "fifo"))
        reading = asyncio.create_task(stream.read())
        await asyncio.sleep(0.2)
        assert not pending.done()
        assert client.process is not None
        client.process.kill()
        started = time.monotonic()
        for task in (pending, reading):
            with pytest.raises(AgentUnavailable):
                await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 2
        with pytest.raises(AgentUnavailable):
            await client.ping()
        await client.close()
        server.close()

    asyncio.run(main())


def test_sigterm_says_goodbye_to_clients_and_exits_cleanly(listening_agent: Any) -> None:
    with listening_agent() as agent:

        async def main() -> None:
            client = await connect_tcp(agent.host, agent.port, agent.secret)
            await client.ping()
            agent.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            with pytest.raises(AgentUnavailable, match="shutting down"):
                while time.monotonic() < deadline:
                    await client.ping()
                    await asyncio.sleep(0.02)
            await client.close()

        asyncio.run(main())
        assert agent.process.wait(timeout=5) == 0
        assert "event=agent_stopped" in agent.log()


def test_a_targetless_agent_reports_its_environment_without_the_secret(with_agent: Any) -> None:
    environment = with_agent(lambda client: client.environ())
    assert "MTRACE_AGENT_SECRET" not in environment
    assert environment.get("PATH") == os.environ.get("PATH")


def test_a_stdio_agent_exits_when_its_client_leaves(agent_secret: str) -> None:
    async def main() -> int | None:
        client = await spawn_stdio(agent_argv(), agent_secret)
        await client.ping()
        await client.close()
        assert client.process is not None
        return client.process.returncode

    assert asyncio.run(main()) == 0


# --- flow control ---------------------------------------------------------------------


BULK = 96 * 1024 * 1024
BUFFER_BOUND = 32 * 1024 * 1024  # window + socket buffers, far below BULK


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_a_client_that_does_not_read_stalls_the_sender_not_the_agent(
    with_agent: Any,
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    sent = 0
    chunk = b"z" * (1 << 20)

    def blast() -> None:
        nonlocal sent
        connection, _ = listener.accept()
        with connection:
            for _ in range(BULK // len(chunk)):
                connection.sendall(chunk)
                sent += len(chunk)

    thread = threading.Thread(target=blast, daemon=True)
    thread.start()

    async def body(client: AgentClient) -> None:
        assert client.process is not None
        rss_before = _rss(client.process.pid)
        stream = await client.open_tcp("127.0.0.1", listener.getsockname()[1])
        await asyncio.sleep(1.0)  # not reading
        assert sent < BUFFER_BOUND, f"the sender got {sent} bytes out with nobody reading"
        assert _rss(client.process.pid) - rss_before < BUFFER_BOUND
        received = 0
        while received < BULK:
            data = await stream.read()
            assert data, "stream ended early"
            received += len(data)
        assert received == BULK
        stream.close()

    with_agent(body)
    thread.join(5)
    listener.close()


def test_a_target_that_does_not_read_stalls_the_client_writer(with_agent: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()

    async def body(client: AgentClient) -> None:
        assert client.process is not None
        rss_before = _rss(client.process.pid)
        stream = await client.open_tcp("127.0.0.1", listener.getsockname()[1])
        stream.write(b"y" * BULK)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.drain(), 1.0)
        left_the_client = BULK - stream.write_buffer_size
        assert 0 < left_the_client < BUFFER_BOUND
        assert _rss(client.process.pid) - rss_before < BUFFER_BOUND
        await client.ping()  # the connection itself is not blocked
        stream.close()

    with_agent(body)
    for connection in accepted:
        connection.close()
    listener.close()


def test_data_beyond_the_granted_window_resets_the_stream(shared_agent: Any) -> None:
    # The target does not read, so the agent cannot pass data on; a client that
    # keeps sending without credit overflows the window and loses the stream.
    listener = socket.create_server(("127.0.0.1", 0))
    connection = RawConnection(shared_agent.host, shared_agent.port)
    assert isinstance(connection.handshake(shared_agent.secret), p.Welcome)
    connection.send(
        p.Request(
            id=1,
            operation=p.TcpConnect(stream=9, host="127.0.0.1", port=listener.getsockname()[1]),
        )
    )
    connected = connection.receive().result
    assert isinstance(connected, p.TcpConnected)
    # Far more than the window plus what loopback socket buffers can absorb,
    # whatever window the agent's pool granted (a small one when other tests'
    # streams hold the shared agent's pool).
    blob = b"q" * (256 * 1024)
    for _ in range((connected.window + (24 << 20)) // len(blob)):
        connection.send(p.StreamData(stream=9, data=blob))
    frame = connection.receive()
    while isinstance(frame, p.StreamCredit):
        frame = connection.receive()
    assert isinstance(frame, p.StreamReset)
    assert frame.errno == errno.EPROTO
    connection.send(p.Request(id=2, operation=p.Ping()))  # the connection itself lives on
    while not isinstance(frame, p.Response):
        frame = connection.receive()
    assert frame == p.Response(id=2, result=p.Pong())
    connection.close()
    listener.close()


class SinkServer:
    """Counts the bytes of one connection until EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.finished = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            while data := connection.recv(1 << 20):
                self.received += len(data)
        self.finished.set()
        self.listener.close()


def test_close_right_after_write_still_delivers_everything(with_agent: Any) -> None:
    # Regression: StreamClose used to drop data the agent had queued but not written.
    sink = SinkServer()
    size = 24 * 1024 * 1024

    async def body(client: AgentClient) -> None:
        stream = await client.open_tcp("127.0.0.1", sink.port)
        stream.write(b"d" * size)
        stream.close()  # no drain
        await asyncio.to_thread(sink.finished.wait, 20)

    with_agent(body)
    assert sink.finished.is_set()
    assert sink.received == size


def test_abort_drops_unsent_data_and_closes_promptly(with_agent: Any) -> None:
    sink = SinkServer()
    size = 256 * 1024 * 1024

    async def body(client: AgentClient) -> None:
        stream = await client.open_tcp("127.0.0.1", sink.port)
        stream.write(b"d" * size)
        stream.abort()
        assert stream.write_buffer_size == 0
        await asyncio.to_thread(sink.finished.wait, 10)
        await client.ping()

    with_agent(body)
    assert sink.finished.is_set()
    assert sink.received < size


# --- fuzzing the agent's dispatch ----------------------------------------------------------


# Keep generated network operations on loopback and out of the host's DNS.
_LOOPBACK = st.sampled_from(["127.0.0.1", "::1"])
_FUZZ_OVERRIDES = {
    p.TcpConnect: st.builds(
        p.TcpConnect,
        stream=st.integers(0, 50),
        host=_LOOPBACK,
        port=st.integers(1, 65535),
        timeout=st.floats(0, 0.5),
        window=st.integers(-10, 1 << 20),
    ),
    p.UdpSend: st.builds(
        p.UdpSend,
        socket=st.integers(0, 50),
        host=_LOOPBACK,
        port=st.integers(1, 65535),
        data=st.binary(max_size=64),
    ),
    p.UdpOpen: st.builds(
        p.UdpOpen,
        socket=st.integers(0, 50),
        family=st.sampled_from([2, 10, 0, 99]),
        bind_host=st.sampled_from([None, "127.0.0.1", "::1"]),
        bind_port=st.just(0),
    ),
    p.Resolve: st.builds(
        p.Resolve,
        name=st.sampled_from(["localhost", "127.0.0.1", "::1", ""]),
        family=st.sampled_from([0, 2, 10, 1234]),
    ),
}
_fuzz_messages = strategy_for(p.ToAgent, _FUZZ_OVERRIDES)


def _mutate(body: bytes, data: st.DataObject) -> bytes:
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        if not mutated:
            break
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    return bytes(mutated)


@given(
    frames=st.lists(
        st.one_of(
            _fuzz_messages.map(lambda message: ("message", message)),
            _fuzz_messages.map(lambda message: ("mutate", message)),
            st.binary(max_size=64).map(lambda body: ("bytes", body)),
        ),
        min_size=1,
        max_size=8,
    ),
    data=st.data(),
)
@settings(
    max_examples=int(os.environ.get("MTRACE_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_fuzzed_frames_never_break_the_agent_for_others(
    shared_agent: Any, frames: list[tuple[str, Any]], data: st.DataObject
) -> None:
    encoder = p.FrameEncoder()
    # Everything drawn up front: what hypothesis generates must not depend on
    # when the agent hangs up.
    bodies = []
    for kind, payload in frames:
        if kind == "bytes":
            bodies.append(payload)
            continue
        body = bytes(encoder.encode(payload))[4:]
        bodies.append(_mutate(body, data) if kind == "mutate" else body)
    connection = RawConnection(shared_agent.host, shared_agent.port, timeout=10)
    try:
        assert isinstance(connection.handshake(shared_agent.secret), p.Welcome)
        for body in bodies:
            connection.send_body(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the agent hung up on us: allowed
    finally:
        connection.close()
    assert shared_agent.process.poll() is None
    ping_ok(shared_agent.host, shared_agent.port, shared_agent.secret)
    assert "level=error" not in shared_agent.new_log(), "a fuzzed frame hit a bug in the agent"


@given(st.binary(min_size=1, max_size=200))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_before_the_handshake_never_break_the_agent(shared_agent: Any, garbage: bytes) -> None:
    connection = RawConnection(shared_agent.host, shared_agent.port)
    try:
        connection.sock.sendall(garbage)
        connection.sock.shutdown(socket.SHUT_WR)
        frames = connection.drain_until_closed()
        assert not any(isinstance(frame, p.Welcome) for frame in frames)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        connection.close()
    assert shared_agent.process.poll() is None
    ping_ok(shared_agent.host, shared_agent.port, shared_agent.secret)


def test_a_reply_larger_than_a_frame_is_an_error_not_silence(with_agent: Any) -> None:
    """A directory whose listing does not fit one frame (8 MiB) used to get no
    answer at all: the caller waited until its own timeout."""
    import shutil
    import tempfile

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = tempfile.mkdtemp(prefix="mtrace-bigdir-", dir=shm)
    try:
        first = os.path.join(directory, "f" * 250)
        open(first, "wb").close()
        for index in range(36_000):  # 36,000 names of 250 bytes: about 9.5 MB of entries
            os.link(first, os.path.join(directory, f"{index:06d}" + "n" * 244))

        async def body(client: AgentClient) -> None:
            with pytest.raises(RemoteError) as caught:
                await asyncio.wait_for(client.readdir(directory), timeout=30)
            assert caught.value.errno == errno.EOVERFLOW
            await client.ping()  # the session carries on

        with_agent(body)
    finally:
        shutil.rmtree(directory)
