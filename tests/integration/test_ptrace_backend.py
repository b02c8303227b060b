"""The ptrace backend at parity with seccomp notify.

Every plain-run test is parametrised over both backends with the same
expectations; the outcome tests drive a Session in-process with small
handlers, so each outcome of the vocabulary is carried out by each backend.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mtrace.tracer.backend import AsyncSide, CallRecord, Handlers
from mtrace.tracer.call import SyscallCall
from mtrace.tracer.outcome import (
    CONTINUE,
    Defer,
    Errno,
    InjectFd,
    OnTraceeFd,
    Outcome,
    ReturnValue,
    RewriteArgs,
)
from mtrace.tracer.session import Session, run

MTRACE = [sys.executable, "-m", "mtrace.cli.main"]
BACKENDS = ("notify", "ptrace")
PYTHON = sys.executable

pytestmark = pytest.mark.timeout(120)


def mtrace(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*MTRACE, *args], capture_output=True, timeout=timeout, check=False)


def plain(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, timeout=60, check=False)


def python_program(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    # Only the code's own lines decide the indentation (not the closing quotes').
    path.write_text(textwrap.dedent(source.strip("\n").rstrip() + "\n"))
    return str(path)


# -- plain runs: same output and status as without mtrace ------------------------
# (every probe flavour and the fork/exec chain: tests/integration/test_exec.py)


PLAIN_COMMANDS = [
    ["sh", "-c", "echo out; echo err >&2; exit 7"],
    ["cat", "/etc/hostname"],
    ["sh", "-c", "ls / >/dev/null && stat -c %F / && exit 0"],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("argv", PLAIN_COMMANDS, ids=["sh-exit", "cat", "ls-stat"])
def test_output_and_status_match_a_plain_run(backend: str, argv: list[str]) -> None:
    expected = plain(*argv)
    result = mtrace("exec", "--backend", backend, "--", *argv)
    assert (result.returncode, result.stdout) == (expected.returncode, expected.stdout)
    assert result.stderr.endswith(expected.stderr)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_signal_death_is_128_plus_n(backend: str, signal_number: int) -> None:
    result = mtrace("exec", "--backend", backend, "--", "sh", "-c", f"kill -{signal_number} $$")
    assert result.returncode == 128 + signal_number


@pytest.mark.parametrize("backend", BACKENDS)
def test_signals_are_delivered_to_handlers(backend: str, tmp_path: Path) -> None:
    # SIGUSR1 to itself, SIGSTOP/SIGCONT on a child (a group-stop under ptrace).
    program = python_program(
        tmp_path,
        "signals.py",
        """
        import os, signal, time
        got = []
        signal.signal(signal.SIGUSR1, lambda *_: got.append("usr1"))
        os.kill(os.getpid(), signal.SIGUSR1)
        child = os.fork()
        if child == 0:
            open("/etc/hostname").close()
            os._exit(5)
        os.kill(child, signal.SIGSTOP)
        _, status = os.waitpid(child, os.WUNTRACED)
        stopped = os.WIFSTOPPED(status)
        os.kill(child, signal.SIGCONT)
        _, status = os.waitpid(child, 0)
        print(got, stopped, os.WEXITSTATUS(status))
    """,
    )
    result = mtrace("exec", "--backend", backend, "--", PYTHON, program)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"['usr1'] True 5\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_threaded_program(backend: str, tmp_path: Path) -> None:
    program = python_program(
        tmp_path,
        "threads.py",
        """
        import os, threading
        errors = []
        def work(index):
            for _ in range(200):
                try:
                    with open("/etc/hostname", "rb") as f:
                        f.read()
                    os.stat("/")
                except OSError as exc:
                    errors.append(exc)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        print("ok", len(errors))
    """,
    )
    result = mtrace("exec", "--backend", backend, "--", PYTHON, program)
    assert (result.returncode, result.stdout) == (0, b"ok 0\n"), result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_goroutines(backend: str, programs: dict[str, Path]) -> None:
    expected = plain(str(programs["goroutines"]))
    result = mtrace("exec", "--backend", backend, "--", str(programs["goroutines"]))
    assert (result.returncode, result.stdout) == (0, expected.stdout), result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_killing_the_supervisor_kills_the_tracee(backend: str, tmp_path: Path) -> None:
    program = python_program(
        tmp_path,
        "sleeper.py",
        """
        import os, sys, time
        if os.fork() == 0:
            os.write(1, f"grandchild {os.getpid()}\\n".encode())  # one write: no interleaving
        else:
            os.write(1, f"child {os.getpid()}\\n".encode())
        while True:
            open("/etc/hostname").close()
            time.sleep(0.05)
    """,
    )
    errors = tmp_path / "stderr.txt"
    with open(errors, "wb") as stderr:
        supervisor = subprocess.Popen([*MTRACE, "exec", "--backend", backend, "--", PYTHON,
                                       program], stdout=subprocess.PIPE, stderr=stderr)
    assert supervisor.stdout is not None
    lines = [supervisor.stdout.readline() for _ in range(2)]
    assert all(len(line.split()) == 2 for line in lines), (lines, errors.read_bytes())
    pids = [int(line.split()[1]) for line in lines]
    supervisor.kill()
    supervisor.wait()
    for pid in pids:
        while _alive(pid):  # the test's timeout turns a survivor into a failure
            threading.Event().wait(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A process reaped while we read shows an empty file.
    return len(fields) == 2 and fields[1].split()[0] != "Z"


# -- trace: results of every call --------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_shows_calls_with_decoded_arguments(backend: str, tmp_path: Path) -> None:
    target = tmp_path / "hello.txt"
    target.write_text("hello\n")
    result = mtrace("trace", "--backend", backend, "--", "cat", str(target))
    assert result.returncode == 0
    assert result.stdout == b"hello\n"
    trace = result.stderr.decode()
    assert f'openat(AT_FDCWD, "{target}", O_RDONLY) = 3' in trace
    assert 'execve("' in trace and '["cat", "' in trace
    if backend == "ptrace":
        # ptrace sees the kernel's answer to every call, stat family and execve too.
        assert ", 0x" in trace and "= ?" not in trace
        assert any(
            line.startswith("[pid") and "execve(" in line and line.split(" = ")[1].startswith("0 ")
            for line in trace.splitlines()
        )
        assert any("newfstatat(" in line and " = 0 " in line for line in trace.splitlines())


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_reports_failures_with_errno(backend: str) -> None:
    result = mtrace("trace", "--backend", backend, "-e", "openat", "--", "cat", "/nonexistent/mtrace")
    assert result.returncode == 1
    assert b'openat(AT_FDCWD, "/nonexistent/mtrace", O_RDONLY) = -1 ENOENT' in result.stderr


# -- epoll registered before connect ----------------------------------------------

EPOLL_PROGRAM = """
    import errno, select, socket, threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    def echo():
        connection, _ = server.accept()
        connection.sendall(connection.recv(100).upper())
        connection.close()
    threading.Thread(target=echo).start()
    client = socket.socket()
    client.setblocking(False)
    poller = select.epoll()
    poller.register(client.fileno(), select.EPOLLOUT | select.EPOLLIN)
    result = client.connect_ex(server.getsockname())
    assert result in (0, errno.EINPROGRESS), result
    events = poller.poll(10)
    assert events and events[0][1] & select.EPOLLOUT, events
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    client.send(b"ping")
    poller.modify(client.fileno(), select.EPOLLIN)
    assert poller.poll(10)
    print(client.recv(100).decode())
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("command", ["exec", "trace"])
def test_epoll_registered_before_connect(backend: str, command: str, tmp_path: Path) -> None:
    program = python_program(tmp_path, "epoll_connect.py", EPOLL_PROGRAM)
    result = mtrace(command, "--backend", backend, "--", PYTHON, program)
    assert (result.returncode, result.stdout) == (0, b"PING\n"), result.stderr


