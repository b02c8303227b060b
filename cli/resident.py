"""`mtrace exec` through the resident process, from the command's side.

A resident mtrace (`mtrace resident start`, cli/resident_server.py) has
already imported everything a run needs; `mtrace exec` hands it the run over
a Unix socket and keeps only what must stay in the user's process: the
terminal, the signals and the program itself. The command sends its argv,
working directory, environment, umask and its stdin/stdout/stderr; the
resident forks a session that does what `mtrace exec` does in-process (the
config, the agent, the handlers). When the session is ready to start the
program it asks the command to spawn the exec helper, with the helper's
control socket attached, so the program is this process's child: in the
terminal's process group and session, stopped by Ctrl-Z with it, exactly as
without the resident. The command forwards the signals sent to it to the
session (which passes them on as it always does), tells it when the helper
has exited, and exits with the code the session sends last.

Anything that keeps the resident from taking the run before it has started
(no socket, a refused connection, an install changed since the resident
started) leaves it to the in-process path: the resident only makes a run
start sooner, never makes it fail. This module imports nothing costly until
a socket is there: it runs at every `mtrace exec`.
"""

from __future__ import annotations

# The low-level modules only (_socket, _signal, _thread): socket, signal and
# threading build enums and import selectors, ~10 ms of this process's start.
import _signal
import _socket
import _thread
import marshal
import os
import sys
import time

# For annotations only, as in cli/main.py (typing costs a bare interpreter 5-20 ms).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

#: The first message's "op" values and the protocol revision both sides check.
REVISION = 1
#: A frame longer than this is refused (an environment is well under it).
LONGEST_FRAME = 64 << 20
#: The variable that turns the resident off for one run (`MTRACE_RESIDENT=0`).
SWITCH = "MTRACE_RESIDENT"
#: The variable that names the socket (else socket_path's default).
SOCKET_VARIABLE = "MTRACE_RESIDENT_SOCKET"
#: The exit code when the resident is lost after it took the run (the tracer's).
LOST_EXIT = 72
#: Seconds the resident has to answer a run before the command makes it itself.
REPLY_TIMEOUT = 5.0
#: Seconds the exec helper has to kill the program's tree once the session is lost.
HELPER_GRACE = 2.0


class ProtocolError(Exception):
    """A frame that is not one: too long, cut short, or not a message."""


def socket_path(environ: Mapping[str, str] = os.environ) -> str:
    """Where the resident listens: MTRACE_RESIDENT_SOCKET, else a directory
    of the user's own (XDG_RUNTIME_DIR/mtrace, else /tmp/mtrace-UID)."""
    explicit = environ.get(SOCKET_VARIABLE)
    if explicit:
        return explicit
    runtime = environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "mtrace") if runtime else f"/tmp/mtrace-{os.getuid()}"
    return os.path.join(base, "resident.sock")


def send(sock: _socket.socket, message: Any, fds: Iterable[int] = ()) -> None:
    """One frame: a 4-byte length, then the message (marshal: both ends are
    the same install, and the peer's uid was checked), ``fds`` attached."""
    data = marshal.dumps(message)
    frame = len(data).to_bytes(4, "little") + data
    fds = list(fds)
    if fds:
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        sent = sock.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


def close_all(fds: Iterable[int]) -> None:
    """Close fds that came with a frame and are not wanted (or not any more)."""
    for fd in fds:
        os.close(fd)


def current_umask() -> int:
    """This process's umask (reading it means setting it: it is set back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def receive(sock: _socket.socket) -> tuple[Any, list[int]]:
    """The next frame's message and the fds that came with it (not inheritable).
    EOFError: the peer closed; ProtocolError: not a frame."""
    head, fds = _read(sock, 4, with_fds=True)
    size = int.from_bytes(head, "little")
    if size > LONGEST_FRAME:
        close_all(fds)
        raise ProtocolError(f"a frame of {size} bytes")
    body, _ = _read(sock, size)
    try:
        return marshal.loads(body), fds
    except (ValueError, EOFError, TypeError) as error:
        close_all(fds)
        raise ProtocolError(f"not a message: {error}") from error


def _read(sock: _socket.socket, size: int, *, with_fds: bool = False) -> tuple[bytes, list[int]]:
    chunks: list[bytes] = []
    fds: list[int] = []
    while size:
        if with_fds and not chunks:
            data, ancillary, _, _ = sock.recvmsg(size, _socket.CMSG_LEN(8 * 4))
            for level, kind, rights in ancillary:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    for start in range(0, len(rights) - 3, 4):
                        fd = int.from_bytes(rights[start:start + 4], sys.byteorder)
                        os.set_inheritable(fd, False)
                        fds.append(fd)
        else:
            data = sock.recv(size)
        if not data:
            close_all(fds)
            if chunks or fds:
                raise ProtocolError("a frame cut short")
            raise EOFError
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks), fds


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end (struct ucred: pid, uid, gid)."""
    credentials = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(credentials[4:8], sys.byteorder)


