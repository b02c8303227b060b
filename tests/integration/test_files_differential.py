"""The files feature against a real target: differential tests through the CLI.

Each probe flavour (static Go, static glibc, static musl, dynamic glibc) run
with ``mtrace exec --target pid/N`` must print what it prints when run inside
the target's namespaces (``nsenter``): cat of a file only the target has,
stat, ls of a target-only directory, readlink, relative paths after chdir.
Then the modes and path lists.

The target's private files live on a tmpfs only its mount namespace sees
(``netns_target.private_file``'s directory, under /tmp on this machine). /tmp
is local by default, so the tests put that directory on the ``read_only`` or
``read_write`` list, as a user would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from netns_target import NetnsTarget

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

RUN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tree(netns_target: NetnsTarget) -> Iterator[str]:
    """A directory tree only the target sees; its path (as the target sees it)."""
    private = os.path.dirname(netns_target.private_file)
    top = os.path.join(private, "files-tree")
    host_view = f"/proc/{netns_target.pid}/root{top}"
    os.makedirs(f"{host_view}/sub/deeper")
    Path(f"{host_view}/config.yaml").write_text("key: value from the target\n")
    Path(f"{host_view}/sub/notes.txt").write_text("notes in a subdirectory\n")
    Path(f"{host_view}/sub/deeper/leaf").write_text("leaf\n")
    Path(f"{host_view}/data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    os.chmod(f"{host_view}/config.yaml", 0o640)
    os.symlink("sub/notes.txt", f"{host_view}/link-to-notes")
    os.symlink("/etc/hosts", f"{host_view}/abs-link")
    assert not os.path.exists(top), "the tree must be invisible on this machine"
    yield top
    shutil.rmtree(host_view, ignore_errors=True)


def mtrace(target: NetnsTarget, argv: list[str], fs: dict[str, Any] | None = None,
           timeout: float = RUN_TIMEOUT, backend: str | None = None
           ) -> subprocess.CompletedProcess[bytes]:
    config: dict[str, Any] = {"feature": {"fs": fs or {}}}
    if backend is not None:
        config["backend"] = backend
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{target.pid}",
             "-f", file.name, "--", *argv],
            capture_output=True, timeout=timeout, check=False,
        )
    finally:
        os.unlink(file.name)


def visible(tree: str, mode: str = "read_only") -> dict[str, Any]:
    return {mode: ["^" + re.escape(os.path.dirname(tree)) + "(/|$)"]}


def traced_ok(target: NetnsTarget, argv: list[str], fs: dict[str, Any], backend: str) -> bytes:
    """The program's output under mtrace; it must exit 0."""
    result = mtrace(target, argv, fs, backend=backend)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    return result.stdout


def assert_like_inside(target: NetnsTarget, argv: list[str], fs: dict[str, Any]) -> bytes:
    inside = target.run_inside(*argv)
    traced = mtrace(target, argv, fs)
    assert (traced.returncode, traced.stdout) == (inside.returncode, inside.stdout), \
        traced.stderr.decode(errors="replace")[-3000:]
    return traced.stdout


# --- every probe flavour, differential -------------------------------------------------


def test_cat_of_a_target_only_file(probe: Path, netns_target: NetnsTarget, tree: str) -> None:
    out = assert_like_inside(netns_target, [str(probe), "cat", f"{tree}/config.yaml"],
                             visible(tree))
    assert out == b"key: value from the target\n"


def test_cat_of_the_targets_hosts_file(probe: Path, netns_target: NetnsTarget,
                                       tree: str) -> None:
    out = assert_like_inside(netns_target, [str(probe), "cat", "/etc/hosts"], {})
    assert out == netns_target.hosts_file_content


@pytest.mark.parametrize("name", ["config.yaml", "sub", "link-to-notes", "missing"])
def test_stat(probe: Path, netns_target: NetnsTarget, tree: str, name: str) -> None:
    assert_like_inside(netns_target, [str(probe), "stat", f"{tree}/{name}"], visible(tree))


def test_statfs_and_fstatfs(probe: Path, netns_target: NetnsTarget, tree: str) -> None:
    """statfs/fstatfs of a target file reported this machine's filesystem."""
    out = assert_like_inside(netns_target, [str(probe), "statfs", f"{tree}/config.yaml"],
                             visible(tree))
    assert out.count(b"type=1021994 ") == 2  # the target's tmpfs (TMPFS_MAGIC)


@pytest.mark.parametrize("name", ["", "/sub", "/config.yaml"])
def test_ls(probe: Path, netns_target: NetnsTarget, tree: str, name: str) -> None:
    assert_like_inside(netns_target, [str(probe), "ls", f"{tree}{name}"], visible(tree))


