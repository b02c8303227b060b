"""The session directory: mtrace's private scratch space for one run.

It holds copies of the target's files (the shadow tree) and relay sockets, so
it is created ``0700`` and removed when the run ends, whatever way it ends
that lets mtrace act. A ``kill -9`` does not: each directory therefore holds an
``.owner`` file that its mtrace keeps locked (``flock``) for as long as it runs,
and every run first removes the directories whose lock it can take (their
owner is dead, whatever its pid became since).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mtrace.cli.scratch")

PREFIX = "mtrace-session-"
OWNER_FILE = ".owner"


def sweep(parent: str | None = None) -> list[Path]:
    """Remove session directories of dead mtrace runs (ours only); what was removed."""
    parent = parent or tempfile.gettempdir()
    removed: list[Path] = []
    try:
        entries = os.scandir(parent)
    except OSError:
        return removed
    with entries:
        for entry in entries:
            if not entry.name.startswith(PREFIX):
                continue
            try:
                if not entry.is_dir(follow_symlinks=False) or entry.stat(
                        follow_symlinks=False).st_uid != os.geteuid():
                    continue
                owner = os.open(os.path.join(entry.path, OWNER_FILE),
                                os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # no owner file: being created, or not ours to judge
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its mtrace is running
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
            finally:
                os.close(owner)
    if removed:
        log.info("removed %d session directories left by killed mtrace runs", len(removed))
    return removed


@contextlib.contextmanager
def session_directory() -> Iterator[Path]:
    """A fresh ``0700`` session directory, locked as ours, removed afterwards."""
    sweep()
    directory = Path(tempfile.mkdtemp(prefix=PREFIX))
    owner = -1
    try:
        os.chmod(directory, 0o700)
        owner = os.open(directory / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        0o600)
        fcntl.flock(owner, fcntl.LOCK_EX)
        os.write(owner, b"%d\n" % os.getpid())
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if owner >= 0:
            os.close(owner)
