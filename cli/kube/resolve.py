"""Which pod and container is the target: ``pod/NAME``, a workload resolved
through its selector to one ready pod, a Service's ready pod, and the
container in it. Returns a plain :class:`ResolvedTarget` the placement takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .client import Kube, KubeError, KubeNotFound

#: Kinds --target accepts, and where each lives in the API.
WORKLOADS: dict[str, tuple[str, str]] = {
    "deployment": ("/apis/apps/v1", "deployments"),
    "statefulset": ("/apis/apps/v1", "statefulsets"),
    "replicaset": ("/apis/apps/v1", "replicasets"),
    "daemonset": ("/apis/apps/v1", "daemonsets"),
    "job": ("/apis/batch/v1", "jobs"),
    "rollout": ("/apis/argoproj.io/v1alpha1", "rollouts"),
}
KINDS = ("pod", *WORKLOADS, "cronjob", "service")
#: Containers injected next to the workload; never the default target.
KNOWN_SIDECARS = frozenset({
    "istio-proxy", "istio-init", "linkerd-proxy", "linkerd-init", "envoy", "envoy-sidecar",
    "vault-agent", "vault-agent-init", "cloudsql-proxy", "cloud-sql-proxy", "datadog-agent",
    "aws-xray-daemon", "consul-connect-envoy-sidecar", "dapr-sidecar", "kuma-sidecar",
    "fluent-bit", "fluentd", "oauth2-proxy", "mtrace-agent",
})
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class KubeTarget:
    """What the user named: ``kind/NAME[/container/C]`` in a namespace."""

    kind: str
    name: str = ""
    container: str | None = None
    namespace: str | None = None

    def describe(self) -> str:
        if self.kind == "targetless":
            return "targetless"
        text = f"{self.kind}/{self.name}"
        return f"{text}/container/{self.container}" if self.container else text


def parse_path(text: str, namespace: str | None = None) -> KubeTarget:
    """``deployment/api``, ``pod/p/container/c``; a KubeError naming what is wrong."""
    parts = text.split("/")
    kind = parts[0]
    hint = "for example pod/NAME, deployment/NAME/container/C (kinds: " + ", ".join(KINDS) + ")"
    if kind not in KINDS:
        raise KubeError(f"--target {text}: unknown target kind {kind!r}", hint=hint)
    if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "container"):
        raise KubeError(f"--target {text}: expected {kind}/NAME or {kind}/NAME/container/C",
                        hint=hint)
    for part in (parts[1], *parts[3:4]):
        if not _NAME.match(part) or len(part) > 253:
            raise KubeError(f"--target {text}: {part!r} is not a Kubernetes name", hint=hint)
    return KubeTarget(kind, parts[1], parts[3] if len(parts) == 4 else None, namespace)


@dataclass
class ResolvedTarget:
    namespace: str
    pod: str
    container: str
    container_id: str
    node: str
    pod_object: dict[str, Any] = field(repr=False)
    notes: list[str] = field(default_factory=list)  # "picked pod X of 3 ready" and the like

    @property
    def uid(self) -> str:
        return str(self.pod_object["metadata"]["uid"])

    def describe(self) -> str:
        return f"pod/{self.pod}/container/{self.container} in namespace {self.namespace}"


@dataclass
class Template:
    """A pod template mtrace can copy (a finished job, a cronjob, any workload)."""

    namespace: str
    owner: str  # kind/NAME, for messages
    spec: dict[str, Any]
    labels: dict[str, str]


class NoReadyPod(KubeError):
    """The workload exists but none of its pods is running and ready."""

    def __init__(self, message: str, *, hint: str | None = None,
                 template: Template | None = None) -> None:
        super().__init__(message, hint=hint)
        self.template = template


def label_selector(selector: dict[str, Any]) -> str:
    """A LabelSelector as the API's ``labelSelector`` query string."""
    terms = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = ",".join(expression.get("values") or [])
        terms.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": key, "DoesNotExist": f"!{key}"}[operator])
    return ",".join(terms)


def is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
        return False
    return any(condition.get("type") == "Ready" and condition.get("status") == "True"
               for condition in status.get("conditions") or [])


def resolve(kube: Kube, target: KubeTarget) -> ResolvedTarget:
    namespace = target.namespace or kube.namespace
    if target.kind == "pod":
        pod = _get(kube, f"/api/v1/namespaces/{namespace}/pods/{target.name}", target, namespace)
        if not is_ready(pod):
            phase = (pod.get("status") or {}).get("phase", "?")
            raise NoReadyPod(f"pod/{target.name} is not running and ready (phase {phase})",
                             hint="wait for it, or name its workload to pick a ready pod")
        return _container(pod, target, namespace, [])
    pods, template = pods_of(kube, target, namespace)
    ready = sorted((pod for pod in pods if is_ready(pod)), key=lambda p: p["metadata"]["name"])
    if not ready:
        raise NoReadyPod(
            f"{target.kind}/{target.name} has no running and ready pod "
            f"({len(pods)} pod{'s' if len(pods) != 1 else ''} in all)",
            hint="wait for one, or set feature.copy_target to run a copy of its pod template",
            template=template)
    notes = []
    if len(ready) > 1:
        notes.append(f"{target.kind}/{target.name} has {len(ready)} ready pods; "
                     f"using pod/{ready[0]['metadata']['name']}")
    return _container(ready[0], target, namespace, notes)


def _get(kube: Kube, path: str, target: KubeTarget, namespace: str) -> Any:
    try:
        return kube.get(path)
    except KubeNotFound:
        raise KubeNotFound(
            f"{target.kind}/{target.name} not found in namespace {namespace}",
            hint="check the name and the namespace (-n); `mtrace ls -n NS` lists targets",
        ) from None


