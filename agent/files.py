"""File operations in the target's filesystem view, confined to its root.

Everything here is synchronous (plain syscalls); the session runs it in a worker
thread so a slow filesystem (NFS, FUSE, a FIFO) never stalls other clients.

Paths resolve under the target's root (``/proc/PID/root``, or ``/`` for a
targetless agent) and can never escape it: ``..`` stops at the root, and
symlinks, absolute ones included, resolve inside the root exactly as the target
itself would see them. Two resolvers do this:

* :class:`Openat2Resolver`: the kernel does the work (``openat2`` with
  ``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS``, Linux 5.6+), race free;
* :class:`WalkingResolver`: the fallback, component by component from an fd of
  the root, reading symlinks itself (at most :data:`MAX_SYMLINKS`, then
  ``ELOOP``); every step is ``O_NOFOLLOW`` relative to a directory fd, so a
  symlink swapped in underneath fails instead of escaping.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgspec

from .protocol import (
    PATH_MAX,
    XATTR_CREATE,
    XATTR_NAME_MAX,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    Data,
    DirEntries,
    DirEntry,
    FileContents,
    FileStat,
    FsStat,
    TimeSpec,
)

MAX_SYMLINKS = 40  # what Linux allows in one path walk

_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10

_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
# What a client may ask for when opening; everything else is dropped
# (O_LARGEFILE and friends are meaningless here, O_PATH/O_TMPFILE are refused).
_OPEN_FLAGS_ALLOWED = (
    os.O_ACCMODE
    | os.O_CREAT
    | os.O_EXCL
    | os.O_TRUNC
    | os.O_APPEND
    | os.O_DIRECTORY
    | os.O_NOFOLLOW
    | os.O_NONBLOCK
    | os.O_SYNC
    | os.O_DSYNC
)
_OPEN_FLAGS_WRITING = os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _error(code: int, path: bytes | None = None) -> OSError:
    return OSError(code, os.strerror(code), os.fsdecode(path) if path is not None else None)


class RootResolver(abc.ABC):
    """Opens paths inside a root directory; subclasses decide how."""

    name = "abstract"

    def __init__(self, root: str | bytes) -> None:
        self.root = os.fsencode(root)
        self.root_fd = os.open(self.root, _PATH_FLAGS | os.O_DIRECTORY)

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    @abc.abstractmethod
    def open(self, path: bytes, flags: int, mode: int = 0) -> int:
        """An fd for ``path`` opened with ``flags``; follows a final symlink unless O_NOFOLLOW."""

    @abc.abstractmethod
    def parent(self, path: bytes) -> tuple[int, bytes]:
        """An O_PATH fd of the directory holding ``path``'s last component, and that component.

        The last component is never followed (lstat, readlink, unlink, mkdir,
        rename act on the name itself). A path naming a directory through
        ``.``, ``..`` or ``/`` yields that directory's fd and ``b"."``. The
        caller closes the fd.
        """

    @contextlib.contextmanager
    def parent_of(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        directory, name = self.parent(path)
        try:
            yield directory, name
        finally:
            os.close(directory)

    @contextlib.contextmanager
    def opened(self, path: bytes, flags: int, mode: int = 0) -> Iterator[int]:
        fd = self.open(path, flags, mode)
        try:
            yield fd
        finally:
            os.close(fd)


def _check_path(path: bytes) -> None:
    if not path:
        raise _error(errno.ENOENT, path)
    if b"\0" in path:
        raise _error(errno.EINVAL, path)


def _check_xattr_name(name: bytes, path: bytes) -> None:
    if not name or len(name) > XATTR_NAME_MAX:
        raise _error(errno.ERANGE, path)
    if b"\0" in name:
        raise _error(errno.EINVAL, path)


def _split_last(path: bytes) -> tuple[bytes, bytes]:
    """Lexically split off the last component: ``(parent path, name)``."""
    stripped = path.rstrip(b"/")
    if not stripped:
        return b"/", b"."
    head, _, name = stripped.rpartition(b"/")
    if not head:
        head = b"/" if stripped.startswith(b"/") else b"."
    return head, name


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(directory: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
    for _ in range(8):
        fd = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(directory),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        # EAGAIN: a concurrent rename raced the ".." check; the kernel asks for a retry.
        if code not in (errno.EAGAIN, errno.EINTR):
            raise _error(code, path)
    raise _error(errno.EAGAIN, path)


class Openat2Resolver(RootResolver):
    name = "openat2"
    _resolve = _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS

    def __init__(self, root: str | bytes) -> None:
        super().__init__(root)
        # Probe once: ENOSYS (old kernel) or EPERM (a seccomp sandbox) -> fallback.
        os.close(_openat2(self.root_fd, b".", _PATH_FLAGS, 0, self._resolve))

    def open(self, path: bytes, flags: int, mode: int = 0) -> int:
        _check_path(path)
        return _openat2(self.root_fd, path, flags, mode, self._resolve)

    def parent(self, path: bytes) -> tuple[int, bytes]:
        _check_path(path)
        head, name = _split_last(path)
        if name in (b".", b".."):
            return self.open(path, _PATH_FLAGS | os.O_DIRECTORY), b"."
        return self.open(head, _PATH_FLAGS | os.O_DIRECTORY), name


class WalkingResolver(RootResolver):
    name = "walk"

    def open(self, path: bytes, flags: int, mode: int = 0) -> int:
        _check_path(path)
        directory, name = self._walk(path, follow_final=not flags & os.O_NOFOLLOW)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory)
        finally:
            os.close(directory)

    def parent(self, path: bytes) -> tuple[int, bytes]:
        _check_path(path)
        # Like the kernel for mkdir("new/"): a trailing slash does not make
        # the last component a directory to enter.
        return self._walk(path.rstrip(b"/") or b"/", follow_final=False)

    def _walk(self, path: bytes, *, follow_final: bool) -> tuple[int, bytes]:
        pending = deque(path.split(b"/"))
        if path.endswith(b"/"):
            # "dir/" means the directory itself, following a final symlink.
            pending.append(b".")
        stack = [self.root_fd]  # the directories walked through; [0] is never closed
        symlinks = 0
        try:
            while True:
                if not pending:
                    name = b"."
                    break
                component = pending.popleft()
                if component in (b"", b"."):
                    continue
                if component == b"..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                last = not pending
                if last and not follow_final:
                    name = component
                    break
                try:
                    info = os.stat(component, dir_fd=stack[-1], follow_symlinks=False)
                except FileNotFoundError:
                    if last:  # a name about to be created
                        name = component
                        break
                    raise
                if stat.S_ISLNK(info.st_mode):
                    symlinks += 1
                    if symlinks > MAX_SYMLINKS:
                        raise _error(errno.ELOOP, path)
                    target = os.readlink(component, dir_fd=stack[-1])
                    if not target:
                        raise _error(errno.ENOENT, path)
                    if target.startswith(b"/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    # A trailing slash in the target leaves a final b"" component,
                    # which makes the walk end on the directory itself (b".").
                    pending.extendleft(reversed(target.split(b"/")))
                    continue
                if last:
                    name = component
                    break
                if not stat.S_ISDIR(info.st_mode):
                    raise _error(errno.ENOTDIR, path)
                stack.append(
                    os.open(
                        component,
                        _PATH_FLAGS | os.O_DIRECTORY | os.O_NOFOLLOW,
                        dir_fd=stack[-1],
                    )
                )
            directory = stack.pop() if len(stack) > 1 else os.dup(self.root_fd)
            return directory, name
        finally:
            for fd in stack[1:]:
                os.close(fd)


def make_resolver(root: str | bytes) -> RootResolver:
    """The best resolver this kernel allows for ``root``."""
    try:
        return Openat2Resolver(root)
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
            raise
    return WalkingResolver(root)


class _StatFs64(ctypes.Structure):
    """glibc's and musl's ``struct statfs64`` (the kernel's layout on 64-bit
    machines; the LFS form on 32-bit ones)."""

    _fields_ = (
        ("type", ctypes.c_long),
        ("bsize", ctypes.c_long),
        ("blocks", ctypes.c_uint64),
        ("bfree", ctypes.c_uint64),
        ("bavail", ctypes.c_uint64),
        ("files", ctypes.c_uint64),
        ("ffree", ctypes.c_uint64),
        ("fsid", ctypes.c_int32 * 2),
        ("namelen", ctypes.c_long),
        ("frsize", ctypes.c_long),
        ("flags", ctypes.c_long),
        ("spare", ctypes.c_long * 4),
    )


# fstatfs64 is an alias of fstatfs where the two are the same (64-bit libcs).
_fstatfs = getattr(_libc, "fstatfs64", None) or _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_StatFs64))
_fstatfs.restype = ctypes.c_int


def fs_stat_of_fd(fd: int) -> FsStat:
    """fstatfs(2) of ``fd`` (``os.statvfs`` has no ``f_type``, which ``df -T``
    and programs telling tmpfs from ext4 read)."""
    result = _StatFs64()
    if _fstatfs(fd, ctypes.byref(result)) != 0:
        raise _error(ctypes.get_errno())
    return FsStat(type=result.type & 0xFFFFFFFFFFFFFFFF, bsize=result.bsize,
                  blocks=result.blocks, bfree=result.bfree, bavail=result.bavail,
                  files=result.files, ffree=result.ffree,
                  fsid=(result.fsid[0] & 0xFFFFFFFF, result.fsid[1] & 0xFFFFFFFF),
                  namelen=result.namelen, frsize=result.frsize, flags=result.flags)


def set_times(name: str | bytes, atime: TimeSpec, mtime: TimeSpec, **where: Any) -> None:
    """utimensat(2) with :data:`TimeSpec` values (``where``: os.utime's
    ``dir_fd``/``follow_symlinks``)."""
    if atime == "now" and mtime == "now":
        # No explicit times: what needs only write permission, not ownership.
        os.utime(name, **where)
        return
    # UTIME_OMIT: the time it has (os.utime takes both or neither).
    current = os.stat(name, **where) if atime is None or mtime is None else None
    now = time.time_ns()

    def pick(value: TimeSpec, which: str) -> int:
        if value == "now":
            return now
        if value is None:
            return int(getattr(current, which))
        return value

    os.utime(name, ns=(pick(atime, "st_atime_ns"), pick(mtime, "st_mtime_ns")), **where)


# --- operations ------------------------------------------------------------------


def file_stat(result: os.stat_result) -> FileStat:
    return FileStat(
        mode=result.st_mode,
        ino=result.st_ino,
        dev=result.st_dev,
        nlink=result.st_nlink,
        uid=result.st_uid,
        gid=result.st_gid,
        size=result.st_size,
        atime_ns=result.st_atime_ns,
        mtime_ns=result.st_mtime_ns,
        ctime_ns=result.st_ctime_ns,
        blksize=result.st_blksize,
        blocks=result.st_blocks,
        rdev=result.st_rdev,
    )


_DT_BY_FORMAT = {
    stat.S_IFIFO: 1,
    stat.S_IFCHR: 2,
    stat.S_IFDIR: 4,
    stat.S_IFBLK: 6,
    stat.S_IFREG: 8,
    stat.S_IFLNK: 10,
    stat.S_IFSOCK: 12,
}
DT_UNKNOWN = 0


def _entry_type(entry: os.DirEntry[str]) -> int:
    # is_dir/is_file/is_symlink answer from d_type without a syscall when the
    # filesystem provides it; otherwise one lstat.
    if entry.is_symlink():
        return _DT_BY_FORMAT[stat.S_IFLNK]
    if entry.is_dir(follow_symlinks=False):
        return _DT_BY_FORMAT[stat.S_IFDIR]
    if entry.is_file(follow_symlinks=False):
        return _DT_BY_FORMAT[stat.S_IFREG]
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return DT_UNKNOWN
    return _DT_BY_FORMAT.get(stat.S_IFMT(mode), DT_UNKNOWN)


class FileService:
    """The file operations of one agent, over one root."""

    def __init__(self, resolver: RootResolver, *, writable: bool) -> None:
        self.resolver = resolver
        self.writable = writable

    def _require_writable(self, path: bytes | None = None) -> None:
        if not self.writable:
            raise _error(errno.EROFS, path)

    def stat(self, path: bytes, follow_symlinks: bool) -> FileStat:
        if follow_symlinks or path.endswith(b"/"):
            with self.resolver.opened(path, _PATH_FLAGS) as fd:
                return file_stat(os.fstat(fd))
        with self.resolver.parent_of(path) as (directory, name):
            return file_stat(os.stat(name, dir_fd=directory, follow_symlinks=False))

    def statfs(self, path: bytes) -> FsStat:
        # fstatfs works on an O_PATH fd (Linux 3.12+): the resolved file's own
        # filesystem, symlinks followed under the target's root.
        with self.resolver.opened(path, _PATH_FLAGS) as fd:
            return fs_stat_of_fd(fd)

    def access(self, path: bytes, mode: int) -> None:
        if mode & ~(os.R_OK | os.W_OK | os.X_OK):
            raise _error(errno.EINVAL, path)
        if mode & os.W_OK and not self.writable:
            # Even if the agent's credentials could write, this agent will not.
            with self.resolver.opened(path, _PATH_FLAGS):
                raise _error(errno.EROFS, path)
        with self.resolver.opened(path, _PATH_FLAGS) as fd:
            # The fd's /proc link names exactly the resolved object: no second lookup.
            if not os.access(f"/proc/self/fd/{fd}", mode):
                raise _error(errno.EACCES, path)

    def read_file(self, path: bytes, limit: int) -> FileContents:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        with self.resolver.opened(path, os.O_RDONLY | os.O_NONBLOCK) as fd:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise _error(errno.EISDIR, path)
            if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                raise _error(errno.EFBIG, path)
            chunks = []
            total = 0
            # Read to EOF rather than st_size bytes: /proc and /sys files report 0.
            while True:
                try:
                    chunk = os.read(fd, min(max(limit + 1 - total, 1), 1 << 20))
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise _error(errno.EFBIG, path)
            return FileContents(stat=file_stat(info), data=b"".join(chunks))

    def open(self, path: bytes, flags: int, mode: int) -> tuple[int, FileStat]:
        flags &= _OPEN_FLAGS_ALLOWED
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & _OPEN_FLAGS_WRITING:
            self._require_writable(path)
        fd = self.resolver.open(path, flags | os.O_NOCTTY, mode & 0o7777)
        try:
            return fd, file_stat(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def read(fd: int, size: int, offset: int | None) -> Data:
        if size < 0 or (offset is not None and offset < 0):
            raise _error(errno.EINVAL)
        data = os.read(fd, size) if offset is None else os.pread(fd, size, offset)
        return Data(data=data, eof=len(data) < size)

    def write(self, fd: int, data: bytes, offset: int | None) -> int:
        self._require_writable()
        if offset is not None and offset < 0:
            raise _error(errno.EINVAL)
        return os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)

    def readdir(self, path: bytes) -> DirEntries:
        with self.resolver.opened(path, os.O_RDONLY | os.O_DIRECTORY) as fd, os.scandir(fd) as it:
            return DirEntries(
                entries=[
                    DirEntry(name=os.fsencode(entry.name), type=_entry_type(entry), ino=entry.inode())
                    for entry in it
                ]
            )

    def readlink(self, path: bytes) -> bytes:
        with self.resolver.parent_of(path) as (directory, name):
            return os.readlink(name, dir_fd=directory)

    def truncate(self, path: bytes, length: int) -> None:
        self._require_writable(path)
        if length < 0:
            raise _error(errno.EINVAL, path)
        with self.resolver.opened(path, os.O_WRONLY | os.O_NONBLOCK) as fd:
            os.ftruncate(fd, length)

    def mkdir(self, path: bytes, mode: int) -> None:
        self._require_writable(path)
        with self.resolver.parent_of(path) as (directory, name):
            os.mkdir(name, mode & 0o7777, dir_fd=directory)

    def chmod(self, path: bytes, mode: int) -> None:
        self._require_writable(path)
        # Through an O_PATH fd of the resolved file: a symlink in the path is
        # followed under the target's root, never out of it.
        with self.resolver.opened(path, os.O_PATH) as fd:
            os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)

    def chown(self, path: bytes, uid: int, gid: int, follow: bool) -> None:
        self._require_writable(path)
        if follow:
            with self.resolver.opened(path, os.O_PATH) as fd:
                os.chown(f"/proc/self/fd/{fd}", uid, gid)
            return
        with self.resolver.parent_of(path) as (directory, name):
            os.chown(name, uid, gid, dir_fd=directory, follow_symlinks=False)

    def set_times(self, path: bytes, atime: TimeSpec, mtime: TimeSpec, follow: bool) -> None:
        self._require_writable(path)
        if follow:
            with self.resolver.opened(path, os.O_PATH) as fd:
                set_times(f"/proc/self/fd/{fd}", atime, mtime)
            return
        with self.resolver.parent_of(path) as (directory, name):
            set_times(name, atime, mtime, dir_fd=directory, follow_symlinks=False)

    # --- new names and extended attributes -------------------------------------
    # Names are made with a directory fd the resolver confined to the root; a
    # symlink's contents are stored as given (they are resolved, inside the
    # root, only when something follows the link).

    def link(self, source: bytes, destination: bytes, follow: bool) -> None:
        self._require_writable(destination)
        with self.resolver.parent_of(destination) as (directory, name):
            if follow:
                # linkat(AT_SYMLINK_FOLLOW) of the magic link: the file the
                # resolver found inside the root, never a host path.
                with self.resolver.opened(source, _PATH_FLAGS) as fd:
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory,
                            follow_symlinks=True)
                return
            with self.resolver.parent_of(source) as (source_directory, source_name):
                os.link(source_name, name, src_dir_fd=source_directory, dst_dir_fd=directory,
                        follow_symlinks=False)

    def symlink(self, target: bytes, path: bytes) -> None:
        self._require_writable(path)
        if not target:
            raise _error(errno.ENOENT, path)
        if b"\0" in target:
            raise _error(errno.EINVAL, path)
        if len(target) >= PATH_MAX:  # the kernel copies at most PATH_MAX with its NUL
            raise _error(errno.ENAMETOOLONG, path)
        with self.resolver.parent_of(path) as (directory, name):
            os.symlink(target, name, dir_fd=directory)

    def mknod(self, path: bytes, mode: int, device: int) -> None:
        """mknod with exactly ``mode``'s permission bits (the caller applied its
        umask; the agent's own must not narrow them again)."""
        self._require_writable(path)
        if device < 0 or device > 0xFFFFFFFFFFFFFFFF:
            raise _error(errno.EINVAL, path)
        with self.resolver.parent_of(path) as (directory, name):
            os.mknod(name, mode & 0o177777, device, dir_fd=directory)
            wanted = mode & 0o7777
            # Opened without following: a name swapped for a symlink meanwhile
            # is left alone.
            with contextlib.suppress(OSError):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
                try:
                    made = os.fstat(fd)
                    if not stat.S_ISLNK(made.st_mode) and stat.S_IMODE(made.st_mode) != wanted:
                        os.chmod(f"/proc/self/fd/{fd}", wanted)
                finally:
                    os.close(fd)

    def set_xattr(self, path: bytes, name: bytes, value: bytes, flags: int,
                  follow: bool) -> None:
        self._require_writable(path)
        # The kernel's order: flags, name, size, then the path.
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise _error(errno.EINVAL, path)
        _check_xattr_name(name, path)
        if len(value) > XATTR_SIZE_MAX:
            raise _error(errno.E2BIG, path)
        with self._xattr_path(path, follow) as where:
            os.setxattr(where, name, value, flags, follow_symlinks=follow)

    def get_xattr(self, path: bytes, name: bytes, follow: bool) -> bytes:
        _check_xattr_name(name, path)
        with self._xattr_path(path, follow) as where:
            return os.getxattr(where, name, follow_symlinks=follow)

    def list_xattr(self, path: bytes, follow: bool) -> list[bytes]:
        with self._xattr_path(path, follow) as where:
            return [os.fsencode(name) for name in os.listxattr(where, follow_symlinks=follow)]

    def remove_xattr(self, path: bytes, name: bytes, follow: bool) -> None:
        self._require_writable(path)
        _check_xattr_name(name, path)
        with self._xattr_path(path, follow) as where:
            os.removexattr(where, name, follow_symlinks=follow)

    @contextlib.contextmanager
    def _xattr_path(self, path: bytes, follow: bool) -> Iterator[str]:
        """A path naming what ``path`` resolves to under the root, for the
        *xattr calls (they take no directory fd): the magic link of an O_PATH
        fd, or (no follow) the last name under its directory's magic link."""
        if follow:
            with self.resolver.opened(path, _PATH_FLAGS) as fd:
                yield f"/proc/self/fd/{fd}"
            return
        with self.resolver.parent_of(path) as (directory, name):
            yield f"/proc/self/fd/{directory}/{os.fsdecode(name)}"

    def unlink(self, path: bytes, directory: bool) -> None:
        self._require_writable(path)
        with self.resolver.parent_of(path) as (parent, name):
            if directory:
                os.rmdir(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)

    # --- whole-file uploads: the target sees the old file or the new one ---

    def _final_name(self, path: bytes) -> tuple[int, bytes]:
        """The directory fd and name of the regular file ``path`` names,
        following symlinks in the last component (the file is replaced, not
        the link)."""
        for _ in range(MAX_SYMLINKS):
            directory, name = self.resolver.parent(path)
            try:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
                if not stat.S_ISLNK(info.st_mode):
                    if not stat.S_ISREG(info.st_mode):
                        raise _error(errno.EISDIR if stat.S_ISDIR(info.st_mode) else errno.EINVAL,
                                     path)
                    return directory, name
                link = os.readlink(name, dir_fd=directory)
            except BaseException:
                os.close(directory)
                raise
            os.close(directory)
            path = link if link.startswith(b"/") else _split_last(path)[0] + b"/" + link
        raise _error(errno.ELOOP, path)

    def begin_upload(self, path: bytes) -> Upload:
        """A temporary file beside the existing regular file ``path``, to be
        filled and then renamed over it by :meth:`commit_upload`."""
        self._require_writable(path)
        directory, name = self._final_name(path)
        try:
            try:
                fd = os.open(b".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=directory)
                temporary = None
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                temporary = _temporary_name(name)
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=directory)
        except BaseException:
            os.close(directory)
            raise
        return Upload(fd=fd, directory=directory, name=name, temporary=temporary)

    def commit_upload(self, upload: Upload) -> FileStat:
        """Make the upload the file: fsync, the file's current mode and owner,
        a name, rename over, fsync the directory. The upload is gone afterwards
        (also when this fails: then the target keeps its old file)."""
        self._require_writable()
        try:
            os.fsync(upload.fd)
            try:
                current = os.stat(upload.name, dir_fd=upload.directory, follow_symlinks=False)
            except FileNotFoundError:
                current = None  # removed meanwhile: the upload recreates it, as a local rename would
            if current is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(upload.fd, current.st_uid, current.st_gid)
                # After the chown (which drops security.capability), before the
                # chmod (which keeps an ACL's mask in step with the mode).
                _copy_xattrs(f"/proc/self/fd/{upload.directory}/{os.fsdecode(upload.name)}",
                             upload.fd)
                os.fchmod(upload.fd, stat.S_IMODE(current.st_mode))
            if upload.temporary is None:
                temporary = _temporary_name(upload.name)
                os.link(f"/proc/self/fd/{upload.fd}", temporary, dst_dir_fd=upload.directory,
                        follow_symlinks=True)
                upload.temporary = temporary
            os.rename(upload.temporary, upload.name, src_dir_fd=upload.directory,
                      dst_dir_fd=upload.directory)
            upload.temporary = None
            with contextlib.suppress(OSError):
                directory = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                    dir_fd=upload.directory)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            return file_stat(os.fstat(upload.fd))
        finally:
            upload.discard()

    def rename(self, source: bytes, destination: bytes) -> None:
        self._require_writable(source)
        with (
            self.resolver.parent_of(source) as (source_dir, source_name),
            self.resolver.parent_of(destination) as (destination_dir, destination_name),
        ):
            os.rename(
                source_name,
                destination_name,
                src_dir_fd=source_dir,
                dst_dir_fd=destination_dir,
            )


