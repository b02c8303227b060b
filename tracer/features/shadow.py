"""The shadow tree: local copies of the target's files, made on demand.

``session_dir/shadow`` mirrors the target's absolute paths: ``/etc/app.conf``
in the target is ``shadow/etc/app.conf`` here. A tracee that opens a remote
file gets an fd of its shadow copy, so read, lseek, mmap, pread and getdents64
run at full speed in the kernel, untrapped.

- **Files** are fetched whole (one round trip up to 1 MiB, chunked reads into
  a temporary file above, renamed into place) and cached by the remote
  ``(size, mtime_ns)``: an open with the same key reuses the copy, a changed
  key fetches again. Concurrent opens of one file share one fetch. An fd the
  tracee already holds keeps the copy it opened (the new one is renamed over
  it), as with a file replaced on disk.
- **Directories** opened by the tracee are listed from the target: every entry
  exists in the shadow directory (files as empty placeholders, directories,
  symlinks), and names the target no longer has are removed, so getdents64 on
  the injected fd lists exactly the target's names. Placeholders are never
  handed out: opening one fetches it.
- **Symlinks** are recreated with their targets rewritten to point inside the
  shadow tree, so a kernel walk the supervisor does not see (an untrapped
  call relative to a shadow directory fd) can never reach this machine's files.
- **Metadata**: every inode handed to a tracee is remembered with the target's
  stat (``node_of``), so fstat of the fd reports the target's metadata.
- **Write-back** (write mode): a shadow file opened for writing is *tracked*;
  ``write_back`` uploads it when it changed since the last upload (on close,
  fsync, process exit, and a periodic sweep; see ``mtrace.tracer.features.files``),
  replacing the target's file atomically (the agent's ``files-upload``).

Everything that touches the agent runs on the async side's loop; the trap loop
only reads ``node_of`` (plain dict lookups).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import msgspec

from ...agent.client import AgentClient
from ...agent.errors import AgentError, AgentUnavailable, RemoteError
from ...agent.protocol import (
    CAP_FILES_TIMES,
    CAP_FILES_UPLOAD,
    DirEntry,
    FileContents,
    FileStat,
    TimeSpec,
)

log = logging.getLogger("mtrace.tracer.features.shadow")

#: Files up to this size come in one round trip (read_file), bigger ones in chunks.
WHOLE_FILE_LIMIT = 1 << 20
CHUNK_SIZE = 1 << 20
#: How long a directory listing is reused before the target is asked again.
LISTING_TTL = 1.0

_DT_DIR = 4
_DT_LNK = 10
_DELETED = b" (deleted)"


def _same_version(first: FileStat, second: FileStat) -> bool:
    return (first.ino, first.dev, first.size, first.mtime_ns) == (
        second.ino, second.dev, second.size, second.mtime_ns)


def normalize(path: bytes) -> bytes:
    """Lexically absolute and clean: no ``//``, ``.`` or ``..`` (``..`` stops at ``/``)."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return b"/" + b"/".join(parts)


class Node(msgspec.Struct):
    """An inode handed to a tracee: which remote object it stands for."""

    remote_path: bytes
    stat: FileStat
    # Write mode: the file is uploaded when it changes (see ShadowTree.write_back).
    tracked: bool = False
    synced: tuple[int, int] = (-1, -1)
    # A supervisor fd of the inode, so uploads work after renames and unlinks.
    fd: int = -1
    lock: asyncio.Lock | None = None
    # Times the tracee set through an fd (futimens): an upload replaces the
    # target's file, so they are set again after the next one.
    times: tuple[TimeSpec, TimeSpec] | None = None


class _Copy(msgspec.Struct):
    key: tuple[int, int]
    # Tracked writers exist: the local copy is newer than the target's.
    pinned: bool = False


