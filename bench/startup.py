"""Startup: a static program that exits at once, plain and under mtrace.

Each run is timed from fork to exit by this process (no hyperfine needed);
the reported value is the median wall time in milliseconds, compared with the
plain run. ``python -c pass`` is there for scale: the interpreter's own share
of mtrace's startup.
"""

from __future__ import annotations

import sys

from bench.common import (
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

GROUP = "startup"
UNIT = "ms"
NAME = "static true"

PLAIN = "plain"
PYTHON = "python -c pass (for scale)"
MTRACE = "mtrace exec"
MTRACE_TARGET = "mtrace exec --target pid/N"
VARIANTS = (PLAIN, PYTHON, MTRACE, MTRACE_TARGET)


def _argvs(ctx: Context) -> dict[str, list[str] | str]:
    try:
        loop = str(ctx.programs()["loop"])
    except Unavailable as error:
        return {variant: str(error) for variant in VARIANTS}
    argvs: dict[str, list[str] | str] = {
        PLAIN: [loop, "true"],
        PYTHON: [sys.executable, "-c", "pass"],
        MTRACE: [*mtrace_argv(), "exec", "--", loop, "true"],
    }
    if not mtrace_has_option("--target"):
        argvs[MTRACE_TARGET] = "needs --target: `mtrace exec --help` shows no --target yet"
    else:
        try:
            namespace = ctx.namespace()
            argvs[MTRACE_TARGET] = [*mtrace_argv(), "exec", "--target", f"pid/{namespace.pid}",
                                    "--", loop, "true"]
        except Unavailable as error:
            argvs[MTRACE_TARGET] = f"no namespace target: {error}"
    return argvs


def run(ctx: Context) -> list[Row]:
    argvs = _argvs(ctx)
    samples: dict[str, list[float]] = {v: [] for v, argv in argvs.items() if isinstance(argv, list)}
    failures: dict[str, str] = {}
    ctx.log(f"startup: {ctx.settings.startup_runs} runs each")
    for variant in samples if not ctx.settings.quick else ():
        # one untimed run each: page cache, bytecode cache
        try:
            time_command(argvs[variant])  # type: ignore[arg-type]
        except RunFailed as error:
            failures[variant] = str(error)
    for _ in range(ctx.settings.startup_runs):
        for variant in samples:
            if variant in failures:
                continue
            try:
                seconds = time_command(argvs[variant])  # type: ignore[arg-type]
                samples[variant].append(seconds * 1000)
            except RunFailed as error:
                failures[variant] = str(error)
    rows = []
    for variant in VARIANTS:
        argv = argvs[variant]
        if isinstance(argv, str):
            rows.append(Row.missing(GROUP, NAME, variant, UNIT, argv))
        elif variant in failures:
            rows.append(Row.missing(GROUP, NAME, variant, UNIT, f"run failed: {failures[variant]}"))
        else:
            rows.append(Row(GROUP, NAME, variant, median(samples[variant]), UNIT,
                            samples=samples[variant]))
    for row in rows:
        if row.variant != PLAIN:
            compare(rows, row, PLAIN)
    return rows
