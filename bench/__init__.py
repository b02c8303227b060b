"""mtrace's benchmarks: how fast mtrace is, side by side with native runs and peer tools.

Run from the repository root::

    python -m bench                  # everything (a few minutes)
    python -m bench --quick          # tiny runs: checks the machinery, numbers are noise
    python -m bench --only syscall   # one group (syscall, remote, startup, program, ..., growth)
    python -m bench --full           # also the largest points (growth: a 1 GiB file)

Modules:

| module | owns |
| --- | --- |
| `common` | result rows, run context, tool detection, building the C programs, timing helpers |
| `namespace` | the namespace target: a netns, loopback services in it, a `sleep` target |
| `syscalls` | per-syscall cost (untrapped getpid, trapped openat) across tools |
| `remote` | remote operations through the agent, bulk throughput, peak memory |
| `startup` | process startup under mtrace against a plain run |
| `program` | a real program: the Go HTTP client doing 1,000 requests |
| `kv` | a key-value server's GET/SET load (redis-benchmark), proxychains4 as a peer |
| `peer` | proxychains4 + microsocks rows of the remote group (connect, HTTP, bulk) |
| `growth` | how cost grows: file size, directory entries, parallel streams, threads (`grow.c`) |
| `incoming` | a stolen HTTP request against the target's own; what a mirror adds to the target's |
| `report` | targets (pass/miss), the markdown table, JSON and the chart |

Every comparison is a ratio against a baseline measured in the same run; every
number is a median of several runs. A missing tool or feature gives an "n/a"
row that says why, never a crash.
"""
