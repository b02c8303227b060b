"""Syscall numbers and names, per architecture.

This is the boundary where raw numbers become names: everything above this
module (backends, handlers, the trace printer) speaks of ``"openat"``, never of
``257``. The number-to-name tables come from python-ptrace; the sets of calls
mtrace traps are defined here by name, so a new architecture needs only its
table.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import msgspec

from .errors import TracerError

# Calls mtrace handles (see "what gets trapped" in DESIGN.md). Only these reach
# the supervisor; every other syscall runs at full speed in the kernel.
FILE_CALLS = (
    "open", "openat", "creat",
    "stat", "lstat", "newfstatat", "statx",
    "access", "faccessat", "faccessat2",
    "readlink", "readlinkat",
    "chdir",
    "truncate",
    "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir",
    "rename", "renameat", "renameat2",
)
NET_CALLS = (
    "socket", "connect", "bind", "listen", "accept", "accept4",
    "sendto", "sendmsg", "getpeername", "getsockname",
)
PROCESS_CALLS = ("execve", "execveat")
DEFAULT_TRAPPED = FILE_CALLS + NET_CALLS + PROCESS_CALLS

# Calls whose arguments mtrace cannot rewrite safely: answered ENOSYS by the
# filter itself so libc falls back to the older call (never EPERM, which libc
# would report to the program).
# io_uring: a ring's operations (openat, read, connect, ...) run in the kernel
# without a system call the filter sees, so they would reach this machine's
# files and network behind mtrace's back. With io_uring_setup answered ENOSYS,
# liburing users, libuv, tokio-uring, Go and glibc fall back to plain calls
# (as under Docker's default seccomp profile); io_uring_enter/register can then
# only be reached with a ring fd from outside the tree.
# File handles: name_to_handle_at would describe this machine's file for a
# path that means the target's, and open_by_handle_at opens any local file by
# handle, around every path rule (callers fall back to paths on ENOSYS).
ENOSYS_CALLS = ("openat2", "io_uring_setup", "name_to_handle_at", "open_by_handle_at")

# Architecture names as `platform.machine()` reports them, and python-ptrace's
# table module for each. aarch64 has no legacy calls (open, stat, ...): names a
# table lacks are skipped when the filter is built.
_TABLE_FILES = {
    "x86_64": "syscall/linux/x86_64.py",
    "aarch64": "syscall/linux/aarch64.py",
}

# python-ptrace's x86_64 table also lists the x32 ABI's own entries (512 and
# up, e.g. a second "execve"); the filter rejects x32 calls, so they are dropped.
_X32_FIRST = {"x86_64": 512}

# Calls newer than python-ptrace's tables, by architecture.
_EXTRA = {
    "x86_64": {425: "io_uring_setup", 426: "io_uring_enter", 427: "io_uring_register",
               428: "open_tree", 429: "move_mount", 430: "fsopen", 431: "fsconfig",
               432: "fsmount", 433: "fspick", 436: "close_range", 442: "mount_setattr",
               439: "faccessat2", 434: "pidfd_open", 438: "pidfd_getfd", 437: "openat2",
               435: "clone3", 448: "process_mrelease", 449: "futex_waitv",
               450: "set_mempolicy_home_node", 451: "cachestat", 452: "fchmodat2"},
    "aarch64": {439: "faccessat2", 434: "pidfd_open", 438: "pidfd_getfd", 437: "openat2",
                435: "clone3", 452: "fchmodat2"},
}


class SyscallTable(msgspec.Struct, frozen=True):
    arch: str
    names: dict[int, str]
    numbers: dict[str, int]

    def name(self, number: int) -> str:
        return self.names.get(number) or f"syscall_{number}"

    def number(self, name: str) -> int:
        try:
            return self.numbers[name]
        except KeyError:
            raise TracerError(
                f"unknown syscall {name!r} on {self.arch}",
                hint="use a name as in `man 2 syscalls`, e.g. openat,connect",
            ) from None

    def numbers_for(self, names: Iterable[str], *, strict: bool = False) -> list[int]:
        """Numbers of the named calls; names this architecture lacks are skipped."""
        if strict:
            return sorted({self.number(name) for name in names})
        return sorted({self.numbers[name] for name in names if name in self.numbers})


def _load_table(relative: str) -> dict[int, str]:
    """python-ptrace's table, read without importing the ``ptrace`` package
    (whose import runs ``ldconfig`` to find libc: ~20 ms of start-up)."""
    spec = importlib.util.find_spec("ptrace")
    if spec is None or not spec.submodule_search_locations:
        raise TracerError("python-ptrace is not installed", hint="pip install python-ptrace")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    # Loaded as a module of its own (never added to sys.modules): its bytecode
    # cache is used, where compiling the source took every run ~2 ms.
    table_spec = importlib.util.spec_from_file_location("mtrace_ptrace_syscall_table", path)
    if table_spec is None or table_spec.loader is None:
        raise TracerError(f"cannot read python-ptrace's syscall table {path}")
    module = importlib.util.module_from_spec(table_spec)
    table_spec.loader.exec_module(module)
    names: dict[int, str] = module.SYSCALL_NAMES
    return names


@cache
def table(arch: str | None = None) -> SyscallTable:
    arch = arch or platform.machine()
    relative = _TABLE_FILES.get(arch)
    if relative is None:
        raise TracerError(f"mtrace does not support the {arch} architecture yet")
    names: dict[int, str] = {number: name for number, name in _load_table(relative).items()
                             if number < _X32_FIRST.get(arch, 1 << 30)}
    names.update(_EXTRA.get(arch, {}))
    numbers = {name: number for number, name in sorted(names.items(), reverse=True)}
    return SyscallTable(arch=arch, names=names, numbers=numbers)
