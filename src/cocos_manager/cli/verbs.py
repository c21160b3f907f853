"""What the operator verbs of `cocos-manager-cli` print beyond a one-line answer: `show`'s
report of one VM, and `stop`'s word that it waits for the guest to power off, and how long."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cocos_manager.cli.output import printable
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc

SUBSCRIBE_TIMEOUT = 5.0
"""How long `stop` waits for its event stream before it stops without it (the word on the
power-off is a courtesy: a manager at its stream cap still gets the Stop)."""


async def watch_power_off(
    stub: pb_grpc.ManagerServiceStub, computation_id: str
) -> asyncio.Task[None] | None:
    """Subscribed before the Stop is sent, so its vm-stop `starting` event cannot be missed;
    the task prints, on stderr, how long the daemon gives the guest to power off."""
    stream = stub.Events(pb.EventsRequest(computation_id=computation_id))
    try:
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            await stream.initial_metadata()
    except (TimeoutError, grpc.aio.AioRpcError):
        stream.cancel()
        return None
    return asyncio.get_running_loop().create_task(_announce(stream, computation_id))


async def _announce(
    stream: grpc.aio.UnaryStreamCall[pb.EventsRequest, pb.ClientStreamMessage],
    computation_id: str,
) -> None:
    try:
        async for message in stream:
            event = message.agent_event
            if not (event.originator == "manager" and event.event_type == "vm-stop"):
                continue
            if event.status == "starting":
                grace = _details(event.details).get("powerdown_grace")
                if grace:
                    print(
                        f"cocos-manager-cli: waiting up to {grace} for the guest of "
                        f"{computation_id} to power off (MANAGER_QEMU_POWERDOWN_GRACE), then "
                        "QEMU is ended; stop --force does not wait",
                        file=sys.stderr,
                        flush=True,
                    )
                return
    except grpc.aio.AioRpcError:
        return
    finally:
        stream.cancel()


def _details(raw: bytes) -> dict[str, object]:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _time(stamp: Timestamp) -> str:
    moment = datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _guest_cid(vm: pb.GetResponse) -> str:
    """A VM on the fw_cfg channel has no vsock device: a CID would mean nothing."""
    if vm.settings.get("MANAGER_QEMU_AGENT_CHANNEL") == "fw_cfg" or not vm.computation.guest_cid:
        return "- (fw_cfg: no vsock device)"
    return str(vm.computation.guest_cid)


def vm_report(vm: pb.GetResponse, *, argv_lines: bool = False) -> str:
    """`show`: one fact a line, as virsh dominfo; `argv_lines` (--verbose) adds QEMU's
    command line one argument a line and every setting the VM was launched with."""
    c = vm.computation
    state = c.state + (f" ({vm.paused_by})" if vm.paused_by else "")
    rows = [
        ("id", c.computation_id),
        ("state", state),
        ("pid", str(c.pid) if c.pid else "-"),
        ("agent port", c.agent_port),
        ("guest cid", _guest_cid(vm)),
        ("vnc display", f":{c.vnc_display}"),
        ("started", _time(c.started_at) if c.HasField("started_at") else "-"),
        ("expires", _time(c.expires_at) if c.HasField("expires_at") else "-"),
        ("ttl", vm.ttl or "-"),
        ("adopted", "yes" if c.adopted else "no"),
        ("vcpus", str(vm.vcpus)),
        ("memory", f"{vm.memory_mib} MiB"),
        ("confidential", vm.confidential_mode),
    ]
    rows += [(f"  {name}", value) for name, value in sorted(vm.binding.items())]
    rows.append(("files", "-" if not vm.files else ""))
    rows += [(f"  {name}", path) for name, path in sorted(vm.files.items())]
    if vm.HasField("last_exit"):
        e = vm.last_exit
        rows += [
            ("ended", _time(e.ended_at)),
            ("  reason", e.reason),
            ("  event", f"{e.event_type} {e.status}".strip() or "- (none published)"),
            ("  exit", e.exit or "-"),
        ]
        if e.error:
            rows.append(("  error", printable(e.error)))
        if e.stop_error:
            rows.append(("  left running", printable(e.stop_error)))
        rows += [("  last line", printable(line)) for line in e.last_lines[-5:]]
    if not argv_lines:
        rows.append(("qemu", shlex.join(vm.qemu_argv) if vm.qemu_argv else "-"))
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name + ':':<{width}}{value}".rstrip() for name, value in rows]
    if argv_lines:
        lines.append("qemu:")
        lines += [f"  {shlex.quote(arg)}" for arg in vm.qemu_argv]
        lines.append("settings:")
        lines += [f"  {name}={shlex.quote(value)}" for name, value in sorted(vm.settings.items())]
    return "\n".join(lines)
