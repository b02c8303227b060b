"""`mtrace exec` with no target: every program behaves exactly as it does alone.

Each case runs the same command plainly and under mtrace (once per backend) and
compares stdout and exit status byte for byte.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest
from mtrace_run import MTRACE, run_mtrace, run_plain
from programs_build import ProgramPaths

pytestmark = pytest.mark.timeout(120)

ENV = {"PATH": "/usr/bin:/bin", "PROBE_VALUE": "value with spaces=and equals"}


def assert_same(argv: list[str], backend: str, *, input: bytes | None = None) -> None:
    plain = run_plain(argv, env=ENV, input=input)
    traced = run_mtrace("exec", "--backend", backend, "--", *argv, env=ENV, input=input)
    assert (traced.returncode, traced.stdout) == (plain.returncode, plain.stdout), traced.stderr
    assert b"mtrace" not in traced.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["env", "PROBE_VALUE"],
        ["env", "UNSET_VARIABLE"],
        ["cat", "/etc/passwd"],
        ["cat", "/nonexistent/file"],
        ["stat", "/etc"],
        ["ls", "/etc"],
        ["readlink", "/proc/self/exe-is-not-a-link"],
        ["exit", "7"],
        ["resolve", "localhost"],
    ],
    ids=lambda command: "-".join(command)[:40],
)
def test_probe_matches_plain_run(probe: Path, backend: str, command: list[str]) -> None:
    assert_same([str(probe), *command], backend)


def test_network_calls_match_plain_run(
    probe: Path, backend: str, tcp_echo_port: int, udp_echo_port: int, http_port: int
) -> None:
    for command in (
        ["tcp", "127.0.0.1", str(tcp_echo_port), "hello"],
        ["udp", "127.0.0.1", str(udp_echo_port), "datagram"],
        ["udp-unconnected", "127.0.0.1", str(udp_echo_port), "datagram"],
        ["http", f"http://127.0.0.1:{http_port}/hello.txt"],
    ):
        plain = run_plain([str(probe), *command], env=ENV)
        traced = run_mtrace("exec", "--backend", backend, "--", str(probe), *command, env=ENV)
        assert traced.returncode == plain.returncode == 0, traced.stderr
        assert traced.stdout == plain.stdout


def test_stdin_passes_through(backend: str) -> None:
    data = os.urandom(200_000)
    assert_same(["cat"], backend, input=data)


def test_signal_death_is_128_plus_n(probe: Path, backend: str) -> None:
    result = run_mtrace("exec", "--backend", backend, "--", str(probe), "kill", "TERM", env=ENV)
    assert result.returncode == 128 + signal.SIGTERM


def test_fork_exec_chain(programs: ProgramPaths, backend: str) -> None:
    assert_same(["sh", str(programs["chain"]), "PROBE_VALUE"], backend)


def test_missing_command_is_127(backend: str) -> None:
    result = run_mtrace("exec", "--backend", backend, "--", "/no/such/program", env=ENV)
    assert result.returncode == 127
    assert b"/no/such/program" in result.stderr


def test_terminal_passes_through(backend: str) -> None:
    """The tracee sees the terminal mtrace was started on."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [*MTRACE, "exec", "--backend", backend, "--", "sh", "-c", "test -t 0 && test -t 1"],
            stdin=follower,
            stdout=follower,
            stderr=follower,
            env={**os.environ, **ENV},
        )
        assert process.wait(timeout=30) == 0
    finally:
        os.close(leader)
        os.close(follower)


def _tracee_processes(mtrace_pid: int, name: str, timeout: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            child for child in psutil.Process(mtrace_pid).children(recursive=True) if child.name() == name
        ]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {name} under mtrace")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_signals_to_mtrace_reach_tracee(backend: str, signum: int) -> None:
    process = subprocess.Popen(
        [*MTRACE, "exec", "--backend", backend, "--", "sleep", "60"], env={**os.environ, **ENV}
    )
    _tracee_processes(process.pid, "sleep")
    process.send_signal(signum)
    assert process.wait(timeout=20) == 128 + signum


