"""A weak shared secret is refused (issue 14: `--secret x` was accepted silently)."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from mtrace.agent.secret import MIN_SECRET_BITS, estimated_bits, weakness


@pytest.mark.parametrize(
    "weak", ["x", "s", "module-secret", "password123", "a" * 64, "ab" * 40, secrets.token_hex(12)]
)
def test_short_or_repetitive_secrets_are_weak(weak: str) -> None:
    assert estimated_bits(weak) < MIN_SECRET_BITS
    problem = weakness(weak)
    assert problem is not None and "too weak" in problem


@pytest.mark.parametrize("strong", [secrets.token_hex(16), secrets.token_hex(32), "Uibdqxo6qjHilWmCDrUFnA=="])
def test_generated_secrets_are_strong_enough(strong: str) -> None:
    assert weakness(strong) is None


def _agent(*argv: str, secret: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtrace.agent", *argv, "--secret", secret],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_a_listening_agent_refuses_a_weak_secret_and_says_how_to_make_one() -> None:
    result = _agent("--listen", "127.0.0.1:0", secret="x")
    assert result.returncode == 71
    assert "mtrace agent: error: the shared secret is too weak" in result.stderr
    assert "hint: generate one with `openssl rand -hex 16`" in result.stderr
    assert "LISTENING" not in result.stdout
