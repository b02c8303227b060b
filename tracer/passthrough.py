"""Passthrough handlers that show the kernel's result under seccomp notify.

Under notify, a call the supervisor lets continue runs after the supervisor
has answered, so its result is never seen. For ``mtrace trace`` the supervisor
can instead make the call itself *on the tracee's own objects* and hand back
exactly what the kernel said: socket() creates the socket and injects it;
connect/bind/listen/getsockname/getpeername act on the tracee's socket through
``pidfd_getfd``; open/openat/creat open the file relative to the tracee's own
cwd or dirfd and inject the fd.

Emulation is used only where it cannot change what the tracee sees. Anything
else continues in the kernel (its result shows as ``?``):
- paths under /proc, /dev and /sys (``/proc/self`` would mean the supervisor;
  FIFOs and devices may block), and opens of anything but regular files and
  directories;
- threads whose filesystem credentials differ from the supervisor's, or whose
  root is not ``/``;
- unix socket paths that are relative (they resolve against the caller's cwd);
- blocking connects run on the async side so the trap loop never waits.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from functools import partial

from .abi import AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, pack_os_stat
from .backend import Handler
from .call import AT_FDCWD, SyscallCall
from .outcome import (
    CONTINUE,
    Defer,
    Errno,
    InjectFd,
    OnTraceeFd,
    Outcome,
    ReturnValue,
)

_libc = ctypes.CDLL(None, use_errno=True)
_SOCKADDR_MAX = 128
_SOCK_CLOEXEC = 0o2000000
_SOCK_NONBLOCK = 0o4000
_O_TMPFILE = 0o20000000 | os.O_DIRECTORY
_LOCAL_ONLY_PREFIXES = (b"/proc", b"/dev", b"/sys")


def _errno_outcome(result: int) -> Outcome | None:
    if result < 0:
        return Errno(ctypes.get_errno() or errno.EIO)
    return None


# -- credentials and roots --------------------------------------------------

def _thread_matches_supervisor(tid: int) -> bool:
    """Same filesystem uid/gid and groups, and root at "/": an open made by the
    supervisor is then the open the tracee would have made."""
    try:
        with open(f"/proc/{tid}/status", "rb") as status_file:
            status = status_file.read()
        if os.readlink(f"/proc/{tid}/root") != "/":
            return False
    except OSError:
        return False
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"Uid", b"Gid", b"Groups"):
            fields[key] = value.split()
    try:
        fsuid = int(fields[b"Uid"][3])
        fsgid = int(fields[b"Gid"][3])
        groups = sorted(int(group) for group in fields.get(b"Groups", []))
    except (KeyError, IndexError, ValueError):
        return False
    return (fsuid == os.geteuid() and fsgid == os.getegid()
            and groups == sorted(os.getgroups()))


def _thread_umask(tid: int) -> int:
    with open(f"/proc/{tid}/status", "rb") as status_file:
        for line in status_file:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _dirfd_for(call: SyscallCall, dirfd: int) -> int:
    """A supervisor fd for the directory the tracee's relative path starts from."""
    if dirfd == AT_FDCWD:
        return os.open(f"/proc/{call.tid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    from .seccomp import take_tracee_fd

    return take_tracee_fd(call.tid, dirfd)


def _directory_path(call: SyscallCall, dirfd: int) -> bytes:
    link = f"/proc/{call.tid}/cwd" if dirfd == AT_FDCWD else f"/proc/{call.tid}/fd/{dirfd}"
    return os.fsencode(os.readlink(link))


# -- files ------------------------------------------------------------------

def _local_view(call: SyscallCall, dirfd: int, path: bytes) -> bool:
    """True where the supervisor resolving ``path`` from ``dirfd`` reaches what
    the tracee would (see the module docstring for what is excluded)."""
    if not path:
        return False
    absolute = path if path.startswith(b"/") else _directory_path(call, dirfd) + b"/" + path
    return (not absolute.startswith(_LOCAL_ONLY_PREFIXES)
            and _thread_matches_supervisor(call.tid))


def _with_dirfd(call: SyscallCall, dirfd: int, path: bytes,
                action: Callable[[int | None], Outcome]) -> Outcome:
    """Run ``action`` with a supervisor fd for the directory ``path`` is relative to."""
    local_dirfd = _dirfd_for(call, dirfd) if not path.startswith(b"/") else None
    try:
        return action(local_dirfd)
    finally:
        if local_dirfd is not None:
            os.close(local_dirfd)


def _open_like(call: SyscallCall, dirfd: int, path: bytes, flags: int, mode: int) -> Outcome:
    if not path:
        return Errno(errno.ENOENT)
    # The kernel refuses to inject O_PATH fds; opens of those continue.
    if flags & os.O_PATH or not _local_view(call, dirfd, path):
        return CONTINUE

    def open_here(local_dirfd: int | None) -> Outcome:
        try:
            existing = os.stat(path, dir_fd=local_dirfd)
        except OSError:
            existing = None
        if existing is not None and not (stat.S_ISREG(existing.st_mode)
                                         or stat.S_ISDIR(existing.st_mode)):
            return CONTINUE
        creating = flags & os.O_CREAT or (flags & _O_TMPFILE) == _O_TMPFILE
        file_mode = mode & ~_thread_umask(call.tid) if creating else mode
        fd = os.open(path, (flags & ~os.O_CLOEXEC) | os.O_CLOEXEC, file_mode, dir_fd=local_dirfd)
        return InjectFd(fd, cloexec=bool(flags & os.O_CLOEXEC))

    return _with_dirfd(call, dirfd, path, open_here)


def _stat_like(call: SyscallCall, dirfd: int, path: bytes, buffer: int, flags: int) -> Outcome:
    if not path and flags & AT_EMPTY_PATH:
        if dirfd == AT_FDCWD:
            return CONTINUE
        return OnTraceeFd(dirfd, lambda fd: ReturnValue(0, ((buffer, pack_os_stat(os.fstat(fd))),)))
    if not path:
        return Errno(errno.ENOENT)
    if not _local_view(call, dirfd, path):
        return CONTINUE
    follow = not flags & AT_SYMLINK_NOFOLLOW

    def stat_here(local_dirfd: int | None) -> Outcome:
        result = os.stat(path, dir_fd=local_dirfd, follow_symlinks=follow)
        return ReturnValue(0, ((buffer, pack_os_stat(result)),))

    return _with_dirfd(call, dirfd, path, stat_here)


def handle_newfstatat(call: SyscallCall) -> Outcome:
    return _stat_like(call, call.int_arg(0), call.read_string(1), call.pointer_arg(2),
                      call.int_arg(3))


def handle_stat(call: SyscallCall) -> Outcome:
    return _stat_like(call, AT_FDCWD, call.read_string(0), call.pointer_arg(1), 0)


def handle_lstat(call: SyscallCall) -> Outcome:
    return _stat_like(call, AT_FDCWD, call.read_string(0), call.pointer_arg(1),
                      AT_SYMLINK_NOFOLLOW)


_STATX_SIZE = 256


def _statx_here(dirfd: int, path: bytes, flags: int, mask: int) -> bytes:
    """The kernel's own struct statx for ``path``, made by the supervisor."""
    from .syscalls import table

    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    result = _libc.syscall(table().number("statx"), dirfd, path, flags, mask, buffer)
    if result < 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, os.strerror(err))
    return buffer.raw


