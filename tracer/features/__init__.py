"""mtrace.tracer.features: what the tracee sees of the target, one module per feature.

``env`` (the environment), ``files`` with ``shadow`` (the target's files and
their local copies), ``net`` with ``relay`` (outgoing TCP/UDP), ``dns`` (the
target's nameservers); ``remote`` is what their handlers share (the agent
connection, the async side) and ``policy`` the user's config for each feature.
The trap these handlers plug into (backends, outcomes, tracee memory) is the
package above.
"""
