"""One Kubernetes session, start to end: resolve the target, place the agent,
port-forward to it, and delete what was created when mtrace exits (normally,
on Ctrl-C, or on an error half-way through start-up).

Ctrl-C can land while a thread is creating an object (the API has made it,
its answer is not read yet): every creation holds its session's lock until
the object is recorded, and :func:`release_all` takes that lock, so it waits
for the answer and deletes what was made; a creation that starts after the
release is refused. An ephemeral agent cannot be deleted: one that no client
reached is connected to and left, so it exits (``--one-client``) instead of
waiting for ``agent.ttl``.

Incoming traffic of a workload with several ready pods covers them all:
:func:`start_replicas` (called when the program first listens) puts an agent
in each other ready pod, placed as the first one was."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import Interrupted
from . import copies
from . import placement as placements
from .client import Kube, KubeError, KubeForbidden, KubeNotFound, KubeSettings, KubeUnreachable
from .portforward import connect as port_forward
from .resolve import KubeTarget, NoReadyPod, ResolvedTarget, ready_pods, resolve

if TYPE_CHECKING:
    from ...agent.client import AgentClient
    from ..config import AgentConfig, Config

#: The agent's port on its pod's loopback: high and random, away from the
#: ports a workload listens on (the ephemeral agent shares the pod's network).
PORT_RANGE = (40000, 59999)


@dataclass
class Active:
    kube: Kube
    placement: placements.Placement | None = None
    target: ResolvedTarget | None = None
    copy: copies.Copy | None = None
    agent: AgentConfig | None = None
    reached: bool = False  # a client authenticated to the agent (it exits when that one leaves)
    released: bool = False
    replica: bool = False  # an agent in another replica, for incoming traffic only
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Hold off :func:`release_all` while an object is created and recorded."""
        with self.lock:
            if self.released:
                raise Interrupted("interrupted while starting")
            yield

    def cancelled(self) -> bool:
        return self.released


_active: list[Active] = []
_lock = threading.Lock()
_noted: set[str] = set()


def note(message: str) -> None:
    """What mtrace chose for the user (a pod among several, a container): always
    shown, once (the agents of several replicas make the same choices)."""
    if message in _noted:
        return
    _noted.add(message)
    sys.stderr.write(f"mtrace: {message}\n")
    sys.stderr.flush()


def incoming_mode(config: Config) -> str:
    return config.feature.network.incoming_config.mode


def _quiet(_message: str) -> None:
    pass


async def connect(config: Config, target: KubeTarget, *, verbose: int,
                  progress: Callable[[str], None] | None,
                  timings: dict[str, float] | None = None) -> AgentClient:
    """The agent for ``target``, authenticated; ``progress`` hears each step
    (None: nothing is shown, and nothing is asked of the API only to show it);
    ``timings`` (bench) gets each phase's seconds."""
    clock = _Clock(timings)
    say = progress or _quiet
    settings = KubeSettings(config.kubeconfig, config.kube_context, target.namespace)
    kube = await asyncio.to_thread(Kube, settings)
    clock.lap("kubeconfig")
    active = Active(kube, agent=config.agent)
    with _lock:
        _active.append(active)
    deadline = time.monotonic() + config.agent.startup_timeout
    if target.kind == "targetless":
        return await _targetless(config, kube, active, target, deadline, progress)
    say(f"resolving {target.describe()}...")
    session = placements.new_session()
    copy_target = config.feature.copy_target
    wants_copy = copy_target is not False
    resolved: ResolvedTarget | None = None
    if not wants_copy:
        try:
            resolved = await asyncio.to_thread(resolve, kube, target)
        except NoReadyPod as error:
            if target.kind not in ("job", "cronjob") or error.template is None or not error.template.spec:
                raise
            note(f"{target.describe()} has no running pod; running a copy of its pod template")
            wants_copy = True
    if resolved is None:
        namespace = target.namespace or kube.namespace
        scale_down = not isinstance(copy_target, bool) and copy_target.scale_down

        def make() -> copies.Copy:
            with active.creating():
                made = copies.make_copy(kube, target, namespace, session, scale_down=scale_down)
                active.copy = made
            return made

        say(f"starting a copy of {target.describe()}...")
        made = await asyncio.to_thread(make)
        await asyncio.to_thread(copies.wait_ready, kube, made, deadline, active.cancelled)
        resolved = await asyncio.to_thread(
            resolve, kube, KubeTarget("pod", made.pod, target.container, namespace))
        note(f"targeting pod/{made.pod}, a copy of {target.describe()} (deleted at exit)")
    active.target = resolved
    clock.lap("resolve (API)")
    for message in resolved.notes:
        note(message)
    port = random.randint(*PORT_RANGE)
    secret = placements.secrets.token_hex(16)
    agent = config.agent

    def place() -> placements.Placement:
        if agent.ephemeral:
            try:
                with active.creating():
                    placed = placements.start_ephemeral(kube, target_pod, agent, session=session,
                                                        port=port, secret=secret, write=agent.write,
                                                        incoming=incoming_mode(config))
                    active.placement = placed
                return placed
            except placements.EphemeralUnavailable as error:
                note(f"ephemeral containers are unavailable here ({error.message}); "
                     f"running the agent as a Job on node {target_pod.node}")
        with contextlib.suppress(KubeError):
            placements.sweep(kube, agent.namespace or target_pod.namespace)
        with active.creating():
            placed = placements.start_job(kube, target_pod, agent, session=session, port=port,
                                          secret=secret, write=agent.write,
                                          incoming=incoming_mode(config))
            active.placement = placed
        return placed

    target_pod = resolved
    say(f"starting the agent for {resolved.describe()}...")
    placed = await asyncio.to_thread(place)
    clock.lap("place agent (API)")
    await asyncio.to_thread(placements.wait_started, kube, placed, agent, deadline, progress,
                            active.cancelled)
    clock.lap("agent container start")
    say(f"connecting to the agent in pod/{placed.pod} (port-forward)...")
    client = await port_forward(
        kube, placed.namespace, placed.pod, port, secret, deadline=deadline,
        alive=lambda: placements.check_alive(kube, placed, agent),
        startup_timeout=agent.startup_timeout)
    active.reached = True
    clock.lap("port-forward + handshake")
    return client


