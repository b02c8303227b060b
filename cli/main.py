"""The ``mtrace`` command."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, NoReturn

import typer

from mtrace.agent.errors import MtraceError

app = typer.Typer(
    name="mtrace",
    help="Run a local process in the context of a remote environment, by its system calls.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_COMMAND_SETTINGS = {"allow_interspersed_args": False, "ignore_unknown_options": False}

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr.")]
Command = Annotated[list[str], typer.Argument(help="The command to run, after `--`.",
                                              show_default=False)]


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="mtrace: %(name)s: %(message)s", stream=sys.stderr)


def fail(error: MtraceError, verbose: int = 0) -> NoReturn:
    """One line for the user, a hint line if there is one, and a distinct exit code."""
    sys.stderr.write(f"mtrace: error: {error.message}\n")
    if error.hint:
        sys.stderr.write(f"mtrace: hint: {error.hint}\n")
    if verbose:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    raise SystemExit(error.exit_code)


@app.command("exec", context_settings=_COMMAND_SETTINGS)
def exec_command(command: Command, verbose: Verbose = 0) -> None:
    """Run COMMAND under mtrace's supervisor."""
    from mtrace.tracer.session import Session, run

    _configure_logging(verbose)
    try:
        code = run(Session(argv=command))
    except MtraceError as error:
        fail(error, verbose)
    raise SystemExit(code)


@app.command("trace", context_settings=_COMMAND_SETTINGS)
def trace_command(
    command: Command,
    expression: Annotated[str | None, typer.Option(
        "-e", "--trace", help="Comma-separated syscalls to show (default: all mtrace traps).",
    )] = None,
    output: Annotated[str | None, typer.Option("-o", "--output",
                                               help="Write the trace to FILE, not stderr.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    verbose: Verbose = 0,
) -> None:
    """Run COMMAND and show each trapped system call, strace-style."""
    from mtrace.tracer.backend import Handlers
    from mtrace.tracer.passthrough import RESULT_HANDLERS
    from mtrace.tracer.session import Session, run
    from mtrace.tracer.syscalls import DEFAULT_TRAPPED
    from mtrace.tracer.trace import TracePrinter

    _configure_logging(verbose)
    trapped = DEFAULT_TRAPPED
    if expression:
        trapped = tuple(name.strip() for name in expression.split(",") if name.strip())
    stream = sys.stderr
    try:
        if output:
            try:
                stream = open(output, "w", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise MtraceError(f"cannot write the trace to {output}: {exc.strerror}") from exc
        printer = TracePrinter(stream, as_json=as_json)
        session = Session(argv=command, handlers=Handlers(RESULT_HANDLERS), trapped=trapped,
                          observer=printer, strict_names=True)
        from mtrace.tracer.backend import AsyncSide

        session.async_side = AsyncSide()
        try:
            code = run(session)
        finally:
            session.async_side.stop()
    except MtraceError as error:
        fail(error, verbose)
    finally:
        if stream is not sys.stderr:
            stream.close()
    raise SystemExit(code)


@app.command("doctor")
def doctor_command(verbose: Verbose = 0) -> None:
    """Check the kernel features mtrace relies on."""
    from mtrace.cli.doctor import run_checks

    _configure_logging(verbose)
    raise SystemExit(run_checks(sys.stdout))


@app.command("agent", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def agent_command(ctx: typer.Context) -> None:
    """Run the mtrace agent (the remote side); see `mtrace agent --help`."""
    from mtrace.agent.server import main as agent_main

    raise SystemExit(agent_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
