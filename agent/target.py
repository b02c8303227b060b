"""The process whose context the agent serves: its root, environment and network.

A targetless agent serves its own context (root ``/``, its own environment and
network namespace). With a target pid, files resolve under ``/proc/PID/root``
(so the agent sees the target's mounts without joining its mount namespace),
the environment is ``/proc/PID/environ``, and the whole agent process moves
into the target's network namespace at startup (:meth:`Target.enter_network`),
before any thread exists, so every socket it opens later lives there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re

from .errors import AgentError

CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
SECRET_VARIABLE = "MTRACE_AGENT_SECRET"


class Target:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.root = f"/proc/{pid}/root" if pid is not None else "/"
        self._in_uts = False
        if pid is not None and not os.path.exists(f"/proc/{pid}"):
            raise AgentError(
                f"target process {pid} does not exist",
                hint="check the pid (ps -p PID) and that the agent sees the host's /proc",
            )

    def hostname(self) -> str | None:
        """The target's hostname: its UTS namespace's once :meth:`enter_network`
        joined it, else its /etc/hostname, else None."""
        if self.pid is None or self._in_uts:
            return os.uname().nodename
        try:
            with open(f"{self.root}/etc/hostname", "rb") as file:
                name = file.read(256).strip().decode(errors="replace")
        except OSError:
            return None
        return name or None

    def describe(self) -> str:
        return f"pid/{self.pid}" if self.pid is not None else "targetless"

    def environ(self) -> list[tuple[bytes, bytes]]:
        """The target's environment as raw ``(name, value)`` pairs, in order."""
        if self.pid is None:
            return [(name, value) for name, value in os.environb.items() if name != SECRET_VARIABLE.encode()]
        with open(f"/proc/{self.pid}/environ", "rb") as file:
            raw = file.read()
        variables = []
        for entry in raw.split(b"\0"):
            if entry:
                name, _, value = entry.partition(b"=")
                variables.append((name, value))
        return variables

    def enter_network(self) -> None:
        """Move this process into the target's network namespace (call before threads exist)."""
        if self.pid is None:
            return
        path = f"/proc/{self.pid}/ns/net"
        with contextlib.suppress(OSError):
            # Already there (an ephemeral container shares its pod's network):
            # setns would need CAP_SYS_ADMIN for nothing.
            if os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
                return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise AgentError(
                f"cannot open {path}: {error.strerror}",
                hint="the agent needs root (CAP_SYS_ADMIN, CAP_SYS_PTRACE) to enter a namespace",
            ) from error
        try:
            _setns(fd, CLONE_NEWNET)
        except OSError as error:
            raise AgentError(
                f"cannot enter the network namespace of pid {self.pid}: {error.strerror}",
                hint="the agent needs CAP_SYS_ADMIN to join another network namespace",
            ) from error
        finally:
            os.close(fd)
        self._enter_uts()

    def _enter_uts(self) -> None:
        """Join the target's UTS namespace too, so uname() here gives its
        hostname (nothing else in the agent depends on it; failing is fine)."""
        try:
            fd = os.open(f"/proc/{self.pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            _setns(fd, CLONE_NEWUTS)
            self._in_uts = True
        except OSError:
            pass
        finally:
            os.close(fd)


_RUNTIME_PREFIX = re.compile(r"^[a-z0-9-]+://")


def find_container_process(container_id: str, proc: str = "/proc") -> int:
    """The main process of the container with this runtime ID: the lowest pid
    whose ``/proc/PID/cgroup`` names the ID. Every runtime (containerd,
    CRI-O, Docker, with cgroup v1 or v2, systemd or cgroupfs drivers) puts
    the container's ID in its cgroup path, so this needs nothing
    runtime-specific. The agent must see the target's processes: a hostPID
    pod, or an ephemeral container sharing the target's PID namespace."""
    wanted = _RUNTIME_PREFIX.sub("", container_id.strip())
    if len(wanted) < 12 or not re.fullmatch(r"[0-9a-f]+", wanted):
        raise AgentError(f"--target-container-id {container_id!r} is not a container ID",
                         hint="give the containerID of the pod's status (docker://..., containerd://...)")
    found: list[int] = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/cgroup", "rb") as file:
                cgroups = file.read().decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if wanted in cgroups:
            found.append(int(name))
    if not found:
        raise AgentError(
            f"no process of container {wanted[:12]} is visible",
            hint="the agent needs the target's PID namespace: hostPID for a node agent, "
            "targetContainerName for an ephemeral one; is the container still running?",
        )
    return min(found)


def _setns(fd: int, nstype: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, nstype)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
