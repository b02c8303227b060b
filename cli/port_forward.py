"""``mtrace port-forward``: a local port whose connections are opened from the
target, for tools that cannot run under mtrace (a GUI database client, a
browser).

Each ``-L [LOCAL_ADDR:]LOCAL_PORT:HOST:PORT`` listens on LOCAL_ADDR
(127.0.0.1 by default); every connection it accepts asks the agent to connect
to HOST:PORT from the target's network namespace (HOST resolved by the
target's DNS), then bytes are relayed both ways with the same relay the
outgoing feature uses. A refused or failed remote connect closes the local
connection with a reset and says why on stderr; the listeners stay up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
from dataclasses import dataclass

from ..agent.client import AgentClient
from ..agent.errors import AgentError, AgentUnavailable, RemoteError
from ..tracer.features.relay import relay_tcp, reset
from .errors import ConfigError

log = logging.getLogger("mtrace.cli.port_forward")

# An address is a bracketed IPv6 literal or anything without a colon.
_PART = r"(\[[^\]]+\]|[^:\[\]]+)"
_SPEC = re.compile(rf"^(?:{_PART}:)?(\d+):{_PART}:(\d+)$")


@dataclass(frozen=True)
class Forward:
    local_host: str
    local_port: int
    remote_host: str
    remote_port: int

    def __str__(self) -> str:
        def show(host: str) -> str:
            return f"[{host}]" if ":" in host else host

        return (f"{show(self.local_host)}:{self.local_port} -> "
                f"{show(self.remote_host)}:{self.remote_port}")


def parse_forward(text: str) -> Forward:
    """``[LOCAL_ADDR:]LOCAL_PORT:HOST:PORT`` (IPv6 addresses in brackets)."""
    match = _SPEC.match(text)
    if not match:
        raise ConfigError(f"-L {text}: expected [LOCAL_ADDR:]LOCAL_PORT:HOST:PORT",
                          hint="for example -L 5432:db.internal:5432 or "
                               "-L 127.0.0.1:8080:[fd00::5]:80")
    local_host, local_port, remote_host, remote_port = match.groups()
    ports = int(local_port), int(remote_port)
    if not (0 <= ports[0] < 65536 and 0 < ports[1] < 65536):
        raise ConfigError(f"-L {text}: a port is out of range")
    return Forward((local_host or "127.0.0.1").strip("[]"), ports[0],
                   remote_host.strip("[]"), ports[1])


def listen(forward: Forward) -> socket.socket:
    """The bound, listening socket of one forward (a clear error if it cannot be)."""
    try:
        infos = socket.getaddrinfo(forward.local_host, forward.local_port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"-L {forward}: cannot use local address {forward.local_host}: "
                          f"{exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"-L {forward}: cannot listen on "
                          f"{forward.local_host}:{forward.local_port}: {exc.strerror}",
                          hint="pick a free local port, or 0 for any") from exc
    sock.setblocking(False)
    return sock


async def _serve_one(client: AgentClient, forward: Forward, sock: socket.socket,
                     connections: set[asyncio.Task[None]]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        connection, _ = await loop.sock_accept(sock)
        connection.setblocking(False)
        task = asyncio.create_task(_forward_connection(client, forward, connection))
        connections.add(task)
        task.add_done_callback(connections.discard)


async def _forward_connection(client: AgentClient, forward: Forward,
                              connection: socket.socket) -> None:
    try:
        stream = await client.open_tcp(forward.remote_host, forward.remote_port)
    except (RemoteError, AgentError) as exc:
        sys.stderr.write(f"mtrace: port-forward {forward}: the target could not connect: "
                         f"{exc.message}\n")
        reset(connection)
        return
    with contextlib.suppress(RemoteError, AgentUnavailable, OSError):
        await relay_tcp(connection, stream)


async def serve(client: AgentClient, forwards: list[tuple[Forward, socket.socket]],
                where: str) -> int:
    """Serve until SIGINT/SIGTERM (0) or the agent is lost (its exit code)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    connections: set[asyncio.Task[None]] = set()
    listeners = []
    for forward, sock in forwards:
        # The real port where 0 was asked for.
        shown = Forward(forward.local_host, sock.getsockname()[1], forward.remote_host,
                        forward.remote_port)
        listeners.append(asyncio.create_task(_serve_one(client, shown, sock, connections)))
        sys.stderr.write(f"mtrace: forwarding {shown} (connections opened from {where})\n")
    sys.stderr.flush()
    lost = asyncio.create_task(client.wait_closed())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in [*listeners, *connections, stopped]:
        task.cancel()
    for _, sock in forwards:
        sock.close()
    if lost.done() and not stop.is_set():
        error = lost.result()
        sys.stderr.write(f"mtrace: error: lost the connection to the agent: {error.message}\n")
        return AgentUnavailable.exit_code
    lost.cancel()
    return 0
