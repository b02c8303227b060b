"""The resident mtrace (`mtrace resident start|stop|status`) as a user meets it.

Every test starts its own resident on a socket in a directory of its own
(MTRACE_RESIDENT_SOCKET), never the user's default one, and stops it at the
end, even when the test fails. A run through the resident must be the run
mtrace makes in-process (MTRACE_RESIDENT=0): the same output and exit code,
the program in the command's process group and session, with its stdin, cwd
and umask, the same signals once, and nothing left behind when a side dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mtrace_run import MTRACE, Result, stop
from netns_target import NetnsTarget
from processes import alive, children_of

import mtrace.cli
from mtrace.cli.resident import REVISION

pytestmark = pytest.mark.timeout(60)

#: How long a resident or a program may take to do what a test waits for.
PATIENCE = 15.0


# --- processes ----------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float = PATIENCE) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _read_until(fd: int, pattern: bytes, timeout: float = PATIENCE) -> bytes:
    """What ``fd`` gives until ``pattern`` (a regular expression) is found in
    it, or EOF, or the timeout."""
    output = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, output):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            chunk = os.read(fd, 4096) if ready else b""
        except OSError:  # a pty whose other side is closed: EIO
            chunk = b""
        if not chunk:
            break
        output += chunk
    return output


# --- the resident -------------------------------------------------------------------


@dataclass
class Resident:
    """A resident mtrace on a private socket, and `mtrace` commands that use it."""

    socket: Path
    pid: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, resident: bool = True) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("MTRACE_")}
        env.update(MTRACE_RESIDENT_SOCKET=str(self.socket), MTRACE_RESIDENT="1" if resident else "0")
        env.update(self.extra_env)
        return env

    def mtrace(self, *args: str, resident: bool = True, input: bytes | None = None,
               timeout: float = 60, **popen: Any) -> Result:
        """``mtrace ARGS``, as a shell runs it: its output is what is in its
        stdout and stderr when it has exited (not when they are closed)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(
                [*MTRACE, *args], stdin=subprocess.PIPE if input is not None else None,
                stdout=out, stderr=err, env=self.env(resident), **popen)
            try:
                process.communicate(input, timeout=timeout)
            finally:
                stop(process, signal.SIGKILL, timeout=0)
            out.seek(0)
            err.seek(0)
            return Result(process.returncode, out.read(), err.read())

    def start(self, *extra: str) -> Result:
        """`mtrace resident start`; ``pid`` is the one it printed."""
        result = self.mtrace("resident", "start", *extra, timeout=PATIENCE * 2)
        found = re.search(rb"\(pid (\d+),", result.stdout)
        if result.returncode == 0 and found:
            self.pid = int(found[1])
        return result

    def status(self) -> Result:
        return self.mtrace("resident", "status", timeout=PATIENCE)

    def runs(self) -> int:
        """The run count `mtrace resident status` says."""
        status = self.status()
        found = re.search(rb"(\d+) runs", status.stdout)
        assert status.returncode == 0 and found, status
        return int(found[1])

    def sessions(self) -> list[int]:
        """The sessions the resident has forked and that run now."""
        return children_of(self.pid)

    def close(self) -> None:
        """Stop it, whatever state the test left it in."""
        if self.pid and alive(self.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.mtrace("resident", "stop", timeout=PATIENCE)
            for pid in [*self.sessions(), self.pid]:
                with contextlib.suppress(ProcessLookupError):
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)


def _socket_in(directory: Path) -> Path:
    path = directory / "resident" / "resident.sock"
    assert len(os.fsencode(path)) < 108, f"{path} is too long for a Unix socket"
    return path


@pytest.fixture
def idle_resident(tmp_path: Path) -> Iterator[Resident]:
    """A resident not started yet (the test starts it); stopped at the end."""
    tmp_path.chmod(0o700)
    resident = Resident(_socket_in(tmp_path))
    try:
        yield resident
    finally:
        resident.close()


