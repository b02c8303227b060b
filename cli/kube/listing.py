"""``mtrace ls``: the targets a user can name, as ``--target`` takes them."""

from __future__ import annotations

import json
from typing import IO, Any

from .client import Kube, KubeError, KubeForbidden, KubeNotFound
from .resolve import KNOWN_SIDECARS, WORKLOADS, is_ready

_LISTED = ("deployment", "statefulset", "daemonset", "replicaset", "job", "rollout")


def list_targets(kube: Kube, namespace: str | None) -> list[dict[str, str]]:
    """Every target in ``namespace`` (None: all namespaces): pods that are
    ready (each container of a multi-container pod), workloads, cronjobs and
    Services with a selector. A kind the user may not list is left out."""
    scope = f"/namespaces/{namespace}" if namespace else ""
    targets: list[dict[str, str]] = []

    def items(prefix: str, plural: str) -> list[dict[str, Any]]:
        try:
            return list(kube.get(f"{prefix}{scope}/{plural}")["items"])
        except (KubeForbidden, KubeNotFound):
            return []  # not allowed to list this kind, or no such API (rollouts)

    def add(path: str, item: dict[str, Any]) -> None:
        targets.append({"path": path, "namespace": item["metadata"].get("namespace", "")})

    # Pods are what every target comes down to: not being allowed to list them is an error.
    for pod in kube.get(f"/api/v1{scope}/pods")["items"]:
        if not is_ready(pod):
            continue
        name = pod["metadata"]["name"]
        containers = [c["name"] for c in pod["spec"]["containers"]]
        if len(containers) == 1:
            add(f"pod/{name}", pod)
        else:
            for container in containers:
                if container not in KNOWN_SIDECARS:
                    add(f"pod/{name}/container/{container}", pod)
    for kind in _LISTED:
        prefix, plural = WORKLOADS[kind]
        for item in items(prefix, plural):
            if kind == "replicaset" and item["metadata"].get("ownerReferences"):
                continue  # a deployment's: name the deployment
            add(f"{kind}/{item['metadata']['name']}", item)
    cronjobs = items("/apis/batch/v1", "cronjobs") or items("/apis/batch/v1beta1", "cronjobs")
    for item in cronjobs:
        add(f"cronjob/{item['metadata']['name']}", item)
    for item in items("/api/v1", "services"):
        if (item.get("spec") or {}).get("selector"):
            add(f"service/{item['metadata']['name']}", item)
    return targets


def print_targets(targets: list[dict[str, str]], out: IO[str], *, as_json: bool,
                  all_namespaces: bool) -> None:
    if as_json:
        json.dump(targets, out, indent=1)
        out.write("\n")
        return
    for target in targets:
        prefix = f"{target['namespace']}\t" if all_namespaces else ""
        out.write(f"{prefix}{target['path']}\n")


def run_ls(kube: Kube, namespace: str | None, all_namespaces: bool, as_json: bool,
           out: IO[str]) -> int:
    if not all_namespaces:
        try:
            kube.get(f"/api/v1/namespaces/{namespace or kube.namespace}")
        except KubeNotFound:
            raise KubeError(f"namespace {namespace or kube.namespace} does not exist",
                            hint="`mtrace ls --all-namespaces` lists every namespace") from None
        except KubeForbidden:
            pass  # reading the namespace object is not needed to list inside it
    targets = list_targets(kube, None if all_namespaces else namespace or kube.namespace)
    print_targets(targets, out, as_json=as_json, all_namespaces=all_namespaces)
    return 0
