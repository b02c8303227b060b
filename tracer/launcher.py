"""Starting a tracee through the exec helper, and the control socket protocol.

The helper (``tracer/helper/exec_helper.c``) forks a watchdog and the tracee;
both talk to the supervisor over one SOCK_SEQPACKET pair, one fixed-size
message each: the tracee's pid, the listener's fd number in the tracee (the
supervisor takes it with pidfd_getfd and answers GO), errors with the stage
they happened at, and finally the tracee's wait status.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from .errors import KernelFeatureMissing, TracerError
from .seccomp import BIN, take_tracee_fd

_MESSAGE = struct.Struct("=iiqii")

#: Who starts the helper in notify mode, where not this process: the resident
#: mtrace's session has the `mtrace exec` command start it, so that the program
#: is the terminal's (cli/resident_server.py). Called as
#: ``SPAWNER(command, helper_end, control=, env=, cwd=, umask=)`` (``control``:
#: the supervisor's end); returns what Launch keeps as its watchdog (``pid``,
#: ``poll``, ``wait``, ``kill``), raises OSError.
SPAWNER: Callable[..., Any] | None = None


class Kind(enum.IntEnum):
    TRACEE_PID = 1
    LISTENER = 2
    ERROR = 3
    EXIT = 4
    READY = 5
    GO = 6


class Stage(enum.IntEnum):
    NONE = 0
    NO_NEW_PRIVS = 1
    FILTER = 2
    SEND_LISTENER = 3
    EXEC = 4
    FORK = 5
    WAIT_GO = 6


class ControlMessage(msgspec.Struct, frozen=True):
    kind: Kind
    stage: Stage
    value: int
    sender: int
    # LISTENER: the listener, already duplicated into the supervisor.
    fd: int | None = None


def helper_path() -> Path:
    """The compiled exec helper shipped in the package (built by ``pip install``)."""
    override = os.environ.get("MTRACE_EXEC_HELPER")
    if override:
        return Path(override)
    path = BIN / "mtrace-exec"
    if not path.exists():
        raise TracerError(
            f"the exec helper is missing ({path})",
            hint="reinstall mtrace with `pip install .` so the helper is compiled",
        )
    return path


def _resolve_command(name: str, env: dict[str, str] | None) -> str | None:
    """The file execvp would run for ``name`` (None: let the helper's execvp
    search and report the error)."""
    if "/" in name:
        return None
    search = (env if env is not None else os.environ).get("PATH", os.defpath)
    return shutil.which(name, path=search)


def wait_status_to_exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 125


class Launch:
    """A started helper: the watchdog process and the control socket."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        mode: str,
        trap: Sequence[int],
        enosys: Sequence[int],
        trap_if: dict[int, int] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        umask: int = -1,
    ) -> None:
        if not argv:
            raise TracerError("no command to run", hint="put the command after `--`")
        supervisor_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control = supervisor_end
        command = [
            str(helper_path()),
            "--ctl", str(helper_end.fileno()),
            "--mode", mode,
            "--trap", ",".join(map(str, trap)),
            "--enosys", ",".join(map(str, enosys)),
            *(["--trap-if", ",".join(f"{nr}:{arg}" for nr, arg in trap_if.items())]
              if trap_if else []),
            *(["--exec-path", resolved] if (resolved := _resolve_command(argv[0], env)) else []),
            "--", *argv,
        ]
        try:
            if SPAWNER is not None and mode == "notify":
                self.watchdog = SPAWNER(command, helper_end, control=supervisor_end,
                                        env=env, cwd=cwd, umask=umask)
            else:
                self.watchdog = subprocess.Popen(
                    command, pass_fds=[helper_end.fileno()], env=env, cwd=cwd, umask=umask,
                    close_fds=True,
                )
        except OSError as exc:
            supervisor_end.close()
            raise TracerError(f"cannot start the exec helper: {exc.strerror}") from exc
        finally:
            helper_end.close()
        self.tracee_pid: int | None = None
        self.exit_status: int | None = None
        self.exec_error: int | None = None

    def receive(self, timeout: float | None) -> ControlMessage | None:
        """The next control message; None on timeout or when the helper side closed."""
        if timeout is not None:
            ready, _, _ = select.select([self.control], [], [], timeout)
            if not ready:
                return None
        try:
            data = self.control.recv(_MESSAGE.size)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if len(data) != _MESSAGE.size:
            return None
        kind, stage, value, sender, tracee_fd = _MESSAGE.unpack(data)
        received_fd = None
        if kind == Kind.LISTENER:
            received_fd = self._take_listener(sender, tracee_fd)
        message = ControlMessage(Kind(kind), Stage(stage), value, sender, received_fd)
        self._note(message)
        return message

    def _take_listener(self, tracee: int, tracee_fd: int) -> int:
        """Duplicate the tracee's listener into the supervisor, then let it exec."""
        try:
            listener = take_tracee_fd(tracee, tracee_fd)
        except OSError as exc:
            raise KernelFeatureMissing(
                f"cannot take the seccomp listener from the tracee: {exc.strerror}",
                hint="pidfd_getfd needs Linux 5.6+ and ptrace permission; see `mtrace doctor`",
            ) from exc
        self.send_go()
        return listener

    def _note(self, message: ControlMessage) -> None:
        if message.kind is Kind.TRACEE_PID:
            self.tracee_pid = message.value
        elif message.kind is Kind.EXIT:
            self.exit_status = message.value
        elif message.kind is Kind.ERROR and message.stage is Stage.EXEC:
            self.exec_error = message.value

    def send_go(self) -> None:
        self.control.send(_MESSAGE.pack(Kind.GO, Stage.NONE, 0, os.getpid(), -1))

    def wait_for(self, wanted: Kind, timeout: float = 10.0) -> ControlMessage:
        """Read control messages until one of kind ``wanted``; a setup error raises."""
        while True:
            message = self.receive(timeout)
            if message is None:
                code = self.watchdog.poll()
                raise TracerError(
                    "the exec helper stopped before the tracee started"
                    + (f" (exit {code})" if code is not None else " (timed out)"),
                )
            if message.kind is wanted:
                return message
            if message.kind is Kind.ERROR:
                raise _setup_error(message)
            if message.kind is Kind.LISTENER and message.fd is not None and wanted is not Kind.LISTENER:
                os.close(message.fd)

    def wait_exit(self, timeout: float | None = None) -> int:
        """The tracee's exit code (shell convention), once the whole tree is gone."""
        while self.exit_status is None:
            message = self.receive(timeout)
            if message is None:
                break
            if message.fd is not None:
                os.close(message.fd)
        code = self.watchdog.wait(timeout)
        if self.exit_status is not None and self.exit_status >= 0:
            return wait_status_to_exit_code(self.exit_status)
        return code if code >= 0 else 128 - code

    def close(self) -> None:
        self.control.close()


def _setup_error(message: ControlMessage) -> TracerError:
    err = message.value
    reason = os.strerror(err) if err > 0 else "unknown error"
    if message.stage is Stage.FILTER:
        if err == errno.EBUSY:
            return KernelFeatureMissing(
                "a seccomp listener is already installed for this process tree",
                hint="run with --backend ptrace (nested mtrace or a sandbox that uses seccomp notify)",
            )
        if err in (errno.EINVAL, errno.ENOSYS):
            return KernelFeatureMissing(
                f"the kernel refused the seccomp filter ({reason})",
                hint="seccomp user notification needs Linux 5.0+; try --backend ptrace, see `mtrace doctor`",
            )
        return TracerError(f"cannot install the seccomp filter: {reason}", hint="see `mtrace doctor`")
    if message.stage is Stage.NO_NEW_PRIVS:
        return TracerError(f"cannot set no_new_privs: {reason}", hint="see `mtrace doctor`")
    return TracerError(f"the exec helper failed at {message.stage.name.lower()}: {reason}")
