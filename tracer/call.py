"""The view of one trapped syscall that handlers get, whichever backend trapped it."""

from __future__ import annotations

import msgspec

from .memory import TraceeMemory

AT_FDCWD = -100


def signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def signed64(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value & (1 << 63) else value


class SyscallCall(msgspec.Struct):
    """A trapped call: who made it, what it is, and access to the caller's memory.

    ``args`` are the raw 64-bit register values; use the typed accessors, which
    truncate or sign-extend to the C type (``AT_FDCWD`` arrives as 0xffffff9c).
    """

    tid: int
    name: str
    args: tuple[int, ...]
    memory: TraceeMemory
    # True where the backend sees the kernel's result of a continued call
    # (ptrace); seccomp notify never does.
    sees_results: bool = False

    def int_arg(self, index: int) -> int:
        """A C ``int`` argument (fds, flags, dirfd)."""
        return signed32(self.args[index])

    def long_arg(self, index: int) -> int:
        return signed64(self.args[index])

    def uint_arg(self, index: int) -> int:
        return self.args[index] & 0xFFFFFFFF

    def pointer_arg(self, index: int) -> int:
        return self.args[index]

    def read(self, address: int, length: int) -> bytes:
        return self.memory.read(self.tid, address, length)

    def read_string(self, index: int) -> bytes:
        """The NUL-terminated string a pointer argument points at (a path)."""
        return self.memory.read_cstring(self.tid, self.args[index])

    def write(self, address: int, data: bytes) -> None:
        self.memory.write(self.tid, address, data)
