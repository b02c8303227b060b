"""Kubernetes targets end to end on a real cluster: each probe flavour run
under `mtrace exec --target deployment/web` prints what it prints when run
inside the pod (env, a file only the pod has, a Service name resolved by the
cluster DNS, HTTP and UDP to a Service and to the pod's own loopback); every
target kind; both agent placements; the errors, provoked for real; and after each
test no mtrace Job, pod or running ephemeral container is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube.images import PROGRAMS, build_agent_image
from kube.registry import OneImageRegistry, remove_image
from kube.workloads import Workload, create_workload, exec_in_pod
from kubernetes import client
from mtrace_run import stop

pytestmark = [pytest.mark.timeout(300)]

# One tag per checkout when several run the cluster tests at once (each builds its own agent).
AGENT_IMAGE = os.environ.get("MTRACE_TEST_AGENT_TAG", "mtrace-agent:cluster-tests")
MANAGED = "app.kubernetes.io/managed-by=mtrace"


@pytest.fixture(scope="session")
def agent_image(kube_cluster: Any) -> str:
    """The agent image of this checkout (the rig builds it with its local base)."""
    if not kube_cluster.is_rig:
        image = os.environ.get("MTRACE_AGENT_IMAGE")
        if not image:
            pytest.skip("set MTRACE_AGENT_IMAGE to an agent image the cluster can pull")
        return image
    build_agent_image(AGENT_IMAGE)
    return AGENT_IMAGE


UDP_PORT = 7007


@pytest.fixture(scope="module")
def web(kube_api: Any, namespace: str) -> Workload:
    """httpserve on 8080 (Service web:80) and a UDP echo on 7007 (Service echo:7007/UDP)."""
    client.CoreV1Api(kube_api).create_namespaced_service(namespace, client.V1Service.from_dict({
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"protocol": "UDP", "port": UDP_PORT, "targetPort": UDP_PORT}]}}))
    return create_workload(
        kube_api, namespace, "web",
        command=["/programs/httpserve", "-name", "web", "-udp-echo", f"0.0.0.0:{UDP_PORT}",
                 "0.0.0.0:8080"],
        env={"TARGET_ONLY": "from-the-pod"},
        files={"/etc/target-file": "a file only the target has\n"},
        service_port=80,
    )  # fmt: skip


def write_config(directory: Path, kubeconfig: Path, image: str, *,
                 feature: dict[str, Any] | None = None, **agent: Any) -> Path:
    config: dict[str, Any] = {
        "kubeconfig": str(kubeconfig),
        "agent": {"image": image, "image_pull_policy": "Never", "startup_timeout": 60, **agent}}
    if feature:
        config["feature"] = feature
    path = directory / "mtrace.json"
    path.write_text(json.dumps(config))
    return path


def mtrace(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "mtrace.cli", *args], capture_output=True,
                          timeout=timeout, check=False)


def leftovers(api: Any, namespace: str) -> list[str]:
    """mtrace's Jobs and pods, and ephemeral agent containers still running."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    found = [f"job/{job.metadata.name}" for job in
             batch.list_namespaced_job(namespace, label_selector=MANAGED).items]
    for pod in core.list_namespaced_pod(namespace).items:
        labels = pod.metadata.labels or {}
        if labels.get("app.kubernetes.io/managed-by") == "mtrace" and pod.metadata.deletion_timestamp is None:
            found.append(f"pod/{pod.metadata.name}")
        for status in pod.status.ephemeral_container_statuses or []:
            if status.state and status.state.running:
                found.append(f"pod/{pod.metadata.name}/ephemeral/{status.name}")
    return found


def wait_clean(api: Any, namespace: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(api, namespace)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture
def clean(kube_api: Any, namespace: str) -> Iterator[None]:
    yield
    assert wait_clean(kube_api, namespace) == []


def commands(web: Workload) -> list[list[str]]:
    service = f"web.{web.namespace}.svc.cluster.local"
    return [
        ["env", "TARGET_ONLY"],
        ["env", "HOSTNAME"],
        ["cat", "/etc/target-file"],
        ["stat", "/etc/target-file"],
        ["resolve", service],
        ["http", f"http://{service}/hello"],
        ["http", "http://web/hello"],
        ["http", "http://127.0.0.1:8080/env/TARGET_ONLY"],
        ["tcp", "127.0.0.1", "1", "x"],
    ]


def probe_script(probe: str, web: Workload) -> str:
    """Every command of :func:`commands`, each output under a ``--- command`` line."""
    import shlex

    return "; ".join(f"echo {shlex.quote('--- ' + ' '.join(command))}; "
                     f"{probe} {' '.join(shlex.quote(word) for word in command)}"
                     for command in commands(web))


def test_probe_in_a_deployment_sees_what_the_pod_sees(
        probe: Path, kube_api: Any, kubeconfig: Path, web: Workload, agent_image: str,
        tmp_path: Path, clean: None) -> None:
    """One mtrace session per flavour runs every command (one agent start, not
    one per command), each output compared with the same command's in the pod."""
    config = write_config(tmp_path, kubeconfig, agent_image)
    inside = exec_in_pod(kube_api, web.namespace, web.pod,
                         ["/bin/sh", "-c", probe_script(f"/programs/{probe.name}", web)])
    traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
                    "--", "/bin/sh", "-c", probe_script(str(probe), web))
    stderr = traced.stderr.decode(errors="replace")
    expected, got = inside.split("--- ")[1:], traced.stdout.decode().split("--- ")[1:]
    assert len(expected) == len(commands(web)), inside
    for want, have in zip(expected, got, strict=False):
        assert have == want, stderr[-2000:]
    assert len(got) == len(expected), stderr[-2000:]


