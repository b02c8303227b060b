"""Incoming traffic for Kubernetes targets, end to end on a real cluster.

A client pod (``caller``) calls the target's Service (or a pod IP) with the Go
probe's HTTP client (busybox's wget crashes in the programs image); the
program under ``mtrace exec --target deployment/...`` is the static Go probe
in ``serve`` mode, which answers ``local METHOD PATH from PEER`` and prints
the same line. Its port is free on this machine and mapped to the pod's 8080
(``port_mapping``), so nothing here depends on 8080 being free locally.
Checked: steal (the caller gets the program's answer, with its own address as
the peer), a header-filtered steal, mirror (the caller gets the pod's answer,
the program saw the request), every replica of a two-pod Deployment,
`kill -9` of mtrace mid-steal, a steal the cluster refuses (exit 77), an
HTTP/2 filter with the image's h2, and after mtrace exits: the pod answers
again, no mtrace object is left running and no redirect rule is left in any
pod's network namespace.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kube.common import docker_argv
from kube.images import build_agent_image
from kube.workloads import Workload, create_workload, exec_in_pod
from kubernetes import client
from mtrace_run import stop
from test_kube_targets import AGENT_IMAGE, MANAGED, wait_clean

pytestmark = [pytest.mark.timeout(180)]

POD_PORT = 8080


@pytest.fixture(scope="module")
def agent_image(kube_cluster: Any) -> str:
    """The agent image of this checkout, built on the rig (its pods' namespaces
    are this machine's, where the redirect rules are looked for)."""
    kube_cluster.require_rig()
    build_agent_image(AGENT_IMAGE)
    return AGENT_IMAGE


@pytest.fixture(scope="module")
def web(kube_api: Any, namespace: str) -> Workload:
    return create_workload(kube_api, namespace, "web", service_port=80)


@pytest.fixture(scope="module")
def caller(kube_api: Any, namespace: str) -> Workload:
    """A client pod: busybox's wget calls the target from inside the cluster."""
    return create_workload(kube_api, namespace, "caller", command=["sleep", "1000000"])


def call(kube_api: Any, caller: Workload, url: str, *headers: str) -> str:
    """One GET from the caller pod (the probe's HTTP client; with headers, the
    request written by hand over its TCP exchange); the body, or the failure."""
    if not headers:
        out = exec_in_pod(kube_api, caller.namespace, caller.pod, ["/programs/probe-go", "http", url])
        status, _, body = out.partition("\n")
        return body if status == "status 200" else out
    address, _, path = url.removeprefix("http://").partition("/")
    host, _, port = address.partition(":")
    request = "\r\n".join([f"GET /{path} HTTP/1.1", f"Host: {host}", *headers,
                            "Connection: close", "", ""])
    out = exec_in_pod(kube_api, caller.namespace, caller.pod,
                      ["/programs/probe-go", "tcp", host, port or "80", request[:-1]])
    head, _, body = out.partition("\r\n\r\n")
    return body if head.startswith("HTTP/1.1 200") else out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    """The program under mtrace: what it printed, and mtrace's stderr at the end."""

    process: subprocess.Popen[bytes]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    stderr: str = ""

    def next_line(self, timeout: float = 30) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""


@contextmanager
def serving(tmp_path: Path, kubeconfig: Path, image: str, programs: Any, namespace: str,
            target: str, incoming: dict[str, Any], *flags: str) -> Iterator[Served]:
    """``mtrace exec --target TARGET -- probe serve`` until the block ends (then Ctrl-C)."""
    port = free_port()
    config = {"kubeconfig": str(kubeconfig),
              "agent": {"image": image, "image_pull_policy": "Never", "startup_timeout": 60},
              "feature": {"network": {"incoming": {"port_mapping": [[port, POD_PORT]],
                                                   **incoming}}}}
    path = tmp_path / "mtrace.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(path), "-n", namespace,
         "--target", target, *flags, "--", str(programs["probe-go"]), "serve", "0.0.0.0",
         str(port), "local"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    served = Served(process)
    errors: list[bytes] = []
    readers = [threading.Thread(target=_read_lines, args=(process.stdout, served.lines), daemon=True),
               threading.Thread(target=lambda: errors.append(process.stderr.read()),  # type: ignore[union-attr]
                                daemon=True)]
    for reader in readers:
        reader.start()
    try:
        ready = served.next_line(timeout=120)
        if not ready.startswith("listening on"):
            process.kill()
            process.wait()
            readers[1].join(10)
            pytest.fail(f"the program did not listen: {ready!r}; mtrace said:\n"
                        f"{b''.join(errors).decode(errors='replace')[-3000:]}")
        yield served
    finally:
        stop(process, timeout=60)
        for reader in readers:
            reader.join(10)
        served.stderr = b"".join(errors).decode(errors="replace")


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line.decode(errors="replace"))


