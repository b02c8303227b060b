"""The main job under both backends: each probe flavour, run under
`mtrace exec --backend B --target pid/N`, prints what it prints when run
directly inside the target's namespaces, for env, a target-only file, a name
only the target's DNS knows, the target's TCP service and its UDP service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from netns_target import NetnsTarget

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def _commands(target: NetnsTarget) -> list[list[str]]:
    return [
        ["env", "ONLY_IN_TARGET"],
        ["env", "FOO"],
        ["cat", target.private_file],
        ["stat", target.private_file],
        ["ls", os.path.dirname(target.private_file)],
        ["resolve", "only-in-target.test"],
        ["resolve", "hosts-only.test"],
        ["tcp", "127.0.0.1", str(target.tcp_port), "hello"],
        ["udp", "127.0.0.1", str(target.udp_port), "ping"],
        ["udp-unconnected", "127.0.0.1", str(target.udp_port), "ping"],
        ["tcp", "127.0.0.1", str(target.closed_port), "x"],
    ]


def test_probe_sees_the_target(probe: Path, backend: str, netns_target: NetnsTarget) -> None:
    private_dir = os.path.dirname(netns_target.private_file)
    config = {"feature": {"fs": {"read_only": ["^" + re.escape(private_dir) + "(/|$)"]}}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    try:
        for command in _commands(netns_target):
            inside = netns_target.run_inside(str(probe), *command)
            traced = subprocess.run(
                [sys.executable, "-m", "mtrace.cli", "exec", "--backend", backend,
                 "--target", f"pid/{netns_target.pid}", "-f", file.name, "--",
                 str(probe), *command],
                capture_output=True, timeout=60, check=False)
            assert (traced.returncode, traced.stdout) == (inside.returncode, inside.stdout), (
                command, traced.stderr.decode(errors="replace")[-2000:])
    finally:
        os.unlink(file.name)


def test_trace_with_a_target_shows_the_remote_calls(backend: str, programs: dict[str, Path],
                                                     netns_target: NetnsTarget) -> None:
    private_dir = os.path.dirname(netns_target.private_file)
    config = {"feature": {"fs": {"read_only": ["^" + re.escape(private_dir) + "(/|$)"]}}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    try:
        traced = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "trace", "--backend", backend, "-e",
             "openat,connect", "--target", f"pid/{netns_target.pid}", "-f", file.name, "--",
             str(programs["probe-go"]), "cat", netns_target.private_file],
            capture_output=True, timeout=60, check=False)
    finally:
        os.unlink(file.name)
    assert (traced.returncode, traced.stdout) == (0, netns_target.private_file_content)
    lines = traced.stderr.decode().splitlines()
    opened = [line for line in lines if f'"{netns_target.private_file}"' in line]
    assert opened and opened[0].split(" = ")[1].split()[0].isdigit(), lines
    assert all("connect(" in line or "openat(" in line for line in lines), lines


GRACEFUL = """
import signal, sys, time
interrupted = []
signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
print("program ready", flush=True)
deadline = time.monotonic() + 30
while not interrupted and time.monotonic() < deadline:  # until the terminal's Ctrl-C
    time.sleep(0.02)
print(open(sys.argv[1]).read(), end="", flush=True)
"""


def test_ctrl_c_reaches_the_program_not_the_agent(netns_target: NetnsTarget) -> None:
    """A program that shuts down gracefully on Ctrl-C still reaches the target
    afterwards: the terminal's SIGINT is the program's, not the local agent's."""
    import fcntl
    import pty
    import select
    import termios

    private_dir = os.path.dirname(netns_target.private_file)
    config = {"feature": {"fs": {"read_only": ["^" + re.escape(private_dir) + "(/|$)"]}}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    leader, follower = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def read_until(marker: bytes) -> bytes:
        output = b""
        while marker not in output:
            ready, _, _ = select.select([leader], [], [], 30)
            chunk = os.read(leader, 4096) if ready else b""
            if not chunk:
                break
            output += chunk
        return output

    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{netns_target.pid}",
             "-f", file.name, "--", sys.executable, "-c", GRACEFUL, netns_target.private_file],
            stdin=follower, stdout=follower, stderr=follower, preexec_fn=take_terminal)
        assert b"program ready" in read_until(b"program ready")
        os.write(leader, b"\x03")
        output = read_until(netns_target.private_file_content.rstrip())
        assert process.wait(timeout=30) == 0
        assert netns_target.private_file_content.rstrip() in output, output
        assert b"lost the connection" not in output, output
    finally:
        os.close(leader)
        os.close(follower)
        os.unlink(file.name)


def test_ls_long_listing_of_a_target_only_directory(backend: str,
                                                    netns_target: NetnsTarget) -> None:
    """Regression: `ls -l` asks for each entry's xattrs (SELinux label, ACLs);
    for a target-only path the kernel said ENOENT and ls printed errors."""
    private_dir = os.path.dirname(netns_target.private_file)
    config = {"feature": {"fs": {"read_only": ["^" + re.escape(private_dir) + "(/|$)"]}}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    argv = ["ls", "-l", "--time-style=+%s", private_dir, netns_target.private_file]
    try:
        inside = netns_target.run_inside(*argv)
        traced = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--backend", backend,
             "--target", f"pid/{netns_target.pid}", "-f", file.name, "--", *argv],
            capture_output=True, timeout=60, check=False)
    finally:
        os.unlink(file.name)
    assert inside.returncode == 0 and inside.stderr == b""
    assert (traced.returncode, traced.stdout, traced.stderr) == (0, inside.stdout, b"")
