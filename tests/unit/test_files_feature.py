"""The files feature against a fake agent: real probes, real seccomp, no root.

The fake agent (:class:`FakeAgent`) is the agent's own ``FileService`` over a
temporary directory that plays the target's root, called in-process, plus
typed helpers: ``calls`` records every operation (``count("read_file")``),
``lose()`` makes every later call fail as a dead agent does, ``delay`` slows
calls down (concurrency tests). So the tracer's side is tested end to end:
path resolution, policy, the shadow tree, struct packing, virtual cwd, write
mode, with each probe flavour (static Go, static glibc, static musl, dynamic).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from programs_build import ProgramPaths

from mtrace.agent.errors import AgentUnavailable, RemoteError
from mtrace.agent.files import FileService, HandleTable, Upload, make_resolver
from mtrace.agent.protocol import (
    Data,
    DirEntry,
    FileContents,
    FileStat,
    FsStat,
    Opened,
    TimeSpec,
)
from mtrace.tracer.backend import AsyncSide, Handlers
from mtrace.tracer.features import files
from mtrace.tracer.features.policy import FeatureConfig, FsConfig
from mtrace.tracer.features.remote import RemoteContext
from mtrace.tracer.session import Session, run

pytestmark = pytest.mark.timeout(60)


# --- the fake agent ----------------------------------------------------------------


@dataclass
class FakeAgent:
    """An in-process stand-in for ``AgentClient`` serving ``root`` as the target's /."""

    root: Path
    writable: bool = False
    delay: float = 0.0
    calls: list[tuple[str, bytes]] = field(default_factory=list)
    lost: bool = False
    capabilities: list[str] = field(
        default_factory=lambda: ["files-write", "files-upload", "files-statfs", "files-chmod",
                                 "files-chown", "files-times", "files-links", "files-xattr",
                                 "files-xattr-read"])
    # The agent is lost on this call of write (1 = the first): an upload cut short.
    lose_on_write: int = 0
    # read_file calls that returned a file (not refused: too big, missing, ...)
    whole_reads: int = 0

    def __post_init__(self) -> None:
        self.service = FileService(make_resolver(str(self.root)), writable=self.writable)
        self.handles = HandleTable()
        self.uploads: dict[int, Upload] = {}
        self._lock = threading.Lock()

    # typed helpers for tests
    def count(self, operation: str, path: bytes | None = None) -> int:
        return sum(1 for name, argument in self.calls
                   if name == operation and (path is None or argument == path))

    def lose(self) -> None:
        self.lost = True

    @property
    def closed(self) -> bool:
        return self.lost

    async def _enter(self, operation: str, path: bytes = b"") -> None:
        with self._lock:
            self.calls.append((operation, path))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.lost:
            raise AgentUnavailable("the fake agent is gone")

    @staticmethod
    def _call(function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except OSError as error:
            raise RemoteError(error.errno or errno.EIO, str(error)) from None

    # the AgentClient API the tracer uses
    async def stat(self, path: bytes, *, follow_symlinks: bool = True) -> FileStat:
        await self._enter("stat" if follow_symlinks else "lstat", path)
        return self._call(self.service.stat, path, follow_symlinks)  # type: ignore[no-any-return]

    async def lstat(self, path: bytes) -> FileStat:
        return await self.stat(path, follow_symlinks=False)

    async def access(self, path: bytes, mode: int = os.F_OK) -> None:
        await self._enter("access", path)
        self._call(self.service.access, path, mode)

    async def read_file(self, path: bytes, *, limit: int = 1 << 30) -> FileContents:
        await self._enter("read_file", path)
        contents: FileContents = self._call(self.service.read_file, path, limit)
        self.whole_reads += 1
        return contents

    async def open(self, path: bytes, flags: int = os.O_RDONLY, mode: int = 0o666) -> Opened:
        await self._enter("open", path)
        fd, info = self._call(self.service.open, path, flags, mode)
        return Opened(handle=self.handles.add(fd), stat=info)

    async def read(self, handle: int, size: int, offset: int | None = None) -> Data:
        await self._enter("read")
        with self.handles.use(handle) as fd:
            return self._call(self.service.read, fd, size, offset)  # type: ignore[no-any-return]

    async def write(self, handle: int, data: bytes, offset: int | None = None) -> int:
        if self.lose_on_write and self.count("write") + 1 >= self.lose_on_write:
            self.lost = True
            for upload in self.uploads.values():  # what the real agent does when it dies
                upload.discard()
        await self._enter("write")
        with self.handles.use(handle) as fd:
            return self._call(self.service.write, fd, data, offset)  # type: ignore[no-any-return]

    async def close_file(self, handle: int) -> None:
        await self._enter("close")
        self.handles.close(handle)
        if (upload := self.uploads.pop(handle, None)) is not None:
            upload.discard()

    async def upload_begin(self, path: bytes) -> Opened:
        await self._enter("upload_begin", path)
        upload = self._call(self.service.begin_upload, path)
        handle = self.handles.add(upload.fd)
        self.uploads[handle] = upload
        return Opened(handle=handle, stat=self._call(self.service.stat, path, True))

    async def upload_commit(self, handle: int) -> FileStat:
        await self._enter("upload_commit")
        upload = self.uploads.pop(handle)
        try:
            return self._call(self.service.commit_upload, upload)  # type: ignore[no-any-return]
        finally:
            self.handles.close(handle)

    async def readdir(self, path: bytes) -> list[DirEntry]:
        await self._enter("readdir", path)
        return self._call(self.service.readdir, path).entries  # type: ignore[no-any-return]

    async def readlink(self, path: bytes) -> bytes:
        await self._enter("readlink", path)
        return self._call(self.service.readlink, path)  # type: ignore[no-any-return]

    async def truncate(self, path: bytes, length: int) -> None:
        await self._enter("truncate", path)
        self._call(self.service.truncate, path, length)

    async def mkdir(self, path: bytes, mode: int = 0o777) -> None:
        await self._enter("mkdir", path)
        self._call(self.service.mkdir, path, mode)

    async def unlink(self, path: bytes) -> None:
        await self._enter("unlink", path)
        self._call(self.service.unlink, path, False)

    async def rmdir(self, path: bytes) -> None:
        await self._enter("rmdir", path)
        self._call(self.service.unlink, path, True)

    async def rename(self, source: bytes, destination: bytes) -> None:
        await self._enter("rename", source)
        self._call(self.service.rename, source, destination)

    async def chmod(self, path: bytes, mode: int) -> None:
        await self._enter("chmod", path)
        self._call(self.service.chmod, path, mode)

    async def chown(self, path: bytes, uid: int, gid: int, *, follow: bool = True) -> None:
        await self._enter("chown", path)
        self._call(self.service.chown, path, uid, gid, follow)

    async def set_times(self, path: bytes, atime: TimeSpec, mtime: TimeSpec, *,
                        follow: bool = True) -> None:
        await self._enter("set_times", path)
        self._call(self.service.set_times, path, atime, mtime, follow)

    async def link(self, source: bytes, destination: bytes, *, follow: bool = False) -> None:
        await self._enter("link", source)
        self._call(self.service.link, source, destination, follow)

    async def symlink(self, target: bytes, path: bytes) -> None:
        await self._enter("symlink", path)
        self._call(self.service.symlink, target, path)

    async def mknod(self, path: bytes, mode: int, device: int = 0) -> None:
        await self._enter("mknod", path)
        self._call(self.service.mknod, path, mode, device)

    async def set_xattr(self, path: bytes, name: bytes, value: bytes, flags: int = 0, *,
                        follow: bool = True) -> None:
        await self._enter("set_xattr", path)
        self._call(self.service.set_xattr, path, name, value, flags, follow)

    async def get_xattr(self, path: bytes, name: bytes, *, follow: bool = True) -> bytes:
        await self._enter("get_xattr", path)
        return self._call(self.service.get_xattr, path, name, follow)  # type: ignore[no-any-return]

    async def list_xattr(self, path: bytes, *, follow: bool = True) -> list[bytes]:
        await self._enter("list_xattr", path)
        return self._call(self.service.list_xattr, path, follow)  # type: ignore[no-any-return]

    async def remove_xattr(self, path: bytes, name: bytes, *, follow: bool = True) -> None:
        await self._enter("remove_xattr", path)
        self._call(self.service.remove_xattr, path, name, follow)

    async def statfs(self, path: bytes) -> FsStat:
        """The real statfs of the fake root's file, with a filesystem type and
        size this machine's /tmp cannot have (so a leak of the local answer shows)."""
        await self._enter("statfs", path)
        info: FsStat = self._call(self.service.statfs, path)
        return msgspec.structs.replace(info, type=FAKE_FS_TYPE, blocks=FAKE_FS_BLOCKS)


# --- running a program under the files feature --------------------------------------


@dataclass
class Traced:
    returncode: int
    stdout: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass
class Harness:
    """A target root, a fake agent on it, and a way to run programs against it."""

    target_root: Path
    session_dir: Path
    agent: FakeAgent
    async_side: AsyncSide

    def context(self, config: FsConfig, executable: str | None = None) -> RemoteContext:
        return RemoteContext(
            client=self.agent,  # type: ignore[arg-type]
            async_side=self.async_side,
            features=FeatureConfig(fs=config),
            session_dir=self.session_dir,
            executable=executable,
        )

    def run(self, argv: list[str], config: FsConfig | None = None, *,
            cwd: str | None = None, trapped: tuple[str, ...] | None = None) -> Traced:
        config = config or FsConfig()
        context = self.context(config, executable=argv[0])
        feature = files.FilesFeature(context)
        session = Session(
            argv,
            handlers=Handlers(feature.handlers()),
            trapped=trapped or files.trapped_for(config),
            async_side=self.async_side,
            env={"PATH": "/usr/bin:/bin"},
            cwd=cwd,
        )
        with tempfile.TemporaryFile() as output:
            saved = os.dup(1)
            try:
                os.dup2(output.fileno(), 1)
                returncode = run(session)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                feature.close()
            output.seek(0)
            return Traced(returncode, output.read())

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> Path:
        """Create a file in the target's root (``path`` absolute as the target sees it)."""
        local = self.target_root / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data.encode() if isinstance(data, str) else data)
        local.chmod(mode)
        return local


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    target_root = tmp_path / "target"
    target_root.mkdir()
    # Not under /tmp: the session dir is local anyway, the target paths the
    # tests use live in /srv-like places that are remote by default.
    session_dir = Path(tempfile.mkdtemp(prefix="mtrace-files-session-"))
    side = AsyncSide()
    side.start()
    try:
        yield Harness(target_root, session_dir, FakeAgent(target_root, writable=True), side)
    finally:
        side.stop()
        import shutil

        shutil.rmtree(session_dir, ignore_errors=True)


