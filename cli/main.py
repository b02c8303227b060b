"""The ``mtrace`` command."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Annotated, Any, NoReturn

import typer

from ..agent.errors import MtraceError
from .errors import ConfigError

app = typer.Typer(
    name="mtrace",
    help="Run a local process in the context of a remote environment, by its system calls.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_COMMAND_SETTINGS = {"allow_interspersed_args": False, "ignore_unknown_options": False}

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr.")]
Command = Annotated[list[str], typer.Argument(help="The command to run, after `--`.",
                                              show_default=False)]


def _configure_logging(verbose: int) -> None:
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


Backend = Annotated[str | None, typer.Option(
    "--backend", help="How system calls are trapped: seccomp notify, ptrace, or auto "
                      "(notify, falling back to ptrace where the kernel lacks it).",
    show_default=False)]


TargetOption = Annotated[str | None, typer.Option(
    "--target", "-t", help="Run in this target's context: pid/N or targetless.",
    show_default=False)]
AgentOption = Annotated[str | None, typer.Option(
    "--agent", help="Use the agent listening at HOST:PORT.", show_default=False)]
AgentSecretOption = Annotated[str | None, typer.Option(
    "--agent-secret", help="Shared secret of --agent (visible to every user in ps: prefer "
    "--agent-secret-file or MTRACE_AGENT_SECRET).", show_default=False)]
AgentSecretFileOption = Annotated[str | None, typer.Option(
    "--agent-secret-file", help="Read the shared secret of --agent from this file.",
    show_default=False)]
ConfigFileOption = Annotated[str | None, typer.Option(
    "--config-file", "-f", help="Config file (TOML, JSON or YAML).", show_default=False)]
NamespaceOption = Annotated[str | None, typer.Option(
    "--namespace", "-n", help="Kubernetes namespace of the target.", show_default=False)]
ContextOption = Annotated[str | None, typer.Option(
    "--context", help="kubeconfig context to use.", show_default=False)]
KubeconfigOption = Annotated[str | None, typer.Option(
    "--kubeconfig", help="kubeconfig file (else KUBECONFIG, else ~/.kube/config).",
    show_default=False)]


def _apply_kube_flags(config: Any, namespace: str | None, context: str | None,
                      kubeconfig: str | None) -> None:
    from .config import TargetConfig, target_path

    if namespace is not None:
        path, _ = target_path(config)
        config.target = TargetConfig(path=path, namespace=namespace)
    if context is not None:
        config.kube_context = context
    if kubeconfig is not None:
        config.kubeconfig = kubeconfig


def _base_config(config_file: str | None, target: str | None, agent: str | None,
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


@app.command("exec", context_settings=_COMMAND_SETTINGS)
def exec_command(
    command: Command,
    target: TargetOption = None,
    agent: AgentOption = None,
    agent_secret: AgentSecretOption = None,
    agent_secret_file: AgentSecretFileOption = None,
    config_file: ConfigFileOption = None,
    fs_mode: Annotated[str | None, typer.Option(
        "--fs-mode", help="read, write, local or localwithoverrides.", show_default=False)] = None,
    local_paths: Annotated[list[str] | None, typer.Option(
        "--fs-local", help="Regex of paths kept local (repeatable).", show_default=False)] = None,
    env_include: Annotated[list[str] | None, typer.Option(
        "--env-include", help="Take only target variables matching this glob (repeatable).",
        show_default=False)] = None,
    env_exclude: Annotated[list[str] | None, typer.Option(
        "--env-exclude", help="Leave out target variables matching this glob (repeatable).",
        show_default=False)] = None,
    env_override: Annotated[list[str] | None, typer.Option(
        "--env", "-e", help="Set NAME=VALUE over both sides (repeatable).",
        show_default=False)] = None,
    no_env: Annotated[bool, typer.Option(
        "--no-remote-env", help="Keep the local environment only.")] = False,
    ignore_localhost: Annotated[bool | None, typer.Option(
        "--ignore-localhost/--no-ignore-localhost",
        help="Keep connections to 127.0.0.0/8 and ::1 local.", show_default=False)] = None,
    steal: Annotated[bool, typer.Option(
        "--steal", help="Steal the target's incoming traffic (same as --incoming steal).")] = False,
    incoming: Annotated[str | None, typer.Option(
        "--incoming", help="Incoming traffic: mirror, steal or off.", show_default=False)] = None,
    backend: Backend = None,
    namespace: NamespaceOption = None,
    context: ContextOption = None,
    kubeconfig: KubeconfigOption = None,
    verbose: Verbose = 0,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No start-up summary of what each feature does.")] = False,
) -> None:
    """Run COMMAND under mtrace, in the context of a target if one is given."""
    from .config import validate
    from .run import run_plain, run_with_target

    _configure_logging(verbose)
    try:
        config = _base_config(config_file, target, agent, agent_secret, agent_secret_file)
        _apply_kube_flags(config, namespace, context, kubeconfig)
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
        _apply_incoming_flags(features, "steal" if steal else incoming)
        if backend is not None:
            config.backend = backend
        config = _revalidate(config)
        validate(config, "command line")
        if config.target or config.agent.address:
            code = run_with_target(command, config, verbose=verbose, quiet=quiet)
        else:
            code = run_plain(command, config)
    except MtraceError as error:
        fail(error, verbose)
    raise SystemExit(code)


def _apply_incoming_flags(features: Any, mode: str | None) -> None:
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


@app.command("verify-config")
def verify_config_command(
    config_file: ConfigFileOption = None,
    target: TargetOption = None,
    agent: AgentOption = None,
    fs_mode: Annotated[str | None, typer.Option(
        "--fs-mode", help="read, write, local or localwithoverrides.", show_default=False)] = None,
    backend: Backend = None,
    output: Annotated[str, typer.Option(
        "--format", help="toml or json.", show_default=True)] = "toml",
    verbose: Verbose = 0,
) -> None:
    """Check a config file (mirrord's too) and print the effective config: the
    flags, the file and the defaults merged. Exit 0 if it is good, 78 if not."""
    import json

    import msgspec

    from .config import effective, validate, without_none

    _configure_logging(verbose)
    try:
        if output not in ("toml", "json"):
            raise ConfigError(f"--format {output}: expected toml or json")
        config = _base_config(config_file, target, agent, None)
        if fs_mode is not None:
            config.feature.fs.mode = fs_mode
        if backend is not None:
            config.backend = backend
        config = _revalidate(config)
        validate(config, "command line")
        values = effective(config)
        if output == "json":
            sys.stdout.write(json.dumps(values, indent=2) + "\n")
        else:
            sys.stdout.write(msgspec.toml.encode(without_none(values)).decode())
    except MtraceError as error:
        fail(error, verbose)


@app.command("port-forward")
def port_forward_command(
    forwards: Annotated[list[str], typer.Option(
        "-L", "--local", help="[LOCAL_ADDR:]LOCAL_PORT:HOST:PORT: connections to the local "
        "port are opened to HOST:PORT from the target (repeatable).", show_default=False)],
    target: TargetOption = None,
    agent: AgentOption = None,
    agent_secret: AgentSecretOption = None,
    agent_secret_file: AgentSecretFileOption = None,
    config_file: ConfigFileOption = None,
    verbose: Verbose = 0,
) -> None:
    """Forward local ports to HOST:PORT as seen from the target (HOST resolved by
    the target's DNS), for tools that cannot run under mtrace."""
    import asyncio

    from .config import validate
    from .port_forward import listen, parse_forward, serve
    from .target import connect_agent, parse_target

    _configure_logging(verbose)
    sockets = []
    try:
        parsed = [parse_forward(text) for text in forwards]
        config = _base_config(config_file, target, agent, agent_secret, agent_secret_file)
        config = _revalidate(config)
        validate(config, "command line")
        # Nothing listens here: a Kubernetes agent needs no capability for incoming traffic.
        config.feature.network.incoming = "off"
        resolved = parse_target(config.target) if config.target else None
        if resolved is None and not config.agent.address:
            raise ConfigError("no target", hint="pass --target pid/N or --agent HOST:PORT")
        sockets = [(forward, listen(forward)) for forward in parsed]
        where = config.agent.address or (resolved.describe() if resolved else "")

        async def session() -> int:
            client = await connect_agent(config, resolved, verbose=verbose)
            try:
                return await serve(client, sockets, where)
            finally:
                await client.close()

        code = asyncio.run(session())
    except KeyboardInterrupt:
        code = 130  # Ctrl-C before the listeners were up
    except MtraceError as error:
        fail(error, verbose)
    finally:
        for _, sock in sockets:
            sock.close()
    raise SystemExit(code)


config_app = typer.Typer(help="About the config file.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("schema")
def config_schema_command() -> None:
    """Print the JSON Schema of the config file (for editors: completion, checks)."""
    import json

    from .config import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")


@config_app.command("mirrord-keys")
def config_mirrord_keys_command() -> None:
    """Print every mirrord config key and what mtrace does with it (markdown)."""
    from .config import Config
    from .mirrord import markdown_table

    sys.stdout.write(markdown_table(Config))


def _revalidate(config: Any) -> Any:
    """Flags were set as plain attributes: check them against the schema too."""
    import msgspec

    from .config import Config

    try:
        return msgspec.convert(msgspec.to_builtins(config), type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"command line: {exc}".replace("$.", "")) from exc


@app.command("trace", context_settings=_COMMAND_SETTINGS)
def trace_command(
    command: Command,
    expression: Annotated[str | None, typer.Option(
        "-e", "--trace", help="Comma-separated syscalls to show (default: all mtrace traps).",
    )] = None,
    output: Annotated[str | None, typer.Option("-o", "--output",
                                               help="Write the trace to FILE, not stderr.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    target: TargetOption = None,
    agent: AgentOption = None,
    agent_secret: AgentSecretOption = None,
    agent_secret_file: AgentSecretFileOption = None,
    config_file: ConfigFileOption = None,
    backend: Backend = None,
    namespace: NamespaceOption = None,
    context: ContextOption = None,
    kubeconfig: KubeconfigOption = None,
    verbose: Verbose = 0,
) -> None:
    """Run COMMAND and show each trapped system call, strace-style; with a
    target, as `mtrace exec` runs it there (what it read remotely, where its
    connections went)."""
    from ..tracer.backend import AsyncSide, Handlers
    from ..tracer.passthrough import RESULT_HANDLERS
    from ..tracer.session import Session, run
    from ..tracer.syscalls import DEFAULT_TRAPPED
    from ..tracer.trace import TracePrinter
    from .config import validate
    from .run import run_with_target

    _configure_logging(verbose)
    trapped = DEFAULT_TRAPPED
    if expression:
        trapped = tuple(name.strip() for name in expression.split(",") if name.strip())
    stream = sys.stderr
    try:
        if backend not in (None, "auto", "notify", "ptrace"):
            raise ConfigError(f"--backend {backend}: expected auto, notify or ptrace")
        if output:
            try:
                stream = open(output, "w", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"cannot write the trace to {output}: {exc.strerror}",
                                  hint="-o FILE: give a file in a directory that exists and "
                                       "you can write to") from exc
        printer = TracePrinter(stream, as_json=as_json)
        config = _base_config(config_file, target, agent, agent_secret, agent_secret_file)
        _apply_kube_flags(config, namespace, context, kubeconfig)
        if config.target or config.agent.address:
            if expression:
                from ..tracer.syscalls import table

                table().numbers_for(trapped, strict=True)  # unknown names: a clear error
            if backend is not None:
                config.backend = backend
            config = _revalidate(config)
            validate(config, "command line")
            code = run_with_target(command, config, verbose=verbose, observer=printer,
                                   trapped=trapped if expression else None)
            raise SystemExit(code)
        # The async side answers blocking connects the supervisor makes for the tracee.
        async_side = AsyncSide()
        session = Session(argv=command, handlers=Handlers(RESULT_HANDLERS), trapped=trapped,
                          observer=printer, strict_names=True, backend=backend or "auto",
                          async_side=async_side)
        try:
            code = run(session)
        finally:
            async_side.stop()
    except MtraceError as error:
        fail(error, verbose)
    finally:
        if stream is not sys.stderr:
            stream.close()
    raise SystemExit(code)


@app.command("ls")
def ls_command(
    namespace: NamespaceOption = None,
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", help="List targets in every namespace.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of {path, namespace}.")] = False,
    context: ContextOption = None,
    kubeconfig: KubeconfigOption = None,
    config_file: ConfigFileOption = None,
    verbose: Verbose = 0,
) -> None:
    """List the Kubernetes targets you can name with --target."""
    _configure_logging(verbose)
    try:
        from .config import Config, load, target_path
        from .kube.client import Kube, KubeSettings
        from .kube.listing import run_ls

        config = load(config_file) if config_file else Config()
        _, table_namespace = target_path(config)
        kube = Kube(KubeSettings(kubeconfig or config.kubeconfig, context or config.kube_context,
                                 namespace or table_namespace))
        try:
            code = run_ls(kube, kube.namespace, all_namespaces, as_json, sys.stdout)
        finally:
            kube.close()
    except MtraceError as error:
        fail(error, verbose)
    raise SystemExit(code)


@app.command("demo")
def demo_command(verbose: Verbose = 0) -> None:
    """Run mtrace's main job against a throwaway local target and show the difference."""
    from .demo import run_demo

    _configure_logging(verbose)
    try:
        code = run_demo(verbose=verbose)
    except MtraceError as error:
        fail(error, verbose)
    raise SystemExit(code)


@app.command("doctor")
def doctor_command(verbose: Verbose = 0) -> None:
    """Check the kernel features mtrace relies on."""
    from .doctor import run_checks

    _configure_logging(verbose)
    raise SystemExit(run_checks(sys.stdout))


@app.command("agent", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def agent_command(ctx: typer.Context) -> None:
    """Run the mtrace agent, the remote side (its options: `mtrace agent --help`)."""
    from ..agent.server import main as agent_main

    raise SystemExit(agent_main(list(ctx.args)))


@app.callback()
def _group() -> None:
    # No options of its own: it keeps mtrace a group of commands when main()
    # leaves typer only the invoked one to build (typer makes an app with one
    # command and no callback that command itself).
    pass


def _build_only_the_invoked_command(argv: list[str]) -> None:
    """typer turns every registered command into a click command at every run
    (10-20 ms of start-up for ten commands). When the first argument names a
    command or a group, only that one is registered: the group parses nothing
    before a command's name, so click does the same with what follows. Anything
    else (the group's options, help, a mistyped name, shell completion) keeps
    them all, for the listings and the suggestions."""
    if not argv or any(name.startswith("_") and name.endswith("_COMPLETE") for name in os.environ):
        return
    commands = [info for info in app.registered_commands if info.name == argv[0]]
    groups = [info for info in app.registered_groups if info.name == argv[0]]
    if commands or groups:
        app.registered_commands = commands
        app.registered_groups = groups


def main() -> None:
    try:
        _build_only_the_invoked_command(sys.argv[1:])
        app()
        code: object = 0
    except SystemExit as done:
        code = done.code
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """Exit without the interpreter's finalization: tearing down every module
    mtrace imported took ~200 ms after the program had already exited (measured
    with strace: nothing but CPU between the last syscall and exit_group).
    Everything that must happen at exit happened before: sessions released,
    uploads committed, threads joined by asyncio.run; streams and log handlers
    are flushed here."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): the message on stderr, status 1, as Python does
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            status = status or 1
    os._exit(status & 0xFF)  # as the shell would see sys.exit(status)


if __name__ == "__main__":
    main()
