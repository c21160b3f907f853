"""What a host exposes: per-VM files private whatever the umask, guest text made safe for a
terminal, and listen addresses for metrics, hostfwd and VNC (defaults as the original)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocos_manager.cli.output import describe, printable
from cocos_manager.config.settings import QemuSettings, ServiceSettings
from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.qemu.argv import qemu_args
from cocos_manager.telemetry.metrics import metrics_host
from cocos_manager.vm import files as vm_files
from tests.support.harness import fake_images


@pytest.fixture(params=[0o000, 0o022, 0o277])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _qemu(tmp_path: Path) -> QemuSettings:
    images = {k.removeprefix("MANAGER_QEMU_"): v for k, v in fake_images(tmp_path / "img").items()}
    return QemuSettings(TMP_FILE_LOC=str(tmp_path / "vms"), **images)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_per_vm_copies_and_manifest_are_0600_whatever_the_umask(
    tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: str, dst: str) -> None:  # e.g. images on another file system
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(vm_files.os, "link", no_link)
    qemu = _qemu(tmp_path)
    files = vm_files.prepare_vm_files(qemu, "u-1", b'{"id":"c"}')
    try:
        assert files.methods["kernel"] in ("copy", "reflink")
        for name in ("kernel", "rootfs", "ovmf_vars", "manifest"):
            assert _mode(files.paths[name]) == 0o600, (name, oct(umask))
        assert files.paths["kernel"].read_bytes() == Path(qemu.DISK_IMG_KERNEL_FILE).read_bytes()
    finally:
        files.remove()


def test_a_failed_copy_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    def no_reflink(*_: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(vm_files.os, "link", broken)
    monkeypatch.setattr(vm_files.fcntl, "ioctl", no_reflink)
    monkeypatch.setattr(vm_files.os, "sendfile", broken)
    with pytest.raises(Exception, match="cannot write per-VM files"):
        vm_files.prepare_vm_files(_qemu(tmp_path), "u-2", None)
    assert list((tmp_path / "vms").iterdir()) == []


def test_a_copy_without_sendfile_is_made_by_reads_and_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system whose files `sendfile` refuses (EINVAL): the copy is made all the same."""

    def refused(*_: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    source = tmp_path / "vars.fd"
    source.write_bytes(bytes(range(256)) * 9000)  # over one 1 MiB chunk
    monkeypatch.setattr(vm_files.os, "sendfile", refused)
    assert vm_files._private_copy(str(source), str(tmp_path / "copy.fd")) == "copy"
    assert (tmp_path / "copy.fd").read_bytes() == source.read_bytes()


def test_an_image_that_shrank_while_copied_fails_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaced in place while a Run copied it: part of an image is not a VM's file."""
    source = tmp_path / "vars.fd"
    source.write_bytes(b"x" * 4096)
    real_fstat = os.fstat

    def larger(fd: int) -> os.stat_result:  # as read before the file was truncated
        found = real_fstat(fd)
        return os.stat_result((*found[:6], found.st_size * 2, *found[7:]))

    monkeypatch.setattr(vm_files.os, "fstat", larger)
    with pytest.raises(OSError, match="shrank"):
        vm_files._private_copy(str(source), str(tmp_path / "copy.fd"))
    assert not (tmp_path / "copy.fd").exists()


# -- guest text on the operator's terminal ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("\x1b[2J\x1b[Hcleared", "cleared"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b]0;owned title\x07after", "after"),
        ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("\x9b2Jc1 csi", "c1 csi"),
        ("\x1b(0charset\x1b(B", "charset"),
        ("\x1b[=3hovmf", "ovmf"),
        ("hide\rshown", "hide\\x0dshown"),
        ("two\nlines", "two\\x0alines"),
        ("bell\x07 and \x00nul and del\x7f", "bell\\x07 and \\x00nul and del\\x7f"),
        ("tab\tkept", "tab\tkept"),
        ("unterminated \x1b]0;title", "unterminated "),
    ],
)
def test_printable_strips_escapes_and_shows_controls(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_events_output_is_printable() -> None:
    log = pb.ClientStreamMessage(
        agent_log=pb.AgentLog(computation_id="c\x1b[8m", level="info", message="\x1b[2Jhi\r")
    )
    assert describe(log) == "#0 [c] log info: hi\\x0d"
    event = pb.ClientStreamMessage(
        agent_event=pb.AgentEvent(
            computation_id="c", originator="agent", event_type="x\x1b]0;t\x07", status="ok",
            details=b'{"a":"\x1b[31m"}',
        )
    )  # fmt: skip
    assert describe(event) == '#0 [c] event agent/x: ok {"a":""}'


# -- listen addresses -------------------------------------------------------------------------


def test_hostfwd_and_vnc_addresses() -> None:
    default = qemu_args(QemuSettings())
    assert "user,id=vmnic,hostfwd=tcp::7020-:7002" in default
    assert default[default.index("-vnc") + 1] == ":0"
    bound = qemu_args(QemuSettings(HOST_FWD_ADDR="127.0.0.1", VNC_ADDR="127.0.0.1"))
    assert "user,id=vmnic,hostfwd=tcp:127.0.0.1:7020-:7002" in bound
    assert bound[bound.index("-vnc") + 1] == "127.0.0.1:0"
    v6 = qemu_args(QemuSettings(VNC_ADDR="::1", VSOCK_VNC=3))  # type: ignore[arg-type]
    assert v6[v6.index("-vnc") + 1] == "[::1]:3"
    assert len(bound) == len(default)


def test_metrics_host_is_its_own_setting() -> None:
    assert metrics_host(ServiceSettings()) == ""
    assert metrics_host(ServiceSettings(GRPC_HOST="10.0.0.5")) == "10.0.0.5"
    assert (
        metrics_host(ServiceSettings(GRPC_HOST="10.0.0.5", METRICS_HOST="127.0.0.1")) == "127.0.0.1"
    )
