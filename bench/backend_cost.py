"""Per-trapped-syscall cost of each backend: plain vs seccomp notify vs ptrace.

A small C loop (compiled here with cc) times N iterations of
openat(local file) + close in-process with CLOCK_MONOTONIC, so start-up is not
counted; only openat is trapped (close is not in mtrace's trap set). Each
configuration runs R times; the table shows the median ns per iteration, the
added cost per trapped call and the ratio to the plain run.

    python bench/backend_cost.py [--iterations 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        int fd = (int)syscall(SYS_openat, AT_FDCWD, argv[1], O_RDONLY | O_CLOEXEC);
        if (fd < 0) { perror("openat"); return 1; }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / n);
    return 0;
}
"""

MTRACE = [sys.executable, "-m", "mtrace.cli.main", "exec"]


def build(directory: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("backend_cost: needs a C compiler (cc or gcc)")
    source = directory / "open_loop.c"
    source.write_text(LOOP_C)
    binary = directory / "open_loop"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def measure(prefix: list[str], binary: Path, target: Path, iterations: int) -> float:
    completed = subprocess.run([*prefix, str(binary), str(target), str(iterations)],
                               capture_output=True, text=True, check=True)
    return float(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    arguments = parser.parse_args()
    configurations = {
        "plain": [],
        "notify": [*MTRACE, "--backend", "notify", "--"],
        "ptrace": [*MTRACE, "--backend", "ptrace", "--"],
    }
    with tempfile.TemporaryDirectory(prefix="mtrace-bench-") as scratch:
        directory = Path(scratch)
        binary = build(directory)
        target = directory / "local.txt"
        target.write_text("x")
        samples: dict[str, list[float]] = {name: [] for name in configurations}
        # Interleaved, so drift (frequency, other load) hits every configuration alike.
        for _ in range(arguments.repeats):
            for name, prefix in configurations.items():
                samples[name].append(measure(prefix, binary, target, arguments.iterations))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    plain = medians["plain"]
    print(f"openat+close loop, {arguments.iterations} iterations, median of "
          f"{arguments.repeats} runs; {os.cpu_count()} CPUs, kernel {os.uname().release}\n")
    print("| backend | ns / iteration (median) | added per trapped call | ratio to plain |")
    print("| --- | ---: | ---: | ---: |")
    for name, median in medians.items():
        added = "-" if name == "plain" else f"{(median - plain) / 1000:.1f} µs"
        print(f"| {name} | {median:,.0f} | {added} | {median / plain:.1f}x |")
    spread = {name: (min(values), max(values)) for name, values in samples.items()}
    print("\nmin/max ns per iteration: " + ", ".join(
        f"{name} {low:,.0f}/{high:,.0f}" for name, (low, high) in spread.items()))


if __name__ == "__main__":
    main()
