"""An agent attached to a real target (a process in its own network namespace).

Everything the agent returns must be the target's: its environment, its view
of files, its loopback services, its DNS, its errnos; never this host's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import socket
import time
from pathlib import Path

import dns.message
import dns.rdatatype
import pytest
from netns_target import NetnsTarget

from mtrace.agent.client import AgentClient, RemoteError, TcpStream, connect_tcp
from mtrace.agent.protocol import (
    CAP_FILES_CHMOD,
    CAP_FILES_CHOWN,
    CAP_FILES_STATFS,
    CAP_FILES_TIMES,
    CAP_FILES_WRITE,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


async def read_line(stream: TcpStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.read(1)
        if not chunk:
            break
        line += chunk
    return line


def test_environment_is_the_targets(with_agent, netns_target: NetnsTarget) -> None:
    environment = with_agent(lambda client: client.environ(), target_pid=netns_target.pid)
    assert environment == netns_target.env
    assert environment != dict(os.environ)


def test_files_are_the_targets_view(with_agent, netns_target: NetnsTarget) -> None:
    async def body(client: AgentClient) -> None:
        private = await client.read_file(netns_target.private_file)
        assert private.data == netns_target.private_file_content
        assert private.stat.size == len(netns_target.private_file_content)
        folder = os.path.dirname(netns_target.private_file)
        names = [entry.name for entry in await client.readdir(folder)]
        assert names == [b"only-in-target.txt"]
        hosts = await client.read_file("/etc/hosts")
        assert hosts.data == netns_target.hosts_file_content
        resolv = await client.read_file("/etc/resolv.conf")
        assert b"search target.test" in resolv.data
        with pytest.raises(RemoteError) as caught:
            await client.stat(f"{folder}/missing")
        assert caught.value.errno == errno.ENOENT

    with_agent(body, target_pid=netns_target.pid)
    # ...and this host sees none of it.
    assert os.listdir(os.path.dirname(netns_target.private_file)) == []
    with open("/etc/hosts", "rb") as file:
        assert file.read() != netns_target.hosts_file_content


def test_a_read_only_agent_refuses_writes(with_agent, netns_target: NetnsTarget) -> None:
    async def body(client: AgentClient) -> None:
        assert CAP_FILES_WRITE not in client.capabilities
        with pytest.raises(RemoteError) as caught:
            await client.mkdir(os.path.dirname(netns_target.private_file) + "/new")
        assert caught.value.errno == errno.EROFS

    with_agent(body, target_pid=netns_target.pid)


def test_writes_land_in_the_targets_filesystem(with_agent, netns_target: NetnsTarget) -> None:
    path = os.path.dirname(netns_target.private_file) + "/written-by-agent.txt"

    async def body(client: AgentClient) -> None:
        assert CAP_FILES_WRITE in client.capabilities
        opened = await client.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        assert await client.write(opened.handle, b"from the agent\n") == 15
        await client.close_file(opened.handle)

    with_agent(body, target_pid=netns_target.pid, write=True)
    inside = netns_target.run_inside("cat", path)
    assert inside.stdout == b"from the agent\n", inside.stderr
    assert not os.path.exists(path)
    with_agent(lambda client: client.unlink(path), target_pid=netns_target.pid, write=True)
    assert netns_target.run_inside("test", "-e", path).returncode == 1


def test_tcp_reaches_the_namespace_service_not_the_hosts(with_agent, netns_target: NetnsTarget) -> None:
    async def exchange(client: AgentClient) -> tuple[bytes, bytes, tuple[str, int]]:
        stream = await client.open_tcp("127.0.0.1", netns_target.tcp_port, timeout=5)
        banner = await read_line(stream)
        stream.write(b"echo me")
        stream.shutdown_write()
        await stream.drain()
        echoed = b""
        while chunk := await stream.read():
            echoed += chunk
        stream.close()
        return banner, echoed, stream.peer_address

    banner, echoed, peer = with_agent(exchange, target_pid=netns_target.pid)
    assert banner == netns_target.tcp_banner
    assert echoed == b"echo me"  # half-close: the echo still came back, then EOF
    assert peer == ("127.0.0.1", netns_target.tcp_port)
    # The same address from a targetless agent is this host's look-alike service.
    host_banner, _, _ = with_agent(exchange)
    assert host_banner == netns_target.host_tcp_banner


def test_udp_reaches_the_namespace_service(with_agent, netns_target: NetnsTarget) -> None:
    async def exchange(client: AgentClient) -> tuple[bytes, tuple[str, int]]:
        udp = await client.open_udp(socket.AF_INET)
        assert await udp.sendto(b"ping", ("127.0.0.1", netns_target.udp_port)) == 4
        reply = await asyncio.wait_for(udp.recvfrom(), 5)
        await udp.close()
        return reply

    data, source = with_agent(exchange, target_pid=netns_target.pid)
    assert data == b"target-udp:ping"
    assert source == ("127.0.0.1", netns_target.udp_port)
    data, _ = with_agent(exchange)
    assert data == b"host-udp:ping"


def test_raw_dns_over_the_udp_path_reaches_the_namespace_nameserver(
    with_agent, netns_target: NetnsTarget
) -> None:
    # What the tracer does with a tracee's own DNS query to its nameserver.
    async def query(client: AgentClient) -> bytes:
        udp = await client.open_udp(socket.AF_INET6)  # dual stack: v4 via mapped addresses
        request = dns.message.make_query("only-in-target.test", "A")
        await udp.sendto(request.to_wire(), ("127.0.0.1", netns_target.dns_port))
        wire, source = await asyncio.wait_for(udp.recvfrom(), 5)
        assert source == ("127.0.0.1", 53)
        return wire

    answer = dns.message.from_wire(with_agent(query, target_pid=netns_target.pid))
    (rrset,) = answer.answer
    assert rrset.rdtype == dns.rdatatype.A
    assert [record.to_text() for record in rrset] == ["10.99.0.7"]


def test_names_resolve_the_way_the_namespace_resolves(with_agent, netns_target: NetnsTarget) -> None:
    async def body(client: AgentClient) -> None:
        assert await client.resolve("only-in-target.test", socket.AF_INET) == ["10.99.0.7"]
        assert await client.resolve("only-in-target.test", socket.AF_INET6) == ["fd00:99::7"]
        assert await client.resolve("only-in-target.test") == ["10.99.0.7", "fd00:99::7"]
        assert await client.resolve("hosts-only.test") == ["10.99.0.8"]  # its /etc/hosts
        assert await client.resolve("api", socket.AF_INET) == ["10.99.0.9"]  # its search list
        assert await client.resolve("localhost", socket.AF_INET) == ["127.0.0.1"]
        with pytest.raises(RemoteError) as caught:
            await client.resolve("nowhere.test")
        assert caught.value.errno == errno.ENOENT
        # a host name works for connecting too, resolved the same way
        stream = await client.open_tcp("localhost", netns_target.tcp_port, timeout=5)
        assert await read_line(stream) == netns_target.tcp_banner
        stream.close()

    with_agent(body, target_pid=netns_target.pid)


def test_connection_failures_carry_the_targets_errno(with_agent, netns_target: NetnsTarget) -> None:
    async def failure(client: AgentClient, host: str, port: int, timeout: float) -> int:
        with pytest.raises(RemoteError) as caught:
            await client.open_tcp(host, port, timeout=timeout)
        return caught.value.errno

    async def body(client: AgentClient) -> None:
        refused = await failure(client, "127.0.0.1", netns_target.closed_port, 5)
        assert refused == errno.ECONNREFUSED
        assert await failure(client, netns_target.unreachable_host, 80, 5) == errno.EHOSTUNREACH
        assert await failure(client, netns_target.no_route_host, 80, 5) == errno.ENETUNREACH
        if netns_target.blackhole_port is not None:
            started = time.monotonic()
            timed_out = await failure(client, "127.0.0.1", netns_target.blackhole_port, 0.3)
            assert timed_out == errno.ETIMEDOUT
            assert time.monotonic() - started < 3
        # the agent is fine afterwards
        await client.ping()

    with_agent(body, target_pid=netns_target.pid)


def test_a_listening_agent_serves_host_clients_from_inside_the_namespace(
    listening_agent, netns_target: NetnsTarget
) -> None:
    # The listening socket is bound before the agent enters the namespace, so
    # a client on this host reaches it, and what it connects to is the target's.
    async def one_client(host: str, port: int, secret: str) -> bytes:
        client = await connect_tcp(host, port, secret)
        try:
            stream = await client.open_tcp("127.0.0.1", netns_target.tcp_port, timeout=5)
            banner = await read_line(stream)
            stream.close()
            return banner
        finally:
            await client.close()

    with listening_agent(target_pid=netns_target.pid) as agent:

        async def many() -> list[bytes]:
            return await asyncio.gather(*(one_client(agent.host, agent.port, agent.secret) for _ in range(8)))

        assert asyncio.run(many()) == [netns_target.tcp_banner] * 8


STREAM_BYTES = 100 * 1024 * 1024
BLOCK = 1024 * 1024


@pytest.mark.timeout(90)
def test_100_megabytes_stream_both_ways_intact_through_a_stdio_agent(
    with_agent, netns_target: NetnsTarget
) -> None:
    async def body(client: AgentClient) -> tuple[str, str, int, float]:
        stream = await client.open_tcp("127.0.0.1", netns_target.tcp_port, timeout=5)
        banner = await stream.readexactly(len(netns_target.tcp_banner))
        assert banner == netns_target.tcp_banner
        sent = hashlib.sha256()
        received = hashlib.sha256()
        started = time.monotonic()

        async def send() -> None:
            for index in range(STREAM_BYTES // BLOCK):
                block = random.Random(index).randbytes(BLOCK)
                sent.update(block)
                stream.write(block)
                await stream.drain()
            stream.shutdown_write()
            await stream.drain()

        async def receive() -> int:
            total = 0
            while chunk := await stream.read():
                received.update(chunk)
                total += len(chunk)
            return total

        _, total = await asyncio.gather(send(), receive())
        stream.close()
        return sent.hexdigest(), received.hexdigest(), total, time.monotonic() - started

    sent, received, total, seconds = with_agent(body, target_pid=netns_target.pid)
    assert total == STREAM_BYTES
    assert received == sent
    print(f"100 MiB each way in {seconds:.1f}s ({2 * STREAM_BYTES / seconds / 1e6:.0f} MB/s)")


FORKED_AGENT_CHANNEL = """
import asyncio, os, sys
from mtrace.agent.client import agent_argv
from mtrace.cli.local_agent import fork_agent

