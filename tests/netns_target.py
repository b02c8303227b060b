"""A real "remote environment" on this machine: a network namespace and a target process in it.

``with netns_target() as target:`` creates (and always removes, even when a
step fails or the test crashes) a network namespace named ``mtr-<pid>-<n>``
holding one target process. The target process (this file run as a script,
``serve --role target``) has:

* its own environment (``target.env``: ``env -i`` plus a few variables);
* its own UTS namespace and hostname (``target.hostname``, also its
  ``/etc/hostname``);
* its own ``/etc/hosts`` and ``/etc/resolv.conf`` (``ip netns exec``
  bind-mounts ``/etc/netns/NAME/*`` in the private mount namespace it makes;
  ``/proc/PID/root/etc/hosts`` shows the target's view);
* a file only it sees (``target.private_file``: a tmpfs mounted over an empty
  host directory inside its mount namespace);
* services on the namespace's own loopback (``lo`` is up, nothing else):
  a TCP service on ``127.0.0.1:target.tcp_port`` (sends ``target.tcp_banner``
  then echoes until EOF, then closes), a UDP service on
  ``127.0.0.1:target.udp_port`` (answers ``b"target-udp:" + datagram``), and
  a DNS server on ``127.0.0.1:53`` answering ``target.dns_names`` (A and AAAA)
  and NXDOMAIN for everything else;
* and, to prove a client reached the namespace and not this host, host
  services on the SAME ports of the host's 127.0.0.1 answering differently
  (``target.host_tcp_banner``, ``b"host-udp:"``);
* known connection failures: ``closed_port`` (ECONNREFUSED),
  ``unreachable_host`` (EHOSTUNREACH), ``no_route_host`` (ENETUNREACH) and
  ``blackhole_port`` on 127.0.0.1 (SYNs dropped: ETIMEDOUT).

The helpers ``target.nsenter_argv(...)`` / ``target.run_inside(...)`` run a
command the way the target sees the world (its network and mount namespaces,
its environment): the reference side of differential tests.

Needs root, ``ip`` (iproute2) and ``nsenter`` (util-linux).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NETNS_PREFIX = "mtr"
_NAME_PATTERN = re.compile(rf"^{NETNS_PREFIX}-(\d+)-\d+$")
_counter = itertools.count(1)
STARTUP_TIMEOUT = 15.0

#: Names the namespace's DNS server knows (and this host does not).
DNS_NAMES = {
    "only-in-target.test": ("10.99.0.7", "fd00:99::7"),
    "api.target.test": ("10.99.0.9", "fd00:99::9"),
}
#: Names in the namespace's /etc/hosts only.
HOSTS_NAMES = {"hosts-only.test": "10.99.0.8"}
SEARCH_DOMAIN = "target.test"
CLOSED_PORT = 1
UNREACHABLE_NETWORK = "10.98.0.0/16"
UNREACHABLE_HOST = "10.98.0.1"
NO_ROUTE_HOST = "10.97.0.1"
BLACKHOLE_PORT = 9


@dataclass
class NetnsTarget:
    """What a test needs to know about the target (see the module docstring)."""

    netns: str
    pid: int
    env: dict[str, str]
    tcp_port: int
    udp_port: int
    dns_port: int
    tcp_banner: bytes
    host_tcp_banner: bytes
    dns_names: dict[str, tuple[str, str]]
    hosts_names: dict[str, str]
    search_domain: str
    private_file: str
    private_file_content: bytes
    hosts_file_content: bytes
    closed_port: int  # nothing listens there: ECONNREFUSED
    unreachable_host: str  # an "unreachable" route: EHOSTUNREACH
    no_route_host: str  # no route at all: ENETUNREACH
    blackhole_port: int | None  # SYNs to 127.0.0.1:port dropped: ETIMEDOUT (None: no iptables)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    # Its own UTS namespace with this hostname, also in its /etc/hostname.
    hostname: str = ""

    @property
    def name(self) -> str:
        return self.netns

    def nsenter_argv(self, *argv: str, environment: bool = True) -> list[str]:
        """``argv`` run in the target's network and mount namespaces (with its environment)."""
        prefix = ["nsenter", f"--target={self.pid}", "--net", "--mount", "--uts", "--"]
        if environment:
            prefix += ["env", "-i", *(f"{key}={value}" for key, value in self.env.items())]
        return [*prefix, *argv]

    def run_inside(
        self, *argv: str, timeout: float = 30.0, **kwargs: object
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.nsenter_argv(*argv), capture_output=True, timeout=timeout, check=False, **kwargs
        )

    @property
    def alive(self) -> bool:
        return all(process.poll() is None for process in self._processes)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _namespaces() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _remove_namespace(name: str) -> None:
    pids = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30, check=False
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def cleanup_stale() -> None:
    """Remove namespaces left by test sessions that died (their pid no longer exists)."""
    for name in _namespaces():
        match = _NAME_PATTERN.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _remove_namespace(name)


