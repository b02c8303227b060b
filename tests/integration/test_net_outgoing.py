"""Outgoing TCP/UDP and DNS under mtrace, against a real target namespace.

Differential: each probe flavour run under ``mtrace exec --target pid/N``
must print what it prints when run inside the target's namespaces (nsenter),
and never what the host's look-alike services answer.

The DNS filter test needs a resolver for "this machine" that the test controls,
which the CLI cannot be pointed at: it runs under this file run as a script
(``run_session`` below), which builds the same session from Python with the
resolver given. Without ``mtrace.tracer.features.files`` (the feature that serves the
target's resolv.conf and hosts), that runner bind-mounts the target's copies
over /etc in a private mount namespace of its own instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # this file also runs as a script, without tests/ on sys.path
    from netns_target import NetnsTarget
    from programs_build import ProgramPaths

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

RUN_TIMEOUT = 60.0
HERE = Path(__file__).resolve()


def mtrace_run(target: NetnsTarget, argv: list[str], *, features: dict | None = None,
               local_resolver: str | None = None, input: bytes | None = None,
               timeout: float = RUN_TIMEOUT, backend: str = "notify"
               ) -> subprocess.CompletedProcess[bytes]:
    """``argv`` under ``mtrace exec --target pid/N``; with ``local_resolver``
    (which the CLI cannot set) under this file's own runner instead."""
    return subprocess.run(mtrace_argv(target, argv, features=features,
                                      local_resolver=local_resolver, backend=backend),
                          capture_output=True, timeout=timeout, input=input, check=False)


def mtrace_argv(target: NetnsTarget, argv: list[str], *, features: dict | None = None,
                local_resolver: str | None = None, backend: str = "notify") -> list[str]:
    if local_resolver is None:
        config = {"feature": features or {}}
        config_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (removed with the session)
            "w", prefix="mtrace-net-", suffix=".json", delete=False)
        with config_file:
            json.dump(config, config_file)
        _config_files.append(config_file.name)
        return [sys.executable, "-m", "mtrace.cli.main", "exec", "--backend", backend,
                "--target", f"pid/{target.pid}", "-f", config_file.name, "--", *argv]
    return [sys.executable, str(HERE), "--target-pid", str(target.pid),
            "--features", json.dumps(features or {}), "--local-resolver", local_resolver,
            "--", *argv]


_config_files: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _remove_config_files() -> Iterator[None]:
    yield
    for name in _config_files:
        with contextlib.suppress(OSError):
            os.unlink(name)


def assert_like_inside(target: NetnsTarget, argv: list[str], **kwargs: Any) -> bytes:
    """Under mtrace, ``argv`` prints what it prints inside the target; that output."""
    inside = target.run_inside(*argv)
    traced = mtrace_run(target, argv, **kwargs)
    assert (traced.returncode, traced.stdout) == (inside.returncode, inside.stdout), \
        traced.stderr.decode(errors="replace")[-3000:]
    return traced.stdout


# --- every probe flavour, differential ----------------------------------------------


def test_tcp_reaches_the_targets_loopback(probe: Path, netns_target: NetnsTarget) -> None:
    out = assert_like_inside(netns_target, [str(probe), "tcp", "127.0.0.1",
                                            str(netns_target.tcp_port), "hello"])
    assert out == netns_target.tcp_banner + b"hello\n"
    assert netns_target.host_tcp_banner not in out


def test_connected_udp_reaches_the_target(probe: Path, netns_target: NetnsTarget) -> None:
    out = assert_like_inside(netns_target, [str(probe), "udp", "127.0.0.1",
                                            str(netns_target.udp_port), "ping"])
    assert out == b"target-udp:ping\n"


def test_unconnected_udp_sees_the_real_source(probe: Path, netns_target: NetnsTarget) -> None:
    out = assert_like_inside(netns_target, [str(probe), "udp-unconnected", "127.0.0.1",
                                            str(netns_target.udp_port), "ping"])
    assert out == f"target-udp:ping\nfrom 127.0.0.1:{netns_target.udp_port}\n".encode()


