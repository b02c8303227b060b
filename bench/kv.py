"""Many small requests over concurrent connections: a key-value server's GET/SET load.

``redis-server`` runs in the namespace target; ``redis-benchmark`` (a real,
dynamically linked client with its own epoll loop) does GET and SET with 1 and
10 connections, run three ways in the same run:

* **direct in namespace** (``nsenter``): the baseline;
* **mtrace exec --target pid/N**;
* **proxychains4** with ``microsocks`` in the target's namespace (the
  LD_PRELOAD peer users have today), reached over a veth pair this module
  creates (``10.213.0.1`` here, ``10.213.0.2`` in the namespace); every
  connection, 127.0.0.1 included, goes through the SOCKS server.

The value is requests per second (the mean of GET and SET), a median over runs.

Coverage rows: each probe flavour (``tests/programs``: dynamic glibc, static
glibc, musl, static Go) sends ``PING`` to the target's server under each tool;
1 if the target's ``+PONG`` came back (the connection left from the target),
0 if not: ``ECONNREFUSED`` means it escaped (nothing listens on that port on
this machine).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

from bench.common import (
    Context,
    Row,
    RunFailed,
    Unavailable,
    compare,
    median,
    mtrace_argv,
    which,
)
from bench.namespace import free_port, stop_process

GROUP = "kv"
DIRECT = "direct in namespace"
MTRACE_TARGET = "mtrace exec --target pid/N"
PROXYCHAINS = "proxychains4 + microsocks"
VARIANTS = (DIRECT, MTRACE_TARGET, PROXYCHAINS)
UNIT = "req/s"
CONNECTIONS = (1, 10)


def _name(connections: int) -> str:
    return f"KV GET/SET, {connections} connection{'s' if connections > 1 else ''}"


def _rps(output: str) -> float:
    """Mean requests/s of redis-benchmark's --csv lines ("SET","79365.08",...)."""
    rates = []
    for line in output.splitlines():
        fields = [field.strip('"') for field in line.split(",")]
        if len(fields) >= 2 and fields[0] in ("SET", "GET"):
            rates.append(float(fields[1]))
    if len(rates) != 2:
        raise RunFailed(f"no GET/SET rates in redis-benchmark's output: {output[-200:]!r}")
    return sum(rates) / len(rates)


def _benchmark(argv: list[str], timeout: float = 300) -> float:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RunFailed(f"exit {done.returncode}: {done.stderr.strip()[-200:]}")
    return _rps(done.stdout)


@contextlib.contextmanager
def _redis(ctx: Context) -> Iterator[tuple[int, int]]:
    """redis-server in the namespace: (target pid, port)."""
    namespace = ctx.namespace()
    port = free_port()
    server = subprocess.Popen(
        namespace.inside(["redis-server", "--bind", "127.0.0.1",
                          "--port", str(port), "--save", "", "--appendonly", "no",
                          "--protected-mode", "no"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            ping = subprocess.run(namespace.inside(["redis-cli", "-p", str(port), "ping"]),
                                  capture_output=True, text=True, check=False)
            if ping.stdout.strip() == "PONG":
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise Unavailable("redis-server did not start in the namespace")
            time.sleep(0.05)
        yield namespace.pid, port
    finally:
        stop_process(server)


def run(ctx: Context) -> list[Row]:
    settings = ctx.settings
    requests = 2000 if settings.quick else 50000
    runs = 1 if settings.quick else 3
    names = [_name(connections) for connections in CONNECTIONS]
    if which("redis-server") is None or which("redis-benchmark") is None:
        return [Row.missing(GROUP, name, variant, UNIT, "apt-get install redis-server")
                for name in names for variant in VARIANTS]
    rows: list[Row] = []
    try:
        with _redis(ctx) as (pid, port), contextlib.ExitStack() as stack:
            try:
                proxychains_config: str | None = stack.enter_context(
                    ctx.namespace().socks_proxy())
                socks_error = ""
            except (Unavailable, subprocess.CalledProcessError) as error:
                proxychains_config, socks_error = None, str(error)
            for connections in CONNECTIONS:
                name = _name(connections)

                def client(host: str, connections: int = connections) -> list[str]:
                    return ["redis-benchmark", "-h", host, "-p", str(port),
                            "-c", str(connections), "-n", str(requests), "-t", "get,set",
                            "--csv"]

                commands: dict[str, list[str] | str] = {
                    DIRECT: ctx.namespace().inside(client("127.0.0.1")),
                    MTRACE_TARGET: [*mtrace_argv(), "exec", "--target", f"pid/{pid}", "--",
                                    *client("127.0.0.1")],
                    PROXYCHAINS: (["proxychains4", "-q", "-f", proxychains_config,
                                   *client("127.0.0.1")]
                                  if proxychains_config else f"no SOCKS server: {socks_error}"),
                }
                for variant, command in commands.items():
                    ctx.log(f"kv: {name}, {variant}")
                    if isinstance(command, str):
                        rows.append(Row.missing(GROUP, name, variant, UNIT, command))
                        continue
                    try:
                        samples = [_benchmark(command) for _ in range(runs)]
                        rows.append(Row(GROUP, name, variant, median(samples), UNIT,
                                        samples=samples))
                    except (RunFailed, subprocess.TimeoutExpired) as error:
                        rows.append(Row.missing(GROUP, name, variant, UNIT,
                                                f"run failed: {error}"))
    except Unavailable as error:
        return [Row.missing(GROUP, name, variant, UNIT, str(error))
                for name in names for variant in VARIANTS]
    for row in rows:
        if row.variant != DIRECT and row.value is not None:
            compare(rows, row, DIRECT)
    return rows + _coverage(ctx)


FLAVOURS = ("probe-dynamic", "probe-glibc-static", "probe-musl", "probe-go")


def _coverage(ctx: Context) -> list[Row]:
    from bench.program import httpclient

    rows: list[Row] = []
    try:
        client = httpclient()  # builds every test program, the probes included
        programs = {path.name: path for path in client.parent.iterdir()}
        with _redis(ctx) as (pid, port), ctx.namespace().socks_proxy() as proxychains_config:
            for flavour in FLAVOURS:
                name = f"coverage: {flavour} tcp connect reaches the target"
                probe = programs.get(flavour)
                if probe is None:
                    rows += [Row.missing(GROUP, name, variant, "reached", "not built")
                             for variant in (MTRACE_TARGET, PROXYCHAINS)]
                    continue
                argv = [str(probe), "tcp", "127.0.0.1", str(port), "PING"]
                for variant, command in (
                        (MTRACE_TARGET, [*mtrace_argv(), "exec", "--target", f"pid/{pid}",
                                         "--", *argv]),
                        (PROXYCHAINS, ["proxychains4", "-q", "-f", proxychains_config, *argv])):
                    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                          check=False)
                    reached = "+PONG" in done.stdout
                    output = done.stderr.strip() or done.stdout.strip() or "no output"
                    note = "" if reached else f"no +PONG: {output[-80:]}"
                    rows.append(Row(GROUP, name, variant, 1.0 if reached else 0.0, "reached",
                                    samples=[1.0 if reached else 0.0], note=note))
    except (Unavailable, subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        rows.append(Row.missing(GROUP, "coverage", PROXYCHAINS, "reached", str(error)))
    return rows
