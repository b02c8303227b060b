"""How we reach the agent: the API server's port-forward to a port on the
pod's loopback, as an asyncio stream pair for :class:`AgentClient`.

The ``kubernetes`` client speaks the port-forward websocket protocol in a
thread and hands back one end of a socketpair; asyncio takes that socket as
it would a TCP connection. One websocket per connection: a port the agent
is not listening on yet shows as a connection closed before the handshake,
which :func:`connect` retries until its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from ...agent.client import READ_LIMIT, AgentClient
from ...agent.errors import AgentUnavailable, AuthenticationError
from .client import Kube, api_error

if TYPE_CHECKING:
    from collections.abc import Callable


def open_socket(kube: Kube, namespace: str, pod: str, port: int) -> object:
    """A connected socket to ``pod``'s ``127.0.0.1:port`` (blocking: call in a thread).

    The websocket is opened directly, not through ``CoreV1Api``: building that
    class (pydantic validators for every call of the core API) costs seconds."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.stream.ws_client import portforward_call

    _, url, headers, _, _ = kube.api.param_serialize(
        "GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward",
        query_params=[("ports", str(port))], auth_settings=["BearerToken"])
    try:
        forward = portforward_call(kube.api.configuration, "GET", url, headers=headers)
    except ApiException as error:
        status, body = error.status or 0, error.body
        refusal = error.__context__
        if not status and isinstance(getattr(refusal, "status_code", None), int):
            # The client wraps the API's answer to the websocket upgrade (RBAC's
            # 403 among them) in a status-0 ApiException: take the status back.
            status, body = refusal.status_code, getattr(refusal, "resp_body", None)  # type: ignore[union-attr]
        if status >= 400:
            raise api_error("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward",
                            status, body) from error
        raise AgentUnavailable(f"cannot open a port-forward to pod/{pod}: {error.reason}",
                               hint="is the API server reachable?") from error
    return forward


async def connect(kube: Kube, namespace: str, pod: str, port: int, secret: str, *,
                  deadline: float, alive: Callable[[], None] | None = None,
                  startup_timeout: float | None = None) -> AgentClient:
    """Port-forward to the agent and authenticate, retrying while it starts.

    ``alive`` is called between attempts and raises if the agent's container
    has failed (so a dead agent is reported as what it is, not as a timeout).
    ``startup_timeout`` (the seconds ``deadline`` came from) names the
    setting in the timeout's message.
    """
    last: BaseException | None = None
    delay = 0.05
    while True:
        forward = await asyncio.to_thread(open_socket, kube, namespace, pod, port)
        sock = forward.socket(port)._socket  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
        client = AgentClient(reader, writer, description=f"agent in pod/{pod} (port-forward)")
        try:
            remaining = max(deadline - time.monotonic(), 0.5)
            await client.handshake(secret, timeout=min(remaining, 10.0), encrypt=False)
            return client
        except AuthenticationError:
            await client.close()
            raise
        except AgentUnavailable as error:
            last = error
            await client.close()
            with contextlib.suppress(Exception):
                forward.close()  # type: ignore[attr-defined]
        if alive is not None:
            await asyncio.to_thread(alive)
        if time.monotonic() + delay > deadline:
            within = (f"within agent.startup_timeout ({startup_timeout:g} s)"
                      if startup_timeout is not None else "in time")
            raise AgentUnavailable(
                f"the agent in pod/{pod} did not answer on port {port} {within}; last try: {last}",
                hint="raise agent.startup_timeout, or run with -v to see the agent's log")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