@pytest.mark.parametrize("name", ["only-in-target.test", "api", "hosts-only.test"])
def test_resolve_uses_the_targets_dns(probe: Path, netns_target: NetnsTarget, name: str) -> None:
    out = assert_like_inside(netns_target, [str(probe), "resolve", name])
    expected = {"only-in-target.test": b"10.99.0.7\n", "api": b"10.99.0.9\n",
                "hosts-only.test": b"10.99.0.8\n"}[name]
    assert out == expected


def test_refused_is_the_targets(probe: Path, netns_target: NetnsTarget) -> None:
    # A port open on this host and closed in the target tells the two apart.
    with _host_listener() as port:
        out = assert_like_inside(netns_target, [str(probe), "tcp", "127.0.0.1", str(port), "x"])
    assert out == b"error: ECONNREFUSED\n"


@pytest.mark.parametrize(("host", "expected"), [("unreachable_host", b"EHOSTUNREACH"),
                                              ("no_route_host", b"ENETUNREACH")])
def test_routing_errors_are_the_targets(probe: Path, netns_target: NetnsTarget, host: str,
                                        expected: bytes) -> None:
    out = assert_like_inside(netns_target, [str(probe), "tcp", getattr(netns_target, host),
                                            "80", "x"])
    assert out == b"error: " + expected + b"\n"


def test_http_to_a_target_only_server(probe: Path, netns_target: NetnsTarget,
                                      programs: ProgramPaths) -> None:
    with _httpserve_pair(netns_target, programs) as port:
        out = assert_like_inside(netns_target, [str(probe), "http",
                                                f"http://127.0.0.1:{port}/hello"])
    assert out == b"status 200\nhello from target\n"


def test_keep_alive_requests(netns_target: NetnsTarget, programs: ProgramPaths) -> None:
    with _httpserve_pair(netns_target, programs) as port:
        argv = [str(programs["httpclient"]), f"http://127.0.0.1:{port}/hello", "200"]
        out = assert_like_inside(netns_target, argv)
    assert out == b"ok 200\n"


@pytest.mark.parametrize("command", ["udp-mmsg", "udp-mmsg-recv"])
def test_sendmmsg_datagrams_with_a_destination_leave_from_the_target(
        probe: Path, netns_target: NetnsTarget, backend: str, command: str) -> None:
    """sendmmsg sent each message to its msg_name from this machine: the host's
    look-alike service on the same address answered (host-udp:). recvmmsg
    reported the relay's loopback peer socket as each reply's source."""
    port = netns_target.udp_port
    out = assert_like_inside(netns_target, [str(probe), command, "127.0.0.1", str(port),
                                            "mm", "4"], backend=backend)
    # Each message's msg_len, then every answer came from the target's service.
    assert out == b"sent 4: 4 4 4 4\n" + b"".join(
        b"target-udp:mm-%d from 127.0.0.1:%d\n" % (index, port) for index in range(4))


@pytest.mark.parametrize("command", ["tcp", "udp", "udp-unconnected", "resolve"])
def test_ptrace_backend(probe: Path, netns_target: NetnsTarget, command: str) -> None:
    arguments = {"tcp": ["127.0.0.1", str(netns_target.tcp_port), "hello"],
                 "udp": ["127.0.0.1", str(netns_target.udp_port), "hi"],
                 "udp-unconnected": ["127.0.0.1", str(netns_target.udp_port), "hi"],
                 "resolve": ["only-in-target.test"]}[command]
    assert_like_inside(netns_target, [str(probe), command, *arguments], backend="ptrace")


# --- the filter ---------------------------------------------------------------------------


def test_ignore_localhost_keeps_loopback_here(programs: ProgramPaths,
                                              netns_target: NetnsTarget) -> None:
    probe = str(programs["probe-glibc-static"])
    features = {"network": {"outgoing": {"ignore_localhost": True}}}
    tcp = mtrace_run(netns_target, [probe, "tcp", "127.0.0.1", str(netns_target.tcp_port), "x"],
                     features=features)
    assert tcp.stdout == netns_target.host_tcp_banner + b"x\n", tcp.stderr
    udp = mtrace_run(netns_target, [probe, "udp", "127.0.0.1", str(netns_target.udp_port), "x"],
                     features=features)
    assert udp.stdout == b"host-udp:x\n", udp.stderr
    # DNS still goes to the target's nameserver, though it is 127.0.0.1.
    resolved = mtrace_run(netns_target, [probe, "resolve", "only-in-target.test"],
                          features=features)
    assert resolved.stdout == b"10.99.0.7\n", resolved.stderr


