"""proxychains4 + microsocks as a peer in the remote group: connect, small HTTP, bulk.

What users run today to send a program's outgoing traffic from another
network: proxychains4 hooks libc's ``connect`` (LD_PRELOAD) on this machine
and hands each connection to a SOCKS server in the target, here ``microsocks``
in the namespace target behind a veth pair
(:meth:`bench.namespace.NamespaceTarget.socks_proxy`, shared with the kv group).
An LD_PRELOAD tool only sees dynamically linked programs, so the workloads are
``bench/loop`` built without ``-static`` (``loop-dynamic``): the same source,
the same requests, the same target and the same run as the remote group's
other variants, whose ratios (latency against direct, bulk against socat)
these rows share.
"""

from __future__ import annotations

from bench import remote
from bench.common import Context, Row, Unavailable, median, run_json

PROXYCHAINS = "proxychains4 + microsocks"
NAMES = ((remote.CONNECT, remote.US), (remote.HTTP_P50, remote.US), (remote.HTTP_P99, remote.US),
         (remote.BULK, remote.MBPS))


def proxychains_rows(ctx: Context) -> list[Row]:
    """The peer's rows of the remote group; n/a rows with the reason if it cannot run."""
    try:
        namespace = ctx.namespace()
        loop = str(ctx.programs()["loop-dynamic"])
        with namespace.socks_proxy() as config:
            prefix = ["proxychains4", "-q", "-f", config]
            settings = ctx.settings
            rows: list[Row] = []
            for op, count, names in (
                    ("connect", settings.remote_calls, {"connect": remote.CONNECT}),
                    ("http", settings.http_requests, {"http": remote.HTTP_P50})):
                argv = [*prefix, loop, op, remote.HOST, str(namespace.http_port), str(count)]
                results = [run_json(argv, timeout=300) for _ in range(settings.runs)]
                rows += remote._latency_rows(PROXYCHAINS, results, names)
            rates = [remote._bulk_rate(run_json([*prefix, loop, "bulk", remote.HOST,
                                                 str(namespace.bulk_port)], timeout=300))
                     for _ in range(settings.runs)]
            rows.append(Row(remote.GROUP, remote.BULK, PROXYCHAINS, median(rates), remote.MBPS,
                            samples=rates))
    except Unavailable as error:
        return [Row.missing(remote.GROUP, name, PROXYCHAINS, unit, str(error))
                for name, unit in NAMES]
    note = "dynamic bench/loop; every connection through microsocks in the target"
    for row in rows:
        row.note = note
    return rows
