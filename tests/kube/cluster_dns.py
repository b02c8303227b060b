"""The rig's cluster DNS: Service and pod names from the API, nothing forwarded.

No CoreDNS package exists, so the rig runs this small server on docker's bridge
gateway (kubelet `--cluster-dns`). It answers, over UDP and TCP:

* ``SERVICE.NAMESPACE.svc.DOMAIN`` A: the ClusterIP, or the ready endpoint
  addresses of a headless Service;
* ``_PORT._PROTO.SERVICE.NAMESPACE.svc.DOMAIN`` SRV: the Service's named port;
* ``A-B-C-D.NAMESPACE.pod.DOMAIN`` A: the pod address A.B.C.D.

Everything else is NXDOMAIN: queries never leave the machine. Each answer asks
the API (through a one-second cache), so a Service resolves as soon as it exists.

    python3 cluster_dns.py --kubeconfig PATH --listen ADDRESS [--port 53] [--domain cluster.local]
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import struct
import threading
import time
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

_TTL = 5
_CACHE_SECONDS = 1.0


class ClusterRecords:
    def __init__(self, kubeconfig: str, domain: str) -> None:
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=kubeconfig)
        self._core = client.CoreV1Api(api_client)
        self._domain = dns.name.from_text(domain)
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def _read(self, kind: str, namespace: str, name: str) -> Any:
        key = (kind, f"{namespace}/{name}")
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached and now - cached[0] < _CACHE_SECONDS:
                return cached[1]
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "service":
                value = self._core.read_namespaced_service(name, namespace)
            else:
                value = self._core.read_namespaced_endpoints(name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            value = None
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def _service_addresses(self, namespace: str, name: str) -> list[str] | None:
        service = self._read("service", namespace, name)
        if service is None:
            return None
        cluster_ip = service.spec.cluster_ip
        if cluster_ip and cluster_ip != "None":
            return [cluster_ip]
        endpoints = self._read("endpoints", namespace, name)
        addresses: list[str] = []
        for subset in (endpoints.subsets if endpoints else None) or []:
            addresses += [address.ip for address in subset.addresses or []]
        return addresses

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if not qname.is_subdomain(self._domain):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        labels = [label.decode().lower() for label in qname.relativize(self._domain).labels]
        try:
            found = self._lookup(labels, qname, qtype, response)
        except Exception:  # the API is down or refused: SERVFAIL, the resolver retries
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if not found:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _lookup(
        self, labels: list[str], qname: dns.name.Name, qtype: int, response: dns.message.Message
    ) -> bool:
        if len(labels) == 3 and labels[2] == "svc":
            addresses = self._service_addresses(labels[1], labels[0])
            if addresses is None:
                return False
            if qtype in (dns.rdatatype.A, dns.rdatatype.ANY) and addresses:
                response.answer.append(dns.rrset.from_text_list(qname, _TTL, "IN", "A", addresses))
            return True
        if (
            len(labels) == 5
            and labels[4] == "svc"
            and labels[0].startswith("_")
            and labels[1].startswith("_")
        ):
            service = self._read("service", labels[3], labels[2])
            if service is None:
                return False
            port_name, protocol = labels[0][1:], labels[1][1:].upper()
            target = qname.parent().parent()
            records = [
                f"0 100 {port.port} {target}"
                for port in service.spec.ports or []
                if (port.name or "") == port_name and (port.protocol or "TCP") == protocol
            ]
            if not records:
                return False
            if qtype in (dns.rdatatype.SRV, dns.rdatatype.ANY):
                response.answer.append(dns.rrset.from_text_list(qname, _TTL, "IN", "SRV", records))
            return True
        if len(labels) == 3 and labels[2] == "pod":
            parts = labels[0].split("-")
            if len(parts) != 4 or not all(part.isdigit() and int(part) < 256 for part in parts):
                return False
            if qtype in (dns.rdatatype.A, dns.rdatatype.ANY):
                response.answer.append(dns.rrset.from_text_list(qname, _TTL, "IN", "A", [".".join(parts)]))
            return True
        # NAMESPACE.svc, svc, pod: names that exist without records of their own.
        return labels in (["svc"], ["pod"]) or (len(labels) == 2 and labels[1] in ("svc", "pod"))


def _serve_udp(records: ClusterRecords, address: str, port: int) -> socketserver.BaseServer:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            try:
                query = dns.message.from_wire(data)
            except Exception:
                return
            wire = records.answer(query).to_wire(max_size=512 if query.edns < 0 else max(512, query.payload))
            sock.sendto(wire, self.client_address)

    class Server(socketserver.ThreadingMixIn, socketserver.UDPServer):
        daemon_threads = True
        allow_reuse_address = True

    return Server((address, port), Handler)


def _serve_tcp(records: ClusterRecords, address: str, port: int) -> socketserver.BaseServer:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.connection.settimeout(10)
            while True:
                header = self.rfile.read(2)
                if len(header) < 2:
                    return
                data = self.rfile.read(struct.unpack("!H", header)[0])
                try:
                    query = dns.message.from_wire(data)
                except Exception:
                    return
                wire = records.answer(query).to_wire()
                self.wfile.write(struct.pack("!H", len(wire)) + wire)

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True
        allow_reuse_address = True

    return Server((address, port), Handler)


def answers(address: str, name: str, port: int = 53, timeout: float = 1.0) -> bool:
    """True when a server at address answers an A query for `name` (used by `up` to wait)."""
    query = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query.to_wire(), (address, port))
            data = sock.recv(4096)
        except OSError:
            return False
    try:
        return dns.message.from_wire(data).id == query.id
    except Exception:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--domain", default="cluster.local")
    options = parser.parse_args()
    records = ClusterRecords(options.kubeconfig, options.domain)
    servers = [
        _serve_udp(records, options.listen, options.port),
        _serve_tcp(records, options.listen, options.port),
    ]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"cluster DNS on {options.listen}:{options.port} for {options.domain}", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
