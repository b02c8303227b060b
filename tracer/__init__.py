"""mtrace.tracer: the trap (exec helper, seccomp/ptrace backends) and its handlers."""