def pods_of(kube: Kube, target: KubeTarget, namespace: str) -> tuple[list[dict[str, Any]], Template]:
    """The pods a workload or Service selects, and its pod template."""
    pods_path = f"/api/v1/namespaces/{namespace}/pods"
    if target.kind == "service":
        service = _get(kube, f"/api/v1/namespaces/{namespace}/services/{target.name}", target,
                       namespace)
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector:
            raise KubeError(f"service/{target.name} has no selector: no pod behind it to target",
                            hint="name the pod itself (pod/NAME)")
        pods = kube.get(pods_path, labelSelector=label_selector({"matchLabels": selector}))
        return pods["items"], Template(namespace, f"service/{target.name}", {}, {})
    if target.kind == "cronjob":
        return _cronjob_pods(kube, target, namespace)
    prefix, plural = WORKLOADS[target.kind]
    try:
        workload = kube.get(f"{prefix}/namespaces/{namespace}/{plural}/{target.name}")
    except KubeNotFound:
        if target.kind == "rollout" and not _has_group(kube, "argoproj.io"):
            raise KubeNotFound("rollout targets need Argo Rollouts, and this cluster has no "
                               "rollouts.argoproj.io resource",
                               hint="name the rollout's pods (pod/NAME) instead") from None
        raise KubeNotFound(
            f"{target.kind}/{target.name} not found in namespace {namespace}",
            hint="check the name and the namespace (-n); `mtrace ls -n NS` lists targets",
        ) from None
    spec = workload.get("spec") or {}
    template = spec.get("template") or {}
    if target.kind == "rollout" and not template and spec.get("workloadRef"):
        ref = spec["workloadRef"]
        referenced = kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{ref['name']}")
        template = (referenced.get("spec") or {}).get("template") or {}
    pods = kube.get(pods_path, labelSelector=label_selector(spec.get("selector") or {}))["items"]
    uid = workload["metadata"]["uid"]
    if target.kind in ("job", "daemonset", "replicaset", "statefulset"):
        pods = [pod for pod in pods if _owned_by(pod, uid)] or pods
    return pods, Template(namespace, f"{target.kind}/{target.name}", template.get("spec") or {},
                          (template.get("metadata") or {}).get("labels") or {})


def _cronjob_pods(kube: Kube, target: KubeTarget, namespace: str) -> tuple[list[dict[str, Any]], Template]:
    cronjob = None
    for version in ("v1", "v1beta1"):  # batch/v1 from 1.21, v1beta1 before
        try:
            cronjob = kube.get(f"/apis/batch/{version}/namespaces/{namespace}/cronjobs/{target.name}")
            break
        except KubeNotFound:
            continue
    if cronjob is None:
        raise KubeNotFound(f"cronjob/{target.name} not found in namespace {namespace}",
                           hint="check the name and the namespace (-n)")
    job_template = ((cronjob.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}
    pod_template = job_template.get("template") or {}
    jobs = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]
    uids = {job["metadata"]["uid"] for job in jobs if _owned_by(job, cronjob["metadata"]["uid"])}
    pods = [pod for pod in kube.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
            if any(_owned_by(pod, uid) for uid in uids)]
    return pods, Template(namespace, f"cronjob/{target.name}", pod_template.get("spec") or {},
                          (pod_template.get("metadata") or {}).get("labels") or {})


def _owned_by(item: dict[str, Any], uid: str) -> bool:
    return any(owner.get("uid") == uid for owner in item["metadata"].get("ownerReferences") or [])


def _has_group(kube: Kube, group: str) -> bool:
    try:
        kube.get(f"/apis/{group}")
    except KubeNotFound:
        return False
    return True


def pick_container(pod: dict[str, Any], wanted: str | None) -> tuple[str, str | None]:
    """(container name, a note when mtrace chose among several)."""
    names = [container["name"] for container in pod["spec"]["containers"]]
    if wanted is not None:
        if wanted not in names:
            raise KubeNotFound(
                f"pod/{pod['metadata']['name']} has no container {wanted!r}",
                hint=f"its containers: {', '.join(names)}")
        return wanted, None
    candidates = [name for name in names if name not in KNOWN_SIDECARS] or names
    note = None
    if len(names) > 1:
        note = (f"pod/{pod['metadata']['name']} has containers {', '.join(names)}; using "
                f"{candidates[0]!r} (name one with /container/NAME)")
    return candidates[0], note


def _container(pod: dict[str, Any], target: KubeTarget, namespace: str,
               notes: list[str]) -> ResolvedTarget:
    name, note = pick_container(pod, target.container)
    if note:
        notes.append(note)
    statuses = {status["name"]: status for status in (pod.get("status") or {}).get("containerStatuses") or []}
    status = statuses.get(name) or {}
    container_id = status.get("containerID") or ""
    if "running" not in (status.get("state") or {}) or not container_id:
        raise NoReadyPod(f"container {name!r} of pod/{pod['metadata']['name']} is not running",
                         hint="wait for it to start, or name another container")
    return ResolvedTarget(namespace=namespace, pod=pod["metadata"]["name"], container=name,
                          container_id=container_id, node=pod["spec"].get("nodeName", ""),
                          pod_object=pod, notes=notes)


def ready_pods(kube: Kube, target: KubeTarget) -> list[ResolvedTarget]:
    """Every running and ready pod of a workload or Service (by name), each
    with the target container: incoming traffic reaches all of them."""
    namespace = target.namespace or kube.namespace
    pods, _ = pods_of(kube, target, namespace)
    ready = sorted((pod for pod in pods if is_ready(pod)), key=lambda p: p["metadata"]["name"])
    found = []
    for pod in ready:
        try:
            found.append(_container(pod, target, namespace, []))
        except KubeError:
            continue  # its container is not running (restarting): nothing to subscribe there
    return found
