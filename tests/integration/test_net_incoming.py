"""Incoming traffic under mtrace (steal, filtered steal, mirror) against a real target namespace.

The target namespace (``netns_target``) gets, for these tests, an HTTP server
of its own (``TARGET_SERVER`` below: answers ``target METHOD PATH from
PEER``, keep-alive, IPv4 and IPv6) on a port that is free on this host too,
and a second namespace (the "client host") joined to it by a veth pair
(10.77.0.1/fd77::1 in the target, 10.77.0.2/fd77::2 in the client host).
The program under ``mtrace exec`` is a probe flavour in ``serve`` mode
(answers ``local METHOD PATH from PEER``; ``getpeername differs`` if accept
and getpeername disagree) or the Go ``httpserve`` (keep-alive).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns_target import NetnsTarget
from programs_build import ProgramPaths

from mtrace.agent.redirect import ROUTE_TABLE

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

CLIENT_ADDRESS = "10.77.0.2"
TARGET_ADDRESS = "10.77.0.1"
CLIENT_ADDRESS6 = "fd77::2"
TARGET_ADDRESS6 = "fd77::1"

TARGET_SERVER = r"""
import http.server, socket, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        host, port = self.client_address[:2]
        if host.startswith("::ffff:"):
            host = host[7:]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        body = f"target {self.command} {self.path} from {peer}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
server = Server(("::", int(sys.argv[1])), Handler)
print("READY", flush=True)
server.serve_forever()
"""

CLIENT = r"""
import http.client, json, socket, sys
host, port, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
connection = http.client.HTTPConnection(host, port, timeout=20)
out = []
for method, path, headers in requests:
    connection.request(method, path, headers=headers)
    own = connection.sock.getsockname()[1]
    response = connection.getresponse()
    out.append([response.read().decode(), own])