@contextlib.contextmanager
def local_absent(*paths: str) -> Iterator[None]:
    for path in paths:
        assert not os.path.lexists(path), f"{path} must not exist on this machine"
    yield


REMOTE = "/srv/mtrace-files-test"
#: What the fake agent's statfs says (a type no real filesystem has).
FAKE_FS_TYPE = 0x6D747263
FAKE_FS_BLOCKS = 123456789


# --- reads -----------------------------------------------------------------------


def test_cat_of_a_target_only_file(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/config.txt", "from the target\n")
    with local_absent(REMOTE):
        result = harness.run([str(probe), "cat", f"{REMOTE}/config.txt"])
    assert (result.returncode, result.text) == (0, "from the target\n")


def test_io_uring_cannot_read_around_the_trap(harness: Harness, programs: ProgramPaths) -> None:
    """A program that opens and reads through io_uring saw this machine's files
    (ENOENT for a target-only file): its ring's openat is no system call the
    filter sees. io_uring_setup now answers ENOSYS and it falls back to open/read."""
    harness.write(f"{REMOTE}/uring.txt", "read through the ring\n")
    result = harness.run([str(programs["uring-read"]), f"{REMOTE}/uring.txt"])
    assert (result.returncode, result.text) == (0, "read through the ring\n")


NAME_TO_HANDLE = (
    "import ctypes, errno, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "handle = ctypes.create_string_buffer(136); handle[0:4] = (128).to_bytes(4, 'little')\n"
    "mount = ctypes.c_int()\n"
    "nr = {'x86_64': 303, 'aarch64': 264}[os.uname().machine]\n"
    "result = libc.syscall(nr, -100, b'/srv/mtrace-files-test/handle.txt', handle, "
    "ctypes.byref(mount), 0)\n"
    "print(result, errno.errorcode.get(ctypes.get_errno()))\n"
)


def test_file_handles_cannot_name_local_files(harness: Harness) -> None:
    """name_to_handle_at described this machine's file (or said ENOENT) for a
    target path; file handles are refused with ENOSYS, callers use paths."""
    harness.write(f"{REMOTE}/handle.txt", "x")
    result = harness.run(["/usr/bin/python3", "-S", "-c", NAME_TO_HANDLE])
    assert result.text == "-1 ENOSYS\n"


def test_stat_reports_the_target_metadata(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/data.bin", b"x" * 1234, mode=0o640)
    result = harness.run([str(probe), "stat", f"{REMOTE}/data.bin"])
    assert result.text == "size=1234 mode=0640 type=file\n"


def test_ls_of_a_target_only_directory(harness: Harness, probe: Path) -> None:
    for name in ("b.txt", "a.txt", "c.conf"):
        harness.write(f"{REMOTE}/dir/{name}", name)
    (harness.target_root / REMOTE.lstrip("/") / "dir" / "sub").mkdir()
    (harness.target_root / REMOTE.lstrip("/") / "dir" / "link").symlink_to("a.txt")
    result = harness.run([str(probe), "ls", f"{REMOTE}/dir"])
    assert result.text == "a.txt\nb.txt\nc.conf\nlink\nsub\n"


def test_readlink_and_symlink_stat(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/real.txt", "real\n")
    (harness.target_root / REMOTE.lstrip("/") / "alias").symlink_to("/srv/elsewhere/x")
    assert harness.run([str(probe), "readlink", f"{REMOTE}/alias"]).text == "/srv/elsewhere/x\n"
    result = harness.run([str(probe), "stat", f"{REMOTE}/alias"])
    assert result.text == f"size={len('/srv/elsewhere/x')} mode=0777 type=symlink\n"


def test_missing_target_file_is_the_target_errno(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/present", "x")
    assert harness.run([str(probe), "cat", f"{REMOTE}/absent"]).text == "error: ENOENT\n"
    assert harness.run([str(probe), "cat", f"{REMOTE}/present/x"]).text == "error: ENOTDIR\n"
    assert harness.run([str(probe), "ls", f"{REMOTE}/present"]).text == "error: ENOTDIR\n"


def test_symlink_loop_is_eloop(harness: Harness, probe: Path) -> None:
    base = harness.target_root / REMOTE.lstrip("/")
    base.mkdir(parents=True)
    (base / "loop1").symlink_to("loop2")
    (base / "loop2").symlink_to("loop1")
    assert harness.run([str(probe), "cat", f"{REMOTE}/loop1"]).text == "error: ELOOP\n"


def test_files_through_target_symlinks(harness: Harness, probe: Path) -> None:
    harness.write("/srv/real/conf", "through a link\n")
    base = harness.target_root / REMOTE.lstrip("/")
    base.mkdir(parents=True)
    (base / "linked").symlink_to("/srv/real")
    assert harness.run([str(probe), "cat", f"{REMOTE}/linked/conf"]).text == "through a link\n"
    assert harness.run([str(probe), "ls", f"{REMOTE}/linked"]).text == "conf\n"


def test_big_file_is_fetched_in_chunks(harness: Harness) -> None:
    data = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MiB
    harness.write(f"{REMOTE}/big.bin", data)
    result = harness.run(["/bin/cat", f"{REMOTE}/big.bin"])
    assert result.stdout == data
    assert harness.agent.count("read") >= 3
    assert harness.agent.whole_reads == 0  # a first open's read-file is refused (EFBIG)


def test_cache_reuses_an_unchanged_file_and_refetches_a_changed_one(harness: Harness) -> None:
    path = f"{REMOTE}/cached.txt"
    local = harness.write(path, "one\n")
    script = f"cat {path}; cat {path}"
    assert harness.run(["/bin/sh", "-c", script]).text == "one\none\n"
    assert harness.agent.count("read_file", path.encode()) == 1
    local.write_text("two, longer\n")
    import time

    time.sleep(files.STAT_TTL + 0.1)
    assert harness.run(["/bin/sh", "-c", f"cat {path}"]).text == "two, longer\n"
    assert harness.agent.count("read_file", path.encode()) == 2


def test_concurrent_opens_fetch_once(harness: Harness) -> None:
    path = f"{REMOTE}/shared.txt"
    harness.write(path, "shared\n")
    harness.agent.delay = 0.05
    script = " ".join(f"cat {path} &" for _ in range(6)) + " wait"
    assert harness.run(["/bin/sh", "-c", script]).text == "shared\n" * 6
    assert harness.agent.count("read_file", path.encode()) == 1


def test_first_open_is_one_round_trip(harness: Harness, probe: Path) -> None:
    """The first open of a file asks for it whole (read-file brings its stat):
    no stat first. A missing file is one round trip too."""
    path = f"{REMOTE}/first.txt"
    harness.write(path, "first\n")
    assert harness.run([str(probe), "cat", path]).text == "first\n"
    assert harness.agent.count("read_file", path.encode()) == 1
    assert harness.agent.count("stat", path.encode()) == 0
    missing = f"{REMOTE}/missing.txt"
    assert harness.run([str(probe), "cat", missing]).returncode != 0
    assert [name for name, argument in harness.agent.calls
            if argument == missing.encode()] == ["read_file"]


def test_first_open_of_a_directory_falls_back_to_stat(harness: Harness) -> None:
    """A directory opened without O_DIRECTORY: read-file is refused (EISDIR),
    the stat and the listing follow, and the open succeeds."""
    harness.write(f"{REMOTE}/dir/inside.txt", "x")
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); "
            "print(sorted(os.listdir(fd)))")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code, f"{REMOTE}/dir"])
    assert result.text == "['inside.txt']\n"


