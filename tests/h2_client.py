"""An HTTP/2 client with prior knowledge (h2c, as gRPC speaks inside a cluster),
run as a script by the incoming tests: one connection, a stream per request,
the bodies printed as a JSON list in request order.

    python3 h2_client.py HOST PORT '[["/path", {"header": "value"}], ...]'
"""

import json
import socket
import sys

import h2.connection
import h2.events

host, port, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
sock = socket.create_connection((host, port), timeout=20)
connection = h2.connection.H2Connection()
connection.initiate_connection()
streams = []
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
    data = sock.recv(65536)
    if not data:
        break
    for found in connection.receive_data(data):
        if isinstance(found, h2.events.DataReceived):
            bodies[found.stream_id] += found.data
            connection.acknowledge_received_data(found.flow_controlled_length, found.stream_id)
        elif isinstance(found, (h2.events.StreamEnded, h2.events.StreamReset)):
            ended.add(found.stream_id)
    sock.sendall(connection.data_to_send())
print(json.dumps([bodies[stream_id].decode() for stream_id in streams]))
