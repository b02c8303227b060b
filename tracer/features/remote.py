"""What handlers of remote features share: the agent connection, the async
side it lives on, the user's feature config and the session's scratch space.

Handler modules (``files``, ``net``, ``dns``) each expose
``handlers(context) -> dict[str, Handler]`` and the names they trap; the session
merges them. A handler answers fast decisions inline (local passthrough,
cached metadata) and returns ``Defer(coroutine)`` for anything that needs the
agent: the coroutine runs on ``context.async_side.loop``, where
``context.client`` lives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ...agent.client import AgentClient
from ..backend import AsyncSide
from .policy import FeatureConfig

T = TypeVar("T")


class RemoteContext(msgspec.Struct):
    client: AgentClient
    async_side: AsyncSide
    features: FeatureConfig
    # Per-session scratch directory (shadow tree, relay sockets); removed at exit.
    session_dir: Path
    # The program being run, as the user named it and resolved: always local.
    executable: str | None = None
    # Set when the agent connection is lost; handlers then fail remote calls
    # with a real errno (EIO, ECONNRESET) instead of waiting.
    agent_lost: bool = False
    # Set when the session is ending: the agent closing then is not a failure.
    closing: bool = False
    # The target's network namespace when it is on this machine (pid/N with a
    # local agent): outgoing TCP takes the direct path (features/direct.py).
    target_network: str | None = None
    # Agents in the target's other replicas (a workload of several ready pods),
    # started on first use: incoming traffic subscribes in each of them too.
    replica_agents: Callable[[], Awaitable[list[AgentClient]]] | None = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the agent's loop and wait (start-up work only,
        never from the trap loop); an agent that does not answer in time is
        AgentUnavailable, not a hang."""
        import concurrent.futures

        from ...agent.errors import AgentUnavailable

        try:
            return self.async_side.call(coroutine, timeout)
        except concurrent.futures.TimeoutError:
            raise AgentUnavailable(f"the agent did not answer within {timeout} s",
                                   hint="run with -v to see the agent's log") from None