def _read_ready(process: subprocess.Popen[bytes], what: str) -> str:
    """The READY line of a service process, or a clear failure with its stderr."""
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            if b"\n" in buffer:
                line = buffer.split(b"\n", 1)[0].decode()
                if line.startswith("READY"):
                    return line
                break
        elif process.poll() is not None:
            break
    process.kill()
    _, stderr = process.communicate(timeout=10)
    raise RuntimeError(f"{what} did not start: {buffer!r} {stderr.decode(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=10)


@contextlib.contextmanager
def netns_target() -> Iterator[NetnsTarget]:
    """Create a namespace with a target process in it; remove everything on exit."""
    cleanup_stale()
    name = f"{NETNS_PREFIX}-{os.getpid()}-{next(_counter)}"
    processes: list[subprocess.Popen[bytes]] = []
    private_dir = tempfile.mkdtemp(prefix=f"{name}-private-")
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        # Known failures, so tests can check that the real errno comes back.
        _run("ip", "-n", name, "route", "add", "unreachable", UNREACHABLE_NETWORK)
        blackhole_port: int | None = BLACKHOLE_PORT
        try:
            _run(
                "ip", "netns", "exec", name,
                "iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(BLACKHOLE_PORT), "-j", "DROP",
            )  # fmt: skip
        except (subprocess.CalledProcessError, FileNotFoundError):
            blackhole_port = None
        etc = Path(f"/etc/netns/{name}")
        etc.mkdir(parents=True)
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n" + "".join(
            f"{address} {host}\n" for host, address in HOSTS_NAMES.items()
        )
        (etc / "hosts").write_text(hosts)
        hostname = f"target-{name}"
        (etc / "hostname").write_text(f"{hostname}\n")
        (etc / "resolv.conf").write_text(
            f"nameserver 127.0.0.1\nsearch {SEARCH_DOMAIN}\noptions timeout:2 attempts:2\n"
        )

        # The host's look-alike services first: they pick the ports.
        host_service = subprocess.Popen(
            [sys.executable, __file__, "serve", "--role", "host", "--name", name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        processes.append(host_service)
        ports = dict(item.split("=") for item in _read_ready(host_service, "host services").split()[1:])
        tcp_port, udp_port = int(ports["tcp"]), int(ports["udp"])

        private_file = os.path.join(private_dir, "only-in-target.txt")
        private_content = f"private to {name}\n".encode()
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "FOO": "bar",
            "MTRACE_TARGET_NAME": name,
            "ONLY_IN_TARGET": "yes",
        }
        script = (
            f"hostname {hostname} && mount -t tmpfs mtrace-private {private_dir} && "
            f"printf '%s' '{private_content.decode()}' > {private_file} && "
            f"exec env -i {' '.join(f'{key}={value}' for key, value in env.items())} "
            f"{sys.executable} {__file__} serve --role target --name {name} "
            f"--tcp-port {tcp_port} --udp-port {udp_port}"
        )
        target = subprocess.Popen(
            ["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        processes.append(target)
        _read_ready(target, f"the target process in {name}")
        yield NetnsTarget(
            netns=name,
            pid=target.pid,  # ip netns exec, unshare and sh all exec: this is the python process
            env=env,
            tcp_port=tcp_port,
            udp_port=udp_port,
            dns_port=53,
            tcp_banner=f"target-tcp {name}\n".encode(),
            host_tcp_banner=b"host-tcp\n",
            dns_names=DNS_NAMES,
            hosts_names=HOSTS_NAMES,
            search_domain=SEARCH_DOMAIN,
            private_file=private_file,
            private_file_content=private_content,
            hosts_file_content=hosts.encode(),
            closed_port=CLOSED_PORT,
            unreachable_host=UNREACHABLE_HOST,
            no_route_host=NO_ROUTE_HOST,
            blackhole_port=blackhole_port,
            _processes=processes,
            hostname=hostname,
        )
    finally:
        for process in processes:
            _stop(process)
        _remove_namespace(name)
        with contextlib.suppress(OSError):
            os.rmdir(private_dir)


# --- the services (this file run as a script) ------------------------------------


class _TcpHandler(socketserver.BaseRequestHandler):
    banner = b""

    def handle(self) -> None:
        connection: socket.socket = self.request
        try:
            connection.sendall(self.banner)
            while data := connection.recv(256 * 1024):
                connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _UdpHandler(socketserver.BaseRequestHandler):
    prefix = b""

    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(self.prefix + data, self.client_address)


class _DnsHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        data, sock = self.request
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        addresses = DNS_NAMES.get(name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            address = addresses[0] if question.rdtype == dns.rdatatype.A else addresses[1]
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", question.rdtype, address))
        sock.sendto(response.to_wire(), self.client_address)


class _ThreadingTcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: tests that open many connections at
    # once would overflow it and see the kernel's resets, not mtrace's.
    request_queue_size = 128


class _ThreadingUdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1


def _serve(arguments: argparse.Namespace) -> None:
    # Die with the test session even if it is killed before its teardown runs.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Blocked before any thread starts, so sigwait() below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    is_target = arguments.role == "target"
    banner = f"target-tcp {arguments.name}\n".encode() if is_target else b"host-tcp\n"
    tcp_handler = type("TcpHandler", (_TcpHandler,), {"banner": banner})
    udp_prefix = b"target-udp:" if is_target else b"host-udp:"
    udp_handler = type("UdpHandler", (_UdpHandler,), {"prefix": udp_prefix})
    servers: list[socketserver.BaseServer] = [
        _ThreadingTcpServer(("127.0.0.1", arguments.tcp_port), tcp_handler),
        _ThreadingUdpServer(("127.0.0.1", arguments.udp_port), udp_handler),
    ]
    if is_target:
        servers.append(_ThreadingUdpServer(("127.0.0.1", 53), _DnsHandler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    tcp_port = servers[0].server_address[1]  # type: ignore[index]
    udp_port = servers[1].server_address[1]  # type: ignore[index]
    print(f"READY tcp={tcp_port} udp={udp_port}", flush=True)
    signal.sigwait(_STOP_SIGNALS)  # the fixture kills us; so does our parent's death


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the services (used by netns_target())")
    serve.add_argument("--role", choices=["target", "host"], required=True)
    serve.add_argument("--name", required=True)
    serve.add_argument("--tcp-port", type=int, default=0)
    serve.add_argument("--udp-port", type=int, default=0)
    shell = commands.add_parser("shell", help="create a target and wait (manual exploration)")
    shell.set_defaults(command="shell")
    arguments = parser.parse_args()
    if arguments.command == "serve":
        _serve(arguments)
    else:
        with netns_target() as target:
            print(target, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()


if __name__ == "__main__":
    main()
