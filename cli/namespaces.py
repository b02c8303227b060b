"""Creating namespaces for throwaway targets (``mtrace demo``), via libc."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from .errors import TargetError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_BIND = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None),
           f"mount {target}")


def become_root_in_user_namespace() -> None:
    """Enter a new user namespace mapping our uid to root, so an unprivileged user
    can create network and mount namespaces (must run before any thread starts)."""
    uid, gid = os.getuid(), os.getgid()
    try:
        unshare(CLONE_NEWUSER)
    except OSError as exc:
        raise TargetError(
            f"cannot create a user namespace: {exc.strerror}",
            hint="run as root, or allow unprivileged user namespaces "
                 "(sysctl kernel.unprivileged_userns_clone=1)",
        ) from exc
    with open("/proc/self/setgroups", "w") as setgroups:
        setgroups.write("deny")
    with open("/proc/self/uid_map", "w") as uid_map:
        uid_map.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as gid_map:
        gid_map.write(f"0 {gid} 1")


def bring_loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def isolate_network() -> None:
    """A new, empty network namespace (loopback only, up)."""
    unshare(CLONE_NEWNET)
    bring_loopback_up()


def private_mounts() -> None:
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def bind_file(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND)

