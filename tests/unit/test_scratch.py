"""Session directories: private, removed at the end, swept after a kill -9."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mtrace.cli import scratch

pytestmark = pytest.mark.timeout(60)

HOLD = """
import sys, tempfile
tempfile.tempdir = sys.argv[1]
from mtrace.cli.scratch import session_directory
with session_directory() as directory:
    (directory / "shadow").mkdir()
    (directory / "shadow" / "copy-of-a-target-file").write_text("secret")
    print(directory, flush=True)
    sys.stdin.read()
"""


def _hold(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_session_directory_is_private_and_removed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with scratch.session_directory() as directory:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert directory.parent == tmp_path
    assert not directory.exists()


def test_a_killed_runs_directory_is_swept_by_the_next_run(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of mtrace left its session directory (copies of target files)
    in /tmp for good; the next run removes it, and never a live run's."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed, killed_directory = _hold(tmp_path)
    alive, alive_directory = _hold(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_directory.exists()
        with scratch.session_directory() as directory:
            assert not killed_directory.exists()
            assert alive_directory.exists()
            assert sorted(os.listdir(tmp_path)) == sorted([directory.name, alive_directory.name])
    finally:
        assert alive.stdin is not None
        alive.stdin.close()
        alive.wait()
    assert os.listdir(tmp_path) == []
