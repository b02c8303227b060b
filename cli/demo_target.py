"""The throwaway target of ``mtrace demo``: a process in its own network and
mount namespaces with a service, a config file, environment variables and a
DNS name that only it knows.

Run as ``python -m mtrace.cli.demo_target SCRATCH_DIR``; it prints one line,
``ready``, once everything listens, and serves until killed. Nothing it does is
visible outside its namespaces.
"""

from __future__ import annotations

import http.server
import os
import socketserver
import sys
import threading
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from . import namespaces

SERVICE_NAME = "orders.demo.internal"
SERVICE_PORT = 8080
ENV_NAME = "ORDERS_GREETING"
ENV_VALUE = "hello from the target's environment"
CONFIG_NAME = "mtrace-demo/orders.toml"
CONFIG_TEXT = 'database = "postgres://orders-db.demo.internal/orders"  # only the target has this\n'


def config_directory() -> str:
    """A directory every Linux has, to mount the target's own files over (not
    one on the files feature's default local list, such as /opt)."""
    return "/srv" if os.path.isdir("/srv") else "/mnt"


class _Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"orders service in the target: 3 open orders\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Dns(socketserver.BaseRequestHandler):
    """Answers A queries for SERVICE_NAME with the namespace's loopback."""

    def handle(self) -> None:
        data, sock = self.request
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = dns.message.make_response(query)
        question = query.question[0] if query.question else None
        if question is not None and question.name.to_text().rstrip(".") == SERVICE_NAME:
            if question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A",
                                                           "127.0.0.1"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(response.to_wire(), self.client_address)


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: list[str]) -> int:
    scratch = Path(argv[0])
    etc = scratch / "etc"
    files = scratch / "files"
    etc.mkdir(parents=True, exist_ok=True)
    (files / "mtrace-demo").mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (files / CONFIG_NAME).write_text(CONFIG_TEXT)

    namespaces.private_mounts()
    namespaces.isolate_network()
    namespaces.bind_file(str(etc / "resolv.conf"), "/etc/resolv.conf")
    namespaces.bind_file(str(etc / "hosts"), "/etc/hosts")
    namespaces.bind_file(str(files), config_directory())

    _serve(http.server.ThreadingHTTPServer(("127.0.0.1", SERVICE_PORT), _Service))
    _serve(socketserver.ThreadingUDPServer(("127.0.0.1", 53), _Dns))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