def redirect_rules(kube_api: Any, namespace: str, pod: str) -> str:
    """mtrace's nftables tables and iptables chains in the pod's network namespace
    (read from this machine: the rig's node is this machine)."""
    status = client.CoreV1Api(kube_api).read_namespaced_pod(pod, namespace).status
    container_id = status.container_statuses[0].container_id.partition("://")[2]
    pid = subprocess.run(docker_argv("inspect", "--format", "{{.State.Pid}}", container_id),
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    listing = subprocess.run(["nsenter", "-t", pid, "-n", "nft", "list", "ruleset"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    return "\n".join(line for line in listing.splitlines() if "mtrace" in line.lower())


def test_steal_a_deployment_through_its_service(
        kube_api: Any, kubeconfig: Path, web: Workload, caller: Workload, agent_image: str,
        programs: Any, tmp_path: Path) -> None:
    service = f"http://web.{web.namespace}/hello"
    assert call(kube_api, caller, service) == "hello from web\n"
    direct = f"http://{web.pod_ips[0]}:{POD_PORT}/direct"
    with serving(tmp_path, kubeconfig, agent_image, programs, web.namespace, "deployment/web",
                 {}, "--steal") as served:
        answers = [call(kube_api, caller, service), call(kube_api, caller, direct)]
        seen = [served.next_line(), served.next_line()]
        rules = redirect_rules(kube_api, web.namespace, web.pod)
    # Through the Service the pod sees the peer kube-proxy leaves (the rig masquerades
    # to the bridge's address); straight to the pod's IP, the caller's own address.
    assert answers[0].startswith("local GET /hello from "), (answers, served.stderr)
    assert answers[1].startswith(f"local GET /direct from {caller.pod_ips[0]}:"), answers
    assert seen == answers
    assert "mtrace_" in rules
    # 1.20 gives an ephemeral container no NET_ADMIN: the agent ran as a Job, and said why.
    assert "NET_ADMIN" in served.stderr and "as a Job" in served.stderr, served.stderr
    assert call(kube_api, caller, service) == "hello from web\n"
    assert redirect_rules(kube_api, web.namespace, web.pod) == ""
    assert wait_clean(kube_api, web.namespace) == []


def test_steal_with_a_header_filter_leaves_other_requests_to_the_pod(
        kube_api: Any, kubeconfig: Path, web: Workload, caller: Workload, agent_image: str,
        programs: Any, tmp_path: Path) -> None:
    service = f"http://web.{web.namespace}/hello"
    incoming = {"mode": "steal", "http_filter": {"header_filter": "^X-Mtrace: local$"}}
    with serving(tmp_path, kubeconfig, agent_image, programs, web.namespace, "deployment/web",
                 incoming) as served:
        plain = call(kube_api, caller, service)
        marked = call(kube_api, caller, service, "X-Mtrace: local")
        other = call(kube_api, caller, service, "X-Mtrace: other")
        seen = served.next_line()
    assert plain == other == "hello from web\n", served.stderr
    assert marked.startswith("local GET /hello from "), (marked, served.stderr)
    assert seen == marked
    assert served.lines.empty()  # only the matching request reached the program
    assert redirect_rules(kube_api, web.namespace, web.pod) == ""
    assert wait_clean(kube_api, web.namespace) == []


@pytest.fixture(scope="module")
def replicated(kube_api: Any, namespace: str) -> Workload:
    workload = create_workload(kube_api, namespace, "twins", service_port=80, replicas=2)
    assert len(workload.pod_ips) == 2
    return workload


def test_steal_covers_every_replica(kube_api: Any, kubeconfig: Path, replicated: Workload,
                                   caller: Workload, agent_image: str, programs: Any,
                                   tmp_path: Path) -> None:
    urls = [f"http://{ip}:{POD_PORT}/hello" for ip in replicated.pod_ips]
    with serving(tmp_path, kubeconfig, agent_image, programs, replicated.namespace,
                 "deployment/twins", {}, "--steal") as served:
        answers = [call(kube_api, caller, url) for url in urls]
        seen = [served.next_line(), served.next_line()]
        rules = [redirect_rules(kube_api, replicated.namespace, pod) for pod in replicated.pods]
    for answer in answers:
        assert answer.startswith(f"local GET /hello from {caller.pod_ips[0]}:"), (answers, served.stderr)
    assert sorted(seen) == sorted(answers)
    assert all("mtrace_" in found for found in rules), rules
    assert "every ready pod of deployment/twins" in served.stderr, served.stderr
    for url, pod in zip(urls, replicated.pods, strict=True):
        assert call(kube_api, caller, url) == "hello from twins\n"
        assert redirect_rules(kube_api, replicated.namespace, pod) == ""
    assert wait_clean(kube_api, replicated.namespace) == []


def test_mirror_is_the_default_and_covers_every_replica(
        kube_api: Any, kubeconfig: Path, replicated: Workload, caller: Workload,
        agent_image: str, programs: Any, tmp_path: Path) -> None:
    urls = [f"http://{ip}:{POD_PORT}/hello?{pod}"
            for ip, pod in zip(replicated.pod_ips, replicated.pods, strict=True)]
    with serving(tmp_path, kubeconfig, agent_image, programs, replicated.namespace,
                 "deployment/twins", {}) as served:
        answers = [call(kube_api, caller, url) for url in urls]
        seen = sorted([served.next_line(), served.next_line()])
    assert answers == ["hello from twins\n"] * 2, served.stderr
    expected = sorted(f"local GET /hello?{pod} from {caller.pod_ips[0]}:" for pod in replicated.pods)
    assert [line[:len(prefix)] for line, prefix in zip(seen, expected, strict=True)] == expected, seen
    # Mirror needs only NET_RAW, which the runtime gives an ephemeral container by default.
    assert "as a Job" not in served.stderr, served.stderr
    assert wait_clean(kube_api, replicated.namespace) == []


def test_kill_9_of_mtrace_gives_the_port_back(
        kube_api: Any, kubeconfig: Path, web: Workload, caller: Workload, agent_image: str,
        programs: Any, tmp_path: Path) -> None:
    """mtrace killed mid-steal: its port-forward closes, the agent (a Job here)
    sees its client leave and removes its rules, and the pod answers again."""
    service = f"http://web.{web.namespace}/hello"
    with serving(tmp_path, kubeconfig, agent_image, programs, web.namespace, "deployment/web",
                 {}, "--steal") as served:
        assert call(kube_api, caller, service).startswith("local GET /hello from "), served.stderr
        served.process.kill()
    deadline = time.monotonic() + 60
    while redirect_rules(kube_api, web.namespace, web.pod):
        assert time.monotonic() < deadline, "the agent left its redirect rules after kill -9"
        time.sleep(0.5)
    assert call(kube_api, caller, service) == "hello from web\n"
    batch = client.BatchV1Api(kube_api)
    jobs = batch.list_namespaced_job(web.namespace, label_selector=MANAGED).items
    while any(job.status.active for job in jobs):  # the agent exits: its Job completes
        assert time.monotonic() < deadline, "the agent did not exit after kill -9"
        time.sleep(0.5)
        jobs = batch.list_namespaced_job(web.namespace, label_selector=MANAGED).items
    for job in jobs:  # what the next run's sweep would delete
        batch.delete_namespaced_job(job.metadata.name, web.namespace,
                                    propagation_policy="Background")
    assert wait_clean(kube_api, web.namespace) == []


def test_steal_the_cluster_refuses_is_one_line_and_exit_77(
        kube_api: Any, kubeconfig: Path, web: Workload, agent_image: str, tmp_path: Path) -> None:
    """On 1.20 a steal needs the Job placement; a namespace whose quota allows no
    Job refuses it: the line before says why a Job, the error says what refused it."""
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_resource_quota(web.namespace, client.V1ResourceQuota.from_dict({
        "metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}))
    try:
        deadline = time.monotonic() + 30
        while not (core.read_namespaced_resource_quota("no-jobs", web.namespace).status.hard):
            assert time.monotonic() < deadline, "the quota controller did not take the quota"
            time.sleep(0.3)
        config = tmp_path / "mtrace.json"
        config.write_text(json.dumps({"kubeconfig": str(kubeconfig), "agent": {
            "image": agent_image, "image_pull_policy": "Never", "startup_timeout": 60}}))
        result = subprocess.run(
            [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config), "-n", web.namespace,
             "--target", "deployment/web", "--steal", "--", "true"],
            capture_output=True, timeout=120, check=False)
    finally:
        core.delete_namespaced_resource_quota("no-jobs", web.namespace)
    stderr = result.stderr.decode()
    assert result.returncode == 77, stderr
    assert "steal needs NET_ADMIN" in stderr and "as a Job" in stderr, stderr
    assert "mtrace: error: forbidden: cannot create jobs.batch" in stderr, stderr
    assert wait_clean(kube_api, web.namespace) == []


# An HTTP/2 client (prior knowledge, as gRPC speaks inside a cluster): one
# connection, a stream per request, the bodies in request order.
H2_CLIENT = str(Path(__file__).resolve().parents[1] / "h2_client.py")


def test_http2_filter_in_a_pod(kube_api: Any, kubeconfig: Path, namespace: str,
                               agent_image: str, programs: Any, tmp_path: Path) -> None:
    """The agent image's own h2 (Debian's) sorts the streams of one HTTP/2
    connection: matching ones to the program, the others to the pod. The
    client runs on the node (this machine) and calls the pod's IP."""
    grpc = create_workload(kube_api, namespace, "grpcish",
                           command=["/programs/httpserve", "-h2c", "-name", "grpcish", "0.0.0.0:8080"])
    port = free_port()
    path = tmp_path / "mtrace.json"
    path.write_text(json.dumps({
        "kubeconfig": str(kubeconfig),
        "agent": {"image": agent_image, "image_pull_policy": "Never", "startup_timeout": 60},
        "feature": {"network": {"incoming": {
            "mode": "steal", "port_mapping": [[port, POD_PORT]],
            "http_filter": {"header_filter": "^x-mtrace: yes$"}}}}}))
    process = subprocess.Popen(
        [sys.executable, "-m", "mtrace.cli", "exec", "-f", str(path), "-n", namespace,
         "--target", "deployment/grpcish", "--", str(programs["httpserve"]), "-h2c",
         "-name", "local", f"0.0.0.0:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"listening on")
        requests = [["/hello", {"x-mtrace": "yes"}], ["/hello", {}],
                    ["/hello", {"x-mtrace": "yes"}], ["/env/X", {}]]
        result = subprocess.run(  # cwd: nothing there may shadow the h2 package
            [sys.executable, H2_CLIENT, grpc.pod_ips[0], str(POD_PORT), json.dumps(requests)],
            capture_output=True, timeout=60, check=False, cwd=tmp_path)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert result.returncode == 0, (result.stderr.decode()[-2000:], err.decode()[-2000:])
    assert json.loads(result.stdout) == ["hello from local\n", "hello from grpcish\n",
                                         "hello from local\n", "X unset\n"]
    assert redirect_rules(kube_api, namespace, grpc.pod) == ""
    assert wait_clean(kube_api, namespace) == []