forked = fork_agent(agent_argv(target_pid=os.getpid())[3:], "a" * 32, quiet=True)

async def main():
    client = await forked.connect(timeout=30)
    try:
        await client.ping()
        print(client.channel, "cryptography" in sys.modules)
    finally:
        await client.close()

asyncio.run(main())
"""


def test_forked_local_agent_speaks_plain_frames() -> None:
    """Regression: the forked agent of a pid/N target sealed every frame (its
    handshake asked for encryption), where its pipes are private: every remote
    call paid for sealing and every start-up for importing the crypto library."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FORKED_AGENT_CHANNEL], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plain", "False"]


def test_chmod_follows_symlinks_inside_the_targets_root_only(
        with_agent, netns_target: NetnsTarget) -> None:
    """ChangeMode: a symlink to an absolute path is the target's path, never this host's."""
    directory = os.path.dirname(netns_target.private_file)
    host_view = f"/proc/{netns_target.pid}/root{directory}"
    # On this host, under the directory the target's own tmpfs hides: the
    # target has no such file.
    decoy = Path(f"{directory}/decoy-on-the-host")
    decoy.write_text("host\n")
    decoy.chmod(0o644)
    Path(f"{host_view}/chmodded").write_text("target\n")
    os.chmod(f"{host_view}/chmodded", 0o644)
    os.symlink(str(decoy), f"{host_view}/to-decoy")
    os.symlink("chmodded", f"{host_view}/to-chmodded")
    try:
        async def body(client: AgentClient) -> int | None:
            assert CAP_FILES_CHMOD in client.capabilities
            await client.chmod(f"{directory}/to-chmodded", 0o600)
            try:
                await client.chmod(f"{directory}/to-decoy", 0o600)
            except RemoteError as error:
                return error.errno
            return None

        assert with_agent(body, target_pid=netns_target.pid, write=True) == errno.ENOENT
        assert os.stat(f"{host_view}/chmodded").st_mode & 0o777 == 0o600
        assert decoy.stat().st_mode & 0o777 == 0o644
    finally:
        for name in ("chmodded", "to-decoy", "to-chmodded"):
            with contextlib.suppress(OSError):
                os.unlink(f"{host_view}/{name}")
        decoy.unlink()


