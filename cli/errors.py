"""Errors raised by the CLI layer (see the tree in mtrace.agent.errors)."""

from __future__ import annotations

from ..agent.errors import MtraceError


class ConfigError(MtraceError):
    exit_code = 78  # EX_CONFIG


class TargetError(ConfigError):
    exit_code = 79


class Interrupted(MtraceError):
    """The user stopped mtrace (Ctrl-C, SIGTERM) before the program started."""

    exit_code = 130


class WriteBackFailed(MtraceError):
    """Write mode: changes the program made to a target file never reached it."""

    exit_code = 74  # EX_IOERR
