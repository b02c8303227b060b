"""Turning rows into results: the targets (pass/miss), the markdown table, JSON and the chart."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import program, remote, startup, syscalls
from bench.common import REPO_ROOT, Row, Settings, find_row

# --- targets ---------------------------------------------------------------------


@dataclass
class Target:
    name: str
    limit: str
    measured: str
    passed: bool | None  # None: not measured (n/a)
    note: str = ""


def _target(rows: Sequence[Row], name: str, limit: str, where: tuple[str, str, str],
            field: str, check: Callable[[float], bool], shown: Callable[[float], str],
            fallback: tuple[str, str, str] | None = None) -> Target:
    row = find_row(rows, *where)
    value = getattr(row, field) if row is not None else None
    if value is None:
        note = row.note if row is not None and row.note else "not measured"
        if fallback is not None:
            other = find_row(rows, *fallback)
            other_value = getattr(other, field) if other is not None else None
            if other_value is not None:
                note += f"; {fallback[2]}: {shown(other_value)}"
        return Target(name, limit, "n/a", None, note)
    return Target(name, limit, shown(value), check(value))


def evaluate_targets(rows: Sequence[Row]) -> list[Target]:
    targets = []
    for pinning in (syscalls.UNPINNED, syscalls.PINNED):
        trapped = syscalls.row_name(syscalls.TRAPPED, pinning)
        untrapped = syscalls.row_name(syscalls.UNTRAPPED, pinning)
        targets.append(_target(
            rows, f"trapped passthrough vs C reference supervisor, {pinning}",
            "≤ 2x its added cost", (syscalls.GROUP, trapped, syscalls.MTRACE), "ratio",
            lambda ratio: ratio <= 2.0, lambda ratio: f"{ratio:.2f}x"))
        mtrace_row = find_row(rows, syscalls.GROUP, trapped, syscalls.MTRACE)
        strace_row = find_row(rows, syscalls.GROUP, trapped, syscalls.STRACE_BPF)
        name = f"trapped passthrough vs strace --seccomp-bpf, {pinning}"
        if mtrace_row and strace_row and mtrace_row.value and strace_row.value:
            targets.append(Target(
                name, "cheaper", f"{mtrace_row.value / 1000:.1f} vs {strace_row.value / 1000:.1f} µs",
                mtrace_row.value < strace_row.value))
        else:
            missing = mtrace_row if not (mtrace_row and mtrace_row.value) else strace_row
            targets.append(Target(name, "cheaper", "n/a", None,
                                  missing.note if missing else "not measured"))
        targets.append(_target(
            rows, f"untrapped syscall vs plain, {pinning}", "≤ 1.15x",
            (syscalls.GROUP, untrapped, syscalls.MTRACE), "ratio",
            lambda ratio: ratio <= 1.15, lambda ratio: f"{ratio:.3f}x"))
    targets.append(_target(
        rows, "startup overhead without a target", "≤ 150 ms over plain",
        (startup.GROUP, startup.NAME, startup.MTRACE), "delta",
        lambda delta: delta <= 150, lambda delta: f"+{delta:.0f} ms"))
    targets.append(_target(
        rows, "startup overhead with --target pid/N, through the resident", "≤ 150 ms over plain",
        (startup.GROUP, startup.NAME, startup.MTRACE_TARGET_RESIDENT), "delta",
        lambda delta: delta <= 150, lambda delta: f"+{delta:.0f} ms",
        fallback=(startup.GROUP, startup.NAME, startup.MTRACE_TARGET)))
    targets.append(_go_client_target(rows))
    targets.append(_target(
        rows, "small HTTP request p50 vs direct", "≤ 200 µs over direct",
        (remote.GROUP, remote.HTTP_P50, remote.MTRACE), "delta",
        lambda delta: delta <= 200, lambda delta: f"+{delta:.0f} µs",
        fallback=(remote.GROUP, remote.HTTP_P50, remote.CLIENT)))
    targets.append(_target(
        rows, "bulk throughput vs socat", "≥ 0.5x", (remote.GROUP, remote.BULK, remote.MTRACE),
        "ratio", lambda ratio: ratio >= 0.5, lambda ratio: f"{ratio:.2f}x",
        fallback=(remote.GROUP, remote.BULK, remote.CLIENT)))
    targets.append(_cold_open_target(rows))
    return targets


def _go_client_target(rows: Sequence[Row]) -> Target:
    """The Go client's longest run against the target, through the resident,
    against the same requests made directly inside the target's namespaces."""
    name, limit = "Go client against the target, through the resident, vs direct", "≤ 3x"
    runs = [row for row in rows if row.group == program.GROUP
            and row.variant == program.MTRACE_TARGET_RESIDENT and "1 request," not in row.name]
    if not runs:
        return Target(name, limit, "n/a", None, "not measured")
    row = runs[0]
    if row.ratio is None:
        return Target(name, limit, "n/a", None, row.note or "not measured")
    return Target(name, limit, f"{row.ratio:.2f}x", row.ratio <= 3.0,
                  row.name.removeprefix("Go httpclient, "))


