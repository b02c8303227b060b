"""Targets: what ``--target`` names, checked before anything starts, and the
agent that serves it (spawned locally for ``pid/N``, reached over TCP with
``--agent``)."""

from __future__ import annotations

import os
import secrets
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from ..agent.client import AgentClient, agent_argv, connect_tcp, spawn_stdio
from ..agent.errors import AgentError, AuthenticationError
from ..agent.secret import GENERATE_HINT, weakness
from .config import Config, parse_address, target_path
from .errors import ConfigError, TargetError

if TYPE_CHECKING:
    from .local_agent import ForkedAgent

if TYPE_CHECKING:
    from .kube.resolve import KubeTarget

SECRET_VARIABLE = "MTRACE_AGENT_SECRET"
_KUBERNETES_KINDS = ("pod", "deployment", "statefulset", "daemonset", "job", "cronjob",
                     "replicaset", "rollout", "service")


class Target(msgspec.Struct, frozen=True):
    kind: str  # "pid", "targetless" or "kube"
    pid: int | None = None
    kube: KubeTarget | None = None

    def describe(self) -> str:
        if self.kube is not None:
            return self.kube.describe()
        return f"pid/{self.pid}" if self.kind == "pid" else self.kind


def target_of(config: Config, namespace: str | None = None) -> Target | None:
    """The configured target (a string or a table), ``-n`` over the table's namespace."""
    path, table_namespace = target_path(config)
    if not path:
        return None
    namespace = namespace or table_namespace
    if path == "targetless" and (namespace or config.kubeconfig or config.kube_context):
        # A Kubernetes setting says where: the agent runs in that cluster.
        from .kube.resolve import KubeTarget

        return Target("kube", kube=KubeTarget("targetless", namespace=namespace))
    return parse_target(path, namespace=namespace)


def parse_target(text: str, *, namespace: str | None = None) -> Target:
    """``pid/N``, ``targetless`` or a Kubernetes target; a clear error for anything else."""
    kind, _, rest = text.partition("/")
    if text == "targetless":
        return Target("targetless")
    if kind == "pid":
        if not rest.isdigit():
            raise TargetError(f"--target {text}: pid/N needs a process id",
                              hint="for example --target pid/1234 (see `pgrep -f NAME`)")
        target = Target("pid", int(rest))
        check_pid_target(target)
        return target
    if kind in _KUBERNETES_KINDS:
        from .kube.resolve import parse_path

        return Target("kube", kube=parse_path(text, namespace))
    raise TargetError(f"--target {text}: unknown target kind {kind!r}",
                      hint="use pid/N, targetless, pod/NAME, deployment/NAME, ...")


def check_pid_target(target: Target) -> None:
    """The process exists and its namespaces and files can be entered by us."""
    pid = target.pid
    if not os.path.exists(f"/proc/{pid}"):
        raise TargetError(f"target pid/{pid} does not exist",
                          hint="check the pid with `ps -p PID` or `pgrep -f NAME`")
    for path in (f"/proc/{pid}/ns/net", f"/proc/{pid}/root/", f"/proc/{pid}/environ"):
        try:
            if path.endswith("/"):
                os.listdir(path)
            else:
                os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except PermissionError:
            raise TargetError(
                f"target pid/{pid} cannot be entered: no permission for {path}",
                hint="entering another process's namespaces needs root (try sudo)",
            ) from None
        except OSError as exc:
            raise TargetError(f"target pid/{pid} cannot be entered: {path}: {exc.strerror}",
                              hint="is the process still running?") from None


def secret_from_flags(secret: str | None, secret_file: str | None) -> str | None:
    """The secret of ``--agent-secret`` or ``--agent-secret-file``. A secret on
    the command line is taken, with a warning: every user of this machine can
    read it in ``ps`` and ``/proc/PID/cmdline``."""
    if secret is not None and secret_file is not None:
        raise ConfigError("give --agent-secret or --agent-secret-file, not both")
    if secret is not None:
        sys.stderr.write(
            "mtrace: warning: --agent-secret shows the secret to every user of this machine "
            f"(ps, /proc/PID/cmdline); use --agent-secret-file FILE or {SECRET_VARIABLE}\n")
        return secret
    if secret_file is None:
        return None
    try:
        with open(secret_file, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(4097)
    except OSError as error:
        raise ConfigError(f"cannot read the agent secret from {secret_file}: {error.strerror}",
                          hint="--agent-secret-file FILE: a file holding the secret on one "
                               "line (`openssl rand -hex 16 > FILE; chmod 600 FILE`)") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"--agent-secret-file {secret_file} is not a regular file")
    text = data.decode(errors="replace").strip()
    if not text or "\n" in text or len(data) > 4096:
        raise ConfigError(f"--agent-secret-file {secret_file} must hold the secret on one line",
                          hint=GENERATE_HINT)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        sys.stderr.write(f"mtrace: warning: {secret_file} is readable by other users "
                         f"(mode {stat.S_IMODE(mode):04o}): chmod 600 {secret_file}\n")
    return text


