#!/usr/bin/python3
"""runc wrapper: make OCI configs fit a root that lacks CAP_SYS_RESOURCE, then exec the real runc.

dockerd runs it as its default runtime (`--add-runtime mtrace-rig=THIS
--default-runtime mtrace-rig`). On this VM two things fail without it:

* kubelet asks for `oomScoreAdj: -998` on every pause container; lowering a
  score needs CAP_SYS_RESOURCE, so runc dies ("can't get final child's PID").
  A negative score becomes 0.
* a privileged container asks for every capability; those outside our bounding
  set cannot be granted ("unable to apply caps"). They are dropped.

Edits `BUNDLE/config.json` on `create`/`run` and the `--process` file on `exec`.
Standard library only: runs under Debian's /usr/bin/python3.
"""

import json
import os
import sys

REAL_RUNC = os.environ.get("MTRACE_RIG_REAL_RUNC", "/usr/sbin/runc")

# Linux capability numbers (linux/capability.h).
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip


def bounding_set():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return {name for number, name in enumerate(CAPABILITIES) if mask & (1 << number)}
    return set(CAPABILITIES)


def fix_process(process):
    changed = False
    if process.get("oomScoreAdj", 0) < 0:
        process["oomScoreAdj"] = 0
        changed = True
    capabilities = process.get("capabilities") or {}
    allowed = bounding_set()
    for kind, names in capabilities.items():
        kept = [name for name in names or [] if name in allowed]
        if kept != (names or []):
            capabilities[kind] = kept
            changed = True
    return changed


def rewrite(path, key):
    try:
        with open(path) as source:
            document = json.load(source)
    except (OSError, ValueError):
        return  # not ours to judge: runc reports it
    process = document.get(key) if key else document
    if isinstance(process, dict) and fix_process(process):
        temporary = path + ".mtrace-rig"
        with open(temporary, "w") as target:
            json.dump(document, target)
        os.replace(temporary, path)


def option_value(args, names):
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def main():
    args = sys.argv[1:]
    commands = [arg for arg in args if arg in ("create", "run", "exec")]
    if commands:
        command = commands[0]
        after = args[args.index(command) + 1 :]
        if command in ("create", "run"):
            bundle = option_value(after, ("--bundle", "-b")) or os.getcwd()
            rewrite(os.path.join(bundle, "config.json"), "process")
        else:
            process_file = option_value(after, ("--process", "-p"))
            if process_file:
                rewrite(process_file, None)
    os.execv(REAL_RUNC, [REAL_RUNC, *args])


if __name__ == "__main__":
    main()
