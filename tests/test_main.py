"""`cocos-manager print-qemu-cmd` shows what a VM gets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.qemu.test_qemu_argv import DEFAULT_ARGS
from tests.support.logged_daemon import EXE, daemon_env


def print_qemu_cmd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "print-qemu-cmd", *args],
        env=daemon_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_vsock_channel_prints_the_originals_line() -> None:
    done = print_qemu_cmd({}, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["args"] == DEFAULT_ARGS
    assert json.loads(print_qemu_cmd({}, "--json", "--original").stdout)["args"] == DEFAULT_ARGS


def test_fw_cfg_shows_no_vsock_device_and_the_fw_cfg_option(tmp_path: Path) -> None:
    env = {"MANAGER_QEMU_AGENT_CHANNEL": "fw_cfg", "MANAGER_QEMU_TMP_FILE_LOC": str(tmp_path)}
    args = json.loads(print_qemu_cmd(env, "--json").stdout)["args"]
    assert not any("vhost-vsock" in arg for arg in args)
    assert args[-2:] == [
        "-fw_cfg",
        f"name=opt/cocos/agent-config.json,file={tmp_path}/agent-config-UUID.json",
    ]
    vsock = DEFAULT_ARGS.index("vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=3")
    assert args[:-2] == DEFAULT_ARGS[: vsock - 1] + DEFAULT_ARGS[vsock + 1 :]
    line = print_qemu_cmd(env).stdout
    assert "vhost-vsock" not in line and "-fw_cfg name=opt/cocos/agent-config.json" in line
    # The original's base line stays available.
    original = json.loads(print_qemu_cmd(env, "--json", "--original").stdout)["args"]
    assert original == DEFAULT_ARGS


def test_help_lists_check_and_original() -> None:
    done = subprocess.run([EXE, "--help"], capture_output=True, text=True, timeout=60)
    assert "check" in done.stdout and "print-qemu-cmd" in done.stdout
    done = subprocess.run(
        [EXE, "print-qemu-cmd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--original" in done.stdout
    assert os.environ.get("MANAGER_QEMU_AGENT_CHANNEL") is None