def udp_script(probe: str, namespace: str) -> str:
    service = f"echo.{namespace}.svc.cluster.local"
    return "; ".join(f"{probe} {command} {host} {UDP_PORT} ping"
                     for host in (service, "127.0.0.1") for command in ("udp", "udp-unconnected"))


def test_udp_to_a_service_and_the_pods_loopback(
        probe: Path, kube_api: Any, kubeconfig: Path, web: Workload, agent_image: str,
        tmp_path: Path, clean: None) -> None:
    """Connected and unconnected UDP to a Service (cluster DNS, kube-proxy) and
    to the pod's own loopback: the same answers, from the same addresses, as
    inside the pod. One mtrace session per flavour runs the four exchanges."""
    inside = exec_in_pod(kube_api, web.namespace, web.pod,
                         ["/bin/sh", "-c", udp_script(f"/programs/{probe.name}", web.namespace)])
    assert inside.count("ping") == 4, inside
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
                    "--", "/bin/sh", "-c", udp_script(str(probe), web.namespace))
    assert traced.stdout.decode() == inside, traced.stderr.decode()[-2000:]


@pytest.mark.parametrize("kind", ["pod", "deployment", "replicaset", "service"])
def test_every_target_kind_reaches_the_pod(kind: str, kube_api: Any, kubeconfig: Path,
                                           web: Workload, agent_image: str, programs: Any,
                                           tmp_path: Path, clean: None) -> None:
    name = web.pod if kind == "pod" else web.name
    if kind == "replicaset":
        apps = client.AppsV1Api(kube_api)
        sets = apps.list_namespaced_replica_set(web.namespace, label_selector="app=web").items
        name = sets[0].metadata.name
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", f"{kind}/{name}",
                    "--", str(programs["probe-go"]), "env", "TARGET_ONLY")
    assert traced.stdout == b"TARGET_ONLY=from-the-pod\n", traced.stderr.decode()[-2000:]


def test_job_placement_on_the_node(kube_api: Any, kubeconfig: Path, web: Workload,
                                   agent_image: str, programs: Any, tmp_path: Path,
                                   clean: None) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image, ephemeral=False)
    for command, expected in ((["cat", "/etc/target-file"], b"a file only the target has\n"),
                              (["http", "http://127.0.0.1:8080/hello"], b"status 200\nhello from web\n")):
        traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
                        "--", str(programs["probe-musl"]), *command)
        assert traced.stdout == expected, traced.stderr.decode()[-2000:]


def test_ptrace_backend_against_a_pod(kube_api: Any, kubeconfig: Path, web: Workload,
                                      agent_image: str, programs: Any, tmp_path: Path,
                                      clean: None) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "--backend", "ptrace", "-f", str(config), "-n", web.namespace,
                    "--target", f"pod/{web.pod}", "--", str(programs["probe-dynamic"]),
                    "cat", "/etc/target-file")
    assert traced.stdout == b"a file only the target has\n", traced.stderr.decode()[-2000:]


def test_job_without_running_pods_is_targeted_through_a_copy(
        kube_api: Any, kubeconfig: Path, namespace: str, agent_image: str, programs: Any,
        tmp_path: Path, clean: None) -> None:
    batch = client.BatchV1Api(kube_api)
    batch.create_namespaced_job(namespace, client.V1Job.from_dict({
        "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "once", "image": PROGRAMS, "imagePullPolicy": "Never",
                            "command": ["/programs/probe-go", "exit", "0"],
                            "env": [{"name": "JOB_ONLY", "value": "from-the-job"}]}]}}}}))
    deadline = time.monotonic() + 60
    while not (batch.read_namespaced_job("once", namespace).status.succeeded or 0):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.5)
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "-f", str(config), "-n", namespace, "--target", "job/once",
                    "--", str(programs["probe-go"]), "env", "JOB_ONLY")
    assert traced.stdout == b"JOB_ONLY=from-the-job\n", traced.stderr.decode()[-2000:]
    assert b"copy" in traced.stderr


# --- the other target kinds ----------------------------------------------------

IDLE = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"]


def idle_pod_template(kind: str, command: list[str] | None = None,
                      restart: str = "Always") -> dict[str, Any]:
    """A pod template whose container says which kind made it (env KIND_ONLY)."""
    return {"metadata": {"labels": {"app": kind}},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": kind, "image": PROGRAMS, "imagePullPolicy": "Never",
                                     "command": command or IDLE,
                                     "env": [{"name": "KIND_ONLY", "value": f"from-a-{kind}"}]}]}}


def cronjob(name: str, command: list[str], restart: str = "Never") -> dict[str, Any]:
    # Suspended: the controller never starts a job on its own; the tests
    # create the jobs the way `kubectl create job --from=cronjob/NAME` does.
    return {"apiVersion": "batch/v1beta1", "kind": "CronJob", "metadata": {"name": name},
            "spec": {"schedule": "0 0 1 1 *", "suspend": True, "jobTemplate": {"spec": {
                "backoffLimit": 0, "template": idle_pod_template(name, command, restart)}}}}


