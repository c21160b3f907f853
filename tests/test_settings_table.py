"""Every setting is findable from the README: one table (name, default, what it does),
generated from the settings models, so it cannot drift. Before, MANAGER_GRPC_PORT and
MANAGER_QEMU_VSOCK_VNC were only in the example env file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from cocos_manager.config import settings_table
from cocos_manager.config.settings import QemuSettings, ServiceSettings, env_name
from cocos_manager.config.settings_help import DEFAULT_TEXT, HELP
from tests.support.readme import README, REPO


def test_the_readme_table_is_the_generated_one() -> None:
    text = README.read_text()
    assert settings_table.BEGIN in text, "the README has no settings table"
    assert settings_table.updated(text) == text, "stale: run `make settings-table`"


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    text = README.read_text()
    table = text[text.index(settings_table.BEGIN) : text.index(settings_table.END)]
    for model in (ServiceSettings, QemuSettings):
        for field in model.model_fields:
            assert f"| `{env_name(model, field)}` |" in table, env_name(model, field)
    assert "| `MANAGER_GRPC_PORT` | `7001` |" in table
    assert "| `MANAGER_QEMU_VSOCK_VNC` | `0` |" in table
    assert "| `MANAGER_QEMU_STOP_TIMEOUT` | `30s` |" in table  # durations as Go durations


def test_the_help_names_only_settings() -> None:
    names = {env_name(m, f) for m in (ServiceSettings, QemuSettings) for f in m.model_fields}
    assert set(HELP) <= names, set(HELP) - names
    assert set(DEFAULT_TEXT) <= names, set(DEFAULT_TEXT) - names


def test_a_new_setting_with_a_description_needs_only_the_table_regenerated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class WithANewSetting(ServiceSettings):
        NEW_KNOB: int = Field(default=3, description="turns the new knob")

    class WithoutText(ServiceSettings):
        SILENT_KNOB: int = 1

    monkeypatch.setattr(settings_table, "MODELS", (WithANewSetting, QemuSettings))
    assert "| `MANAGER_NEW_KNOB` | `3` | turns the new knob |" in settings_table.render()
    monkeypatch.setattr(settings_table, "MODELS", (WithoutText, QemuSettings))
    with pytest.raises(
        settings_table.MissingHelpError, match=r"MANAGER_SILENT_KNOB.*settings_help"
    ):
        settings_table.render()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (1, "1s"), (30, "30s"), (60, "60s"), (150, "2m30s"), (3600, "1h"), (0.25, "250ms")],
)
def test_durations_read_as_go_durations(seconds: float, text: str) -> None:
    assert settings_table.go_duration(seconds) == text


def test_the_make_target_checks_and_rewrites(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    text = README.read_text()
    start = text.index(settings_table.BEGIN) + len(settings_table.BEGIN)
    stale.write_text(text[:start] + "\n| old |\n" + text[text.index(settings_table.END) :])
    run = [sys.executable, "-m", "cocos_manager.config.settings_table"]
    check = subprocess.run([*run, "--check", str(stale)], capture_output=True, text=True)
    assert check.returncode == 1 and "make settings-table" in check.stdout
    assert subprocess.run([*run, str(stale)], check=False).returncode == 0
    assert stale.read_text() == text
    assert "settings-table:" in (REPO / "Makefile").read_text()
