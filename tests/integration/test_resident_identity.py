"""What the resident takes for the same install: one venv is one install,
whichever of its interpreter's names (python, python3, python3.X) ran the
command and which the resident.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _other_name_of_this_interpreter() -> str:
    """Another name, in the same directory, for the interpreter running the tests."""
    here = Path(sys.executable)
    real = here.resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for name in ("python", "python3", version):
        other = here.parent / name
        if other.name != here.name and other.exists() and other.resolve() == real:
            return str(other)
    pytest.fail(f"{here.parent} has no other name for {here.name} (python, python3, {version})")


@pytest.fixture
def socket_env() -> Iterator[dict[str, str]]:
    """The environment of commands that use a resident on a socket of the test's own."""
    directory = tempfile.mkdtemp(prefix="mtrace-rid-")
    env = {key: value for key, value in os.environ.items() if key != "MTRACE_RESIDENT"}
    env["MTRACE_RESIDENT_SOCKET"] = os.path.join(directory, "resident.sock")
    yield env
    subprocess.run([sys.executable, "-m", "mtrace.cli", "resident", "stop"], env=env,
                   capture_output=True, timeout=30, check=False)
    subprocess.run(["rm", "-rf", directory], check=False)


def _runs(env: dict[str, str]) -> str:
    status = subprocess.run([sys.executable, "-m", "mtrace.cli", "resident", "status"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    return status.stdout


@pytest.mark.timeout(120)
def test_resident_takes_a_run_of_the_same_venv_under_another_interpreter_name(
        socket_env: dict[str, str], programs: dict[str, Path]) -> None:
    # The console script's shebang names python3; `python -m mtrace.cli` is
    # often python: both are the same install.
    subprocess.run([sys.executable, "-m", "mtrace.cli", "resident", "start", "--idle", "120"],
                   env=socket_env, check=True, capture_output=True, timeout=60)
    other = _other_name_of_this_interpreter()
    done = subprocess.run([other, "-m", "mtrace.cli", "exec", "--", str(programs["static-true"])],
                          env=socket_env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert " 1 runs " in _runs(socket_env), Path(socket_env["MTRACE_RESIDENT_SOCKET"]).with_name(
        "resident.log").read_text()
