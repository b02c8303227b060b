"""The test programs themselves, run directly (no mtrace): what each command prints.

Every probe flavour (Go static, glibc static, musl static, glibc dynamic) must
print the same bytes and exit with the same status for the same command; that
is what lets integration tests compare a plain run with a run under mtrace.
These tests double as the reference for the programs' commands.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from loopback import serve
from programs_build import ProgramPaths

pytestmark = pytest.mark.timeout(120)

CLEAN_ENV = {"PATH": "/usr/bin:/bin", "PROBE_VALUE": "value with spaces=and equals"}


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: bytes


def run(path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 10) -> Run:
    result = subprocess.run(
        [str(path), *args],
        capture_output=True,
        env=CLEAN_ENV if env is None else env,
        timeout=timeout,
        check=False,
    )
    return Run(result.returncode, result.stdout)


def run_probes(probes: dict[str, Path], *args: str, **kwargs: object) -> Run:
    """Run every probe flavour at once; assert they agree; return the common result."""
    with ThreadPoolExecutor(len(probes)) as pool:
        futures = {name: pool.submit(run, path, *args, **kwargs) for name, path in probes.items()}
        results = {name: future.result() for name, future in futures.items()}
    first = next(iter(results.values()))
    assert results == dict.fromkeys(results, first), f"probe flavours disagree on {args}"
    return first


def ok(text: str | bytes) -> Run:
    return Run(0, text.encode() if isinstance(text, str) else text)


def error(name: str) -> Run:
    return Run(1, f"error: {name}\n".encode())


def _closed_port(kind: socket.SocketKind) -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- ELF: static vs dynamic, without `file` -------------------------------------

PT_INTERP = 3


def elf_interpreter(path: Path) -> str | None:
    """The PT_INTERP path of an x86-64/aarch64 ELF64 little-endian binary, or None."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not ELF"
    assert data[4] == 2 and data[5] == 1, f"{path} is not ELF64 little-endian"
    e_phoff, e_phentsize, e_phnum = (
        struct.unpack_from("<Q", data, 0x20)[0],
        *struct.unpack_from("<HH", data, 0x36),
    )
    for index in range(e_phnum):
        offset = e_phoff + index * e_phentsize
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, offset
        )
        if p_type == PT_INTERP:
            return data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    return None


STATIC = ["probe-go", "probe-glibc-static", "probe-musl", "httpserve", "goroutines",
          "httpclient", "static-true", "open-forever", "uring-read"]  # fmt: skip


@pytest.mark.parametrize("name", STATIC)
def test_static_binaries_have_no_interpreter(programs: ProgramPaths, name: str) -> None:
    assert elf_interpreter(programs[name]) is None


def test_dynamic_probe_has_an_interpreter(programs: ProgramPaths) -> None:
    interpreter = elf_interpreter(programs["probe-dynamic"])
    assert interpreter is not None and "ld-linux" in interpreter


def test_go_binaries_do_not_link_libc(programs: ProgramPaths) -> None:
    # CGO_ENABLED=0: no libc strings such as glibc's version tags.
    for name in ("probe-go", "httpserve", "goroutines", "httpclient"):
        assert b"GLIBC_2." not in programs[name].read_bytes(), name


# --- probe: files and environment --------------------------------------------------


def test_env(programs: ProgramPaths) -> None:
    assert run_probes(programs.probes, "env", "PROBE_VALUE") == ok(
        "PROBE_VALUE=value with spaces=and equals\n"
    )
    assert run_probes(programs.probes, "env", "PROBE_MISSING") == ok("PROBE_MISSING unset\n")


def test_cat(programs: ProgramPaths, tmp_path: Path) -> None:
    content = bytes(range(256)) * 1000  # bigger than one read, every byte value
    (tmp_path / "data").write_bytes(content)
    assert run_probes(programs.probes, "cat", str(tmp_path / "data")) == ok(content)
    assert run_probes(programs.probes, "cat", str(tmp_path / "missing")) == error("ENOENT")
    assert run_probes(programs.probes, "cat", str(tmp_path)) == error("EISDIR")


def test_stat(programs: ProgramPaths, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"12345")
    (tmp_path / "file").chmod(0o640)
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "dir").mkdir(mode=0o755)
    (tmp_path / "dir").chmod(0o755)
    probes = programs.probes
    assert run_probes(probes, "stat", str(tmp_path / "file")) == ok("size=5 mode=0640 type=file\n")
    # lstat: the link itself, whose size is the length of its target.
    assert run_probes(probes, "stat", str(tmp_path / "link")) == ok(
        "size=4 mode=0777 type=symlink\n"
    )
    dir_size = os.lstat(tmp_path / "dir").st_size
    assert run_probes(probes, "stat", str(tmp_path / "dir")) == ok(
        f"size={dir_size} mode=0755 type=dir\n"
    )
    assert run_probes(probes, "stat", str(tmp_path / "missing")) == error("ENOENT")


