"""Images, made offline by the rig and kept in its Docker store (they survive `down`).

| image | what it holds |
| --- | --- |
| ``PAUSE`` | the pause binary from the Kubernetes tree (every pod's sandbox) |
| ``BUSYBOX`` | busybox-static with its applets |
| ``PROGRAMS`` | busybox + the test programs in /programs (httpserve, the four probe flavours, ...) |
| ``PYTHON_BASE`` | Debian bookworm (mmdebstrap) with python3, psutil, dnspython and msgspec |
| ``AGENT`` | ``agent/Dockerfile`` built on ``PYTHON_BASE``: the mtrace agent alone |

Pods use them with ``imagePullPolicy: Never``. `ensure_images()` rebuilds only
what changed: the programs image carries the programs' build stamp as a label,
and the agent image is a `docker build` (its layer cache makes a rebuild quick).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .common import BIN_DIR, CACHE_ROOT, DEBIAN_MIRROR, DEBIAN_SUITE, VERSION, RigError, docker_argv, log, run

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"

PAUSE = f"mtrace-rig/pause:{VERSION}"
BUSYBOX = "mtrace-rig/busybox:latest"
PROGRAMS = "mtrace-rig/programs:latest"
PYTHON_BASE = "mtrace-rig/python-base:bookworm"
AGENT = "mtrace-agent:rig"
AGENT_DOCKERFILE = REPO_ROOT / "agent" / "Dockerfile"
PROGRAMS_IN_IMAGE = "/programs"
_PROGRAM_NAMES = ("httpserve", "probe-go", "probe-glibc-static", "probe-musl", "probe-dynamic",
                  "goroutines", "httpclient", "static-true")  # fmt: skip
_LABEL = "mtrace.rig.content"
_PATH = "/programs:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The agent's imports; nft/iptables and ip for incoming traffic's redirect rules and routes.
_BASE_PACKAGES = ("python3", "python3-psutil", "python3-dnspython", "python3-h11", "python3-h2",
                  "python3-cryptography", "nftables", "iptables", "iproute2")  # fmt: skip
_BASE_DIR = CACHE_ROOT / "base"


def image_label(image: str) -> str | None:
    """The image's content label, or None when the image does not exist."""
    result = run(
        docker_argv("image", "inspect", "--format", "{{json .Config.Labels}}", image), check=False, quiet=True
    )
    if result.returncode != 0:
        return None
    labels = json.loads(result.stdout or "null") or {}
    return str(labels.get(_LABEL, ""))


def _import(image: str, rootfs: Path, changes: list[str], content: str) -> None:
    """`docker import` a directory: a tar stream made here, so file owners are root whatever made them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(rootfs.rglob("*")):
            info = archive.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with open(path, "rb") as data:
                    archive.addfile(info, data)
            else:
                archive.addfile(info)
    argv = docker_argv("import")
    for change in [*changes, f"LABEL {_LABEL}={content}"]:
        argv += ["--change", change]
    run([*argv, "-", image], input_bytes=buffer.getvalue())


def _skeleton(rootfs: Path) -> None:
    for directory in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "root",
        "proc",
        "sys",
        "dev",
        "var/tmp",
    ):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")


def _busybox_rootfs(rootfs: Path) -> None:
    _skeleton(rootfs)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise RigError("/bin/busybox missing: apt-get install busybox-static")
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = run([busybox, "--list-full"]).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if link.name == "busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def ensure_pause_image() -> None:
    content = f"{VERSION}-{(BIN_DIR / 'pause').stat().st_mtime_ns}"
    if image_label(PAUSE) == content:
        return
    with tempfile.TemporaryDirectory() as scratch:
        rootfs = Path(scratch)
        shutil.copy2(BIN_DIR / "pause", rootfs / "pause")
        _import(PAUSE, rootfs, ['ENTRYPOINT ["/pause"]'], content)
    log(f"image {PAUSE}")


def _ensure_busybox_image() -> None:
    content = str(Path("/bin/busybox").stat().st_mtime_ns)
    if image_label(BUSYBOX) == content:
        return
    with tempfile.TemporaryDirectory() as scratch:
        _busybox_rootfs(Path(scratch))
        _import(BUSYBOX, Path(scratch), [f"ENV PATH={_PATH}", 'CMD ["/bin/sh"]'], content)
    log(f"image {BUSYBOX}")


def _ensure_programs_image() -> None:
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from programs_build import DEFAULT_OUT_DIR, build_programs

    paths = build_programs()
    content = (DEFAULT_OUT_DIR / ".stamp").read_text().strip()[:32]
    if image_label(PROGRAMS) == content:
        return
    with tempfile.TemporaryDirectory() as scratch:
        rootfs = Path(scratch)
        _busybox_rootfs(rootfs)
        programs_dir = rootfs / PROGRAMS_IN_IMAGE.lstrip("/")
        programs_dir.mkdir()
        for name in _PROGRAM_NAMES:
            shutil.copy2(paths[name], programs_dir / name)
        # probe-dynamic needs its loader and libc: the host's, at the same paths.
        for library in _shared_libraries(paths["probe-dynamic"]):
            target = rootfs / library.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(library), target)
        _import(
            PROGRAMS, rootfs, [f"ENV PATH={_PATH}", 'CMD ["/programs/httpserve", "0.0.0.0:8080"]'], content
        )
    log(f"image {PROGRAMS}")


def _shared_libraries(binary: Path) -> list[str]:
    libraries = []
    for line in run(["ldd", binary]).stdout.splitlines():
        words = line.split()
        if (
            "=>" in words
            and len(words) > words.index("=>") + 1
            and words[words.index("=>") + 1].startswith("/")
        ):
            libraries.append(words[words.index("=>") + 1])
        elif words and words[0].startswith("/"):
            libraries.append(words[0])
    return libraries


def _msgspec_wheel(wheels: Path) -> Path:
    """msgspec is not packaged for bookworm: a manylinux wheel for Debian's Python 3.11, from PyPI, once."""
    found = sorted(wheels.glob("msgspec-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    run([
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
        "--dest", wheels, "msgspec>=0.18",
    ])  # fmt: skip
    found = sorted(wheels.glob("msgspec-*.whl"))
    if not found:
        raise RigError(f"pip download msgspec left no wheel in {wheels}")
    return found[-1]


