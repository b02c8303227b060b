"""How cost grows: curves over file size, directory size, parallel streams and threads.

Each curve runs ``bench/grow`` (static C, pthreads; it times itself, so process
start-up never counts) at growing points, against the namespace target, and
compares every point with the same workload run directly in the target's
namespaces (``nsenter``) in the same run:

* **file read** (4 KiB .. 256 MiB by powers of 4, 1 GiB with ``--full``): one process opens
  and reads a file of the target twice; *cold* is the first read (through the
  agent: the shadow copy is fetched), *cached* the second (the copy);
* **directory listing** (10 .. 10,000 entries, 100,000 with ``--full``; one run
  from 10,000 on): open + getdents64 to the end,
  twice (first and second listing);
* both file curves also run with ``TMPDIR=/dev/shm``: mtrace's session
  directory (the shadow tree: copies and one placeholder per listed entry) on
  a tmpfs instead of the default temporary directory's disk;
* **parallel TCP streams** (1 .. 256): N connections to a server in the target,
  each reading 1/N of a fixed total, aggregate MB/s; and N connections each
  making small HTTP requests, p50/p99 of every request. Three ways: direct,
  ``mtrace exec --target pid/N`` (the direct path: sockets made in the target)
  and the same with ``direct = false`` (every byte through the agent's relay,
  what agents reached over TCP or Kubernetes get);
* **UDP request/response** on a connected socket (one point, the same three
  ways): the direct path for connected UDP against the relay it replaced;
* **threads making trapped calls** (1 .. 64): N threads each doing openat+close
  of a local file, trapped and continued; calls/s of plain, mtrace and the C
  reference supervisor.

Each row's note carries the point's ratio to the curve's first point
("vs first point"), which is where a bend shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    PeakMemory,
    Row,
    RunFailed,
    Unavailable,
    compare,
    median,
    mtrace_argv,
    run_json,
    tail,
)
from bench.namespace import read_line, stop_process

GROUP = "growth"
HOST = "127.0.0.1"

DIRECT = "direct in namespace"
MTRACE = "mtrace exec --target pid/N"
RELAY = "mtrace exec --target pid/N, direct = false (relay)"
MTRACE_TMPFS = "mtrace exec --target pid/N, TMPDIR on tmpfs"
PLAIN = "plain"
MTRACE_LOCAL = "mtrace exec"
REFSUP = "C reference supervisor"

US, MBPS, CALLS = "µs", "MB/s", "calls/s"
KIB, MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Points:
    """The points of each curve for this run's size (--quick, default, --full)."""

    file_sizes: tuple[int, ...]
    dir_entries: tuple[int, ...]
    streams: tuple[int, ...]
    stream_total_bytes: int
    requests_total: int
    threads: tuple[int, ...]
    calls_total: int

    @classmethod
    def for_settings(cls, quick: bool, full: bool) -> Points:
        if quick:
            # Few points: every mtrace start-up costs seconds on a loaded machine.
            return cls((4 * KIB, MIB), (100,), (2,), 4 * MIB, 200, (1, 4), 2000)
        sizes = tuple(4 * KIB * 4 ** power for power in range(9))  # 4 KiB .. 256 MiB
        # 100,000 entries only with --full: each listed entry is a placeholder file
        # created in the session directory, milliseconds each on a busy disk.
        return cls(sizes + ((1 << 30,) if full else ()),
                   (10, 100, 1000, 10_000) + ((100_000,) if full else ()),
                   (1, 4, 16, 64, 256), 128 * MIB, 5000, (1, 2, 4, 8, 16, 32, 64), 40_000)


