"""The direct path for local targets: a TCP (or connected UDP) socket made in the
target's network namespace takes the place of the tracee's own, so no relay
carries its bytes.

For a ``pid/N`` target the supervisor runs on the same machine as the target
and may enter its network namespace. At a remote TCP ``connect`` the
supervisor creates a socket of the same family there (``setns`` in the trap
loop's own thread, and back: ``CLONE_NEWNET`` is per thread), copies what the
program set on its socket (``O_NONBLOCK``, ``FD_CLOEXEC``, the ``SO_*``,
``TCP_*`` and ``IPV6_V6ONLY`` options that differ from a fresh socket's),
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
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket

_CLONE_NEWNET = 0x40000000
#: How long the trap loop may wait for a blocking caller's connect before
#: handing the wait to the async side (other threads' calls wait meanwhile).
INLINE_WAIT_MS = 1
_O_CLOEXEC_FDINFO = 0o2000000

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
#: Buffer sizes: the kernel doubles what is set, so half is set back.
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

    def fresh_options(self, made: socket.socket) -> OptionValues:
        """The options of a new socket of ``made``'s family and type here, read
        from ``made`` (new, untouched) the first time, then remembered: a
        direct connect then reads only the program's side."""
        key = (made.family, made.type)
        values = self._fresh.get(key)
        if values is None:
            values = self._fresh[key] = _read_options(made)
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


def close_on_exec(tid: int, fd: int) -> bool | None:
    """Whether the tracee's ``fd`` is close-on-exec; None if it is gone."""
    try:
        info = _read_small(f"/proc/{tid}/fdinfo/{fd}")
    except OSError:
        return None
    for line in info.splitlines():
        if line.startswith(b"flags:"):
            return bool(int(line.split()[1], 8) & _O_CLOEXEC_FDINFO)
    return None


def held_elsewhere(tid: int, fd: int, inode: int) -> bool:
    """Whether the tracee's socket ``fd`` (inode ``inode``) is also named by
    another fd of its process (``dup``) or is in one of its epoll instances
    (``tfd: FD ... ino:INODE`` in their fdinfo): either would keep the old,
    unconnected socket after the swap."""
    base = f"/proc/{tid}/fd"
    try:
        entries = os.listdir(base)
    except OSError:
        return True  # cannot tell: the relay is always right
    own = str(fd)
    socket_link = f"socket:[{inode}]"
    wanted_fd = f"tfd: {fd:8d}".encode()
    wanted_inode = f"ino:{inode:x}".encode()
    for entry in entries:
        try:
            link = os.readlink(f"{base}/{entry}")
            if link == socket_link and entry != own:
                return True
            if link != "anon_inode:[eventpoll]":
                continue
            for line in _read_small(f"/proc/{tid}/fdinfo/{entry}").splitlines():
                if line.startswith(wanted_fd) and wanted_inode in line:
                    return True
        except OSError:
            continue
    return False


#: A socket option's value as getsockopt gives it (an int, or the bytes of a
#: struct such as SO_LINGER's); None where this kernel or socket lacks it.
OptionValues = dict[tuple[int, int], int | bytes | None]


def _read_options(sock: socket.socket) -> OptionValues:
    """The options :func:`copy_socket_state` compares, as ``sock`` has them."""
    values: OptionValues = {}
    wanted = [(level, option, size) for level, option, size in _OPTIONS
              if level != socket.IPPROTO_TCP or sock.type == socket.SOCK_STREAM]
    wanted += [(socket.SOL_SOCKET, option, 0) for option in _BUFFERS]
    if sock.family == socket.AF_INET:
        wanted.append((socket.IPPROTO_IP, socket.IP_TOS, 4))
    for level, option, size in wanted:
        try:
            values[(level, option)] = (sock.getsockopt(level, option, size) if size
                                       else sock.getsockopt(level, option))
        except OSError:
            values[(level, option)] = None
    return values


def copy_socket_state(program: socket.socket, made: socket.socket,
                      fresh: OptionValues | None = None) -> None:
    """What the program set on its socket, onto the socket made for it.

    ``fresh``: the options of a new socket of ``made``'s kind in its namespace
    (:meth:`TargetNetwork.fresh_options`), so only the program's side is read;
    without it ``made`` itself is read first."""
    if fresh is None:
        fresh = _read_options(made)
    for (level, option), default in fresh.items():
        if default is None:
            continue  # an option this kernel or this socket does not have
        try:
            value = (program.getsockopt(level, option, len(default))
                     if isinstance(default, bytes) else program.getsockopt(level, option))
            if value == default:
                continue
            if option in _BUFFERS and level == socket.SOL_SOCKET:
                assert isinstance(value, int)
                value //= 2  # the kernel doubles what is set
            made.setsockopt(level, option, value)
        except OSError:
            continue
    if program.family == socket.AF_INET6:
        try:
            value = program.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 4)
            made.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, value)
        except OSError:
            pass


def is_nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def set_blocking(sock: socket.socket, blocking: bool) -> None:
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    flags = flags & ~os.O_NONBLOCK if blocking else flags | os.O_NONBLOCK
    fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags)


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