print(json.dumps(out))
"""


def free_port() -> int:
    """A port free on this host (where the program listens) and so, very
    likely, in the fresh target namespace."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Incoming:
    target: NetnsTarget
    client_netns: str
    port: int  # the target's HTTP server

    def request(self, path: str, *, port: int | None = None, host: str = "127.0.0.1",
                from_client_host: bool = False, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[str, int]:
        """One request; (the answer's body, the client's own port)."""
        return self.requests([(method, path, headers or {})], port=port, host=host,
                             from_client_host=from_client_host)[0]

    def requests(self, requests: list[tuple[str, str, dict[str, str]]], *,
                 port: int | None = None, host: str = "127.0.0.1",
                 from_client_host: bool = False) -> list[tuple[str, int]]:
        """Requests on one keep-alive connection."""
        argv = [sys.executable, "-c", CLIENT, host, str(port or self.port), json.dumps(requests)]
        if from_client_host:
            argv = ["ip", "netns", "exec", self.client_netns, *argv]
        else:
            argv = self.target.nsenter_argv(*argv, environment=False)
        result = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
        return [(body, own) for body, own in json.loads(result.stdout)]

    def local_routing_rule(self) -> str:
        return subprocess.run(self.target.nsenter_argv(
            "ip", "rule", "show", "pref", str(ROUTE_TABLE), environment=False),
            capture_output=True, text=True, timeout=30, check=False).stdout.strip()

    def mtrace_tables(self) -> str:
        ruleset = subprocess.run(self.target.nsenter_argv("nft", "list", "tables",
                                                          environment=False),
                                 capture_output=True, text=True, timeout=30, check=False).stdout
        return "\n".join(line for line in ruleset.splitlines() if "mtrace_" in line)


@pytest.fixture(scope="module")
def incoming(netns_target: NetnsTarget) -> Iterator[Incoming]:
    suffix = os.getpid() % 100000
    client = f"mtr-{os.getpid()}-client"
    inside, outside = f"mvi{suffix}", f"mvo{suffix}"
    port = free_port()
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns_target.netns, sys.executable, "-c", TARGET_SERVER, str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith(b"READY"), server.stderr.read() if server.stderr else b""
        _run("ip", "netns", "add", client)
        _run("ip", "link", "add", inside, "netns", netns_target.netns, "type", "veth",
             "peer", "name", outside, "netns", client)
        for namespace, link, v4, v6 in ((netns_target.netns, inside, TARGET_ADDRESS, TARGET_ADDRESS6),
                                        (client, outside, CLIENT_ADDRESS, CLIENT_ADDRESS6)):
            _run("ip", "-n", namespace, "addr", "add", f"{v4}/24", "dev", link)
            _run("ip", "-n", namespace, "addr", "add", f"{v6}/64", "dev", link, "nodad")
            _run("ip", "-n", namespace, "link", "set", link, "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
        yield Incoming(netns_target, client, port)
    finally:
        server.kill()
        server.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", client], capture_output=True, timeout=30, check=False)


_config_files: list[str] = []


def _config(incoming_config: Any) -> str:
    with tempfile.NamedTemporaryFile("w", prefix="mtrace-in-", suffix=".json",
                                     delete=False) as file:
        json.dump({"feature": {"network": {"incoming": incoming_config}}}, file)
    _config_files.append(file.name)
    return file.name


@pytest.fixture(autouse=True, scope="module")
def _remove_config_files() -> Iterator[None]:
    yield
    for name in _config_files:
        with contextlib.suppress(OSError):
            os.unlink(name)


class Traced:
    """A program serving under ``mtrace exec --target``."""

    def __init__(self, target: NetnsTarget, argv: list[str], incoming_config: Any, *,
                 backend: str = "notify", listening: int = 1) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mtrace.cli.main", "exec", "--backend", backend,
             "--target", f"pid/{target.pid}", "-f", _config(incoming_config), "--", *argv],
            # Unbuffered: lines read one by one leave nothing hidden in a
            # buffer that select() and communicate() would not see.
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, bufsize=0)
        self.ports: list[int] = []
        assert self.process.stdout is not None
        for _ in range(listening):
            line = self.process.stdout.readline().decode()
            match = re.search(r"listening on \S*?(\d+)$", line.strip())
            if match is None:
                self.process.kill()
                _, err = self.process.communicate(timeout=30)
                raise AssertionError(f"no 'listening on' line: {line!r} {err.decode()[-2000:]}")
            self.ports.append(int(match.group(1)))

    def stop(self) -> tuple[str, str]:
        """SIGTERM to mtrace (forwarded to the program); its stdout and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        return out.decode(), err.decode()

    def agent_pid(self) -> int:
        """The local agent: forked by mtrace (named mtrace-agent) or spawned."""
        import psutil

        children = [child.pid for child in psutil.Process(self.process.pid).children()
                    if child.name() == "mtrace-agent"
                    or "mtrace.agent" in " ".join(child.cmdline())]
        assert children, "no agent process"
        return children[0]


def serve(probe: Path, port: int | str, *more: int) -> list[str]:
    return [str(probe), "serve", "::", str(port), "local", *map(str, more)]


def _wait_for_target(incoming: Incoming, path: str) -> str:
    """Ask until the target's own process answers (pytest-timeout bounds it)."""
    while True:
        body, _ = incoming.request(path)
        if body.startswith("target "):
            return body
        time.sleep(0.05)


# --- steal -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["notify", "ptrace"])
def test_steal_delivers_to_the_program_with_the_real_peer(probe: Path, incoming: Incoming,
                                                           backend: str) -> None:
    traced = Traced(incoming.target, serve(probe, incoming.port), "steal", backend=backend)
    try:
        body, own_port = incoming.request("/inside")
        assert body == f"local GET /inside from 127.0.0.1:{own_port}\n"
        body, own_port = incoming.request("/outside", host=TARGET_ADDRESS, from_client_host=True)
        assert body == f"local GET /outside from {CLIENT_ADDRESS}:{own_port}\n"
    finally:
        out, err = traced.stop()
    assert "local GET /inside" in out and "local GET /outside" in out, err
    # mtrace is gone: the target answers at once, and no rule is left.
    body, own_port = incoming.request("/after")
    assert body == f"target GET /after from 127.0.0.1:{own_port}\n"
    assert incoming.mtrace_tables() == ""


