"""An HTTP/2 client (h2c, as gRPC speaks inside a cluster), run as a script by
the incoming tests: one connection, a stream per request, the bodies printed as
a JSON list in request order.

    python3 h2_client.py HOST PORT '[["/path", {"header": "value"}], ...]' [upgrade]

With prior knowledge by default; with ``upgrade`` the first request is an
HTTP/1.1 ``Upgrade: h2c`` request that becomes stream 1 (exit status 1 and the
answer when the server does not switch).
"""

import json
import socket
import sys

import h2.connection
import h2.events

host, port, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
upgrade = sys.argv[4:] == ["upgrade"]
sock = socket.create_connection((host, port), timeout=20)
connection = h2.connection.H2Connection()
data = b""
streams = []
if upgrade:
    settings = connection.initiate_upgrade_connection().decode()
    path, headers = requests.pop(0)
    extra = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: target\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  f"Upgrade: h2c\r\nHTTP2-Settings: {settings}\r\n{extra}\r\n").encode())
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, data = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 "):
        sys.exit(f"no switch: {head!r} {data!r}")
    streams.append(1)
else:
    connection.initiate_connection()
for path, headers in requests:
    stream_id = connection.get_next_available_stream_id()
    connection.send_headers(stream_id, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                        (":authority", "target"), *headers.items()],
                            end_stream=True)
    streams.append(stream_id)
sock.sendall(connection.data_to_send())
bodies = {stream_id: b"" for stream_id in streams}
ended = set()
while len(ended) < len(streams):
    if not data:
        data = sock.recv(65536)
        if not data:
            break
    for found in connection.receive_data(data):
        if isinstance(found, h2.events.DataReceived):
            bodies[found.stream_id] += found.data
            connection.acknowledge_received_data(found.flow_controlled_length, found.stream_id)
        elif isinstance(found, (h2.events.StreamEnded, h2.events.StreamReset)):
            ended.add(found.stream_id)
    data = b""
    sock.sendall(connection.data_to_send())
print(json.dumps([bodies[stream_id].decode() for stream_id in streams]))
