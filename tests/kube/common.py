"""Where the rig keeps things, and the small helpers every rig module uses.

Three places, none inside the clone:

* ``CACHE_DIR`` (``/var/cache/mtrace-rig/v1.20.2``): what survives `down` and
  makes the next `up` fast: the Kubernetes binaries, the pause binary, the base
  rootfs tarball, Docker's image store, the private apt lists.
* ``STATE_DIR`` (``/run/mtrace-rig``): one running rig: certificates, kubeconfig,
  pid files, logs, the sysctl values recorded before start. `down` removes it.
* ``VAR_DIR`` (``/var/lib/mtrace-rig``): the kubelet's root (pod volumes are
  mounted here); emptied by `down`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

VERSION = "v1.20.2"
# Debian bookworm's source package: the whole 1.20.2 tree (vendor/ and cmd/).
DEBIAN_SOURCE = "kubernetes"
DEBIAN_SOURCE_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"

CACHE_ROOT = Path(os.environ.get("MTRACE_RIG_CACHE", "/var/cache/mtrace-rig"))
CACHE_DIR = CACHE_ROOT / VERSION
BIN_DIR = CACHE_DIR / "bin"
STATE_DIR = Path(os.environ.get("MTRACE_RIG_STATE", "/run/mtrace-rig"))
VAR_DIR = Path(os.environ.get("MTRACE_RIG_VAR", "/var/lib/mtrace-rig"))
KUBECONFIG = STATE_DIR / "admin.kubeconfig"
DOCKER_SOCKET = STATE_DIR / "docker.sock"
DOCKER_DATA = CACHE_ROOT / "docker"  # images survive `down`: the next `up` skips building them

# Ports of the rig's own servers (loopback only).
ETCD_CLIENT_PORT = 23790
ETCD_PEER_PORT = 23800
APISERVER_PORT = 16443
KUBELET_PORT = 10250
SERVICE_CIDR = "10.96.0.0/16"
# Docker's default bridge: pods get addresses here and the cluster DNS listens on its gateway.
BRIDGE = "docker0"
BRIDGE_GATEWAY = "172.17.0.1"
BRIDGE_CIDR = "172.17.0.0/16"
CLUSTER_DOMAIN = "cluster.local"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy")

# Packages the rig installs with apt on a fresh machine (Debian bookworm names).
APT_PACKAGES = (
    "golang-go",
    "golang-github-modern-go-reflect2-dev",
    "rsync",
    "make",
    "gcc",
    "libc6-dev",
    "dpkg-dev",
    "etcd-server",
    "docker.io",
    "iptables",
    "conntrack",
    "socat",  # dockershim port-forward runs socat in the pod's network namespace
    "openssl",
    "busybox-static",
    "mmdebstrap",
    "util-linux",
    "iproute2",
    "procps",
)


class RigError(Exception):
    """The rig cannot do what was asked; the message says why and what to do."""


def log(message: str) -> None:
    print(f"rig: {message}", file=sys.stderr, flush=True)


@contextmanager
def phase(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log a phase and how long it took (`.ci/run` prints these)."""
    started = time.monotonic()
    log(f"{name} ...")
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + elapsed
        log(f"{name}: {elapsed:.1f}s")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    quiet: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output; on failure raise RigError carrying it."""
    raw = subprocess.run(
        [str(part) for part in argv], capture_output=True, env=env, cwd=cwd, input=input_bytes, check=False
    )
    result = subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
    )
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        command = " ".join(str(part) for part in argv)
        raise RigError(f"{command} failed (rc={result.returncode}):\n{output[-4000:]}")
    if not quiet and result.returncode != 0:
        log(f"{argv[0]} rc={result.returncode}: {(result.stdout + result.stderr).strip()[-500:]}")
    return result


def docker_argv(*args: str | os.PathLike[str]) -> list[str]:
    """The docker CLI, talking to the rig's dockerd (never the machine's default socket)."""
    return ["/usr/bin/docker", "--host", f"unix://{DOCKER_SOCKET}", *(str(arg) for arg in args)]


def missing_apt_packages(packages: Sequence[str] = APT_PACKAGES) -> list[str]:
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def install_apt_packages(packages: Sequence[str] = APT_PACKAGES) -> None:
    """Install what is missing (policy-rc.d keeps Debian from starting dockerd/etcd itself)."""
    missing = missing_apt_packages(packages)
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
