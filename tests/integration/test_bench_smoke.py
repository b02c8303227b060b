"""`python -m bench --quick` runs end to end and writes a sane table, JSON and chart.

No timing is asserted here (numbers from --quick are noise): only that every
group produced rows of the right shape, that every value is either a number or
an "n/a (reason)", and that the outputs exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("syscall", "remote", "startup", "program", "kv", "incoming", "kube", "growth")


@pytest.mark.timeout(600)
def test_quick_bench_writes_table_json_and_chart(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=590, check=False,
        # No cluster for the smoke run: the kube group must say n/a, not fail
        # (it is run by hand against the rig; tests/cluster covers the code).
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "KUBECONFIG": str(tmp_path / "none")},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["schema"] == 1
    assert document["settings"]["quick"] is True
    assert document["groups"] == list(GROUPS)
    assert {"kernel", "nproc", "cpu"} <= set(document["machine"])
    rows = document["rows"]
    assert {row["group"] for row in rows} == set(GROUPS)
    for row in rows:
        assert row["unit"]
        if row["value"] is None:
            assert row["note"].startswith("n/a ("), row
        else:
            assert row["value"] >= 0 and row["samples"], row
    # The baselines of every comparison are measured, not n/a, wherever the tools exist.
    plain = [row for row in rows if row["group"] == "syscall" and row["variant"] == "plain"]
    assert plain and all(row["value"] for row in plain)
    assert {target["passed"] for target in document["targets"]} <= {True, False, None}

    table = (tmp_path / "latest.md").read_text()
    assert table == result.stdout
    for group in GROUPS:
        assert f"### {group}" in table
    assert "### targets" in table
    header = "| benchmark | variant | median | vs | ratio | difference | note |"
    assert table.count(header) == len(GROUPS)

    if importlib.util.find_spec("matplotlib") is None:
        assert document["chart"] is None
    else:
        assert document["chart"] == "latest.png"
        assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
