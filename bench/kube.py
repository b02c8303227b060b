"""Kubernetes targets (n/a without a cluster): where start-up time goes, and
small requests to a Service through mtrace's agent next to the same requests
through the API's port-forward (what `kubectl port-forward` gives users today).

The cluster: ``KUBECONFIG``, else the project's rig (``tests/kube/``) when it
runs. A throw-away namespace holds an ``httpserve`` deployment and Service from
the rig's programs image (``MTRACE_BENCH_PROGRAMS_IMAGE`` elsewhere); the agent
image is ``MTRACE_AGENT_IMAGE`` (default: the rig's ``mtrace-agent:rig``).

Rows:

* ``start-up phases``: median seconds per phase of `connect` (kubeconfig,
  resolve, place the agent, its container start, port-forward + handshake),
  measured in-process with the image already on the node;
* ``exec to first instruction``: `mtrace exec --target deployment/NAME --
  static-true`, wall time (goal: <= 3 s on the rig);
* ``small request``: one HTTP/1.1 request and its answer on a kept-alive
  connection to the Service, through the agent vs through a port-forward to
  the pod (median ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Row, Unavailable, median

GROUP = "kube"
RIG_KUBECONFIG = Path("/run/mtrace-rig/admin.kubeconfig")
REQUEST = b"GET /hello HTTP/1.1\r\nHost: web\r\n\r\n"


def _kubeconfig() -> Path:
    path = os.environ.get("KUBECONFIG")
    if path:
        if not Path(path).is_file():
            raise Unavailable(f"no cluster: KUBECONFIG={path} is not a file")
        return Path(path)
    if RIG_KUBECONFIG.exists():
        return RIG_KUBECONFIG
    raise Unavailable("no cluster: set KUBECONFIG or bring up the rig (tests/kube/rig.py up)")


def _setup(kubeconfig: Path) -> tuple[Any, str]:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    namespace = f"mtrace-bench-{secrets.token_hex(3)}"
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    try:
        core.create_namespace(client.V1Namespace.from_dict({"metadata": {"name": namespace}}))
    except Exception as error:
        raise Unavailable(f"the cluster does not answer: {error}") from error
    image = os.environ.get("MTRACE_BENCH_PROGRAMS_IMAGE", "mtrace-rig/programs:latest")
    labels = {"app": "web"}
    apps.create_namespaced_deployment(namespace, client.V1Deployment.from_dict({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "web", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["/programs/httpserve", "-name", "web", "0.0.0.0:8080"]}]}}}}))
    core.create_namespaced_service(namespace, client.V1Service.from_dict({
        "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}}))
    deadline = time.monotonic() + 120
    while True:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        statuses = [c for p in pods for c in (p.status.container_statuses or [])]
        if statuses and all(c.ready for c in statuses):
            return api, namespace
        if time.monotonic() > deadline:
            raise Unavailable("the bench deployment did not become ready in 120 s")
        time.sleep(0.5)


def _config(kubeconfig: Path, namespace: str) -> Any:
    from mtrace.cli.config import AgentConfig, Config, TargetConfig

    agent = AgentConfig(image=os.environ.get("MTRACE_AGENT_IMAGE", "mtrace-agent:rig"),
                        image_pull_policy="IfNotPresent", startup_timeout=60)
    return Config(target=TargetConfig(path="deployment/web", namespace=namespace),
                  kubeconfig=str(kubeconfig), agent=agent)


async def _round_trips(reader: Any, writer: Any, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


class _StreamReader:
    """readuntil/readexactly over an agent TcpStream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    async def _fill(self) -> None:
        chunk = await self.stream.read(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.buffer += chunk

    async def readuntil(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


async def _through_agent(config: Any, runs: int, requests: int) -> tuple[dict[str, list[float]],
                                                                         list[float]]:
    from mtrace.cli.kube import session
    from mtrace.cli.kube.resolve import KubeTarget

    phases: dict[str, list[float]] = {}
    latencies: list[float] = []
    namespace = config.target.namespace
    for run in range(runs):
        timings: dict[str, float] = {}
        client = await session.connect(config, KubeTarget("deployment", "web", None, namespace),
                                       verbose=0, progress=lambda message: None, timings=timings)
        for name, seconds in timings.items():
            phases.setdefault(name, []).append(seconds)
        if run == 0:
            stream = await client.open_tcp(f"web.{namespace}.svc.cluster.local", 80)
            latencies = await _round_trips(_StreamReader(stream), stream, requests)
            stream.close()
        await client.close()
        await asyncio.to_thread(session.release_all)
    return phases, latencies


async def _through_port_forward(kubeconfig: Path, namespace: str, requests: int) -> list[float]:
    from mtrace.cli.kube.client import Kube, KubeSettings
    from mtrace.cli.kube.portforward import open_socket

    kube = Kube(KubeSettings(str(kubeconfig), None, namespace))
    pods = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="app=web")["items"]
    forward: Any = await asyncio.to_thread(open_socket, kube, namespace, pods[0]["metadata"]["name"],
                                           8080)
    sock: socket.socket = forward.socket(8080)._socket
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        return await _round_trips(reader, writer, requests)
    finally:
        writer.close()
        kube.close()


def _exec_wall(kubeconfig: Path, namespace: str, runs: int) -> list[float]:
    import subprocess

    image = os.environ.get("MTRACE_AGENT_IMAGE", "mtrace-agent:rig")
    config = Path(f"/tmp/mtrace-bench-{namespace}.json")
    config.write_text(json.dumps({"agent": {"image": image, "startup_timeout": 60}}))
    samples = []
    try:
        for _ in range(runs):
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config),
                            "--kubeconfig", str(kubeconfig), "-n", namespace,
                            "--target", "deployment/web", "--", "/bin/true"],
                           check=True, capture_output=True, timeout=120)
            samples.append(time.monotonic() - started)
    finally:
        config.unlink(missing_ok=True)
    return samples


def run(ctx: Context) -> list[Row]:
    try:
        kubeconfig = _kubeconfig()
        api, namespace = _setup(kubeconfig)
    except Unavailable as error:
        return [Row.missing(GROUP, "start-up", "mtrace exec --target deployment/NAME", "s", str(error))]
    runs = 1 if ctx.settings.quick else 5
    requests = 20 if ctx.settings.quick else 500
    rows: list[Row] = []
    try:
        ctx.log(f"kube: {runs} agent start-ups, {requests} small requests")
        phases, through_agent = asyncio.run(_through_agent(_config(kubeconfig, namespace), runs, requests))
        for name, samples in phases.items():
            rows.append(Row(GROUP, "start-up phases", name, median(samples), "s", samples=samples))
        wall = _exec_wall(kubeconfig, namespace, runs)
        rows.append(Row(GROUP, "exec to first instruction", "mtrace exec --target deployment/NAME",
                        median(wall), "s", samples=wall, note="goal <= 3 s on the rig"))
        through_forward = asyncio.run(_through_port_forward(kubeconfig, namespace, requests))
        rows.append(Row(GROUP, "small request to a Service", "API port-forward (kubectl's path)",
                        median(through_forward), "ms", samples=through_forward))
        rows.append(Row(GROUP, "small request to a Service", "mtrace agent stream",
                        median(through_agent), "ms", samples=through_agent,
                        baseline="API port-forward (kubectl's path)"))
        rows.append(Row.missing(GROUP, "bulk throughput to a Service", "mtrace agent stream", "MiB/s",
                                "not measured yet: httpserve has no bulk endpoint"))
    finally:
        from kubernetes import client

        client.CoreV1Api(api).delete_namespace(namespace)
    return rows
