"""Why a measurement could not be taken: the bench's two exceptions, shared by
bench.common (the runner's helpers) and bench.namespace (the target), which
must not import each other both ways."""

from __future__ import annotations


class Unavailable(Exception):
    """A tool, feature or privilege a measurement needs is missing; str() is the reason."""


class RunFailed(Unavailable):
    """A measured command failed; the message carries the tail of its stderr."""