# -- auto: notify, else ptrace ------------------------------------------------------


def test_auto_uses_notify_when_it_works() -> None:
    result = mtrace("exec", "--backend", "auto", "--", "sh", "-c", "echo plain")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"plain\n", b"")


def test_auto_falls_back_to_ptrace_under_an_existing_listener() -> None:
    # mtrace under mtrace: the inner notify filter gets EBUSY (one listener per tree).
    result = mtrace(
        "exec",
        "--backend",
        "notify",
        "--",
        *MTRACE,
        "exec",
        "--backend",
        "auto",
        "--",
        "sh",
        "-c",
        "echo nested; exit 4",
    )
    assert (result.returncode, result.stdout) == (4, b"nested\n")
    lines = result.stderr.decode().splitlines()
    assert lines == [
        "mtrace: a seccomp listener is already installed for this process tree; using the ptrace backend"
    ]


def test_nested_notify_fails_with_a_hint() -> None:
    result = mtrace("exec", "--backend", "notify", "--", *MTRACE, "exec", "--backend", "notify", "--", "true")
    assert result.returncode != 0
    assert b"--backend ptrace" in result.stderr


def test_probe_for_doctor() -> None:
    from mtrace.tracer.session import ptrace_probe

    ok, detail = ptrace_probe()
    assert ok, detail


