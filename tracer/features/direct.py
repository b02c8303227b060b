"""The direct path for local targets: a TCP (or connected UDP) socket made in the
target's network namespace takes the place of the tracee's own, so no relay
carries its bytes.

For a ``pid/N`` target the supervisor runs on the same machine as the target
and may enter its network namespace. At a remote TCP ``connect`` the
supervisor creates a socket of the same family there (``setns`` in the trap
loop's own thread, and back: ``CLONE_NEWNET`` is per thread), copies what the
program set on its socket (``O_NONBLOCK``, ``FD_CLOEXEC``, the ``SO_*``,
``TCP_*`` and ``IPV6_V6ONLY`` options that differ from a fresh socket's in
the program's namespace: those it left keep the target's defaults),
connects it to the address the program gave, and installs it in the tracee
under the program's fd number (``SECCOMP_IOCTL_NOTIF_ADDFD`` with
``SECCOMP_ADDFD_FLAG_SETFD``: an atomic ``dup2`` into the tracee) before
answering the call. The program then talks to a real socket of the target:
``getpeername``, ``getsockname``, ``SO_ERROR``, shutdown and resets are the
kernel's, at the kernel's speed.

When the relay is kept instead (``Direct.usable`` and ``why_not``):

* the backend cannot install an fd at a given number (``--backend ptrace``);
* the socket is already bound (``bind`` before ``connect``: its address is
  this machine's);
* the socket is registered with an epoll instance (``epoll_ctl`` before
  ``connect``): a registration names the open file, and the replacement would
  silently leave the program waiting on the old one. Go, libuv, mio/tokio,
  asyncio and curl register after ``connect``, so they take the direct path;
* another fd of the process names the same socket (``dup`` before
  ``connect``); a copy held by a child process is not looked for;
* UDP: the same swap at the ``connect`` of a UDP socket (a connected UDP
  socket of the target), except for the target's nameserver (the DNS filter
  sees queries in the relay) and sockets that already sent through the relay
  (an unconnected ``sendto`` first: their source address is the relay's).
  Unconnected UDP (``sendto`` with an address each time) keeps the relay.

The reads made at every connect (:func:`fd_state`, :func:`read_options`)
are C where bin/libmtrace-notify.so is built (``tracer/helper/direct_check.c``),
else the Python below: the unit tests hold the two to the same answers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import select
import socket
import sys
from typing import Any, NamedTuple

from .. import seccomp

_CLONE_NEWNET = 0x40000000
#: How long the trap loop may wait for a blocking caller's connect before
#: handing the wait to the async side (other threads' calls wait meanwhile).
INLINE_WAIT_MS = 1
_O_CLOEXEC_FDINFO = 0o2000000
# mtrace_direct_fd_state's mask (tracer/helper/direct_check.c).
_HELD, _CLOEXEC, _NONBLOCK = 1, 2, 4

#: Options copied from the program's socket when they differ from a fresh
#: socket's. (level, option, size of the value.)
_OPTIONS: tuple[tuple[int, int, int], ...] = (
    (socket.SOL_SOCKET, socket.SO_REUSEADDR, 4),
    (socket.SOL_SOCKET, socket.SO_REUSEPORT, 4),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 4),
    (socket.SOL_SOCKET, socket.SO_LINGER, 8),
    (socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
    (socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16),
    (socket.SOL_SOCKET, socket.SO_OOBINLINE, 4),
    (socket.SOL_SOCKET, socket.SO_BROADCAST, 4),
    (socket.SOL_SOCKET, socket.SO_PRIORITY, 4),
    (socket.SOL_SOCKET, socket.SO_MARK, 4),
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 4),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 4),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 4),
    (socket.IPPROTO_TCP, socket.TCP_CORK, 4),
    (socket.IPPROTO_TCP, socket.TCP_MAXSEG, 4),
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 4),
)
#: Buffer sizes (and, for IPv6 sockets, IPV6_V6ONLY and for IPv4 ones IP_TOS:
#: see option_table): the kernel doubles what is set, so half is set back.
_BUFFERS = (socket.SO_SNDBUF, socket.SO_RCVBUF)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


class TargetNetwork:
    """The target's network namespace, held open: sockets are made in it."""

    def __init__(self, namespace_path: str) -> None:
        self.target = os.open(namespace_path, os.O_RDONLY | os.O_CLOEXEC)
        self.own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.same = os.fstat(self.target).st_ino == os.fstat(self.own).st_ino
        self._fresh: dict[tuple[int, int], OptionValues] = {}

    def fresh_options(self, family: int, kind: int) -> OptionValues:
        """The options of a new socket of this family and type in the
        supervisor's namespace, the program's: read the first time, then
        remembered, so a direct connect reads only the program's socket."""
        values = self._fresh.get((family, kind))
        if values is None:
            values = self._fresh[(family, kind)] = fresh_options(family, kind)
        return values

    def socket(self, family: int, kind: int, protocol: int) -> socket.socket:
        """A new socket in the target's namespace (non-blocking, close-on-exec)."""
        if self.same:
            return socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 protocol)
        _setns(self.target)
        try:
            return socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 protocol)
        finally:
            # A thread left in the target's namespace would make every later
            # socket of this thread the target's: never continue without it.
            try:
                _setns(self.own)
            except OSError:
                os.abort()

    def close(self) -> None:
        for fd in (self.target, self.own):
            try:
                os.close(fd)
            except OSError:
                pass