def job_from_cronjob(owner: dict[str, Any], name: str) -> dict[str, Any]:
    meta = owner["metadata"]
    return {"metadata": {"name": name, "ownerReferences": [{
                "apiVersion": "batch/v1beta1", "kind": "CronJob", "name": meta["name"],
                "uid": meta["uid"], "controller": True}]},
            "spec": owner["spec"]["jobTemplate"]["spec"]}


@pytest.fixture(scope="module")
def kinds(kube_api: Any, namespace: str) -> dict[str, Any]:
    """A StatefulSet, a DaemonSet, a CronJob with a running job and one whose
    job finished, all created at once and waited on together (lean)."""
    apps, batch = client.AppsV1Api(kube_api), client.BatchV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    apps.create_namespaced_stateful_set(namespace, client.V1StatefulSet.from_dict({
        "metadata": {"name": "statefulset"},
        "spec": {"serviceName": "statefulset", "replicas": 1,
                 "selector": {"matchLabels": {"app": "statefulset"}},
                 "template": idle_pod_template("statefulset")}}))
    apps.create_namespaced_daemon_set(namespace, client.V1DaemonSet.from_dict({
        "metadata": {"name": "daemonset"},
        "spec": {"selector": {"matchLabels": {"app": "daemonset"}},
                 "template": idle_pod_template("daemonset")}}))
    made = {}
    for name, command in (("cronjob", IDLE), ("cronjob-done", ["/bin/true"])):
        made[name] = custom.create_namespaced_custom_object(
            "batch", "v1beta1", namespace, "cronjobs", cronjob(name, command))
        batch.create_namespaced_job(namespace, client.V1Job.from_dict(
            job_from_cronjob(made[name], f"{name}-manual")))
    core = client.CoreV1Api(kube_api)
    deadline = time.monotonic() + 90
    while True:
        pods = {pod.metadata.labels.get("app"): pod for pod in core.list_namespaced_pod(namespace).items
                if pod.metadata.labels}
        running = {app for app, pod in pods.items()
                   if any(status.ready for status in pod.status.container_statuses or [])}
        done = (batch.read_namespaced_job("cronjob-done-manual", namespace).status.succeeded or 0)
        if {"statefulset", "daemonset", "cronjob"} <= running and done:
            return made
        assert time.monotonic() < deadline, f"workloads not ready: {running}, done={done}"
        time.sleep(0.5)


@pytest.mark.parametrize("kind", ["statefulset", "daemonset", "cronjob"])
def test_workload_kinds_reach_their_pod(kind: str, kinds: dict[str, Any], kube_api: Any,
                                        kubeconfig: Path, namespace: str, agent_image: str,
                                        programs: Any, tmp_path: Path, clean: None) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "-f", str(config), "-n", namespace, "--target", f"{kind}/{kind}",
                    "--", str(programs["probe-go"]), "env", "KIND_ONLY")
    assert traced.stdout == f"KIND_ONLY=from-a-{kind}\n".encode(), traced.stderr.decode()[-2000:]
    assert b"copy" not in traced.stderr


def test_cronjob_whose_jobs_finished_is_targeted_through_a_copy(
        kinds: dict[str, Any], kube_api: Any, kubeconfig: Path, namespace: str,
        agent_image: str, programs: Any, tmp_path: Path, clean: None) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "-f", str(config), "-n", namespace, "--target", "cronjob/cronjob-done",
                    "--", str(programs["probe-musl"]), "env", "KIND_ONLY")
    assert traced.stdout == b"KIND_ONLY=from-a-cronjob-done\n", traced.stderr.decode()[-2000:]
    assert b"a copy of cronjob/cronjob-done" in traced.stderr


