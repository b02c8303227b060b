"""The resident mtrace process: a run's imports paid once, not at every run.

`mtrace resident start` leaves this process running for the user. It imports
what `mtrace exec` needs (the config, the agent client and the local agent's
server, asyncio and uvloop, the tracer and its features), then waits on a Unix
socket in a directory only the user can enter. Each `mtrace exec` that finds
the socket hands its run over (cli/resident.py); the resident checks that the
peer is the same user, in the same namespaces, of the same install, and forks
a session for it. The
session takes the command's stdin, stdout and stderr, working directory,
environment and umask, and runs `mtrace exec` exactly as the command would
have (cli/main.py's run_command), except that the exec helper is started by
the command (``launcher.SPAWNER``): the program stays the terminal's.

The resident itself never runs a session, holds no thread and no agent: each
session is a fresh fork of the same imported state. It notices an upgraded
install (any file of mtrace's packages or of a module it imported changed
since it started): it then refuses the run, which the command makes itself,
and exits. It exits after ``idle`` seconds without a run, on
`mtrace resident stop`, and on SIGTERM; it removes its socket when it does.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

from .resident import (
    LOST_EXIT,
    REVISION,
    ProtocolError,
    close_all,
    current_umask,
    identity,
    namespaces,
    peer_uid,
    receive,
    send,
)

#: What a run with a target imports (found with `python -X importtime`);
#: anything missing here is imported by the session, as it would be anyway.
PRELOADED = (
    "asyncio", "uvloop", "msgspec", "concurrent.futures", "tempfile", "shutil", "subprocess",
    "mtrace.cli.main", "mtrace.cli.commands", "mtrace.cli.config", "mtrace.cli.run",
    "mtrace.cli.target", "mtrace.cli.local_agent", "mtrace.cli.summary", "mtrace.cli.scratch",
    "mtrace.tracer.session", "mtrace.tracer.backend", "mtrace.tracer.notify",
    "mtrace.tracer.passthrough", "mtrace.tracer.features.env", "mtrace.tracer.features.remote",
    "mtrace.tracer.features.files", "mtrace.tracer.features.net",
    "mtrace.tracer.features.incoming", "mtrace.tracer.features.hostname",
    "mtrace.agent.client", "mtrace.agent.server", "mtrace.agent.channel",
    # The agent's, imported at its start (names) or at a feature's first use:
    # dnspython alone is ~80 ms, which a forked agent would pay at every run.
    "dns.asyncresolver", "dns.resolver", "h11", "h2.connection", "h2.config", "h2.events",
)

#: How long a connecting command has to send its first frame.
HELLO_TIMEOUT = 5.0


class ResidentError(Exception):
    """The resident cannot start (its directory, its socket)."""


def preload() -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    # What is built at its first use and cached, built once here for every session.
    from ..agent import protocol
    from ..tracer import seccomp
    from ..tracer.features.files import PathPolicy
    from ..tracer.syscalls import table
    from .commands import revalidate
    from .config import Config

    table()  # python-ptrace's syscall table
    protocol.build_decoders()
    seccomp.native_library()  # the C loop and checks, loaded with ctypes
    config = revalidate(Config())  # msgspec's view of the config's types
    PathPolicy(config.feature.fs)  # the default patterns, in re's cache


def install_stamp() -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of mtrace's packages (the helper and the
    notify library included) and of every module imported so far."""
    files: set[str] = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            files.add(path)
    for package in ("mtrace.agent", "mtrace.cli", "mtrace.tracer"):
        root = os.path.dirname(importlib.import_module(package).__file__ or "")
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
            files.update(os.path.join(directory, name) for name in names)
    stamp: dict[str, tuple[int, int]] = {}
    for path in files:
        try:
            info = os.stat(path)
        except OSError:
            continue
        stamp[path] = (info.st_mtime_ns, info.st_size)
    return stamp