def identity() -> dict[str, str]:
    """What makes two mtrace processes the same install: the interpreter's
    real file (a venv's python, python3 and python3.X are one: a console
    script names python3, `python -m mtrace.cli` often python), the
    environment it runs in (sys.prefix: which venv) and where this module
    is. The resident also checks its files' stamps."""
    return {"python": os.path.realpath(sys.executable), "prefix": sys.prefix,
            "module": os.path.abspath(__file__)}


#: The namespaces a session must share with the command: paths (mnt), the
#: pids it signals and is told (pid), the loopback its relays listen on (net),
#: uids (user) and the hostname (uts).
NAMESPACES = ("mnt", "pid", "net", "user", "uts")


def namespaces() -> list[int]:
    """This process's namespaces (their inodes; 0 where /proc does not say)."""
    found = []
    for name in NAMESPACES:
        try:
            found.append(os.stat(f"/proc/self/ns/{name}").st_ino)
        except OSError:
            found.append(0)
    return found


def run_resident(args: list[str], options: Mapping[str, Any]) -> int | None:
    """`mtrace exec ARGS` done by the resident process: the exit code, or None
    when the resident did not take the run (run it here)."""
    if os.environ.get(SWITCH) == "0" or options.get("backend") == "ptrace":
        return None
    path = socket_path()
    if not os.path.exists(path):
        return None
    from ..tracer.signals import FORWARDED_SIGNALS

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        if peer_uid(sock) != os.getuid():
            raise OSError("the socket belongs to another user")
    except OSError:
        sock.close()
        return None
    watched = {*FORWARDED_SIGNALS, _signal.SIGCHLD}
    # Blocked before the run is handed over: a Ctrl-C from now on is kept
    # for the session, never lost and never a KeyboardInterrupt here.
    previous = _signal.pthread_sigmask(_signal.SIG_BLOCK, watched)
    try:
        send(sock, {"op": "exec", "revision": REVISION, **identity(),
                    "namespaces": namespaces(), "argv": args,
                    "cwd": os.getcwd(), "env": dict(os.environ), "umask": current_umask()},
             fds=(0, 1, 2))
        if not _reply_ready(sock, set(FORWARDED_SIGNALS)):
            raise TimeoutError("no answer from the resident")
        reply, _ = receive(sock)
        if not isinstance(reply, dict) or "session" not in reply:
            raise ProtocolError("the resident did not take the run")  # stale, another install
    except (OSError, EOFError, ProtocolError):
        # The resident did not take the run (it was stopping, is stale, or is
        # stopped or stuck): run it here. A signal sent meanwhile is for this
        # process, as before any run: unblocked, it ends it; a Ctrl-C exits
        # 130, as main.run_command's does.
        sock.close()
        interrupted = _signal.SIGINT in _signal.sigpending()
        if interrupted:
            _signal.sigtimedwait([_signal.SIGINT], 0)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, previous)
        return 130 if interrupted else None
    return _Handed(sock, reply["session"], watched).run()