def test_chown_times_and_statfs_follow_symlinks_inside_the_targets_root_only(
        with_agent, netns_target: NetnsTarget) -> None:
    """ChangeOwner, SetTimes, StatFs: a symlink to an absolute path is the target's path."""
    directory = os.path.dirname(netns_target.private_file)
    host_view = f"/proc/{netns_target.pid}/root{directory}"
    decoy = Path(f"{directory}/decoy-on-the-host")  # hidden from the target by its tmpfs
    decoy.write_text("host\n")
    before = decoy.stat()
    Path(f"{host_view}/owned").write_text("target\n")
    os.symlink(str(decoy), f"{host_view}/to-decoy")
    os.symlink("owned", f"{host_view}/to-owned")
    try:
        async def body(client: AgentClient) -> list[int | None]:
            assert {CAP_FILES_CHOWN, CAP_FILES_TIMES, CAP_FILES_STATFS} <= set(
                client.capabilities)
            await client.chown(f"{directory}/to-owned", 1234, 5678)
            await client.chown(f"{directory}/to-owned", 4321, -1, follow=False)
            await client.set_times(f"{directory}/to-owned", None, 7 * 10**9)
            statfs = await client.statfs(f"{directory}/to-owned")
            assert statfs.type == 0x01021994  # the target's tmpfs
            errors: list[int | None] = []
            for call in (client.chown(f"{directory}/to-decoy", 1234, 5678),
                         client.set_times(f"{directory}/to-decoy", "now", "now"),
                         client.statfs(f"{directory}/to-decoy")):
                try:
                    await call
                    errors.append(None)
                except RemoteError as error:
                    errors.append(error.errno)
            return errors

        assert with_agent(body, target_pid=netns_target.pid, write=True) == [errno.ENOENT] * 3
        owned = os.stat(f"{host_view}/owned")
        assert (owned.st_uid, owned.st_gid, owned.st_mtime_ns) == (1234, 5678, 7 * 10**9)
        assert os.lstat(f"{host_view}/to-owned").st_uid == 4321
        after = decoy.stat()
        assert (after.st_uid, after.st_mtime_ns) == (before.st_uid, before.st_mtime_ns)
    finally:
        for name in ("owned", "to-decoy", "to-owned"):
            with contextlib.suppress(OSError):
                os.unlink(f"{host_view}/{name}")
        decoy.unlink()
