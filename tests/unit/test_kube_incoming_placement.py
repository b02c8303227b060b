"""Incoming traffic for Kubernetes targets without a cluster: what the agent
asks for per incoming mode, where it runs when an ephemeral container cannot
have it, the refusal of a steal by admission, and every ready pod of a workload."""

from __future__ import annotations

from typing import Any

import pytest

from mtrace.cli.config import Config
from mtrace.cli.kube.client import KubeForbidden, KubeNotFound, KubeRejected
from mtrace.cli.kube.placement import (
    AdmissionRefused,
    CapabilitiesUnavailable,
    EphemeralUnavailable,
    agent_capabilities,
    default_capabilities_lack,
    start_ephemeral,
)
from mtrace.cli.kube.resolve import KubeTarget, ResolvedTarget, ready_pods
from mtrace.cli.target import parse_target, replica_provider

SECURITY_CONTEXT_REFUSED = ("Pod \"web\" is invalid: spec.ephemeralContainers[0].securityContext: "
                            "Forbidden: cannot be set for an Ephemeral Container")


class EphemeralApi:
    """The 1.16-1.21 ephemeralcontainers subresource: refuses what ``refuse`` says."""

    namespace = "default"

    def __init__(self, refuse: Any = None) -> None:
        self.refuse = refuse
        self.added: list[dict[str, Any]] = []

    def server_version(self) -> tuple[int, int]:
        return (1, 20)

    def get(self, path: str, **query: str) -> Any:
        return {"ephemeralContainers": []}

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        container = body["ephemeralContainers"][-1]
        refusal = self.refuse(container) if self.refuse else None
        if refusal is not None:
            raise refusal
        self.added.append(container)
        return {}


def _target(runtime: str = "docker") -> ResolvedTarget:
    pod = {"metadata": {"name": "web", "uid": "u"},
           "spec": {"containers": [{"name": "web"}]}}
    return ResolvedTarget("ns", "web", "web", f"{runtime}://{'a' * 64}", "node-1", pod)


def _start(api: EphemeralApi, incoming: str, runtime: str = "docker") -> None:
    start_ephemeral(api, _target(runtime), Config().agent, session="s", port=45000,  # type: ignore[arg-type]
                    secret="x" * 32, write=False, incoming=incoming)


def _no_security_context(container: dict[str, Any]) -> Exception | None:
    return KubeRejected(SECURITY_CONTEXT_REFUSED) if "securityContext" in container else None


def test_capabilities_follow_the_incoming_mode() -> None:
    assert agent_capabilities("ephemeral") == ["SYS_PTRACE"]
    assert agent_capabilities("ephemeral", "mirror") == ["SYS_PTRACE", "NET_RAW"]
    assert agent_capabilities("ephemeral", "steal") == ["SYS_PTRACE", "NET_ADMIN"]
    assert agent_capabilities("job", "steal") == ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"]
    assert agent_capabilities("job", "off") == ["SYS_ADMIN", "SYS_PTRACE"]


def test_runtime_defaults_give_net_raw_but_never_net_admin() -> None:
    assert default_capabilities_lack("docker://abc", "mirror") == []
    assert default_capabilities_lack("containerd://abc", "mirror") == []
    assert default_capabilities_lack("cri-o://abc", "mirror") == ["NET_RAW"]
    assert default_capabilities_lack("docker://abc", "steal") == ["NET_ADMIN"]


def test_ephemeral_agent_asks_for_what_steal_needs() -> None:
    api = EphemeralApi()
    _start(api, "steal")
    assert api.added[0]["securityContext"] == {"capabilities": {"add": ["SYS_PTRACE", "NET_ADMIN"]}}


def test_steal_before_1_23_runs_the_agent_as_a_job_and_says_why() -> None:
    api = EphemeralApi(_no_security_context)
    with pytest.raises(CapabilitiesUnavailable) as caught:
        _start(api, "steal")
    assert isinstance(caught.value, EphemeralUnavailable)  # the session's Job fallback
    assert "NET_ADMIN" in caught.value.message and "1.23" in caught.value.message
    assert api.added == []  # nothing was left in the pod


def test_mirror_before_1_23_keeps_the_ephemeral_agent_with_the_runtimes_net_raw() -> None:
    api = EphemeralApi(_no_security_context)
    _start(api, "mirror")
    assert len(api.added) == 1 and "securityContext" not in api.added[0]


