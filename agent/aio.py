"""Socket calls that work on any asyncio event loop, and a byte budget.

``loop.sock_sendto``/``sock_recvfrom`` exist only on the standard loop (uvloop
raises NotImplementedError); these try the call first and wait for readiness
only when the socket would block, with the loop's own reader/writer hooks.
:func:`wait_readable` is that wait on its own, for a reader that must decide
what to read (and what it may hold) only once there is something to read.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def _ready(sock: socket.socket, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` has something to read (or an error, or EOF)."""
    await _ready(sock, False)


async def _retry(sock: socket.socket, writable: bool, attempt: Callable[[], T]) -> T:
    while True:
        try:
            return attempt()
        except (BlockingIOError, InterruptedError):
            await _ready(sock, writable)


async def sock_sendto(sock: socket.socket, data: bytes, address: Any) -> int:
    return await _retry(sock, True, lambda: sock.sendto(data, address))


async def sock_recvfrom(sock: socket.socket, size: int) -> tuple[bytes, Any]:
    return await _retry(sock, False, lambda: sock.recvfrom(size))


async def sock_connect(sock: socket.socket, address: Any) -> None:
    """Connect a non-blocking socket to a numeric ``address``.

    uvloop's ``loop.sock_connect`` resolves every address through its thread
    pool first, even a numeric one: a thread wake-up per connection (about
    0.1 ms idle, milliseconds on a loaded machine), which incoming connections
    pay on their critical path.
    """
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    await _ready(sock, True)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, f"{os.strerror(error)} ({address[0]}:{address[1]})")


class ByteBudget:
    """A count of bytes in flight that tasks wait on and any task releases."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._released = asyncio.Event()

    async def acquire(self, size: int) -> int:
        """Take ``size`` bytes (at most the whole budget); returns what was taken.
        Returns without yielding to the loop when the bytes are there."""
        size = min(size, self.limit)
        while self.used + size > self.limit:
            self._released.clear()
            await self._released.wait()
        self.used += size
        return size

    def release(self, size: int) -> None:
        if size:
            self.used -= size
            self._released.set()