def handle_statx(call: SyscallCall) -> Outcome:
    dirfd, path, flags = call.int_arg(0), call.read_string(1), call.int_arg(2)
    mask, buffer = call.uint_arg(3), call.pointer_arg(4)
    if not path and flags & AT_EMPTY_PATH:
        if dirfd == AT_FDCWD:
            return CONTINUE
        return OnTraceeFd(dirfd, lambda fd: ReturnValue(
            0, ((buffer, _statx_here(fd, b"", flags, mask)),)))
    if not path:
        return Errno(errno.ENOENT)
    if not _local_view(call, dirfd, path):
        return CONTINUE
    return _with_dirfd(call, dirfd, path, lambda local_dirfd: ReturnValue(
        0, ((buffer, _statx_here(AT_FDCWD if local_dirfd is None else local_dirfd, path, flags,
                                 mask)),)))


def _same_real_ids(tid: int) -> bool:
    """access() checks the real uid and gid, not the filesystem ones."""
    try:
        with open(f"/proc/{tid}/status", "rb") as status_file:
            lines = {line.partition(b":")[0]: line.split() for line in status_file}
        return (int(lines[b"Uid"][1]) == os.getuid() and int(lines[b"Gid"][1]) == os.getgid())
    except (OSError, KeyError, IndexError, ValueError):
        return False


