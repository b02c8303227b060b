"""Structured logs: one line per event, ``key=value`` pairs, on stderr.

``event(logger, logging.INFO, "client_connected", peer="10.0.0.2:5000")`` prints::

    ts=2024-05-01T10:00:00.123Z level=info event=client_connected peer=10.0.0.2:5000
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_FIELDS = "mtrace_fields"


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, bytes) else str(value)
    if not text or any(c in text for c in ' ="\\\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        millis = int(record.msecs)
        parts = [
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%S', seconds)}.{millis:03d}Z",
            f"level={record.levelname.lower()}",
            f"event={_quote(record.getMessage())}",
        ]
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"traceback={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def event(logger: logging.Logger, level: int, name: str, **fields: object) -> None:
    """Log one event with its fields (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields})


def configure(verbosity: int) -> None:
    """Warnings by default, connections with -v, every request with -vv."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("mtrace.agent")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
