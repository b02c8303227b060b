"""A/B of `mtrace exec --target pid/N -- loop bulk` between installs, alternating.

    python -m bench.ab --variant old=/tmp/venv-old/bin/python --variant new=.venv/bin/python \\
        [--rounds 6] [--relay | --startup [--resident] | --connect]

Each variant is an interpreter with mtrace installed (a venv per checkout:
``git worktree add /tmp/old COMMIT``, ``python3 -m venv --system-site-packages
/tmp/venv-old``, ``/tmp/venv-old/bin/pip install --no-deps --no-build-isolation
-e /tmp/old``). One namespace target serves every run; the variants take turns,
in reverse order every other round, so that a loaded machine's drift falls on
all of them alike. ``--relay`` turns the direct path off (agent streams, as an
agent over TCP or a Kubernetes target would carry them). ``--startup`` times
`loop true` instead (start-up: `mtrace exec` and `mtrace exec --target pid/N`,
wall milliseconds from fork to exit), with the program alone and ``python -c
pass`` timed in the same rounds; with ``--resident`` also through a resident
mtrace each variant starts for its own interpreter, on its own socket, and
stops at the end. ``--connect`` times `loop connect` instead (``--connects``
socket+connect+close to the target's loopback: p50 of each run and CPU per
connect, the direct path's per-connect cost). Every other run is in-process
(``MTRACE_RESIDENT=0``), whatever resident the user runs. Prints each run and
the medians, with the load average before and after: compare ratios, not
absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.common import (
    RESIDENT_SWITCH,
    Resident,
    Unavailable,
    build_c_programs,
    time_command,
)
from bench.namespace import NamespaceTarget


def _rate(result: dict[str, float]) -> float:
    streaming_ns = result["total_ns"] - result.get("first_byte_ns", 0)
    return result["bytes"] / max(streaming_ns / 1e9, 1e-9) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=PYTHON")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--relay", action="store_true", help="feature.network.outgoing.direct off")
    parser.add_argument("--startup", action="store_true", help="time start-up, not bulk")
    parser.add_argument("--resident", action="store_true",
                        help="with --startup: also through each variant's own resident mtrace")
    parser.add_argument("--connect", action="store_true", help="time loop connect, not bulk")
    parser.add_argument("--connects", type=int, default=3000)
    args = parser.parse_args()
    if args.resident and not args.startup:
        parser.error("--resident goes with --startup")
    variants = dict(item.split("=", 1) for item in args.variant)
    os.environ[RESIDENT_SWITCH] = "0"  # the resident runs' own environment drops it
    if args.startup:
        _startup(variants, args.rounds, args.resident)
        return
    if args.connect:
        _connect(variants, args.rounds, args.connects)
        return
    work = Path(tempfile.mkdtemp(prefix="mtrace-bench-ab-"))
    programs = build_c_programs(work / "bin")
    extra: list[str] = []
    if args.relay:
        config = work / "relay.json"
        config.write_text(json.dumps({"feature": {"network": {"outgoing": {"direct": False}}}}))
        extra = ["-f", str(config)]
    target = NamespaceTarget.start(netserve=programs["netserve"], work_dir=work,
                                   bulk_bytes=args.bulk_mib << 20)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    print(f"load average {os.getloadavg()}", flush=True)
    try:
        for round_ in range(args.rounds):
            names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in names:
                argv = [variants[name], "-m", "mtrace.cli", "exec", *extra, "--target",
                        f"pid/{target.pid}", "--", str(programs["loop"]), "bulk", "127.0.0.1",
                        str(target.bulk_port)]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                                      check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode or not lines:
                    print(f"{round_} {name}: failed ({done.returncode}) {done.stderr[-300:]}")
                    continue
                rates[name].append(_rate(json.loads(lines[-1])))
                print(f"{round_} {name}: {rates[name][-1]:.1f} MB/s", flush=True)
    finally:
        target.close()
        shutil.rmtree(work, ignore_errors=True)
    for name, values in rates.items():
        if values:
            print(f"{name}: median {statistics.median(values):.1f} MB/s over {len(values)} runs")
    print(f"load average {os.getloadavg()}")


def _startup(variants: dict[str, str], rounds: int, resident: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="mtrace-bench-ab-"))
    programs = build_c_programs(work / "bin")
    target = NamespaceTarget.start(netserve=programs["netserve"], work_dir=work, bulk_bytes=1 << 20)
    kinds: dict[str, list[str]] = {"exec": [], "exec --target pid/N": ["--target", f"pid/{target.pid}"]}
    if resident:
        kinds |= {f"{kind} (resident)": flags for kind, flags in kinds.items()}
    times: dict[tuple[str, str], list[float]] = {(n, k): [] for n in variants for k in kinds}
    # Baselines in the same rounds: the program alone, and the first variant's
    # interpreter doing nothing (the part of start-up no change to mtrace can cut).
    baselines = {"plain": [str(programs["loop"]), "true"],
                 "python -c pass": [next(iter(variants.values())), "-c", "pass"]}
    baseline_times: dict[str, list[float]] = {name: [] for name in baselines}
    # Each variant's own resident (its interpreter's install, its own socket);
    # the other runs are in-process whatever resident the user runs.
    residents: dict[str, Resident] = {}
    lost: dict[str, str] = {}
    print(f"load average {os.getloadavg()}", flush=True)
    try:
        for name, python in variants.items() if resident else ():
            try:
                residents[name] = Resident.start([python, "-m", "mtrace.cli"])
            except Unavailable as error:
                lost[name] = str(error)
                print(f"{name}: no resident: {error}", flush=True)
        for round_ in range(rounds):
            for name, argv in baselines.items():
                baseline_times[name].append(time_command(argv) * 1000)
            names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in names:
                for kind, flags in kinds.items():
                    through = kind.endswith("(resident)")
                    if through and name not in residents:
                        continue
                    env = residents[name].env if through else None  # main() set the switch
                    argv = [variants[name], "-m", "mtrace.cli", "exec", *flags, "--",
                            str(programs["loop"]), "true"]
                    times[(name, kind)].append(time_command(argv, env=env) * 1000)
        for name, owned in residents.items():
            timed = sum(len(times[(name, kind)]) for kind in kinds if kind.endswith("(resident)"))
            if (shortfall := owned.shortfall(timed)) is not None:
                lost[name] = shortfall
    finally:
        for owned in residents.values():
            owned.stop()
        target.close()
        shutil.rmtree(work, ignore_errors=True)
    for baseline, values in baseline_times.items():
        print(f"{baseline}: median {statistics.median(values):.1f} ms over {len(values)} runs")
    for (name, kind), values in times.items():
        if kind.endswith("(resident)") and name in lost:
            print(f"{name} {kind}: n/a ({lost[name]})")
        elif values:
            print(f"{name} {kind}: median {statistics.median(values):.0f} ms over {len(values)} runs")
    print(f"load average {os.getloadavg()}")


def _connect(variants: dict[str, str], rounds: int, connects: int) -> None:
    """Wall p50 of each run, and CPU per connect of the whole process tree
    (user+sys of a run of ``connects`` minus one of an eighth as many, over
    the difference: start-up cancels out). At a high load average the CPU
    figure is the steadier of the two."""
    work = Path(tempfile.mkdtemp(prefix="mtrace-bench-ab-"))
    programs = build_c_programs(work / "bin")
    target = NamespaceTarget.start(netserve=programs["netserve"], work_dir=work, bulk_bytes=1 << 20)
    p50s: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    few = max(connects // 8, 1)

    def run(python: str, count: int) -> tuple[float, float] | None:
        """(p50 µs, CPU seconds) of one `loop connect` of ``count`` under mtrace."""
        argv = [python, "-m", "mtrace.cli", "exec", "--target", f"pid/{target.pid}", "--",
                str(programs["loop"]), "connect", "127.0.0.1", str(target.http_port), str(count)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"failed ({done.returncode}) {done.stderr[-300:]}")
            return None
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return json.loads(lines[-1])["p50_ns"] / 1000, cpu

    print(f"load average {os.getloadavg()}", flush=True)
    try:
        for round_ in range(rounds):
            names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in names:
                many, some = run(variants[name], connects), run(variants[name], few)
                if many is None or some is None:
                    continue
                p50s[name].append(many[0])
                cpus[name].append((many[1] - some[1]) / (connects - few) * 1e6)
                print(f"{round_} {name}: p50 {p50s[name][-1]:.1f} us, "
                      f"CPU {cpus[name][-1]:.1f} us per connect", flush=True)
    finally:
        target.close()
        shutil.rmtree(work, ignore_errors=True)
    for name in variants:
        if p50s[name]:
            print(f"{name}: median p50 {statistics.median(p50s[name]):.1f} us, median CPU "
                  f"{statistics.median(cpus[name]):.1f} us per connect over {len(p50s[name])} runs")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
