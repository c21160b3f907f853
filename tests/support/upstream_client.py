"""A client of today's upstream Cocos control plane built from upstream's proto alone: grpcurl
with `-proto tests/support/upstream_proto/manager.proto` (a hand-written copy of upstream's
file; see its header), never this daemon's own proto nor reflection."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
UPSTREAM_PROTO_DIR = Path(__file__).with_name("upstream_proto")


@dataclass
class Answer:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict[str, Any]:
        assert self.code == 0, self.err
        document = json.loads(self.out)
        assert isinstance(document, dict)
        return document


async def upstream_call(address: str, method: str, body: dict[str, Any]) -> Answer:
    """One unary call of upstream's ManagerService, as a Go client built from its proto."""
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        "-import-path",
        str(UPSTREAM_PROTO_DIR),
        "-proto",
        "manager.proto",
        "-d",
        json.dumps(body),
        address,
        f"manager.ManagerService/{method}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return Answer(process.returncode, out.decode(), err.decode())


def b64(data: bytes) -> str:
    """A `bytes` field in protobuf's JSON."""
    return base64.b64encode(data).decode()
