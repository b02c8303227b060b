"""What the user asked mtrace to do with each feature: the ``feature`` section
of the config file, as typed values.

Key names follow mirrord's where they mean the same thing (``feature.env``,
``feature.fs.mode``, ``feature.network.outgoing.filter``...), so its users find
their way. The CLI decodes files and flags into these structs
(``mtrace.cli.config``); the handlers read them.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

FsMode = Literal["read", "write", "local", "localwithoverrides"]


class _Config(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class EnvConfig(_Config):
    """The tracee's environment: the target's, merged with the local one."""

    # Take the target's environment at all.
    enabled: bool = True
    # Glob patterns (fnmatch) of target variables to take; None means all.
    include: list[str] | None = None
    # Glob patterns of target variables to leave out (the local value, if any, stays).
    exclude: list[str] = msgspec.field(default_factory=list)
    # Values that win over both sides.
    override: dict[str, str] = msgspec.field(default_factory=dict)
    # Local variables that are always kept (PATH by default, so the command is found).
    keep_local: list[str] = msgspec.field(default_factory=lambda: ["PATH", "TERM", "HOME"])
    # Names removed from the final environment, whichever side set them
    # (case-insensitive, as mirrord's).
    unset: list[str] = msgspec.field(default_factory=list)
    # A dotenv file whose values win over the target's (override still wins over it).
    env_file: str | None = None
    # Regex over a variable's name -> its new value (capture groups of the name
    # as $1 or ${name}), applied last, as mirrord's.
    mapping: dict[str, str] = msgspec.field(default_factory=dict)


class FsConfig(_Config):
    """Where each path is read and written.

    ``read``: reads come from the target, writes stay local. ``write``: reads and
    writes go to the target. ``local``: everything local. ``localwithoverrides``:
    local, except paths the lists below send to the target. The lists are regular
    expressions matched against the absolute path (``re.search``); the first list
    that matches wins, in the order: not_found, local, read_only, read_write.
    """

    mode: FsMode = "read"
    read_write: list[str] = msgspec.field(default_factory=list)
    read_only: list[str] = msgspec.field(default_factory=list)
    local: list[str] = msgspec.field(default_factory=list)
    not_found: list[str] = msgspec.field(default_factory=list)
    # Paths kept local whatever the mode (see mtrace.tracer.features.files.DEFAULT_LOCAL);
    # set to false to drop the defaults and rely on `local` alone.
    default_local: bool = True
    # Regex -> replacement on absolute paths before anything else looks at them
    # (`"^/app/config" = "/etc/app"`; capture groups as $1 or ${name}).
    mapping: dict[str, str] = msgspec.field(default_factory=dict)


class OutgoingFilter(_Config):
    """Which connections leave from the target: ``remote`` or ``local`` lists of
    ``[proto://]host-or-subnet[:port]`` (proto is tcp or udp; host may be a name,
    an IP or a CIDR subnet). Only one of the two lists may be given."""

    remote: list[str] | None = None
    local: list[str] | None = None


class OutgoingConfig(_Config):
    tcp: bool = True
    udp: bool = True
    # Connections to 127.0.0.0/8 and ::1 stay on this machine.
    ignore_localhost: bool = False
    filter: OutgoingFilter | None = None
    # Regexes (re.search) of Unix socket paths whose stream connects go to the
    # target's socket of that path (an abstract name is matched as "@name").
    unix_streams: list[str] = msgspec.field(default_factory=list)
    # Local targets (pid/N): TCP sockets are made in the target's network
    # namespace and handed to the program instead of relayed (docs/network.md).
    direct: bool = True


class DnsFilter(_Config):
    """Names resolved by the target (``remote``) or by this machine (``local``):
    exact names or ``*.suffix`` patterns. Only one of the two lists may be given."""

    remote: list[str] | None = None
    local: list[str] | None = None


class DnsConfig(_Config):
    enabled: bool = True
    filter: DnsFilter | None = None


IncomingMode = Literal["mirror", "steal", "off"]


class HttpFilter(_Config):
    """Which HTTP requests a filtered steal takes (the others reach the target's
    process unchanged). Every pattern is a Python regular expression, matched
    with ``re.search``: ``header_filter`` against each ``Name: value`` header
    line, ``path_filter`` against the request target (path and query),
    ``method_filter`` against the method. ``all_of``/``any_of`` combine nested
    filters; ``ports`` limits filtering to those ports (others are stolen whole)."""

    header_filter: str | None = None
    path_filter: str | None = None
    method_filter: str | None = None
    all_of: list[HttpFilter] | None = None
    any_of: list[HttpFilter] | None = None
    ports: list[int] | None = None


class IncomingConfig(_Config):
    """Traffic to the target's ports the program listens on: ``mirror`` (a copy
    of each connection's incoming bytes; the target answers), ``steal`` (the
    program answers instead of the target) or ``off``."""

    mode: IncomingMode = "mirror"
    # Only these ports (the program's own port numbers); None: every port it listens on.
    ports: list[int] | None = None
    ignore_ports: list[int] = msgspec.field(default_factory=list)
    # [[local, remote], ...]: the program's port `local` subscribes to the target's `remote`.
    port_mapping: list[tuple[int, int]] = msgspec.field(default_factory=list)
    # Listening on 127.0.0.0/8 or ::1 only subscribes to nothing.
    ignore_localhost: bool = False
    http_filter: HttpFilter | None = None


class NetworkConfig(_Config):
    outgoing: OutgoingConfig = msgspec.field(default_factory=OutgoingConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    # A mode string ("mirror", "steal", "off") or a table (IncomingConfig).
    incoming: IncomingMode | IncomingConfig = "mirror"

    @property
    def incoming_config(self) -> IncomingConfig:
        if isinstance(self.incoming, str):
            return IncomingConfig(mode=self.incoming)
        return self.incoming


class CopyTargetConfig(_Config):
    # Kubernetes targets: scale the deployment to 0 while its copy serves as the target.
    scale_down: bool = False


class FeatureConfig(_Config):
    env: EnvConfig = msgspec.field(default_factory=EnvConfig)
    fs: FsConfig = msgspec.field(default_factory=FsConfig)
    network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    # uname()'s nodename (gethostname) and /etc/hostname are the target's.
    hostname: bool = True
    # Kubernetes targets: run a copy of the target's pod (deleted at exit) and target it.
    copy_target: bool | CopyTargetConfig = False


_RUST_GROUP = re.compile(r"\(\?<([A-Za-z_][A-Za-z0-9_]*)>")
_RUST_REFERENCE = re.compile(r"\$(\$|\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A mirrord (Rust regex) pattern as a Python one: ``(?<name>...)`` groups
    are spelled ``(?P<name>...)`` here."""
    return re.compile(_RUST_GROUP.sub(r"(?P<\1>", pattern))


def python_replacement(replacement: str) -> str:
    """A mirrord replacement (``$1``, ``${name}``, ``$name``, ``$$``) for ``re.sub``."""

    def convert(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        return "\\g<" + (match.group(2) or match.group(3)) + ">"

    result: list[str] = []
    position = 0
    for match in _RUST_REFERENCE.finditer(replacement):
        result.append(replacement[position:match.start()].replace("\\", "\\\\"))
        result.append(convert(match))
        position = match.end()
    result.append(replacement[position:].replace("\\", "\\\\"))
    return "".join(result)
