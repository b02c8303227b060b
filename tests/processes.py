"""Which processes run: /proc read directly, for tests that check what a run leaves behind."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Runs (a zombie has finished running)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children_of(pid: int) -> list[int]:
    """The running children of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid and alive(int(entry)):
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found
