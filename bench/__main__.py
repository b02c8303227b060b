"""``python -m bench``: run the benchmark groups, print the table, write JSON and the chart."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import growth, incoming, kube, kv, program, remote, report, startup, syscalls
from bench.common import RESIDENT_SWITCH, RESULTS_DIR, Context, Row, Settings

GROUPS: dict[str, Callable[[Context], list[Row]]] = {
    "syscall": syscalls.run,
    "remote": remote.run,
    "startup": startup.run,
    "program": program.run,
    "kv": kv.run,
    "incoming": incoming.run,
    "kube": kube.run,
    "growth": growth.run,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark mtrace against native runs and peer tools.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny runs: checks the machinery in seconds; the numbers are noise")
    parser.add_argument("--full", action="store_true",
                        help="also the largest points (growth: a 1 GiB file); minutes longer")
    parser.add_argument("--only", metavar="NAME", action="append", default=None,
                        help=f"run only these groups (repeatable or comma-separated): "
                             f"{', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="directory for latest.json, latest.md and latest.png "
                             "(default: bench/results)")
    args = parser.parse_args(argv)
    if args.only:
        names = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
        unknown = [name for name in names if name not in GROUPS]
        if unknown:
            parser.error(f"unknown group {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
        args.only = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    groups = args.only or list(GROUPS)
    settings = Settings.for_mode(args.quick)
    settings.full = args.full and not args.quick
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_at_start = [round(value, 2) for value in os.getloadavg()]

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    # Every `mtrace exec` of the bench runs in-process, whatever resident mtrace
    # the user keeps running; the "(resident)" variants use one the bench starts.
    os.environ[RESIDENT_SWITCH] = "0"
    work_dir = Path(tempfile.mkdtemp(prefix="mtrace-bench-"))
    ctx = Context(settings, work_dir, log)
    rows: list[Row] = []
    try:
        for name in groups:
            log(f"group {name}")
            rows += GROUPS[name](ctx)
    finally:
        ctx.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    targets = report.evaluate_targets(rows)
    info = report.run_info()
    info["machine"]["load_average_at_start"] = load_at_start
    chart = report.draw_chart(out_dir / "latest.png", rows, info)
    if growth.draw_chart(out_dir / "growth.png", rows):
        log(f"growth curves: {out_dir / 'growth.png'}")
    if chart is None:
        log("chart skipped: matplotlib is not installed (pip install -e '.[bench]')")
    report.write_json(out_dir / "latest.json", rows, targets, info, settings, groups, chart)
    table = report.markdown(rows, targets, info, settings)
    (out_dir / "latest.md").write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    log(f"done: {out_dir / 'latest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
