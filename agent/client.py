"""The async client of ``mtrace agent``: what the supervisor and the tests use.

Connecting::

    client = await connect_tcp("127.0.0.1", 7000, secret)          # an agent started with --listen
    client = await spawn_stdio(agent_argv(target_pid=1234), secret) # a local agent over pipes
    ...
    await client.close()            # also stops a spawned agent (client.process)
    await client.wait_closed()      # returns (the reason) once the connection is gone

Both return an :class:`AgentClient` that has completed the handshake (a
wrong secret or an incompatible version raises ``AuthenticationError``; an
unreachable agent ``AgentUnavailable``). ``AgentClient(reader, writer)`` plus
``await client.handshake(secret, encrypt=...)`` works over any other pair of
asyncio streams (a Kubernetes port-forward, a socketpair).

Encryption is a choice of the connection, not of the transport: ``encrypt=True``
(the default of ``connect_tcp`` and ``handshake``) refuses an agent that cannot
seal every frame; ``encrypt=False`` (the default of ``spawn_stdio``, whose pipes
are private) takes plain frames where the agent allows them and sealed ones
otherwise. ``client.channel`` says which it got.

Operations (all coroutines; paths are ``str`` or ``bytes`` and resolve under
the target's root; every failure in the target's context raises
:class:`RemoteError`, an ``OSError`` whose ``errno`` is the real one)::

    await client.ping(data=b"") -> float                     round trip in seconds
    await client.stat(path, follow_symlinks=True) -> FileStat
    await client.lstat(path) -> FileStat
    await client.access(path, mode=os.F_OK) -> None
    await client.read_file(path) -> FileContents              .stat and .data, one round
                                                              trip up to 4 MiB, chunked above
    await client.open(path, flags=os.O_RDONLY, mode=0o666) -> Opened    .handle, .stat
    await client.read(handle, size, offset=None) -> Data      .data, .eof (short read)
    await client.close_file(handle) -> None
    await client.readdir(path) -> list[DirEntry]              .name (bytes), .type (DT_*), .ino
    await client.readlink(path) -> bytes
    await client.environ() -> dict[str, str]                  the target's, not the agent's
    await client.environ_bytes() -> list[tuple[bytes, bytes]]
    await client.resolve(name, family=socket.AF_UNSPEC) -> list[str]    IP literals
    await client.open_tcp(host, port, timeout=30.0) -> TcpStream
    await client.open_udp(family=socket.AF_INET) -> UdpSocket
    # with an agent started with --write (else RemoteError(EROFS)):
    await client.write(handle, data, offset=None) -> int
    await client.truncate(path, length), client.mkdir(path, mode=0o777),
    await client.unlink(path), client.rmdir(path), client.rename(source, destination)
    await client.chmod(path, mode)                            (capability files-chmod)
    await client.chown(path, uid, gid, follow=True)           (capability files-chown)
    await client.set_times(path, atime, mtime, follow=True)   (capability files-times)
    await client.link(source, destination, follow=False)      (capability files-links)
    await client.symlink(target, path), client.mknod(path, mode, device=0)   (files-links)
    await client.set_xattr(path, name, value, flags=0, follow=True)     (capability files-xattr)
    await client.remove_xattr(path, name, follow=True)                  (capability files-xattr)

    await client.statfs(path) -> FsStat                       (capability files-statfs)
    await client.get_xattr(path, name, follow=True) -> bytes  (capability files-xattr-read)
    await client.list_xattr(path, follow=True) -> list[bytes] (capability files-xattr-read)

``TcpStream`` (flow controlled; like an asyncio StreamReader/Writer pair)::

    await stream.read(n=-1) -> bytes      b"" at EOF; RemoteError(ECONNRESET...) if reset
    await stream.readexactly(n) -> bytes
    stream.write(data); await stream.drain()
    stream.shutdown_write()               half-close: the remote peer reads EOF
    stream.close()                        sends what was written, then closes
    stream.abort()                        closes now, dropping what was not sent yet
    stream.write_buffer_size              bytes written, not yet sent (no credit yet)
    stream.local_address, stream.peer_address   (host, port) as seen in the target

``UdpSocket``::

    await udp.sendto(data, (host, port)) -> int
    await udp.recvfrom() -> (data, (host, port))
    await udp.close();  udp.local_address;  udp.dropped  (datagrams dropped locally)

Requests pipeline: any number of calls may be in flight at once (from many
tasks); replies are matched by request id. If the agent dies or the connection
drops, every pending call, stream read and datagram wait fails promptly with
``AgentUnavailable`` and so does every later call; nothing hangs. A frame the
agent starts and does not finish within ``client.frame_timeout`` seconds
(default ``FRAME_TIMEOUT``, the agent's own default) counts as a lost agent.

Threads: an ``AgentClient`` belongs to the event loop it was created on. The
supervisor runs that loop in a dedicated thread and calls in with
``asyncio.run_coroutine_threadsafe(client.stat(path), loop).result(timeout)``
(or ``.add_done_callback`` to answer a trapped syscall later without blocking
the notification loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import (
    AgentError,
    AgentUnavailable,
    AuthenticationError,
    ProtocolError,
    RemoteError,
    TargetExited,
)
from .protocol import (
    CHANNEL_CHACHA20_POLY1305,
    CHANNEL_PLAIN,
    DEFAULT_WINDOW,
    FRAME_TIMEOUT,
    GOODBYE_AUTHENTICATION,
    GOODBYE_CHANNEL,
    GOODBYE_TARGET_EXITED,
    GOODBYE_VERSION,
    INCOMING_INITIAL_CREDIT,
    INCOMING_WINDOWS_VERSION,
    LENGTH_PREFIX,
    MAX_CHUNK_SIZE,
    MAX_FRAME_SIZE,
    MAX_HANDSHAKE_FRAME_SIZE,
    MAX_WHOLE_FILE_SIZE,
    MIN_PROTOCOL_VERSION,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Access,
    Addresses,
    AgentHello,
    ChangeMode,
    ChangeOwner,
    ClientHello,
    Close,
    Data,
    Datagram,
    DirEntries,
    DirEntry,
    Done,
    Environ,
    Error,
    FileContents,
    FileStat,
    FrameEncoder,
    FsStat,
    GetEnviron,
    GetXattr,
    Goodbye,
    HttpRequestFilter,
    IncomingConnection,
    IncomingSubscribe,
    IncomingSubscribed,
    IncomingUnsubscribe,
    Link,
    LinkTarget,
    ListXattr,
    MakeDir,
    MakeNode,
    Open,
    Opened,
    Operation,
    Ping,
    Pong,
    Read,
    ReadDir,
    ReadFile,
    ReadLink,
    RemoveXattr,
    Rename,
    Request,
    Resolve,
    Response,
    Result,
    Sent,
    SetTimes,
    SetXattr,
    Stat,
    StatFs,
    StreamClose,
    StreamCredit,
    StreamData,
    StreamEof,
    StreamReset,
    StreamShutdown,
    Symlink,
    TcpConnect,
    TcpConnected,
    TimeSpec,
    Truncate,
    UdpClose,
    UdpOpen,
    UdpOpened,
    UdpSend,
    UnixConnect,
    Unlink,
    UploadBegin,
    UploadCommit,
    Welcome,
    Write,
    XattrNames,
    XattrValue,
    _Message,
    agent_proof,
    client_proof,
    decode_from_agent,
    frame_length,
    proofs_match,
)
from .target import SECRET_VARIABLE

if TYPE_CHECKING:
    from .channel import FrameOpener, FrameSealer

__all__ = [
    "AgentClient",
    "DirEntry",
    "FileContents",
    "FileStat",
    "RemoteError",
    "TcpStream",
    "UdpSocket",
    "agent_argv",
    "connect_tcp",
    "spawn_stdio",
]

HANDSHAKE_TIMEOUT = 10.0
READ_LIMIT = 1 << 20
#: Largest StreamData the client sends.
STREAM_CHUNK = 256 * 1024
#: Datagrams waiting for recvfrom() beyond this are dropped (UDP may lose them).
MAX_QUEUED_DATAGRAMS = 1024

_R = TypeVar("_R")
Path = str | bytes


def _path(path: Path) -> bytes:
    return os.fsencode(path)


def agent_argv(*, target_pid: int | None = None, write: bool = False, verbose: int = 0) -> list[str]:
    """The command line of a local agent run by this interpreter (for :func:`spawn_stdio`)."""
    argv = [sys.executable, "-m", "mtrace.agent", "--stdio"]
    if target_pid is not None:
        argv += ["--target-pid", str(target_pid)]
    if write:
        argv.append("--write")
    if verbose:
        argv.append("-" + "v" * verbose)
    return argv


async def _read_some(reader: asyncio.StreamReader, size: int) -> bytes:
    """Up to ``size`` bytes already on their way (for an error message)."""
    try:
        return await asyncio.wait_for(reader.read(size), 0.2)
    except (TimeoutError, OSError):
        return b""


async def connect_tcp(
    host: str,
    port: int,
    secret: str | bytes,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    encrypt: bool = True,
) -> AgentClient:
    """Connect to an agent started with ``--listen`` and authenticate.

    ``encrypt=False`` is only for a path that is private already (a
    port-forward to the agent's loopback): the agent must allow it
    (``--allow-plaintext``), and if it does not, the channel is encrypted anyway.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
    except (OSError, TimeoutError) as error:
        raise AgentUnavailable(
            f"cannot reach the agent at {host}:{port}: {error}",
            hint="is the agent running and listening there (mtrace agent --listen)?",
        ) from error
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = AgentClient(reader, writer, description=f"{host}:{port}")
    try:
        await client.handshake(secret, timeout=timeout, encrypt=encrypt)
    except BaseException:
        await client.close()
        raise
    return client


async def spawn_stdio(
    argv: list[str],
    secret: str | bytes,
    *,
    stderr: int | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
    encrypt: bool = False,
) -> AgentClient:
    """Start an agent subprocess speaking on its stdin/stdout and authenticate.

    ``argv`` runs the agent (``--stdio`` is added if missing); the secret goes
    in its environment, never on its command line. ``stderr`` is where its logs
    go (inherited by default). :meth:`AgentClient.close` stops it. The pipes
    are private to the two processes, so frames are not encrypted unless
    ``encrypt`` (a remote shell carrying the pipes, say).
    """
    if "--stdio" not in argv:
        argv = [*argv, "--stdio"]
    environment = dict(os.environ)
    environment[SECRET_VARIABLE] = secret.decode() if isinstance(secret, bytes) else secret
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=environment,
            limit=READ_LIMIT,
            # Its own session: a terminal's Ctrl-C is for the program being
            # run, not for the agent serving it. It still ends with its stdin.
            start_new_session=True,
        )
    except OSError as error:
        raise AgentUnavailable(
            f"cannot start the agent ({argv[0]}): {error.strerror}",
            hint="is mtrace installed where the agent runs?",
        ) from error
    assert process.stdout is not None and process.stdin is not None
    client = AgentClient(
        process.stdout, process.stdin, process=process, description=f"agent pid {process.pid}"
    )
    try:
        await client.handshake(secret, timeout=timeout, encrypt=encrypt)
    except BaseException:
        await client.close()
        raise
    return client


