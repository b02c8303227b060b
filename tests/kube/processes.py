"""The rig's processes: started detached with a pid file, stopped by that pid only.

A pid file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so a pid reused
by an unrelated process after a crash is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .common import STATE_DIR, log

PID_DIR = STATE_DIR / "pids"
LOG_DIR = STATE_DIR / "logs"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def start(name: str, argv: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> int:
    PID_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / f"{name}.log", "ab") as log_file:
        process = subprocess.Popen(
            [str(part) for part in argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the `up` that started it; no terminal signals
            env=env,
            close_fds=True,
        )
    (PID_DIR / f"{name}.pid").write_text(f"{process.pid} {_start_time(process.pid)}\n")
    return process.pid


def pid_of(name: str) -> int | None:
    """The pid of a running rig process, or None (no pid file, dead, or the pid was reused)."""
    try:
        pid_text, start_time = (PID_DIR / f"{name}.pid").read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    if _start_time(pid) != start_time:
        return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else pid


def running(name: str) -> bool:
    return pid_of(name) is not None


def log_tail(name: str, lines: int = 30) -> str:
    try:
        text = (LOG_DIR / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop(name: str, timeout: float = 15.0) -> None:
    pid = pid_of(name)
    if pid is not None:
        _terminate(pid, name, timeout)
    (PID_DIR / f"{name}.pid").unlink(missing_ok=True)


def _terminate(pid: int, name: str, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            _reap(pid)
            return
        time.sleep(0.1)
    log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
        time.sleep(0.05)
    _reap(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a rig path): leftovers such as containerd shims."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int], label: str) -> None:
    for pid in pids:
        _terminate(pid, label, 5.0)