def _access_like(call: SyscallCall, dirfd: int, path: bytes, mode: int, flags: int) -> Outcome:
    if not path or not _local_view(call, dirfd, path) or not _same_real_ids(call.tid):
        return CONTINUE

    def access_here(local_dirfd: int | None) -> Outcome:
        result = _libc.faccessat(AT_FDCWD if local_dirfd is None else local_dirfd, path, mode,
                                 flags)
        return _errno_outcome(result) or ReturnValue(0)

    return _with_dirfd(call, dirfd, path, access_here)


def handle_access(call: SyscallCall) -> Outcome:
    return _access_like(call, AT_FDCWD, call.read_string(0), call.int_arg(1), 0)


def handle_faccessat(call: SyscallCall) -> Outcome:
    return _access_like(call, call.int_arg(0), call.read_string(1), call.int_arg(2), 0)


def handle_faccessat2(call: SyscallCall) -> Outcome:
    return _access_like(call, call.int_arg(0), call.read_string(1), call.int_arg(2),
                        call.int_arg(3))


def _readlink_like(call: SyscallCall, dirfd: int, path: bytes, buffer: int, size: int) -> Outcome:
    if not _local_view(call, dirfd, path):
        return CONTINUE
    if size <= 0:
        return Errno(errno.EINVAL)

    def readlink_here(local_dirfd: int | None) -> Outcome:
        target = os.fsencode(os.readlink(path, dir_fd=local_dirfd))[:size]
        return ReturnValue(len(target), ((buffer, target),))

    return _with_dirfd(call, dirfd, path, readlink_here)


def handle_readlink(call: SyscallCall) -> Outcome:
    return _readlink_like(call, AT_FDCWD, call.read_string(0), call.pointer_arg(1),
                          call.int_arg(2))


def handle_readlinkat(call: SyscallCall) -> Outcome:
    return _readlink_like(call, call.int_arg(0), call.read_string(1), call.pointer_arg(2),
                          call.int_arg(3))


def handle_openat(call: SyscallCall) -> Outcome:
    return _open_like(call, call.int_arg(0), call.read_string(1), call.int_arg(2),
                      call.uint_arg(3))


def handle_open(call: SyscallCall) -> Outcome:
    return _open_like(call, AT_FDCWD, call.read_string(0), call.int_arg(1), call.uint_arg(2))


def handle_creat(call: SyscallCall) -> Outcome:
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    return _open_like(call, AT_FDCWD, call.read_string(0), flags, call.uint_arg(1))


# -- sockets ----------------------------------------------------------------

def handle_socket(call: SyscallCall) -> Outcome:
    domain, kind, protocol = call.int_arg(0), call.int_arg(1), call.int_arg(2)
    fd = _libc.socket(domain, (kind & ~_SOCK_CLOEXEC) | _SOCK_CLOEXEC, protocol)
    if fd < 0:
        return Errno(ctypes.get_errno() or errno.EIO)
    return InjectFd(fd, cloexec=bool(kind & _SOCK_CLOEXEC))


def _is_relative_unix(address: bytes) -> bool:
    family = struct.unpack_from("=H", address)[0] if len(address) >= 2 else -1
    return family == socket.AF_UNIX and len(address) > 2 and address[2:3] not in (b"/", b"\0")


