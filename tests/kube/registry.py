"""A registry on the host's loopback serving one image, so the rig's dockerd can pull.

The rig has no registry (its pods use ``imagePullPolicy: Never``); a test of
what mtrace says while the kubelet pulls the agent image needs a real pull.
:class:`OneImageRegistry` speaks the part of the Docker Registry HTTP API v2
a ``docker pull`` uses: ``/v2/`` (200), ``/v2/NAME/manifests/REFERENCE``
(a schema 2 manifest, by tag or by its digest) and ``/v2/NAME/blobs/DIGEST``,
HEAD and GET. The image is a local one (``docker save``) with one label added
to its config, so it is an image of its own (its own ID, removed after the
test) whose layers the node already has.

dockerd treats registries on 127.0.0.0/8 as insecure (plain HTTP) by default,
and the rig's dockerd runs in the host's network namespace, where this server
listens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .common import docker_argv, run

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


class OneImageRegistry:
    """``with OneImageRegistry(source, "name", "tag", directory, label) as registry``:
    ``registry.image`` is what to pull (``127.0.0.1:PORT/name:tag``)."""

    def __init__(self, source: str, name: str, tag: str, directory: Path, label: str) -> None:
        self.name, self.tag = name, tag
        self.blobs: dict[str, Path] = {}
        self.pulls: list[str] = []  # the paths of the blobs served by GET
        self.manifest = self._build(source, directory, label)
        self.manifest_digest = _digest(self.manifest)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.image = f"127.0.0.1:{self.server.server_address[1]}/{name}:{tag}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OneImageRegistry:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _build(self, source: str, directory: Path, label: str) -> bytes:
        """The manifest of ``source`` (its config given ``label``), blobs written under ``directory``."""
        saved = directory / "saved.tar"
        with open(saved, "wb") as out:
            subprocess.run(docker_argv("save", source), stdout=out, check=True)
        with tarfile.open(saved) as archive:
            index = json.load(_member(archive, "manifest.json"))[0]
            config = json.load(_member(archive, index["Config"]))
            config.setdefault("config", {}).setdefault("Labels", {})
            config["config"]["Labels"] = {**(config["config"]["Labels"] or {}),
                                          "mtrace.test.pull": label}
            config_bytes = json.dumps(config).encode()
            config_digest = self._store(directory, config_bytes)
            layers = []
            for name in index["Layers"]:
                packed = directory / "layer.gz"
                with _member(archive, name) as layer, gzip.open(packed, "wb", compresslevel=1) as out:
                    shutil.copyfileobj(layer, out, 1 << 20)
                data = packed.read_bytes()
                layers.append({"mediaType": LAYER_TYPE, "size": len(data),
                               "digest": self._store(directory, data)})
        saved.unlink()
        return json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "size": len(config_bytes), "digest": config_digest},
            "layers": layers}).encode()

    def _store(self, directory: Path, data: bytes) -> str:
        digest = _digest(data)
        path = directory / digest.replace(":", "-")
        path.write_bytes(data)
        self.blobs[digest] = path
        return digest

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, *_args: Any) -> None:
                pass

            def _answer(self, *, body: bool) -> None:
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if parts == ["v2"]:
                    return self._send(200, b"{}", "application/json", body)
                if len(parts) < 4 or parts[0] != "v2" or "/".join(parts[1:-2]) != registry.name:
                    return self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}',
                                      "application/json", body)
                kind, reference = parts[-2], parts[-1]
                if kind == "manifests" and reference in (registry.tag, registry.manifest_digest):
                    return self._send(200, registry.manifest, MANIFEST_TYPE, body,
                                      registry.manifest_digest)
                if kind == "blobs" and reference in registry.blobs:
                    if body:
                        registry.pulls.append(reference)
                    return self._send(200, registry.blobs[reference].read_bytes(),
                                      "application/octet-stream", body, reference)
                code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
                return self._send(404, json.dumps({"errors": [{"code": code}]}).encode(),
                                  "application/json", body)

            def _send(self, status: int, data: bytes, content_type: str, body: bool,
                      digest: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                if digest:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler


def _member(archive: tarfile.TarFile, name: str) -> Any:
    member = archive.extractfile(name)
    assert member is not None, f"{name} missing from docker save's archive"
    return member


def remove_image(image: str) -> None:
    """``docker rmi`` the pulled image (its containers first: an ephemeral
    agent's stays in its pod, exited, and would hold the image)."""
    containers = run(docker_argv("ps", "--all", "--quiet", "--filter", f"ancestor={image}"),
                     check=False, quiet=True).stdout.split()
    if containers:
        run(docker_argv("rm", "--force", *containers), check=False, quiet=True)
    run(docker_argv("rmi", image), check=False, quiet=True)