def test_ls_sorts_bytewise(programs: ProgramPaths, tmp_path: Path) -> None:
    for name in ("b", "a", "C", ".hidden", "ü"):
        (tmp_path / name).touch()
    assert run_probes(programs.probes, "ls", str(tmp_path)) == ok(".hidden\nC\na\nb\nü\n")
    assert run_probes(programs.probes, "ls", str(tmp_path / "a")) == error("ENOTDIR")


def test_readlink(programs: ProgramPaths, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("../some/target")
    assert run_probes(programs.probes, "readlink", str(tmp_path / "link")) == ok("../some/target\n")
    (tmp_path / "plain").touch()
    assert run_probes(programs.probes, "readlink", str(tmp_path / "plain")) == error("EINVAL")


def test_symlink(programs: ProgramPaths, tmp_path: Path) -> None:
    for index, probe in enumerate(programs.probes.values()):
        assert run(probe, "symlink", "../rel/x", str(tmp_path / f"s{index}")) == ok("../rel/x\n")
        assert run(probe, "symlink", "y", str(tmp_path / f"s{index}")) == error("EEXIST")


# --- probe: process control ------------------------------------------------------------


def test_exit(programs: ProgramPaths) -> None:
    assert run_probes(programs.probes, "exit", "0") == Run(0, b"")
    assert run_probes(programs.probes, "exit", "7") == Run(7, b"")


@pytest.mark.parametrize("sig", ["TERM", "KILL", "9", "USR1", "SIGPIPE"])
def test_kill_raises_on_itself(programs: ProgramPaths, sig: str) -> None:
    number = signal.SIGKILL if sig == "9" else signal.Signals["SIG" + sig.removeprefix("SIG")]
    assert run_probes(programs.probes, "kill", sig) == Run(-number, b"")


def test_exec_and_fork_exec(programs: ProgramPaths) -> None:
    # Each flavour execs another flavour, so static -> dynamic -> Go etc. all happen.
    names = list(programs.probes)
    for index, name in enumerate(names):
        target = str(programs[names[(index + 1) % len(names)]])
        probe = programs[name]
        assert run(probe, "exec", target, "env", "PROBE_VALUE") == ok(
            "PROBE_VALUE=value with spaces=and equals\n"
        )
        assert run(probe, "fork-exec", target, "exit", "5") == Run(5, b"child exit 5\n")
        assert run(probe, "fork-exec", target, "kill", "TERM") == Run(
            128 + signal.SIGTERM, f"child signal {int(signal.SIGTERM)}\n".encode()
        )
    assert run_probes(programs.probes, "exec", "/nonexistent/program") == error("ENOENT")
    assert run_probes(programs.probes, "fork-exec", "/nonexistent/program") == error("ENOENT")


def test_chain_script(programs: ProgramPaths) -> None:
    env = {**CLEAN_ENV, "CHAIN_VALUE": "42"}
    assert run(programs["chain"], env=env) == ok(
        "chain: start\nCHAIN_VALUE=42\nchild exit 0\nchain: done status=0\n"
    )


def test_loops_report_on_stderr_only(programs: ProgramPaths) -> None:
    for path in programs.probes.values():
        for args in (["loop-getpid", "1000"], ["loop-open", "/etc/hosts", "100"]):
            result = subprocess.run(
                [str(path), *args], capture_output=True, text=True, timeout=10, check=False
            )
            assert (result.returncode, result.stdout) == (0, ""), path
            assert re.fullmatch(rf"{args[0]}: {args[-1]} calls, \d+ ns/call\n", result.stderr)


# --- probe: network ---------------------------------------------------------------------


def _hosts_has_localhost() -> bool:
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[:1] == ["127.0.0.1"] and "localhost" in line.split() for line in lines)


@pytest.mark.skipif(not _hosts_has_localhost(), reason="/etc/hosts has no 127.0.0.1 localhost")
def test_resolve_localhost(programs: ProgramPaths) -> None:
    result = run_probes(programs.probes, "resolve", "localhost")
    assert result.returncode == 0
    assert "127.0.0.1" in result.stdout.decode().splitlines()


def test_resolve_literal(programs: ProgramPaths) -> None:
    assert run_probes(programs.probes, "resolve", "10.1.2.3") == ok("10.1.2.3\n")


def test_resolve6_literal(programs: ProgramPaths) -> None:
    assert run_probes(programs.probes, "resolve6", "fd00:0:0::07") == ok("fd00::7\n")


def test_hostname(programs: ProgramPaths) -> None:
    assert run_probes(programs.probes, "hostname") == ok(f"{socket.gethostname()}\n")


def test_tcp(programs: ProgramPaths, tcp_echo_port: int) -> None:
    port = str(tcp_echo_port)
    assert run_probes(programs.probes, "tcp", "127.0.0.1", port, "hello") == ok("hello\n")
    closed = str(_closed_port(socket.SOCK_STREAM))
    assert run_probes(programs.probes, "tcp", "127.0.0.1", closed, "x") == error("ECONNREFUSED")


