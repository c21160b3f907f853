#!/usr/bin/env bash
# `make demo`: the Manager doing its job on a real VM, one step at a time.
#
# Starts the daemon (QEMU under TCG, no SEV, the fw_cfg channel: what runs on any Debian
# machine, as the README's TCG block in "Run your own daemon"), runs one computation with
# cocos-manager-cli, shows the agent in the guest answering on the forwarded host port and
# the events that came in, then stops the computation and the daemon. Needs `make install`
# and `make guest` first (`make demo` does both). Everything it writes goes to build/demo/;
# it can be run again at once.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
[[ $VENV == /* ]] || VENV=$ROOT/$VENV
GUEST_DIR=${GUEST_DIR:-$ROOT/build/guest}
[[ $GUEST_DIR == /* ]] || GUEST_DIR=$ROOT/$GUEST_DIR
DEMO=$ROOT/build/demo
PY=$VENV/bin/python
MANAGER=$VENV/bin/cocos-manager
CLI=$VENV/bin/cocos-manager-cli
ID=demo-1
BOOT_TIMEOUT=180 # seconds; a boot takes about 10 s under TCG

# The user's terminal, kept on fds 3 and 4: messages from a trap must reach it even when the
# trap interrupts a command whose output goes to a file.
exec 3>&1 4>&2
say() { printf 'demo: %s\n' "$*" >&3; }
indent() { sed 's/^/demo:   | /' >&3; }
fail() {
    printf 'demo: FAILED: %s\n' "$*" >&4
    if [[ $DAEMON_STARTED == 1 && -s $DEMO/daemon.log ]]; then
        printf 'demo: the last lines of %s:\n' "${DEMO#"$ROOT"/}/daemon.log" >&4
        tail -n 15 "$DEMO/daemon.log" | sed 's/^/demo:   | /' >&4
    fi
    exit 1
}

DAEMON_PID=""
DAEMON_STARTED=0
EVENTS_PID=""
DONE=0
cleanup() {
    local status=$?
    trap - EXIT
    if [[ -n $WAIT_PID ]]; then kill "$WAIT_PID" 2>/dev/null || true; fi
    if [[ -n $EVENTS_PID ]] && kill -0 "$EVENTS_PID" 2>/dev/null; then
        kill "$EVENTS_PID" 2>/dev/null || true
        wait "$EVENTS_PID" 2>/dev/null || true
    fi
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        say "cleaning up: stopping the daemon (pid $DAEMON_PID), which stops its VMs"
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        for _ in $(seq 1 150); do
            kill -0 "$DAEMON_PID" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$DAEMON_PID" 2>/dev/null; then
            say "cleaning up: the daemon did not stop in 30 s; killing it"
            kill -KILL "$DAEMON_PID" 2>/dev/null || true
        fi
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    # A QEMU of this demo outlives a killed daemon (own session); it names our VM folder.
    local leftover
    leftover=$(pgrep -f -- "$DEMO/vms/" 2>/dev/null || true)
    if [[ -n $leftover ]]; then
        say "cleaning up: killing QEMU left behind: $(echo "$leftover" | tr '\n' ' ')"
        kill -KILL $leftover 2>/dev/null || true
    fi
    rm -f "$DEMO/daemon.pid"
    if [[ $DONE != 1 && $status == 0 ]]; then status=1; fi
    exit "$status"
}
trap cleanup EXIT
trap 'fail "unexpected error at line $LINENO: $BASH_COMMAND"' ERR
trap 'printf "\ndemo: interrupted\n" >&4; exit 130' INT TERM

# The two waits, in Python with the venv (grpc is there). Run through bg_wait: bash handles a
# signal only between foreground commands, and these can take minutes.
read -r -d '' HEALTH_PY <<'PY' || true
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

address, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
with grpc.insecure_channel(address) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("demo: the daemon exited during start-up")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.2)
sys.exit("demo: no SERVING answer within 30 s")
PY
read -r -d '' AGENT_PY <<'PY' || true
import os, socket, sys, time

port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    os.kill(pid, 0)  # the daemon must still be there
    data = b""
    try:
        # Until the guest listens, QEMU's forwarder accepts and closes with nothing: not ready.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.settimeout(3)
            while chunk := conn.recv(65536):
                data += chunk
    except OSError:
        pass
    if data:
        sys.stdout.buffer.write(data)
        sys.exit(0)
    time.sleep(0.3)
sys.exit(f"demo: nothing served on 127.0.0.1:{port} within {timeout:g} s")
PY
WAIT_PID=""
bg_wait() {
    local rc=0
    "$@" &
    WAIT_PID=$!
    wait "$WAIT_PID" || rc=$?
    WAIT_PID=""
    return "$rc"
}

# -- 1. prerequisites ------------------------------------------------------------------------
say "checking prerequisites"
[[ -x $MANAGER && -x $CLI && -x $PY ]] || fail "$VENV has no cocos-manager: run \`make install\` (or \`make demo\`)"
for f in "$GUEST_DIR/bzImage" "$GUEST_DIR/rootfs.cpio.gz"; do
    [[ -f $f ]] || fail "test guest missing ($f): run \`make guest\` (or \`make demo\`)"
done
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 not found: run \`make install\`"
for f in /usr/share/OVMF/OVMF_CODE.fd /usr/share/OVMF/OVMF_VARS.fd; do
    [[ -f $f ]] || fail "$f missing (Debian package ovmf): run \`make install\`"
done

# A daemon of an interrupted earlier demo: stop it (only if it really is ours).
mkdir -p "$DEMO"
if [[ -f $DEMO/daemon.pid ]]; then
    old=$(cat "$DEMO/daemon.pid")
    if [[ $old =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$old/cmdline" 2>/dev/null | grep -q cocos-manager; then
        say "stopping the daemon an earlier, interrupted demo left running (pid $old)"
        kill -TERM "$old" 2>/dev/null || true
        for _ in $(seq 1 150); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$DEMO/daemon.pid"
fi
stale=$(pgrep -f -- "$DEMO/vms/" 2>/dev/null || true)
if [[ -n $stale ]]; then
    say "killing QEMU an earlier, interrupted demo left running: $(echo "$stale" | tr '\n' ' ')"
    kill -KILL $stale 2>/dev/null || true
fi
rm -rf "$DEMO/vms" "$DEMO/state" "$DEMO"/*.log "$DEMO"/*.json "$DEMO/data"
mkdir -p "$DEMO/vms" "$DEMO/state" "$DEMO/data"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC_PORT=$(free_port)
ADDRESS=127.0.0.1:$GRPC_PORT

# -- 2. the daemon ---------------------------------------------------------------------------
say "starting the daemon on $ADDRESS: QEMU under TCG (no KVM, no SEV), 1 vCPU, 512M,"
say "  manifest through fw_cfg; log in ${DEMO#"$ROOT"/}/daemon.log"
say "  each VM's VNC display and agent port on 127.0.0.1 only (MANAGER_QEMU_VNC_ADDR,"
say "  MANAGER_QEMU_HOST_FWD_ADDR; README: \"What is exposed\"): VNC at 127.0.0.1:5900+N, N the"
say "  vnc_display of the vm-provision event (from elsewhere: an SSH tunnel)"
(
    cd "$DEMO"
    export MANAGER_LOG_LEVEL=info
    export MANAGER_GRPC_HOST=127.0.0.1
    export MANAGER_GRPC_PORT=$GRPC_PORT
    export MANAGER_STATE_DIR=$DEMO/state
    export MANAGER_QEMU_ENABLE_KVM=false
    export MANAGER_QEMU_ENABLE_SEV_SNP=false
    export MANAGER_QEMU_CPU=max
    export MANAGER_QEMU_SMP_COUNT=1
    export MANAGER_QEMU_MEMORY_SIZE=512M
    export MANAGER_QEMU_AGENT_CHANNEL=fw_cfg
    export MANAGER_QEMU_DISK_IMG_KERNEL_FILE=$GUEST_DIR/bzImage
    export MANAGER_QEMU_DISK_IMG_ROOTFS_FILE=$GUEST_DIR/rootfs.cpio.gz
    export MANAGER_QEMU_TMP_FILE_LOC=$DEMO/vms
    export MANAGER_QEMU_VSOCK_VNC=60
    # As the README's "What is exposed" says: the VM's screen (VNC, no password) and the
    # agent's forwarded port on loopback only, not on every interface.
    export MANAGER_QEMU_VNC_ADDR=127.0.0.1
    export MANAGER_QEMU_HOST_FWD_ADDR=127.0.0.1
    # Nobody listens there; a trace collector that is down never slows the daemon.
    export COCOS_JAEGER_URL=http://127.0.0.1:$(free_port)/api/traces
    exec "$MANAGER" 3>&- 4>&-
) >"$DEMO/daemon.log" 2>&1 &
DAEMON_PID=$!
DAEMON_STARTED=1
echo "$DAEMON_PID" >"$DEMO/daemon.pid"

say "waiting for the daemon's gRPC health check to say SERVING"
bg_wait "$PY" -c "$HEALTH_PY" "$ADDRESS" "$DAEMON_PID" || fail "the daemon did not become healthy"
say "the daemon is up (pid $DAEMON_PID)"

# -- 3. events -------------------------------------------------------------------------------
say "following Events in the background: cocos-manager-cli events > ${DEMO#"$ROOT"/}/events.log"
"$CLI" events --address "$ADDRESS" >"$DEMO/events.log" 2>&1 3>&- 4>&- &
EVENTS_PID=$!
# The CLI says "subscribed" on stderr once nothing published can be missed any more.
for _ in $(seq 1 100); do
    grep -q "subscribed" "$DEMO/events.log" && break
    kill -0 "$EVENTS_PID" 2>/dev/null || fail "cocos-manager-cli events exited: $(cat "$DEMO/events.log")"
    sleep 0.1
done
grep -q "subscribed" "$DEMO/events.log" || fail "cocos-manager-cli events did not subscribe: $(cat "$DEMO/events.log")"

# -- 4. a computation ------------------------------------------------------------------------
printf 'x,y\n1,2\n3,4\n' >"$DEMO/data/dataset.csv"
printf 'import sys\nprint(sum(1 for _ in open(sys.argv[1])))\n' >"$DEMO/data/algorithm.py"
say "made a dataset and an algorithm in ${DEMO#"$ROOT"/}/data/ (the manifest carries their SHA3-256)"
say "running: cocos-manager-cli run --id $ID --algorithm data/algorithm.py --dataset data/dataset.csv"
bg_wait "$CLI" run --address "$ADDRESS" --json --id "$ID" --name "Cocos Manager demo" \
    --algorithm "$DEMO/data/algorithm.py" --dataset "$DEMO/data/dataset.csv" \
    >"$DEMO/run.json" 2>"$DEMO/run.err" || fail "Run failed: $(cat "$DEMO/run.err")"
AGENT_PORT=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["agent_port"])' "$DEMO/run.json") \
    || fail "cannot read the agent port from the Run answer: $(cat "$DEMO/run.json")"
QEMU_PID=$(pgrep -P "$DAEMON_PID" -f -- "hostfwd=tcp:127.0.0.1:$AGENT_PORT-" | head -n1 || true)
say "Run answered: the agent's port 7002 in the guest is forwarded to host port $AGENT_PORT"
say "  (QEMU pid ${QEMU_PID:-?}; per-VM files in ${DEMO#"$ROOT"/}/vms: $(ls "$DEMO/vms" | wc -l))"

# -- 5. the agent answers --------------------------------------------------------------------
say "waiting for the guest to boot and its agent to listen (10-15 s under TCG)"
bg_wait "$PY" -c "$AGENT_PY" "$AGENT_PORT" "$BOOT_TIMEOUT" "$DAEMON_PID" >"$DEMO/agent-answer.json" \
    || fail "the agent did not answer on 127.0.0.1:$AGENT_PORT"
say "the agent on 127.0.0.1:$AGENT_PORT answered ($(wc -c <"$DEMO/agent-answer.json") bytes):"
"$PY" -m json.tool --compact "$DEMO/agent-answer.json" | indent \
    || fail "the agent's answer is not JSON: $(head -c 300 "$DEMO/agent-answer.json")"
handed=$(ls "$DEMO"/vms/agent-config-*.json 2>/dev/null | head -n1 || true)
if [[ -n $handed ]] && cmp -s "$handed" "$DEMO/agent-answer.json"; then
    say "  byte for byte the manifest the Manager handed to the guest (${handed#"$ROOT"/})"
else
    fail "the agent's answer differs from the manifest the Manager wrote (${handed:-none found})"
fi

# -- 6. events -------------------------------------------------------------------------------
for _ in $(seq 1 25); do grep -q "SERVING $ID" "$DEMO/events.log" && break; sleep 0.2; done
grep -q "BOOTED $ID" "$DEMO/events.log" || fail "the guest's 'BOOTED $ID' line never came on Events"
serial=$(grep -c '\] log ' "$DEMO/events.log" || true)
say "events so far (the Manager's own, and the guest's agent lines from its serial console):"
grep -E '\] event |BOOTED |SERVING ' "$DEMO/events.log" | cut -c1-150 | indent
say "  (+ $((serial - 2)) more serial lines from the guest's boot in ${DEMO#"$ROOT"/}/events.log)"

# -- 7. stop ---------------------------------------------------------------------------------
say "stopping the computation: cocos-manager-cli stop $ID"
out=$("$CLI" stop --address "$ADDRESS" "$ID" 2>&1) || fail "Stop failed: $out"
echo "$out" | indent
if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    fail "QEMU (pid $QEMU_PID) is still there after Stop"
fi
[[ -z $(ls -A "$DEMO/vms") ]] || fail "per-VM files left after Stop: $(ls "$DEMO/vms")"
for _ in $(seq 1 25); do grep -q 'vm-stop: complete' "$DEMO/events.log" && break; sleep 0.2; done
grep -E '\] event manager/vm-stop' "$DEMO/events.log" | indent
say "QEMU is gone and the VM's files in ${DEMO#"$ROOT"/}/vms are removed"

# -- 8. the daemon stops ---------------------------------------------------------------------
say "stopping the daemon with SIGTERM, as systemd does"
kill "$EVENTS_PID" 2>/dev/null || true
wait "$EVENTS_PID" 2>/dev/null || true
EVENTS_PID=""
kill -TERM "$DAEMON_PID"
if wait "$DAEMON_PID"; then status=0; else status=$?; fi
DAEMON_PID=""
rm -f "$DEMO/daemon.pid"
[[ $status == 0 ]] || fail "the daemon exited with status $status"
say "the daemon exited with status 0"
say "done. Logs: ${DEMO#"$ROOT"/}/daemon.log (the daemon's JSON log), ${DEMO#"$ROOT"/}/events.log"
DONE=1
