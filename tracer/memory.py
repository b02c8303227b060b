"""Reading and writing tracee memory.

``/proc/TID/mem`` with ``pread``/``pwrite`` first (one syscall for any length,
and it works across page boundaries), ``process_vm_readv``/``writev`` as the
fallback where /proc is not usable. File descriptors are cached per thread id;
a stale one (the thread exited, its id was reused, or the process exec'd) is
reopened once. Callers that act on what they read must check that the
notification is still valid afterwards (the backend does).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import OrderedDict

from mtrace.tracer.errors import TraceeGone

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PATH_MAX = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t


class TraceeMemory:
    """Memory access to tracee threads, keyed by thread id."""

    def __init__(self, cache_size: int = 64) -> None:
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._cache_size = cache_size

    def _fd(self, tid: int, *, fresh: bool = False) -> int | None:
        fd = self._fds.get(tid)
        if fd is not None and not fresh:
            self._fds.move_to_end(tid)
            return fd
        if fd is not None:
            os.close(self._fds.pop(tid))
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        self._fds[tid] = fd
        if len(self._fds) > self._cache_size:
            _, oldest = self._fds.popitem(last=False)
            os.close(oldest)
        return fd

    def forget(self, tid: int) -> None:
        fd = self._fds.pop(tid, None)
        if fd is not None:
            os.close(fd)

    def read(self, tid: int, address: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``address``; TraceeGone or EFAULT otherwise."""
        if length == 0:
            return b""
        for fresh in (False, True):
            fd = self._fd(tid, fresh=fresh)
            if fd is None:
                break
            try:
                data = os.pread(fd, length, address)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise OSError(errno.EFAULT, "bad address in tracee") from None
                continue
            if len(data) == length:
                return data
            if data:
                raise OSError(errno.EFAULT, "bad address in tracee")
        return self._read_vm(tid, address, length)

    def _read_vm(self, tid: int, address: int, length: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        local = _IoVec(ctypes.cast(buffer, ctypes.c_void_p), length)
        remote = _IoVec(address, length)
        got = _process_vm_readv(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                raise TraceeGone(f"thread {tid} is gone")
            raise OSError(err, os.strerror(err))
        if got != length:
            raise OSError(errno.EFAULT, "bad address in tracee")
        return buffer.raw

    def read_cstring(self, tid: int, address: int, limit: int = PATH_MAX) -> bytes:
        """A NUL-terminated string, read page by page so no read crosses into an
        unmapped page; ENAMETOOLONG past ``limit`` (as the kernel does for paths)."""
        if address == 0:
            raise OSError(errno.EFAULT, "NULL pointer")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk_length = PAGE_SIZE - (address % PAGE_SIZE)
            chunk = self.read(tid, address, chunk_length)
            end = chunk.find(b"\0")
            if end >= 0:
                chunks.append(chunk[:end])
                result = b"".join(chunks)
                if len(result) >= limit:
                    break
                return result
            chunks.append(chunk)
            total += chunk_length
            address += chunk_length
        raise OSError(errno.ENAMETOOLONG, "string too long")

    def write(self, tid: int, address: int, data: bytes) -> None:
        if not data:
            return
        for fresh in (False, True):
            fd = self._fd(tid, fresh=fresh)
            if fd is None:
                break
            try:
                written = os.pwrite(fd, data, address)
            except OSError:
                continue
            if written == len(data):
                return
        buffer = ctypes.create_string_buffer(data, len(data))
        local = _IoVec(ctypes.cast(buffer, ctypes.c_void_p), len(data))
        remote = _IoVec(address, len(data))
        done = _process_vm_writev(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if done != len(data):
            err = ctypes.get_errno() or errno.EFAULT
            if err == errno.ESRCH:
                raise TraceeGone(f"thread {tid} is gone")
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
