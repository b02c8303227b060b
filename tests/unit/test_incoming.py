"""Incoming traffic pieces that need no privileges: the HTTP filter, the
redirect table, the BPF program, TCP reassembly, the config checks."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mtrace.agent.incoming import CompiledFilter, MirrorCapture, _Flow, bpf_for_ports
from mtrace.agent.protocol import HttpRequestFilter
from mtrace.agent.redirect import AGENT_MARK, iptables_script, nft_script
from mtrace.cli.config import Config, load, validate
from mtrace.cli.errors import ConfigError
from mtrace.tracer.features.incoming import protocol_filter
from mtrace.tracer.features.policy import HttpFilter, IncomingConfig, NetworkConfig

KUBE = CompiledFilter.of(HttpRequestFilter(header="^User-Agent: (?!kube-probe/)"))


def test_negative_lookahead_leaves_kube_probes_to_the_target() -> None:
    assert not KUBE.matches("GET", "/healthz", ["Host: a", "User-Agent: kube-probe/1.30"])
    assert KUBE.matches("GET", "/", ["Host: a", "User-Agent: curl/8.5"])
    assert not KUBE.matches("GET", "/", ["Host: a"])  # no User-Agent at all: nothing to match


def test_filter_keys_in_one_table_must_all_hold() -> None:
    both = CompiledFilter.of(HttpRequestFilter(path="^/api/", method="^POST$"))
    assert both.matches("POST", "/api/x", [])
    assert not both.matches("GET", "/api/x", [])
    assert not both.matches("POST", "/other", [])


def test_any_of_and_all_of_nest() -> None:
    spec = HttpRequestFilter(any_of=[
        HttpRequestFilter(header="^X-Dev: 1$"),
        HttpRequestFilter(all_of=[HttpRequestFilter(method="GET"), HttpRequestFilter(path="v2")])])
    found = CompiledFilter.of(spec)
    assert found.matches("PUT", "/", ["X-Dev: 1"])
    assert found.matches("GET", "/v2/items", [])
    assert not found.matches("PUT", "/v2/items", [])


def test_an_empty_filter_matches_nothing() -> None:
    assert not CompiledFilter.of(HttpRequestFilter()).matches("GET", "/", ["A: b"])


def test_filter_ports() -> None:
    found = CompiledFilter.of(HttpRequestFilter(path="/", ports=[80]))
    assert found.applies_to(80) and not found.applies_to(81)


def test_config_filter_becomes_the_protocol_filter() -> None:
    spec = HttpFilter(header_filter="h", any_of=[HttpFilter(path_filter="p")], ports=[8080])
    assert protocol_filter(spec) == HttpRequestFilter(
        header="h", any_of=[HttpRequestFilter(path="p")], ports=[8080])


def test_nft_table_redirects_both_hooks_and_skips_the_agents_mark() -> None:
    script = nft_script("mtrace_42_1", {80: 40000, 443: 40001})
    assert script.startswith("add table inet mtrace_42_1\ndelete table inet mtrace_42_1\n")
    assert "type nat hook prerouting" in script and "type nat hook output" in script
    rule = f"tcp dport 80 meta mark != {AGENT_MARK:#x} redirect to :40000"
    assert script.count(rule) == 2
    assert script.count("redirect to :40001") == 2


def test_nft_table_marks_the_agents_connections_and_their_answers_unless_told_not() -> None:
    script = nft_script("mtrace_42_1", {80: 40000})
    assert "type route hook output" in script
    assert f"meta mark {AGENT_MARK:#x} ct mark set {AGENT_MARK:#x}" in script
    assert f"ct direction reply ct mark {AGENT_MARK:#x} meta mark set {AGENT_MARK:#x}" in script
    plain = nft_script("mtrace_42_1", {80: 40000}, route=False)
    assert "route" not in plain and plain.rstrip().endswith("}")


def test_iptables_chain_is_jumped_to_once() -> None:
    first = iptables_script("MTRACE_42", {80: 40000}, first=True)
    assert "-I PREROUTING -j MTRACE_42" in first and "-I OUTPUT -j MTRACE_42" in first
    again = iptables_script("MTRACE_42", {}, first=False)
    assert "PREROUTING" not in again and "-F MTRACE_42" in again


def _run_bpf(program: list[tuple[int, int, int, int]], packet: bytes, protocol: int,
             packet_type: int = 0) -> int:
    """A tiny classic-BPF interpreter for the opcodes the filter uses."""
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x28:  # ldh [k]
            a = {0xFFFFF000: protocol, 0xFFFFF004: packet_type}.get(k) \
                if k >= 0xFFFFF000 else struct.unpack_from("!H", packet, k)[0]
        elif code == 0x30:  # ldb [k]
            a = packet[k]
        elif code == 0xB1:  # ldxb 4*([k]&0xf)
            x = 4 * (packet[k] & 0xF)
        elif code == 0x48:  # ldh [x+k]
            a = struct.unpack_from("!H", packet, x + k)[0]
        elif code == 0x50:  # ldb [x+k]
            a = packet[x + k]
        elif code == 0x54:
            a &= k
        elif code == 0x74:
            a >>= k
        elif code == 0x0C:
            a += x
        elif code == 0x1C:
            a = (a - x) & 0xFFFFFFFF
        elif code == 0x07:
            x = a
        elif code == 0x15:  # jeq
            pc += jt if a == k else jf
        elif code == 0x45:  # jset
            pc += jt if a & k else jf
        elif code == 0x25:  # jgt
            pc += jt if a > k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


SYN, ACK, FIN = 0x02, 0x10, 0x01


def _ipv4_tcp(port: int, fragment: int = 0, flags: int = SYN, data: bytes = b"") -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(data), 0, fragment, 64, 6, 0,
                         socket.inet_aton("10.0.0.2"), socket.inet_aton("10.0.0.1"))
    return header + struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 0x50, flags, 0, 0, 0) + data


def _ipv6_tcp(port: int, flags: int = SYN, data: bytes = b"") -> bytes:
    header = struct.pack("!IHBB16s16s", 0x60000000, 20 + len(data), 6, 64,
                         socket.inet_pton(socket.AF_INET6, "fd00::2"),
                         socket.inet_pton(socket.AF_INET6, "fd00::1"))
    return header + struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 0x50, flags, 0, 0, 0) + data


def test_bpf_takes_tcp_to_the_mirrored_ports_only() -> None:
    program = bpf_for_ports({80, 8080})
    assert _run_bpf(program, _ipv4_tcp(80), 0x0800)
    assert _run_bpf(program, _ipv4_tcp(8080), 0x0800)
    assert not _run_bpf(program, _ipv4_tcp(81), 0x0800)
    assert not _run_bpf(program, _ipv4_tcp(80, fragment=0x0010), 0x0800)
    assert _run_bpf(program, _ipv6_tcp(8080), 0x86DD)
    assert not _run_bpf(program, _ipv6_tcp(22), 0x86DD)
    assert not _run_bpf(program, _ipv4_tcp(80), 0x0806)


@pytest.mark.parametrize(("make", "protocol"), [(_ipv4_tcp, 0x0800), (_ipv6_tcp, 0x86DD)])
def test_mirror_filter_wakes_the_agent_only_for_what_reassembly_needs(make: Any,
                                                                      protocol: int) -> None:
    program = bpf_for_ports({80})
    assert _run_bpf(program, make(80, flags=ACK, data=b"GET /"), protocol)
    assert _run_bpf(program, make(80, flags=FIN | ACK), protocol)
    assert _run_bpf(program, make(80, flags=SYN), protocol)
    assert not _run_bpf(program, make(80, flags=ACK), protocol)  # a pure ACK
    # loopback shows each packet twice: the outgoing copy is dropped
    assert not _run_bpf(program, make(80, flags=ACK, data=b"x"), protocol, packet_type=4)


def test_mirror_filter_jumps_stay_in_reach_with_many_ports() -> None:
    program = bpf_for_ports(set(range(1000, 1300)))  # 200 are taken
    assert all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in program)
    assert _run_bpf(program, _ipv6_tcp(1199, flags=ACK, data=b"x"), 0x86DD)
    assert _run_bpf(program, _ipv4_tcp(1000), 0x0800)


def test_reassembly_orders_segments_and_trims_overlaps() -> None:
    ours, theirs = socket.socketpair()
    try:
        capture = MirrorCapture.__new__(MirrorCapture)
        capture.held = 0
        flow = _Flow(ours, 1, 80, ("10.0.0.2", 40000), next_seq=1000)
        capture._segment(flow, 1005, b"world")       # ahead: buffered
        capture._segment(flow, 1000, b"hello")       # fills the gap
        capture._segment(flow, 1003, b"loworld!")    # overlaps: only "!" is new
        capture._segment(flow, (1 << 32) - 2, b"xx")  # far behind (wrapped): dropped
        theirs.settimeout(2)
        assert theirs.recv(100) == b"helloworld!"
        assert flow.next_seq == 1011
    finally:
        ours.close()
        theirs.close()


def test_a_mirror_copy_nobody_reads_is_dropped_once_its_backlog_is_full() -> None:
    """Regression (issue 14): a copy whose stream was not read piled up in the
    agent without bound; now it is dropped, said once, and holds nothing."""
    import asyncio

    from mtrace.agent.incoming import MIRROR_BACKLOG

    dropped: list[tuple[int, str]] = []

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            capture = MirrorCapture.__new__(MirrorCapture)
            capture.held = 0
            capture._loop = asyncio.get_running_loop()
            capture._on_dropped = lambda stream, port, peer, reason: dropped.append((stream, reason))
            flow = _Flow(ours, 7, 80, ("10.0.0.2", 40000), next_seq=0)
            seq = 0
            for _ in range(200):  # 12.5 MiB, never read on the other side
                capture._segment(flow, seq, b"m" * 65536)
                seq += 65536
                assert capture.held <= MIRROR_BACKLOG + 65536
            assert flow.done and capture.held == 0 and not flow.outbox and not flow.pending
            capture._segment(flow, seq + 65536, b"late")  # out of order, after the drop
            assert capture.held == 0 and not flow.pending
        finally:
            ours.close()
            theirs.close()

    asyncio.run(main())
    assert [stream for stream, _ in dropped] == [7], dropped
    assert "did not read" in dropped[0][1]


def test_a_mirrored_connection_that_ends_with_segments_out_of_order_gives_their_bytes_back() -> None:
    ours, theirs = socket.socketpair()
    try:
        capture = MirrorCapture.__new__(MirrorCapture)
        capture.held = 0
        flow = _Flow(ours, 1, 80, ("10.0.0.2", 40000), next_seq=1000)
        capture._segment(flow, 2000, b"x" * 100)  # a gap before it: held
        assert capture.held == 100
        capture._end(flow)  # a RST: the gap is never filled
        assert capture.held == 0 and not flow.pending
    finally:
        ours.close()
        theirs.close()


def test_incoming_is_a_mode_string_or_a_table() -> None:
    assert msgspec.convert({"incoming": "steal"}, NetworkConfig).incoming_config == \
        IncomingConfig(mode="steal")
    table = msgspec.convert({"incoming": {"mode": "off", "ports": [80]}}, NetworkConfig)
    assert table.incoming_config.mode == "off" and table.incoming_config.ports == [80]
    assert NetworkConfig().incoming_config.mode == "mirror"


@pytest.mark.parametrize(("incoming", "key"), [
    ('"sideways"', "feature.network.incoming"),
    ('{ mode = "steal", port_mapping = [[8080, 70000]] }',
     "feature.network.incoming.port_mapping[0][1]"),
    ('{ ignore_ports = [0] }', "feature.network.incoming.ignore_ports[0]"),
    ('{ http_filter = { any_of = [{ path_filter = "(" }] } }',
     "feature.network.incoming.http_filter.any_of[0].path_filter"),
])
def test_bad_incoming_config_names_the_key(tmp_path: Path, incoming: str, key: str) -> None:
    file = tmp_path / "config.toml"
    file.write_text(f"[feature.network]\nincoming = {incoming}\n")
    with pytest.raises(ConfigError) as caught:
        load(file)
    assert key in caught.value.message
    assert caught.value.exit_code == 78


def test_good_incoming_config_passes() -> None:
    config = msgspec.convert({"feature": {"network": {"incoming": {
        "mode": "steal", "port_mapping": [[8080, 80]],
        "http_filter": {"header_filter": "^User-Agent: (?!kube-probe/)"}}}}}, Config)
    validate(config)


def test_protocol_2_still_speaks_to_version_1_peers() -> None:
    # Regression: bumping PROTOCOL_VERSION for the incoming messages once raised
    # MIN_PROTOCOL_VERSION too, and every version-1 agent was refused.
    from mtrace.agent import protocol

    assert protocol.MIN_PROTOCOL_VERSION == 1 < protocol.PROTOCOL_VERSION


def test_direct_connect_connects_and_reports_the_kernels_errors() -> None:
    """agent.aio.sock_connect (uvloop's resolves even numeric addresses in its
    thread pool, a wake-up on each incoming connection's path)."""
    import asyncio
    import errno

    from mtrace.agent.aio import sock_connect

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.socket() as sock:
            sock.setblocking(False)
            await sock_connect(sock, listener.getsockname())
            assert sock.getpeername() == listener.getsockname()
        address = listener.getsockname()
        listener.close()
        with socket.socket() as sock:
            sock.setblocking(False)
            with pytest.raises(OSError) as raised:
                await sock_connect(sock, address)
            assert raised.value.errno == errno.ECONNREFUSED

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
