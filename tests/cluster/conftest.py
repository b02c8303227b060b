"""Cluster tests: a real Kubernetes (the project's rig, tests/kube/, or KUBECONFIG's cluster).

Fixtures come from tests/kube/fixtures.py: ``kube_cluster``, ``kubeconfig``,
``kube_api``, ``namespace`` (per module) and ``make_workload``. Every test here
is marked `cluster`.
"""

from __future__ import annotations

import pytest
from kube.fixtures import (  # noqa: F401  (fixtures, found by pytest by name)
    finish_session,
    kube_api,
    kube_cluster,
    kubeconfig,
    make_workload,
    namespace,
    resolve_cluster,
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/cluster/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.cluster)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Bring the rig up before the first test runs: a cold start must not count
    # against one test's timeout.
    if any(item.get_closest_marker("cluster") for item in session.items):
        resolve_cluster()


def pytest_sessionfinish(session: pytest.Session) -> None:
    finish_session()