@pytest.mark.parametrize("name", ["link-to-notes", "abs-link", "config.yaml"])
def test_readlink(probe: Path, netns_target: NetnsTarget, tree: str, name: str) -> None:
    assert_like_inside(netns_target, [str(probe), "readlink", f"{tree}/{name}"], visible(tree))


def test_symlink_in_write_mode_is_made_in_the_target(probe: Path, netns_target: NetnsTarget,
                                                     tree: str) -> None:
    """Every flavour's symlink(at) of a target path (Go's os.Symlink is a raw
    symlinkat) answered EPERM in write mode: it must make the link in the
    target, contents verbatim, and fail again as inside the target."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    fs = {"mode": "write", **visible(tree, "read_write")}
    try:
        for attempt in range(2):  # the second time: EEXIST, on both sides
            traced = mtrace(netns_target, [str(probe), "symlink", "../sub/notes.txt",
                                           f"{tree}/probe-link"], fs)
            inside = netns_target.run_inside(str(probe), "symlink", "../sub/notes.txt",
                                             f"{tree}/probe-link-inside")
            assert (traced.returncode, traced.stdout) == (inside.returncode, inside.stdout), \
                traced.stderr.decode(errors="replace")[-3000:]
            assert traced.stdout == (b"../sub/notes.txt\n" if attempt == 0
                                     else b"error: EEXIST\n")
        assert os.readlink(f"{host_view}/probe-link") == "../sub/notes.txt"
    finally:
        for name in ("probe-link", "probe-link-inside"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{host_view}/{name}")


def test_relative_paths_after_chdir(probe: Path, netns_target: NetnsTarget, tree: str) -> None:
    script = (f"cd {tree}/sub && {probe} cat notes.txt && {probe} ls deeper && "
              f"{probe} stat ../config.yaml && cd deeper && {probe} cat ./leaf && "
              f"{probe} readlink ../../link-to-notes && pwd")
    out = assert_like_inside(netns_target, ["/bin/sh", "-c", script], visible(tree))
    assert out.endswith(f"{tree}/sub/deeper\n".encode())


# --- more than one flavour needs -------------------------------------------------------


def test_big_file_and_symlinked_file(netns_target: NetnsTarget, tree: str) -> None:
    for argv in (["sha256sum", f"{tree}/data.bin"], ["cat", f"{tree}/link-to-notes"],
                 ["cat", f"{tree}/abs-link"]):
        assert_like_inside(netns_target, argv, visible(tree))


def test_default_local_keeps_tmp_here(probe: Path, netns_target: NetnsTarget,
                                      tree: str) -> None:
    """Without a list entry the target's /tmp is not seen: /tmp is local by default."""
    traced = mtrace(netns_target, [str(probe), "cat", f"{tree}/config.yaml"])
    assert traced.stdout == b"error: ENOENT\n"


def test_local_mode_and_not_found(probe: Path, netns_target: NetnsTarget, tree: str) -> None:
    local = mtrace(netns_target, [str(probe), "cat", f"{tree}/config.yaml"],
                   {"mode": "local", **visible(tree)})
    assert local.stdout == b"error: ENOENT\n"
    hidden = mtrace(netns_target, [str(probe), "cat", f"{tree}/config.yaml"],
                    {**visible(tree), "not_found": [r"config\.yaml$"]})
    assert hidden.stdout == b"error: ENOENT\n"
    overrides = mtrace(netns_target, [str(probe), "cat", f"{tree}/config.yaml"],
                       {"mode": "localwithoverrides", **visible(tree)})
    assert overrides.stdout == b"key: value from the target\n"


def test_write_mode_changes_the_target(netns_target: NetnsTarget, tree: str) -> None:
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    script = (f"echo new > {tree}/written.txt && echo more >> {tree}/sub/notes.txt && "
              f"mkdir {tree}/made && mv {tree}/written.txt {tree}/made/ && "
              f"cat {tree}/made/written.txt")
    try:
        # Write mode (the agent gets --write), the tree on the read_write list.
        traced = mtrace(netns_target, ["/bin/sh", "-c", script],
                        {"mode": "write", **visible(tree, "read_write")})
        assert traced.stdout == b"new\n", traced.stderr.decode(errors="replace")[-3000:]
        assert Path(f"{host_view}/made/written.txt").read_text() == "new\n"
        assert Path(f"{host_view}/sub/notes.txt").read_text() == \
            "notes in a subdirectory\nmore\n"
        assert not os.path.exists(f"{tree}/made")
    finally:
        shutil.rmtree(f"{host_view}/made", ignore_errors=True)
        Path(f"{host_view}/sub/notes.txt").write_text("notes in a subdirectory\n")


