"""Certificates and kubeconfigs for one rig, made with openssl at every `up`.

A CA signs: the apiserver's serving certificate (loopback and the in-cluster
names), etcd's serving certificate and the apiserver's etcd client, one client
certificate per component (admin in O=system:masters, the kubelet as
system:node:localhost in O=system:nodes, controller-manager, scheduler,
kube-proxy, the apiserver's client for kubelets), and the kubelet's serving
certificate. A separate key pair signs service-account tokens. EC P-256 keys:
fast to make, and everything in 1.20 takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .common import APISERVER_PORT, run

_SUBJECT_ALT_APISERVER = (
    "IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,"
    "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
)
_SUBJECT_ALT_LOOPBACK = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class Pki:
    directory: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.cert("ca")

    def kubeconfig(self, name: str) -> Path:
        return self.directory / f"{name}.kubeconfig"


# name -> (subject, server SANs or None for a client certificate)
_CERTIFICATES: dict[str, tuple[str, str | None]] = {
    "apiserver": ("/CN=kube-apiserver", _SUBJECT_ALT_APISERVER),
    "etcd": ("/CN=etcd", _SUBJECT_ALT_LOOPBACK),
    "apiserver-etcd-client": ("/CN=kube-apiserver-etcd-client", None),
    "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client", None),
    "kubelet-serving": ("/CN=localhost", _SUBJECT_ALT_LOOPBACK),
    "admin": ("/O=system:masters/CN=mtrace-rig-admin", None),
    "kubelet": ("/O=system:nodes/CN=system:node:localhost", None),
    "controller-manager": ("/CN=system:kube-controller-manager", None),
    "scheduler": ("/CN=system:kube-scheduler", None),
    "kube-proxy": ("/CN=system:kube-proxy", None),
}
KUBECONFIG_USERS = ("admin", "kubelet", "controller-manager", "scheduler", "kube-proxy")


def _new_key(path: Path) -> None:
    run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path])
    path.chmod(0o600)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    pki = Pki(directory)
    _new_key(pki.key("ca"))
    run([
        "openssl", "req", "-x509", "-new", "-key", pki.key("ca"), "-subj", "/CN=mtrace-rig-ca",
        "-days", "3650", "-out", pki.ca,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    ])  # fmt: skip
    for name, (subject, alt_names) in _CERTIFICATES.items():
        _new_key(pki.key(name))
        csr = directory / f"{name}.csr"
        run(["openssl", "req", "-new", "-key", pki.key(name), "-subj", subject, "-out", csr])
        extensions = directory / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if alt_names is None:
            lines.append("extendedKeyUsage=clientAuth")
        else:
            lines += ["extendedKeyUsage=serverAuth,clientAuth", f"subjectAltName={alt_names}"]
        extensions.write_text("\n".join(lines) + "\n")
        run([
            "openssl", "x509", "-req", "-in", csr, "-CA", pki.ca, "-CAkey", pki.key("ca"),
            "-CAcreateserial", "-days", "3650", "-extfile", extensions, "-out", pki.cert(name),
        ])  # fmt: skip
        csr.unlink()
        extensions.unlink()
    # Service-account tokens: the apiserver verifies with the public half, the controller-manager signs.
    _new_key(pki.key("service-account"))
    run(
        [
            "openssl",
            "pkey",
            "-in",
            pki.key("service-account"),
            "-pubout",
            "-out",
            directory / "service-account.pub",
        ]
    )
    for user in KUBECONFIG_USERS:
        write_kubeconfig(pki.kubeconfig(user), pki, user)
    return pki


def write_kubeconfig(path: Path, pki: Pki, user: str) -> None:
    path.write_text(
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: mtrace-rig\n"
        "  cluster:\n"
        f"    server: https://127.0.0.1:{APISERVER_PORT}\n"
        f"    certificate-authority: {pki.ca}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"    client-certificate: {pki.cert(user)}\n"
        f"    client-key: {pki.key(user)}\n"
        "contexts:\n"
        "- name: mtrace-rig\n"
        "  context:\n"
        "    cluster: mtrace-rig\n"
        f"    user: {user}\n"
        "current-context: mtrace-rig\n"
    )
    path.chmod(0o600)