# -- each outcome, carried out by each backend ---------------------------------------


def run_session(
    backend: str,
    argv: list[str],
    handlers: dict[str, Callable[..., Outcome]],
    capfd: pytest.CaptureFixture[str],
    *,
    async_side: AsyncSide | None = None,
    trapped: tuple[str, ...] = ("open", "openat", "readlink", "readlinkat", "listen"),
) -> tuple[int, str]:
    session = Session(
        argv=argv, handlers=Handlers(handlers), trapped=trapped, backend=backend, async_side=async_side
    )
    capfd.readouterr()
    code = run(session)
    return code, capfd.readouterr().out


def on_path(path: bytes, outcome: Callable[[SyscallCall], Outcome]) -> Callable[..., Outcome]:
    def handler(call: SyscallCall) -> Outcome:
        index = 1 if call.name.endswith("at") else 0
        if call.read_string(index) == path:
            return outcome(call)
        return CONTINUE

    return handler


@pytest.mark.parametrize("backend", BACKENDS)
def test_errno_outcome(backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    handler = on_path(b"/mtrace-test/errno", lambda call: Errno(errno.EACCES))
    code, out = run_session(
        backend,
        [
            PYTHON,
            "-c",
            """
import errno
try:
    open("/mtrace-test/errno")
except OSError as exc:
    print(errno.errorcode[exc.errno])
""",
        ],
        {"openat": handler, "open": handler},
        capfd,
    )
    assert (code, out) == (0, "EACCES\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_value_with_writes(backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    target = b"/fake/link/target"

    def answer(call: SyscallCall) -> Outcome:
        buffer = call.pointer_arg(2 if call.name == "readlinkat" else 1)
        return ReturnValue(len(target), writes=((buffer, target),))

    handler = on_path(b"/mtrace-test/link", answer)
    code, out = run_session(
        backend,
        [PYTHON, "-c", "import os; print(os.readlink('/mtrace-test/link'))"],
        {"readlink": handler, "readlinkat": handler},
        capfd,
    )
    assert (code, out) == (0, "/fake/link/target\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inject_fd(backend: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    shadow = tmp_path / "shadow.txt"
    shadow.write_text("from the shadow tree\n")
    def inject(call: SyscallCall) -> Outcome:
        flags = call.int_arg(2 if call.name == "openat" else 1)
        return InjectFd(os.open(shadow, os.O_RDONLY | os.O_CLOEXEC),
                        cloexec=bool(flags & os.O_CLOEXEC))

    handler = on_path(b"/mtrace-test/inject", inject)
    code, out = run_session(
        backend,
        [
            PYTHON,
            "-c",
            """
import os
fd = os.open("/mtrace-test/inject", os.O_RDONLY | os.O_CLOEXEC)
print(os.read(fd, 100).decode(), end="")
print(os.get_inheritable(fd))
""",
        ],
        {"openat": handler, "open": handler},
        capfd,
    )
    assert (code, out) == (0, "from the shadow tree\nFalse\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_tracee_fd(backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    listened = []

    def listen_from_supervisor(fd: int) -> Outcome:
        socket.socket(fileno=os.dup(fd)).listen(3)  # the tracee's own socket
        listened.append(True)
        return ReturnValue(0)

    def handler(call: SyscallCall) -> Outcome:
        return OnTraceeFd(call.int_arg(0), listen_from_supervisor)

    code, out = run_session(
        backend,
        [
            PYTHON,
            "-c",
            """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
""",
        ],
        {"listen": handler},
        capfd,
    )
    assert (code, out, listened) == (0, "1\n", [True])


@pytest.mark.parametrize("backend", BACKENDS)
def test_defer_keeps_other_threads_running(backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    # Thread A's open is deferred until thread B's open releases it; B keeps
    # retrying until the supervisor has seen A deferred. If the trap loop
    # blocked on A, B would never be answered and the test would time out.
    deferred = threading.Event()
    release = asyncio.Event()
    side = AsyncSide()
    side.start()

    async def wait_for_release() -> Outcome:
        await release.wait()
        return Errno(errno.ENOENT)

    def defer(call: SyscallCall) -> Outcome:
        deferred.set()
        return Defer(wait_for_release())

    def releaser(call: SyscallCall) -> Outcome:
        if not deferred.is_set():
            return Errno(errno.EAGAIN)
        side.loop.call_soon_threadsafe(release.set)
        return Errno(errno.EEXIST)

    handlers = {}
    for name in ("open", "openat"):

        def both(call: SyscallCall) -> Outcome:
            index = 1 if call.name.endswith("at") else 0
            path = call.read_string(index)
            if path == b"/mtrace-test/defer":
                return defer(call)
            if path == b"/mtrace-test/release":
                return releaser(call)
            return CONTINUE

        handlers[name] = both
    try:
        code, out = run_session(
            backend,
            [
                PYTHON,
                "-c",
                """
import errno, threading
results = {}
def a():
    try: open("/mtrace-test/defer")
    except OSError as exc: results["a"] = errno.errorcode[exc.errno]
def b():
    while True:
        try: open("/mtrace-test/release")
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                results["b"] = errno.errorcode[exc.errno]
                return
ta = threading.Thread(target=a); ta.start()
tb = threading.Thread(target=b); tb.start()
ta.join(); tb.join()
print(results["a"], results["b"])
""",
            ],
            handlers,
            capfd,
            async_side=side,
        )
    finally:
        side.stop()
    assert (code, out) == (0, "ENOENT EEXIST\n")


# -- RewriteArgs (ptrace) ------------------------------------------------------------


REWRITE_CHECK_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
/* openat by hand, so the argument registers can be checked after the call. */
int main(void) {
    static const char path[] = "/mtrace-test/rewrite";
    long fd;
    register long r10 asm("r10") = 0;
    const char *rsi_after; long rdi_after, rdx_after;
    asm volatile("syscall"
                 : "=a"(fd), "=D"(rdi_after), "=S"(rsi_after), "=d"(rdx_after), "+r"(r10)
                 : "a"((long)SYS_openat), "D"((long)AT_FDCWD), "S"(path), "d"((long)O_RDONLY)
                 : "rcx", "r11", "memory");
    if (fd < 0) { printf("open failed %ld\n", fd); return 1; }
    char buffer[64] = {0};
    read((int)fd, buffer, sizeof buffer - 1);
    printf("%s", buffer);
    printf("registers %s\n", rsi_after == path && rdi_after == AT_FDCWD && rdx_after == O_RDONLY
                             ? "restored" : "clobbered");
    printf("path %s\n", strcmp(path, "/mtrace-test/rewrite") ? "clobbered" : "intact");
    return 0;
}
"""


@pytest.fixture(scope="module")
def rewrite_check(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("rewrite")
    source = directory / "rewrite_check.c"
    source.write_text(REWRITE_CHECK_C)
    binary = directory / "rewrite_check"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return str(binary)


def test_rewrite_args_replaces_a_path_and_restores_registers(
    rewrite_check: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real.txt"
    real.write_text("rewritten open\n")
    records: list[CallRecord] = []

    class Recorder:
        def on_call(self, call: SyscallCall) -> None:
            return None

        def on_result(self, record: CallRecord, token: object) -> None:
            records.append(record)

    handler = on_path(
        b"/mtrace-test/rewrite", lambda call: RewriteArgs(pointers={1: os.fsencode(real) + b"\0"})
    )
    session = Session(
        argv=[rewrite_check],
        handlers=Handlers({"openat": handler}),
        trapped=("openat",),
        backend="ptrace",
        observer=Recorder(),
    )
    capfd.readouterr()
    code = run(session)
    out = capfd.readouterr().out
    assert (code, out) == (0, "rewritten open\nregisters restored\npath intact\n")
    rewritten = [record for record in records if isinstance(record.outcome, RewriteArgs)]
    assert len(rewritten) == 1 and rewritten[0].result == 3


def test_rewrite_args_of_a_go_program(
    programs: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Go runs syscalls on small goroutine stacks: the scratch bytes below the
    # stack pointer must be put back, or the program would crash or misbehave.
    real = tmp_path / "real.txt"
    real.write_text("seen by go\n")
    handler = on_path(
        b"/mtrace-test/go-rewrite", lambda call: RewriteArgs(pointers={1: os.fsencode(real) + b"\0"})
    )
    session = Session(
        argv=[str(programs["probe-go"]), "cat", "/mtrace-test/go-rewrite"],
        handlers=Handlers({"openat": handler}),
        trapped=("openat",),
        backend="ptrace",
    )
    capfd.readouterr()
    code = run(session)
    assert (code, capfd.readouterr().out) == (0, "seen by go\n")
