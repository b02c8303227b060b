"""What the user asked mtrace to do with each feature: the ``feature`` section
of the config file, as typed values.

Key names follow mirrord's where they mean the same thing (``feature.env``,
``feature.fs.mode``, ``feature.network.outgoing.filter``...), so its users find
their way. The CLI decodes files and flags into these structs
(``mtrace.cli.config``); the handlers read them.
"""

from __future__ import annotations

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


class DnsFilter(_Config):
    """Names resolved by the target (``remote``) or by this machine (``local``):
    exact names or ``*.suffix`` patterns. Only one of the two lists may be given."""

    remote: list[str] | None = None
    local: list[str] | None = None


class DnsConfig(_Config):
    enabled: bool = True
    filter: DnsFilter | None = None


class NetworkConfig(_Config):
    outgoing: OutgoingConfig = msgspec.field(default_factory=OutgoingConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)


class CopyTargetConfig(_Config):
    # Kubernetes targets: scale the deployment to 0 while its copy serves as the target.
    scale_down: bool = False


class FeatureConfig(_Config):
    env: EnvConfig = msgspec.field(default_factory=EnvConfig)
    fs: FsConfig = msgspec.field(default_factory=FsConfig)
    network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    # Kubernetes targets: run a copy of the target's pod (deleted at exit) and target it.
    copy_target: bool | CopyTargetConfig = False