def test_read_mode_leaves_the_target_alone(netns_target: NetnsTarget, tree: str) -> None:
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    traced = mtrace(netns_target, ["/bin/sh", "-c", f"rm {tree}/config.yaml; echo $?"],
                    visible(tree))
    assert traced.stdout == b"1\n"
    assert b"Read-only file system" in traced.stderr
    assert os.path.exists(f"{host_view}/config.yaml")


# --- metadata and links by path (issue 14's audit gaps) -------------------------------

METADATA = r"""
import errno, os, sys
tree, local = sys.argv[1], sys.argv[2]
def outcome(function):
    try:
        function()
        return "ok"
    except OSError as error:
        return errno.errorcode[error.errno]
for base in (tree, local):
    f = base + "/config.yaml"
    print("chmod", outcome(lambda: os.chmod(f, 0o600)),
          "chown", outcome(lambda: os.chown(f, os.getuid(), -1)),
          "lchown", outcome(lambda: os.lchown(f, os.getuid(), -1)),
          "utime", outcome(lambda: os.utime(f, (1, 2))),
          "link", outcome(lambda: os.link(f, base + "/hard")),
          "symlink", outcome(lambda: os.symlink("x", base + "/soft")),
          "setxattr", outcome(lambda: os.setxattr(f, b"user.k", b"v")),
          "removexattr", outcome(lambda: os.removexattr(f, b"user.k")))
"""


@pytest.mark.parametrize("mode", ["read", "write"])
def test_metadata_and_link_calls_on_a_target_path_never_act_on_this_machine(
        netns_target: NetnsTarget, tree: str, backend: str, mode: str, tmp_path: Path) -> None:
    """They acted on this machine's path: ENOENT for a target-only file, and a
    local file that shadows a target path was changed in its place."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    local = tmp_path / "local"  # /tmp: local by default
    local.mkdir()
    (local / "config.yaml").write_text("local\n")
    os.chmod(local / "config.yaml", 0o644)
    fs = {"mode": mode, **visible(tree, "read_write" if mode == "write" else "read_only")}
    before = os.stat(f"{host_view}/config.yaml")
    config = {"backend": backend, "feature": {"fs": fs}}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    try:
        traced = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{netns_target.pid}",
             "-f", str(config_file), "--", sys.executable, "-S", "-c", METADATA, tree,
             str(local)],
            capture_output=True, timeout=RUN_TIMEOUT, check=False)
        after = os.stat(f"{host_view}/config.yaml")
    finally:
        os.chmod(f"{host_view}/config.yaml", before.st_mode & 0o7777)
        os.utime(f"{host_view}/config.yaml", ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = "EROFS" if mode == "read" else "ok"  # write mode: the agent's operations
    assert traced.stdout.decode().splitlines() == [
        f"chmod {changed} chown {changed} lchown {changed} utime {changed} link {changed} "
        f"symlink {changed} setxattr {changed} removexattr {changed}",
        # a local path: the kernel's own answers (tmpfs takes user.* attributes)
        "chmod ok chown ok lchown ok utime ok link ok symlink ok setxattr ok removexattr ok",
    ], traced.stderr.decode(errors="replace")[-3000:]
    if mode == "read":
        assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    else:
        assert (after.st_mode, after.st_atime_ns, after.st_mtime_ns) == (
            (before.st_mode & ~0o7777) | 0o600, 10**9, 2 * 10**9)
    try:
        if mode == "read":
            assert not os.path.lexists(f"{host_view}/hard")
            assert not os.path.lexists(f"{host_view}/soft")
        else:
            assert os.stat(f"{host_view}/hard").st_ino == after.st_ino
            assert os.readlink(f"{host_view}/soft") == "x"
    finally:
        for name in ("hard", "soft"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{host_view}/{name}")
    assert (local / "hard").exists() and os.readlink(local / "soft") == "x"
    assert os.stat(local / "config.yaml").st_mtime_ns == 2 * 10**9


def test_metadata_calls_on_a_target_path_leave_a_local_shadow_alone_in_write_mode(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """A local file with the target file's name was changed in its place."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    before = os.stat(f"{host_view}/config.yaml")
    os.makedirs(tree)  # this machine's own directory of that name (the target's is private)
    try:
        Path(f"{tree}/config.yaml").write_text("a local shadow\n")
        os.chmod(f"{tree}/config.yaml", 0o644)
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps({"backend": backend, "feature": {"fs": {
            "mode": "write", **visible(tree, "read_write")}}}))
        traced = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{netns_target.pid}",
             "-f", str(config_file), "--", sys.executable, "-S", "-c",
             "import os, sys\ntry:\n    os.link(sys.argv[1], sys.argv[1] + '.hard')\n"
             "except OSError as e:\n    print(e.errno)\nos.chmod(sys.argv[1], 0o600)\n"
             "os.utime(sys.argv[1], (1, 2))\n", f"{tree}/config.yaml"],
            capture_output=True, timeout=RUN_TIMEOUT, check=False)
        assert traced.stdout == b"", traced.stderr[-3000:]
        assert traced.returncode == 0, traced.stderr[-3000:]
        # link, chmod and utime went to the target's file; the local one kept its mode and times.
        assert os.path.samefile(f"{host_view}/config.yaml.hard", f"{host_view}/config.yaml")
        assert os.stat(f"{host_view}/config.yaml").st_mode & 0o777 == 0o600
        assert os.stat(f"{host_view}/config.yaml").st_mtime_ns == 2 * 10**9
        assert not os.path.exists(f"{tree}/config.yaml.hard")
        assert os.stat(f"{tree}/config.yaml").st_mode & 0o777 == 0o644
        assert os.stat(f"{tree}/config.yaml").st_mtime_ns != 2 * 10**9
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{host_view}/config.yaml.hard")
        os.chmod(f"{host_view}/config.yaml", 0o640)
        os.utime(f"{host_view}/config.yaml", ns=(before.st_atime_ns, before.st_mtime_ns))


