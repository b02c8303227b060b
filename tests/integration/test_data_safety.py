"""Regressions for issue 14 (part A): what happens to the tracee and the
target's files when mtrace, the agent or the target goes away mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mtrace_run import MTRACE
from processes import alive, children_of
from programs_build import ProgramPaths

from mtrace.agent.client import connect_tcp


def _wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


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
        helpers = children_of(mtrace.pid)
        descendants = [pid for helper in helpers for pid in [helper, *children_of(helper)]]
        time.sleep(0.1)
        mtrace.send_signal(signal.SIGKILL)
        mtrace.wait(timeout=10)
        assert _wait_for(lambda: not any(alive(pid) for pid in descendants)), \
            "the tracee outlived mtrace"
    finally:
        if mtrace.poll() is None:
            mtrace.kill()
            mtrace.wait()
    lines = output.read_bytes().splitlines()
    failures = [line for line in lines if line.startswith(b"fail")]
    assert failures == [], f"{len(failures)} trapped calls returned after mtrace died: {failures[:3]}"


# --- write mode: uploads land whole, or not at all --------------------------------

@pytest.mark.parametrize("killed", ["agent", "mtrace"])
def test_killed_mid_upload_leaves_the_old_file(listening_agent, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               killed: str) -> None:
    """SIGKILL of the agent (or of mtrace: its connection drops) half way
    through an upload: the file is the old one, whole, and nothing is left
    beside it (uploads used to write over the file in place, 1 MiB at a time)."""
    target = tmp_path / "data.bin"
    old = b"O" * (4 << 20)
    target.write_bytes(old)
    with listening_agent(write=True) as agent:
        async def body() -> None:
            client = await connect_tcp(agent.host, agent.port, agent.secret)
            opened = await client.upload_begin(str(target))
            await client.write(opened.handle, b"N" * (1 << 20), 0)
            await client.write(opened.handle, b"N" * (1 << 20), 1 << 20)
            if killed == "agent":
                agent.process.kill()
                agent.process.wait()
            await client.close()
            if killed == "mtrace":
                await asyncio.sleep(0.5)  # the agent notices and discards the upload

        asyncio.run(body())
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["data.bin"]


def test_two_concurrent_uploads_each_land_whole(listening_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two sessions uploading one file at once: the result is one of them,
    whole (it used to be interleaved blocks of both)."""
    target = tmp_path / "shared.bin"
    target.write_bytes(b"O" * (4 << 20))
    target.chmod(0o640)
    with listening_agent(write=True) as agent:
        async def upload(fill: bytes) -> None:
            client = await connect_tcp(agent.host, agent.port, agent.secret)
            try:
                opened = await client.upload_begin(str(target))
                for chunk in range(4):
                    await client.write(opened.handle, fill * (1 << 20), chunk << 20)
                    await asyncio.sleep(0)
                await client.upload_commit(opened.handle)
            finally:
                await client.close()

        async def both() -> None:
            await asyncio.gather(upload(b"A"), upload(b"B"))

        asyncio.run(both())
    data = target.read_bytes()
    assert data in (b"A" * (4 << 20), b"B" * (4 << 20))
    assert target.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["shared.bin"]


KILL_AGENT_THEN_CLOSE = """
import errno, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"N" * (1 << 20), 0)
os.kill(int(sys.argv[2]), signal.SIGKILL)
time.sleep(0.5)
try:
    os.close(fd)
    print("close ok")
except OSError as error:
    print("close", errno.errorcode[error.errno])
"""


def test_lost_upload_fails_close_and_the_exit_status(listening_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The agent dies before the program's close: close fails with EIO (it
    returned 0) and mtrace exits 74 although the program exited 0 (it exited 0
    with a warning)."""
    target = tmp_path / "data.bin"
    target.write_bytes(b"O" * (1 << 20))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"feature": {"fs": {
        "mode": "write", "read_write": ["^" + str(tmp_path) + "/"]}}}))
    with listening_agent(write=True) as agent:
        result = subprocess.run(
            [*MTRACE, "exec", "-f", str(config), "--agent", f"{agent.host}:{agent.port}",
             "--agent-secret", agent.secret, "--", sys.executable, "-S", "-c",
             KILL_AGENT_THEN_CLOSE, str(target), str(agent.process.pid)],
            capture_output=True, timeout=60, check=False)
    assert result.stdout == b"close EIO\n", result.stderr.decode(errors="replace")[-2000:]
    assert result.returncode == 74, result.stderr.decode(errors="replace")[-2000:]
    assert b"did not reach the target" in result.stderr
    assert target.read_bytes() == b"O" * (1 << 20)


# --- the target goes away ------------------------------------------------------------

KILL_TARGET_THEN_OPEN = """
import errno, os, signal, sys, time
directory, pid = sys.argv[1], int(sys.argv[2])
print(open(directory + "/before.txt").read().strip(), flush=True)
os.kill(pid, signal.SIGKILL)
time.sleep(1.5)
try:
    open(directory + "/after.txt")
    print("after: opened")
except OSError as error:
    print("after:", errno.errorcode[error.errno])
"""


@pytest.mark.root
def test_a_target_that_exits_is_said_once_and_fails_with_eio(tmp_path: Path) -> None:
    """File calls after the target exited returned ENOENT with no message."""
    if os.geteuid() != 0:
        pytest.skip("needs root: attaches to another process")
    (tmp_path / "before.txt").write_text("before\n")
    (tmp_path / "after.txt").write_text("after\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"feature": {"fs": {"read_only": ["^" + str(tmp_path) + "/"]}}}))
    target = subprocess.Popen(["sleep", "120"])
    try:
        result = subprocess.run(
            [*MTRACE, "exec", "-f", str(config), "--target", f"pid/{target.pid}", "--",
             sys.executable, "-S", "-c", KILL_TARGET_THEN_OPEN, str(tmp_path), str(target.pid)],
            capture_output=True, timeout=60, check=False)
    finally:
        target.kill()
        target.wait()
    stderr = result.stderr.decode(errors="replace")
    assert result.stdout == b"before\nafter: EIO\n", stderr[-2000:]
    assert stderr.count(f"mtrace: error: the target pid/{target.pid} exited") == 1, stderr[-2000:]
    assert result.returncode == 0
