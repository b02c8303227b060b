"""Path resolution under a root (both resolvers) and the file operations on top of it."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtrace.agent.files import (
    MAX_SYMLINKS,
    FileService,
    HandleTable,
    Openat2Resolver,
    RootResolver,
    WalkingResolver,
)
from mtrace.agent.protocol import XATTR_CREATE, XATTR_REPLACE

OUTSIDE_CONTENT = b"outside the root\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A root with traps: every path that leaves it must land back inside.

    tmp/secret.txt                       outside the root (must never be read)
    tmp/root/etc/hosts                   "root hosts"
    tmp/root/secret.txt                  "inside"  (what escapes should find instead)
    tmp/root/etc/abs-hosts -> /etc/hosts           absolute: the root's /etc/hosts
    tmp/root/up -> ../../..                        climbs: stops at the root
    tmp/root/deep/a/b/climb -> ../../../../../secret.txt
    tmp/root/abs-escape -> /../../secret.txt
    tmp/root/host-path -> <absolute path of tmp/secret.txt>  (a host path: inside it means nothing)
    tmp/root/loop1 -> loop2, loop2 -> loop1
    tmp/root/dangling -> /newfile
    tmp/root/dir-link -> /etc/
    """
    (tmp_path / "secret.txt").write_bytes(OUTSIDE_CONTENT)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_bytes(b"root hosts\n")
    (root / "secret.txt").write_bytes(b"inside\n")
    (root / "etc" / "abs-hosts").symlink_to("/etc/hosts")
    (root / "up").symlink_to("../../..")
    (root / "deep" / "a" / "b").mkdir(parents=True)
    (root / "deep" / "a" / "b" / "climb").symlink_to("../../../../../secret.txt")
    (root / "abs-escape").symlink_to("/../../secret.txt")
    (root / "host-path").symlink_to(tmp_path / "secret.txt")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "dangling").symlink_to("/newfile")
    (root / "dir-link").symlink_to("/etc/")
    return root


def _openat2_available(root: Path) -> bool:
    try:
        Openat2Resolver(str(root)).close()
    except OSError:
        return False
    return True


@pytest.fixture(params=["walk", "openat2"])
def resolver(request: pytest.FixtureRequest, tree: Path) -> Iterator[RootResolver]:
    if request.param == "openat2":
        if not _openat2_available(tree):
            pytest.skip("openat2 is not available on this kernel")
        chosen: RootResolver = Openat2Resolver(str(tree))
    else:
        chosen = WalkingResolver(str(tree))
    yield chosen
    chosen.close()


@pytest.fixture
def files(resolver: RootResolver) -> FileService:
    return FileService(resolver, writable=False)


@pytest.fixture
def writable(resolver: RootResolver) -> FileService:
    return FileService(resolver, writable=True)


def _read(files: FileService, path: str) -> bytes:
    return files.read_file(path.encode(), 1 << 20).data


@pytest.mark.parametrize(
    "path",
    [
        "/secret.txt",
        "secret.txt",
        "/../secret.txt",
        "/../../../../secret.txt",
        "../../secret.txt",
        "/etc/../../secret.txt",
        "/up/secret.txt",
        "/up/up/../secret.txt",
        "/deep/a/b/climb",
        "/abs-escape",
        "/deep/a/b/../../../../../../secret.txt",
    ],
)
def test_escapes_through_dotdot_and_symlinks_stay_in_the_root(files: FileService, path: str) -> None:
    assert _read(files, path) == b"inside\n"


def test_absolute_symlinks_resolve_inside_the_root(files: FileService) -> None:
    assert _read(files, "/etc/abs-hosts") == b"root hosts\n"
    assert _read(files, "/dir-link/hosts") == b"root hosts\n"


def test_a_host_path_symlink_means_that_path_inside_the_root(files: FileService, tree: Path) -> None:
    # The link names tmp/secret.txt by its host path: inside the root, that
    # path does not exist, and the host file must not be reached.
    with pytest.raises(FileNotFoundError):
        _read(files, "/host-path")
    assert (tree.parent / "secret.txt").read_bytes() == OUTSIDE_CONTENT


def test_symlink_loops_fail_with_eloop(files: FileService) -> None:
    with pytest.raises(OSError) as caught:
        _read(files, "/loop1")
    assert caught.value.errno == errno.ELOOP