@pytest.mark.parametrize(("filter_", "tcp_remote", "udp_remote"), [
    ({"remote": ["udp://127.0.0.1"]}, False, True),
    ({"local": ["tcp://127.0.0.0/8"]}, False, True),
    ({"remote": ["127.0.0.1:{tcp}"]}, True, False),
    ({"local": ["localhost:{udp}"]}, True, False),
    ({"remote": ["[::ffff:127.0.0.1]"]}, True, True),
    ({"local": ["10.0.0.0/8", ":9"]}, True, True),
], ids=["remote-udp", "local-tcp-subnet", "remote-port", "local-name-port", "remote-mapped",
        "local-unrelated"])
def test_filter_lists(programs: ProgramPaths, netns_target: NetnsTarget, filter_: dict,
                      tcp_remote: bool, udp_remote: bool) -> None:
    ports = {"tcp": netns_target.tcp_port, "udp": netns_target.udp_port}
    filter_ = {side: [entry.format(**ports) for entry in entries]
               for side, entries in filter_.items()}
    features = {"network": {"outgoing": {"filter": filter_}}}
    probe = str(programs["probe-musl"])
    tcp = mtrace_run(netns_target, [probe, "tcp", "127.0.0.1", str(netns_target.tcp_port), "x"],
                     features=features)
    banner = netns_target.tcp_banner if tcp_remote else netns_target.host_tcp_banner
    assert tcp.stdout == banner + b"x\n", tcp.stderr
    udp = mtrace_run(netns_target, [probe, "udp-unconnected", "127.0.0.1",
                                    str(netns_target.udp_port), "x"], features=features)
    prefix = b"target-udp:" if udp_remote else b"host-udp:"
    assert udp.stdout.startswith(prefix + b"x\n"), udp.stderr


def test_protocol_toggles(programs: ProgramPaths, netns_target: NetnsTarget) -> None:
    probe = str(programs["probe-go"])
    features = {"network": {"outgoing": {"tcp": False}}}
    tcp = mtrace_run(netns_target, [probe, "tcp", "127.0.0.1", str(netns_target.tcp_port), "x"],
                     features=features)
    assert tcp.stdout == netns_target.host_tcp_banner + b"x\n", tcp.stderr
    udp = mtrace_run(netns_target, [probe, "udp", "127.0.0.1", str(netns_target.udp_port), "x"],
                     features=features)
    assert udp.stdout == b"target-udp:x\n", udp.stderr
    features = {"network": {"outgoing": {"udp": False}}}
    udp = mtrace_run(netns_target, [probe, "udp", "127.0.0.1", str(netns_target.udp_port), "x"],
                     features=features)
    assert udp.stdout == b"host-udp:x\n", udp.stderr
    # DNS is not "udp": the target's nameserver still answers.
    resolved = mtrace_run(netns_target, [probe, "resolve", "only-in-target.test"],
                          features=features)
    assert resolved.stdout == b"10.99.0.7\n", resolved.stderr


# --- the DNS filter -----------------------------------------------------------------------


def test_dns_filter_sends_local_names_to_this_machines_resolver(
        probe: Path, netns_target: NetnsTarget) -> None:
    features = {"network": {"dns": {"filter": {"local": ["*.here.test"]}}}}
    with _host_dns({"box.here.test": "10.55.0.1"}) as resolver:
        local = mtrace_run(netns_target, [str(probe), "resolve", "box.here.test"],
                           features=features, local_resolver=resolver)
        assert local.stdout == b"10.55.0.1\n", local.stderr
        remote = mtrace_run(netns_target, [str(probe), "resolve", "only-in-target.test"],
                            features=features, local_resolver=resolver)
        assert remote.stdout == b"10.99.0.7\n", remote.stderr


