"""Reading tracee memory through /proc/TID/mem."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from mtrace.tracer.memory import TraceeMemory

pytestmark = pytest.mark.timeout(30)

SECOND = (
    "import ctypes, sys\n"
    "b = ctypes.create_string_buffer(b'second image')\n"
    "print(ctypes.addressof(b), flush=True)\n"
    "sys.stdin.readline()\n"
)
FIRST = (
    "import ctypes, os, sys\n"
    "b = ctypes.create_string_buffer(b'first image')\n"
    "print(ctypes.addressof(b), flush=True)\n"
    "sys.stdin.readline()\n"
    f"os.execv(sys.executable, [sys.executable, '-c', {SECOND!r}])\n"
)


def test_reads_after_the_thread_execs_use_the_new_image() -> None:
    """Regression: a /proc/TID/mem fd cached before execve reads EIO afterwards;
    that must not turn into EFAULT for the new image's valid addresses."""
    child = subprocess.Popen([sys.executable, "-c", FIRST], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    memory = TraceeMemory()
    try:
        assert child.stdout is not None and child.stdin is not None
        first = int(child.stdout.readline())
        assert memory.read_cstring(child.pid, first) == b"first image"
        child.stdin.write(b"\n")
        child.stdin.flush()
        second = int(child.stdout.readline())
        assert memory.read_cstring(child.pid, second) == b"second image"
        with pytest.raises(OSError) as caught:
            memory.read(child.pid, 8, 16)  # never mapped
        assert caught.value.errno == errno.EFAULT
    finally:
        memory.close()
        child.kill()
        child.wait()
