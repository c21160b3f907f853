"""A MANAGER_QEMU_BIN_PATH that is not there, with a confidential mode that probes QEMU: the
refusal named the confidential setting ("MANAGER_QEMU_SEV_SNP_SYNTAX=upstream: QEMU ... (did
not answer) has no sev-snp-guest ...") instead of the missing binary (found in review)."""

from __future__ import annotations

import pytest

from cocos_manager.confidential.checks import check_confidential_launch
from cocos_manager.confidential.modes import ConfidentialConfigError
from cocos_manager.config.settings import QemuSettings


@pytest.mark.parametrize(
    "settings",
    [
        {"SEV_SNP_SYNTAX": "upstream"},
        {"ENABLE_TDX": True, "ENABLE_SEV_SNP": False},
        {"ENABLE_SEV": True, "ENABLE_SEV_SNP": False, "SEV_SNP_SYNTAX": "upstream"},
    ],
)
def test_a_missing_qemu_is_named_as_such(settings: dict[str, object]) -> None:
    q = QemuSettings(BIN_PATH="/nonexistent/qemu-system-x86_64", **settings)  # type: ignore[arg-type]
    with pytest.raises(ConfidentialConfigError, match=r"^MANAGER_QEMU_BIN_PATH: .* not an exec"):
        check_confidential_launch(q)
