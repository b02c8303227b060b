"""mirrord parity against a real target: feature.hostname, the env keys and
fs.mapping end to end, a mirrord config file found by the default lookup,
each under the four probe flavours."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_target import NetnsTarget

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def _exec(netns_target: NetnsTarget, *argv: str, backend: str = "auto",
          config: dict[str, object] | None = None, cwd: Path | None = None,
          extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    args = [sys.executable, "-m", "mtrace.cli", "exec", "--backend", backend,
            "--target", f"pid/{netns_target.pid}", *extra]
    if config is not None:
        assert cwd is not None
        path = cwd / "config.json"
        path.write_text(json.dumps(config))
        args += ["-f", str(path)]
    return subprocess.run([*args, "--", *argv], capture_output=True, timeout=60, check=False,
                          cwd=cwd)


def test_hostname_is_the_targets(probe: Path, backend: str, netns_target: NetnsTarget) -> None:
    assert netns_target.hostname and netns_target.hostname != socket.gethostname()
    inside = netns_target.run_inside(str(probe), "hostname")
    assert inside.stdout == f"{netns_target.hostname}\n".encode()
    traced = _exec(netns_target, str(probe), "hostname", backend=backend)
    assert (traced.returncode, traced.stdout) == (0, inside.stdout), traced.stderr[-2000:]
    etc = _exec(netns_target, str(probe), "cat", "/etc/hostname", backend=backend)
    assert etc.stdout == f"{netns_target.hostname}\n".encode(), etc.stderr[-2000:]


def test_hostname_off_keeps_this_machines(probe: Path, netns_target: NetnsTarget,
                                          tmp_path: Path) -> None:
    # Files local except overrides, DNS off: only feature.hostname sends
    # /etc/hostname to the target.
    config: dict[str, object] = {
        "feature": {"hostname": False, "fs": "localwithoverrides", "network": {"dns": False}}}
    traced = _exec(netns_target, str(probe), "hostname", config=config, cwd=tmp_path)
    assert traced.stdout == f"{socket.gethostname()}\n".encode(), traced.stderr[-2000:]
    etc = _exec(netns_target, str(probe), "cat", "/etc/hostname", config=config, cwd=tmp_path)
    with open("/etc/hostname", "rb") as file:
        assert etc.stdout == file.read()
    config["feature"]["hostname"] = True  # type: ignore[index]
    etc = _exec(netns_target, str(probe), "cat", "/etc/hostname", config=config, cwd=tmp_path)
    assert etc.stdout == f"{netns_target.hostname}\n".encode(), etc.stderr[-2000:]


def test_env_keys_from_a_mirrord_file_found_by_lookup(probe: Path, netns_target: NetnsTarget,
                                                      tmp_path: Path) -> None:
    (tmp_path / ".mirrord").mkdir()
    (tmp_path / "dev.env").write_text("FROM_FILE=dotenv\nFOO=from-file\n")
    (tmp_path / ".mirrord" / "mirrord.json").write_text(json.dumps({
        "target": f"pid/{netns_target.pid}",
        "feature": {"env": {"env_file": "dev.env", "unset": "only_in_target",
                            "mapping": {"^MTRACE_TARGET_(.+)$": "mapped-$1"}},
                    "fs": "read", "network": True},
        "telemetry": False,
    }))
    checks = {"FROM_FILE": "FROM_FILE=dotenv", "FOO": "FOO=from-file",
              "ONLY_IN_TARGET": "ONLY_IN_TARGET unset", "MTRACE_TARGET_NAME":
              "MTRACE_TARGET_NAME=mapped-NAME"}
    for name, expected in checks.items():
        traced = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--", str(probe), "env", name],
            capture_output=True, timeout=60, check=False, cwd=tmp_path)
        assert traced.stdout.decode() == expected + "\n", traced.stderr[-2000:]
        warnings = [line for line in traced.stderr.decode().splitlines()
                    if line.startswith("mtrace: warning:")]
        assert warnings == ["mtrace: warning: .mirrord/mirrord.json: `telemetry` is a mirrord "
                            "key mtrace ignores: mtrace sends no telemetry"]


def test_fs_mapping_reaches_the_target(probe: Path, netns_target: NetnsTarget,
                                       tmp_path: Path) -> None:
    private_dir = os.path.dirname(netns_target.private_file)
    config = {"feature": {"fs": {"mapping": {"^/app/config": private_dir},
                                 "read_only": ["^" + private_dir]}}}
    name = os.path.basename(netns_target.private_file)
    traced = _exec(netns_target, str(probe), "cat", f"/app/config/{name}", config=config,
                   cwd=tmp_path)
    assert (traced.returncode, traced.stdout) == (0, netns_target.private_file_content), (
        traced.stderr[-2000:])


def _summary(stderr: bytes) -> list[str]:
    prefixes = ("target:", "env:", "fs:", "incoming:", "outgoing:", "dns:", "hostname:")
    return [line for line in stderr.decode(errors="replace").splitlines()
            if line.startswith("mtrace: ") and line[8:].startswith(prefixes)]


def test_start_summary_on_a_terminal_not_when_piped(programs: dict[str, Path],
                                                    netns_target: NetnsTarget) -> None:
    import pty

    probe = str(programs["probe-musl"])
    piped = _exec(netns_target, probe, "exit", "0")
    assert _summary(piped.stderr) == []
    verbose = _exec(netns_target, probe, "exit", "0", extra=("-v",))
    lines = _summary(verbose.stderr)
    assert lines[0] == f"mtrace: target: pid/{netns_target.pid}" and len(lines) == 7, lines
    assert f"mtrace: hostname: the target's ({netns_target.hostname})" in lines
    assert _summary(_exec(netns_target, probe, "exit", "0", extra=("-v", "-q")).stderr) == []
    for quiet in (False, True):
        leader, follower = pty.openpty()
        try:
            completed = subprocess.run(
                [sys.executable, "-m", "mtrace.cli", "exec", "--target",
                 f"pid/{netns_target.pid}", *(["-q"] if quiet else []), "--", probe, "exit", "0"],
                stdout=subprocess.PIPE, stderr=follower, timeout=60, check=False)
            os.close(follower)
            follower = -1
            output = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(leader)
            if follower >= 0:
                os.close(follower)
        assert completed.returncode == 0
        shown = _summary(output.replace(b"\r\n", b"\n"))
        assert len(shown) == (0 if quiet else 7), output


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_port_forward_opens_connections_from_the_target(netns_target: NetnsTarget) -> None:
    import re
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "port-forward", "--target", f"pid/{netns_target.pid}",
         "-L", f"0:127.0.0.1:{netns_target.tcp_port}", "-L", f"[::1]:0:localhost:{netns_target.tcp_port}",
         "-L", f"0:127.0.0.1:{netns_target.closed_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        ports = []
        while len(ports) < 3:
            line = process.stderr.readline().decode()
            assert line, "port-forward exited early"
            match = re.match(r"mtrace: forwarding (\S+):(\d+) -> ", line)
            if match:
                ports.append((match.group(1).strip("[]"), int(match.group(2))))
        for host, port in ports[:2]:
            with socket.create_connection((host, port), timeout=10) as conn:
                conn.sendall(b"hello\n")
                conn.shutdown(socket.SHUT_WR)
                received = _read_all(conn)
            assert received.startswith(netns_target.tcp_banner), received
            assert received.endswith(b"hello\n")
        with socket.create_connection(ports[2], timeout=10) as conn, \
                pytest.raises(ConnectionResetError):
            conn.recv(10) or conn.recv(10)
        refused = process.stderr.readline().decode()
        assert refused.startswith(f"mtrace: port-forward 127.0.0.1:{ports[2][1]} -> 127.0.0.1:"
                                  f"{netns_target.closed_port}: the target could not connect: "
                                  "Connection refused"), refused
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(("spec", "message"), [
    ("8080", "expected [LOCAL_ADDR:]LOCAL_PORT:HOST:PORT"),
    ("99999:db:5432", "out of range"),
])
def test_port_forward_bad_spec_is_78(spec: str, message: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "mtrace.cli", "port-forward", "--target", "targetless", "-L", spec],
        capture_output=True, timeout=30, check=False)
    assert completed.returncode == 78 and message in completed.stderr.decode()


# --- IPv6 end to end -----------------------------------------------------------------

V6_SERVICE = """
import socket, sys, threading
tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
tcp.bind(("::1", 0)); tcp.listen(8)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
udp.bind(("::1", 0))
print(tcp.getsockname()[1], udp.getsockname()[1], flush=True)
def serve_udp():
    while True:
        data, peer = udp.recvfrom(65535)
        udp.sendto(b"v6-udp:" + data, peer)