def agent_secret(config: Config) -> str:
    return config.agent.secret or os.environ.get(SECRET_VARIABLE) or secrets.token_hex(16)


def fork_local_agent(config: Config, target: Target | None, *, verbose: int = 0
                     ) -> ForkedAgent | None:
    """The local agent of a pid/N target, forked now (before any thread starts:
    ``mtrace.cli.local_agent``); None where it is spawned later instead."""
    from .local_agent import can_fork, fork_agent

    if config.agent.address or target is None or target.kind != "pid" or not can_fork():
        return None
    argv = agent_argv(target_pid=target.pid, write=config.agent.write, verbose=verbose)
    return fork_agent(argv[3:], agent_secret(config), quiet=not verbose)


async def connect_agent(config: Config, target: Target | None, *, verbose: int = 0,
                        forked: ForkedAgent | None = None) -> AgentClient:
    """The agent for this run: a TCP one if an address is configured, else a
    local one (``forked`` already, or spawned over stdio) attached to the
    target. A local agent that fails to start is reported with the last line
    it logged."""
    client = await _connect_agent(config, target, verbose=verbose, forked=forked)
    client.frame_timeout = config.agent.frame_timeout
    return client


async def _connect_agent(config: Config, target: Target | None, *, verbose: int,
                         forked: ForkedAgent | None) -> AgentClient:
    timeout = config.agent.startup_timeout
    if forked is not None:
        return await forked.connect(timeout=timeout)
    if target is not None and target.kube is not None and not config.agent.address:
        from .kube.session import connect

        # Piped: no steps, and none of the API calls made only to show one (the image's pull).
        return await connect(config, target.kube, verbose=verbose,
                             progress=progress if sys.stderr.isatty() else None)
    if config.agent.address:
        host, port = parse_address(config.agent.address)
        secret = config.agent.secret or os.environ.get(SECRET_VARIABLE)
        if not secret:
            raise ConfigError("--agent needs the agent's shared secret",
                              hint=f"pass --agent-secret-file FILE or set {SECRET_VARIABLE}")
        problem = weakness(secret)
        try:
            client = await connect_tcp(host, port, secret, timeout=timeout)
        except AuthenticationError as error:
            if problem is not None:
                # no agent of this version listens with such a secret: it cannot be the right one
                error.hint = f"{problem}; {GENERATE_HINT}, and give it to both sides"
            raise
        if problem is not None:  # an older agent took it
            sys.stderr.write(f"mtrace: warning: {problem}; {GENERATE_HINT}\n")
        return client
    pid = target.pid if target is not None and target.kind == "pid" else None
    argv = agent_argv(target_pid=pid, write=config.agent.write, verbose=verbose)
    if verbose:
        return await spawn_stdio(argv, agent_secret(config), timeout=timeout)
    # Quiet unless asked: the agent's log would mix with the program's output.
    with tempfile.TemporaryFile() as log:
        try:
            return await spawn_stdio(argv, agent_secret(config), stderr=log.fileno(),
                                     timeout=timeout)
        except AgentError as error:
            log.seek(0)
            lines = [line for line in log.read().decode(errors="replace").splitlines()
                     if line.strip()]
            if lines:
                error.message = f"{error.message}; the agent said: {lines[-1].strip()}"
            raise


def replica_provider(config: Config, target: Target | None
                     ) -> Callable[[], Awaitable[list[AgentClient]]] | None:
    """For a Kubernetes workload with incoming traffic on: what starts agents in
    its other ready pods when the program first listens (None otherwise)."""
    if (target is None or target.kube is None or config.agent.address
            or config.feature.network.incoming_config.mode == "off"
            or target.kube.kind in ("pod", "targetless")):
        return None
    kube_target = target.kube

    async def start() -> list[AgentClient]:
        from .kube.session import start_replicas

        return await start_replicas(config, kube_target)

    return start


def release_agent() -> None:
    """Delete what a Kubernetes session created (nothing for other targets)."""
    session = sys.modules.get(f"{__package__}.kube.session")
    if session is not None:
        session.release_all()


def explain_agent_loss() -> str | None:
    """What the cluster says about a lost agent (the pod deleted, evicted), if anything."""
    session = sys.modules.get(f"{__package__}.kube.session")
    return session.explain_loss() if session is not None else None


def progress(message: str) -> None:
    """Start-up progress, shown only on a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write(f"mtrace: {message}\n")
        sys.stderr.flush()
