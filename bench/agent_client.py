"""Remote operations through ``mtrace.agent.client``, run as its own process.

    python -m bench.agent_client ops  --pid N --file PATH --http-port P --calls C --runs R --requests H
    python -m bench.agent_client bulk --pid N --bulk-port P --runs R [--transport tcp]

Spawns ``mtrace agent --stdio --target-pid N`` through the client API, measures
and prints one JSON object. It is a separate process so that its peak memory
(the supervisor's side of the link) and the agent's are measured alone, not
mixed with the benchmark runner's own. Latencies are in microseconds (per run:
p50 and p99 over the calls after the first; ``*_first_us`` is the very first
call), bulk rates in MB/s (10^6 bytes).

``--transport tcp`` runs ``mtrace agent --listen 127.0.0.1:0 --target-pid N``
instead and connects with ``connect_tcp`` (an encrypted channel from protocol 2
on; plain before): what the channel's sealing costs, against stdio's plain pipes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

HOST = "127.0.0.1"
REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE_SIZE = len(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")


def _p(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _timed(calls: int, operation: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await operation()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


async def _ops(args: argparse.Namespace) -> dict[str, object]:
    from mtrace.agent.client import agent_argv, spawn_stdio

    secret = secrets.token_hex(16)
    client = await spawn_stdio(agent_argv(target_pid=args.pid), secret)
    result: dict[str, object] = {}
    path = args.file

    async def open_read_close() -> None:
        opened = await client.open(path)
        await client.read(opened.handle, 65536)
        await client.close_file(opened.handle)

    async def connect_close() -> None:
        stream = await client.open_tcp(HOST, args.http_port)
        stream.close()

    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "ping": client.ping,
        "stat": lambda: client.stat(path),
        "open": open_read_close,
        "connect": connect_close,
    }
    try:
        for name, operation in operations.items():
            p50s, p99s = [], []
            for run in range(args.runs):
                samples = await _timed(args.calls, operation)
                if run == 0:
                    result[f"{name}_first_us"] = samples[0]
                p50s.append(statistics.median(samples[1:] or samples))
                p99s.append(_p(samples[1:] or samples, 0.99))
            result[f"{name}_p50_us"], result[f"{name}_p99_us"] = p50s, p99s

        p50s, p99s = [], []
        for _ in range(args.runs):
            stream = await client.open_tcp(HOST, args.http_port)

            async def request(stream: object = stream) -> None:
                stream.write(REQUEST)  # type: ignore[attr-defined]
                await stream.drain()  # type: ignore[attr-defined]
                await stream.readexactly(RESPONSE_SIZE)  # type: ignore[attr-defined]

            samples = await _timed(args.requests, request)
            stream.close()
            p50s.append(statistics.median(samples[1:] or samples))
            p99s.append(_p(samples[1:] or samples, 0.99))
        result["http_p50_us"], result["http_p99_us"] = p50s, p99s
    finally:
        await client.close()
    return result


@contextlib.asynccontextmanager
async def _listening_agent(pid: int, secret: str) -> AsyncIterator[tuple[str, int]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mtrace.agent", "--listen", "127.0.0.1:0", "--target-pid", str(pid),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "MTRACE_AGENT_SECRET": secret},
    )
    try:
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"the agent did not start: {line!r}")
        host, _, port = line.split()[1].rpartition(":")
        yield host, int(port)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()


async def _bulk(args: argparse.Namespace) -> dict[str, object]:
    secret = secrets.token_hex(16)
    if args.transport == "tcp":
        from mtrace.agent.client import connect_tcp

        async with _listening_agent(args.pid, secret) as (host, port):
            client = await connect_tcp(host, port, secret)
            return await _bulk_with(client, args)
    from mtrace.agent.client import agent_argv, spawn_stdio

    client = await spawn_stdio(agent_argv(target_pid=args.pid), secret)
    return await _bulk_with(client, args)


async def _bulk_with(client: Any, args: argparse.Namespace) -> dict[str, object]:
    rates = []
    pings = []
    try:
        for _ in range(args.runs):
            samples = await _timed(args.calls, client.ping)
            pings.append(statistics.median(samples[1:] or samples))
        for _ in range(args.runs):
            stream = await client.open_tcp(HOST, args.bulk_port)
            received = len(await stream.read(1 << 20))
            start = time.perf_counter()  # from the first byte, as bench/loop bulk counts
            while chunk := await stream.read(1 << 20):
                received += len(chunk)
            rates.append(received / (time.perf_counter() - start) / 1e6)
            stream.close()
    finally:
        await client.close()
    return {"bulk_mbps": rates, "bytes": received, "ping_p50_us": pings,
            "channel": getattr(client, "channel", "plain")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_client")
    parser.add_argument("mode", choices=("ops", "bulk"))
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--file", default="/etc/hostname")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--bulk-port", type=int, default=0)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transport", choices=("stdio", "tcp"), default="stdio")
    args = parser.parse_args(argv)
    result = asyncio.run(_ops(args) if args.mode == "ops" else _bulk(args))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
