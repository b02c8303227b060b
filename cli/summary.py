"""The start-up summary: one line per feature saying what it does in this run,
as mirrord prints when a session starts. Shown on a terminal; ``-q`` hides it;
when stderr is not a terminal only ``-v`` shows it."""

from __future__ import annotations

import sys

from .config import Config


def _list(patterns: list[str]) -> str:
    return ", ".join(patterns)


def _env(config: Config) -> str:
    env = config.feature.env
    if not env.enabled:
        text = "local only (the target's variables are not taken)"
    elif env.include is not None:
        text = f"the target's {_list(env.include)}"
    else:
        text = "all of the target's"
    if env.enabled and env.exclude:
        text += f" except {_list(env.exclude)}"
    if env.enabled:
        text += f"; {_list(env.keep_local)} kept local" if env.keep_local else ""
    extras = []
    if env.env_file:
        extras.append(f"{env.env_file} over them")
    if env.override:
        extras.append(f"{len(env.override)} overridden")
    if env.mapping:
        extras.append(f"{len(env.mapping)} mapping rule(s)")
    if env.unset:
        extras.append(f"unset {_list(env.unset)}")
    return text + ("; " + "; ".join(extras) if extras else "")


_FS_MODES = {
    "read": "read: reads from the target, writes stay local",
    "write": "write: reads and writes go to the target",
    "local": "local: every file is this machine's",
    "localwithoverrides": "localwithoverrides: local, except the paths listed for the target",
}


def _fs(config: Config) -> str:
    fs = config.feature.fs
    text = _FS_MODES[fs.mode]
    counts = [f"{len(getattr(fs, name))} {name}" for name in
              ("read_only", "read_write", "local", "not_found", "mapping") if getattr(fs, name)]
    return text + (f" ({', '.join(counts)})" if counts else "")


def _incoming(config: Config) -> str:
    incoming = config.feature.network.incoming_config
    if incoming.mode == "off":
        return "off: bind, listen and accept stay local"
    what = ("the program answers instead of the target" if incoming.mode == "steal"
            else "the program gets a copy, the target answers")
    if incoming.mode == "steal" and incoming.http_filter is not None:
        what = "matching HTTP requests go to the program, the rest to the target"
    return f"{incoming.mode} ({what}) on the ports the program listens on"


def _outgoing(config: Config) -> str:
    outgoing = config.feature.network.outgoing
    protocols = [name for name in ("tcp", "udp") if getattr(outgoing, name)]
    if not protocols:
        return "off: every connection is made from this machine"
    text = f"{' and '.join(protocols)} connections leave from the target"
    if outgoing.ignore_localhost:
        text += ", except to localhost"
    if outgoing.filter and outgoing.filter.remote is not None:
        text += f", only to {_list(outgoing.filter.remote)}"
    elif outgoing.filter and outgoing.filter.local is not None:
        text += f", except to {_list(outgoing.filter.local)}"
    return text


def _dns(config: Config) -> str:
    dns = config.feature.network.dns
    if not dns.enabled:
        return "off: names are resolved by this machine"
    text = "names are resolved by the target"
    if dns.filter and dns.filter.remote is not None:
        text += f", only {_list(dns.filter.remote)}"
    elif dns.filter and dns.filter.local is not None:
        text += f", except {_list(dns.filter.local)}"
    return text


def feature_lines(config: Config, where: str, hostname: str | None) -> list[str]:
    """What each feature does in this run, one line each."""
    if not config.feature.hostname:
        host = "this machine's"
    else:
        host = f"the target's ({hostname})" if hostname else "this machine's (the agent did not say)"
    return [
        f"target: {where}",
        f"env: {_env(config)}",
        f"fs: {_fs(config)}",
        f"incoming: {_incoming(config)}",
        f"outgoing: {_outgoing(config)}",
        f"dns: {_dns(config)}",
        f"hostname: {host}",
    ]


def show(lines: list[str], *, verbose: int, quiet: bool) -> None:
    if quiet or not (verbose or sys.stderr.isatty()):
        return
    for line in lines:
        sys.stderr.write(f"mtrace: {line}\n")
    sys.stderr.flush()
