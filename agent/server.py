"""``mtrace agent``: command line, transports and lifecycle.

``main(argv)`` is the entry point for both ``python -m mtrace.agent`` and the
CLI's ``mtrace agent`` subcommand. Startup order matters:

1. parse options, read the secret (``--secret`` or ``MTRACE_AGENT_SECRET``,
   which is then removed from the agent's environment and overwritten where
   ``/proc/PID/environ`` and ``/proc/PID/cmdline`` would show it); refuse a
   weak one on ``--listen``;
2. with ``--listen``, bind the listening socket in the agent's own network
   namespace, so clients on this side can reach it;
3. with ``--target-pid``, move into the target's network namespace (before any
   thread exists: ``setns`` only moves the calling thread, and later threads
   inherit from it);
4. serve until SIGTERM/SIGINT (``--listen``) or until the one client goes away
   (``--stdio``: frames on stdin/stdout, logs on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from . import logs
from .errors import AgentError
from .files import FileService, make_resolver
from .protocol import (
    CAP_DNS,
    CAP_ENV,
    CAP_FILES,
    CAP_FILES_CHMOD,
    CAP_FILES_CHOWN,
    CAP_FILES_LINKS,
    CAP_FILES_STATFS,
    CAP_FILES_TIMES,
    CAP_FILES_UPLOAD,
    CAP_FILES_WRITE,
    CAP_FILES_XATTR,
    CAP_FILES_XATTR_READ,
    CAP_INCOMING,
    CAP_TCP,
    CAP_UDP,
    CAP_UNIX_STREAM,
    CHANNEL_CHACHA20_POLY1305,
    CHANNEL_PLAIN,
    GOODBYE_SHUTDOWN,
    GOODBYE_TARGET_EXITED,
)
from .secret import GENERATE_HINT, scrub_from_proc, weakness
from .session import FRAME_TIMEOUT, AgentContext, Session
from .target import SECRET_VARIABLE, Target, find_container_process

logger = logging.getLogger("mtrace.agent.server")

READ_LIMIT = 1 << 20  # StreamReader buffer on the client connection
SHUTDOWN_GRACE = 5.0


def parse_address(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtrace agent",
        description="The remote side of mtrace: serves a target's files, environment, "
        "network and DNS to an mtrace supervisor.",
    )
    parser.add_argument(
        "--target-pid",
        type=int,
        metavar="PID",
        help="serve this process's context: its network namespace, root (/proc/PID/root) "
        "and environment; without it the agent serves its own context (targetless)",
    )
    transport = parser.add_mutually_exclusive_group(required=True)
    transport.add_argument(
        "--listen",
        type=parse_address,
        metavar="HOST:PORT",
        help="accept clients on TCP (port 0: any free port); prints 'LISTENING host:port'",
    )
    transport.add_argument(
        "--stdio",
        action="store_true",
        help="serve one client over stdin/stdout (logs go to stderr) and exit when it leaves",
    )
    parser.add_argument(
        "--secret",
        help=f"shared secret clients must prove (prefer the {SECRET_VARIABLE} environment "
        "variable: command lines are visible to every user)",
    )
    parser.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="with --listen, also accept clients that do not encrypt the channel; only where "
        "the path to the agent is private already (a listener on 127.0.0.1 reached through a "
        "Kubernetes port-forward or an SSH tunnel)",
    )
    parser.add_argument(
        "--frame-timeout",
        type=float,
        default=FRAME_TIMEOUT,
        metavar="SECONDS",
        help="drop a client that starts a frame and does not finish it within this time "
        f"(default {FRAME_TIMEOUT:g})",
)
    parser.add_argument(
        "--target-container-id",
        metavar="ID",
        help="serve the main process of the container with this runtime ID (as a pod's "
        "status shows it, with or without its docker:// or containerd:// prefix), found in "
        "/proc/*/cgroup: containerd, CRI-O and Docker alike",
    )
    parser.add_argument(
        "--write", action="store_true", help="allow write, truncate, mkdir, unlink and rename"
    )
    parser.add_argument(
        "--one-client",
        action="store_true",
        help="with --listen: exit when the first client leaves (an agent started for one session)",
    )
    parser.add_argument(
        "--ttl",
        type=float,
        metavar="SECONDS",
        help="with --listen: exit if no client has connected within SECONDS",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: connections, -vv: every request"
    )
    return parser


def run_loop(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, on uvloop where it is installed: every frame crosses the
    event loop twice, and uvloop's is markedly cheaper per wake-up. The agent
    needs nothing beyond the standard library, so it stays optional here."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
        return
    uvloop.run(main_coroutine)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.verbose)
    # A parent may have blocked these (mtrace's supervisor does, to forward
    # them); blocked, SIGTERM would never stop the agent.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        return _run(args)
    except AgentError as error:
        print(f"mtrace agent: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code


def _run(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get(SECRET_VARIABLE, "")
    # Nothing the agent starts, no environ() answer and no client reading our
    # /proc/PID/environ or cmdline through the file service should see the secret.
    try:
        scrub_from_proc(SECRET_VARIABLE, secret)
    except OSError as error:
        logs.event(logger, logging.WARNING, "secret_not_scrubbed", error=str(error))
    os.environ.pop(SECRET_VARIABLE, None)
    # Modes on the wire are final (the client applied its program's umask to
    # Open, MakeDir, MakeNode): the agent's own umask must not narrow them.
    os.umask(0)
    if not secret:
        raise AgentError(
            "no shared secret",
            hint=f"pass --secret or set {SECRET_VARIABLE}; clients must present the same one; "
            + GENERATE_HINT,
        )
    problem = weakness(secret)
    if problem is not None:
        if args.listen:
            raise AgentError(problem, hint=GENERATE_HINT)
        # over --stdio the pipe is private and the secret made up by whoever spawned us
        logs.event(logger, logging.WARNING, "weak_secret", problem=problem)
    if args.target_pid is not None and args.target_container_id:
        raise AgentError("give --target-pid or --target-container-id, not both")
    pid = args.target_pid
    if args.target_container_id:
        pid = find_container_process(args.target_container_id)
    target = Target(pid)
    listener = _bind(*args.listen) if args.listen else None
    target.enter_network()
    try:
        resolver = make_resolver(target.root)
    except OSError as error:
        raise AgentError(
            f"cannot open the root of {target.describe()}: {error.strerror}",
            hint="the agent needs root (CAP_SYS_PTRACE) to see another process's files",
        ) from error
    capabilities = [CAP_FILES, CAP_FILES_STATFS, CAP_FILES_XATTR_READ, CAP_ENV, CAP_TCP, CAP_UDP, CAP_DNS,
                    CAP_UNIX_STREAM, CAP_INCOMING]
    if args.write:
        capabilities += [CAP_FILES_WRITE, CAP_FILES_UPLOAD, CAP_FILES_CHMOD, CAP_FILES_CHOWN,
                         CAP_FILES_TIMES, CAP_FILES_LINKS, CAP_FILES_XATTR]
    context = AgentContext(
        secret=secret.encode(),
        target=target,
        files=FileService(resolver, writable=args.write),
        capabilities=capabilities,
        frame_timeout=args.frame_timeout,
    )
    logs.event(
        logger,
        logging.INFO,
        "agent_started",
        target=target.describe(),
        resolver=resolver.name,
        write=args.write,
        transport="stdio" if args.stdio else "tcp",
    )
    try:
        if listener is not None:
            channels = [CHANNEL_CHACHA20_POLY1305]
            if args.allow_plaintext:
                channels.append(CHANNEL_PLAIN)
                host, port = args.listen
                logs.event(logger, logging.WARNING, "plaintext_allowed", listen=f"{host}:{port}")
            run_loop(_serve_tcp(context, listener, channels, one_client=args.one_client,
                               ttl=args.ttl))
        else:
            run_loop(_serve_stdio(context))
    finally:
        context.executor.shutdown(wait=False, cancel_futures=True)
        resolver.close()
    logs.event(logger, logging.INFO, "agent_stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as error:
        raise AgentError(
            f"cannot listen on {host}:{port}: {error.strerror}",
            hint="choose another port, or port 0 for any free one",
        ) from error


def _keep_alive(sock: socket.socket | None) -> None:
    """TCP keepalive: a client whose machine vanished is noticed within minutes
    (an idle client is legitimate, so there is no idle timeout on frames)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


