"""Regressions for issue 14 (part A): what happens to the tracee and the
target's files when mtrace, the agent or the target goes away mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from mtrace_run import MTRACE
from programs_build import ProgramPaths


def _wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def test_no_trapped_call_returns_after_mtrace_is_killed(
        programs: ProgramPaths, backend: str, tmp_path: Path) -> None:
    """kill -9 of mtrace: the tracee dies without one more trapped call
    completing (under notify, 871 opens used to fail with ENOSYS first)."""
    output = tmp_path / "out"
    with open(output, "wb") as sink:
        mtrace = subprocess.Popen(
            [*MTRACE, "exec", "--backend", backend, "--",
             str(programs["open-forever"]), "/etc/hostname"],
            stdout=sink, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(lambda: b"ready" in output.read_bytes()), "the tracee never started"
        helpers = _children_of(mtrace.pid)
        descendants = [pid for helper in helpers for pid in [helper, *_children_of(helper)]]
        time.sleep(0.1)
        mtrace.send_signal(signal.SIGKILL)
        mtrace.wait(timeout=10)
        assert _wait_for(lambda: not any(_alive(pid) for pid in descendants)), \
            "the tracee outlived mtrace"
    finally:
        if mtrace.poll() is None:
            mtrace.kill()
            mtrace.wait()
    lines = output.read_bytes().splitlines()
    failures = [line for line in lines if line.startswith(b"fail")]
    assert failures == [], f"{len(failures)} trapped calls returned after mtrace died: {failures[:3]}"
