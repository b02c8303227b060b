"""The soak (``bench/soak.py``) with a few runs per job: zero hangs, zero wrong
outputs, nothing left running or in TMPDIR. ``MTRACE_SOAK_RUNS`` sets the
count (default 5); the 1,000-run version is ``python -m bench.soak``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("MTRACE_SOAK_RUNS", "5"))

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(60 + 30 * RUNS)]


@pytest.mark.parametrize("job", ["goroutines-notify", "goroutines-ptrace", "probe-target"])
def test_soak(job: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespace target, ptrace of any program)")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.soak import run_jobs

    [counts] = run_jobs([job], RUNS, timeout=60)
    assert counts.clean, counts