class _Clock:
    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


async def _targetless(config: Config, kube: Kube, active: Active, target: KubeTarget,
                      deadline: float, progress: Callable[[str], None] | None) -> AgentClient:
    """An agent pod with no target: the cluster's network and DNS, the agent's own files."""
    say = progress or _quiet
    agent = config.agent
    namespace = agent.namespace or target.namespace or kube.namespace
    session = placements.new_session()
    port = random.randint(*PORT_RANGE)
    secret = placements.secrets.token_hex(16)

    def place() -> placements.Placement:
        with contextlib.suppress(KubeError):
            placements.sweep(kube, namespace)
        with active.creating():
            placed = placements.start_job(kube, None, agent, session=session, port=port,
                                          secret=secret, write=agent.write, namespace=namespace)
            active.placement = placed
        return placed

    say(f"starting a targetless agent in namespace {namespace}...")
    placed = await asyncio.to_thread(place)
    await asyncio.to_thread(placements.wait_started, kube, placed, agent, deadline, progress,
                            active.cancelled)
    say(f"connecting to the agent in pod/{placed.pod} (port-forward)...")
    client = await port_forward(
        kube, placed.namespace, placed.pod, port, secret, deadline=deadline,
        alive=lambda: placements.check_alive(kube, placed, agent),
        startup_timeout=agent.startup_timeout)
    active.reached = True
    return client


