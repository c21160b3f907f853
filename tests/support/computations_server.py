#!/usr/bin/env python3
"""A computations server of the seed's era, in a process of its own, for tests and the demo.

The Manager of the seed's README dials a computations server and serves its `Process` stream.
This server is generated at start from `seed_proto/manager.proto` alone (the seed's wire
contract) and imports nothing of cocos_manager: it cannot share a class, a descriptor or a
mistake with the daemon it drives. It runs in its own process because the daemon's own proto
defines the same `manager.*` names, which one protobuf descriptor pool cannot hold twice.

    python tests/support/computations_server.py --port 7001 [--cert F --key F [--client-ca F]]
        [--seed-request DATA ALGO [--attested-tls]]

Stdout carries one JSON document per line: {"listening": port} once serving, then
{"connected": peer}, {"received": message, "peer": peer} (message as protobuf's JSON mapping
with the proto's field names), {"sent": request_id, "peer": peer}, {"ended": peer, "why": ...}.
When stdin is a pipe (a test drives it), it takes JSON lines {"push": ComputationRunReq as
JSON}: the request goes to the Manager connected last, or to the next one to connect;
{"stall": true} stops reading what Managers send (flow control then holds them back),
{"stall": false} resumes; end of stdin stops the server. Otherwise (a terminal, /dev/null, a
file, no stdin at all: an operator running the README's example) stdin is not read, and
Ctrl-C or SIGTERM stops the server.

`--seed-request` pushes the seed's own test server's request on every connection (id "1", one
dataset and the algorithm hashed with SHA3-256, agent port 7002, log level debug), as
`go run ./test/computations/main.go <data> <algo>` does; the two files are read (and hashed)
at start: one that cannot be read stops the server with one line naming it.

`ComputationsServer` (below) drives such a process from a test's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
SEED_PROTO = HERE / "seed_proto" / "manager.proto"

Message = dict[str, Any]


# -- the server process --------------------------------------------------------------------


def load_seed_stubs() -> tuple[ModuleType, ModuleType]:
    """manager_pb2 and manager_pb2_grpc generated now, by protoc, from the seed's proto."""
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="seed-proto-")
    try:
        include = str(Path(grpc_tools.__file__).parent / "_proto")
        code = protoc.main(
            [
                "protoc",
                f"-I{SEED_PROTO.parent}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                SEED_PROTO.name,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {SEED_PROTO} ({code})")
        sys.path.insert(0, out)
        try:
            return importlib.import_module("manager_pb2"), importlib.import_module(
                "manager_pb2_grpc"
            )
        finally:
            sys.path.remove(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def emit(document: Message) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def seed_request(pb: ModuleType, hashes: tuple[bytes, bytes], attested_tls: bool) -> Any:
    data_hash, algo_hash = hashes
    return pb.ComputationRunReq(
        id="1",
        name="sample computation",
        description="sample description",
        datasets=[pb.Dataset(id="1", provider="provider1", hash=data_hash)],
        algorithm=pb.Algorithm(id="1", provider="provider1", hash=algo_hash),
        result_consumers=["consumer1"],
        agent_config=pb.AgentConfig(port="7002", log_level="debug", attested_tls=attested_tls),
    )


async def serve(options: argparse.Namespace) -> None:
    import grpc
    from google.protobuf import json_format

    pb, pb_grpc = load_seed_stubs()
    pending: list[Any] = []
    sessions: list[asyncio.Queue[Any]] = []
    reading = asyncio.Event()  # cleared by {"stall": true}: a server that stops reading
    reading.set()

    def dispatch() -> None:
        while pending and sessions:
            sessions[-1].put_nowait(pending.pop(0))

    class Servicer(pb_grpc.ManagerServiceServicer):  # type: ignore[misc,name-defined]
        async def Process(
            self, request_iterator: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[Any]:
            peer = context.peer()
            outgoing: asyncio.Queue[Any] = asyncio.Queue()
            emit({"connected": peer})
            if options.seed_hashes:
                outgoing.put_nowait(seed_request(pb, options.seed_hashes, options.attested_tls))
            sessions.append(outgoing)
            dispatch()

            async def read() -> None:
                why = "the Manager half-closed the stream"
                try:
                    async for message in request_iterator:
                        await reading.wait()
                        as_json = json_format.MessageToDict(
                            message, preserving_proto_field_name=True
                        )
                        emit({"received": as_json, "peer": peer})
                except Exception as error:
                    why = f"read failed: {error!r}"
                outgoing.put_nowait(why)

            reader = asyncio.ensure_future(read())
            why = "cancelled"
            try:
                while True:
                    item = await outgoing.get()
                    if isinstance(item, str):
                        why = item
                        break
                    yield item
                    emit({"sent": item.id, "peer": peer})
            finally:
                sessions.remove(outgoing)
                reader.cancel()
                emit({"ended": peer, "why": why})

    server = grpc.aio.server()
    pb_grpc.add_ManagerServiceServicer_to_server(Servicer(), server)
    address = f"{options.host}:{options.port}"
    if options.pem is not None:
        key, cert, client_ca = options.pem
        credentials = grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    emit({"listening": port})  # after the handlers: a signal from now on stops it cleanly
    if not _stdin_is_a_pipe():
        await stop.wait()
        await server.stop(0)
        return
    stdin = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def control() -> None:
        while line := await stdin.readline():
            command = json.loads(line)
            if "push" in command:
                pending.append(json_format.ParseDict(command["push"], pb.ComputationRunReq()))
                dispatch()
            if "stall" in command:
                (reading.clear if command["stall"] else reading.set)()
        stop.set()

    controller = asyncio.ensure_future(control())
    await stop.wait()
    controller.cancel()
    await server.stop(0)


def _stdin_is_a_pipe() -> bool:
    try:
        mode = os.fstat(0).st_mode
    except OSError:  # no stdin at all
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _hash_file(parser: argparse.ArgumentParser, path: str) -> bytes:
    try:
        return hashlib.sha3_256(Path(path).read_bytes()).digest()
    except OSError as error:
        parser.error(f"--seed-request: {path}: {error.strerror}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7001)
    parser.add_argument("--cert", help="server certificate (PEM file): TLS")
    parser.add_argument("--key", help="server private key (PEM file)")
    parser.add_argument("--client-ca", help="CA client certificates must chain to: mutual TLS")
    parser.add_argument("--seed-request", nargs=2, metavar=("DATA", "ALGO"))
    parser.add_argument("--attested-tls", action="store_true")
    options = parser.parse_args()
    if bool(options.cert) != bool(options.key):
        parser.error("--cert and --key go together")
    options.seed_hashes = None
    if options.seed_request:
        data, algo = options.seed_request
        options.seed_hashes = (_hash_file(parser, data), _hash_file(parser, algo))
    options.pem = None
    if options.cert:
        client_ca = Path(options.client_ca).read_bytes() if options.client_ca else None
        options.pem = (Path(options.key).read_bytes(), Path(options.cert).read_bytes(), client_ca)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options))


# -- driving it from a test ------------------------------------------------------------------


def details(message: Message) -> Message:
    """The JSON `details` of an agent_event as the server received it (base64 on the wire)."""
    raw = base64.b64decode(message["agent_event"].get("details", ""))
    return json.loads(raw) if raw else {}


def kind(message: Message) -> str:
    return next(iter(message))


class ComputationsServer:
    """The server process above, seen from a test: push requests, wait for what comes back."""

    def __init__(
        self,
        log: Path,
        *,
        tls: tuple[str, str, str | None] | None = None,
        seed_request: tuple[str, str] | None = None,
    ) -> None:
        self.log = log
        self.tls = tls
        self.seed_request = seed_request
        self.port = 0
        self.received: list[Message] = []
        self.lines: list[Message] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"localhost:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        """Starts the server (on the port it had before, after a restart)."""
        args = [sys.executable, str(Path(__file__)), "--port", str(self.port)]
        if self.tls is not None:
            cert, key, client_ca = self.tls
            args += ["--cert", cert, "--key", key]
            if client_ca:
                args += ["--client-ca", client_ca]
        if self.seed_request:
            args += ["--seed-request", *self.seed_request]
        with open(self.log, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=64 * 1024 * 1024,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            )
        self._reader = asyncio.ensure_future(self._read(self.process))
        listening = await self.wait_line(lambda line: "listening" in line, timeout, "listening")
        self.port = int(listening["listening"])

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            document = json.loads(line)
            self.lines.append(document)
            if "received" in document:
                self.received.append(document["received"])
            self._changed.set()
        self._changed.set()

    async def push(self, request: Message) -> None:
        await self._command({"push": request})

    async def stall(self, stalled: bool) -> None:
        await self._command({"stall": stalled})

    async def _command(self, command: Message) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def wait_line(
        self, match: Callable[[Message], bool], timeout: float, what: str, start: int = 0
    ) -> Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._changed.clear()
            found = next((line for line in self.lines[start:] if match(line)), None)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            exited = self.process is None or self.process.returncode is not None
            if remaining <= 0 or (exited and self._reader is not None and self._reader.done()):
                recent = "\n".join(json.dumps(line)[:300] for line in self.lines[-10:])
                raise AssertionError(
                    f"computations server: no {what} within {timeout:g}s; last lines:\n{recent}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_for(
        self, match: Callable[[Message], bool], timeout: float, what: str, start: int = 0
    ) -> Message:
        """A message the Manager sent (from the `start`-th line of output on)."""
        line = await self.wait_line(
            lambda line: "received" in line and match(line["received"]), timeout, what, start
        )
        message: Message = line["received"]
        return message

    def connections(self) -> int:
        return sum(1 for line in self.lines if "connected" in line)

    async def stop(self) -> None:
        """SIGTERM, as a restart does; the Manager sees its stream drop."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        if self._reader is not None:
            await self._reader
        self.process = None


def run_res_for(computation_id: str) -> Callable[[Message], bool]:
    return lambda m: m.get("run_res", {}).get("computation_id") == computation_id


def event_for(
    computation_id: str, event_type: str, status: str | None = None
) -> Callable[[Message], bool]:
    def match(message: Message) -> bool:
        event = message.get("agent_event", {})
        return (
            event.get("computation_id") == computation_id
            and event.get("event_type") == event_type
            and (status is None or event.get("status") == status)
        )

    return match


def log_for(computation_id: str, text: str) -> Callable[[Message], bool]:
    def match(message: Message) -> bool:
        log = message.get("agent_log", {})
        return log.get("computation_id") == computation_id and text in log.get("message", "")

    return match


if __name__ == "__main__":
    main()