class Upload(msgspec.Struct):
    """A whole-file replacement in progress (see :meth:`FileService.begin_upload`).

    ``fd`` is an unnamed file (``O_TMPFILE``) in the directory ``directory``
    (an ``O_PATH`` fd) that holds ``name``; on filesystems without
    ``O_TMPFILE`` it is named ``temporary`` (a hidden random name) from the start.
    """

    fd: int
    directory: int
    name: bytes
    temporary: bytes | None

    def discard(self) -> None:
        """Forget the upload: the target keeps its file as it was."""
        if self.temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temporary, dir_fd=self.directory)
            self.temporary = None
        if self.directory >= 0:
            os.close(self.directory)
            self.directory = -1


def _copy_xattrs(source: str, fd: int) -> None:
    """The extended attributes of ``source`` (not followed) onto ``fd``, so a
    replaced file keeps its ACLs, labels and user attributes. Each one the
    agent may not set (a security.* name without the privilege) is left out."""
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError:
        return  # a filesystem without xattrs: nothing to keep
    for name in names:
        with contextlib.suppress(OSError):
            os.setxattr(fd, name, os.getxattr(source, name, follow_symlinks=False))


def _temporary_name(name: bytes) -> bytes:
    return b".%s.mtrace-%s" % (name[:200], secrets.token_hex(6).encode())


