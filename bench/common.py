"""What every benchmark group shares: result rows, the run context, running and timing.

A group is a function ``run(ctx) -> list[Row]``. It never raises for a missing
tool or feature: it returns rows whose value is None and whose note says why
("n/a (strace not installed)"). :class:`Unavailable` carries such a reason
out of helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import RunFailed, Unavailable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

PIN = ("taskset", "-c", "0")


@dataclass
class Row:
    """One measurement: a median of ``samples`` (or None with a reason in ``note``).

    ``ratio`` is ``value`` against the row named by ``baseline`` (a variant of the
    same group and name, measured in the same run); ``ratio_of`` says what was
    divided ("value" or "overhead", the cost added over a plain run); ``delta``
    is ``value`` minus the baseline's value, in ``unit``.
    """

    group: str
    name: str
    variant: str
    value: float | None
    unit: str
    baseline: str | None = None
    ratio: float | None = None
    ratio_of: str = "value"
    delta: float | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def missing(cls, group: str, name: str, variant: str, unit: str, reason: str) -> Row:
        return cls(group, name, variant, None, unit, note=f"n/a ({reason})")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return float(ordered[index])


def find_row(rows: Sequence[Row], group: str, name: str, variant: str) -> Row | None:
    for row in rows:
        if (row.group, row.name, row.variant) == (group, name, variant):
            return row
    return None


def compare(rows: Sequence[Row], row: Row, baseline_variant: str, *, of: str = "value",
            plain: float | None = None) -> None:
    """Set ``row.ratio`` against the baseline row (same group and name)."""
    base = find_row(rows, row.group, row.name, baseline_variant)
    row.baseline = baseline_variant
    row.ratio_of = of
    if row.value is None or base is None or base.value is None:
        return
    row.delta = row.value - base.value
    if of == "overhead":
        if plain is None:
            return
        added, base_added = row.value - plain, base.value - plain
        row.ratio = added / base_added if base_added > 0 else None
    else:
        row.ratio = row.value / base.value if base.value else None


# --- running commands -----------------------------------------------------------


def which(name: str) -> str | None:
    return shutil.which(name)


def tail(text: str, lines: int = 1) -> str:
    """The last non-empty line(s) of a command's output, on one line: what a note can hold."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[:300]


def run_json(argv: Sequence[str], *, timeout: float = 120.0,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command whose last stdout line is one JSON object (bench/loop); return it."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                env=env, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(argv[:4])}") from error
    except OSError as error:
        raise RunFailed(f"cannot run {argv[0]}: {error.strerror}") from error
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RunFailed(f"exit {result.returncode}: {tail(result.stderr or result.stdout)}")
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def time_command(argv: Sequence[str], *, timeout: float = 120.0,
                 env: dict[str, str] | None = None) -> float:
    """Wall-clock seconds of one run (output discarded); a failure raises RunFailed."""
    start = time.perf_counter()
    try:
        result = subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as error:
        raise RunFailed(f"timed out after {timeout:.0f} s") from error
    except OSError as error:
        raise RunFailed(f"cannot run {argv[0]}: {error.strerror}") from error
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RunFailed(f"exit {result.returncode}: {tail(result.stderr.decode(errors='replace'))}")
    return elapsed


Command = tuple[Sequence[str], dict[str, str] | None]  # argv, environment (None: this one's)


