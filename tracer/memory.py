"""Reading and writing tracee memory.

``process_vm_readv``/``writev`` first: they act on the memory the thread has
*now*. A ``/proc/TID/mem`` fd instead stays bound to the memory it was opened
on, which a cache would get wrong in two ways: after an ``execve`` (the old
image reads as EIO), and worse, after a ``vfork`` child execs (the fd still
reads its parent's memory, where the same address may well be mapped: silently
wrong data). ``/proc/TID/mem``, opened afresh for each access, is the fallback
where process_vm_* are refused. Callers that act on what they read must check
that the notification is still valid afterwards (the backends do).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from .errors import TraceeGone

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PATH_MAX = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t

# process_vm_* refused outright (seccomp'd supervisor, no ptrace permission for
# that call, an old kernel): use /proc/TID/mem.
_FALL_BACK = (errno.EPERM, errno.ENOSYS, errno.EACCES)


def _bad_address() -> OSError:
    return OSError(errno.EFAULT, "bad address in tracee")


def _transfer(function: Any, tid: int, buffer: ctypes.Array[ctypes.c_char],
              address: int, length: int) -> int:
    """One process_vm_readv/writev; its result (-1 with errno set on failure).
    The iovecs are built per call: the trap loop and the async side both use
    the same TraceeMemory."""
    local = _IoVec(ctypes.addressof(buffer), length)
    remote = _IoVec(address, length)
    return int(function(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))


class TraceeMemory:
    """Memory access to tracee threads, by thread id."""

    def forget(self, tid: int) -> None:
        """Nothing is kept per thread (kept for the backends' bookkeeping calls)."""

    def close(self) -> None:
        """Nothing to release."""

    def read(self, tid: int, address: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``address``; TraceeGone or EFAULT otherwise."""
        if length == 0:
            return b""
        buffer = ctypes.create_string_buffer(length)
        got = _transfer(_process_vm_readv, tid, buffer, address, length)
        if got == length:
            return buffer.raw
        if got >= 0:
            raise _bad_address()  # the range runs into an unmapped page
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise TraceeGone(f"thread {tid} is gone")
        if err in _FALL_BACK:
            return self._read_proc(tid, address, length)
        if err == errno.EFAULT:
            raise _bad_address()
        raise OSError(err, os.strerror(err))

    def _read_proc(self, tid: int, address: int, length: int) -> bytes:
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TraceeGone(f"thread {tid} is gone") from None
        try:
            data = os.pread(fd, length, address)
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise _bad_address() from None
            raise
        finally:
            os.close(fd)
        if len(data) != length:
            raise _bad_address()
        return data

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
        buffer = ctypes.create_string_buffer(data, len(data))
        done = _transfer(_process_vm_writev, tid, buffer, address, len(data))
        if done == len(data):
            return
        if done >= 0:
            raise _bad_address()
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise TraceeGone(f"thread {tid} is gone")
        if err not in _FALL_BACK:
            raise _bad_address() if err == errno.EFAULT else OSError(err, os.strerror(err))
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TraceeGone(f"thread {tid} is gone") from None
        try:
            if os.pwrite(fd, data, address) != len(data):
                raise _bad_address()
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise _bad_address() from None
            raise
        finally:
            os.close(fd)
