"""`mtrace demo`: the README's "run it" command works and shows the difference."""

from __future__ import annotations

import pytest
from mtrace_run import run_mtrace

pytestmark = pytest.mark.timeout(180)


def test_demo_shows_target_context_only_under_mtrace() -> None:
    result = run_mtrace("demo", timeout=170)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    plain, _, traced = text.partition("2. under mtrace:")
    assert "ORDERS_GREETING is not set" in plain
    assert "no such file or directory" in plain
    assert "-> 200" not in plain
    assert "ORDERS_GREETING=hello from the target's environment" in traced
    assert 'database = "postgres://orders-db.demo.internal/orders"' in traced
    assert "orders.demo.internal -> 127.0.0.1" in traced
    assert "-> 200 orders service in the target" in traced
    assert b"Traceback" not in result.stderr
