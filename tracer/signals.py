"""The signals mtrace forwards to the program it runs.

A module of its own so that the CLI can block them before it forks the local
agent without importing the session (the tracer's heavier modules load after
the fork, while the agent starts on the other core).
"""

from __future__ import annotations

import signal

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SI_KERNEL = 0x80  # si_code of a signal the terminal sent to the whole process group
