"""The agent runs in small containers: it must not pull in the tracer, the CLI or their dependencies."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("mtrace.tracer", "mtrace.cli", "typer", "kubernetes", "ptrace", "yaml")


def test_the_agent_imports_only_what_a_small_container_has() -> None:
    script = (
        "import sys\n"
        "import mtrace.agent.server, mtrace.agent.client, mtrace.agent.__main__\n"
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})]\n"
        "print(','.join(sorted(bad)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


def test_the_agent_entry_point_explains_a_missing_secret() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mtrace.agent", "--stdio"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 71
    assert "no shared secret" in result.stderr
    assert "hint: pass --secret or set MTRACE_AGENT_SECRET" in result.stderr
