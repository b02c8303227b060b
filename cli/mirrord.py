"""mirrord config files as they are: every key mirrord's schema has, what mtrace
does with it, and the step that turns a mirrord-shaped file into mtrace's structs.

mirrord accepts short forms (``"fs": "read"``, ``"env": true``, ``"outgoing":
false``, a single string where a list is expected, ``"A;B"`` for env name lists,
``null`` for "the default"); :func:`normalise` expands them before msgspec checks
the types. A key mirrord has and mtrace's structs lack is dropped with one
warning naming it (and why); a key neither knows stays in, so msgspec reports it
as an error naming it (a typo must not pass).

The table is the single source of the key list in ``docs/mirrord.md``
(``mtrace config mirrord-keys`` prints it; a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Status = Literal["supported", "differs", "issue 10", "issue 13", "ignored"]


@dataclass(frozen=True)
class MirrordKey:
    key: str
    status: Status
    # supported: empty or a remark; differs: how; ignored: why.
    note: str = ""


# Keys of the Kubernetes and incoming-traffic features: supported where mtrace's
# config types have them (docs/kubernetes.md, docs/network.md), else ignored
# with this reason.
_K8S = "a Kubernetes option mtrace does not implement (docs/kubernetes.md lists those it has)"
_INCOMING = "an incoming-traffic option mtrace does not implement (docs/network.md)"
_OPERATOR = "needs the mirrord Operator (a commercial cluster component); mtrace has no operator"
_HOOKS = "tunes mirrord's LD_PRELOAD hooks; mtrace traps system calls, so there is nothing to tune"
_PROXY = "mirrord's local proxy process; mtrace's supervisor talks to the agent directly"
_CONTAINER = "only for `mirrord container`; mtrace has no container mode"
_MACOS = "macOS SIP patching; mtrace runs on Linux only"


def _agent(name: str, status: Status = "issue 10", note: str = _K8S) -> MirrordKey:
    return MirrordKey(f"agent.{name}", status, note)


KEYS: tuple[MirrordKey, ...] = (
    MirrordKey("accept_invalid_certificates", "issue 10", _K8S),
    MirrordKey("agent", "differs", "the agent's section: `address`, `secret`, `write` and "
               "`startup_timeout` are mtrace's own; the Kubernetes ones as docs/kubernetes.md lists"),
    _agent("annotations"), _agent("check_out_of_pods"),
    _agent("clean_iptables_on_start", "issue 13", _INCOMING),
    _agent("communication_timeout"), _agent("disable_mesh_sidecar_injection"),
    _agent("disabled_capabilities"), _agent("dns"), _agent("dns.attempts"), _agent("dns.timeout"),
    _agent("ephemeral"), _agent("exclude_from_mesh"),
    _agent("flush_connections", "issue 13", _INCOMING),
    _agent("image"), _agent("image_pull_policy"), _agent("image_pull_secrets"),
    _agent("inject_headers", "issue 13", _INCOMING),
    _agent("jaq_time_limit", "issue 13", _INCOMING),
    _agent("json_log"), _agent("labels"), _agent("log_level"),
    _agent("max_body_buffer_size", "issue 13", _INCOMING),
    _agent("max_body_buffer_timeout", "issue 13", _INCOMING),
    _agent("metrics"), _agent("namespace"),
    _agent("nftables", "issue 13", _INCOMING),
    _agent("node_selector"), _agent("priority_class"), _agent("privileged"), _agent("resources"),
    _agent("security_context"), _agent("service_account"),
    _agent("startup_timeout", "supported", "seconds, a number (mtrace's default: 15)"),
    _agent("tolerations"), _agent("ttl"),
    MirrordKey("api", "ignored", "mirrord's session monitor socket; mtrace has none"),
    MirrordKey("baggage", "ignored", _OPERATOR),
    MirrordKey("ci", "ignored", "`mirrord ci` only; mtrace has no ci command"),
    MirrordKey("ci.output_dir", "ignored", "`mirrord ci` only"),
    MirrordKey("container", "ignored", _CONTAINER),
    *(MirrordKey(f"container.{name}", "ignored", _CONTAINER) for name in (
        "cli_extra_args", "cli_image", "cli_image_lib_path", "cli_prevent_cleanup",
        "cli_tls_path", "override_host_ip", "platform")),
    MirrordKey("experimental", "ignored", "mirrord's experimental switches"),
    MirrordKey("experimental.applev", "ignored", "macOS only"),
    MirrordKey("experimental.browser_extension_config", "ignored", _INCOMING),
    MirrordKey("experimental.disable_reuseaddr", "ignored", "macOS only"),
    MirrordKey("experimental.dlopen_cgo", "ignored", _HOOKS + " (cgo libraries are trapped too)"),
    MirrordKey("experimental.dns_permission_error_fatal", "ignored", "deprecated in mirrord"),
    MirrordKey("experimental.enable_exec_hooks_linux", "ignored",
               _HOOKS + " (every exec and child stays trapped)"),
    MirrordKey("experimental.force_hook_connect", "ignored", _HOOKS),
    MirrordKey("experimental.hide_ipv6_interfaces", "ignored", _HOOKS),
    MirrordKey("experimental.hook_rename", "ignored", _HOOKS + " (rename is trapped)"),
    MirrordKey("experimental.idle_local_http_connection_timeout", "ignored", _INCOMING),
    MirrordKey("experimental.ignore_system_proxy_config", "ignored",
               "unset the proxy variables with feature.env.unset"),
    MirrordKey("experimental.latency", "ignored", "no artificial latency in mtrace"),
    MirrordKey("experimental.latency.receive_delay", "ignored", "no artificial latency"),
    MirrordKey("experimental.latency.transmit_delay", "ignored", "no artificial latency"),
    MirrordKey("experimental.non_blocking_tcp_connect", "ignored",
               "mtrace connects the program's own socket, blocking or not"),
    MirrordKey("experimental.sip_log_destination", "ignored", _MACOS),
    MirrordKey("experimental.sip_utils", "ignored", _MACOS),
    MirrordKey("experimental.tcp_ping4_mock", "ignored", _HOOKS),
    MirrordKey("experimental.trust_any_certificate", "ignored", "macOS only"),
    MirrordKey("experimental.use_dev_null", "ignored", _HOOKS),
    MirrordKey("external_proxy", "ignored", _CONTAINER),
    *(MirrordKey(f"external_proxy.{name}", "ignored", _CONTAINER) for name in (
        "host_ip", "idle_timeout", "json_log", "log_destination", "log_level",
        "start_idle_timeout", "tls_enable")),
    MirrordKey("feature", "supported"),
    MirrordKey("feature.copy_target", "ignored", _OPERATOR),
    MirrordKey("feature.db_branches", "ignored", _OPERATOR),
    MirrordKey("feature.env", "supported", "`true`/`false` short forms too"),
    MirrordKey("feature.env.env_file", "supported", "a dotenv file; its values win over the "
               "target's, `override` wins over it (a relative path is from the current directory)"),
    MirrordKey("feature.env.exclude", "supported", "a list or a `;`-separated string of globs"),
    MirrordKey("feature.env.include", "supported", "a list or a `;`-separated string of globs"),
    MirrordKey("feature.env.load_from_process", "ignored",
               "mtrace reads the target's environment before the program starts; there is no "
               "later load to switch to"),
    MirrordKey("feature.env.mapping", "supported",
               "regex on the variable's name -> its new value, `$1`/`${name}` from the name"),
    MirrordKey("feature.env.override", "supported"),
    MirrordKey("feature.env.unset", "supported", "case-insensitive, whichever side set it"),
    MirrordKey("feature.fs", "supported", "`\"read\"`, `true`/`false` short forms too"),
    MirrordKey("feature.fs.local", "supported", "regexes, matched with `re.search`"),
    MirrordKey("feature.fs.mapping", "differs",
               "regex -> replacement (`$1`, `${name}`) applied to absolute paths, and to relative "
               "ones once made absolute (mirrord skips relative paths)"),
    MirrordKey("feature.fs.mode", "supported", "read, write, local, localwithoverrides"),
    MirrordKey("feature.fs.not_found", "supported"),
    MirrordKey("feature.fs.read_only", "supported"),
    MirrordKey("feature.fs.read_write", "supported"),
    MirrordKey("feature.fs.readonly_file_buffer", "ignored",
               "remote files are copied whole into the session's shadow tree and cached by "
               "size and mtime; there is no read buffer to size"),
    MirrordKey("feature.hostname", "differs",
               "default on; uname() nodename (so gethostname) and /etc/hostname, for every libc "
               "and Go, since uname is trapped"),
    MirrordKey("feature.magic", "ignored", "use feature.env.unset and feature.fs.mapping"),
    MirrordKey("feature.magic.aws", "ignored",
               "unset `AWS_*` with feature.env.unset and map ~/.aws with feature.fs.mapping"),
    MirrordKey("feature.network", "supported", "`true`/`false` short forms (outgoing and DNS)"),
    MirrordKey("feature.network.dns", "supported", "`true`/`false` short forms too"),
    MirrordKey("feature.network.dns.enabled", "supported"),
    MirrordKey("feature.network.dns.filter", "differs",
               "names and `*.suffix` patterns; mirrord's address/port forms are not used"),
    MirrordKey("feature.network.incoming", "issue 13", _INCOMING),
    *(MirrordKey(f"feature.network.incoming.{name}", "issue 13", _INCOMING) for name in (
        "http_filter", "http_filter.all_of", "http_filter.any_of", "http_filter.body_filter",
        "http_filter.header_filter", "http_filter.header_filter_jq", "http_filter.method_filter",
        "http_filter.path_filter", "http_filter.ports", "https_delivery", "ignore_localhost",
        "ignore_ports", "listen_ports", "mode", "on_concurrent_steal", "port_mapping", "ports",
        "tls_delivery")),
    MirrordKey("feature.network.ipv6", "ignored",
               "outgoing IPv6 is always handled (connect to [::1] or a v6 address goes to the "
               "target); there is no switch"),
    MirrordKey("feature.network.outgoing", "supported", "`true`/`false` short forms too"),
    MirrordKey("feature.network.outgoing.filter", "supported",
               "`[proto://]host-or-subnet[:port]`, `remote` or `local`"),
    MirrordKey("feature.network.outgoing.ignore_localhost", "supported"),
    MirrordKey("feature.network.outgoing.tcp", "supported"),
    MirrordKey("feature.network.outgoing.udp", "supported"),
    MirrordKey("feature.network.outgoing.unix_streams", "supported",
               "regexes on the socket path (`@name` for an abstract one); stream sockets only, "
               "relative paths stay local"),
    MirrordKey("feature.preview", "ignored", _OPERATOR),
    MirrordKey("feature.split_queues", "ignored", _OPERATOR),
    MirrordKey("internal_proxy", "ignored", _PROXY),
    *(MirrordKey(f"internal_proxy.{name}", "ignored", _PROXY) for name in (
        "idle_timeout", "json_log", "log_destination", "log_level", "process_logging_interval",
        "socket_timeout", "start_idle_timeout")),
    MirrordKey("key", "ignored", "the session key of HTTP filters: " + _INCOMING),
    MirrordKey("kube_context", "issue 10", _K8S),
    MirrordKey("kubeconfig", "issue 10", _K8S),
    MirrordKey("operator", "ignored", _OPERATOR),
    MirrordKey("profile", "ignored", _OPERATOR),
    MirrordKey("sip_binaries", "ignored", _MACOS),
    MirrordKey("skip_build_tools", "ignored",
               "every process of the tree is trapped; run build tools outside mtrace"),
    MirrordKey("skip_extra_build_tools", "ignored",
               "every process of the tree is trapped; run build tools outside mtrace"),
    MirrordKey("skip_processes", "ignored",
               "every process of the tree is trapped (the filter is inherited)"),
    MirrordKey("skip_sip", "ignored", _MACOS),
    MirrordKey("startup_retry", "issue 10", _K8S),
    MirrordKey("startup_retry.max_ms", "issue 10", _K8S),
    MirrordKey("startup_retry.max_retries", "issue 10", _K8S),
    MirrordKey("startup_retry.min_ms", "issue 10", _K8S),
    MirrordKey("target", "differs", "mirrord's `pod/...`, `deployment/...` and the `{path, "
               "namespace}` table, plus mtrace's `pid/N`"),
    MirrordKey("telemetry", "ignored", "mtrace sends no telemetry"),
    MirrordKey("traceparent", "ignored", _OPERATOR),
    MirrordKey("use_proxy", "ignored", "unset HTTP_PROXY/HTTPS_PROXY with feature.env.unset"),
)

BY_KEY = {entry.key: entry for entry in KEYS}

# Keys whose lists mirrord also takes as one `;`-separated string.
_SEMICOLON_LISTS = {"feature.env.include", "feature.env.exclude", "feature.env.unset"}


def _short_form(key: str, value: Any) -> Any:
    """mirrord's short forms of a section, as the section's table."""
    if key == "feature.env" and isinstance(value, bool):
        return {"enabled": value}
    if key == "feature.fs":
        if isinstance(value, bool):
            return {"mode": "read" if value else "local"}
        if isinstance(value, str):
            return {"mode": value}
    if key == "feature.network" and isinstance(value, bool):
        return {"outgoing": value, "dns": value}
    if key == "feature.network.outgoing" and isinstance(value, bool):
        return {"tcp": value, "udp": value}
    if key == "feature.network.dns" and isinstance(value, bool):
        return {"enabled": value}
    return value


def _struct_of(annotation: Any) -> type[msgspec.Struct] | None:
    """The Struct type in a field's type (``X``, ``X | None``), if any."""
    info = msgspec.inspect.type_info(annotation)
    candidates = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    for candidate in candidates:
        if isinstance(candidate, msgspec.inspect.StructType):
            return candidate.cls
    return None


