"""The config file (``-f``: TOML, JSON or YAML) and the flags that override it.

The file is decoded straight into typed structs with msgspec, so every error
names the key it is about (``feature.fs.mode: Expected ... got ...``). Key names
follow mirrord's where they mean the same thing::

    target = "pid/1234"
    [agent]
    address = "10.0.0.5:7000"          # an agent started with `mtrace agent --listen`
    [feature.env]
    include = ["DATABASE_*", "API_*"]
    override = { LOG_LEVEL = "debug" }
    [feature.fs]
    mode = "read"                      # read | write | local | localwithoverrides
    local = ["^/home/", "\\\\.log$"]
    [feature.network.outgoing]
    ignore_localhost = true
    filter = { local = ["tcp://10.0.0.0/8:5432"] }
    [feature.network.dns.filter]
    local = ["*.internal.example"]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..tracer.features.policy import FeatureConfig
from .errors import ConfigError

Backend = Literal["auto", "notify", "ptrace"]


class _Config(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class AgentConfig(_Config):
    # HOST:PORT of an agent started with `mtrace agent --listen`.
    address: str | None = None
    # The shared secret (else MTRACE_AGENT_SECRET; a local agent gets a random one).
    secret: str | None = None
    # Give the agent write access to the target's files (feature.fs.mode = "write").
    write: bool = False
    # Seconds to wait for the agent to start and answer the handshake.
    startup_timeout: float = 15.0
    # Kubernetes targets (docs/kubernetes.md): where and how the agent runs.
    # An ephemeral container in the target pod; false: a Job on its node.
    ephemeral: bool = True
    namespace: str | None = None  # of the agent Job (default: the target's)
    image: str = "mtrace-agent:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = msgspec.field(default_factory=list)
    # Seconds the agent waits for its client before exiting; also the Job's
    # ttlSecondsAfterFinished.
    ttl: int = 60
    tolerations: list[dict[str, Any]] | None = None
    resources: dict[str, Any] | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    service_account: str | None = None
    privileged: bool = False


class TargetConfig(_Config):
    """``target = { path = "deployment/api", namespace = "staging" }`` as mirrord writes it."""

    path: str | None = None
    namespace: str | None = None


class Config(_Config):
    # pid/N, targetless, pod/NAME, deployment/NAME[/container/C], ... or a table.
    target: str | TargetConfig | None = None
    kubeconfig: str | None = None
    kube_context: str | None = None
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    feature: FeatureConfig = msgspec.field(default_factory=FeatureConfig)
    backend: Backend = "auto"


_DECODERS = {
    ".toml": msgspec.toml.decode,
    ".json": msgspec.json.decode,
    ".yaml": msgspec.yaml.decode,
    ".yml": msgspec.yaml.decode,
}


def _key_of(message: str) -> tuple[str, str]:
    """Split msgspec's "... - at `$.feature.fs.mode`" into (reason, dotted key)."""
    match = re.search(r" - at `\$\.?(.*)`$", message)
    if not match:
        return message, ""
    key = re.sub(r"\[(\d+)\]", r"[\1]", match.group(1))
    return message[: match.start()], key


def load(path: str | os.PathLike[str]) -> Config:
    file = Path(path)
    decode = _DECODERS.get(file.suffix.lower())
    if decode is None:
        raise ConfigError(
            f"{file}: unknown config format {file.suffix or '(no extension)'}",
            hint="name the file .toml, .json, .yaml or .yml",
        )
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {file}: {exc.strerror}") from exc
    try:
        config: Config = decode(data, type=Config)  # type: ignore[operator]
    except msgspec.ValidationError as exc:
        reason, key = _key_of(str(exc))
        where = f" at `{key}`" if key else ""
        raise ConfigError(f"{file}{where}: {reason}",
                          hint="see the Configuration section of the README") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{file}: not valid {file.suffix[1:].upper()}: {exc}") from exc
    validate(config, str(file))
    return config


def validate(config: Config, origin: str = "config") -> None:
    """Checks msgspec's types cannot express: regexes compile, exclusive lists."""
    fs = config.feature.fs
    for name in ("read_write", "read_only", "local", "not_found"):
        for index, pattern in enumerate(getattr(fs, name)):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"{origin} at `feature.fs.{name}[{index}]`: bad regular expression "
                    f"{pattern!r}: {exc}") from exc
    outgoing = config.feature.network.outgoing
    if outgoing.filter and outgoing.filter.remote is not None and outgoing.filter.local is not None:
        raise ConfigError(f"{origin} at `feature.network.outgoing.filter`: give either `remote` "
                          "or `local`, not both")
    dns = config.feature.network.dns
    if dns.filter and dns.filter.remote is not None and dns.filter.local is not None:
        raise ConfigError(f"{origin} at `feature.network.dns.filter`: give either `remote` or "
                          "`local`, not both")
    if fs.mode == "write" or (fs.read_write and fs.mode != "local"):
        config.agent.write = True
    if config.agent.ttl <= 0 or config.agent.startup_timeout <= 0:
        raise ConfigError(f"{origin} at `agent.ttl`: agent.ttl and agent.startup_timeout must be "
                          "positive")
    if config.agent.address:
        parse_address(config.agent.address, origin=f"{origin} at `agent.address`")


def target_path(config: Config) -> tuple[str | None, str | None]:
    """(path, namespace) of ``target``, a string or a table."""
    if isinstance(config.target, TargetConfig):
        return config.target.path, config.target.namespace
    return config.target, None


def parse_address(text: str, *, origin: str = "--agent") -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{origin}: {text!r} is not HOST:PORT",
                          hint="for example --agent 127.0.0.1:7000")
    return host.strip("[]"), int(port)
