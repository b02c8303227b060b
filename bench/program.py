"""A real program: the static Go HTTP client doing many requests, plain and under mtrace.

``tests/programs/go/httpclient`` (built by ``tests/programs_build.py``) resolves
``localhost`` with the pure-Go resolver (files: /etc/nsswitch.conf, /etc/hosts),
then makes N sequential keep-alive GETs, reading /etc/hosts before each one.
The server is ``bench/netserve`` on this host's loopback, started here. Values
are the median wall time of the whole process, in milliseconds. Once ``mtrace
exec --target`` exists, the same client also runs against the namespace
target, compared with a run directly inside the namespace, and with one
request (start-up: the difference is what the requests cost). Against the
target mtrace runs in-process (``MTRACE_RESIDENT=0``) and through a resident
mtrace this group starts on a socket of its own (bench/startup.py's rule);
the variants of a row take turns, run by run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import (
    REPO_ROOT,
    Command,
    Context,
    Resident,
    Row,
    Unavailable,
    compare,
    in_process_env,
    median,
    mtrace_argv,
    mtrace_has_option,
    time_rounds,
)
from bench.namespace import read_line, stop_process

GROUP = "program"
UNIT = "ms"

PLAIN = "plain"
MTRACE = "mtrace exec"
DIRECT = "direct in namespace"
MTRACE_TARGET = "mtrace exec --target pid/N"
MTRACE_TARGET_RESIDENT = "mtrace exec --target pid/N (resident)"
TARGET_VARIANTS = (DIRECT, MTRACE_TARGET, MTRACE_TARGET_RESIDENT)


def _name(requests: int, where: str) -> str:
    return f"Go httpclient, {requests} request{'' if requests == 1 else 's'}, {where}"


def httpclient() -> Path:
    """The Go HTTP client from the test programs (built if needed)."""
    tests_dir = str(REPO_ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    try:
        from programs_build import BuildError, build_programs
    except ImportError as error:
        raise Unavailable(f"tests/programs_build.py not importable: {error}") from error
    try:
        path = build_programs().get("httpclient")
    except BuildError as error:
        raise Unavailable(f"building the test programs failed: {str(error)[:200]}") from error
    if path is None or not path.exists():
        raise Unavailable("tests/programs_build.py builds no httpclient")
    return Path(path)


def _rows(ctx: Context, name: str, commands: dict[str, Command]) -> list[Row]:
    """Rows of ``name``: the commands timed in turns, after a warm-up run each
    (page cache, Go runtime pages)."""
    samples, failures = time_rounds(commands, ctx.settings.program_runs,
                                    warm_up=not ctx.settings.quick, timeout=300)
    return [Row(GROUP, name, variant, median(samples[variant]), UNIT, samples=samples[variant])
            if variant in samples else
            Row.missing(GROUP, name, variant, UNIT, f"run failed: {failures[variant]}")
            for variant in commands]


def run(ctx: Context) -> list[Row]:
    settings = ctx.settings
    requests = settings.program_requests
    local = _name(requests, "this host's loopback")
    remote = _name(requests, "the namespace target")
    try:
        client = str(httpclient())
        netserve = str(ctx.programs()["netserve"])
    except Unavailable as error:
        return [Row.missing(GROUP, name, variant, UNIT, str(error))
                for name, variant in ((local, PLAIN), (local, MTRACE), (remote, DIRECT),
                                      (remote, MTRACE_TARGET))]
    rows: list[Row] = []
    server = subprocess.Popen([netserve, "0"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True)
    try:
        port = dict(item.split("=") for item in read_line(server, 10).split())["http"]
        argv = [client, f"http://localhost:{port}/small", str(requests)]
        ctx.log(f"program: {local}")
        rows += _rows(ctx, local, {PLAIN: (argv, None),
                                   MTRACE: ([*mtrace_argv(), "exec", "--", *argv],
                                            in_process_env())})
    finally:
        stop_process(server)
    rows += _against_target(ctx, client, remote, requests)
    for row in rows:
        if row.variant == MTRACE:
            compare(rows, row, PLAIN)
        elif row.variant in (MTRACE_TARGET, MTRACE_TARGET_RESIDENT):
            compare(rows, row, DIRECT)
    return rows


def _against_target(ctx: Context, client: str, name: str, requests: int) -> list[Row]:
    """The client against the target with ``requests`` requests, and with one:
    the one-request rows are start-up, so the difference is what the requests
    cost (the split the README reports)."""
    names = {requests: name, 1: _name(1, "the namespace target")}

    def missing(reason: str, variants: tuple[str, ...] = TARGET_VARIANTS) -> list[Row]:
        return [Row.missing(GROUP, row_name, variant, UNIT, reason)
                for row_name in names.values() for variant in variants]

    if not mtrace_has_option("--target"):
        return missing("needs --target: `mtrace exec --help` shows no --target yet")
    try:
        namespace = ctx.namespace()
    except Unavailable as error:
        return missing(str(error))
    rows: list[Row] = []
    not_started: list[Row] = []
    try:
        resident: Resident | None = Resident.start(mtrace_argv())
    except Unavailable as error:
        resident = None
        not_started = missing(str(error), (MTRACE_TARGET_RESIDENT,))
    try:
        for count, row_name in names.items():
            argv = [client, f"http://localhost:{namespace.http_port}/small", str(count)]
            mtrace = [*mtrace_argv(), "exec", "--target", f"pid/{namespace.pid}", "--", *argv]
            try:
                commands: dict[str, Command] = {DIRECT: (namespace.inside(argv), None),
                                                MTRACE_TARGET: (mtrace, in_process_env())}
            except Unavailable as error:
                rows += [Row.missing(GROUP, row_name, variant, UNIT, str(error))
                         for variant in TARGET_VARIANTS]
                continue
            if resident is not None:
                commands[MTRACE_TARGET_RESIDENT] = (mtrace, resident.env)
            ctx.log(f"program: {row_name}")
            rows += _rows(ctx, row_name, commands)
        through = [row for row in rows if row.variant == MTRACE_TARGET_RESIDENT and row.samples]
        timed = sum(len(row.samples) + (not ctx.settings.quick) for row in through)
        if resident is not None and (shortfall := resident.shortfall(timed)) is not None:
            rows = [Row.missing(GROUP, row.name, row.variant, UNIT, shortfall)
                    if row in through else row for row in rows]
    finally:
        if resident is not None:
            resident.stop()
    return rows + not_started
