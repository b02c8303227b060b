"""Redirect rules in the target's network namespace: who takes a stolen port.

A steal redirects new TCP connections to the target's port P (from other hosts:
``prerouting``; from inside the namespace itself: ``output``) to the agent's
listener for P. The rules live in one table (nftables: ``table inet
mtrace_<pid>``; iptables where nft is missing: chains ``MTRACE_<pid>`` in the
``nat`` tables of iptables and ip6tables, jumped to from PREROUTING and
OUTPUT) named after the agent's pid and the client session (``mtrace_<pid>_<n>``),
so whose rules they are is plain.

The agent's own connections to the target's port (requests a filtered steal
leaves to the target) carry the socket mark :data:`AGENT_MARK` and are never
redirected. They leave from the real client's address (``IP_TRANSPARENT``),
so the target's process sees its real peer; the target's answers to that
address must then come back to the agent, not go out to the client: the
table's ``route`` chain copies the mark to each such connection (``ct mark``)
and back onto its reply packets, and a policy rule (``ip rule fwmark
AGENT_MARK lookup`` :data:`ROUTE_TABLE`, whose only route is ``local default
dev lo``) delivers marked packets locally. The rule and the route are shared
by every mtrace table of the namespace: added with the first, removed with the
last (by the session's end, the watchdog, or the sweep).

Every change rewrites the whole table in one ``nft -f`` transaction. Removing
the table gives the port back at once to new connections (connections already
redirected keep their conntrack entry and end normally).

Rules never outlive the agent:

* a watchdog process (``python -m mtrace.agent.redirect watchdog ...``, started
  with the first rule, in its own session) waits on a pipe the agent holds; when
  the agent exits in any way, SIGKILL included, the pipe closes and the watchdog
  removes the table within milliseconds;
* and each agent, before adding rules, removes mtrace tables whose owner pid is
  dead (a watchdog that was killed too).

Needs NET_ADMIN in the namespace (and the ``nft`` or ``iptables`` command).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from .errors import AgentError

#: "mtrc": the mark on the agent's own connections to a stolen port.
AGENT_MARK = 0x6D747263
#: The routing table (and the rule's priority) that delivers marked answers locally.
ROUTE_TABLE = 0x6D74
TABLE_PREFIX = "mtrace_"
_TABLE_LINE = re.compile(rf"^table inet ({TABLE_PREFIX}(\d+)_\d+)$")
_CHAIN_LINE = re.compile(r"^:(MTRACE_(\d+)_\d+) ")
#: One table per client session of an agent (an agent started with --listen serves several).
_sessions = itertools.count(1)
COMMAND_TIMEOUT = 10.0

NEEDS_NET_ADMIN = (
    "the agent needs NET_ADMIN and NET_RAW in the target's network namespace for incoming "
    "traffic"
)


class RedirectError(AgentError):
    pass


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)


def _failed(what: str, result: subprocess.CompletedProcess[str]) -> RedirectError:
    detail = (result.stderr or result.stdout).strip().splitlines()
    text = detail[-1] if detail else f"exit status {result.returncode}"
    if "Operation not permitted" in text or "Permission denied" in text:
        return RedirectError(f"{what}: {NEEDS_NET_ADMIN} ({text})",
                             hint="run the agent as root or give it CAP_NET_ADMIN and CAP_NET_RAW")
    return RedirectError(f"{what}: {text}")


def _owner_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"mtrace" in file.read()
    except OSError:
        return False


class Redirector:
    """This agent's redirect table (see the module docstring)."""

    def __init__(self, backend: str | None = None, owner: int | None = None) -> None:
        self.owner = owner if owner is not None else os.getpid()
        if backend is None:
            backend = "nft" if shutil.which("nft") else "iptables" if shutil.which("iptables") \
                else ""
        if not backend:
            raise RedirectError("neither nft nor iptables is installed where the agent runs",
                                hint="install nftables (or iptables) in the agent's image")
        self.backend = backend
        session = next(_sessions)
        self.name = (f"{TABLE_PREFIX}{self.owner}_{session}" if backend == "nft"
                     else f"MTRACE_{self.owner}_{session}")
        self._ports: dict[int, int] = {}
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._installed = False
        #: The agent's connections to the target may take the client's address
        #: (nft only: the ``route`` chain; see the module docstring).
        self.local_routing = False

    # -- the rules --

    def set(self, port: int, to_port: int) -> None:
        self._apply({**self._ports, port: to_port})

    def remove(self, port: int) -> None:
        if port not in self._ports:
            return
        ports = dict(self._ports)
        del ports[port]
        self._apply(ports)

    def close(self) -> None:
        """Remove every rule (the end of the session)."""
        if self._installed:
            with contextlib.suppress(RedirectError, OSError, subprocess.SubprocessError):
                delete_table(self.backend, self.name)
            self._installed = False
            if self.local_routing:
                remove_local_routing_if_unused(self.backend)
                self.local_routing = False
        self._ports = {}
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                assert self._watchdog.stdin is not None
                self._watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
            self._watchdog = None

    def _apply(self, ports: Mapping[int, int]) -> None:
        if not self._installed:
            sweep_stale(self.backend)
            self._start_watchdog()
        if self.backend == "nft":
            route = self.local_routing or not self._installed
            result = _run(["nft", "-f", "-"], stdin=nft_script(self.name, ports, route=route))
            if result.returncode != 0 and route:
                # A kernel without nftables' route chains (or conntrack marks):
                # steal all the same, the target sees the agent's address.
                route = False
                result = _run(["nft", "-f", "-"], stdin=nft_script(self.name, ports, route=False))
            if result.returncode != 0:
                raise _failed("cannot install the redirect rules (nft)", result)
            if not self._installed and route:
                self.local_routing = add_local_routing()
        else:
            self._apply_iptables(ports)
        self._installed = True
        self._ports = dict(ports)

    def _apply_iptables(self, ports: Mapping[int, int]) -> None:
        for command in ("iptables", "ip6tables"):
            if command == "ip6tables" and not shutil.which(command):
                continue
            result = _run([f"{command}-restore", "--noflush"],
                          stdin=iptables_script(self.name, ports, first=not self._installed))
            if result.returncode != 0:
                raise _failed(f"cannot install the redirect rules ({command})", result)

    def _start_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "mtrace.agent.redirect", "watchdog", self.backend, self.name],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)