def size_label(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", KIB)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _points_note(kind: str, labels: Sequence[str], full_adds: str = "") -> str:
    return f"{kind} run: {', '.join(labels)}{full_adds}"


# --- running ------------------------------------------------------------------------


def _with_memory(argv: list[str], timeout: float) -> tuple[dict[str, Any], PeakMemory, int]:
    """run_json, with the peak memory of the process tree sampled meanwhile."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    memory = PeakMemory(process.pid, interval=0.05)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        process.kill()
        process.communicate()
        raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(argv[:6])}") from error
    finally:
        memory.stop()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RunFailed(f"exit {process.returncode}: {tail(stderr or stdout)}")
    return json.loads(lines[-1]), memory, process.pid


def _memory_note(memory: PeakMemory, root: int) -> str:
    supervisor = memory.peak_mib(lambda pid, _: pid == root)
    agent = memory.peak_mib(lambda pid, name: pid != root and "agent" in name)
    parts = [f"{label} {value:.0f} MiB" for label, value in
             (("supervisor", supervisor), ("agent", agent)) if value is not None]
    return f"peak RSS {', '.join(parts)}" if parts else ""


@contextlib.contextmanager
def _server(ctx: Context, grow: Path) -> Iterator[tuple[int, int, int]]:
    """``grow serve`` in the target's namespaces: (http port, bulk port, udp port)."""
    namespace = ctx.namespace()
    server = subprocess.Popen(namespace.inside([str(grow), "serve"]), stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        ports = dict(item.split("=") for item in read_line(server, 10).split())
        yield int(ports["http"]), int(ports["bulk"]), int(ports["udp"])
    finally:
        stop_process(server)


def _make_remote(ctx: Context, script: str, *args: str) -> None:
    """Run a Python snippet in the target's mount namespace (files only it sees)."""
    argv = ctx.namespace().inside([sys.executable, "-c", script, *args])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise Unavailable(f"making the target's files failed: {tail(done.stderr)}")


_MAKE_FILE = """
import sys
path, size = sys.argv[1], int(sys.argv[2])
block = bytes(range(256)) * 4096
with open(path, "wb") as out:
    while size > 0:
        size -= out.write(block[:min(size, len(block))])
"""

_MAKE_DIR = """
import os, sys
path, entries = sys.argv[1], int(sys.argv[2])
os.makedirs(path, exist_ok=True)
for index in range(entries):
    os.close(os.open(f"{path}/entry-{index:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
"""


def _guarded(rows: list[Row], names_variants: Sequence[tuple[str, str, str]],
             measure: Callable[[], list[Row]]) -> None:
    """Append measure()'s rows, or n/a rows (name, variant, unit) with the reason."""
    try:
        rows += measure()
    except Unavailable as error:
        rows += [Row.missing(GROUP, name, variant, unit, str(error))
                 for name, variant, unit in names_variants]


# --- the curves ------------------------------------------------------------------


TMPFS = Path("/dev/shm")


def _file_variants() -> tuple[str, ...]:
    """Direct, mtrace, and mtrace with its session directory (the shadow tree) on a
    tmpfs: where the copies and placeholders live is a large part of the cost."""
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
        return (DIRECT, MTRACE, MTRACE_TMPFS)
    return (DIRECT, MTRACE)


def _mtrace_file_argv(variant: str, target: str, argv: list[str]) -> list[str]:
    command = [*mtrace_argv(), "exec", "--target", target, "--", *argv]
    if variant == MTRACE_TMPFS:
        return ["env", f"TMPDIR={TMPFS}", *command]
    return command


def _read_name(size: int, which: str) -> str:
    return f"file read {size_label(size)}, {which}"


def _file_read(ctx: Context, grow: Path, points: Points) -> list[Row]:
    namespace = ctx.namespace()
    directory = namespace.remote_file.parent
    target = f"pid/{namespace.pid}"
    rows: list[Row] = []
    variants = _file_variants()
    for size in points.file_sizes:
        path = directory / f"growth-{size}.bin"
        ctx.log(f"growth: file read {size_label(size)}")
        names = [(_read_name(size, which), variant, MBPS) for which in ("cold", "cached")
                 for variant in variants]

        def measure(size: int = size, path: Path = path) -> list[Row]:
            _make_remote(ctx, _MAKE_FILE, str(path), str(size))
            argv = [str(grow), "read", str(path), "2"]
            samples: dict[tuple[str, str], list[float]] = {}
            notes: dict[str, str] = {}
            try:
                for _ in range(ctx.settings.runs):
                    for variant in variants:
                        if variant == DIRECT:
                            result: dict[str, Any] = run_json(namespace.inside(argv),
                                                                 timeout=600)
                        else:
                            result, memory, root = _with_memory(
                                _mtrace_file_argv(variant, target, argv), timeout=900)
                            notes[variant] = _memory_note(memory, root)
                        if result["bytes"] != size:
                            raise RunFailed(f"read {result['bytes']} bytes of {size}")
                        for which, ns in zip(("cold", "cached"), result["ns"], strict=True):
                            samples.setdefault((which, variant), []).append(size / ns * 1e3)
            finally:
                subprocess.run(namespace.inside(["rm", "-f", str(path)]), check=False,
                               capture_output=True)
            found = []
            for (which, variant), rates in samples.items():
                micros = size / median(rates)
                note = f"{micros:,.0f} µs per read"
                if which == "cold" and notes.get(variant):
                    note += f"; {notes[variant]}"
                found.append(Row(GROUP, _read_name(size, which), variant, median(rates), MBPS,
                                 samples=rates, note=note, extra={"bytes": size}))
            return found

        _guarded(rows, names, measure)
    return rows


def _list_name(entries: int, which: str) -> str:
    return f"directory listing, {entries:,} entries, {which}"


def _dir_list(ctx: Context, grow: Path, points: Points) -> list[Row]:
    namespace = ctx.namespace()
    directory = namespace.remote_file.parent
    target = f"pid/{namespace.pid}"
    rows: list[Row] = []
    variants = _file_variants()
    for entries in points.dir_entries:
        path = directory / f"growth-dir-{entries}"
        ctx.log(f"growth: directory listing, {entries} entries")
        names = [(_list_name(entries, which), variant, US) for which in ("first", "second")
                 for variant in variants]

        def measure(entries: int = entries, path: Path = path) -> list[Row]:
            _make_remote(ctx, _MAKE_DIR, str(path), str(entries))
            argv = [str(grow), "list", str(path), "2"]
            commands = {variant: namespace.inside(argv) if variant == DIRECT
                        else _mtrace_file_argv(variant, target, argv) for variant in variants}
            samples: dict[tuple[str, str], list[float]] = {}
            try:
                for _ in range(ctx.settings.runs if entries < 10_000 else 1):
                    for variant, command in commands.items():
                        result = run_json(command, timeout=600)
                        if result["entries"] != entries:
                            raise RunFailed(f"listed {result['entries']} entries of {entries}")
                        for which, ns in zip(("first", "second"), result["ns"], strict=True):
                            samples.setdefault((which, variant), []).append(ns / 1000)
            finally:
                subprocess.run(namespace.inside(["rm", "-rf", str(path)]), check=False,
                               capture_output=True)
            return [Row(GROUP, _list_name(entries, which), variant, median(values), US,
                        samples=values, extra={"entries": entries})
                    for (which, variant), values in samples.items()]

        _guarded(rows, names, measure)
    return rows


def _streams_name(streams: int) -> str:
    return f"{streams} parallel TCP streams, aggregate"


def _requests_name(connections: int, which: str) -> str:
    return f"{connections} connections, small HTTP request {which}"


def _network(ctx: Context, grow: Path, points: Points) -> list[Row]:
    namespace = ctx.namespace()
    relay_config = ctx.work_dir / "growth-relay.toml"
    relay_config.write_text("[feature.network.outgoing]\ndirect = false\n", encoding="utf-8")
    target = f"pid/{namespace.pid}"
    wraps: dict[str, Callable[[list[str]], list[str]]] = {
        DIRECT: namespace.inside,
        MTRACE: lambda argv: [*mtrace_argv(), "exec", "--target", target, "--", *argv],
        RELAY: lambda argv: [*mtrace_argv(), "exec", "-f", str(relay_config),
                             "--target", target, "--", *argv],
    }
    rows: list[Row] = []
    with _server(ctx, grow) as (http_port, bulk_port, udp_port):
        rows += _udp(ctx, grow, wraps, udp_port, points.requests_total)
        for streams in points.streams:
            name = _streams_name(streams)
            per_stream = max(64 * KIB, points.stream_total_bytes // streams)
            ctx.log(f"growth: {name}")
            rates: dict[str, list[float]] = {variant: [] for variant in wraps}
            failed: dict[str, str] = {}
            memory_notes: dict[str, str] = {}
            for _ in range(ctx.settings.runs):
                for variant, wrap in wraps.items():
                    if variant in failed:
                        continue
                    argv = [str(grow), "streams", HOST, str(bulk_port), str(streams),
                            str(per_stream)]
                    try:
                        if variant == DIRECT:
                            result: dict[str, Any] = run_json(wrap(argv), timeout=600)
                        else:
                            result, memory, root = _with_memory(wrap(argv), timeout=600)
                            memory_notes[variant] = _memory_note(memory, root)
                        rates[variant].append(result["bytes"] / result["total_ns"] * 1e3)
                    except Unavailable as error:
                        failed[variant] = str(error)
            per_note = f"{size_label(per_stream)} per stream"
            for row in _rows(name, MBPS, rates, failed, per_note):
                if memory_notes.get(row.variant) and row.value is not None:
                    row.note += f"; {memory_notes[row.variant]}"
                rows.append(row)

            requests = max(5, points.requests_total // streams)
            ctx.log(f"growth: {streams} connections, small HTTP requests")
            p50: dict[str, list[float]] = {variant: [] for variant in wraps}
            p99: dict[str, list[float]] = {variant: [] for variant in wraps}
            failed = {}
            for _ in range(ctx.settings.runs):
                for variant, wrap in wraps.items():
                    if variant in failed:
                        continue
                    argv = [str(grow), "requests", HOST, str(http_port), str(streams),
                            str(requests)]
                    try:
                        result = run_json(wrap(argv), timeout=600)
                        p50[variant].append(result["p50_ns"] / 1000)
                        p99[variant].append(result["p99_ns"] / 1000)
                    except Unavailable as error:
                        failed[variant] = str(error)
            note = f"{requests} requests per connection"
            rows += _rows(_requests_name(streams, "p50"), US, p50, failed, note)
            rows += _rows(_requests_name(streams, "p99"), US, p99, failed, note)
    return rows


UDP_P50 = "UDP request/response on a connected socket, p50"
UDP_P99 = "UDP request/response on a connected socket, p99"


def _udp(ctx: Context, grow: Path, wraps: dict[str, Callable[[list[str]], list[str]]],
         port: int, requests: int) -> list[Row]:
    """One point, not a curve: connected UDP, the direct path against the relay."""
    ctx.log("growth: UDP request/response")
    p50: dict[str, list[float]] = {variant: [] for variant in wraps}
    p99: dict[str, list[float]] = {variant: [] for variant in wraps}
    failed: dict[str, str] = {}
    for _ in range(ctx.settings.runs):
        for variant, wrap in wraps.items():
            if variant in failed:
                continue
            try:
                result = run_json(wrap([str(grow), "udp", HOST, str(port), str(requests)]),
                                  timeout=600)
                p50[variant].append(result["p50_ns"] / 1000)
                p99[variant].append(result["p99_ns"] / 1000)
            except Unavailable as error:
                failed[variant] = str(error)
    note = f"{requests} requests"
    return (_rows(UDP_P50, US, p50, failed, note) + _rows(UDP_P99, US, p99, failed, note))


def _rows(name: str, unit: str, samples: dict[str, list[float]], failed: dict[str, str],
          note: str) -> list[Row]:
    rows = []
    for variant, values in samples.items():
        if variant in failed or not values:
            rows.append(Row.missing(GROUP, name, variant, unit,
                                    f"run failed: {failed.get(variant, 'no samples')}"))
        else:
            rows.append(Row(GROUP, name, variant, median(values), unit, samples=values,
                            note=note))
    return rows


def _threads_name(threads: int) -> str:
    return f"{threads} threads, trapped openat+close"


def _threads(ctx: Context, grow: Path, points: Points) -> list[Row]:
    local_file = ctx.work_dir / "growth-local.txt"
    local_file.write_text("local\n")
    wraps: dict[str, list[str]] = {PLAIN: [], MTRACE_LOCAL: [*mtrace_argv(), "exec", "--"]}
    try:
        wraps[REFSUP] = [str(ctx.programs()["refsup"])]
    except Unavailable:
        pass
    rows: list[Row] = []
    for threads in points.threads:
        name = _threads_name(threads)
        ctx.log(f"growth: {name}")
        per_thread = max(10, points.calls_total // threads)
        rates: dict[str, list[float]] = {variant: [] for variant in wraps}
        failed: dict[str, str] = {}
        for _ in range(ctx.settings.runs):
            for variant, prefix in wraps.items():
                if variant in failed:
                    continue
                argv = [*prefix, str(grow), "calls", str(local_file), str(threads),
                        str(per_thread)]
                try:
                    result = run_json(argv, timeout=600)
                    rates[variant].append(result["calls"] / result["total_ns"] * 1e9)
                except Unavailable as error:
                    failed[variant] = str(error)
        rows += _rows(name, CALLS, rates, failed, f"{per_thread} calls per thread")
    return rows


# --- the group ----------------------------------------------------------------------


def _set_ratios(rows: list[Row]) -> None:
    """Each point against its baseline; each row's note gets its ratio to the first point."""
    for row in rows:
        if row.variant == MTRACE_LOCAL:
            compare(rows, row, REFSUP)
        elif row.variant == REFSUP:
            compare(rows, row, PLAIN)
        elif row.variant not in (DIRECT, PLAIN):
            compare(rows, row, DIRECT)
    first: dict[tuple[str, str, str], Row] = {}
    for row in rows:
        curve = (_curve_of(row.name), row.variant, row.unit)
        if row.value is None:
            continue
        if curve not in first:
            first[curve] = row
            continue
        start = first[curve]
        if start.value:
            scaled = row.value / start.value
            row.note = f"{scaled:.2f}x the first point" + (f"; {row.note}" if row.note else "")


def _curve_of(name: str) -> str:
    """The curve a row belongs to: its name without the point ("file read 4 KiB, cold" ->
    "file read, cold")."""
    if name.startswith("file read "):
        return "file read, " + name.rsplit(", ", 1)[1]
    if name.startswith("directory listing"):
        return "directory listing, " + name.rsplit(", ", 1)[1]
    if name.endswith("aggregate"):
        return "streams"
    if name.startswith("UDP request"):
        return name
    if "connections, small HTTP request" in name:
        return "requests " + name.rsplit(" ", 1)[1]
    return "threads"


def run(ctx: Context) -> list[Row]:
    points = Points.for_settings(ctx.settings.quick, ctx.settings.full)
    try:
        ctx.namespace()
        grow = ctx.programs()["grow"]
    except Unavailable as error:
        return [Row.missing(GROUP, "growth curves", DIRECT, MBPS, str(error))]
    rows: list[Row] = []
    full_adds = "" if ctx.settings.quick or ctx.settings.full else " (1 GiB with --full)"
    first = len(rows)
    rows += _file_read(ctx, grow, points)
    _mark_points(rows, first, _points_note(
        "sizes", [size_label(size) for size in points.file_sizes], full_adds))
    first = len(rows)
    rows += _dir_list(ctx, grow, points)
    _mark_points(rows, first, _points_note("entries", [f"{n:,}" for n in points.dir_entries],
                                           full_adds and " (100,000 with --full)"))
    first = len(rows)
    try:
        rows += _network(ctx, grow, points)
    except Unavailable as error:
        rows += [Row.missing(GROUP, _streams_name(n), variant, MBPS, str(error))
                 for n in points.streams for variant in (DIRECT, MTRACE, RELAY)]
    _mark_points(rows, first, _points_note("streams", [str(n) for n in points.streams]))
    first = len(rows)
    rows += _threads(ctx, grow, points)
    _mark_points(rows, first, _points_note("threads", [str(n) for n in points.threads]))
    _set_ratios(rows)
    return rows


def _mark_points(rows: list[Row], first: int, note: str) -> None:
    """The first row of a curve says which points ran."""
    if first < len(rows):
        row = rows[first]
        if row.value is not None:
            row.note = f"{note}; {row.note}" if row.note else note


# --- the chart ------------------------------------------------------------------------


def draw_chart(path: Path, rows: Sequence[Row]) -> str | None:
    """The curves as a PNG (log-log, one panel per curve); None when matplotlib is
    missing or the group did not run."""
    curves = [
        ("file read, cold", MBPS, lambda row: row.extra.get("bytes"),
         lambda row: row.name.endswith(", cold"), "file size (bytes)"),
        ("file read, cached", MBPS, lambda row: row.extra.get("bytes"),
         lambda row: row.name.endswith(", cached"), "file size (bytes)"),
        ("directory listing, first", US, lambda row: row.extra.get("entries"),
         lambda row: row.name.endswith(", first"), "entries"),
        ("parallel TCP streams, aggregate", MBPS, lambda row: int(row.name.split()[0]),
         lambda row: row.name.endswith("aggregate"), "streams"),
        ("small HTTP request p50", US, lambda row: int(row.name.split()[0]),
         lambda row: row.name.endswith("request p50"), "connections"),
        ("threads, trapped openat+close", CALLS, lambda row: int(row.name.split()[0]),
         lambda row: "threads, trapped" in row.name, "threads"),
    ]
    ours = [row for row in rows if row.group == GROUP and row.value]
    if not ours:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(2, 3, figsize=(16, 9))
    for axis, (title, unit, point_of, chosen, x_label) in zip(
            [axis for line in axes for axis in line], curves, strict=True):
        variants: dict[str, list[tuple[float, float]]] = {}
        for row in ours:
            if chosen(row) and row.value is not None:
                variants.setdefault(row.variant, []).append((float(point_of(row)), row.value))
        for variant, points in variants.items():
            points.sort()
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o",
                      label=variant)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(x_label, fontsize=8)
        axis.set_ylabel(unit, fontsize=8)
        if variants:
            axis.legend(fontsize=6)
    figure.suptitle("mtrace: how cost grows (python -m bench --only growth)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name
