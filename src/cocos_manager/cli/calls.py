"""What each verb of `cocos-manager-cli` asks the manager, and what it prints of the answer
(the parser and the entry point are commands.py; CreateVm's verbs are cvm.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from cocos_manager.cli.output import (
    computation_table,
    console_line,
    describe,
    print_message,
    proto_json,
)
from cocos_manager.cli.request import CliError, request_from_files, request_from_manifest
from cocos_manager.cli.verbs import vm_report, watch_power_off
from cocos_manager.config import TlsConfigError, channel_credentials
from cocos_manager.events import MANAGER_SHUTDOWN
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc


def open_channel(options: argparse.Namespace) -> grpc.aio.Channel:
    if options.ca or options.cert or options.key:
        try:
            credentials = channel_credentials(options.ca, options.cert, options.key)
        except TlsConfigError as error:
            raise CliError(str(error)) from None
        return grpc.aio.secure_channel(options.address, credentials)
    return grpc.aio.insecure_channel(options.address)


async def unary(
    options: argparse.Namespace,
    call: Callable[[pb_grpc.ManagerServiceStub], Any],
    request: Message,
    done_text: Callable[[Any], str],
) -> int:
    """Every verb that asks once and prints once: `call` picks the stub's method, given
    `request` with the common --timeout. The answer is `done_text` of it, or with --json one
    JSON line (proto_json, as every --json of the CLI); an answer with no fields (Pause,
    Resume, RemoveVm) prints nothing with --json, as stop's."""
    async with open_channel(options) as channel:
        response = await call(pb_grpc.ManagerServiceStub(channel))(request, timeout=options.timeout)
    if not options.json:
        print(done_text(response), flush=True)
    elif response.DESCRIPTOR.fields:
        print(proto_json(response), flush=True)
    return 0


async def run(options: argparse.Namespace) -> int:
    if options.manifest:
        request = request_from_manifest(options.manifest)
    elif options.algorithm and options.id:
        request = request_from_files(options)
    else:
        raise CliError("run: give --manifest FILE, or --id with --algorithm (and --dataset)")
    if options.ttl is not None:
        request.ttl = options.ttl
    if options.vcpus is not None:
        request.vcpus = options.vcpus
    if options.memory is not None:
        request.memory_mib = options.memory
    return await unary(options, lambda stub: stub.Run, request, describe)


async def stop(options: argparse.Namespace) -> int:
    async with open_channel(options) as channel:
        stub = pb_grpc.ManagerServiceStub(channel)
        watch = None if options.force else await watch_power_off(stub, options.computation_id)
        try:
            await stub.Stop(
                pb.StopRequest(computation_id=options.computation_id, force=options.force),
                timeout=options.timeout,
            )
        finally:
            if watch is not None:  # ended here, before its channel closes
                watch.cancel()
                await asyncio.wait([watch])  # its end, not its cancellation, raised here
    if not options.json:
        print(f"computation {options.computation_id} stopped")
    return 0


STREAM_ENDED = 3
"""Exit status of `events` when the manager ended the stream (it shuts down)."""


async def pause(options: argparse.Namespace) -> int:
    computation_id = options.computation_id
    return await unary(
        options,
        lambda stub: stub.Pause,
        pb.PauseRequest(computation_id=computation_id),
        lambda _: f"computation {computation_id} paused",
    )


async def resume(options: argparse.Namespace) -> int:
    computation_id = options.computation_id
    return await unary(
        options,
        lambda stub: stub.Resume,
        pb.ResumeRequest(computation_id=computation_id),
        lambda _: f"computation {computation_id} resumed",
    )


async def show(options: argparse.Namespace) -> int:
    return await unary(
        options,
        lambda stub: stub.Get,
        pb.GetRequest(computation_id=options.computation_id),
        lambda response: vm_report(response, argv_lines=options.verbose),
    )


async def events(options: argparse.Namespace) -> int:
    async with open_channel(options) as channel:
        request = pb.EventsRequest(computation_id=options.computation_id or "")
        if options.since is not None:
            request.since = options.since
        stream = pb_grpc.ManagerServiceStub(channel).Events(request)
        # The server sends the headers once the subscription is registered: from here on
        # nothing published is missed (a script may start its Run after this line).
        await stream.initial_metadata()
        if stream.done():  # refused (e.g. RESOURCE_EXHAUSTED): headers and status came at once
            async for _ in stream:  # raises the status, as any failed call does
                pass
        which = (
            f"computation {options.computation_id}"
            if options.computation_id
            else "every computation"
        )
        print(
            f"cocos-manager-cli: subscribed to the events of {which} at {options.address}",
            file=sys.stderr,
            flush=True,
        )
        count = 0
        last: pb.ClientStreamMessage | None = None
        last_seq = options.since
        async for message in stream:
            print_message(message, options.json)
            last = message
            if message.seq:  # 0: a notice of this stream (events-lost), not a published one
                last_seq = message.seq
            count += 1
            if options.count and count >= options.count:
                stream.cancel()
                return 0
    # Only the manager ends a stream, when it shuts down: that is no success for a follower.
    print(f"cocos-manager-cli: events: {stream_end(last, last_seq)}", file=sys.stderr)
    return STREAM_ENDED


def stream_end(last: pb.ClientStreamMessage | None, last_seq: int | None) -> str:
    """Why the stream ended (the manager's `manager-shutdown` notice, its last message, says
    which VMs it left running), and how to go on from where it ended."""
    event = last.agent_event if last is not None else None
    if event is not None and event.event_type == MANAGER_SHUTDOWN and event.status == "complete":
        left = json.loads(event.details or b"{}").get("left_running") or []
        words = "the manager shut down and ended the stream"
        words += f"; VMs left running: {', '.join(left)}" if left else "; no VM left running"
    else:
        words = "the manager ended the stream without saying why"
    if last_seq:
        words += f"; once it is back, resume with --since {last_seq}"
    return words


async def attestation_policy(options: argparse.Namespace) -> int:
    async with open_channel(options) as channel:
        response = await pb_grpc.ManagerServiceStub(channel).AttestationPolicy(
            pb.AttestationPolicyRequest(computation_id=options.computation_id),
            timeout=options.timeout,
        )
    sys.stdout.write(response.info.decode())
    return 0


async def list_computations(options: argparse.Namespace) -> int:
    return await unary(
        options,
        lambda stub: stub.List,
        pb.ListRequest(),
        lambda response: (
            computation_table(response.computations) if response.computations else "no computations"
        ),
    )


async def logs(options: argparse.Namespace) -> int:
    request = pb.LogsRequest(
        computation_id=options.computation_id, tail=options.lines, follow=options.follow
    )
    async with open_channel(options) as channel:
        stream = pb_grpc.ManagerServiceStub(channel).Logs(
            request, timeout=None if options.follow else options.timeout
        )
        async for log in stream:
            if options.json:
                print(proto_json(log), flush=True)
            else:
                print(console_line(log), flush=True)
    return 0
