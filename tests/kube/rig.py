#!/usr/bin/env python3
"""mtrace's test cluster: a real single-node Kubernetes 1.20 on this machine.

    python3 tests/kube/rig.py up          # build once (cached), start, wait for the node
    python3 tests/kube/rig.py down        # stop everything, undo every machine change
    python3 tests/kube/rig.py status      # components, API, node (exit 0 when healthy)
    python3 tests/kube/rig.py kubeconfig  # print the admin kubeconfig's path
    python3 tests/kube/rig.py images      # (re)build the images into the running rig

Needs root. Exit codes: 0 ok, 1 the rig failed (message on stderr), 3 not up.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kube import cluster, images
from kube.common import CACHE_DIR, KUBECONFIG, RigError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_UP = 3


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down", "status", "kubeconfig", "images", "leftovers"):
        print(__doc__, file=sys.stderr)
        return EXIT_USAGE
    command = argv[0]
    try:
        if command == "up":
            timings: dict[str, float] = {}
            started = time.monotonic()
            cluster.up(timings)
            timings["total"] = time.monotonic() - started
            print("rig timings: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
            print(KUBECONFIG)
        elif command == "down":
            cluster.down()
            left = cluster.leftovers()
            if left:
                print("left behind:\n  " + "\n  ".join(left), file=sys.stderr)
                return EXIT_FAILED
        elif command == "status":
            current = cluster.status()
            current["cache"] = str(CACHE_DIR)
            print(json.dumps(current, indent=1))
            return 0 if cluster.healthy() else EXIT_NOT_UP
        elif command == "kubeconfig":
            if not cluster.healthy():
                print("rig: not up (run `python3 tests/kube/rig.py up`)", file=sys.stderr)
                return EXIT_NOT_UP
            print(KUBECONFIG)
        elif command == "images":
            images.ensure_images()
            print(json.dumps(images.all_images(), indent=1))
        elif command == "leftovers":
            left = cluster.leftovers()
            print("\n".join(left))
            return EXIT_FAILED if left else 0
    except RigError as error:
        print(f"rig: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