threading.Thread(target=serve_udp, daemon=True).start()
while True:
    conn, _ = tcp.accept()
    conn.sendall(b"v6-only target\\n")
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()
"""


@pytest.fixture(scope="module")
def v6_service(netns_target: NetnsTarget) -> Iterator[tuple[int, int]]:
    """A v6-only TCP and UDP service on the target's [::1] (nothing on this host's)."""
    process = subprocess.Popen(
        ["nsenter", f"--target={netns_target.pid}", "--net", "--", sys.executable, "-c",
         V6_SERVICE], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode().split()
    assert len(line) == 2, process.stderr.read() if process.stderr else b""
    yield int(line[0]), int(line[1])
    process.kill()
    process.wait()


def test_ipv6_outgoing_and_aaaa(probe: Path, backend: str, netns_target: NetnsTarget,
                                v6_service: tuple[int, int]) -> None:
    tcp_port, udp_port = v6_service
    commands = [
        ["resolve6", "only-in-target.test"],
        ["tcp", "::1", str(tcp_port), "hello6"],
        ["udp", "::1", str(udp_port), "ping6"],
        ["udp-unconnected", "::1", str(udp_port), "ping6"],
    ]
    for command in commands:
        inside = netns_target.run_inside(str(probe), *command)
        assert inside.returncode == 0, (command, inside.stdout)
        traced = _exec(netns_target, str(probe), *command, backend=backend)
        assert (traced.returncode, traced.stdout) == (0, inside.stdout), (
            command, traced.stderr[-2000:])
    assert inside.stdout.startswith(b"v6-udp:ping6\n")
    resolved = _exec(netns_target, str(probe), "resolve6", "only-in-target.test", backend=backend)
    assert resolved.stdout == f"{netns_target.dns_names['only-in-target.test'][1]}\n".encode()


# --- feature.network.outgoing.unix_streams ----------------------------------------------

UNIX_SERVICE = """
import socket, sys, threading
def listen(address):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(8)
    return server
