"""The ``mtrace`` command's entry point.

A plain `mtrace exec [OPTIONS] [--] COMMAND...` (every option known, no
help, nothing to report about the arguments) runs without importing typer:
cli/exec_args.py parses it as typer would, checked against typer's own
parse by tests/unit/test_exec_args.py. Everything else, help and argument
errors included, goes to the typer app (cli/app.py).
"""

from __future__ import annotations

import os
import sys

from .exec_args import parse_exec

# Names for annotations only: typing and collections.abc cost an interpreter
# without this machine's site 5-20 ms, and these modules run at every `mtrace exec`.
# (mypy reads any TYPE_CHECKING as true.)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def main() -> None:
    args = sys.argv[1:]
    options = parse_exec(args, os.environ)
    if options is not None:
        from .resident import run_resident

        handed = run_resident(args, options)
        if handed is not None:  # the resident process ran it (cli/resident.py)
            os._exit(handed & 0xFF)
    os._exit(finish(run_command(args, options)))


def run_command(args: list[str], options: dict[str, Any] | None) -> object:
    """Run `mtrace ARGS` (``options``: parse_exec's answer for them); what it
    exited with (a SystemExit's code)."""
    try:
        if options is None:
            from .app import run

            run()
        else:
            from .commands import run_exec

            run_exec(**options)
        return 0
    except SystemExit as done:
        return done.code
    except KeyboardInterrupt:  # before mtrace's own handlers: 130, as typer exits
        return 130
    except BrokenPipeError:  # stdout closed under us: 1, as typer exits
        return 1


def finish(code: object) -> int:
    """The exit status for ``code``, once streams and log handlers are flushed.

    The caller exits with os._exit, without the interpreter's finalization:
    tearing down every module mtrace imported took ~200 ms after the program
    had already exited (measured with strace: nothing but CPU between the
    last syscall and exit_group). Everything that must happen at exit
    happened before: sessions released, uploads committed, threads joined by
    asyncio.run."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): the message on stderr, status 1, as Python does
        print(code, file=sys.stderr)
        status = 1
    logging = sys.modules.get("logging")
    if logging is not None:  # imported only where something logs
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            status = status or 1
    return status & 0xFF  # as the shell would see sys.exit(status)


if __name__ == "__main__":
    main()
