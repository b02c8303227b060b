"""``mtrace exec``: put a command under the trap, with or without a target.

Without a target every trapped call passes through (the program behaves as if
mtrace were not there). With one, the command starts only after the agent has
answered: its environment is the target's (merged per ``feature.env``) and the
files, network and DNS handlers route its calls to the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..tracer.signals import FORWARDED_SIGNALS
from .config import Config
from .errors import ConfigError, Interrupted, WriteBackFailed
from .scratch import session_directory

if TYPE_CHECKING:
    from concurrent.futures import Future

    from ..agent.client import AgentClient
    from ..tracer.backend import AsyncSide, CallRecord, Handler, Observer
    from ..tracer.call import SyscallCall
    from ..tracer.features.remote import RemoteContext
    from ..tracer.outcome import Outcome
    from .target import Target


T = TypeVar("T")


def resolve_executable(command: Sequence[str], env: dict[str, str]) -> str | None:
    """The program's path as execvp will find it (kept local by the files feature)."""
    if not command:
        return None
    found = shutil.which(command[0], path=env.get("PATH"))
    return os.path.realpath(found) if found else None


def run_plain(command: Sequence[str], config: Config) -> int:
    from ..tracer.session import Session, run

    return run(Session(argv=command, backend=config.backend))


def run_with_target(command: Sequence[str], config: Config, *, verbose: int = 0,
                    observer: Observer | None = None,
                    trapped: Sequence[str] | None = None, quiet: bool = False) -> int:
    """Run ``command`` in the target's context; ``observer`` sees each trapped
    call (``mtrace trace --target``), ``trapped`` narrows what is shown (every
    call the features need is trapped all the same)."""
    # Imported here: a run without a target should not pay for asyncio and the
    # agent client at start-up.
    from .target import target_of

    target: Target | None = target_of(config)
    if target is None and not config.agent.address:
        raise ConfigError("no target", hint="pass --target pid/N or --agent HOST:PORT")
    # Signals meant for the program are blocked before the first thread starts,
    # so every thread inherits the mask and only the session's forwarder takes
    # them (otherwise a Ctrl-C landing on the agent's thread stops mtrace).
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        return _run_with_target(command, config, target, verbose, observer, trapped, quiet)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _run_with_target(command: Sequence[str], config: Config, target: Target | None,
                     verbose: int, observer: Observer | None,
                     trapped: Sequence[str] | None, quiet: bool = False) -> int:
    from .target import connect_agent, fork_local_agent, progress, release_agent, replica_provider

    # Forked before the first thread starts (the async side's), and before the
    # tracer's modules are imported: the agent's own start-up (its imports, the
    # target's namespace) runs on the other core while they load.
    forked = fork_local_agent(config, target, verbose=verbose)
    from ..tracer.backend import AsyncSide
    from ..tracer.features.env import merge_environment, read_env_file
    from ..tracer.features.remote import RemoteContext
    side = AsyncSide()
    client: AgentClient | None = None
    with session_directory() as session_dir:
        try:
            where = config.agent.address or (target.describe() if target else "")
            if target is None or target.kube is None or config.agent.address:
                # A Kubernetes session says its own steps, starting with resolving the target.
                progress(f"connecting to the agent for {where}...")
            connecting = side.submit(connect_agent(config, target, verbose=verbose, forked=forked))
            # Imported while the agent starts (a forked local agent runs on the
            # other core): these modules are most of what is left to load.
            from ..tracer import session  # noqa: F401
            from ..tracer.features import files, incoming, net  # noqa: F401
            client = _wait(side, connecting, config.agent.startup_timeout + 5,
                           "the start-up handshake")
            # Both asked at once: the environment does not wait for the ping's answer.
            environ = side.submit(client.environ()) if config.feature.env.enabled else None
            latency = _wait(side, client.ping(), 10, "a ping")
            progress(f"agent ready ({latency * 1000:.1f} ms round trip)")
            from . import summary

            summary.show(summary.feature_lines(config, where, client.target_hostname),
                         verbose=verbose, quiet=quiet)
            target_env = (_wait(side, environ, 30, "the environment request")
                          if environ is not None else {})
            env_file = (read_env_file(config.feature.env.env_file)
                        if config.feature.env.env_file else None)
            env = merge_environment(os.environ, target_env, config.feature.env, env_file)
            local_target = (target is not None and target.kind == "pid"
                            and not config.agent.address)
            context = RemoteContext(client=client, async_side=side, features=config.feature,
                                    session_dir=session_dir,
                                    executable=resolve_executable(command, env),
                                    target_network=(f"/proc/{target.pid}/ns/net"
                                                    if local_target and target is not None
                                                    else None),
                                    replica_agents=replica_provider(config, target))
            return _serve_remote(command, config, context, env, observer, trapped)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    side.call(client.close(), timeout=5)
            elif forked is not None:
                forked.abandon()
            side.stop()
            release_agent()


def _wait(side: AsyncSide, work: Coroutine[Any, Any, T] | Future[T], timeout: float,
          what: str) -> T:
    """Wait for start-up work on the agent (a coroutine, or one already
    submitted), but never past ``timeout`` and never deaf to Ctrl-C: the
    forwarded signals are blocked by now, so they are looked for while waiting."""
    import concurrent.futures

    from ..agent.errors import AgentUnavailable

    future = work if isinstance(work, concurrent.futures.Future) else side.submit(work)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(timeout=0.1)
        except concurrent.futures.TimeoutError:
            pass
        pending = signal.sigpending() & set(FORWARDED_SIGNALS)
        if pending:
            future.cancel()
            signum = min(pending)
            signal.sigtimedwait([signum], 0)  # consumed: it was for us, not a program
            raise Interrupted(f"interrupted by {signal.Signals(signum).name} while starting")
        if time.monotonic() > deadline:
            future.cancel()
            raise AgentUnavailable(f"the agent did not answer {what} within {timeout:.0f} s",
                                   hint="run with -v to see the agent's log")


