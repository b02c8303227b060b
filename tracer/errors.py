"""Errors raised by the tracer (see the tree in mtrace.agent.errors)."""

from __future__ import annotations

from ..agent.errors import MtraceError


class TracerError(MtraceError):
    exit_code = 72


class KernelFeatureMissing(TracerError):
    pass


class TraceeGone(TracerError):
    """The tracee (or the thread that made a call) is gone; nothing to answer."""
