"""A real VM whose per-VM files live in a directory with a comma and a space in its name
(MANAGER_QEMU_TMP_FILE_LOC): every path QEMU gets inside an option list (`-drive ...,file=`,
`-fw_cfg ...,file=`) must double its commas (found in review: the OVMF_VARS drive did not, so
QEMU failed to open '/…/vms' and every Run failed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_readme_tcg import readme_env, run_one_vm

pytestmark = pytest.mark.timeout(300)


async def test_a_vm_runs_with_its_files_under_a_comma(tmp_path: Path) -> None:
    env = readme_env(tmp_path)
    env["MANAGER_QEMU_TMP_FILE_LOC"] = str(tmp_path / "vms, 1")
    await run_one_vm(env, tmp_path, "comma")
