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
  date +%s.%N`, from the start to the time the program prints (goal: <= 3 s
  on the rig), and to mtrace's exit;
* ``small request``: one HTTP/1.1 request and its answer on a kept-alive
  connection to the Service, through the agent vs through a port-forward to
  the pod (median ms);
* ``bulk throughput``: ``GET /bulk?bytes=N`` (httpserve) read to the end:
  curl under ``mtrace exec --target deployment/NAME`` to the Service, next to
  the same curl through ``kubectl port-forward`` to the pod (the peer users
  have today; curl's own ``speed_download``), and the agent's stream read
  in-process (no trap, no relay) (MiB/s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Row, Unavailable, compare, median

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

    async def read(self, n: int) -> bytes:
        if not self.buffer:
            return bytes(await self.stream.read(n))
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


async def _bulk_transfers(reader: Any, writer: Any, size: int, count: int) -> list[float]:
    """``count`` downloads of ``size`` bytes on one connection, in MiB/s each."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        writer.write(f"GET /bulk?bytes={size} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        left = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:"))
        if not head.startswith(b"HTTP/1.1 200") or left != size:
            raise Unavailable(f"httpserve answered {head.splitlines()[0].decode()!r} to /bulk: "
                              "an older programs image? (tests/kube/images.py rebuilds it)")
        while left:
            chunk = await reader.read(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("closed in the middle of the body")
            left -= len(chunk)
        samples.append(size / (1 << 20) / (time.perf_counter() - started))
    return samples


async def _through_agent(config: Any, runs: int, requests: int, bulk: tuple[int, int]
                         ) -> tuple[dict[str, list[float]], list[float], list[float]]:
    from mtrace.cli.kube import session
    from mtrace.cli.kube.resolve import KubeTarget

    phases: dict[str, list[float]] = {}
    latencies: list[float] = []
    throughput: list[float] = []
    namespace = config.target.namespace
    for run in range(runs):
        timings: dict[str, float] = {}
        client = await session.connect(config, KubeTarget("deployment", "web", None, namespace),
                                       verbose=0, progress=None, timings=timings)
        for name, seconds in timings.items():
            phases.setdefault(name, []).append(seconds)
        if run == 0:
            stream = await client.open_tcp(f"web.{namespace}.svc.cluster.local", 80)
            latencies = await _round_trips(_StreamReader(stream), stream, requests)
            stream.close()
            stream = await client.open_tcp(f"web.{namespace}.svc.cluster.local", 80)
            with contextlib.suppress(Unavailable):  # the curl rows say why
                throughput = await _bulk_transfers(_StreamReader(stream), stream, *bulk)
            stream.close()
        await client.close()
        await asyncio.to_thread(session.release_all)
    return phases, latencies, throughput


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


def _mtrace_exec(kubeconfig: Path, namespace: str, argv: list[str]) -> bytes:
    """``mtrace exec --target deployment/web -- ARGV``; its stdout."""
    import subprocess

    image = os.environ.get("MTRACE_AGENT_IMAGE", "mtrace-agent:rig")
    config = Path(f"/tmp/mtrace-bench-{namespace}.json")
    config.write_text(json.dumps({"agent": {"image": image, "startup_timeout": 60}}))
    try:
        return subprocess.run([sys.executable, "-m", "mtrace.cli", "exec", "-f", str(config),
                               "--kubeconfig", str(kubeconfig), "-n", namespace,
                               "--target", "deployment/web", "--", *argv],
                              check=True, capture_output=True, timeout=300).stdout
    finally:
        config.unlink(missing_ok=True)


def _exec_wall(kubeconfig: Path, namespace: str, runs: int) -> tuple[list[float], list[float]]:
    """Seconds from `mtrace exec` to the program's first instruction (the
    program prints the wall clock), and to mtrace's exit."""
    first, total = [], []
    for _ in range(runs):
        started = time.time()
        printed = _mtrace_exec(kubeconfig, namespace, ["/bin/date", "+%s.%N"])
        total.append(time.time() - started)
        first.append(float(printed) - started)
    return first, total


def _curl_bulk(url: str, size: int, count: int) -> list[str]:
    """curl fetching ``url`` ``count`` times (one process), each download's
    ``speed_download`` in bytes/s; the argv, to run as it is or under mtrace."""
    argv = ["curl"]
    for index in range(count):
        if index:
            argv.append("--next")
        argv += ["--silent", "--show-error", "--output", "/dev/null",
                 "--write-out", "%{http_code} %{size_download} %{speed_download}\\n",
                 f"{url}/bulk?bytes={size}"]
    return argv


def _speeds(output: bytes, size: int) -> list[float]:
    speeds = []
    for line in output.decode().splitlines():
        code, downloaded, speed = line.split()
        if code != "200" or int(downloaded) != size:
            raise Unavailable(f"curl got HTTP {code} and {downloaded} bytes from /bulk: "
                              "an older programs image? (tests/kube/images.py rebuilds it)")
        speeds.append(float(speed) / (1 << 20))
    return speeds


def _kubectl_bulk(kubeconfig: Path, namespace: str, size: int, count: int) -> list[float]:
    """The same curl through `kubectl port-forward` to the pod."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise Unavailable("kubectl is not installed")
    forward = subprocess.Popen([kubectl, "--kubeconfig", str(kubeconfig), "-n", namespace,
                                "port-forward", "deployment/web", ":8080"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline().decode()  # Forwarding from 127.0.0.1:PORT -> 8080
        if "Forwarding from" not in line:
            raise Unavailable(f"kubectl port-forward said: {line.strip() or 'nothing'}")
        port = int(line.split("->")[0].rsplit(":", 1)[1])
        argv = _curl_bulk(f"http://127.0.0.1:{port}", size, count)
        return _speeds(subprocess.run(argv, check=True, capture_output=True, timeout=300).stdout,
                       size)
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def run(ctx: Context) -> list[Row]:
    try:
        kubeconfig = _kubeconfig()
        api, namespace = _setup(kubeconfig)
    except Unavailable as error:
        return [Row.missing(GROUP, "start-up", "mtrace exec --target deployment/NAME", "s", str(error))]
    runs = 1 if ctx.settings.quick else 5
    requests = 20 if ctx.settings.quick else 500
    bulk = (4 << 20, 2) if ctx.settings.quick else (64 << 20, 5)
    rows: list[Row] = []
    try:
        ctx.log(f"kube: {runs} agent start-ups, {requests} small requests, "
                f"{bulk[1]} downloads of {bulk[0] >> 20} MiB")
        phases, through_agent, agent_bulk = asyncio.run(
            _through_agent(_config(kubeconfig, namespace), runs, requests, bulk))
        for name, samples in phases.items():
            rows.append(Row(GROUP, "start-up phases", name, median(samples), "s", samples=samples))
        first, wall = _exec_wall(kubeconfig, namespace, runs)
        rows.append(Row(GROUP, "exec to first instruction", "mtrace exec --target deployment/NAME",
                        median(first), "s", samples=first, note="goal <= 3 s on the rig"))
        rows.append(Row(GROUP, "exec to exit (date)", "mtrace exec --target deployment/NAME",
                        median(wall), "s", samples=wall))
        through_forward = asyncio.run(_through_port_forward(kubeconfig, namespace, requests))
        rows.append(Row(GROUP, "small request to a Service", "API port-forward (kubectl's path)",
                        median(through_forward), "ms", samples=through_forward))
        rows.append(Row(GROUP, "small request to a Service", "mtrace agent stream",
                        median(through_agent), "ms", samples=through_agent,
                        baseline="API port-forward (kubectl's path)"))
        name, peer = "bulk throughput to a Service", "curl, kubectl port-forward"
        try:
            forwarded = _kubectl_bulk(kubeconfig, namespace, *bulk)
            rows.append(Row(GROUP, name, peer, median(forwarded), "MiB/s", samples=forwarded,
                            note="kubectl port-forward to the pod"))
            traced = _speeds(_mtrace_exec(kubeconfig, namespace, _curl_bulk(
                f"http://web.{namespace}.svc.cluster.local", *bulk)), bulk[0])
            rows.append(Row(GROUP, name, "curl, mtrace exec", median(traced), "MiB/s",
                            samples=traced, baseline=peer))
        except Unavailable as error:
            rows.append(Row.missing(GROUP, name, peer, "MiB/s", str(error)))
        if agent_bulk:
            rows.append(Row(GROUP, name, "mtrace agent stream", median(agent_bulk), "MiB/s",
                            samples=agent_bulk, baseline=peer, note="in-process: no trap, no relay"))
    finally:
        from kubernetes import client

        client.CoreV1Api(api).delete_namespace(namespace)
    for row in rows:
        if row.baseline:
            compare(rows, row, row.baseline)
    return rows
