"""Kubernetes targets without a cluster: parsing, selection rules, error mapping,
the agent's container lookup and its one-client lifecycle."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mtrace.agent.errors import AgentError
from mtrace.agent.target import find_container_process
from mtrace.cli.config import Config, TargetConfig, load
from mtrace.cli.kube.client import (
    KubeError,
    KubeForbidden,
    KubeNotFound,
    KubeRejected,
    api_error,
    describe_request,
)
from mtrace.cli.kube.placement import agent_argv, agent_container
from mtrace.cli.kube.resolve import (
    KubeTarget,
    is_ready,
    label_selector,
    parse_path,
    pick_container,
)
from mtrace.cli.target import parse_target, target_of


@pytest.mark.parametrize(("text", "expected"), [
    ("pod/web-1", KubeTarget("pod", "web-1")),
    ("deployment/api/container/main", KubeTarget("deployment", "api", "main")),
    ("service/db", KubeTarget("service", "db")),
    ("cronjob/nightly", KubeTarget("cronjob", "nightly")),
    ("rollout/canary/container/app", KubeTarget("rollout", "canary", "app")),
])
def test_parse_path_accepts_every_kind(text: str, expected: KubeTarget) -> None:
    assert parse_path(text) == expected


@pytest.mark.parametrize("text", ["pod/", "pod/a/b", "pod/a/pid/b", "pod/UPPER", "deployment/a/container/"])
def test_parse_path_rejects_malformed_paths(text: str) -> None:
    with pytest.raises(KubeError) as caught:
        parse_path(text)
    assert caught.value.exit_code == 79 and caught.value.hint


def test_target_table_and_namespace_flag(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('target = { path = "deployment/api", namespace = "staging" }\n'
                    'kube_context = "rig"\n[agent]\nephemeral = false\nttl = 30\n')
    config = load(file)
    assert isinstance(config.target, TargetConfig)
    target = target_of(config)
    assert target is not None and target.kube == KubeTarget("deployment", "api", None, "staging")
    overridden = target_of(config, namespace="prod")
    assert overridden is not None and overridden.kube is not None
    assert overridden.kube.namespace == "prod"
    assert config.kube_context == "rig" and config.agent.ttl == 30 and not config.agent.ephemeral
    assert target_of(Config(target="pod/p")) == parse_target("pod/p")


def test_label_selector_renders_every_operator() -> None:
    selector = {"matchLabels": {"app": "api", "tier": "web"}, "matchExpressions": [
        {"key": "env", "operator": "In", "values": ["a", "b"]},
        {"key": "x", "operator": "NotIn", "values": ["c"]},
        {"key": "y", "operator": "Exists"}, {"key": "z", "operator": "DoesNotExist"}]}
    assert label_selector(selector) == "app=api,tier=web,env in (a,b),x notin (c),y,!z"


def _pod(*names: str) -> dict:
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": n} for n in names]}}


def test_pick_container_skips_known_sidecars_and_says_which() -> None:
    name, note = pick_container(_pod("istio-proxy", "app", "log"), None)
    assert name == "app" and note is not None and "'app'" in note
    assert pick_container(_pod("app"), None) == ("app", None)
    assert pick_container(_pod("istio-proxy", "app"), "istio-proxy")[0] == "istio-proxy"


def test_pick_container_wrong_name_lists_the_containers() -> None:
    with pytest.raises(KubeNotFound) as caught:
        pick_container(_pod("app", "log"), "main")
    assert "main" in caught.value.message and "app, log" in (caught.value.hint or "")


def test_is_ready_needs_running_ready_and_not_deleting() -> None:
    ready = {"metadata": {}, "status": {"phase": "Running",
                                        "conditions": [{"type": "Ready", "status": "True"}]}}
    assert is_ready(ready)
    assert not is_ready({**ready, "metadata": {"deletionTimestamp": "now"}})
    assert not is_ready({"metadata": {}, "status": {"phase": "Pending"}})


@pytest.mark.parametrize(("method", "path", "verb", "resource"), [
    ("GET", "/api/v1/namespaces/n/pods", "list", "pods"),
    ("GET", "/api/v1/namespaces/n/pods/p", "get", "pods"),
    ("PATCH", "/api/v1/namespaces/n/pods/p/ephemeralcontainers", "patch", "pods/ephemeralcontainers"),
    ("POST", "/apis/batch/v1/namespaces/n/jobs", "create", "jobs.batch"),
    # mtrace's port-forward is a websocket, a GET: 1.20 checks get (seen on the rig)
    ("GET", "/api/v1/namespaces/n/pods/p/portforward?ports=1", "get", "pods/portforward"),
    ("GET", "/apis/apps/v1/namespaces/n/deployments?labelSelector=a", "list", "deployments.apps"),
])
def test_describe_request_names_the_rbac_verb_and_resource(method: str, path: str, verb: str,
                                                           resource: str) -> None:
    assert describe_request(method, path) == (verb, resource)


def test_api_errors_map_to_distinct_errors() -> None:
    forbidden = api_error("POST", "/apis/batch/v1/namespaces/n/jobs", 403,
                          b'{"message": "jobs.batch is forbidden: User x cannot create"}')
    assert isinstance(forbidden, KubeForbidden) and "create jobs.batch" in forbidden.message
    assert forbidden.exit_code == 77 and "Role" in (forbidden.hint or "")
    assert isinstance(api_error("GET", "/api/v1/namespaces/n/pods/p", 404, b"{}"), KubeNotFound)
    assert isinstance(api_error("POST", "/api/v1/namespaces/n/pods", 422, b"{}"), KubeRejected)


def test_agent_container_asks_only_for_what_it_needs() -> None:
    config = Config()
    container = agent_container("a", config.agent, agent_argv(45000, "docker://abc", 60, False),
                                "s3cret", ["SYS_PTRACE"])
    assert container["securityContext"] == {"capabilities": {"add": ["SYS_PTRACE"]}}
    assert "s3cret" not in " ".join(container["command"])
    assert {"name": "MTRACE_AGENT_SECRET", "value": "s3cret"} in container["env"]
    assert "--one-client" in container["command"] and "127.0.0.1:45000" in container["command"]
    config.agent.privileged = True
    assert agent_container("a", config.agent, [], "s", [])["securityContext"] == {"privileged": True}


def test_agent_capabilities_follow_placement_and_features() -> None:
    from mtrace.cli.kube.placement import agent_capabilities

    assert agent_capabilities("ephemeral") == ["SYS_PTRACE"]
    assert agent_capabilities("job") == ["SYS_ADMIN", "SYS_PTRACE"]
    assert agent_capabilities("job", targeted=False) == []
    assert agent_capabilities("ephemeral", "steal") == ["SYS_PTRACE", "NET_ADMIN"]


def test_pull_duration_reads_the_kubelets_pulled_message() -> None:
    from mtrace.cli.kube.placement import pull_duration

    # 1.20's message (seen on the rig), and a newer kubelet's with more after it.
    assert pull_duration('Successfully pulled image "127.0.0.1:5000/a:b" in 12.325702013s') == "12.3 s"
    assert pull_duration('Successfully pulled image "r/a:in-1" in 1m2.5s (1m2.5s including '
                         'waiting). Image size: 12 bytes.') == "1m2.5s"
    assert pull_duration('Container image "a:b" already present on machine') is None


def test_find_container_process_by_cgroup(tmp_path: Path) -> None:
    cid = "0123456789abcdef" * 4
    for pid, cgroup in ((7, f"4:memory:/kubepods/pod1/{cid}\n"),
                        (3, f"0::/system.slice/docker-{cid}.scope\n"),
                        (2, "4:memory:/kubepods/pod1/other\n")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(cgroup)
    (tmp_path / "self").mkdir()
    assert find_container_process(f"docker://{cid}", proc=str(tmp_path)) == 3
    assert find_container_process(f"containerd://{cid}", proc=str(tmp_path)) == 3
    with pytest.raises(AgentError):
        find_container_process("cri-o://" + "f" * 64, proc=str(tmp_path))
    with pytest.raises(AgentError):
        find_container_process("not-an-id", proc=str(tmp_path))


# A listening agent refuses a weak secret.
_SECRET = "3f9c2a7d81e4b06c5a9f12d4e8b7c3a0"


def _start_agent(*args: str) -> tuple[subprocess.Popen[str], int]:
    agent = subprocess.Popen(
        [sys.executable, "-m", "mtrace.agent", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "MTRACE_AGENT_SECRET": _SECRET})
    assert agent.stdout is not None
    line = agent.stdout.readline()
    return agent, int(line.rsplit(":", 1)[1])


def test_one_client_agent_exits_when_its_client_leaves() -> None:
    from mtrace.agent.client import connect_tcp

    agent, port = _start_agent("--one-client")
    try:
        async def session() -> None:
            client = await connect_tcp("127.0.0.1", port, _SECRET)
            await client.ping()
            await client.close()

        asyncio.run(session())
        assert agent.wait(timeout=20) == 0
    finally:
        agent.kill()


def test_agent_without_a_client_exits_after_ttl() -> None:
    agent, _ = _start_agent("--one-client", "--ttl", "0.5")
    try:
        assert agent.wait(timeout=20) == 0
    finally:
        agent.kill()


class FakeKube:
    """Answers GETs from a dict of path -> object; records the query of list calls."""

    namespace = "default"

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.queries: list[tuple[str, dict[str, str]]] = []

    def get(self, path: str, **query: str) -> Any:
        self.queries.append((path, query))
        if path not in self.objects:
            raise KubeNotFound(f"not found: {path}")
        return self.objects[path]


def _ready_pod(name: str, *containers: str, ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": name},
            "spec": {"nodeName": "node-1", "containers": [{"name": c} for c in containers]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": [{"name": c, "containerID": f"docker://{'a' * 64}",
                                              "state": {"running": {}}} for c in containers]}}


def test_deployment_resolves_to_its_first_ready_pod_and_says_which() -> None:
    from mtrace.cli.kube.resolve import resolve

    kube = FakeKube({
        "/apis/apps/v1/namespaces/ns/deployments/api": {
            "metadata": {"uid": "d"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": {"spec": {}}}},
        "/api/v1/namespaces/ns/pods": {"items": [
            _ready_pod("api-b", "istio-proxy", "api"), _ready_pod("api-a", "istio-proxy", "api"),
            _ready_pod("api-0", "api", ready=False)]},
    })
    resolved = resolve(kube, KubeTarget("deployment", "api", None, "ns"))  # type: ignore[arg-type]
    assert (resolved.pod, resolved.container, resolved.node) == ("api-a", "api", "node-1")
    assert any("2 ready pods; using pod/api-a" in note for note in resolved.notes)
    assert ("/api/v1/namespaces/ns/pods", {"labelSelector": "app=api"}) in kube.queries


def test_workload_without_ready_pods_carries_its_template() -> None:
    from mtrace.cli.kube.resolve import NoReadyPod, resolve

    kube = FakeKube({
        "/apis/batch/v1/namespaces/ns/jobs/once": {
            "metadata": {"uid": "j"},
            "spec": {"selector": {"matchLabels": {"job-name": "once"}},
                     "template": {"spec": {"containers": [{"name": "once"}]}}}},
        "/api/v1/namespaces/ns/pods": {"items": []},
    })
    with pytest.raises(NoReadyPod) as caught:
        resolve(kube, KubeTarget("job", "once", None, "ns"))  # type: ignore[arg-type]
    assert caught.value.template is not None
    assert caught.value.template.spec["containers"][0]["name"] == "once"


def test_missing_target_names_kind_and_namespace() -> None:
    from mtrace.cli.kube.resolve import resolve

    with pytest.raises(KubeNotFound) as caught:
        resolve(FakeKube({}), KubeTarget("statefulset", "db", None, "ns"))  # type: ignore[arg-type]
    assert caught.value.message == "statefulset/db not found in namespace ns"


def test_copy_target_config_forms() -> None:
    from mtrace.tracer.features.policy import CopyTargetConfig

    assert Config().feature.copy_target is False
    import msgspec

    config = msgspec.convert({"feature": {"copy_target": {"scale_down": True}}}, Config)
    assert config.feature.copy_target == CopyTargetConfig(scale_down=True)
    assert msgspec.convert({"feature": {"copy_target": True}}, Config).feature.copy_target is True


def test_targetless_goes_to_the_cluster_only_with_a_kubernetes_setting() -> None:
    assert target_of(Config(target="targetless")) == parse_target("targetless")
    in_cluster = target_of(Config(target="targetless", kube_context="rig"))
    assert in_cluster is not None and in_cluster.kube is not None
    assert in_cluster.kube.kind == "targetless"


def test_ttl_counts_only_clients_that_authenticated() -> None:
    """A connection that never proves the secret (a port-forward probe) must not
    keep an unused agent alive past its ttl."""
    import socket as socket_module

    agent, port = _start_agent("--one-client", "--ttl", "1")
    try:
        probe = socket_module.create_connection(("127.0.0.1", port))
        assert agent.wait(timeout=20) == 0
        probe.close()
    finally:
        agent.kill()


class RecordingKube:
    """Records every request; answers none (what release sends)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        self.requests.append((method, path))
        return None

    def close(self) -> None:
        pass


