"""Running one command under the trap: launch, serve, forward signals, report.

This is the tracer's entry point for the CLI: ``run(Session(...))`` returns the
exit code the command would have had on its own (128+N for a signal death).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import msgspec

from . import seccomp
from .backend import AsyncSide, Handler, Handlers, Observer
from .errors import KernelFeatureMissing, TracerError
from .launcher import Kind, Launch
from .notify import NotifyBackend
from .signals import FORWARDED_SIGNALS, SI_KERNEL
from .syscalls import DEFAULT_TRAPPED, ENOSYS_CALLS, table

log = logging.getLogger("mtrace.tracer.session")



class Session(msgspec.Struct):
    argv: Sequence[str]
    handlers: Handler = msgspec.field(default_factory=Handlers)
    trapped: Sequence[str] = DEFAULT_TRAPPED
    # Calls trapped only when an argument is not NULL, by name: argument index
    # (recvfrom with a source-address buffer; plain recv() never reaches us).
    trap_if_nonzero: dict[str, int] = msgspec.field(default_factory=dict)
    observer: Observer | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    async_side: AsyncSide | None = None
    backend: str = "notify"
    strict_names: bool = False


class _SignalForwarder:
    """Forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to mtrace to the tracee.

    The signals are blocked and taken with sigwaitinfo, so the terminal's own
    Ctrl-C (which the tracee, in the same process group, already receives) is
    told apart from a ``kill`` aimed at mtrace and is not delivered twice. A
    signal taken before the tracee's pid is known (it was pending while the
    session started, or came while the helper forked) is kept and delivered
    the moment the pid is set: dropping it would leave the program running
    after a Ctrl-C that mtrace had already acknowledged.
    """

    def __init__(self) -> None:
        self._target: int | None = None
        self._held: list[int] = []
        self._lock = threading.Lock()
        self._done = False
        self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        self._thread = threading.Thread(target=self._run, name="mtrace-signals", daemon=True)
        self._thread.start()

    @property
    def target(self) -> int | None:
        return self._target

    @target.setter
    def target(self, pid: int | None) -> None:
        with self._lock:
            self._target = pid
            held, self._held = self._held, []
        for signum in held:
            self._send(signum)

    def _run(self) -> None:
        while not self._done:
            info = signal.sigwaitinfo(FORWARDED_SIGNALS)
            if self._done:
                return
            with self._lock:
                if self._target is None:
                    # Before the tracee exists the terminal's Ctrl-C reached
                    # no program either: keep it too.
                    self._held.append(info.si_signo)
                    continue
            if info.si_code == SI_KERNEL and info.si_signo in (signal.SIGINT, signal.SIGQUIT):
                continue
            self._send(info.si_signo)

    def _send(self, signum: int) -> None:
        if self._target is None:
            return
        try:
            os.kill(self._target, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self._done = True
        if self._thread.is_alive() and self._thread.ident is not None:
            signal.pthread_kill(self._thread.ident, signal.SIGHUP)
            self._thread.join(timeout=1)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)


BACKENDS = ("auto", "notify", "ptrace")


def run(session: Session) -> int:
    """Run the session's command under the trap; its exit code.

    ``auto`` uses seccomp notify and falls back to ptrace, with one line on
    stderr, where the kernel lacks a feature or a listener is already installed.
    """
    if session.backend == "auto":
        try:
            return _run(session, "notify")
        except KernelFeatureMissing as error:
            sys.stderr.write(f"mtrace: {error.message}; using the ptrace backend\n")
            return _run(session, "ptrace")
    if session.backend not in BACKENDS:
        raise TracerError(f"unknown backend {session.backend!r}",
                          hint="use --backend auto, notify or ptrace")
    return _run(session, session.backend)


def _run(session: Session, backend_name: str) -> int:
    syscall_table = table()
    trap = syscall_table.numbers_for(session.trapped, strict=session.strict_names)
    enosys = syscall_table.numbers_for(ENOSYS_CALLS)
    # The ptrace tracer reads SIGCHLD from a signalfd; no other thread may take it.
    chld_mask = (signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
                 if backend_name == "ptrace" else None)
    forwarder = _SignalForwarder()
    launch: Launch | None = None
    # The supervisor's umask is cleared so files it creates for the tracee get
    # exactly the tracee's mode; the tracee itself keeps the user's.
    user_umask = os.umask(0)
    try:
        trap_if = {syscall_table.number(name): index
                   for name, index in session.trap_if_nonzero.items() if name in session.trapped}
        launch = Launch(session.argv, mode="notify" if backend_name == "notify" else "trace",
                        trap=trap, enosys=enosys, trap_if=trap_if,
                        env=session.env, cwd=session.cwd, umask=user_umask)
        if backend_name == "ptrace":
            from .ptrace_backend import PtraceBackend

            launch.wait_for(Kind.TRACEE_PID)
            forwarder.target = launch.tracee_pid
            PtraceBackend(launch, syscall_table, session.handlers, observer=session.observer,
                          async_side=session.async_side).run()
            return launch.wait_exit(timeout=None)
        message = launch.wait_for(Kind.LISTENER)
        assert message.fd is not None
        listener = seccomp.Listener(message.fd)
        if launch.tracee_pid is None:
            launch.wait_for(Kind.TRACEE_PID)
        forwarder.target = launch.tracee_pid
        backend = NotifyBackend(listener, syscall_table, session.handlers,
                                observer=session.observer, async_side=session.async_side)
        try:
            backend.run(should_stop=lambda: launch is not None and launch.watchdog.poll() is not None)
        finally:
            listener.close()
        return launch.wait_exit(timeout=None)
    except TracerError:
        if launch is not None:
            _stop(launch)
        raise
    finally:
        forwarder.close()
        if chld_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, chld_mask)
        os.umask(user_umask)
        if launch is not None:
            launch.close()


def _stop(launch: Launch) -> None:
    if launch.watchdog.poll() is None:
        launch.watchdog.kill()
    launch.watchdog.wait()


def ptrace_probe() -> tuple[bool, str]:
    """Whether the ptrace backend works here: a short command is run under it
    and must make at least one trapped call. For ``mtrace doctor``."""
    from .call import SyscallCall
    from .outcome import CONTINUE, Outcome

    seen: list[str] = []

    def count(call: SyscallCall) -> Outcome:
        seen.append(call.name)
        return CONTINUE

    session = Session(argv=[sys.executable, "-S", "-c", "open('/dev/null').close()"],
                      handlers=count, trapped=("openat", "open"), backend="ptrace")
    try:
        code = run(session)
    except TracerError as error:
        return False, error.message + (f" ({error.hint})" if error.hint else "")
    except Exception as error:  # doctor reports, never crashes
        return False, f"{type(error).__name__}: {error}"
    if code != 0:
        return False, f"a test command exited {code} under ptrace"
    if not seen:
        return False, "no seccomp stop was reported (SECCOMP_RET_TRACE not delivered?)"
    return True, f"seccomp RET_TRACE + PTRACE_SEIZE work ({len(seen)} calls trapped)"