@pytest.fixture
def resident(idle_resident: Resident) -> Resident:
    """A resident that runs, on a private socket."""
    started = idle_resident.start("--idle", "120")
    assert started.returncode == 0 and idle_resident.pid, started
    return idle_resident


# --- lifecycle -------------------------------------------------------------------


def test_start_status_stop(idle_resident: Resident) -> None:
    started = idle_resident.start("--idle", "120")
    assert started.returncode == 0, started
    pid = idle_resident.pid
    assert started.stdout.decode().startswith(f"resident mtrace started (pid {pid}, "), started
    assert alive(pid) and idle_resident.socket.is_socket()

    status = idle_resident.status()
    assert status.returncode == 0, status
    assert status.stdout.decode().startswith(f"resident mtrace pid {pid}, "), status

    again = idle_resident.start()
    assert again.returncode == 0, again
    assert again.stdout.decode() == (
        f"a resident mtrace already runs (pid {pid}, {idle_resident.socket})\n")
    assert idle_resident.runs() == 0

    stopped = idle_resident.mtrace("resident", "stop")
    assert (stopped.returncode, stopped.stdout) == (0, f"stopped the resident mtrace (pid {pid})\n".encode())
    assert not idle_resident.socket.exists()
    assert _wait_for(lambda: not alive(pid)), "the resident still runs after stop"
    status = idle_resident.status()
    assert status.returncode == 1
    assert status.stdout.startswith(b"no resident mtrace runs"), status

    none = idle_resident.mtrace("resident", "stop")
    assert (none.returncode, none.stdout) == (0, b"no resident mtrace runs\n")


