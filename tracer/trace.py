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
        return json.dumps(document, separators=(",", ":"))
