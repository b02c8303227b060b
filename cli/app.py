"""The ``mtrace`` command as typer declares it: every command, its help, its
errors and shell completion. cli/main.py runs `exec` without it when its
argv is plain (cli/exec_args.py)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..agent.errors import MtraceError
from .commands import apply_kube_flags, base_config, configure_logging, fail, revalidate, run_exec
from .errors import ConfigError
from .exec_args import completing

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
    run_exec(command, target=target, agent=agent, agent_secret=agent_secret,
             agent_secret_file=agent_secret_file, config_file=config_file, fs_mode=fs_mode,
             local_paths=local_paths, env_include=env_include, env_exclude=env_exclude,
             env_override=env_override, no_env=no_env, ignore_localhost=ignore_localhost,
             steal=steal, incoming=incoming, backend=backend, namespace=namespace,
             context=context, kubeconfig=kubeconfig, verbose=verbose, quiet=quiet)


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

    configure_logging(verbose)
    try:
        if output not in ("toml", "json"):
            raise ConfigError(f"--format {output}: expected toml or json")
        config = base_config(config_file, target, agent, None)
        if fs_mode is not None:
            config.feature.fs.mode = fs_mode
        if backend is not None:
            config.backend = backend
        config = revalidate(config)
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

    configure_logging(verbose)
    sockets = []
    try:
        parsed = [parse_forward(text) for text in forwards]
        config = base_config(config_file, target, agent, agent_secret, agent_secret_file)
        config = revalidate(config)
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

    configure_logging(verbose)
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
        config = base_config(config_file, target, agent, agent_secret, agent_secret_file)
        apply_kube_flags(config, namespace, context, kubeconfig)
        if config.target or config.agent.address:
            if expression:
                from ..tracer.syscalls import table

                table().numbers_for(trapped, strict=True)  # unknown names: a clear error
            if backend is not None:
                config.backend = backend
            config = revalidate(config)
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
    configure_logging(verbose)
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

    configure_logging(verbose)
    try:
        code = run_demo(verbose=verbose)
    except MtraceError as error:
        fail(error, verbose)
    raise SystemExit(code)


@app.command("doctor")
def doctor_command(verbose: Verbose = 0) -> None:
    """Check the kernel features mtrace relies on."""
    from .doctor import run_checks

    configure_logging(verbose)
    raise SystemExit(run_checks(sys.stdout))


@app.command("agent", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def agent_command(ctx: typer.Context) -> None:
    """Run the mtrace agent, the remote side (its options: `mtrace agent --help`)."""
    from ..agent.server import main as agent_main

    raise SystemExit(agent_main(list(ctx.args)))


resident_app = typer.Typer(
    help="A resident mtrace that holds its imports, so `mtrace exec` starts sooner.",
    no_args_is_help=True)
app.add_typer(resident_app, name="resident")


@resident_app.command("start")
def resident_start_command(
    idle: Annotated[float, typer.Option(
        "--idle", help="Exit after this many seconds without a run (0: never).")] = 3600.0,
    foreground: Annotated[bool, typer.Option(
        "--foreground", help="Run in this terminal until stopped, its log on stderr.")] = False,
) -> None:
    """Start the resident mtrace for this user (`mtrace exec` then hands it its runs)."""
    from .resident import socket_path
    from .resident_server import Resident, ResidentError, start

    path = socket_path()
    try:
        if foreground:
            raise SystemExit(Resident(path, idle).serve())
        line = start(path, idle)
    except ResidentError as error:
        sys.stderr.write(f"mtrace: error: cannot start the resident mtrace: {error}\n"
                         "mtrace: hint: `mtrace exec` works without it; see README, Start-up\n")
        raise SystemExit(72) from None
    sys.stdout.write(line + "\n")


@resident_app.command("stop")
def resident_stop_command() -> None:
    """Stop the resident mtrace (runs it already started go on)."""
    from .resident import socket_path
    from .resident_server import stop

    pid = stop(socket_path())
    sys.stdout.write(f"stopped the resident mtrace (pid {pid})\n" if pid is not None
                     else "no resident mtrace runs\n")


@resident_app.command("status")
def resident_status_command() -> None:
    """Whether a resident mtrace runs (exit 0) or not (exit 1)."""
    import time

    from .resident import socket_path
    from .resident_server import ask

    path = socket_path()
    answer = ask(path, {"op": "status"})
    if answer is None:
        sys.stdout.write(f"no resident mtrace runs (socket {path})\n")
        raise SystemExit(1)
    idle = f"exits after {answer['idle']:.0f} s idle" if answer["idle"] else "never exits idle"
    sys.stdout.write(
        f"resident mtrace pid {answer['pid']}, up {time.time() - answer['since']:.0f} s, "
        f"{answer['runs']} runs ({answer['running']} running), {idle}; socket {path}\n")


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
    if not argv or completing(os.environ):
        return
    commands = [info for info in app.registered_commands if info.name == argv[0]]
    groups = [info for info in app.registered_groups if info.name == argv[0]]
    if commands or groups:
        app.registered_commands = commands
        app.registered_groups = groups


def run() -> None:
    """Everything but a plain `mtrace exec`: typer parses sys.argv."""
    _build_only_the_invoked_command(sys.argv[1:])
    app()
