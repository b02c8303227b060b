"""Round trips and throughput through a ``--stdio`` agent attached to a namespace target.

Standalone (needs root: it creates a network namespace with tests/netns_target.py)::

    python bench/agent_latency.py [--rounds 2000] [--megabytes 256]

Prints a markdown table: median and p99 round-trip latency of ping, stat and
TCP connect (open + close of a stream to the target's loopback service), the
rate of pipelined pings, and stream throughput each way (an echo service: the
bytes go up and come back down at the same time).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns_target import NetnsTarget, netns_target

from mtrace.agent.client import AgentClient, agent_argv, spawn_stdio

SECRET = "bench-agent-latency"


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _timed(rounds: int, operation: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(min(50, rounds)):  # warm up
        await operation()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await operation()
        samples.append(time.perf_counter() - started)
    return samples


async def _connect_and_close(client: AgentClient, target: NetnsTarget) -> None:
    stream = await client.open_tcp("127.0.0.1", target.tcp_port, timeout=5)
    stream.close()


async def _pipelined_pings(client: AgentClient, total: int, in_flight: int) -> float:
    started = time.perf_counter()
    for _ in range(total // in_flight):
        await asyncio.gather(*(client.ping() for _ in range(in_flight)))
    return (total // in_flight * in_flight) / (time.perf_counter() - started)


async def _echo_throughput(client: AgentClient, target: NetnsTarget, size: int) -> float:
    stream = await client.open_tcp("127.0.0.1", target.tcp_port, timeout=5)
    await stream.readexactly(len(target.tcp_banner))
    block = os.urandom(1 << 20)
    sent, received = hashlib.sha256(), hashlib.sha256()
    started = time.perf_counter()

    async def send() -> None:
        for _ in range(size // len(block)):
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
    seconds = time.perf_counter() - started
    stream.close()
    if total != size // len(block) * len(block) or sent.digest() != received.digest():
        raise RuntimeError("the echoed stream differs from what was sent")
    return total / seconds


async def _measure(target: NetnsTarget, rounds: int, megabytes: int) -> list[tuple[str, str, str]]:
    client = await spawn_stdio(agent_argv(target_pid=target.pid), SECRET)
    try:
        rows = []
        for name, operation in (
            ("ping", lambda: client.ping()),
            ("stat /etc/hosts", lambda: client.stat("/etc/hosts")),
            ("read_file /etc/hosts", lambda: client.read_file("/etc/hosts")),
            ("resolve (target DNS)", lambda: client.resolve("only-in-target.test")),
            ("TCP connect + close", lambda: _connect_and_close(client, target)),
        ):
            samples = await _timed(rounds, operation)
            rows.append(
                (
                    name,
                    f"{statistics.median(samples) * 1e6:.0f} µs",
                    f"{_percentile(samples, 0.99) * 1e6:.0f} µs",
                )
            )
        rate = await _pipelined_pings(client, rounds * 5, 64)
        rows.append(("ping, 64 in flight", f"{rate:,.0f} /s", ""))
        throughput = await _echo_throughput(client, target, megabytes << 20)
        rows.append((f"TCP echo {megabytes} MiB (each way)", f"{throughput / 1e6:.0f} MB/s", ""))
        return rows
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per operation")
    parser.add_argument("--megabytes", type=int, default=256, help="bytes streamed each way")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("agent_latency: needs root (creates a network namespace)", file=sys.stderr)
        return 2
    with netns_target() as target:
        rows = asyncio.run(_measure(target, arguments.rounds, arguments.megabytes))
    print(f"Agent over --stdio, attached to pid {target.pid} in netns {target.netns}")
    print(f"({arguments.rounds} sequential round trips per row, {os.cpu_count()} CPUs)\n")
    print("| operation | median | p99 |")
    print("| --- | ---: | ---: |")
    for name, median, p99 in rows:
        print(f"| {name} | {median} | {p99} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
