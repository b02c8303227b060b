"""Where the agent runs, and making sure it stops.

* ``ephemeral`` (default): an ephemeral container in the target pod with
  ``targetContainerName``, so it shares the target container's PID namespace
  (and, as every container of the pod, its network). No hostPID, no
  privileged pod: it asks only for ``SYS_PTRACE`` (to read another user's
  ``/proc/PID/root`` and ``environ``). The 1.20 API (an
  ``EphemeralContainers`` object, get then update) or the current one (a
  strategic-merge patch of the Pod), chosen by the server's version.
* ``job``: a Job pinned to the target's node, ``hostPID``, ``SYS_ADMIN`` and
  ``SYS_PTRACE`` (to join the target's network namespace); the agent finds
  the target container's process by its container ID in ``/proc/*/cgroup``.

Either way the agent listens on the loopback of its own pod, exits when its
one client leaves (``--one-client``) or if none came within ``agent.ttl``.
Every object carries :data:`MANAGED_BY` and :data:`SESSION_LABEL`.

Incoming traffic adds to what the agent asks for (:func:`agent_capabilities`):
``NET_RAW`` for mirror, ``NET_ADMIN`` for steal. Where an ephemeral container
cannot have them (no securityContext before 1.23, and the runtime's defaults
lack them), a steal runs the agent as the Job instead
(:class:`CapabilitiesUnavailable`).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...agent.errors import AgentError, AgentUnavailable
from .client import (
    MANAGED_BY,
    MANAGED_BY_VALUE,
    SESSION_LABEL,
    Kube,
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeNotFound,
    KubeRejected,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import AgentConfig
    from .resolve import ResolvedTarget

AGENT_SECRET_VARIABLE = "MTRACE_AGENT_SECRET"
#: activeDeadlineSeconds of an agent Job: a backstop should everything else fail.
MAX_SESSION_SECONDS = 24 * 3600
_IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
                 "ImageInspectError", "RegistryUnavailable"}
_CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                  "PreCreateHookError", "PreStartHookError"}


@dataclass
class Placement:
    """A started agent: the pod to port-forward to and what to delete at the end."""

    kind: str  # "ephemeral" or "job"
    namespace: str
    pod: str  # the pod the agent runs in (the target's, or the Job's)
    container: str
    port: int
    secret: str
    session: str
    job: str | None = None
    created: list[str] = field(default_factory=list)  # API paths to delete at exit


#: What incoming traffic needs from the agent in the target's network namespace:
#: mirror opens an AF_PACKET socket; steal installs nat redirect rules and marks
#: the agent's own connections to the target (SO_MARK).
INCOMING_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "off": (), "mirror": ("NET_RAW",), "steal": ("NET_ADMIN",)}
#: Container runtimes (the containerID's scheme) whose default capability set,
#: what a container asking for nothing gets, includes NET_RAW (Docker's and
#: containerd's do; CRI-O's has not since 1.18). None includes NET_ADMIN.
_NET_RAW_BY_DEFAULT = ("docker", "containerd")


def default_capabilities_lack(container_id: str, incoming: str) -> list[str]:
    """What ``incoming`` needs that a container of this runtime does not get by default."""
    runtime = container_id.partition("://")[0]
    granted = {"NET_RAW"} if runtime in _NET_RAW_BY_DEFAULT else set()
    return [name for name in INCOMING_CAPABILITIES.get(incoming, ()) if name not in granted]


def new_session() -> str:
    return secrets.token_hex(4)


def labels(session: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**(extra or {}), MANAGED_BY: MANAGED_BY_VALUE, SESSION_LABEL: session}


def agent_argv(port: int, container_id: str | None, ttl: int, write: bool) -> list[str]:
    # --allow-plaintext: the agent listens on its pod's loopback, reached only
    # through the API server's port-forward (TLS to the API server, the
    # kubelet's own channel to the pod), so the session does not seal frames
    # a second time and the image needs no crypto library (docs/design.md).
    argv = ["python3", "-m", "mtrace.agent", "--listen", f"127.0.0.1:{port}", "--one-client",
            "--ttl", str(ttl), "--allow-plaintext"]
    if container_id:
        argv += ["--target-container-id", container_id]
    if write:
        argv.append("--write")
    return argv


def agent_capabilities(kind: str, incoming: str = "off", *, targeted: bool = True) -> list[str]:
    """The capabilities the agent asks for, from its placement and the session's features.

    ``ephemeral``: ``SYS_PTRACE`` (``/proc/PID/root`` and ``environ`` of
    another user's process are ptrace-mode accesses). ``job``: also
    ``SYS_ADMIN`` (``setns`` into the target's network namespace). Incoming
    traffic adds what its mode needs (:data:`INCOMING_CAPABILITIES`). A
    targetless agent asks for nothing. Before 1.23 an ephemeral container
    takes no securityContext at all (checked on the 1.20 rig): there the
    runtime's default set applies whatever this says (docs/kubernetes.md).
    """
    if not targeted:
        return []
    base = ["SYS_ADMIN", "SYS_PTRACE"] if kind == "job" else ["SYS_PTRACE"]
    return [*base, *INCOMING_CAPABILITIES.get(incoming, ())]


def agent_container(name: str, agent: AgentConfig, argv: list[str], secret: str,
                    capabilities: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": agent.image,
        "imagePullPolicy": agent.image_pull_policy,
        "command": argv,
        "env": [{"name": AGENT_SECRET_VARIABLE, "value": secret}],
        "securityContext": ({"privileged": True} if agent.privileged
                            else {"capabilities": {"add": capabilities}}),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "stdin": False,
        "tty": False,
    }
    if agent.resources:
        container["resources"] = agent.resources
    return container


# --- ephemeral container ---

def start_ephemeral(kube: Kube, target: ResolvedTarget, agent: AgentConfig, *,
                    session: str, port: int, secret: str, write: bool,
                    incoming: str = "off") -> Placement:
    name = f"mtrace-agent-{session}"
    container = agent_container(name, agent, agent_argv(port, target.container_id, agent.ttl, write),
                                secret, agent_capabilities("ephemeral", incoming))
    container["targetContainerName"] = target.container
    try:
        _add_ephemeral(kube, target, container)
    except KubeRejected as error:
        if "securityContext" not in error.message:
            raise
        lacking = default_capabilities_lack(target.container_id, incoming)
        if incoming == "steal" and lacking:
            # Nothing was added to the pod: the node agent can have them.
            raise CapabilitiesUnavailable(
                f"steal needs {' and '.join(lacking)}: before Kubernetes 1.23 an ephemeral "
                "container takes no securityContext, and the runtime's defaults lack it"
                ) from error
        # Before 1.23 an ephemeral container may not have a securityContext: the
        # agent runs with the runtime's default capabilities, which read /proc of a
        # process of the same user (a target running as another user is refused).
        del container["securityContext"]
        _add_ephemeral(kube, target, container)
    except KubeForbidden as error:
        if agent.privileged or not _refuses_capabilities(error.message):
            raise
        if incoming == "steal":
            needed = " and ".join(INCOMING_CAPABILITIES["steal"])
            raise AdmissionRefused(
                f"admission refused the agent's ephemeral container, which needs {needed} "
                f"to steal: {error.message}",
                hint="ask for an exemption for the agent, or use --incoming mirror "
                     "(NET_RAW) or off") from error
        if INCOMING_CAPABILITIES.get(incoming) and _without_incoming(kube, target, container):
            # Mirror (the default) without NET_RAW: the session goes on, and the
            # program is told when it listens that nothing can be mirrored.
            return Placement("ephemeral", target.namespace, target.pod, name, port, secret, session)
        # Pod Security "baseline" refuses SYS_PTRACE: ask for nothing and run
        # as the target's user instead (same uid: /proc access needs no capability).
        container["securityContext"] = {"capabilities": {"drop": ["ALL"]},
                                        "allowPrivilegeEscalation": False}
        user = _run_as_user(target)
        if user is not None:
            container["securityContext"]["runAsUser"] = user
        try:
            _add_ephemeral(kube, target, container)
        except (KubeForbidden, KubeRejected) as again:
            raise AdmissionRefused(
                f"admission refused the agent's ephemeral container: {again.message}",
                hint="the namespace's policy refuses even an agent with no capabilities; ask "
                     "for an exemption, or try the node placement (agent.ephemeral = false)",
            ) from again
    return Placement("ephemeral", target.namespace, target.pod, name, port, secret, session)


def _without_incoming(kube: Kube, target: ResolvedTarget, container: dict[str, Any]) -> bool:
    """Ask again with only what the agent needs without incoming traffic; False
    when admission refuses that too (for its capabilities)."""
    container["securityContext"] = {"capabilities": {"add": agent_capabilities("ephemeral")}}
    try:
        _add_ephemeral(kube, target, container)
    except KubeForbidden as error:
        if not _refuses_capabilities(error.message):
            raise
        return False
    return True


def _refuses_capabilities(message: str) -> bool:
    lowered = message.lower()
    return "podsecurity" in lowered or "capabilit" in lowered


def _run_as_user(target: ResolvedTarget) -> int | None:
    spec = target.pod_object["spec"]
    for container in spec["containers"]:
        if container["name"] == target.container:
            user = (container.get("securityContext") or {}).get("runAsUser")
            if user is not None:
                return int(user)
    user = (spec.get("securityContext") or {}).get("runAsUser")
    return int(user) if user is not None else None


def _add_ephemeral(kube: Kube, target: ResolvedTarget, container: dict[str, Any]) -> None:
    path = f"/api/v1/namespaces/{target.namespace}/pods/{target.pod}/ephemeralcontainers"
    try:
        if kube.server_version() >= (1, 22):
            kube.request("PATCH", path, {"spec": {"ephemeralContainers": [container]}},
                         content_type="application/strategic-merge-patch+json")
        else:
            # 1.16-1.21: the subresource is an EphemeralContainers object, read
            # and written back whole; the kubelet's status updates change the
            # pod in between (409), so read again and retry.
            for attempt in range(5):
                current = kube.get(path)
                current["ephemeralContainers"] = [*(current.get("ephemeralContainers") or []),
                                                  container]
                try:
                    kube.request("PUT", path, current)
                    break
                except KubeConflict:
                    if attempt == 4:
                        raise
    except KubeForbidden as error:
        if _refuses_capabilities(error.message):
            raise  # admission, not RBAC: the caller may ask for less
        raise EphemeralUnavailable(error.message) from error
    except KubeNotFound as error:
        if "ephemeralcontainers" in error.message or "the server could not find" in error.message:
            raise EphemeralUnavailable(
                "this cluster does not serve pods/ephemeralcontainers "
                "(the EphemeralContainers feature gate is off before 1.23)") from error
        raise
    except KubeRejected as error:
        if "not supported" in error.message.lower():
            raise EphemeralUnavailable(error.message) from error
        raise


class EphemeralUnavailable(KubeError):
    """Ephemeral containers are off or forbidden here: the caller falls back to a Job."""


class CapabilitiesUnavailable(EphemeralUnavailable):
    """An ephemeral container cannot have what incoming traffic needs: a Job can."""


# --- job on the target's node ---

def start_job(kube: Kube, target: ResolvedTarget | None, agent: AgentConfig, *, session: str,
              port: int, secret: str, write: bool, namespace: str | None = None,
              incoming: str = "off") -> Placement:
    """The node agent for ``target``; with no target (``targetless``), an
    agent pod anywhere in the cluster serving its own network, no privileges."""
    namespace = agent.namespace or (target.namespace if target else namespace) or "default"
    name = f"mtrace-agent-{session}"
    container = agent_container("agent", agent,
                                agent_argv(port, target.container_id if target else None,
                                           agent.ttl, write),
                                secret, agent_capabilities("job", incoming, targeted=target is not None))
    if target is None and not agent.privileged:
        container["securityContext"] = {"allowPrivilegeEscalation": False}
    pod_labels = labels(session, agent.labels)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "terminationGracePeriodSeconds": 5,
        "automountServiceAccountToken": False,
        # A node agent tolerates whatever taints the target's node has.
        "tolerations": agent.tolerations if agent.tolerations is not None
        else [{"operator": "Exists"}],
    }
    if target is not None:
        pod_spec.update(nodeName=target.node, hostPID=True)
    if agent.service_account:
        pod_spec["serviceAccountName"] = agent.service_account
    if agent.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret_name} for secret_name in agent.image_pull_secrets]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": pod_labels, "annotations": agent.annotations},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": agent.ttl,
            # Backstop: a session longer than this loses its agent.
            "activeDeadlineSeconds": MAX_SESSION_SECONDS,
            "template": {"metadata": {"labels": pod_labels, "annotations": agent.annotations},
                         "spec": pod_spec},
        },
    }
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    kube.request("POST", path, job)
    placement = Placement("job", namespace, "", "agent", port, secret, session, job=name)
    placement.created.append(f"{path}/{name}")
    return placement


def release(kube: Kube, placement: Placement) -> None:
    """Delete what this session created (the Job and its pod, at once)."""
    for path in placement.created:
        try:
            kube.request("DELETE", path, {"propagationPolicy": "Background",
                                          "gracePeriodSeconds": 0}, timeout=10)
        except KubeNotFound:
            pass


def sweep(kube: Kube, namespace: str) -> int:
    """Delete finished agent Jobs an earlier run left (killed before it could)."""
    jobs = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs",
                    labelSelector=f"{MANAGED_BY}={MANAGED_BY_VALUE}")["items"]
    swept = 0
    for job in jobs:
        status = job.get("status") or {}
        if status.get("active") or not (status.get("succeeded") or status.get("failed")):
            continue  # another session's, still running
        try:
            kube.request("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/"
                         f"{job['metadata']['name']}", {"propagationPolicy": "Background"})
            swept += 1
        except (KubeNotFound, KubeForbidden):
            pass
    return swept


# --- waiting for the agent's container ---

def wait_started(kube: Kube, placement: Placement, agent: AgentConfig, deadline: float,
                 progress: Callable[[str], None] | None,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
    """Until the agent's container runs; a clear error if it cannot (or, when
    ``cancelled()`` says the session was given up, as soon as it is).

    ``progress`` (None: nothing is shown) hears the container's creation and
    the image's pull (:class:`ImagePull`)."""
    said: set[str] = set()
    pull = ImagePull(kube, placement, agent.image, progress) if progress is not None else None
    while True:
        if cancelled():
            raise AgentUnavailable("interrupted while the agent started")
        status, pod = _agent_status(kube, placement)
        if status is not None:
            state = status.get("state") or {}
            if "running" in state:
                if pull is not None:
                    pull.finish()
                return
            check_failed(kube, placement, agent, status, pod)
            waiting = state.get("waiting") or {}
            if waiting.get("reason") == "ContainerCreating" and "create" not in said:
                said.add("create")
                if progress is not None:
                    progress(f"starting the agent container ({agent.image})...")
        elif placement.kind == "job":
            _check_job_not_refused(kube, placement, pod)
        if pull is not None:
            pull.look()
        if time.monotonic() > deadline:
            where = f"pod/{placement.pod}" if placement.pod else f"job/{placement.job}"
            raise AgentUnavailable(
                f"the agent ({where}) did not start within agent.startup_timeout "
                f"({agent.startup_timeout:g} s)",
                hint=f"is the image {agent.image} pullable from the node? raise "
                     "agent.startup_timeout for a slow pull")
        time.sleep(0.1)


#: Seconds between two lists of the agent pod's events while its container waits.
EVENTS_INTERVAL = 0.5
_PULL_TOOK = re.compile(r"\bin (\d[^\s(]*)")


class ImagePull:
    """Says when the kubelet pulls the agent's image, and how long that took.

    The kubelet reports a pull only as events of the pod ("Pulling", then
    "Pulled" whose message says how long it took; a failure shows in the
    container's status, which :func:`check_failed` reads). Listed at most
    every :data:`EVENTS_INTERVAL` while the container waits. ``events: list``
    is optional in the Role (docs/kubernetes.md): where it is forbidden the
    step is not shown and the events are not asked for again."""

    def __init__(self, kube: Kube, placement: Placement, image: str,
                 progress: Callable[[str], None]) -> None:
        self.kube, self.placement, self.image, self.progress = kube, placement, image, progress
        self.next_look = 0.0
        self.pulling = False
        self.over = False  # the pull said to its end, or the events forbidden

    def look(self) -> None:
        if self.over or not self.placement.pod or time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + EVENTS_INTERVAL
        self._read()

    def finish(self) -> None:
        """The container runs: one last look for how long a pull said to have started took."""
        if self.pulling and not self.over:
            self._read()
        self.over = True

    def _read(self) -> None:
        try:
            events = self.kube.get(f"/api/v1/namespaces/{self.placement.namespace}/events",
                                   fieldSelector=f"involvedObject.name={self.placement.pod}")
        except KubeForbidden:
            self.over = True
            return
        except KubeError:
            return  # a nicety: the pod's own status says whether the start fails
        # Only this agent's container: an ephemeral agent's pod holds the
        # events of earlier sessions' agents, of the same image.
        mine = {event.get("reason"): event for event in events.get("items") or []
                if (event.get("involvedObject") or {}).get("fieldPath", "").endswith(
                    f"{{{self.placement.container}}}")}
        if "Pulling" in mine and not self.pulling:
            self.pulling = True
            self.progress(f"pulling the agent image {self.image}...")
        if "Pulled" in mine and self.pulling:
            self.over = True
            took = pull_duration(mine["Pulled"].get("message") or "")
            if took:
                self.progress(f"pulled the agent image in {took}")


def pull_duration(message: str) -> str | None:
    """How long a "Pulled" event says the pull took (``Successfully pulled image
    "x" in 12.325702013s``, newer kubelets add more after it): a Go duration,
    shown to a tenth of a second when it is in seconds."""
    took = _PULL_TOOK.search(message)
    if took is None:
        return None
    seconds = re.fullmatch(r"(\d+(?:\.\d+)?)s", took.group(1))
    return f"{float(seconds.group(1)):.1f} s" if seconds else took.group(1)


def check_alive(kube: Kube, placement: Placement, agent: AgentConfig) -> None:
    status, pod = _agent_status(kube, placement)
    if status is not None:
        check_failed(kube, placement, agent, status, pod)


def _agent_status(kube: Kube, placement: Placement) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if placement.kind == "job" and not placement.pod:
        pods = kube.get(f"/api/v1/namespaces/{placement.namespace}/pods",
                        labelSelector=f"{SESSION_LABEL}={placement.session}")["items"]
        if not pods:
            return None, None
        placement.pod = pods[0]["metadata"]["name"]
    try:
        pod = kube.get(f"/api/v1/namespaces/{placement.namespace}/pods/{placement.pod}")
    except KubeNotFound:
        raise AgentUnavailable(f"pod/{placement.pod} was deleted while the agent started") from None
    key = "ephemeralContainerStatuses" if placement.kind == "ephemeral" else "containerStatuses"
    for status in (pod.get("status") or {}).get(key) or []:
        if status.get("name") == placement.container:
            return status, pod
    if placement.kind == "job":
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                raise AgentUnavailable(f"the agent's pod cannot be scheduled: "
                                       f"{condition.get('message', condition.get('reason'))}")
    return None, pod


def check_failed(kube: Kube, placement: Placement, agent: AgentConfig, status: dict[str, Any],
                 pod: dict[str, Any] | None) -> None:
    state = status.get("state") or {}
    waiting = state.get("waiting") or {}
    reason = waiting.get("reason", "")
    if reason in _IMAGE_ERRORS:
        raise AgentImageError(
            f"cannot pull the agent image {agent.image}: {reason}: "
            f"{(waiting.get('message') or '').strip()[:300]}",
            hint="build and push it (docs/kubernetes.md, The agent image) and set agent.image")
    if reason in _CONFIG_ERRORS:
        raise AgentUnavailable(f"the agent container cannot start: {reason}: "
                               f"{(waiting.get('message') or '').strip()[:300]}",
                               hint="see docs/kubernetes.md for what the agent asks for")
    terminated = state.get("terminated")
    if terminated:
        said = (terminated.get("message") or "").strip().splitlines()
        if not said:
            said = logs_tail(kube, placement)
        last = said[-1] if said else f"exit code {terminated.get('exitCode')}"
        raise AgentUnavailable(f"the agent exited before answering: {last}",
                               hint="run with -v for the agent's log")


def logs_tail(kube: Kube, placement: Placement) -> list[str]:
    try:
        response = kube.api.call_api(*kube.api.param_serialize(
            "GET", f"/api/v1/namespaces/{placement.namespace}/pods/{placement.pod}/log",
            query_params=[("container", placement.container), ("tailLines", "5")],
            auth_settings=["BearerToken"])[:4], _request_timeout=5)
        text = response.read().decode(errors="replace")
    except Exception:  # the log is a nicety for the message
        return []
    return [line for line in text.splitlines() if line.strip()]


def _check_job_not_refused(kube: Kube, placement: Placement, pod: dict[str, Any] | None) -> None:
    """Admission refuses a Job's pod when the job controller creates it: the
    refusal shows only as a FailedCreate event on the Job."""
    if pod is not None or placement.job is None:
        return
    events = kube.get(f"/api/v1/namespaces/{placement.namespace}/events",
                      fieldSelector=f"involvedObject.name={placement.job},involvedObject.kind=Job")
    for event in events.get("items") or []:
        if event.get("reason") == "FailedCreate":
            raise AdmissionRefused(
                f"admission refused the agent's pod: {event.get('message', '')[:400]}",
                hint="the node agent needs hostPID and SYS_ADMIN; where policy forbids them, "
                     "use the ephemeral placement (agent.ephemeral = true)")


class AgentImageError(AgentError):
    exit_code = 71


class AdmissionRefused(KubeRejected):
    pass
