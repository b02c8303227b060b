"""feature.hostname: the tracee's hostname is the target's.

glibc's and musl's ``gethostname`` and Go's ``os.Hostname`` all read the
nodename of ``uname(2)``, so trapping ``uname`` covers every program alike: the
supervisor answers it with this machine's kernel fields (the tracee runs on
this kernel) and the target's nodename. ``/etc/hostname`` is read from the
target by the files feature (see ``PathPolicy``). ``/proc/sys/kernel/hostname``
stays this machine's (``/proc`` is local).
"""

from __future__ import annotations

import os

from ..backend import Handler
from ..call import SyscallCall
from ..outcome import CONTINUE, Outcome, ReturnValue

TRAPPED: tuple[str, ...] = ("uname",)

# struct utsname on Linux: six fields of __NEW_UTS_LEN + 1 bytes.
UTS_FIELD_SIZE = 65


def _field(text: str) -> bytes:
    return text.encode(errors="replace")[:UTS_FIELD_SIZE - 1].ljust(UTS_FIELD_SIZE, b"\0")


def _domainname() -> str:
    try:
        with open("/proc/sys/kernel/domainname", encoding="utf-8", errors="replace") as file:
            return file.read().strip()
    except OSError:
        return "(none)"


def utsname(hostname: str) -> bytes:
    """This machine's struct utsname with ``hostname`` as the nodename."""
    local = os.uname()
    return b"".join(_field(value) for value in (
        local.sysname, hostname, local.release, local.version, local.machine, _domainname()))


def handlers(hostname: str) -> dict[str, Handler]:
    def uname(call: SyscallCall) -> Outcome:
        buffer = call.pointer_arg(0)
        if not buffer:
            return CONTINUE  # the kernel's EFAULT
        return ReturnValue(0, writes=((buffer, utsname(hostname)),))

    return {"uname": uname}