def test_python_sees_target_metadata_through_fstat(harness: Harness) -> None:
    """fstat of an injected fd (glibc: newfstatat AT_EMPTY_PATH) is the target's."""
    path = f"{REMOTE}/owned.txt"
    local = harness.write(path, "abc", mode=0o604)
    os.chown(local, 4321, 8765) if os.geteuid() == 0 else None
    code = (
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); s=os.fstat(fd); "
        "t=os.stat(sys.argv[1]); "
        "print(oct(s.st_mode), s.st_size, s.st_uid, s.st_gid, s.st_ino == t.st_ino, "
        "s.st_mtime_ns == t.st_mtime_ns)"
    )
    result = harness.run(["/usr/bin/python3", "-S", "-c", code, path])
    uid, gid = (4321, 8765) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    assert result.text == f"0o100604 3 {uid} {gid} True True\n"
    assert os.stat(local).st_ino != 0


def test_statx_reports_target_metadata(harness: Harness) -> None:
    harness.write(f"{REMOTE}/x.txt", "12345", mode=0o600)
    # GNU stat uses statx.
    result = harness.run(["/usr/bin/stat", "-c", "%s %a %F", f"{REMOTE}/x.txt"])
    assert result.text == "5 600 regular file\n"


def test_statfs_and_fstatfs_of_target_files_report_the_targets_filesystem(
        harness: Harness) -> None:
    """os.statvfs of a target path and os.fstatvfs of its fd reported this machine's /."""
    harness.write(f"{REMOTE}/x.txt", "12345")
    code = ("import os,sys; print(os.statvfs(sys.argv[1]).f_blocks, "
            "os.fstatvfs(os.open(sys.argv[1], os.O_RDONLY)).f_blocks, "
            "os.statvfs(sys.argv[2]).f_blocks)")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code, f"{REMOTE}/x.txt", "/usr"])
    # A local path (/usr is local by default) keeps the kernel's answer.
    assert result.text == f"{FAKE_FS_BLOCKS} {FAKE_FS_BLOCKS} {os.statvfs('/usr').f_blocks}\n"
    # GNU stat -f (statfs): the type field too.
    result = harness.run(["/usr/bin/stat", "-f", "-c", "%t %b", f"{REMOTE}/x.txt"])
    assert result.text == f"{FAKE_FS_TYPE:x} {FAKE_FS_BLOCKS}\n"
    result = harness.run(["/usr/bin/stat", "-f", "-c", "%b", f"{REMOTE}/missing"])
    assert result.returncode != 0 and harness.agent.count("statfs", f"{REMOTE}/missing".encode())


