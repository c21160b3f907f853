"""Environment names are case-sensitive, as Go's os.Getenv (found in review)."""

from __future__ import annotations

import pytest

from cocos_manager.config.settings import load_settings


def test_lowercase_names_are_not_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Go's os.Getenv is case-sensitive: `manager_grpc_port` is not MANAGER_GRPC_PORT, so it
    neither changes a setting nor stops start-up."""
    monkeypatch.setenv("manager_grpc_port", "not-a-number")
    monkeypatch.setenv("manager_qemu_cpu", "lowercase")
    settings = load_settings()
    assert settings.service.GRPC_PORT == 7001
    assert settings.qemu.CPU == "EPYC"


def test_a_lowercase_name_is_warned_about_with_the_right_spelling() -> None:
    from cocos_manager.config.unknown import unknown_variables

    found = unknown_variables({"manager_qemu_cpu": "max", "MANAGER_QEMU_CPU": "max"})
    assert [(u.name, u.closest) for u in found] == [("manager_qemu_cpu", "MANAGER_QEMU_CPU")]