COUNT_SIGINT = """
import signal, time
received = []
signal.signal(signal.SIGINT, lambda *_: received.append(1))
print("ready", flush=True)
deadline = time.monotonic() + 20
while not received and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.5)  # a second, duplicated SIGINT would arrive in here
print("sigint", len(received), "done", flush=True)
"""


def _read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    output = b""
    deadline = time.monotonic() + timeout
    while marker not in output and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the terminal closed: the program is gone
                break
            if not chunk:
                break
            output += chunk
    return output


def test_terminal_ctrl_c_is_delivered_once(backend: str) -> None:
    """Ctrl-C reaches the whole foreground group, tracee included: mtrace must
    not forward its own copy as well."""
    leader, follower = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        process = subprocess.Popen(
            [*MTRACE, "exec", "--backend", backend, "--", sys.executable, "-c", COUNT_SIGINT],
            stdin=follower, stdout=follower, stderr=follower, env={**os.environ, **ENV},
            preexec_fn=take_terminal)
        assert b"ready" in _read_until(leader, b"ready")
        os.write(leader, b"\x03")  # the terminal's interrupt character
        # The echoed ^C may come before the rest of the "ready" line.
        output = _read_until(leader, b"done", timeout=30)
        process.wait(timeout=30)
        assert b"sigint 1" in output, output
    finally:
        os.close(leader)
        os.close(follower)


def test_killing_supervisor_kills_whole_tracee_tree(backend: str) -> None:
    process = subprocess.Popen(
        [*MTRACE, "exec", "--backend", backend, "--", "sh", "-c", "sleep 300 & sleep 300; wait"],
        env={**os.environ, **ENV},
    )
    sleepers = _tracee_processes(process.pid, "sleep")
    while len(sleepers) < 2:
        sleepers = _tracee_processes(process.pid, "sleep")
    process.kill()
    process.wait(timeout=10)
    _gone, alive = psutil.wait_procs(sleepers, timeout=10)
    assert not alive, f"tracee processes survived the supervisor: {alive}"


def test_threads_and_preemption_do_not_hang(programs: ProgramPaths, backend: str) -> None:
    """The Go stress program: 64 goroutines preempted by SIGURG while making
    trapped calls. 50 runs in a row, none may hang or differ."""
    argv = [str(programs["goroutines"]), "-iterations", "1", "-work", "2000000"]
    expected = run_plain(argv, env=ENV)
    assert expected.returncode == 0
    for attempt in range(50):
        result = run_mtrace("exec", "--backend", backend, "--", *argv, env=ENV, timeout=60)
        assert (result.returncode, result.stdout) == (0, expected.stdout), (attempt, result.stderr)


def test_python_runs_unchanged(backend: str, tmp_path: Path) -> None:
    """A dynamic, threaded interpreter that reads many files on start-up."""
    script = tmp_path / "threads.py"
    script.write_text(
        "import threading, hashlib\n"
        "out = []\n"
        "def work(i):\n"
        "    out.append(hashlib.sha256(open('/etc/passwd','rb').read() + bytes([i])).hexdigest())\n"
        "threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(len(out), sorted(out)[0])\n"
    )
    assert_same([sys.executable, "-S", str(script)], backend)


@pytest.mark.parametrize("native", ["1", "0"], ids=["passthrough-in-c", "passthrough-in-python"])
def test_passthrough_paths_match_plain_run(probe: Path, tmp_path: Path, native: str) -> None:
    """Calls no handler wants are continued by the C loop (bin/libmtrace-notify.so)
    or, without it (MTRACE_NATIVE_LOOP=0, a checkout never built), by the
    Python loop: both give the plain run's output, threads and forks included."""
    env = {**ENV, "MTRACE_NATIVE_LOOP": native}
    script = f"cat /etc/passwd; ls /etc > {tmp_path}/ls.txt; stat -c %s {tmp_path}/ls.txt"
    for argv in ([str(probe), "cat", "/etc/passwd"], [str(probe), "stat", "/etc"],
                 ["/bin/sh", "-c", script]):
        plain = run_plain(argv, env=env)
        traced = run_mtrace("exec", "--backend", "notify", "--", *argv, env=env)
        assert (traced.returncode, traced.stdout) == (plain.returncode, plain.stdout), traced.stderr