def test_a_chain_longer_than_the_limit_fails_with_eloop(tree: Path, files: FileService) -> None:
    for index in range(MAX_SYMLINKS + 2):
        (tree / f"chain{index}").symlink_to(f"chain{index + 1}")
    (tree / f"chain{MAX_SYMLINKS + 2}").write_bytes(b"end\n")
    with pytest.raises(OSError) as caught:
        _read(files, "/chain0")
    assert caught.value.errno == errno.ELOOP
    assert _read(files, f"/chain{MAX_SYMLINKS - 5}") == b"end\n"


def test_stat_and_lstat(files: FileService, tree: Path) -> None:
    followed = files.stat(b"/etc/abs-hosts", True)
    assert stat.S_ISREG(followed.mode)
    assert followed.size == len(b"root hosts\n")
    assert followed.ino == os.stat(tree / "etc" / "hosts").st_ino
    link = files.stat(b"/etc/abs-hosts", False)
    assert stat.S_ISLNK(link.mode)
    expected = os.lstat(tree / "etc" / "abs-hosts")
    assert (link.ino, link.mtime_ns, link.nlink) == (
        expected.st_ino,
        expected.st_mtime_ns,
        expected.st_nlink,
    )
    assert stat.S_ISDIR(files.stat(b"/", True).mode)
    assert files.stat(b"/..", True).ino == os.stat(tree).st_ino
    assert files.stat(b"/dir-link/", False).ino == os.stat(tree / "etc").st_ino


def test_errors_carry_the_real_errno(files: FileService) -> None:
    cases = {
        b"/missing": errno.ENOENT,
        b"/secret.txt/x": errno.ENOTDIR,
        b"": errno.ENOENT,
        b"/bad\0path": errno.EINVAL,
    }
    for path, code in cases.items():
        with pytest.raises(OSError) as caught:
            files.stat(path, True)
        assert caught.value.errno == code, path


def test_readlink_returns_the_link_text_unresolved(files: FileService) -> None:
    assert files.readlink(b"/etc/abs-hosts") == b"/etc/hosts"
    assert files.readlink(b"/deep/a/b/climb") == b"../../../../../secret.txt"
    with pytest.raises(OSError) as caught:
        files.readlink(b"/secret.txt")
    assert caught.value.errno == errno.EINVAL


def test_readdir_lists_names_and_types(files: FileService) -> None:
    entries = {entry.name: entry.type for entry in files.readdir(b"/").entries}
    assert entries[b"etc"] == 4  # DT_DIR
    assert entries[b"secret.txt"] == 8  # DT_REG
    assert entries[b"up"] == 10  # DT_LNK
    assert b"." not in entries
    via_link = {entry.name for entry in files.readdir(b"/dir-link").entries}
    assert via_link == {b"hosts", b"abs-hosts"}


def test_access(files: FileService, tree: Path) -> None:
    files.access(b"/secret.txt", os.R_OK)
    with pytest.raises(OSError) as caught:
        files.access(b"/secret.txt", os.W_OK)
    assert caught.value.errno == errno.EROFS
    (tree / "script").write_bytes(b"")
    os.chmod(tree / "script", 0o644)
    with pytest.raises(OSError) as caught:
        files.access(b"/script", os.X_OK)
    assert caught.value.errno == errno.EACCES


