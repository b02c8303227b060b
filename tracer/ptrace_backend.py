"""The ptrace backend: the same filter with SECCOMP_RET_TRACE, a ptrace tracer.

The fallback where seccomp user notification is missing (old kernels, a
listener already installed, some sandboxes) and ``--backend ptrace``. The exec
helper runs in ``--mode trace``: the tracee waits for GO, the supervisor
PTRACE_SEIZEs it (TRACESECCOMP, TRACECLONE/FORK/VFORK, TRACEEXEC, EXITKILL)
and sends GO, and every trapped call then stops the calling thread in a
seccomp stop. The handlers are the same code as under notify; this module
carries out their outcomes with registers and memory:

- ``CONTINUE``: resume (to the syscall-exit stop when an observer wants the
  result: ptrace sees the kernel's answer to every call, execve included).
- ``Errno``/``ReturnValue``: skip the call (number -1) with the result set in
  the same stop; ``writes`` go in through /proc/PID/mem first.
- ``RewriteArgs``: the bytes go below the stack's red zone, the argument
  registers point at them, and memory and registers are put back at exit.
- ``InjectFd``: ptrace cannot hand over an fd, so the call becomes
  ``openat("/proc/SUPERVISOR/fd/N")`` through the same rewrite (files and
  directories; a socket cannot be reopened and gets ENXIO).
- ``OnTraceeFd``: as under notify (pidfd_getfd works for a tracer).
- ``Defer``: the thread stays stopped until the outcome arrives; the tracer
  keeps serving every other thread meanwhile.

Every ptrace request comes from one thread, the tracer thread, which this
module starts: it waits with ``__WALL | __WNOTHREAD`` so it never reaps the
watchdog (a child of the session's thread). Signal-delivery stops are
re-injected (Go preempts with SIGURG all the time), group-stops are answered
with PTRACE_LISTEN, and the run ends when no traced thread is left.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import ptrace_abi
from .backend import AsyncSide, CallRecord, Handler, Observer, decide, monotonic
from .call import SyscallCall
from .errors import KernelFeatureMissing, TraceeGone, TracerError
from .launcher import Launch
from .memory import TraceeMemory
from .outcome import (
    AfterResult,
    Continue,
    Defer,
    Errno,
    InjectFd,
    OnTraceeFd,
    Outcome,
    ReplaceFd,
    ReturnValue,
    RewriteArgs,
)
from .ptrace_abi import Abi, ThreadGone
from .syscalls import SyscallTable

log = logging.getLogger("mtrace.tracer.ptrace")

AT_FDCWD = -100
# While a deferred outcome is outstanding the tracer polls; a SIGCHLD taken by
# some other thread costs at most this long.
_DEFERRED_POLL_MS = 20
_SFD_NONBLOCK = os.O_NONBLOCK
_SFD_CLOEXEC = os.O_CLOEXEC


@dataclass(slots=True)
class _Restore:
    """What a rewritten call changed, to put back at its syscall-exit stop."""

    arguments: tuple[int, ...]
    number: int
    saved_memory: tuple[int, bytes] | None
    close_fd: int | None = None


@dataclass(slots=True)
class _InFlight:
    """A call the tracer follows to its syscall-exit stop."""

    call: SyscallCall
    outcome: Outcome
    started: float
    token: Any
    restore: _Restore | None = None
    # The call was an execve that succeeded: the old memory image is gone.
    exec_happened: bool = False
    # AfterResult: writes to make once the call succeeded.
    after: Callable[[int], tuple[tuple[int, bytes], ...]] | None = None


@dataclass(slots=True)
class _Thread:
    in_flight: _InFlight | None = None
    # Set while a Defer is outstanding; a stale answer (the thread died, its id
    # was reused) is recognised by identity.
    deferred: object | None = None
    # (registers, call, started, token) of the call waiting for that outcome.
    deferred_call: tuple[Any, SyscallCall, float, Any] | None = None


class PtraceBackend:
    sees_results = True

    def __init__(
        self,
        launch: Launch,
        table: SyscallTable,
        handler: Handler,
        *,
        observer: Observer | None = None,
        async_side: AsyncSide | None = None,
        abi: Abi | None = None,
    ) -> None:
        self.launch = launch
        self.table = table
        self.handler = handler
        self.observer = observer
        self.async_side = async_side
        self.abi = abi or ptrace_abi.abi_for(table.arch)
        self.memory = TraceeMemory()
        self.calls_handled = 0
        self._threads: dict[int, _Thread] = {}
        self._completions: collections.deque[tuple[int, object, Outcome]] = collections.deque()
        self._outstanding = 0
        self._wake_fd = -1
        self._sigchld_fd = -1
        self._error: BaseException | None = None
        # Guards the wake fd against the async side writing to it after close.
        self._wake_lock = threading.Lock()
        self._openat = table.numbers.get("openat", -1)
        self._supervisor_pid = os.getpid()

    # -- the tracer thread -------------------------------------------------

    def run(self) -> None:
        """Attach, let the tracee go, and serve it until every traced thread is gone.

        The work happens on a dedicated tracer thread; the caller waits.
        """
        thread = threading.Thread(target=self._tracer_thread, name="mtrace-ptrace", daemon=True)
        thread.start()
        thread.join()
        if self._error is not None:
            raise self._error

    def _tracer_thread(self) -> None:
        # SIGCHLD is only read through a signalfd (while a Defer is pending);
        # threads this one starts (the async side) inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            if self.abi.arch != "x86_64":
                # aarch64 skips a call through NT_ARM_SYSTEM_CALL: not written yet.
                raise KernelFeatureMissing(f"the ptrace backend does not run on {self.abi.arch} "
                                           "yet", hint="use --backend notify")
            pid = self.launch.tracee_pid
            if pid is None:
                raise TracerError("the exec helper did not report the tracee's pid")
            try:
                ptrace_abi.seize(pid)
            except (OSError, ThreadGone) as exc:
                raise attach_error(exc) from None
            self._threads[pid] = _Thread()
            self.launch.send_go()
            self._serve()
        except BaseException as exc:  # re-raised on the session's thread
            self._error = exc
        finally:
            self.memory.close()
            with self._wake_lock:
                for fd in (self._wake_fd, self._sigchld_fd):
                    if fd >= 0:
                        os.close(fd)
                self._wake_fd = self._sigchld_fd = -1

    def _serve(self) -> None:
        flags = ptrace_abi.WALL | ptrace_abi.WNOTHREAD
        while True:
            if self._outstanding == 0 and not self._completions:
                try:
                    tid, status = os.waitpid(-1, flags)
                except ChildProcessError:
                    return
                self._dispatch(tid, status)
                continue
            # A deferred outcome may arrive from the async side at any time:
            # wait for either that or a tracee stop.
            self._wait_for_wake_or_stop()
            while self._completions:
                tid, marker, outcome = self._completions.popleft()
                self._deferred_arrived(tid, marker, outcome)
            while True:
                try:
                    tid, status = os.waitpid(-1, flags | os.WNOHANG)
                except ChildProcessError:
                    return
                if tid == 0:
                    break
                self._dispatch(tid, status)

    def _open_wake_fds(self) -> None:
        if self._sigchld_fd < 0:
            self._sigchld_fd = _signalfd(signal.SIGCHLD)
        if self._wake_fd < 0:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def _wait_for_wake_or_stop(self) -> None:
        self._open_wake_fds()
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        poller.register(self._sigchld_fd, select.POLLIN)
        for fd, _mask in poller.poll(_DEFERRED_POLL_MS):
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 128)

    # -- stops ---------------------------------------------------------------

    def _dispatch(self, tid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._threads.pop(tid, None)
            self.memory.forget(tid)
            return
        if not os.WIFSTOPPED(status):
            return
        thread = self._threads.get(tid)
        if thread is None:
            # A new thread or child: its first stop may come before the
            # parent's clone/fork event.
            thread = self._threads[tid] = _Thread()
        stop_signal = os.WSTOPSIG(status)
        event = status >> 16
        try:
            if event == ptrace_abi.EVENT_SECCOMP:
                self._on_seccomp_stop(tid, thread)
            elif stop_signal == ptrace_abi.SYSCALL_STOP_SIGNAL:
                self._on_syscall_exit(tid, thread)
            elif event in (ptrace_abi.EVENT_FORK, ptrace_abi.EVENT_VFORK, ptrace_abi.EVENT_CLONE):
                child = ptrace_abi.event_message(tid)
                self._threads.setdefault(child, _Thread())
                self._resume(tid, thread)
            elif event == ptrace_abi.EVENT_EXEC:
                self._on_exec(tid, thread)
            elif event == ptrace_abi.EVENT_STOP:
                if stop_signal in ptrace_abi.GROUP_STOP_SIGNALS:
                    ptrace_abi.listen(tid)
                else:
                    self._resume(tid, thread)
            else:
                # A signal on its way to the tracee: deliver it as it was.
                self._resume(tid, thread, stop_signal)
        except ThreadGone:
            pass  # killed while stopped; its exit is reported next

    def _resume(self, tid: int, thread: _Thread, signal_number: int = 0) -> None:
        ptrace_abi.resume(tid, signal_number, to_syscall_exit=thread.in_flight is not None)

    def _on_exec(self, tid: int, thread: _Thread) -> None:
        former = ptrace_abi.event_message(tid)
        self.memory.forget(tid)
        if former != tid:
            # A non-leader thread exec'd and took the leader's id.
            self.memory.forget(former)
            previous = self._threads.pop(former, None)
            if previous is not None:
                thread = self._threads[tid] = previous
        if thread.in_flight is not None:
            thread.in_flight.exec_happened = True
        self._resume(tid, thread)

    def _on_seccomp_stop(self, tid: int, thread: _Thread) -> None:
        registers = ptrace_abi.get_registers(tid)
        abi = self.abi
        number = abi.number(registers)
        name = self.table.names.get(number) or f"syscall_{number}"
        call = SyscallCall(tid, name, abi.arguments(registers), self.memory, True)
        started = monotonic()
        token = self.observer.on_call(call) if self.observer else None
        outcome = self._decide(call)
        self._carry_out(tid, thread, registers, call, outcome, started, token)

    def _on_syscall_exit(self, tid: int, thread: _Thread) -> None:
        in_flight = thread.in_flight
        thread.in_flight = None
        if in_flight is None:
            ptrace_abi.resume(tid)
            return
        registers = ptrace_abi.get_registers(tid)
        result = self.abi.result(registers)
        restore = in_flight.restore
        try:
            if restore is not None and not in_flight.exec_happened:
                if restore.saved_memory is not None:
                    address, data = restore.saved_memory
                    self._write_quietly(tid, address, data)
                # The result stays; the argument registers (which the kernel
                # preserves across a call) get their values back, and so does
                # the number: a call interrupted by a signal (-ERESTARTSYS) is
                # restarted from them, and is then trapped and decided afresh.
                self.abi.set_arguments(registers, restore.arguments)
                self.abi.set_number(registers, restore.number)
                ptrace_abi.set_registers(tid, registers)
            if in_flight.after is not None and result >= 0:
                try:
                    writes = in_flight.after(result)
                except OSError as error:
                    log.debug("after %s: %s", in_flight.call.name, error)
                    writes = ()
                for address, data in writes:
                    self._write_quietly(tid, address, data)
        finally:
            if restore is not None and restore.close_fd is not None:
                os.close(restore.close_fd)
        ptrace_abi.resume(tid)
        self._record(in_flight.call, in_flight.outcome, in_flight.started, result,
                     in_flight.token)

    # -- outcomes -------------------------------------------------------------

    def _decide(self, call: SyscallCall) -> Outcome:
        return decide(self.handler, call)

    def _carry_out(self, tid: int, thread: _Thread, registers: Any, call: SyscallCall,
                   outcome: Outcome, started: float, token: Any) -> None:
        try:
            match outcome:
                case Continue():
                    if self.observer is not None:
                        thread.in_flight = _InFlight(call, outcome, started, token)
                        ptrace_abi.resume(tid, to_syscall_exit=True)
                    else:
                        ptrace_abi.resume(tid)
                        self.calls_handled += 1
                    return
                case Errno(errno=err):
                    self._skip(tid, registers, -err)
                    self._record(call, outcome, started, -err, token)
                    return
                case ReturnValue(value=value, writes=writes):
                    for address, data in writes:
                        call.write(address, data)
                    self._skip(tid, registers, value)
                    self._record(call, outcome, started, value, token)
                    return
                case RewriteArgs(pointers=pointers, values=values):
                    self._rewrite(tid, thread, registers, call, outcome, started, token,
                                  dict(pointers), dict(values))
                    return
                case AfterResult(after=after):
                    thread.in_flight = _InFlight(call, outcome, started, token, after=after)
                    ptrace_abi.resume(tid, to_syscall_exit=True)
                    return
                case InjectFd():
                    self._inject_by_reopen(tid, thread, registers, call, outcome, started, token)
                    return
                case ReplaceFd(fd=fd):
                    # No fd can be installed at a number from here.
                    os.close(fd)
                    self._skip(tid, registers, -errno.ENOSYS)
                    self._record(call, outcome, started, -errno.ENOSYS, token)
                    return
                case OnTraceeFd(tracee_fd=tracee_fd, action=action):
                    follow_up = self._act_on_fd(call, tracee_fd, action)
                    self._carry_out(tid, thread, registers, call, follow_up, started, token)
                    return
                case Defer(coroutine=coroutine):
                    self._defer(tid, thread, registers, call, coroutine, started, token)
                    return
        except ThreadGone:
            return
        except TraceeGone:
            return
        except OSError as exc:
            # The outcome could not be carried out (a write into a bad buffer):
            # the tracee sees the kernel's reason.
            err = exc.errno or errno.EIO
            self._skip(tid, registers, -err)
            self._record(call, outcome, started, -err, token)

    def _skip(self, tid: int, registers: Any, value: int) -> None:
        self.abi.skip_with(registers, value)
        ptrace_abi.set_registers(tid, registers)
        ptrace_abi.resume(tid)

    def _rewrite(self, tid: int, thread: _Thread, registers: Any, call: SyscallCall,
                 outcome: Outcome, started: float, token: Any,
                 pointers: dict[int, bytes], values: dict[int, int],
                 number: int | None = None, close_fd: int | None = None) -> None:
        abi = self.abi
        original = abi.arguments(registers)
        original_number = abi.number(registers)
        saved = None
        if pointers:
            blobs = [(index, data) for index, data in sorted(pointers.items())]
            # Each blob 16-byte aligned, laid out upwards from the scratch base.
            sizes = [(len(data) + 15) & ~15 for _index, data in blobs]
            total = sum(sizes)
            base = abi.scratch_below_stack(abi.stack_pointer(registers), total)
            saved = (base, call.read(base, total))
            image = bytearray(total)
            offset = 0
            for (index, data), size in zip(blobs, sizes, strict=True):
                image[offset:offset + len(data)] = data
                abi.set_argument(registers, index, base + offset)
                offset += size
            call.write(base, bytes(image))
        for index, value in values.items():
            abi.set_argument(registers, index, value)
        if number is not None:
            abi.set_number(registers, number)
        try:
            ptrace_abi.set_registers(tid, registers)
        except BaseException:
            if saved is not None:
                self._write_quietly(tid, *saved)
            raise
        thread.in_flight = _InFlight(call, outcome, started, token,
                                     _Restore(original, original_number, saved, close_fd))
        ptrace_abi.resume(tid, to_syscall_exit=True)

    def _inject_by_reopen(self, tid: int, thread: _Thread, registers: Any, call: SyscallCall,
                          outcome: Outcome, started: float, token: Any) -> None:
        assert isinstance(outcome, InjectFd)
        fd = outcome.fd
        try:
            for address, data in outcome.writes:
                call.write(address, data)
            status_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            if outcome.close_after:
                os.close(fd)
            raise
        # Access mode, append and non-blocking survive a reopen; creation
        # flags must not be replayed (the file exists and may be truncated).
        keep = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECTORY | os.O_PATH
        flags = (status_flags & keep) | (os.O_CLOEXEC if outcome.cloexec else 0)
        path = f"/proc/{self._supervisor_pid}/fd/{fd}".encode() + b"\0"
        self._rewrite(tid, thread, registers, call, outcome, started, token,
                      {1: path}, {0: AT_FDCWD, 2: flags, 3: 0}, number=self._openat,
                      close_fd=fd if outcome.close_after else None)

    def _act_on_fd(self, call: SyscallCall, tracee_fd: int,
                   action: Callable[[int], Outcome]) -> Outcome:
        from .seccomp import take_tracee_fd

        try:
            local_fd = take_tracee_fd(call.tid, tracee_fd)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise TraceeGone(f"thread {call.tid} is gone") from exc
            return Errno(errno.EBADF if exc.errno in (errno.EBADF, errno.ENOENT) else exc.errno or errno.EIO)
        try:
            return action(local_fd)
        except OSError as exc:
            return Errno(exc.errno or errno.EIO)
        finally:
            os.close(local_fd)

    def _defer(self, tid: int, thread: _Thread, registers: Any, call: SyscallCall,
               coroutine: Any, started: float, token: Any) -> None:
        if self.async_side is None:
            coroutine.close()
            self._carry_out(tid, thread, registers, call, Errno(errno.ENOSYS), started, token)
            return
        marker = object()
        thread.deferred = marker
        thread.deferred_call = (registers, call, started, token)
        self._outstanding += 1
        completions = self._completions

        async def finish() -> None:
            try:
                outcome = await coroutine
            except OSError as exc:
                outcome = Errno(exc.errno or errno.EIO)
            except Exception:
                log.exception("deferred handler for %s failed", call.name)
                outcome = Errno(errno.EIO)
            with self._wake_lock:
                if self._wake_fd >= 0:  # else the tracer is gone: nobody to answer
                    completions.append((tid, marker, outcome))
                    os.eventfd_write(self._wake_fd, 1)

        self._open_wake_fds()  # before the coroutine can finish
        self.async_side.submit(finish())

    def _deferred_arrived(self, tid: int, marker: object, outcome: Outcome) -> None:
        self._outstanding -= 1
        thread = self._threads.get(tid)
        if thread is None or thread.deferred is not marker:
            return  # the thread died meanwhile
        thread.deferred = None
        assert thread.deferred_call is not None
        registers, call, started, token = thread.deferred_call
        thread.deferred_call = None
        self._carry_out(tid, thread, registers, call, outcome, started, token)

    # -- helpers ----------------------------------------------------------------

    def _write_quietly(self, tid: int, address: int, data: bytes) -> None:
        try:
            self.memory.write(tid, address, data)
        except (OSError, TraceeGone):
            log.debug("could not restore %d bytes at %#x in %d", len(data), address, tid)

    def _record(self, call: SyscallCall, outcome: Outcome, started: float, result: int | None,
                token: Any) -> None:
        self.calls_handled += 1
        if self.observer is not None:
            self.observer.on_result(CallRecord(call, started, monotonic(), outcome, result), token)


def attach_error(exc: BaseException) -> TracerError:
    err = getattr(exc, "errno", None) or errno.ESRCH
    reason = os.strerror(err)
    if err == errno.EPERM:
        return KernelFeatureMissing(
            f"cannot attach to the tracee with ptrace ({reason})",
            hint="ptrace needs CAP_SYS_PTRACE or kernel.yama.ptrace_scope <= 1, and no other "
                 "tracer (is mtrace itself running under a debugger or strace?)",
        )
    return TracerError(f"cannot attach to the tracee with ptrace ({reason})")


_libc = ctypes.CDLL(None, use_errno=True)


def _signalfd(signal_number: int) -> int:
    mask = (ctypes.c_ulong * 16)()
    mask[(signal_number - 1) // 64] |= 1 << ((signal_number - 1) % 64)
    fd = _libc.signalfd(-1, ctypes.byref(mask), _SFD_NONBLOCK | _SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)
