"""Build step for the C exec helper.

The helper is a standalone executable, not a Python extension: it must exec the
tracee, so it cannot live inside the interpreter. It is compiled here, at install
time, and shipped inside the ``mtrace.tracer`` package; nothing compiles at run time.
"""

from __future__ import annotations

import os

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
        self._helper_output = os.path.join(out_dir, HELPER_NAME)

    def get_outputs(self) -> list[str]:
        outputs = super().get_outputs()
        helper = getattr(self, "_helper_output", None)
        return [*outputs, helper] if helper else outputs


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildHelper})