def _reply_ready(sock: _socket.socket, signals: set[int]) -> bool:
    """Whether the resident's answer (or its hang-up) came, within
    REPLY_TIMEOUT and before any of ``signals`` was sent to this process:
    a stopped or stuck resident must not hold the command, whose signals
    are blocked."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    sock.settimeout(0.05)
    try:
        while True:
            try:
                sock.recv(1, _socket.MSG_PEEK)
                return True
            except TimeoutError:
                if _signal.sigpending() & signals or time.monotonic() > deadline:
                    return False
    finally:
        sock.settimeout(None)


class _Handed:
    """The command's side of a run the resident took."""

    def __init__(self, sock: _socket.socket, session: int, watched: set[int]) -> None:
        self.sock = sock
        # A pidfd, not the pid: signals and the kill at the end reach this
        # session, never a process that got its pid after it exited.
        try:
            self.session = os.pidfd_open(session)
        except OSError:  # gone already: run() finds the socket closed
            self.session = -1
        self.watched = watched
        self.helper: int | None = None  # the exec helper, until it is reaped
        self.spawned = False
        # Held while spawning and while reaping: "exited" never precedes "spawned".
        self.lock = _thread.allocate_lock()
        _thread.start_new_thread(self._signals, ())

    def run(self) -> int:
        while True:
            try:
                message, fds = receive(self.sock)
            except (OSError, EOFError, ProtocolError) as error:
                return self._lost(error)
            if not isinstance(message, dict):
                return self._lost(ProtocolError("not a message"))
            if "exit" in message:
                return int(message["exit"])
            if "spawn" in message:
                self._spawn(message, fds)
            else:
                close_all(fds)

    def _spawn(self, message: dict[str, Any], fds: list[int]) -> None:
        """Start the exec helper as this process's child, its control socket at
        the fd number its argv names, and say which pid it got."""
        with self.lock:
            try:
                reply: dict[str, Any] = {"spawned": self._start(message, fds)}
            except OSError as error:
                reply = {"error": error.errno or 0, "strerror": error.strerror or str(error)}
            finally:
                close_all(fds)
            send(self.sock, reply)

    def _start(self, message: dict[str, Any], fds: list[int]) -> int:
        if len(fds) != 1:
            raise OSError(0, "the control socket did not arrive")
        control, wanted = fds[0], int(message["ctl"])
        actions: list[tuple[int, ...]] = []
        if control == wanted:
            os.set_inheritable(control, True)
        else:
            actions.append((os.POSIX_SPAWN_DUP2, control, wanted))
        if message.get("cwd") and message["cwd"] != os.getcwd():
            os.chdir(message["cwd"])
        os.umask(message["umask"])
        command = message["spawn"]
        # As subprocess does for the local start: only 0-2 and the control socket
        # are passed on, the program's mask is empty, and SIGPIPE (which Python
        # ignores) is back to its default.
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != control:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass  # the directory's own fd, closed by now
        pid = os.posix_spawn(command[0], command, message["env"], file_actions=actions,
                             setsigmask=(), setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        self.helper = pid
        self.spawned = True
        return pid

    def _signals(self) -> None:
        """Forward what is sent to this process to the session; reap the helper."""
        from ..tracer.signals import SI_KERNEL

        while True:
            info = _signal.sigwaitinfo(self.watched)
            if info.si_signo == _signal.SIGCHLD:
                self._reap()
                continue
            if (self.spawned and info.si_code == SI_KERNEL
                    and info.si_signo in (_signal.SIGINT, _signal.SIGQUIT)):
                continue  # the terminal's: the program, in this process group, has it already
            try:
                _signal.pidfd_send_signal(self.session, info.si_signo)
            except OSError:
                return  # the session has exited: run() says what comes next

    def _reap(self) -> None:
        with self.lock:
            if self.helper is None:
                return
            try:
                pid, status = os.waitpid(self.helper, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.helper = None
            try:
                send(self.sock, {"exited": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass  # the session is gone: run() reports it

    def _lost(self, error: BaseException) -> int:
        """The session is gone, or its frames are not frames: whatever is left
        of it is killed, and its end of the helper's control socket closes with
        it; the helper (a subreaper) then kills the program's whole tree and
        exits, as when an in-process mtrace dies. Killing the helper first would
        orphan the program's children (a sh's sleep ran on), so it is killed
        only if it has not exited within HELPER_GRACE."""
        try:
            _signal.pidfd_send_signal(self.session, _signal.SIGKILL)
        except OSError:
            pass  # exited already
        deadline = time.monotonic() + HELPER_GRACE
        while self.helper is not None and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()
        helper = self.helper
        if helper is not None:
            try:
                os.kill(helper, _signal.SIGKILL)
                os.waitpid(helper, 0)
            except (ProcessLookupError, ChildProcessError):
                pass  # reaped by the signal thread meanwhile
        detail = f" ({error})" if str(error) else ""
        sys.stderr.write(f"mtrace: error: the resident mtrace process ended during the run{detail}\n"
                         "mtrace: hint: `mtrace resident status` says whether it runs; "
                         f"{SWITCH}=0 runs without it\n")
        return LOST_EXIT