# --- sockets from Python: addresses, non-blocking, IPv6, bulk data, a lost agent ----------


def _python(script: str) -> list[str]:
    return [sys.executable, "-S", "-c", script]


PEER_NAMES = r"""
import socket, sys
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port))
print("peer", s.getpeername())
print("local-host", s.getsockname()[0])
print("banner", s.recv(100))
s.close()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.connect(("::ffff:127.0.0.1", port))
print("peer6", s.getpeername()[:2])
print("banner6", s.recv(100))
s.close()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"six", ("::ffff:127.0.0.1", int(sys.argv[2])))
data, source = u.recvfrom(100)
print("udp6", data, source[:2])
u.sendto(b"msg", ("::ffff:127.0.0.1", int(sys.argv[2])))
data, ancillary, flags, source = u.recvmsg(100)
print("recvmsg", data, source[:2])
u.sendmsg([b"ms", b"g2"], [], 0, ("::ffff:127.0.0.1", int(sys.argv[2])))
data, source = u.recvfrom(100)
print("sendmsg", data, source[:2])
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", int(sys.argv[2])))
print("udp-peer", c.getpeername())
c.send(b"connected")
c.settimeout(5)
print("udp-connected", c.recvfrom(100))
"""


def test_addresses_seen_by_the_program(netns_target: NetnsTarget) -> None:
    argv = [*_python(PEER_NAMES), str(netns_target.tcp_port), str(netns_target.udp_port)]
    out = assert_like_inside(netns_target, argv)
    port, udp = netns_target.tcp_port, netns_target.udp_port
    assert out.decode().splitlines() == [
        f"peer ('127.0.0.1', {port})",
        "local-host 127.0.0.1",
        f"banner {netns_target.tcp_banner!r}",
        f"peer6 ('::ffff:127.0.0.1', {port})",
        f"banner6 {netns_target.tcp_banner!r}",
        f"udp6 b'target-udp:six' ('::ffff:127.0.0.1', {udp})",
        f"recvmsg b'target-udp:msg' ('::ffff:127.0.0.1', {udp})",
        f"sendmsg b'target-udp:msg2' ('::ffff:127.0.0.1', {udp})",
        f"udp-peer ('127.0.0.1', {udp})",
        f"udp-connected (b'target-udp:connected', ('127.0.0.1', {udp}))",
    ]


NONBLOCKING = r"""
import errno, select, socket, sys
for port in (int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket()
    s.setblocking(False)
    result = s.connect_ex(("127.0.0.1", port))
    if result == errno.EINPROGRESS:
        select.select([], [s], [], 10)
        result = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    print(port == int(sys.argv[1]), errno.errorcode.get(result, result))
    if result == 0:
        select.select([s], [], [], 10)
        print(s.recv(100))
"""


def test_nonblocking_connect(netns_target: NetnsTarget) -> None:
    with _host_listener() as closed_in_target:
        argv = [*_python(NONBLOCKING), str(netns_target.tcp_port), str(closed_in_target)]
        out = mtrace_run(netns_target, argv)
    assert out.stdout.decode().splitlines() == [
        "True 0", repr(netns_target.tcp_banner), "False ECONNREFUSED"], out.stderr


BULK = r"""
import hashlib, socket, sys, threading
size = 8 << 20
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
banner = s.recv(len(sys.argv[2]) + 1)
payload = bytes(range(256)) * (size // 256)
def send():
    view = memoryview(payload)
    while view:
        sent = s.send(view[:1 << 16])
        view = view[sent:]
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=send).start()
received = hashlib.sha256()
total = 0
while chunk := s.recv(1 << 16):
    received.update(chunk)
    total += len(chunk)
print(total == size, received.hexdigest() == hashlib.sha256(payload).hexdigest())
"""


