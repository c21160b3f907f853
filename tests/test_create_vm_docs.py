"""What the README says about driving the daemon from today's Cocos works as written: the
grpcurl -proto example with docs/create-vm.json, and the table of upstream main's variables
(each one upstream reads is either a setting here or warned about with what to do)."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import pytest

from cocos_manager.check import check_unknown_variables
from cocos_manager.config.unknown import UPSTREAM_MAIN_ONLY, known_variables
from tests.support.harness import Manager, running_manager
from tests.support.readme import README, REPO
from tests.support.upstream_client import GRPCURL

SECTION = "## Driving it from today's Cocos"
# Every variable of upstream main's manager (cmd/manager/main.go, manager/qemu/config.go with
# the MANAGER_QEMU_ prefix, cocos-manager.env), written out here: the table must cover them.
UPSTREAM_MAIN = {
    *(f"MANAGER_QEMU_{name}" for name in str.split(
        "ENABLE_DISK BIN_PATH USE_SUDO ENABLE_KVM MACHINE CPU SMP_COUNT SMP_MAXCPUS MEM_ID "
        "MEMORY_SIZE MEMORY_SLOTS MAX_MEMORY OVMF_CODE_IF OVMF_CODE_FORMAT OVMF_CODE_UNIT "
        "OVMF_CODE_FILE OVMF_CODE_READONLY OVMF_VERSION OVMF_VARS_IF OVMF_VARS_FORMAT "
        "OVMF_VARS_UNIT OVMF_VARS_FILE NETDEV_ID HOST_FWD_AGENT GUEST_FWD_AGENT "
        "VIRTIO_NET_PCI_DISABLE_LEGACY VIRTIO_NET_PCI_IOMMU_PLATFORM VIRTIO_NET_PCI_ADDR "
        "VIRTIO_NET_PCI_ROMFILE DISK_IMG_KERNEL_FILE DISK_IMG_ROOTFS_FILE SEV_SNP_ID "
        "SEV_SNP_CBIT_POS SEV_SNP_CBITPOS SEV_SNP_REDUCED_PHYS_BITS ENABLE_HOST_DATA HOST_DATA "
        "TDX_ID QUOTE_GENERATION_PORT OVMF_FILE IGVM_ID IGVM_FILE SRC_DISK_FILE DST_DISK_FILE "
        "DISK_ID DISK_FORMAT DISK_SCSI_ID GPU_BDF GPU_PCIE_ROOT_PORT GPU_PCIE_BUS "
        "GPU_FW_CFG_MMIO_MB NO_GRAPHIC MONITOR KERNEL_CMDLINE HOST_FWD_RANGE CERTS_MOUNT "
        "ENV_MOUNT ENABLE_SEV_SNP ENABLE_TDX"
    )),
    "MANAGER_LOG_LEVEL", "MANAGER_INSTANCE_ID", "MANAGER_ATTESTATION_POLICY_BINARY_PATH",
    "MANAGER_ATTESTATION_POLICY_BINARY", "MANAGER_IGVMMEASURE_BINARY", "MANAGER_PCR_VALUES",
    "MANAGER_EOS_VERSION", "MANAGER_MAX_VMS", "MANAGER_CORIM_SIGNING_KEY", "MANAGER_GRPC_HOST",
    "MANAGER_GRPC_PORT", "MANAGER_GRPC_SERVER_CERT", "MANAGER_GRPC_SERVER_KEY",
    "MANAGER_GRPC_SERVER_CA_CERTS", "MANAGER_GRPC_CLIENT_CA_CERTS", "MANAGER_HTTP_HOST",
    "MANAGER_HTTP_PORT", "MANAGER_HTTP_SERVER_CERT", "MANAGER_HTTP_SERVER_KEY",
    "MANAGER_HTTP_SERVER_CA_CERTS", "MANAGER_HTTP_CLIENT_CA_CERTS", "COCOS_JAEGER_URL",
    "COCOS_JAEGER_TRACE_RATIO",
}  # fmt: skip


def section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    return text[start : text.index("\n## ", start + 1)]


def table_names() -> set[str]:
    """Every variable a row of the upstream table names. A `_X` continues a name before it:
    as MANAGER_QEMU_X, MANAGER_X, or the previous full name with its last part replaced."""
    names: set[str] = set()
    for line in section().splitlines():
        if not line.startswith("| `"):
            continue
        previous = ""
        for token in re.findall(r"`([A-Z_]+)`", line.split("|")[1]):
            if not token.startswith("_"):
                names.add(token)
                previous = token
                continue
            names |= {"MANAGER_QEMU" + token, "MANAGER" + token}
            parts = previous.split("_")
            for cut in range(2, len(parts)):
                names.add("_".join(parts[:cut]) + token)
    return names


def test_the_table_covers_every_upstream_variable() -> None:
    assert UPSTREAM_MAIN <= table_names(), sorted(UPSTREAM_MAIN - table_names())


def test_upstream_only_variables_are_warned_about_with_what_to_do() -> None:
    """Each upstream variable is either read here or named in UPSTREAM_MAIN_ONLY (the one
    COCOS_* variable not read is not checked at start: only MANAGER_* names are)."""
    unread = UPSTREAM_MAIN - known_variables() - {"COCOS_JAEGER_TRACE_RATIO"}
    assert unread == set(UPSTREAM_MAIN_ONLY)
    checks = check_unknown_variables({"MANAGER_QEMU_SEV_SNP_CBIT_POS": "51"})
    assert [c.detail for c in checks] == [
        "MANAGER_QEMU_SEV_SNP_CBIT_POS (today's upstream Cocos) is ignored: use "
        "MANAGER_QEMU_SEV_CBITPOS (same default, 51)"
    ]


@pytest.fixture
async def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    async with running_manager(tmp_path, monkeypatch) as m:
        yield m


async def test_the_readme_grpcurl_example_creates_and_removes(manager: Manager) -> None:
    command = (
        ".venv/bin/grpcurl -plaintext -import-path tests/support/upstream_proto -proto manager.proto \\\n"
        "    -d @ localhost:7001 manager.ManagerService/CreateVm < docs/create-vm.json"
    )
    assert command in section()
    args = shlex.split(command.replace("\\\n", "").split(" < ")[0])[1:]
    args[args.index("localhost:7001")] = manager.address
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        *args,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate((REPO / "docs" / "create-vm.json").read_bytes())
    assert process.returncode == 0, err.decode()
    assert '"cvmId"' in out.decode() and '"forwardedPort"' in out.decode()
    (machine,) = manager.service.computations().values()
    assert machine.process is not None
    assert machine.process.argv[machine.process.argv.index("-append") + 1].endswith(
        " agent.aa_kbc_params=type=sample"
    )
    await manager.service.stop(machine.id)