@dataclass
class ShadowTree:
    root: bytes
    _copies: dict[bytes, _Copy] = field(default_factory=dict)
    _fetching: dict[bytes, asyncio.Future[None]] = field(default_factory=dict)
    _listed: dict[bytes, float] = field(default_factory=dict)
    _nodes: dict[tuple[int, int], Node] = field(default_factory=dict)
    _stand_ins: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.root = os.fsencode(self.root).rstrip(b"/")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.device = os.stat(self.root).st_dev

    # --- names -------------------------------------------------------------

    def shadow_path(self, remote_path: bytes) -> bytes:
        return self.root + normalize(remote_path) if remote_path != b"/" else self.root

    def remote_path(self, local_path: bytes) -> bytes | None:
        """The remote path a local path of the shadow tree stands for, else None."""
        if local_path.endswith(_DELETED):
            local_path = local_path[: -len(_DELETED)]
        if local_path == self.root:
            return b"/"
        if local_path.startswith(self.root + b"/"):
            return local_path[len(self.root):]
        return None

    # --- inodes handed out ---------------------------------------------------

    def remember(self, fd: int, remote_path: bytes, info: FileStat) -> Node:
        """Note that the inode of ``fd`` (about to be injected) stands for ``remote_path``."""
        local = os.fstat(fd)
        key = (local.st_dev, local.st_ino)
        node = self._nodes.get(key)
        if node is None:
            node = self._nodes[key] = Node(remote_path, info)
        else:
            node.remote_path = remote_path
            node.stat = info
        return node

    def node_of(self, device: int, inode: int) -> Node | None:
        if device != self.device:
            return None
        return self._nodes.get((device, inode))

    def tracked_nodes(self) -> list[Node]:
        return [node for node in self._nodes.values() if node.tracked]

    # --- files -------------------------------------------------------------

    def cached_file(self, remote_path: bytes, info: FileStat) -> bytes | None:
        """The shadow path of ``remote_path`` if its copy matches ``info`` now
        (no fetch, no wait: callable from the trap loop); else None."""
        key = normalize(remote_path)
        copy = self._copies.get(key)
        if copy is None or key in self._fetching or not (
                copy.pinned or copy.key == (info.size, info.mtime_ns)):
            return None
        return self.shadow_path(key)

    def never_fetched(self, remote_path: bytes) -> bool:
        """No copy of ``remote_path`` exists or is being made (its first open)."""
        key = normalize(remote_path)
        return key not in self._copies and key not in self._fetching

    async def file(self, client: AgentClient, remote_path: bytes, info: FileStat,
                   contents: FileContents | None = None) -> bytes:
        """The shadow path of an up-to-date copy of the regular file ``remote_path``.

        ``contents``: the file as the target already sent it (read at the same
        time as ``info``); used when its stat matches ``info``, else fetched again.
        """
        key = normalize(remote_path)
        local = self.shadow_path(key)
        while True:
            copy = self._copies.get(key)
            if copy is not None and (copy.pinned or copy.key == (info.size, info.mtime_ns)):
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(local).st_mode):
                        return local
            pending = self._fetching.get(key)
            if pending is None:
                break
            # Another open fetches it: wait, then check its key again.
            await asyncio.shield(pending)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fetching[key] = future
        try:
            if contents is not None and _same_version(contents.stat, info):
                fetched_key = self._store(local, contents)
            else:
                fetched_key = await self._fetch(client, remote_path, local, info)
            self._copies[key] = _Copy(fetched_key)
        finally:
            del self._fetching[key]
            future.set_result(None)
        return local

    def _store(self, local: bytes, contents: FileContents) -> tuple[int, int]:
        self._ensure_parent(local)
        temporary = local + b".mtrace-fetch-%d" % id(contents)
        try:
            with open(temporary, "wb") as output:
                output.write(contents.data)
            self._replace(temporary, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return contents.stat.size, contents.stat.mtime_ns

    async def _fetch(
        self, client: AgentClient, remote_path: bytes, local: bytes, info: FileStat
    ) -> tuple[int, int]:
        if info.size <= WHOLE_FILE_LIMIT:
            return self._store(local, await client.read_file(remote_path))
        self._ensure_parent(local)
        temporary = local + b".mtrace-fetch-%d" % id(info)
        try:
            fetched = await self._fetch_chunks(client, remote_path, temporary)
            self._replace(temporary, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return fetched.size, fetched.mtime_ns

    @staticmethod
    async def _fetch_chunks(client: AgentClient, remote_path: bytes, temporary: bytes) -> FileStat:
        opened = await client.open(remote_path)
        try:
            with open(temporary, "wb") as output:
                offset = 0
                while True:
                    data = await client.read(opened.handle, CHUNK_SIZE, offset)
                    if not data.data:
                        break
                    output.write(data.data)
                    offset += len(data.data)
        finally:
            with contextlib.suppress(OSError, Exception):
                await client.close_file(opened.handle)
        return opened.stat

    def empty_file(self, remote_path: bytes, info: FileStat, *, truncate: bool) -> bytes:
        """Make the shadow copy of a file the target just created or truncated.

        An existing copy is truncated in place, so fds other opens hold see it.
        """
        key = normalize(remote_path)
        local = self.shadow_path(key)
        self._ensure_parent(local)
        try:
            existing = os.lstat(local)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            self._remove(local)
            existing = None
        if existing is None:
            os.close(os.open(local, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        elif truncate:
            os.truncate(local, 0)
        self._copies[key] = _Copy((info.size, info.mtime_ns))
        return local

    def stand_in(self, remote_path: bytes) -> int:
        """A read-only fd of a new, already unlinked, empty file beside
        ``remote_path``'s copy: an inode of its own to remember an object by
        (a symlink) that cannot itself be handed to the tracee."""
        local = self.shadow_path(normalize(remote_path))
        self._ensure_parent(local)
        name = local + b".mtrace-stand-in-%d" % next(self._stand_ins)
        fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o400)
        os.unlink(name)
        return fd

    def pin(self, remote_path: bytes) -> None:
        """The local copy has writers: never replace it by a fetch."""
        copy = self._copies.get(normalize(remote_path))
        if copy is not None:
            copy.pinned = True

    def is_pinned(self, remote_path: bytes) -> bool:
        copy = self._copies.get(normalize(remote_path))
        return copy is not None and copy.pinned

    def truncated(self, remote_path: bytes, length: int) -> None:
        """The target truncated ``remote_path``: a copy with writers follows in
        place, any other copy is fetched again on its next open."""
        key = normalize(remote_path)
        copy = self._copies.get(key)
        if copy is None:
            return
        if copy.pinned:
            with contextlib.suppress(OSError):
                os.truncate(self.shadow_path(key), length)
        else:
            del self._copies[key]

    # --- directories -------------------------------------------------------

    async def directory(self, client: AgentClient, remote_path: bytes) -> bytes:
        """The shadow path of a directory holding exactly the target's entries."""
        key = normalize(remote_path)
        local = self.shadow_path(key)
        listed = self._listed.get(key)
        if listed is not None and time.monotonic() - listed < LISTING_TTL:
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(local).st_mode):
                    return local
        entries = await client.readdir(remote_path)
        links = [entry for entry in entries if entry.type == _DT_LNK]
        targets = await asyncio.gather(
            *(client.readlink(remote_path.rstrip(b"/") + b"/" + entry.name) for entry in links),
            return_exceptions=True,
        )
        link_targets = {
            entry.name: target for entry, target in zip(links, targets, strict=True)
            if isinstance(target, bytes)
        }
        self._ensure_directory(local)
        self._sync_entries(key, local, entries, link_targets)
        self._listed[key] = time.monotonic()
        return local

    def _sync_entries(self, key: bytes, local: bytes, entries: list[DirEntry],
                      link_targets: dict[bytes, bytes]) -> None:
        wanted = {entry.name: entry.type for entry in entries}
        with os.scandir(local) as present:
            existing = {os.fsencode(item.name): item for item in present}
        for name in existing:
            if name not in wanted:
                self._remove(os.path.join(local, name))
        for name, kind in wanted.items():
            if b"/" in name or name in (b".", b".."):
                continue
            path = os.path.join(local, name)
            item = existing.get(name)
            if kind == _DT_DIR:
                if item is not None and item.is_dir(follow_symlinks=False):
                    continue
                if item is not None:
                    self._remove(path)
                os.mkdir(path, 0o700)
            elif kind == _DT_LNK:
                target = self._link_target(key, link_targets.get(name, b""))
                if item is not None:
                    if item.is_symlink() and os.readlink(path) == target:
                        continue
                    if item.is_dir(follow_symlinks=False):
                        # Files were fetched through this link; keep them.
                        continue
                    self._remove(path)
                os.symlink(target, path)
            else:
                if item is not None:
                    if item.is_file(follow_symlinks=False):
                        continue
                    self._remove(path)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                 0o600))

    def _link_target(self, directory: bytes, target: bytes) -> bytes:
        if not target:
            return self.root + b"/.mtrace-unreadable-link"
        if target.startswith(b"/"):
            return self.shadow_path(target)
        return self.shadow_path(directory + b"/" + target)

    # --- local tree maintenance ----------------------------------------------

    def _ensure_directory(self, local: bytes) -> None:
        """Create ``local`` and its parents as real directories, never following
        a symlink (a placeholder for a remote symlink becomes a directory)."""
        if local == self.root:
            return
        relative = local[len(self.root) + 1:]
        current = self.root
        for part in relative.split(b"/"):
            current = current + b"/" + part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o700)
                continue
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(current)
                os.mkdir(current, 0o700)

    def _ensure_parent(self, local: bytes) -> None:
        self._ensure_directory(os.path.dirname(local))

    def _replace(self, temporary: bytes, local: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(local).st_mode):
                self._remove(local)
        os.rename(temporary, local)

    @staticmethod
    def _remove(path: bytes) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)

    # --- write mode: changes the target made ----------------------------------

    def forget(self, remote_path: bytes) -> None:
        """The target removed ``remote_path``: drop its copy and listing."""
        key = normalize(remote_path)
        self._stop_tracking(key)
        self._copies.pop(key, None)
        self._listed.pop(key, None)
        self._listed.pop(normalize(key + b"/.."), None)
        self._remove(self.shadow_path(key))

    def moved(self, source: bytes, destination: bytes) -> None:
        """The target renamed ``source`` to ``destination``: follow it here."""
        source, destination = normalize(source), normalize(destination)
        if source == destination:
            return
        self._stop_tracking(destination)
        local_source, local_destination = self.shadow_path(source), self.shadow_path(destination)
        for parent in (source, destination):
            self._listed.pop(normalize(parent + b"/.."), None)
        if os.path.lexists(local_source):
            self._ensure_parent(local_destination)
            with contextlib.suppress(OSError):
                self._remove(local_destination)
                os.rename(local_source, local_destination)
        prefix = source + b"/"
        for key in list(self._copies):
            if key == source or key.startswith(prefix):
                self._copies[destination + key[len(source):]] = self._copies.pop(key)
        for node in self._nodes.values():
            path = normalize(node.remote_path)
            if path == source or path.startswith(prefix):
                node.remote_path = destination + path[len(source):]

    def _stop_tracking(self, remote_path: bytes) -> None:
        """``remote_path`` (a file or a tree) is gone from its name in the
        target: what a program still writes through an fd opened before is
        never uploaded over whatever gets that name next (as writes to an
        unlinked file go nowhere)."""
        prefix = remote_path + b"/"
        for node in self._nodes.values():
            path = normalize(node.remote_path)
            if node.tracked and (path == remote_path or path.startswith(prefix)):
                node.tracked = False

    def invalidate_listing(self, remote_path: bytes) -> None:
        self._listed.pop(normalize(remote_path), None)

    # --- write mode: uploads ---------------------------------------------------

    def track(self, node: Node, fd: int) -> None:
        """Upload this inode's changes from now on (``fd``: the copy's fd, kept)."""
        local = os.fstat(fd)
        if node.fd < 0:
            # Readable whatever the tracee's access mode (its fd may be O_WRONLY).
            node.fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        if not node.tracked:
            node.tracked = True
            node.synced = (local.st_size, local.st_mtime_ns)
            node.lock = asyncio.Lock()
        self.pin(node.remote_path)

    async def write_back(self, client: AgentClient, node: Node) -> None:
        """Upload the copy if it changed since the last upload.

        With an agent that offers ``files-upload`` the target's file is
        replaced whole and atomically (a temporary file beside it, renamed
        over): its readers, and a failure half way, see the old file or the
        new one, never a mix; two sessions uploading the same file: the last
        commit wins. An older agent gets the copy written over the file in
        place. A failure raises (OSError, AgentError).
        """
        if not node.tracked or node.fd < 0 or node.lock is None:
            return
        async with node.lock:
            local = os.fstat(node.fd)
            state = (local.st_size, local.st_mtime_ns)
            if state == node.synced:
                return
            atomic = CAP_FILES_UPLOAD in client.capabilities
            try:
                opened = await (client.upload_begin(node.remote_path) if atomic
                                else client.open(node.remote_path, os.O_WRONLY))
            except OSError as error:
                if error.errno in (errno.ENOENT, errno.ENOTDIR):
                    node.tracked = False  # removed in the target meanwhile
                    return
                raise
            committed = False
            try:
                offset = 0
                while offset < local.st_size:
                    data = os.pread(node.fd, CHUNK_SIZE, offset)
                    if not data:
                        break
                    await client.write(opened.handle, data, offset)
                    offset += len(data)
                if atomic:
                    committed = True  # the agent closes the handle, whatever the outcome
                    remote = await client.upload_commit(opened.handle)
            finally:
                if not committed:
                    with contextlib.suppress(Exception):
                        await client.close_file(opened.handle)
            if not atomic:
                await client.truncate(node.remote_path, local.st_size)
                remote = await client.stat(node.remote_path)
            if node.times is not None and CAP_FILES_TIMES in client.capabilities:
                # cp -p, rsync, tar: contents, then futimens, then close. The
                # contents are in: a refusal here is a warning, not a failed close.
                times, node.times = node.times, None
                try:
                    await client.set_times(node.remote_path, *times)
                    remote = await client.stat(node.remote_path)
                except RemoteError as error:
                    log.warning("could not set the times of %s in the target: %s",
                                os.fsdecode(node.remote_path), error)
            node.synced = state
            node.stat = remote
            copy = self._copies.get(normalize(node.remote_path))
            if copy is not None:
                copy.key = (remote.size, remote.mtime_ns)

    async def write_back_all(self, client: AgentClient) -> None:
        """Upload every changed copy; a failure is logged and the next file tried
        (what is still unsaved at the end is in ``unsaved``)."""
        for node in self.tracked_nodes():
            try:
                await self.write_back(client, node)
            except (OSError, AgentError) as error:
                log.warning("could not write %s back to the target: %s",
                            os.fsdecode(node.remote_path), error)
                if isinstance(error, AgentUnavailable):
                    raise

    def unsaved(self) -> list[bytes]:
        """Remote paths whose copy changed since its last successful upload."""
        paths = []
        for node in self.tracked_nodes():
            with contextlib.suppress(OSError):
                local = os.fstat(node.fd)
                if (local.st_size, local.st_mtime_ns) != node.synced:
                    paths.append(node.remote_path)
        return paths
