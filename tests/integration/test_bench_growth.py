"""The growth group and the proxychains4 peer run in --quick mode and measure every point.

No timing is asserted (numbers from --quick are noise): each curve has every
point it announces, for every variant, measured rather than n/a, and each row
says how it compares (its baseline and its ratio to the curve's first point).
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
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import growth, remote  # noqa: E402
from bench.common import Context, Settings  # noqa: E402

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]


@pytest.mark.timeout(400)
def test_quick_growth_group_measures_every_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "growth", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=390, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    assert rows and all(row["group"] == growth.GROUP for row in rows)
    missing = [row for row in rows if row["value"] is None]
    assert not missing, missing
    found = {(row["name"], row["variant"]) for row in rows}

    points = growth.Points.for_settings(quick=True, full=False)
    file_variants = growth._file_variants()
    expected = set()
    for size in points.file_sizes:
        for which in ("cold", "cached"):
            expected |= {(growth._read_name(size, which), v) for v in file_variants}
    for entries in points.dir_entries:
        for which in ("first", "second"):
            expected |= {(growth._list_name(entries, which), v) for v in file_variants}
    network = (growth.DIRECT, growth.MTRACE, growth.RELAY)
    expected |= {(name, v) for name in (growth.UDP_P50, growth.UDP_P99) for v in network}
    for streams in points.streams:
        expected |= {(growth._streams_name(streams), v) for v in network}
        for which in ("p50", "p99"):
            expected |= {(growth._requests_name(streams, which), v) for v in network}
    for threads in points.threads:
        expected |= {(growth._threads_name(threads), v)
                     for v in (growth.PLAIN, growth.MTRACE_LOCAL, growth.REFSUP)}
    assert expected <= found, sorted(expected - found)

    by_key = {(row["name"], row["variant"]): row for row in rows}
    first_read = by_key[(growth._read_name(points.file_sizes[0], "cold"), growth.MTRACE)]
    assert first_read["baseline"] == growth.DIRECT and first_read["ratio"] is not None
    first_direct = by_key[(growth._read_name(points.file_sizes[0], "cold"), growth.DIRECT)]
    assert "sizes run: 4 KiB, 1 MiB" in first_direct["note"]
    later = by_key[(growth._read_name(points.file_sizes[-1], "cold"), growth.MTRACE)]
    assert "x the first point" in later["note"]
    table = (tmp_path / "latest.md").read_text()
    assert "### growth" in table and "2 parallel TCP streams, aggregate" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "growth.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_growth_points_grow_with_the_run_size() -> None:
    quick = growth.Points.for_settings(quick=True, full=False)
    default = growth.Points.for_settings(quick=False, full=False)
    full = growth.Points.for_settings(quick=False, full=True)
    assert default.file_sizes[0] == 4 << 10 and default.file_sizes[-1] == 256 << 20
    assert full.file_sizes[-1] == 1 << 30 and 1 << 30 not in default.file_sizes
    assert default.dir_entries[-1] == 10_000 and full.dir_entries[-1] == 100_000
    assert default.streams[-1] == 256 and default.threads[-1] == 64
    assert max(quick.file_sizes) <= 1 << 20 and max(quick.streams) <= 4
    assert len(quick.threads) >= 2  # a ratio to the first point shows


@pytest.mark.timeout(120)
def test_proxychains_peer_rows_are_measured(tmp_path: Path) -> None:
    ctx = Context(Settings.for_mode(True), tmp_path)
    try:
        rows = remote.proxychains_rows(ctx)
    finally:
        ctx.close()
    assert {row.name for row in rows} == {remote.CONNECT, remote.HTTP_P50, remote.HTTP_P99,
                                          remote.BULK}
    for row in rows:
        assert row.variant == remote.PROXYCHAINS
        assert row.value is not None and row.value > 0, row.note