STATFS = r"""
import os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
for label, info in (("statvfs", os.statvfs(path)), ("fstatvfs", os.fstatvfs(fd))):
    print(label, info.f_bsize, info.f_blocks, info.f_files, info.f_namemax)
"""


def test_statfs_of_a_target_path_is_the_targets_filesystem(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """df and free-space checks saw this machine's filesystem for a target path."""
    fs = {"mode": "read", **visible(tree)}
    path = f"{tree}/config.yaml"

    def traced(*argv: str) -> bytes:
        return traced_ok(netns_target, list(argv), fs, backend)

    python = traced(sys.executable, "-S", "-c", STATFS, path)
    assert python == netns_target.run_inside(sys.executable, "-S", "-c", STATFS, path).stdout
    # GNU stat -f: statfs(2) with the filesystem type (the target's tmpfs).
    argv = ("stat", "-f", "-c", "%t %b %c %S", path)
    assert traced(*argv) == netns_target.run_inside(*argv).stdout
    local = os.statvfs(os.path.dirname(os.path.dirname(tree)))  # this machine's /tmp
    assert f" {local.f_blocks} {local.f_files} ".encode() not in python


def test_chown_and_touch_of_a_target_path_change_the_target_in_write_mode(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """chown, lchown and utimensat of a target path answered EPERM in write mode."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    Path(f"{host_view}/owned").write_text("x\n")
    os.symlink("owned", f"{host_view}/owned-link")
    os.utime(f"{host_view}/owned", ns=(5 * 10**9, 6 * 10**9))
    fs = {"mode": "write", **visible(tree, "read_write")}

    def traced(*argv: str) -> None:
        traced_ok(netns_target, list(argv), fs, backend)

    try:
        traced(sys.executable, "-S", "-c",
               "import os, sys\nos.chown(sys.argv[1], 1234, 5678)\n"
               "os.lchown(sys.argv[2], 4321, -1)\n", f"{tree}/owned", f"{tree}/owned-link")
        # touch -m: utimensat with atime UTIME_OMIT (the target's atime is not set).
        # (-h: by path, lutimensat; without it touch opens the file and sets the fd's times)
        traced("touch", "-h", "-m", "-d", "@1000000000", f"{tree}/owned")
        owned = os.stat(f"{host_view}/owned")
        link = os.lstat(f"{host_view}/owned-link")
        assert (owned.st_uid, owned.st_gid) == (1234, 5678)
        assert (link.st_uid, link.st_gid) == (4321, 0)
        assert (owned.st_atime_ns, owned.st_mtime_ns) == (5 * 10**9, 10**18)
        # touch with no time: "now" on the target's clock.
        started = time.time_ns()
        traced("touch", "-h", f"{tree}/owned")
        assert os.stat(f"{host_view}/owned").st_mtime_ns >= started - 10**9
    finally:
        os.unlink(f"{host_view}/owned")
        os.unlink(f"{host_view}/owned-link")


def test_cp_p_and_install_m_to_a_target_path_keep_mode_and_times(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """fchmod/futimens on the copy of a target file were lost at upload: the
    target kept its old mode and got the upload's time."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    source = tmp_path / "source"  # /tmp: local by default
    source.write_text("contents from this machine\n")
    os.chmod(source, 0o751)
    os.utime(source, ns=(3 * 10**9, 4 * 10**9))
    Path(f"{host_view}/existing").write_text("old\n")
    os.chmod(f"{host_view}/existing", 0o600)
    fs = {"mode": "write", **visible(tree, "read_write")}

    def traced(*argv: str) -> None:
        traced_ok(netns_target, list(argv), fs, backend)

    try:
        traced("cp", "-p", str(source), f"{tree}/copied")
        traced("cp", "-p", str(source), f"{tree}/existing")
        traced("install", "-m", "0640", str(source), f"{tree}/installed")
        for name in ("copied", "existing"):
            copied = os.stat(f"{host_view}/{name}")
            assert (stat.S_IMODE(copied.st_mode), copied.st_mtime_ns) == (0o751, 4 * 10**9), name
            assert Path(f"{host_view}/{name}").read_text() == "contents from this machine\n"
        assert stat.S_IMODE(os.stat(f"{host_view}/installed").st_mode) == 0o640
        assert Path(f"{host_view}/installed").read_text() == "contents from this machine\n"
    finally:
        for name in ("copied", "existing", "installed"):
            with contextlib.suppress(OSError):
                os.unlink(f"{host_view}/{name}")


# --- links, nodes and extended attributes in write mode ------------------------------

#: What a directory holds, as the target sees it: every entry's type, permissions,
#: link count, symlink contents, device number, size, user.* attributes and
#: (with "times"; not for directories) mtime; hard links as "same as" the first name.
LISTING = r"""
import os, stat, sys
top, times = sys.argv[1], sys.argv[2:] == ["times"]
first = {}
for directory, names, files in sorted(os.walk(top)):
    names.sort()
    for name in sorted(names + files):
        path = os.path.join(directory, name)
        info = os.lstat(path)
        kind = stat.filemode(info.st_mode)
        line = [os.path.relpath(path, top), kind, str(info.st_nlink)]
        if stat.S_ISLNK(info.st_mode):
            line.append("-> " + os.readlink(path))
        if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
            line.append("dev %d,%d" % (os.major(info.st_rdev), os.minor(info.st_rdev)))
        if stat.S_ISREG(info.st_mode):
            line.append("size %d" % info.st_size)
            key = (info.st_dev, info.st_ino)
            if key in first:
                line.append("same as " + first[key])
            first.setdefault(key, line[0])
        if times and not stat.S_ISDIR(info.st_mode):
            line.append("mtime %d" % info.st_mtime_ns)
        try:
            names = sorted(os.listxattr(path, follow_symlinks=False))
        except OSError:
            names = []
        for attribute in names:
            if attribute.startswith("user."):
                value = os.getxattr(path, attribute, follow_symlinks=False)
                line.append("%s=%r" % (attribute, value))
        print(" ".join(line))
"""

#: Links, nodes and attributes with the tools a user runs; each status is printed.
LINK_TOOLS = r"""
D=$1
umask 002
ln -s ../relative/target "$D/soft"; echo "ln -s $?"
ln -s /absolute/target "$D/abs"; echo "ln -s $?"
ln "$D/file" "$D/hard"; echo "ln $?"
ln "$D/file" "$D/hard" 2>/dev/null; echo "ln again $?"
ln "$D/file" /tmp/mtrace-links-cross-device 2>/dev/null; echo "ln to another filesystem $?"
ln -s x "$D/missing-dir/soft" 2>/dev/null; echo "ln -s in a missing directory $?"
mkfifo "$D/fifo"; echo "mkfifo $?"
mkfifo -m 0604 "$D/fifo-mode"; echo "mkfifo -m $?"
mkfifo "$D/fifo" 2>/dev/null; echo "mkfifo again $?"
mknod "$D/null" c 1 3; echo "mknod c $?"
mkdir "$D/dir"; echo "mkdir $?"
echo created > "$D/created"; echo "created $?"
setfattr -n user.k -v value "$D/file"; echo "setfattr $?"
setfattr -n user.gone -v x "$D/file" && setfattr -x user.gone "$D/file"; echo "setfattr -x $?"
setfattr -x user.missing "$D/file" 2>/dev/null; echo "setfattr -x missing $?"
setfattr -h -n user.k -v v "$D/soft" 2>/dev/null; echo "setfattr -h on a symlink $?"
setfattr -n user.k -v v "$D/nothing" 2>/dev/null; echo "setfattr on nothing $?"
getfattr -n user.k --only-values "$D/file"; echo " getfattr $?"
getfattr -d "$D/file" | sed 1d; echo "getfattr -d $?"
getfattr -n user.none "$D/file" 2>/dev/null; echo "getfattr missing $?"
"""


def _fresh(host_view: str, name: str) -> str:
    """An empty directory in the target holding one file, "file" (fixed times)."""
    directory = f"{host_view}/{name}"
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory)
    Path(f"{directory}/file").write_text("a file\n")
    os.utime(f"{directory}/file", ns=(10**9, 2 * 10**9))
    return directory


@pytest.mark.skipif(shutil.which("setfattr") is None, reason="setfattr (apt package attr) missing")
def test_ln_mkfifo_mknod_setfattr_in_write_mode_act_on_the_target_as_inside_it(
        netns_target: NetnsTarget, tree: str, backend: str) -> None:
    """ln, ln -s, mkfifo, mknod and setfattr on target paths answered EPERM or
    ENOTSUP in write mode: the same commands must do, and print, what they do
    when run inside the target."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    fs = {"mode": "write", **visible(tree, "read_write")}
    try:
        _fresh(host_view, "links-traced")
        _fresh(host_view, "links-inside")
        traced = mtrace(netns_target, ["/bin/sh", "-c", LINK_TOOLS, "sh", f"{tree}/links-traced"],
                        fs, backend=backend)
        inside = netns_target.run_inside("/bin/sh", "-c", LINK_TOOLS, "sh",
                                         f"{tree}/links-inside")
        assert (traced.returncode, traced.stdout) == (inside.returncode, inside.stdout), \
            traced.stderr.decode(errors="replace")[-3000:]
        assert b"ln -s 0\nln -s 0\nln 0\nln again 1\nln to another filesystem 1\n" in \
            traced.stdout
        assert b"value getfattr 0\nuser.k=\"value\"\n" in traced.stdout
        listings = [netns_target.run_inside(sys.executable, "-S", "-c", LISTING,
                                            f"{tree}/links-{side}").stdout
                    for side in ("traced", "inside")]
        assert listings[0] == listings[1]
        assert b"soft lrwxrwxrwx 1 -> ../relative/target" in listings[0]
        assert b"fifo prw-rw-r--" in listings[0] and b"fifo-mode prw----r--" in listings[0]
        # umask 002, not the agent's own
        assert b"dir drwxrwxr-x" in listings[0] and b"created -rw-rw-r--" in listings[0]
        assert b"user.k=b'value'" in listings[0] and b"user.gone" not in listings[0]
        assert not os.path.lexists("/tmp/mtrace-links-cross-device")
    finally:
        for side in ("traced", "inside"):
            shutil.rmtree(f"{host_view}/links-{side}", ignore_errors=True)


def _source_tree(top: Path) -> None:
    """A tree with what cp -a and tar keep: a hard link, symlinks, a FIFO,
    modes, times, a user attribute."""
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "b").write_text("b\n")
    (top / "a").write_text("a\n")
    os.chmod(top / "a", 0o640)
    os.setxattr(top / "a", "user.tag", b"kept")
    os.link(top / "a", top / "a-hard")
    os.symlink("a", top / "rel")
    os.symlink("/nowhere/at/all", top / "abs")
    os.mkfifo(top / "fifo", 0o600)
    os.chmod(top / "fifo", 0o600)
    for path in (top / "sub" / "b", top / "a", top / "fifo"):
        os.utime(path, ns=(10**9, 3 * 10**9))
    os.utime(top / "rel", ns=(10**9, 4 * 10**9), follow_symlinks=False)


COPIES = r"""
set -e
mkdir "$2/cp" "$2/tar"
cp -a "$1/." "$2/cp/"
x="--xattrs --xattrs-include=user.*"
tar $x -C "$1" -cf - . | tar $x -C "$2/tar" -xpf -
"""


def test_cp_a_and_tar_x_into_a_target_directory_as_inside_it(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """cp -a and tar x of a tree with hard links, symlinks, a FIFO and user
    attributes into a target directory: the copy must be what the same
    commands make inside the target (links and the FIFO failed; attributes
    were lost when an upload replaced a file)."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    local_source = tmp_path / "source"  # /tmp: local by default
    _source_tree(local_source)
    fs = {"mode": "write", **visible(tree, "read_write")}
    try:
        for side in ("traced", "inside"):
            shutil.rmtree(f"{host_view}/copies-{side}", ignore_errors=True)
            os.mkdir(f"{host_view}/copies-{side}")
        subprocess.run(["cp", "-a", f"{local_source}/.", f"{host_view}/copies-inside/source"],
                       check=True)
        traced = mtrace(netns_target, ["/bin/sh", "-c", COPIES, "sh", str(local_source),
                                       f"{tree}/copies-traced"], fs, backend=backend)
        assert traced.returncode == 0, traced.stderr.decode(errors="replace")[-3000:]
        inside = netns_target.run_inside("/bin/sh", "-c", COPIES, "sh",
                                         f"{tree}/copies-inside/source", f"{tree}/copies-inside")
        assert inside.returncode == 0, inside.stderr
        listings = {}
        for side in ("traced", "inside"):
            for kind in ("cp", "tar"):
                listings[side, kind] = netns_target.run_inside(
                    sys.executable, "-S", "-c", LISTING, f"{tree}/copies-{side}/{kind}",
                    "times").stdout
        for kind in ("cp", "tar"):
            assert listings["traced", kind].decode().splitlines() == \
                listings["inside", kind].decode().splitlines(), kind
            lines = listings["traced", kind].decode().splitlines()
            assert ("a-hard -rw-r----- 2 size 2 same as a mtime 3000000000 user.tag=b'kept'"
                    in lines), kind
            assert "rel lrwxrwxrwx 1 -> a" in " ".join(lines), kind
            assert any(line.startswith("fifo prw------- 1") for line in lines), kind
    finally:
        for side in ("traced", "inside"):
            shutil.rmtree(f"{host_view}/copies-{side}", ignore_errors=True)


def test_links_and_attributes_of_target_paths_in_read_mode_are_erofs(
        netns_target: NetnsTarget, tree: str, backend: str) -> None:
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    script = (f"ln -s x {tree}/soft; echo $?; ln {tree}/config.yaml {tree}/hard; echo $?; "
              f"mkfifo {tree}/fifo; echo $?; "
              f"python3 -S -c 'import os,sys; os.setxattr(sys.argv[1], \"user.k\", b\"v\")' "
              f"{tree}/config.yaml; echo $?")
    traced = mtrace(netns_target, ["/bin/sh", "-c", script], {"mode": "read", **visible(tree)},
                    backend=backend)
    assert traced.stdout == b"1\n1\n1\n1\n", traced.stderr[-3000:]
    assert traced.stderr.count(b"Read-only file system") == 4
    for name in ("soft", "hard", "fifo"):
        assert not os.path.lexists(f"{host_view}/{name}")
    assert os.listxattr(f"{host_view}/config.yaml") == []


WATCH = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
for path in sys.argv[1:]:
    print(libc.inotify_add_watch(fd, path.encode(), 0x100) >= 0 or ctypes.get_errno())
"""


def _watch_with(script: str, netns_target: NetnsTarget, tree: str, backend: str,
                tmp_path: Path, *paths: str) -> subprocess.CompletedProcess[bytes]:
    """``script`` (one answer per path) under mtrace, while this machine has a
    directory of the target path's name."""
    os.makedirs(tree)  # this machine's own directory of that name
    try:
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps({"backend": backend, "feature": {"fs": visible(tree)}}))
        return subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{netns_target.pid}",
             "-f", str(config_file), "--", sys.executable, "-S", "-c", script, *paths],
            capture_output=True, timeout=RUN_TIMEOUT, check=False)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def test_inotify_watch_of_a_target_path_never_watches_this_machines_path(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """A directory of the target path's name on this machine was watched in its place."""
    result = _watch_with(WATCH, netns_target, tree, backend, tmp_path, tree, str(tmp_path))
    assert result.stdout.decode() == f"{errno.ENOTSUP}\nTrue\n", result.stderr[-3000:]
    assert b"inotify" in result.stderr  # one line says why


FANOTIFY = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_char_p)
group = libc.fanotify_init(0, 0)
assert group >= 0, ctypes.get_errno()
for path in sys.argv[1:]:
    print(libc.fanotify_mark(group, 1, 2, -100, path.encode()) >= 0 or ctypes.get_errno())
