"""Fetch and build the Kubernetes binaries once per machine, keyed on the version.

No registry ships kube-apiserver or kubelet binaries; Debian bookworm's
`kubernetes` source package holds the whole 1.20.2 tree. The build follows
/work/shared/KUBE-RIG.md: GOPATH mode, bookworm's Go 1.19, the vendored reflect2
swapped for Debian's 1.0.2 (1.0.1 breaks with Go >= 1.18), `make
generated_files` first, version variables set by -ldflags.

The result lives in ``CACHE_DIR/bin`` (outside any clone); a stamp file names
what was built, so a second `up` skips all of this. The source tree and the Go
cache are deleted after a successful build (about 2.5 GB).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
from pathlib import Path

from .common import (
    BIN_DIR,
    CACHE_DIR,
    DEBIAN_MIRROR,
    DEBIAN_SOURCE,
    DEBIAN_SOURCE_VERSION,
    DEBIAN_SUITE,
    KUBE_BINARIES,
    VERSION,
    RigError,
    log,
    phase,
    run,
)

GO = "/usr/lib/go-1.19/bin/go"
REFLECT2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
_STAMP = BIN_DIR / ".built"
_STAMP_TEXT = f"{VERSION} {DEBIAN_SOURCE_VERSION} pause\n"
_SOURCES = CACHE_DIR / "source"
_WORK = CACHE_DIR / "work"


def binaries_ready() -> bool:
    return (
        _STAMP.exists()
        and _STAMP.read_text() == _STAMP_TEXT
        and all((BIN_DIR / name).exists() for name in (*KUBE_BINARIES, "pause"))
    )


def ensure_binaries(timings: dict[str, float] | None = None) -> Path:
    """Build the binaries unless the cache already has them; return the bin directory."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two concurrent `up`s build once
        if binaries_ready():
            return BIN_DIR
        with phase("fetch kubernetes source (apt-get source)", timings):
            tarball = _fetch_source()
        with phase("build kubernetes binaries (cold: ~7 min on 2 cores)", timings):
            _build(tarball)
    return BIN_DIR


def _fetch_source() -> Path:
    """`apt-get source --download-only` through a private sources dir (machine's apt config untouched)."""
    existing = sorted(glob.glob(str(_SOURCES / f"{DEBIAN_SOURCE}_*.orig.tar.*")))
    if existing:
        return Path(existing[0])
    apt_dir = CACHE_DIR / "apt"
    parts = apt_dir / "sources.list.d"
    lists = apt_dir / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "mtrace-rig-src.sources").write_text(
        "Types: deb-src\n"
        f"URIs: {DEBIAN_MIRROR}\n"
        f"Suites: {DEBIAN_SUITE} {DEBIAN_SUITE}-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb-src\n"
        "URIs: http://deb.debian.org/debian-security\n"
        f"Suites: {DEBIAN_SUITE}-security\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    private = [
        "-o", "Dir::Etc::sourcelist=/dev/null",
        "-o", f"Dir::Etc::sourceparts={parts}",
        "-o", f"Dir::State::Lists={lists}",
    ]  # fmt: skip
    run(["apt-get", *private, "update", "-qq"])
    _SOURCES.mkdir(parents=True, exist_ok=True)
    run(
        ["apt-get", *private, "source", "--download-only", f"{DEBIAN_SOURCE}={DEBIAN_SOURCE_VERSION}"],
        cwd=_SOURCES,
    )
    found = sorted(glob.glob(str(_SOURCES / f"{DEBIAN_SOURCE}_*.orig.tar.*")))
    if not found:
        raise RigError(f"apt-get source {DEBIAN_SOURCE} left no orig tarball in {_SOURCES}")
    return Path(found[0])


def _build(tarball: Path) -> None:
    if not Path(GO).exists():
        raise RigError(f"{GO} missing: apt-get install golang-go (bookworm's Go 1.19)")
    shutil.rmtree(_WORK, ignore_errors=True)
    gopath = _WORK / "gopath"
    tree = gopath / "src" / "k8s.io" / "kubernetes"
    tree.mkdir(parents=True)
    log(f"unpacking {tarball.name}")
    run(["tar", "-xf", tarball, "-C", tree, "--strip-components=1"])
    if not (tree / "cmd" / "kube-apiserver").is_dir():
        raise RigError(f"{tarball} does not hold cmd/kube-apiserver: not the whole Kubernetes tree")

    # reflect2 1.0.1 reads runtime internals that Go 1.18 changed: Debian's 1.0.2 works.
    vendored = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    if not REFLECT2.is_dir():
        raise RigError(f"{REFLECT2} missing: apt-get install golang-github-modern-go-reflect2-dev")
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2, vendored, symlinks=False)
    (vendored / "go.mod").unlink(missing_ok=True)

    env = {
        "PATH": f"{Path(GO).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(_WORK),
        "GOPATH": str(gopath),
        "GOCACHE": str(_WORK / "gocache"),
        "GO111MODULE": "off",  # the 1.20 tree builds in GOPATH mode; module mode wants go.mod updates
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
        "GOTOOLCHAIN": "local",
        "KUBE_GIT_VERSION": VERSION,
        "KUBE_GIT_TREE_STATE": "clean",
        "KUBE_VERBOSE": "0",
    }
    log("make generated_files (openapi code)")
    run(["make", "generated_files"], cwd=tree, env=env)

    version_vars = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        prefix = f"k8s.io/kubernetes/vendor/{package}"
        version_vars += [
            f"-X {prefix}.gitVersion={VERSION}",
            f"-X {prefix}.gitMajor=1",
            f"-X {prefix}.gitMinor=20",
            f"-X {prefix}.gitTreeState=clean",
            f"-X {prefix}.buildDate=1970-01-01T00:00:00Z",
        ]
    out = _WORK / "out"
    out.mkdir()
    log(f"go build {' '.join(KUBE_BINARIES)}")
    run(
        [
            GO, "build", "-trimpath", "-o", f"{out}/",
            "-ldflags", f"-s -w {' '.join(version_vars)}",
            *(f"k8s.io/kubernetes/cmd/{name}" for name in KUBE_BINARIES),
        ],
        cwd=tree,
        env=env,
    )  # fmt: skip
    # The pause binary comes from the same tree, built static so the image needs nothing else.
    run(
        ["gcc", "-Os", "-static", "-Wall", f'-DVERSION="{VERSION}-mtrace-rig"', "-o", out / "pause",
         tree / "build" / "pause" / "linux" / "pause.c"]
    )  # fmt: skip

    staging = CACHE_DIR / "bin.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in (*KUBE_BINARIES, "pause"):
        shutil.move(str(out / name), staging / name)
        os.chmod(staging / name, 0o755)
    shutil.rmtree(BIN_DIR, ignore_errors=True)
    staging.rename(BIN_DIR)
    _STAMP.write_text(_STAMP_TEXT)
    shutil.rmtree(_WORK, ignore_errors=True)
