"""The session's signal forwarder: a signal aimed at mtrace reaches the
program even when it came before the program's pid was known (CI once lost a
SIGINT that landed while a Kubernetes session was starting; the program then
ran on for a minute)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a child interpreter: the forwarder blocks signals for the calling
# thread only, and a SIGTERM to pytest itself would stop the whole run.
SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from mtrace.tracer.session import _SignalForwarder

    def unblock():  # as the exec helper does for the tracee
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

    forwarder = _SignalForwarder()
    early = {early}
    if early:
        os.kill(os.getpid(), signal.{name})
        time.sleep(0.3)  # taken by the forwarder while no program exists yet
    program = subprocess.Popen(["sleep", "30"], preexec_fn=unblock)
    forwarder.target = program.pid
    if not early:
        os.kill(os.getpid(), signal.{name})
    try:
        print(program.wait(timeout=10))
    except subprocess.TimeoutExpired:
        program.kill()
        print("still running")
    forwarder.close()
""")


def _program_status(name: str, *, early: bool) -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(name=name, early=early)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_signal_taken_before_the_program_exists_is_delivered_when_it_starts() -> None:
    assert _program_status("SIGTERM", early=True) == "-15"
    assert _program_status("SIGINT", early=True) == "-2"


def test_a_signal_after_the_program_started_is_forwarded() -> None:
    assert _program_status("SIGHUP", early=False) == "-1"