def test_ctrl_c_while_the_job_is_being_created_still_deletes_it() -> None:
    """Regression: Ctrl-C landed while a thread was creating the agent Job; the
    release ran before the thread recorded it, and the Job was left behind."""
    import threading

    from mtrace.cli.errors import Interrupted
    from mtrace.cli.kube import session
    from mtrace.cli.kube.placement import Placement

    kube = RecordingKube()
    active = session.Active(kube)  # type: ignore[arg-type]
    session._active.append(active)
    in_flight, answer = threading.Event(), threading.Event()
    job_path = "/apis/batch/v1/namespaces/ns/jobs/mtrace-agent-s1"

    def create() -> None:
        with active.creating():
            in_flight.set()
            answer.wait(10)  # the API has made the Job; its answer is not read yet
            active.placement = Placement("job", "ns", "", "agent", 1, "x", "s1", job="mtrace-agent-s1",
                                         created=[job_path])

    creator = threading.Thread(target=create)
    creator.start()
    assert in_flight.wait(10)
    releaser = threading.Thread(target=session.release_all)
    releaser.start()
    releaser.join(0.3)
    assert releaser.is_alive(), "release did not wait for the creation in flight"
    answer.set()
    creator.join(10)
    releaser.join(10)
    assert ("DELETE", job_path) in kube.requests
    with pytest.raises(Interrupted), active.creating():  # nothing is created after the release
        pass