def connect_raw(sock: socket.socket, sockaddr: bytes) -> int:
    """connect() with the program's own sockaddr bytes; 0 or the errno."""
    if _libc.connect(sock.fileno(), sockaddr, len(sockaddr)) == 0:
        return 0
    return ctypes.get_errno()


def _read_small(path: str) -> bytes:
    """A /proc file's bytes, without a Python file object: the direct path
    reads several per connect."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:  # an epoll set of thousands of fds is longer
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks)
    finally:
        os.close(fd)


class FdState(NamedTuple):
    """What the direct path must know of the tracee's socket fd before the swap."""

    #: Another fd of the process names the socket (``dup``), or one of its
    #: epoll instances holds it, or the fd table could not be read: relay.
    held_elsewhere: bool
    close_on_exec: bool
    nonblocking: bool


def fd_state(tid: int, fd: int, inode: int) -> FdState | None:
    """The tracee's socket ``fd`` (inode ``inode``) as its fdinfo and fd table
    show it; None if the fd is gone. In C where bin/libmtrace-notify.so is
    built (``tracer/helper/direct_check.c``: one call instead of a Python
    round per fd), else :func:`held_elsewhere` and :func:`fdinfo_flags`."""
    native = _native()
    if native is not None:
        mask = native.fd_state(tid, fd, inode)
        if mask < 0:
            return None
        return FdState(bool(mask & _HELD), bool(mask & _CLOEXEC), bool(mask & _NONBLOCK))
    flags = fdinfo_flags(tid, fd)
    if flags is None:
        return None
    return FdState(held_elsewhere(tid, fd, inode), bool(flags & _O_CLOEXEC_FDINFO),
                   bool(flags & os.O_NONBLOCK))


def fdinfo_flags(tid: int, fd: int) -> int | None:
    """The open flags of the tracee's ``fd`` as fdinfo shows them (with
    ``O_CLOEXEC`` for close-on-exec); None if it is gone."""
    try:
        info = _read_small(f"/proc/{tid}/fdinfo/{fd}")
    except OSError:
        return None
    for line in info.splitlines():
        if line.startswith(b"flags:"):
            return int(line.split()[1], 8)
    return None


def held_elsewhere(tid: int, fd: int, inode: int) -> bool:
    """Whether the tracee's socket ``fd`` (inode ``inode``) is also named by
    another fd of its process (``dup``) or is in one of its epoll instances
    (``tfd: ... ino:INODE`` in their fdinfo, under any fd number: one made
    through a ``dup`` since closed keeps the dup's): either would keep the
    old, unconnected socket after the swap."""
    base = f"/proc/{tid}/fd"
    try:
        entries = os.listdir(base)
    except OSError:
        return True  # cannot tell: the relay is always right
    own = str(fd)
    socket_link = f"socket:[{inode}]"
    wanted_inode = f"ino:{inode:x} ".encode()
    for entry in entries:
        try:
            link = os.readlink(f"{base}/{entry}")
            if link == socket_link and entry != own:
                return True
            if link != "anon_inode:[eventpoll]":
                continue
            for line in _read_small(f"/proc/{tid}/fdinfo/{entry}").splitlines():
                if line.startswith(b"tfd:") and wanted_inode in line + b" ":
                    return True
        except OSError:
            continue
    return False


#: A socket's options as the direct path compares them: one slot of
#: ``_SLOT`` bytes per entry of :func:`option_table` (a present byte, then
#: the value getsockopt gave, zero-padded), so two sockets with the same
#: options have equal bytes.
OptionValues = bytes
_SLOT = 17
_tables: dict[tuple[int, int], tuple[tuple[int, int, int], ...]] = {}


