"""pytest fixtures for cluster tests (tests marked `cluster`), imported by tests/cluster/conftest.py.

Which cluster:

* ``KUBECONFIG`` set (and not the rig's own file): that cluster, as it is. The
  rig is not touched; tests that need the rig itself (its images loaded with
  ``imagePullPolicy: Never``, its node, `down`/`up`) skip there.
* otherwise the project's rig (tests/kube/): reused when it already runs
  healthy (and left running), else brought up once for the session, before the
  first test (outside any test's timeout) and taken down at the end of the
  session unless ``MTRACE_RIG_KEEP=1``.

Where the rig cannot run (not root, no Docker, a failed `up`) the cluster tests
skip with the reason; under ``CI=true`` they fail instead.

Fixtures: ``kube_cluster`` (session, a `KubeCluster`), ``kubeconfig`` (session,
its path), ``kube_api`` (module, a `kubernetes.client.ApiClient`),
``namespace`` (module: a fresh namespace, deleted afterwards) and
``make_workload`` (a function creating a ready Deployment from a rig image in
that namespace; see `workloads.create_workload`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import cluster, images
from .common import KUBECONFIG, RigError
from .workloads import Workload, create_workload, delete_namespace, new_namespace


@dataclass
class KubeCluster:
    kubeconfig: Path
    is_rig: bool  # the project's rig: its images exist on the node, the node is "localhost"
    images: dict[str, str] = field(default_factory=dict)
    started_here: bool = False

    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def require_rig(self) -> None:
        """Skip a test that needs the rig itself (not just any cluster)."""
        if not self.is_rig:
            pytest.skip(
                f"needs the project's rig (tests/kube/), not the cluster of KUBECONFIG={self.kubeconfig}"
            )


class _Session:
    """The session's cluster, resolved once (before the first test or on first use)."""

    cluster: KubeCluster | None = None
    problem: str | None = None
    resolved = False


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def cannot_run(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"cluster test cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def resolve_cluster() -> None:
    """Pick the cluster; bring the rig up when needed. Records a problem instead of raising."""
    if _Session.resolved:
        return
    _Session.resolved = True
    external = os.environ.get("KUBECONFIG")
    if external and Path(external) != KUBECONFIG:
        _Session.cluster = KubeCluster(Path(external), is_rig=False)
        return
    if os.geteuid() != 0:
        _Session.problem = (
            "the test cluster rig needs root (it runs dockerd and a kubelet); or set KUBECONFIG"
        )
        return
    if not Path("/usr/sbin/dockerd").exists() and not Path("/usr/bin/apt-get").exists():
        _Session.problem = "no Docker (dockerd) and no apt-get to install it; or set KUBECONFIG"
        return
    was_up = cluster.healthy()
    started = time.monotonic()
    try:
        cluster.up()
    except RigError as error:
        _Session.problem = f"the rig did not come up: {error}"
        return
    if not was_up:
        print(f"\nrig: up in {time.monotonic() - started:.0f}s ({KUBECONFIG})")
    _Session.cluster = KubeCluster(
        KUBECONFIG, is_rig=True, images=images.all_images(), started_here=not was_up
    )


def may_cycle_rig(current: KubeCluster) -> str | None:
    """Why this session must not take the rig down and up again (None: it may).

    The rig may be shared (a developer's, another test session's): only CI, a
    session that started the rig itself, or MTRACE_RIG_LIFECYCLE=1 may cycle it.
    """
    if not current.is_rig:
        return f"cycles the project's rig; KUBECONFIG={current.kubeconfig} is another cluster"
    if _in_ci() or current.started_here or os.environ.get("MTRACE_RIG_LIFECYCLE") == "1":
        return None
    return "would take down a rig this session did not start (set MTRACE_RIG_LIFECYCLE=1 to allow)"


def finish_session() -> None:
    current = _Session.cluster
    if current is not None and current.started_here and os.environ.get("MTRACE_RIG_KEEP") != "1":
        cluster.down()


@pytest.fixture(scope="session")
def kube_cluster() -> KubeCluster:
    resolve_cluster()
    if _Session.cluster is None:
        cannot_run(_Session.problem or "no cluster")
    assert _Session.cluster is not None
    return _Session.cluster


@pytest.fixture(scope="session")
def kubeconfig(kube_cluster: KubeCluster) -> Path:
    return kube_cluster.kubeconfig


@pytest.fixture(scope="module")
def kube_api(kube_cluster: KubeCluster) -> Any:
    # Per module: a rig restarted by the lifecycle tests has new certificates.
    return kube_cluster.api_client()


@pytest.fixture(scope="module")
def namespace(request: pytest.FixtureRequest, kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace for this test module (named after it), deleted afterwards."""
    api = kube_cluster.api_client()
    module = re.sub(r"[^a-z0-9]+", "-", request.module.__name__.rsplit(".", 1)[-1].lower()).strip("-")
    name = new_namespace(api, f"mt-{module}"[:50])
    yield name
    delete_namespace(api, name)


@pytest.fixture
def make_workload(kube_api: Any, namespace: str) -> Callable[..., Workload]:
    """``make_workload(name, image=PROGRAMS, command=None, env=None, files=None, service_port=None, ...)``."""

    def make(name: str, **options: Any) -> Workload:
        return create_workload(kube_api, namespace, name, **options)

    return make
