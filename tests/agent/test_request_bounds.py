"""Bounded work per request: a size limit that gRPC enforces (RESOURCE_EXHAUSTED) from a
setting, and checking and building a big manifest off the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path

import grpc
import pytest

from cocos_manager.agent import manifest
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.proto import manager_pb2 as pb
from tests.support.harness import run_request, running_manager

DIGEST = hashlib.sha3_256(b"x").digest()


def with_datasets(count: int, computation_id: str = "big") -> pb.ComputationRunReq:
    request = run_request(computation_id, datasets=0)
    request.datasets.extend(
        pb.Dataset(provider="p", id=f"dataset-{i}", hash=DIGEST) for i in range(count)
    )
    return request


async def test_a_request_over_the_limit_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_GRPC_MAX_MESSAGE_SIZE="1048576") as m:
        request = run_request("too-big")
        request.result_consumers.extend("c" * 1000 for _ in range(1100))
        assert request.ByteSize() > 1024 * 1024
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await m.stub.Run(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert m.service.computations() == {}
        del request.result_consumers[900:]  # under the limit: served
        assert (await m.stub.Run(request)).computation_id == "too-big"
        await m.stub.Stop(pb.StopRequest(computation_id="too-big"))


async def test_the_default_limit_is_a_few_mib_not_64(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        request = run_request("nine-mib")
        request.result_consumers.extend("c" * 1024 for _ in range(9 * 1024))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await m.stub.Run(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_big_manifest_is_checked_and_built_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[threading.Thread] = []
    real = manifest.checked_manifest_json

    def spy(request: pb.ComputationRunReq) -> bytes:
        threads.append(threading.current_thread())
        return real(request)

    monkeypatch.setattr(manifest, "checked_manifest_json", spy)
    big = with_datasets(60_000)
    assert await manifest.validated_manifest(big) == manifest_json_reference(big)
    assert threads[-1] is not threading.main_thread()
    small = with_datasets(3, "small")
    assert await manifest.validated_manifest(small) == manifest_json_reference(small)
    assert threads[-1] is threading.main_thread()  # no thread hop for the common case

    big.datasets[59_999].hash = b"short"
    with pytest.raises(InvalidArgumentError, match=r"datasets\[59999\]\.hash"):
        await manifest.validated_manifest(big)


async def test_the_loop_turns_while_a_big_manifest_is_built() -> None:
    """Not a timing: the loop must get turns at all while the worker thread encodes (one
    json.dumps of the whole manifest would hold the GIL from start to end)."""
    turns = 0
    done = False

    async def ticker() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    before = turns
    await manifest.validated_manifest(with_datasets(60_000))
    done = True
    await task
    assert turns - before > 10


def manifest_json_reference(request: pb.ComputationRunReq) -> bytes:
    """The manifest as one json.dumps writes it: chunked encoding must give the same bytes."""
    text = json.dumps(manifest.build_manifest(request), separators=(",", ":"), ensure_ascii=False)
    return text.translate(manifest._GO_ESCAPE_TABLE).encode()


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 512, 513, 1000])
def test_chunked_encoding_is_byte_identical(count: int) -> None:
    request = with_datasets(count)
    request.result_consumers.extend(f"<consumer & {i}>\u2028" for i in range(count))
    assert manifest.manifest_json(request) == manifest_json_reference(request)


def test_no_single_json_call_encodes_a_long_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GIL is held through one json.dumps: a 60,000-item list in one call stalled the loop
    for 230 ms even from a worker thread. Each call gets at most one chunk."""
    longest = 0
    real = json.dumps

    def spy(value: object, **options: object) -> str:
        nonlocal longest
        if isinstance(value, list):
            longest = max(longest, len(value))
        elif isinstance(value, dict):
            longest = max([longest, *(len(v) for v in value.values() if isinstance(v, list))])
        return real(value, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(manifest.json, "dumps", spy)
    manifest.manifest_json(with_datasets(60_000))
    assert 0 < longest <= manifest._CHUNK
