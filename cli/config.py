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
    [feature.network.incoming]         # or: incoming = "steal"
    mode = "steal"                     # mirror (default) | steal | off
    port_mapping = [[8080, 80]]
    http_filter = { header_filter = "^User-Agent: (?!kube-probe/)" }
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..tracer.features.policy import FeatureConfig, HttpFilter, IncomingConfig, compile_pattern
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
    # Seconds the rest of a frame the agent started may take (then it counts as lost).
    frame_timeout: float = 30.0
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

# Looked for in the current directory when no -f is given, first found wins.
DEFAULT_FILES = (
    ".mtrace/config.toml", ".mtrace/config.yaml", ".mtrace/config.json",
    ".mirrord/mirrord.json",
)


def find_default(directory: str | os.PathLike[str] = ".") -> Path | None:
    for name in DEFAULT_FILES:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def _key_of(message: str) -> tuple[str, str]:
    """Split msgspec's "... - at `$.feature.fs.mode`" into (reason, dotted key);
    an unknown field's own name joins the key (``feature.fs.typo``)."""
    match = re.search(r" - at `\$\.?(.*)`$", message)
    reason, key = (message, "") if not match else (message[: match.start()], match.group(1))
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", reason)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        reason = "unknown key (not an mtrace or mirrord key)"
    return reason, key


def _warn(message: str) -> None:
    sys.stderr.write(f"mtrace: warning: {message}\n")


def load(path: str | os.PathLike[str], warn: Callable[[str], None] = _warn) -> Config:
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
        raw = decode(data)  # type: ignore[operator]
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{file}: not valid {file.suffix[1:].upper()}: {exc}") from exc
    if raw is None:
        raw = {}  # an empty YAML file: every default
    config = from_data(raw, str(file), warn)
    validate(config, str(file))
    return config


def from_data(raw: Any, origin: str, warn: Callable[[str], None] = _warn) -> Config:
    """Decoded file contents (mirrord's shapes accepted) as a Config."""
    from .mirrord import UnknownKey, normalise

    try:
        data = normalise(raw, Config, lambda message: warn(f"{origin}: {message}"))
    except UnknownKey as exc:
        raise ConfigError(f"{origin} at `{exc.key}`: unknown key (not an mtrace or mirrord key)",
                          hint="see docs/mirrord.md for the keys mirrord has") from exc
    try:
        return msgspec.convert(data, type=Config)
    except msgspec.ValidationError as exc:
        reason, key = _key_of(str(exc))
        where = f" at `{key}`" if key else ""
        raise ConfigError(f"{origin}{where}: {reason}",
                          hint="see the Configuration section of the README") from exc


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
    for index, pattern in enumerate(config.feature.network.outgoing.unix_streams):
        try:
            compile_pattern(pattern)
        except re.error as exc:
            raise ConfigError(
                f"{origin} at `feature.network.outgoing.unix_streams[{index}]`: bad regular "
                f"expression {pattern!r}: {exc}") from exc
    for section, mapping in (("feature.fs.mapping", fs.mapping),
                             ("feature.env.mapping", config.feature.env.mapping)):
        for pattern in mapping:
            try:
                compile_pattern(pattern)
            except re.error as exc:
                raise ConfigError(f"{origin} at `{section}`: bad regular expression "
                                  f"{pattern!r}: {exc}") from exc
    env_file = config.feature.env.env_file
    if env_file is not None and not os.path.isfile(env_file):
        raise ConfigError(f"{origin} at `feature.env.env_file`: no such file {env_file!r}",
                          hint="a relative path is read from the current directory")
    outgoing = config.feature.network.outgoing
    if outgoing.filter and outgoing.filter.remote is not None and outgoing.filter.local is not None:
        raise ConfigError(f"{origin} at `feature.network.outgoing.filter`: give either `remote` "
                          "or `local`, not both")
    dns = config.feature.network.dns
    if dns.filter and dns.filter.remote is not None and dns.filter.local is not None:
        raise ConfigError(f"{origin} at `feature.network.dns.filter`: give either `remote` or "
                          "`local`, not both")
    _validate_incoming(config.feature.network.incoming_config, origin)
    if fs.mode == "write" or (fs.read_write and fs.mode != "local"):
        config.agent.write = True
    if config.agent.ttl <= 0 or config.agent.startup_timeout <= 0:
        raise ConfigError(f"{origin} at `agent.ttl`: agent.ttl and agent.startup_timeout must be "
                          "positive")
    if config.agent.frame_timeout <= 0:
        raise ConfigError(f"{origin} at `agent.frame_timeout`: must be positive")
    if config.agent.address:
        parse_address(config.agent.address, origin=f"{origin} at `agent.address`")


def _validate_incoming(incoming: IncomingConfig, origin: str) -> None:
    key = "feature.network.incoming"

    def check_port(port: int, where: str, *, zero: bool = False) -> None:
        if not (0 if zero else 1) <= port < 65536:
            raise ConfigError(f"{origin} at `{key}.{where}`: port {port} is out of range",
                              hint="ports are 1..65535")

    for index, port in enumerate(incoming.ports or []):
        check_port(port, f"ports[{index}]")
    for index, port in enumerate(incoming.ignore_ports):
        check_port(port, f"ignore_ports[{index}]")
    for index, (local, remote) in enumerate(incoming.port_mapping):
        check_port(local, f"port_mapping[{index}][0]")
        check_port(remote, f"port_mapping[{index}][1]")

    def check_filter(found: HttpFilter, where: str) -> None:
        for name in ("header_filter", "path_filter", "method_filter"):
            pattern = getattr(found, name)
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{origin} at `{key}.{where}.{name}`: bad regular expression "
                                  f"{pattern!r}: {exc}",
                                  hint="filters are Python regular expressions") from exc
        for index, port in enumerate(found.ports or []):
            check_port(port, f"{where}.ports[{index}]")
        for name in ("all_of", "any_of"):
            for index, nested in enumerate(getattr(found, name) or []):
                check_filter(nested, f"{where}.{name}[{index}]")

    if incoming.http_filter is not None:
        check_filter(incoming.http_filter, "http_filter")


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


def effective(config: Config) -> dict[str, Any]:
    """Every key with its value, defaults included (``verify-config``); the
    agent secret is masked."""

    def expand(value: Any) -> Any:
        if isinstance(value, msgspec.Struct):
            return {field.encode_name: expand(getattr(value, field.name))
                    for field in msgspec.structs.fields(value)}
        if isinstance(value, list | tuple):
            return [expand(item) for item in value]
        if isinstance(value, dict):
            return {key: expand(item) for key, item in value.items()}
        return value

    result: dict[str, Any] = expand(config)
    if config.agent.secret:
        result["agent"]["secret"] = "(set)"
    return result


def without_none(value: Any) -> Any:
    """TOML has no null: unset keys are left out."""
    if isinstance(value, dict):
        return {key: without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_none(item) for item in value]
    return value


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, generated from the structs."""
    schema = msgspec.json.schema(Config)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "mtrace config", **schema}