async def start_replicas(config: Config, target: KubeTarget) -> list[AgentClient]:
    """Agents in the other ready pods of the session's workload (incoming
    traffic only), started in parallel; a pod whose agent fails is said and
    skipped. None for a pod target, a copy, or a workload of one ready pod."""
    with _lock:
        primary = next((active for active in _active
                        if not active.replica and active.target is not None), None)
    if (primary is None or primary.copy is not None or primary.target is None
            or target.kind in ("pod", "targetless")):
        return []
    chosen = primary.target
    others = [pod for pod in await asyncio.to_thread(ready_pods, primary.kube, target)
              if pod.pod != chosen.pod]
    if not others:
        return []
    mode = incoming_mode(config)
    note(f"incoming: {mode} in every ready pod of {target.describe()}: agents in "
         + ", ".join(f"pod/{pod.pod}" for pod in others) + " too")
    deadline = time.monotonic() + config.agent.startup_timeout
    results = await asyncio.gather(
        *(_start_replica(config, primary.kube, pod, deadline) for pod in others),
        return_exceptions=True)
    clients: list[AgentClient] = []
    for pod, result in zip(others, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            detail = getattr(result, "message", None) or str(result)
            note(f"incoming: no agent in pod/{pod.pod} ({detail}): the program gets none "
                 "of that pod's traffic")
        else:
            clients.append(result)
    return clients


async def _start_replica(config: Config, kube: Kube, pod: ResolvedTarget,
                         deadline: float) -> AgentClient:
    """One replica's agent: the primary's placement rules, and its own session,
    port and secret; created under the same Ctrl-C guard as the primary's."""
    active = Active(kube, target=pod, agent=config.agent, replica=True)
    with _lock:
        _active.append(active)
    session = placements.new_session()
    port = random.randint(*PORT_RANGE)
    secret = placements.secrets.token_hex(16)
    agent, mode = config.agent, incoming_mode(config)

    def place() -> placements.Placement:
        if agent.ephemeral:
            try:
                with active.creating():
                    active.placement = placements.start_ephemeral(
                        kube, pod, agent, session=session, port=port, secret=secret, write=False,
                        incoming=mode)
                return active.placement
            except placements.EphemeralUnavailable as error:
                note(f"ephemeral containers are unavailable here ({error.message}); "
                     f"running the agent as a Job on node {pod.node}")
        with active.creating():
            active.placement = placements.start_job(kube, pod, agent, session=session, port=port,
                                                    secret=secret, write=False, incoming=mode)
        return active.placement

    placed = await asyncio.to_thread(place)
    await asyncio.to_thread(placements.wait_started, kube, placed, agent, deadline, None,
                            active.cancelled)
    client = await port_forward(
        kube, placed.namespace, placed.pod, port, secret, deadline=deadline,
        alive=lambda: placements.check_alive(kube, placed, agent),
        startup_timeout=agent.startup_timeout)
    active.reached = True
    return client


def release_all() -> None:
    """Delete what every session of this process created; safe to call twice.

    Waits for a creation in flight (another thread) to be recorded first."""
    with _lock:
        actives, _active[:] = list(_active), []
    for active in actives:
        with active.lock:
            active.released = True
        if active.placement is not None:
            with contextlib.suppress(KubeError, KubeUnreachable, KubeForbidden, OSError):
                placements.release(active.kube, active.placement)
            if active.placement.kind == "ephemeral" and not active.reached and active.agent:
                _stop_unreached(active.kube, active.placement, active.agent)
        if active.copy is not None:
            with contextlib.suppress(KubeError, OSError):
                copies.remove(active.kube, active.copy)
        with contextlib.suppress(Exception):
            active.kube.close()


#: How long stopping an agent no client reached may take (its container may still be starting).
STOP_UNREACHED_SECONDS = 15.0


def _stop_unreached(kube: Kube, placed: placements.Placement, agent: AgentConfig) -> None:
    """Connect to an ephemeral agent no client reached and leave, so it exits
    now rather than after ``agent.ttl`` (its container cannot be deleted)."""
    from ...agent.errors import AgentError

    deadline = time.monotonic() + STOP_UNREACHED_SECONDS

    async def reach_and_leave() -> None:
        client = await port_forward(kube, placed.namespace, placed.pod, placed.port, placed.secret,
                                    deadline=deadline,
                                    alive=lambda: placements.check_alive(kube, placed, agent))
        await client.close()

    try:
        asyncio.run(reach_and_leave())
    except (AgentError, KubeError, OSError, RuntimeError):
        pass  # it exits after agent.ttl all the same


def explain_loss() -> str | None:
    """Why the agent went away, when the cluster can say (a pod deleted, evicted).

    An eviction through the API (``kubectl drain``, the Eviction subresource)
    deletes the pod like ``kubectl delete`` does and, on 1.20, marks it in no
    way (newer clusters add a ``DisruptionTarget`` condition, not read here);
    only the kubelet's own evictions set the reason ``Evicted``."""
    with _lock:
        actives = list(_active)
    for active in actives:
        placed, resolved = active.placement, active.target
        if placed is None or resolved is None or active.replica:
            continue
        said = _pod_gone(active.kube, "the target", resolved.namespace, resolved.pod, resolved.uid)
        if said is None and placed.kind == "job" and placed.pod:
            said = _pod_gone(active.kube, "the agent's", placed.namespace, placed.pod)
        if said is not None:
            return said
    return None


def _pod_gone(kube: Kube, whose: str, namespace: str, name: str,
              uid: str | None = None) -> str | None:
    """What happened to a pod that should still be running, or None if it is."""
    try:
        pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
    except KubeNotFound:
        return f"{whose} pod/{name} was deleted or evicted"
    except KubeError:
        return None
    if pod["metadata"].get("deletionTimestamp"):
        return f"{whose} pod/{name} was deleted or evicted"  # and is terminating
    if uid is not None and pod["metadata"]["uid"] != uid:
        return f"{whose} pod/{name} was replaced"
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return f"{whose} pod/{name} was evicted: {status.get('message', '')}"
    return None