def _cold_open_target(rows: Sequence[Row]) -> Target:
    """A remote file's first open against the first stat of it (each the call
    that reaches the agent), both under ``mtrace exec --target`` in one run."""
    name, limit = "first open of a remote file vs its first stat", "≤ 3x"
    opened = find_row(rows, remote.GROUP, remote.OPEN_COLD, remote.MTRACE)
    statted = find_row(rows, remote.GROUP, remote.STAT_COLD, remote.MTRACE)
    if opened is None or statted is None or not opened.value or not statted.value:
        return Target(name, limit, "n/a", None, "not measured")
    ratio = opened.value / statted.value
    return Target(name, limit, f"{ratio:.2f}x ({opened.value:,.0f} vs {statted.value:,.0f} µs)",
                  ratio <= 3.0)


# --- machine ------------------------------------------------------------------------


def _first_line(argv: Sequence[str], line: int = 0) -> str | None:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=20,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[line].strip() if len(lines) > line else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        # Other work on the machine skews everything: keep the load next to the numbers.
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "commit": _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "tools": {
            "strace": _first_line(["strace", "-V"]),
            "socat": _first_line(["socat", "-V"], 1),
            "gcc": _first_line(["gcc", "--version"]),
        },
    }


# --- output -------------------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}"


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "/")


def _ratio_text(row: Row) -> str:
    if row.ratio is None:
        return ""
    return f"{row.ratio:.2f}x" + (" (added cost)" if row.ratio_of == "overhead" else "")


def _delta_text(row: Row) -> str:
    if row.delta is None:
        return ""
    return ("+" if row.delta >= 0 else "-") + format_value(abs(row.delta), row.unit)


