"""The signals mtrace forwards to the program it runs.

A module of its own so that the CLI can block them before it forks the local
agent without importing the session (the tracer's heavier modules load after
the fork, while the agent starts on the other core).
"""

from __future__ import annotations

# _signal, not signal: `mtrace exec` handing its run to the resident process
# imports this module, and signal's enums cost it ~1.5 ms. Plain ints work
# wherever a signal number does.
import _signal

FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
SI_KERNEL = 0x80  # si_code of a signal the terminal sent to the whole process group
