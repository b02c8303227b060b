"""``python -m bench.soak``: many runs in a row, counting hangs, wrong outputs and leftovers.

Jobs (``--only`` picks some):

- ``goroutines-notify``, ``goroutines-ptrace``: the Go stress program
  (``tests/programs/go/goroutines``: SIGURG preemption, file reads, getpid and
  getcwd from many threads) under ``mtrace exec --backend ...``;
- ``probe-target``: the static Go probe reading a file only the target has
  (``cat``) against a namespace target (``bench/namespace.py``), with
  ``mtrace exec --target pid/N``.

Each run must finish within ``--timeout`` (else it is a hang: its whole
process group is killed), exit 0 and print exactly the expected bytes. After
each job, nothing may be left running (no process whose command line names
the soak's private copy of the programs, no agent of the soak's target) and
nothing may be left in the soak's private ``TMPDIR`` (session directories,
agent logs). Counts go to stdout as they come (every ``--every`` runs) and as
one JSON line per job at the end; exit status 1 if any count is not zero.

It is a soak, not a benchmark: no timing is judged. ``tests/integration/
test_soak.py`` runs it with a few runs per job; run the 1,000-run version
by hand (as root, for the namespace target)::

    python -m bench.soak --runs 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
JOBS = ("goroutines-notify", "goroutines-ptrace", "probe-target")
#: Small enough for 1,000 runs, big enough to be preempted by SIGURG many times.
GOROUTINE_FLAGS = ("-n", "16", "-iterations", "2", "-work", "3000000", "-reads", "4")


@dataclass
class Counts:
    job: str
    runs: int = 0
    ok: int = 0
    hangs: int = 0
    wrong: int = 0
    left_running: int = 0
    left_in_tmp: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.runs == self.ok and not (self.hangs or self.wrong or self.left_running
                                             or self.left_in_tmp)

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text[:500])


def _mtrace() -> list[str]:
    return [sys.executable, "-m", "mtrace.cli.main"]


def _programs(private_bin: Path) -> dict[str, Path]:
    """The test programs, copied under ``private_bin`` so leftovers are recognisable."""
    tests_dir = str(REPO_ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from programs_build import build_programs

    built = build_programs()
    private_bin.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in ("goroutines", "probe-go"):
        copy = private_bin / name
        shutil.copy2(built[name], copy)
        copies[name] = copy
    return copies


def _run_once(argv: Sequence[str], env: dict[str, str], timeout: float) -> tuple[str, bytes]:
    """("ok" | "hang" | "exit N", output)."""
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return "hang", output
    return ("ok" if process.returncode == 0 else f"exit {process.returncode}"), output


def _left_running(markers: Sequence[str]) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if any(marker in command for marker in markers):
            found.append(f"{entry}: {command[:200]}")
    return found


def _settle(markers: Sequence[str], timeout: float = 5.0) -> list[str]:
    """Processes still matching after ``timeout`` (exiting ones get the time to go)."""
    deadline = time.monotonic() + timeout
    while True:
        found = _left_running(markers)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def soak(job: str, runs: int, argv: Sequence[str], expected: bytes, *, tmp_dir: Path,
         markers: Sequence[str], timeout: float, every: int = 100,
         report: Callable[[Counts], None] | None = None) -> Counts:
    counts = Counts(job)
    env = {**os.environ, "TMPDIR": str(tmp_dir)}
    for index in range(runs):
        status, output = _run_once(argv, env, timeout)
        counts.runs += 1
        if status == "hang":
            counts.hangs += 1
            counts.note(f"run {index}: hang; output {output[-300:]!r}")
        elif status != "ok" or not output.endswith(expected):
            counts.wrong += 1
            counts.note(f"run {index}: {status}; output {output[-300:]!r}")
        else:
            counts.ok += 1
        if report is not None and every and counts.runs % every == 0:
            report(counts)
    leftovers = _settle(markers)
    counts.left_running = len(leftovers)
    for line in leftovers:
        counts.note(f"left running: {line}")
        # Do not let one job's leftovers poison the next.
        pid = int(line.split(":")[0])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = sorted(os.listdir(tmp_dir))
    counts.left_in_tmp = len(left)
    if left:
        counts.note(f"left in TMPDIR: {left[:5]}")
        for name in left:
            path = tmp_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return counts


@contextmanager
def _namespace_target(work_dir: Path) -> Iterator[tuple[int, Path]]:
    from bench.common import build_c_programs
    from bench.namespace import NamespaceTarget

    netserve = build_c_programs(work_dir / "c")["netserve"]
    target = NamespaceTarget.start(netserve=netserve, work_dir=work_dir, bulk_bytes=1 << 20)
    try:
        yield target.pid, target.remote_file
    finally:
        target.close()


def run_jobs(jobs: Sequence[str], runs: int, *, timeout: float = 60.0, every: int = 100,
             report: Callable[[Counts], None] | None = None) -> list[Counts]:
    results = []
    with tempfile.TemporaryDirectory(prefix="mtrace-soak-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        tmp_dir = work / "tmp"
        tmp_dir.mkdir()
        programs = _programs(work / "bin")
        goroutines = [str(programs["goroutines"]), *GOROUTINE_FLAGS]
        expected_goroutines = subprocess.run(goroutines, capture_output=True, check=True,
                                             timeout=timeout).stdout
        markers = [str(work / "bin")]
        for job in jobs:
            if job.startswith("goroutines-"):
                backend = job.removeprefix("goroutines-")
                argv = [*_mtrace(), "exec", "--backend", backend, "--", *goroutines]
                results.append(soak(job, runs, argv, expected_goroutines, tmp_dir=tmp_dir,
                                    markers=markers, timeout=timeout, every=every, report=report))
            elif job == "probe-target":
                with _namespace_target(work) as (pid, remote_file):
                    config = work / "soak.json"
                    # The target's file lies under /mnt/..., remote by default.
                    config.write_text(json.dumps({"feature": {"fs": {"mode": "read"}}}))
                    argv = [*_mtrace(), "exec", "-f", str(config), "--target", f"pid/{pid}", "--",
                            str(programs["probe-go"]), "cat", str(remote_file)]
                    expected = b"\0" * 4096
                    results.append(soak(job, runs, argv, expected, tmp_dir=tmp_dir,
                                        markers=[*markers, f"--target-pid {pid}"],
                                        timeout=timeout, every=every, report=report))
            else:
                raise SystemExit(f"unknown job {job!r}: choose from {', '.join(JOBS)}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs per job (default 1000)")
    parser.add_argument("--only", action="append", default=None,
                        help=f"jobs (repeatable or comma-separated): {', '.join(JOBS)}")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds before one run counts as a hang (default 60)")
    parser.add_argument("--every", type=int, default=100, help="progress every N runs")
    args = parser.parse_args(argv)
    jobs = [name.strip() for item in (args.only or [",".join(JOBS)]) for name in item.split(",")
            if name.strip()]

    def progress(counts: Counts) -> None:
        print(f"{counts.job}: {counts.runs} runs, {counts.ok} ok, {counts.hangs} hangs, "
              f"{counts.wrong} wrong", flush=True)

    results = run_jobs(jobs, args.runs, timeout=args.timeout, every=args.every, report=progress)
    for counts in results:
        print(json.dumps({**asdict(counts), "clean": counts.clean}), flush=True)
    return 0 if all(counts.clean for counts in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
