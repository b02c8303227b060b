"""The raw ptrace interface the ptrace backend needs beyond python-ptrace.

python-ptrace's binding (``ptrace.binding``) gives the ``ptrace()`` call, the
register struct and the classic requests; its high-level debugger knows
neither PTRACE_SEIZE nor the seccomp event. This module adds those requests
and options, and an ``Abi`` per architecture: which registers hold the syscall
number, the arguments, the result and the stack pointer, and how a call is
skipped. Nothing here decides anything; ``mtrace.tracer.ptrace_backend`` does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ptrace import PtraceError
from ptrace.binding import func as _binding

from .call import signed64
from .errors import KernelFeatureMissing

# Requests and options python-ptrace does not define (linux/ptrace.h).
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

O_TRACESYSGOOD = _binding.PTRACE_O_TRACESYSGOOD
O_TRACEFORK = _binding.PTRACE_O_TRACEFORK
O_TRACEVFORK = _binding.PTRACE_O_TRACEVFORK
O_TRACECLONE = _binding.PTRACE_O_TRACECLONE
O_TRACEEXEC = _binding.PTRACE_O_TRACEEXEC
O_TRACESECCOMP = 0x80
O_EXITKILL = 0x100000

EVENT_FORK = _binding.PTRACE_EVENT_FORK
EVENT_VFORK = _binding.PTRACE_EVENT_VFORK
EVENT_CLONE = _binding.PTRACE_EVENT_CLONE
EVENT_EXEC = _binding.PTRACE_EVENT_EXEC
EVENT_SECCOMP = 7
EVENT_STOP = 128

# With TRACESYSGOOD a syscall stop reports SIGTRAP with this bit set.
SYSCALL_STOP_SIGNAL = signal.SIGTRAP | 0x80
GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

TRACER_OPTIONS = (O_TRACESYSGOOD | O_TRACESECCOMP | O_TRACECLONE | O_TRACEFORK
                  | O_TRACEVFORK | O_TRACEEXEC | O_EXITKILL)

# wait(2) flags: every kind of child (threads too), and only the calling
# thread's tracees, so the tracer never reaps a child some other thread started.
WALL = 0x40000000
WNOTHREAD = 0x20000000


class ThreadGone(Exception):
    """The thread a request named no longer exists (or is no longer stopped)."""


def _request(command: int, tid: int, address: int = 0, data: int = 0) -> int:
    try:
        return int(_binding.ptrace(command, tid, address, data))
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise ThreadGone(tid) from None
        raise OSError(exc.errno or errno.EIO, os.strerror(exc.errno or errno.EIO)) from None


def seize(pid: int, options: int = TRACER_OPTIONS) -> None:
    """Attach without stopping the process (signals and group-stops stay intact)."""
    _request(PTRACE_SEIZE, pid, 0, options)


def resume(tid: int, signal_number: int = 0, *, to_syscall_exit: bool = False) -> None:
    """PTRACE_CONT, or PTRACE_SYSCALL when the tracer wants the syscall-exit stop."""
    command = _binding.PTRACE_SYSCALL if to_syscall_exit else _binding.PTRACE_CONT
    _request(command, tid, 0, signal_number)


def listen(tid: int) -> None:
    """Leave a group-stopped tracee stopped, but let SIGCONT (and SIGKILL) reach it."""
    _request(PTRACE_LISTEN, tid)


def event_message(tid: int) -> int:
    message = ctypes.c_ulong()
    _request(_binding.PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(message))
    return message.value


def get_registers(tid: int) -> Any:
    try:
        return _binding.ptrace_getregs(tid)
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise ThreadGone(tid) from None
        raise OSError(exc.errno or errno.EIO, os.strerror(exc.errno or errno.EIO)) from None


def set_registers(tid: int, registers: Any) -> None:
    try:
        _binding.ptrace_setregs(tid, registers)
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise ThreadGone(tid) from None
        raise OSError(exc.errno or errno.EIO, os.strerror(exc.errno or errno.EIO)) from None


@dataclass(frozen=True)
class Abi:
    """Where an architecture keeps a syscall's number, arguments and result."""

    arch: str
    number_register: str
    argument_registers: tuple[str, ...]
    result_register: str
    stack_register: str
    # Bytes below the stack pointer that leaf code may use without moving it.
    red_zone: int
    stack_alignment: int = 16

    def number(self, registers: Any) -> int:
        return signed64(getattr(registers, self.number_register))

    def arguments(self, registers: Any) -> tuple[int, ...]:
        return tuple(getattr(registers, name) for name in self.argument_registers)

    def set_argument(self, registers: Any, index: int, value: int) -> None:
        setattr(registers, self.argument_registers[index], value & 0xFFFFFFFFFFFFFFFF)

    def set_arguments(self, registers: Any, values: Sequence[int]) -> None:
        for index, value in enumerate(values):
            self.set_argument(registers, index, value)

    def result(self, registers: Any) -> int:
        return signed64(getattr(registers, self.result_register))

    def set_number(self, registers: Any, number: int) -> None:
        setattr(registers, self.number_register, number & 0xFFFFFFFFFFFFFFFF)

    def skip_with(self, registers: Any, value: int) -> None:
        """Make the stopped call not run and return ``value`` (at the seccomp stop)."""
        self.set_number(registers, -1)
        setattr(registers, self.result_register, value & 0xFFFFFFFFFFFFFFFF)

    def stack_pointer(self, registers: Any) -> int:
        return int(getattr(registers, self.stack_register))

    def scratch_below_stack(self, stack_pointer: int, size: int) -> int:
        """Where ``size`` bytes can sit while the call runs: below the red zone,
        aligned. The caller saves and restores what was there (a Go goroutine's
        stack is a small heap block, so nothing below it is free to keep)."""
        return (stack_pointer - self.red_zone - size) & ~(self.stack_alignment - 1)


X86_64 = Abi(
    arch="x86_64",
    number_register="orig_rax",
    argument_registers=("rdi", "rsi", "rdx", "r10", "r8", "r9"),
    result_register="rax",
    stack_register="rsp",
    red_zone=128,
)

# aarch64 is designed in, not yet exercised: x8 holds the number, x0 both the
# first argument and the result, and skipping a call needs NT_ARM_SYSTEM_CALL
# (regset 0x404) rather than the general registers.
AARCH64 = Abi(
    arch="aarch64",
    number_register="r8",
    argument_registers=("r0", "r1", "r2", "r3", "r4", "r5"),
    result_register="r0",
    stack_register="sp",
    red_zone=0,
)

_ABIS = {"x86_64": X86_64, "aarch64": AARCH64}


def abi_for(arch: str | None = None) -> Abi:
    arch = arch or platform.machine()
    try:
        return _ABIS[arch]
    except KeyError:
        raise KernelFeatureMissing(f"the ptrace backend does not support {arch} yet",
                                   hint="use --backend notify") from None
