"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# --- test programs (tests/programs/, built by tests/programs_build.py) -------
# pytest puts this directory on sys.path (rootdir conftest, no __init__.py).
from loopback import http_server, serve, tcp_echo_server, udp_echo_server
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


# --- loopback servers (tests/loopback.py) ---------------------------------------


@pytest.fixture(scope="session")
def tcp_echo_port() -> Iterator[int]:
    with serve(tcp_echo_server()) as port:
        yield port


@pytest.fixture(scope="session")
def udp_echo_port() -> Iterator[int]:
    with serve(udp_echo_server()) as port:
        yield port


@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("www")
    (root / "hello.txt").write_bytes(b"hello over http\n\x00\xff binary tail")
    return root


@pytest.fixture(scope="session")
def http_port(http_root: Path) -> Iterator[int]:
    with serve(http_server(http_root)) as port:
        yield port


# --- backends -------------------------------------------------------------------


@pytest.fixture(params=["notify", "ptrace"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each trap backend: integration suites run once for each, same expectations."""
    return str(request.param)


# --- the resident mtrace ----------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _no_resident_of_the_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`mtrace exec` in tests runs in-process, never through a resident mtrace
    the user (or another test run) left on the default socket: it would take
    the runs, or exit when another install's command reached it. The socket
    mtrace looks for is one nothing listens on; tests/integration/test_resident.py
    starts its residents on sockets of their own."""
    socket = tmp_path_factory.mktemp("no-resident") / "resident.sock"
    previous = os.environ.get("MTRACE_RESIDENT_SOCKET")
    os.environ["MTRACE_RESIDENT_SOCKET"] = str(socket)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MTRACE_RESIDENT_SOCKET", None)
        else:
            os.environ["MTRACE_RESIDENT_SOCKET"] = previous
