"""Test workloads on a cluster, through the Python `kubernetes` client (as mtrace talks to it).

* `new_namespace` / `delete_namespace`: a throw-away namespace per test module.
* `create_workload`: a Deployment from a rig image (the test programs by default)
  with its own env, files (a ConfigMap, one subPath mount per file), optional
  Service, waited on until every replica is Ready. Returns a `Workload`.
* `exec_in_pod`, `pod_logs`, `port_forward_get`: the API's exec, logs and
  port-forward, the paths mtrace itself uses.

Every object carries ``app.kubernetes.io/managed-by: mtrace-tests``.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward, stream

from .images import PROGRAMS

MANAGED_BY = {"app.kubernetes.io/managed-by": "mtrace-tests"}


class WorkloadError(Exception):
    """A workload did not become ready; the message carries the pods' state and events."""


@dataclass
class Workload:
    name: str
    namespace: str
    pods: list[str]
    pod_ips: list[str]
    container: str
    service: str | None = None
    service_ip: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def pod(self) -> str:
        return self.pods[0]


def new_namespace(api: client.ApiClient, prefix: str = "mtrace-test") -> str:
    core = client.CoreV1Api(api)
    name = f"{prefix}-{secrets.token_hex(3)}"[:63]
    core.create_namespace(client.V1Namespace.from_dict({"metadata": {"name": name, "labels": MANAGED_BY}}))
    # Pods are refused until the namespace's default service account exists.
    _wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", name)), 60,
              f"namespace {name}'s default service account")  # fmt: skip
    return name


def delete_namespace(api: client.ApiClient, name: str) -> None:
    try:
        client.CoreV1Api(api).delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise


def _exists(read: Any) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _wait_for(check: Any, timeout: float, what: str, describe: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    details = describe() if describe else ""
    raise WorkloadError(f"timed out after {timeout:.0f}s waiting for {what}\n{details}")


def create_workload(
    api: client.ApiClient,
    namespace: str,
    name: str,
    *,
    image: str = PROGRAMS,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
    service_port: int | None = None,
    replicas: int = 1,
    extra_pod_spec: dict[str, Any] | None = None,
    timeout: float = 90,
) -> Workload:
    """A Deployment (and a Service when `service_port` is given), ready when this returns.

    The default command serves HTTP on 0.0.0.0:8080 (`httpserve -name NAME`):
    GET /hello answers "hello from NAME", GET /env/X shows the pod's env.
    `files` maps absolute paths in the container to their text.
    """
    labels = {"app": name, **MANAGED_BY}
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "command": command or ["/programs/httpserve", "-name", name, "0.0.0.0:8080"],
        "env": [{"name": key, "value": value} for key, value in (env or {}).items()],
    }
    pod_spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 2}
    if files:
        keys = {path: f"file-{index}" for index, path in enumerate(files)}
        client.CoreV1Api(api).create_namespaced_config_map(
            namespace,
            client.V1ConfigMap.from_dict(
                {
                    "metadata": {"name": f"{name}-files", "labels": labels},
                    "data": {keys[path]: text for path, text in files.items()},
                }
            ),
        )
        pod_spec["volumes"] = [{"name": "files", "configMap": {"name": f"{name}-files"}}]
        container["volumeMounts"] = [
            {"name": "files", "mountPath": path, "subPath": key, "readOnly": True}
            for path, key in keys.items()
        ]
    pod_spec.update(extra_pod_spec or {})
    deployment = {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, client.V1Deployment.from_dict(deployment))
    service_ip = None
    if service_port is not None:
        created = core.create_namespaced_service(
            namespace,
            client.V1Service.from_dict({
                "metadata": {"name": name, "labels": labels},
                "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": service_port,
                                                                 "targetPort": 8080}]},
            }),
        )  # fmt: skip
        service_ip = created.spec.cluster_ip

    def rolled_out() -> bool:
        current = apps.read_namespaced_deployment(name, namespace)
        return (current.status.ready_replicas or 0) == replicas and (
            current.status.updated_replicas or 0
        ) == replicas

    _wait_for(
        rolled_out, timeout, f"deployment {namespace}/{name}", lambda: describe_pods(api, namespace, name)
    )
    if service_port is not None and service_ip:
        _wait_for_service(core, namespace, name, service_ip, service_port, replicas, timeout)
    pods = [
        pod
        for pod in core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        if pod.metadata.deletion_timestamp is None and pod.status.phase == "Running"
    ]
    return Workload(
        name=name,
        namespace=namespace,
        pods=[pod.metadata.name for pod in pods],
        pod_ips=[pod.status.pod_ip for pod in pods],
        container=name,
        service=name if service_port is not None else None,
        service_ip=service_ip,
        labels=labels,
    )


