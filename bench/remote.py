"""Remote operations against the namespace target, and peak memory during a bulk transfer.

Three ways to do the same operation, measured in the same run:

* **direct in namespace**: ``bench/loop`` run with ``nsenter`` in the
  target's network and mount namespaces: the baseline;
* **agent client**: ``mtrace.agent.client`` talking to ``mtrace agent --stdio
  --target-pid N`` (``bench/agent_client.py``, its own process): the agent's
  share of the cost, measurable before ``mtrace exec --target`` exists;
* **agent client over TCP**: the same, to ``mtrace agent --listen``: bulk and
  ping through the encrypted channel (sealed frames, protocol 2);
* **mtrace exec --target pid/N**: ``bench/loop`` under mtrace, switched on as
  soon as ``mtrace exec --help`` shows ``--target``.

Bulk throughput is also measured through a ``socat`` relay into the namespace
(the same shape as mtrace's path: local socket, pipe, process in the
namespace). Latencies are medians over runs of each run's p50 (or p99), in µs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence

from bench.common import (
    REPO_ROOT,
    Context,
    PeakMemory,
    Row,
    RunFailed,
    Unavailable,
    compare,
    median,
    mtrace_argv,
    mtrace_has_option,
    run_json,
    tail,
)

GROUP = "remote"
HOST = "127.0.0.1"

DIRECT = "direct in namespace"
CLIENT = "agent client (Python API)"
CLIENT_TCP = "agent client over TCP (sealed)"
MTRACE = "mtrace exec --target pid/N"
SOCAT = "socat relay"
VARIANTS = (DIRECT, CLIENT, MTRACE)

OPEN_COLD = "file open+close, cold (first call)"
OPEN_CACHED = "file open+close, cached (p50)"
STAT = "stat (p50)"
STAT_COLD = "stat, cold (first call)"
CONNECT = "TCP connect+close (p50)"
#: Three calls trapped for the fds of target files' copies, on a local file's fd.
FD_META = "fchmod+fchown+fstatfs of a local fd (p50)"
HTTP_P50 = "small HTTP request p50"
HTTP_P99 = "small HTTP request p99"
PING = "agent round trip (ping, p50)"
BULK = "bulk stream throughput"
MEMORY_SUPERVISOR = "peak memory during bulk, supervisor side"
MEMORY_AGENT = "peak memory during bulk, agent"

US, MBPS, MIB = "µs", "MB/s", "MiB"


def _us(ns: float) -> float:
    return ns / 1000


def _loop_samples(argv: Sequence[str], runs: int) -> list[dict[str, float]]:
    return [run_json(argv, timeout=300) for _ in range(runs)]


def _latency_rows(variant: str, results: list[dict[str, float]], names: dict[str, str],
                  ) -> list[Row]:
    """Rows from loop outputs: names maps a loop op to the row name of its p50."""
    rows = []
    for op, name in names.items():
        chosen = [result for result in results if result["op"] == op]
        if not chosen:
            continue
        if op in ("open-each", "stat"):
            # The first call is the one that reaches the agent (later ones hit caches).
            firsts = [_us(result["first_ns"]) for result in chosen]
            cold = OPEN_COLD if op == "open-each" else STAT_COLD
            rows.append(Row(GROUP, cold, variant, median(firsts), US, samples=firsts))
        p50s = [_us(result["p50_ns"]) for result in chosen]
        rows.append(Row(GROUP, name, variant, median(p50s), US, samples=p50s))
        if op == "http":
            p99s = [_us(result["p99_ns"]) for result in chosen]
            rows.append(Row(GROUP, HTTP_P99, variant, median(p99s), US, samples=p99s))
    return rows


def _loop_ops(ctx: Context, wrap: Callable[[list[str]], list[str]], variant: str) -> list[Row]:
    """The latency workloads of bench/loop, run through ``wrap`` (nsenter, mtrace...).

    Each workload is guarded on its own: one failing (say, connect) leaves the
    others' rows measured and its own rows n/a with the reason.
    """
    settings = ctx.settings
    namespace = ctx.namespace()
    loop = str(ctx.programs()["loop"])
    calls, requests = str(settings.remote_calls), str(settings.http_requests)
    remote_file = str(namespace.remote_file)
    workloads = {
        "open-each": ([loop, "open-each", remote_file, calls], (OPEN_COLD, OPEN_CACHED)),
        "stat": ([loop, "stat", remote_file, calls], (STAT_COLD, STAT)),
        "fd-meta": ([loop, "fd-meta", "/tmp", calls], (FD_META,)),
        "connect": ([loop, "connect", HOST, str(namespace.http_port), calls], (CONNECT,)),
        "http": ([loop, "http", HOST, str(namespace.http_port), requests], (HTTP_P50, HTTP_P99)),
    }
    names = {op: row_names[-1] if op in ("open-each", "stat") else row_names[0]
             for op, (_, row_names) in workloads.items()}
    rows = []
    for op, (argv, row_names) in workloads.items():
        try:
            results = _loop_samples(wrap(argv), settings.runs)
        except Unavailable as error:
            rows += [Row.missing(GROUP, name, variant, US, str(error)) for name in row_names]
            continue
        rows += _latency_rows(variant, results, {op: names[op]})
    return rows


def _bulk_rate(result: dict[str, float]) -> float:
    """MB/s from the first byte to EOF: connection setup (a relay's process start) left out."""
    streaming_ns = result["total_ns"] - result.get("first_byte_ns", 0)
    return result["bytes"] / max(streaming_ns / 1e9, 1e-9) / 1e6


def _bulk_loop(ctx: Context, argv_for: Callable[[int], list[str]], port: int,
               runs: int) -> list[float]:
    return [_bulk_rate(run_json(argv_for(port), timeout=300)) for _ in range(runs)]


def _agent_client(ctx: Context) -> list[Row]:
    """What the agent client can do today: latencies, bulk, and the memory of both sides."""
    try:
        import mtrace.agent.client  # noqa: F401
    except ImportError as error:
        raise Unavailable(f"mtrace.agent.client not importable: {error}") from error
    settings = ctx.settings
    namespace = ctx.namespace()
    base = [sys.executable, "-m", "bench.agent_client"]
    ops = run_json([*base, "ops", "--pid", str(namespace.pid), "--file", str(namespace.remote_file),
                    "--http-port", str(namespace.http_port), "--calls", str(settings.remote_calls),
                    "--requests", str(settings.http_requests), "--runs", str(settings.runs)],
                   timeout=600)
    rows = [
        Row(GROUP, PING, CLIENT, median(ops["ping_p50_us"]), US, samples=ops["ping_p50_us"]),
        Row(GROUP, OPEN_COLD, CLIENT, ops["open_first_us"], US, samples=[ops["open_first_us"]],
            note="open+read+close, no shadow cache"),
        Row(GROUP, OPEN_CACHED, CLIENT, median(ops["open_p50_us"]), US,
            samples=ops["open_p50_us"], note="open+read+close, no shadow cache"),
        Row(GROUP, STAT, CLIENT, median(ops["stat_p50_us"]), US, samples=ops["stat_p50_us"]),
        Row(GROUP, CONNECT, CLIENT, median(ops["connect_p50_us"]), US,
            samples=ops["connect_p50_us"]),
        Row(GROUP, HTTP_P50, CLIENT, median(ops["http_p50_us"]), US, samples=ops["http_p50_us"]),
        Row(GROUP, HTTP_P99, CLIENT, median(ops["http_p99_us"]), US, samples=ops["http_p99_us"]),
    ]
    process = subprocess.Popen([*base, "bulk", "--pid", str(namespace.pid), "--bulk-port",
                                str(namespace.bulk_port), "--runs", str(settings.runs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT)
    memory = PeakMemory(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        memory.stop()
    if process.returncode != 0:
        raise RunFailed(f"bench.agent_client bulk: exit {process.returncode}: {tail(stderr)}")
    bulk = json.loads(stdout.strip().splitlines()[-1])
    rows.append(Row(GROUP, BULK, CLIENT, median(bulk["bulk_mbps"]), MBPS,
                    samples=bulk["bulk_mbps"]))
    rows += _memory_rows(memory, process.pid, CLIENT, "the client process (bench.agent_client)")
    return rows


def _agent_client_tcp(ctx: Context) -> list[Row]:
    """Bulk and ping through ``mtrace agent --listen``: the channel's sealing cost."""
    namespace = ctx.namespace()
    bulk = run_json([sys.executable, "-m", "bench.agent_client", "bulk", "--transport", "tcp",
                     "--pid", str(namespace.pid), "--bulk-port", str(namespace.bulk_port),
                     "--calls", str(ctx.settings.remote_calls), "--runs", str(ctx.settings.runs)],
                    timeout=600)
    note = f"channel: {bulk.get('channel', 'plain')}"
    return [
        Row(GROUP, BULK, CLIENT_TCP, median(bulk["bulk_mbps"]), MBPS, samples=bulk["bulk_mbps"],
            note=note),
        Row(GROUP, PING, CLIENT_TCP, median(bulk["ping_p50_us"]), US, samples=bulk["ping_p50_us"],
            note=note),
    ]


def _memory_rows(memory: PeakMemory, root_pid: int, variant: str, supervisor: str) -> list[Row]:
    def is_agent(pid: int, cmdline: str) -> bool:
        return pid != root_pid and "agent" in cmdline

    rows = []
    for name, value in ((MEMORY_SUPERVISOR, memory.peak_mib(lambda pid, _: pid == root_pid)),
                        (MEMORY_AGENT, memory.peak_mib(is_agent))):
        if value is None:
            rows.append(Row.missing(GROUP, name, variant, MIB, "process not seen"))
        else:
            note = f"VmHWM of {supervisor}" if name == MEMORY_SUPERVISOR else "VmHWM"
            rows.append(Row(GROUP, name, variant, value, MIB, note=note, samples=[value]))
    return rows


def _mtrace_bulk(ctx: Context) -> tuple[list[float], PeakMemory, int]:
    namespace = ctx.namespace()
    loop = str(ctx.programs()["loop"])
    argv = [*mtrace_argv(), "exec", "--target", f"pid/{namespace.pid}", "--",
            loop, "bulk", HOST, str(namespace.bulk_port)]
    rates = []
    memory = None
    root = 0
    for _ in range(ctx.settings.runs):
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True)
        run_memory = PeakMemory(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=600)
        finally:
            run_memory.stop()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise RunFailed(f"exit {process.returncode}: {tail(stderr)}")
        rates.append(_bulk_rate(json.loads(lines[-1])))
        memory, root = run_memory, process.pid
    assert memory is not None
    return rates, memory, root


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    try:
        namespace = ctx.namespace()
        loop = str(ctx.programs()["loop"])
    except Unavailable as error:
        names = (OPEN_COLD, OPEN_CACHED, STAT, CONNECT, HTTP_P50, HTTP_P99, BULK)
        return [Row.missing(GROUP, name, variant, MBPS if name == BULK else US, str(error))
                for name in names for variant in VARIANTS]
    runs = ctx.settings.runs

    def direct_bulk(port: int) -> list[str]:
        return namespace.inside([loop, "bulk", HOST, str(port)])

    def direct_rows() -> list[Row]:
        found = _loop_ops(ctx, namespace.inside, DIRECT)
        rates = _bulk_loop(ctx, direct_bulk, namespace.bulk_port, runs)
        found.append(Row(GROUP, BULK, DIRECT, median(rates), MBPS, samples=rates))
        return found

    ctx.log("remote: direct in namespace")
    rows += _guard(direct_rows, DIRECT)

    ctx.log("remote: socat relay")

    def relayed(port: int) -> list[str]:
        return [loop, "bulk", HOST, str(port)]

    def socat_rows() -> list[Row]:
        with namespace.socat_relay() as port:
            rates = _bulk_loop(ctx, relayed, port, runs)
        if not all(rates):
            raise RunFailed("the socat relay transferred nothing")
        return [Row(GROUP, BULK, SOCAT, median(rates), MBPS, samples=rates,
                    note="socat TCP-LISTEN, EXEC: ip netns exec socat STDIO TCP")]

    rows += _guard(socat_rows, SOCAT, names=(BULK,))

    ctx.log("remote: agent client")
    rows += _guard(lambda: _agent_client(ctx), CLIENT)
    ctx.log("remote: agent client over TCP")
    rows += _guard(lambda: _agent_client_tcp(ctx), CLIENT_TCP, names=(BULK, PING))

    ctx.log("remote: mtrace exec --target")
    if not mtrace_has_option("--target"):
        reason = "needs --target: `mtrace exec --help` shows no --target yet"
        rows += [Row.missing(GROUP, name, MTRACE, unit, reason) for name, unit in _ALL_NAMES]
    else:
        def target_wrap(argv: list[str]) -> list[str]:
            return [*mtrace_argv(), "exec", "--target", f"pid/{namespace.pid}", "--", *argv]

        def mtrace_bulk_rows() -> list[Row]:
            rates, memory, root = _mtrace_bulk(ctx)
            found = [Row(GROUP, BULK, MTRACE, median(rates), MBPS, samples=rates)]
            return found + _memory_rows(memory, root, MTRACE, "the mtrace process")

        rows += _guard(lambda: _loop_ops(ctx, target_wrap, MTRACE), MTRACE,
                       names=(OPEN_COLD, OPEN_CACHED, STAT_COLD, STAT, FD_META, CONNECT,
                              HTTP_P50, HTTP_P99))
        rows += _guard(mtrace_bulk_rows, MTRACE, names=(BULK, MEMORY_SUPERVISOR, MEMORY_AGENT))
    ctx.log("remote: proxychains4 + microsocks")
    rows += proxychains_rows(ctx)
    _set_ratios(rows)
    return rows


_ALL_NAMES = ((OPEN_COLD, US), (OPEN_CACHED, US), (STAT_COLD, US), (STAT, US), (FD_META, US),
              (CONNECT, US),
              (HTTP_P50, US), (HTTP_P99, US), (BULK, MBPS), (MEMORY_SUPERVISOR, MIB), (MEMORY_AGENT, MIB))


def _guard(measure: Callable[[], list[Row]], variant: str,
           names: Sequence[str] | None = None) -> list[Row]:
    """Run one variant's measurements; a failure becomes n/a rows that carry the reason."""
    try:
        return measure()
    except Unavailable as error:
        wanted = [(name, unit) for name, unit in _ALL_NAMES if names is None or name in names]
        if variant == DIRECT:
            wanted = [(name, unit) for name, unit in wanted if "memory" not in name]
        return [Row.missing(GROUP, name, variant, unit, str(error)) for name, unit in wanted]


def _set_ratios(rows: list[Row]) -> None:
    for row in rows:
        if row.variant in (DIRECT,) or "memory" in row.name or row.name == PING:
            continue
        if row.name == BULK:
            if row.variant != SOCAT:
                compare(rows, row, SOCAT)
        else:
            compare(rows, row, DIRECT)


# --- the peer: proxychains4 + microsocks ----------------------------------------------------
# What users run today to send a program's outgoing traffic from another
# network: proxychains4 hooks libc's ``connect`` (LD_PRELOAD) on this machine and
# hands each connection to a SOCKS server in the target, here ``microsocks`` in the
# namespace target behind a veth pair (NamespaceTarget.socks_proxy, shared with
# the kv group). An LD_PRELOAD tool only sees dynamically linked programs, so the
# workloads are ``bench/loop`` built without ``-static`` (``loop-dynamic``): the same
# source, requests, target and run as the other variants, whose ratios these rows share.

PROXYCHAINS = "proxychains4 + microsocks"
NAMES = ((CONNECT, US), (HTTP_P50, US), (HTTP_P99, US),
         (BULK, MBPS))


def proxychains_rows(ctx: Context) -> list[Row]:
    """The peer's rows of the remote group; n/a rows with the reason if it cannot run."""
    try:
        namespace = ctx.namespace()
        loop = str(ctx.programs()["loop-dynamic"])
        with namespace.socks_proxy() as config:
            prefix = ["proxychains4", "-q", "-f", config]
            settings = ctx.settings
            rows: list[Row] = []
            for op, count, names in (
                    ("connect", settings.remote_calls, {"connect": CONNECT}),
                    ("http", settings.http_requests, {"http": HTTP_P50})):
                argv = [*prefix, loop, op, HOST, str(namespace.http_port), str(count)]
                results = [run_json(argv, timeout=300) for _ in range(settings.runs)]
                rows += _latency_rows(PROXYCHAINS, results, names)
            rates = [_bulk_rate(run_json([*prefix, loop, "bulk", HOST,
                                                 str(namespace.bulk_port)], timeout=300))
                     for _ in range(settings.runs)]
            rows.append(Row(GROUP, BULK, PROXYCHAINS, median(rates), MBPS,
                            samples=rates))
    except Unavailable as error:
        return [Row.missing(GROUP, name, PROXYCHAINS, unit, str(error))
                for name, unit in NAMES]
    note = "dynamic bench/loop; every connection through microsocks in the target"
    for row in rows:
        row.note = note
    return rows
