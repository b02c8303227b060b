"""`mtrace exec`'s argv parsed without typer (cli/exec_args.py) reads every
argv as typer does, or leaves it to typer."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import typer.main
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mtrace.cli import app as app_module
from mtrace.cli.exec_args import COUNT, EXEC_DEFAULTS, EXEC_OPTIONS, LIST, VALUE, parse_exec


def _exec_command() -> Any:
    return typer.main.get_command(app_module.app).commands["exec"]  # type: ignore[attr-defined]


def test_the_table_is_execs_options_as_typer_builds_them() -> None:
    expected: dict[str, tuple[str, Any]] = {}
    names = set()
    for param in _exec_command().params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        names.add(param.name)
        if param.count:
            kinds = [(opt, COUNT) for opt in param.opts]
        elif param.is_flag:
            assert param.is_bool_flag, param.name  # a flag of another value: teach exec_args
            kinds = [(opt, True) for opt in param.opts] + [(opt, False) for opt in param.secondary_opts]
        else:
            kinds = [(opt, LIST if param.multiple else VALUE) for opt in param.opts]
        expected.update((opt, (param.name, kind)) for opt, kind in kinds)
    assert expected == EXEC_OPTIONS
    assert set(EXEC_DEFAULTS) == names


def _typer_parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any] | None:
    """What typer passes to run_exec for ``mtrace ARGV``, None if it does not call it."""
    called: list[dict[str, Any]] = []

    def record(command: list[str], **options: Any) -> None:
        called.append({"command": command, **options})
        raise SystemExit(0)

    monkeypatch.setattr(app_module, "run_exec", record)
    result = CliRunner().invoke(app_module.app, argv, prog_name="mtrace")
    assert not called or result.exit_code == 0, result.output
    return called[0] if called else None


PLAIN = [
    ["exec", "true"],
    ["exec", "--", "true", "-v"],
    ["exec", "-t", "pid/1", "--", "prog", "--flag"],
    ["exec", "--target=pid/1", "prog", "-t", "x"],
    ["exec", "-tpid/1", "prog"],
    ["exec", "-t=pid/1", "prog"],  # click: the value is "=pid/1"
    ["exec", "--target", "-q", "prog"],  # the value is "-q"
    ["exec", "--target", "--", "prog"],
    ["exec", "--target=", "prog"],
    ["exec", "-vv", "-q", "-v", "prog"],
    ["exec", "-vq", "prog"],
    ["exec", "--verbose", "--verbose", "prog"],
    ["exec", "-e", "A=1", "--env", "B=2", "-eC=3", "--env-include", "X*", "--env-exclude", "Y",
     "--fs-local", "^/tmp", "--fs-local=^/var", "prog"],
    ["exec", "--no-remote-env", "--steal", "--ignore-localhost", "--no-ignore-localhost", "prog"],
    ["exec", "--incoming", "mirror", "--backend", "ptrace", "-n", "ns", "--context", "c",
     "--kubeconfig", "/k", "-f", "c.toml", "--fs-mode", "write", "--agent", "h:1",
     "--agent-secret", "s", "--agent-secret-file", "/s", "prog", "arg"],
    ["exec", "-t", "pid/1", "-t", "pid/2", "prog"],
    ["exec", "-", "x"],
]

TYPERS_ALONE = [
    ["exec"],
    ["exec", "--"],
    ["exec", "-t"],
    ["exec", "-t", "pid/1"],
    ["exec", "--bogus", "prog"],
    ["exec", "-x", "prog"],
    ["exec", "--help"],
    ["exec", "-h"],
    ["exec", "--steal=yes", "prog"],
    ["exec", "--targ", "pid/1", "prog"],
    ["exec", "-vtpid/1", "prog"],  # valid, but a mixed cluster: typer's to parse
    ["trace", "prog"],
    ["--help"],
    [],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_plain_exec_reads_as_typer_reads_it(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ours = parse_exec(argv, {})
    assert ours is not None
    assert ours == _typer_parse(argv, monkeypatch)


@pytest.mark.parametrize("argv", TYPERS_ALONE, ids=repr)
def test_help_errors_and_the_unusual_are_left_to_typer(argv: list[str]) -> None:
    assert parse_exec(argv, {}) is None


def test_shell_completion_is_left_to_typer() -> None:
    assert parse_exec(["exec", "prog"], {"_MTRACE_COMPLETE": "bash_complete"}) is None


_TOKENS = [*EXEC_OPTIONS, "--", "-", "prog", "a=b", "pid/1", "-vv", "-vq", "-tx", "--env=A=1",
           "--bogus", "-z", "--steal=1", "--target=", "-h"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=8))
def test_any_argv_typer_or_the_same_call(tokens: list[str]) -> None:
    """Whatever the argv: either left to typer, or exactly typer's call."""
    argv = ["exec", *tokens]
    ours = parse_exec(argv, {})
    if ours is None:
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert ours == _typer_parse(argv, monkeypatch), argv


def test_exec_runs_without_importing_typer() -> None:
    """The point of it: a plain `mtrace exec` never imports typer (nor its click)."""
    script = ("import os, runpy, sys\n"
              "exit_now = os._exit\n"
              "def report(status):\n"  # main() ends in os._exit: look at the modules there
              "    print('typer imported:', 'typer' in sys.modules, file=sys.stderr, flush=True)\n"
              "    exit_now(status)\n"
              "os._exit = report\n"
              "sys.argv = ['mtrace', 'exec', '--', 'true']\n"
              "runpy.run_module('mtrace.cli.main', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "typer imported: False" in result.stderr, result.stderr
    # The probe can tell the other way: shell completion goes through typer.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "_MTRACE_COMPLETE": "bash_complete"},
                            timeout=60, check=False)
    assert "typer imported: True" in result.stderr, result.stderr