def _wait_for_service(core: client.CoreV1Api, namespace: str, name: str, service_ip: str, port: int,
                      replicas: int, timeout: float) -> None:
    """Until the Service has every replica as a ready endpoint and kube-proxy has
    programmed it: a Service without endpoints answers ECONNREFUSED (kube-proxy's
    REJECT rule), which a test's first call would otherwise see."""

    def endpoints_ready() -> bool:
        try:
            endpoints = core.read_namespaced_endpoints(name, namespace)
        except ApiException:
            return False
        ready = sum(len(subset.addresses or []) for subset in endpoints.subsets or [])
        return ready >= replicas

    _wait_for(endpoints_ready, timeout, f"endpoints of service {namespace}/{name}", lambda: "")
    # From the node (the rig's kube-proxy programs its OUTPUT chain too); a cluster
    # whose Service IPs this machine cannot reach is left to the endpoints check.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection((service_ip, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)


def describe_pods(api: client.ApiClient, namespace: str, app: str | None = None) -> str:
    """Pods' phases, container states and the namespace's events: what a failure message needs."""
    core = client.CoreV1Api(api)
    selector = f"app={app}" if app else None
    lines = []
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        lines.append(f"pod {pod.metadata.name}: {pod.status.phase}")
        for status in pod.status.container_statuses or []:
            lines.append(f"  {status.name}: {status.state}")
    for event in core.list_namespaced_event(namespace).items[-15:]:
        lines.append(f"event {event.involved_object.name}: {event.reason}: {event.message}")
    return "\n".join(lines)


def exec_in_pod(
    api: client.ApiClient, namespace: str, pod: str, command: list[str], container: str | None = None
) -> str:
    """Run a command in a running container through the API's exec; return its output."""
    core = client.CoreV1Api(api)
    return str(
        stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            command=command,
            container=container,
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _request_timeout=60,
        )
    )


def pod_logs(api: client.ApiClient, namespace: str, pod: str, container: str | None = None) -> str:
    return str(client.CoreV1Api(api).read_namespaced_pod_log(pod, namespace, container=container))


def port_forward_get(api: client.ApiClient, namespace: str, pod: str, port: int, path: str) -> bytes:
    """An HTTP GET to `port` of a pod, through the API's port-forward (no route to the pod needed)."""
    core = client.CoreV1Api(api)
    forward = portforward(core.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port))
    try:
        sock = forward.socket(port)
        sock.settimeout(30)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        sock.close()
        error = forward.error(port)
        if error:
            raise WorkloadError(f"port-forward to {namespace}/{pod}:{port}: {error}")
        return b"".join(chunks)
    finally:
        forward.close()


def run_pod_to_completion(
    api: client.ApiClient, namespace: str, name: str, pod_spec: dict[str, Any], timeout: float = 90
) -> tuple[str, str]:
    """A pod with restartPolicy Never: wait until it ends; return (phase, logs)."""
    core = client.CoreV1Api(api)
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2, **pod_spec}
    core.create_namespaced_pod(
        namespace, client.V1Pod.from_dict({"metadata": {"name": name, "labels": MANAGED_BY}, "spec": spec})
    )

    def finished() -> bool:
        return core.read_namespaced_pod(name, namespace).status.phase in ("Succeeded", "Failed")

    _wait_for(finished, timeout, f"pod {namespace}/{name} to finish", lambda: describe_pods(api, namespace))
    return core.read_namespaced_pod(name, namespace).status.phase, pod_logs(api, namespace, name)
