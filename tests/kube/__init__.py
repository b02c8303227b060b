"""mtrace's test cluster rig: a real single-node Kubernetes 1.20 on this machine.

Entry point: ``python3 tests/kube/rig.py up|down|status|kubeconfig|images``.
Modules: `common` (paths, ports, helpers), `build` (source and binaries, cached),
`pki` (certificates), `processes` (pid files), `host` (what the rig changes on
the machine and how `down` undoes it), `cluster` (up/down/status), `cluster_dns`
(the cluster's DNS server), `images` (offline images), `runc_wrapper.py`,
`workloads` (test objects through the `kubernetes` client), `fixtures` (pytest).
"""
