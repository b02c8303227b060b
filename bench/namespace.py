"""The namespace target: a stand-in for a remote environment, made on this machine.

``NamespaceTarget.start(...)`` creates a network namespace ``mtrace-bench-<pid>``
with only ``lo`` (up, no veth: nothing leaves the machine), starts
``bench/netserve`` on the namespace's loopback (a small-HTTP port and a bulk
port) and a target process (``sleep``) inside it, whose pid is what
``mtrace exec --target pid/N`` and the agent's ``--target-pid`` take. The
target also has a file only it can see (``remote_file``: a tmpfs mounted, in
its own mount namespace, over an empty directory of this host), so a
successful open of it proves the open went to the target. ``close()``
stops both and deletes the namespace; namespaces left by a crashed earlier run
(whose pid is gone) are deleted at start.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import Unavailable

PREFIX = "mtrace-bench"
_STALE = re.compile(rf"^{PREFIX}-(\d+)$")
START_TIMEOUT = 10.0
# The veth pair of socks_proxy(): this host's end, the target's end.
SOCKS_HOST_ADDRESS, SOCKS_TARGET_ADDRESS = "10.213.0.1", "10.213.0.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()[:200]}")
    return result


def _remove_stale_namespaces() -> None:
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _STALE.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _ip("netns", "del", name, check=False)
            with contextlib.suppress(OSError):
                Path(f"/mnt/{name}").rmdir()


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise Unavailable("netserve did not start in the namespace")
    return process.stdout.readline().strip()


def stop_process(process: subprocess.Popen[str] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = START_TIMEOUT) -> bool:
    """Whether a socket of this network namespace listens on ``port`` (from /proc/net/tcp)."""
    wanted = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp", encoding="ascii") as table:
            for line in table.readlines()[1:]:
                parts = line.split()
                if parts[1].endswith(wanted) and parts[3] == "0A":
                    return True
        time.sleep(0.02)
    return False


@dataclass
class NamespaceTarget:
    name: str
    pid: int
    http_port: int
    bulk_port: int
    remote_file: Path
    work_dir: Path
    _processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @classmethod
    def start(cls, *, netserve: Path, work_dir: Path, bulk_bytes: int) -> NamespaceTarget:
        if os.geteuid() != 0:
            raise Unavailable("needs root to create a network namespace")
        if shutil.which("ip") is None:
            raise Unavailable("`ip` not installed: apt-get install iproute2")
        _remove_stale_namespaces()
        name = f"{PREFIX}-{os.getpid()}"
        _ip("netns", "del", name, check=False)
        _ip("netns", "add", name)
        processes: list[subprocess.Popen[str]] = []
        try:
            _ip("-n", name, "link", "set", "lo", "up")
            server = subprocess.Popen(
                ["ip", "netns", "exec", name, str(netserve), str(bulk_bytes)],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            processes.append(server)
            ports = dict(item.split("=") for item in read_line(server, START_TIMEOUT).split())
            # Not under /tmp or $HOME: mtrace keeps those local by default.
            remote_dir = Path(f"/mnt/{name}")
            remote_dir.mkdir(parents=True, exist_ok=True)
            remote_file = remote_dir / "file.txt"
            # `ip netns exec` gives the target a private mount namespace: the
            # tmpfs (and the 4 KiB file in it) exist only there.
            script = (f"mount -t tmpfs mtrace-bench {remote_dir} && "
                      f"head -c 4096 /dev/zero > {remote_file} && exec sleep 86400")
            target = subprocess.Popen(["ip", "netns", "exec", name, "sh", "-c", script],
                                      stdin=subprocess.DEVNULL, text=True)
            processes.append(target)
            _wait_for_exec(target.pid, "sleep")
            return cls(name, target.pid, int(ports["http"]), int(ports["bulk"]), remote_file,
                       work_dir, processes)
        except BaseException:
            for process in reversed(processes):
                stop_process(process)
            _ip("netns", "del", name, check=False)
            with contextlib.suppress(OSError):
                Path(f"/mnt/{name}").rmdir()
            raise

    def inside(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run directly in the target's network and mount namespaces: the
        reference side of every remote comparison."""
        if shutil.which("nsenter") is None:
            raise Unavailable("nsenter not installed: apt-get install util-linux")
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "--", *argv]

    @contextlib.contextmanager
    def socat_relay(self) -> Iterator[int]:
        """A host-side port that socat relays into the namespace's bulk port.

        The same shape as mtrace's path: a local socket, a pipe to a process in
        the target's namespace, and that process's connection to the service.
        """
        if shutil.which("socat") is None:
            raise Unavailable("socat not installed: apt-get install socat")
        port = free_port()
        # socat's EXEC address cannot hold the ':' of the inner address: a script can.
        # -t 0: no half-close linger (0.5 s by default), which is not throughput.
        script = self.work_dir / "socat-relay.sh"
        script.write_text(f"#!/bin/sh\nexec ip netns exec {self.name} "
                          f"socat -t 0 STDIO TCP:127.0.0.1:{self.bulk_port}\n")
        script.chmod(0o755)
        relay = subprocess.Popen(
            ["socat", "-t", "0", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
             f"EXEC:{script}"],
            stdin=subprocess.DEVNULL, text=True)
        try:
            if not wait_listening(port):
                raise Unavailable("socat did not start listening")
            yield port
        finally:
            stop_process(relay)

    @contextlib.contextmanager
    def socks_proxy(self) -> Iterator[str]:
        """microsocks in the namespace behind a veth pair; yields a proxychains4 config
        file that sends every connection (127.0.0.1 included) through it.

        The peer users have today for outgoing traffic: proxychains4 (LD_PRELOAD) on
        this machine, a SOCKS server in the target.
        """
        if shutil.which("proxychains4") is None or shutil.which("microsocks") is None:
            raise Unavailable("apt-get install proxychains4 microsocks")
        host_link, target_link = f"mtb{self.pid % 100000}h", f"mtb{self.pid % 100000}n"
        _ip("link", "del", host_link, check=False)
        _ip("link", "add", host_link, "type", "veth", "peer", "name", target_link,
            "netns", self.name)
        socks: subprocess.Popen[str] | None = None
        try:
            _ip("addr", "add", f"{SOCKS_HOST_ADDRESS}/30", "dev", host_link)
            _ip("link", "set", host_link, "up")
            _ip("-n", self.name, "addr", "add", f"{SOCKS_TARGET_ADDRESS}/30", "dev", target_link)
            _ip("-n", self.name, "link", "set", target_link, "up")
            port = free_port()
            socks = subprocess.Popen(self.inside(["microsocks", "-i", SOCKS_TARGET_ADDRESS,
                                                  "-p", str(port)]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
            config = self.work_dir / "proxychains.conf"
            config.write_text(f"strict_chain\nquiet_mode\ntcp_read_time_out 15000\n"
                              f"tcp_connect_time_out 8000\n[ProxyList]\n"
                              f"socks5 {SOCKS_TARGET_ADDRESS} {port}\n")
            time.sleep(0.3)  # microsocks prints nothing when it is ready
            yield str(config)
        finally:
            stop_process(socks)
            _ip("link", "del", host_link, check=False)

    def close(self) -> None:
        for process in reversed(self._processes):
            stop_process(process)
        self._processes.clear()
        _ip("netns", "del", self.name, check=False)
        with contextlib.suppress(OSError):
            self.remote_file.parent.rmdir()  # the tmpfs went with the target's mount namespace


def _wait_for_exec(pid: int, command: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                return
        except OSError as error:
            raise Unavailable(f"the target process exited: {error}") from error
        time.sleep(0.01)
    raise Unavailable("the target process did not start")