def _base_tarball() -> Path:
    """Debian bookworm with Python and the agent's dependencies (mmdebstrap), cached as a tarball."""
    wheel = _msgspec_wheel(_BASE_DIR / "wheels")
    packages = hashlib.sha256(",".join(_BASE_PACKAGES).encode()).hexdigest()[:8]
    tarball = _BASE_DIR / f"bookworm-python-{packages}-{wheel.stem}.tar"
    if tarball.exists():
        return tarball
    with tempfile.TemporaryDirectory(dir=_BASE_DIR) as scratch:
        rootfs = Path(scratch) / "rootfs"
        run([
            "mmdebstrap", "--mode=root", "--variant=essential", "--quiet",
            f"--include={','.join(_BASE_PACKAGES)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            DEBIAN_SUITE, rootfs, DEBIAN_MIRROR,
        ])  # fmt: skip
        run([
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
            "--target", rootfs / "usr/lib/python3/dist-packages", wheel,
        ])  # fmt: skip
        partial = Path(scratch) / "rootfs.tar"
        run(["tar", "--numeric-owner", "-C", rootfs, "-cf", partial, "."])
        partial.rename(tarball)
    return tarball


def _ensure_python_base_image() -> None:
    _BASE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = _base_tarball()
    content = tarball.stem
    if image_label(PYTHON_BASE) == content:
        return
    argv = docker_argv("import", "--change", f"ENV PATH={_PATH}", "--change", 'CMD ["/usr/bin/python3"]',
                       "--change", f"LABEL {_LABEL}={content}", tarball, PYTHON_BASE)  # fmt: skip
    run(argv)
    log(f"image {PYTHON_BASE}")


def build_agent_image(tag: str = AGENT, base: str = PYTHON_BASE) -> None:
    """The users' Dockerfile, with the rig's local base instead of a registry one."""
    run(docker_argv("build", "--quiet", "--file", AGENT_DOCKERFILE, "--build-arg", f"BASE={base}",
                    "--tag", tag, REPO_ROOT))  # fmt: skip


def ensure_images() -> None:
    ensure_pause_image()
    _ensure_busybox_image()
    _ensure_programs_image()
    _ensure_python_base_image()
    build_agent_image()


def all_images() -> dict[str, str]:
    return {
        "pause": PAUSE,
        "busybox": BUSYBOX,
        "programs": PROGRAMS,
        "python-base": PYTHON_BASE,
        "agent": AGENT,
    }


__all__ = ["AGENT", "BUSYBOX", "PAUSE", "PROGRAMS", "PYTHON_BASE", "all_images", "ensure_images"]
