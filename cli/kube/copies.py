"""``feature.copy_target``: a copy of the target's pod (or of a workload's pod
template) that mtrace creates, targets and deletes at exit; with
``scale_down``, the deployment is scaled to 0 meanwhile and restored after.

A finished job or cronjob has no pod left to target: its template is copied
without being asked. A job's container would exit again, so in a copy of a
job or cronjob the target container idles (``/bin/sh`` from the image)
instead of running its command: the environment, files and network are what
the program under mtrace needs from it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...agent.errors import AgentUnavailable
from .client import MANAGED_BY, MANAGED_BY_VALUE, SESSION_LABEL, Kube, KubeNotFound
from .resolve import KubeTarget, Template, is_ready, pick_container, pods_of

IDLE_COMMAND = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"]
REPLICAS_ANNOTATION = "mtrace.dev/replicas-before-scale-down"
COPY_LABEL = "mtrace.dev/copy-of"


@dataclass
class Copy:
    namespace: str
    pod: str
    scaled: tuple[str, int] | None = None  # (deployment path, replicas before)


def pod_template(kube: Kube, target: KubeTarget, namespace: str) -> Template:
    """The pod spec to copy: the pod's own (a pod target) or the workload's template."""
    if target.kind == "pod":
        pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/{target.name}")
        return Template(namespace, f"pod/{target.name}", pod["spec"], {})
    _, template = pods_of(kube, target, namespace)
    if not template.spec:
        raise KubeNotFound(f"{target.describe()} has no pod template to copy",
                           hint="copy_target works for pods and workloads, not Services")
    return template


def make_copy(kube: Kube, target: KubeTarget, namespace: str, session: str, *,
              scale_down: bool) -> Copy:
    template = pod_template(kube, target, namespace)
    spec = copy.deepcopy(template.spec)
    for key in ("nodeName", "hostname", "subdomain"):
        spec.pop(key, None)
    container, _ = pick_container({"metadata": {"name": target.name}, "spec": spec}, target.container)
    if target.kind in ("job", "cronjob"):
        spec["restartPolicy"] = "Never"
        for item in spec["containers"]:
            if item["name"] == container:
                item["command"], item["args"] = IDLE_COMMAND, []
                item.pop("livenessProbe", None)
                item.pop("readinessProbe", None)
    else:
        spec["restartPolicy"] = "Always" if spec.get("restartPolicy") is None else spec["restartPolicy"]
    # The copy must not be adopted by the workload's controller (it would
    # count it as a replica): our labels only, none of the selector's.
    name = f"mtrace-copy-{session}"
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {MANAGED_BY: MANAGED_BY_VALUE, SESSION_LABEL: session,
                                              COPY_LABEL: template.owner.replace("/", ".")}},
        "spec": {**spec, "activeDeadlineSeconds": 24 * 3600},
    }
    scaled = None
    if scale_down and target.kind == "deployment":
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{target.name}"
        replicas = int((kube.get(path).get("spec") or {}).get("replicas", 1))
        kube.request("PATCH", path, {"metadata": {"annotations": {REPLICAS_ANNOTATION: str(replicas)}},
                                     "spec": {"replicas": 0}},
                     content_type="application/merge-patch+json")
        scaled = (path, replicas)
    try:
        kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    except BaseException:
        if scaled is not None:
            remove(kube, Copy(namespace, name, scaled))
        raise
    return Copy(namespace, name, scaled)


def wait_ready(kube: Kube, made: Copy, deadline: float,
               cancelled: Callable[[], bool] = lambda: False) -> None:
    while True:
        if cancelled():
            raise AgentUnavailable("interrupted while the target copy started")
        try:
            pod = kube.get(f"/api/v1/namespaces/{made.namespace}/pods/{made.pod}")
        except KubeNotFound:
            raise AgentUnavailable(f"the target copy pod/{made.pod} was deleted while starting") from None
        if is_ready(pod) or ((pod.get("status") or {}).get("phase") == "Running"
                             and not _has_readiness(pod)):
            return
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull",
                                         "CreateContainerConfigError", "CrashLoopBackOff"):
                raise AgentUnavailable(f"the target copy pod/{made.pod} cannot start: "
                                       f"{waiting.get('reason')}: {waiting.get('message', '')[:200]}")
        if time.monotonic() > deadline:
            raise AgentUnavailable(f"the target copy pod/{made.pod} was not ready within "
                                   "agent.startup_timeout", hint="raise agent.startup_timeout")
        time.sleep(0.2)


def _has_readiness(pod: dict[str, Any]) -> bool:
    return any(c.get("readinessProbe") for c in pod["spec"]["containers"])


def remove(kube: Kube, made: Copy) -> None:
    try:
        kube.request("DELETE", f"/api/v1/namespaces/{made.namespace}/pods/{made.pod}",
                     {"gracePeriodSeconds": 0}, timeout=10)
    except KubeNotFound:
        pass
    if made.scaled is not None:
        path, replicas = made.scaled
        kube.request("PATCH", path, {"metadata": {"annotations": {REPLICAS_ANNOTATION: None}},
                                     "spec": {"replicas": replicas}},
                     content_type="application/merge-patch+json", timeout=10)
