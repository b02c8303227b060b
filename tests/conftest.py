"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- test programs (tests/programs/, built by tests/programs_build.py) -------
# pytest puts this directory on sys.path (rootdir conftest, no __init__.py).
from programs_build import PROBE_FLAVOURS, BuildError, ProgramPaths, build_programs


@pytest.fixture(scope="session")
def programs() -> ProgramPaths:
    """Every test program, built once per session: name -> path.

    Keys: probe-go, probe-glibc-static, probe-musl, probe-dynamic, httpserve,
    goroutines, httpclient, static-true, chain; `programs.probes` holds the four
    probe flavours. A missing toolchain fails (never skips) with the package to install.
    """
    try:
        return build_programs()
    except BuildError as error:
        message = str(error)
    # Outside the except block, so the report shows only the message.
    pytest.fail(f"building tests/programs failed: {message}", pytrace=False)


@pytest.fixture(params=PROBE_FLAVOURS)
def probe(request: pytest.FixtureRequest, programs: ProgramPaths) -> Path:
    """One probe binary per flavour: the test runs once for each of the four."""
    return programs[request.param]


# --- end of test programs -----------------------------------------------------