def _sockaddr_call(function_name: str, fd: int, address: bytes) -> Outcome:
    function = getattr(_libc, function_name)
    buffer = ctypes.create_string_buffer(address, len(address))
    result = function(fd, buffer, len(address))
    return _errno_outcome(result) or ReturnValue(result)


async def _blocking_connect(fd: int, address: bytes) -> Outcome:
    try:
        return await asyncio.to_thread(_sockaddr_call, "connect", fd, address)
    finally:
        os.close(fd)


def _connect_action(address: bytes, fd: int) -> Outcome:
    flags = _fcntl_flags(fd)
    if flags & os.O_NONBLOCK:
        return _sockaddr_call("connect", fd, address)
    # A blocking connect may take seconds: answer it from the async side.
    return Defer(_blocking_connect(os.dup(fd), address))


def _fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _read_sockaddr(call: SyscallCall, pointer_index: int, length_index: int) -> bytes:
    length = call.uint_arg(length_index)
    if length > _SOCKADDR_MAX:
        length = _SOCKADDR_MAX
    return call.read(call.pointer_arg(pointer_index), length)


def handle_connect(call: SyscallCall) -> Outcome:
    address = _read_sockaddr(call, 1, 2)
    if _is_relative_unix(address):
        return CONTINUE
    return OnTraceeFd(call.int_arg(0), partial(_connect_action, address))


def handle_bind(call: SyscallCall) -> Outcome:
    address = _read_sockaddr(call, 1, 2)
    if _is_relative_unix(address):
        return CONTINUE
    return OnTraceeFd(call.int_arg(0), partial(_sockaddr_call, "bind", address=address))


def _listen_action(backlog: int, fd: int) -> Outcome:
    result = _libc.listen(fd, backlog)
    return _errno_outcome(result) or ReturnValue(0)


def handle_listen(call: SyscallCall) -> Outcome:
    return OnTraceeFd(call.int_arg(0), partial(_listen_action, call.int_arg(1)))


def _name_action(function_name: str, call: SyscallCall, fd: int) -> Outcome:
    address_pointer, length_pointer = call.pointer_arg(1), call.pointer_arg(2)
    (capacity,) = struct.unpack("=I", call.read(length_pointer, 4))
    buffer = ctypes.create_string_buffer(_SOCKADDR_MAX)
    length = ctypes.c_uint32(_SOCKADDR_MAX)
    result = getattr(_libc, function_name)(fd, buffer, ctypes.byref(length))
    failure = _errno_outcome(result)
    if failure is not None:
        return failure
    data = buffer.raw[: min(capacity, length.value)]
    return ReturnValue(0, writes=((address_pointer, data),
                                  (length_pointer, struct.pack("=I", length.value))))


def handle_getsockname(call: SyscallCall) -> Outcome:
    return OnTraceeFd(call.int_arg(0), partial(_name_action, "getsockname", call))


def handle_getpeername(call: SyscallCall) -> Outcome:
    return OnTraceeFd(call.int_arg(0), partial(_name_action, "getpeername", call))


def _only_without_results(handler: Handler) -> Handler:
    """A backend that sees results (ptrace) needs no emulation: continue."""

    def passthrough(call: SyscallCall) -> Outcome:
        return CONTINUE if call.sees_results else handler(call)

    return passthrough


RESULT_HANDLERS: dict[str, Handler] = {
    name: _only_without_results(handler)
    for name, handler in {
        "open": handle_open,
        "openat": handle_openat,
        "creat": handle_creat,
        "stat": handle_stat,
        "lstat": handle_lstat,
        "newfstatat": handle_newfstatat,
        "statx": handle_statx,
        "access": handle_access,
        "faccessat": handle_faccessat,
        "faccessat2": handle_faccessat2,
        "readlink": handle_readlink,
        "readlinkat": handle_readlinkat,
        "socket": handle_socket,
        "connect": handle_connect,
        "bind": handle_bind,
        "listen": handle_listen,
        "getsockname": handle_getsockname,
        "getpeername": handle_getpeername,
    }.items()
}
