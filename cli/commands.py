"""What the commands do with their flags, without typer.

`mtrace exec` runs from here without importing typer at all (cli/main.py
parses its argv with cli/exec_args.py): typer and its click cost a run
15-45 ms of start-up (README, Start-up). The typer app (cli/app.py) declares
the commands, for help, errors, completion and every other command.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, NoReturn

from ..agent.errors import MtraceError
from .errors import ConfigError


def configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="mtrace: %(name)s: %(message)s", stream=sys.stderr)


#: Longer quoted values in an error are cut (a 10 MB string in a config is no message).
LONGEST_VALUE = 80
_LONG = "{" + str(LONGEST_VALUE + 1) + ",}"
_QUOTED = re.compile("'([^'\\n]" + _LONG + ")'|\"([^\"\\n]" + _LONG + ")\"")


def shorten(text: str, limit: int = 1000) -> str:
    """``text`` with long quoted values cut to their start and their length,
    and at most ``limit`` characters."""
    def cut(match: re.Match[str]) -> str:
        value = match.group(1) if match.group(1) is not None else match.group(2)
        quote = match.group(0)[0]
        return f"{quote}{value[:LONGEST_VALUE - 20]}{quote}... ({len(value)} characters)"

    text = _QUOTED.sub(cut, text)
    if len(text) > limit:
        text = f"{text[:limit - 60]}... ({len(text) - limit + 60} more characters)"
    return text


def fail(error: MtraceError, verbose: int = 0) -> NoReturn:
    """One line for the user, a hint line if there is one, and a distinct exit code."""
    sys.stderr.write(f"mtrace: error: {shorten(error.message)}\n")
    if error.hint:
        sys.stderr.write(f"mtrace: hint: {shorten(error.hint)}\n")
    if verbose:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    raise SystemExit(error.exit_code)


def apply_kube_flags(config: Any, namespace: str | None, context: str | None,
                      kubeconfig: str | None) -> None:
    from .config import TargetConfig, target_path

    if namespace is not None:
        path, _ = target_path(config)
        config.target = TargetConfig(path=path, namespace=namespace)
    if context is not None:
        config.kube_context = context
    if kubeconfig is not None:
        config.kubeconfig = kubeconfig


def base_config(config_file: str | None, target: str | None, agent: str | None,
                 agent_secret: str | None, agent_secret_file: str | None = None) -> Any:
    """The config file (``-f``, else the first of config.DEFAULT_FILES in the
    current directory, else defaults) with the target flags applied over it."""
    from .config import Config, find_default, load

    found = config_file or find_default()
    config = load(found) if found else Config()
    if target is not None:
        config.target = target
    if agent is not None:
        config.agent.address = agent
    if agent_secret is not None or agent_secret_file is not None:
        # Imported only here: the agent client costs a run without a target ~10 ms.
        from .target import secret_from_flags

        config.agent.secret = secret_from_flags(agent_secret, agent_secret_file)
    return config


def apply_incoming_flags(features: Any, mode: str | None) -> None:
    """--steal / --incoming MODE over feature.network.incoming (a table keeps its other keys)."""
    if mode is None:
        return
    if mode not in ("mirror", "steal", "off"):
        raise ConfigError(f"--incoming {mode}: unknown mode", hint="use mirror, steal or off")
    network = features.network
    if isinstance(network.incoming, str):
        network.incoming = mode
    else:
        network.incoming.mode = mode


def revalidate(config: Any) -> Any:
    """Flags were set as plain attributes: check them against the schema too."""
    import msgspec

    from .config import Config

    try:
        return msgspec.convert(msgspec.to_builtins(config), type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"command line: {exc}".replace("$.", "")) from exc


def run_exec(command: list[str], *, target: str | None = None, agent: str | None = None,
             agent_secret: str | None = None, agent_secret_file: str | None = None,
             config_file: str | None = None, fs_mode: str | None = None,
             local_paths: list[str] | None = None, env_include: list[str] | None = None,
             env_exclude: list[str] | None = None, env_override: list[str] | None = None,
             no_env: bool = False, ignore_localhost: bool | None = None, steal: bool = False,
             incoming: str | None = None, backend: str | None = None,
             namespace: str | None = None, context: str | None = None,
             kubeconfig: str | None = None, verbose: int = 0, quiet: bool = False) -> NoReturn:
    """`mtrace exec`: the flags over the config, then COMMAND run (exits)."""
    from .config import validate
    from .run import run_plain, run_with_target

    configure_logging(verbose)
    try:
        config = base_config(config_file, target, agent, agent_secret, agent_secret_file)
        apply_kube_flags(config, namespace, context, kubeconfig)
        features = config.feature
        if fs_mode is not None:
            features.fs.mode = fs_mode
        if local_paths:
            features.fs.local = [*features.fs.local, *local_paths]
        if env_include:
            features.env.include = [*(features.env.include or []), *env_include]
        if env_exclude:
            features.env.exclude = [*features.env.exclude, *env_exclude]
        for assignment in env_override or []:
            name, separator, value = assignment.partition("=")
            if not separator or not name:
                raise ConfigError(f"--env {assignment}: expected NAME=VALUE")
            features.env.override[name] = value
        if no_env:
            features.env.enabled = False
        if ignore_localhost is not None:
            features.network.outgoing.ignore_localhost = ignore_localhost
        apply_incoming_flags(features, "steal" if steal else incoming)
        if backend is not None:
            config.backend = backend
        config = revalidate(config)
        validate(config, "command line")
        if config.target or config.agent.address:
            code = run_with_target(command, config, verbose=verbose, quiet=quiet)
        else:
            code = run_plain(command, config)
    except MtraceError as error:
        fail(error, verbose)
    raise SystemExit(code)