def test_idle_resident_exits_by_itself(idle_resident: Resident) -> None:
    started = idle_resident.start("--idle", "1")
    assert started.returncode == 0, started
    assert b"exits after 1 s without a run" in started.stdout
    assert _wait_for(lambda: not alive(idle_resident.pid), timeout=10), "it did not exit idle"
    assert not idle_resident.socket.exists()
    log = (idle_resident.socket.parent / "resident.log").read_text()
    assert "idle for 1 s, exiting" in log


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_foreground_resident_serves_until_stopped(idle_resident: Resident, signum: int,
                                                  code: int) -> None:
    """`start --foreground` serves in the terminal; SIGTERM (or a Ctrl-C)
    ends it, and it removes its socket."""
    process = subprocess.Popen([*MTRACE, "resident", "start", "--foreground", "--idle", "0"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=idle_resident.env())
    try:
        assert process.stderr is not None
        line = _read_until(process.stderr.fileno(), rb"listening on .*\n")
        assert line == f"mtrace resident {process.pid}: listening on {idle_resident.socket}\n".encode()
        idle_resident.pid = process.pid
        result = idle_resident.mtrace("exec", "--", "echo", "served")
        assert (result.returncode, result.stdout) == (0, b"served\n"), result
        assert idle_resident.runs() == 1
        process.send_signal(signum)
        assert process.wait(timeout=PATIENCE) == code
        assert not idle_resident.socket.exists()
    finally:
        stop(process, signal.SIGKILL, timeout=0)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# --- a run handed over is the in-process run ---------------------------------------


def _same_run(resident: Resident, *args: str, **popen: Any) -> Result:
    """``mtrace ARGS`` through the resident (checked: the run count grows) and
    in-process: the same exit code, stdout and stderr. The resident's result."""
    before = resident.runs()
    handed = resident.mtrace(*args, **popen)
    assert resident.runs() == before + 1, "the run was not handed to the resident"
    alone = resident.mtrace(*args, resident=False, **popen)
    assert (handed.returncode, handed.stdout, handed.stderr) == (
        alone.returncode, alone.stdout, alone.stderr)
    return handed


def test_plain_exec_is_the_in_process_one(resident: Resident) -> None:
    handed = _same_run(resident, "exec", "--", "sh", "-c",
                       'echo "out $HOME"; echo err >&2; exit 3')
    assert handed.returncode == 3
    assert handed.stdout == f"out {os.environ['HOME']}\n".encode()
    assert handed.stderr == b"err\n"


def test_program_killed_by_a_signal_is_the_in_process_one(resident: Resident) -> None:
    handed = _same_run(resident, "exec", "--", "sh", "-c", "echo before; kill -USR1 $$")
    assert (handed.returncode, handed.stdout) == (128 + signal.SIGUSR1, b"before\n")


def test_command_that_does_not_exist_is_the_in_process_one(resident: Resident) -> None:
    handed = _same_run(resident, "exec", "--", "no-such-command-for-mtrace")
    assert handed.returncode == 127
    assert b"no-such-command-for-mtrace" in handed.stderr


def test_target_that_does_not_exist_is_the_in_process_one(resident: Resident) -> None:
    handed = _same_run(resident, "exec", "--target", "pid/999999999", "--", "true")
    assert handed.returncode == 79
    assert handed.stderr.startswith(b"mtrace: error: target pid/999999999 does not exist\n")


def test_bytes_that_are_not_utf_8_are_the_in_process_ones(resident: Resident,
                                                          tmp_path: Path) -> None:
    """The environment, argv and cwd go to the resident as Python's strings:
    bytes that are not UTF-8 must come back as they were."""
    work = tmp_path / os.fsdecode(b"dir-\xfe")
    work.mkdir()
    resident.extra_env = {"NOT_UTF8": os.fsdecode(b"a\xffb")}
    handed = _same_run(resident, "exec", "--", "sh", "-c", 'printf "%s|%s|%s" "$NOT_UTF8" "$1" "$PWD"',
                       "sh", os.fsdecode(b"c\xfdd"), cwd=work)
    assert handed.stdout == b"a\xffb|c\xfdd|" + os.fsencode(work), handed


def test_program_gets_sigpipe_as_in_process(resident: Resident) -> None:
    """Python ignores SIGPIPE; the program must not inherit that from the
    command that spawns it (`yes | head -1` ends yes with SIGPIPE, silently)."""
    results = []
    for through in ("resident", "in-process"):
        command = subprocess.Popen([*MTRACE, "exec", "--", "yes"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=resident.env(through == "resident"))
        try:
            assert command.stdout is not None and command.stderr is not None
            assert command.stdout.readline() == b"y\n"
            command.stdout.close()
            results.append((command.wait(timeout=PATIENCE), command.stderr.read()))
        finally:
            stop(command, signal.SIGKILL)
            assert command.stderr is not None
            command.stderr.close()
    assert results == [(128 + signal.SIGPIPE, b"")] * 2
    assert resident.runs() == 1


def _private_dir_config(netns_target: NetnsTarget, tmp_path: Path, mode: str = "read") -> Path:
    """A config that puts the target's private directory on the read_only
    list (read_write in write mode): /tmp is local by default."""
    private = "^" + re.escape(os.path.dirname(netns_target.private_file)) + "(/|$)"
    fs: dict[str, Any] = ({"mode": "write", "read_write": [private]} if mode == "write"
                          else {"read_only": [private]})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"feature": {"fs": fs}}))
    return config


@pytest.mark.root
def test_exec_with_a_target_is_the_in_process_one(resident: Resident, netns_target: NetnsTarget,
                                                  tmp_path: Path) -> None:
    config = _private_dir_config(netns_target, tmp_path)
    handed = _same_run(resident, "exec", "--target", f"pid/{netns_target.pid}", "-f", str(config),
                       "--", "sh", "-c", f'echo "$ONLY_IN_TARGET"; cat {netns_target.private_file}')
    assert handed.returncode == 0, handed.stderr.decode(errors="replace")[-2000:]
    assert handed.stdout == b"yes\n" + netns_target.private_file_content


