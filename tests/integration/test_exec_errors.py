"""Bad input to `mtrace exec`: one clear line with a hint, a distinct exit code,
and the program never started."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mtrace_run import MTRACE, run_mtrace

pytestmark = pytest.mark.timeout(60)

# A strong secret: a weak one adds a warning line before the error under test;
# given in the environment, as a secret on the command line does too.
SECRET = secrets.token_hex(16)
WITH_SECRET = {**os.environ, "MTRACE_AGENT_SECRET": SECRET}


def _marker_command(tmp_path: Path) -> tuple[Path, list[str]]:
    marker = tmp_path / "started"
    return marker, ["sh", "-c", f"touch {marker}"]


def _assert_clear_error(stderr: bytes, text: str) -> None:
    lines = stderr.decode().splitlines()
    assert lines[0].startswith("mtrace: error: ") and text in lines[0], lines
    assert lines[1].startswith("mtrace: hint: "), lines
    assert "Traceback" not in stderr.decode()


def test_target_that_does_not_exist(tmp_path: Path) -> None:
    marker, command = _marker_command(tmp_path)
    result = run_mtrace("exec", "--target", "pid/999999999", "--", *command)
    assert result.returncode == 79
    _assert_clear_error(result.stderr, "does not exist")
    assert not marker.exists()


@pytest.mark.parametrize(("target", "text"), [
    ("pid/abc", "needs a process id"),
    ("pod/", "is not a Kubernetes name"),
    ("deployment/api/sidecar", "expected deployment/NAME or deployment/NAME/container/C"),
    ("vm/1", "unknown target kind"),
])
def test_malformed_targets(tmp_path: Path, target: str, text: str) -> None:
    marker, command = _marker_command(tmp_path)
    result = run_mtrace("exec", "--target", target, "--", *command)
    assert result.returncode == 79
    _assert_clear_error(result.stderr, text)
    assert not marker.exists()


def test_kubernetes_target_without_a_kubeconfig(tmp_path: Path) -> None:
    marker, command = _marker_command(tmp_path)
    result = run_mtrace("exec", "--target", "deployment/api", "--kubeconfig",
                        str(tmp_path / "missing"), "--", *command)
    assert result.returncode == 78
    _assert_clear_error(result.stderr, "no kubeconfig")
    assert not marker.exists()


def test_bad_config_file_names_the_key(tmp_path: Path) -> None:
    marker, command = _marker_command(tmp_path)
    config = tmp_path / "mtrace.toml"
    config.write_text('[feature.fs]\nmode = "sideways"\n')
    result = run_mtrace("exec", "-f", str(config), "--target", "pid/1", "--", *command)
    assert result.returncode == 78
    _assert_clear_error(result.stderr, "`feature.fs.mode`")
    assert not marker.exists()


def test_agent_that_is_not_there(tmp_path: Path) -> None:
    marker, command = _marker_command(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_mtrace("exec", "--agent", f"127.0.0.1:{port}", "--", *command, env=WITH_SECRET)
    assert result.returncode == 71
    _assert_clear_error(result.stderr, f"cannot reach the agent at 127.0.0.1:{port}")
    assert not marker.exists()


def test_agent_with_the_wrong_secret(tmp_path: Path,
                                    listening_agent: Callable[..., Any]) -> None:
    marker, command = _marker_command(tmp_path)
    with listening_agent() as agent:
        result = run_mtrace("exec", "--agent", f"{agent.host}:{agent.port}", "--", *command,
                            env={**os.environ, "MTRACE_AGENT_SECRET": secrets.token_hex(16)})
    assert result.returncode == 71
    assert result.stderr.decode().startswith("mtrace: error: "), result.stderr
    assert not marker.exists()


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A TCP listener that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener


@pytest.fixture
def silent_agent(silent_listener: socket.socket) -> int:
    return int(silent_listener.getsockname()[1])


def test_an_agent_that_never_answers_times_out(tmp_path: Path, silent_agent: int) -> None:
    marker, command = _marker_command(tmp_path)
    config = tmp_path / "mtrace.toml"
    config.write_text("[agent]\nstartup_timeout = 1.0\n")
    started = time.monotonic()
    result = run_mtrace("exec", "-f", str(config), "--agent", f"127.0.0.1:{silent_agent}",
                        "--", *command, timeout=30, env=WITH_SECRET)
    assert time.monotonic() - started < 20
    assert result.returncode == 71
    assert result.stderr.decode().startswith("mtrace: error: "), result.stderr
    assert "Traceback" not in result.stderr.decode()
    assert not marker.exists()


def test_ctrl_c_while_waiting_for_the_agent(tmp_path: Path, silent_listener: socket.socket) -> None:
    marker, command = _marker_command(tmp_path)
    port = silent_listener.getsockname()[1]
    process = subprocess.Popen(
        [*MTRACE, "exec", "--agent", f"127.0.0.1:{port}", "--", *command],
        stderr=subprocess.PIPE, env=WITH_SECRET)
    # Interrupt only once mtrace has connected: it is then waiting for the
    # handshake (15 s by default), whatever the machine's load did to start-up.
    silent_listener.settimeout(30)
    connection, _ = silent_listener.accept()
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 130
    assert stderr.decode().startswith("mtrace: error: interrupted by SIGINT"), stderr
    assert not marker.exists()
    connection.close()


# --- issue 14: errors a user sees ------------------------------------------------


@pytest.fixture
def http_like_server() -> Iterator[int]:
    """A loopback server that greets every connection with an HTTP response."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def test_agent_address_of_an_http_server_says_not_an_agent(tmp_path: Path,
                                                           http_like_server: int) -> None:
    """It said "frame of 1213486160 bytes exceeds the maximum of 4096"."""
    marker, command = _marker_command(tmp_path)
    result = run_mtrace("exec", "--agent", f"127.0.0.1:{http_like_server}", "--", *command,
                        env=WITH_SECRET)
    assert result.returncode == 71
    _assert_clear_error(result.stderr, "is not an mtrace agent (it answers like an HTTP server)")
    assert b"1213486160" not in result.stderr
    assert not marker.exists()