def test_bulk_data_both_ways_with_half_close(netns_target: NetnsTarget) -> None:
    argv = [*_python(BULK), str(netns_target.tcp_port), netns_target.tcp_banner.decode()[:-1]]
    started = time.monotonic()
    out = mtrace_run(netns_target, argv)
    assert out.stdout == b"True True\n", out.stderr
    assert time.monotonic() - started < 30


PARALLEL = r"""
import socket, sys, threading
port, banner = int(sys.argv[1]), sys.argv[2].encode() + b"\n"
results = []
def one(index):
    with socket.create_connection(("127.0.0.1", port)) as s:
        message = f"connection {index}\n".encode() * 1000
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        results.append(data == banner + message)
threads = [threading.Thread(target=one, args=(index,)) for index in range(32)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(results), all(results))
"""


def test_parallel_connections(netns_target: NetnsTarget) -> None:
    argv = [*_python(PARALLEL), str(netns_target.tcp_port),
            netns_target.tcp_banner.decode()[:-1]]
    out = mtrace_run(netns_target, argv)
    assert out.stdout == b"32 True\n", out.stderr


MIXED_SENDMMSG = r"""
import ctypes, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]
class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]
target, local = int(sys.argv[1]), int(sys.argv[2])
sent = [(b"remote", target), (b"local", local), (b"x" * 70000, target), (b"never", target)]
messages = (Mmsghdr * len(sent))()
for message, (data, port) in zip(messages, sent):
    name = struct.pack("=H2s4s8x", socket.AF_INET, struct.pack("!H", port), bytes([127, 0, 0, 1]))
    message.hdr.name, message.hdr.namelen = name, len(name)
    message.hdr.iov, message.hdr.iovlen = ctypes.pointer(Iovec(data, len(data))), 1
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
count = libc.syscall(307, u.fileno(), messages, len(sent), 0)  # sendmmsg
print("sent", count, [message.len for message in messages])
u.settimeout(5)
print(u.recvfrom(100)[0])
"""


def test_sendmmsg_sends_each_message_where_it_goes_and_stops_at_an_error(
        netns_target: NetnsTarget, backend: str) -> None:
    """One sendmmsg: a message to the target, one the filter keeps on this
    machine, one too big (EMSGSIZE), one after it: the kernel's rule is the
    count sent before the error, each sent message's msg_len set."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        local_port = listener.getsockname()[1]
        features = {"network": {"outgoing": {"filter": {"local": [f"udp://127.0.0.1:{local_port}"]}}}}
        traced = mtrace_run(netns_target, [*_python(MIXED_SENDMMSG), str(netns_target.udp_port),
                                           str(local_port)], features=features, backend=backend)
        assert traced.stdout.decode().splitlines() == [
            "sent 2 [6, 5, 0, 0]", "b'target-udp:remote'"], traced.stderr[-3000:]
        assert listener.recvfrom(100)[0] == b"local"
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.recvfrom(100)  # nothing after the error


STAYS_BLOCKING = r"""
import fcntl, os, socket, struct, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("qq", 0, 300000))
u.sendto(b"one", ("127.0.0.1", int(sys.argv[1])))
print(u.recvfrom(100)[0])
try:
    u.recvfrom(100)  # nothing more comes: the receive waits out its timeout
except BlockingIOError:
    print("timed out")
print("non-blocking", bool(fcntl.fcntl(u.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK))
"""


def test_a_waited_receive_leaves_a_relayed_socket_blocking(
        netns_target: NetnsTarget, backend: str) -> None:
    """The supervisor's wait for a relayed UDP socket's datagram made the
    program's blocking socket non-blocking (uvloop sets O_NONBLOCK on a
    watched fd): its next receive failed with EAGAIN at once."""
    traced = mtrace_run(netns_target, [*_python(STAYS_BLOCKING), str(netns_target.udp_port)],
                        backend=backend)
    assert traced.stdout.decode().splitlines() == [
        "b'target-udp:one'", "timed out", "non-blocking False"], traced.stderr[-3000:]


MANY_SOCKETS = r"""
import socket, sys
port, count, answered = int(sys.argv[1]), int(sys.argv[2]), 0
for index in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        if index % 2:
            u.connect(("127.0.0.1", port))
            u.send(b"%d" % index)
        else:
            u.sendto(b"%d" % index, ("127.0.0.1", port))
        answered += u.recvfrom(100)[0] == b"target-udp:%d" % index
