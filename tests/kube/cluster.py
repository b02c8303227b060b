"""Bring the rig up, take it down, say how it is.

Start order: dockerd (runc wrapper as default runtime) -> etcd -> kube-apiserver
-> controller-manager, scheduler -> cluster DNS -> kube-proxy -> kubelet; then
wait for the node to be Ready and build the images. Every server listens on
127.0.0.1, except the cluster DNS, which pods reach on docker's bridge gateway.
`down` stops in the reverse order and undoes what `host` lists.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import shutil
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import host, processes
from .build import ensure_binaries
from .common import (
    APISERVER_PORT,
    BIN_DIR,
    BRIDGE_CIDR,
    BRIDGE_GATEWAY,
    CACHE_ROOT,
    CLUSTER_DOMAIN,
    DOCKER_DATA,
    DOCKER_SOCKET,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    KUBECONFIG,
    KUBELET_PORT,
    SERVICE_CIDR,
    STATE_DIR,
    VAR_DIR,
    VERSION,
    RigError,
    docker_argv,
    install_apt_packages,
    log,
    phase,
    run,
)
from .pki import Pki, make_pki

PKI_DIR = STATE_DIR / "pki"
DOCKER_EXEC_ROOT = STATE_DIR / "docker-exec"
RUNC_WRAPPER = STATE_DIR / "runc-wrapper"
RUNTIME_NAME = "mtrace-rig"
PAUSE_IMAGE = f"mtrace-rig/pause:{VERSION}"
# Components in start order; `down` stops them in reverse.
COMPONENTS = ("dockerd", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "dns",
              "kube-proxy", "kubelet")  # fmt: skip
# kubelet writes pod logs here whatever its root dir is: removed by `down` when the rig made them.
_POD_LOG_DIRS = (Path("/var/log/pods"), Path("/var/log/containers"))
_CREATED_RECORD = STATE_DIR / "created-paths"
_LOCK = CACHE_ROOT / ".rig.lock"


# --- health -------------------------------------------------------------------------------


def _api_connection(pki: Pki, timeout: float = 5.0) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.cert("admin")), str(pki.key("admin")))
    return http.client.HTTPSConnection("127.0.0.1", APISERVER_PORT, context=context, timeout=timeout)


def api_request(method: str, path: str, body: Any = None, pki: Pki | None = None) -> tuple[int, Any]:
    connection = _api_connection(pki or Pki(PKI_DIR))
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if payload else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode(errors="replace")


def _api_ready() -> bool:
    try:
        status, _ = api_request("GET", "/readyz")
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False
    return status == 200


def node_ready() -> bool:
    try:
        status, node = api_request("GET", "/api/v1/nodes/localhost")
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False
    if status != 200:
        return False
    return any(
        condition["type"] == "Ready" and condition["status"] == "True"
        for condition in node.get("status", {}).get("conditions", [])
    )


def status() -> dict[str, Any]:
    """Which components run, whether the API answers and the node is Ready."""
    components = {name: processes.pid_of(name) for name in COMPONENTS}
    api = KUBECONFIG.exists() and _api_ready()
    return {
        "components": components,
        "api": api,
        "node_ready": api and node_ready(),
        "kubeconfig": str(KUBECONFIG) if KUBECONFIG.exists() else None,
    }


def healthy() -> bool:
    current = status()
    return all(current["components"].values()) and current["node_ready"]


def _wait(what: str, check: Any, timeout: float, component: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if component is not None and not processes.running(component):
            raise RigError(f"{component} exited while waiting for {what}:\n{processes.log_tail(component)}")
        time.sleep(0.25)
    tail = processes.log_tail(component) if component else ""
    raise RigError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


# --- up -----------------------------------------------------------------------------------


@contextmanager
def _exclusive() -> Iterator[None]:
    """One `up` or `down` at a time on this machine (test sessions may share the rig)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up(timings: dict[str, float] | None = None, build_images: bool = True) -> None:
    """Start the rig (reuse it when it already runs healthy); clean up a crashed one first."""
    if os.geteuid() != 0:
        raise RigError("the rig needs root (it runs dockerd, a kubelet and changes iptables)")
    with _exclusive():
        _up_locked({} if timings is None else timings, build_images)


