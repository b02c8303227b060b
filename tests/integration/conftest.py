"""Integration fixtures: real agents, real namespaces.

Agent fixtures (this section is owned by the agent tests; add others below it):

* ``netns_target`` (session): a :class:`netns_target.NetnsTarget`, a network
  namespace with a target process, its own env/hosts/resolv.conf/private file,
  TCP/UDP/DNS services on its loopback and look-alike services on the host.
  Skips when not root.
* ``agent_secret``: a fresh shared secret.
* ``with_agent``: ``with_agent(body, target_pid=None, write=False)`` runs the
  coroutine ``body(client)`` against a fresh ``--stdio`` agent (its own event
  loop, agent stopped afterwards) and returns what ``body`` returned.
* ``listening_agent``: ``with listening_agent(target_pid=None, write=False,
  extra_args=()) as agent:`` starts ``mtrace agent --listen 127.0.0.1:0``; ``agent.host``,
  ``agent.port``, ``agent.secret``, ``agent.process``, ``agent.log()``,
  ``agent.new_log()`` (what it logged since the last call).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from mtrace_run import stop
from netns_target import NetnsTarget
from netns_target import netns_target as make_netns_target

from mtrace.agent.client import AgentClient, agent_argv, spawn_stdio


@pytest.fixture(scope="session")
def netns_target() -> Iterator[NetnsTarget]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    with make_netns_target() as target:
        yield target


@pytest.fixture
def agent_secret() -> str:
    return secrets.token_hex(16)


WithAgent = Callable[..., Any]


@pytest.fixture
def with_agent(agent_secret: str) -> WithAgent:
    def run(
        body: Callable[[AgentClient], Awaitable[Any]],
        *,
        target_pid: int | None = None,
        write: bool = False,
    ) -> Any:
        async def main() -> Any:
            client = await spawn_stdio(
                agent_argv(target_pid=target_pid, write=write, verbose=1), agent_secret
            )
            try:
                return await body(client)
            finally:
                await client.close()

        return asyncio.run(main())

    return run


@dataclass
class ListeningAgent:
    host: str
    port: int
    secret: str
    process: subprocess.Popen[bytes]
    log_path: str

    _read_up_to: int = 0

    def log(self) -> str:
        """Everything the agent logged so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def new_log(self) -> str:
        """What the agent logged since the last call."""
        with open(self.log_path, "rb") as file:
            file.seek(self._read_up_to)
            text = file.read()
        self._read_up_to += len(text)
        return text.decode("utf-8", "replace")


@contextlib.contextmanager
def _listening_agent(
    secret: str, target_pid: int | None = None, write: bool = False, extra_args: Sequence[str] = ()
) -> Iterator[ListeningAgent]:
    argv = [sys.executable, "-m", "mtrace.agent", "--listen", "127.0.0.1:0", "-v", *extra_args]
    if target_pid is not None:
        argv += ["--target-pid", str(target_pid)]
    if write:
        argv.append("--write")
    with tempfile.NamedTemporaryFile(prefix="mtrace-agent-", suffix=".log") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "MTRACE_AGENT_SECRET": secret},
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            if not line.startswith("LISTENING "):
                process.kill()
                process.wait()
                log.seek(0)
                raise RuntimeError(f"agent did not start: {line!r} {log.read().decode()}")
            host, _, port = line.split()[1].rpartition(":")
            yield ListeningAgent(host, int(port), secret, process, log.name)
        finally:
            stop(process, signal.SIGTERM, timeout=10)


@pytest.fixture
def listening_agent(agent_secret: str) -> Callable[..., Any]:
    def start(
        *, target_pid: int | None = None, write: bool = False, extra_args: Sequence[str] = ()
    ) -> Any:
        return _listening_agent(agent_secret, target_pid, write, extra_args)

    return start
