"""One client connection to the agent: handshake, dispatch, teardown.

A session reads frames in one loop and never blocks that loop on the client:
requests run as tasks (at most :data:`MAX_REQUESTS_IN_FLIGHT` at once, after
which the loop stops reading, which pushes back on the client), file syscalls
run in worker threads, and stream data is queued within the stream's window.
Everything the client opened (files, streams, sockets) is closed when the
connection ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args

from .errors import ProtocolError
from .files import FileService, HandleTable
from .logs import event
from .names import TargetNameResolver
from .net import Outgoing
from .protocol import (
    GOODBYE_AUTHENTICATION,
    GOODBYE_PROTOCOL,
    GOODBYE_VERSION,
    LENGTH_PREFIX,
    MAX_CHUNK_SIZE,
    MAX_FRAME_SIZE,
    MAX_HANDSHAKE_FRAME_SIZE,
    MAX_WHOLE_FILE_SIZE,
    MIN_PROTOCOL_VERSION,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    WRITE_OPERATIONS,
    Access,
    AgentHello,
    ClientHello,
    Close,
    Done,
    Environ,
    Error,
    FrameEncoder,
    GetEnviron,
    Goodbye,
    LinkTarget,
    MakeDir,
    Open,
    Opened,
    Operation,
    Ping,
    Pong,
    Read,
    ReadDir,
    ReadFile,
    ReadLink,
    Rename,
    Request,
    Resolve,
    Response,
    Result,
    Sent,
    Stat,
    StreamClose,
    StreamCredit,
    StreamData,
    StreamShutdown,
    TcpConnect,
    Truncate,
    UdpClose,
    UdpOpen,
    UdpSend,
    Unlink,
    Welcome,
    Write,
    _Message,
    agent_proof,
    client_proof,
    decode_to_agent,
    frame_length,
    proofs_match,
    salvage_request,
)
from .target import Target

logger = logging.getLogger("mtrace.agent.session")

HANDSHAKE_TIMEOUT = 10.0
MAX_REQUESTS_IN_FLIGHT = 256
_OPERATION_TAGS = frozenset(kind.__struct_config__.tag for kind in get_args(Operation))
_T = TypeVar("_T")


@dataclass
class AgentContext:
    """What every session of one agent shares."""

    secret: bytes
    target: Target
    files: FileService
    capabilities: list[str]
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="agent-files")
    )

    async def in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(function, *args))

    async def read_target_file(self, path: bytes) -> bytes | None:
        """A small target file for the name resolver; None when it cannot be read."""
        try:
            contents = await self.in_thread(self.files.read_file, path, 1 << 20)
        except OSError:
            return None
        return contents.data


def describe_oserror(error: OSError) -> str:
    message = error.strerror or os.strerror(error.errno or errno.EIO)
    if error.filename is not None:
        message = f"{message}: {os.fsdecode(error.filename)}"
    return message


class Session:
    def __init__(
        self,
        context: AgentContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.context = context
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._encoder = FrameEncoder()
        self._names = TargetNameResolver(context.read_target_file)
        self._outgoing = Outgoing(self.send, self.send_nowait, self._resolve_host)
        self._handles = HandleTable()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_REQUESTS_IN_FLIGHT)
        self._requests = 0
        self._closed = False
        self.authenticated = False

    # --- sending ---

    def send_nowait(self, message: _Message) -> None:
        """Queue a frame without waiting (small control frames); dropped once closing."""
        if self._writer.transport.is_closing():
            return
        self._writer.write(self._encoder.encode(message))

    async def send(self, message: _Message) -> None:
        """Send a frame and wait until the connection can take more."""
        if self._writer.transport.is_closing():
            raise ConnectionResetError(errno.ECONNRESET, "client connection closed")
        self._writer.write(self._encoder.encode(message))
        await self._writer.drain()

    def goodbye(self, code: str, message: str) -> None:
        """Tell the client why, then close the connection."""
        event(logger, logging.INFO, "goodbye", peer=self.peer, code=code, message=message)
        self.send_nowait(Goodbye(code=code, message=message))
        self._writer.close()

    # --- lifecycle ---

    async def run(self) -> None:
        started = time.monotonic()
        event(logger, logging.INFO, "client_connected", peer=self.peer)
        reason = "disconnected"
        try:
            if await self._handshake():
                await self._serve()
        except asyncio.IncompleteReadError as error:
            reason = "truncated frame" if error.partial else "disconnected"
            if error.partial:
                event(
                    logger,
                    logging.WARNING,
                    "truncated_frame",
                    peer=self.peer,
                    got=len(error.partial),
                )
        except ProtocolError as error:
            reason = "protocol violation"
            event(logger, logging.WARNING, "protocol_violation", peer=self.peer, error=error.message)
            self.goodbye(GOODBYE_PROTOCOL, error.message)
        except (ConnectionError, BrokenPipeError) as error:
            reason = f"connection lost: {error}"
        except TimeoutError:
            reason = "handshake timeout"
            event(logger, logging.WARNING, "handshake_timeout", peer=self.peer)
            self.goodbye(GOODBYE_PROTOCOL, "no handshake in time")
        except Exception:  # a bug: lose this client, never the agent
            reason = "internal error"
            logger.exception("session_failed", extra={"mtrace_fields": {"peer": self.peer}})
            self.goodbye(GOODBYE_PROTOCOL, "internal error in the agent")
        finally:
            await self._teardown()
            event(
                logger,
                logging.INFO,
                "client_disconnected",
                peer=self.peer,
                reason=reason,
                requests=self._requests,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _read_frame(self, max_size: int) -> bytes:
        prefix = await self._reader.readexactly(LENGTH_PREFIX)
        return await self._reader.readexactly(frame_length(prefix, max_size))

    async def _handshake(self) -> bool:
        nonce = os.urandom(NONCE_SIZE)
        await self.send(
            AgentHello(
                version=PROTOCOL_VERSION,
                min_version=MIN_PROTOCOL_VERSION,
                capabilities=self.context.capabilities,
                nonce=nonce,
                target_pid=self.context.target.pid,
            )
        )
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            body = await self._read_frame(MAX_HANDSHAKE_FRAME_SIZE)
        hello = decode_to_agent(body)
        if not isinstance(hello, ClientHello):
            raise ProtocolError(f"expected client-hello, got {type(hello).__name__}")
        if hello.version < MIN_PROTOCOL_VERSION:
            message = (
                f"client speaks protocol {hello.version}, this agent needs "
                f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
            )
            event(logger, logging.WARNING, "handshake_failed", peer=self.peer, reason=message)
            self.goodbye(GOODBYE_VERSION, message)
            return False
        expected = client_proof(self.context.secret, nonce, hello.nonce)
        if len(hello.nonce) != NONCE_SIZE or not proofs_match(expected, hello.proof):
            event(logger, logging.WARNING, "handshake_failed", peer=self.peer, reason="wrong secret")
            self.goodbye(GOODBYE_AUTHENTICATION, "authentication failed: wrong secret")
            return False
        version = min(hello.version, PROTOCOL_VERSION)
        await self.send(Welcome(version=version, proof=agent_proof(self.context.secret, nonce, hello.nonce)))
        event(logger, logging.INFO, "client_authenticated", peer=self.peer, version=version)
        self.authenticated = True
        return True

    async def _serve(self) -> None:
        while True:
            body = await self._read_frame(MAX_FRAME_SIZE)
            try:
                message = decode_to_agent(body)
            except ProtocolError as error:
                salvaged = salvage_request(body)
                if salvaged is None:
                    raise
                request_id, tag = salvaged
                code = errno.EINVAL if tag in _OPERATION_TAGS else errno.ENOSYS
                event(
                    logger,
                    logging.WARNING,
                    "bad_request",
                    peer=self.peer,
                    id=request_id,
                    error=error.message,
                )
                await self.send(Response(id=request_id, result=Error(errno=code, message=error.message)))
                continue
            match message:
                case Request(id=request_id, operation=operation):
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(request_id, operation))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                case StreamData(stream=stream_id, data=data):
                    if stream := self._outgoing.stream(stream_id):
                        stream.on_data(data)
                case StreamCredit(stream=stream_id, size=size):
                    if stream := self._outgoing.stream(stream_id):
                        stream.on_credit(size)
                case StreamShutdown(stream=stream_id):
                    if stream := self._outgoing.stream(stream_id):
                        stream.on_shutdown()
                case StreamClose(stream=stream_id):
                    if stream := self._outgoing.stream(stream_id):
                        stream.on_close()
                case ClientHello():
                    raise ProtocolError("client-hello after the handshake")

    async def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._outgoing.close_all()
        self._handles.close_all()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1)

    # --- requests ---

    async def _handle(self, request_id: int, operation: Operation) -> None:
        self._requests += 1
        started = time.monotonic()
        result: Result
        try:
            result = await self._perform(operation)
        except OSError as error:
            result = Error(errno=error.errno or errno.EIO, message=describe_oserror(error))
        except Exception as error:  # a bug in the agent: answer it, log it, keep serving
            logger.exception("internal_error")
            result = Error(errno=errno.EIO, message=f"agent internal error: {error!r}")
        finally:
            self._slots.release()
        event(
            logger,
            logging.DEBUG,
            "request",
            peer=self.peer,
            id=request_id,
            op=type(operation).__struct_config__.tag,
            result=type(result).__struct_config__.tag,
            errno=result.errno if isinstance(result, Error) else 0,
            ms=round((time.monotonic() - started) * 1000, 3),
        )
        with contextlib.suppress(ConnectionError):
            await self.send(Response(id=request_id, result=result))

    async def _perform(self, operation: Operation) -> Result:
        files = self.context.files
        in_thread = self.context.in_thread
        if isinstance(operation, WRITE_OPERATIONS) and not files.writable:
            raise OSError(errno.EROFS, "the agent does not allow writes (start it with --write)")
        match operation:
            case Ping(data=data):
                return Pong(data=data)
            case Stat(path=path, follow_symlinks=follow):
                return await in_thread(files.stat, path, follow)
            case Access(path=path, mode=mode):
                await in_thread(files.access, path, mode)
                return Done()
            case ReadFile(path=path, limit=limit):
                return await in_thread(files.read_file, path, min(limit, MAX_WHOLE_FILE_SIZE))
            case Open(path=path, flags=flags, mode=mode):
                fd, info = await in_thread(files.open, path, flags, mode)
                return Opened(handle=self._handles.add(fd), stat=info)
            case Read(handle=handle, size=size, offset=offset):
                return await in_thread(self._read, handle, min(size, MAX_CHUNK_SIZE), offset)
            case Write(handle=handle, data=data, offset=offset):
                return Sent(size=await in_thread(self._write, handle, data, offset))
            case Close(handle=handle):
                self._handles.close(handle)
                return Done()
            case ReadDir(path=path):
                return await in_thread(files.readdir, path)
            case ReadLink(path=path):
                return LinkTarget(target=await in_thread(files.readlink, path))
            case Truncate(path=path, length=length):
                await in_thread(files.truncate, path, length)
                return Done()
            case MakeDir(path=path, mode=mode):
                await in_thread(files.mkdir, path, mode)
                return Done()
            case Unlink(path=path, directory=directory):
                await in_thread(files.unlink, path, directory)
                return Done()
            case Rename(source=source, destination=destination):
                await in_thread(files.rename, source, destination)
                return Done()
            case GetEnviron():
                return Environ(variables=await in_thread(self.context.target.environ))
            case Resolve(name=name, family=family):
                return await self._names.resolve(name, family)
            case TcpConnect():
                return await self._outgoing.connect(operation)
            case UdpOpen():
                return await self._outgoing.udp_open(operation)
            case UdpSend():
                return Sent(size=await self._outgoing.udp_send(operation))
            case UdpClose(socket=socket_id):
                self._outgoing.udp_close(socket_id)
                return Done()
        raise OSError(errno.ENOSYS, f"unsupported operation {type(operation).__name__}")

    def _read(self, handle: int, size: int, offset: int | None) -> Result:
        with self._handles.use(handle) as fd:
            return FileService.read(fd, size, offset)

    def _write(self, handle: int, data: bytes, offset: int | None) -> int:
        with self._handles.use(handle) as fd:
            return self.context.files.write(fd, data, offset)

    async def _resolve_host(self, host: str) -> str:
        addresses = await self._names.resolve(host, socket.AF_UNSPEC)
        return addresses.addresses[0]