def test_admission_refusing_net_admin_fails_a_steal_with_77() -> None:
    def baseline(container: dict[str, Any]) -> Exception | None:
        added = (container.get("securityContext") or {}).get("capabilities", {}).get("add", [])
        if added:
            return KubeForbidden('pods "web" is forbidden: violates PodSecurity "baseline:latest": '
                                 f'non-default capabilities (container "a" must not include '
                                 f'{", ".join(added)} in securityContext.capabilities.add)')
        return None

    with pytest.raises(AdmissionRefused) as caught:
        _start(EphemeralApi(baseline), "steal")
    assert caught.value.exit_code == 77
    assert "NET_ADMIN" in caught.value.message and "baseline" in caught.value.message
    assert "--incoming mirror" in (caught.value.hint or "")
    # Mirror is the default mode: the agent is started without capabilities instead.
    api = EphemeralApi(baseline)
    _start(api, "mirror")
    assert api.added[0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_mirror_refused_net_raw_keeps_sys_ptrace() -> None:
    """A policy that allows SYS_PTRACE but not NET_RAW: the agent keeps SYS_PTRACE
    (reading a target of another user) and only mirroring is lost."""
    def no_net_raw(container: dict[str, Any]) -> Exception | None:
        added = (container.get("securityContext") or {}).get("capabilities", {}).get("add", [])
        return KubeForbidden("capabilities NET_RAW not allowed") if "NET_RAW" in added else None

    api = EphemeralApi(no_net_raw)
    _start(api, "mirror")
    assert api.added[0]["securityContext"] == {"capabilities": {"add": ["SYS_PTRACE"]}}


def _pod(name: str, ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": name},
            "spec": {"nodeName": "node-1", "containers": [{"name": "api"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": [{"name": "api", "containerID": f"docker://{'b' * 64}",
                                              "state": {"running": {}}}]}}


class ListApi:
    namespace = "default"

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects

    def get(self, path: str, **query: str) -> Any:
        if path not in self.objects:
            raise KubeNotFound(path)
        return self.objects[path]


def test_ready_pods_are_every_ready_replica_by_name() -> None:
    api = ListApi({
        "/apis/apps/v1/namespaces/ns/deployments/api": {
            "metadata": {"uid": "d"}, "spec": {"selector": {"matchLabels": {"app": "api"}}}},
        "/api/v1/namespaces/ns/pods": {"items": [_pod("api-c"), _pod("api-a"),
                                                 _pod("api-b", ready=False)]},
    })
    found = ready_pods(api, KubeTarget("deployment", "api", None, "ns"))  # type: ignore[arg-type]
    assert [pod.pod for pod in found] == ["api-a", "api-c"]
    assert all(pod.container == "api" for pod in found)


def test_replicas_only_for_workloads_with_incoming_on() -> None:
    config = Config()
    assert replica_provider(config, parse_target("deployment/api")) is not None
    assert replica_provider(config, parse_target("pod/api-1")) is None
    config.feature.network.incoming = "off"
    assert replica_provider(config, parse_target("deployment/api")) is None


class _FakeAgent:
    """An agent client that records subscriptions (or refuses them)."""

    def __init__(self, description: str, refusal: Exception | None = None) -> None:
        import asyncio

        self.description = description
        self.refusal = refusal
        self.capabilities = ["incoming"]
        self.ports: list[int] = []
        self.closed = asyncio.Event()

    async def subscribe_incoming(self, port: int, mode: str, handler: Any, *,
                                 http_filter: Any = None) -> Any:
        from mtrace.agent.protocol import IncomingSubscribed

        if self.refusal is not None:
            raise self.refusal
        self.ports.append(port)
        return IncomingSubscribed(port=port, target_listening=True)

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


def test_every_replica_is_subscribed_and_a_refusal_costs_only_its_pod(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio
    import errno
    import socket

    from mtrace.agent.errors import RemoteError
    from mtrace.tracer.features.incoming import IncomingFeature, Listener
    from mtrace.tracer.features.policy import FeatureConfig
    from mtrace.tracer.features.remote import RemoteContext
    from mtrace.tracer.outcome import ReturnValue

    primary, other = _FakeAgent("agent in pod/a"), _FakeAgent("agent in pod/b")
    refusing = _FakeAgent("agent in pod/c", RemoteError(errno.EPERM, "needs NET_ADMIN"))
    started: list[int] = []

    async def replicas() -> list[Any]:
        started.append(1)
        return [other, refusing]

    async def scenario() -> None:
        context = RemoteContext(client=primary, async_side=None, features=FeatureConfig(),  # type: ignore[arg-type]
                                session_dir=tmp_path, replica_agents=replicas)
        feature = IncomingFeature(context, None)  # type: ignore[arg-type]
        for port in (80, 81):
            listener = Listener(socket.AF_INET, ("127.0.0.1", 1), 8000 + port, port)
            feature.by_remote_port[port] = listener
            assert await feature._subscribe(listener) == ReturnValue(0)
        context.closing = True
        await feature.close()

    asyncio.run(scenario())
    assert started == [1]  # once, at the first listen
    assert primary.ports == other.ports == [80, 81]
    said = capsys.readouterr().err
    assert "cannot mirror port 80 through the agent in pod/c: needs NET_ADMIN" in said
    assert other.closed.is_set() and refusing.closed.is_set()
    assert "lost" not in said
