"""A real program: the static Go HTTP client doing many requests, plain and under mtrace.

``tests/programs/go/httpclient`` (built by ``tests/programs_build.py``) resolves
``localhost`` with the pure-Go resolver (files: /etc/nsswitch.conf, /etc/hosts),
then makes N sequential keep-alive GETs, reading /etc/hosts before each one.
The server is ``bench/netserve`` on this host's loopback, started here. Values
are the median wall time of the whole process, in milliseconds. Once ``mtrace
exec --target`` exists, the same client also runs against the namespace
target, compared with a run directly inside the namespace, and with one
request (start-up: the difference is what the requests cost).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import (
    REPO_ROOT,
    Context,
    Row,
    RunFailed,
    Unavailable,
    compare,
    median,
    mtrace_argv,
    mtrace_has_option,
    time_command,
)
from bench.namespace import read_line, stop_process

GROUP = "program"
UNIT = "ms"

PLAIN = "plain"
MTRACE = "mtrace exec"
DIRECT = "direct in namespace"
MTRACE_TARGET = "mtrace exec --target pid/N"


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


def _time_runs(argv: list[str], runs: int, warm_up: bool = True) -> list[float]:
    if warm_up:
        time_command(argv, timeout=300)  # page cache, Go runtime pages
    return [time_command(argv, timeout=300) * 1000 for _ in range(runs)]


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
        for variant, command in ((PLAIN, argv), (MTRACE, [*mtrace_argv(), "exec", "--", *argv])):
            try:
                samples = _time_runs(command, settings.program_runs, not settings.quick)
                rows.append(Row(GROUP, local, variant, median(samples), UNIT, samples=samples))
            except RunFailed as error:
                rows.append(Row.missing(GROUP, local, variant, UNIT, f"run failed: {error}"))
    finally:
        stop_process(server)
    rows += _against_target(ctx, client, remote, requests)
    for row in rows:
        if row.variant == MTRACE:
            compare(rows, row, PLAIN)
        elif row.variant == MTRACE_TARGET:
            compare(rows, row, DIRECT)
    return rows


def _against_target(ctx: Context, client: str, name: str, requests: int) -> list[Row]:
    """The client against the target with ``requests`` requests, and with one:
    the one-request rows are start-up, so the difference is what the requests
    cost (the split the README reports)."""
    names = {requests: name, 1: _name(1, "the namespace target")}
    if not mtrace_has_option("--target"):
        reason = "needs --target: `mtrace exec --help` shows no --target yet"
        return [Row.missing(GROUP, row_name, variant, UNIT, reason)
                for row_name in names.values() for variant in (DIRECT, MTRACE_TARGET)]
    try:
        namespace = ctx.namespace()
    except Unavailable as error:
        return [Row.missing(GROUP, row_name, variant, UNIT, str(error))
                for row_name in names.values() for variant in (DIRECT, MTRACE_TARGET)]
    rows = []
    for count, row_name in names.items():
        argv = [client, f"http://localhost:{namespace.http_port}/small", str(count)]
        try:
            commands = {
                DIRECT: namespace.inside(argv),
                MTRACE_TARGET: [*mtrace_argv(), "exec", "--target", f"pid/{namespace.pid}",
                                "--", *argv],
            }
        except Unavailable as error:
            rows += [Row.missing(GROUP, row_name, variant, UNIT, str(error))
                     for variant in (DIRECT, MTRACE_TARGET)]
            continue
        ctx.log(f"program: {row_name}")
        for variant, command in commands.items():
            try:
                samples = _time_runs(command, ctx.settings.program_runs, not ctx.settings.quick)
                rows.append(Row(GROUP, row_name, variant, median(samples), UNIT,
                                samples=samples))
            except RunFailed as error:
                rows.append(Row.missing(GROUP, row_name, variant, UNIT, f"run failed: {error}"))
    return rows
