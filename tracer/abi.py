"""Kernel struct layouts handlers write into tracee memory, per architecture.

The stat family answers a remote file's metadata by storing it in the caller's
buffer exactly as the kernel would: ``struct stat`` as ``newfstatat``/``stat``/
``lstat``/``fstat`` fill it (x86_64: 144 bytes, aarch64's asm-generic layout:
128 bytes), ``struct statx`` (256 bytes, the same everywhere), and
``struct statfs`` for ``statfs``/``fstatfs`` (120 bytes on both). Nothing here
decides anything; ``mtrace.tracer.features.files`` does.
"""

from __future__ import annotations

import os
import platform
import struct
from typing import Protocol

# fcntl.h / stat.h flag values handlers need (the same on x86_64 and aarch64).
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_EACCESS = 0x200  # faccessat's meaning of the same bit
AT_SYMLINK_FOLLOW = 0x400
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
AT_STATX_SYNC_TYPE = 0x6000

O_PATH = 0o10000000
O_TMPFILE = 0o20000000 | os.O_DIRECTORY

STATX_TYPE = 0x1
STATX_MODE = 0x2
STATX_NLINK = 0x4
STATX_UID = 0x8
STATX_GID = 0x10
STATX_ATIME = 0x20
STATX_MTIME = 0x40
STATX_CTIME = 0x80
STATX_INO = 0x100
STATX_SIZE = 0x200
STATX_BLOCKS = 0x400
STATX_BASIC_STATS = 0x7FF

STATX_SIZEOF = 256


class StatLike(Protocol):
    """What the packers read: ``mtrace.agent.protocol.FileStat`` has these fields."""

    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int
    blocks: int
    rdev: int


def _seconds(nanoseconds: int) -> tuple[int, int]:
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    return seconds, rest


# x86_64 (arch/x86/include/uapi/asm/stat.h):
#   dev ino nlink (u64), mode uid gid (u32) __pad0 (i32), rdev (u64), size blksize
#   blocks (i64), atime atime_nsec mtime mtime_nsec ctime ctime_nsec (i64), unused[3]
_STAT_X86_64 = struct.Struct("<QQQIIIiQqqqqqqqqq24x")
# aarch64 (include/uapi/asm-generic/stat.h):
#   dev ino (u64), mode nlink uid gid (u32), rdev __pad1 (u64), size (i64), blksize
#   (i32) __pad2 (i32), blocks (i64), atime atime_nsec ... (i64/u64), unused4 unused5
_STAT_GENERIC = struct.Struct("<QQIIIIQQqiiqqQqQqQ8x")

STAT_SIZES = {"x86_64": _STAT_X86_64.size, "aarch64": _STAT_GENERIC.size}


def pack_stat(info: StatLike, arch: str | None = None) -> bytes:
    """``info`` as the kernel's ``struct stat`` for ``arch`` (default: this machine)."""
    arch = arch or platform.machine()
    atime = _seconds(info.atime_ns)
    mtime = _seconds(info.mtime_ns)
    ctime = _seconds(info.ctime_ns)
    if arch == "x86_64":
        return _STAT_X86_64.pack(
            info.dev, info.ino, info.nlink, info.mode, info.uid, info.gid, 0, info.rdev,
            info.size, info.blksize, info.blocks, *atime, *mtime, *ctime,
        )
    if arch == "aarch64":
        return _STAT_GENERIC.pack(
            info.dev, info.ino, info.mode, info.nlink, info.uid, info.gid, info.rdev, 0,
            info.size, info.blksize, 0, info.blocks, *atime, *mtime, *ctime,
        )
    raise ValueError(f"no struct stat layout for {arch}")


class _OsStat:
    """An ``os.stat_result`` seen through the StatLike field names."""

    __slots__ = ("_result",)

    def __init__(self, result: os.stat_result) -> None:
        self._result = result

    def __getattr__(self, name: str) -> int:
        return int(getattr(self._result, f"st_{name}"))


def pack_os_stat(result: os.stat_result, arch: str | None = None) -> bytes:
    """A local ``os.stat`` result as the kernel's ``struct stat``."""
    return pack_stat(_OsStat(result), arch)