def nft_script(name: str, ports: Mapping[int, int], *, route: bool = True) -> str:
    """One transaction: the table emptied (created if missing) and refilled;
    ``route``: with the chain that marks the agent's transparent connections."""
    rules = "".join(
        f"    tcp dport {port} meta mark != {AGENT_MARK:#x} redirect to :{to_port}\n"
        for port, to_port in sorted(ports.items()))
    return (f"add table inet {name}\ndelete table inet {name}\n"
            f"table inet {name} {{\n"
            f"  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n"
            f"{rules}  }}\n"
            f"  chain output {{\n    type nat hook output priority -100; policy accept;\n"
            f"{rules}  }}\n"
            + (f"  chain route {{\n    type route hook output priority mangle; policy accept;\n"
               f"    meta mark {AGENT_MARK:#x} ct mark set {AGENT_MARK:#x}\n"
               f"    ct direction reply ct mark {AGENT_MARK:#x} meta mark set {AGENT_MARK:#x}\n"
               f"  }}\n" if route else "")
            + "}\n")


def iptables_script(name: str, ports: Mapping[int, int], *, first: bool) -> str:
    lines = ["*nat", f":{name} - [0:0]", f"-F {name}"]
    lines += [f"-A {name} -p tcp --dport {port} -m mark ! --mark {AGENT_MARK:#x} "
              f"-j REDIRECT --to-ports {to_port}" for port, to_port in sorted(ports.items())]
    if first:
        lines += [f"-I PREROUTING -j {name}", f"-I OUTPUT -j {name}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def add_local_routing() -> bool:
    """The policy rule and route that bring the target's answers to the agent's
    transparent connections back to it (see the module docstring); False
    where they cannot be set (no ``ip`` command, no NET_ADMIN)."""
    if not shutil.which("ip"):
        return False
    for family in ("-4", "-6"):
        if family == "-6" and not os.path.exists("/proc/net/if_inet6"):
            continue
        rules = _run(["ip", family, "rule", "show", "pref", str(ROUTE_TABLE)])
        if rules.returncode != 0:
            return False
        if "lookup" not in rules.stdout:
            added = _run(["ip", family, "rule", "add", "pref", str(ROUTE_TABLE), "fwmark",
                          f"{AGENT_MARK:#x}", "lookup", str(ROUTE_TABLE)])
            if added.returncode != 0:
                return False
        route = _run(["ip", family, "route", "replace", "local",
                      "0.0.0.0/0" if family == "-4" else "::/0", "dev", "lo",
                      "table", str(ROUTE_TABLE)])
        if route.returncode != 0:
            return False
    return True


def remove_local_routing() -> None:
    if not shutil.which("ip"):
        return
    for family in ("-4", "-6"):
        while _run(["ip", family, "rule", "del", "pref", str(ROUTE_TABLE)]).returncode == 0:
            pass
        _run(["ip", family, "route", "flush", "table", str(ROUTE_TABLE)])


def remove_local_routing_if_unused(backend: str) -> None:
    """Remove the shared rule and route once no mtrace table is left."""
    with contextlib.suppress(RedirectError, OSError, subprocess.SubprocessError):
        if not _mtrace_tables(backend):
            remove_local_routing()


def _mtrace_tables(backend: str) -> list[tuple[str, int]]:
    if backend == "nft":
        listing = _run(["nft", "list", "tables"])
        if listing.returncode != 0:
            raise _failed("cannot list the nftables tables", listing)
        return [(match.group(1), int(match.group(2))) for line in listing.stdout.splitlines()
                if (match := _TABLE_LINE.match(line.strip()))]
    listing = _run(["iptables-save", "-t", "nat"])
    if listing.returncode != 0:
        raise _failed("cannot list the iptables rules", listing)
    return [(match.group(1), int(match.group(2))) for line in listing.stdout.splitlines()
            if (match := _CHAIN_LINE.match(line))]


def delete_table(backend: str, name: str) -> None:
    if backend == "nft":
        result = _run(["nft", "-f", "-"], stdin=f"add table inet {name}\ndelete table inet {name}\n")
        if result.returncode != 0:
            raise _failed("cannot remove the redirect rules (nft)", result)
        return
    for command in ("iptables", "ip6tables"):
        if not shutil.which(command):
            continue
        for chain in ("PREROUTING", "OUTPUT"):
            while _run([command, "-t", "nat", "-D", chain, "-j", name]).returncode == 0:
                pass
        _run([command, "-t", "nat", "-F", name])
        _run([command, "-t", "nat", "-X", name])


def sweep_stale(backend: str) -> list[str]:
    """Remove the tables of agents that are gone; their names."""
    removed: list[str] = []
    for name, pid in _mtrace_tables(backend):
        if pid != os.getpid() and not _owner_alive(pid):
            with contextlib.suppress(RedirectError):
                delete_table(backend, name)
                removed.append(name)
    return removed


def _watchdog(backend: str, name: str) -> None:
    """Wait for the agent (our stdin's writer) to go, then remove its table."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    with contextlib.suppress(Exception):
        delete_table(backend, name)
    remove_local_routing_if_unused(backend)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watchdog":
        _watchdog(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m mtrace.agent.redirect watchdog nft|iptables NAME")
