"""``mtrace trace``: one line per trapped call, strace-style or JSON lines."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, TextIO

from .backend import CallRecord
from .call import SyscallCall
from .decode import decode_arguments, errno_name, format_result
from .outcome import InjectFd


class TracePrinter:
    """An observer that writes each finished call to ``stream``."""

    def __init__(self, stream: TextIO, *, as_json: bool = False) -> None:
        self.stream = stream
        self.as_json = as_json
        self._lock = threading.Lock()  # deferred calls finish on the async thread
        self.records = 0

    def on_call(self, call: SyscallCall) -> Any:
        # Arguments are read now, before the call runs and the memory changes.
        return decode_arguments(call)

    def on_result(self, record: CallRecord, token: Any) -> None:
        arguments: list[tuple[str, str]] = token
        line = self._json(record, arguments) if self.as_json else self._text(record, arguments)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.records += 1

    @staticmethod
    def _text(record: CallRecord, arguments: list[tuple[str, str]]) -> str:
        call = record.call
        duration = record.finished - record.started
        rendered = ", ".join(text for _name, text in arguments)
        suffix = f" <{duration:.6f}>" if record.result is not None else ""
        incoming = _incoming_peer(record)
        if incoming is not None:
            suffix += f" (peer {incoming})"
        return f"[pid {call.tid:>6}] {call.name}({rendered}) = {format_result(record.result)}{suffix}"

    @staticmethod
    def _json(record: CallRecord, arguments: list[tuple[str, str]]) -> str:
        call = record.call
        result = record.result
        document: dict[str, Any] = {
            "time": time.time(),
            "tid": call.tid,
            "syscall": call.name,
            "args": dict(arguments),
            "result": result if result is None or result >= 0 else -1,
            "errno": errno_name(-result) if result is not None and result < 0 else None,
            "duration_us": round((record.finished - record.started) * 1e6, 1),
            "fd_injected": isinstance(record.outcome, InjectFd),
        }
        incoming = _incoming_peer(record)
        if incoming is not None:
            document["incoming_peer"] = incoming
        return json.dumps(document, separators=(",", ":"))


def _incoming_peer(record: CallRecord) -> str | None:
    """The remote peer of a connection the target's traffic brought to an
    accept (mtrace accepted it for the program and wrote the peer's address)."""
    outcome = record.outcome
    if record.call.name not in ("accept", "accept4") or not isinstance(outcome, InjectFd) \
            or not outcome.writes:
        return None
    from .features.relay import parse_sockaddr

    parsed = parse_sockaddr(outcome.writes[0][1])
    return str(parsed[1]) if parsed is not None else None
