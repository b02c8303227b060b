"""What the rig changes on the machine, and how `down` puts it back.

* sysctls: recorded before anything starts (kubelet sets kernel.panic,
  kernel.panic_on_oops, vm.overcommit_memory, vm.panic_on_oom and the keyring
  limits; dockerd and kube-proxy set forwarding and route_localnet) and written
  back by `down`.
* mounts under the rig's directories (pod volumes, overlay layers, network
  namespace handles): unmounted, deepest first.
* iptables: docker's and Kubernetes' chains (DOCKER*, KUBE*) and every rule of a
  built-in chain that jumps to them or names docker's bridge; other rules are
  not touched.
* docker's bridge (docker0).
* cgroups: containers run under ``/mtrace-rig`` in every v1 hierarchy; after a
  crash their processes are killed (by the pids in those cgroups) and the
  cgroups removed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from .common import BRIDGE, STATE_DIR, log, run

SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
CGROUP_PARENT = "mtrace-rig"
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SYSCTL_RECORD = STATE_DIR / "sysctls.json"
_OUR_CHAIN_PREFIXES = ("DOCKER", "KUBE-")
_BUILTIN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def record_sysctls() -> None:
    """Record the values once: after a crash the first record (the machine's own values) is kept."""
    if _SYSCTL_RECORD.exists():
        return
    values = {}
    for name in SYSCTLS:
        try:
            values[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            continue
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    _SYSCTL_RECORD.write_text(json.dumps(values, indent=1) + "\n")


def restore_sysctls() -> None:
    try:
        values = json.loads(_SYSCTL_RECORD.read_text())
    except (OSError, ValueError):
        return
    for name, value in values.items():
        path = _sysctl_path(name)
        try:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
        except OSError as error:
            log(f"cannot restore {name}={value}: {error}")
    _SYSCTL_RECORD.unlink()


def mounts_under(roots: list[Path]) -> list[str]:
    found = []
    prefixes = [str(root).rstrip("/") + "/" for root in roots]
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            mount_point = line.split()[4].replace("\\040", " ")
            if any(mount_point.startswith(prefix) or mount_point + "/" == prefix for prefix in prefixes):
                found.append(mount_point)
    return found


def unmount_under(roots: list[Path]) -> None:
    for _attempt in range(5):
        mount_points = mounts_under(roots)
        if not mount_points:
            return
        for mount_point in sorted(mount_points, key=lambda point: point.count("/"), reverse=True):
            if subprocess.run(["umount", mount_point], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
    left = mounts_under(roots)
    if left:
        log(f"still mounted: {' '.join(left)}")


def _ours(rule: str) -> bool:
    words = shlex.split(rule)
    if "-j" in words and words[words.index("-j") + 1].startswith(_OUR_CHAIN_PREFIXES):
        return True
    if "-g" in words and words[words.index("-g") + 1].startswith(_OUR_CHAIN_PREFIXES):
        return True
    return BRIDGE in words


def remove_iptables_chains() -> None:
    for save, tool in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        for table in ("filter", "nat", "mangle", "raw"):
            result = subprocess.run([save, "-t", table], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                continue
            chains = []
            for line in result.stdout.splitlines():
                if line.startswith(":"):
                    chain = line[1:].split()[0]
                    if chain.startswith(_OUR_CHAIN_PREFIXES):
                        chains.append(chain)
                elif line.startswith("-A "):
                    chain = line.split()[1]
                    if chain in _BUILTIN_CHAINS and _ours(line):
                        spec = shlex.split(line)[2:]
                        run([tool, "-w", "-t", table, "-D", chain, *spec], check=False)
            for chain in chains:
                run([tool, "-w", "-t", table, "-F", chain], check=False)
            for chain in chains:
                run([tool, "-w", "-t", table, "-X", chain], check=False)


def leftover_iptables() -> list[str]:
    """Chains and rules the rig would remove (empty after a clean `down`)."""
    leftovers = []
    for save in ("iptables-save", "ip6tables-save"):
        result = subprocess.run([save], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            our_chain = line.startswith(":") and line[1:].split()[0].startswith(_OUR_CHAIN_PREFIXES)
            if our_chain or (line.startswith("-A ") and _ours(line)):
                leftovers.append(f"{save}: {line}")
    return leftovers


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


def remove_bridge() -> None:
    if bridge_exists():
        run(["ip", "link", "delete", BRIDGE], check=False)


def rig_cgroups() -> list[Path]:
    """The rig's container cgroups, deepest first, in every hierarchy."""
    found = []
    for hierarchy in _CGROUP_ROOT.iterdir() if _CGROUP_ROOT.is_dir() else []:
        parent = hierarchy / CGROUP_PARENT
        if parent.is_dir():
            found += [path for path in parent.rglob("*") if path.is_dir()] + [parent]
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def kill_cgroup_processes() -> None:
    for _attempt in range(20):
        pids = set()
        for cgroup in rig_cgroups():
            try:
                pids.update(int(pid) for pid in (cgroup / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        pids.discard(os.getpid())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for cgroup in rig_cgroups():
        try:
            cgroup.rmdir()
        except OSError:
            pass
