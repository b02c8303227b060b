"""Startup: a static program that exits at once, plain and under mtrace.

Each run is timed from fork to exit by this process (no hyperfine needed);
the reported value is the median wall time in milliseconds, compared with the
plain run. ``python -c pass`` is there for scale: the interpreter's own share
of mtrace's startup.

`mtrace exec` runs in-process (``MTRACE_RESIDENT=0``, whatever resident the
user keeps running) and, in the "(resident)" variants, through a resident
mtrace this group starts on a socket of its own and stops when it is done.
The variants take turns, so that load drift falls on all of them alike.
"""

from __future__ import annotations

import sys

from bench.common import (
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

GROUP = "startup"
UNIT = "ms"
NAME = "static true"

PLAIN = "plain"
PYTHON = "python -c pass (for scale)"
MTRACE = "mtrace exec"
MTRACE_TARGET = "mtrace exec --target pid/N"
MTRACE_RESIDENT = "mtrace exec (resident)"
MTRACE_TARGET_RESIDENT = "mtrace exec --target pid/N (resident)"
VARIANTS = (PLAIN, PYTHON, MTRACE, MTRACE_TARGET, MTRACE_RESIDENT, MTRACE_TARGET_RESIDENT)
#: The variants run through the resident, and the in-process variant each repeats.
THROUGH_RESIDENT = {MTRACE_RESIDENT: MTRACE, MTRACE_TARGET_RESIDENT: MTRACE_TARGET}


def _argvs(ctx: Context) -> dict[str, list[str] | str]:
    """Each variant's argv (the resident ones' as their in-process twin's),
    or why it cannot run."""
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
    for variant, twin in THROUGH_RESIDENT.items():
        argvs[variant] = argvs[twin]
    return argvs


def run(ctx: Context) -> list[Row]:
    argvs = _argvs(ctx)
    reasons = {variant: argv for variant, argv in argvs.items() if isinstance(argv, str)}
    ctx.log(f"startup: {ctx.settings.startup_runs} runs each")
    resident: Resident | None = None
    try:
        if any(isinstance(argvs[variant], list) for variant in THROUGH_RESIDENT):
            try:
                resident = Resident.start(mtrace_argv())
            except Unavailable as error:
                for variant in THROUGH_RESIDENT:
                    reasons.setdefault(variant, str(error))
        commands: dict[str, Command] = {}
        for variant, argv in argvs.items():
            if variant in reasons:
                continue
            assert isinstance(argv, list)
            if variant in THROUGH_RESIDENT:
                assert resident is not None
                commands[variant] = (argv, resident.env)
            elif variant in THROUGH_RESIDENT.values():
                commands[variant] = (argv, in_process_env())
            else:
                commands[variant] = (argv, None)
        samples, failures = time_rounds(commands, ctx.settings.startup_runs,
                                        warm_up=not ctx.settings.quick)
        if resident is not None:
            timed = sum(len(samples[variant]) + (not ctx.settings.quick)
                        for variant in THROUGH_RESIDENT if variant in samples)
            if (shortfall := resident.shortfall(timed)) is not None:
                reasons.update((variant, shortfall) for variant in THROUGH_RESIDENT
                               if variant in samples)
    finally:
        if resident is not None:
            resident.stop()
    rows = []
    for variant in VARIANTS:
        if variant in reasons:
            rows.append(Row.missing(GROUP, NAME, variant, UNIT, reasons[variant]))
        elif variant in failures:
            rows.append(Row.missing(GROUP, NAME, variant, UNIT, f"run failed: {failures[variant]}"))
        else:
            rows.append(Row(GROUP, NAME, variant, median(samples[variant]), UNIT,
                            samples=samples[variant]))
    for row in rows:
        if row.variant != PLAIN:
            compare(rows, row, PLAIN)
    return rows
