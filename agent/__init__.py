"""mtrace.agent: the remote side of mtrace and the wire protocol it speaks."""