def time_rounds(commands: dict[str, Command], rounds: int, *, warm_up: bool = True,
                timeout: float = 120.0) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Interleaved runs: each round runs every command once, in reverse order
    every other round, so that a loaded machine's drift falls on all of them
    alike; before that, one untimed run each if ``warm_up`` (page cache,
    bytecode cache). Wall milliseconds per variant, and for each variant that
    failed the reason (it is not run again, its samples are dropped)."""
    samples: dict[str, list[float]] = {variant: [] for variant in commands}
    failures: dict[str, str] = {}

    def one(variant: str) -> float | None:
        argv, env = commands[variant]
        try:
            return time_command(argv, timeout=timeout, env=env) * 1000
        except RunFailed as error:
            failures[variant] = str(error)
            return None

    for variant in commands if warm_up else ():
        one(variant)
    for round_ in range(rounds):
        order = list(commands) if round_ % 2 == 0 else list(reversed(commands))
        for variant in order:
            if variant not in failures and (milliseconds := one(variant)) is not None:
                samples[variant].append(milliseconds)
    return {variant: values for variant, values in samples.items()
            if variant not in failures}, failures


# --- mtrace itself ----------------------------------------------------------------


def mtrace_argv() -> list[str]:
    """The real `mtrace` console script of this interpreter (not a version-manager shim)."""
    script = Path(sys.executable).parent / "mtrace"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mtrace.cli.main"]


_EXEC_HELP: str | None = None


def mtrace_exec_help() -> str:
    global _EXEC_HELP
    if _EXEC_HELP is None:
        env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
        try:
            result = subprocess.run([*mtrace_argv(), "exec", "--help"], capture_output=True,
                                    text=True, env=env, timeout=60, check=False)
            _EXEC_HELP = result.stdout + result.stderr
        except (OSError, subprocess.TimeoutExpired):
            _EXEC_HELP = ""
    return _EXEC_HELP


def mtrace_has_option(option: str) -> bool:
    """Whether `mtrace exec --help` lists ``option`` (features switch on as they land)."""
    return option in mtrace_exec_help()


#: The variable that keeps one `mtrace exec` in-process ("0"), and the one
#: naming the resident's socket (cli/resident.py).
RESIDENT_SWITCH = "MTRACE_RESIDENT"
RESIDENT_SOCKET = "MTRACE_RESIDENT_SOCKET"


def in_process_env() -> dict[str, str]:
    """The environment of an `mtrace exec` that runs in-process, whatever
    resident mtrace the user keeps running."""
    return {**os.environ, RESIDENT_SWITCH: "0"}


class Resident:
    """A resident mtrace (`mtrace resident start`) of the bench's own, on a
    socket in a private directory: runs timed through it never use or stop
    the user's or another session's. ``env`` is the environment of a run
    through it; :meth:`stop` ends it (twice is harmless). Use it with
    ``with``, so that a failed run stops it too.

    A resident refuses a run it cannot take (another install, changed files)
    and `mtrace exec` then runs in-process, silently: :meth:`runs` (the count
    `mtrace resident status` reports) tells the caller whether its runs
    really went through it.
    """

    def __init__(self, mtrace: Sequence[str], directory: Path, pid: int | None) -> None:
        self.mtrace = list(mtrace)
        self.directory = directory
        self.socket_path = directory / "resident.sock"
        self.pid = pid
        environ = {key: value for key, value in os.environ.items() if key != RESIDENT_SWITCH}
        self.env = {**environ, RESIDENT_SOCKET: str(self.socket_path)}
        self._stopped = False

    @classmethod
    def start(cls, mtrace: Sequence[str], *, idle: float = 600.0) -> Resident:
        """Start one for the install ``mtrace`` runs, its socket in a new
        directory of its own (mode 0700, removed by :meth:`stop`; the
        temporary directory's, which must be short: a socket's path has at
        most 107 bytes); Unavailable if it does not start."""
        resident = cls(mtrace, Path(tempfile.mkdtemp(prefix="mtrace-resident-")), None)
        argv = [*mtrace, "resident", "start", "--idle", f"{idle:g}"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, env=resident.env,
                                    timeout=60, stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            resident.stop()
            raise Unavailable(f"`mtrace resident start` did not run: {error}") from error
        if result.returncode != 0:
            resident.stop()
            raise Unavailable(f"`mtrace resident start` failed: "
                              f"{tail(result.stderr or result.stdout, 2)}")
        found = re.search(r"\(pid (\d+),", result.stdout)
        resident.pid = int(found.group(1)) if found else None
        return resident

    def runs(self) -> int | None:
        """How many runs it took so far; None when it does not answer."""
        try:
            result = subprocess.run([*self.mtrace, "resident", "status"], capture_output=True,
                                    text=True, env=self.env, timeout=30,
                                    stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = re.search(r"(\d+) runs", result.stdout)
        return int(found.group(1)) if result.returncode == 0 and found else None

    def shortfall(self, timed: int) -> str | None:
        """Why runs timed through it are not its own, if they are not: it took
        fewer than the ``timed`` (warm-ups included) that were sent to it."""
        taken = self.runs()
        if taken is not None and taken >= timed:
            return None
        said = "did not answer" if taken is None else f"took {taken} of {timed} runs"
        return f"the resident {said}; the rest ran in-process"

    def stop(self) -> None:
        """`mtrace resident stop`, and wait until it has exited; SIGKILL if it
        has not within 5 s (only the process whose command line names this
        socket: not a process that took its pid since)."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*self.mtrace, "resident", "stop"], capture_output=True, env=self.env,
                           timeout=30, stdin=subprocess.DEVNULL, check=False)
        if self.pid is not None and not self._exited(5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._exited(5.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while str(self.socket_path) in _cmdline(self.pid or 0):  # a zombie's is empty
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def __enter__(self) -> Resident:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- building the bench's own C programs -----------------------------------------


_C_PROGRAMS = {
    # name: (source, extra flags). The tracee loop is static, like the programs
    # mtrace exists for, and so that no dynamic loader's openat calls count.
    "loop": ("loop.c", ("-static",)),
    "refsup": ("refsup.c", ()),
    "netserve": ("netserve.c", ()),
    "grow": ("grow.c", ("-static", "-pthread")),  # the growth group's workloads
    # The same loop, dynamically linked: an LD_PRELOAD peer (proxychains4) can hook it.
    "loop-dynamic": ("loop.c", ()),
}


def build_c_programs(out_dir: Path) -> dict[str, Path]:
    """Compile bench/*.c into ``out_dir`` (gcc -O2); Unavailable if gcc or libc.a is missing."""
    gcc = which("gcc")
    if gcc is None:
        raise Unavailable("gcc not installed: apt-get install gcc")
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, (source, flags) in _C_PROGRAMS.items():
        target = out_dir / name
        source_path = BENCH_DIR / source
        if not target.exists() or target.stat().st_mtime < source_path.stat().st_mtime:
            argv = [gcc, "-O2", "-Wall", "-Wextra", *flags, "-o", str(target), str(source_path)]
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                hint = " (static libc missing: apt-get install libc6-dev)" if (
                    "-lc" in result.stderr) else ""
                raise Unavailable(f"building {source} failed{hint}: {tail(result.stderr)}")
        built[name] = target
    return built


# --- peak memory -------------------------------------------------------------------


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


class PeakMemory:
    """Samples VmHWM (peak resident set) of a process tree until stopped.

    VmHWM only grows, so the last sample before a process exits is its peak
    within one sampling interval.
    """

    def __init__(self, root_pid: int, interval: float = 0.02) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-peak-memory", daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            return [self.root_pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.Error:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._tree():
                kib = _vm_hwm_kib(pid)
                if kib is None:
                    continue
                # A forked agent renames itself (comm) after its first sample.
                name = _cmdline(pid) + " comm=" + _comm(pid)
                self.peaks[pid] = (name, max(kib, self.peaks.get(pid, ("", 0))[1]))
            self._stop.wait(self.interval)

    def stop(self) -> dict[int, tuple[str, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peaks

    def peak_mib(self, match: Callable[[int, str], bool]) -> float | None:
        """Largest peak among the processes ``match(pid, cmdline)`` selects, in MiB
        (``cmdline`` ends with `` comm=NAME``)."""
        found = [kib for pid, (name, kib) in self.peaks.items() if match(pid, name)]
        return max(found) / 1024 if found else None


# --- the run context ----------------------------------------------------------------


@dataclass
class Settings:
    """How big a run is: --quick shrinks everything so the machinery is checked in seconds."""

    quick: bool
    runs: int  # repetitions whose median is reported
    loop_seconds: float  # target length of one timed syscall loop
    startup_runs: int
    http_requests: int  # small requests per run (remote group)
    remote_calls: int  # opens/stats/connects per run (remote group)
    bulk_bytes: int
    program_requests: int  # requests of the Go HTTP client
    program_runs: int
    full: bool = False  # --full: the largest points too (growth: a 1 GiB file)

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            # One run of everything, no warm-ups: the point is the machinery.
            return cls(quick=True, runs=1, loop_seconds=0.01, startup_runs=1,
                       http_requests=50, remote_calls=20, bulk_bytes=4 << 20,
                       program_requests=50, program_runs=1)
        return cls(quick=False, runs=5, loop_seconds=0.25, startup_runs=15,
                   http_requests=2000, remote_calls=300, bulk_bytes=256 << 20,
                   program_requests=1000, program_runs=5)


class Context:
    """What groups share: settings, built programs, the namespace target (made on first use)."""

    def __init__(self, settings: Settings, work_dir: Path,
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.log = log
        self._programs: dict[str, Path] | None = None
        self._programs_error: Unavailable | None = None
        self._namespace: Any = None
        self._namespace_error: Unavailable | None = None

    def programs(self) -> dict[str, Path]:
        """bench/*.c built once per run; Unavailable (cached) if they cannot be."""
        if self._programs is None and self._programs_error is None:
            try:
                self._programs = build_c_programs(self.work_dir / "bin")
            except Unavailable as error:
                self._programs_error = error
        if self._programs_error is not None:
            raise self._programs_error
        assert self._programs is not None
        return self._programs

    def namespace(self) -> Any:
        """The shared :class:`bench.namespace.NamespaceTarget`, started on first use."""
        from bench.namespace import NamespaceTarget

        if self._namespace is None and self._namespace_error is None:
            try:
                self._namespace = NamespaceTarget.start(
                    netserve=self.programs()["netserve"], work_dir=self.work_dir,
                    bulk_bytes=self.settings.bulk_bytes)
            except Unavailable as error:
                self._namespace_error = error
        if self._namespace_error is not None:
            raise self._namespace_error
        return self._namespace

    def close(self) -> None:
        if self._namespace is not None:
            self._namespace.close()
            self._namespace = None