# struct statx (include/uapi/linux/stat.h): mask blksize (u32) attributes (u64)
# nlink uid gid (u32) mode (u16) __spare0 (u16) ino size blocks attributes_mask (u64)
# atime btime ctime mtime (i64 sec, u32 nsec, i32 reserved) rdev_major rdev_minor
# dev_major dev_minor (u32), then spare space up to 256 bytes.
_STATX_HEAD = struct.Struct("<IIQIIIHHQQQQ")
_STATX_TIME = struct.Struct("<qIi")
_STATX_DEVS = struct.Struct("<IIII")


def pack_statx(info: StatLike, mask: int = STATX_BASIC_STATS) -> bytes:
    """``info`` as ``struct statx`` (256 bytes); ``mask`` says which fields are valid."""
    mask &= STATX_BASIC_STATS
    head = _STATX_HEAD.pack(
        mask, info.blksize, 0, info.nlink, info.uid, info.gid, info.mode & 0xFFFF, 0,
        info.ino, info.size, info.blocks, 0,
    )
    times = b"".join(
        _STATX_TIME.pack(*_seconds(value), 0)
        for value in (info.atime_ns, 0, info.ctime_ns, info.mtime_ns)
    )
    devices = _STATX_DEVS.pack(
        os.major(info.rdev), os.minor(info.rdev), os.major(info.dev), os.minor(info.dev)
    )
    packed = head + times + devices
    return packed + bytes(STATX_SIZEOF - len(packed))


class StatFsLike(Protocol):
    """What :func:`pack_statfs` reads: ``mtrace.agent.protocol.FsStat`` has these fields."""

    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: tuple[int, int]
    namelen: int
    frsize: int
    flags: int


# struct statfs (include/uapi/asm-generic/statfs.h, which x86_64 uses too; on
# 64-bit machines every __statfs_word is 64 bits): type bsize (long), blocks bfree
# bavail files ffree (u64), fsid (2 x i32), namelen frsize flags (long), spare[4].
_STATFS_64 = struct.Struct("<QqQQQQQIIqqq32x")
STATFS_SIZES = {"x86_64": _STATFS_64.size, "aarch64": _STATFS_64.size}


def pack_statfs(info: StatFsLike, arch: str | None = None) -> bytes:
    """``info`` as the kernel's ``struct statfs`` for ``arch`` (default: this machine)."""
    arch = arch or platform.machine()
    if arch not in STATFS_SIZES:
        raise ValueError(f"no struct statfs layout for {arch}")
    return _STATFS_64.pack(
        info.type & 0xFFFFFFFFFFFFFFFF, info.bsize, info.blocks, info.bfree, info.bavail,
        info.files, info.ffree, info.fsid[0] & 0xFFFFFFFF, info.fsid[1] & 0xFFFFFFFF,
        info.namelen, info.frsize, info.flags)


def unpack_stat(data: bytes, arch: str | None = None) -> dict[str, int]:
    """The fields of a packed ``struct stat`` (tests and the trace printer)."""
    arch = arch or platform.machine()
    if arch == "x86_64":
        (dev, ino, nlink, mode, uid, gid, _, rdev, size, blksize, blocks,
         atime, atime_ns, mtime, mtime_ns, ctime, ctime_ns) = _STAT_X86_64.unpack(data)
    elif arch == "aarch64":
        (dev, ino, mode, nlink, uid, gid, rdev, _, size, blksize, _, blocks,
         atime, atime_ns, mtime, mtime_ns, ctime, ctime_ns) = _STAT_GENERIC.unpack(data)
    else:
        raise ValueError(f"no struct stat layout for {arch}")
    return {
        "dev": dev, "ino": ino, "nlink": nlink, "mode": mode, "uid": uid, "gid": gid,
        "rdev": rdev, "size": size, "blksize": blksize, "blocks": blocks,
        "atime_ns": atime * 1_000_000_000 + atime_ns,
        "mtime_ns": mtime * 1_000_000_000 + mtime_ns,
        "ctime_ns": ctime * 1_000_000_000 + ctime_ns,
    }
