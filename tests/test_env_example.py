"""init/systemd/manager.env.example lists each setting once, with its default (found in review:
MANAGER_QEMU_POWERDOWN_GRACE was listed twice, with two different explanations)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from cocos_manager.config.settings import QemuSettings, ServiceSettings, env_name

EXAMPLE = Path(__file__).resolve().parents[1] / "init" / "systemd" / "manager.env.example"
# Shown with an example value (a path or address), not the default, on purpose.
EXAMPLES = {
    "MANAGER_STATE_DIR", "MANAGER_METRICS_PORT", "MANAGER_QEMU_TMP_FILE_LOC", "MANAGER_GRPC_URL",
    "MANAGER_GRPC_SERVER_CERT", "MANAGER_GRPC_SERVER_KEY", "MANAGER_GRPC_SERVER_CA_CERTS",
    "MANAGER_GRPC_CLIENT_CA_CERTS", "MANAGER_GRPC_CLIENT_CERT", "MANAGER_GRPC_CLIENT_KEY",
    "MANAGER_GRPC_URL_CA_CERTS",
}  # fmt: skip


def _listed() -> list[tuple[str, str]]:
    return re.findall(r"(?m)^#?([A-Z][A-Z0-9_]+)=(.*)$", EXAMPLE.read_text())


def test_each_setting_is_listed_once() -> None:
    twice = [name for name, n in Counter(name for name, _ in _listed()).items() if n > 1]
    assert twice == []


def test_listed_values_are_the_defaults() -> None:
    models: dict[str, tuple[type[ServiceSettings] | type[QemuSettings], str]] = {
        env_name(model, field): (model, field)
        for model in (ServiceSettings, QemuSettings)
        for field in model.model_fields
    }
    wrong = []
    for name, value in _listed():
        if name in EXAMPLES or name not in models or value == "":
            continue
        model, field = models[name]
        if getattr(model(**{field: value}), field) != getattr(model(), field):
            wrong.append(name)
    assert wrong == []
