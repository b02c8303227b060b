"""The direct path's helpers (mtrace.tracer.features.direct), on this process's own sockets."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from mtrace.tracer.features import direct


@pytest.fixture(params=["native", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each check in C (bin/libmtrace-notify.so, built by the install) and in
    the Python that runs where the library is missing: they must agree."""
    if request.param == "native":
        assert direct._native() is not None, "bin/libmtrace-notify.so lacks the direct checks"
    else:
        monkeypatch.setattr(direct, "_native", lambda: None)
    yield request.param


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _state(sock: socket.socket) -> direct.FdState | None:
    return direct.fd_state(os.getpid(), sock.fileno(), _inode(sock))


def test_a_lone_socket_is_not_held_elsewhere(implementation: str) -> None:
    with socket.socket() as sock:
        assert _state(sock) == direct.FdState(held_elsewhere=False, close_on_exec=True,
                                              nonblocking=False)


def test_a_dup_before_connect_keeps_the_relay(implementation: str) -> None:
    with socket.socket() as sock:
        copy = os.dup(sock.fileno())
        try:
            state = _state(sock)
            assert state is not None and state.held_elsewhere
        finally:
            os.close(copy)


def test_an_epoll_registration_before_connect_keeps_the_relay(implementation: str) -> None:
    with socket.socket() as sock, socket.socket() as other, select.epoll() as poller:
        poller.register(other.fileno(), select.EPOLLOUT)
        state = _state(sock)
        assert state is not None and not state.held_elsewhere, "another socket's registration"
        poller.register(sock.fileno(), select.EPOLLOUT)
        state = _state(sock)
        assert state is not None and state.held_elsewhere
        poller.unregister(sock.fileno())
        state = _state(sock)
        assert state is not None and not state.held_elsewhere


def test_an_epoll_registration_made_through_a_closed_dup_keeps_the_relay(
        implementation: str) -> None:
    """epoll_ctl through a dup, then the dup closed: the registration names
    the socket under the dup's old number. It was looked for under the
    socket's own fd number only, so the swap left it on the old socket."""
    with socket.socket() as sock, select.epoll() as poller:
        copy = os.dup(sock.fileno())
        poller.register(copy, select.EPOLLOUT)
        os.close(copy)
        state = _state(sock)
        assert state is not None and state.held_elsewhere


def test_flags_are_read_from_fdinfo(implementation: str) -> None:
    with socket.socket() as sock:
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), True)
        assert _state(sock) == direct.FdState(held_elsewhere=False, close_on_exec=False,
                                              nonblocking=True)
    assert direct.fd_state(os.getpid(), 10**6, 1) is None


def test_the_c_and_python_option_reads_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    assert direct._native() is not None
    with socket.socket() as tcp, socket.socket(socket.AF_INET6) as tcp6, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\5\0\0\0")
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 42)
        tcp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sockets = (tcp, tcp6, udp)
        native = [direct.read_options(sock, direct.option_table(sock.family, sock.type))
                  for sock in sockets]
        monkeypatch.setattr(direct, "_native", lambda: None)
        python = [direct.read_options(sock, direct.option_table(sock.family, sock.type))
                  for sock in sockets]
    assert native == python


def test_options_the_program_set_are_copied(implementation: str) -> None:
    with socket.socket() as program, socket.socket() as made:
        program.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        program.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        program.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 42)
        program.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        direct.copy_socket_state(program, made)
        assert made.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert made.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert made.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 42
        assert made.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == \
            program.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_ipv6_only_is_copied(implementation: str) -> None:
    with socket.socket(socket.AF_INET6) as program, socket.socket(socket.AF_INET6) as made:
        wanted = 1 - made.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        program.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, wanted)
        direct.copy_socket_state(program, made)
        assert made.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == wanted


def test_remembered_fresh_options_copy_the_same_as_reading_a_new_socket(
        implementation: str) -> None:
    """The direct path reads a new socket's options once per family and
    type; every program socket is compared against those."""
    network = direct.TargetNetwork("/proc/self/ns/net")
    try:
        fresh = network.fresh_options(socket.AF_INET, socket.SOCK_STREAM)
        assert network.fresh_options(socket.AF_INET, socket.SOCK_STREAM) is fresh
        with socket.socket() as program, \
                network.socket(socket.AF_INET, socket.SOCK_STREAM, 0) as made:
            program.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            program.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\5\0\0\0")
            program.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
            program.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
            direct.copy_socket_state(program, made, fresh)
            for level, option, size in [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0),
                                        (socket.SOL_SOCKET, socket.SO_LINGER, 8),
                                        (socket.IPPROTO_IP, socket.IP_TOS, 0),
                                        (socket.SOL_SOCKET, socket.SO_SNDBUF, 0),
                                        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]:
                args = (level, option, size) if size else (level, option)
                assert made.getsockopt(*args) == program.getsockopt(*args), (level, option)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                network.socket(socket.AF_INET, socket.SOCK_DGRAM, 0) as made_udp:
            assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 4) not in \
                direct.option_table(made_udp.family, made_udp.type)
            direct.copy_socket_state(udp, made_udp,
                                     network.fresh_options(socket.AF_INET, socket.SOCK_DGRAM))
    finally:
        network.close()


def test_options_the_program_left_keep_the_made_sockets_values(implementation: str) -> None:
    """A value the made socket has (its namespace's default) is not
    overwritten by the program's own default."""
    with socket.socket() as program, socket.socket() as made:
        made.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 611)  # "the target's default"
        program.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        direct.copy_socket_state(program, made)
        assert made.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 611
        assert made.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_bound_socket_is_seen() -> None:
    with socket.socket() as sock:
        assert not direct.is_bound(sock)
        sock.bind(("127.0.0.1", 0))
        assert direct.is_bound(sock)
