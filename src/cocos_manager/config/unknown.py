"""Finds MANAGER_* variables nothing reads, so a typo is reported instead of silently ignored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cocos_manager.config.settings import QemuSettings, ServiceSettings, env_name

# Read elsewhere, not by these models: the dial-out client (MANAGER_GRPC_URL and its
# companions) and the variables the unit file or the CLI set.
EXTRA_KNOWN_VARIABLES = frozenset(
    {
        "MANAGER_GRPC_URL",
        "MANAGER_GRPC_TIMEOUT",
        "MANAGER_GRPC_CLIENT_CERT",
        "MANAGER_GRPC_CLIENT_KEY",
        "MANAGER_GRPC_ATTESTED_TLS",
        "MANAGER_GRPC_MANIFEST",
        # cocos-manager-cli's own (cli/commands.py): where the manager is, its TLS files.
        "COCOS_MANAGER_ADDR",
        "COCOS_MANAGER_CA",
        "COCOS_MANAGER_CERT",
        "COCOS_MANAGER_KEY",
    }
)


# Today's upstream Cocos (ultravioletrs/cocos main: cmd/manager/main.go, manager/qemu/config.go,
# cocos-manager.env) reads these; this daemon does not, and says why at start and in `check`
# instead of guessing a close name (README, "Driving it from today's Cocos").
_DISK = "not supported: disk-image boot (ENABLE_DISK); VMs boot kernel and initramfs"
_GPU = "not supported: GPU passthrough (VFIO) is not offered"
_IGVM = "not supported: IGVM/COCONUT-SVSM launch (vTPM); SEV-SNP boots OVMF with -bios"
UPSTREAM_MAIN_ONLY = {
    "MANAGER_QEMU_SEV_SNP_ID": "use MANAGER_QEMU_SEV_ID (same default, sev0)",
    "MANAGER_QEMU_SEV_SNP_CBIT_POS": "use MANAGER_QEMU_SEV_CBITPOS (same default, 51)",
    "MANAGER_QEMU_SEV_SNP_CBITPOS": "use MANAGER_QEMU_SEV_CBITPOS (same default, 51)",
    "MANAGER_QEMU_SEV_SNP_REDUCED_PHYS_BITS": "use MANAGER_QEMU_SEV_REDUCED_PHYS_BITS",
    "MANAGER_QEMU_OVMF_FILE": "use MANAGER_QEMU_BIOS_FILE (same default)",
    "MANAGER_QEMU_QUOTE_GENERATION_PORT": (
        "use MANAGER_QEMU_TDX_QUOTE_GENERATION_SOCKET=vsock:2:PORT"
    ),
    "MANAGER_QEMU_ENABLE_HOST_DATA": (
        "not supported: host-data is per VM, the digest of what its agent is handed, with "
        "MANAGER_QEMU_BIND_MANIFEST=true"
    ),
    "MANAGER_QEMU_HOST_DATA": (
        "not supported: a fixed host-data binds nothing; use MANAGER_QEMU_BIND_MANIFEST=true"
    ),
    "MANAGER_QEMU_CERTS_MOUNT": "not a setting here: each CreateVm'd VM gets shares of its own",
    "MANAGER_QEMU_ENV_MOUNT": "not a setting here: each CreateVm'd VM gets shares of its own",
    "MANAGER_QEMU_ENABLE_DISK": _DISK,
    "MANAGER_QEMU_SRC_DISK_FILE": _DISK,
    "MANAGER_QEMU_DST_DISK_FILE": _DISK,
    "MANAGER_QEMU_DISK_ID": _DISK,
    "MANAGER_QEMU_DISK_FORMAT": _DISK,
    "MANAGER_QEMU_DISK_SCSI_ID": _DISK,
    "MANAGER_QEMU_GPU_BDF": _GPU,
    "MANAGER_QEMU_GPU_PCIE_ROOT_PORT": _GPU,
    "MANAGER_QEMU_GPU_PCIE_BUS": _GPU,
    "MANAGER_QEMU_GPU_FW_CFG_MMIO_MB": _GPU,
    "MANAGER_QEMU_IGVM_ID": _IGVM,
    "MANAGER_QEMU_IGVM_FILE": _IGVM,
    "MANAGER_ATTESTATION_POLICY_BINARY_PATH": (
        "not needed: AttestationPolicy computes the SEV-SNP measurement itself (sev-snp-measure)"
    ),
    "MANAGER_ATTESTATION_POLICY_BINARY": (
        "not needed: AttestationPolicy computes the SEV-SNP measurement itself (sev-snp-measure)"
    ),
    "MANAGER_IGVMMEASURE_BINARY": _IGVM,
    "MANAGER_PCR_VALUES": "not supported: vTPM PCR values come with the IGVM/SVSM launch",
    "MANAGER_CORIM_SIGNING_KEY": (
        "not supported: the policy is a JSON document, not a signed CoRIM"
    ),
    "MANAGER_HTTP_HOST": "not served: health is gRPC's; /metrics: MANAGER_METRICS_HOST",
    "MANAGER_HTTP_PORT": "not served: health is gRPC's; /metrics: MANAGER_METRICS_PORT",
    "MANAGER_HTTP_SERVER_CERT": "not served: there is no HTTP API",
    "MANAGER_HTTP_SERVER_KEY": "not served: there is no HTTP API",
    "MANAGER_HTTP_SERVER_CA_CERTS": "not served: there is no HTTP API",
    "MANAGER_HTTP_CLIENT_CA_CERTS": "not served: there is no HTTP API",
}


def known_variables() -> frozenset[str]:
    """Every MANAGER_* (and COCOS_*) variable something in the manager reads."""
    names = {
        env_name(model, field)
        for model in (ServiceSettings, QemuSettings)
        for field in model.model_fields
    }
    return frozenset(names | EXTRA_KNOWN_VARIABLES)


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    name: str
    closest: str | None
    upstream: str | None = None  # today's upstream Cocos reads it: what to do here instead


def _close_matches(name: str, known: frozenset[str]) -> list[str]:
    import difflib  # only when there is a name to match: not on every start-up

    return difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)


def unknown_variables(environ: Mapping[str, str]) -> list[UnknownVariable]:
    """MANAGER_* variables nothing reads (a typo is otherwise silently ignored), each with
    the closest known name when one is close enough to be the likely intent."""
    known = known_variables()
    out = []
    for name in sorted(environ):
        if not name.upper().startswith("MANAGER_") or name in known:
            continue
        if name in UPSTREAM_MAIN_ONLY:
            out.append(UnknownVariable(name, None, UPSTREAM_MAIN_ONLY[name]))
            continue
        if name.upper() in known:  # names are case-sensitive, as in Go: said, not guessed
            out.append(UnknownVariable(name, name.upper()))
            continue
        # A name cut short (MANAGER_QEMU_MEMORY) most likely meant the shortest longer one.
        longer = sorted((k for k in known if k.startswith(name + "_")), key=len)
        close = longer or _close_matches(name, known)
        out.append(UnknownVariable(name, close[0] if close else None))
    return out
