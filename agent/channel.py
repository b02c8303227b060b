"""The encrypted channel: how frames are sealed once the handshake is done.

After ``Welcome``, a connection whose hellos chose :data:`CHANNEL_CHACHA20_POLY1305`
carries every frame as::

    4-byte big-endian length n  |  n bytes: ChaCha20-Poly1305(key, nonce, body, aad=length)

* one key per direction, derived with HKDF-SHA256 from the shared secret, both
  nonces and a hash of both hello frames exactly as they crossed the wire (so a
  relay that edits a hello, say to strip the encryption offer, ends up with
  keys that do not match and the first frame fails);
* the AEAD nonce is a per-direction frame counter, never sent: a frame that is
  replayed, reordered, dropped or injected fails authentication, and so does
  a tampered length (it is the associated data);
* any frame that fails authentication ends the connection
  (:class:`~mtrace.agent.errors.ProtocolError`).

The AEAD comes from ``cryptography`` (a kept, audited library: hand-written
crypto is how channels get broken). ChaCha20-Poly1305 rather than AES-GCM: as
fast here, and constant-time without AES instructions (aarch64 boards).
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolError
from .protocol import LENGTH_PREFIX, frame_length

#: Bytes the AEAD adds to every frame.
TAG_SIZE: Final = 16
_KEY_SIZE: Final = 32
_NONCE_SIZE: Final = 12
_MAX_FRAMES: Final = 1 << 64


def derive_keys(
    secret: bytes, agent_nonce: bytes, client_nonce: bytes, agent_hello: bytes, client_hello: bytes
) -> tuple[bytes, bytes]:
    """``(client -> agent key, agent -> client key)`` for one connection.

    ``agent_hello`` and ``client_hello`` are the hello frame bodies as sent.
    """
    transcript = hashlib.sha256(
        len(agent_hello).to_bytes(4, "big") + agent_hello + client_hello
    ).digest()
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * _KEY_SIZE,
        salt=agent_nonce + client_nonce,
        info=b"mtrace channel v2 chacha20-poly1305\0" + transcript,
    ).derive(secret)
    return material[:_KEY_SIZE], material[_KEY_SIZE:]


class FrameSealer:
    """The sending half of one direction: encodes a plain frame into a sealed one."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def seal(self, frame: bytearray) -> bytes:
        """``frame`` is a plain frame (length prefix + body); returns the sealed frame."""
        if self._counter >= _MAX_FRAMES:
            raise ProtocolError("the channel has sent all the frames its key allows")
        nonce = self._counter.to_bytes(_NONCE_SIZE, "little")
        self._counter += 1
        body = memoryview(frame)[LENGTH_PREFIX:]
        prefix = (len(body) + TAG_SIZE).to_bytes(LENGTH_PREFIX, "big")
        return prefix + self._aead.encrypt(nonce, body, prefix)


class FrameOpener:
    """The receiving half of one direction: checks and decrypts sealed frames, in order."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def body_length(self, prefix: bytes, max_frame_size: int) -> int:
        """The sealed length announced by ``prefix``, checked against the limit."""
        size = frame_length(prefix, max_frame_size + TAG_SIZE)
        if size < TAG_SIZE:
            raise ProtocolError(f"a sealed frame of {size} bytes is shorter than its tag")
        return size

    def open(self, prefix: bytes, sealed: bytes) -> bytes:
        nonce = self._counter.to_bytes(_NONCE_SIZE, "little")
        self._counter += 1
        try:
            return self._aead.decrypt(nonce, sealed, prefix)
        except InvalidTag:
            raise ProtocolError(
                "a frame failed authentication (tampered, replayed, reordered or injected)"
            ) from None
