"""The one module that talks to the Kubernetes API (through the ``kubernetes``
client, never kubectl): config loading, contexts, and API errors turned into
mtrace's.

Requests are raw JSON (``Kube.get("/api/v1/namespaces/ns/pods/p")`` returns a
dict), not the client's generated models: mtrace reads a handful of fields,
the objects come from servers from 1.20 on (whose shapes the newest models do
not always accept), and decoding JSON is much cheaper at start-up.

Errors::

    ConfigError                      (mtrace.cli.errors)
    └── KubeError                    exit 79 unless said otherwise below
        ├── KubeConfigMissing        no kubeconfig, or no such context (78)
        ├── KubeUnreachable          the API server does not answer
        ├── KubeForbidden            RBAC said no: names the verb and resource (77)
        ├── KubeNotFound             the object does not exist
        ├── KubeConflict             the object changed between our read and our write (409)
        └── KubeRejected             admission refused what mtrace asked for (77)
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

#: Labels on every object mtrace creates (cleanup, ``mtrace ls``, sweeps find them by these).
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "mtrace"
SESSION_LABEL = "mtrace.dev/session"
RBAC_HINT = "grant the Role in docs/kubernetes.md (section Permissions)"


class KubeError(ConfigError):
    exit_code = 79


class KubeConfigMissing(KubeError):
    exit_code = 78


class KubeUnreachable(KubeError):
    exit_code = 69  # EX_UNAVAILABLE


class KubeForbidden(KubeError):
    exit_code = 77  # EX_NOPERM


class KubeNotFound(KubeError):
    pass


class KubeRejected(KubeError):
    exit_code = 77


class KubeConflict(KubeError):
    """409: a read-modify-write lost a race (read again and retry)."""


@dataclass(frozen=True)
class KubeSettings:
    """Where the cluster is: the config keys and flags that choose it."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


class Kube:
    """A connected API client; ``namespace`` is the one requests default to
    (``-n``, else the context's, else ``default``)."""

    def __init__(self, settings: KubeSettings) -> None:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        path = settings.kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] \
            or os.path.expanduser("~/.kube/config")
        if not os.path.exists(path):
            raise KubeConfigMissing(
                f"no kubeconfig at {path}",
                hint="set KUBECONFIG, pass --kubeconfig, or set `kubeconfig` in the config file")
        configuration = client.Configuration()
        try:
            contexts, current = config.list_kube_config_contexts(path)
            if settings.context and settings.context not in {c["name"] for c in contexts}:
                names = ", ".join(sorted(c["name"] for c in contexts)) or "none"
                raise KubeConfigMissing(f"no context {settings.context!r} in {path}",
                                        hint=f"contexts there: {names}")
            active = next((c for c in contexts if c["name"] == settings.context), current)
            config.load_kube_config(path, context=settings.context,
                                    client_configuration=configuration, persist_config=False)
        except ConfigException as error:
            raise KubeConfigMissing(f"cannot use the kubeconfig {path}: {error}",
                                    hint="check it with the tools that made it") from error
        self.kubeconfig = path
        self.context_name = (active or {}).get("name", "")
        self.namespace = (settings.namespace
                          or ((active or {}).get("context") or {}).get("namespace")
                          or "default")
        configuration.retries = 0
        self.api = client.ApiClient(configuration)
        self.host = configuration.host
        self._version: tuple[int, int] | None = None

    def close(self) -> None:
        self.api.close()

    # --- raw requests ---

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, str] | None = None,
                content_type: str = "application/json",
                timeout: float = 30.0) -> Any:
        """One API call; the decoded JSON answer, or a KubeError saying what failed."""
        from urllib3.exceptions import HTTPError

        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(method, url, headers, body, _request_timeout=timeout)
            data = response.read()
        except (HTTPError, OSError) as error:
            raise KubeUnreachable(
                f"the Kubernetes API at {self.host} does not answer: {_reason(error)}",
                hint=f"is the cluster up? (context {self.context_name!r} of {self.kubeconfig})",
            ) from error
        if response.status >= 400:
            raise api_error(method, path, response.status, data)
        return json.loads(data) if data else None

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def server_version(self) -> tuple[int, int]:
        if self._version is None:
            info = self.get("/version")
            minor = re.match(r"\d+", str(info.get("minor", "0"))) or re.match(r"\d+", "0")
            self._version = (int(info.get("major", "1") or 1), int(minor.group()) if minor else 0)
        return self._version


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return str(reason or error).split(": ", 1)[-1][:200]


_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def describe_request(method: str, path: str) -> tuple[str, str]:
    """("create", "pods/ephemeralcontainers") for the request; list and watch as the API names them."""
    parts = [part for part in urllib.parse.urlparse(path).path.split("/") if part]
    query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
    # /api/v1/namespaces/NS/RESOURCE[/NAME[/SUB]] or /apis/GROUP/VERSION/...
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    group = parts[1] if parts[:1] == ["apis"] and len(parts) > 1 else ""
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] if rest else "?"
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    verb = _VERBS.get(method, method.lower())
    if method == "GET" and len(rest) == 1:
        verb = "watch" if query.get("watch") else "list"
    return verb, f"{resource}.{group}" if group else resource


def api_error(method: str, path: str, status: int, data: bytes | str | None) -> KubeError:
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        body = {}
    message = str(body.get("message") or (data or b"")[:200] or f"HTTP {status}")
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    verb, resource = describe_request(method, path)
    if status == 401:
        return KubeForbidden(f"the Kubernetes API refused our credentials: {message}",
                             hint="refresh the credentials of this kubeconfig context")
    if status == 403:
        return KubeForbidden(f"forbidden: cannot {verb} {resource}: {message}", hint=RBAC_HINT)
    if status == 404:
        return KubeNotFound(f"not found: {message}")
    if status == 409:
        return KubeConflict(f"conflict: cannot {verb} {resource}: {message}")
    if status in (400, 422):
        return KubeRejected(f"the API refused to {verb} {resource}: {message}")
    return KubeError(f"the Kubernetes API failed to {verb} {resource}: HTTP {status}: {message}")