@pytest.mark.root
def test_config_in_the_commands_directory_is_the_one_used(resident: Resident,
                                                          netns_target: NetnsTarget,
                                                          tmp_path: Path) -> None:
    """With no -f, the config is looked for in the command's directory, not
    in the one the resident was started from."""
    work = tmp_path / "work"
    (work / ".mtrace").mkdir(parents=True)
    config = json.loads(_private_dir_config(netns_target, tmp_path).read_text())
    config["feature"]["env"] = {"override": {"FROM_CONFIG": "found"}}
    (work / ".mtrace" / "config.json").write_text(json.dumps(config))
    handed = _same_run(resident, "exec", "--target", f"pid/{netns_target.pid}", "--", "sh", "-c",
                       f'echo "$FROM_CONFIG"; cat {netns_target.private_file}', cwd=work)
    assert handed.returncode == 0, handed.stderr.decode(errors="replace")[-2000:]
    assert handed.stdout == b"found\n" + netns_target.private_file_content


# --- the program is the command's ------------------------------------------------


def test_program_is_in_the_commands_process_group_and_session(resident: Resident,
                                                               tmp_path: Path) -> None:
    before = resident.runs()
    with open(tmp_path / "out", "wb") as out:
        command = subprocess.Popen(
            [*MTRACE, "exec", "--", sys.executable, "-S", "-c",
             "import os; print(os.getpgrp(), os.getsid(0))"],
            stdout=out, stderr=subprocess.PIPE, env=resident.env(), start_new_session=True)
    try:
        _, stderr = command.communicate(timeout=60)
    finally:
        stop(command, signal.SIGKILL)
    assert command.returncode == 0, stderr
    # start_new_session: the command leads its own group and session.
    assert (tmp_path / "out").read_text() == f"{command.pid} {command.pid}\n"
    assert resident.runs() == before + 1


def test_stdin_reaches_the_program(resident: Resident) -> None:
    before = resident.runs()
    result = resident.mtrace("exec", "--", "cat", input=b"through the pipe\n")
    assert (result.returncode, result.stdout) == (0, b"through the pipe\n"), result
    assert resident.runs() == before + 1


def test_cwd_and_umask_are_the_commands(resident: Resident, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    assert os.getcwd() != str(work)  # the resident was started from here
    before = resident.runs()
    result = resident.mtrace("exec", "--", "sh", "-c", "pwd; umask; : > made",
                             cwd=work, umask=0o077)
    assert (result.returncode, result.stdout) == (0, f"{work}\n0077\n".encode()), result
    assert (work / "made").stat().st_mode & 0o777 == 0o600
    assert resident.runs() == before + 1


# --- signals ---------------------------------------------------------------------

COUNT_SIGNALS = """
import os, select, signal, sys, time
# Counted as delivered (the wakeup fd gets a byte per delivery): Python's
# handler would run once for two that came before it ran.
reader, writer = os.pipe()
os.set_blocking(writer, False)
signal.set_wakeup_fd(writer)
signal.signal(getattr(signal, sys.argv[1]), lambda *_: None)
print("ready", flush=True)
received = b""
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    wait = 0.5 if received else deadline - time.monotonic()  # a second one comes by then
    if not select.select([reader], [], [], wait)[0]:
        if received:
            break
        continue
    received += os.read(reader, 64)
print(sys.argv[1], len(received), flush=True)
"""


@pytest.mark.parametrize("through", ["resident", "in-process"])
def test_sigterm_of_the_command_reaches_the_program_once(resident: Resident, through: str) -> None:
    before = resident.runs()
    reader, writer = os.pipe()
    try:
        command = subprocess.Popen(
            [*MTRACE, "exec", "--", sys.executable, "-S", "-c", COUNT_SIGNALS, "SIGTERM"],
            stdout=writer, stderr=subprocess.PIPE, env=resident.env(through == "resident"),
            start_new_session=True)
        os.close(writer)
        try:
            assert b"ready" in _read_until(reader, b"ready")
            command.send_signal(signal.SIGTERM)
            output = _read_until(reader, rb"SIGTERM \d+\n")
            assert command.wait(timeout=PATIENCE) == 0, command.stderr
        finally:
            stop(command, signal.SIGKILL)
            assert command.stderr is not None
            command.stderr.close()
    finally:
        os.close(reader)
    assert output.endswith(b"SIGTERM 1\n"), output
    assert resident.runs() == before + (through == "resident")


@pytest.mark.parametrize("through", ["resident", "in-process"])
def test_terminal_ctrl_c_reaches_the_program_once(resident: Resident, through: str) -> None:
    before = resident.runs()
    leader, follower = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        command = subprocess.Popen(
            [*MTRACE, "exec", "--", sys.executable, "-S", "-c", COUNT_SIGNALS, "SIGINT"],
            stdin=follower, stdout=follower, stderr=follower, preexec_fn=take_terminal,
            env=resident.env(through == "resident"))
        try:
            assert b"ready" in _read_until(leader, b"ready")
            os.write(leader, b"\x03")
            output = _read_until(leader, rb"SIGINT \d+\r\n")
            assert command.wait(timeout=PATIENCE) == 0, output
        finally:
            stop(command, signal.SIGKILL)
    finally:
        os.close(leader)
        os.close(follower)
    assert b"SIGINT 1\r\n" in output, output
    assert resident.runs() == before + (through == "resident")


# --- failures lose nothing and never hang ------------------------------------------

SHELL_WITH_A_CHILD = 'sleep 60 & echo "$$ $!"; wait'


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *_descendants(child)]
    return found