def _up_locked(timings: dict[str, float], build_images: bool) -> None:
    if not healthy() and all(processes.pid_of(name) for name in COMPONENTS):
        # Everything runs but the node is not Ready (yet, or for a moment): give it a chance.
        _wait_quietly(healthy, 30)
    if healthy():
        log("already up and healthy")
        if build_images:
            from .images import ensure_images

            with phase("images", timings):
                ensure_images()
        return
    if any(processes.pid_of(name) for name in COMPONENTS) or STATE_DIR.exists():
        with phase("clean up a previous rig", timings):
            _down()
    try:
        _up(timings, build_images)
    except BaseException:
        log(f"up failed: taking down what was started (logs kept in {CACHE_ROOT}/failed-up-logs/)")
        _keep_logs()
        _down()
        raise


def _wait_quietly(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def _keep_logs() -> None:
    kept = CACHE_ROOT / "failed-up-logs"
    shutil.rmtree(kept, ignore_errors=True)
    if processes.LOG_DIR.exists():
        shutil.copytree(processes.LOG_DIR, kept)


def _up(timings: dict[str, float], build_images: bool) -> None:
    with phase("apt packages", timings):
        install_apt_packages()
    ensure_binaries(timings)
    _refuse_foreign_dockerd()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_DIR.chmod(0o700)
    host.record_sysctls()
    created = [str(path) for path in _POD_LOG_DIRS if not path.exists()]
    _CREATED_RECORD.write_text("".join(f"{path}\n" for path in created))
    with phase("certificates", timings):
        pki = make_pki(PKI_DIR)
        shutil.copyfile(pki.kubeconfig("admin"), KUBECONFIG)
        KUBECONFIG.chmod(0o600)
    with phase("dockerd", timings):
        _start_dockerd()
    with phase("etcd + kube-apiserver", timings):
        _start_etcd(pki)
        _start_apiserver(pki)
    with phase("controller-manager, scheduler, dns, kube-proxy", timings):
        _start_controllers(pki)
        _start_dns()
        _start_kube_proxy(pki)
    if build_images:
        from .images import ensure_images

        with phase("images", timings):
            ensure_images()
    else:
        from .images import ensure_pause_image

        ensure_pause_image()
    with phase("kubelet, node Ready", timings):
        _start_kubelet(pki)
        _wait("the node to be Ready", node_ready, 120, "kubelet")
    log(f"up: KUBECONFIG={KUBECONFIG}")


def _refuse_foreign_dockerd() -> None:
    ours = processes.pid_of("dockerd")
    for pid in processes.pids_mentioning("dockerd"):
        try:
            executable = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if executable.endswith("/dockerd") and pid != ours:
            raise RigError(
                f"another dockerd runs (pid {pid}): the rig runs its own on docker0; "
                "stop that one (e.g. `systemctl stop docker docker.socket`) or point the tests "
                "at another cluster with KUBECONFIG"
            )


def _start_dockerd() -> None:
    RUNC_WRAPPER.write_text(Path(__file__).with_name("runc_wrapper.py").read_text())
    RUNC_WRAPPER.chmod(0o755)
    DOCKER_DATA.mkdir(parents=True, exist_ok=True)
    daemon_config = STATE_DIR / "daemon.json"
    daemon_config.write_text("{}\n")  # never /etc/docker/daemon.json: the machine's settings stay out
    processes.start(
        "dockerd",
        [
            "/usr/sbin/dockerd",
            "--config-file", daemon_config,
            "--host", f"unix://{DOCKER_SOCKET}",
            "--data-root", DOCKER_DATA,
            "--exec-root", DOCKER_EXEC_ROOT,
            "--pidfile", STATE_DIR / "dockerd.docker-pid",
            "--add-runtime", f"{RUNTIME_NAME}={RUNC_WRAPPER}",
            "--default-runtime", RUNTIME_NAME,
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            # Containers' cgroups under a parent of the rig's own: after a crash, `down` finds
            # their processes there.
            "--cgroup-parent", f"/{host.CGROUP_PARENT}",
            "--storage-driver", "overlay2",
            "--bip", f"{BRIDGE_GATEWAY}/16",
            "--userland-proxy=false",
            "--log-level", "warn",
        ],
    )  # fmt: skip

    def docker_answers() -> bool:
        return (
            run(docker_argv("version", "--format", "{{.Server.Version}}"), check=False, quiet=True).returncode
            == 0
        )

    _wait("dockerd", docker_answers, 60, "dockerd")


def _start_etcd(pki: Pki) -> None:
    data = VAR_DIR / "etcd"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    data.chmod(0o700)
    client_url = f"https://127.0.0.1:{ETCD_CLIENT_PORT}"
    peer_url = f"http://127.0.0.1:{ETCD_PEER_PORT}"
    processes.start(
        "etcd",
        [
            "/usr/bin/etcd",
            "--name", "rig",
            "--data-dir", data,
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"rig={peer_url}",
            "--cert-file", pki.cert("etcd"),
            "--key-file", pki.key("etcd"),
            "--client-cert-auth",
            "--trusted-ca-file", pki.ca,
            "--log-level", "warn",
        ],
    )  # fmt: skip


def _start_apiserver(pki: Pki) -> None:
    processes.start(
        "kube-apiserver",
        [
            BIN_DIR / "kube-apiserver",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={APISERVER_PORT}",
            "--insecure-port=0",
            f"--etcd-servers=https://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--etcd-cafile={pki.ca}",
            f"--etcd-certfile={pki.cert('apiserver-etcd-client')}",
            f"--etcd-keyfile={pki.key('apiserver-etcd-client')}",
            f"--tls-cert-file={pki.cert('apiserver')}",
            f"--tls-private-key-file={pki.key('apiserver')}",
            f"--client-ca-file={pki.ca}",
            f"--kubelet-certificate-authority={pki.ca}",
            f"--kubelet-client-certificate={pki.cert('apiserver-kubelet-client')}",
            f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
            # The node is "localhost": apiserver -> kubelet stays on loopback.
            "--kubelet-preferred-address-types=Hostname",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--anonymous-auth=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-key-file={pki.directory / 'service-account.pub'}",
            f"--service-account-signing-key-file={pki.key('service-account')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--feature-gates=EphemeralContainers=true",
            "--endpoint-reconciler-type=none",
            "--enable-admission-plugins=NodeRestriction",
            "--event-ttl=10m",
            "--v=1",
        ],
    )
    _wait("kube-apiserver /readyz", _api_ready, 90, "kube-apiserver")


def _start_controllers(pki: Pki) -> None:
    processes.start(
        "kube-controller-manager",
        [
            BIN_DIR / "kube-controller-manager",
            f"--kubeconfig={pki.kubeconfig('controller-manager')}",
            f"--authentication-kubeconfig={pki.kubeconfig('controller-manager')}",
            f"--authorization-kubeconfig={pki.kubeconfig('controller-manager')}",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            f"--service-account-private-key-file={pki.key('service-account')}",
            f"--root-ca-file={pki.ca}",
            f"--cluster-signing-cert-file={pki.ca}",
            f"--cluster-signing-key-file={pki.key('ca')}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--feature-gates=EphemeralContainers=true",
            "--v=1",
        ],
    )
    processes.start(
        "kube-scheduler",
        [
            BIN_DIR / "kube-scheduler",
            f"--kubeconfig={pki.kubeconfig('scheduler')}",
            f"--authentication-kubeconfig={pki.kubeconfig('scheduler')}",
            f"--authorization-kubeconfig={pki.kubeconfig('scheduler')}",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--feature-gates=EphemeralContainers=true",
            "--v=1",
        ],
    )


def _start_dns() -> None:
    processes.start(
        "dns",
        [
            sys.executable, Path(__file__).with_name("cluster_dns.py"),
            "--kubeconfig", KUBECONFIG,
            "--listen", BRIDGE_GATEWAY,
            "--domain", CLUSTER_DOMAIN,
        ],
    )  # fmt: skip
    from .cluster_dns import answers

    _wait(
        "the cluster DNS",
        lambda: answers(BRIDGE_GATEWAY, f"kubernetes.default.svc.{CLUSTER_DOMAIN}"),
        30,
        "dns",
    )


def _start_kube_proxy(pki: Pki) -> None:
    processes.start(
        "kube-proxy",
        [
            BIN_DIR / "kube-proxy",
            f"--kubeconfig={pki.kubeconfig('kube-proxy')}",
            "--hostname-override=localhost",
            "--proxy-mode=iptables",
            "--bind-address=127.0.0.1",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=127.0.0.1:10249",
            f"--cluster-cidr={BRIDGE_CIDR}",
            # Pods share docker's bridge: without masquerading, a pod's reply to a pod that
            # reached it through a ClusterIP would skip the host's conntrack and be dropped.
            "--masquerade-all=true",
            "--conntrack-max-per-core=0",  # 0: leave the machine's conntrack settings alone
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--v=1",
        ],
    )


def _start_kubelet(pki: Pki) -> None:
    root = VAR_DIR / "kubelet"
    root.mkdir(parents=True, exist_ok=True)
    resolv = STATE_DIR / "resolv.conf"
    # Pods with dnsPolicy Default get this file: the rig's DNS too, so no query leaves the machine.
    resolv.write_text(f"nameserver {BRIDGE_GATEWAY}\n")
    processes.start(
        "kubelet",
        [
            BIN_DIR / "kubelet",
            f"--kubeconfig={pki.kubeconfig('kubelet')}",
            "--hostname-override=localhost",
            "--address=127.0.0.1",
            f"--port={KUBELET_PORT}",
            "--read-only-port=0",
            "--healthz-bind-address=127.0.0.1",
            f"--tls-cert-file={pki.cert('kubelet-serving')}",
            f"--tls-private-key-file={pki.key('kubelet-serving')}",
            f"--client-ca-file={pki.ca}",
            "--anonymous-auth=false",
            "--authorization-mode=AlwaysAllow",  # only holders of a CA-signed certificate get here
            f"--root-dir={root}",
            f"--cert-dir={STATE_DIR / 'kubelet-pki'}",
            f"--experimental-dockershim-root-directory={VAR_DIR / 'dockershim'}",
            "--container-runtime=docker",
            f"--docker-endpoint=unix://{DOCKER_SOCKET}",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            "--fail-swap-on=false",
            "--cgroup-driver=cgroupfs",
            "--cgroups-per-qos=false",
            "--enforce-node-allocatable=",
            "--feature-gates=EphemeralContainers=true",
            f"--cluster-dns={BRIDGE_GATEWAY}",
            f"--cluster-domain={CLUSTER_DOMAIN}",
            f"--resolv-conf={resolv}",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--serialize-image-pulls=false",
            "--v=1",
        ],
    )


# --- down ---------------------------------------------------------------------------------


def down() -> None:
    """Stop everything by pid and undo the machine changes; safe on a half-started or crashed rig."""
    if os.geteuid() != 0:
        raise RigError("the rig needs root to take itself down")
    with _exclusive():
        _down()


def _down() -> None:
    processes.stop("kubelet")
    if processes.running("dockerd"):
        # Pod containers outlive the kubelet: remove them while dockerd still answers.
        listed = run(docker_argv("ps", "-aq"), check=False, quiet=True)
        ids = listed.stdout.split()
        if ids:
            run(docker_argv("rm", "-f", "-v", *ids), check=False)
    for name in reversed(COMPONENTS):
        processes.stop(name, timeout=30 if name == "dockerd" else 15)
    # Shims and a managed containerd the dockerd left behind (after a crash): by pid, found by our paths.
    processes.kill_pids(processes.pids_mentioning(str(DOCKER_EXEC_ROOT)), "containerd leftover")
    # Containers whose dockerd crashed: their processes, found by the rig's cgroup parent.
    host.kill_cgroup_processes()
    host.unmount_under([VAR_DIR, DOCKER_DATA, DOCKER_EXEC_ROOT, STATE_DIR])
    host.remove_iptables_chains()
    host.remove_bridge()
    host.restore_sysctls()
    try:
        for line in _CREATED_RECORD.read_text().splitlines():
            shutil.rmtree(line, ignore_errors=True)
    except OSError:
        pass
    # Docker's container store lives with its images in the cache; containers are gone by now.
    shutil.rmtree(VAR_DIR, ignore_errors=True)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    log("down")


def leftovers() -> list[str]:
    """What a clean machine would not have (empty after `down`)."""
    found = [f"process {name} pid {pid}" for name in COMPONENTS if (pid := processes.pid_of(name))]
    found += [
        f"mount {point}" for point in host.mounts_under([VAR_DIR, DOCKER_DATA, DOCKER_EXEC_ROOT, STATE_DIR])
    ]
    found += host.leftover_iptables()
    if host.bridge_exists():
        found.append("bridge docker0")
    found += [f"cgroup {path}" for path in host.rig_cgroups()]
    found += [f"path {path}" for path in (STATE_DIR, VAR_DIR) if path.exists()]
    found += [
        f"process {pid} mentions {DOCKER_EXEC_ROOT}"
        for pid in processes.pids_mentioning(str(DOCKER_EXEC_ROOT))
    ]
    return found


__all__ = ["CACHE_ROOT", "down", "healthy", "leftovers", "status", "up"]
