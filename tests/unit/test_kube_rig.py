"""The rig's pure parts: runc wrapper OCI edits, which iptables rules are the rig's, cluster DNS names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from kube import host
from kube.cluster_dns import ClusterRecords

_WRAPPER = Path(__file__).resolve().parents[1] / "kube" / "runc_wrapper.py"


def _wrapper() -> Any:
    spec = importlib.util.spec_from_file_location("runc_wrapper", _WRAPPER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runc_wrapper_zeroes_a_negative_oom_score_and_keeps_a_positive_one(tmp_path: Path) -> None:
    wrapper = _wrapper()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"process": {"oomScoreAdj": -998, "args": ["/pause"]}}))
    wrapper.rewrite(str(config), "process")
    assert json.loads(config.read_text())["process"] == {"oomScoreAdj": 0, "args": ["/pause"]}
    config.write_text(json.dumps({"process": {"oomScoreAdj": 1000}}))
    wrapper.rewrite(str(config), "process")
    assert json.loads(config.read_text())["process"]["oomScoreAdj"] == 1000


def test_runc_wrapper_drops_capabilities_outside_the_bounding_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper = _wrapper()
    monkeypatch.setattr(wrapper, "bounding_set", lambda: {"CAP_CHOWN", "CAP_SYS_ADMIN"})
    process_file = tmp_path / "process.json"
    wanted = ["CAP_CHOWN", "CAP_SYS_RESOURCE", "CAP_SYS_ADMIN"]
    process_file.write_text(json.dumps({"capabilities": {"bounding": wanted, "effective": wanted}}))
    wrapper.rewrite(str(process_file), None)  # `runc exec --process FILE`: the file is the process
    capabilities = json.loads(process_file.read_text())["capabilities"]
    kept = ["CAP_CHOWN", "CAP_SYS_ADMIN"]
    assert capabilities == {"bounding": kept, "effective": kept}


def test_runc_wrapper_finds_the_bundle_and_process_options() -> None:
    wrapper = _wrapper()
    assert wrapper.option_value(["--bundle", "/b", "id"], ("--bundle", "-b")) == "/b"
    assert wrapper.option_value(["--bundle=/b", "id"], ("--bundle", "-b")) == "/b"
    assert wrapper.option_value(["-p", "/p.json", "id"], ("--process", "-p")) == "/p.json"
    assert wrapper.option_value(["id"], ("--bundle", "-b")) is None


@pytest.mark.parametrize(
    ("rule", "ours"),
    [
        ("-A FORWARD -j DOCKER-USER", True),
        ("-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", True),
        ("-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE", True),
        ('-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES', True),
        ("-A INPUT -j KUBE-FIREWALL", True),
        ("-A FORWARD -i veth-mtr1 -j ACCEPT", False),
        ("-A POSTROUTING -s 10.200.0.0/24 -j MASQUERADE", False),
    ],
)
def test_only_dockers_and_kubernetes_iptables_rules_are_the_rigs(rule: str, ours: bool) -> None:
    assert host._ours(rule) is ours


class _Records(ClusterRecords):
    """ClusterRecords with the API replaced by fixed objects."""

    def __init__(self, objects: dict[tuple[str, str], Any]) -> None:
        import dns.name

        self._domain = dns.name.from_text("cluster.local")
        self._objects = objects

    def _read(self, kind: str, namespace: str, name: str) -> Any:
        return self._objects.get((kind, f"{namespace}/{name}"))


def _service(cluster_ip: str, ports: list[Any] | None = None) -> Any:
    from kubernetes import client

    return client.V1Service.from_dict({"spec": {"clusterIP": cluster_ip, "ports": ports or []}})


def _ask(records: ClusterRecords, name: str, rdtype: str = "A") -> dns.message.Message:
    return records.answer(dns.message.make_query(name, rdtype))


def test_cluster_dns_answers_service_names_and_nothing_else() -> None:
    records = _Records({("service", "ns/web"): _service("10.96.0.7", [{"name": "http", "port": 80}])})
    answer = _ask(records, "web.ns.svc.cluster.local")
    assert answer.rcode() == dns.rcode.NOERROR
    assert [item.to_text() for item in answer.answer[0]] == ["10.96.0.7"]
    assert _ask(records, "web.ns.svc.cluster.local", "AAAA").answer == []  # exists, no IPv6
    assert _ask(records, "other.ns.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert _ask(records, "web.ns.svc.cluster.local.ns.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert _ask(records, "example.com").rcode() == dns.rcode.NXDOMAIN  # never forwarded
    srv = _ask(records, "_http._tcp.web.ns.svc.cluster.local", "SRV")
    assert [item.to_text() for item in srv.answer[0]] == ["0 100 80 web.ns.svc.cluster.local."]
    pod = _ask(records, "172-17-0-5.ns.pod.cluster.local")
    assert [item.to_text() for item in pod.answer[0]] == ["172.17.0.5"]


@pytest.fixture
def fresh_cluster_choice(monkeypatch: pytest.MonkeyPatch) -> Any:
    """kube.fixtures' session choice, reset for one test and put back afterwards."""
    from kube import fixtures

    for attribute, value in (("cluster", None), ("problem", None), ("resolved", False)):
        monkeypatch.setattr(fixtures._Session, attribute, value)
    return fixtures


def test_cluster_tests_use_kubeconfigs_cluster_and_leave_the_rig_alone(
    fresh_cluster_choice: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "other.kubeconfig"))
    monkeypatch.setattr(fresh_cluster_choice.cluster, "up", lambda: pytest.fail("the rig must not start"))
    fresh_cluster_choice.resolve_cluster()
    chosen = fresh_cluster_choice._Session.cluster
    assert (chosen.kubeconfig, chosen.is_rig) == (tmp_path / "other.kubeconfig", False)


def test_without_root_cluster_tests_skip_with_the_reason_and_fail_under_ci(
    fresh_cluster_choice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    fresh_cluster_choice.resolve_cluster()
    assert fresh_cluster_choice._Session.cluster is None
    problem = fresh_cluster_choice._Session.problem
    assert "needs root" in problem
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        fresh_cluster_choice.cannot_run(problem)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true: .*needs root"):
        fresh_cluster_choice.cannot_run(problem)
