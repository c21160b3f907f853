"""QEMU gets a small, explicit environment, not the daemon's: the daemon's settings (a TLS key
given as PEM text, collector credentials) never show in /proc/<qemu>/environ."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import run_request, running_manager


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}


async def test_qemu_does_not_inherit_the_daemons_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer s3cret")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    async with running_manager(tmp_path, monkeypatch) as m:
        await m.stub.Run(run_request("env"))
        process = m.service.computations()["env"].process
        assert process is not None
        environ = environ_of(process.pid)
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in environ
    assert not [name for name in environ if name.startswith(("MANAGER_", "COCOS_"))]
    assert environ["PATH"] and environ["LC_TIME"] == "C.UTF-8"
