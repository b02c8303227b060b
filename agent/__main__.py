"""``python -m mtrace.agent``: the agent without the mtrace CLI installed."""

from __future__ import annotations

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
