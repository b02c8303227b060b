"""Syscall tables and the filter's trap set."""

from __future__ import annotations

import pytest

from mtrace.tracer.errors import TracerError
from mtrace.tracer.launcher import wait_status_to_exit_code
from mtrace.tracer.syscalls import DEFAULT_TRAPPED, table


def test_x86_64_numbers_are_the_native_abi() -> None:
    x86 = table("x86_64")
    # python-ptrace also lists x32 entries (execve at 520): the native one wins.
    assert x86.number("execve") == 59
    assert x86.number("openat") == 257
    assert x86.name(257) == "openat"
    assert x86.number("faccessat2") == 439
    assert x86.name(99999) == "syscall_99999"


def test_aarch64_has_no_legacy_calls() -> None:
    arm = table("aarch64")
    assert arm.number("openat") == 56
    numbers = arm.numbers_for(DEFAULT_TRAPPED)
    assert arm.numbers_for(["open", "stat"]) == []
    assert len(numbers) > 20


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(TracerError, match="unknown syscall 'opneat'"):
        table("x86_64").numbers_for(["opneat"], strict=True)


def test_wait_status_conversion() -> None:
    assert wait_status_to_exit_code(3 << 8) == 3
    assert wait_status_to_exit_code(15) == 128 + 15