print(answered)
"""


def test_closed_udp_sockets_release_their_relays(netns_target: NetnsTarget) -> None:
    # More sockets, one after the other, than the agent keeps open at once
    # (glibc opens one per lookup): closed ones must be swept as it goes.
    argv = [*_python(MANY_SOCKETS), str(netns_target.udp_port), "1500"]
    out = mtrace_run(netns_target, argv, timeout=120)
    assert out.stdout == b"1500\n", out.stderr[-2000:]


AGENT_LOSS = r"""
import errno, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.recv(100)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("127.0.0.1", int(sys.argv[2])))
def outcome(function):
    try:
        return repr(function())
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error))
blocked = []
reader = threading.Thread(target=lambda: blocked.append(outcome(lambda: u.recv(100))))
reader.start()
print("ready", flush=True)
sys.stdin.readline()
print("recv", outcome(lambda: s.recv(100)))
reader.join(10)
print("udp-read", blocked)
print("connect", outcome(lambda: socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5)))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("sendto", outcome(lambda: v.sendto(b"x", ("127.0.0.1", int(sys.argv[2])))))
"""


def test_agent_lost_mid_stream_fails_with_real_errnos(netns_target: NetnsTarget) -> None:
    import psutil

    # Relayed connections (direct ones do not depend on the agent: below).
    argv = mtrace_argv(netns_target, [*_python(AGENT_LOSS), str(netns_target.tcp_port),
                                      str(netns_target.udp_port)],
                       features={"network": {"outgoing": {"direct": False}}})
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == b"ready\n"
        agents = [child for child in psutil.Process(process.pid).children(recursive=True)
                  if _is_agent(child)]
        assert len(agents) == 1
        agents[0].kill()
        agents[0].wait(10)
        started = time.monotonic()
        stdout, stderr = process.communicate(b"go\n", timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert time.monotonic() - started < 10
    assert stdout.decode().splitlines() == [
        "recv ECONNRESET", "udp-read ['ECONNREFUSED']", "connect ENETUNREACH",
        "sendto ENETUNREACH"], stderr
    # The user is told once, in one line.
    lost = [line for line in stderr.decode().splitlines() if "lost the connection" in line]
    assert len(lost) == 1 and lost[0].startswith("mtrace: error: "), stderr


# --- the direct path (local targets) ---------------------------------------------------

DIRECT_STATE = r"""
import fcntl, os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
s.settimeout(5)
s.connect(("127.0.0.1", int(sys.argv[1])))
print(s.recv(100).decode().strip())
print("nodelay", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
      "keepalive", s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
      "keepidle", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
      "nonblock", bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),
      "cloexec", bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
print("inode", os.fstat(s.fileno()).st_ino, flush=True)
sys.stdin.read()  # the socket stays open until the test has looked for it
"""


def _target_tcp_inodes(target: NetnsTarget) -> set[int]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{target.pid}/net/{table}") as lines:
            next(lines)
            inodes |= {int(line.split()[9]) for line in lines}
    return inodes


@pytest.mark.parametrize("direct", [True, False])
def test_direct_socket_lives_in_the_target_and_keeps_the_programs_options(
        netns_target: NetnsTarget, direct: bool) -> None:
    argv = mtrace_argv(netns_target, [*_python(DIRECT_STATE), str(netns_target.tcp_port)],
                       features={"network": {"outgoing": {"direct": direct}}})
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdin is not None
        banner = process.stdout.readline()
        state = process.stdout.readline().decode().split()
        inode = int(process.stdout.readline().split()[1])
        in_target = inode in _target_tcp_inodes(netns_target)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(30)
    assert banner.strip() == netns_target.tcp_banner.strip()
    # settimeout makes Python's socket non-blocking; the program's flags stay.
    assert state == ["nodelay", "1", "keepalive", "1", "keepidle", "77",
                     "nonblock", "True", "cloexec", "True"]
    assert in_target == direct


UNTOUCHED_OPTIONS = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5)
print(s.recv(100).decode().strip())
print("keepidle", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
      "keepintvl", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
      "keepcnt", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
"""


