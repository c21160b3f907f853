"""Confidential launch without the hardware: the command line of every mode, the manifest
bound into host-data / mrconfigid, the settings that go with them, the start-up refusal and
the host readiness checks. (Real upstream QEMU parses these command lines in
test_confidential_qemu.py.)"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cocos_manager.confidential import checks as confidential_checks
from cocos_manager.confidential import modes as confidential
from cocos_manager.confidential.argv import host_data, mrconfigid
from cocos_manager.confidential.checks import check_confidential_launch, confidential_host_checks
from cocos_manager.confidential.modes import (
    ConfidentialConfigError,
    LaunchMode,
    launch_mode,
    launched_binding,
)
from cocos_manager.config.settings import QemuSettings, SettingsError, load_settings
from cocos_manager.qemu.argv import VmResources, derive_vm_settings, qemu_args, vm_file_paths
from tests.qemu.test_qemu_argv import DEFAULT_ARGS
from tests.support.harness import FAKE_QEMU

MANIFEST = b'{"id":"c1","algorithms":{"hash":[1,2,3]},"agent_config":{"port":"7002"}}'

# The seed's command line up to the firmware, shared by every mode.
HEAD = [
    "-enable-kvm",
    "-machine", "q35",
    "-cpu", "EPYC",
    "-smp", "4,maxcpus=64",
    "-m", "2048M,slots=5,maxmem=30G",
]  # fmt: skip
NET = [
    "-netdev", "user,id=vmnic,hostfwd=tcp::7020-:7002",
    "-device", "virtio-net-pci,disable-legacy=on,iommu_platform=true,netdev=vmnic,addr=0x2,romfile=",
    "-device", "vhost-vsock-pci,id=vhost-vsock-pci0,guest-cid=3",
    "-vnc", ":0",
]  # fmt: skip
BOOT = [
    "-kernel", "img/bzImage",
    "-append", '"earlyprintk=serial console=ttyS0"',
    "-initrd", "img/rootfs.cpio.gz",
]  # fmt: skip
TAIL = ["-nographic", "-monitor", "pty"]
PFLASH = [
    "-drive", "if=pflash,format=raw,unit=0,file=/usr/share/OVMF/OVMF_CODE.fd,readonly=on",
    "-drive", "if=pflash,format=raw,unit=1,file=/usr/share/OVMF/OVMF_VARS.fd",
]  # fmt: skip


def settings(**env: object) -> QemuSettings:
    return QemuSettings(**env)  # type: ignore[arg-type]


def test_default_is_still_the_seed_command_line() -> None:
    q = settings()
    assert launch_mode(q) is LaunchMode.SNP_SEED
    assert qemu_args(q) == DEFAULT_ARGS
    assert qemu_args(q, manifest=MANIFEST) == DEFAULT_ARGS  # no binding unless asked for


def test_snp_upstream() -> None:
    args = qemu_args(settings(SEV_SNP_SYNTAX="upstream"), manifest=MANIFEST)
    assert args == [
        *HEAD,
        "-bios", "/usr/share/ovmf/OVMF.fd",
        *NET,
        "-object", "memory-backend-memfd,id=ram1,size=2048M,share=true",
        "-machine", "memory-backend=ram1",
        *BOOT,
        "-object", "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000",
        "-machine", "confidential-guest-support=sev0",
        *TAIL,
    ]  # fmt: skip


def test_snp_upstream_everything(tmp_path: Path) -> None:
    (tmp_path / "id-block").write_bytes(bytes(range(96)))
    auth = base64.b64encode(b"\x07" * 4096)
    (tmp_path / "id-auth").write_bytes(auth + b"\n")  # base64 text, as tools print it
    q = settings(
        SEV_SNP_SYNTAX="upstream",
        SEV_SNP_POLICY="0xb0000",
        KERNEL_HASH=True,
        BIND_MANIFEST=True,
        SEV_SNP_ID_BLOCK_FILE=str(tmp_path / "id-block"),
        SEV_SNP_ID_AUTH_FILE=str(tmp_path / "id-auth"),
        SEV_SNP_AUTHOR_KEY_ENABLED="true",
        BIOS_FILE="/fw/OVMF.amdsev.fd",
        MEM_ID="m7",
        MEMORY_SIZE="1G",
    )
    args = qemu_args(q, manifest=MANIFEST)
    digest = base64.b64encode(hashlib.sha256(MANIFEST).digest()).decode()
    block = base64.b64encode(bytes(range(96))).decode()
    assert args[args.index("-bios") : args.index("-bios") + 2] == ["-bios", "/fw/OVMF.amdsev.fd"]
    assert "-drive" not in args  # one firmware image, no vars: SNP has no pflash
    assert args[-7:] == [
        "-object",
        "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0xb0000,kernel-hashes=on,"
        f"host-data={digest},id-block={block},id-auth={auth.decode()},author-key-enabled=on",
        "-machine", "confidential-guest-support=sev0",
        *TAIL,
    ]  # fmt: skip
    assert ("memory-backend-memfd,id=m7,size=1G,share=true") in args
    assert args.count("-machine") == 3  # q35, memory-backend, confidential-guest-support


def test_plain_sev_upstream_keeps_pflash_and_drops_the_fork_only_discard() -> None:
    q = settings(ENABLE_SEV=True, ENABLE_SEV_SNP=False, SEV_SNP_SYNTAX="upstream", KERNEL_HASH=True)
    assert launch_mode(q) is LaunchMode.SEV_UPSTREAM
    assert qemu_args(q) == [
        *HEAD,
        PFLASH[0], PFLASH[1],
        *NET,
        *BOOT,
        "-object", "sev-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on",
        "-machine", "confidential-guest-support=sev0",
        *TAIL,
    ]  # fmt: skip


def test_tdx() -> None:
    q = settings(
        ENABLE_TDX=True,
        ENABLE_SEV_SNP=False,
        BIND_MANIFEST=True,
        TDX_QUOTE_GENERATION_SOCKET="vsock:2:4050",
        BIOS_FILE="/fw/OVMF.tdx.fd",
    )
    args = qemu_args(q, manifest=MANIFEST)
    digest = base64.b64encode(hashlib.sha384(MANIFEST).digest()).decode()
    tdx = {
        "qom-type": "tdx-guest",
        "id": "tdx0",
        "mrconfigid": digest,
        "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"},
    }
    assert args == [
        *HEAD,
        "-bios", "/fw/OVMF.tdx.fd",
        *NET,
        *BOOT,
        "-object", json.dumps(tdx, separators=(",", ":")),
        "-machine", "confidential-guest-support=tdx0,kernel-irqchip=split",
        *TAIL,
    ]  # fmt: skip


def test_tdx_unix_quote_socket_and_no_binding() -> None:
    q = settings(ENABLE_TDX=True, ENABLE_SEV_SNP=False, TDX_QUOTE_GENERATION_SOCKET="/run/qgs.sock")
    obj = json.loads(qemu_args(q, manifest=MANIFEST)[-6])
    assert obj == {
        "qom-type": "tdx-guest",
        "id": "tdx0",
        "quote-generation-socket": {"type": "unix", "path": "/run/qgs.sock"},
    }


def test_base_command_line_has_no_host_data() -> None:
    """print-qemu-cmd and the start-up log line have no manifest: nothing to bind."""
    args = qemu_args(settings(SEV_SNP_SYNTAX="upstream", BIND_MANIFEST=True))
    assert not any("host-data" in a for a in args)


def test_per_vm_ids_and_files() -> None:
    vm = VmResources(uuid="u-1", host_port=6100, guest_cid=5, vnc_display=2)
    snp = derive_vm_settings(settings(SEV_SNP_SYNTAX="upstream", TMP_FILE_LOC="/t"), vm)
    args = qemu_args(snp)
    assert "confidential-guest-support=sev0-u-1" in args
    assert any(a.startswith("sev-snp-guest,id=sev0-u-1,") for a in args)
    # One -bios image, read only: no private OVMF_VARS copy per VM.
    assert set(vm_file_paths(snp, "u-1")) == {"kernel", "rootfs"}
    tdx = derive_vm_settings(settings(ENABLE_TDX=True, ENABLE_SEV_SNP=False), vm)
    assert "confidential-guest-support=tdx0-u-1,kernel-irqchip=split" in qemu_args(tdx)
    assert set(vm_file_paths(settings(), "u")) == {"kernel", "rootfs", "ovmf_vars"}


def test_host_data_is_sha256_of_the_manifest_bytes(tmp_path: Path) -> None:
    """What the README tells a verifier to run gives the same value."""
    assert base64.b64decode(host_data(MANIFEST)) == hashlib.sha256(MANIFEST).digest()
    assert len(base64.b64decode(mrconfigid(MANIFEST))) == 48
    (tmp_path / "manifest.json").write_bytes(MANIFEST)
    shell = subprocess.run(
        ["bash", "-c", "sha256sum manifest.json | cut -d' ' -f1 | xxd -r -p | base64"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.strip() == host_data(MANIFEST)


def test_launched_binding_reads_what_qemu_got() -> None:
    snp = qemu_args(settings(SEV_SNP_SYNTAX="upstream", BIND_MANIFEST=True), manifest=MANIFEST)
    assert launched_binding(["qemu", *snp]) == {"host_data": host_data(MANIFEST)}
    tdx = qemu_args(
        settings(ENABLE_TDX=True, ENABLE_SEV_SNP=False, BIND_MANIFEST=True), manifest=MANIFEST
    )
    assert launched_binding(tdx) == {"mrconfigid": mrconfigid(MANIFEST)}
    assert launched_binding(DEFAULT_ARGS) == {}


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("MANAGER_QEMU_SEV_SNP_SYNTAX", "fork", "seed"),
        ("MANAGER_QEMU_SEV_SNP_POLICY", "0x10000", "bit 17"),
        ("MANAGER_QEMU_SEV_SNP_POLICY", "lots", "hexadecimal"),
        ("MANAGER_QEMU_SEV_SNP_GUEST_FEATURES", "0x1ffffffffffffffff", "64 bits"),
        ("MANAGER_QEMU_BIND_MANIFEST", "yes", "boolean"),
        ("MANAGER_QEMU_ENABLE_TDX", "on", "boolean"),
        ("MANAGER_QEMU_TDX_QUOTE_GENERATION_SOCKET", "qgs.sock", "vsock:CID:PORT"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert name in str(caught.value) and words in str(caught.value)


def test_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MANAGER_QEMU_SEV_SNP_SYNTAX": "upstream",
        "MANAGER_QEMU_SEV_SNP_POLICY": "196608",
        "MANAGER_QEMU_SEV_SNP_GUEST_FEATURES": "0x21",
        "MANAGER_QEMU_BIND_MANIFEST": "1",
        "MANAGER_QEMU_ENABLE_TDX": "F",
        "MANAGER_QEMU_TDX_QUOTE_GENERATION_SOCKET": "",  # set but empty: the default
    }.items():
        monkeypatch.setenv(name, value)
    q = load_settings().qemu
    assert (q.SEV_SNP_POLICY, q.SEV_SNP_GUEST_FEATURES) == (0x30000, 0x21)
    assert q.BIND_MANIFEST and not q.ENABLE_TDX and q.TDX_QUOTE_GENERATION_SOCKET == ""


# -- start-up check -------------------------------------------------------------------------


def fake_qemu(tmp_path: Path, objects: str) -> str:
    """The stand-in QEMU answering `-object help` with these objects (its own path, so the
    once-per-binary probe cache never mixes two tests)."""
    script = tmp_path / f"qemu-{abs(hash(objects))}"
    script.write_text(
        f"#!/bin/sh\nFAKE_QEMU_OBJECTS='{objects}' exec {sys.executable} {FAKE_QEMU} \"$@\"\n"
    )
    script.chmod(0o755)
    return str(script)


def test_default_settings_start_without_probing() -> None:
    # A QEMU that does not exist: the seed syntax is never probed, the default must start.
    assert check_confidential_launch(settings(BIN_PATH="/nonexistent/qemu")) is LaunchMode.SNP_SEED


@pytest.mark.parametrize(
    ("env", "objects", "words"),
    [
        ({"SEV_SNP_SYNTAX": "upstream"}, "sev-guest", "MANAGER_QEMU_SEV_SNP_SYNTAX=upstream"),
        (
            {"ENABLE_TDX": True, "ENABLE_SEV_SNP": False},
            "sev-snp-guest,memory-backend-memfd",
            "MANAGER_QEMU_ENABLE_TDX=true",
        ),
    ],
)
def test_start_refused_when_qemu_lacks_the_object(
    tmp_path: Path, env: dict[str, object], objects: str, words: str
) -> None:
    bios = tmp_path / "OVMF.fd"
    bios.write_bytes(b"fw")
    q = settings(BIN_PATH=fake_qemu(tmp_path, objects), BIOS_FILE=str(bios), **env)
    with pytest.raises(ConfidentialConfigError) as caught:
        check_confidential_launch(q)
    message = str(caught.value)
    assert message.startswith(words) and "\n" not in message
    assert "10.0.2" in message  # which QEMU, in the operator's words


def test_start_accepted_when_qemu_has_it(tmp_path: Path) -> None:
    bios = tmp_path / "OVMF.fd"
    bios.write_bytes(b"fw")
    q = settings(
        BIN_PATH=fake_qemu(tmp_path, "memory-backend-memfd,sev-snp-guest"),
        BIOS_FILE=str(bios),
        SEV_SNP_SYNTAX="upstream",
    )
    assert check_confidential_launch(q) is LaunchMode.SNP_UPSTREAM


@pytest.mark.parametrize(
    ("objects", "mode"),
    [
        ("memory-backend-memfd,sev-snp-guest", LaunchMode.SNP_UPSTREAM),
        ("memory-backend-memfd,memory-backend-memfd-private,sev-snp-guest", LaunchMode.SNP_SEED),
        ("memory-backend-memfd,sev-guest", LaunchMode.SNP_UPSTREAM),  # Debian's 7.2: refused
    ],
)
def test_auto_probes_the_binary_once(tmp_path: Path, objects: str, mode: LaunchMode) -> None:
    q = settings(BIN_PATH=fake_qemu(tmp_path, objects), SEV_SNP_SYNTAX="auto")
    before = confidential.qemu_object_types.cache_info().misses
    assert launch_mode(q) is mode
    assert launch_mode(q) is mode
    assert confidential.qemu_object_types.cache_info().misses == before + 1


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"ENABLE_TDX": True}, "MANAGER_QEMU_ENABLE_TDX: cannot be combined"),
        ({"BIND_MANIFEST": True}, "MANAGER_QEMU_BIND_MANIFEST: needs"),
        ({"SEV_SNP_ID_BLOCK_FILE": "/x"}, "MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE: set together"),
        (
            {"SEV_SNP_ID_BLOCK_FILE": "/x", "SEV_SNP_ID_AUTH_FILE": "/y"},
            "MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE: needs MANAGER_QEMU_SEV_SNP_SYNTAX=upstream",
        ),
        (
            {"SEV_SNP_SYNTAX": "upstream", "BIOS_FILE": "/nonexistent/OVMF.fd"},
            "MANAGER_QEMU_BIOS_FILE: '/nonexistent/OVMF.fd' does not exist",
        ),
    ],
)
def test_impossible_combinations(env: dict[str, object], words: str) -> None:
    with pytest.raises(ConfidentialConfigError, match=words):
        confidential_checks.check_settings(settings(**env))


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"short", "must hold 96 bytes (raw or base64), found 5 bytes"), (None, "cannot read")],
)
def test_bad_id_block_file(tmp_path: Path, content: bytes | None, words: str) -> None:
    block = tmp_path / "id-block"
    if content is not None:
        block.write_bytes(content)
    (tmp_path / "id-auth").write_bytes(b"\0" * 4096)
    bios = tmp_path / "OVMF.fd"
    bios.write_bytes(b"fw")
    q = settings(
        SEV_SNP_SYNTAX="upstream",
        BIOS_FILE=str(bios),
        SEV_SNP_ID_BLOCK_FILE=str(block),
        SEV_SNP_ID_AUTH_FILE=str(tmp_path / "id-auth"),
    )
    with pytest.raises(ConfidentialConfigError) as caught:
        confidential_checks.check_settings(q)
    assert str(caught.value).startswith("MANAGER_QEMU_SEV_SNP_ID_BLOCK_FILE: ")
    assert words in str(caught.value)


def test_cli_refuses_to_start(tmp_path: Path) -> None:
    """The daemon's entry point: one line on stderr naming the setting, exit status 2."""
    env = {
        "PATH": "/usr/bin:/bin",
        "MANAGER_QEMU_BIN_PATH": fake_qemu(tmp_path, "sev-guest"),
        "MANAGER_QEMU_SEV_SNP_SYNTAX": "upstream",
        "MANAGER_QEMU_BIOS_FILE": str(FAKE_QEMU),  # any existing file
        "PYTHONPATH": ":".join(sys.path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "cocos_manager.main", "print-qemu-cmd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("cocos-manager: MANAGER_QEMU_SEV_SNP_SYNTAX=upstream: QEMU")
    assert done.stderr.count("\n") == 1


# -- host readiness ---------------------------------------------------------------------------


def host(tmp_path: Path, **params: str) -> Path:
    """A /sys and /dev of a host: kvm_amd.sev=Y etc."""
    for key, value in params.items():
        module, name = key.split("__")
        path = tmp_path / "sys/module" / module / "parameters" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return tmp_path


def results(checks: list[tuple[str, str, str]]) -> dict[str, str]:
    return {name: status for name, status, _ in checks}


def test_snp_host_ready(tmp_path: Path) -> None:
    root = host(tmp_path, kvm_amd__sev="Y", kvm_amd__sev_snp="Y")
    (root / "dev").mkdir()
    (root / "dev/sev").write_text("")
    q = settings(
        BIN_PATH=fake_qemu(tmp_path, "memory-backend-memfd,sev-snp-guest"),
        SEV_SNP_SYNTAX="upstream",
        BIND_MANIFEST=True,
    )
    checks = confidential_host_checks(q, sys_root=root)
    assert results(checks) == {
        "kvm_amd sev": "pass",
        "kvm_amd sev_snp": "pass",
        "/dev/sev": "pass",
        "kvm_intel tdx": "info",
        "QEMU sev-snp-guest (upstream)": "pass",
        "QEMU tdx-guest": "info",
        "manifest bound into attestation": "pass",
    }


def test_snp_asked_for_on_a_host_without_it(tmp_path: Path) -> None:
    root = host(tmp_path, kvm_amd__sev="N", kvm_amd__sev_snp="N")
    q = settings(BIN_PATH=fake_qemu(tmp_path, "sev-guest"), SEV_SNP_SYNTAX="upstream")
    checks = confidential_host_checks(q, sys_root=root)
    status = results(checks)
    assert status["kvm_amd sev_snp"] == "fail"
    assert status["/dev/sev"] == "fail"
    assert status["QEMU sev-snp-guest (upstream)"] == "fail"
    detail = dict((n, d) for n, _, d in checks)["kvm_amd sev_snp"]
    assert "MANAGER_QEMU_ENABLE_SEV_SNP=false" in detail  # says what to do


def test_default_settings_warn_about_the_seed_syntax(tmp_path: Path) -> None:
    checks = confidential_host_checks(settings(BIN_PATH="/nonexistent"), sys_root=tmp_path)
    status = results(checks)
    assert status["SEV-SNP syntax"] == "warn"
    assert status["kvm_amd sev_snp"] == "fail"  # the defaults ask for SNP
    assert status["QEMU sev-snp-guest (upstream)"] == "info"  # not asked for: seed syntax


def test_tdx_host(tmp_path: Path) -> None:
    root = host(tmp_path, kvm_intel__tdx="Y")
    q = settings(
        BIN_PATH=fake_qemu(tmp_path, "memory-backend-memfd"), ENABLE_TDX=True, ENABLE_SEV_SNP=False
    )
    status = results(confidential_host_checks(q, sys_root=root))
    assert status["kvm_intel tdx"] == "pass"
    assert status["QEMU tdx-guest"] == "fail"
    assert status["kvm_amd sev_snp"] == "info"