def test_steal_over_ipv6_from_another_host(incoming: Incoming, programs: ProgramPaths) -> None:
    traced = Traced(incoming.target, serve(programs["probe-go"], incoming.port), "steal")
    try:
        body, own_port = incoming.request("/v6", host=TARGET_ADDRESS6, from_client_host=True)
        assert body == f"local GET /v6 from [{CLIENT_ADDRESS6}]:{own_port}\n"
    finally:
        traced.stop()


def test_agent_killed_mid_steal_gives_the_port_back(incoming: Incoming,
                                                    programs: ProgramPaths) -> None:
    traced = Traced(incoming.target, serve(programs["probe-dynamic"], incoming.port), "steal")
    try:
        assert incoming.request("/before")[0].startswith("local ")
        os.kill(traced.agent_pid(), signal.SIGKILL)
        # The watchdog removes the rules: the target's process answers again.
        assert _wait_for_target(incoming, "/after-kill").startswith("target GET /after-kill")
        while incoming.mtrace_tables():
            time.sleep(0.05)
        while incoming.local_routing_rule():  # the watchdog removes the shared rule too
            time.sleep(0.05)
    finally:
        traced.stop()


def test_a_hundred_concurrent_connections_none_lost_or_mixed(incoming: Incoming,
                                                             programs: ProgramPaths) -> None:
    traced = Traced(incoming.target, serve(programs["probe-go"], incoming.port), "steal")
    script = r"""
import concurrent.futures, http.client, json, sys
port = int(sys.argv[1])
def one(index):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", f"/n/{index}")
    own = connection.sock.getsockname()[1]
    body = connection.getresponse().read().decode()
    return [index, body, own]
with concurrent.futures.ThreadPoolExecutor(100) as pool:
    print(json.dumps(list(pool.map(one, range(100)))))
"""
    try:
        result = subprocess.run(incoming.target.nsenter_argv(
            sys.executable, "-c", script, str(incoming.port), environment=False),
            capture_output=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        answers = json.loads(result.stdout)
    finally:
        out, _ = traced.stop()
    assert len(answers) == 100
    for index, body, _own in answers:
        assert body.startswith(f"local GET /n/{index} from 127.0.0.1:"), body
    assert sorted(line.split()[2] for line in out.splitlines()) == \
        sorted(f"/n/{index}" for index in range(100))


# --- ports: mapping, lists, two ports, port 0 --------------------------------------------


def test_port_mapping(incoming: Incoming, programs: ProgramPaths) -> None:
    local = free_port()
    traced = Traced(incoming.target, serve(programs["probe-glibc-static"], local),
                    {"mode": "steal", "port_mapping": [[local, incoming.port]]})
    try:
        assert incoming.request("/mapped")[0].startswith("local GET /mapped")
    finally:
        traced.stop()


def test_ignore_ports_and_ports_leave_the_target_alone(incoming: Incoming,
                                                      programs: ProgramPaths) -> None:
    for config in ({"mode": "steal", "ignore_ports": [incoming.port]},
                   {"mode": "steal", "ports": [1]}):
        traced = Traced(incoming.target, serve(programs["probe-musl"], incoming.port), config)
        try:
            assert incoming.request("/ignored")[0].startswith("target GET /ignored")
        finally:
            traced.stop()


def test_two_ports_and_a_port_the_target_does_not_listen_on(incoming: Incoming,
                                                           programs: ProgramPaths) -> None:
    other = free_port()
    traced = Traced(incoming.target, serve(programs["probe-go"], incoming.port, other), "steal",
                    listening=2)
    try:
        assert incoming.request("/first")[0].startswith("local GET /first")
        assert incoming.request("/second", port=other)[0].startswith("local GET /second")
    finally:
        traced.stop()


def test_port_zero_subscribes_to_the_port_it_got(incoming: Incoming, probe: Path) -> None:
    traced = Traced(incoming.target, serve(probe, 0), "steal")
    try:
        assert incoming.request("/zero", port=traced.ports[0])[0].startswith("local GET /zero")
    finally:
        traced.stop()


# --- mirror ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["notify", "ptrace"])
def test_mirror_keeps_the_targets_answers_and_copies_the_requests(
        probe: Path, incoming: Incoming, backend: str) -> None:
    traced = Traced(incoming.target, serve(probe, incoming.port), "mirror", backend=backend)
    try:
        answers = [incoming.request(f"/m/{index}") for index in range(5)]
        answers.append(incoming.request("/m/outside", host=TARGET_ADDRESS, from_client_host=True))
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 6 and time.monotonic() < deadline:
            seen |= _lines_so_far(traced)
    finally:
        out, err = traced.stop()
    for index, (body, own) in enumerate(answers[:5]):
        assert body == f"target GET /m/{index} from 127.0.0.1:{own}\n"
    assert answers[5][0] == f"target GET /m/outside from {CLIENT_ADDRESS}:{answers[5][1]}\n"
    seen |= set(out.splitlines())
    for index, (_, own) in enumerate(answers[:5]):
        assert f"local GET /m/{index} from 127.0.0.1:{own}" in seen, (seen, err)
    assert f"local GET /m/outside from {CLIENT_ADDRESS}:{answers[5][1]}" in seen


def _lines_so_far(traced: Traced) -> set[str]:
    import select

    assert traced.process.stdout is not None
    lines: set[str] = set()
    while select.select([traced.process.stdout], [], [], 0.2)[0]:
        line = traced.process.stdout.readline()
        if not line:
            break
        lines.add(line.decode().rstrip("\n"))
    return lines


def test_mirror_of_a_port_nobody_listens_on_says_so(incoming: Incoming,
                                                    programs: ProgramPaths) -> None:
    traced = Traced(incoming.target, serve(programs["probe-go"], free_port()), "mirror")
    _, err = traced.stop()
    assert "nothing in the target listens there" in err


# --- filtered steal ------------------------------------------------------------------------


def _httpserve(incoming: Incoming, programs: ProgramPaths, http_filter: dict[str, Any]) -> Traced:
    return Traced(incoming.target, [str(programs["httpserve"]), "-name", "local",
                                    f"[::]:{incoming.port}"],
                  {"mode": "steal", "http_filter": http_filter})


def test_filter_by_header_on_one_keep_alive_connection(incoming: Incoming,
                                                       programs: ProgramPaths) -> None:
    traced = _httpserve(incoming, programs, {"header_filter": "^X-Mtrace: yes$"})
    try:
        answers = incoming.requests([
            ("GET", "/hello", {"X-Mtrace": "yes"}),
            ("GET", "/hello", {}),
            ("GET", "/hello", {"X-Mtrace": "yes"}),
            ("GET", "/hello", {"X-Mtrace": "no"}),
        ])
    finally:
        traced.stop()
    assert len({own for _, own in answers}) == 1, "one keep-alive connection"
    bodies = [body for body, _ in answers]
    # Requests left to the target come over the agent's own connection (see
    # docs/network.md): the target sees the agent as their peer.
    assert bodies[0] == bodies[2] == "hello from local\n"
    assert bodies[1].startswith("target GET /hello from 127.0.0.1:")
    assert bodies[3].startswith("target GET /hello from 127.0.0.1:")


def test_filter_leaves_kube_probes_to_the_target(incoming: Incoming,
                                                 programs: ProgramPaths) -> None:
    traced = _httpserve(incoming, programs, {"header_filter": "^User-Agent: (?!kube-probe/)"})
    try:
        probe_answer, _ = incoming.request("/hello", headers={"User-Agent": "kube-probe/1.30"})
        user_answer, _ = incoming.request("/hello", headers={"User-Agent": "curl/8"},
                                          host=TARGET_ADDRESS, from_client_host=True)
    finally:
        traced.stop()
    assert probe_answer.startswith("target GET /hello")
    assert user_answer == "hello from local\n"


def test_filter_by_path_and_by_method(incoming: Incoming, programs: ProgramPaths) -> None:
    traced = _httpserve(incoming, programs, {"any_of": [{"path_filter": "^/hello$"},
                                                        {"method_filter": "^DELETE$"}]})
    try:
        answers = incoming.requests([("GET", "/hello", {}), ("GET", "/other", {}),
                                     ("DELETE", "/env/X", {}), ("POST", "/other", {})])
    finally:
        traced.stop()
    bodies = [body for body, _ in answers]
    assert bodies[0] == "hello from local\n"
    assert bodies[1].startswith("target GET /other")
    assert bodies[2] == "X unset\n"  # httpserve's /env/ answers any method
    assert bodies[3].startswith("target POST /other")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "key"), [
    ({"mode": "sideways"}, "feature.network.incoming"),
    ({"mode": "steal", "port_mapping": [[8080, 70000]]}, "feature.network.incoming.port_mapping[0][1]"),
    ({"mode": "steal", "http_filter": {"header_filter": "(unclosed"}},
     "feature.network.incoming.http_filter.header_filter"),
])
def test_bad_incoming_config_is_one_line_and_exit_78(incoming: Incoming, config: dict[str, Any],
                                                     key: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtrace.cli.main", "exec", "--target", f"pid/{incoming.target.pid}",
         "-f", _config(config), "--", "true"], capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 78, result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert key in first, result.stderr


