"""Loopback servers for tests: TCP echo, UDP echo, HTTP on 127.0.0.1 only."""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path


class _EchoTCPHandler(socketserver.BaseRequestHandler):
    """Echo everything until the client shuts down its write side, then close."""

    def handle(self) -> None:
        received = b""
        while chunk := self.request.recv(65536):
            received += chunk
        self.request.sendall(received)


class _EchoUDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _QuietHTTPHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(server: socketserver.BaseServer) -> Iterator[int]:
    """Serve in a thread for the duration of the block; yield the port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def tcp_echo_server() -> socketserver.BaseServer:
    return socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoTCPHandler)


def udp_echo_server() -> socketserver.BaseServer:
    return socketserver.ThreadingUDPServer(("127.0.0.1", 0), _EchoUDPHandler)


def http_server(root: Path) -> socketserver.BaseServer:
    handler = partial(_QuietHTTPHandler, directory=str(root))
    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
