"""`make demo-dialout`: the seed README's "Verifying VM launch", with this port.

Three parties, as in the README's three terminals: a computations server of the seed's era
(tests/support/computations_server.py, generated from the seed's proto; it pushes the seed's
sample request to every Manager that connects), the daemon started with MANAGER_GRPC_URL
pointing at it, and the checks: what the server received (run_res, events, console lines),
the QEMU process (`ps`), and the agent in the guest answering on the forwarded port. Then the
server restarts and the Manager reconnects. Logs go to build/demo-dialout/.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.computations_server import (  # noqa: E402
    ComputationsServer,
    Message,
    event_for,
    log_for,
    run_res_for,
)

DEMO = ROOT / "build" / "demo-dialout"
BOOT_TIMEOUT = 180.0


def say(text: str) -> None:
    print(f"demo-dialout: {text}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def show(message: Message) -> str:
    """One line per message, as the seed's server printed them ("received runRes" ...)."""
    name = next(iter(message))
    body = message[name]
    if name == "run_res":
        return f"received runRes: agent_port={body['agent_port']} computation_id={body['computation_id']}"
    if name == "agent_event":
        return f"received agent event: {body.get('event_type')} {body.get('status')}"
    return f"received agent log: {body.get('message', '')[:100]}"


def start_manager(env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(DEMO / "daemon.log", "wb") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("cocos-manager"))],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def children_of(pid: int) -> str:
    """What `ps aux | grep qemu-system-x86_64` shows in the README: the daemon's QEMU."""
    ps = ["ps", "-o", "pid,args", "--ppid", str(pid)]
    return subprocess.run(ps, text=True, capture_output=True, check=False).stdout


async def agent_answer(port: int) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOOT_TIMEOUT
    while loop.time() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = await asyncio.wait_for(reader.read(), 3)
            writer.close()
            if data:
                return data
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.3)
    raise SystemExit(f"demo-dialout: FAILED: nothing served on port {port}")


async def main() -> None:
    guest = Path(os.environ.get("GUEST_DIR", ROOT / "build" / "guest"))
    guest = guest if guest.is_absolute() else ROOT / guest
    DEMO.mkdir(parents=True, exist_ok=True)
    # The files the README's dial-out example names.
    data, algo = ROOT / "docs" / "examples" / "iris.csv", ROOT / "docs" / "examples" / "lin_reg.py"

    server = ComputationsServer(DEMO / "computations.log", seed_request=(str(data), str(algo)))
    await server.start()
    say(f"computations server (seed's proto) listening on {server.url}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANAGER_", "COCOS_"))}
    env.update(
        {
            "MANAGER_GRPC_URL": server.url,
            "MANAGER_GRPC_HOST": "127.0.0.1",
            "MANAGER_GRPC_PORT": str(free_port()),  # the daemon's own server, beside the dial-out
            "MANAGER_LOG_LEVEL": "info",
            "MANAGER_STATE_DIR": str(DEMO / "state"),
            "MANAGER_QEMU_ENABLE_KVM": "false",
            "MANAGER_QEMU_ENABLE_SEV_SNP": "false",
            "MANAGER_QEMU_CPU": "max",
            "MANAGER_QEMU_SMP_COUNT": "1",
            "MANAGER_QEMU_MEMORY_SIZE": "512M",
            "MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg",
            "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(guest / "bzImage"),
            "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(guest / "rootfs.cpio.gz"),
            "MANAGER_QEMU_TMP_FILE_LOC": str(DEMO / "vms"),
            "MANAGER_QEMU_VSOCK_VNC": "70",
            "COCOS_JAEGER_URL": f"http://127.0.0.1:{free_port()}/api/traces",
        }
    )
    say(f"starting the Manager: MANAGER_GRPC_URL={server.url} cocos-manager")
    daemon = start_manager(env)
    try:
        res = await server.wait_for(run_res_for("1"), BOOT_TIMEOUT, "run_res")
        for message in server.received:
            say("  server: " + show(message))
        port = int(res["run_res"]["agent_port"])
        ps = children_of(daemon.pid)
        for line in ps.splitlines():
            say("  ps: " + line[:160] + (" ..." if len(line) > 160 else ""))
        manifest = await agent_answer(port)
        say(f"the agent in the guest answers on 127.0.0.1:{port}: {manifest[:120].decode()}...")
        await server.wait_for(log_for("1", "BOOTED 1"), 60, "the guest's console line")
        say("  server: received agent log: BOOTED 1 (the guest's serial console)")
        json.loads(manifest)

        say("restarting the computations server ...")
        await server.stop()
        lines = len(server.lines)
        await server.start()
        await server.wait_line(lambda line: "connected" in line, 60, "a new connection", lines)
        failed = await server.wait_for(
            event_for("1", "vm-provision", "failed"), 30, "answer", lines
        )
        say("  Manager reconnected; the server pushed its request again and got: " + show(failed))
        say("  (computation 1 is still running: the Manager answers ALREADY_EXISTS, and lives on)")
        say("done")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        await server.stop()
        say(f"Manager stopped (exit {code}), its VM with it; logs in {DEMO.relative_to(ROOT)}/")


if __name__ == "__main__":
    asyncio.run(main())
