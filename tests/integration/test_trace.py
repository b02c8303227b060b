"""`mtrace trace`: what it prints for programs whose calls are known."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from mtrace_run import run_mtrace
from programs_build import ProgramPaths

pytestmark = pytest.mark.timeout(120)


def trace(backend: str, *args: str) -> tuple[int, bytes, list[str]]:
    result = run_mtrace("trace", "--backend", backend, *args)
    return result.returncode, result.stdout, result.stderr.decode().splitlines()


def test_open_of_a_file_is_shown_with_path_flags_and_fd(probe: Path, backend: str,
                                                        tmp_path: Path) -> None:
    target = tmp_path / "hello.txt"
    target.write_text("hello\n")
    code, stdout, lines = trace(backend, "-e", "openat,open", "--", str(probe), "cat", str(target))
    assert (code, stdout) == (0, b"hello\n")
    opened = [line for line in lines if f'"{target}"' in line]
    assert opened, lines
    assert "O_RDONLY" in opened[0], opened[0]
    assert opened[0].split(" = ")[1].split()[0].isdigit(), opened[0]


def test_failed_open_shows_errno(probe: Path, backend: str) -> None:
    code, _stdout, lines = trace(backend, "-e", "openat,open", "--", str(probe), "cat",
                                 "/no/such/file")
    assert code == 1
    assert any('"/no/such/file"' in line and "= -1 ENOENT (No such file or directory)" in line
               for line in lines), lines


def test_connect_shows_sockaddr_and_result(probe: Path, backend: str, tcp_echo_port: int) -> None:
    code, stdout, lines = trace(backend, "-e", "socket,connect", "--", str(probe), "tcp",
                                "127.0.0.1", str(tcp_echo_port), "ping")
    assert (code, stdout) == (0, b"ping\n")
    connects = [line for line in lines if "connect(" in line]
    assert any(f"{{AF_INET 127.0.0.1:{tcp_echo_port}}}" in line for line in connects), lines
    assert any("socket(AF_INET, SOCK_STREAM" in line for line in lines), lines
    # The result is the kernel's: 0, or EINPROGRESS for Go's non-blocking connect.
    assert all(line.endswith(">") and (" = 0 <" in line or "EINPROGRESS" in line)
               for line in connects), connects


def test_refused_connect_shows_econnrefused(backend: str, programs: ProgramPaths) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, stdout, lines = trace(backend, "-e", "connect", "--", str(programs["probe-musl"]),
                                "tcp", "127.0.0.1", str(port), "x")
    assert (code, stdout) == (1, b"error: ECONNREFUSED\n")
    assert any("ECONNREFUSED" in line for line in lines), lines


def test_filter_shows_only_named_calls(backend: str, programs: ProgramPaths) -> None:
    code, _stdout, lines = trace(backend, "-e", "execve", "--", str(programs["probe-glibc-static"]),
                                 "exit", "3")
    assert code == 3
    assert lines and all("execve(" in line for line in lines), lines
    assert any(str(programs["probe-glibc-static"]) in line for line in lines)


def test_json_lines_and_output_file(backend: str, programs: ProgramPaths, tmp_path: Path) -> None:
    output = tmp_path / "trace.jsonl"
    code, stdout, _lines = trace(backend, "--json", "-o", str(output), "-e", "openat", "--",
                                 str(programs["probe-go"]), "cat", "/etc/hostname")
    assert code == 0
    assert stdout == Path("/etc/hostname").read_bytes()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    hostname = [record for record in records if record["args"].get("path") == '"/etc/hostname"']
    assert hostname, records
    record = hostname[0]
    assert record["syscall"] == "openat" and record["result"] >= 0 and record["errno"] is None
    assert {"tid", "duration_us", "time"} <= set(record)


def test_unknown_syscall_name_is_a_clear_error(backend: str) -> None:
    code, _stdout, lines = trace(backend, "-e", "opneat", "--", "true")
    assert code != 0
    assert lines[0].startswith("mtrace: error: unknown syscall 'opneat'"), lines


def test_stat_and_readlink_results_are_shown(probe: Path, backend: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("file")
    calls = "stat,lstat,newfstatat,statx,readlink,readlinkat,access,faccessat,faccessat2"
    code, stdout, lines = trace(backend, "-e", calls, "--", str(probe), "stat",
                                str(tmp_path / "file"))
    assert (code, stdout) == (0, b"size=1 mode=0644 type=file\n")
    shown = [line for line in lines if f'"{tmp_path}/file"' in line]
    # Under notify the supervisor makes the stat call itself, with the kernel's result.
    assert shown and all(line.split(" = ")[1].startswith("0 <") for line in shown), lines
    code, stdout, lines = trace(backend, "-e", calls, "--", str(probe), "readlink",
                                str(tmp_path / "link"))
    assert (code, stdout) == (0, b"file\n")
    assert any("readlink" in line and line.split(" = ")[1].startswith("4 <") for line in lines), lines
    code, _stdout, lines = trace(backend, "-e", calls, "--", str(probe), "stat",
                                 str(tmp_path / "missing"))
    assert code == 1
    assert any(f'"{tmp_path}/missing"' in line and "ENOENT" in line for line in lines), lines


def test_children_and_re_execs_stay_trapped(backend: str, programs: ProgramPaths,
                                            tmp_path: Path) -> None:
    """A shell that forks a shell that execs a static binary: every generation's
    calls are trapped, each under its own pid."""
    target = tmp_path / "deep.txt"
    target.write_text("deep\n")
    probe = programs["probe-musl"]
    code, stdout, lines = trace(backend, "-e", "execve,openat,open", "--", "sh", "-c",
                                f"sh -c 'exec {probe} cat {target}'; true")
    assert (code, stdout) == (0, b"deep\n")
    execs = [line for line in lines if f'execve("{probe}"' in line]
    opens = [line for line in lines if f'"{target}"' in line]
    assert execs and opens, lines
    pid_of = lambda line: line.split("]")[0]  # noqa: E731
    assert pid_of(execs[0]) == pid_of(opens[0])
    first_pid = pid_of(lines[0])
    assert pid_of(opens[0]) != first_pid, "the grandchild has a pid of its own"
