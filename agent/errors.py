"""The root of mtrace's exception tree.

It lives in the agent package because the agent is the one layer every other
package may import (the agent itself imports neither the tracer nor the CLI)::

    MtraceError                      anything mtrace reports to the user
    ├── AgentError                   mtrace.agent: the remote side
    │   ├── ProtocolError            a malformed, oversized or unexpected frame
    │   ├── AuthenticationError      wrong secret or protocol version
    │   ├── AgentUnavailable         the agent died or cannot be reached
    │   │   └── TargetExited         the target process exited (the agent said so)
    │   └── RemoteError              an operation failed in the target's context
    │                                (also an OSError: ``.errno`` is the real one)
    ├── TracerError                  mtrace.tracer (see mtrace.tracer.errors)
    │   ├── KernelFeatureMissing     the kernel lacks something a backend needs
    │   └── TraceeGone               the tracee exited while mtrace acted on it
    └── ConfigError                  mtrace.cli (see mtrace.cli.errors)
        └── TargetError              the target does not exist or cannot be entered

Every error carries an optional ``hint``: the one line the CLI prints after the
message telling the user what to do about it.
"""

from __future__ import annotations


class MtraceError(Exception):
    """Base of every error mtrace reports; ``exit_code`` is what the CLI exits with."""

    exit_code = 70

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class AgentError(MtraceError):
    exit_code = 71


class ProtocolError(AgentError):
    pass


class AuthenticationError(AgentError):
    pass


class AgentUnavailable(AgentError):
    pass


class TargetExited(AgentUnavailable):
    """The agent said goodbye because the target process exited."""


class RemoteError(AgentError, OSError):
    """An operation failed on the remote side; ``errno`` is the target's real errno.

    It is an ``OSError`` too, so ``except OSError`` and ``error.errno`` work
    as they would for the same call made locally (but the subclass is always
    RemoteError, never FileNotFoundError and friends: compare ``errno``).
    """

    def __init__(self, errno: int, message: str) -> None:
        OSError.__init__(self, errno, message)
        self.message = message
        self.hint = None
