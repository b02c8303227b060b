"""The rig is a real cluster: workloads, exec, port-forward, Service DNS, node access, ephemeral containers.

What mtrace's Kubernetes targets need from a cluster, checked against the rig
through the Python `kubernetes` client (the client mtrace uses).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
from kube.images import BUSYBOX, PROGRAMS
from kube.workloads import (
    Workload,
    WorkloadError,
    describe_pods,
    exec_in_pod,
    port_forward_get,
    run_pod_to_completion,
)
from kubernetes import client

PROBES = ("probe-go", "probe-glibc-static", "probe-musl", "probe-dynamic")


@pytest.fixture(scope="module")
def web(kube_api: Any, namespace: str) -> Workload:
    """httpserve behind a Service, with its own env and a file of its own."""
    from kube.workloads import create_workload

    return create_workload(
        kube_api,
        namespace,
        "web",
        env={"TARGET_ONLY": "from-the-pod"},
        files={"/etc/target-file": "a file only the target has\n"},
        service_port=80,
    )


def test_deployment_rolls_out_from_the_test_image(kube_api: Any, web: Workload) -> None:
    deployment = client.AppsV1Api(kube_api).read_namespaced_deployment(web.name, web.namespace)
    assert deployment.status.ready_replicas == 1
    pod = client.CoreV1Api(kube_api).read_namespaced_pod(web.pod, web.namespace)
    assert pod.spec.containers[0].image == PROGRAMS
    assert pod.status.pod_ip.startswith("172.17.")


def test_exec_through_the_api_sees_the_pods_env_and_files(kube_api: Any, web: Workload) -> None:
    for probe in PROBES:
        env = exec_in_pod(kube_api, web.namespace, web.pod, [f"/programs/{probe}", "env", "TARGET_ONLY"])
        assert env.strip() == "TARGET_ONLY=from-the-pod", probe
    assert (
        exec_in_pod(kube_api, web.namespace, web.pod, ["cat", "/etc/target-file"])
        == "a file only the target has\n"
    )


def test_port_forward_through_the_api_reaches_the_pod(kube_api: Any, web: Workload) -> None:
    reply = port_forward_get(kube_api, web.namespace, web.pod, 8080, "/hello")
    assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert reply.endswith(b"hello from web\n")


def test_a_pod_reaches_another_pods_service_by_name(kube_api: Any, web: Workload, make_workload: Any) -> None:
    caller = make_workload("caller")
    names = ["web", f"web.{web.namespace}", f"web.{web.namespace}.svc.cluster.local"]
    for probe in PROBES:
        for name in names:
            resolved = exec_in_pod(
                kube_api, caller.namespace, caller.pod, [f"/programs/{probe}", "resolve", name]
            )
            assert web.service_ip in resolved, (probe, name, resolved)
        body = exec_in_pod(
            kube_api, caller.namespace, caller.pod, [f"/programs/{probe}", "http", "http://web/hello"]
        )
        assert "hello from web" in body, (probe, body)


def test_names_outside_the_cluster_do_not_resolve(kube_api: Any, web: Workload) -> None:
    # The rig's DNS forwards nothing: no query leaves the machine.
    answer = exec_in_pod(kube_api, web.namespace, web.pod, ["/programs/probe-go", "resolve", "example.com"])
    assert answer.startswith("error:"), answer


def test_a_host_pid_job_enters_a_target_pods_namespaces(
    kube_api: Any, kube_cluster: Any, web: Workload
) -> None:
    kube_cluster.require_rig()
    core = client.CoreV1Api(kube_api)
    pod = core.read_namespaced_pod(web.pod, web.namespace)
    container_id = pod.status.container_statuses[0].container_id.split("://", 1)[1]
    # Find the container's init process by its cgroup (named after the container ID),
    # then read its hostname, env-given file and network from inside its namespaces.
    script = (
        "set -e; for p in /proc/[0-9]*; do "
        f"  if grep -q {container_id} $p/cgroup 2>/dev/null; then pid=${{p#/proc/}}; break; fi; "
        "done; "
        'echo "pid=$pid"; '
        "nsenter -t $pid -u hostname; "
        "nsenter -t $pid -m cat /etc/target-file; "
        "nsenter -t $pid -n wget -qO- http://127.0.0.1:8080/hello"
    )
    job = {
        "metadata": {"name": "node-access"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "hostPID": True,
                    "nodeName": pod.spec.node_name,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "agent",
                        "image": BUSYBOX,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", script],
                        "securityContext": {"privileged": True},
                    }],
                }
            },
        },
    }  # fmt: skip
    client.BatchV1Api(kube_api).create_namespaced_job(web.namespace, client.V1Job.from_dict(job))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = client.BatchV1Api(kube_api).read_namespaced_job("node-access", web.namespace).status
        if status.succeeded or status.failed:
            break
        time.sleep(0.5)
    else:
        raise WorkloadError("job node-access did not finish\n" + describe_pods(kube_api, web.namespace))
    job_pod = core.list_namespaced_pod(web.namespace, label_selector="job-name=node-access").items[0]
    output = core.read_namespaced_pod_log(job_pod.metadata.name, web.namespace)
    assert status.succeeded == 1, output
    lines = output.splitlines()
    assert lines[0].startswith("pid=") and lines[0] != "pid="
    assert lines[1] == web.pod  # a pod's hostname is its name
    assert lines[2] == "a file only the target has"
    assert lines[3] == "hello from web"


def test_an_ephemeral_container_joins_a_pod(
    kube_api: Any, kube_cluster: Any, namespace: str, make_workload: Any
) -> None:
    # The target serves on its loopback only: reachable from inside the pod's network namespace alone.
    target = make_workload(
        "loopback-only", command=["/programs/httpserve", "-name", "inside", "127.0.0.1:9000"]
    )
    core = client.CoreV1Api(kube_api)
    ephemeral = {
        "name": "debugger",
        "image": BUSYBOX if kube_cluster.is_rig else "busybox",
        "imagePullPolicy": "Never" if kube_cluster.is_rig else "IfNotPresent",
        "command": ["sleep", "3600"],
        "targetContainerName": target.container,
    }
    path = f"/api/v1/namespaces/{namespace}/pods/{target.pod}/ephemeralcontainers"
    version = client.VersionApi(kube_api).get_code()
    if (int(version.major), int(version.minor.rstrip("+"))) < (1, 22):
        # 1.20/1.21: PUT an EphemeralContainers object (the client's methods speak the 1.22+ Pod form).
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "EphemeralContainers",
            "metadata": {"name": target.pod, "namespace": namespace},
            "ephemeralContainers": [ephemeral],
        }
        method = "PUT"
    else:
        body = {"spec": {"ephemeralContainers": [ephemeral]}}
        method = "PATCH"
    _raw_request(kube_api, method, path, body)

    def running() -> bool:
        statuses = core.read_namespaced_pod(target.pod, namespace).status.ephemeral_container_statuses or []
        return any(status.name == "debugger" and status.state.running for status in statuses)

    deadline = time.monotonic() + 60
    while not running():
        if time.monotonic() > deadline:
            raise WorkloadError(
                "ephemeral container not running\n" + describe_pods(kube_api, namespace, target.name)
            )
        time.sleep(0.5)
    reply = exec_in_pod(
        kube_api, namespace, target.pod, ["wget", "-qO-", "http://127.0.0.1:9000/hello"], container="debugger"
    )
    assert reply == "hello from inside\n"


def _raw_request(kube_api: Any, method: str, path: str, body: dict[str, Any]) -> Any:
    content_type = "application/strategic-merge-patch+json" if method == "PATCH" else "application/json"
    response = kube_api.call_api(
        method,
        kube_api.configuration.host + path,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
    )
    response.read()
    return response


def test_a_finished_pod_reports_its_output(kube_api: Any, namespace: str) -> None:
    phase, logs = run_pod_to_completion(
        kube_api,
        namespace,
        "once",
        {
            "containers": [
                {"name": "once", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["echo", "done"]}
            ]
        },
    )
    assert (phase, logs) == ("Succeeded", "done\n")


def test_the_agent_image_runs_the_agent_in_a_pod(kube_api: Any, kube_cluster: Any, namespace: str) -> None:
    kube_cluster.require_rig()
    from kube.images import AGENT

    pod_spec = {
        "containers": [{
            "name": "agent",
            "image": AGENT,
            "imagePullPolicy": "Never",
            "args": ["--listen", "127.0.0.1:0", "--secret", secrets.token_hex(16)],
        }],
    }  # fmt: skip
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(
        namespace,
        client.V1Pod.from_dict(
            {"metadata": {"name": "agent"}, "spec": {"restartPolicy": "Never", **pod_spec}}
        ),
    )
    deadline = time.monotonic() + 60
    logs = ""
    while "LISTENING" not in logs:
        if time.monotonic() > deadline:
            raise WorkloadError(
                f"agent pod never listened; logs: {logs!r}\n" + describe_pods(kube_api, namespace)
            )
        time.sleep(0.5)
        if core.read_namespaced_pod("agent", namespace).status.phase in ("Running", "Succeeded", "Failed"):
            logs = core.read_namespaced_pod_log("agent", namespace)
    # Only the agent: no tracer, no CLI in the image.
    listing = exec_in_pod(
        kube_api,
        namespace,
        "agent",
        ["python3", "-c", "import os; print(sorted(os.listdir('/opt/mtrace/mtrace')))"],
    )
    assert listing.strip() == "['agent']"
