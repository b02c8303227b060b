"""The one vocabulary of decisions.

A handler looks at a trapped call and returns an outcome value; the backend
(seccomp notify or ptrace) carries it out. Handlers never touch the kernel
interface themselves.

- ``CONTINUE``: let the kernel run the call as the tracee made it.
- ``ReturnValue``: skip the call; the tracee sees this value, after ``writes``
  (address, bytes) were stored into its memory (a stat buffer, a sockaddr).
- ``Errno``: skip the call; the tracee sees ``-1`` with this errno.
- ``InjectFd``: skip the call; a supervisor fd is installed in the tracee and
  its number is the call's result (openat of a shadow file, socket(),
  accept()), after ``writes`` were stored as for ``ReturnValue``.
- ``ReplaceFd``: skip the call; a supervisor fd takes the place of the
  tracee's fd ``tracee_fd`` (an atomic ``dup2`` into the tracee), then the call
  returns ``then`` (a socket made in the target's namespace, connected for the
  program). Backends that cannot install an fd at a number (ptrace) answer
  ``ENOSYS``; handlers offer it only where ``not call.sees_results``.
- ``OnTraceeFd``: act on the tracee's own object: the backend duplicates the
  tracee's fd into the supervisor (``pidfd_getfd``), calls ``action`` with it,
  and carries out the outcome ``action`` returns (connect a tracee socket to a
  relay and return exactly the kernel's answer).
- ``RewriteArgs``: let the kernel run the call with some arguments replaced:
  ``pointers`` maps an argument index to the bytes it should point at (a path,
  a sockaddr), ``values`` an index to a new integer (an address length). The
  ptrace backend places the bytes in scratch memory below the caller's stack
  and restores memory and registers at syscall exit. Only backends that see
  results (``call.sees_results``) carry it out; under seccomp notify the
  handler emulates the call instead.
- ``AfterResult``: let the kernel run the call, then, once it succeeded,
  store ``after(result)``'s writes into the tracee's memory (accept's peer
  address). Only backends that see results carry it out (ptrace); under
  notify the handler emulates the call instead.
- ``Defer``: the answer needs the agent; the backend runs the coroutine on the
  async side and carries out the outcome it returns, so one slow remote call
  never stalls the tracee's other threads.

The outcomes, like the tracer's other small value types, are msgspec Structs
rather than dataclasses: making a frozen slotted dataclass compiles its methods
at import (about 1 ms each, 20-45 ms of every run's start-up for the classes a
session imports), a Struct class is made in C in about 40 µs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import msgspec


class Continue(msgspec.Struct, frozen=True):
    pass


CONTINUE = Continue()


class ReturnValue(msgspec.Struct, frozen=True):
    value: int
    writes: tuple[tuple[int, bytes], ...] = ()


class Errno(msgspec.Struct, frozen=True):
    errno: int


class InjectFd(msgspec.Struct, frozen=True):
    fd: int
    cloexec: bool = False
    # The supervisor's copy is closed once the tracee has its own.
    close_after: bool = True
    # Stored into the tracee's memory first (accept's peer address).
    writes: tuple[tuple[int, bytes], ...] = ()


class ReplaceFd(msgspec.Struct, frozen=True):
    fd: int
    tracee_fd: int
    then: ReturnValue | Errno
    cloexec: bool = False
    # The supervisor's copy is always closed once carried out (or not).


class OnTraceeFd(msgspec.Struct, frozen=True):
    tracee_fd: int
    action: Callable[[int], Outcome]


class RewriteArgs(msgspec.Struct, frozen=True):
    pointers: Mapping[int, bytes] = msgspec.field(default_factory=dict)
    values: Mapping[int, int] = msgspec.field(default_factory=dict)


class Defer(msgspec.Struct, frozen=True):
    coroutine: Coroutine[Any, Any, Outcome]


class AfterResult(msgspec.Struct, frozen=True):
    after: Callable[[int], tuple[tuple[int, bytes], ...]]


Outcome = (Continue | ReturnValue | Errno | InjectFd | ReplaceFd | OnTraceeFd | RewriteArgs
           | Defer | AfterResult)


def errno_of(exc: OSError) -> Errno:
    """The outcome that reports ``exc`` to the tracee as the kernel would."""
    import errno as errno_module

    return Errno(exc.errno or errno_module.EIO)
