"""The trap loop's passthrough path in C: built, loadable, and switched off on request."""

from __future__ import annotations

import errno
import os

import pytest

from mtrace.tracer import seccomp


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