def test_unknown_incoming_flag_is_exit_78() -> None:
    result = subprocess.run([sys.executable, "-m", "mtrace.cli.main", "exec", "--incoming", "nope",
                             "--", "true"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 78
    assert "--incoming nope" in result.stderr



# --- filtered steal over HTTP/2 (h2c, as gRPC speaks it) ----------------------------------

H2_CLIENT = str(Path(__file__).resolve().parents[1] / "h2_client.py")


def test_filter_over_http2_on_one_connection(incoming: Incoming, programs: ProgramPaths) -> None:
    port = free_port()
    target_server = subprocess.Popen(
        ["ip", "netns", "exec", incoming.target.netns, str(programs["httpserve"]), "-h2c",
         "-name", "target", f"[::]:{port}"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert target_server.stdout is not None
        assert target_server.stdout.readline().startswith(b"listening on")
        traced = Traced(incoming.target, [str(programs["httpserve"]), "-h2c", "-name", "local",
                                          f"[::]:{port}"],
                        {"mode": "steal", "http_filter": {"header_filter": "^x-mtrace: yes$"}})
        try:
            requests = [["/hello", {"x-mtrace": "yes"}], ["/hello", {}],
                        ["/hello", {"x-mtrace": "yes"}], ["/env/X", {}]]
            result = subprocess.run(incoming.target.nsenter_argv(
                sys.executable, H2_CLIENT, "127.0.0.1", str(port), json.dumps(requests),
                environment=False), capture_output=True, timeout=60, check=False)
            assert result.returncode == 0, result.stderr.decode()[-2000:]
        finally:
            traced.stop()
    finally:
        target_server.kill()
        target_server.wait(timeout=10)
    assert json.loads(result.stdout) == ["hello from local\n", "hello from target\n",
                                         "hello from local\n", "X unset\n"]


def test_trace_shows_the_incoming_peer(incoming: Incoming, programs: ProgramPaths) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli.main", "trace", "-e", "accept,accept4", "--backend",
         "notify", "--target", f"pid/{incoming.target.pid}", "-f", _config("steal"), "--",
         *serve(programs["probe-dynamic"], incoming.port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, bufsize=0)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"listening on")
        _, own = incoming.request("/traced")
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert re.search(rf"accept4?\(.*\) = \d+ <[\d.]+> \(peer 127\.0\.0\.1:{own}\)",
                     err.decode()), err.decode()[-3000:]


# --- the redirect rules themselves ---------------------------------------------------------

REDIRECT_CHECK = r"""
import socket, subprocess, sys
from mtrace.agent.redirect import Redirector
backend, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4)
redirector = Redirector(backend)
redirector.set(port, listener.getsockname()[1])
client = socket.create_connection(("127.0.0.1", port), timeout=5)
accepted, _ = listener.accept()
client.sendall(b"via redirect")
print(accepted.recv(100).decode())
redirector.close()
listing = subprocess.run(["iptables-save", "-t", "nat"] if backend == "iptables"
                         else ["nft", "list", "tables"], capture_output=True, text=True).stdout
print("left:", redirector.name in listing)
"""


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_redirect_rules_take_the_port_and_go_away(incoming: Incoming, backend: str) -> None:
    port = free_port()
    result = subprocess.run(incoming.target.nsenter_argv(
        sys.executable, "-c", REDIRECT_CHECK, backend, str(port), environment=False),
        capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.splitlines() == ["via redirect", "left: False"], result.stderr[-2000:]


def test_a_dead_agents_table_is_swept_by_the_next(incoming: Incoming,
                                                  programs: ProgramPaths) -> None:
    stale = "mtrace_999999999_1"  # no such pid
    subprocess.run(incoming.target.nsenter_argv("nft", "add", "table", "inet", stale,
                                                environment=False), check=True, timeout=30)
    traced = Traced(incoming.target, serve(programs["probe-go"], incoming.port), "steal")
    try:
        assert stale not in incoming.mtrace_tables()
    finally:
        traced.stop()


# --- a closed listener gives its port back -------------------------------------------------

CLOSING_SERVER = r"""
import socket, sys, time
listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("::", int(sys.argv[1])))
listener.listen(8)
print("listening on", listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
connection.recv(65536)
body = b"local before close\n"
connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
connection.close()
listener.close()
print("closed", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("backend", ["notify", "ptrace"])
def test_closing_the_listener_gives_the_port_back_while_mtrace_runs(incoming: Incoming,
                                                                    backend: str) -> None:
    traced = Traced(incoming.target, [sys.executable, "-c", CLOSING_SERVER, str(incoming.port)],
                    "steal", backend=backend)
    try:
        assert incoming.request("/before")[0] == "local before close\n"
        assert traced.process.stdout is not None
        assert traced.process.stdout.readline() == b"closed\n"
        # The program runs on; its listener is gone, so the target answers again.
        assert _wait_for_target(incoming, "/after").startswith("target GET /after")
        assert traced.process.poll() is None
    finally:
        traced.stop()


# --- blocking accepts from many threads ------------------------------------------------------

THREADED_SERVER = r"""
import os, socket, sys, threading
port, count = int(sys.argv[1]), int(sys.argv[2])
listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("::", port))
listener.listen(64)
def serve(index):
    while True:
        try:
            connection, _ = listener.accept()
        except OSError as error:
            # one write per line: print() writes the text and the newline apart,
            # so eight threads waking at once interleaved their lines
            os.write(1, f"thread {index} accept: {error.errno}\n".encode())
            return
        connection.recv(65536)
        body = b"local thread\n"
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                           % len(body) + body)
        connection.close()
threads = [threading.Thread(target=serve, args=(index,)) for index in range(count)]
for thread in threads:
    thread.start()
print("listening on", port, flush=True)
sys.stdin.readline()
listener.shutdown(socket.SHUT_RDWR)  # wakes every thread blocked in accept (EINVAL)
for thread in threads:
    thread.join()
print("all threads done", flush=True)
"""


@pytest.mark.parametrize("backend", ["notify", "ptrace"])
def test_blocking_accepts_in_many_threads_stay_blocking_and_lose_nothing(
        incoming: Incoming, backend: str) -> None:
    """Eight threads blocked in accept on one blocking listener (more than the
    supervisor's executor has workers); the listener must stay blocking (a
    watcher that set O_NONBLOCK on it made the program's accepts fail with
    EAGAIN) and every connection reach one of them."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli.main", "exec", "--backend", backend,
         "--target", f"pid/{incoming.target.pid}", "-f", _config("steal"), "--",
         sys.executable, "-c", THREADED_SERVER, str(incoming.port), "8"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, bufsize=0)
    script = r"""
import concurrent.futures, http.client, sys
def one(index):
    connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
    connection.request("GET", f"/{index}")
    return connection.getresponse().read().decode()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    print(sorted(set(pool.map(one, range(40)))), len(list(pool.map(one, range(40)))))
"""
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().startswith(b"listening on")
        result = subprocess.run(incoming.target.nsenter_argv(
            sys.executable, "-c", script, str(incoming.port), environment=False),
            capture_output=True, text=True, timeout=120, check=False)
        process.stdin.write(b"\n")
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert result.stdout.strip() == "['local thread\\n'] 40", result.stderr[-2000:]
    lines = out.decode().splitlines()
    assert lines[-1] == "all threads done", (lines, err.decode()[-2000:])
    assert sorted(lines[:-1]) == sorted(f"thread {index} accept: {errno.EINVAL}"
                                        for index in range(8)), lines


def test_filtered_out_requests_reach_the_target_from_the_real_client(
        incoming: Incoming, programs: ProgramPaths) -> None:
    traced = _httpserve(incoming, programs, {"header_filter": "^X-Mtrace: yes$"})
    try:
        answers = incoming.requests([("GET", "/hello", {"X-Mtrace": "yes"}), ("GET", "/hello", {})],
                                    host=TARGET_ADDRESS, from_client_host=True)
        answers6 = incoming.requests([("GET", "/v6", {})], host=TARGET_ADDRESS6,
                                     from_client_host=True)
        rules = incoming.local_routing_rule()
    finally:
        traced.stop()
    assert answers[0][0] == "hello from local\n"
    # The target's process sees the real client (a new port of it), not the agent.
    assert answers[1][0].startswith(f"target GET /hello from {CLIENT_ADDRESS}:"), answers
    assert answers6[0][0].startswith(f"target GET /v6 from [{CLIENT_ADDRESS6}]:"), answers6
    assert "lookup" in rules
    # The session is over: the shared rule went with the last mtrace table.
    assert incoming.local_routing_rule() == ""


# --- h2c by HTTP/1.1 Upgrade -------------------------------------------------------------------

H2C_UPGRADE_SERVER = r"""
import socket, sys, threading
import h2.config, h2.connection, h2.events
name, port = sys.argv[1], int(sys.argv[2])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
def answer(connection, stream_id, path):
    body = f"{name} {path}\n".encode()
    connection.send_headers(stream_id, [(":status", "200"), ("content-length", str(len(body)))])
    connection.send_data(stream_id, body, end_stream=True)
def serve(sock):
    with sock:
        data = sock.recv(65536)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        if data.startswith(PREFACE[:len(data)]):
            connection.initiate_connection()
        else:  # HTTP/1.1: an Upgrade: h2c request (or a plain one)
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, data = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split()[1]
            fields = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip()
                      for line in lines[1:]}
            if fields.get("upgrade", "").lower() != "h2c":
                body = f"{name} {path} http/1.1\n".encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                return
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\n\r\n")
            connection.initiate_upgrade_connection(fields["http2-settings"])
            answer(connection, 1, path)
        while True:
            for found in connection.receive_data(data):
                if isinstance(found, h2.events.RequestReceived):
                    headers = dict(found.headers)
                    answer(connection, found.stream_id, headers[b":path"].decode())
            sock.sendall(connection.data_to_send())
            data = sock.recv(65536)
            if not data:
                return
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("::", port))
listener.listen(16)
print("listening on", port, flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

@pytest.mark.parametrize("first_to", ["local", "target"])
def test_filter_follows_an_http1_upgrade_to_h2c(incoming: Incoming, first_to: str) -> None:
    port = free_port()
    target_server = subprocess.Popen(
        ["ip", "netns", "exec", incoming.target.netns, sys.executable, "-c", H2C_UPGRADE_SERVER,
         "target", str(port)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert target_server.stdout is not None
        assert target_server.stdout.readline().startswith(b"listening on")
        traced = Traced(incoming.target, [sys.executable, "-c", H2C_UPGRADE_SERVER, "local",
                                          str(port)],
                        {"mode": "steal", "http_filter": {"header_filter": "^x-mtrace: yes$"}})
        try:
            first = {"x-mtrace": "yes"} if first_to == "local" else {}
            requests = [["/first", first], ["/a", {"x-mtrace": "yes"}], ["/b", {}]]
            result = subprocess.run(incoming.target.nsenter_argv(
                sys.executable, H2_CLIENT, "127.0.0.1", str(port),
                json.dumps(requests), "upgrade", environment=False), capture_output=True, timeout=60,
                check=False)
            assert result.returncode == 0, result.stderr.decode()[-2000:]
        finally:
            traced.stop()
    finally:
        target_server.kill()
        target_server.wait(timeout=10)
    assert json.loads(result.stdout) == [f"{first_to} /first\n", "local /a\n", "target /b\n"]


def test_an_upgrade_the_server_declines_stays_http1_and_filtered(incoming: Incoming,
                                                                 programs: ProgramPaths) -> None:
    """Go's server does not switch to h2c on Upgrade (as curl --http2 asks on
    http://): its HTTP/1.1 answer is relayed and the connection stays filtered."""
    traced = _httpserve(incoming, programs, {"header_filter": "^X-Mtrace: yes$"})
    try:
        answers = incoming.requests([
            ("GET", "/hello", {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                               "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA"}),
            ("GET", "/hello", {"X-Mtrace": "yes"})])
    finally:
        traced.stop()
    assert answers[0][0].startswith("target GET /hello from ")
    assert answers[1][0] == "hello from local\n"


NEVER_READS = r"""
import socket, sys, time
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # earlier tests' TIME_WAITs
listener.bind(("::", int(sys.argv[1])))
listener.listen(64)
print(f"listening on {listener.getsockname()[1]}", flush=True)
time.sleep(3600)  # never accepts, never reads
"""

UPLOADS = r"""
import http.client, json, sys, threading
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
answers = [None] * count
def one(index):
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("POST", f"/upload/{index}", body=b"u" * size)
    answers[index] = connection.getresponse().read().decode()
threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(json.dumps(answers))
"""


def test_a_mirror_copy_the_program_does_not_read_is_cut_said_once_and_the_target_answers(
        incoming: Incoming) -> None:
    """Regression (issue 14): a program that never reads a mirror made the agent
    keep every byte of the copies; now the copies are cut (the target's own
    answers are untouched) and mtrace says so once."""
    traced = Traced(incoming.target, [sys.executable, "-c", NEVER_READS, str(incoming.port)],
                    "mirror")
    try:
        result = subprocess.run(incoming.target.nsenter_argv(
            sys.executable, "-c", UPLOADS, "127.0.0.1", str(incoming.port), "8", str(24 << 20),
            environment=False), capture_output=True, text=True, timeout=180, check=False)
    finally:
        _, err = traced.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout)
    assert len(answers) == 8
    for index, answer in enumerate(answers):
        assert (answer or "").startswith(f"target POST /upload/{index} from 127.0.0.1:"), answer
    assert err.count("so that copy was cut") == 1, err
