"""The seccomp user-notification backend: the supervisor's trap loop.

poll the listener (POLLHUP means every tracee process is gone), RECV into a
zeroed buffer, turn the number into a name, ask the handlers, carry out the
outcome, SEND. Memory is read before acting and the notification id is checked
with ID_VALID afterwards, so a call withdrawn meanwhile (its thread was killed)
is never answered with data that belongs to a reused thread id.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
from collections.abc import Callable
from typing import Any

from . import seccomp
from .backend import (
    AsyncSide,
    CallRecord,
    Handler,
    Handlers,
    Observer,
    decide,
    monotonic,
)
from .call import SyscallCall
from .errors import TraceeGone
from .memory import TraceeMemory
from .outcome import (
    AfterResult,
    Continue,
    Defer,
    Errno,
    InjectFd,
    OnTraceeFd,
    Outcome,
    ReplaceFd,
    ReturnValue,
    RewriteArgs,
)
from .syscalls import SyscallTable

log = logging.getLogger("mtrace.tracer.notify")


class NotifyBackend:
    sees_results = False

    def __init__(
        self,
        listener: seccomp.Listener,
        table: SyscallTable,
        handler: Handler,
        *,
        observer: Observer | None = None,
        async_side: AsyncSide | None = None,
    ) -> None:
        self.listener = listener
        self.table = table
        self.handler = handler
        self.observer = observer
        self.async_side = async_side
        self.memory = TraceeMemory()
        self.sync_wake_up = listener.set_sync_wake_up()
        self.calls_handled = 0

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Serve notifications until every process holding the filter is gone."""
        poll = select.poll()
        poll.register(self.listener.fd, select.POLLIN)
        wait = poll.poll
        names = self.table.names
        listener = self.listener
        receive_raw = listener.receive_raw
        head = seccomp.NOTIF_HEAD.unpack_from
        # Calls no handler wants continue straight from the loop (the
        # passthrough hot path): in C where bin/libmtrace-notify.so is built
        # (seccomp.NativeLoop), else here: two fields read from the kernel's
        # bytes, no notification or call object, one ioctl to answer, all
        # bound to locals once (a loop pass is what a passthrough call adds).
        wanted: set[int] | None = None
        if isinstance(self.handler, Handlers) and self.observer is None:
            handled = self.handler.names()
            wanted = {number for number, name in names.items() if name in handled}
            native = seccomp.native_loop(listener.fd, wanted)
            if native is not None:
                self._run_native(native, should_stop)
                return
        ioctl = fcntl.ioctl
        fd = listener.fd
        send = seccomp.NOTIF_SEND
        pack_continue = seccomp.NOTIF_RESP.pack
        flag_continue = seccomp.USER_NOTIF_FLAG_CONTINUE
        pollin = select.POLLIN
        passed = 0
        try:
            while True:
                events = wait(500)
                if not events:
                    if should_stop():
                        return
                    continue
                mask = events[0][1]
                if mask & pollin:
                    raw = receive_raw()
                    if raw is None:
                        continue
                    nid, nr = head(raw)
                    if wanted is not None and nr not in wanted:
                        try:
                            ioctl(fd, send, pack_continue(nid, 0, 0, flag_continue))
                        except OSError as exc:
                            if exc.errno != errno.ENOENT:  # ENOENT: withdrawn meanwhile
                                raise
                        passed += 1
                        continue
                    self._serve(seccomp.Notification.from_bytes(raw),
                                names.get(nr) or f"syscall_{nr}")
                    continue
                if mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return
        finally:
            self.calls_handled += passed

    def _run_native(self, native: seccomp.NativeLoop, should_stop: Callable[[], bool]) -> None:
        """The loop with its passthrough path in C: Python sees only the calls
        a handler wants."""
        names = self.table.names
        try:
            while True:
                raw = native.next(500)
                if raw is native.TIMEOUT:
                    if should_stop():
                        return
                    continue
                if raw == native.HUNG_UP:
                    return
                notification = seccomp.Notification.from_bytes(raw)
                self._serve(notification, names.get(notification.nr) or f"syscall_{notification.nr}")
        finally:
            self.calls_handled += native.passed

    def _serve(self, notification: seccomp.Notification, name: str) -> None:
        call = SyscallCall(notification.tid, name, notification.args, self.memory, False)
        started = monotonic()
        token = self.observer.on_call(call) if self.observer else None
        outcome = self._decide(call)
        self._carry_out(notification, call, outcome, started, token)

    def _decide(self, call: SyscallCall) -> Outcome:
        return decide(self.handler, call)

    def _carry_out(
        self,
        notification: seccomp.Notification,
        call: SyscallCall,
        outcome: Outcome,
        started: float,
        token: Any,
    ) -> None:
        nid = notification.id
        listener = self.listener
        result: int | None = None
        try:
            match outcome:
                case Continue():
                    listener.respond(nid, continue_=True)
                case Errno(errno=err):
                    listener.respond(nid, error=err)
                    result = -err
                case ReturnValue(value=value, writes=writes):
                    # A thread id names the caller only while its call waits:
                    # check before writing into it, not after (SEND itself
                    # reports a call withdrawn meanwhile).
                    if writes and not listener.is_valid(nid):
                        return
                    for address, data in writes:
                        call.write(address, data)
                    listener.respond(nid, value=value)
                    result = value
                case InjectFd(fd=fd, cloexec=cloexec, close_after=close_after, writes=writes):
                    try:
                        for address, data in writes:
                            call.write(address, data)
                        result = listener.inject_fd(nid, fd, cloexec=cloexec)
                    finally:
                        if close_after:
                            os.close(fd)
                case ReplaceFd(fd=fd, tracee_fd=tracee_fd, then=then, cloexec=cloexec):
                    try:
                        listener.inject_fd(nid, fd, cloexec=cloexec, target_fd=tracee_fd,
                                           send=False)
                    finally:
                        os.close(fd)
                    self._carry_out(notification, call, then, started, token)
                    return
                case OnTraceeFd(tracee_fd=tracee_fd, action=action):
                    acted = self._act_on_fd(nid, call, tracee_fd, action)
                    if acted is not None:
                        self._carry_out(notification, call, acted, started, token)
                    return
                case Defer(coroutine=coroutine):
                    self._defer(notification, call, coroutine, started, token)
                    return
                case AfterResult():
                    # Notify never sees results; handlers offer it only where
                    # call.sees_results (ptrace).
                    log.error("handler for %s asked notify to act after the result", call.name)
                    listener.respond(nid, error=errno.ENOSYS)
                    result = -errno.ENOSYS
                case RewriteArgs():
                    # Notify cannot change a waiting call's arguments; handlers
                    # offer it only where call.sees_results (ptrace).
                    log.error("handler for %s asked notify to rewrite arguments", call.name)
                    listener.respond(nid, error=errno.ENOSYS)
                    result = -errno.ENOSYS
        except TraceeGone:
            result = None
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return  # the call was withdrawn (the thread is gone)
            # The outcome could not be carried out (a write into a bad buffer,
            # an injection refused): the tracee sees the kernel's reason.
            try:
                listener.respond(nid, error=exc.errno or errno.EIO)
            except OSError:
                return
            result = -(exc.errno or errno.EIO)
        self.calls_handled += 1
        if self.observer is not None:
            self.observer.on_result(CallRecord(call, started, monotonic(), outcome, result), token)

    def _act_on_fd(self, notification_id: int, call: SyscallCall, tracee_fd: int,
                   action: Callable[[int], Outcome]) -> Outcome | None:
        """The outcome of ``action`` on the tracee's fd; None if the call is gone."""
        try:
            local_fd = seccomp.take_tracee_fd(call.tid, tracee_fd)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise TraceeGone(f"thread {call.tid} is gone") from exc
            return Errno(errno.EBADF if exc.errno in (errno.EBADF, errno.ENOENT) else exc.errno or errno.EIO)
        try:
            # A thread id names the caller only while its call waits: the fd
            # taken must not belong to whatever reused the id since.
            if not self.listener.is_valid(notification_id):
                return None
            return self._decide_with(action, local_fd)
        finally:
            os.close(local_fd)

    def _decide_with(self, action: Callable[[int], Outcome], local_fd: int) -> Outcome:
        try:
            return action(local_fd)
        except OSError as exc:
            return Errno(exc.errno or errno.EIO)

    def _defer(self, notification: seccomp.Notification, call: SyscallCall,
               coroutine: Any, started: float, token: Any) -> None:
        if self.async_side is None:
            coroutine.close()
            self._carry_out(notification, call, Errno(errno.ENOSYS), started, token)
            return

        async def finish() -> None:
            try:
                outcome = await coroutine
            except OSError as exc:
                outcome = Errno(exc.errno or errno.EIO)
            except Exception:
                log.exception("deferred handler for %s failed", call.name)
                outcome = Errno(errno.EIO)
            self._carry_out(notification, call, outcome, started, token)

        self.async_side.submit(finish())
