"""What every backend shares: handler dispatch, the observer hook, the async side."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Protocol

import msgspec

from .call import SyscallCall
from .errors import TraceeGone
from .outcome import CONTINUE, Errno, Outcome

log = logging.getLogger("mtrace.tracer")

Handler = Callable[[SyscallCall], Outcome]


class CallRecord(msgspec.Struct):
    """One finished call, as the trace printer and the tests see it."""

    call: SyscallCall
    started: float
    finished: float
    outcome: Outcome
    # The call's result where the supervisor knows it: the value or -errno.
    # None when the kernel ran the call after the supervisor let it continue.
    result: int | None
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class Observer(Protocol):
    def on_call(self, call: SyscallCall) -> Any: ...

    def on_result(self, record: CallRecord, token: Any) -> None: ...


class Handlers:
    """Handlers by syscall name; a name without a handler continues."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = dict(handlers or {})

    def register(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    def update(self, handlers: dict[str, Handler]) -> None:
        self._handlers.update(handlers)

    def names(self) -> set[str]:
        return set(self._handlers)

    def __call__(self, call: SyscallCall) -> Outcome:
        handler = self._handlers.get(call.name)
        if handler is None:
            return CONTINUE
        return handler(call)


def decide(handler: Handler, call: SyscallCall) -> Outcome:
    """Ask the handler; its exceptions become the errno the tracee sees."""
    try:
        return handler(call)
    except TraceeGone:
        return Errno(errno.ESRCH)
    except OSError as exc:
        return Errno(exc.errno or errno.EIO)
    except Exception:
        log.exception("handler for %s failed; the tracee gets EIO", call.name)
        return Errno(errno.EIO)


class AsyncSide:
    """An asyncio loop in its own thread, where deferred outcomes are computed.

    The supervisor's trap loop never waits on it: a ``Defer`` outcome is
    submitted here, and the answer is sent from this thread when it is ready.
    """

    def __init__(self) -> None:
        import asyncio  # only sessions that defer pay for importing asyncio

        try:
            import uvloop  # relays and agent frames: a cheaper wake-up per message
        except ImportError:
            self.loop = asyncio.new_event_loop()
        else:
            self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="mtrace-async", daemon=True)
        self._started = False

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
        import asyncio

        self.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the loop and wait for it (start-up work only)."""
        return self.submit(coroutine).result(timeout)

    def stop(self) -> None:
        """Cancel what is still running (relays of a finished program) and stop."""
        if not self._started:
            return

        async def cancel_all() -> None:
            import asyncio

            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(cancel_all()).result(timeout=5)
        except Exception:  # stopping must not fail
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self._started = False


def monotonic() -> float:
    return time.perf_counter()