def test_ephemeral_container_on_1_20_retries_when_the_pod_changed_meanwhile() -> None:
    """Regression: the 1.20 API's read-modify-write of EphemeralContainers lost
    the race with a kubelet status update (HTTP 409) and the session failed."""
    from mtrace.cli.config import AgentConfig
    from mtrace.cli.kube.client import KubeConflict
    from mtrace.cli.kube.placement import start_ephemeral
    from mtrace.cli.kube.resolve import ResolvedTarget

    class ConflictingKube:
        def __init__(self) -> None:
            self.puts = 0

        def server_version(self) -> tuple[int, int]:
            return (1, 20)

        def get(self, path: str, **query: str) -> Any:
            return {"kind": "EphemeralContainers", "ephemeralContainers": []}

        def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
            assert method == "PUT"
            self.puts += 1
            if self.puts < 3:
                raise KubeConflict("conflict: the object has been modified")
            return body

    kube = ConflictingKube()
    target = ResolvedTarget("ns", "p", "c", "docker://" + "a" * 64, "node", _ready_pod("p", "c"))
    placed = start_ephemeral(kube, target, AgentConfig(), session="s1", port=1, secret="x",  # type: ignore[arg-type]
                             write=False)
    assert kube.puts == 3 and placed.pod == "p"
