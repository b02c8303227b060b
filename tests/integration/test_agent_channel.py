"""Issue 14 part B: the agent channel's security and the agent's bounded resources.

Targetless agents on this host's loopback (no namespace, no root needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mtrace_run import MTRACE, run_mtrace
from test_agent_robustness import RawConnection, ping_ok

import mtrace.agent.protocol as p
from mtrace.agent.client import AgentClient, AgentUnavailable, agent_argv, connect_tcp, spawn_stdio
from mtrace.agent.errors import AuthenticationError, ProtocolError

pytestmark = pytest.mark.timeout(60)


# --- frames that never end, frames that nest forever -----------------------------------


@pytest.mark.parametrize("sent", [b"\x00\x00", (100).to_bytes(4, "big") + b"only ten b"])
def test_a_half_sent_frame_after_authentication_is_dropped_after_the_frame_timeout(
    listening_agent: Any, sent: bytes
) -> None:
    with listening_agent(extra_args=["--frame-timeout", "1"]) as agent:
        connection = RawConnection(agent.host, agent.port, timeout=20)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        connection.sock.sendall(sent)  # and nothing more, but the socket stays open
        frames = connection.drain_until_closed()
        assert [type(frame) for frame in frames] == [p.Goodbye]
        assert frames[0].code == p.GOODBYE_PROTOCOL
        assert "not finished within 1s" in frames[0].message
        connection.close()
        ping_ok(agent.host, agent.port, agent.secret)


def test_an_idle_client_is_not_dropped_by_the_frame_timeout(listening_agent: Any) -> None:
    with listening_agent(extra_args=["--frame-timeout", "0.5"]) as agent:
        connection = RawConnection(agent.host, agent.port, timeout=20)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        connection.sock.settimeout(2)
        with pytest.raises(TimeoutError):
            connection.receive()  # two seconds of silence both ways
        connection.sock.settimeout(20)
        connection.send(p.Request(id=1, operation=p.Ping(data=b"still here")))
        assert connection.receive() == p.Response(id=1, result=p.Pong(data=b"still here"))
        connection.close()


# --- a client that waits for the rest of a frame -------------------------------------------


@contextlib.contextmanager
def _relay_thread(agent_port: int, rewrite: Rewrite) -> Iterator[int]:
    """A :class:`FrameRelay` on a loop of its own (for a client in another process)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    relay = FrameRelay(agent_port, rewrite)
    try:
        yield asyncio.run_coroutine_threadsafe(relay.start(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(relay.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _half_frames_after(cut: threading.Event, first_index: int = 0) -> Rewrite:
    """From-agent frames pass until ``cut`` is set; the next one is cut in half
    and nothing follows it (the connection stays open)."""
    state = {"cut": False}

    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction != "from-agent" or index < first_index or not cut.is_set():
            return [frame]
        if state["cut"]:
            return []
        state["cut"] = True
        return [frame[: len(frame) // 2]]

    return rewrite


def _frame_timeout_config(tmp_path: Path) -> str:
    config = tmp_path / "mtrace.toml"
    config.write_text("[agent]\nframe_timeout = 1.0\n")
    return str(config)


def test_mtrace_gives_up_on_a_frame_the_agent_starts_and_never_finishes(
    listening_agent: Any, tmp_path: Path
) -> None:
    """It waited for the rest forever (at start-up, until the ping's own 10 s)."""
    cut = threading.Event()
    cut.set()
    marker = tmp_path / "started"
    # Frames 0 and 1 are the hello and the welcome: the cut one answers the first request.
    with listening_agent() as agent, _relay_thread(agent.port, _half_frames_after(cut, 2)) as port:
        result = run_mtrace("exec", "-f", _frame_timeout_config(tmp_path), "--agent",
                            f"127.0.0.1:{port}", "--", "touch", str(marker), timeout=30,
                            env={**os.environ, "MTRACE_AGENT_SECRET": agent.secret})
    assert result.returncode == 71, result.stderr
    lines = result.stderr.decode().splitlines()
    # (not "the agent did not answer a ping within 10 s": the old client waited for that)
    assert lines[0].startswith("mtrace: error: ") and "did not finish it within 1s" in lines[0], lines
    assert lines[1].startswith("mtrace: hint: "), lines
    assert not marker.exists()


HALF_FRAME_MID_RUN = r"""
import errno, socket, sys
def outcome(function):
    try:
        return repr(function())
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error))
print("first", outcome(lambda: len(open("/etc/hostname", "rb").read()) > 0), flush=True)
sys.stdin.readline()
print("read", outcome(lambda: open("/etc/passwd", "rb").read(1)))
# (not create_connection: its getaddrinfo would import the idna codec now, and
# the imports of a script run from a target directory fail too)
print("connect", outcome(lambda: socket.socket().connect(("127.0.0.1", int(sys.argv[1])))))
"""


def test_a_frame_left_half_sent_mid_run_fails_the_programs_calls_and_exits_71(
    listening_agent: Any, tmp_path: Path
) -> None:
    cut = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server, listening_agent() as agent, \
            _relay_thread(agent.port, _half_frames_after(cut)) as port:
        process = subprocess.Popen(
            [*MTRACE, "exec", "-f", _frame_timeout_config(tmp_path), "--agent",
             f"127.0.0.1:{port}", "--",
             sys.executable, "-S", "-c", HALF_FRAME_MID_RUN, str(server.getsockname()[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "MTRACE_AGENT_SECRET": agent.secret})
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == b"first True\n"
            cut.set()
            # (the old client waited for each remote call's own 60 s)
            stdout, stderr = process.communicate(b"go\n", timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert stdout.decode().splitlines() == ["read EIO", "connect ENETUNREACH"], stderr
    errors = [line for line in stderr.decode().splitlines() if line.startswith("mtrace: error: ")]
    assert len(errors) == 1 and "did not finish it within 1s" in errors[0], stderr
    assert process.returncode == 71  # the program succeeded, but not in the target's context


def test_a_deeply_nested_request_is_a_protocol_error_not_an_internal_error(
    listening_agent: Any,
) -> None:
    with listening_agent() as agent:
        connection = RawConnection(agent.host, agent.port, timeout=20)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        # ["req", 1, [[[[...100k deep...]]]]]
        nested = b"\x93" + msgspec.msgpack.encode("req") + msgspec.msgpack.encode(1)
        nested += b"\x91" * 100_000 + b"\xc0"
        connection.send_body(nested)
        frames = connection.drain_until_closed()
        assert [type(frame) for frame in frames] == [p.Goodbye]
        assert frames[0].code == p.GOODBYE_PROTOCOL
        assert "internal error" not in frames[0].message
        connection.close()
        ping_ok(agent.host, agent.port, agent.secret)
        assert "level=error" not in agent.log()


# --- the encrypted channel ----------------------------------------------------------------

Rewrite = Callable[[str, int, bytes], list[bytes]]


class FrameRelay:
    """A man in the middle on loopback: passes whole frames between a client and
    an agent, and lets a test rewrite, drop, duplicate or inject them.

    ``rewrite(direction, index, frame)`` gets each frame (prefix included;
    ``direction`` is "to-agent" or "from-agent", ``index`` counts from 0 per
    direction) and returns the frames to pass on instead. ``seen`` keeps every
    byte the relay saw from the agent.
    """

    def __init__(self, agent_port: int, rewrite: Rewrite | None = None) -> None:
        self.agent_port = agent_port
        self.rewrite = rewrite or (lambda direction, index, frame: [frame])
        self.seen = {"to-agent": bytearray(), "from-agent": bytearray()}
        self.to_agent: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        agent_reader, agent_writer = await asyncio.open_connection("127.0.0.1", self.agent_port)
        self.to_agent = agent_writer
        await asyncio.gather(
            self._pump("to-agent", client_reader, agent_writer),
            self._pump("from-agent", agent_reader, client_writer),
            return_exceptions=True,
        )
        client_writer.close()
        agent_writer.close()

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        try:
            while True:
                prefix = await reader.readexactly(4)
                frame = prefix + await reader.readexactly(int.from_bytes(prefix, "big"))
                self.seen[direction] += frame
                for out in self.rewrite(direction, index, frame):
                    writer.write(out)
                index += 1
                await writer.drain()
        finally:
            writer.close()


def _through_relay(
    agent: Any, rewrite: Rewrite | None, body: Callable[[AgentClient], Awaitable[None]]
) -> FrameRelay:
    async def main() -> FrameRelay:
        relay = FrameRelay(agent.port, rewrite)
        port = await relay.start()
        try:
            client = await connect_tcp("127.0.0.1", port, agent.secret)
            try:
                await body(client)
            finally:
                await client.close()
        finally:
            relay.close()
        return relay

    return asyncio.run(main())


MARKER = "mtrace-env-marker-" + "7f3a9c"


@pytest.fixture
def marked_agent(listening_agent: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A listening agent whose own (targetless) environment holds MARKER."""
    monkeypatch.setenv("MTRACE_TEST_MARKER", MARKER)
    with listening_agent() as agent:
        yield agent


def test_a_relay_that_injects_a_request_after_the_handshake_reads_nothing_and_ends_the_session(
    marked_agent: Any,
) -> None:
    # The relay passes the real handshake through, then asks for the target's
    # environment on its own, as a plain frame and as a frame of random bytes
    # shaped like a sealed one.
    injected = bytes(p.FrameEncoder().encode(p.Request(id=999, operation=p.GetEnviron())))
    forged = (64).to_bytes(4, "big") + os.urandom(64)

    for injection in (injected, forged):

        def rewrite(direction: str, index: int, frame: bytes, injection: bytes = injection) -> list[bytes]:
            if direction == "to-agent" and index == 1:  # the client's first frame after the hello
                return [injection, frame]
            return [frame]

        async def body(client: AgentClient) -> None:
            assert client.channel == p.CHANNEL_CHACHA20_POLY1305
            with pytest.raises(AgentUnavailable, match="failed authentication"):
                await client.ping()

        relay = _through_relay(marked_agent, rewrite, body)
        assert MARKER.encode() not in relay.seen["from-agent"]
    assert "a frame failed authentication" in marked_agent.log()
    ping_ok(marked_agent.host, marked_agent.port, marked_agent.secret)


@pytest.mark.parametrize("attack", ["tamper", "replay", "drop", "reorder"])
def test_a_tampered_replayed_dropped_or_reordered_frame_ends_the_session(
    listening_agent: Any, attack: str
) -> None:
    held: list[bytes] = []

    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction != "to-agent" or index == 0:
            return [frame]
        if attack == "tamper" and index == 1:
            return [frame[:-1] + bytes([frame[-1] ^ 1])]
        if attack == "replay" and index == 2:
            return [frame, frame]
        if attack == "drop" and index == 1:
            return []
        if attack == "reorder" and index == 1:
            held.append(frame)
            return []
        if attack == "reorder" and index == 2:
            return [frame, *held]
        return [frame]

    async def body(client: AgentClient) -> None:
        pings = [asyncio.create_task(client.ping(str(index).encode())) for index in range(3)]
        done = await asyncio.gather(*pings, return_exceptions=True)
        assert any(isinstance(result, AgentUnavailable) for result in done), done
        with pytest.raises(AgentUnavailable):
            await client.ping()

    with listening_agent() as agent:
        _through_relay(agent, rewrite, body)
        deadline = time.monotonic() + 5
        while "a frame failed authentication" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "a frame failed authentication" in agent.log()


def test_a_tampered_frame_from_the_agent_ends_the_session_at_the_client(listening_agent: Any) -> None:
    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "from-agent" and index == 2:  # the first reply after the Welcome
            return [frame[:10] + bytes([frame[10] ^ 0x80]) + frame[11:]]
        return [frame]

    async def body(client: AgentClient) -> None:
        with pytest.raises(ProtocolError, match="failed authentication"):
            await client.ping()
        assert client.closed

    with listening_agent() as agent:
        _through_relay(agent, rewrite, body)


def test_the_channel_hides_what_it_carries(listening_agent: Any, tmp_path: Any) -> None:
    secret_file = tmp_path / "contents"
    secret_file.write_text(MARKER * 10)

    async def body(client: AgentClient) -> None:
        assert (await client.read_file(secret_file)).data == (MARKER * 10).encode()

    with listening_agent() as agent:
        relay = _through_relay(agent, None, body)
    assert relay.seen["from-agent"] and relay.seen["to-agent"]
    assert MARKER.encode() not in relay.seen["from-agent"]
    assert str(tmp_path).encode() not in relay.seen["to-agent"]


def test_a_relay_that_strips_the_encryption_offer_is_refused_by_the_client(listening_agent: Any) -> None:
    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "from-agent" and index == 0:
            hello = p.decode_from_agent(frame[4:])
            assert isinstance(hello, p.AgentHello)
            hello.channels = [p.CHANNEL_PLAIN]
            return [bytes(p.FrameEncoder().encode(hello))]
        return [frame]

    async def body(client: AgentClient) -> None:
        raise AssertionError("the client accepted a plain channel from a TCP agent")

    with listening_agent() as agent, pytest.raises(AuthenticationError, match="does not offer an encrypted"):
        _through_relay(agent, rewrite, body)


def test_a_relay_that_rewrites_a_hello_gets_keys_that_do_not_match(listening_agent: Any) -> None:
    # Any edit to a hello changes the transcript the keys are derived from.
    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction == "from-agent" and index == 0:
            hello = p.decode_from_agent(frame[4:])
            assert isinstance(hello, p.AgentHello)
            hello.capabilities = [*hello.capabilities, "files-write"]
            return [bytes(p.FrameEncoder().encode(hello))]
        return [frame]

    async def body(client: AgentClient) -> None:
        # the agent cannot open the client's frame; the client cannot open the agent's goodbye
        with pytest.raises(ProtocolError, match="failed authentication"):
            await client.ping()

    with listening_agent() as agent:
        _through_relay(agent, rewrite, body)
        assert "a frame failed authentication" in agent.log()


def test_a_tcp_agent_refuses_a_plain_channel_unless_allowed(listening_agent: Any) -> None:
    with listening_agent() as agent:
        for version in (1, p.PROTOCOL_VERSION):  # an old client sends no channel: plain
            connection = RawConnection(agent.host, agent.port)
            reply = connection.handshake(agent.secret, version=version, channel=p.CHANNEL_PLAIN)
            assert isinstance(reply, p.Goodbye) and reply.code == p.GOODBYE_CHANNEL
            assert "chacha20-poly1305" in reply.message
            connection.close()
    with listening_agent(extra_args=["--allow-plaintext"]) as agent:

        async def plain_and_sealed() -> None:
            client = await connect_tcp(agent.host, agent.port, agent.secret, encrypt=False)
            assert client.channel == p.CHANNEL_PLAIN
            await client.ping()
            await client.close()
            client = await connect_tcp(agent.host, agent.port, agent.secret)
            assert client.channel == p.CHANNEL_CHACHA20_POLY1305
            await client.ping()
            await client.close()

        asyncio.run(plain_and_sealed())


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_stdio_agent_is_plain_by_default_and_sealed_on_request(agent_secret: str, encrypt: bool) -> None:
    async def main() -> None:
        client = await spawn_stdio(agent_argv(), agent_secret, encrypt=encrypt)
        try:
            expected = p.CHANNEL_CHACHA20_POLY1305 if encrypt else p.CHANNEL_PLAIN
            assert client.channel == expected
            data = os.urandom(3 * 1024 * 1024)
            assert await client.ping(data) >= 0
            assert "PATH" in await client.environ()
        finally:
            await client.close()

    asyncio.run(main())


# --- the secret ----------------------------------------------------------------------------


def _proc_file(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as file:
        return file.read()


@pytest.mark.root
def test_the_forked_local_agent_of_a_pid_target_is_plain() -> None:
    """The forked agent (cli/local_agent.py) sealed its private pipes: the
    handshake's encrypt default chose ChaCha20, and bulk through the relay
    ran at about 0.4x."""
    if os.geteuid() != 0:
        pytest.skip("needs root: attaches to another process")
    target = subprocess.Popen(["sleep", "60"])
    try:
        result = subprocess.run([*MTRACE, "exec", "-v", "--target", f"pid/{target.pid}", "--",
                                 "true"], capture_output=True, text=True, timeout=60, check=False)
    finally:
        target.kill()
        target.wait()
    assert result.returncode == 0, result.stderr
    assert f"event=client_authenticated peer=stdio version={p.PROTOCOL_VERSION} channel=plain" \
        in result.stderr, \
        result.stderr


def test_the_agent_scrubs_its_secret_from_its_own_proc_environ(listening_agent: Any) -> None:
    # A targetless agent serves "/", so a client can read the agent's own
    # /proc/PID/environ through the file service: it must not hold the secret.
    with listening_agent() as agent:
        pid = agent.process.pid
        assert agent.secret.encode() not in _proc_file(pid, "environ")

        async def read_own_environ() -> tuple[bytes, bytes]:
            client = await connect_tcp(agent.host, agent.port, agent.secret)
            try:
                by_pid = (await client.read_file(f"/proc/{pid}/environ")).data
                by_self = (await client.read_file("/proc/self/environ")).data
                return by_pid, by_self
            finally:
                await client.close()

        by_pid, by_self = asyncio.run(read_own_environ())
        assert b"PATH=" in by_pid  # the rest of the environment is intact
        assert agent.secret.encode() not in by_pid
        assert agent.secret.encode() not in by_self
        assert b"MTRACE_AGENT_SECRET" not in by_pid


def test_the_agent_scrubs_a_secret_given_on_its_command_line(agent_secret: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.agent", "--listen", "127.0.0.1:0", "--secret", agent_secret],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("LISTENING ")
        cmdline = _proc_file(process.pid, "cmdline")
        assert b"--secret\0" in cmdline
        assert agent_secret.encode() not in cmdline
        assert agent_secret.encode() not in _proc_file(process.pid, "environ")
        host, _, port = line.split()[1].rpartition(":")
        ping_ok(host, int(port), agent_secret)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_exec_with_a_weak_agent_secret_says_how_to_make_a_strong_one(listening_agent: Any) -> None:
    with listening_agent() as agent:
        result = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--agent", f"{agent.host}:{agent.port}",
             "--", "true"],
            env={**os.environ, "MTRACE_AGENT_SECRET": "s"},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    lines = result.stderr.splitlines()
    assert result.returncode == 71
    assert lines[0].startswith("mtrace: error: the agent refused the handshake"), lines
    assert lines[1].startswith("mtrace: hint: the shared secret is too weak"), lines
    assert "openssl rand -hex 16" in lines[1]


# --- bounded memory ---------------------------------------------------------------------------

#: What one connection may add to the agent's resident memory (session.py's
#: request budget, counted a few times over while encoded and sealed, plus the
#: interpreter's own slack). Before the fix the test below reached gigabytes.
AGENT_MEMORY_BOUND = 160 * 1024 * 1024


def _memory(pid: int, field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_client_that_never_reads_its_replies_cannot_grow_the_agent(
    listening_agent: Any, tmp_path: Any
) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with listening_agent() as agent:
        pid = agent.process.pid
        ping_ok(agent.host, agent.port, agent.secret)
        baseline = _memory(pid, "VmRSS")
        connection = RawConnection(agent.host, agent.port, timeout=30)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        for request_id in range(400):  # 1.2 GB of replies; the requests fit in socket buffers
            connection.send(p.Request(id=request_id, operation=p.ReadFile(path=os.fsencode(big))))
        time.sleep(4)  # the agent reads, answers what it may, then stops
        peak = _memory(pid, "VmHWM")
        assert peak - baseline < AGENT_MEMORY_BOUND, f"the agent grew by {(peak - baseline) >> 20} MiB"
        print(f"agent: {baseline >> 20} MiB before, peak {peak >> 20} MiB")
        # The replies it did produce are intact (they go out in completion order).
        for _ in range(3):
            reply = connection.receive()
            assert 0 <= reply.id < 400 and len(reply.result.data) == 3 * 1024 * 1024
        ping_ok(agent.host, agent.port, agent.secret)  # others are served meanwhile
        connection.close()
        time.sleep(1)
        ping_ok(agent.host, agent.port, agent.secret)
        assert _memory(pid, "VmRSS") - baseline < AGENT_MEMORY_BOUND
        assert _memory(pid, "VmHWM") - baseline < AGENT_MEMORY_BOUND


#: Two services for the stream tests, on this host's loopback: HOSE writes to
#: every connection as fast as it is read; SINK accepts and never reads (with a
#: small receive buffer, so the kernel does not absorb what the agent sends).
_STREAM_SERVICES = r"""
import asyncio, socket, sys

async def hose(reader, writer):
    chunk = b"h" * (256 * 1024)
    try:
        while True:
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass

held = []

async def sink(reader, writer):
    held.append(writer)  # never read

async def main():
    hose_server = await asyncio.start_server(hose, "127.0.0.1", 0, backlog=2048)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)
    sink_server = await asyncio.start_server(sink, sock=listener)
    ports = [s.sockets[0].getsockname()[1] for s in (hose_server, sink_server)]
    print(*ports, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def stream_services() -> Iterator[tuple[int, int]]:
    """(HOSE port, SINK port)."""
    process = subprocess.Popen([sys.executable, "-c", _STREAM_SERVICES], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        hose_port, sink_port = map(int, process.stdout.readline().split())
        yield hose_port, sink_port
    finally:
        process.kill()
        process.wait()


def test_streams_whose_client_never_reads_cannot_grow_the_agent(
    listening_agent: Any, stream_services: tuple[int, int]
) -> None:
    hose_port, _ = stream_services
    with listening_agent() as agent:
        pid = agent.process.pid
        ping_ok(agent.host, agent.port, agent.secret)
        baseline = _memory(pid, "VmRSS")
        connection = RawConnection(agent.host, agent.port, timeout=30)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        # 1000 streams, each granting the agent 64 MiB of credit, none ever read:
        # before the bound, about 1 MB per stream sat in the agent (a gigabyte).
        for stream_id in range(1, 1001):
            connection.send(p.Request(id=stream_id, operation=p.TcpConnect(
                stream=stream_id, host="127.0.0.1", port=hose_port, window=64 << 20)))
        deadline = time.monotonic() + 10  # the old agent passed the bound within 4 s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            peak = _memory(pid, "VmHWM")
            assert peak - baseline < AGENT_MEMORY_BOUND, f"the agent grew by {(peak - baseline) >> 20} MiB"
        print(f"agent: {baseline >> 20} MiB before, peak {peak >> 20} MiB")
        ping_ok(agent.host, agent.port, agent.secret)  # others are served meanwhile
        # What it sent is intact and in order, per stream.
        seen = 0
        while seen < 4 << 20:
            frame = connection.receive()
            if isinstance(frame, p.StreamData):
                assert frame.data == b"h" * len(frame.data)
                seen += len(frame.data)
        connection.close()
        time.sleep(1)
        ping_ok(agent.host, agent.port, agent.secret)


def test_streams_whose_target_never_reads_cannot_grow_the_agent(
    listening_agent: Any, stream_services: tuple[int, int]
) -> None:
    _, sink_port = stream_services
    streams = 1000
    with listening_agent(extra_args=["--allow-plaintext"]) as agent:  # plain: the test's CPU goes further
        pid = agent.process.pid
        ping_ok(agent.host, agent.port, agent.secret)
        baseline = _memory(pid, "VmRSS")
        connection = RawConnection(agent.host, agent.port, timeout=30)
        assert isinstance(connection.handshake(agent.secret, channel=p.CHANNEL_PLAIN), p.Welcome)
        for stream_id in range(1, streams + 1):
            connection.send(p.Request(id=stream_id, operation=p.TcpConnect(
                stream=stream_id, host="127.0.0.1", port=sink_port)))
        credit: dict[int, int] = {}
        while len(credit) < streams:
            reply = connection.receive()
            assert isinstance(reply, p.Response) and isinstance(reply.result, p.TcpConnected), reply
            credit[reply.result.stream] = reply.result.window
        # A well-behaved client: it sends what the windows allow, and more as
        # credit comes back, for a few seconds (before the bound: 1 MiB per stream).
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            peak = _memory(pid, "VmHWM")
            assert peak - baseline < AGENT_MEMORY_BOUND, f"the agent grew by {(peak - baseline) >> 20} MiB"
            sent += _spend_credit(connection, credit, b"s")
            if not select.select([connection.sock], [], [], 0.2)[0]:
                continue
            frame = connection.receive()
            assert isinstance(frame, p.StreamCredit), frame  # never a reset: the client kept to its windows
            credit[frame.stream] += frame.size
        peak = _memory(pid, "VmHWM")
        print(f"sent {sent >> 20} MiB; agent: {baseline >> 20} MiB before, peak {peak >> 20} MiB")
        assert peak - baseline < AGENT_MEMORY_BOUND, f"the agent grew by {(peak - baseline) >> 20} MiB"
        ping_ok(agent.host, agent.port, agent.secret)
        connection.close()


# --- incoming streams (steal, mirror) ----------------------------------------------------------

#: Inside the target namespace. ``peers HOST PORT N SIZE``: N connections, each
#: sending SIZE bytes and never reading (a small receive buffer, so the kernel
#: does not absorb what comes back). ``server PORT``: the target's own process,
#: reads each connection to its end and answers how many bytes it got.
#: ``clients HOST PORT N SIZE``: N connections at once, each sends SIZE bytes,
#: half-closes and checks the answer; prints how many were answered right.
_INCOMING_HELPER = r"""
import asyncio, socket, sys

async def connect(host, port, receive_buffer=None):
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return await asyncio.open_connection(sock=sock)

async def peer(host, port, size):
    reader, writer = await connect(host, port, receive_buffer=4096)
    chunk = b"p" * 65536
    try:
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        await asyncio.Event().wait()  # never reads
    except OSError:
        pass

async def handle(reader, writer):
    count = 0
    while data := await reader.read(1 << 20):
        count += len(data)
    writer.write(f"{count}\n".encode())
    await writer.drain()
    writer.close()

async def client(host, port, size):
    reader, writer = await connect(host, port)
    chunk = b"c" * 65536
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer == f"{size}\n".encode()

async def main():
    mode = sys.argv[1]
    if mode == "server":
        server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[2]), backlog=1024)
        print("READY", flush=True)
        await server.serve_forever()
    host, port, count, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if mode == "peers":
        await asyncio.gather(*(peer(host, port, size) for _ in range(count)))
    else:
        answered = await asyncio.gather(*(client(host, port, size) for _ in range(count)))
        print(sum(answered), flush=True)

asyncio.run(main())
"""


def _spend_credit(connection: RawConnection, credit: dict[int, int], byte: bytes) -> int:
    """Send each stream as many ``byte``s as its credit allows (then it has
    none left); the bytes sent."""
    sent = 0
    for stream_id, size in list(credit.items()):
        while size > 0:
            chunk = min(size, p.MAX_CHUNK_SIZE)
            connection.send(p.StreamData(stream=stream_id, data=byte * chunk))
            size -= chunk
            sent += chunk
        credit[stream_id] = 0
    return sent


def _read_in_background(connection: RawConnection) -> queue.Queue[Any]:
    """``connection``'s frames, read by a thread as they come (until it closes)
    while the test sends: an agent writing to a client that does not read stops
    reading that client too, so a client that sends much and reads one frame
    at a time between its sends can block both sides (a CI run's sendall timed
    out so). None after the last frame."""
    frames: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        frame: Any = True
        while frame is not None:
            try:
                frame = connection.receive()
            except OSError:  # closed at the end of the test
                frame = None
            frames.put(frame)

    threading.Thread(target=read, daemon=True).start()
    return frames


def _free_port_in(target: Any) -> int:
    result = target.run_inside(sys.executable, "-c", "import socket; s = socket.socket(); "
                               "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    return int(result.stdout)


def _subscribe(connection: RawConnection, port: int, mode: str) -> None:
    connection.send(p.Request(id=1, operation=p.IncomingSubscribe(port=port, mode=mode)))
    reply = connection.receive()
    assert isinstance(reply, p.Response) and isinstance(reply.result, p.IncomingSubscribed), reply


def _take_stream(connection: RawConnection, announced: Any, receive_window: int) -> int:
    """What a client does with an ``IncomingConnection``: grant the rest of its
    receive window (protocol 3; a protocol-2 agent assumed 1 MiB); the window
    it may send."""
    first = getattr(p, "INCOMING_INITIAL_CREDIT", receive_window)
    if hasattr(announced, "window") and receive_window > first:
        connection.send(p.StreamCredit(stream=announced.stream, size=receive_window - first))
    return int(getattr(announced, "window", 1 << 20))


def test_stolen_connections_whose_program_never_reads_cannot_grow_the_agent(
    listening_agent: Any, netns_target: Any
) -> None:
    """1000 stolen connections, each peer sending 4 MiB and never reading what
    the program sends back, to a program that never reads: the agent neither
    reads the peers beyond the program's window nor holds more of the
    program's data than the pool (before: 1 MiB per incoming stream, a gigabyte)."""
    port = _free_port_in(netns_target)
    streams = 1000
    with listening_agent(target_pid=netns_target.pid, extra_args=["--allow-plaintext"]) as agent:
        pid = agent.process.pid
        connection = RawConnection(agent.host, agent.port, timeout=30)
        assert isinstance(connection.handshake(agent.secret, channel=p.CHANNEL_PLAIN), p.Welcome)
        _subscribe(connection, port, "steal")
        baseline = _memory(pid, "VmRSS")
        peers = subprocess.Popen(netns_target.nsenter_argv(
            sys.executable, "-c", _INCOMING_HELPER, "peers", "127.0.0.1", str(port), str(streams),
            str(4 << 20), environment=False))
        try:
            credit: dict[int, int] = {}
            received = sent = 0
            frames = _read_in_background(connection)
            deadline = time.monotonic() + 30
            quiet_until = None
            while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
                peak = _memory(pid, "VmHWM")
                assert peak - baseline < AGENT_MEMORY_BOUND, \
                    f"the agent grew by {(peak - baseline) >> 20} MiB"
                sent += _spend_credit(connection, credit, b"a")  # the program answers
                try:
                    frame = frames.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(frame, p.IncomingConnection):
                    credit[frame.stream] = _take_stream(connection, frame, 64 * 1024)
                    if len(credit) == streams:  # all arrived: watch a few seconds more
                        quiet_until = time.monotonic() + 5
                elif isinstance(frame, p.StreamCredit):
                    credit[frame.stream] += frame.size
                elif isinstance(frame, p.StreamData):
                    assert frame.data == b"p" * len(frame.data)
                    received += len(frame.data)  # and never read by the program: no credit back
                else:
                    raise AssertionError(f"unexpected {frame!r}")  # a reset: the client kept its windows
            peak = _memory(pid, "VmHWM")
            print(f"{len(credit)} stolen connections, sent {sent >> 20} MiB, received "
                  f"{received >> 20} MiB; agent: {baseline >> 20} MiB before, peak {peak >> 20} MiB")
            assert peak - baseline < AGENT_MEMORY_BOUND, f"the agent grew by {(peak - baseline) >> 20} MiB"
            assert len(credit) == streams
            # The agent read no peer beyond the program's window (64 KiB each).
            assert received <= streams * 64 * 1024
            ping_ok(agent.host, agent.port, agent.secret)
        finally:
            peers.kill()
            peers.wait()
            connection.close()


def test_a_mirrored_flood_the_program_never_reads_is_dropped_not_buffered(
    listening_agent: Any, netns_target: Any
) -> None:
    """64 connections sending 8 MiB each to the target's own server, mirrored
    to a program that never reads: the target answers every one, the agent's
    memory stays bounded (before: it kept every byte it could not hand on),
    and the copies it could not hand on are dropped with ENOBUFS."""
    port = _free_port_in(netns_target)
    connections, size = 64, 8 << 20
    server = subprocess.Popen(netns_target.nsenter_argv(
        sys.executable, "-c", _INCOMING_HELPER, "server", str(port), environment=False),
        stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"READY\n"
        with listening_agent(target_pid=netns_target.pid, extra_args=["--allow-plaintext"]) as agent:
            pid = agent.process.pid
            connection = RawConnection(agent.host, agent.port, timeout=30)
            assert isinstance(connection.handshake(agent.secret, channel=p.CHANNEL_PLAIN), p.Welcome)
            _subscribe(connection, port, "mirror")
            baseline = _memory(pid, "VmRSS")
            clients = subprocess.Popen(netns_target.nsenter_argv(
                sys.executable, "-c", _INCOMING_HELPER, "clients", "127.0.0.1", str(port),
                str(connections), str(size), environment=False), stdout=subprocess.PIPE)
            announced: set[int] = set()
            dropped: set[int] = set()
            try:
                while clients.poll() is None:
                    peak = _memory(pid, "VmHWM")
                    assert peak - baseline < AGENT_MEMORY_BOUND, \
                        f"the agent grew by {(peak - baseline) >> 20} MiB"
                    if not select.select([connection.sock], [], [], 0.2)[0]:
                        continue
                    frame = connection.receive()
                    if isinstance(frame, p.IncomingConnection):
                        assert frame.mirror
                        announced.add(frame.stream)
                        _take_stream(connection, frame, 64 * 1024)  # and never read
                    elif isinstance(frame, p.StreamReset):
                        assert frame.errno == errno.ENOBUFS, frame
                        dropped.add(frame.stream)
            finally:
                output, _ = clients.communicate(timeout=120)
            peak = _memory(pid, "VmHWM")
            print(f"{len(announced)} mirrored, {len(dropped)} copies dropped; agent: "
                  f"{baseline >> 20} MiB before, peak {peak >> 20} MiB")
            assert peak - baseline < AGENT_MEMORY_BOUND, f"the agent grew by {(peak - baseline) >> 20} MiB"
            assert int(output) == connections, "the target did not answer every request right"
            assert dropped and dropped <= announced
            # Said once per dropped connection (some resets may still be on their way).
            assert len(dropped) <= agent.log().count("event=mirror_copy_dropped") <= len(announced)
            ping_ok(agent.host, agent.port, agent.secret)
            connection.close()
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("version", [2, p.PROTOCOL_VERSION])
def test_incoming_windows_follow_the_protocol_the_client_speaks(
    listening_agent: Any, netns_target: Any, version: int
) -> None:
    """Protocol 2: 1 MiB both ways from the start (what an older mtrace
    assumes). Protocol 3: the window comes from the pool and the agent sends
    INCOMING_INITIAL_CREDIT before the client's first credit, no more."""
    port = _free_port_in(netns_target)
    with listening_agent(target_pid=netns_target.pid, extra_args=["--allow-plaintext"]) as agent:
        connection = RawConnection(agent.host, agent.port, timeout=30)
        welcome = connection.handshake(agent.secret, version=version, channel=p.CHANNEL_PLAIN)
        assert isinstance(welcome, p.Welcome) and welcome.version == version
        _subscribe(connection, port, "steal")
        peer = subprocess.Popen(netns_target.nsenter_argv(
            sys.executable, "-c", _INCOMING_HELPER, "peers", "127.0.0.1", str(port), "1",
            str(256 * 1024), environment=False))
        try:
            announced = connection.receive()
            assert isinstance(announced, p.IncomingConnection), announced
            first = p.DEFAULT_WINDOW if version == 2 else p.INCOMING_INITIAL_CREDIT
            if version == 2:
                assert announced.window == p.DEFAULT_WINDOW
            else:
                assert 0 < announced.window < p.DEFAULT_WINDOW  # the pool's first window
            received = b""
            while len(received) < min(first, 256 * 1024):
                frame = connection.receive()
                assert isinstance(frame, p.StreamData) and frame.stream == announced.stream, frame
                received += frame.data
            if version != 2:  # the first credit, no more until the client grants it
                assert len(received) == first
                assert not select.select([connection.sock], [], [], 1)[0], \
                    "the agent sent beyond the first credit"
                connection.send(p.StreamCredit(stream=announced.stream, size=100))
                frame = connection.receive()
                assert isinstance(frame, p.StreamData) and len(frame.data) == 100, frame
                received += frame.data
                assert not select.select([connection.sock], [], [], 0.5)[0]
            assert received == b"p" * len(received)
        finally:
            peer.kill()
            peer.wait()
            connection.close()


def test_a_client_reading_an_incoming_stream_gets_all_of_it_past_the_first_credit(
    listening_agent: Any, netns_target: Any
) -> None:
    """The client's window beyond INCOMING_INITIAL_CREDIT goes with its first
    read's credit: a stream read as it comes flows whole (else it would stop
    at 64 KiB)."""
    port = _free_port_in(netns_target)
    size = 8 << 20

    async def main(agent: Any) -> int:
        client = await connect_tcp(agent.host, agent.port, agent.secret)
        arrived: asyncio.Queue[Any] = asyncio.Queue()
        try:
            await client.subscribe_incoming(port, "steal", lambda _, stream: arrived.put_nowait(stream))
            peer = await asyncio.create_subprocess_exec(*netns_target.nsenter_argv(
                sys.executable, "-c", _INCOMING_HELPER, "peers", "127.0.0.1", str(port), "1",
                str(size), environment=False))
            try:
                stream = await asyncio.wait_for(arrived.get(), 30)
                received = 0
                while received < size:
                    received += len(await asyncio.wait_for(stream.read(1 << 16), 30))
                return received
            finally:
                peer.kill()
                await peer.wait()
        finally:
            await client.close()

    with listening_agent(target_pid=netns_target.pid) as agent:
        assert asyncio.run(main(agent)) == size