def answer(conn):
    with conn:
        conn.sendall(b"unix in the target\\n")
        while data := conn.recv(65536):
            conn.sendall(data)
def serve(server):
    while True:
        conn, _ = server.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()
servers = [listen(sys.argv[1]), listen(b"\\0" + sys.argv[2].encode())]
for server in servers:
    threading.Thread(target=serve, args=(server,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.fixture(scope="module")
def unix_service(netns_target: NetnsTarget) -> Iterator[tuple[str, str]]:
    """A Unix stream service at a path only the target's mount namespace has,
    and at an abstract name of its network namespace."""
    path = os.path.join(os.path.dirname(netns_target.private_file), "app.sock")
    abstract = f"mtrace-parity-{os.getpid()}"
    process = subprocess.Popen(
        ["nsenter", f"--target={netns_target.pid}", "--net", "--mount", "--", sys.executable,
         "-c", UNIX_SERVICE, path, abstract], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n", process.stderr.read() if process.stderr else b""
    yield path, abstract
    process.kill()
    process.wait()
    # The socket file outlives its killed server; left in the shared target's
    # private directory it showed up in other modules' listings of it.
    subprocess.run(["nsenter", f"--target={netns_target.pid}", "--mount", "--", "rm", "-f", path],
                   check=True)


def test_unix_streams_connect_to_the_targets_socket(probe: Path, backend: str,
                                                    netns_target: NetnsTarget,
                                                    unix_service: tuple[str, str],
                                                    tmp_path: Path) -> None:
    path, abstract = unix_service
    assert not os.path.exists(path)
    config = {"feature": {"network": {"outgoing": {"unix_streams": ["app\\.sock$",
                                                                     "^@mtrace-parity-"]}}}}
    for address in (path, f"@{abstract}"):
        inside = netns_target.run_inside(str(probe), "unix-connect", address, "hi")
        assert inside.stdout == b"unix in the target\nhi\n"
        traced = _exec(netns_target, str(probe), "unix-connect", address, "hi", backend=backend,
                       config=config, cwd=tmp_path)
        assert (traced.returncode, traced.stdout) == (0, inside.stdout), (
            address, traced.stderr[-2000:])
    # Not matched: the connect stays on this machine.
    local = tmp_path / "local.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(local))
        server.listen(1)
        traced = subprocess.Popen(
            [sys.executable, "-m", "mtrace.cli", "exec", "--backend", backend, "--target",
             f"pid/{netns_target.pid}", "-f", str(tmp_path / "config.json"), "--", str(probe),
             "unix-connect", str(local), "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"local\n")
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b"hi\n"
        out, err = traced.communicate(timeout=60)
    assert out == b"local\n", err[-2000:]
    # Matched but missing in the target: the target's errno.
    missing = _exec(netns_target, str(probe), "unix-connect", "/run/missing-app.sock", "hi",
                    backend=backend, config=config, cwd=tmp_path)
    assert missing.stdout == b"error: ENOENT\n", missing.stderr[-2000:]