ROLLOUT_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "rollouts.argoproj.io"},
    "spec": {"group": "argoproj.io", "scope": "Namespaced",
             "names": {"plural": "rollouts", "singular": "rollout", "kind": "Rollout"},
             "versions": [{"name": "v1alpha1", "served": True, "storage": True, "schema": {
                 "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


def test_rollout_is_resolved_through_its_selector(kube_api: Any, kubeconfig: Path, web: Workload,
                                                  agent_image: str, programs: Any, tmp_path: Path,
                                                  clean: None) -> None:
    """Argo Rollouts' CRD alone (no controller on the rig): a Rollout whose
    selector picks the web pods is resolved to one of them."""
    extensions, custom = client.ApiextensionsV1Api(kube_api), client.CustomObjectsApi(kube_api)
    if any(crd.metadata.name == "rollouts.argoproj.io"
           for crd in extensions.list_custom_resource_definition().items):
        pytest.skip("this cluster already has Argo Rollouts' CRD: not ours to replace")
    extensions.create_custom_resource_definition(ROLLOUT_CRD)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                custom.create_namespaced_custom_object("argoproj.io", "v1alpha1", web.namespace,
                                                       "rollouts", {
                    "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
                    "metadata": {"name": "roll"},
                    "spec": {"selector": {"matchLabels": {"app": "web"}},
                             "template": {"metadata": {"labels": {"app": "web"}},
                                          "spec": {"containers": [{"name": "web", "image": PROGRAMS}]}}}})
                break
            except client.ApiException as error:  # 404 until the CRD is established
                assert error.status == 404 and time.monotonic() < deadline, error
                time.sleep(0.3)
        config = write_config(tmp_path, kubeconfig, agent_image)
        traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "rollout/roll",
                        "--", str(programs["probe-glibc-static"]), "env", "TARGET_ONLY")
        assert traced.stdout == b"TARGET_ONLY=from-the-pod\n", traced.stderr.decode()[-2000:]
    finally:
        extensions.delete_custom_resource_definition("rollouts.argoproj.io")


def test_copy_target_scale_down_restores_the_deployment_after_ctrl_c(
        kube_api: Any, kubeconfig: Path, namespace: str, agent_image: str, programs: Any,
        tmp_path: Path, clean: None) -> None:
    """The deployment is at 0 replicas while the session runs (the copy is the
    only pod) and back at its count after Ctrl-C, the annotation gone."""
    apps = client.AppsV1Api(kube_api)
    create_workload(kube_api, namespace, "scaled", env={"SCALED_ONLY": "from-the-copy"})
    config = write_config(tmp_path, kubeconfig, agent_image,
                          feature={"copy_target": {"scale_down": True}})
    script = tmp_path / "wait.sh"
    script.write_text(f"#!/bin/sh\n{programs['probe-go']} env SCALED_ONLY\necho started\nexec sleep 60\n")
    script.chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", namespace,
         "--target", "deployment/scaled", "--", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    try:
        first = process.stdout.readline()
        assert first == b"SCALED_ONLY=from-the-copy\n", first
        assert process.stdout.readline() == b"started\n"
        during = apps.read_namespaced_deployment("scaled", namespace)
        assert during.spec.replicas == 0
        assert during.metadata.annotations["mtrace.dev/replicas-before-scale-down"] == "1"
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    finally:
        process.kill()
    after = apps.read_namespaced_deployment("scaled", namespace)
    assert after.spec.replicas == 1
    assert "mtrace.dev/replicas-before-scale-down" not in (after.metadata.annotations or {})


def test_ls_lists_the_targets(kubeconfig: Path, web: Workload) -> None:
    listed = mtrace("ls", "--kubeconfig", str(kubeconfig), "-n", web.namespace, "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    paths = {item["path"] for item in json.loads(listed.stdout)}
    assert {f"pod/{web.pod}", "deployment/web", "service/web"} <= paths


# --- errors, provoked for real ---------------------------------------------------

def test_unknown_target_is_a_clear_error(kubeconfig: Path, web: Workload, agent_image: str,
                                         tmp_path: Path) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image)
    result = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/nope",
                    "--", "true")
    assert result.returncode == 79
    assert b"deployment/nope not found" in result.stderr


def test_wrong_container_lists_the_containers(kubeconfig: Path, web: Workload,
                                              agent_image: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image)
    result = mtrace("exec", "-f", str(config), "-n", web.namespace,
                    "--target", "deployment/web/container/nope", "--", "true")
    assert result.returncode == 79 and b"its containers: web" in result.stderr


def test_unreachable_api_is_a_clear_error(kubeconfig: Path, tmp_path: Path) -> None:
    text = kubeconfig.read_text()
    import re

    broken = tmp_path / "broken.kubeconfig"
    broken.write_text(re.sub(r"server: https://[^\s]+", "server: https://127.0.0.1:1", text))
    result = mtrace("exec", "--kubeconfig", str(broken), "--target", "pod/x", "--", "true")
    assert result.returncode == 69 and b"does not answer" in result.stderr


def test_missing_agent_image_names_the_image_and_leaves_nothing(
        kube_api: Any, kubeconfig: Path, web: Workload, tmp_path: Path, clean: None) -> None:
    config = write_config(tmp_path, kubeconfig, "mtrace-agent:does-not-exist", ephemeral=False)
    result = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
                    "--", "true")
    assert result.returncode == 71, result.stderr.decode()
    assert b"mtrace-agent:does-not-exist" in result.stderr and b"agent.image" in result.stderr


def test_target_pod_deleted_mid_run_is_reported(
        kube_api: Any, kubeconfig: Path, namespace: str, agent_image: str, programs: Any,
        tmp_path: Path) -> None:
    doomed = create_workload(kube_api, namespace, "doomed")
    config = write_config(tmp_path, kubeconfig, agent_image)
    script = tmp_path / "wait.sh"
    script.write_text("#!/bin/sh\necho started\nread line\ncat /etc/hostname\necho rc=$?\n")
    script.chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", namespace,
         "--target", f"pod/{doomed.pod}", "--", str(script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline() == b"started\n"
    client.CoreV1Api(kube_api).delete_namespaced_pod(doomed.pod, namespace, grace_period_seconds=0)
    time.sleep(3)
    out, err = process.communicate(input=b"go\n", timeout=60)
    assert b"rc=0" not in out, (out, err)
    assert b"lost the connection to the agent" in err, err


def error_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode(errors="replace").splitlines()
            if line.startswith("mtrace: error:")]


def assert_one_agent_error(result: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    """Exit 71 (the agent), one error line holding every fragment, and a hint."""
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 71, stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), stderr
    assert "mtrace: hint:" in stderr, stderr


@pytest.mark.parametrize("ephemeral", [True, False], ids=["ephemeral", "job"])
def test_agent_start_timeout_names_the_key_and_leaves_nothing(
        ephemeral: bool, kube_api: Any, kubeconfig: Path, web: Workload, agent_image: str,
        tmp_path: Path, clean: None) -> None:
    """agent.startup_timeout shorter than the agent's container start: a real
    timeout while mtrace waits for the container, in either placement; the
    error names the key, and the agent (Job, or an ephemeral container no
    client reached) does not outlive mtrace. The timeout counts from the start
    of the session, so 0.05 s is over before the agent is placed and the first
    look at its container times out (0.5 s was not always shorter than an
    ephemeral container's start on the rig: one run started in time)."""
    config = write_config(tmp_path, kubeconfig, agent_image, ephemeral=ephemeral,
                          startup_timeout=0.05)
    result = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", f"pod/{web.pod}",
                    "--", "true")
    assert_one_agent_error(result, "did not start within agent.startup_timeout (0.05 s)")


