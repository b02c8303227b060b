"""Issue 14 part B: the agent channel's security and the agent's bounded resources.

Targetless agents on this host's loopback (no namespace, no root needed).
"""

from __future__ import annotations

import msgspec
import pytest
from test_agent_robustness import RawConnection, ping_ok

import mtrace.agent.protocol as p

pytestmark = pytest.mark.timeout(60)


# --- frames that never end, frames that nest forever -----------------------------------


@pytest.mark.parametrize("sent", [b"\x00\x00", (100).to_bytes(4, "big") + b"only ten b"])
def test_a_half_sent_frame_after_authentication_is_dropped_after_the_frame_timeout(
    listening_agent: object, sent: bytes
) -> None:
    with listening_agent(extra_args=["--frame-timeout", "1"]) as agent:  # type: ignore[operator]
        connection = RawConnection(agent.host, agent.port, timeout=20)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        connection.sock.sendall(sent)  # and nothing more, but the socket stays open
        frames = connection.drain_until_closed()
        assert [type(frame) for frame in frames] == [p.Goodbye]
        assert frames[0].code == p.GOODBYE_PROTOCOL
        assert "not finished within 1s" in frames[0].message
        connection.close()
        ping_ok(agent.host, agent.port, agent.secret)


def test_an_idle_client_is_not_dropped_by_the_frame_timeout(listening_agent: object) -> None:
    with listening_agent(extra_args=["--frame-timeout", "0.5"]) as agent:  # type: ignore[operator]
        connection = RawConnection(agent.host, agent.port, timeout=20)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        connection.sock.settimeout(2)
        with pytest.raises(TimeoutError):
            connection.receive()  # two seconds of silence both ways
        connection.sock.settimeout(20)
        connection.send(p.Request(id=1, operation=p.Ping(data=b"still here")))
        assert connection.receive() == p.Response(id=1, result=p.Pong(data=b"still here"))
        connection.close()


def test_a_deeply_nested_request_is_a_protocol_error_not_an_internal_error(
    listening_agent: object,
) -> None:
    with listening_agent() as agent:  # type: ignore[operator]
        connection = RawConnection(agent.host, agent.port, timeout=20)
        assert isinstance(connection.handshake(agent.secret), p.Welcome)
        # ["req", 1, [[[[...100k deep...]]]]]
        nested = b"\x93" + msgspec.msgpack.encode("req") + msgspec.msgpack.encode(1)
        nested += b"\x91" * 100_000 + b"\xc0"
        connection.send_body(nested)
        frames = connection.drain_until_closed()
        assert [type(frame) for frame in frames] == [p.Goodbye]
        assert frames[0].code == p.GOODBYE_PROTOCOL
        assert "internal error" not in frames[0].message
        connection.close()
        ping_ok(agent.host, agent.port, agent.secret)
        assert "level=error" not in agent.log()