def test_direct_socket_has_the_targets_defaults_for_options_the_program_left(
        netns_target: NetnsTarget) -> None:
    """A target whose keepalive sysctls differ from this machine's (a pod's
    net.ipv4.tcp_keepalive_time, say): the options the program never set are
    the target's defaults, as for a program run inside. The direct path took
    this machine's defaults for options set (differing from the target's)."""
    for name, value in (("tcp_keepalive_time", 611), ("tcp_keepalive_intvl", 17),
                        ("tcp_keepalive_probes", 5)):
        subprocess.run(["nsenter", "-t", str(netns_target.pid), "-n", "sysctl", "-qw",
                        f"net.ipv4.{name}={value}"], check=True)
    out = assert_like_inside(netns_target, [*_python(UNTOUCHED_OPTIONS),
                                            str(netns_target.tcp_port)])
    assert out.decode().splitlines()[1] == "keepidle 611 keepintvl 17 keepcnt 5"


EPOLL_FIRST = r"""
import select, socket, sys
s = socket.socket()
s.setblocking(False)
poller = select.epoll()
poller.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except BlockingIOError:
    pass
for _ in range(2):
    events = poller.poll(5)
    assert events, "no event: the epoll registration lost its socket"
    if events[0][1] & select.EPOLLIN:
        break
    poller.modify(s.fileno(), select.EPOLLIN)
print(s.recv(100).decode().strip())
"""


def test_socket_registered_with_epoll_before_connect_is_relayed(
        netns_target: NetnsTarget) -> None:
    out = assert_like_inside(netns_target, [*_python(EPOLL_FIRST), str(netns_target.tcp_port)])
    assert out.strip() == netns_target.tcp_banner.strip()


EPOLL_THROUGH_A_CLOSED_DUP = r"""
import os, select, socket, sys, time
s = socket.socket()
s.setblocking(False)
poller = select.epoll()
copy = os.dup(s.fileno())
poller.register(copy, select.EPOLLIN)
os.close(copy)  # the registration stays: the socket is still open
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except BlockingIOError:
    pass
deadline = time.monotonic() + 5
while not any(mask & select.EPOLLIN for _, mask in poller.poll(0.1)):
    assert time.monotonic() < deadline, "no event: the epoll registration lost its socket"
print(s.recv(100).decode().strip())
"""


def test_socket_registered_with_epoll_through_a_closed_dup_is_relayed(
        netns_target: NetnsTarget) -> None:
    """The registration names the socket under the dup's number: it was looked
    for under the socket's own number only, and the swap left it on the old
    socket (the program waited for an event that never came)."""
    out = assert_like_inside(netns_target, [*_python(EPOLL_THROUGH_A_CLOSED_DUP),
                                            str(netns_target.tcp_port)])
    assert out.strip() == netns_target.tcp_banner.strip()


DIRECT_AGENT_LOSS = r"""
import errno, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.recv(100)
print("ready", flush=True)
sys.stdin.readline()
s.sendall(b"still\n")
print("echo", s.recv(100).decode().strip())
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5)
    print("connect ok")
except OSError as error:
    print("connect", errno.errorcode[error.errno])
"""


DUP_FIRST = r"""
import os, socket, sys
s = socket.socket()
copy = socket.socket(fileno=os.dup(s.fileno()))
s.connect(("127.0.0.1", int(sys.argv[1])))
print(copy.recv(100).decode().strip())
"""


def test_socket_dup_before_connect_is_relayed(netns_target: NetnsTarget) -> None:
    out = assert_like_inside(netns_target, [*_python(DUP_FIRST), str(netns_target.tcp_port)])
    assert out.strip() == netns_target.tcp_banner.strip()


