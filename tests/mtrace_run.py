"""Running mtrace the way a user does: the installed CLI, in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

MTRACE = [sys.executable, "-m", "mtrace.cli.main"]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_plain(argv: Sequence[str], *, env: dict[str, str] | None = None,
              input: bytes | None = None, timeout: float = 30) -> Result:
    completed = subprocess.run(list(argv), capture_output=True, env=env, input=input,
                               timeout=timeout, check=False)
    return Result(completed.returncode, completed.stdout, completed.stderr)


def run_mtrace(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
               timeout: float = 60) -> Result:
    """``mtrace ARGS...``; the environment defaults to ours."""
    completed = subprocess.run([*MTRACE, *args], capture_output=True,
                               env=env if env is not None else dict(os.environ),
                               input=input, timeout=timeout, check=False)
    return Result(completed.returncode, completed.stdout, completed.stderr)


def stop(process: subprocess.Popen[bytes], signum: int = signal.SIGINT, timeout: float = 30) -> None:
    """End a process a test started: ``signum`` if it still runs (mtrace
    cleans up on SIGINT), then SIGKILL if it has not exited after ``timeout``."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
