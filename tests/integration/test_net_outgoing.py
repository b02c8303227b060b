"""Outgoing TCP/UDP and DNS under mtrace, against a real target namespace.

Differential: each probe flavour run under mtrace with the netns target must
print what it prints when run inside the target's namespaces (nsenter), and
never what the host's look-alike services answer.

The session is driven from Python by this file run as a script (``run_session``
below): the net handlers (and the files handlers, once ``mtrace.tracer.files``
exists) with a local agent attached to the target. Until the files feature
serves the target's resolv.conf/hosts, the runner bind-mounts the target's
copies over /etc in a private mount namespace of its own, so the tracee's
resolver reads the target's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RUN_TIMEOUT = 60.0


# --- the runner (this file run as a script) ------------------------------------------


def _private_etc(target_pid: int) -> None:
    """The target's resolv.conf and hosts over this machine's, for this
    process and its children only (stand-in for the files feature)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns = 0x00020000
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    for name in ("resolv.conf", "hosts"):
        subprocess.run(["mount", "--bind", f"/proc/{target_pid}/root/etc/{name}",
                        f"/etc/{name}"], check=True)


def run_session(arguments: argparse.Namespace) -> int:
    import msgspec

    from mtrace.agent.client import agent_argv, spawn_stdio
    from mtrace.tracer import net
    from mtrace.tracer.backend import AsyncSide, Handlers
    from mtrace.tracer.policy import FeatureConfig
    from mtrace.tracer.remote import RemoteContext
    from mtrace.tracer.session import Session, run
    from mtrace.tracer.syscalls import DEFAULT_TRAPPED

    have_files = importlib.util.find_spec("mtrace.tracer.files") is not None
    if not have_files:
        _private_etc(arguments.target_pid)
    features = msgspec.json.decode(arguments.features.encode(), type=FeatureConfig)
    side = AsyncSide()
    client = side.call(spawn_stdio(agent_argv(target_pid=arguments.target_pid), "secret-net"),
                       timeout=20)
    if arguments.agent_pid_file and client.process is not None:
        Path(arguments.agent_pid_file).write_text(str(client.process.pid))
    session_dir = Path(tempfile.mkdtemp(prefix="mtrace-net-test-"))
    context = RemoteContext(client=client, async_side=side, features=features,
                            session_dir=session_dir, executable=arguments.command[0])
    handlers = Handlers()
    trapped = list(DEFAULT_TRAPPED)
    if have_files:
        from mtrace.tracer import files

        handlers.update(files.handlers(context))  # type: ignore[attr-defined]
        trapped += [name for name in files.TRAPPED if name not in trapped]  # type: ignore[attr-defined]
    resolvers = None
    if arguments.local_resolver:
        host, _, port = arguments.local_resolver.rpartition(":")
        resolvers = [(host, int(port))]
    handlers.update(net.handlers(context, local_resolvers=resolvers))
    trapped += [name for name in net.TRAPPED if name not in trapped]
    try:
        return run(Session(argv=arguments.command, handlers=handlers, trapped=tuple(trapped),
                           async_side=side, backend="notify"))
    finally:
        with contextlib.suppress(Exception):
            side.call(client.close(), timeout=5)
        side.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target-pid", type=int, required=True)
    parser.add_argument("--features", default="{}")
    parser.add_argument("--local-resolver")
    parser.add_argument("--agent-pid-file")
    parser.add_argument("command", nargs="+")
    raise SystemExit(run_session(parser.parse_args()))


if __name__ == "__main__":
    main()
