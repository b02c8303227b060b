"""The trap loop's passthrough path in C: built, loadable, switched off on request, and
what it answers without Python."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest

from mtrace.tracer import seccomp
from mtrace.tracer.backend import Handlers
from mtrace.tracer.call import SyscallCall
from mtrace.tracer.outcome import CONTINUE, Outcome
from mtrace.tracer.session import Session, run


def test_the_native_loop_library_is_built_and_loads() -> None:
    # An editable or wheel install builds bin/libmtrace-notify.so (setup.py);
    # without it every passthrough call pays for a pass of the Python loop.
    loop = seccomp.native_loop(-1, {257})
    assert loop is not None
    assert loop.passed == 0


def test_the_native_loop_times_out() -> None:
    loop = seccomp.native_loop(-1, set())
    assert loop is not None
    assert loop.next(0) is loop.TIMEOUT  # poll() ignores fd -1


def test_the_native_loop_reports_an_error_as_oserror() -> None:
    reads, writes = os.pipe()
    try:
        os.write(writes, b"x")  # readable, but no seccomp listener: RECV fails
        loop = seccomp.native_loop(reads, set())
        assert loop is not None
        with pytest.raises(OSError) as caught:
            loop.next(1000)
        assert caught.value.errno == errno.ENOTTY
    finally:
        os.close(reads)
        os.close(writes)


def test_the_native_loop_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRACE_NATIVE_LOOP", "0")
    assert seccomp.native_loop(-1, {257}) is None


def test_the_fast_answers_table_loads_and_takes_entries() -> None:
    # files.py registers cached opens and shadow inodes here; a library built
    # from older source (no mtrace_fast_*) would leave the C loop unused.
    fast = seccomp.fast_answers()
    assert fast is not None
    fast.reset(b"/nonexistent-shadow")
    fast.open(b"/etc/hosts", b"/nonexistent-shadow/etc/hosts", 0.0)
    fast.node(1, 2, 3, b"\0" * 144)
    fast.drop_open(b"/etc/hosts")
    fast.reset(None)


def test_the_fast_answers_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRACE_FAST_ANSWERS", "0")
    assert seccomp.fast_answers() is None
    monkeypatch.setenv("MTRACE_FAST_ANSWERS", "1")
    monkeypatch.setenv("MTRACE_NATIVE_LOOP", "0")
    assert seccomp.fast_answers() is None


FD_CALLS = r"""
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.fchmod(fd, 0o640)
    os.fchown(fd, -1, -1)
    os.fstatvfs(fd)
    os.close(fd)
"""


def test_fd_metadata_calls_on_local_fds_are_answered_without_python(tmp_path: Path) -> None:
    """fchmod, fchown and fstatfs are trapped for the fds of shadow copies;
    each one on any other fd went through Python (about 20 µs here) only to
    be told CONTINUE. The C loop now lets those run itself."""
    shadow = tmp_path / "shadow"
    (shadow / "etc").mkdir(parents=True)
    copy = shadow / "etc" / "copy"
    copy.write_text("a target file's copy\n")
    local = tmp_path / "local"
    local.write_text("this machine's file\n")
    seen: list[tuple[str, str]] = []

    def record(call: SyscallCall) -> Outcome:
        seen.append((call.name, os.readlink(f"/proc/{call.tid}/fd/{call.int_arg(0)}")))
        return CONTINUE

    names = ("fchmod", "fchown", "fstatfs")
    fast = seccomp.fast_answers()
    assert fast is not None
    fast.reset(os.fsencode(shadow))
    try:
        code = run(Session(argv=[sys.executable, "-S", "-c", FD_CALLS, str(local), str(copy)],
                           handlers=Handlers({name: record for name in names}),
                           trapped=names, backend="notify"))
    finally:
        fast.reset(None)
    assert code == 0
    assert seen == [(name, str(copy)) for name in names]
    assert stat.S_IMODE(local.stat().st_mode) == 0o640  # the kernel ran them
