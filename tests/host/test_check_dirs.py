"""`cocos-manager check` on a TMP_FILE_LOC / STATE_DIR that is a dangling symlink (found in
review): check said PASS ("will be made"), while every Run failed with FAILED_PRECONDITION
(mkdir: File exists) and the daemon could not lock its state directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cocos_manager.check import check_directories
from cocos_manager.config.settings import load_settings
from cocos_manager.errors import FailedPreconditionError
from cocos_manager.vm.files import check_tmp_dir


def test_a_dangling_symlink_fails_the_check_as_it_fails_a_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    link = tmp_path / "vms"
    link.symlink_to(tmp_path / "gone")
    state = tmp_path / "state"
    state.symlink_to(tmp_path / "gone-too")
    monkeypatch.setenv("MANAGER_QEMU_TMP_FILE_LOC", str(link))
    monkeypatch.setenv("MANAGER_STATE_DIR", str(state))
    settings = load_settings()
    with pytest.raises(FailedPreconditionError, match="MANAGER_QEMU_TMP_FILE_LOC"):
        check_tmp_dir(settings.qemu)  # what a Run meets
    tmp_check, state_check = check_directories(settings)
    assert tmp_check.status == "fail", tmp_check
    assert "MANAGER_QEMU_TMP_FILE_LOC" in tmp_check.detail and "symlink" in tmp_check.detail
    assert state_check.status == "fail", state_check


def test_a_symlink_to_a_directory_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "vms"
    link.symlink_to(tmp_path / "real")
    monkeypatch.setenv("MANAGER_QEMU_TMP_FILE_LOC", str(link))
    tmp_check, _ = check_directories(load_settings())
    assert tmp_check.status == "pass", tmp_check