def prepare_directory(path: str) -> None:
    """The socket's directory exists, is the user's, and is closed to others."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as error:
        raise ResidentError(f"cannot make {directory}: {error.strerror}") from error
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ResidentError(f"{directory} is not the user's own, closed to others (mode "
                            f"{stat.filemode(info.st_mode)}, uid {info.st_uid})")


def _check_ptrace_scope() -> None:
    """A session takes the seccomp listener from a program that is not its
    descendant (the command's child): Yama's ptrace_scope 1 and up allow that
    only to root (CAP_SYS_PTRACE)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as file:
            scope = int(file.read().strip() or 0)
    except (OSError, ValueError):
        return  # no Yama: ptrace permission is the uid's
    if scope and os.geteuid() != 0:
        raise ResidentError(f"kernel.yama.ptrace_scope is {scope}: a resident of a user other than "
                            "root cannot take the listener of a program it did not start")


def ask(path: str, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """One question to a running resident (status, stop); None when none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        if peer_uid(sock) != os.getuid():
            return None
        send(sock, {"revision": REVISION, **message})
        reply, _ = receive(sock)
    except (OSError, EOFError, ProtocolError):
        return None
    finally:
        sock.close()
    return reply if isinstance(reply, dict) else None


class Resident:
    def __init__(self, path: str, idle: float) -> None:
        self.path = path
        self.idle = idle
        self.runs = 0
        self.since = time.time()
        self.children: set[int] = set()
        self.listener: socket.socket | None = None
        self.lock = -1
        self.stamp: dict[str, tuple[int, int]] = {}

    def serve(self) -> int:
        prepare_directory(self.path)
        _check_ptrace_scope()
        # Held while this resident runs (sessions close their copy): two starts
        # at once cannot both bind, the second would take the first's socket.
        self.lock = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResidentError(f"a resident mtrace already runs on {self.path}") from None
        preload()
        self.stamp = install_stamp()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.path)  # a socket left by a resident that was killed
        except FileNotFoundError:
            pass
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self.listener = listener
        inode = os.stat(self.path).st_ino
        signal.signal(signal.SIGTERM, _stop_on_signal)
        signal.signal(signal.SIGHUP, _stop_on_signal)
        sys.stderr.write(f"mtrace resident {os.getpid()}: listening on {self.path}\n")
        sys.stderr.flush()
        last = time.monotonic()
        try:
            while True:
                self._reap()
                ready, _, _ = select.select([listener], [], [], 1.0)
                if not ready:
                    if self.idle and time.monotonic() - last > self.idle:
                        sys.stderr.write(f"mtrace resident: idle for {self.idle:.0f} s, exiting\n")
                        return 0
                    continue
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                last = time.monotonic()
                if not self._answer(conn):
                    return 0
        except _Stop:
            return 0
        finally:
            listener.close()
            try:  # only ours: a newer resident may have replaced it
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)
            except OSError:
                pass

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def _answer(self, conn: socket.socket) -> bool:
        """Answer one connection; False when the resident should exit."""
        fds: list[int] = []
        try:
            conn.settimeout(HELLO_TIMEOUT)
            if peer_uid(conn) != os.getuid():
                return True
            message, fds = receive(conn)
            if not isinstance(message, dict) or message.get("revision") != REVISION:
                send(conn, {"stale": "another revision of the protocol"})  # another install's
                return True
            op = message.get("op")
            if op == "status":
                send(conn, {"pid": os.getpid(), "since": self.since, "runs": self.runs,
                            "idle": self.idle, "socket": self.path, "python": sys.executable,
                            "running": len(self.children)})
            elif op == "stop":
                send(conn, {"stopping": os.getpid()})
                return False
            elif op == "exec":
                if message.get("namespaces") != namespaces():
                    # A command in a container or an unshare of the user's: its
                    # paths and pids are not the session's. Its own to run; the
                    # resident still serves the commands beside it.
                    send(conn, {"stale": "the command runs in other namespaces"})
                elif {key: message.get(key) for key in identity()} != identity() or len(fds) != 3:
                    # Another install's command (another venv, a checkout): it runs the
                    # run itself; this resident stays for its own.
                    send(conn, {"stale": "the command is another install of mtrace"})
                elif install_stamp() != self.stamp:
                    why = "mtrace's files changed since the resident started"
                    send(conn, {"stale": why})
                    sys.stderr.write(f"mtrace resident: {why}, exiting\n")
                    return False
                else:
                    self._fork_session(conn, message, fds)
            return True
        except (OSError, EOFError, ProtocolError) as error:
            sys.stderr.write(f"mtrace resident: a connection failed: {error}\n")
            return True
        finally:
            close_all(fds)
            conn.close()

    def _fork_session(self, conn: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                assert self.listener is not None
                self.listener.close()
                os.close(self.lock)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                run_session(conn, message, fds)
            finally:
                os._exit(LOST_EXIT)
        self.runs += 1
        self.children.add(pid)


class _Stop(Exception):
    pass


def _stop_on_signal(signum: int, frame: object) -> None:
    raise _Stop


def run_session(conn: socket.socket, message: dict[str, Any], fds: Sequence[int]) -> None:
    """In the forked session: become the command's process, run its argv, and
    send the exit code. Never returns."""
    try:
        send(conn, {"session": os.getpid()})
    except OSError:  # the command gave up waiting (REPLY_TIMEOUT) and runs it itself
        os._exit(0)
    status = LOST_EXIT
    try:
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        _rebind_stdio()
        os.environ.clear()
        os.environ.update(message["env"])
        os.umask(message["umask"])
        sys.argv = ["mtrace", *message["argv"]]
        try:
            os.chdir(message["cwd"])
        except OSError as error:
            sys.stderr.write(f"mtrace: error: cannot enter {message['cwd']}: {error.strerror}\n")
            return
        conn.settimeout(None)
        from ..tracer import launcher
        from .exec_args import parse_exec
        from .main import finish, run_command

        launcher.SPAWNER = CommandLink(conn).spawn
        argv = list(message["argv"])
        status = finish(run_command(argv, parse_exec(argv, os.environ)))
    except BaseException:  # reported; the command exits 72
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        try:
            send(conn, {"exit": status})
        except OSError:
            pass  # the command is gone
        os._exit(0)


def _rebind_stdio() -> None:
    """sys.stdin/stdout/stderr on the command's fds, buffered as Python would
    buffer them there (the resident's own were /dev/null and a log)."""
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, name)
        line = name == "stderr" or (name == "stdout" and os.isatty(fd))
        stream = open(fd, mode, buffering=1 if line else -1, closefd=False,  # noqa: SIM115
                      encoding=old.encoding, errors=old.errors)
        setattr(sys, name, stream)


class RemoteChild:
    """The exec helper the command started, as Launch sees its watchdog
    (``poll``, ``wait``, ``kill``, ``pid``): its exit comes over the socket."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self.control = control
        self.returncode: int | None = None
        self._done = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            import subprocess

            raise subprocess.TimeoutExpired(["mtrace-exec"], timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    def lost(self) -> None:
        """The command is gone: so is its run, as when mtrace itself is killed.
        The helper's control socket is shut down, so the helper kills every
        process of the program's tree and exits (exec_helper.c, the watchdog)."""
        if self.returncode is None:
            try:
                self.control.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.exited(-signal.SIGKILL)


class CommandLink:
    """The session's side of the command's socket, once the session runs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def spawn(self, command: Sequence[str], helper_end: socket.socket, *, control: socket.socket,
              env: dict[str, str] | None, cwd: str | None, umask: int) -> RemoteChild:
        """Have the command start the exec helper (``launcher.SPAWNER``)."""
        send(self.sock, {"spawn": list(command), "ctl": helper_end.fileno(),
                         "env": dict(os.environ if env is None else env),
                         "cwd": cwd or os.getcwd(), "umask": umask if umask >= 0 else current_umask()},
             fds=[helper_end.fileno()])
        try:
            reply, fds = receive(self.sock)
        except (EOFError, ProtocolError) as error:
            raise OSError(errno.EPIPE, "the mtrace command is gone") from error
        close_all(fds)
        if "error" in reply:
            raise OSError(reply["error"], reply["strerror"])
        child = RemoteChild(int(reply["spawned"]), control)
        threading.Thread(target=self._listen, args=(child,), name="mtrace-command",
                         daemon=True).start()
        return child

    def _listen(self, child: RemoteChild) -> None:
        while True:
            try:
                message, fds = receive(self.sock)
            except (OSError, EOFError, ProtocolError):
                child.lost()
                return
            close_all(fds)
            if isinstance(message, dict) and "exited" in message:
                child.exited(int(message["exited"]))


def start(path: str, idle: float, *, wait: float = 30.0) -> str:
    """`mtrace resident start`: the resident started detached (or found
    running); the line for the user, which names its pid. ResidentError if it fails."""
    import subprocess

    prepare_directory(path)
    running = ask(path, {"op": "status"})
    if running is not None:
        return f"a resident mtrace already runs (pid {running['pid']}, {path})"
    log_path = os.path.join(os.path.dirname(path), "resident.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mtrace.cli.resident_server", path, repr(idle)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ResidentError(f"it exited with status {process.returncode}: "
                                f"{_last_line(log_path)}")
        answer = ask(path, {"op": "status"})
        if answer is not None and answer["pid"] == process.pid:
            idle_text = f"exits after {idle:.0f} s without a run" if idle else "never exits idle"
            return f"resident mtrace started (pid {process.pid}, {path}; {idle_text})"
        time.sleep(0.02)
    process.kill()
    raise ResidentError(f"it did not answer within {wait:.0f} s (its log: {log_path})")


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as log:
            lines = log.read()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def stop(path: str, wait: float = 10.0) -> int | None:
    """`mtrace resident stop`: the pid that was stopped, None if none ran."""
    answer = ask(path, {"op": "stop"})
    if answer is None:
        return None
    pid = int(answer["stopping"])
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and os.path.exists(path):
        time.sleep(0.01)
    return pid


def main(argv: list[str] | None = None) -> int:
    """``python -m mtrace.cli.resident_server SOCKET IDLE``: what
    `mtrace resident start` runs, detached."""
    args = sys.argv[1:] if argv is None else argv
    path, idle = args[0], float(args[1])
    try:
        return Resident(path, idle).serve()
    except ResidentError as error:
        sys.stderr.write(f"mtrace resident: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
