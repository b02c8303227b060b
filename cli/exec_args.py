"""`mtrace exec`'s argv parsed without typer, for the start-up of the command
users run most.

Only argv that typer would accept as they are: every option known, a value
after each option that takes one, a COMMAND. Anything else (help, a typo, a
missing value or COMMAND, shell completion, a cluster of short options mixing
flags and values) returns None, and the typer app parses it, so help and
every error read as they always have. ``EXEC_OPTIONS`` repeats the option
names of cli/app.py's ``exec_command``; tests/unit/test_exec_args.py checks
them against the command typer builds and this parse against typer's.
"""

from __future__ import annotations

# For annotations only, as in cli/main.py (typing costs a bare interpreter 5-20 ms).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

#: What an option does with the arguments: takes one value (the last given
#: wins), takes one value per use (a list), counts, or sets a constant.
VALUE, LIST, COUNT = "value", "list", "count"

EXEC_OPTIONS: dict[str, tuple[str, Any]] = {
    "--target": ("target", VALUE), "-t": ("target", VALUE),
    "--agent": ("agent", VALUE),
    "--agent-secret": ("agent_secret", VALUE),
    "--agent-secret-file": ("agent_secret_file", VALUE),
    "--config-file": ("config_file", VALUE), "-f": ("config_file", VALUE),
    "--fs-mode": ("fs_mode", VALUE),
    "--fs-local": ("local_paths", LIST),
    "--env-include": ("env_include", LIST),
    "--env-exclude": ("env_exclude", LIST),
    "--env": ("env_override", LIST), "-e": ("env_override", LIST),
    "--no-remote-env": ("no_env", True),
    "--ignore-localhost": ("ignore_localhost", True),
    "--no-ignore-localhost": ("ignore_localhost", False),
    "--steal": ("steal", True),
    "--incoming": ("incoming", VALUE),
    "--backend": ("backend", VALUE),
    "--namespace": ("namespace", VALUE), "-n": ("namespace", VALUE),
    "--context": ("context", VALUE),
    "--kubeconfig": ("kubeconfig", VALUE),
    "--verbose": ("verbose", COUNT), "-v": ("verbose", COUNT),
    "--quiet": ("quiet", True), "-q": ("quiet", True),
}

#: What typer passes for an option not given.
EXEC_DEFAULTS: dict[str, Any] = {
    "target": None, "agent": None, "agent_secret": None, "agent_secret_file": None,
    "config_file": None, "fs_mode": None, "local_paths": None, "env_include": None,
    "env_exclude": None, "env_override": None, "no_env": False, "ignore_localhost": None,
    "steal": False, "incoming": None, "backend": None, "namespace": None, "context": None,
    "kubeconfig": None, "verbose": 0, "quiet": False,
}


def parse_exec(argv: list[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The keyword arguments of commands.run_exec for ``mtrace ARGV``, or None
    when ARGV is not a plain `exec` (typer handles it)."""
    if argv[:1] != ["exec"] or completing(environ):
        return None
    options = dict(EXEC_DEFAULTS)
    rest = argv[1:]
    index = 0
    while index < len(rest):
        arg = rest[index]
        index += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            index -= 1  # COMMAND starts here; what follows is its own
            break
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            action = EXEC_OPTIONS.get(name)
            if action is None:
                return None
            if equals:
                if action[1] not in (VALUE, LIST):
                    return None  # click: "option does not take a value"
            elif action[1] in (VALUE, LIST):
                if index == len(rest):
                    return None  # click: "requires an argument"
                value = rest[index]
                index += 1
            _apply(options, action, value)
            continue
        # Short options: one that takes a value, its value attached or next;
        # or a run of flags (-vv, -vq).
        first = EXEC_OPTIONS.get(arg[:2])
        if first is None:
            return None
        if first[1] in (VALUE, LIST):
            if len(arg) > 2:
                value = arg[2:]
            elif index == len(rest):
                return None
            else:
                value = rest[index]
                index += 1
            _apply(options, first, value)
            continue
        actions = [EXEC_OPTIONS.get(f"-{letter}") for letter in arg[1:]]
        if any(action is None or action[1] in (VALUE, LIST) for action in actions):
            return None
        for action in actions:
            assert action is not None
            _apply(options, action, "")
    command = rest[index:]
    if not command:
        return None  # click: "Missing argument 'COMMAND...'"
    return {"command": command, **options}


def _apply(options: dict[str, Any], action: tuple[str, Any], value: str) -> None:
    key, kind = action
    if kind == VALUE:
        options[key] = value
    elif kind == LIST:
        options[key] = [*(options[key] or []), value]
    elif kind == COUNT:
        options[key] += 1
    else:
        options[key] = kind


def completing(environ: Mapping[str, str]) -> bool:
    """Shell completion (typer's _MTRACE_COMPLETE) is typer's to answer."""
    return any(name.startswith("_") and name.endswith("_COMPLETE") for name in environ)
