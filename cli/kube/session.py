"""One Kubernetes session, start to end: resolve the target, place the agent,
port-forward to it, and delete what was created when mtrace exits (normally,
on Ctrl-C, or on an error half-way through start-up)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import placement as placements
from .client import Kube, KubeError, KubeForbidden, KubeSettings, KubeUnreachable
from .portforward import connect as port_forward
from .resolve import KubeTarget, ResolvedTarget, resolve

if TYPE_CHECKING:
    from ...agent.client import AgentClient
    from ..config import Config

#: The agent's port on its pod's loopback: high and random, away from the
#: ports a workload listens on (the ephemeral agent shares the pod's network).
PORT_RANGE = (40000, 59999)


@dataclass
class Active:
    kube: Kube
    placement: placements.Placement | None = None
    target: ResolvedTarget | None = None


_active: list[Active] = []
_lock = threading.Lock()


def note(message: str) -> None:
    """What mtrace chose for the user (a pod among several, a container): always shown."""
    sys.stderr.write(f"mtrace: {message}\n")
    sys.stderr.flush()


async def connect(config: Config, target: KubeTarget, *, verbose: int,
                  progress: Callable[[str], None]) -> AgentClient:
    settings = KubeSettings(config.kubeconfig, config.kube_context, target.namespace)
    kube = await asyncio.to_thread(Kube, settings)
    active = Active(kube)
    with _lock:
        _active.append(active)
    deadline = time.monotonic() + config.agent.startup_timeout
    progress(f"resolving {target.describe()}...")
    resolved = await asyncio.to_thread(resolve, kube, target)
    active.target = resolved
    for message in resolved.notes:
        note(message)
    session = placements.new_session()
    port = random.randint(*PORT_RANGE)
    secret = placements.secrets.token_hex(16)
    agent = config.agent

    def place() -> placements.Placement:
        if agent.ephemeral:
            try:
                placed = placements.start_ephemeral(kube, resolved, agent, session=session,
                                                    port=port, secret=secret, write=agent.write)
                active.placement = placed
                return placed
            except placements.EphemeralUnavailable as error:
                note(f"ephemeral containers are unavailable here ({error.message}); "
                     f"running the agent as a Job on node {resolved.node}")
        with contextlib.suppress(KubeError):
            placements.sweep(kube, agent.namespace or resolved.namespace)
        placed = placements.start_job(kube, resolved, agent, session=session, port=port,
                                      secret=secret, write=agent.write)
        active.placement = placed
        return placed

    progress(f"starting the agent for {resolved.describe()}...")
    placed = await asyncio.to_thread(place)
    await asyncio.to_thread(placements.wait_started, kube, placed, agent, deadline, progress)
    progress(f"connecting to the agent in pod/{placed.pod} (port-forward)...")
    return await port_forward(
        kube, placed.namespace, placed.pod, port, secret, deadline=deadline,
        alive=lambda: placements.check_alive(kube, placed, agent))


def release_all() -> None:
    """Delete what every session of this process created; safe to call twice."""
    with _lock:
        actives, _active[:] = list(_active), []
    for active in actives:
        if active.placement is not None:
            with contextlib.suppress(KubeError, KubeUnreachable, KubeForbidden, OSError):
                placements.release(active.kube, active.placement)
        with contextlib.suppress(Exception):
            active.kube.close()


def explain_loss() -> str | None:
    """Why the agent went away, when the cluster can say (the pod deleted, evicted)."""
    with _lock:
        actives = list(_active)
    for active in actives:
        placed, resolved = active.placement, active.target
        if placed is None or resolved is None:
            continue
        try:
            pod = active.kube.get(f"/api/v1/namespaces/{resolved.namespace}/pods/{resolved.pod}")
        except KubeError as error:
            if "not found" in error.message:
                return f"the target pod/{resolved.pod} was deleted"
            return None
        if pod["metadata"].get("deletionTimestamp"):
            return f"the target pod/{resolved.pod} is being deleted"
        if pod["metadata"]["uid"] != resolved.uid:
            return f"the target pod/{resolved.pod} was replaced"
        status = pod.get("status") or {}
        if status.get("reason") == "Evicted":
            return f"the target pod/{resolved.pod} was evicted: {status.get('message', '')}"
        if placed.kind == "job":
            try:
                agent_pod = active.kube.get(f"/api/v1/namespaces/{placed.namespace}/pods/{placed.pod}")
            except KubeError:
                return f"the agent's pod/{placed.pod} was deleted"
            agent_status = agent_pod.get("status") or {}
            if agent_status.get("reason") == "Evicted":
                return f"the agent's pod/{placed.pod} was evicted: {agent_status.get('message', '')}"
    return None