class AgentClient:
    """A connection to one agent; see the module docstring for the API."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        process: asyncio.subprocess.Process | None = None,
        description: str = "agent",
        frame_timeout: float = FRAME_TIMEOUT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.process = process  # the agent subprocess, when spawn_stdio() started it
        self.description = description
        #: Seconds the rest of a started frame may take (an idle agent may be silent forever).
        self.frame_timeout = frame_timeout
        self._encoder = FrameEncoder()
        self._sealer: FrameSealer | None = None
        self._opener: FrameOpener | None = None
        self._request_ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Result]] = {}
        self._streams: dict[int, TcpStream] = {}
        self._udp: dict[int, UdpSocket] = {}
        self._incoming: dict[int, IncomingHandler] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._failure: AgentUnavailable | AuthenticationError | ProtocolError | None = None
        self._closed_event = asyncio.Event()
        self.version = 0
        self.capabilities: list[str] = []
        self.target_pid: int | None = None
        #: The channel the handshake chose (CHANNEL_PLAIN or CHANNEL_CHACHA20_POLY1305).
        self.channel = CHANNEL_PLAIN
        self.target_hostname: str | None = None
        #: The receive window this client grants each incoming stream (protocol 3;
        #: at least INCOMING_INITIAL_CREDIT).
        self.incoming_window = DEFAULT_WINDOW

    # --- connection ---

    async def _read_frame(self, max_size: int) -> bytes:
        first = await self._reader.readexactly(1)
        try:
            async with asyncio.timeout(self.frame_timeout):
                prefix = first + await self._reader.readexactly(LENGTH_PREFIX - 1)
                if self._opener is None:
                    return await self._reader.readexactly(frame_length(prefix, max_size))
                sealed = await self._reader.readexactly(self._opener.body_length(prefix, max_size))
        except TimeoutError:
            raise AgentUnavailable(
                f"{self.description} started a frame and did not finish it within "
                f"{self.frame_timeout:g}s",
                hint="the agent or the network between stalled; run the agent with -v to see why",
            ) from None
        return self._opener.open(prefix, sealed)

    async def _read_hello(self) -> tuple[_Message, bytes]:
        """The agent's first frame, decoded and raw (the raw bytes feed the key
        derivation); anything else is "not an mtrace agent", said plainly (not
        "frame of 1213486160 bytes": that is b"HTTP")."""
        prefix = await self._reader.readexactly(LENGTH_PREFIX)
        try:
            body = await self._reader.readexactly(frame_length(prefix, MAX_HANDSHAKE_FRAME_SIZE))
            return decode_from_agent(body), body
        except ProtocolError:
            pass
        heard = prefix + await _read_some(self._reader, 60)
        if heard.startswith(b"HTTP/") or heard[:4] in (b"<!DO", b"<htm", b"<HTM"):
            what = "it answers like an HTTP server"
        elif heard.startswith(b"SSH-"):
            what = "it answers like an SSH server"
        else:
            what = f"its first bytes are {bytes(heard[:16])!r}"
        raise ProtocolError(f"{self.description} is not an mtrace agent ({what})",
                            hint="give --agent the HOST:PORT that `mtrace agent --listen` printed")

    def _choose_channel(self, offered: list[str], encrypt: bool) -> str:
        if CHANNEL_CHACHA20_POLY1305 in offered and (encrypt or CHANNEL_PLAIN not in offered):
            return CHANNEL_CHACHA20_POLY1305
        if not encrypt and CHANNEL_PLAIN in offered:
            return CHANNEL_PLAIN
        raise AuthenticationError(
            f"{self.description} does not offer an encrypted channel (it offers: "
            f"{', '.join(offered) or 'nothing'})",
            hint="use the same mtrace version on both sides; a relay that strips the offer "
            "is an attack, not a bug",
        )

    async def handshake(
        self, secret: str | bytes, *, timeout: float = HANDSHAKE_TIMEOUT, encrypt: bool = True
    ) -> None:
        """Authenticate both ways and start reading replies.

        ``encrypt``: refuse an agent that cannot encrypt the frames. Without it,
        the channel is plain where the agent allows that, encrypted otherwise.
        """
        key = secret.encode() if isinstance(secret, str) else secret
        try:
            async with asyncio.timeout(timeout):
                hello, hello_body = await self._read_hello()
                if isinstance(hello, Goodbye):
                    raise AgentUnavailable(f"the agent refused the connection: {hello.message}")
                if not isinstance(hello, AgentHello):
                    raise ProtocolError(f"expected agent-hello, got {type(hello).__name__}")
                if hello.min_version > PROTOCOL_VERSION or hello.version < MIN_PROTOCOL_VERSION:
                    raise AuthenticationError(
                        f"the agent speaks protocol {hello.min_version}..{hello.version}, this "
                        f"client {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
                        hint="use the same mtrace version on both sides",
                    )
                channel = self._choose_channel(hello.channels, encrypt)
                nonce = os.urandom(NONCE_SIZE)
                client_hello = self._encoder.encode(
                    ClientHello(
                        version=PROTOCOL_VERSION,
                        capabilities=[],
                        nonce=nonce,
                        proof=client_proof(key, hello.nonce, nonce),
                        channel=channel,
                    )
                )
                self._writer.write(client_hello)
                reply = decode_from_agent(await self._read_frame(MAX_HANDSHAKE_FRAME_SIZE))
        except TimeoutError:
            raise AgentUnavailable(
                f"no handshake from {self.description} within {timeout:g}s",
                hint="is that really an mtrace agent? run it with -v to see its log",
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            raise AgentUnavailable(
                f"{self.description} closed the connection during the handshake ({error})",
                hint="run the agent with -v to see why",
            ) from None
        if isinstance(reply, Goodbye):
            if reply.code == GOODBYE_CHANNEL:
                raise AuthenticationError(
                    f"the agent refused the channel: {reply.message}",
                    hint="use the same mtrace version on both sides",
                )
            if reply.code in (GOODBYE_AUTHENTICATION, GOODBYE_VERSION):
                raise AuthenticationError(
                    f"the agent refused the handshake: {reply.message}",
                    hint="give the client and the agent the same secret (MTRACE_AGENT_SECRET)",
                )
            raise AgentUnavailable(f"the agent closed the connection: {reply.message}")
        if not isinstance(reply, Welcome):
            raise ProtocolError(f"expected welcome, got {type(reply).__name__}")
        if not proofs_match(agent_proof(key, hello.nonce, nonce), reply.proof):
            raise AuthenticationError(
                "the agent could not prove it knows the secret",
                hint="something other than your agent answered; check the address",
            )
        if channel != CHANNEL_PLAIN:
            # imported here: a plain (stdio) run never pays for loading the crypto library
            from .channel import FrameOpener, FrameSealer, derive_keys

            to_agent, from_agent = derive_keys(
                key, hello.nonce, nonce, hello_body, bytes(client_hello[LENGTH_PREFIX:])
            )
            self._sealer, self._opener = FrameSealer(to_agent), FrameOpener(from_agent)
        self.channel = channel
        self.version = reply.version
        self.capabilities = list(hello.capabilities)
        self.target_pid = hello.target_pid
        self.target_hostname = hello.hostname
        self._reader_task = asyncio.create_task(self._read_loop(), name="agent-client-reader")

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def failure(self) -> AgentError | None:
        """Why the connection is gone (None while it is open)."""
        return self._failure

    async def wait_closed(self) -> AgentError:
        """Wait until the connection is gone (the agent died, or close()); why it went."""
        await self._closed_event.wait()
        assert self._failure is not None
        return self._failure

    async def close(self) -> None:
        """Close the connection (and stop a spawned agent); pending calls fail."""
        self._fail(AgentUnavailable("the client closed the connection to the agent"))
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1)
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        failure: AgentUnavailable | ProtocolError
        try:
            while True:
                message = decode_from_agent(await self._read_frame(MAX_FRAME_SIZE))
                match message:
                    case Response(id=request_id, result=result):
                        future = self._pending.get(request_id)
                        if future is not None and not future.done():
                            future.set_result(result)
                    case StreamData(stream=stream_id, data=data):
                        if stream := self._streams.get(stream_id):
                            stream._on_data(data)
                    case StreamCredit(stream=stream_id, size=size):
                        if stream := self._streams.get(stream_id):
                            stream._on_credit(size)
                    case StreamEof(stream=stream_id):
                        if stream := self._streams.get(stream_id):
                            stream._on_eof()
                    case StreamReset(stream=stream_id, errno=code, message=text):
                        if stream := self._streams.pop(stream_id, None):
                            stream._on_failure(RemoteError(code, text))
                    case Datagram(socket=socket_id):
                        if udp := self._udp.get(socket_id):
                            udp._on_datagram(message)
                    case IncomingConnection():
                        self._on_incoming(message)
                    case Goodbye(code=code, message=text):
                        failure = (TargetExited(text) if code == GOODBYE_TARGET_EXITED else
                                   AgentUnavailable(f"the agent closed the connection: {text}"))
                        break
                    case _:
                        raise ProtocolError(f"unexpected {type(message).__name__} from the agent")
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            truncated = isinstance(error, asyncio.IncompleteReadError) and error.partial
            failure = AgentUnavailable(
                f"lost the connection to {self.description}" + (" (mid-frame)" if truncated else ""),
                hint="the agent exited or the network dropped; run the agent with -v to see why",
            )
        except (ProtocolError, AgentUnavailable) as error:
            failure = error
        self._fail(failure)

    def _fail(self, failure: AgentUnavailable | AuthenticationError | ProtocolError) -> None:
        if self._failure is not None:
            return
        self._failure = failure
        self._closed_event.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()
        for stream in list(self._streams.values()):
            stream._on_failure(failure)
        self._streams.clear()
        for udp in list(self._udp.values()):
            udp._on_failure(failure)
        self._udp.clear()
        self._writer.close()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _send_nowait(self, message: _Message) -> None:
        self._check_open()
        frame = self._encoder.encode(message)
        self._writer.write(frame if self._sealer is None else self._sealer.seal(frame))

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            self._check_open()
            raise AgentUnavailable(f"lost the connection to {self.description}") from None

    async def _call(self, operation: Operation, expected: type[_R]) -> _R:
        self._check_open()
        request_id = next(self._request_ids)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._send_nowait(Request(id=request_id, operation=operation))
            await self._drain()
            result = await future
        finally:
            self._pending.pop(request_id, None)
        if isinstance(result, Error):
            raise RemoteError(result.errno, result.message)
        if not isinstance(result, expected):
            raise ProtocolError(f"the agent answered {type(operation).__name__} with {type(result).__name__}")
        return result

    # --- operations ---

    async def ping(self, data: bytes = b"") -> float:
        """Round trip time in seconds (the agent echoes ``data``)."""
        started = time.perf_counter()
        pong = await self._call(Ping(data=data), Pong)
        if pong.data != data:
            raise ProtocolError("the agent echoed different ping data")
        return time.perf_counter() - started

    async def stat(self, path: Path, *, follow_symlinks: bool = True) -> FileStat:
        return await self._call(Stat(path=_path(path), follow_symlinks=follow_symlinks), FileStat)

    async def lstat(self, path: Path) -> FileStat:
        return await self.stat(path, follow_symlinks=False)

    async def access(self, path: Path, mode: int = os.F_OK) -> None:
        await self._call(Access(path=_path(path), mode=mode), Done)

    async def read_file(self, path: Path, *, limit: int | None = None) -> FileContents:
        """The whole file and its stat: one round trip up to 4 MiB, chunked reads above.

        With ``limit`` (at most 4 MiB), a file larger than ``limit`` is not read:
        RemoteError(EFBIG), after one round trip.
        """
        if limit is not None:
            return await self._call(ReadFile(path=_path(path), limit=min(limit, MAX_WHOLE_FILE_SIZE)),
                                    FileContents)
        try:
            return await self._call(ReadFile(path=_path(path), limit=MAX_WHOLE_FILE_SIZE), FileContents)
        except RemoteError as error:
            if error.errno != errno.EFBIG:
                raise
        opened = await self.open(path)
        try:
            chunks = []
            offset = 0
            while True:
                data = await self.read(opened.handle, MAX_CHUNK_SIZE, offset)
                chunks.append(data.data)
                offset += len(data.data)
                if not data.data:
                    break
        finally:
            with contextlib.suppress(RemoteError, AgentUnavailable):
                await self.close_file(opened.handle)
        return FileContents(stat=opened.stat, data=b"".join(chunks))

    async def open(self, path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> Opened:
        return await self._call(Open(path=_path(path), flags=flags, mode=mode), Opened)

    async def read(self, handle: int, size: int, offset: int | None = None) -> Data:
        """At most ``size`` bytes (at most 1 MiB per call); at ``offset``, or from the position."""
        return await self._call(Read(handle=handle, size=size, offset=offset), Data)

    async def close_file(self, handle: int) -> None:
        await self._call(Close(handle=handle), Done)

    async def readdir(self, path: Path) -> list[DirEntry]:
        """Entries (``.`` and ``..`` omitted), in directory order."""
        return (await self._call(ReadDir(path=_path(path)), DirEntries)).entries

    async def readlink(self, path: Path) -> bytes:
        return (await self._call(ReadLink(path=_path(path)), LinkTarget)).target

    async def environ_bytes(self) -> list[tuple[bytes, bytes]]:
        return (await self._call(GetEnviron(), Environ)).variables

    async def environ(self) -> dict[str, str]:
        return {os.fsdecode(name): os.fsdecode(value) for name, value in await self.environ_bytes()}

    async def resolve(self, name: str, family: int = socket.AF_UNSPEC) -> list[str]:
        """Addresses as the target resolves ``name``, IPv4 first (RemoteError ENOENT if none)."""
        return (await self._call(Resolve(name=name, family=int(family)), Addresses)).addresses

    async def write(self, handle: int, data: bytes, offset: int | None = None) -> int:
        return (await self._call(Write(handle=handle, data=data, offset=offset), Sent)).size

    async def upload_begin(self, path: Path) -> Opened:
        """Start replacing the file whole (agent capability ``files-upload``):
        ``write`` to the handle, then ``upload_commit``; ``close_file`` discards."""
        return await self._call(UploadBegin(path=_path(path)), Opened)

    async def upload_commit(self, handle: int) -> FileStat:
        return await self._call(UploadCommit(handle=handle), FileStat)

    async def truncate(self, path: Path, length: int) -> None:
        await self._call(Truncate(path=_path(path), length=length), Done)

    async def mkdir(self, path: Path, mode: int = 0o777) -> None:
        await self._call(MakeDir(path=_path(path), mode=mode), Done)

    async def unlink(self, path: Path) -> None:
        await self._call(Unlink(path=_path(path)), Done)

    async def rmdir(self, path: Path) -> None:
        await self._call(Unlink(path=_path(path), directory=True), Done)

    async def rename(self, source: Path, destination: Path) -> None:
        await self._call(Rename(source=_path(source), destination=_path(destination)), Done)

    async def chmod(self, path: Path, mode: int) -> None:
        """chmod of a target path (agent capability ``files-chmod``)."""
        await self._call(ChangeMode(path=_path(path), mode=mode), Done)

    async def chown(self, path: Path, uid: int, gid: int, *, follow: bool = True) -> None:
        """chown (``follow=False``: lchown) of a target path (capability ``files-chown``)."""
        await self._call(ChangeOwner(path=_path(path), uid=uid, gid=gid, follow=follow), Done)

    async def set_times(self, path: Path, atime: TimeSpec, mtime: TimeSpec, *,
                        follow: bool = True) -> None:
        """utimensat of a target path: nanoseconds, ``"now"`` or ``None`` (leave
        it) for each (capability ``files-times``)."""
        await self._call(SetTimes(path=_path(path), atime=atime, mtime=mtime, follow=follow),
                         Done)

    async def link(self, source: Path, destination: Path, *, follow: bool = False) -> None:
        """link (``follow``: linkat's AT_SYMLINK_FOLLOW) in the target (capability ``files-links``)."""
        await self._call(Link(source=_path(source), destination=_path(destination),
                              follow=follow), Done)

    async def symlink(self, target: bytes | str, path: Path) -> None:
        """A symlink at ``path`` holding ``target`` verbatim (capability ``files-links``)."""
        await self._call(Symlink(target=os.fsencode(target), path=_path(path)), Done)

    async def mknod(self, path: Path, mode: int, device: int = 0) -> None:
        """mknod with exactly ``mode`` (type and permissions; capability ``files-links``)."""
        await self._call(MakeNode(path=_path(path), mode=mode, device=device), Done)

    async def set_xattr(self, path: Path, name: bytes | str, value: bytes, flags: int = 0, *,
                        follow: bool = True) -> None:
        """setxattr (``follow=False``: lsetxattr) of a target path (capability ``files-xattr``)."""
        await self._call(SetXattr(path=_path(path), name=os.fsencode(name), value=value,
                                  flags=flags, follow=follow), Done)

    async def get_xattr(self, path: Path, name: bytes | str, *, follow: bool = True) -> bytes:
        """getxattr (``follow=False``: lgetxattr) of a target path (capability
        ``files-xattr-read``)."""
        result = await self._call(GetXattr(path=_path(path), name=os.fsencode(name),
                                           follow=follow), XattrValue)
        return result.value

    async def list_xattr(self, path: Path, *, follow: bool = True) -> list[bytes]:
        """listxattr (``follow=False``: llistxattr) of a target path (capability
        ``files-xattr-read``)."""
        result = await self._call(ListXattr(path=_path(path), follow=follow), XattrNames)
        return result.names

    async def remove_xattr(self, path: Path, name: bytes | str, *, follow: bool = True) -> None:
        """removexattr (``follow=False``: lremovexattr) of a target path (capability ``files-xattr``)."""
        await self._call(RemoveXattr(path=_path(path), name=os.fsencode(name), follow=follow),
                         Done)

    async def statfs(self, path: Path) -> FsStat:
        """statfs of a target path (agent capability ``files-statfs``)."""
        return await self._call(StatFs(path=_path(path)), FsStat)

    async def open_tcp(
        self, host: str, port: int, timeout: float = 30.0, *, window: int = DEFAULT_WINDOW
    ) -> TcpStream:
        """Connect from the target's network namespace; the errno of a failure is the target's."""
        stream_id = next(self._stream_ids)
        stream = TcpStream(self, stream_id, window)
        # Registered before the request goes out: data may follow the reply at once.
        self._streams[stream_id] = stream
        try:
            connected = await self._call(
                TcpConnect(stream=stream_id, host=host, port=port, timeout=timeout, window=window),
                TcpConnected,
            )
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        stream._on_connected(connected)
        return stream

    async def open_unix(
        self, path: bytes, timeout: float = 30.0, *, window: int = DEFAULT_WINDOW
    ) -> TcpStream:
        """A stream to the target's Unix socket ``path`` (see ``UnixConnect``)."""
        stream_id = next(self._stream_ids)
        stream = TcpStream(self, stream_id, window)
        self._streams[stream_id] = stream
        try:
            connected = await self._call(
                UnixConnect(stream=stream_id, path=path, timeout=timeout, window=window),
                TcpConnected,
            )
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        stream._on_connected(connected)
        return stream

    async def open_udp(
        self, family: int = socket.AF_INET, *, bind_host: str | None = None, bind_port: int = 0
    ) -> UdpSocket:
        socket_id = next(self._stream_ids)
        udp = UdpSocket(self, socket_id)
        self._udp[socket_id] = udp
        try:
            opened = await self._call(
                UdpOpen(socket=socket_id, family=int(family), bind_host=bind_host, bind_port=bind_port),
                UdpOpened,
            )
        except BaseException:
            self._udp.pop(socket_id, None)
            raise
        udp.local_address = (opened.local_host, opened.local_port)
        return udp

    async def subscribe_incoming(self, port: int, mode: str, handler: IncomingHandler, *,
                                 http_filter: HttpRequestFilter | None = None
                                 ) -> IncomingSubscribed:
        """Take the target's ``port`` ("steal" or "mirror"): ``handler(connection,
        stream)`` is called, on this loop, for each connection the agent announces."""
        self._incoming[port] = handler
        try:
            return await self._call(IncomingSubscribe(port=port, mode=mode, http_filter=http_filter),
                                    IncomingSubscribed)
        except BaseException:
            self._incoming.pop(port, None)
            raise

    async def unsubscribe_incoming(self, port: int) -> None:
        self._incoming.pop(port, None)
        await self._call(IncomingUnsubscribe(port=port), Done)

    def _on_incoming(self, connection: IncomingConnection) -> None:
        windows = self.version >= INCOMING_WINDOWS_VERSION
        window = max(self.incoming_window, INCOMING_INITIAL_CREDIT) if windows else DEFAULT_WINDOW
        stream = TcpStream(self, connection.stream, window)
        self._streams[connection.stream] = stream
        if windows:
            # The agent knows only the protocol's first credit: the rest of our
            # window is owed, and goes with the first credit the stream returns
            # (no frame of its own on the way of a small request).
            stream._owed = window - INCOMING_INITIAL_CREDIT
        stream._on_connected(TcpConnected(
            stream=connection.stream, local_host=connection.local_host,
            local_port=connection.local_port, peer_host=connection.peer_host,
            peer_port=connection.peer_port,
            window=connection.window if windows else DEFAULT_WINDOW))
        handler = self._incoming.get(connection.port)
        if handler is None:
            stream.abort()
            return
        handler(connection, stream)

    def _forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def _forget_udp(self, socket_id: int) -> None:
        self._udp.pop(socket_id, None)


IncomingHandler = Callable[[IncomingConnection, "TcpStream"], None]


class TcpStream:
    """A TCP connection made by the agent in the target's network namespace."""

    def __init__(self, client: AgentClient, stream_id: int, window: int) -> None:
        self._client = client
        self.id = stream_id
        self.local_address: tuple[str, int] = ("", 0)
        self.peer_address: tuple[str, int] = ("", 0)
        self._receive_window = window
        self._connected = False
        self._send_credit = 0
        self._inbox = bytearray()
        self._consumed = 0  # bytes read by the application, credit not yet returned
        self._owed = 0  # window the agent does not know of yet (incoming streams)
        self._eof = False
        self._failure: Exception | None = None
        self._readable = asyncio.Event()
        self._outbox = bytearray()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._shutdown_requested = False
        self._shutdown_sent = False
        self._close_requested = False

    # --- from the connection ---

    def _on_connected(self, connected: TcpConnected) -> None:
        self.local_address = (connected.local_host, connected.local_port)
        self.peer_address = (connected.peer_host, connected.peer_port)
        self._connected = True
        self._send_credit += connected.window
        self._pump()

    def _on_data(self, data: bytes) -> None:
        if self._close_requested:
            return
        self._inbox += data
        self._readable.set()

    def _on_credit(self, size: int) -> None:
        self._send_credit += size
        self._pump()

    def _on_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_failure(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        self._readable.set()
        self._flushed.set()

    # --- reading ---

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``-1``: whatever is buffered), ``b""`` once the peer is done."""
        while not self._inbox:
            if self._failure is not None:
                raise self._failure
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        size = len(self._inbox) if n < 0 else min(n, len(self._inbox))
        data = bytes(self._inbox[:size])
        del self._inbox[:size]
        self._return_credit(size)
        return data

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        remaining = n
        while remaining:
            chunk = await self.read(remaining)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def _return_credit(self, size: int) -> None:
        self._consumed += size
        # Batched, but never sitting on more than a quarter of what the sender
        # knows of the window: it can always make progress while the
        # application keeps reading.
        known = self._receive_window - self._owed
        if self._consumed >= known // 4 and self._failure is None:
            with contextlib.suppress(AgentUnavailable):
                self._client._send_nowait(StreamCredit(stream=self.id,
                                                       size=self._consumed + self._owed))
            self._consumed = self._owed = 0

    # --- writing ---

    def write(self, data: bytes) -> None:
        """Queue ``data``; it leaves as the agent grants credit (await :meth:`drain`)."""
        if self._failure is not None:
            raise self._failure
        if self._shutdown_requested or self._close_requested:
            raise RemoteError(errno.EPIPE, "the stream was shut down for writing")
        if data:
            self._outbox += data
            self._flushed.clear()
            self._pump()

    async def drain(self) -> None:
        """Wait until everything written has been sent to the agent."""
        await self._flushed.wait()
        if self._failure is not None:
            raise self._failure
        await self._client._drain()

    def shutdown_write(self) -> None:
        """Half-close: once what was written is sent, the remote peer reads EOF."""
        self._shutdown_requested = True
        self._pump()

    def close(self) -> None:
        """Close once what was written is sent; incoming data is discarded from now on."""
        if self._close_requested:
            return
        self._close_requested = True
        self._inbox.clear()
        self._pump()

    def abort(self) -> None:
        """Close now: written data not yet sent is dropped (the agent still delivers
        what it already received)."""
        self._outbox.clear()
        self._close_requested = True
        self._inbox.clear()
        self._pump()

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._inbox

    @property
    def failure(self) -> Exception | None:
        """Why the stream ended badly (a reset, a lost agent), None otherwise."""
        return self._failure

    @property
    def write_buffer_size(self) -> int:
        """Bytes written but not yet sent (waiting for credit from the agent)."""
        return len(self._outbox)

    def _pump(self) -> None:
        if self._failure is not None or not self._connected:
            return  # gone, or not connected yet (_on_connected pumps)
        try:
            while self._outbox and self._send_credit > 0:
                size = min(len(self._outbox), self._send_credit, STREAM_CHUNK)
                chunk = bytes(self._outbox[:size])
                del self._outbox[:size]
                self._send_credit -= size
                self._client._send_nowait(StreamData(stream=self.id, data=chunk))
            if self._outbox:
                return
            self._flushed.set()
            if self._close_requested:
                self._client._send_nowait(StreamClose(stream=self.id))
                self._client._forget_stream(self.id)
                self._on_failure(RemoteError(errno.EBADF, "the stream is closed"))
            elif self._shutdown_requested and not self._shutdown_sent:
                self._shutdown_sent = True
                self._client._send_nowait(StreamShutdown(stream=self.id))
        except AgentUnavailable as failure:
            self._on_failure(failure)


class UdpSocket:
    """A UDP socket opened by the agent in the target's network namespace."""

    def __init__(self, client: AgentClient, socket_id: int) -> None:
        self._client = client
        self.id = socket_id
        self.local_address: tuple[str, int] = ("", 0)
        self.dropped = 0
        self._queue: deque[Datagram] = deque()
        self._arrived = asyncio.Event()
        self._failure: Exception | None = None

    def _on_datagram(self, datagram: Datagram) -> None:
        if len(self._queue) >= MAX_QUEUED_DATAGRAMS:
            self.dropped += 1
            return
        self._queue.append(datagram)
        self._arrived.set()

    def _on_failure(self, failure: Exception) -> None:
        self._failure = failure
        self._arrived.set()

    async def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        host, port = address
        return (await self._client._call(UdpSend(socket=self.id, host=host, port=port, data=data), Sent)).size

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        while not self._queue:
            if self._failure is not None:
                raise self._failure
            self._arrived.clear()
            await self._arrived.wait()
        datagram = self._queue.popleft()
        return datagram.data, (datagram.host, datagram.port)

    async def close(self) -> None:
        if self._failure is not None:
            return
        self._on_failure(RemoteError(errno.EBADF, "the socket is closed"))
        self._client._forget_udp(self.id)
        with contextlib.suppress(AgentUnavailable, RemoteError):
            await self._client._call(UdpClose(socket=self.id), Done)