def test_agent_that_never_answers_times_out(kube_api: Any, kubeconfig: Path, web: Workload,
                                            agent_image: str, tmp_path: Path, clean: None) -> None:
    """An agent container that runs but never listens (the agent image with
    `python3 -m mtrace.agent` replaced by a sleep): the container starts, so
    the timeout is the port-forward's, still named as agent.startup_timeout;
    the Job is deleted. (An ephemeral container cannot be deleted: a real
    agent would exit after agent.ttl, this stand-in would not.)"""
    from kube.common import docker_argv
    from kube.common import run as run_command

    silent = f"{agent_image}-silent"
    run_command(docker_argv("build", "--quiet", "--tag", silent, "-"), input_bytes=(
        f"FROM {agent_image}\n"
        "RUN mkdir -p /silent/mtrace/agent && touch /silent/mtrace/agent/__init__.py"
        " && echo 'import time; time.sleep(3600)' > /silent/mtrace/agent/__main__.py\n"
        "ENV PYTHONPATH=/silent\n").encode())
    config = write_config(tmp_path, kubeconfig, silent, ephemeral=False, startup_timeout=8)
    result = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", f"pod/{web.pod}",
                    "--", "true")
    assert_one_agent_error(result, "did not answer", "agent.startup_timeout (8 s)")