def _install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def _target_exited(target: Target) -> None:
    """Returns when the target process exits (never, for a targetless agent)."""
    if target.pid is None:
        await asyncio.Event().wait()
        return
    try:
        pidfd = os.pidfd_open(target.pid)
    except OSError:
        return  # already gone
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, gone.set)
    try:
        await gone.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _exit_message(target: Target) -> str:
    return f"the target {target.describe()} exited"


async def _serve_tcp(context: AgentContext, listener: socket.socket, channels: list[str], *,
                     one_client: bool = False, ttl: float | None = None) -> None:
    stop = asyncio.Event()
    _install_stop_signals(stop)
    target_exited = asyncio.create_task(_target_exited(context.target))
    target_exited.add_done_callback(lambda _: stop.set())
    sessions: set[Session] = set()
    runs: set[asyncio.Task[None]] = set()
    served: list[Session] = []  # sessions that authenticated (the ttl's "a client came")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        _keep_alive(writer.get_extra_info("socket"))
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Replies and credits are small frames: Nagle plus a delayed ACK
            # would hold each one 40 ms (measured through a port-forward).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(context, reader, writer, f"{peer[0]}:{peer[1]}" if peer else "?", channels)
        sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            runs.add(task)
        try:
            await session.run()
        finally:
            sessions.discard(session)
            if task is not None:
                runs.discard(task)
            if session.authenticated:
                served.append(session)
                if one_client and not any(other.authenticated for other in sessions):
                    logs.event(logger, logging.INFO, "client_left_exiting")
                    stop.set()

    server = await asyncio.start_server(on_client, sock=listener, limit=READ_LIMIT)
    host, port = listener.getsockname()[:2]
    print(f"LISTENING {host}:{port}", flush=True)
    if ttl is not None:
        def stop_if_unused() -> None:
            # Connections that never authenticated (probes, a wrong secret) do not count.
            if not served and not any(session.authenticated for session in sessions):
                logs.event(logger, logging.WARNING, "no_client_within_ttl", ttl=ttl)
                stop.set()

        asyncio.get_running_loop().call_later(ttl, stop_if_unused)
    await stop.wait()
    gone = target_exited.done() and not target_exited.cancelled()
    target_exited.cancel()
    logs.event(logger, logging.INFO, "shutting_down", clients=len(sessions), target_exited=gone)
    server.close()
    for session in list(sessions):
        if gone:
            session.goodbye(GOODBYE_TARGET_EXITED, _exit_message(context.target))
        else:
            session.goodbye(GOODBYE_SHUTDOWN, "the agent is shutting down")
    if runs:
        await asyncio.wait(list(runs), timeout=SHUTDOWN_GRACE)


async def _serve_stdio(context: AgentContext) -> None:
    # Frames own the real stdout; anything else printed goes to stderr.
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(frames_in, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
        os.fdopen(frames_out, "wb", buffering=0),
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    # A pipe to the process that started us is private: plain unless the client asks.
    session = Session(context, reader, writer, "stdio", [CHANNEL_PLAIN, CHANNEL_CHACHA20_POLY1305])
    stop = asyncio.Event()
    _install_stop_signals(stop)
    run = asyncio.create_task(session.run())
    stopping = asyncio.create_task(stop.wait())
    target_exited = asyncio.create_task(_target_exited(context.target))
    await asyncio.wait([run, stopping, target_exited], return_when=asyncio.FIRST_COMPLETED)
    if target_exited.done() and not run.done():
        session.goodbye(GOODBYE_TARGET_EXITED, _exit_message(context.target))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run, SHUTDOWN_GRACE)
    elif stop.is_set() and not run.done():
        session.goodbye(GOODBYE_SHUTDOWN, "the agent is shutting down")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run, SHUTDOWN_GRACE)
    stopping.cancel()
    target_exited.cancel()