def _takes(annotation: Any, kind: type[msgspec.inspect.Type]) -> bool:
    info = msgspec.inspect.type_info(annotation)
    candidates = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return any(isinstance(candidate, kind) for candidate in candidates)


def _has_key(struct: type[msgspec.Struct], dotted: str) -> bool:
    """Whether the config types take ``dotted`` (``agent.image``)."""
    head, _, rest = dotted.partition(".")
    fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
    if head not in fields:
        return False
    if not rest:
        return True
    inner = _struct_of(fields[head].type)
    return inner is not None and _has_key(inner, rest)


class UnknownKey(Exception):
    """A key inside a mirrord-only section that mirrord does not have either."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def normalise(data: Any, root: type[msgspec.Struct], warn: Callable[[str], None]) -> Any:
    """``data`` (a decoded file) with mirrord's short forms expanded and the
    mirrord keys ``root`` lacks dropped, each named once through ``warn``."""
    if not isinstance(data, dict):
        return data
    return _walk(data, root, "", warn)


def _walk(table: dict[str, Any], struct: type[msgspec.Struct], prefix: str,
          warn: Callable[[str], None]) -> dict[str, Any]:
    fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
    result: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        field = fields.get(name) if isinstance(name, str) else None
        if field is None:
            if key in BY_KEY:
                _drop(key, value, warn)
            else:
                result[name] = value  # msgspec names it as unknown
            continue
        if value is None and not _takes(field.type, msgspec.inspect.NoneType):
            continue  # mirrord's null: the default
        value = _short_form(key, value)
        inner = _struct_of(field.type)
        if inner is not None and isinstance(value, dict):
            value = _walk(value, inner, key + ".", warn)
        elif isinstance(value, str) and _takes(field.type, msgspec.inspect.ListType):
            value = ([part for part in value.split(";") if part]
                     if key in _SEMICOLON_LISTS else [value])
        result[name] = value
    return result


def _drop(key: str, value: Any, warn: Callable[[str], None]) -> None:
    """Warn once for ``key``; inside a section the table lists the keys of,
    name each key set instead, and refuse keys mirrord does not have."""
    children = [entry for entry in KEYS if entry.key.startswith(key + ".")
                and "." not in entry.key[len(key) + 1:]]
    if isinstance(value, dict) and children and value:
        for name, inner in value.items():
            child = f"{key}.{name}"
            if child not in BY_KEY:
                raise UnknownKey(child)
            _drop(child, inner, warn)
        return
    entry = BY_KEY[key]
    warn(f"`{key}` is a mirrord key mtrace ignores: {entry.note or 'not implemented'}")


def markdown_table(root: type[msgspec.Struct]) -> str:
    """The table of docs/mirrord.md; ``root`` is mtrace's config type (the
    Kubernetes and incoming keys are supported where it takes them)."""
    labels = {
        "supported": "supported",
        "differs": "supported differently",
        "ignored": "ignored, with a warning",
    }
    lines = ["| mirrord key | in mtrace | how, or why not |", "| --- | --- | --- |"]
    for entry in sorted(KEYS, key=lambda entry: entry.key):
        status, note = entry.status, entry.note
        if status in ("issue 10", "issue 13"):
            # the Kubernetes and incoming features: what their config types take
            status, note = (("supported", "") if _has_key(root, entry.key)
                            else ("ignored", note))
        note = note.replace("|", "\\|")
        lines.append(f"| `{entry.key}` | {labels[status]} | {note} |")
    return "\n".join(lines) + "\n"
