"""The files feature: the tracee sees the target's files.

Every path a trapped call names is made absolute (against the tracee's cwd,
its virtual cwd, or the dirfd; a dirfd or cwd inside the shadow tree stands for
the remote directory it mirrors) and routed by :class:`PathPolicy`:

``LOCAL``
    the kernel runs the call (``CONTINUE``). Where the kernel would resolve a
    relative path differently from mtrace (the process has a virtual cwd, or
    the dirfd is a shadow directory) the supervisor makes the call itself on
    the absolute path and hands back the result.
``READ`` (mode ``read``, the ``read_only`` list)
    reads come from the target: opens get an fd of a shadow copy
    (``mtrace.tracer.features.shadow``), the stat family writes the target's metadata
    into the caller's buffer, readlink/access ask the target. An open that
    writes or creates goes local, and the path stays local for the session
    while it exists locally (a program that writes a file reads it back).
    unlink/rmdir/rename/truncate/mkdir act locally when their object (for
    mkdir: its parent) exists locally; when it exists only in the target they
    fail with ``EROFS``, so read mode never changes the target *and* never
    turns "delete the target's file" into "delete this machine's file".
    chmod, chown, utimensat (and their older forms), link, symlink, mknod and
    setxattr/removexattr by path follow the same rule.
``WRITE`` (mode ``write``, the ``read_write`` list)
    as READ, plus: an open for writing is made in the target first (so
    ``O_CREAT``/``O_EXCL``/``O_TRUNC`` and ``EACCES``/``EISDIR`` are the
    target's), the shadow copy is fetched (unless new or truncated) and
    injected writable, and its changes are uploaded when the tracee closes
    or fsyncs an fd of it, when a process exits (``exit_group``), and by a
    sweep every second. unlink/rmdir/rename/truncate/mkdir/chmod/chown/
    utimensat, link/symlink/mknod and setxattr/removexattr (by path, and the
    f* forms on a copy's fd) go to the target; an agent without the
    operation (``files-links``, ``files-xattr``, ...) answers ``EPERM``
    (``ENOTSUP`` for extended attributes). A link of a file being written
    uploads it first (the new name has what was written so far); a rename
    or unlink of a name stops the uploads of copies opened under it before.
    An upload replaces the target's file atomically (the agent's
    ``files-upload``); one that fails makes that close/fsync fail with EIO.
    Limits: a file changed in the target while the tracee has it open for
    writing is overwritten by the tracee's copy; writes through a shared
    mmap reach the target on the next close/fsync/exit/sweep. The agent must
    run with ``--write`` (else the target answers ``EROFS``).
``NOT_FOUND``
    ``ENOENT``.

Order (first match wins): the session directory (always local); the user's
``not_found``, ``local``, ``read_only``, ``read_write`` lists; the DNS files
(``/etc/resolv.conf``, ``/etc/hosts``, ``/etc/nsswitch.conf``,
``/etc/hostname``: read from the target whenever DNS is enabled (and
``/etc/hostname`` whenever ``feature.hostname`` is), in every
mode); the default local list (``default_local``); the mode. ``local`` mode
ignores ``read_only``/``read_write``; ``localwithoverrides`` honours them.

The **default local list** (``DEFAULT_LOCAL`` plus the session's own paths):
the program itself (``context.executable``); loader and libraries (``/lib*``,
``/usr`` (libraries, /usr/share data, interpreters), ``/etc/ld.so.*``, any
``*.so``/``*.so.N``); ``/opt``, ``/nix``, ``/snap``, ``/gnu`` (locally
installed software); ``/bin``, ``/sbin``; kernel interfaces ``/proc``,
``/sys``, ``/dev``, ``/run/user``; temporary directories ``/tmp``,
``/var/tmp``; the session directory; the user's ``$HOME`` (not ``/``) and the
directory mtrace was started in when it lies inside ``$HOME`` (the local
project: sources, configs, virtualenvs).

**chdir**: the kernel cannot enter a directory that exists only in the
target, so ``chdir`` into a remote directory is answered by the supervisor
(after the target confirms it is a directory) and remembered as the
process's *virtual cwd*: later relative paths resolve against it, ``getcwd``
and ``readlink /proc/self/cwd`` report it, ``fchdir`` and a chdir to an
absolute local path end it. A process started by one with a virtual cwd
inherits it (found by walking parent pids). Calls mtrace does not trap (e.g.
``execve("./x")``, ``chmod("x")``) still resolve against the kernel's cwd.
The virtual cwd is the lexically normalised path (``..`` is not resolved
through symlinks).

Every remote call runs on the async side (``Defer``); the trap loop never
waits on the agent. A lost agent makes remote file calls fail with ``EIO``
and sets ``context.agent_lost``; a remote call taking longer than
``REMOTE_TIMEOUT`` fails with ``EIO``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from ...agent.errors import AgentError, AgentUnavailable, RemoteError
from ...agent.protocol import (
    CAP_FILES_CHMOD,
    CAP_FILES_CHOWN,
    CAP_FILES_LINKS,
    CAP_FILES_STATFS,
    CAP_FILES_TIMES,
    CAP_FILES_XATTR,
    CAP_FILES_XATTR_READ,
    XATTR_CREATE,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    FileContents,
    FileStat,
    FsStat,
    TimeSpec,
)
from .. import abi, seccomp
from ..backend import Handler
from ..call import AT_FDCWD, SyscallCall
from ..outcome import CONTINUE, Continue, Defer, Errno, InjectFd, Outcome, ReturnValue
from .policy import FsConfig, compile_pattern, python_replacement
from .remote import RemoteContext
from .shadow import WHOLE_FILE_LIMIT, Node, ShadowTree, normalize

log = logging.getLogger("mtrace.tracer.features.files")

#: What the files feature needs trapped in every mode.
TRAPPED: tuple[str, ...] = (
    "open", "openat", "creat",
    "stat", "lstat", "fstat", "newfstatat", "statx",
    # The target's filesystem for its paths and its files' fds (df, free-space checks).
    "statfs", "fstatfs",
    "access", "faccessat", "faccessat2",
    "readlink", "readlinkat",
    "chdir", "fchdir", "getcwd",
    "truncate",
    "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir",
    "rename", "renameat", "renameat2",
    # Extended attributes: `ls -l` asks for SELinux labels and ACLs of every
    # entry; for a target-only path the kernel would say ENOENT.
    "getxattr", "lgetxattr", "listxattr", "llistxattr",
    # Metadata and links by path: routed like unlink (below, "_change"), so they
    # never act on a local file in place of the target's.
    "chmod", "fchmodat", "fchmodat2", "chown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat",
    "link", "linkat", "symlink", "symlinkat", "mknod", "mknodat",
    "setxattr", "lsetxattr", "removexattr", "lremovexattr",
    # Their fd forms on a target file's copy (cp -p, install -m): the target's file.
    "fchmod", "fchown", "fsetxattr", "fremovexattr",
    # A watch of a target path would watch this machine's path of that name.
    "inotify_add_watch", "fanotify_mark",
    # Write mode uploads changed copies when a process exits (once per process).
    "exit_group",
)
#: Also trapped when something can be written to the target: more moments a
#: written shadow copy is uploaded. Trapping close costs every close a round
#: trip to the supervisor, so sessions that cannot write leave them out; without
#: them, uploads happen at exit_group and every ``SWEEP_INTERVAL``.
WRITE_BACK_TRAPPED: tuple[str, ...] = ("close", "fsync", "fdatasync")

#: Paths kept local by default (regular expressions, ``re.search`` on the path).
DEFAULT_LOCAL: tuple[str, ...] = (
    r"^/(lib|lib32|lib64|libx32|usr|bin|sbin|opt|nix|snap|gnu)(/|$)",
    r"^/etc/ld\.so\.",
    r"\.so(\.[0-9]+)*$",
    r"^/(proc|sys|dev)(/|$)",
    r"^/run/user(/|$)",
    r"^/(tmp|var/tmp)(/|$)",
)
#: The files name resolution reads: the target's whenever DNS is enabled.
DNS_FILES: tuple[str, ...] = (
    r"^/etc/(resolv\.conf|hosts|nsswitch\.conf|hostname)$",
)
#: feature.hostname: remote in every mode, with or without DNS.
HOSTNAME_FILE = r"^/etc/hostname$"

#: A remote file call taking longer than this fails with EIO (never a hang).
REMOTE_TIMEOUT = 60.0
#: How long a remote stat answer is reused.
STAT_TTL = 1.0
#: Write mode: how often changed shadow copies are uploaded without a close.
SWEEP_INTERVAL = 1.0

_WRITE_INTENT = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_REMOTE_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_DIRECTORY
    | os.O_NOFOLLOW
)
_LOCAL_WRITE_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
_RENAME_NOREPLACE = 1
_AT_SYMLINK_FOLLOW = 0x400
#: fanotify_mark flags: FAN_MARK_FLUSH empties a group and names no path.
_FAN_MARK_FLUSH = 0x80
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
#: What link, symlink, mknod, chmod, chown and utimensat of a target path
#: answer in write mode when the agent lacks the operation (an older agent
#: without ``files-links``, ``files-chmod``, ``files-chown``, ``files-times``):
#: "Operation not permitted", as a filesystem that does not allow the change says.
NOT_IN_TARGET = errno.EPERM
#: Target errors a failed upload passes on to close/fsync as they are; others are EIO.
_WRITE_BACK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _id_arg(call: SyscallCall, index: int) -> int:
    """A uid_t/gid_t argument: ``(uid_t)-1`` ("leave it") as -1, as os.chown takes it."""
    value = call.uint_arg(index) & 0xFFFFFFFF
    return -1 if value == 0xFFFFFFFF else value


class Route(enum.Enum):
    LOCAL = "local"
    READ = "read"
    WRITE = "write"
    NOT_FOUND = "not_found"


def trapped_for(config: FsConfig) -> tuple[str, ...]:
    """The calls to trap for this config: ``TRAPPED``, plus the write-back
    moments when anything may be written to the target."""
    if config.mode == "write" or (config.read_write and config.mode != "local"):
        return TRAPPED + WRITE_BACK_TRAPPED
    return TRAPPED


# --- policy ------------------------------------------------------------------


def _compile(patterns: list[str] | tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))


class PathPolicy:
    """Which side serves a path (see the module docstring for the order)."""

    def __init__(
        self,
        config: FsConfig,
        *,
        session_dir: str | os.PathLike[str] | None = None,
        executable: str | None = None,
        dns_remote: bool = True,
        hostname_remote: bool = False,
        home: str | None = None,
        start_directory: str | None = None,
    ) -> None:
        self.mode = config.mode
        self._not_found = _compile(config.not_found)
        self._local = _compile(config.local)
        use_lists = config.mode != "local"
        self._read_only = _compile(config.read_only) if use_lists else None
        self._read_write = _compile(config.read_write) if use_lists else None
        self._dns = _compile([*(DNS_FILES if dns_remote else ()),
                              *((HOSTNAME_FILE,) if hostname_remote else ())])
        self._always_local: list[str] = []
        if session_dir is not None:
            self._always_local.append(os.fsdecode(normalize(os.fsencode(session_dir))))
        # The built-in list is compiled on its own: the same pattern at every
        # run, so re's cache has it (the resident mtrace compiles it once, 3-4
        # ms); this run's program, home and start directory are a small one.
        this_run: list[str] = []
        if config.default_local:
            for program in {executable, os.path.realpath(executable) if executable else None}:
                if program:
                    this_run.append("^" + re.escape(program) + "$")
            home = home.rstrip("/") if home else None
            if home:
                this_run.append("^" + re.escape(home) + "(/|$)")
                if start_directory and start_directory.startswith(home + "/"):
                    this_run.append("^" + re.escape(start_directory.rstrip("/")) + "(/|$)")
        self._default_local = _compile(DEFAULT_LOCAL) if config.default_local else None
        self._this_run_local = _compile(this_run)

    def route(self, path: bytes) -> Route:
        text = os.fsdecode(path)
        for directory in self._always_local:
            if text == directory or text.startswith(directory + "/"):
                return Route.LOCAL
        if self._not_found is not None and self._not_found.search(text):
            return Route.NOT_FOUND
        if self._local is not None and self._local.search(text):
            return Route.LOCAL
        if self._read_only is not None and self._read_only.search(text):
            return Route.READ
        if self._read_write is not None and self._read_write.search(text):
            return Route.WRITE
        if self._dns is not None and self._dns.search(text):
            return Route.READ
        if self._default_local is not None and self._default_local.search(text):
            return Route.LOCAL
        if self._this_run_local is not None and self._this_run_local.search(text):
            return Route.LOCAL
        if self.mode == "read":
            return Route.READ
        if self.mode == "write":
            return Route.WRITE
        return Route.LOCAL


# --- processes: tgid, start time, parent, virtual cwd ------------------------------


def _process_of(tid: int) -> tuple[int, int, int]:
    """(tgid, start time, parent pid) of the thread ``tid``'s process."""
    tgid = tid
    with open(f"/proc/{tid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"Tgid:"):
                tgid = int(line.split()[1])
                break
    with open(f"/proc/{tgid}/stat", "rb") as stat_file:
        fields = stat_file.read().rpartition(b")")[2].split()
    # After the command: state(0) ppid(1) ... starttime is field 22 of the line (index 19).
    return tgid, int(fields[19]), int(fields[1])


class WorkingDirectories:
    """Virtual cwds by process (tgid + start time, so a reused pid starts clean)."""

    def __init__(self) -> None:
        self._by_process: dict[int, tuple[int, bytes | None]] = {}
        self.active = False

    def get(self, tid: int) -> bytes | None:
        if not self.active:
            return None
        own, directory = self._nearest(tid)
        if own is not None:
            tgid, started = own
            self._by_process[tgid] = (started, directory)
        return directory

    def _nearest(self, pid: int) -> tuple[tuple[int, int] | None, bytes | None]:
        """``pid``'s (tgid, start time), and the directory recorded for it or,
        failing that, for its nearest recorded ancestor (children inherit)."""
        own: tuple[int, int] | None = None
        for _ in range(64):
            if pid <= 1:
                break
            try:
                tgid, started, parent = _process_of(pid)
            except (OSError, ValueError, IndexError):
                break
            if own is None:
                own = (tgid, started)
            entry = self._by_process.get(tgid)
            if entry is not None and entry[0] == started:
                return own, entry[1]
            pid = parent
        return own, None

    def set(self, tid: int, directory: bytes | None) -> None:
        try:
            tgid, started, _ = _process_of(tid)
        except (OSError, ValueError, IndexError):
            return
        if directory is not None:
            self.active = True
        if self.active:
            self._by_process[tgid] = (started, directory)


# --- resolved paths ------------------------------------------------------------


class Target(msgspec.Struct, frozen=True):
    """A path a tracee named, made absolute."""

    # Absolute, as the tracee wrote it after the base (the agent resolves
    # symlinks and ``..`` itself, as the target would).
    path: bytes
    # Lexically normalised: what the policy and the shadow tree use.
    clean: bytes
    # CONTINUE would make the kernel resolve the same path.
    kernel_agrees: bool


def _writes(flags: int) -> bool:
    return bool(flags & _WRITE_INTENT) or (flags & abi.O_TMPFILE) == abi.O_TMPFILE


def _change_mode(path: bytes, mode: int, follow: bool) -> None:
    """chmod of a local path, not following a final symlink unless ``follow``
    (a symlink: EOPNOTSUPP, as fchmodat2 says; Python's os.chmod would raise
    NotImplementedError there)."""
    if not follow and stat.S_ISLNK(os.lstat(path).st_mode):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    os.chmod(path, mode, follow_symlinks=True)


def _thread_umask(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _local_stat(result: os.stat_result) -> FileStat:
    return FileStat(
        mode=result.st_mode, ino=result.st_ino, dev=result.st_dev, nlink=result.st_nlink,
        uid=result.st_uid, gid=result.st_gid, size=result.st_size,
        atime_ns=result.st_atime_ns, mtime_ns=result.st_mtime_ns, ctime_ns=result.st_ctime_ns,
        blksize=result.st_blksize, blocks=result.st_blocks, rdev=result.st_rdev,
    )


_PROC_LINK = re.compile(rb"^/proc/(self|thread-self|[0-9]+)(/task/[0-9]+)?/(cwd|fd/[0-9]+)$")


class FilesFeature:
    """The state of the files feature for one session, and its handlers."""

    def __init__(self, context: RemoteContext, policy: PathPolicy | None = None) -> None:
        self.context = context
        self.config = context.features.fs
        self.policy = policy or PathPolicy(
            self.config,
            session_dir=context.session_dir,
            executable=context.executable,
            dns_remote=context.features.network.dns.enabled,
            hostname_remote=context.features.hostname,
            home=os.environ.get("HOME"),
            start_directory=os.getcwd(),
        )
        self.shadow = ShadowTree(os.fsencode(context.session_dir / "shadow"))
        self._mapping = [(compile_pattern(pattern), python_replacement(replacement))
                         for pattern, replacement in self.config.mapping.items()]
        self.cwds = WorkingDirectories()
        # Read mode: paths the tracee opened for writing (locally).
        self._written_locally: set[bytes] = set()
        self._stats: dict[tuple[bytes, bool], tuple[float, FileStat]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # First opens in flight, by path: concurrent ones share one read.
        self._first_reads: dict[bytes, asyncio.Future[tuple[FileStat, FileContents | None]]] = {}
        self._sweeper: Any = None
        # The C trap loop answers what _open_cached and _fd_stat would answer
        # from here, once registered (see _register_fast_open).
        self._fast = seccomp.fast_answers()
        if self._fast is not None:
            self._fast.reset(self.shadow.root)
        self._watch_warned: set[str] = set()

    # --- the handler table -------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        table: dict[str, Handler] = {
            "open": lambda call: self._open(call, AT_FDCWD, call.read_string(0),
                                            call.int_arg(1), call.uint_arg(2)),
            "openat": lambda call: self._open(call, call.int_arg(0), call.read_string(1),
                                              call.int_arg(2), call.uint_arg(3)),
            "creat": lambda call: self._open(call, AT_FDCWD, call.read_string(0),
                                             os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
                                             call.uint_arg(1)),
            "stat": lambda call: self._stat(call, AT_FDCWD, call.read_string(0), 0,
                                            call.pointer_arg(1)),
            "lstat": lambda call: self._stat(call, AT_FDCWD, call.read_string(0),
                                             abi.AT_SYMLINK_NOFOLLOW, call.pointer_arg(1)),
            "fstat": lambda call: self._fd_stat(call, call.int_arg(0), call.pointer_arg(1)),
            "newfstatat": lambda call: self._stat(call, call.int_arg(0), call.read_string(1),
                                                  call.int_arg(3), call.pointer_arg(2)),
            "statx": lambda call: self._stat(call, call.int_arg(0), call.read_string(1),
                                             call.int_arg(2), call.pointer_arg(4),
                                             statx_mask=call.uint_arg(3)),
            "statfs": lambda call: self._statfs(call, call.read_string(0), call.pointer_arg(1)),
            "fstatfs": lambda call: self._fd_statfs(call, call.int_arg(0), call.pointer_arg(1)),
            "access": lambda call: self._access(call, AT_FDCWD, call.read_string(0),
                                                call.int_arg(1), 0),
            "faccessat": lambda call: self._access(call, call.int_arg(0), call.read_string(1),
                                                   call.int_arg(2), 0),
            "faccessat2": lambda call: self._access(call, call.int_arg(0), call.read_string(1),
                                                    call.int_arg(2), call.int_arg(3)),
            "readlink": lambda call: self._readlink(call, AT_FDCWD, call.read_string(0),
                                                    call.pointer_arg(1), call.int_arg(2)),
            "readlinkat": lambda call: self._readlink(call, call.int_arg(0),
                                                      call.read_string(1),
                                                      call.pointer_arg(2), call.int_arg(3)),
            "chdir": lambda call: self._chdir(call, call.read_string(0)),
            "fchdir": self._fchdir,
            "getcwd": lambda call: self._getcwd(call, call.pointer_arg(0), call.uint_arg(1)),
            "truncate": lambda call: self._truncate(call, call.read_string(0),
                                                    call.long_arg(1)),
            "mkdir": lambda call: self._mkdir(call, AT_FDCWD, call.read_string(0),
                                              call.uint_arg(1)),
            "mkdirat": lambda call: self._mkdir(call, call.int_arg(0), call.read_string(1),
                                                call.uint_arg(2)),
            "unlink": lambda call: self._unlink(call, AT_FDCWD, call.read_string(0), 0),
            "rmdir": lambda call: self._unlink(call, AT_FDCWD, call.read_string(0),
                                               abi.AT_REMOVEDIR),
            "unlinkat": lambda call: self._unlink(call, call.int_arg(0), call.read_string(1),
                                                  call.int_arg(2)),
            "rename": lambda call: self._rename(call, AT_FDCWD, call.read_string(0),
                                                AT_FDCWD, call.read_string(1), 0),
            "renameat": lambda call: self._rename(call, call.int_arg(0), call.read_string(1),
                                                  call.int_arg(2), call.read_string(3), 0),
            "renameat2": lambda call: self._rename(call, call.int_arg(0), call.read_string(1),
                                                   call.int_arg(2), call.read_string(3),
                                                   call.uint_arg(4)),
            "getxattr": lambda call: self._xattr(call, call.read_string(0),
                                                 call.read_string(1), call.pointer_arg(2),
                                                 call.uint_arg(3), follow=True),
            "lgetxattr": lambda call: self._xattr(call, call.read_string(0),
                                                  call.read_string(1), call.pointer_arg(2),
                                                  call.uint_arg(3), follow=False),
            "listxattr": lambda call: self._xattr(call, call.read_string(0), None,
                                                  call.pointer_arg(1), call.uint_arg(2),
                                                  follow=True),
            "llistxattr": lambda call: self._xattr(call, call.read_string(0), None,
                                                   call.pointer_arg(1), call.uint_arg(2),
                                                   follow=False),
            "chmod": lambda call: self._metadata(
                call, AT_FDCWD, call.read_string(0), 0,
                lambda path, follow: os.chmod(path, call.uint_arg(1) & 0o7777),
                remote=self._remote_chmod(call.uint_arg(1) & 0o7777)),
            "fchmodat": lambda call: self._metadata(
                call, call.int_arg(0), call.read_string(1), 0,
                lambda path, follow: os.chmod(path, call.uint_arg(2) & 0o7777),
                remote=self._remote_chmod(call.uint_arg(2) & 0o7777)),
            "fchmodat2": self._fchmodat2,
            "fchmod": lambda call: self._fd_metadata(
                call, call.int_arg(0), self._fd_chmod(call.uint_arg(1) & 0o7777)),
            "inotify_add_watch": lambda call: self._watch(call, AT_FDCWD, call.read_string(1),
                                                          "inotify"),
            "fanotify_mark": self._fanotify_mark,
            "fsetxattr": lambda call: self._fd_xattr(call, call.int_arg(0), remove=False),
            "fremovexattr": lambda call: self._fd_xattr(call, call.int_arg(0), remove=True),
            "fchown": lambda call: self._fd_metadata(
                call, call.int_arg(0), self._fd_chown(_id_arg(call, 1), _id_arg(call, 2))),
            "chown": lambda call: self._metadata(
                call, AT_FDCWD, call.read_string(0), 0,
                lambda path, follow: os.chown(path, call.int_arg(1), call.int_arg(2)),
                remote=self._remote_chown(_id_arg(call, 1), _id_arg(call, 2))),
            "lchown": lambda call: self._metadata(
                call, AT_FDCWD, call.read_string(0), abi.AT_SYMLINK_NOFOLLOW,
                lambda path, follow: os.chown(path, call.int_arg(1), call.int_arg(2),
                                              follow_symlinks=False),
                remote=self._remote_chown(_id_arg(call, 1), _id_arg(call, 2))),
            "fchownat": lambda call: self._fchownat(call, call.int_arg(0), call.read_string(1),
                                                    call.int_arg(4)),
            "utime": lambda call: self._times(call, AT_FDCWD, call.read_string(0), 0, 1,
                                              "utimbuf"),
            "utimes": lambda call: self._times(call, AT_FDCWD, call.read_string(0), 0, 1,
                                               "timeval"),
            "futimesat": lambda call: self._times(call, call.int_arg(0),
                                                  self._optional_path(call, 1), 0, 2, "timeval"),
            "utimensat": lambda call: self._times(call, call.int_arg(0),
                                                  self._optional_path(call, 1), call.int_arg(3),
                                                  2, "timespec"),
            "link": lambda call: self._link(call, AT_FDCWD, call.read_string(0), AT_FDCWD,
                                            call.read_string(1), 0),
            "linkat": lambda call: self._link(call, call.int_arg(0), call.read_string(1),
                                              call.int_arg(2), call.read_string(3),
                                              call.int_arg(4)),
            "symlink": lambda call: self._symlink(call, 0, AT_FDCWD, 1),
            "symlinkat": lambda call: self._symlink(call, 0, call.int_arg(1), 2),
            "mknod": lambda call: self._mknod(call, AT_FDCWD, 0),
            "mknodat": lambda call: self._mknod(call, call.int_arg(0), 1),
            "setxattr": lambda call: self._set_xattr(call, 0, follow=True, remove=False),
            "lsetxattr": lambda call: self._set_xattr(call, 0, follow=False, remove=False),
            "removexattr": lambda call: self._set_xattr(call, 0, follow=True, remove=True),
            "lremovexattr": lambda call: self._set_xattr(call, 0, follow=False, remove=True),
            "exit_group": self._exit_group,
        }
        if trapped_for(self.config) != TRAPPED:
            table.update({
                "close": lambda call: self._write_back_fd(call, call.int_arg(0), fsync=False),
                "fsync": lambda call: self._write_back_fd(call, call.int_arg(0), fsync=True),
                "fdatasync": lambda call: self._write_back_fd(call, call.int_arg(0),
                                                              fsync=True),
            })
            self._start_sweeper()
        return table

    # --- resolving and routing -------------------------------------------------

    def _base(self, call: SyscallCall, dirfd: int) -> tuple[bytes, bool] | None:
        """The directory a relative path starts from, and whether the kernel agrees."""
        if dirfd == AT_FDCWD:
            virtual = self.cwds.get(call.tid)
            if virtual is not None:
                return virtual, False
            link = f"/proc/{call.tid}/cwd"
        else:
            link = f"/proc/{call.tid}/fd/{dirfd}"
        try:
            base = os.fsencode(os.readlink(link))
        except OSError:
            return None  # a bad dirfd: the kernel reports it
        if not base.startswith(b"/"):
            return None  # not a directory (a socket, a pipe): ENOTDIR from the kernel
        remote = self.shadow.remote_path(base)
        if remote is not None:
            return remote, False
        return base, True

    def _resolve(self, call: SyscallCall, dirfd: int, path: bytes) -> Target | None:
        if not path:
            return None
        if path.startswith(b"/"):
            return self._mapped(Target(path, normalize(path), True))
        base = self._base(call, dirfd)
        if base is None:
            return None
        directory, agrees = base
        joined = directory.rstrip(b"/") + b"/" + path
        return self._mapped(Target(joined, normalize(joined), agrees))

    def _mapped(self, target: Target) -> Target:
        """``feature.fs.mapping``: the first pattern that matches the absolute
        path rewrites it, before routing (so the new path is routed and served,
        locally or by the target)."""
        if not self._mapping:
            return target
        text = os.fsdecode(target.path)
        for pattern, replacement in self._mapping:
            if pattern.search(text):
                mapped = os.fsencode(pattern.sub(replacement, text, count=1))
                return Target(mapped, normalize(mapped), False)
        return target

    def _route(self, target: Target) -> Route:
        route = self.policy.route(target.clean)
        if (route is Route.READ and target.clean in self._written_locally
                and os.path.lexists(target.clean)):
            return Route.LOCAL
        return route

    def _local(self, target: Target, emulate: Callable[[], Outcome]) -> Outcome:
        """A local call: the kernel's, unless it would resolve another path."""
        if target.kernel_agrees:
            return CONTINUE
        try:
            return emulate()
        except OSError as error:
            return Errno(error.errno or errno.EIO)

    # --- remote calls ------------------------------------------------------------

    def _defer(self, work: Coroutine[Any, Any, Outcome]) -> Outcome:
        if self.context.agent_lost:
            work.close()
            return Errno(errno.EIO)
        return Defer(self._guarded(work))

    async def _guarded(self, work: Coroutine[Any, Any, Outcome]) -> Outcome:
        try:
            async with asyncio.timeout(REMOTE_TIMEOUT):
                return await work
        except RemoteError as error:
            return Errno(error.errno or errno.EIO)
        except AgentUnavailable:
            self.context.agent_lost = True
            return Errno(errno.EIO)
        except AgentError as error:
            log.warning("file call failed: %s", error)
            if self.context.client.closed:
                self.context.agent_lost = True
            return Errno(errno.EIO)
        except TimeoutError:
            log.warning("a remote file call took longer than %gs", REMOTE_TIMEOUT)
            return Errno(errno.EIO)
        except OSError as error:  # the shadow tree (disk full, ...)
            return Errno(error.errno or errno.EIO)

    async def _remote_stat(self, path: bytes, follow: bool) -> FileStat:
        key = (path, follow)
        cached = self._stats.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < STAT_TTL:
            return cached[1]
        info = await self.context.client.stat(path, follow_symlinks=follow)
        self._set_stat(key, now, info)
        return info

    def _stat_is_fresh(self, path: bytes, follow: bool) -> bool:
        cached = self._stats.get((path, follow))
        return cached is not None and time.monotonic() - cached[0] < STAT_TTL

    async def _first_read(self, path: bytes) -> tuple[FileStat, FileContents | None]:
        """A file's first open: the whole file and its stat in one round trip
        (the agent's read-file) instead of a stat, then a read. Where that gives
        no answer (a directory, a file above ``WHOLE_FILE_LIMIT``, errors the
        stat might not share), the stat is asked for on its own. The contents
        are None unless the path is a regular file. Concurrent first opens of
        one path share the read."""
        pending = self._first_reads.get(path)
        if pending is None:
            pending = asyncio.ensure_future(self._read_whole(path))
            self._first_reads[path] = pending
            pending.add_done_callback(lambda _: self._first_reads.pop(path, None))
        return await asyncio.shield(pending)

    async def _read_whole(self, path: bytes) -> tuple[FileStat, FileContents | None]:
        asked = time.monotonic()
        try:
            contents = await self.context.client.read_file(path, limit=WHOLE_FILE_LIMIT)
        except RemoteError as error:
            # The open fails as the stat and read would have (EACCES: the read).
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
                raise
            return await self._remote_stat(path, True), None
        self._set_stat((path, True), asked, contents.stat)
        return contents.stat, contents if stat.S_ISREG(contents.stat.mode) else None

    def _set_stat(self, key: tuple[bytes, bool], asked: float, info: FileStat) -> None:
        if self._fast is not None:
            self._fast.drop_open(key[0])  # re-registered by the next open seeing it current
        self._stats[key] = (asked, info)

    def _changed(self) -> None:
        """The target changed (write mode): cached stats may be stale."""
        self._stats.clear()
        if self._fast is not None:
            self._fast.reset(self.shadow.root)

    def _remember(self, fd: int, remote_path: bytes, info: FileStat) -> Node:
        """shadow.remember, and the C loop's fstat answer for that inode; ``fd``
        (about to be injected) is closed if that fails."""
        try:
            node = self.shadow.remember(fd, remote_path, info)
            if self._fast is not None:
                local = os.fstat(fd)
                self._fast.node(local.st_dev, local.st_ino, info.size, abi.pack_stat(info))
        except BaseException:
            os.close(fd)
            raise
        return node

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_quietly(self, handle: int) -> None:
        with contextlib.suppress(OSError, AgentError):
            await self.context.client.close_file(handle)

    # --- open --------------------------------------------------------------------

    def _open(self, call: SyscallCall, dirfd: int, path: bytes, flags: int, mode: int) -> Outcome:
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        writing = _writes(flags)
        cloexec = bool(flags & os.O_CLOEXEC)
        if route is Route.LOCAL or (route is Route.READ and writing):
            if route is Route.READ:
                self._written_locally.add(target.clean)
                if self._fast is not None:
                    self._fast.drop_open(target.clean)
            return self._local(target, lambda: self._local_open(call.tid, target, flags, mode))
        if flags & abi.O_TMPFILE == abi.O_TMPFILE:
            return Errno(errno.EOPNOTSUPP)
        if writing:
            umask = _thread_umask(call.tid)
            return self._defer(self._open_for_writing(target, flags, mode & ~umask, cloexec))
        cached = self._open_cached(target, flags, cloexec, path)
        if cached is not None:
            return cached
        return self._defer(self._open_for_reading(target, flags, cloexec))

    def _open_cached(self, target: Target, flags: int, cloexec: bool,
                     tracee_path: bytes) -> Outcome | None:
        """A regular file whose stat is fresh and whose copy is up to date is
        opened from the trap loop, without the hop to the async side and back
        (a resolver reading /etc/hosts per lookup); None: the async path."""
        if self.context.agent_lost:
            if self._fast is not None:
                self._fast.reset(None)
            return None
        if flags & os.O_DIRECTORY:
            return None
        cached = self._stats.get((target.path, not flags & os.O_NOFOLLOW))
        if cached is None or time.monotonic() - cached[0] >= STAT_TTL:
            return None
        info = cached[1]
        if not stat.S_ISREG(info.mode):
            return None
        local = self.shadow.cached_file(target.path, info)
        if local is None:
            return None
        try:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | (flags & os.O_NONBLOCK))
        except OSError:
            return None
        self._remember(fd, target.path, info)
        if (self._fast is not None and tracee_path == target.path == target.clean
                and not flags & os.O_NOFOLLOW):
            # The next opens of this path until the stat goes stale are the
            # same answer: the C loop gives it (a fresh open of the copy).
            self._fast.open(target.path, local, cached[0] + STAT_TTL)
        return InjectFd(fd, cloexec=cloexec)

    def _local_open(self, tid: int, target: Target, flags: int, mode: int) -> Outcome:
        if flags & os.O_CREAT or (flags & abi.O_TMPFILE) == abi.O_TMPFILE:
            mode &= ~_thread_umask(tid)
        if flags & abi.O_PATH:  # not injectable: see _open_for_reading
            flags = (flags & ~(abi.O_PATH | os.O_ACCMODE)) | os.O_RDONLY
        fd = os.open(target.path, flags | os.O_CLOEXEC, mode)
        return InjectFd(fd, cloexec=bool(flags & os.O_CLOEXEC))

    async def _open_for_reading(self, target: Target, flags: int, cloexec: bool) -> Outcome:
        client = self.context.client
        follow = not flags & os.O_NOFOLLOW
        contents = None
        if (follow and not flags & os.O_DIRECTORY and not self._stat_is_fresh(target.path, follow)
                and self.shadow.never_fetched(target.path)):
            info, contents = await self._first_read(target.path)
        else:
            info = await self._remote_stat(target.path, follow)
        if stat.S_ISLNK(info.mode):
            if not flags & abi.O_PATH:
                return Errno(errno.ELOOP)
            # O_PATH|O_NOFOLLOW names the link itself (glibc's and musl's
            # fchmodat(AT_SYMLINK_NOFOLLOW), which tar calls for every symlink,
            # then fstat it and answer EOPNOTSUPP for a link). A symlink's fd
            # cannot be injected: a stand-in whose fstat is the link's.
            fd = self.shadow.stand_in(target.path)
            self._remember(fd, target.path, info)
            return InjectFd(fd, cloexec=cloexec)
        if flags & os.O_DIRECTORY and not stat.S_ISDIR(info.mode):
            return Errno(errno.ENOTDIR)
        if stat.S_ISSOCK(info.mode):
            return Errno(errno.ENXIO)
        # O_PATH fds cannot be injected (SECCOMP_IOCTL_NOTIF_ADDFD's fget skips
        # them): an O_PATH open gets a plain read-only fd of the copy instead.
        extra = flags & os.O_NONBLOCK
        if stat.S_ISDIR(info.mode):
            local = await self.shadow.directory(client, target.path)
            fd = os.open(local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | extra)
        else:
            local = await self.shadow.file(client, target.path, info, contents)
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | extra)
        self._remember(fd, target.path, info)
        return InjectFd(fd, cloexec=cloexec)

    async def _open_for_writing(self, target: Target, flags: int, mode: int,
                                cloexec: bool) -> Outcome:
        client = self.context.client
        opened = await client.open(target.path, flags & _REMOTE_OPEN_FLAGS, mode)
        self._in_background(self._close_quietly(opened.handle))
        self._changed()
        info = opened.stat
        if stat.S_ISDIR(info.mode):
            return Errno(errno.EISDIR)
        if flags & os.O_TRUNC or (info.size == 0 and not self.shadow.is_pinned(target.path)):
            local = self.shadow.empty_file(target.path, info, truncate=True)
            self.shadow.invalidate_listing(normalize(target.path + b"/.."))
        else:
            local = await self.shadow.file(client, target.path, info)
        fd = os.open(local, (flags & _LOCAL_WRITE_FLAGS) | os.O_CLOEXEC | os.O_NOFOLLOW)
        node = self._remember(fd, target.path, info)
        try:
            self.shadow.track(node, fd)
        except BaseException:
            os.close(fd)
            raise
        return InjectFd(fd, cloexec=cloexec)

    # --- the stat family -------------------------------------------------------------

    def _stat(self, call: SyscallCall, dirfd: int, path: bytes, flags: int, buffer: int,
              *, statx_mask: int | None = None) -> Outcome:
        def pack(info: FileStat) -> bytes:
            if statx_mask is not None:
                return abi.pack_statx(info)
            return abi.pack_stat(info)

        if not path and flags & abi.AT_EMPTY_PATH:
            if dirfd != AT_FDCWD:
                return self._fd_stat(call, dirfd, buffer, pack)
            path = b"."
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        follow = not flags & abi.AT_SYMLINK_NOFOLLOW
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        if route is Route.LOCAL:
            return self._local(target, lambda: ReturnValue(0, writes=(
                (buffer, pack(_local_stat(os.stat(target.path, follow_symlinks=follow)))),)))

        async def remote() -> Outcome:
            info = await self._remote_stat(target.path, follow)
            return ReturnValue(0, writes=((buffer, pack(info)),))

        return self._defer(remote())

    def _node_of_fd(self, tid: int, fd: int) -> tuple[Node, os.stat_result] | None:
        """The shadow inode behind the tracee's ``fd``, if it is one."""
        if fd < 0:
            return None
        try:
            local = os.stat(f"/proc/{tid}/fd/{fd}")
        except OSError:
            return None
        node = self.shadow.node_of(local.st_dev, local.st_ino)
        if node is None:
            return None
        try:
            link = os.fsencode(os.readlink(f"/proc/{tid}/fd/{fd}"))
        except OSError:
            return None
        if self.shadow.remote_path(link) is None:
            return None  # an inode number reused outside the tree
        return node, local

    def _fd_stat(self, call: SyscallCall, fd: int, buffer: int,
                 pack: Callable[[FileStat], bytes] = abi.pack_stat) -> Outcome:
        found = self._node_of_fd(call.tid, fd)
        if found is None:
            return CONTINUE
        node, local = found
        info = node.stat
        if stat.S_ISREG(info.mode) and local.st_size != info.size:
            # Written here (write mode): the size the tracee's own writes made.
            info = msgspec.structs.replace(
                info, size=local.st_size, blocks=local.st_blocks, mtime_ns=local.st_mtime_ns)
        return ReturnValue(0, writes=((buffer, pack(info)),))

    # --- statfs, fstatfs ------------------------------------------------------------

    def _statfs(self, call: SyscallCall, path: bytes, buffer: int) -> Outcome:
        target = self._resolve(call, AT_FDCWD, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        if route is Route.LOCAL:
            def emulate() -> Outcome:
                # The agent's file service is imported where it is used: at
                # start-up it is the forked agent's to load, on the other core.
                from ...agent.files import fs_stat_of_fd

                fd = os.open(target.path, os.O_PATH | os.O_CLOEXEC)
                try:
                    info = fs_stat_of_fd(fd)
                finally:
                    os.close(fd)
                return ReturnValue(0, writes=((buffer, abi.pack_statfs(info)),))
            return self._local(target, emulate)
        return self._defer(self._remote_statfs(target.path, buffer))

    def _fd_statfs(self, call: SyscallCall, fd: int, buffer: int) -> Outcome:
        """fstatfs of a shadow copy (or shadow directory) is the target file's filesystem."""
        if self._node_of_fd(call.tid, fd) is None:
            return CONTINUE
        try:
            link = os.fsencode(os.readlink(f"/proc/{call.tid}/fd/{fd}"))
        except OSError:
            return CONTINUE
        path = self.shadow.remote_path(link)
        if path is None:
            return CONTINUE
        return self._defer(self._remote_statfs(path, buffer))

    async def _remote_statfs(self, path: bytes, buffer: int) -> Outcome:
        # An agent without StatFs: ENOSYS ("this filesystem does not support
        # statfs", statfs(2)) rather than this machine's numbers for a target path.
        if CAP_FILES_STATFS not in self.context.client.capabilities:
            return Errno(errno.ENOSYS)
        info: FsStat = await self.context.client.statfs(path)
        return ReturnValue(0, writes=((buffer, abi.pack_statfs(info)),))

    # --- inotify -------------------------------------------------------------------

    def _watch(self, call: SyscallCall, dirfd: int, path: bytes, api: str) -> Outcome:
        """inotify_add_watch, fanotify_mark: a local path is watched by the
        kernel; a target path answers ENOTSUP (the agent sends no change
        notifications, and watching this machine's path of that name, or the
        copy, which never changes, would wait silently forever). Watchers
        report the path they cannot watch, or poll it; inotify and fanotify
        themselves stay, so a program's watches of its own local files (a dev
        server's reload) work as they do without mtrace."""
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        if route is Route.LOCAL:
            return self._local(target, lambda: Errno(errno.ENOTSUP))
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        return self._refuse_watch(target.path, api)

    def _refuse_watch(self, path: bytes, api: str) -> Outcome:
        if api not in self._watch_warned:
            self._watch_warned.add(api)
            log.warning("%s: a file watch (%s) of a target path is not supported; "
                        "the program gets ENOTSUP", os.fsdecode(path), api)
        return Errno(errno.ENOTSUP)

    def _fanotify_mark(self, call: SyscallCall) -> Outcome:
        """fanotify_mark(group, flags, mask, dirfd, path): as inotify_add_watch
        for a target path; with no path the mark is on ``dirfd`` itself (an fd
        of a target file's copy is the target's file)."""
        if call.uint_arg(1) & _FAN_MARK_FLUSH:
            return CONTINUE
        dirfd = call.int_arg(3)
        if call.pointer_arg(4) == 0:
            found = self._node_of_fd(call.tid, dirfd)
            if found is None:
                return CONTINUE
            return self._refuse_watch(found[0].remote_path, "fanotify")
        return self._watch(call, dirfd, call.read_string(4), "fanotify")

    # --- access, readlink ----------------------------------------------------------

    def _access(self, call: SyscallCall, dirfd: int, path: bytes, mode: int,
                flags: int) -> Outcome:
        if not path and flags & abi.AT_EMPTY_PATH and dirfd != AT_FDCWD:
            found = self._node_of_fd(call.tid, dirfd)
            if found is None:
                return CONTINUE
            remote_path = found[0].remote_path
            target = Target(remote_path, normalize(remote_path), False)
        else:
            resolved = self._resolve(call, dirfd, path)
            if resolved is None:
                return CONTINUE
            target = resolved
        route = self._route(target)
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        if route is Route.LOCAL:
            def emulate() -> Outcome:
                ok = os.access(target.path, mode, effective_ids=bool(flags & abi.AT_EACCESS),
                               follow_symlinks=not flags & abi.AT_SYMLINK_NOFOLLOW)
                return ReturnValue(0) if ok else Errno(errno.EACCES)
            return self._local(target, emulate)
        if route is Route.READ:
            # Writes go local in read mode: ask the target about the rest.
            mode &= ~os.W_OK

        async def remote() -> Outcome:
            await self.context.client.access(target.path, mode)
            return ReturnValue(0)

        return self._defer(remote())

    def _readlink(self, call: SyscallCall, dirfd: int, path: bytes, buffer: int,
                  size: int) -> Outcome:
        if size <= 0:
            return Errno(errno.EINVAL)
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        if route is Route.LOCAL:
            if target.clean.startswith(b"/proc/"):
                answer = self._proc_link(call.tid, target.clean)
                if answer is not None:
                    data = answer[:size]
                    return ReturnValue(len(data), writes=((buffer, data),))
            return self._local(target, lambda: self._reply_link(
                os.readlink(target.path), buffer, size))

        async def remote() -> Outcome:
            return self._reply_link(await self.context.client.readlink(target.path), buffer, size)

        return self._defer(remote())

    def _xattr(self, call: SyscallCall, path: bytes, name: bytes | None, buffer: int,
               size: int, *, follow: bool) -> Outcome:
        """get/listxattr (name None: list): the target's extended attributes
        (the agent's ``files-xattr-read``). An older agent serves none: a
        remote object has none (ENODATA, an empty list), but a missing one is
        the target's ENOENT, as for stat."""
        target = self._resolve(call, AT_FDCWD, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        if route is Route.LOCAL:
            def here() -> Outcome:
                if name is None:
                    found = os.listxattr(target.path, follow_symlinks=follow)
                    data = b"".join(os.fsencode(item) + b"\0" for item in found)
                else:
                    data = os.getxattr(target.path, name, follow_symlinks=follow)
                return self._reply_xattr(data, buffer, size)

            return self._local(target, here)

        async def remote() -> Outcome:
            client = self.context.client
            if CAP_FILES_XATTR_READ not in client.capabilities:
                await (client.stat(target.path) if follow else client.lstat(target.path))
                return ReturnValue(0) if name is None else Errno(errno.ENODATA)
            if name is None:
                names = await client.list_xattr(target.path, follow=follow)
                return self._reply_xattr(b"".join(item + b"\0" for item in names), buffer, size)
            return self._reply_xattr(await client.get_xattr(target.path, name, follow=follow),
                                     buffer, size)

        return self._defer(remote())

    @staticmethod
    def _reply_xattr(data: bytes, buffer: int, size: int) -> Outcome:
        """What getxattr/listxattr return for ``data``: its size when asked
        with size 0, ERANGE when it does not fit."""
        if size == 0:
            return ReturnValue(len(data))
        if len(data) > size:
            return Errno(errno.ERANGE)
        return ReturnValue(len(data), writes=((buffer, data),) if data else ())

    @staticmethod
    def _reply_link(link: bytes | str, buffer: int, size: int) -> Outcome:
        data = os.fsencode(link)[:size]
        return ReturnValue(len(data), writes=((buffer, data),))

    def _proc_link(self, tid: int, path: bytes) -> bytes | None:
        """``/proc/*/fd/N`` and ``/proc/*/cwd`` as the tracee should see them: the
        remote path of a shadow copy, the virtual cwd."""
        match = _PROC_LINK.match(path)
        if match is None:
            return None
        who, task, what = match.groups()
        if who == b"self":
            try:
                who = str(_process_of(tid)[0]).encode()
            except (OSError, ValueError, IndexError):
                return None
        elif who == b"thread-self":
            who, task = str(tid).encode(), None
        if what == b"cwd":
            virtual = self.cwds.get(int(who))
            if virtual is not None:
                return virtual
        local = b"/proc/" + who + (task or b"") + b"/" + what
        try:
            link = os.fsencode(os.readlink(local))
        except OSError:
            return None
        return self.shadow.remote_path(link)

    # --- working directory -----------------------------------------------------------

    def _chdir(self, call: SyscallCall, path: bytes) -> Outcome:
        target = self._resolve(call, AT_FDCWD, path)
        if target is None:
            return CONTINUE
        route = self._route(target)
        if route is Route.NOT_FOUND:
            return Errno(errno.ENOENT)
        if route is Route.LOCAL:
            if target.kernel_agrees:
                if self.cwds.active and os.path.isdir(target.path):
                    self.cwds.set(call.tid, None)
                return CONTINUE

            def emulate() -> Outcome:
                if not stat.S_ISDIR(os.stat(target.path).st_mode):
                    return Errno(errno.ENOTDIR)
                self.cwds.set(call.tid, target.clean)
                return ReturnValue(0)
            return self._local(target, emulate)
        tid = call.tid

        async def remote() -> Outcome:
            info = await self._remote_stat(target.path, True)
            if not stat.S_ISDIR(info.mode):
                return Errno(errno.ENOTDIR)
            self.cwds.set(tid, target.clean)
            return ReturnValue(0)

        return self._defer(remote())

    def _fchdir(self, call: SyscallCall) -> Outcome:
        if self.cwds.active:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(f"/proc/{call.tid}/fd/{call.int_arg(0)}").st_mode):
                    self.cwds.set(call.tid, None)
        return CONTINUE

    def _getcwd(self, call: SyscallCall, buffer: int, size: int) -> Outcome:
        directory = self.cwds.get(call.tid)
        if directory is None:
            try:
                kernel = os.fsencode(os.readlink(f"/proc/{call.tid}/cwd"))
            except OSError:
                return CONTINUE
            directory = self.shadow.remote_path(kernel)
            if directory is None:
                return CONTINUE
        data = directory + b"\0"
        if len(data) > size:
            return Errno(errno.ERANGE)
        return ReturnValue(len(data), writes=((buffer, data),))

    # --- changes: mkdir, unlink, rename, truncate ----------------------------------

    def _change(self, call: SyscallCall, targets: list[Target], *,
                local: Callable[[], Outcome],
                remote: Callable[[], Coroutine[Any, Any, Outcome]],
                probe: bytes) -> Outcome:
        """Route a call that changes the filesystem (see the module docstring).

        ``probe``: the path whose existence decides read mode (the object, or
        for mkdir its parent).
        """
        routes = {self._route(target) for target in targets}
        if Route.NOT_FOUND in routes:
            return Errno(errno.ENOENT)
        agrees = all(target.kernel_agrees for target in targets)

        def run_local() -> Outcome:
            if agrees:
                return CONTINUE
            try:
                return local()
            except OSError as error:
                return Errno(error.errno or errno.EIO)

        if routes == {Route.LOCAL}:
            return run_local()
        if Route.LOCAL in routes:
            return Errno(errno.EXDEV)
        if routes == {Route.WRITE}:
            async def changed() -> Outcome:
                try:
                    return await remote()
                finally:
                    self._changed()
            return self._defer(changed())
        # Read mode: local if it exists here, EROFS if it exists only in the target.
        if os.path.lexists(probe):
            return run_local()

        async def check() -> Outcome:
            try:
                await self._remote_stat(probe, False)
            except RemoteError as error:
                if error.errno in (errno.ENOENT, errno.ENOTDIR):
                    return run_local()
                raise
            return Errno(errno.EROFS)

        return self._defer(check())

    def _mkdir(self, call: SyscallCall, dirfd: int, path: bytes, mode: int) -> Outcome:
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE
        mode &= ~_thread_umask(call.tid)
        client = self.context.client

        async def remote() -> Outcome:
            await client.mkdir(target.path, mode)
            self.shadow.invalidate_listing(normalize(target.clean + b"/.."))
            return ReturnValue(0)

        def local() -> Outcome:
            os.mkdir(target.path, mode)
            return ReturnValue(0)

        return self._change(call, [target], local=local, remote=remote,
                            probe=normalize(target.clean + b"/.."))

    def _unlink(self, call: SyscallCall, dirfd: int, path: bytes, flags: int) -> Outcome:
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE
        directory = bool(flags & abi.AT_REMOVEDIR)
        client = self.context.client

        async def remote() -> Outcome:
            if directory:
                await client.rmdir(target.path)
            else:
                await client.unlink(target.path)
            self.shadow.forget(target.clean)
            return ReturnValue(0)

        def local() -> Outcome:
            if directory:
                os.rmdir(target.path)
            else:
                os.unlink(target.path)
            return ReturnValue(0)

        return self._change(call, [target], local=local, remote=remote, probe=target.clean)

    def _rename(self, call: SyscallCall, source_dirfd: int, source_path: bytes,
                destination_dirfd: int, destination_path: bytes, flags: int) -> Outcome:
        source = self._resolve(call, source_dirfd, source_path)
        destination = self._resolve(call, destination_dirfd, destination_path)
        if source is None or destination is None:
            return CONTINUE
        client = self.context.client

        async def remote() -> Outcome:
            if flags & ~_RENAME_NOREPLACE:
                return Errno(errno.EINVAL)
            if flags & _RENAME_NOREPLACE:
                try:
                    await client.lstat(destination.path)
                except RemoteError as error:
                    if error.errno != errno.ENOENT:
                        raise
                else:
                    return Errno(errno.EEXIST)
            await client.rename(source.path, destination.path)
            self.shadow.moved(source.clean, destination.clean)
            return ReturnValue(0)

        def local() -> Outcome:
            if flags:
                return Errno(errno.EINVAL)
            os.rename(source.path, destination.path)
            return ReturnValue(0)

        return self._change(call, [source, destination], local=local, remote=remote,
                            probe=source.clean)

    def _truncate(self, call: SyscallCall, path: bytes, length: int) -> Outcome:
        target = self._resolve(call, AT_FDCWD, path)
        if target is None:
            return CONTINUE
        client = self.context.client

        async def remote() -> Outcome:
            await client.truncate(target.path, length)
            self.shadow.truncated(target.clean, length)
            return ReturnValue(0)

        def local() -> Outcome:
            os.truncate(target.path, length)
            return ReturnValue(0)

        return self._change(call, [target], local=local, remote=remote, probe=target.clean)

    # --- metadata and links by path ----------------------------------------------------
    #
    # Read mode: as unlink (local where the path exists here, EROFS where only the
    # target has it). Write mode: the agent's operation; an agent without it
    # answers NOT_IN_TARGET (ENOTSUP for xattrs), never a change to a local
    # file of the same name.

    def _optional_path(self, call: SyscallCall, index: int) -> bytes:
        """A path argument that may be NULL (futimens is utimensat(fd, NULL, ...))."""
        return call.read_string(index) if call.pointer_arg(index) else b""

    def _metadata(self, call: SyscallCall, dirfd: int, path: bytes, flags: int,
                  local: Callable[[bytes, bool], None],
                  remote: Callable[[bytes, bool], Coroutine[Any, Any, Outcome]] | None = None
                  ) -> Outcome:
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE  # an fd (AT_EMPTY_PATH, NULL): a shadow copy or a local file
        follow = not flags & abi.AT_SYMLINK_NOFOLLOW
        copy = self._copy_by_proc_path(call, target)
        if copy is not None:
            node, route = copy
            if route is not Route.WRITE:
                return Errno(errno.EROFS)

            async def changed() -> Outcome:
                try:
                    if remote is None:
                        return Errno(NOT_IN_TARGET)
                    return await remote(node.remote_path, not stat.S_ISLNK(node.stat.mode))
                finally:
                    self._changed()

            return self._defer(changed())

        def run_local() -> Outcome:
            local(target.path, follow)
            return ReturnValue(0)

        def in_target() -> Coroutine[Any, Any, Outcome]:
            return self._not_in_target() if remote is None else remote(target.path, follow)

        return self._change(call, [target], local=run_local, remote=in_target,
                            probe=target.clean)

    def _copy_by_proc_path(self, call: SyscallCall, target: Target) -> tuple[Node, Route] | None:
        """``/proc/self/fd/N`` (or the caller's own pid) naming a target file's
        copy: that file, as the fd forms have it. glibc's
        fchmodat(AT_SYMLINK_NOFOLLOW), tar's last step for each directory,
        opens the name O_PATH and chmods ``/proc/self/fd/N``; the kernel would
        change the copy, not the target's file."""
        match = _PROC_LINK.match(target.clean)
        if match is None or not match.group(3).startswith(b"fd/"):
            return None
        who = match.group(1)
        if who not in (b"self", b"thread-self") and int(who) != call.tid:
            try:
                if int(who) != _process_of(call.tid)[0]:
                    return None
            except (OSError, ValueError, IndexError):
                return None
        found = self._fd_route(call, int(match.group(3)[3:]))
        if found is None or found[1] is Route.LOCAL:
            return None
        return found

    def _remote_chmod(self, mode: int) -> Callable[[bytes, bool], Coroutine[Any, Any, Outcome]]:
        """chmod in the target (write mode), where the agent can (``files-chmod``).
        Not following a symlink (fchmodat2's AT_SYMLINK_NOFOLLOW, lchmod): a
        symlink's mode cannot change (the kernel says EOPNOTSUPP since 6.6, as
        libcs did before), anything else changes as with chmod."""
        async def change(path: bytes, follow: bool) -> Outcome:
            if CAP_FILES_CHMOD not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            if not follow and stat.S_ISLNK((await self._remote_stat(path, False)).mode):
                return Errno(errno.EOPNOTSUPP)
            await self.context.client.chmod(path, mode)
            return ReturnValue(0)

        return change

    def _fchmodat2(self, call: SyscallCall) -> Outcome:
        """fchmodat2(dirfd, path, mode, flags): fchmodat with flags
        (AT_SYMLINK_NOFOLLOW: glibc's and musl's lchmod; AT_EMPTY_PATH: the fd)."""
        dirfd, mode, flags = call.int_arg(0), call.uint_arg(2) & 0o7777, call.int_arg(3)
        if flags & ~(abi.AT_SYMLINK_NOFOLLOW | abi.AT_EMPTY_PATH):
            return CONTINUE  # the kernel's EINVAL, before it looks at the path
        path = call.read_string(1)
        if not path and flags & abi.AT_EMPTY_PATH and dirfd != AT_FDCWD:
            return self._fd_metadata(call, dirfd, self._fd_chmod(mode))
        return self._metadata(
            call, dirfd, path, flags,
            lambda local, follow: _change_mode(local, mode, follow),
            remote=self._remote_chmod(mode))

    # The fd forms: an fd of a target file's copy changes the target's file (and,
    # for mode and times, the copy too, so the tracee's fstat agrees); the agent
    # keeps a file's mode and owner when an upload replaces it, and the times
    # are set again after the next upload (shadow.Node.times).

    def _fd_route(self, call: SyscallCall, fd: int) -> tuple[Node, Route] | None:
        """The target file behind a copy's fd and its route (None: a local file)."""
        found = self._node_of_fd(call.tid, fd)
        if found is None:
            return None
        node = found[0]
        return node, self.policy.route(normalize(node.remote_path))

    def _fd_xattr(self, call: SyscallCall, fd: int, *, remove: bool) -> Outcome:
        """fsetxattr/fremovexattr on a copy: the target file's attributes, as the
        path forms (read mode EROFS; an agent without ``files-xattr``: ENOTSUP,
        and cp -p, which sets the mode as a POSIX ACL first, falls back to fchmod).
        The agent keeps them when an upload replaces the file."""
        found = self._fd_route(call, fd)
        if found is None or found[1] is Route.LOCAL:
            return CONTINUE
        node, route = found
        if route is not Route.WRITE:
            return Errno(errno.EROFS)
        change = self._xattr_change(call, 1, remove=remove)
        if isinstance(change, Errno):
            return change
        name, value, flags = change

        async def changed() -> Outcome:
            try:
                return await self._remote_xattr(node.remote_path, name, value, flags,
                                                 not stat.S_ISLNK(node.stat.mode), remove)
            finally:
                self._changed()

        return self._defer(changed())

    def _fd_metadata(self, call: SyscallCall, fd: int,
                     change: Callable[[Node], Coroutine[Any, Any, Outcome]]) -> Outcome:
        found = self._fd_route(call, fd)
        if found is None or found[1] is Route.LOCAL:
            return CONTINUE  # a local file
        node, route = found
        if route is not Route.WRITE:
            return Errno(errno.EROFS)  # read mode: as the path forms

        async def changed() -> Outcome:
            try:
                return await change(node)
            finally:
                self._changed()

        return self._defer(changed())

    def _fd_chmod(self, mode: int) -> Callable[[Node], Coroutine[Any, Any, Outcome]]:
        async def change(node: Node) -> Outcome:
            if stat.S_ISLNK(node.stat.mode):
                return Errno(errno.EOPNOTSUPP)  # a symlink's own mode, as Linux answers
            if CAP_FILES_CHMOD not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            await self.context.client.chmod(node.remote_path, mode)
            node.stat = msgspec.structs.replace(node.stat, mode=(node.stat.mode & ~0o7777) | mode)
            return CONTINUE
        return change

    def _fchownat(self, call: SyscallCall, dirfd: int, path: bytes, flags: int) -> Outcome:
        uid, gid = _id_arg(call, 2), _id_arg(call, 3)
        if not path and flags & abi.AT_EMPTY_PATH and dirfd != AT_FDCWD:
            return self._fd_metadata(call, dirfd, self._fd_chown(uid, gid))
        return self._metadata(
            call, dirfd, path, flags,
            lambda local, follow: os.chown(local, uid, gid, follow_symlinks=follow),
            remote=self._remote_chown(uid, gid))

    def _fd_chown(self, uid: int, gid: int) -> Callable[[Node], Coroutine[Any, Any, Outcome]]:
        async def change(node: Node) -> Outcome:
            if CAP_FILES_CHOWN not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            await self.context.client.chown(node.remote_path, uid, gid,
                                            follow=not stat.S_ISLNK(node.stat.mode))
            node.stat = msgspec.structs.replace(
                node.stat, uid=node.stat.uid if uid == -1 else uid,
                gid=node.stat.gid if gid == -1 else gid)
            return ReturnValue(0)  # not the copy: this machine may not allow it
        return change

    def _fd_times(self, atime: TimeSpec,
                  mtime: TimeSpec) -> Callable[[Node], Coroutine[Any, Any, Outcome]]:
        async def change(node: Node) -> Outcome:
            if CAP_FILES_TIMES not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            await self.context.client.set_times(node.remote_path, atime, mtime,
                                                follow=not stat.S_ISLNK(node.stat.mode))
            if node.tracked:
                node.times = (atime, mtime)
            return CONTINUE
        return change

    def _remote_chown(self, uid: int,
                      gid: int) -> Callable[[bytes, bool], Coroutine[Any, Any, Outcome]]:
        """chown/lchown in the target (write mode), where the agent can (``files-chown``)."""
        async def change(path: bytes, follow: bool) -> Outcome:
            if CAP_FILES_CHOWN not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            await self.context.client.chown(path, uid, gid, follow=follow)
            return ReturnValue(0)

        return change

    @staticmethod
    def _read_times(call: SyscallCall, index: int, layout: str) -> tuple[TimeSpec, TimeSpec]:
        """The (atime, mtime) of the kernel's three time layouts; NULL is "now"."""
        address = call.pointer_arg(index)
        if not address:
            return "now", "now"
        if layout == "utimbuf":
            atime, mtime = struct.unpack("=qq", call.read(address, 16))
            return atime * 10**9, mtime * 10**9
        values = struct.unpack("=qqqq", call.read(address, 32))
        unit = 1000 if layout == "timeval" else 1
        times: list[TimeSpec] = []
        for seconds, fraction in ((values[0], values[1]), (values[2], values[3])):
            if layout == "timespec" and fraction == _UTIME_NOW:
                times.append("now")
            elif layout == "timespec" and fraction == _UTIME_OMIT:
                times.append(None)
            else:
                times.append(seconds * 10**9 + fraction * unit)
        return times[0], times[1]

    def _times(self, call: SyscallCall, dirfd: int, path: bytes, flags: int, index: int,
               layout: str) -> Outcome:
        """utime, utimes, futimesat, utimensat with a path: the agent's SetTimes in write mode."""
        if not path and dirfd != AT_FDCWD and (not call.pointer_arg(1) or flags & abi.AT_EMPTY_PATH):
            # futimens: the fd's own file (a shadow copy or a local file)
            return self._fd_metadata(call, dirfd, self._fd_times(
                *self._read_times(call, index, layout)))
        if self._resolve(call, dirfd, path) is None:
            return CONTINUE
        atime, mtime = self._read_times(call, index, layout)
        from ...agent.files import set_times  # as fs_stat_of_fd above

        async def remote(path: bytes, follow: bool) -> Outcome:
            if CAP_FILES_TIMES not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            await self.context.client.set_times(path, atime, mtime, follow=follow)
            return ReturnValue(0)

        return self._metadata(
            call, dirfd, path, flags,
            lambda local, follow: set_times(local, atime, mtime, follow_symlinks=follow),
            remote=remote)

    def _link(self, call: SyscallCall, source_dirfd: int, source_path: bytes,
              destination_dirfd: int, destination_path: bytes, flags: int) -> Outcome:
        """link/linkat: in write mode the agent's Link (both names in the
        target; one here and one there is EXDEV, as across two filesystems)."""
        destination = self._resolve(call, destination_dirfd, destination_path)
        if destination is None:
            return CONTINUE
        follow = bool(flags & _AT_SYMLINK_FOLLOW)
        if not source_path and flags & abi.AT_EMPTY_PATH:
            # linkat(fd, "", AT_EMPTY_PATH): a copy's fd names its target file.
            found = self._node_of_fd(call.tid, source_dirfd)
            if found is None:
                if self._route(destination) is Route.LOCAL:
                    return CONTINUE
                return Errno(errno.EXDEV)
            remote_path = found[0].remote_path
            source = Target(remote_path, normalize(remote_path), False)
            follow = True
        else:
            resolved = self._resolve(call, source_dirfd, source_path)
            if resolved is None:
                return CONTINUE
            source = resolved
        client = self.context.client

        def run_local() -> Outcome:
            os.link(source.path, destination.path, follow_symlinks=follow)
            return ReturnValue(0)

        async def remote() -> Outcome:
            if flags & ~(_AT_SYMLINK_FOLLOW | abi.AT_EMPTY_PATH):
                return Errno(errno.EINVAL)
            if CAP_FILES_LINKS not in client.capabilities:
                return Errno(NOT_IN_TARGET)
            # The new name is the file as the program wrote it so far.
            await self._upload_now(source.clean)
            await client.link(source.path, destination.path, follow=follow)
            self.shadow.invalidate_listing(normalize(destination.clean + b"/.."))
            return ReturnValue(0)

        return self._change(call, [source, destination], local=run_local, remote=remote,
                            probe=source.clean)

    def _create_entry(self, call: SyscallCall, dirfd: int, path: bytes,
                      local: Callable[[bytes], None],
                      remote: Callable[[bytes], Coroutine[Any, Any, None]]) -> Outcome:
        """symlink, mknod: a new name, decided by its parent (as mkdir); in
        write mode the agent makes it (``files-links``)."""
        target = self._resolve(call, dirfd, path)
        if target is None:
            return CONTINUE

        def run_local() -> Outcome:
            local(target.path)
            return ReturnValue(0)

        async def in_target() -> Outcome:
            if CAP_FILES_LINKS not in self.context.client.capabilities:
                return Errno(NOT_IN_TARGET)
            await remote(target.path)
            self.shadow.invalidate_listing(normalize(target.clean + b"/.."))
            return ReturnValue(0)

        return self._change(call, [target], local=run_local, remote=in_target,
                            probe=normalize(target.clean + b"/.."))

    def _symlink(self, call: SyscallCall, link_index: int, dirfd: int, path_index: int) -> Outcome:
        contents = call.read_string(link_index)  # stored verbatim, never resolved
        return self._create_entry(
            call, dirfd, call.read_string(path_index),
            lambda path: os.symlink(contents, path),
            lambda path: self.context.client.symlink(contents, path))

    def _mknod(self, call: SyscallCall, dirfd: int, path_index: int) -> Outcome:
        # The type bits as given, the permission bits less the program's umask;
        # the syscall's dev is the 32-bit encoding glibc's dev_t reduces to.
        mode = call.uint_arg(path_index + 1) & 0xFFFF & ~_thread_umask(call.tid)
        device = call.uint_arg(path_index + 2) & 0xFFFFFFFF
        return self._create_entry(
            call, dirfd, call.read_string(path_index),
            lambda path: os.mknod(path, mode, device),
            lambda path: self.context.client.mknod(path, mode, device))

    def _set_xattr(self, call: SyscallCall, index: int, *, follow: bool,
                   remove: bool) -> Outcome:
        """setxattr/lsetxattr/removexattr/lremovexattr by path: the agent's
        SetXattr/RemoveXattr in write mode (``files-xattr``), else ENOTSUP."""
        target = self._resolve(call, AT_FDCWD, call.read_string(index))
        if target is None:
            return CONTINUE
        if self._route(target) is Route.LOCAL and target.kernel_agrees:
            return CONTINUE
        change = self._xattr_change(call, index + 1, remove=remove)
        if isinstance(change, Errno):
            return change
        name, value, flags = change

        def run_local() -> Outcome:
            if remove:
                os.removexattr(target.path, name, follow_symlinks=follow)
            else:
                os.setxattr(target.path, name, value, flags, follow_symlinks=follow)
            return ReturnValue(0)

        async def remote() -> Outcome:
            return await self._remote_xattr(target.path, name, value, flags, follow, remove)

        return self._change(call, [target], local=run_local, remote=remote,
                            probe=target.clean)

    @staticmethod
    def _xattr_change(call: SyscallCall, index: int, *,
                      remove: bool) -> tuple[bytes, bytes, int] | Errno:
        """(name, value, flags) of a *setxattr/*removexattr whose name is
        argument ``index``; the kernel's EINVAL and E2BIG before reading a value."""
        name = call.read_string(index)
        if remove:
            return name, b"", 0
        size, flags = call.uint_arg(index + 2), call.int_arg(index + 3)
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            return Errno(errno.EINVAL)
        if size > XATTR_SIZE_MAX:
            return Errno(errno.E2BIG)
        value = call.read(call.pointer_arg(index + 1), size) if size else b""
        return name, value, flags

    async def _remote_xattr(self, path: bytes, name: bytes, value: bytes, flags: int,
                            follow: bool, remove: bool) -> Outcome:
        client = self.context.client
        if CAP_FILES_XATTR not in client.capabilities:
            return Errno(errno.ENOTSUP)
        if remove:
            await client.remove_xattr(path, name, follow=follow)
        else:
            await client.set_xattr(path, name, value, flags, follow=follow)
        return ReturnValue(0)

    async def _upload_now(self, remote_path: bytes) -> None:
        """Upload what the program wrote to copies of ``remote_path`` and not yet
        to the target, before a call that gives that file another name."""
        for node in self.shadow.tracked_nodes():
            if normalize(node.remote_path) == remote_path:
                await self.shadow.write_back(self.context.client, node)

    async def _not_in_target(self) -> Outcome:
        return Errno(NOT_IN_TARGET)

    # --- write mode: uploads ------------------------------------------------------------

    def _write_back_fd(self, call: SyscallCall, fd: int, *, fsync: bool) -> Outcome:
        """close/fsync of a written copy: upload it first; if that fails the
        call fails (EIO, or the target's ENOSPC/EDQUOT/...), as a local close
        or fsync reports a failed write-back. A close answered with an error
        leaves the tracee's fd open (the supervisor cannot close a tracee's
        fd); it goes at exit."""
        found = self._node_of_fd(call.tid, fd)
        if found is None or not found[0].tracked:
            return CONTINUE
        node, local = found
        if (local.st_size, local.st_mtime_ns) == node.synced:
            return CONTINUE
        if self.context.agent_lost:
            return Errno(errno.EIO)

        async def upload() -> Outcome:
            try:
                await self.shadow.write_back(self.context.client, node)
            except (OSError, AgentError) as error:
                log.warning("could not write %s back to the target: %s",
                            os.fsdecode(node.remote_path), error)
                if isinstance(error, AgentUnavailable):
                    self.context.agent_lost = True
                if isinstance(error, OSError) and error.errno in _WRITE_BACK_ERRNOS:
                    return Errno(error.errno)
                return Errno(errno.EIO)
            return CONTINUE

        return Defer(upload())

    def _exit_group(self, call: SyscallCall) -> Outcome:
        if self.context.agent_lost or not self.shadow.tracked_nodes():
            return CONTINUE

        async def flush() -> Continue:
            await self.flush()
            return CONTINUE

        return Defer(flush())

    async def flush(self) -> None:
        """Upload every changed shadow copy (write mode); call before closing the agent."""
        if self.context.agent_lost:
            return
        try:
            await self.shadow.write_back_all(self.context.client)
        except AgentError as error:
            log.warning("could not write files back to the target: %s", error)
            if isinstance(error, AgentUnavailable):
                self.context.agent_lost = True

    def unsaved(self) -> list[bytes]:
        """Target files whose changes never reached the target (write mode)."""
        return self.shadow.unsaved()

    def _start_sweeper(self) -> None:
        """Upload changed copies every SWEEP_INTERVAL (a timer, not a task, so a
        loop stopped at the end of the session leaves nothing pending)."""
        if self._sweeper is not None:
            return
        loop = self.context.async_side.loop

        def tick() -> None:
            if self._sweeper is None or self.context.agent_lost or self.context.client.closed:
                return
            if self.shadow.tracked_nodes():
                self._in_background(self.flush())
            self._sweeper = loop.call_later(SWEEP_INTERVAL, tick)

        self.context.async_side.start()
        self._sweeper = True
        loop.call_soon_threadsafe(tick)

    def close(self) -> None:
        """Stop the background sweep (the session is over)."""
        if self._fast is not None:
            self._fast.reset(None)
        sweeper, self._sweeper = self._sweeper, None
        if isinstance(sweeper, asyncio.TimerHandle):
            self.context.async_side.loop.call_soon_threadsafe(sweeper.cancel)


def handlers(context: RemoteContext) -> dict[str, Handler]:
    """The files feature's handlers for a session (see the module docstring)."""
    return FilesFeature(context).handlers()
