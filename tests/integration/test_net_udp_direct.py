"""The direct path for connected UDP sockets (local targets, ``pid/N``).

Under the notify backend a UDP socket connected to a remote address becomes a
socket of the target's network namespace (no relay); under ``--backend
ptrace``, with ``direct = false``, for a socket that already sent through the
relay, and for the target's nameserver, the relay stays. Every case must give
the program the same datagrams and addresses as a run inside the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from netns_target import NetnsTarget

pytestmark = pytest.mark.root

TIMEOUT = 60.0

CONNECTED = r"""
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.settimeout(5)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.send(b"one")
print(s.recv(100).decode())
print("peer", s.getpeername(), "broadcast", s.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST))
s.sendto(b"two", ("127.0.0.1", int(sys.argv[1])))
print(s.recvfrom(100))
print("inode", os.fstat(s.fileno()).st_ino, flush=True)
sys.stdin.read()  # the socket stays open until the test has looked for it
"""

SENT_FIRST = r"""
import socket, sys
address = ("127.0.0.1", int(sys.argv[1]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"before", address)
data, peer = s.recvfrom(100)
print(data.decode(), peer)
s.connect(address)
s.send(b"after")
print(s.recv(100).decode(), s.getpeername())
"""


@pytest.fixture
def config_files() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _argv(target: NetnsTarget, script: str, backend: str, direct: bool,
          config_files: list[str]) -> list[str]:
    with tempfile.NamedTemporaryFile("w", prefix="mtrace-udp-", suffix=".json",
                                     delete=False) as config:
        json.dump({"feature": {"network": {"outgoing": {"direct": direct}}}}, config)
    config_files.append(config.name)
    return [sys.executable, "-m", "mtrace.cli.main", "exec", "--backend", backend,
            "--target", f"pid/{target.pid}", "-f", config.name, "--",
            sys.executable, "-S", "-c", script, str(target.udp_port)]


def _target_udp_inodes(target: NetnsTarget) -> set[int]:
    inodes = set()
    for table in ("udp", "udp6"):
        with open(f"/proc/{target.pid}/net/{table}") as lines:
            next(lines)
            inodes |= {int(line.split()[9]) for line in lines}
    return inodes


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("backend", "direct"),
                         [("notify", True), ("notify", False), ("ptrace", True)])
def test_connected_udp_socket_is_the_targets_under_notify_and_relayed_otherwise(
        netns_target: NetnsTarget, backend: str, direct: bool,
        config_files: list[str]) -> None:
    inside = netns_target.run_inside(sys.executable, "-S", "-c",
                                     CONNECTED.replace("sys.stdin.read()", "pass"),
                                     str(netns_target.udp_port))
    expected = [line for line in inside.stdout.decode().splitlines()
                if not line.startswith("inode")]
    process = subprocess.Popen(_argv(netns_target, CONNECTED, backend, direct, config_files),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdin is not None
        lines = [process.stdout.readline().decode().rstrip("\n") for _ in range(4)]
        in_target = int(lines[3].split()[1]) in _target_udp_inodes(netns_target)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(TIMEOUT)
    assert process.stderr is not None
    assert process.returncode == 0, process.stderr.read().decode(errors="replace")[-3000:]
    assert lines[:3] == expected
    assert lines[0] == "target-udp:one"
    assert in_target == (backend == "notify" and direct)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["notify", "ptrace"])
def test_udp_socket_that_sent_through_the_relay_stays_relayed_when_connected(
        netns_target: NetnsTarget, backend: str, config_files: list[str]) -> None:
    inside = netns_target.run_inside(sys.executable, "-S", "-c", SENT_FIRST,
                                     str(netns_target.udp_port))
    traced = subprocess.run(_argv(netns_target, SENT_FIRST, backend, True, config_files),
                            capture_output=True, timeout=TIMEOUT, check=False)
    assert (traced.returncode, traced.stdout) == (inside.returncode, inside.stdout), \
        traced.stderr.decode(errors="replace")[-3000:]
    assert traced.stdout.startswith(b"target-udp:before")
