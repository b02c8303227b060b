"""The bench's own resident mtrace: runs timed through it are its runs, it is
stopped after them (also when they fail), and the startup group's "(resident)"
rows are measured through it.

No timing is asserted (--quick numbers are noise): only where the runs went.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import startup  # noqa: E402
from bench.common import (  # noqa: E402
    RESIDENT_SWITCH,
    Context,
    Resident,
    Settings,
    Unavailable,
    in_process_env,
    mtrace_argv,
)


def _runs(pid: int) -> bool:
    try:
        return b"resident_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _processes_naming(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.timeout(120)
def test_bench_resident_counts_the_runs_sent_to_it_and_stops(programs: dict[str, Path]) -> None:
    resident = Resident.start(mtrace_argv())
    try:
        assert resident.pid is not None and _runs(resident.pid)
        assert resident.directory.stat().st_mode & 0o777 == 0o700
        assert resident.socket_path.parent == resident.directory
        argv = [*mtrace_argv(), "exec", "--", str(programs["static-true"])]
        subprocess.run(argv, env=resident.env, check=True, timeout=60)
        assert resident.runs() == 1
        # An in-process run never reaches it, whatever socket the environment names.
        switch = {key: value for key, value in in_process_env().items() if key == RESIDENT_SWITCH}
        subprocess.run(argv, env={**resident.env, **switch}, check=True, timeout=60)
        assert resident.runs() == 1
        assert resident.shortfall(1) is None
        assert resident.shortfall(2) == "the resident took 1 of 2 runs; the rest ran in-process"
    finally:
        resident.stop()
    assert not _runs(resident.pid)
    assert not resident.directory.exists()
    assert resident.shortfall(1) == "the resident did not answer; the rest ran in-process"
    resident.stop()  # twice is harmless


@pytest.mark.timeout(120)
def test_bench_resident_is_stopped_when_the_runs_fail() -> None:
    with pytest.raises(RuntimeError), Resident.start(mtrace_argv()) as resident:
        assert resident.pid is not None and _runs(resident.pid)
        raise RuntimeError("a run failed")
    assert resident.pid is not None and not _runs(resident.pid)
    assert not _processes_naming(str(resident.directory))


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.timeout(300)
def test_quick_startup_group_times_runs_through_its_own_resident(tmp_path: Path) -> None:
    # The group's resident lives in the temporary directory, so a process left
    # behind would name it; a short one: a socket's path has at most 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--only", "startup", "--out", str(tmp_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=290, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(work)})
        assert result.returncode == 0, result.stderr[-3000:]
        rows = {row["variant"]: row
                for row in json.loads((tmp_path / "latest.json").read_text())["rows"]}
        assert set(rows) == set(startup.VARIANTS)
        for variant in startup.THROUGH_RESIDENT:
            assert rows[variant]["value"] is not None, rows[variant]["note"]
            assert rows[variant]["baseline"] == startup.PLAIN and rows[variant]["ratio"]
        assert not _processes_naming(str(work))
        assert not list(work.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.timeout(300)
def test_ab_startup_times_each_variant_through_its_own_resident() -> None:
    work = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench.ab", "--startup", "--resident", "--rounds", "1",
             "--variant", f"a={sys.executable}", "--variant", f"b={sys.executable}"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=290, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(work)})
        assert result.returncode == 0, result.stderr[-3000:]
        for name in ("a", "b"):
            for kind in ("exec", "exec --target pid/N"):
                assert f"{name} {kind}: median " in result.stdout, result.stdout
                assert f"{name} {kind} (resident): median " in result.stdout, result.stdout
        assert not _processes_naming(str(work))
        assert not list(work.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(300)
def test_startup_resident_row_stands_when_the_target_row_cannot_run(tmp_path: Path) -> None:
    # No namespace target: the --target rows are n/a, and the resident's run
    # count is checked against the runs sent to it, not against a warm-up of
    # the --target variant that never ran.
    settings = Settings.for_mode(quick=True)
    settings.quick, settings.startup_runs = False, 2
    ctx = Context(settings, tmp_path)
    ctx._namespace_error = Unavailable("no namespace in this test")
    rows = {row.variant: row for row in startup.run(ctx)}
    assert rows[startup.MTRACE_TARGET_RESIDENT].value is None
    assert "no namespace in this test" in rows[startup.MTRACE_TARGET_RESIDENT].note
    assert rows[startup.MTRACE_RESIDENT].value is not None, rows[startup.MTRACE_RESIDENT].note
    assert len(rows[startup.MTRACE_RESIDENT].samples) == 2
