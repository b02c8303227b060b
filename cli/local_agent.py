"""The local agent of a ``pid/N`` target, forked from mtrace itself.

A second interpreter started with ``python -m mtrace.agent`` pays for its own
start-up (site, msgspec, asyncio, the protocol module) before its handshake:
most of mtrace's start-up with ``--target pid/N``. mtrace has already imported
all of that, so the agent is forked from it instead, before any thread starts
(a fork of a threaded process could inherit a lock held by another thread),
and the child runs the agent's own ``main`` over two pipes, as the spawned
agent would over its stdin and stdout. It starts its own session, takes the
name ``mtrace-agent`` (``ps -o comm``; its command line stays mtrace's), and
ends when mtrace closes its end or stops it.

Where forking is not possible (threads already running), the caller falls back
to spawning ``python -m mtrace.agent``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Any, cast

from ..agent.client import READ_LIMIT, AgentClient
from ..agent.errors import AgentError, AgentUnavailable
from ..agent.target import SECRET_VARIABLE

_PR_SET_NAME = 15
NAME = b"mtrace-agent"


class ForkedProcess:
    """What :class:`AgentClient` needs of its agent process (``wait``, ``kill``,
    ``pid``, ``returncode``), for a forked child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        # Set when the watched child exits: wait() sleeps on it instead of polling.
        self._exited: asyncio.Event | None = None

    def _reap(self) -> bool:
        if self.returncode is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = -1
            return True
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        return True

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reap the child as soon as it exits (no zombie while mtrace runs on)."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            return
        self._exited = asyncio.Event()

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap()
            assert self._exited is not None
            self._exited.set()

        loop.add_reader(pidfd, exited)

    async def wait(self) -> int:
        # Watched, the exit wakes us at once: polling every 10 ms cost each
        # run 5-10 ms at its end, waiting for the agent to stop.
        if self._exited is not None:
            await self._exited.wait()
        while not self._reap():
            await asyncio.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ForkedAgent:
    """A local agent forked before the session's threads start; :meth:`connect`
    makes the client once the event loop runs."""

    def __init__(self, pid: int, reads: int, writes: int, secret: str,
                 log: Any = None) -> None:
        self.process = ForkedProcess(pid)
        self._reads = reads
        self._writes = writes
        self._secret = secret
        self._log = log  # a temporary file holding the agent's log (quiet runs)

    async def connect(self, *, timeout: float) -> AgentClient:
        """The client, after the handshake; a failure names the agent's last log line."""
        try:
            return await self._connect(timeout)
        except AgentError as error:
            if self._log is not None:
                self._log.seek(0)
                lines = [line for line in self._log.read().decode(errors="replace").splitlines()
                         if line.strip()]
                if lines:
                    error.message = f"{error.message}; the agent said: {lines[-1].strip()}"
            raise
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def _connect(self, timeout: float) -> AgentClient:
        secret = self._secret
        loop = asyncio.get_running_loop()
        self.process.watch(loop)
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(self._reads, "rb", buffering=0))
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(self._writes, "wb", buffering=0))
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        client = AgentClient(reader, writer, process=cast(Any, self.process),
                             description=f"agent pid {self.process.pid}")
        try:
            # The pipes are private to the two processes (docs/design.md, "The
            # channel, per transport"): plain, as a spawned stdio agent's.
            await client.handshake(secret, timeout=timeout, encrypt=False)
        except BaseException:
            await client.close()
            raise
        return client

    def abandon(self) -> None:
        """Never connected (start-up failed first): stop and reap the child."""
        for fd in (self._reads, self._writes):
            try:
                os.close(fd)
            except OSError:
                pass
        self.process.kill()
        try:
            os.waitpid(self.process.pid, 0)
        except ChildProcessError:
            pass
        if self._log is not None:
            self._log.close()


def can_fork() -> bool:
    return threading.active_count() == 1


def fork_agent(agent_args: list[str], secret: str, *, quiet: bool) -> ForkedAgent:
    """Fork the agent: ``agent_args`` are ``mtrace agent``'s own (``--stdio``
    ...); quiet, its log goes to a temporary file (shown only if it fails to
    start), else to mtrace's stderr."""
    import tempfile

    if not can_fork():
        raise AgentUnavailable("cannot fork the agent: threads are running")
    log = tempfile.TemporaryFile() if quiet else None  # noqa: SIM115 (the ForkedAgent closes it)
    stderr = log.fileno() if log is not None else None
    to_agent_read, to_agent_write = os.pipe()
    from_agent_read, from_agent_write = os.pipe()
    # Buffered output must not be written twice (once by each process).
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the agent
        code = 1
        try:
            os.close(to_agent_write)
            os.close(from_agent_read)
            os.dup2(to_agent_read, 0)
            os.dup2(from_agent_write, 1)
            os.close(to_agent_read)
            os.close(from_agent_write)
            if stderr is not None:
                os.dup2(stderr, 2)
            code = _agent_child(agent_args, secret)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(to_agent_read)
    os.close(from_agent_write)
    os.set_blocking(from_agent_read, False)
    os.set_blocking(to_agent_write, False)
    return ForkedAgent(pid, from_agent_read, to_agent_write, secret, log)


def _agent_child(agent_args: list[str], secret: str) -> int:
    # Its own session: a terminal's Ctrl-C is for the program being run.
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(NAME), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # mtrace's own log handlers (a terminal's stderr) are not the agent's.
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    os.environ[SECRET_VARIABLE] = secret
    sys.argv = ["mtrace agent", *agent_args]
    from ..agent.server import main

    try:
        return main(agent_args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
