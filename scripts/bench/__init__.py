"""`make bench`: how much the manager adds to QEMU, side by side with a baseline in the same run.

Every figure is the median of at least five repetitions (one with --quick) with min and max,
next to a baseline measured in the same run, with the ratio, the target and pass/fail. The
real daemon (`.venv/bin/cocos-manager`) runs as a subprocess configured by environment
variables and is called over loopback gRPC, with the real qemu-system-x86_64 under TCG with
OVMF and the test guest (build/guest) wherever QEMU itself matters:

1. run_overhead   Run RPC latency (p50, p95) vs the same QEMU argv started directly, waiting
                  for the same readiness signal (QMP on an inherited listening socket:
                  greeting, qmp_capabilities, query-status = running).
2. image_size     Run latency with a 512 MiB rootfs (real bytes, not sparse) vs the 1.1 MiB
                  test rootfs, both with the real bzImage; checks the per-VM links.
3. burst          N concurrent Runs (32; 8 with --quick): all succeed with distinct ports, CIDs
                  and VNC displays; wall time vs the same N argvs started at once by a client
                  (one thread each, same readiness); N x one Run alone is in the JSON.
4. events         agent messages/s through the framed agent protocol (a socketpair standing in
                  for vsock, the agent in a process of its own) into AgentEventListener.serve
                  of the daemon's own wiring (daemon.DaemonRunner), out to a gRPC Events
                  subscriber in the bench; vs a bare grpc.aio server-stream of the same messages. p99
                  latency at a fixed rate.
5. crash          SIGKILL of QEMU to `vm-exit` on the Events stream, vs a parent's waitpid.
6. footprint      exec to health SERVING and idle RSS (vs a bare grpc.aio health server), and
                  RSS / CPU while supervising 50 VMs (stand-in QEMU, tests/support/fake_qemu.py).
7. records        Run latency with the VM records made durable (fsync) on the disk, vs the same
                  daemon settings with the state directory on tmpfs, Runs alternating.
8. fleet          a daemon supervising 200 VMs (stand-in QEMU) beside one supervising 1: RSS,
                  idle CPU, List latency, a Run among them, Events fan-out to 16 subscribers.

Output: a table on stdout and one JSON document, also written to build/bench/latest.json
(progress on stderr). `events-server` and `agent-feeder` are the helper processes of figure 4.

The package: report.py (figures, statistics, the table), common.py (paths, images, the
request), daemon.py (the real daemon through tests/support/daemon_process.py, the helper the
tests and the soak use), baselines.py (direct QEMU, the bare health server), figures/ (one
module per figure), events_server.py (figure 4's helper processes), __main__.py (the plan).
"""
