"""The shared secret: is it strong enough, and keeping it out of ``/proc``.

The secret keys the handshake and the channel, and a handshake seen on the
network lets anyone test guesses offline, as fast as they can compute HMACs.
So a secret must carry at least :data:`MIN_SECRET_BITS` bits, estimated from
its length and the kinds of characters in it (a random hex string gives 4 bits
a character, a random base64 string 6). Generate one with::

    openssl rand -hex 16        or        python3 -c 'import secrets; print(secrets.token_hex(16))'

``/proc/PID/environ`` and ``/proc/PID/cmdline`` show the environment and
arguments the process *started* with (the kernel reads them from the process's
memory), whatever ``os.environ`` says later; :func:`scrub_from_proc` overwrites
the secret there.
"""

from __future__ import annotations

import math
import string
from typing import Final

#: 16 bytes: what ``secrets.token_hex(16)`` gives.
MIN_SECRET_BITS: Final = 128
GENERATE_HINT: Final = (
    "generate one with `openssl rand -hex 16` or "
    "`python3 -c 'import secrets; print(secrets.token_hex(16))'`"
)

_PUNCTUATION_AND_SPACE = len(string.punctuation) + 1
_LOWER_HEX = frozenset("0123456789abcdef")
_UPPER_HEX = frozenset("0123456789ABCDEF")


def estimated_bits(secret: str) -> float:
    """Bits of entropy the secret can have at most, judging by its characters.

    Generous to random strings, harsh to repetitive ones: a secret of fewer than
    eight different characters counts as if it had only that many symbols.
    """
    if not secret:
        return 0.0
    characters = set(secret)
    if characters <= _LOWER_HEX or characters <= _UPPER_HEX:
        pool = 16
    else:
        pool = 0
        if any(character.isdigit() for character in secret):
            pool += 10
        if any(character.islower() for character in secret):
            pool += 26
        if any(character.isupper() for character in secret):
            pool += 26
        if any(not character.isalnum() for character in secret):
            pool += _PUNCTUATION_AND_SPACE
    distinct = len(characters)
    if distinct < 8:
        pool = min(pool, distinct)
    return len(secret) * math.log2(pool) if pool > 1 else 0.0


def weakness(secret: str) -> str | None:
    """Why this secret is too weak, or None if it is strong enough."""
    bits = estimated_bits(secret)
    if bits >= MIN_SECRET_BITS:
        return None
    return (
        f"the shared secret is too weak (about {bits:.0f} bits of entropy, at least "
        f"{MIN_SECRET_BITS} needed: 32 random hex characters or 22 random base64 ones)"
    )


def _memory_ranges() -> tuple[tuple[int, int], tuple[int, int]]:
    """``(arg_start, arg_end), (env_start, env_end)`` of this process (proc(5), fields 48-51)."""
    with open("/proc/self/stat", "rb") as file:
        stat = file.read()
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = stat[stat.rindex(b")") + 2 :].split()
    arg_start, arg_end, env_start, env_end = (int(value) for value in fields[45:49])
    return (arg_start, arg_end), (env_start, env_end)


def scrub_from_proc(variable: str, secret: str) -> None:
    """Overwrite ``variable=secret`` in the initial environment (with NULs) and the
    secret in the initial arguments (with ``*``), as ``/proc/self/*`` shows them.

    Raises OSError where ``/proc/self/mem`` cannot be written.
    """
    if not secret:
        return
    value = secret.encode()
    entry = variable.encode() + b"=" + value
    arguments, environment = _memory_ranges()
    with open("/proc/self/mem", "r+b", buffering=0) as memory:
        for (start, end), needle, replacement in (
            (environment, entry, b"\0" * len(entry)),
            (arguments, value, b"*" * len(value)),
        ):
            if end <= start:
                continue
            memory.seek(start)
            region = memory.read(end - start)
            position = region.find(needle)
            while position >= 0:
                memory.seek(start + position)
                memory.write(replacement)
                position = region.find(needle, position + len(needle))
