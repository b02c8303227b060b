"""The CLI builds only the command it runs (start-up), and says the same as
when it builds them all."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Each case runs in its own interpreter: building only one command changes the
# app for the rest of the process, as it does in a real run.
COMPARE = """
import sys
import typer.main
from typer.testing import CliRunner
from mtrace.cli import app

argv = sys.argv[1:]
runner = CliRunner()
every = runner.invoke(app.app, argv, prog_name="mtrace",
                      terminal_width=100)
app._build_only_the_invoked_command(argv)
built = typer.main.get_command(app.app)
alone = runner.invoke(app.app, argv, prog_name="mtrace", terminal_width=100)
print(sorted(built.commands))
assert (alone.exit_code, alone.output) == (every.exit_code, every.output), (every.output,
                                                                            alone.output)
"""

CASES = [
    ["exec", "--help"],
    ["exec"],
    ["exec", "--bogus", "--", "true"],
    ["exec", "--incoming", "bad", "--", "true"],
    ["trace", "--help"],
    ["verify-config", "--help"],
    ["port-forward", "--help"],
    ["ls", "--help"],
    ["doctor", "--help"],
    ["config", "--help"],
    ["config", "schema", "--help"],
]


@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_a_command_built_alone_says_what_it_says_among_all(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", COMPARE, *argv], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # Only the invoked one was built, and mtrace stayed a group of commands
    # (typer makes a lone command the whole app: `exec` would become its argument).
    assert result.stdout.split("\n")[0] == repr([argv[0]])


@pytest.mark.parametrize("argv", [["--help"], ["exc", "--", "true"], []], ids=repr)
def test_anything_but_a_command_name_builds_every_command(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", COMPARE, *argv], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "'exec'" in result.stdout and "'doctor'" in result.stdout and "'config'" in result.stdout
