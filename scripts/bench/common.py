"""What every figure of the bench shares: paths, the test guest and its big twin, the request."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from cocos_manager.proto import manager_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "build" / "guest"
OUT_DIR = REPO / "build" / "bench"
FAKE_QEMU = REPO / "tests" / "support" / "fake_qemu.py"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS.fd"
MiB = 1 << 20
BIG_IMAGE_BYTES = 512 * MiB


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def vnc_base(span: int) -> int:
    """A VNC display base whose ports (5900+display) are free, far from other users."""
    seed = os.getpid() * 7919 + time.monotonic_ns()
    for attempt in range(200):
        base = 20000 + (seed + attempt * 977) % 30000
        if all(_tcp_free(5900 + base + i) for i in range(0, span, 7)):
            return base
    return 20000


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def run_request(computation_id: str) -> pb.ComputationRunReq:
    return pb.ComputationRunReq(
        id=computation_id,
        name=f"bench {computation_id}",
        datasets=[pb.Dataset(provider="p", id="d0", hash=hashlib.sha3_256(b"d0").digest())],
        algorithm=pb.Algorithm(provider="p", id="alg", hash=hashlib.sha3_256(b"alg").digest()),
        result_consumers=["consumer"],
        agent_config=pb.AgentConfig(port="7002", host="0.0.0.0", log_level="info"),
    )


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "",
        "grpcio": grpc.__version__,
    }


@dataclass(frozen=True)
class Images:
    kernel: Path
    small_rootfs: Path
    big_rootfs: Path


def prepare_images(root: Path) -> Images:
    """The real test guest, and its rootfs zero-padded to 512 MiB with real written blocks.

    Zero padding keeps the initramfs valid (the kernel skips zeros between cpio archives);
    the blocks are written, not a hole, so a copy would have to read and write them all.
    """
    kernel, rootfs = GUEST / "bzImage", GUEST / "rootfs.cpio.gz"
    for path in (kernel, rootfs):
        if not path.is_file():
            raise SystemExit(f"bench: {path} is missing: run `make guest` first")
    root.mkdir(parents=True, exist_ok=True)
    big = root / "rootfs-512MiB.cpio.gz"
    small_size = rootfs.stat().st_size
    if not (big.is_file() and big.stat().st_size == BIG_IMAGE_BYTES and not is_sparse(big)):
        log(f"writing {big} (512 MiB of real blocks)")
        partial = big.with_suffix(f".partial-{os.getpid()}")
        with open(rootfs, "rb") as source, open(partial, "wb") as out:
            shutil.copyfileobj(source, out)
            zeros = bytes(MiB)
            remaining = BIG_IMAGE_BYTES - small_size
            while remaining:
                remaining -= out.write(zeros[: min(MiB, remaining)])
            out.flush()
            os.fsync(out.fileno())
        partial.replace(big)
    return Images(kernel=kernel, small_rootfs=rootfs, big_rootfs=big)


def is_sparse(path: Path) -> bool:
    st = path.stat()
    return st.st_blocks * 512 < st.st_size