class _Output:
    """A process's stdout and stderr, read line by line in threads, waited on with a deadline."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        import queue
        import threading

        self.lines: dict[str, queue.Queue[bytes]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        for name in self.lines:
            stream = getattr(process, name)
            threading.Thread(target=self._pump, args=(stream, self.lines[name]), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, lines: Any) -> None:
        for line in iter(stream.readline, b""):
            lines.put(line)

    def until(self, name: str, needle: bytes, timeout: float = 60) -> list[bytes]:
        """The lines of ``name`` up to the first containing ``needle``."""
        import queue

        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[name].get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {needle!r} on {name} within {timeout} s: {got}, "
                                     f"seen so far: {self.seen}") from None
            got.append(line)
            self.seen[name].append(line)
            if needle in line:
                return got


@pytest.mark.parametrize("evicted", ["agent", "target"])
def test_agent_evicted_mid_session_is_reported(
        evicted: str, kube_api: Any, kubeconfig: Path, namespace: str, web: Workload,
        agent_image: str, programs: Any, tmp_path: Path, clean: None) -> None:
    """Evicted through the Eviction API (what `kubectl drain` does) while the
    program is using the target: the agent's Job pod (``agent``), or the
    target pod with the ephemeral agent in it (``target``). The program's next
    connection fails with ENETUNREACH at once, mtrace says which pod went
    away, exits 71 and leaves nothing. An API eviction deletes the pod (on
    1.20 nothing marks it as evicted), unlike the kubelet's, which sets
    reason Evicted."""
    if evicted == "agent":
        target, config = web, write_config(tmp_path, kubeconfig, agent_image, ephemeral=False)
    else:
        target = create_workload(kube_api, namespace, "drained")
        config = write_config(tmp_path, kubeconfig, agent_image)
    script = tmp_path / "loop.sh"
    script.write_text(f"#!/bin/sh\necho started\nwhile read line; do\n"
                      f"  {programs['probe-go']} http http://127.0.0.1:8080/hello; echo rc=$?\n"
                      "done\nexit 0\n")
    script.chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", namespace,
         "--target", f"pod/{target.pod}", "--", str(script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    try:
        output = _Output(process)
        output.until("stdout", b"started")
        process.stdin.write(b"go\n")
        process.stdin.flush()
        hello = f"hello from {target.name}\n".encode()
        assert output.until("stdout", b"rc=")[-2:] == [hello, b"rc=0\n"]
        core = client.CoreV1Api(kube_api)
        if evicted == "agent":
            # Not the pods of earlier tests' Jobs, deleted and still terminating.
            agents = [pod for pod in core.list_namespaced_pod(namespace, label_selector=MANAGED).items
                      if pod.metadata.deletion_timestamp is None and pod.status.phase == "Running"]
            assert len(agents) == 1, [pod.metadata.name for pod in agents]
            victim = agents[0].metadata.name
        else:
            victim = target.pod
        # policy/v1beta1: the Eviction the rig's 1.20 serves (policy/v1 came in 1.22).
        core.create_namespaced_pod_eviction(victim, namespace, {
            "apiVersion": "policy/v1beta1", "kind": "Eviction",
            "metadata": {"name": victim, "namespace": namespace}})
        lost = output.until("stderr", b"lost the connection to the agent")[-1].decode()
        whose = "the agent's" if evicted == "agent" else "the target"
        assert f"{whose} pod/{victim} was deleted or evicted" in lost, lost
        process.stdin.write(b"go\n")
        process.stdin.flush()
        after = b"".join(output.until("stdout", b"rc=", timeout=30))
        assert b"ENETUNREACH" in after and b"rc=0" not in after, (after, output.seen)
        process.stdin.close()
        assert process.wait(timeout=60) == 71, output.seen
    finally:
        stop(process)  # after a failed assertion: mtrace deletes its Job all the same
    stderr = [line.decode() for line in output.seen["stderr"]]
    assert sum(line.startswith("mtrace: error:") for line in stderr) == 1, stderr


def on_a_terminal(argv: list[str]) -> tuple[bytes, str]:
    """``mtrace ARGV`` with stderr on a pty: its stdout, and what the terminal showed."""
    import pty
    import select

    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "mtrace.cli", *argv],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower)
        os.close(follower)
        terminal = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every writer of the terminal closed it
                break
            if not chunk:
                break
            terminal += chunk
        out, _ = process.communicate(timeout=30)
    finally:
        os.close(leader)
    return out, terminal.decode(errors="replace")


PROGRESS = ("resolving deployment/web...", "starting the agent for pod/",
            "starting the agent container (", "connecting to the agent in pod/", "agent ready (")


def test_progress_on_a_terminal_quiet_when_piped(kube_api: Any, kubeconfig: Path, web: Workload,
                                                 agent_image: str, programs: Any, tmp_path: Path,
                                                 clean: None) -> None:
    """Start-up progress (resolving, starting the agent, its container, the
    port-forward, ready), in that order, when stderr is a terminal; none of
    it when stderr is a pipe."""
    config = write_config(tmp_path, kubeconfig, agent_image)
    argv = ["exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
            "--", str(programs["probe-go"]), "env", "TARGET_ONLY"]
    out, text = on_a_terminal(argv)
    assert out == b"TARGET_ONLY=from-the-pod\n", text
    positions = [text.find(step) for step in PROGRESS]
    assert -1 not in positions and positions == sorted(positions), text
    # The first step said is the first one taken (no generic "connecting" ahead of it).
    assert text.startswith(f"mtrace: {PROGRESS[0]}"), text
    assert f"({agent_image})" in text, text
    piped = mtrace(*argv)
    assert piped.stdout == b"TARGET_ONLY=from-the-pod\n", piped.stderr.decode()
    assert not any(step.encode() in piped.stderr for step in PROGRESS), piped.stderr.decode()


def docs_role_rules() -> list[dict[str, Any]]:
    """The rules of the minimal Role docs/kubernetes.md gives (section Permissions)."""
    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md").read_text()
    block = text.split("\n## Permissions\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    rules: list[dict[str, Any]] = yaml.safe_load(block)["rules"]
    return rules


@pytest.fixture
def pulled_target(kube_api: Any, namespace: str, agent_image: str, request: pytest.FixtureRequest,
                  tmp_path: Path) -> Iterator[tuple[OneImageRegistry, Workload]]:
    """A registry on the host's loopback serving the agent image under a tag of
    its own, and a pod of its own to target (its ephemeral agents hold the
    image: the pod goes, then the image, so the node does not keep it)."""
    import secrets

    unique = secrets.token_hex(4)
    blobs = tmp_path / "registry"
    blobs.mkdir()
    name = f"pulled-{unique}"
    with OneImageRegistry(agent_image, "mtrace-agent-pulltest", f"{request.node.callspec.id}-{unique}",
                          blobs, unique) as registry:
        target = create_workload(kube_api, namespace, name, env={"TARGET_ONLY": "from-the-pod"})
        try:
            yield registry, target
        finally:
            client.AppsV1Api(kube_api).delete_namespaced_deployment(
                name, namespace, propagation_policy="Foreground", grace_period_seconds=0)
            core = client.CoreV1Api(kube_api)
            deadline = time.monotonic() + 60
            while (core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
                   and time.monotonic() < deadline):
                time.sleep(0.5)
            remove_image(registry.image)


@pytest.mark.parametrize("case", ["docs-role", "no-events-list", "job"])
def test_image_pull_is_a_progress_step(case: str, kube_api: Any, kubeconfig: Path,
                                       namespace: str, pulled_target: Any, programs: Any,
                                       tmp_path: Path) -> None:
    """The node pulls the agent image for real (``image_pull_policy = "Always"``,
    from a registry on the host's loopback). As a ServiceAccount with the
    docs' minimal Role (``docs-role``), on a terminal, "pulling the agent
    image IMAGE..." comes between starting the agent and the port-forward;
    the same Role without ``events: [list]``: the same run, no pull line, no
    error; the Job placement (admin) says the pull too."""
    registry, target = pulled_target
    agent: dict[str, Any] = {"image_pull_policy": "Always"}
    if case == "job":
        user, agent["ephemeral"] = kubeconfig, False
    else:
        rules = docs_role_rules()
        if case == "no-events-list":
            without = [rule for rule in rules if "events" not in rule["resources"]]
            assert len(without) == len(rules) - 1, rules
            rules = without
        user = service_account_kubeconfig(kube_api, kubeconfig, namespace, f"pull-{case}", rules,
                                          tmp_path)
    config = write_config(tmp_path, user, registry.image, **agent)
    out, text = on_a_terminal(["exec", "-f", str(config), "-n", namespace,
                               "--target", f"deployment/{target.name}",
                               "--", str(programs["probe-go"]), "env", "TARGET_ONLY"])
    assert out == b"TARGET_ONLY=from-the-pod\n", text
    assert registry.pulls, text  # the node did fetch blobs from the registry
    steps = ("starting the agent for pod/", "connecting to the agent in pod/", "agent ready (")
    positions = [text.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), text
    assert "error" not in text.lower() and "forbidden" not in text.lower(), text
    pulling = text.find(f"pulling the agent image {registry.image}...")
    if case == "no-events-list":
        assert "pulling the agent image" not in text and "pulled the agent" not in text, text
    else:
        assert positions[0] < pulling < positions[1], text
        assert text.count("pulling the agent image") == 1, text
        pulled = text.find("pulled the agent image in ")
        assert pulled == -1 or pulling < pulled < positions[1], text


def service_account_kubeconfig(kube_api: Any, kubeconfig: Path, namespace: str, name: str,
                               rules: list[dict[str, Any]], directory: Path) -> Path:
    """A kubeconfig (in ``directory``) of a new ServiceAccount ``name`` whose
    only rights are a Role of ``rules`` in ``namespace``."""
    import base64

    import yaml

    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount.from_dict({"metadata": {"name": name}}))
    rbac.create_namespaced_role(namespace, client.V1Role.from_dict({
        "metadata": {"name": name}, "rules": rules}))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding.from_dict({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}))
    core.create_namespaced_secret(namespace, client.V1Secret.from_dict({
        "metadata": {"name": f"{name}-token",
                     "annotations": {"kubernetes.io/service-account.name": name}},
        "type": "kubernetes.io/service-account-token"}))
    token = ""
    deadline = time.monotonic() + 30
    while not token:
        data = core.read_namespaced_secret(f"{name}-token", namespace).data or {}
        token = base64.b64decode(data.get("token", "")).decode()
        assert token or time.monotonic() < deadline
        time.sleep(0.3)
    cluster = yaml.safe_load(kubeconfig.read_text())["clusters"][0]
    restricted = {"apiVersion": "v1", "kind": "Config", "clusters": [cluster],
                  "users": [{"name": name, "user": {"token": token}}],
                  "contexts": [{"name": name, "context": {
                      "cluster": cluster["name"], "user": name, "namespace": namespace}}],
                  "current-context": name}
    path = directory / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(restricted))
    return path


def test_forbidden_names_the_verb_and_resource(kube_api: Any, kubeconfig: Path, web: Workload,
                                               agent_image: str, tmp_path: Path) -> None:
    """A ServiceAccount bound to a Role that can read pods but not add ephemeral
    containers nor create Jobs: the error names what is missing."""
    path = service_account_kubeconfig(
        kube_api, kubeconfig, web.namespace, "reader",
        [{"apiGroups": ["", "apps"], "resources": ["pods", "deployments"], "verbs": ["get", "list"]}],
        tmp_path)
    config = write_config(tmp_path, path, agent_image)
    result = mtrace("exec", "-f", str(config), "--target", "deployment/web", "--", "true")
    assert result.returncode == 77, result.stderr.decode()
    assert b"cannot create jobs.batch" in result.stderr, result.stderr.decode()
    assert b"ephemeral containers are unavailable" in result.stderr


def test_forbidden_port_forward_names_the_verb(kube_api: Any, kubeconfig: Path, web: Workload,
                                              agent_image: str, tmp_path: Path, clean: None) -> None:
    """The docs' minimal Role less get on pods/portforward: the websocket
    upgrade is refused (403), and mtrace says it as RBAC's refusal (exit 77,
    the verb and the Role hint), not as an unreachable API."""
    rules = [dict(rule, verbs=[verb for verb in rule["verbs"] if verb != "get"])
             if rule["resources"] == ["pods/portforward"] else rule for rule in docs_role_rules()]
    assert rules != docs_role_rules()
    user = service_account_kubeconfig(kube_api, kubeconfig, web.namespace, "no-forward", rules,
                                      tmp_path)
    config = write_config(tmp_path, user, agent_image, ttl=5)
    result = mtrace("exec", "-f", str(config), "--target", "deployment/web", "--", "true")
    stderr = result.stderr.decode()
    assert result.returncode == 77, stderr
    assert len(error_lines(result.stderr)) == 1, stderr
    assert "forbidden: cannot get pods/portforward" in stderr and "docs/kubernetes.md" in stderr, stderr


def test_ctrl_c_during_a_session_leaves_nothing(kube_api: Any, kubeconfig: Path, web: Workload,
                                                agent_image: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image, ephemeral=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", web.namespace,
         "--target", "deployment/web", "--", "sh", "-c", "echo started; exec sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert wait_clean(kube_api, web.namespace) == []


def test_kill_9_agent_exits_and_next_run_sweeps(kube_api: Any, kubeconfig: Path, web: Workload,
                                                agent_image: str, programs: Any,
                                                tmp_path: Path) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image, ephemeral=False, ttl=5)
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", web.namespace,
         "--target", "deployment/web", "--", "sh", "-c", "echo started; exec sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    batch = client.BatchV1Api(kube_api)
    deadline = time.monotonic() + 60
    while True:  # the agent sees its port-forward close and exits: the Job completes
        jobs = batch.list_namespaced_job(web.namespace, label_selector=MANAGED).items
        if all(not (job.status.active or 0) for job in jobs):
            break
        assert time.monotonic() < deadline, "the agent did not exit after kill -9"
        time.sleep(0.5)
    traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
                    "--", str(programs["probe-go"]), "env", "TARGET_ONLY")
    assert traced.stdout == b"TARGET_ONLY=from-the-pod\n", traced.stderr.decode()[-2000:]
    assert wait_clean(kube_api, web.namespace) == []


def test_targetless_agent_in_the_cluster_reaches_services(kube_api: Any, kubeconfig: Path,
                                                          web: Workload, agent_image: str,
                                                          programs: Any, tmp_path: Path,
                                                          clean: None) -> None:
    config = write_config(tmp_path, kubeconfig, agent_image)
    traced = mtrace("exec", "-f", str(config), "-n", web.namespace, "--target", "targetless",
                    "--", str(programs["probe-go"]), "http", f"http://web.{web.namespace}/hello")
    assert traced.stdout == b"status 200\nhello from web\n", traced.stderr.decode()[-2000:]


def test_admission_refusing_the_agent_names_the_policy(kube_api: Any, kubeconfig: Path,
                                                       web: Workload, agent_image: str,
                                                       tmp_path: Path, clean: None) -> None:
    """A LimitRange (admission plugin LimitRanger) refuses the agent Job's pod
    because of the resources it asks for: the error says so, and no Job is left."""
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_limit_range(web.namespace, client.V1LimitRange.from_dict({
        "metadata": {"name": "small"},
        "spec": {"limits": [{"type": "Container", "max": {"cpu": "100m"}}]}}))
    try:
        config = write_config(tmp_path, kubeconfig, agent_image, ephemeral=False,
                              resources={"limits": {"cpu": "1"}, "requests": {"cpu": "1"}})
        argv = ["exec", "-f", str(config), "-n", web.namespace, "--target", "deployment/web",
                "--", "true"]
        result = mtrace(*argv)
        assert result.returncode == 77, result.stderr.decode()
        assert b"admission refused the agent's pod" in result.stderr
        assert b"cpu" in result.stderr and b"ephemeral" in result.stderr
        # The same on a terminal, where progress (the image pull's) is shown too.
        _, text = on_a_terminal(argv)
        assert "admission refused the agent's pod" in text, text
        assert "agent.startup_timeout" not in text, text
    finally:
        core.delete_namespaced_limit_range("small", web.namespace)


def _interrupt_when(kube_api: Any, namespace: str, pod: str, moment: str,
                    process: subprocess.Popen[bytes], seen_before: set[str]) -> None:
    """SIGINT to ``process`` the instant the API shows the agent's object:
    ``job`` (the Job exists), ``ephemeral`` (the pod has a new agent
    ephemeral container, not one of ``seen_before``), ``running`` (it runs)."""
    from kubernetes import watch

    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    watcher = watch.Watch()
    if moment == "job":
        events = watcher.stream(batch.list_namespaced_job, namespace, label_selector=MANAGED,
                                timeout_seconds=60)
    else:
        events = watcher.stream(core.list_namespaced_pod, namespace,
                                field_selector=f"metadata.name={pod}", timeout_seconds=60)
    try:
        for event in events:
            item = event["object"]
            if moment == "job":
                hit = True
            elif moment == "ephemeral":
                hit = any(container.name.startswith("mtrace-agent-")
                          and container.name not in seen_before
                          for container in item.spec.ephemeral_containers or [])
            else:
                hit = any(status.name not in seen_before and status.state and status.state.running
                          for status in item.status.ephemeral_container_statuses or [])
            if hit:
                process.send_signal(signal.SIGINT)
                return
            assert process.poll() is None, process.communicate()
    finally:
        watcher.stop()
    raise AssertionError(f"the API never showed the agent's {moment}")



@pytest.mark.parametrize("moment", ["job", "ephemeral", "running"])
def test_ctrl_c_while_the_agent_is_being_created_leaves_nothing(
        moment: str, kube_api: Any, kubeconfig: Path, web: Workload, agent_image: str,
        tmp_path: Path) -> None:
    """A SIGINT that lands the instant the agent's Job or ephemeral container
    appears (before mtrace has read the API's answer): mtrace still deletes the
    Job, and stops an ephemeral agent that no client will ever reach (it
    would otherwise wait for agent.ttl)."""
    pod = client.CoreV1Api(kube_api).read_namespaced_pod(web.pod, web.namespace)
    seen_before = {container.name for container in pod.spec.ephemeral_containers or []}
    config = write_config(tmp_path, kubeconfig, agent_image, ephemeral=moment != "job", ttl=600)
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", web.namespace,
         "--target", f"pod/{web.pod}", "--", "sh", "-c", "echo started; exec sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _interrupt_when(kube_api, web.namespace, web.pod, moment, process, seen_before)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    if moment != "running":  # the kubelet's "running" may come after the program started
        assert b"started" not in out, err
    assert process.returncode != 0
    assert wait_clean(kube_api, web.namespace) == [], err.decode()[-2000:]
