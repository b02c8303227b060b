"""``mtrace doctor``: which kernel features mtrace can use here, and what a
missing one costs the user. Each check really exercises the feature."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    # What the user loses when the check fails.
    cost: str = ""
    required: bool = True


def _seccomp_actions() -> set[str]:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as actions:
            return set(actions.read().split())
    except OSError:
        return set()


def check_notify() -> list[Check]:
    """Start a real tracee under a filter and answer one call with an injected fd."""
    from ..tracer import seccomp
    from ..tracer.backend import Handlers
    from ..tracer.call import SyscallCall
    from ..tracer.launcher import Kind, Launch
    from ..tracer.notify import NotifyBackend
    from ..tracer.outcome import CONTINUE, InjectFd, Outcome
    from ..tracer.syscalls import table

    probe_path = b"/mtrace-doctor-probe"
    injected = []

    def on_open(call: SyscallCall) -> Outcome:
        path = call.read_string(1) if call.name == "openat" else call.read_string(0)
        if path == probe_path:
            injected.append(True)
            return InjectFd(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        return CONTINUE

    syscall_table = table()
    shell = shutil.which("sh") or "/bin/sh"
    checks: list[Check] = []
    try:
        launch = Launch([shell, "-c", ": < /mtrace-doctor-probe"], mode="notify",
                        trap=syscall_table.numbers_for(["open", "openat"]), enosys=[])
    except Exception as exc:
        return [Check("exec helper", False, str(exc), "mtrace cannot run anything")]
    try:
        message = launch.wait_for(Kind.LISTENER, timeout=10)
    except Exception as exc:
        launch.watchdog.kill()
        launch.watchdog.wait()
        return [Check("seccomp user notification", False, str(exc),
                      "the notify backend is unusable; mtrace falls back to ptrace")]
    assert message.fd is not None
    flags = message.value
    listener = seccomp.Listener(message.fd)
    backend = NotifyBackend(listener, syscall_table, Handlers({"open": on_open, "openat": on_open}))
    backend.run(should_stop=lambda: launch.watchdog.poll() is not None)
    listener.close()
    code = launch.wait_exit(timeout=10)
    launch.close()
    checks.append(Check("seccomp user notification", True, "filter installed, listener received"))
    checks.append(Check(
        "SECCOMP_ADDFD_FLAG_SEND", bool(injected) and code == 0,
        "fd injected atomically" if code == 0 else f"probe shell exited {code}",
        "remote files cannot be handed to the tracee (Linux 5.14+ needed)"))
    killable = bool(flags & seccomp.FILTER_FLAG_WAIT_KILLABLE_RECV)
    checks.append(Check(
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV", killable,
        "on" if killable else "the kernel refused it",
        "Go programs may livelock (SIGURG restarts trapped calls); Linux 5.19+ fixes it"))
    checks.append(Check(
        "SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP", backend.sync_wake_up,
        "on" if backend.sync_wake_up else "not supported",
        "each trapped call costs ~7x more when tracee and supervisor sit on different CPUs "
        "(Linux 6.6+)", required=False))
    return checks


def check_pidfd_getfd() -> Check:
    from ..tracer import seccomp

    try:
        pidfd = seccomp.pidfd_open(os.getpid())
        try:
            duplicate = seccomp.pidfd_getfd(pidfd, 0 if _is_open(0) else pidfd)
            os.close(duplicate)
        finally:
            os.close(pidfd)
    except OSError as exc:
        return Check("pidfd_getfd", False, exc.strerror or str(exc),
                     "outgoing connections cannot be redirected (Linux 5.6+ needed)")
    return Check("pidfd_getfd", True, "works")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def check_ptrace() -> Check:
    """Run a short command under the ptrace backend."""
    from ..tracer.session import ptrace_probe

    ok, detail = ptrace_probe()
    return Check("ptrace backend", ok, detail,
                 "no fallback where seccomp notification is missing", required=False)


def check_namespaces() -> Check:
    try:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return Check("network namespaces", False, exc.strerror or str(exc),
                     "`--target pid/N` cannot enter the target's network")
    root = os.geteuid() == 0
    detail = "setns possible (root)" if root else "needs CAP_SYS_ADMIN for pid/N targets"
    return Check("network namespaces", root, detail,
                 "`--target pid/N` on this machine needs root (or a user namespace)",
                 required=False)


def check_memory_access() -> Check:
    try:
        with open(f"/proc/{os.getpid()}/mem", "rb"):
            pass
    except OSError as exc:
        return Check("/proc/PID/mem", False, exc.strerror or str(exc),
                     "slower process_vm_readv fallback", required=False)
    return Check("/proc/PID/mem", True, "readable")


def check_resident() -> Check:
    """Whether a resident mtrace serves this user's runs (`mtrace resident start`)."""
    from .resident import socket_path
    from .resident_server import ask

    path = socket_path()
    answer = ask(path, {"op": "status"}, timeout=2)
    if answer is None:
        return Check("resident mtrace", False, f"not running ({path})",
                     "each `mtrace exec` pays for its imports; `mtrace resident start`",
                     required=False)
    return Check("resident mtrace", True, f"pid {answer['pid']}, {answer['runs']} runs ({path})")


def run_checks(out: TextIO) -> int:
    machine = platform.machine()
    out.write(f"mtrace doctor: Linux {platform.release()} on {machine}\n")
    actions = _seccomp_actions()
    checks = [Check("seccomp", bool(actions), " ".join(sorted(actions)) or "not available",
                    "mtrace cannot trap anything")]
    if "user_notif" in actions:
        checks.extend(check_notify())
    else:
        checks.append(Check("seccomp user notification", False, "user_notif not in actions_avail",
                            "the notify backend is unusable; mtrace falls back to ptrace"))
    checks += [check_pidfd_getfd(), check_memory_access(), check_ptrace(), check_namespaces(),
               check_resident()]
    failed_required = False
    for check in checks:
        mark = "ok " if check.ok else ("!! " if check.required else "-- ")
        out.write(f"  {mark} {check.name:<40} {check.detail}\n")
        if not check.ok and check.cost:
            out.write(f"      {'':<40} missing: {check.cost}\n")
        failed_required |= check.required and not check.ok
    out.write("all required features present\n" if not failed_required
              else "some required features are missing (marked !!)\n")
    return 1 if failed_required else 0