def markdown(rows: Sequence[Row], targets: Sequence[Target], info: dict[str, Any],
             settings: Settings) -> str:
    lines = [
        f"Benchmarks of {info['date']} on Linux {info['machine']['kernel']}, "
        f"{info['machine']['nproc']} CPUs, {info['machine']['cpu']}, "
        f"1-min load average {info['machine'].get('load_average_at_start', ['?'])[0]} at start, "
        f"{info['machine']['load_average'][0]} at end"
        f" (commit {info['machine']['commit']}{', --quick: numbers are noise' if settings.quick else ''})",
        "",
    ]
    groups: list[str] = []
    for row in rows:
        if row.group not in groups:
            groups.append(row.group)
    for group in groups:
        lines += [f"### {group}", "",
                  "| benchmark | variant | median | vs | ratio | difference | note |",
                  "| --- | --- | ---: | --- | ---: | ---: | --- |"]
        for row in rows:
            if row.group != group:
                continue
            lines.append(f"| {row.name} | {row.variant} | {format_value(row.value, row.unit)} | "
                         f"{row.baseline or ''} | {_ratio_text(row)} | {_delta_text(row)} | "
                         f"{_cell(row.note)} |")
        lines.append("")
    lines += ["### targets", "", "| target | limit | measured | result | note |",
              "| --- | --- | ---: | --- | --- |"]
    for target in targets:
        result = {True: "pass", False: "**miss**", None: "n/a"}[target.passed]
        lines.append(f"| {target.name} | {target.limit} | {target.measured} | {result} | "
                     f"{_cell(target.note)} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, rows: Sequence[Row], targets: Sequence[Target], info: dict[str, Any],
               settings: Settings, groups: Sequence[str], chart: str | None) -> None:
    document = {
        "schema": 1,
        **info,
        "settings": dataclasses.asdict(settings),
        "groups": list(groups),
        "rows": [dataclasses.asdict(row) for row in rows],
        "targets": [dataclasses.asdict(target) for target in targets],
        "chart": chart,
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run_info() -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    return {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}


# --- chart --------------------------------------------------------------------------


def _bars(axis: Any, rows: Sequence[Row], group: str, names: Sequence[str],
          variants: Sequence[str], labels: Sequence[str], scale: float, unit: str,
          title: str, log: bool = True) -> None:
    width = 0.8 / max(1, len(names))
    positions = range(len(variants))
    drawn = False
    for index, (name, label) in enumerate(zip(names, labels, strict=True)):
        heights, missing = [], []
        for variant in variants:
            row = find_row(rows, group, name, variant)
            heights.append(row.value * scale if row is not None and row.value else 0.0)
            missing.append(row is not None and row.value is None)  # absent: not applicable
        offsets = [p + (index - (len(names) - 1) / 2) * width for p in positions]
        axis.bar(offsets, heights, width, label=label)
        drawn = drawn or any(heights)
        for x, is_missing in zip(offsets, missing, strict=True):
            if is_missing:
                axis.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom",
                          transform=axis.get_xaxis_transform(), fontsize=7)
    axis.set_xticks(list(positions))
    axis.set_xticklabels([variant.replace(" (", "\n(").replace(" --", "\n--")
                          for variant in variants], fontsize=7, rotation=30, ha="right")
    axis.set_ylabel(unit)
    axis.set_title(title, fontsize=9)
    if log and drawn:
        axis.set_yscale("log")
    if len(names) > 1:
        axis.legend(fontsize=7)


def draw_chart(path: Path, rows: Sequence[Row], info: dict[str, Any]) -> str | None:
    """The headline comparisons as a PNG; None (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(2, 3, figsize=(16, 9))
    pinnings = (syscalls.UNPINNED, syscalls.PINNED)
    tools = [v for v in syscalls.VARIANTS if any(
        r.variant == v and r.group == syscalls.GROUP and r.value for r in rows)]
    _bars(axes[0][0], rows, syscalls.GROUP, [syscalls.row_name(syscalls.TRAPPED, p) for p in pinnings],
          tools, pinnings, 1 / 1000, "µs per openat+close (log)", "trapped passthrough (openat)")
    _bars(axes[0][1], rows, syscalls.GROUP,
          [syscalls.row_name(syscalls.UNTRAPPED, p) for p in pinnings], tools, pinnings, 1,
          "ns per getpid (log)", "untrapped syscall (getpid)")
    _bars(axes[0][2], rows, startup.GROUP, [startup.NAME], list(startup.VARIANTS), ["startup"],
          1, "ms", "startup: static true", log=False)
    latency = [remote.OPEN_COLD, remote.OPEN_CACHED, remote.STAT, remote.CONNECT, remote.HTTP_P50]
    _bars(axes[1][0], rows, remote.GROUP, latency, list(remote.VARIANTS),
          ["open cold", "open cached", "stat", "connect", "HTTP p50"], 1, "µs (log)",
          "remote operations")
    _bars(axes[1][1], rows, remote.GROUP, [remote.BULK],
          [remote.DIRECT, remote.SOCAT, remote.CLIENT, remote.MTRACE], ["bulk"], 1, "MB/s",
          "bulk stream throughput", log=False)
    program_names = sorted({r.name for r in rows if r.group == program.GROUP})
    program_variants = [program.PLAIN, program.MTRACE, program.DIRECT, program.MTRACE_TARGET,
                        program.MTRACE_TARGET_RESIDENT]
    _bars(axes[1][2], rows, program.GROUP, program_names, program_variants,
          [name.replace("Go httpclient, ", "") for name in program_names], 1, "ms",
          "Go httpclient (wall time)", log=False)
    machine_info = info["machine"]
    figure.suptitle(f"mtrace benchmarks, {info['date']}: Linux {machine_info['kernel']}, "
                    f"{machine_info['nproc']} CPUs, {machine_info['cpu']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name
