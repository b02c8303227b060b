"""Property tests: every message survives encode -> frame -> decode; bad frames fail cleanly."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_strategies import strategy_for

import mtrace.agent.protocol as p
from mtrace.agent.errors import ProtocolError

to_agent_messages = strategy_for(p.ToAgent)
from_agent_messages = strategy_for(p.FromAgent)


def _unframe(frame: bytes) -> bytes:
    size = p.frame_length(frame[: p.LENGTH_PREFIX], p.MAX_FRAME_SIZE)
    assert size == len(frame) - p.LENGTH_PREFIX
    return frame[p.LENGTH_PREFIX :]


@given(to_agent_messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_messages_to_the_agent_round_trip(message: Any) -> None:
    frame = bytes(p.FrameEncoder().encode(message))
    assert p.decode_to_agent(_unframe(frame)) == message


@given(from_agent_messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_messages_from_the_agent_round_trip(message: Any) -> None:
    frame = bytes(p.FrameEncoder().encode(message))
    assert p.decode_from_agent(_unframe(frame)) == message


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_decode_or_raise_protocol_error(body: bytes) -> None:
    for decode in (p.decode_to_agent, p.decode_from_agent):
        with contextlib.suppress(ProtocolError):
            decode(body)
    p.salvage_request(body)  # never raises


@given(to_agent_messages, st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_decode_or_raise_protocol_error(message: Any, data: st.DataObject) -> None:
    body = bytearray(_unframe(bytes(p.FrameEncoder().encode(message))))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        p.decode_to_agent(bytes(body))


def test_oversized_frames_are_refused_on_both_ends() -> None:
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        p.frame_length((p.MAX_FRAME_SIZE + 1).to_bytes(4, "big"), p.MAX_FRAME_SIZE)
    encoder = p.FrameEncoder(max_frame_size=100)
    with pytest.raises(ProtocolError, match="refusing to send"):
        encoder.encode(p.StreamData(stream=1, data=b"x" * 200))


def test_an_unknown_operation_still_yields_its_request_id() -> None:
    body = msgspec.msgpack.encode(["req", 77, ["teleport", b"/somewhere"]])
    with pytest.raises(ProtocolError):
        p.decode_to_agent(body)
    assert p.salvage_request(body) == (77, "teleport")
    assert p.salvage_request(msgspec.msgpack.encode(["stream-data", 1, b""])) is None
    assert p.salvage_request(b"\xc1") is None


class PingV2(msgspec.Struct, array_like=True, tag_field="tag", tag="ping"):
    """A future Ping with one more field at the end."""

    data: bytes = b""
    sent_at_ns: int = 0


class RequestV2(msgspec.Struct, array_like=True, tag_field="tag", tag="req"):
    id: int
    operation: PingV2


def test_an_older_peer_ignores_fields_added_at_the_end() -> None:
    # Compatibility rule 1, checked against msgspec's actual behaviour.
    newer = msgspec.msgpack.encode(RequestV2(id=1, operation=PingV2(b"x", 123)))
    assert p.decode_to_agent(newer) == p.Request(id=1, operation=p.Ping(data=b"x"))
    older = msgspec.msgpack.encode(p.Request(id=1, operation=p.Ping(data=b"x")))
    assert msgspec.msgpack.decode(older, type=RequestV2) == RequestV2(1, PingV2(b"x", 0))


def test_proofs_depend_on_the_secret_and_both_nonces() -> None:
    agent_nonce, client_nonce = b"a" * 32, b"c" * 32
    proof = p.client_proof(b"secret", agent_nonce, client_nonce)
    assert p.proofs_match(proof, p.client_proof(b"secret", agent_nonce, client_nonce))
    assert not p.proofs_match(proof, p.client_proof(b"other", agent_nonce, client_nonce))
    assert not p.proofs_match(proof, p.client_proof(b"secret", client_nonce, agent_nonce))
    # The agent's proof is not the client's: a reflected proof cannot pass.
    assert not p.proofs_match(proof, p.agent_proof(b"secret", agent_nonce, client_nonce))