def test_direct_connection_outlives_the_agent(netns_target: NetnsTarget) -> None:
    import psutil

    # The open connection is the target's own socket, not a relay: it goes on
    # working without the agent; new connections fail as relayed ones do.
    argv = mtrace_argv(netns_target, [*_python(DIRECT_AGENT_LOSS), str(netns_target.tcp_port)])
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == b"ready\n"
        agents = [child for child in psutil.Process(process.pid).children(recursive=True)
                  if _is_agent(child)]
        agents[0].kill()
        agents[0].wait(10)
        stdout, stderr = process.communicate(b"go\n", timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert stdout.decode().splitlines() == ["echo still", "connect ENETUNREACH"], stderr


# --- helpers --------------------------------------------------------------------------


def _is_agent(process: Any) -> bool:
    """A local agent: forked by mtrace (named mtrace-agent) or spawned."""
    return process.name() == "mtrace-agent" or "mtrace.agent" in " ".join(process.cmdline())



@contextlib.contextmanager
def _host_listener() -> Iterator[int]:
    """A port open on this host's loopback (and, by construction, closed in the target)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@contextlib.contextmanager
def _httpserve_pair(target: NetnsTarget, programs: ProgramPaths) -> Iterator[int]:
    """httpserve inside the target and a look-alike on the host, on the same port."""
    httpserve = str(programs["httpserve"])
    inside = subprocess.Popen(target.nsenter_argv(httpserve, "-name", "target", "127.0.0.1:0"),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    host = None
    try:
        assert inside.stdout is not None
        line = inside.stdout.readline().decode()
        assert line.startswith("listening on "), line
        port = int(line.rsplit(":", 1)[1])
        host = subprocess.Popen([httpserve, "-name", "host", f"127.0.0.1:{port}"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert host.stdout is not None
        assert host.stdout.readline().startswith(b"listening on ")
        yield port
    finally:
        for process in (inside, host):
            if process is not None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
                if process.poll() is None:
                    process.kill()
                    process.wait()


@contextlib.contextmanager
def _host_dns(names: dict[str, str]) -> Iterator[str]:
    """A DNS server on this host's loopback answering A queries for ``names``."""
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            address = names.get(question.name.to_text(omit_final_dot=True).lower())
            if address is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", address))
            sock.sendto(response.to_wire(), self.client_address)

    server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- the runner (this file run as a script) ------------------------------------------


def run_session(arguments: argparse.Namespace) -> int:
    import msgspec

    from mtrace.agent.client import agent_argv, spawn_stdio
    from mtrace.cli.scratch import session_directory
    from mtrace.tracer.backend import AsyncSide, Handlers
    from mtrace.tracer.features import files, net
    from mtrace.tracer.features.policy import FeatureConfig
    from mtrace.tracer.features.remote import RemoteContext
    from mtrace.tracer.session import Session, run
    from mtrace.tracer.syscalls import DEFAULT_TRAPPED

    features = msgspec.json.decode(arguments.features.encode(), type=FeatureConfig)
    side = AsyncSide()
    client = side.call(spawn_stdio(agent_argv(target_pid=arguments.target_pid), "secret-net"),
                       timeout=20)
    with session_directory() as session_dir:
        context = RemoteContext(client=client, async_side=side, features=features,
                                session_dir=session_dir, executable=arguments.command[0])
        handlers = Handlers()
        trapped = list(DEFAULT_TRAPPED)
        handlers.update(files.handlers(context))
        trapped += [name for name in files.TRAPPED if name not in trapped]
        resolvers = None
        if arguments.local_resolver:
            host, _, port = arguments.local_resolver.rpartition(":")
            resolvers = [(host, int(port))]
        handlers.update(net.handlers(context, local_resolvers=resolvers))
        trapped += [name for name in net.TRAPPED if name not in trapped]
        try:
            return run(Session(argv=arguments.command, handlers=handlers, trapped=tuple(trapped),
                               async_side=side, backend="notify"))
        finally:
            with contextlib.suppress(Exception):
                side.call(client.close(), timeout=5)
            side.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target-pid", type=int, required=True)
    parser.add_argument("--features", default="{}")
    parser.add_argument("--local-resolver")
    parser.add_argument("command", nargs="+")
    raise SystemExit(run_session(parser.parse_args()))


if __name__ == "__main__":
    main()
