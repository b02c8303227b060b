"""The rig's own life cycle: `down` leaves nothing, `up` comes back, a failed `up` cleans up.

These take the rig down: they run under CI=true, in a session that started the
rig, or with MTRACE_RIG_LIFECYCLE=1 (a shared rig is not cycled by accident).
Each leaves the rig up again for the tests after it.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest
from kube import cluster, processes
from kube.common import APISERVER_PORT, RigError
from kube.fixtures import KubeCluster, may_cycle_rig
from kube.workloads import create_workload, delete_namespace, new_namespace

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def cyclable(kube_cluster: KubeCluster) -> KubeCluster:
    reason = may_cycle_rig(kube_cluster)
    if reason:
        pytest.skip(reason)
    return kube_cluster


def _serves_a_workload(current: KubeCluster) -> None:
    api = current.api_client()
    namespace = new_namespace(api, "mt-lifecycle")
    try:
        workload = create_workload(api, namespace, "again")
        assert workload.pod_ips[0].startswith("172.17.")
    finally:
        delete_namespace(api, namespace)


def test_down_leaves_nothing_and_up_works_again(cyclable: KubeCluster) -> None:
    cluster.down()
    assert cluster.leftovers() == []
    cluster.up()
    assert cluster.healthy()
    _serves_a_workload(cyclable)


def test_down_after_a_failed_up_leaves_nothing(cyclable: KubeCluster) -> None:
    cluster.down()
    # The apiserver cannot bind its port: `up` fails half-way, after dockerd and etcd started.
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", APISERVER_PORT))
    blocker.listen()
    try:
        with pytest.raises(RigError, match="kube-apiserver"):
            cluster.up()
    finally:
        blocker.close()
    cluster.down()
    try:
        assert cluster.leftovers() == []
    finally:
        cluster.up()
    _serves_a_workload(cyclable)


def test_up_after_a_crash_cleans_up_first(cyclable: Any) -> None:
    # A crash: every rig process SIGKILLed, nothing undone (containers, mounts, chains,
    # bridge, sysctls stay).
    for name in reversed(cluster.COMPONENTS):
        pid = processes.pid_of(name)
        if pid:
            os.kill(pid, signal.SIGKILL)
    assert not cluster.healthy()
    cluster.up()
    assert cluster.healthy()
    _serves_a_workload(cyclable)
