"""The raw kernel interface of seccomp user notification and pidfds.

Struct layouts, ioctl numbers and thin wrappers, nothing else: the notify
backend (``mtrace.tracer.notify``) is the only user. Sizes were measured on the
kernels mtrace runs on (see DESIGN.md) and are checked against
``SECCOMP_GET_NOTIF_SIZES`` at start-up.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from pathlib import Path
from typing import Any

import msgspec

#: The exec helper and the notify library, compiled by ``pip install`` next to
#: the package's modules (a directory, never a zip: they are executed and
#: loaded). Not ``importlib.resources``: importing it cost every run 5-15 ms.
BIN = Path(__file__).parent / "bin"

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438

SECCOMP_GET_NOTIF_SIZES = 3
PIDFD_THREAD = os.O_EXCL

# ioctl request numbers: _IOWR('!', 0, struct seccomp_notif) and friends.
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_ID_VALID = 0x40082102
NOTIF_ADDFD = 0x40182103
NOTIF_SET_FLAGS = 0x40082104

USER_NOTIF_FLAG_CONTINUE = 1
ADDFD_FLAG_SETFD = 1
ADDFD_FLAG_SEND = 2
USER_NOTIF_FD_SYNC_WAKE_UP = 1

FILTER_FLAG_NEW_LISTENER = 1 << 3
FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

# struct seccomp_notif { u64 id; u32 pid; u32 flags;
#   struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; } }
NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
NOTIF_RESP = struct.Struct("=QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
NOTIF_ADDFD_STRUCT = struct.Struct("=QIIII")
_ID = struct.Struct("=Q")
# The two fields the passthrough path reads: id and nr (seccomp_data.nr at offset 16).
NOTIF_HEAD = struct.Struct("=Q8xi")


class Notification(msgspec.Struct, frozen=True):
    id: int
    tid: int
    nr: int
    arch: int
    instruction_pointer: int
    args: tuple[int, int, int, int, int, int]

    @classmethod
    def from_bytes(cls, raw: bytes) -> Notification:
        """The kernel's ``struct seccomp_notif`` (``NOTIF``) as a value."""
        nid, tid, _flags, nr, arch, ip, *args = NOTIF.unpack(raw)
        return cls(nid, tid, nr, arch, ip, tuple(args))


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Listener:
    """A seccomp notification fd: receive, answer, validate, inject."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._zero = bytes(NOTIF.size)

    def receive(self) -> Notification | None:
        """One pending notification, or None if it was withdrawn (tracee gone)."""
        raw = self.receive_raw()
        return None if raw is None else Notification.from_bytes(raw)

    def receive_raw(self) -> bytes | None:
        """One pending notification as the kernel wrote it (``NOTIF`` layout), or None.

        An immutable argument makes ``fcntl.ioctl`` copy it (zeroed, as the
        kernel insists) into its own buffer and return the result as new bytes:
        no zeroing or copying of a buffer of ours per call.
        """
        try:
            return fcntl.ioctl(self.fd, NOTIF_RECV, self._zero)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                return None
            raise

    def respond(self, notification_id: int, value: int = 0, error: int = 0,
                *, continue_: bool = False) -> bool:
        """Answer a notification; False if the tracee no longer waits for it."""
        flags = USER_NOTIF_FLAG_CONTINUE if continue_ else 0
        packed = NOTIF_RESP.pack(notification_id, value, -error if error else 0, flags)
        try:
            fcntl.ioctl(self.fd, NOTIF_SEND, packed)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def is_valid(self, notification_id: int) -> bool:
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, _ID.pack(notification_id))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def inject_fd(self, notification_id: int, fd: int, *, cloexec: bool,
                  target_fd: int | None = None, send: bool = True) -> int:
        """Install ``fd`` in the tracee; with ``send`` the call returns it atomically."""
        flags = (ADDFD_FLAG_SEND if send else 0) | (ADDFD_FLAG_SETFD if target_fd is not None else 0)
        newfd_flags = os.O_CLOEXEC if cloexec else 0
        packed = NOTIF_ADDFD_STRUCT.pack(notification_id, flags, fd, target_fd or 0, newfd_flags)
        return fcntl.ioctl(self.fd, NOTIF_ADDFD, bytearray(packed), True)

    def set_sync_wake_up(self) -> bool:
        """Ask the kernel to wake the tracee on the supervisor's CPU (5.19+)."""
        try:
            # The flags travel in the argument itself, not behind a pointer.
            fcntl.ioctl(self.fd, NOTIF_SET_FLAGS, USER_NOTIF_FD_SYNC_WAKE_UP)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NativeLoop:
    """The passthrough path of the trap loop in C (``tracer/helper/notify_loop.c``,
    built into ``bin/libmtrace-notify.so``): :meth:`next` answers CONTINUE to
    every call whose number is not in ``wanted`` without coming back to Python.
    """

    #: Syscall numbers the bitmap covers; a number above counts as wanted.
    BITS = 1024
    TIMEOUT, HUNG_UP = None, b""

    def __init__(self, function: Any, fd: int, wanted: set[int]) -> None:
        self._function = function
        self._fd = fd
        bitmap = bytearray(self.BITS // 8)
        for number in wanted:
            if 0 <= number < self.BITS:
                bitmap[number // 8] |= 1 << (number % 8)
        self._wanted = (ctypes.c_ubyte * len(bitmap)).from_buffer(bitmap)
        self._out = ctypes.create_string_buffer(NOTIF.size)
        self._passed = ctypes.c_ulonglong(0)

    @property
    def passed(self) -> int:
        """CONTINUEs sent so far."""
        return self._passed.value

    def next(self, timeout_ms: int) -> bytes | None:
        """The next wanted notification (``NOTIF`` layout); ``TIMEOUT`` (None)
        after ``timeout_ms`` or a signal; ``HUNG_UP`` (empty) once every
        tracee is gone."""
        result = self._function(self._fd, self._wanted, self.BITS, timeout_ms, self._out,
                                ctypes.byref(self._passed))
        if result == 1:
            return self._out.raw
        if result == 0:
            return self.TIMEOUT
        if result == -1:
            return self.HUNG_UP
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FastAnswers:
    """What the C loop may answer without Python (``notify_loop.c``'s
    ``mtrace_fast_*``): read-only opens of cached target files and fstat of
    their shadow copies. The files feature registers exactly what its own
    trap-loop answers would be; a call that matches nothing reaches Python."""

    def __init__(self, library: Any) -> None:
        self._clear = library.mtrace_fast_clear
        self._clear.argtypes = (ctypes.c_char_p,)
        self._clear.restype = None
        self._open_set = library.mtrace_fast_open_set
        self._open_set.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_longlong)
        self._open_set.restype = ctypes.c_int
        self._open_drop = library.mtrace_fast_open_drop
        self._open_drop.argtypes = (ctypes.c_char_p,)
        self._open_drop.restype = None
        self._node_set = library.mtrace_fast_node_set
        self._node_set.argtypes = (ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_longlong,
                                   ctypes.c_char_p, ctypes.c_uint)
        self._node_set.restype = ctypes.c_int

    def reset(self, shadow_root: bytes | None) -> None:
        """Forget everything; answer for copies under ``shadow_root`` (None: nothing)."""
        self._clear(shadow_root or b"")

    def open(self, tracee_path: bytes, shadow_path: bytes, until: float) -> None:
        """Read-only opens of ``tracee_path`` get a fresh fd of ``shadow_path``
        until ``until`` (``time.monotonic()`` seconds)."""
        self._open_set(tracee_path, shadow_path, int(until * 1_000_000_000))

    def drop_open(self, tracee_path: bytes) -> None:
        self._open_drop(tracee_path)

    def node(self, device: int, inode: int, size: int, packed_stat: bytes) -> None:
        """fstat of an fd of this inode, while its size is ``size``, reports ``packed_stat``."""
        self._node_set(device, inode, size, packed_stat, len(packed_stat))


_native_function: Any = None
_native_library: Any = None
_fast_answers: FastAnswers | None = None


def _load_native() -> Any:
    global _native_function, _native_library, _fast_answers
    if _native_function is None:
        path = str(BIN / "libmtrace-notify.so")
        try:
            library = ctypes.CDLL(path, use_errno=True)
            function = library.mtrace_notify_next
            fast = FastAnswers(library)
        except (OSError, AttributeError):  # missing, or built from older source
            _native_function = False
            return False
        function.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_void_p)
        function.restype = ctypes.c_int
        _native_function = function
        _native_library = library
        _fast_answers = fast
    return _native_function


