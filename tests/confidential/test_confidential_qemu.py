"""Each confidential mode's command line, parsed by a real upstream QEMU (10.x).

`scripts/upstream-qemu.sh` unpacks Debian bookworm-backports' qemu-system-x86 into
build/qemu-upstream (Debian's own QEMU 7.2 stays installed); a two-line wrapper runs it with
its own firmware folder and modules.

How "accepted" is told from "rejected" without SEV-SNP hardware:
QEMU parses every -object and -machine option and sets each property as it creates the objects
(the guest objects before the accelerator, memory backends after it), and a property it does
not know or a value it cannot take fails right there ("Invalid parameter 'x'", "Property
'...x' not found", "parameter length of 31 not equal to 32"). Only after all of them does it
need KVM with SEV: under TCG it then stops with "cannot set up private guest memory for
sev-snp-guest: KVM required" (SNP); plain SEV, which needs no private memory, gets as far as
loading the kernel (an empty stand-in here), which comes after every option is set. So a command line is accepted when QEMU gets to that error and to no other.
That this is not vacuous is checked each time: every property of every piece the manager adds
is misspelt in turn, and QEMU must then name that very property.

The one change made to the command line is dropping `-enable-kvm` (a switch without a value):
on a host with /dev/kvm but no SNP, KVM would refuse the SNP VM type before QEMU creates the
memory backend, and its properties would go unchecked. Nothing else is touched: every object,
property and value is the manager's. QEMU never gets to load the firmware, kernel or devices,
so none of those has to exist (pflash drives are opened early: plain SEV gets its vars copy).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocos_manager.confidential.argv import confidential_args, host_data
from cocos_manager.confidential.checks import check_confidential_launch
from cocos_manager.confidential.modes import ConfidentialConfigError, LaunchMode, launched_binding
from cocos_manager.config.choices import SnpSyntax
from cocos_manager.config.settings import QemuSettings
from cocos_manager.qemu.argv import (
    FW_CFG_MANIFEST_NAME,
    VmResources,
    derive_vm_settings,
    qemu_args,
    vm_file_paths,
)

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = b'{"id":"c1","algorithms":{"hash":[9,9]},"agent_config":{"port":"7002"}}'
SNP_LATE = "cannot set up private guest memory for sev-snp-guest: KVM required"
# Plain SEV needs no private memory: QEMU goes on to build the board and stops at loading the
# kernel (a stand-in file), which comes after every object and machine property is set.
SEV_LATE = "qemu: could not load kernel '{tmp}/bzImage-u1': Inappropriate ioctl for device"
# Debian's 10.0 package lacks an optional display module; QEMU then finds bookworm's 7.2 one
# and says so. Harmless, and not about the command line.
# TCG also warns about EPYC CPU features it cannot emulate. Neither is about the command line.
NOISE = (
    "failed to initialize module",
    "Only modules from the same build",
    "char device",
    "warning:",
)
PREFIX = "qemu-system-x86_64: "


@pytest.fixture(scope="session")
def upstream_qemu(tmp_path_factory: pytest.TempPathFactory) -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/upstream-qemu.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    binary = Path(done.stdout.strip().splitlines()[-1])
    folder = binary.parents[2]
    wrapper = tmp_path_factory.mktemp("upstream-qemu") / "qemu-system-x86_64"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"QEMU_MODULE_DIR={folder}/usr/lib/x86_64-linux-gnu/qemu "
        f'exec {binary} -L {folder}/usr/share/qemu "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def qemu_errors(qemu: str, args: list[str]) -> list[str]:
    """QEMU's error lines for this command line (it must exit at once, never run a guest)."""
    done = subprocess.run(
        [qemu, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0, "QEMU started a guest: the check below would be meaningless"
    lines = [line.removeprefix(PREFIX) for line in done.stderr.splitlines()]
    return [line for line in lines if line and not line.startswith(NOISE)]


def without_kvm(args: list[str]) -> list[str]:
    return [a for a in args if a != "-enable-kvm"]


def id_files(tmp: Path) -> dict[str, str]:
    (tmp / "id-block").write_bytes(os.urandom(96))
    (tmp / "id-auth").write_bytes(os.urandom(4096))
    return {
        "SEV_SNP_ID_BLOCK_FILE": str(tmp / "id-block"),
        "SEV_SNP_ID_AUTH_FILE": str(tmp / "id-auth"),
    }


def vm_argv(tmp: Path, **env: object) -> tuple[QemuSettings, list[str]]:
    """A VM's command line as the service builds it: per-VM ids and files, the fw_cfg
    manifest file the agent reads, host port 0 (no fixed port; QEMU never gets to bind it)."""
    base = QemuSettings(TMP_FILE_LOC=str(tmp), AGENT_CHANNEL="fw_cfg", **env)  # type: ignore[arg-type]
    vm = derive_vm_settings(base, VmResources(uuid="u1", host_port=0, guest_cid=3, vnc_display=0))
    for name, path in vm_file_paths(base, "u1").items():  # as vm_files prepares them
        shutil.copyfile(base.OVMF_VARS_FILE if name == "ovmf_vars" else os.devnull, path)
    manifest_file = tmp / "agent-config-u1.json"
    manifest_file.write_bytes(MANIFEST)
    args = qemu_args(vm, vsock_device=False, manifest=MANIFEST)
    args += ["-fw_cfg", f"name={FW_CFG_MANIFEST_NAME},file={manifest_file}"]
    return vm, args


MODES = {
    "sev-snp": (
        {"SEV_SNP_SYNTAX": "upstream", "BIND_MANIFEST": True, "KERNEL_HASH": True},
        SNP_LATE,
    ),
    "sev-snp-id-block": (
        {
            "SEV_SNP_SYNTAX": "upstream",
            "SEV_SNP_AUTHOR_KEY_ENABLED": True,
            "SEV_SNP_POLICY": "0x70000",
        },
        SNP_LATE,
    ),
    "sev": ({"ENABLE_SEV": True, "ENABLE_SEV_SNP": False, "SEV_SNP_SYNTAX": "upstream"}, SEV_LATE),
}


def mutations(pieces: list[str]) -> Iterator[tuple[int, str, str]]:
    """(index, misspelt element, misspelt key) for every property the manager wrote."""
    for index, element in enumerate(pieces):
        if element.startswith("-"):
            continue
        parts = element.split(",")
        for position, part in enumerate(parts):
            key, eq, value = part.partition("=")
            if not eq or key == "id":  # the type name, and the id QEMU requires
                continue
            wrong = [*parts]
            wrong[position] = f"{key}-x={value}"
            yield index, ",".join(wrong), f"{key}-x"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_accepted_by_upstream_qemu(upstream_qemu: str, tmp_path: Path, mode: str) -> None:
    env, late = MODES[mode]
    if mode == "sev-snp-id-block":
        env = {**env, **id_files(tmp_path)}
    _, args = vm_argv(tmp_path, **env)
    assert qemu_errors(upstream_qemu, without_kvm(args)) == [late.format(tmp=tmp_path)]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_property_is_checked_by_qemu(upstream_qemu: str, tmp_path: Path, mode: str) -> None:
    env, _ = MODES[mode]
    if mode == "sev-snp-id-block":
        env = {**env, **id_files(tmp_path)}
    vm, args = vm_argv(tmp_path, **env)
    pieces = confidential_args(vm, MANIFEST)
    assert pieces is not None
    owned = {*pieces.memory, *pieces.guest}
    checked = 0
    for index, element in enumerate(args):
        if element not in owned or element.startswith("-"):
            continue
        for _, wrong, key in mutations([element]):
            bad = [*args[:index], wrong, *args[index + 1 :]]
            errors = qemu_errors(upstream_qemu, without_kvm(bad))
            assert len(errors) == 1, errors
            required = f"Parameter '{key.removesuffix('-x')}' is missing"  # reduced-phys-bits
            assert (
                f"Invalid parameter '{key}'" in errors[0]
                or f".{key}' not found" in errors[0]
                or required in errors[0]
            ), errors
            checked += 1
    assert checked >= (2 if mode == "sev" else 6)


def test_host_data_is_checked_by_qemu_and_is_the_manifest_files_digest(
    upstream_qemu: str, tmp_path: Path
) -> None:
    _, args = vm_argv(tmp_path, SEV_SNP_SYNTAX="upstream", BIND_MANIFEST=True)
    # host-data in QEMU's argv is the SHA-256 of the manifest file QEMU hands the guest.
    manifest_path = Path(args[-1].split(",file=", 1)[1])
    expected = base64.b64encode(hashlib.sha256(manifest_path.read_bytes()).digest()).decode()
    assert launched_binding(args) == {"host_data": expected} == {"host_data": host_data(MANIFEST)}
    # QEMU decodes it and wants exactly 32 bytes: a 31-byte value is refused, so the accepted
    # run above really was checked.
    short = base64.b64encode(hashlib.sha256(MANIFEST).digest()[:31]).decode()
    bad = [a.replace(f"host-data={expected}", f"host-data={short}") for a in args]
    assert qemu_errors(upstream_qemu, without_kvm(bad)) == [
        "parameter length of 31 not equal to 32"
    ]
    assert qemu_errors(upstream_qemu, without_kvm(args)) == [SNP_LATE]


def test_seed_syntax_is_what_upstream_rejects(upstream_qemu: str, tmp_path: Path) -> None:
    """Why the setting exists: the default (the original's command line) needs AMD's fork."""
    _, args = vm_argv(tmp_path)
    errors = qemu_errors(upstream_qemu, without_kvm(args))
    assert errors == [
        "-object memory-backend-memfd-private,id=ram1,size=2048M,share=true: "
        "Parameter 'qom-type' does not accept value 'memory-backend-memfd-private'"
    ]


def test_tdx_object_is_well_formed_for_qemu(upstream_qemu: str, tmp_path: Path) -> None:
    """Debian's QEMU 10.0 predates tdx-guest (QEMU 10.1): it parses the JSON object and
    stops only at the unknown type. The property names follow QEMU 10.1's documentation and
    are pinned by tests/confidential/test_confidential.py."""
    _, args = vm_argv(
        tmp_path,
        ENABLE_TDX=True,
        ENABLE_SEV_SNP=False,
        BIND_MANIFEST=True,
        TDX_QUOTE_GENERATION_SOCKET="vsock:2:4050",
    )
    errors = qemu_errors(upstream_qemu, without_kvm(args))
    assert len(errors) == 1
    assert errors[0].endswith("Parameter 'qom-type' does not accept value 'tdx-guest'")


def test_start_up_check_against_upstream_qemu(upstream_qemu: str) -> None:
    bios = "/usr/share/ovmf/OVMF.fd"
    snp = QemuSettings(BIN_PATH=upstream_qemu, SEV_SNP_SYNTAX="upstream", BIOS_FILE=bios)  # type: ignore[arg-type]
    assert check_confidential_launch(snp) is LaunchMode.SNP_UPSTREAM
    auto = snp.model_copy(update={"SEV_SNP_SYNTAX": SnpSyntax.AUTO})
    assert check_confidential_launch(auto) is LaunchMode.SNP_UPSTREAM
    tdx = QemuSettings(
        BIN_PATH=upstream_qemu, ENABLE_TDX=True, ENABLE_SEV_SNP=False, BIOS_FILE=bios
    )  # type: ignore[arg-type]
    with pytest.raises(ConfidentialConfigError) as caught:
        check_confidential_launch(tdx)
    assert str(caught.value).startswith("MANAGER_QEMU_ENABLE_TDX=true: QEMU")
    assert "QEMU emulator version 10.0" in str(caught.value)
    assert "needs QEMU 10.1" in str(caught.value)


def test_start_up_refuses_upstream_syntax_on_debians_qemu(tmp_path: Path) -> None:
    """Debian bookworm's own QEMU 7.2 has no sev-snp-guest: `auto` picks upstream there (it is
    not AMD's fork) and start-up says what is missing, in one line."""
    bios = tmp_path / "OVMF.fd"
    bios.write_bytes(b"fw")
    q = QemuSettings(SEV_SNP_SYNTAX="auto", BIOS_FILE=str(bios))  # type: ignore[arg-type]
    with pytest.raises(ConfidentialConfigError) as caught:
        check_confidential_launch(q)
    message = str(caught.value)
    assert message.startswith(
        "MANAGER_QEMU_SEV_SNP_SYNTAX=auto: QEMU 'qemu-system-x86_64' (QEMU emulator version 7.2"
    )
    assert message.endswith("has no sev-snp-guest object")
