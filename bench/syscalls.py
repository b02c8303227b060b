"""Per-syscall cost: an untrapped call (getpid) and a trapped passthrough (openat+close).

Each tool runs ``bench/loop`` (static C), which times its own loop of N calls,
so process startup never counts; N is chosen per tool from a pilot run so one
loop lasts about ``Settings.loop_seconds``. Runs of the tools are interleaved
(one of each, then again) so drift on the machine hits them all alike. Every
combination runs unpinned and with everything on CPU 0 (``taskset -c 0``).

Ratios: an untrapped call is compared with the plain run; a trapped call
compares the cost it adds over the plain run with the cost the C reference
supervisor (``bench/refsup.c``) adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PIN,
    Context,
    Row,
    RunFailed,
    Unavailable,
    compare,
    find_row,
    median,
    mtrace_argv,
    mtrace_has_option,
    run_json,
    which,
)

GROUP = "syscall"
UNIT = "ns/call"

PLAIN = "plain"
MTRACE = "mtrace exec (notify)"
MTRACE_PTRACE = "mtrace exec --backend ptrace"
STRACE = "strace -f"
STRACE_BPF = "strace -f --seccomp-bpf -e trace=openat"
PROOT = "proot"
REFSUP = "C reference supervisor"
VARIANTS = (PLAIN, MTRACE, MTRACE_PTRACE, STRACE, STRACE_BPF, PROOT, REFSUP)

UNTRAPPED = "getpid (untrapped)"
TRAPPED = "openat+close (trapped openat)"
UNPINNED = "unpinned"
PINNED = "pinned"

MIN_CALLS, MAX_CALLS = 100, 5_000_000
PILOT_CALLS = {UNTRAPPED: 2000, TRAPPED: 200}
QUICK_CALLS = {UNTRAPPED: 2000, TRAPPED: 100}


def row_name(workload: str, pinning: str) -> str:
    return f"{workload}, {pinning}"


@dataclass
class _Variant:
    name: str
    prefix: Callable[[Context], list[str]]


def _plain(ctx: Context) -> list[str]:
    return []


def _mtrace(ctx: Context) -> list[str]:
    return [*mtrace_argv(), "exec", "--"]


def _mtrace_ptrace(ctx: Context) -> list[str]:
    if not mtrace_has_option("--backend"):
        raise Unavailable("`mtrace exec --help` shows no --backend yet")
    return [*mtrace_argv(), "exec", "--backend", "ptrace", "--"]


def _strace(ctx: Context) -> list[str]:
    if which("strace") is None:
        raise Unavailable("strace not installed: apt-get install strace")
    return ["strace", "-f", "-o", "/dev/null"]


def _strace_bpf(ctx: Context) -> list[str]:
    return [*_strace(ctx)[:-2], "--seccomp-bpf", "-e", "trace=openat", "-o", "/dev/null"]


def _proot(ctx: Context) -> list[str]:
    if which("proot") is None:
        raise Unavailable("proot not installed: apt-get install proot")
    return ["proot"]


def _refsup(ctx: Context) -> list[str]:
    return [str(ctx.programs()["refsup"])]


_VARIANTS = (
    _Variant(PLAIN, _plain),
    _Variant(MTRACE, _mtrace),
    _Variant(MTRACE_PTRACE, _mtrace_ptrace),
    _Variant(STRACE, _strace),
    _Variant(STRACE_BPF, _strace_bpf),
    _Variant(PROOT, _proot),
    _Variant(REFSUP, _refsup),
)


def _usable_prefixes(ctx: Context, loop: Path) -> dict[str, list[str] | str]:
    """Variant -> argv prefix, or the reason it is n/a (each tool tried once on `loop true`)."""
    usable: dict[str, list[str] | str] = {}
    for variant in _VARIANTS:
        try:
            prefix = variant.prefix(ctx)
            run_json([*prefix, str(loop), "getpid", "1"], timeout=60)
            usable[variant.name] = prefix
        except RunFailed as error:
            usable[variant.name] = f"cannot run here: {error}"
        except Unavailable as error:
            usable[variant.name] = str(error)
    return usable


def _per_call(argv: list[str], calls: int) -> float:
    result = run_json([*argv, str(calls)], timeout=300)
    return float(result["total_ns"]) / max(1, calls)


def run(ctx: Context) -> list[Row]:
    try:
        loop = ctx.programs()["loop"]
    except Unavailable as error:
        return [Row.missing(GROUP, row_name(w, p), v, UNIT, str(error))
                for w in (UNTRAPPED, TRAPPED) for p in (UNPINNED, PINNED) for v in VARIANTS]
    local_file = ctx.work_dir / "local.txt"
    local_file.write_text("local\n")
    workloads = {UNTRAPPED: ["getpid"], TRAPPED: ["open", str(local_file)]}
    prefixes = _usable_prefixes(ctx, loop)
    pin_reason = None if which("taskset") else "taskset not installed: apt-get install util-linux"

    rows: list[Row] = []
    for workload, mode in workloads.items():
        for pinning in (UNPINNED, PINNED):
            name = row_name(workload, pinning)
            ctx.log(f"syscall: {name}")
            argvs: dict[str, list[str]] = {}
            for variant in VARIANTS:
                prefix = prefixes[variant]
                if isinstance(prefix, str):
                    rows.append(Row.missing(GROUP, name, variant, UNIT, prefix))
                elif pinning == PINNED and pin_reason:
                    rows.append(Row.missing(GROUP, name, variant, UNIT, pin_reason))
                else:
                    pin = list(PIN) if pinning == PINNED else []
                    argvs[variant] = [*pin, *prefix, str(loop), *mode]
            rows += _measure_block(ctx, workload, name, argvs)
    _set_ratios(rows)
    return rows


def _measure_block(ctx: Context, workload: str, name: str,
                   argvs: dict[str, list[str]]) -> list[Row]:
    settings = ctx.settings
    calls: dict[str, int] = {}
    failures: dict[str, str] = {}
    for variant, argv in argvs.items():
        if settings.quick:
            calls[variant] = QUICK_CALLS[workload]
            continue
        try:
            pilot = _per_call(argv, PILOT_CALLS[workload])
        except RunFailed as error:
            failures[variant] = str(error)
            continue
        wanted = int(settings.loop_seconds * 1e9 / max(pilot, 1.0))
        calls[variant] = max(MIN_CALLS, min(MAX_CALLS, wanted))
    samples: dict[str, list[float]] = {variant: [] for variant in calls}
    for _ in range(settings.runs):
        for variant in calls:
            if variant in failures:
                continue
            try:
                samples[variant].append(_per_call(argvs[variant], calls[variant]))
            except RunFailed as error:
                failures[variant] = str(error)
    rows = []
    for variant in argvs:
        if variant in failures:
            rows.append(Row.missing(GROUP, name, variant, UNIT, f"run failed: {failures[variant]}"))
        else:
            rows.append(Row(GROUP, name, variant, median(samples[variant]), UNIT,
                            samples=samples[variant], extra={"calls": calls[variant]}))
    return rows


def _set_ratios(rows: list[Row]) -> None:
    for pinning in (UNPINNED, PINNED):
        untrapped = row_name(UNTRAPPED, pinning)
        trapped = row_name(TRAPPED, pinning)
        plain_trapped = find_row(rows, GROUP, trapped, PLAIN)
        plain_value = plain_trapped.value if plain_trapped else None
        for row in rows:
            if row.variant == PLAIN:
                continue
            if row.name == untrapped or (row.name == trapped and row.variant == REFSUP):
                compare(rows, row, PLAIN)
            elif row.name == trapped:
                compare(rows, row, REFSUP, of="overhead", plain=plain_value)