def test_udp(programs: ProgramPaths, udp_echo_port: int) -> None:
    port = str(udp_echo_port)
    assert run_probes(programs.probes, "udp", "127.0.0.1", port, "ping") == ok("ping\n")
    assert run_probes(programs.probes, "udp-unconnected", "127.0.0.1", port, "ping") == ok(
        f"ping\nfrom 127.0.0.1:{port}\n"
    )
    closed = str(_closed_port(socket.SOCK_DGRAM))
    assert run_probes(programs.probes, "udp", "127.0.0.1", closed, "x") == error("ECONNREFUSED")


def test_udp_mmsg(programs: ProgramPaths, udp_echo_port: int) -> None:
    port = str(udp_echo_port)
    replies = "".join(f"m-{index} from 127.0.0.1:{port}\n" for index in range(3))
    assert run_probes(programs.probes, "udp-mmsg", "127.0.0.1", port, "m", "3") == ok(
        "sent 3: 3 3 3\n" + replies)
    assert run_probes(programs.probes, "udp-mmsg-recv", "127.0.0.1", port, "m", "3") == ok(
        "sent 3: 3 3 3\n" + replies)
    assert run_probes(programs.probes, "udp-mmsg", "127.0.0.1", port, "m", "0") == error("EINVAL")


def test_udp_timeout(programs: ProgramPaths) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = str(silent.getsockname()[1])
        assert run_probes(programs.probes, "udp", "127.0.0.1", port, "x") == error("ETIMEDOUT")
        assert run_probes(programs.probes, "udp-unconnected", "127.0.0.1", port, "x") == error(
            "ETIMEDOUT"
        )


def test_http(programs: ProgramPaths, http_port: int, http_root: Path) -> None:
    body = (http_root / "hello.txt").read_bytes()
    url = f"http://127.0.0.1:{http_port}"
    assert run_probes(programs.probes, "http", f"{url}/hello.txt") == ok(b"status 200\n" + body)
    missing = run_probes(programs.probes, "http", f"{url}/missing")
    assert missing.returncode == 0 and missing.stdout.startswith(b"status 404\n")
    closed = _closed_port(socket.SOCK_STREAM)
    assert run_probes(programs.probes, "http", f"http://127.0.0.1:{closed}/") == error(
        "ECONNREFUSED"
    )


class _NotHTTPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"SSH-2.0-not-http\r\n\r\n")


def test_http_malformed_response(programs: ProgramPaths) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _NotHTTPHandler)
    with serve(server) as port:
        url = f"http://127.0.0.1:{port}/"
        assert run_probes(programs.probes, "http", url) == error("EPROTO")


# --- the other programs ------------------------------------------------------------------


def test_static_true(programs: ProgramPaths) -> None:
    assert run(programs["static-true"]) == Run(0, b"")


def test_goroutines_output_ignores_scheduling(programs: ProgramPaths) -> None:
    args = ["-n", "16", "-iterations", "2", "-work", "2000000"]
    one_cpu = run(programs["goroutines"], *args, env={**CLEAN_ENV, "GOMAXPROCS": "1"})
    all_cpus = run(programs["goroutines"], *args)
    assert one_cpu == all_cpus
    assert re.fullmatch(rb"ok goroutines=16 iterations=2 checksum=[0-9a-f]{16}\n", all_cpus.stdout)


def test_httpserve(programs: ProgramPaths) -> None:
    env = {**CLEAN_ENV, "SERVE_VALUE": "served"}
    server = subprocess.Popen(
        [str(programs["httpserve"]), "-name", "test", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        match = re.fullmatch(r"listening on (127\.0\.0\.1:\d+)\n", line)
        assert match, line
        base = f"http://{match[1]}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{base}/hello", timeout=5) as response:
            assert response.read() == b"hello from test\n"
        with opener.open(f"{base}/env/SERVE_VALUE", timeout=5) as response:
            assert response.read() == b"SERVE_VALUE=served\n"
        with opener.open(f"{base}/env/NOT_SET", timeout=5) as response:
            assert response.read() == b"NOT_SET unset\n"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert server.stdout.read() == b"stopped\n"
    finally:
        server.kill()
        server.wait()


def test_httpclient(programs: ProgramPaths, http_port: int, tmp_path: Path) -> None:
    (tmp_path / "read-me").write_text("x")
    url = f"http://127.0.0.1:{http_port}/hello.txt"
    assert run(programs["httpclient"], "-file", str(tmp_path / "read-me"), url, "5") == ok("ok 5\n")
    assert run(programs["httpclient"], url, "3") == ok("ok 3\n")


def _unix_echo(address: str | bytes) -> socket.socket:
    """A Unix stream server at ``address``: a banner, then an echo until EOF."""
    import threading

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(8)

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"unix-banner\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_unix_connect(programs: ProgramPaths, tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    abstract = f"mtrace-probe-test-{os.getpid()}"
    with _unix_echo(str(path)), _unix_echo(b"\0" + abstract.encode()):
        assert run_probes(programs.probes, "unix-connect", str(path), "hi") == ok(
            "unix-banner\nhi\n")
        assert run_probes(programs.probes, "unix-connect", f"@{abstract}", "hi") == ok(
            "unix-banner\nhi\n")
    missing = tmp_path / "missing.sock"
    assert run_probes(programs.probes, "unix-connect", str(missing), "hi") == error("ENOENT")
