"""The ptrace ABI helpers: registers, scratch memory, options. No tracee needed."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from mtrace.tracer import ptrace_abi
from mtrace.tracer.errors import KernelFeatureMissing
from mtrace.tracer.ptrace_abi import X86_64, abi_for
from mtrace.tracer.ptrace_backend import attach_error
from mtrace.tracer.session import Session, run

pytestmark = pytest.mark.timeout(30)


def x86_registers(**values: int) -> SimpleNamespace:
    names = ("orig_rax", "rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rsp")
    return SimpleNamespace(**{name: values.get(name, 0) for name in names})


def test_x86_64_arguments_in_syscall_order() -> None:
    registers = x86_registers(rdi=1, rsi=2, rdx=3, r10=4, r8=5, r9=6, orig_rax=257)
    assert X86_64.arguments(registers) == (1, 2, 3, 4, 5, 6)
    assert X86_64.number(registers) == 257


def test_skip_sets_number_to_minus_one_and_the_result() -> None:
    registers = x86_registers(orig_rax=257, rax=(-errno.ENOSYS) & (2**64 - 1))
    X86_64.skip_with(registers, -errno.EACCES)
    assert X86_64.number(registers) == -1
    assert X86_64.result(registers) == -errno.EACCES
    assert registers.rax == (-errno.EACCES) & (2**64 - 1)


def test_set_argument_truncates_to_64_bits() -> None:
    registers = x86_registers()
    X86_64.set_argument(registers, 0, -100)  # AT_FDCWD
    assert registers.rdi == 2**64 - 100
    X86_64.set_arguments(registers, (7, 8))
    assert (registers.rdi, registers.rsi) == (7, 8)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 100, 4096])
def test_scratch_is_below_the_red_zone_and_aligned(size: int) -> None:
    stack_pointer = 0x7FFF_FFFF_E123
    base = X86_64.scratch_below_stack(stack_pointer, size)
    assert base % 16 == 0
    assert base + size <= stack_pointer - X86_64.red_zone
    assert stack_pointer - X86_64.red_zone - base < size + 16


def test_abi_for_known_and_unknown_architectures() -> None:
    assert abi_for("x86_64") is X86_64
    assert abi_for("aarch64").number_register == "r8"
    with pytest.raises(KernelFeatureMissing, match="does not support sparc"):
        abi_for("sparc")


def test_tracer_options_cover_seccomp_children_exec_and_exitkill() -> None:
    options = ptrace_abi.TRACER_OPTIONS
    for flag in (ptrace_abi.O_TRACESECCOMP, ptrace_abi.O_TRACECLONE, ptrace_abi.O_TRACEFORK,
                 ptrace_abi.O_TRACEVFORK, ptrace_abi.O_TRACEEXEC, ptrace_abi.O_EXITKILL,
                 ptrace_abi.O_TRACESYSGOOD):
        assert options & flag == flag


def test_attach_refused_is_a_missing_feature_with_a_hint() -> None:
    error = attach_error(OSError(errno.EPERM, "Operation not permitted"))
    assert isinstance(error, KernelFeatureMissing)
    assert error.hint and "ptrace_scope" in error.hint


def test_unknown_backend_is_refused_before_anything_runs() -> None:
    from mtrace.tracer.errors import TracerError

    with pytest.raises(TracerError, match="unknown backend"):
        run(Session(argv=["true"], backend="strace"))