"""


def test_fanotify_mark_of_a_target_path_never_marks_this_machines_path(
        netns_target: NetnsTarget, tree: str, backend: str, tmp_path: Path) -> None:
    """fanotify_mark was not trapped: a directory of the target path's name on
    this machine was marked in its place (and a target-only path: ENOENT)."""
    result = _watch_with(FANOTIFY, netns_target, tree, backend, tmp_path, tree, f"{tree}/sub",
                         str(tmp_path))
    assert result.stdout.decode() == f"{errno.ENOTSUP}\n{errno.ENOTSUP}\nTrue\n", \
        result.stderr[-3000:]
    assert result.stderr.count(b"(fanotify)") == 1  # one line says why


FCHMODAT2 = r"""
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def fchmodat2(path, mode, flags):
    if libc.syscall(452, -100, path.encode(), mode, flags) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]
for path, flags in zip(sys.argv[1::2], sys.argv[2::2]):
    print(path.rsplit("/", 1)[1], fchmodat2(path, 0o600, int(flags)))
"""


@pytest.mark.parametrize("mode", ["read", "write"])
def test_fchmodat2_of_a_target_path_never_acts_on_this_machine(
        netns_target: NetnsTarget, tree: str, backend: str, mode: str, tmp_path: Path) -> None:
    """fchmodat2 (lchmod's call, 452) was not trapped: a target path changed a
    local file of the same name, or was ENOENT."""
    host_view = f"/proc/{netns_target.pid}/root{tree}"
    local = tmp_path / "local"  # /tmp: local by default
    local.mkdir()
    (local / "file").write_text("local\n")
    os.symlink("file", local / "link")
    if mode == "write":
        os.makedirs(tree)  # this machine's own directory of that name
        Path(f"{tree}/config.yaml").write_text("a local shadow\n")
        os.chmod(f"{tree}/config.yaml", 0o644)
    fs = {"mode": mode, **visible(tree, "read_write" if mode == "write" else "read_only")}
    nofollow = str(0x100)  # AT_SYMLINK_NOFOLLOW
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"backend": backend, "feature": {"fs": fs}}))
    try:
        traced = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{netns_target.pid}",
             "-f", str(config_file), "--", sys.executable, "-S", "-c", FCHMODAT2,
             f"{tree}/config.yaml", nofollow, f"{tree}/link-to-notes", nofollow,
             f"{local}/file", nofollow, f"{local}/link", nofollow],
            capture_output=True, timeout=RUN_TIMEOUT, check=False)
        target_mode = stat.S_IMODE(os.stat(f"{host_view}/config.yaml").st_mode)
        notes_mode = stat.S_IMODE(os.stat(f"{host_view}/sub/notes.txt").st_mode)
        shadow_mode = stat.S_IMODE(os.stat(f"{tree}/config.yaml").st_mode) \
            if mode == "write" else None
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        os.chmod(f"{host_view}/config.yaml", 0o640)
    # A target symlink: the kernel's EOPNOTSUPP (read mode: EROFS comes first,
    # as on a read-only mount); local paths: the kernel's own answers.
    unsupported = errno.errorcode[errno.EOPNOTSUPP]  # Linux: ENOTSUP is the same number
    changed, link = ("EROFS", "EROFS") if mode == "read" else ("ok", unsupported)
    assert traced.stdout.decode().splitlines() == [
        f"config.yaml {changed}", f"link-to-notes {link}", "file ok", f"link {unsupported}",
    ], traced.stderr.decode(errors="replace")[-3000:]
    assert target_mode == (0o640 if mode == "read" else 0o600)
    assert notes_mode != 0o600
    assert shadow_mode in (None, 0o644)
    assert stat.S_IMODE(os.stat(local / "file").st_mode) == 0o600


# --- repeated opens answered by the C trap loop ----------------------------------------

REREAD = r"""
import os, sys, time
path, count = sys.argv[1], int(sys.argv[2])
def once():
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        return (info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns,
                os.read(fd, 1 << 16))
    finally:
        os.close(fd)
seen = {once() for _ in range(count)}
print(len(seen), *sorted(seen))
sys.stdout.flush()
if len(sys.argv) > 3:  # wait for the target's copy to change
    deadline = time.monotonic() + 10
    while once() in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    print(once()[5].decode())
"""


def test_repeated_opens_of_a_cached_target_file_report_the_targets_stat(
        netns_target: NetnsTarget, tree: str) -> None:
    # From the second open on, open and fstat are answered by the C loop
    # (seccomp.FastAnswers): they must still be the target's file and stat.
    out = assert_like_inside(
        netns_target, [sys.executable, "-c", REREAD, f"{tree}/config.yaml", "50"], visible(tree))
    assert out.startswith(b"1 "), out


def test_repeated_opens_of_a_cached_target_file_see_it_change(
        netns_target: NetnsTarget, tree: str) -> None:
    # The C loop answers only while the stat is fresh: a change on the target
    # is seen once it is stale, as it was when Python answered every open.
    config = json.dumps({"feature": {"fs": visible(tree)}})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        file.write(config)
    host_view = Path(f"/proc/{netns_target.pid}/root{tree}/changing.txt")
    host_view.write_text("before\n")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "mtrace.cli", "exec", "--target", f"pid/{netns_target.pid}",
             "-f", file.name, "--", sys.executable, "-c", REREAD, f"{tree}/changing.txt", "20",
             "wait"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith(b"1 "), first
        host_view.write_text("after, and longer\n")
        out, err = process.communicate(timeout=RUN_TIMEOUT)
        assert out == b"after, and longer\n\n", err.decode(errors="replace")[-3000:]
    finally:
        os.unlink(file.name)
        host_view.unlink(missing_ok=True)