def test_statfs_with_an_agent_without_statfs_is_enosys(harness: Harness) -> None:
    """An older agent: a clear errno, never this machine's numbers for a target path."""
    harness.agent.capabilities.remove("files-statfs")
    harness.write(f"{REMOTE}/x.txt", "12345")
    code = ("import os,sys\ntry:\n    os.statvfs(sys.argv[1])\nexcept OSError as e:\n"
            "    print(e.errno)\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code, f"{REMOTE}/x.txt"])
    assert result.text == f"{errno.ENOSYS}\n"


def test_access_asks_the_target(harness: Harness) -> None:
    harness.write(f"{REMOTE}/here", "x")
    script = f"test -e {REMOTE}/here && echo yes; test -e {REMOTE}/nothere || echo no"
    assert harness.run(["/bin/sh", "-c", script]).text == "yes\nno\n"


# --- relative paths and chdir ------------------------------------------------------


def test_chdir_into_a_target_only_directory(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/work/notes.txt", "relative\n")
    harness.write(f"{REMOTE}/work/sub/deeper.txt", "deeper\n")
    script = (
        f"cd {REMOTE}/work && pwd && {probe} cat notes.txt && {probe} ls . && "
        f"cd sub && {probe} cat ../sub/deeper.txt && {probe} stat deeper.txt && pwd"
    )
    result = harness.run(["/bin/sh", "-c", script])
    assert result.text == (
        f"{REMOTE}/work\nrelative\nnotes.txt\nsub\ndeeper\n"
        f"size=7 mode=0644 type=file\n{REMOTE}/work/sub\n"
    )


def test_chdir_to_a_missing_target_directory_fails(harness: Harness) -> None:
    harness.write(f"{REMOTE}/file", "x")
    script = f"cd {REMOTE}/nope 2>/dev/null || echo nope; cd {REMOTE}/file 2>/dev/null || echo file"
    assert harness.run(["/bin/sh", "-c", script]).text == "nope\nfile\n"


def test_relative_paths_from_a_shadow_dirfd(harness: Harness) -> None:
    """openat/fstatat relative to an fd of a remote directory (find, ls -l)."""
    harness.write(f"{REMOTE}/tree/a/one.txt", "1")
    harness.write(f"{REMOTE}/tree/b/two.txt", "22")
    result = harness.run(["/usr/bin/find", f"{REMOTE}/tree", "-type", "f", "-size", "-3c"])
    assert sorted(result.text.split()) == [f"{REMOTE}/tree/a/one.txt", f"{REMOTE}/tree/b/two.txt"]
    python = (
        "import os,sys; d=os.open(sys.argv[1], os.O_RDONLY|os.O_DIRECTORY); "
        "print(os.stat('two.txt', dir_fd=d).st_size, open(os.open('two.txt', os.O_RDONLY, "
        "dir_fd=d)).read(), os.readlink(f'/proc/self/fd/{d}'))"
    )
    result = harness.run(["/usr/bin/python3", "-S", "-c", python, f"{REMOTE}/tree/b"])
    assert result.text == f"2 22 {REMOTE}/tree/b\n"


def test_go_getwd_after_chdir(harness: Harness, tmp_path: Path) -> None:
    harness.write(f"{REMOTE}/gowd/x", "x")
    python = "import os; os.chdir('/srv/mtrace-files-test/gowd'); print(os.getcwd()); " \
             "print(open('x').read())"
    result = harness.run(["/usr/bin/python3", "-S", "-c", python])
    assert result.text == f"{REMOTE}/gowd\nx\n"


# --- policy: modes and lists ----------------------------------------------------------


def test_local_mode_sees_local_files_only(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/config.txt", "remote\n")
    result = harness.run([str(probe), "cat", f"{REMOTE}/config.txt"], FsConfig(mode="local"))
    assert result.text == "error: ENOENT\n"
    assert harness.agent.calls == []


def test_localwithoverrides_reads_only_listed_paths(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/listed.txt", "listed\n")
    harness.write(f"{REMOTE}/unlisted.txt", "unlisted\n")
    config = FsConfig(mode="localwithoverrides", read_only=[r"/listed\.txt$"])
    assert harness.run([str(probe), "cat", f"{REMOTE}/listed.txt"], config).text == "listed\n"
    result = harness.run([str(probe), "cat", f"{REMOTE}/unlisted.txt"], config)
    assert result.text == "error: ENOENT\n"


def test_not_found_list(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/secret.txt", "secret\n")
    config = FsConfig(not_found=[r"secret"])
    assert harness.run([str(probe), "cat", f"{REMOTE}/secret.txt"], config).text == \
        "error: ENOENT\n"
    harness.write(f"{REMOTE}/public.txt", "public\n")
    assert harness.run([str(probe), "cat", f"{REMOTE}/public.txt"], config).text == "public\n"


def test_local_list_and_default_local(harness: Harness, probe: Path, tmp_path: Path) -> None:
    # /tmp is local by default: the target's /tmp/x is not seen...
    local_file = tmp_path / "here.txt"
    local_file.write_text("local\n")
    harness.write(str(local_file), "target copy\n")
    assert harness.run([str(probe), "cat", str(local_file)]).text == "local\n"
    # ...unless a user list says otherwise.
    config = FsConfig(read_only=[str(tmp_path)])
    assert harness.run([str(probe), "cat", str(local_file)], config).text == "target copy\n"
    # And a user `local` entry keeps a remote path local.
    harness.write(f"{REMOTE}/x.txt", "remote\n")
    config = FsConfig(local=[r"^/srv/"])
    assert harness.run([str(probe), "cat", f"{REMOTE}/x.txt"], config).text == "error: ENOENT\n"


def test_policy_order() -> None:
    policy = files.PathPolicy(
        FsConfig(mode="read", not_found=["/nf$"], local=["^/srv/loc"], read_only=["^/tmp/ro"],
                 read_write=["^/srv/rw"]),
        session_dir="/tmp/session", executable="/home/me/app", home="/home/me",
        start_directory="/home/me/project",
    )
    route = policy.route
    assert route(b"/tmp/session/shadow/etc") is files.Route.LOCAL
    assert route(b"/srv/loc/nf") is files.Route.NOT_FOUND
    assert route(b"/srv/loc/x") is files.Route.LOCAL
    assert route(b"/tmp/ro/x") is files.Route.READ
    assert route(b"/srv/rw/x") is files.Route.WRITE
    assert route(b"/tmp/other") is files.Route.LOCAL
    assert route(b"/usr/lib/x86_64-linux-gnu/libc.so.6") is files.Route.LOCAL
    assert route(b"/app/plugin.so.1") is files.Route.LOCAL
    assert route(b"/proc/self/status") is files.Route.LOCAL
    assert route(b"/home/me/project/config.yaml") is files.Route.LOCAL
    assert route(b"/etc/hosts") is files.Route.READ
    assert route(b"/etc/app.conf") is files.Route.READ
    assert route(b"/var/lib/app") is files.Route.READ
    local = files.PathPolicy(FsConfig(mode="local", read_only=["^/srv"]))
    assert local.route(b"/srv/x") is files.Route.LOCAL
    assert local.route(b"/etc/resolv.conf") is files.Route.READ
    write = files.PathPolicy(FsConfig(mode="write", default_local=False))
    assert write.route(b"/tmp/x") is files.Route.WRITE
    assert files.trapped_for(FsConfig(mode="write"))[-1] == "fdatasync"
    assert "exit_group" in files.TRAPPED
    assert "close" not in files.trapped_for(FsConfig())


# --- writes ---------------------------------------------------------------------------


def test_read_mode_writes_stay_local(harness: Harness, tmp_path: Path) -> None:
    harness.write(f"{REMOTE}/conf", "remote\n")
    local_dir = tmp_path / "out"
    local_dir.mkdir()
    # Writing a remote path in read mode creates it locally; it reads back locally.
    target = local_dir / "new.txt"
    config = FsConfig(read_only=[str(local_dir)])
    script = f"echo written > {target} && cat {target}"
    assert harness.run(["/bin/sh", "-c", script], config).text == "written\n"
    assert target.read_text() == "written\n"
    assert not (harness.target_root / str(target).lstrip("/")).exists()


def test_read_mode_never_changes_the_target(harness: Harness) -> None:
    remote = harness.write(f"{REMOTE}/keep.txt", "keep\n")
    script = (
        f"rm {REMOTE}/keep.txt 2>&1 | grep -o 'Read-only' ; "
        f"mkdir {REMOTE}/newdir 2>&1 | grep -o 'Read-only' ; "
        f"mv {REMOTE}/keep.txt {REMOTE}/moved.txt 2>&1 | grep -o 'Read-only'; cat {REMOTE}/keep.txt"
    )
    result = harness.run(["/bin/sh", "-c", script])
    assert result.text == "Read-only\nRead-only\nRead-only\nkeep\n"
    assert remote.read_text() == "keep\n"


def test_write_mode_creates_and_writes_target_files(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/existing.txt", "line one\n")
    config = FsConfig(mode="write")
    script = (
        f"echo created > {REMOTE}/created.txt && echo appended >> {REMOTE}/existing.txt && "
        f"cat {REMOTE}/existing.txt && mkdir {REMOTE}/made && mv {REMOTE}/created.txt "
        f"{REMOTE}/made/moved.txt && {probe} ls {REMOTE}/made"
    )
    result = harness.run(["/bin/sh", "-c", script], config)
    assert result.text == "line one\nappended\nmoved.txt\n"
    base = harness.target_root / REMOTE.lstrip("/")
    assert (base / "existing.txt").read_text() == "line one\nappended\n"
    assert (base / "made" / "moved.txt").read_text() == "created\n"
    assert not os.path.lexists(REMOTE)


def test_write_mode_uploads_at_exit_without_close(harness: Harness) -> None:
    """A process that exits without closing its file still reaches the target."""
    harness.write(f"{REMOTE}/unclosed.txt", "")
    code = (
        "import os; fd=os.open('/srv/mtrace-files-test/unclosed.txt', os.O_WRONLY|os.O_TRUNC); "
        "os.write(fd, b'not closed'); os._exit(0)"
    )
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.returncode == 0
    assert (harness.target_root / REMOTE.lstrip("/") / "unclosed.txt").read_text() == "not closed"


REWRITE = (
    "import os,errno\n"
    "fd = os.open('/srv/mtrace-files-test/big.bin', os.O_RDWR)\n"
    "os.pwrite(fd, b'N' * (3 << 20), 0)\n"
    "try: os.{call}(fd); print('ok')\n"
    "except OSError as e: print(errno.errorcode[e.errno])\n"
)


@pytest.mark.parametrize("call", ["close", "fsync"])
def test_interrupted_upload_leaves_the_old_file_and_fails_close(harness: Harness,
                                                                call: str) -> None:
    """The agent is lost half way through an upload: the target keeps the old
    file whole (it used to be half new, half old) and the program's close or
    fsync fails with EIO (it used to return 0)."""
    old = b"O" * (3 << 20)
    target = harness.write(f"{REMOTE}/big.bin", old)
    harness.agent.lose_on_write = 2
    result = harness.run(["/usr/bin/python3", "-S", "-c", REWRITE.format(call=call)],
                         FsConfig(mode="write"))
    assert result.text == "EIO\n"
    assert target.read_bytes() == old
    assert sorted(os.listdir(target.parent)) == ["big.bin"], "a temporary file was left behind"


def test_upload_keeps_mode_and_replaces_whole(harness: Harness) -> None:
    target = harness.write(f"{REMOTE}/big.bin", b"O" * (3 << 20), mode=0o640)
    before = target.stat()
    result = harness.run(["/usr/bin/python3", "-S", "-c", REWRITE.format(call="close")],
                         FsConfig(mode="write"))
    assert result.text == "ok\n"
    after = target.stat()
    assert target.read_bytes() == b"N" * (3 << 20)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid,
                                                           before.st_gid)
    assert after.st_ino != before.st_ino, "the file was rewritten in place, not replaced"
    assert sorted(os.listdir(target.parent)) == ["big.bin"]


def test_cp_p_gives_the_target_file_the_mode_and_times(harness: Harness,
                                                       tmp_path: Path) -> None:
    """fchmod/futimens on the copy were lost when the upload replaced the target's file."""
    source = tmp_path / "source"  # /tmp: local by default
    source.write_text("local contents\n")
    source.chmod(0o751)
    os.utime(source, ns=(3 * 10**9, 4 * 10**9))
    harness.write(f"{REMOTE}/keep", "")  # the directory
    result = harness.run(["/bin/cp", "-p", str(source), f"{REMOTE}/copied"],
                         FsConfig(mode="write"))
    assert result.returncode == 0
    copied = harness.target_root / REMOTE.lstrip("/") / "copied"
    assert copied.read_text() == "local contents\n"
    assert (stat.S_IMODE(copied.stat().st_mode), copied.stat().st_mtime_ns) == (0o751, 4 * 10**9)


def test_fd_metadata_of_a_target_copy_in_read_mode_is_erofs(harness: Harness) -> None:
    local = harness.write(f"{REMOTE}/ro.txt", "x", mode=0o644)
    code = ("import os,sys\nfd=os.open(sys.argv[1], os.O_RDONLY)\n"
            "for f in (lambda: os.fchmod(fd, 0o600), lambda: os.utime(fd, (1, 2))):\n"
            "    try:\n        f()\n    except OSError as e:\n        print(e.errno)\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code, f"{REMOTE}/ro.txt"])
    assert result.text == f"{errno.EROFS}\n{errno.EROFS}\n"
    assert stat.S_IMODE(local.stat().st_mode) == 0o644


def test_write_mode_unlink_truncate_and_errors(harness: Harness) -> None:
    harness.write(f"{REMOTE}/gone.txt", "x")
    harness.write(f"{REMOTE}/long.txt", "0123456789")
    config = FsConfig(mode="write")
    code = (
        "import os,errno\n"
        "os.unlink('/srv/mtrace-files-test/gone.txt')\n"
        "os.truncate('/srv/mtrace-files-test/long.txt', 4)\n"
        "try: os.open('/srv/mtrace-files-test/long.txt', os.O_WRONLY|os.O_CREAT|os.O_EXCL)\n"
        "except OSError as e: print(errno.errorcode[e.errno])\n"
        "try: os.rmdir('/srv/mtrace-files-test/nope')\n"
        "except OSError as e: print(errno.errorcode[e.errno])\n"
        "print(os.path.exists('/srv/mtrace-files-test/gone.txt'), "
        "os.stat('/srv/mtrace-files-test/long.txt').st_size)\n"
    )
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], config)
    assert result.text == "EEXIST\nENOENT\nFalse 4\n"
    base = harness.target_root / REMOTE.lstrip("/")
    assert not (base / "gone.txt").exists()
    assert (base / "long.txt").read_text() == "0123"


LINKS = r"""
import errno, os, stat, sys
base = sys.argv[1]
def outcome(function):
    try:
        function()
        return "ok"
    except OSError as error:
        return errno.errorcode[error.errno]
os.umask(0o027)
print(outcome(lambda: os.link(base + "/file", base + "/hard")),
      outcome(lambda: os.symlink("../relative/target", base + "/soft")),
      outcome(lambda: os.symlink("/absolute", base + "/abs")),
      outcome(lambda: os.mkfifo(base + "/fifo", 0o666)),
      outcome(lambda: os.mknod(base + "/regular", stat.S_IFREG | 0o644)),
      outcome(lambda: os.link(base + "/file", "/tmp/mtrace-never-here")),
      outcome(lambda: os.setxattr(base + "/file", b"user.k", b"v", os.XATTR_CREATE)),
      outcome(lambda: os.setxattr(base + "/file", b"user.k", b"v", os.XATTR_CREATE)),
      outcome(lambda: os.setxattr(base + "/file", b"user.other", b"v", os.XATTR_REPLACE)),
      outcome(lambda: os.setxattr(base + "/file", b"user.big", b"v" * 65537)),
      outcome(lambda: os.removexattr(base + "/missing", b"user.k")),
      outcome(lambda: os.removexattr(base + "/file", b"user.none")))
print(os.readlink(base + "/soft"), os.readlink(base + "/abs"),
      stat.S_ISFIFO(os.stat(base + "/fifo").st_mode), oct(os.stat(base + "/fifo").st_mode & 0o777),
      os.stat(base + "/hard").st_nlink)
"""


def test_write_mode_links_nodes_and_xattrs_are_made_in_the_target(harness: Harness) -> None:
    """They answered EPERM/ENOTSUP: no agent operation existed."""
    file = harness.write(f"{REMOTE}/file", "contents\n")
    base = file.parent
    result = harness.run(["/usr/bin/python3", "-S", "-c", LINKS, REMOTE], FsConfig(mode="write"))
    assert result.text.splitlines() == [
        "ok ok ok ok ok EXDEV ok EEXIST ENODATA E2BIG ENOENT ENODATA",
        "../relative/target /absolute True 0o640 2",
    ]
    assert os.stat(base / "hard").st_ino == file.stat().st_ino
    assert os.readlink(base / "soft") == "../relative/target"
    assert stat.S_ISFIFO(os.lstat(base / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(base / "fifo").st_mode) == 0o640  # the program's umask 027
    assert stat.S_ISREG(os.lstat(base / "regular").st_mode)
    assert os.getxattr(file, "user.k") == b"v"
    assert not os.path.lexists("/tmp/mtrace-never-here")
    assert not os.path.lexists(REMOTE)


XATTRS = r"""
import errno, os, sys
path = sys.argv[1]
def outcome(function):
    try:
        return repr(function())
    except OSError as error:
        return errno.errorcode[error.errno]
print(outcome(lambda: os.getxattr(path, "user.k")),
      outcome(lambda: sorted(os.listxattr(path))),
      outcome(lambda: os.getxattr(path, "user.none")),
      outcome(lambda: os.getxattr(path + ".missing", "user.k")))
"""


@pytest.mark.parametrize("mode", ["read", "write"])
def test_getxattr_and_listxattr_read_the_targets_attributes(harness: Harness, mode: str) -> None:
    """getfattr under mtrace showed none of a target file's attributes."""
    file = harness.write(f"{REMOTE}/file", "x")
    os.setxattr(file, "user.k", b"value")
    result = harness.run(["/usr/bin/python3", "-S", "-c", XATTRS, f"{REMOTE}/file"],
                         FsConfig(mode=mode))
    assert result.text == "b'value' ['user.k'] ENODATA ENOENT\n"
    # an older agent: none served, a missing file still ENOENT
    harness.agent.capabilities.remove("files-xattr-read")
    result = harness.run(["/usr/bin/python3", "-S", "-c", XATTRS, f"{REMOTE}/file"],
                         FsConfig(mode=mode))
    assert result.text == "ENODATA [] ENODATA ENOENT\n"


def test_links_and_xattrs_with_an_agent_without_them_are_refused(harness: Harness) -> None:
    """An older agent (no files-links, files-xattr): today's answers, nothing made."""
    harness.agent.capabilities = [cap for cap in harness.agent.capabilities
                                  if cap not in ("files-links", "files-xattr")]
    harness.write(f"{REMOTE}/file", "contents\n")
    code = ("import errno, os\nb = '/srv/mtrace-files-test'\n"
            "for f in (lambda: os.link(b + '/file', b + '/hard'), "
            "lambda: os.symlink('x', b + '/soft'), lambda: os.mkfifo(b + '/fifo'), "
            "lambda: os.setxattr(b + '/file', 'user.k', b'v'), "
            "lambda: os.removexattr(b + '/file', 'user.k')):\n"
            "    try:\n        f()\n    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.text.split() == ["EPERM", "EPERM", "EPERM", "ENOTSUP", "ENOTSUP"]
    assert sorted(os.listdir(harness.target_root / REMOTE.lstrip("/"))) == ["file"]
    assert harness.agent.count("link") == harness.agent.count("symlink") == 0


def test_a_hard_link_to_a_file_being_written_has_what_was_written(harness: Harness) -> None:
    """link() of a target file the program is writing: the new name must get
    the contents written so far, not the target's old ones."""
    harness.write(f"{REMOTE}/draft", "old\n")
    code = ("import os\nb = '/srv/mtrace-files-test'\n"
            "fd = os.open(b + '/draft', os.O_WRONLY | os.O_TRUNC)\n"
            "os.write(fd, b'written before the link\\n')\n"
            "os.link(b + '/draft', b + '/final')\n"
            "os.unlink(b + '/draft')\n"
            "os.close(fd)\n"
            "print(open(b + '/final').read(), end='')\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.text == "written before the link\n"
    base = harness.target_root / REMOTE.lstrip("/")
    assert (base / "final").read_text() == "written before the link\n"
    assert sorted(os.listdir(base)) == ["final"]


def test_a_rename_over_a_file_being_written_is_not_undone_by_its_upload(harness: Harness) -> None:
    """The copy of a file replaced by a rename was uploaded over the renamed
    file at close (locally, writes through the old fd go nowhere)."""
    harness.write(f"{REMOTE}/current", "current\n")
    harness.write(f"{REMOTE}/new", "new version\n")
    code = ("import os\nb = '/srv/mtrace-files-test'\n"
            "fd = os.open(b + '/current', os.O_WRONLY | os.O_APPEND)\n"
            "os.write(fd, b'appended\\n')\n"
            "os.fsync(fd)\n"
            "os.rename(b + '/new', b + '/current')\n"
            "os.write(fd, b'after the rename\\n')\n"
            "os.close(fd)\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.returncode == 0
    base = harness.target_root / REMOTE.lstrip("/")
    assert (base / "current").read_text() == "new version\n"
    assert sorted(os.listdir(base)) == ["current"]


def test_a_file_being_written_and_renamed_reaches_its_new_name(harness: Harness) -> None:
    harness.write(f"{REMOTE}/tmpname", "")
    code = ("import os\nb = '/srv/mtrace-files-test'\n"
            "fd = os.open(b + '/tmpname', os.O_WRONLY)\n"
            "os.write(fd, b'first ')\n"
            "os.rename(b + '/tmpname', b + '/renamed')\n"
            "os.write(fd, b'second\\n')\n"
            "os.close(fd)\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.returncode == 0
    base = harness.target_root / REMOTE.lstrip("/")
    assert (base / "renamed").read_text() == "first second\n"
    assert sorted(os.listdir(base)) == ["renamed"]


def test_fsetxattr_on_a_copy_sets_the_target_files_and_survives_the_upload(
        harness: Harness) -> None:
    file = harness.write(f"{REMOTE}/tagged", "old\n")
    code = ("import os\nfd = os.open('/srv/mtrace-files-test/tagged', os.O_WRONLY | os.O_TRUNC)\n"
            "os.write(fd, b'new\\n')\n"
            "os.setxattr(fd, 'user.tag', b'kept')\n"
            "os.setxattr(fd, 'user.gone', b'x')\n"
            "os.removexattr(fd, 'user.gone')\n"
            "os.close(fd)\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.returncode == 0
    assert file.read_text() == "new\n"
    assert os.listxattr(file) == ["user.tag"]
    assert os.getxattr(file, "user.tag") == b"kept"


def test_chmod_of_a_target_symlink_itself_is_eopnotsupp_as_on_linux(harness: Harness) -> None:
    """glibc's fchmodat(AT_SYMLINK_NOFOLLOW) (tar's, for every symlink it
    extracts) opens the link O_PATH|O_NOFOLLOW and fstats it: the open gave
    ELOOP under mtrace, so tar failed where Linux says EOPNOTSUPP and tar goes on."""
    file = harness.write(f"{REMOTE}/file", "x", mode=0o644)
    os.symlink("file", file.parent / "link")
    code = ("import os\ntry:\n    os.chmod('/srv/mtrace-files-test/link', 0o600, "
            "follow_symlinks=False)\nexcept NotImplementedError:\n    print('EOPNOTSUPP')\n"
            "except OSError as e:\n    print(e.strerror)\n"
            "fd = os.open('/srv/mtrace-files-test/link', os.O_PATH | os.O_NOFOLLOW)\n"
            "print(oct(os.stat(fd).st_mode))\n")
    for mode in ("read", "write"):
        result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode=mode))
        assert result.text == "EOPNOTSUPP\n0o120777\n", mode
    assert stat.S_IMODE(file.stat().st_mode) == 0o644


def test_chmod_through_proc_self_fd_of_a_copy_changes_the_target(harness: Harness) -> None:
    """tar's directory modes (glibc's fchmodat(AT_SYMLINK_NOFOLLOW): an O_PATH
    open, then chmod of /proc/self/fd/N) changed the copy, not the target's."""
    file = harness.write(f"{REMOTE}/dir/file", "x")
    os.chmod(file.parent, 0o700)
    code = ("import os\nfd = os.open('/srv/mtrace-files-test/dir', os.O_PATH | os.O_NOFOLLOW)\n"
            "os.chmod('/proc/self/fd/%d' % fd, 0o751)\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write"))
    assert result.returncode == 0
    assert stat.S_IMODE(file.parent.stat().st_mode) == 0o751
    result = harness.run(["/usr/bin/python3", "-S", "-c",
                          code + "print('changed')\n"], FsConfig(mode="read"))
    assert result.returncode != 0 and "changed" not in result.text


def test_links_and_xattrs_of_a_target_path_in_read_mode_are_erofs(harness: Harness) -> None:
    harness.write(f"{REMOTE}/file", "x")
    code = ("import errno, os\nb = '/srv/mtrace-files-test'\n"
            "fd = os.open(b + '/file', os.O_RDONLY)\n"
            "for f in (lambda: os.link(b + '/file', b + '/hard'), "
            "lambda: os.symlink('x', b + '/soft'), lambda: os.mkfifo(b + '/fifo'), "
            "lambda: os.setxattr(b + '/file', 'user.k', b'v'), "
            "lambda: os.setxattr(fd, 'user.k', b'v')):\n"
            "    try:\n        f()\n    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="read"))
    assert result.text.split() == ["EROFS"] * 5
    assert sorted(os.listdir(harness.target_root / REMOTE.lstrip("/"))) == ["file"]


def test_write_mode_needs_a_writable_agent(harness: Harness) -> None:
    harness.agent.service.writable = False
    harness.write(f"{REMOTE}/ro.txt", "x")
    code = (
        "import os,errno\n"
        "try: os.open('/srv/mtrace-files-test/ro.txt', os.O_WRONLY)\n"
        "except OSError as e: print(errno.errorcode[e.errno])\n"
    )
    assert harness.run(["/usr/bin/python3", "-S", "-c", code], FsConfig(mode="write")).text == \
        "EROFS\n"


# --- agent loss ------------------------------------------------------------------------


def test_lost_agent_gives_eio_and_never_hangs(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/x.txt", "x")
    harness.agent.lose()
    result = harness.run([str(probe), "cat", f"{REMOTE}/x.txt"])
    assert result.text == "error: EIO\n"
    result = harness.run([str(probe), "stat", f"{REMOTE}/x.txt"])
    assert result.text == "error: EIO\n"


def test_lost_agent_sets_the_context_flag(harness: Harness) -> None:
    harness.agent.lose()
    context = harness.context(FsConfig())
    feature = files.FilesFeature(context)

    async def attempt() -> object:
        return await feature._guarded(feature._open_for_reading(
            files.Target(b"/srv/x", b"/srv/x", True), os.O_RDONLY, False))

    outcome = harness.async_side.call(attempt(), timeout=10)
    assert outcome == files.Errno(errno.EIO)
    assert context.agent_lost
    # Later calls fail at once, without deferring.
    assert feature._defer(attempt()) == files.Errno(errno.EIO)


def test_shadow_symlinks_never_point_outside_the_tree(harness: Harness) -> None:
    base = harness.target_root / REMOTE.lstrip("/")
    base.mkdir(parents=True)
    (base / "abs").symlink_to("/etc/passwd")
    (base / "climb").symlink_to("../../../../../../etc/passwd")
    harness.run(["/bin/ls", REMOTE])
    shadow = harness.session_dir / "shadow" / REMOTE.lstrip("/")
    for name in ("abs", "climb"):
        link = os.readlink(shadow / name)
        assert link.startswith(str(harness.session_dir / "shadow") + "/"), link
    assert stat.S_ISLNK(os.lstat(shadow / "abs").st_mode)


def test_statfs_fields_match_the_kernels(tmp_path: Path) -> None:
    """The agent's fstatfs (ctypes) and the tracer's struct statfs agree with os.statvfs."""
    import struct

    from mtrace.agent.files import fs_stat_of_fd
    from mtrace.tracer import abi

    fd = os.open(tmp_path, os.O_PATH)
    try:
        info = fs_stat_of_fd(fd)
    finally:
        os.close(fd)
    local = os.statvfs(tmp_path)
    assert (info.bsize, info.blocks, info.files, info.namelen, info.frsize) == (
        local.f_bsize, local.f_blocks, local.f_files, local.f_namemax, local.f_frsize)
    assert info.type != 0
    packed = abi.pack_statfs(info, "x86_64")
    assert len(packed) == 120 and abi.pack_statfs(info, "aarch64") == packed
    assert struct.unpack_from("<QqQ", packed) == (info.type, info.bsize, info.blocks)
    assert struct.unpack_from("<IIq", packed, 56) == (*info.fsid, info.namelen)


def test_abi_struct_sizes() -> None:
    from mtrace.tracer import abi

    info = FileStat(mode=0o100644, ino=7, dev=os.makedev(8, 1), nlink=1, uid=1, gid=2, size=3,
                    atime_ns=1_500_000_001, mtime_ns=2_000_000_002, ctime_ns=3_000_000_003,
                    blksize=4096, blocks=8, rdev=0)
    assert len(abi.pack_stat(info, "x86_64")) == 144
    assert len(abi.pack_stat(info, "aarch64")) == 128
    assert len(abi.pack_statx(info)) == 256
    for arch in ("x86_64", "aarch64"):
        fields = abi.unpack_stat(abi.pack_stat(info, arch), arch)
        assert fields["mtime_ns"] == 2_000_000_002 and fields["mode"] == 0o100644
        assert fields["dev"] == os.makedev(8, 1) and fields["blocks"] == 8


def test_subprocess_unaffected_helpers() -> None:
    # Keeps the module importable on machines without python3 at /usr/bin.
    assert subprocess.run(["/usr/bin/python3", "-c", "pass"], check=False).returncode == 0


def test_o_path_open_of_a_remote_directory_is_injectable(harness: Harness) -> None:
    """Regression: ADDFD refuses O_PATH fds (EBADF); GNU mv opens "dir/" with O_PATH."""
    harness.write(f"{REMOTE}/f", "x\n")
    (harness.target_root / REMOTE.lstrip("/") / "made").mkdir()
    script = f"cd {REMOTE} && mv f made/ && ls made"
    assert harness.run(["/bin/sh", "-c", script], FsConfig(mode="write")).text == "f\n"
    assert (harness.target_root / REMOTE.lstrip("/") / "made" / "f").read_text() == "x\n"


def test_write_mode_with_only_the_base_calls_trapped(harness: Harness) -> None:
    """A session that traps only ``files.TRAPPED`` (no close) still uploads at exit."""
    harness.write(f"{REMOTE}/notes.txt", "one\n")
    script = f"echo two >> {REMOTE}/notes.txt; echo three > {REMOTE}/fresh.txt"
    result = harness.run(["/bin/sh", "-c", script], FsConfig(mode="write"),
                         trapped=files.TRAPPED)
    assert result.returncode == 0
    base = harness.target_root / REMOTE.lstrip("/")
    assert (base / "notes.txt").read_text() == "one\ntwo\n"
    assert (base / "fresh.txt").read_text() == "three\n"


def test_getcwd_syscall_and_proc_self_cwd_after_chdir(harness: Harness, probe: Path) -> None:
    harness.write(f"{REMOTE}/wd/f", "f\n")
    script = (f"cd {REMOTE}/wd && /bin/pwd -P && readlink /proc/self/cwd && "
              f"{probe} readlink /proc/self/cwd")
    result = harness.run(["/bin/sh", "-c", script])
    assert result.text == f"{REMOTE}/wd\n" * 3


# --- feature.fs.mapping ------------------------------------------------------------


def test_fs_mapping_rewrites_the_path_before_routing(harness: Harness, probe: Path) -> None:
    harness.write("/etc/mtrace-mapped-app/settings.conf", "target's settings\n")
    config = FsConfig(mapping={"^/app/config": "/etc/mtrace-mapped-app"})
    with local_absent("/app/config", "/etc/mtrace-mapped-app"):
        result = harness.run([str(probe), "cat", "/app/config/settings.conf"], config)
        listed = harness.run([str(probe), "ls", "/app/config"], config)
    assert (result.returncode, result.text) == (0, "target's settings\n")
    assert listed.text == "settings.conf\n"
    assert harness.agent.count("read_file", b"/etc/mtrace-mapped-app/settings.conf") == 1


def test_fs_mapping_capture_groups_and_local_destination(harness: Harness, probe: Path,
                                                         tmp_path: Path) -> None:
    local_dir = tmp_path / "configs"
    local_dir.mkdir()
    (local_dir / "alice-api.conf").write_text("local copy\n")
    config = FsConfig(mapping={r"^/srv/mtrace-users/(?<user>\w+)/(\w+)\.conf$":
                               str(local_dir) + "/${user}-$2.conf"})
    # /tmp (tmp_path) is in the default local list: the mapped path is served locally.
    result = harness.run([str(probe), "cat", "/srv/mtrace-users/alice/api.conf"], config)
    assert (result.returncode, result.text) == (0, "local copy\n")
    assert harness.agent.count("read_file") == 0


def test_inotify_watch_of_a_target_path_is_enotsup_and_local_watches_work(
        harness: Harness, tmp_path: Path) -> None:
    """A watch of a target path watched this machine's path of that name (or failed
    with ENOENT); a watch of a local directory must keep working."""
    harness.write(f"{REMOTE}/watched.txt", "x")
    local = tmp_path / "local-dir"
    local.mkdir()
    code = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.inotify_init1(0)\n"
        "for path in sys.argv[1:]:\n"
        "    print(libc.inotify_add_watch(fd, path.encode(), 0x100) >= 0 or ctypes.get_errno())\n")
    result = harness.run(["/usr/bin/python3", "-S", "-c", code, f"{REMOTE}/watched.txt",
                          str(local)])
    assert result.text == f"{errno.ENOTSUP}\nTrue\n"