def _serve_remote(command: Sequence[str], config: Config, context: RemoteContext,
                  env: dict[str, str], observer: Observer | None,
                  shown: Sequence[str] | None) -> int:
    from ..tracer.backend import Handlers
    from ..tracer.features import files, hostname, incoming, net
    from ..tracer.session import Session, run
    from ..tracer.syscalls import DEFAULT_TRAPPED

    side = context.async_side
    files_feature = files.FilesFeature(context)
    outgoing = net.setup(context)
    incoming_feature = incoming.setup(context, outgoing)
    table = {**files_feature.handlers(), **outgoing.handlers(), **incoming_feature.handlers()}
    target_hostname = context.client.target_hostname if config.feature.hostname else None
    if target_hostname:
        table.update(hostname.handlers(target_hostname))
    if observer is not None:
        table = _showing_results(table)
    handlers = Handlers(table)
    trapped = tuple(dict.fromkeys([*DEFAULT_TRAPPED, *files.trapped_for(config.feature.fs),
                                   *net.TRAPPED, *incoming.TRAPPED,
                                   *(hostname.TRAPPED if target_hostname else ()),
                                   *(shown or ())]))
    if observer is not None and shown:
        observer = _ShownOnly(observer, set(shown))
    watcher = side.submit(_watch_agent(context.client, context))
    try:
        code = run(Session(argv=command, handlers=handlers, trapped=trapped, env=env,
                           async_side=side, backend=config.backend, observer=observer,
                           trap_if_nonzero=net.TRAP_IF_NONZERO))
    finally:
        # The program is gone: write changed files back, then close the relays;
        # the agent closing after this is not a failure to report.
        context.closing = True
        watcher.cancel()
        with contextlib.suppress(Exception):
            side.call(files_feature.flush(), timeout=30)
        files_feature.close()
        with contextlib.suppress(Exception):
            side.call(incoming_feature.close(), timeout=5)
        with contextlib.suppress(Exception):
            side.call(outgoing.close(), timeout=5)
    code = _report_unsaved(files_feature.unsaved(), code)
    return _report_agent_lost(context, code)


def _report_agent_lost(context: RemoteContext, code: int) -> int:
    """A program that succeeded while the agent was lost under it (part of its
    run was not in the target's context) makes mtrace exit 71, the agent's
    code; the line saying so was printed when it happened. A target that exited
    is the target's business: the program's code stands."""
    from ..agent.errors import AgentUnavailable, TargetExited

    if code != 0 or not context.agent_lost or isinstance(context.client.failure, TargetExited):
        return code
    return AgentUnavailable.exit_code


def _report_unsaved(unsaved: list[bytes], code: int) -> int:
    """Changes the program made that never reached the target: one line, and
    exit status 74 when the program itself succeeded (its own failure code wins)."""
    if not unsaved:
        return code
    names = ", ".join(os.fsdecode(path) for path in unsaved[:3])
    more = f" and {len(unsaved) - 3} more" if len(unsaved) > 3 else ""
    sys.stderr.write(
        f"mtrace: error: changes to {names}{more} did not reach the target (the upload "
        "failed; the target keeps its previous version)\n"
        "mtrace: hint: run with -v to see why; the program's close/fsync of it returned EIO\n")
    return code if code != 0 else WriteBackFailed.exit_code


def _showing_results(table: dict[str, Handler]) -> dict[str, Handler]:
    """For `mtrace trace --target`: where a feature lets a call continue locally,
    make it the way the passthrough handlers do, so its result shows too."""
    from ..tracer.outcome import CONTINUE
    from ..tracer.passthrough import RESULT_HANDLERS

    def chained(feature: Handler, local: Handler) -> Handler:
        def handle(call: SyscallCall) -> Outcome:
            outcome = feature(call)
            return local(call) if outcome is CONTINUE else outcome

        return handle

    merged = dict(RESULT_HANDLERS)
    for name, handler in table.items():
        merged[name] = chained(handler, RESULT_HANDLERS[name]) if name in RESULT_HANDLERS else handler
    return merged


class _ShownOnly:
    """An observer that passes on only the calls the user asked to see."""

    def __init__(self, observer: Observer, names: set[str]) -> None:
        self.observer = observer
        self.names = names

    def on_call(self, call: SyscallCall) -> Any:
        return self.observer.on_call(call) if call.name in self.names else None

    def on_result(self, record: CallRecord, token: Any) -> None:
        if record.call.name in self.names:
            self.observer.on_result(record, token)


async def _watch_agent(client: AgentClient, context: RemoteContext) -> None:
    """Say once, clearly, that the agent is gone; remote calls fail from then on."""
    from ..agent.errors import TargetExited

    why = await client.wait_closed()
    if context.closing:
        return
    context.agent_lost = True
    import asyncio

    from .target import explain_agent_loss

    if isinstance(why, TargetExited):
        what = why.message
    else:
        # What the cluster says, else why the client gave up (a stalled frame, a
        # frame that failed authentication) when that says more than "lost".
        detail = await asyncio.to_thread(explain_agent_loss) or (
            None if why.message.startswith("lost the connection") else why.message)
        what = f"lost the connection to the agent{f' ({detail})' if detail else ''}"
    sys.stderr.write(
        f"mtrace: error: {what}; the program's remote operations "
        "now fail (files: EIO, open connections: ECONNRESET, new ones: ENETUNREACH)\n")
    sys.stderr.flush()