def native_library() -> Any:
    """bin/libmtrace-notify.so loaded with ctypes (the direct path's checks
    live there too), or None where it is missing or turned off."""
    if os.environ.get("MTRACE_NATIVE_LOOP") == "0":
        return None
    _load_native()
    return _native_library


def native_loop(fd: int, wanted: set[int]) -> NativeLoop | None:
    """The C passthrough loop for listener ``fd``, or None where its library is
    missing (a source checkout never built; ``MTRACE_NATIVE_LOOP=0``)."""
    if os.environ.get("MTRACE_NATIVE_LOOP") == "0":
        return None
    function = _load_native()
    if function is False:
        return None
    return NativeLoop(function, fd, wanted)


def fast_answers() -> FastAnswers | None:
    """The C loop's table of fast answers; None where the C loop is not used."""
    if os.environ.get("MTRACE_NATIVE_LOOP") == "0" or os.environ.get("MTRACE_FAST_ANSWERS") == "0":
        return None
    _load_native()
    return _fast_answers


def notif_sizes(arch: str) -> tuple[int, int, int]:
    """(sizeof seccomp_notif, seccomp_notif_resp, seccomp_data) as the kernel sees them."""
    sizes = (ctypes.c_uint16 * 3)()
    _check(_syscall(SYS_SECCOMP[arch], SECCOMP_GET_NOTIF_SIZES, 0, sizes))
    return sizes[0], sizes[1], sizes[2]


def pidfd_open(pid: int, flags: int = 0) -> int:
    return _check(_syscall(SYS_PIDFD_OPEN, pid, flags))


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate, in this process, of the tracee's file descriptor ``target_fd``."""
    return _check(_syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0))


def thread_group_of(tid: int) -> int:
    with open(f"/proc/{tid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(tid)


def take_tracee_fd(tid: int, target_fd: int) -> int:
    """Duplicate fd ``target_fd`` of the thread ``tid`` into the supervisor."""
    try:
        pidfd = pidfd_open(tid, PIDFD_THREAD)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        pidfd = pidfd_open(thread_group_of(tid))  # kernels before 6.9
    try:
        return pidfd_getfd(pidfd, target_fd)
    finally:
        os.close(pidfd)
