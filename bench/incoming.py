"""Incoming traffic: a stolen request against the target's own answer, and what
a mirror adds to the target's answers.

All requests are made by a client inside the namespace target (``nsenter``),
one new connection per request (a stolen connection is set up end to end:
redirect, agent, supervisor, local server), small HTTP/1.1 GETs:

* **served by the target**: the namespace's own ``netserve``: the baseline;
* **stolen**: a local server under ``mtrace exec --target pid/N --steal``
  listening on a port of its own, which the client asks in the namespace;
* **target, mirrored**: the baseline request again while a mirror session
  copies it to a local server (goal: nothing measurable added).

Latencies are medians over runs of each run's p50 (or p99), in µs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

from bench.common import Context, Row, RunFailed, Unavailable, compare, median, mtrace_argv
from bench.namespace import free_port, stop_process

GROUP = "incoming"
US = "µs"
DIRECT = "served by the target"
STOLEN = "stolen (local server under mtrace)"
MIRRORED = "target, mirrored"
P50 = "new-connection HTTP request p50"
P99 = "new-connection HTTP request p99"

LOCAL_SERVER = r"""
import http.server, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening on", server.server_address[1], flush=True)
server.serve_forever()
"""

CLIENT = r"""
import json, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
samples = []
for index in range(count + count // 10):
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request)
    answer = b""
    # netserve keeps the connection open: the answer ends with its 2-byte body.
    while not (b"\r\n\r\n" in answer and answer.endswith(b"ok")):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    elapsed = (time.perf_counter() - started) * 1e6
    if not answer.endswith(b"ok"):
        sys.exit(f"bad answer {answer!r}")
    if index >= count // 10:  # the first tenth warms up
        samples.append(elapsed)
samples.sort()
print(json.dumps({"p50": samples[len(samples) // 2], "p99": samples[int(len(samples) * 0.99)]}))
"""


def _client(ns: object, port: int, count: int) -> dict[str, float]:
    argv = ns.inside([sys.executable, "-c", CLIENT, str(port), str(count)])  # type: ignore[attr-defined]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RunFailed(f"client failed: {result.stderr.strip()[-300:]}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


class _LocalServer:
    """The local server under ``mtrace exec --target`` with an incoming config."""

    def __init__(self, ns: object, port: int, incoming: dict[str, object]) -> None:
        config = tempfile.NamedTemporaryFile(  # noqa: SIM115 (removed in close)
            "w", suffix=".json", prefix="mtrace-bench-in-", delete=False)
        with config:
            json.dump({"feature": {"network": {"incoming": incoming}}}, config)
        self.config = config.name
        self.process = subprocess.Popen(
            [*mtrace_argv(), "exec", "--target", f"pid/{ns.pid}",  # type: ignore[attr-defined]
             "-f", self.config, "--", sys.executable, "-c", LOCAL_SERVER, str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not re.match(r"listening on \d+", line):
            self.close()
            raise RunFailed(f"the local server did not start: {line!r}")

    def close(self) -> None:
        stop_process(self.process)
        os.unlink(self.config)


def run(ctx: Context) -> list[Row]:
    settings = ctx.settings
    count = max(50, settings.http_requests // 4)
    try:
        ns = ctx.namespace()
    except Unavailable as error:
        return [Row.missing(GROUP, name, variant, US, str(error))
                for name in (P50, P99) for variant in (DIRECT, STOLEN, MIRRORED)]
    samples: dict[str, dict[str, list[float]]] = {
        variant: {P50: [], P99: []} for variant in (DIRECT, STOLEN, MIRRORED)}
    notes: dict[str, str] = {}

    def measure(variant: str, port: int) -> None:
        result = _client(ns, port, count)
        samples[variant][P50].append(result["p50"])
        samples[variant][P99].append(result["p99"])

    for run_index in range(settings.runs):
        ctx.log(f"incoming: run {run_index + 1}/{settings.runs}")
        measure(DIRECT, ns.http_port)
        for variant, incoming_config in (
                (STOLEN, {"mode": "steal"}),
                (MIRRORED, {"mode": "mirror"})):
            port = free_port()
            if variant == MIRRORED:
                incoming_config = {**incoming_config, "port_mapping": [[port, ns.http_port]]}
            try:
                server = _LocalServer(ns, port, incoming_config)
            except Unavailable as error:
                notes[variant] = str(error)
                continue
            try:
                measure(variant, port if variant == STOLEN else ns.http_port)
            except Unavailable as error:
                notes[variant] = str(error)
            finally:
                server.close()
    rows: list[Row] = []
    for name in (P50, P99):
        for variant in (DIRECT, STOLEN, MIRRORED):
            values = samples[variant][name]
            if not values:
                rows.append(Row.missing(GROUP, name, variant, US, notes.get(variant, "not run")))
                continue
            rows.append(Row(GROUP, name, variant, median(values), US, samples=values))
    for row in rows:
        if row.variant != DIRECT and row.value is not None:
            compare(rows, row, DIRECT)
    return rows
