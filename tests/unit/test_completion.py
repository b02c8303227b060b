"""Shell completion comes from the CLI framework (typer/click) for bash, zsh
and fish: the scripts it prints, and the answers the installed `mtrace`
gives when a shell asks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MTRACE = Path(sys.executable).parent / "mtrace"


def _complete(shell: str, words: str, cword: int) -> list[str]:
    env = {**os.environ, "_MTRACE_COMPLETE": f"complete_{shell}",
           "COMP_WORDS": words, "COMP_CWORD": str(cword), "_TYPER_COMPLETE_ARGS": words}
    completed = subprocess.run([str(MTRACE)], env=env, capture_output=True, timeout=30,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.decode().split()


def test_installed_script_exists() -> None:
    assert MTRACE.is_file(), "pip install -e . puts the mtrace script next to the interpreter"


def test_bash_completes_commands_and_options() -> None:
    assert "exec" in _complete("bash", "mtrace ex", 1)
    assert {"verify-config", "port-forward"} <= set(_complete("bash", "mtrace ", 1))
    assert "--fs-mode" in _complete("bash", "mtrace exec --fs", 2)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_for_each_shell(shell: str) -> None:
    completed = subprocess.run([str(MTRACE), "--show-completion", shell], capture_output=True,
                               timeout=30, check=False)
    assert completed.returncode == 0
    assert "_MTRACE_COMPLETE" in completed.stdout.decode()