def test_read_only_mode_refuses_every_write(files: FileService) -> None:
    attempts = [
        lambda: files.open(b"/new", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: files.open(b"/secret.txt", os.O_RDWR, 0),
        lambda: files.open(b"/secret.txt", os.O_RDONLY | os.O_TRUNC, 0),
        lambda: files.mkdir(b"/d", 0o755),
        lambda: files.unlink(b"/secret.txt", False),
        lambda: files.rename(b"/secret.txt", b"/moved"),
        lambda: files.truncate(b"/secret.txt", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS


def test_write_operations_stay_inside_the_root(writable: FileService, tree: Path) -> None:
    # Creating through a dangling absolute symlink creates inside the root.
    fd, _ = writable.open(b"/dangling", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert writable.write(fd, b"hello", None) == 5
        assert writable.write(fd, b"J", 0) == 1
    finally:
        os.close(fd)
    assert (tree / "newfile").read_bytes() == b"Jello"
    assert not Path("/newfile").exists()
    writable.mkdir(b"/up/made", 0o755)
    assert (tree / "made").is_dir()
    writable.rename(b"/newfile", b"/up/made/renamed")
    assert (tree / "made" / "renamed").read_bytes() == b"Jello"
    writable.truncate(b"/made/renamed", 2)
    assert (tree / "made" / "renamed").read_bytes() == b"Je"
    writable.unlink(b"/made/renamed", False)
    writable.unlink(b"/made", True)
    assert not (tree / "made").exists()
    # unlink acts on the link, never on what it points to
    writable.unlink(b"/etc/abs-hosts", False)
    assert (tree / "etc" / "hosts").exists()
    assert (tree.parent / "secret.txt").read_bytes() == OUTSIDE_CONTENT


def test_read_file_limits_and_special_files(files: FileService, tree: Path) -> None:
    with pytest.raises(OSError) as caught:
        files.read_file(b"/etc", 100)
    assert caught.value.errno == errno.EISDIR
    with pytest.raises(OSError) as caught:
        files.read_file(b"/secret.txt", 3)
    assert caught.value.errno == errno.EFBIG
    os.mkfifo(tree / "fifo")
    # a FIFO with no writer must not block the agent
    assert files.read_file(b"/fifo", 100).data == b""


def test_chunked_reads(files: FileService) -> None:
    fd, info = files.open(b"/secret.txt", os.O_RDONLY, 0)
    try:
        assert info.size == 7
        first = FileService.read(fd, 3, None)
        assert (first.data, first.eof) == (b"ins", False)
        assert FileService.read(fd, 100, None).data == b"ide\n"
        assert FileService.read(fd, 2, 1).data == b"ns"
        assert FileService.read(fd, 10, 100).eof
    finally:
        os.close(fd)


def test_handle_table_never_closes_an_fd_in_use(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    table = HandleTable(limit=2)
    handle = table.add(os.open(tmp_path / "f", os.O_RDONLY))
    entered, release = threading.Event(), threading.Event()

    def reader() -> None:
        with table.use(handle) as fd:
            entered.set()
            release.wait(5)
            assert os.pread(fd, 1, 0) == b"x"

    thread = threading.Thread(target=reader)
    thread.start()
    entered.wait(5)
    table.close(handle)  # while in use: deferred
    with pytest.raises(OSError) as caught, table.use(handle):
        pass
    assert caught.value.errno == errno.EBADF
    release.set()
    thread.join(5)
    assert len(table) == 0
    table.add(os.open(tmp_path / "f", os.O_RDONLY))
    table.add(os.open(tmp_path / "f", os.O_RDONLY))
    with pytest.raises(OSError) as caught:
        table.add(os.open(tmp_path / "f", os.O_RDONLY))
    assert caught.value.errno == errno.EMFILE
    table.close_all()
    assert len(table) == 0


def test_set_times_follows_symlinks_inside_the_root_and_omits(writable: FileService,
                                                              tree: Path) -> None:
    """SetTimes: an absolute symlink is the root's path; None keeps that time."""
    target = tree / "etc" / "hosts"
    os.utime(target, ns=(10**9, 2 * 10**9))
    outside = os.stat("/etc/hosts")
    writable.set_times(b"/etc/abs-hosts", None, 5 * 10**9, True)
    assert (os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns) == (10**9, 5 * 10**9)
    assert os.stat("/etc/hosts").st_mtime_ns == outside.st_mtime_ns
    before = os.lstat(tree / "etc" / "abs-hosts").st_mtime_ns
    writable.set_times(b"/etc/abs-hosts", 7 * 10**9, 8 * 10**9, False)  # the link itself
    assert os.lstat(tree / "etc" / "abs-hosts").st_mtime_ns == 8 * 10**9 != before
    assert os.stat(target).st_mtime_ns == 5 * 10**9
    writable.set_times(b"/etc/hosts", "now", "now", True)
    assert os.stat(target).st_mtime_ns > 5 * 10**9


def test_metadata_changes_need_a_writable_agent(files: FileService) -> None:
    for change in (lambda: files.set_times(b"/etc/hosts", "now", "now", True),
                   lambda: files.chown(b"/etc/hosts", -1, -1, True)):
        with pytest.raises(OSError) as caught:
            change()
        assert caught.value.errno == errno.EROFS


def test_statfs_through_a_symlink_stays_in_the_root(files: FileService) -> None:
    assert files.statfs(b"/etc/abs-hosts").type != 0
    with pytest.raises(OSError) as caught:
        files.statfs(b"/missing")
    assert caught.value.errno == errno.ENOENT


# --- new names and extended attributes (Link, Symlink, MakeNode, SetXattr, RemoveXattr) ---


def test_links_and_nodes_are_made_inside_the_root(writable: FileService, tree: Path) -> None:
    """Each new name lands under the root, whatever symlinks the path crosses."""
    writable.link(b"/secret.txt", b"/up/hard", False)  # "up" climbs: stops at the root
    assert (tree / "hard").read_bytes() == b"inside\n"
    assert os.stat(tree / "hard").st_ino == os.stat(tree / "secret.txt").st_ino
    # follow: the file an absolute symlink names inside the root, not this machine's /etc/hosts
    writable.link(b"/etc/abs-hosts", b"/followed", True)
    assert os.stat(tree / "followed").st_ino == os.stat(tree / "etc" / "hosts").st_ino
    writable.link(b"/etc/abs-hosts", b"/the-link", False)  # the symlink itself
    assert os.readlink(tree / "the-link") == "/etc/hosts"
    writable.symlink(b"../../outside/../x", b"/dir-link/soft")  # stored verbatim
    assert os.readlink(tree / "etc" / "soft") == "../../outside/../x"
    writable.mknod(b"/up/fifo", stat.S_IFIFO | 0o666, 0)
    assert stat.S_ISFIFO(os.lstat(tree / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(tree / "fifo").st_mode) == 0o666  # not narrowed by a umask
    writable.mknod(b"/plain", 0o640, 0)  # type 0: a regular file
    assert stat.S_ISREG(os.lstat(tree / "plain").st_mode)
    assert stat.S_IMODE(os.lstat(tree / "plain").st_mode) == 0o640
    assert (tree.parent / "secret.txt").read_bytes() == OUTSIDE_CONTENT
    assert not (tree.parent / "hard").exists() and not (tree.parent / "fifo").exists()


def test_new_names_fail_as_the_kernel_says(writable: FileService) -> None:
    cases = [
        (lambda: writable.link(b"/secret.txt", b"/etc/hosts", False), errno.EEXIST),
        (lambda: writable.link(b"/missing", b"/new", False), errno.ENOENT),
        (lambda: writable.link(b"/etc", b"/etc2", False), errno.EPERM),  # a directory
        (lambda: writable.symlink(b"x", b"/secret.txt"), errno.EEXIST),
        (lambda: writable.symlink(b"", b"/empty"), errno.ENOENT),
        (lambda: writable.symlink(b"a" * 4096, b"/long"), errno.ENAMETOOLONG),
        (lambda: writable.mknod(b"/d", stat.S_IFDIR | 0o755, 0), errno.EPERM),
        (lambda: writable.mknod(b"/secret.txt", stat.S_IFIFO | 0o644, 0), errno.EEXIST),
    ]
    for attempt, expected in cases:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == expected, attempt


def test_xattrs_follow_symlinks_inside_the_root_and_honour_flags(writable: FileService,
                                                                  tree: Path) -> None:
    hosts = tree / "etc" / "hosts"
    writable.set_xattr(b"/etc/abs-hosts", b"user.k", b"v1", 0, True)
    assert os.getxattr(hosts, "user.k") == b"v1"
    with pytest.raises(OSError) as caught:
        writable.set_xattr(b"/etc/hosts", b"user.k", b"v2", XATTR_CREATE, True)
    assert caught.value.errno == errno.EEXIST
    with pytest.raises(OSError) as caught:
        writable.set_xattr(b"/etc/hosts", b"user.new", b"v", XATTR_REPLACE, True)
    assert caught.value.errno == errno.ENODATA
    writable.set_xattr(b"/etc/hosts", b"user.k", b"v2", XATTR_REPLACE, True)
    assert os.getxattr(hosts, "user.k") == b"v2"
    writable.remove_xattr(b"/etc/abs-hosts", b"user.k", True)
    assert os.listxattr(hosts) == []
    with pytest.raises(OSError) as caught:
        writable.remove_xattr(b"/etc/hosts", b"user.k", True)
    assert caught.value.errno == errno.ENODATA
    # not followed: the symlink itself (user.* is not allowed on symlinks)
    with pytest.raises(OSError) as caught:
        writable.set_xattr(b"/etc/abs-hosts", b"user.k", b"v", 0, False)
    assert caught.value.errno == errno.EPERM
    writable.set_xattr(b"/up/secret.txt", b"user.k", b"inside", 0, False)
    assert os.getxattr(tree / "secret.txt", "user.k") == b"inside"
    assert os.listxattr(tree.parent / "secret.txt") == []


def test_xattrs_are_read_inside_the_root(files: FileService, tree: Path) -> None:
    """GetXattr/ListXattr need no --write; a symlink is followed only when asked."""
    os.setxattr(tree / "etc" / "hosts", "user.k", b"value")
    assert files.get_xattr(b"/etc/abs-hosts", b"user.k", True) == b"value"
    assert files.list_xattr(b"/etc/abs-hosts", True) == [b"user.k"]
    assert b"user.k" not in files.list_xattr(b"/etc/abs-hosts", False)
    for attempt, expected in ((lambda: files.get_xattr(b"/etc/hosts", b"user.none", True),
                               errno.ENODATA),
                              (lambda: files.get_xattr(b"/etc/hosts", b"", True), errno.ERANGE),
                              (lambda: files.list_xattr(b"/missing", True), errno.ENOENT)):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == expected


def test_xattr_limits_are_the_kernels(writable: FileService) -> None:
    cases = [
        (lambda: writable.set_xattr(b"/etc/hosts", b"user.k", b"v", 4, True), errno.EINVAL),
        (lambda: writable.set_xattr(b"/etc/hosts", b"", b"v", 0, True), errno.ERANGE),
        (lambda: writable.set_xattr(b"/etc/hosts", b"user." + b"n" * 251, b"v", 0, True),
         errno.ERANGE),
        (lambda: writable.set_xattr(b"/etc/hosts", b"user.k", b"v" * 65537, 0, True),
         errno.E2BIG),
        (lambda: writable.remove_xattr(b"/etc/hosts", b"u" * 256, True), errno.ERANGE),
        (lambda: writable.set_xattr(b"/etc/hosts", b"nonamespace", b"v", 0, True),
         errno.EOPNOTSUPP),
        (lambda: writable.set_xattr(b"/missing", b"user.k", b"v", 0, True), errno.ENOENT),
    ]
    for attempt, expected in cases:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == expected
    # the limits themselves are allowed
    writable.set_xattr(b"/etc/hosts", b"user." + b"n" * 250, b"v", 0, True)


def test_new_names_and_xattrs_need_a_writable_agent(files: FileService, tree: Path) -> None:
    for change in (lambda: files.link(b"/secret.txt", b"/hard", False),
                   lambda: files.symlink(b"x", b"/soft"),
                   lambda: files.mknod(b"/fifo", stat.S_IFIFO | 0o600, 0),
                   lambda: files.set_xattr(b"/secret.txt", b"user.k", b"v", 0, True),
                   lambda: files.remove_xattr(b"/secret.txt", b"user.k", True)):
        with pytest.raises(OSError) as caught:
            change()
        assert caught.value.errno == errno.EROFS
    assert sorted(os.listdir(tree)) == sorted(
        ["etc", "secret.txt", "up", "deep", "abs-escape", "host-path", "loop1", "loop2",
         "dangling", "dir-link"])


def test_an_upload_keeps_the_files_extended_attributes(writable: FileService, tree: Path) -> None:
    """The replaced file lost its user attributes (and ACLs) at every upload."""
    os.setxattr(tree / "secret.txt", "user.k", b"kept")
    upload = writable.begin_upload(b"/secret.txt")
    os.write(upload.fd, b"new contents\n")
    writable.commit_upload(upload)
    os.close(upload.fd)
    assert (tree / "secret.txt").read_bytes() == b"new contents\n"
    assert os.getxattr(tree / "secret.txt", "user.k") == b"kept"
