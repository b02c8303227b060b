"""The direct path's helpers (mtrace.tracer.features.direct), on this process's own sockets."""

from __future__ import annotations

import os
import select
import socket

from mtrace.tracer.features import direct


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_a_lone_socket_is_not_held_elsewhere() -> None:
    with socket.socket() as sock:
        assert not direct.held_elsewhere(os.getpid(), sock.fileno(), _inode(sock))


def test_a_dup_before_connect_keeps_the_relay() -> None:
    with socket.socket() as sock:
        copy = os.dup(sock.fileno())
        try:
            assert direct.held_elsewhere(os.getpid(), sock.fileno(), _inode(sock))
        finally:
            os.close(copy)


def test_an_epoll_registration_before_connect_keeps_the_relay() -> None:
    with socket.socket() as sock, select.epoll() as poller:
        poller.register(sock.fileno(), select.EPOLLOUT)
        assert direct.held_elsewhere(os.getpid(), sock.fileno(), _inode(sock))
        poller.unregister(sock.fileno())
        assert not direct.held_elsewhere(os.getpid(), sock.fileno(), _inode(sock))


def test_options_the_program_set_are_copied() -> None:
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


def test_remembered_fresh_options_copy_the_same_as_reading_the_new_socket() -> None:
    """The direct path reads a fresh socket's options once per family and
    type; every later socket made is compared against those."""
    network = direct.TargetNetwork("/proc/self/ns/net")
    try:
        with network.socket(socket.AF_INET, socket.SOCK_STREAM, 0) as first:
            fresh = network.fresh_options(first)
        with socket.socket() as program, \
                network.socket(socket.AF_INET, socket.SOCK_STREAM, 0) as made:
            assert network.fresh_options(made) is fresh
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
            assert (socket.IPPROTO_TCP, socket.TCP_NODELAY) not in network.fresh_options(made_udp)
            direct.copy_socket_state(udp, made_udp, network.fresh_options(made_udp))
    finally:
        network.close()


def test_close_on_exec_is_read_from_fdinfo() -> None:
    with socket.socket() as sock:
        assert direct.close_on_exec(os.getpid(), sock.fileno()) is True
        os.set_inheritable(sock.fileno(), True)
        assert direct.close_on_exec(os.getpid(), sock.fileno()) is False
    assert direct.close_on_exec(os.getpid(), 10**6) is None


def test_a_bound_socket_is_seen() -> None:
    with socket.socket() as sock:
        assert not direct.is_bound(sock)
        sock.bind(("127.0.0.1", 0))
        assert direct.is_bound(sock)