def option_table(family: int, kind: int) -> tuple[tuple[int, int, int], ...]:
    """(level, option, size) of what is compared for a socket of this kind."""
    table = _tables.get((family, kind))
    if table is None:
        wanted = [(level, option, size) for level, option, size in _OPTIONS
                  if level != socket.IPPROTO_TCP or kind == socket.SOCK_STREAM]
        wanted += [(socket.SOL_SOCKET, option, 4) for option in _BUFFERS]
        if family == socket.AF_INET:
            wanted.append((socket.IPPROTO_IP, socket.IP_TOS, 4))
        if family == socket.AF_INET6:
            wanted.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 4))
        table = _tables[(family, kind)] = tuple(wanted)
    return table


def read_options(sock: socket.socket, table: tuple[tuple[int, int, int], ...]) -> OptionValues:
    """``sock``'s options of ``table``: in C where the library is built (one
    call instead of a getsockopt from Python per option)."""
    native = _native()
    if native is not None:
        return native.read_options(sock.fileno(), table)
    slots = []
    for level, option, size in table:
        try:
            slots.append(b"\1" + sock.getsockopt(level, option, size).ljust(_SLOT - 1, b"\0"))
        except OSError:
            slots.append(bytes(_SLOT))
    return b"".join(slots)


def fresh_options(family: int, kind: int) -> OptionValues:
    """The options a new socket of this kind has in this thread's namespace."""
    with socket.socket(family, kind) as new:
        return read_options(new, option_table(family, kind))


def copy_socket_state(program: socket.socket, made: socket.socket,
                      fresh: OptionValues | None = None,
                      kind: tuple[int, int] | None = None) -> None:
    """What the program set on its socket, onto the socket made for it: each
    option whose value differs from a new socket's where the program made its
    own. An option the program left keeps the value ``made`` was given in its
    namespace (the target's defaults: ``net.ipv4.tcp_keepalive_time`` of a pod,
    say), as for a program run there.

    ``fresh``: the options of a new socket of the program's kind in its
    namespace (:meth:`TargetNetwork.fresh_options`), read here without it.
    ``kind``: ``made``'s family and type where the caller knows them (each
    read of ``socket.family`` or ``.type`` builds an enum member). A program
    that set nothing costs one comparison."""
    family, type_ = kind or (made.family, made.type)
    table = option_table(family, type_)
    if fresh is None:
        fresh = fresh_options(family, type_)
    values = read_options(program, table)
    if values == fresh:
        return
    for index, (level, option, size) in enumerate(table):
        start = index * _SLOT
        slot = values[start:start + _SLOT]
        if not slot[0] or not fresh[start] or slot == fresh[start:start + _SLOT]:
            continue  # left as made, or an option this kernel or socket lacks
        raw = slot[1:1 + size]
        try:
            if size != 4:
                made.setsockopt(level, option, raw)
                continue
            value = int.from_bytes(raw, sys.byteorder, signed=True)
            if option in _BUFFERS and level == socket.SOL_SOCKET:
                value //= 2  # the kernel doubles what is set
            made.setsockopt(level, option, value)
        except OSError:
            continue


class _Native:
    """tracer/helper/direct_check.c through ctypes."""

    def __init__(self, library: Any) -> None:
        self._fd_state = library.mtrace_direct_fd_state
        self._fd_state.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong)
        self._fd_state.restype = ctypes.c_int
        self._read_options = library.mtrace_read_options
        self._read_options.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint,
                                       ctypes.c_char_p)
        self._read_options.restype = None
        self._packed: dict[tuple[tuple[int, int, int], ...], Any] = {}

    def fd_state(self, tid: int, fd: int, inode: int) -> int:
        return int(self._fd_state(tid, fd, inode))

    def read_options(self, fd: int, table: tuple[tuple[int, int, int], ...]) -> bytes:
        packed = self._packed.get(table)
        if packed is None:
            flat = [number for entry in table for number in entry]
            packed = self._packed[table] = (ctypes.c_int * len(flat))(*flat)
        out = ctypes.create_string_buffer(len(table) * _SLOT)
        self._read_options(fd, packed, len(table), out)
        return out.raw


@functools.cache
def _native() -> _Native | None:
    library = seccomp.native_library()
    try:
        return _Native(library) if library is not None else None
    except AttributeError:  # a library built from older source
        return None


def is_nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def set_blocking(sock: socket.socket, blocking: bool) -> None:
    sock.setblocking(blocking)  # one ioctl (FIONBIO), not F_GETFL and F_SETFL


def is_bound(sock: socket.socket) -> bool:
    try:
        address = sock.getsockname()
    except OSError:
        return True
    return bool(address[1]) if isinstance(address, tuple) else True


def connected_soon(sock: socket.socket) -> bool:
    """Whether a connect in progress has its answer within ``INLINE_WAIT_MS``
    (a peer on the target's loopback or next hop answers in microseconds): the
    blocking caller is then answered from the trap loop, without the hop to
    the async side and back."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(INLINE_WAIT_MS))


def pending_error(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY)