class HandleTable:
    """A client's open files: handle numbers to fds.

    An fd is closed only once no operation is using it, so a Close racing a
    Read in a worker thread can never make the read hit a recycled fd.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._fds: dict[int, int] = {}
        self._busy: dict[int, int] = {}
        self._closing: set[int] = set()
        self._next = 1
        self._lock = threading.Lock()
        self._closed = False

    def add(self, fd: int) -> int:
        with self._lock:
            if self._closed:
                os.close(fd)
                raise _error(errno.EBADF)
            if len(self._fds) >= self._limit:
                os.close(fd)
                raise _error(errno.EMFILE)
            handle = self._next
            self._next += 1
            self._fds[handle] = fd
            self._busy[handle] = 0
            return handle

    @contextlib.contextmanager
    def use(self, handle: int) -> Iterator[int]:
        with self._lock:
            if handle not in self._fds or handle in self._closing:
                raise _error(errno.EBADF)
            self._busy[handle] += 1
            fd = self._fds[handle]
        try:
            yield fd
        finally:
            with self._lock:
                self._busy[handle] -= 1
                if handle in self._closing and not self._busy[handle]:
                    self._forget(handle)

    def close(self, handle: int) -> None:
        with self._lock:
            if handle not in self._fds or handle in self._closing:
                raise _error(errno.EBADF)
            self._closing.add(handle)
            if not self._busy[handle]:
                self._forget(handle)

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            for handle in list(self._fds):
                self._closing.add(handle)
                if not self._busy[handle]:
                    self._forget(handle)

    def __len__(self) -> int:
        return len(self._fds)

    def _forget(self, handle: int) -> None:
        fd = self._fds.pop(handle)
        del self._busy[handle]
        self._closing.discard(handle)
        os.close(fd)