def test_agent_without_a_secret_is_a_configuration_error(tmp_path: Path) -> None:
    """It exited 79 (bad target)."""
    marker, command = _marker_command(tmp_path)
    result = run_mtrace("exec", "--agent", "127.0.0.1:9", "--", *command,
                        env={k: v for k, v in os.environ.items()
                             if k != "MTRACE_AGENT_SECRET"})
    assert result.returncode == 78
    _assert_clear_error(result.stderr, "--agent needs the agent's shared secret")
    assert not marker.exists()


def test_trace_output_in_a_missing_directory(tmp_path: Path) -> None:
    """It exited 70 (not in the README) with no hint."""
    result = run_mtrace("trace", "-o", str(tmp_path / "nonexistent" / "x"), "--", "true")
    assert result.returncode == 78
    _assert_clear_error(result.stderr, "cannot write the trace to")


def test_a_huge_config_value_is_not_echoed_whole(tmp_path: Path) -> None:
    """A 10 MB string in a config came back whole in the error."""
    config = tmp_path / "mtrace.toml"
    config.write_text('[feature.fs]\nmode = "' + "x" * (10 << 20) + '"\n')
    result = run_mtrace("exec", "-f", str(config), "--target", "pid/1", "--", "true")
    assert result.returncode == 78
    _assert_clear_error(result.stderr, "`feature.fs.mode`")
    assert len(result.stderr) < 2000
    assert b"(10485760 characters)" in result.stderr


# --- the secret stays off mtrace's command line -------------------------------------------


def _secret_file(tmp_path: Path, secret: str, mode: int = 0o600) -> Path:
    path = tmp_path / "agent.secret"
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


def _without_secret() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MTRACE_AGENT_SECRET"}


def test_agent_secret_file_keeps_the_secret_off_the_command_line(
        tmp_path: Path, listening_agent: Callable[..., Any]) -> None:
    marker, command = _marker_command(tmp_path)
    with listening_agent() as agent:
        secret_file = _secret_file(tmp_path, agent.secret)
        argv = ["exec", "--agent", f"{agent.host}:{agent.port}", "--agent-secret-file",
                str(secret_file), "--", *command]
        result = run_mtrace(*argv, env=_without_secret())
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # no warning
    assert marker.exists()
    assert agent.secret not in " ".join(argv)


def test_agent_secret_in_the_environment_needs_no_flag_and_no_warning(
        tmp_path: Path, listening_agent: Callable[..., Any]) -> None:
    marker, command = _marker_command(tmp_path)
    with listening_agent() as agent:
        result = run_mtrace("exec", "--agent", f"{agent.host}:{agent.port}", "--", *command,
                            env={**_without_secret(), "MTRACE_AGENT_SECRET": agent.secret})
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert marker.exists()


def test_agent_secret_on_the_command_line_works_with_a_warning(
        tmp_path: Path, listening_agent: Callable[..., Any]) -> None:
    """It was taken silently, readable by every user in /proc/PID/cmdline."""
    marker, command = _marker_command(tmp_path)
    with listening_agent() as agent:
        result = run_mtrace("exec", "--agent", f"{agent.host}:{agent.port}", "--agent-secret",
                            agent.secret, "--", *command, env=_without_secret())
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtrace: warning: --agent-secret shows the "
                                                   "secret to every user"), lines
    assert "--agent-secret-file" in lines[0] and "MTRACE_AGENT_SECRET" in lines[0]
    assert marker.exists()


def test_a_secret_file_others_can_read_is_warned_about(
        tmp_path: Path, listening_agent: Callable[..., Any]) -> None:
    marker, command = _marker_command(tmp_path)
    with listening_agent() as agent:
        secret_file = _secret_file(tmp_path, agent.secret, 0o644)
        result = run_mtrace("exec", "--agent", f"{agent.host}:{agent.port}",
                            "--agent-secret-file", str(secret_file), "--", *command,
                            env=_without_secret())
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    assert result.stderr.decode().splitlines() == [
        f"mtrace: warning: {secret_file} is readable by other users (mode 0644): "
        f"chmod 600 {secret_file}"]


@pytest.mark.parametrize(("case", "text"), [
    ("missing", "cannot read the agent secret from"),
    ("empty", "must hold the secret on one line"),
    ("both", "give --agent-secret or --agent-secret-file, not both"),
])
def test_a_bad_agent_secret_file_is_a_configuration_error(tmp_path: Path, case: str,
                                                          text: str) -> None:
    marker, command = _marker_command(tmp_path)
    secret_file = tmp_path / "agent.secret"
    if case != "missing":
        secret_file.write_text("")
        secret_file.chmod(0o600)
    extra = ["--agent-secret", SECRET] if case == "both" else []
    result = run_mtrace("exec", "--agent", "127.0.0.1:9", *extra, "--agent-secret-file",
                        str(secret_file), "--", *command, env=_without_secret())
    assert result.returncode == 78
    if case == "missing":
        _assert_clear_error(result.stderr, text)
    assert text in result.stderr.decode()
    assert not marker.exists()