@pytest.fixture(params=["no target", "pid/N"])
def target_args(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """No target, or a process of this machine (the session then forks a local agent)."""
    if request.param == "no target":
        yield []
        return
    if os.geteuid() != 0:
        pytest.skip("needs root: attaches to another process")
    target = subprocess.Popen(["sleep", "120"])
    try:
        yield ["--target", f"pid/{target.pid}"]
    finally:
        stop(target, signal.SIGKILL, timeout=0)


def _start_shell_with_a_child(resident: Resident, out: Path, target_args: list[str]
                              ) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`mtrace exec -- sh` whose sh runs a sleep; the command and both pids."""
    with open(out, "wb") as sink, open(out.with_suffix(".err"), "wb") as errors:
        command = subprocess.Popen([*MTRACE, "exec", *target_args, "--", "sh", "-c", SHELL_WITH_A_CHILD],
                                   stdout=sink, stderr=errors, env=resident.env(),
                                   start_new_session=True)
    assert _wait_for(lambda: out.read_bytes().endswith(b"\n")), "the program never started"
    return command, [int(pid) for pid in out.read_bytes().split()]


def _kill_everything(command: subprocess.Popen[bytes], pids: list[int]) -> None:
    """Whatever a failed test left of the run: the command and these processes."""
    stop(command, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_killed_command_takes_the_program_tree(resident: Resident, tmp_path: Path,
                                               target_args: list[str]) -> None:
    before = resident.runs()
    command, program = _start_shell_with_a_child(resident, tmp_path / "out", target_args)
    session = _descendants(resident.pid)  # the session, and the local agent with a target
    try:
        assert all(alive(pid) for pid in program)
        command.kill()
        command.wait(timeout=PATIENCE)
        assert _wait_for(lambda: not any(alive(pid) for pid in program)), (
            f"the program outlived the command: {[pid for pid in program if alive(pid)]}")
        assert _wait_for(lambda: not any(alive(pid) for pid in session)), (
            f"the session outlived the command: {[pid for pid in session if alive(pid)]}")
    finally:
        _kill_everything(command, [*program, *session])
    # The resident serves the next run.
    result = resident.mtrace("exec", "--", "echo", "next")
    assert (result.returncode, result.stdout) == (0, b"next\n"), result
    assert resident.runs() == before + 2


def test_killed_session_ends_the_command_with_72(resident: Resident, tmp_path: Path,
                                                 target_args: list[str]) -> None:
    """Regression: the command killed the exec helper at once, before the
    helper could kill the program's tree: the sh's sleep ran on."""
    command, program = _start_shell_with_a_child(resident, tmp_path / "out", target_args)
    session = _descendants(resident.pid)
    try:
        sessions = resident.sessions()
        assert len(sessions) == 1, sessions
        os.kill(sessions[0], signal.SIGKILL)
        assert command.wait(timeout=PATIENCE) == 72
        stderr = (tmp_path / "out.err").read_text()
        errors = [line for line in stderr.splitlines() if line.startswith("mtrace: error:")]
        assert len(errors) == 1, stderr
        assert "Traceback" not in stderr
        assert _wait_for(lambda: not any(alive(pid) for pid in [*program, *session])), (
            f"outlived the session: {[pid for pid in [*program, *session] if alive(pid)]}")
    finally:
        _kill_everything(command, [*program, *session])
    assert resident.status().returncode == 0


@contextlib.contextmanager
def _stopped(resident: Resident) -> Iterator[None]:
    """The resident stopped (SIGSTOP: a foreground one after a Ctrl-Z), then resumed."""
    os.kill(resident.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(resident.pid, signal.SIGCONT)


def test_stopped_resident_leaves_the_run_to_the_command(resident: Resident, tmp_path: Path) -> None:
    """Regression: the command waited for the resident's answer for ever, its
    signals blocked (timeout's SIGTERM, Ctrl-C and Ctrl-\\ did nothing)."""
    with _stopped(resident), open(tmp_path / "out", "wb") as out, \
            open(tmp_path / "err", "wb") as err:
        command = subprocess.Popen([*MTRACE, "exec", "--", "sh", "-c", "echo alone; exit 3"],
                                   stdout=out, stderr=err, env=resident.env())
        try:
            assert command.wait(timeout=PATIENCE) == 3
        finally:
            stop(command, signal.SIGKILL, timeout=0)
    assert (tmp_path / "out").read_bytes() == b"alone\n"
    # Resumed, the resident takes the run the command gave up: it says nothing
    # on the command's stderr, and serves the next run.
    assert _wait_for(lambda: resident.runs() == 1 and not resident.sessions())
    assert (tmp_path / "err").read_bytes() == b""
    result = resident.mtrace("exec", "--", "echo", "served")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"served\n", b"")
    assert resident.runs() == 2


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_signal_ends_a_command_waiting_for_a_stopped_resident(resident: Resident, tmp_path: Path,
                                                              signum: int, code: int) -> None:
    """Regression: a signal for a command waiting for the resident's answer
    stayed blocked; it must end the command as it would before any run."""
    with _stopped(resident), open(tmp_path / "out", "wb") as out, \
            open(tmp_path / "err", "wb") as err:
        command = subprocess.Popen([*MTRACE, "exec", "--", "echo", "never"], stdout=out,
                                   stderr=err, env=resident.env())
        try:
            time.sleep(1)  # connected, its run sent: waiting for the answer
            assert command.poll() is None
            command.send_signal(signum)
            assert command.wait(timeout=3) == code
        finally:
            stop(command, signal.SIGKILL, timeout=0)
    # Resumed, the resident takes the run the command gave up, and says nothing.
    assert _wait_for(lambda: resident.runs() == 1 and not resident.sessions())
    assert (tmp_path / "out").read_bytes() == (tmp_path / "err").read_bytes() == b""


def test_runs_at_once_are_each_their_own(resident: Resident, tmp_path: Path) -> None:
    commands = []
    for name, code in (("first", 3), ("second", 4)):
        with open(tmp_path / name, "wb") as out:
            commands.append(subprocess.Popen(
                [*MTRACE, "exec", "--", "sh", "-c", f"sleep 0.5; echo {name}; exit {code}"],
                stdout=out, stderr=subprocess.DEVNULL, env=resident.env()))
    try:
        assert [command.wait(timeout=60) for command in commands] == [3, 4]
    finally:
        for command in commands:
            stop(command, signal.SIGKILL)
    assert [(tmp_path / name).read_text() for name in ("first", "second")] == ["first\n", "second\n"]
    assert resident.runs() == 2


def test_stop_during_a_run_lets_the_run_finish(resident: Resident, tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as out:
        command = subprocess.Popen(
            [*MTRACE, "exec", "--", "sh", "-c", "echo started; read line; echo \"got $line\"; exit 6"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL, env=resident.env())
    try:
        assert _wait_for(lambda: (tmp_path / "out").read_bytes() == b"started\n")
        stopped = resident.mtrace("resident", "stop")
        assert stopped.stdout == f"stopped the resident mtrace (pid {resident.pid})\n".encode()
        assert not resident.socket.exists()
        command.communicate(b"more\n", timeout=PATIENCE)
    finally:
        stop(command, signal.SIGKILL)
    assert command.returncode == 6
    assert (tmp_path / "out").read_bytes() == b"started\ngot more\n"


def test_killed_resident_leaves_runs_to_the_command(resident: Resident) -> None:
    os.kill(resident.pid, signal.SIGKILL)
    assert _wait_for(lambda: not alive(resident.pid))
    assert resident.socket.is_socket()  # left behind: nothing listens on it
    result = resident.mtrace("exec", "--", "sh", "-c", "echo alone; exit 2")
    assert (result.returncode, result.stdout, result.stderr) == (2, b"alone\n", b"")
    assert resident.status().returncode == 1
    started = resident.start("--idle", "120")  # over the socket left behind
    assert started.returncode == 0, started
    result = resident.mtrace("exec", "--", "echo", "served")
    assert (result.returncode, result.stdout) == (0, b"served\n")
    assert resident.runs() == 1


def test_ptrace_backend_is_not_handed_over(resident: Resident) -> None:
    before = resident.runs()
    result = resident.mtrace("exec", "--backend", "ptrace", "--", "sh", "-c", "echo traced; exit 4")
    assert (result.returncode, result.stdout) == (4, b"traced\n"), result
    assert resident.runs() == before


# --- refusals --------------------------------------------------------------------


@contextlib.contextmanager
def _touched(path: Path) -> Iterator[None]:
    """``path`` with a new mtime, its own one back afterwards."""
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        yield
    finally:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_changed_install_runs_in_process_and_the_resident_exits(resident: Resident) -> None:
    assert resident.runs() == 0
    # A module exec does not import: its bytecode is not rewritten meanwhile.
    changed = Path(mtrace.cli.__file__).parent / "doctor.py"
    with _touched(changed):
        result = resident.mtrace("exec", "--", "sh", "-c", "echo still runs; exit 5")
    assert (result.returncode, result.stdout, result.stderr) == (5, b"still runs\n", b""), result
    assert _wait_for(lambda: not alive(resident.pid)), "the stale resident still runs"
    assert not resident.socket.exists()
    log = (resident.socket.parent / "resident.log").read_text()
    assert "mtrace's files changed since the resident started, exiting" in log


@pytest.mark.root
@pytest.mark.parametrize("unshare", [["--mount"], ["--pid", "--fork"], ["--net"]],
                         ids=["mnt", "pid", "net"])
def test_command_in_other_namespaces_is_not_handed_over(resident: Resident, tmp_path: Path,
                                                         unshare: list[str]) -> None:
    """Regression: a command in a container or an unshare of the user's (same
    uid, the socket reachable) was handed over: the session looked its paths
    up in the resident's mount namespace (a directory only the command had:
    "cannot enter"), and from a pid namespace the command hung for ever (its
    helper's pid meant another process to the session, and the session's pid
    nothing to the command)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: unshare")
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        command = subprocess.Popen(
            ["unshare", *unshare, *MTRACE, "exec", "--", "sh", "-c", "echo inside; exit 4"],
            stdout=out, stderr=err, env=resident.env(), start_new_session=True)
        try:
            assert command.wait(timeout=PATIENCE) == 4
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command.pid, signal.SIGKILL)
            command.wait()
    assert (tmp_path / "out").read_bytes() == b"inside\n"
    assert (tmp_path / "err").read_bytes() == b""
    assert resident.runs() == 0
    result = resident.mtrace("exec", "--", "echo", "served")
    assert (result.returncode, result.stdout) == (0, b"served\n"), result
    assert resident.runs() == 1


def test_socket_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    resident = Resident(_socket_in(tmp_path))
    resident.socket.parent.mkdir()
    resident.socket.parent.chmod(0o777)
    try:
        result = resident.start()
        assert result.returncode == 72, result
        lines = result.stderr.decode().splitlines()
        assert lines[0].startswith("mtrace: error: cannot start the resident mtrace: "), lines
        assert f"{resident.socket.parent} is not the user's own, closed to others" in lines[0]
        assert [line for line in lines[1:] if not line.startswith("mtrace: hint: ")] == [], lines
        assert not resident.socket.exists()
        assert resident.status().returncode == 1
    finally:
        resident.close()


PEER = """
import marshal, socket, sys
path, revision = sys.argv[1], int(sys.argv[2])
for op in sys.argv[3:]:
    data = marshal.dumps({"revision": revision, "op": op})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)  # reaching the socket is allowed: the resident's check refuses
    try:
        sock.sendall(len(data).to_bytes(4, "little") + data)
        answer = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):  # closed before it read the frame
        answer = b""
    print(op, "answered" if answer else "not answered", flush=True)
    sock.close()
"""


@pytest.mark.root
def test_peer_of_another_user_gets_no_answer() -> None:
    # Not in tmp_path: pytest's base directory is closed to other users, and the
    # peer must reach the socket for the resident's own check to be what refuses it.
    directory = Path(tempfile.mkdtemp(prefix="mtrace-rtest-"))
    resident = Resident(_socket_in(directory))

    # The system's python: the venv's may be under a directory only root enters.
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    assert python, "no python3 in /usr/bin for the other user's peer"

    def peer(*ops: str, **user: Any) -> list[str]:
        done = subprocess.run([python, "-S", "-c", PEER, str(resident.socket),
                               str(REVISION), *ops], capture_output=True, timeout=PATIENCE,
                              check=False, **user)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().splitlines()

    try:
        started = resident.start("--idle", "120")
        assert started.returncode == 0, started
        directory.chmod(0o711)
        resident.socket.parent.chmod(0o711)
        resident.socket.chmod(0o666)
        assert peer("status") == ["status answered"]  # the peer's frames are right
        assert peer("status", "stop", user=65534, group=65534, extra_groups=[]) == [
            "status not answered", "stop not answered"]
        assert alive(resident.pid)
        result = resident.mtrace("exec", "--", "echo", "served")
        assert (result.returncode, result.stdout) == (0, b"served\n"), result
        assert resident.runs() == 1
    finally:
        resident.close()
        for path in (resident.socket, resident.socket.parent / "resident.log"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for empty in (resident.socket.parent, directory):
            with contextlib.suppress(OSError):
                empty.rmdir()


# --- write mode ------------------------------------------------------------------

WRITE_BIG = """
import os, signal, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for block in range(16):
    os.write(fd, bytes([65 + block]) * (256 << 10))
if sys.argv[2] == "killed":  # no close, no exit: only the session's last flush uploads it
    os.kill(os.getpid(), signal.SIGKILL)
os.close(fd)
"""


@pytest.mark.root
@pytest.mark.parametrize("ending", ["closed", "killed"])
def test_write_mode_has_landed_when_the_command_exits(resident: Resident, netns_target: NetnsTarget,
                                                     tmp_path: Path, ending: str) -> None:
    config = _private_dir_config(netns_target, tmp_path, mode="write")
    written = os.path.join(os.path.dirname(netns_target.private_file), "written-by-resident.bin")
    host_view = Path(f"/proc/{netns_target.pid}/root{written}")
    expected = b"".join(bytes([65 + block]) * (256 << 10) for block in range(16))
    try:
        result = resident.mtrace("exec", "--target", f"pid/{netns_target.pid}", "-f", str(config),
                                 "--", sys.executable, "-S", "-c", WRITE_BIG, written, ending)
        # Read at once: nothing may still be on its way once the command has exited.
        landed = host_view.read_bytes() if host_view.exists() else b"nothing"
        assert result.returncode == (0 if ending == "closed" else 128 + signal.SIGKILL), (
            result.stderr.decode(errors="replace")[-2000:])
        assert landed == expected, f"{len(landed)} of {len(expected)} bytes landed"
        assert not os.path.exists(written), "written on this machine, not the target"
        assert resident.runs() == 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            host_view.unlink()
