"""The ``mtrace`` command's entry point.

A plain `mtrace exec [OPTIONS] [--] COMMAND...` (every option known, no
help, nothing to report about the arguments) runs without importing typer:
cli/exec_args.py parses it as typer would, checked against typer's own
parse by tests/unit/test_exec_args.py. Everything else, help and argument
errors included, goes to the typer app (cli/app.py).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from .exec_args import parse_exec


def main() -> None:
    try:
        options = parse_exec(sys.argv[1:], os.environ)
        if options is None:
            from .app import run

            run()
        else:
            from .commands import run_exec

            run_exec(**options)
        code: object = 0
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:  # before mtrace's own handlers: 130, as typer exits
        code = 130
    except BrokenPipeError:  # stdout closed under us: 1, as typer exits
        code = 1
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """Exit without the interpreter's finalization: tearing down every module
    mtrace imported took ~200 ms after the program had already exited (measured
    with strace: nothing but CPU between the last syscall and exit_group).
    Everything that must happen at exit happened before: sessions released,
    uploads committed, threads joined by asyncio.run; streams and log handlers
    are flushed here."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): the message on stderr, status 1, as Python does
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            status = status or 1
    os._exit(status & 0xFF)  # as the shell would see sys.exit(status)


if __name__ == "__main__":
    main()
