"""Can a Run work on this host with these settings? Probes shared by `cocos-manager check` and
the daemon's start-up warnings.

In the spirit of libvirt's virt-host-validate and kata-runtime's check: each probe is one line,
pass / warn / fail, and a line that is not a pass says what to do, naming the setting. A fail
means a Run with the current settings cannot work; a warn means it can, but something is off
(slow, insecure, or a typo that is ignored).

The start-up warnings are the cheap subset (files in /dev and /sys, the environment): the
daemon must reach SERVING fast. The QEMU probes (`-version`, `-object help`, `-device help`,
`-machine help`, `-cpu help`) run a QEMU process each and only run in `cocos-manager check`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from cocos_manager.qemu_failures import classify_sudo_refusal, daemon_user, sudoers_lines
from cocos_manager.settings import (
    AgentChannel,
    Settings,
    tracing_off,
    unknown_variables,
)

Status = Literal["pass", "warn", "fail"]

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12
QEMU_PROBE_TIMEOUT = 10.0
# CPU models that TCG (no KVM) runs without missing features; EPYC asks for ones it lacks.
TCG_CPU_MODELS = ("max", "qemu64", "qemu32", "kvm64", "base")
TCG_ENV = (
    "MANAGER_QEMU_ENABLE_KVM=false MANAGER_QEMU_ENABLE_SEV_SNP=false MANAGER_QEMU_CPU=max "
    "MANAGER_QEMU_MEMORY_SIZE=512M"
)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Host:
    """Where the probes look: the real root, or a fake tree in tests."""

    dev: Path = Path("/dev")
    sys_module: Path = Path("/sys/module")
    cpuinfo: Path = Path("/proc/cpuinfo")
    environ: Mapping[str, str] | None = None
    kvm_probe: Callable[[Path], str | None] = field(default=lambda path: kvm_creates_vm(path))

    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


# -- device and kernel probes -----------------------------------------------------------------


def _open_device(path: Path) -> OSError | int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return error


def _parameter(host: Host, module: str, name: str) -> bool | None:
    """A kvm module parameter as a bool: None when the module (or parameter) is not there."""
    try:
        text = (host.sys_module / module / "parameters" / name).read_text().strip()
    except OSError:
        return None
    return text in ("Y", "y", "1")


def kvm_creates_vm(kvm: Path) -> str | None:
    """None when the device makes a VM; otherwise why not."""
    opened = _open_device(kvm)
    if isinstance(opened, OSError):
        if opened.errno == errno.ENOENT:
            return "is missing"
        return f"cannot be opened ({opened.strerror})"
    try:
        version = fcntl.ioctl(opened, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return f"speaks KVM API {version}, not {KVM_API_VERSION}"
        os.close(fcntl.ioctl(opened, KVM_CREATE_VM, 0))
    except OSError as error:
        return f"cannot create a VM ({error.strerror})"
    finally:
        os.close(opened)
    return None


def check_kvm(settings: Settings, host: Host) -> Check:
    kvm = host.dev / "kvm"
    if not settings.qemu.ENABLE_KVM:
        note = " (this host has /dev/kvm)" if kvm.exists() else ""
        return Check("kvm", "pass", f"MANAGER_QEMU_ENABLE_KVM=false: QEMU runs TCG{note}")
    why = host.kvm_probe(kvm)
    if why is not None:
        return Check(
            "kvm",
            "fail",
            f"MANAGER_QEMU_ENABLE_KVM=true but {kvm} {why}: load kvm_amd or kvm_intel (and give "
            "the daemon access), or set MANAGER_QEMU_ENABLE_KVM=false to run under TCG",
        )
    hardware = [m for m in ("kvm_amd", "kvm_intel") if (host.sys_module / m).exists()]
    if not hardware:
        return Check(
            "kvm",
            "warn",
            f"{kvm} creates VMs, but neither kvm_amd nor kvm_intel is loaded (another KVM "
            "provider, or a nested host): if guests crash or Runs fail, set "
            "MANAGER_QEMU_ENABLE_KVM=false (TCG)",
        )
    if _is_guest(host):
        return Check(
            "kvm",
            "warn",
            f"{kvm} ({', '.join(hardware)}) works, but this host is itself a VM (nested KVM): "
            "if guests crash, set MANAGER_QEMU_ENABLE_KVM=false (TCG)",
        )
    return Check("kvm", "pass", f"{kvm} creates VMs ({', '.join(hardware)}, KVM API 12)")


def _is_guest(host: Host) -> bool:
    """The CPU's hypervisor flag: this host runs under a hypervisor."""
    try:
        text = host.cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\bhypervisor\b", text, re.M) is not None


def check_agent_channel(settings: Settings, host: Host) -> Check:
    if settings.qemu.AGENT_CHANNEL is AgentChannel.FW_CFG:
        return Check(
            "agent-channel",
            "pass",
            "MANAGER_QEMU_AGENT_CHANNEL=fw_cfg: the manifest goes in by -fw_cfg, no vsock device",
        )
    device = host.dev / "vhost-vsock"
    opened = _open_device(device)
    if isinstance(opened, OSError):
        why = (
            "is missing"
            if opened.errno == errno.ENOENT
            else f"cannot be opened ({opened.strerror})"
        )
        return Check(
            "agent-channel",
            "fail",
            f"MANAGER_QEMU_AGENT_CHANNEL=vsock but {device} {why}: `modprobe vhost_vsock`, or "
            "set MANAGER_QEMU_AGENT_CHANNEL=fw_cfg",
        )
    os.close(opened)
    return Check("agent-channel", "pass", f"MANAGER_QEMU_AGENT_CHANNEL=vsock: {device} opens")


def check_sev(settings: Settings, host: Host) -> list[Check]:
    """SEV / SEV-SNP as kvm_amd reports them, and TDX as kvm_intel does (report only)."""
    q = settings.qemu
    sev = _parameter(host, "kvm_amd", "sev")
    snp = _parameter(host, "kvm_amd", "sev_snp")
    tdx = _parameter(host, "kvm_intel", "tdx")
    dev_sev = (host.dev / "sev").exists()
    checks = []
    if q.ENABLE_SEV_SNP:
        if snp and dev_sev:
            checks.append(Check("sev-snp", "pass", "kvm_amd sev_snp=Y and /dev/sev present"))
        else:
            missing = []
            if snp is None:
                missing.append("kvm_amd is not loaded (or has no sev_snp parameter)")
            elif not snp:
                missing.append("kvm_amd sev_snp is N")
            if not dev_sev:
                missing.append(f"{host.dev / 'sev'} is missing")
            checks.append(
                Check(
                    "sev-snp",
                    "fail",
                    "MANAGER_QEMU_ENABLE_SEV_SNP=true (the default) but "
                    + "; ".join(missing)
                    + ": enable SEV-SNP in the BIOS and kvm_amd, or set "
                    "MANAGER_QEMU_ENABLE_SEV_SNP=false (no confidential VM)",
                )
            )
    elif q.ENABLE_SEV:
        if sev and dev_sev:
            checks.append(Check("sev", "pass", "kvm_amd sev=Y and /dev/sev present"))
        else:
            state = "not loaded" if sev is None else ("sev=N" if not sev else "loaded")
            extra = "" if dev_sev else f", {host.dev / 'sev'} missing"
            checks.append(
                Check(
                    "sev",
                    "fail",
                    f"MANAGER_QEMU_ENABLE_SEV=true but kvm_amd is {state}{extra}: enable SEV in "
                    "the BIOS and kvm_amd, or set MANAGER_QEMU_ENABLE_SEV=false",
                )
            )
    else:
        have = [n for n, v in (("SEV", sev), ("SEV-SNP", snp), ("TDX", tdx)) if v]
        checks.append(
            Check(
                "confidential",
                "pass",
                "SEV and SEV-SNP off (MANAGER_QEMU_ENABLE_SEV*=false): VMs are not confidential"
                + (f"; this host offers {', '.join(have)}" if have else ""),
            )
        )
    if tdx is not None:
        checks.append(Check("tdx", "pass", f"kvm_intel tdx={'Y' if tdx else 'N'} (report only)"))
    return checks


# -- service settings ------------------------------------------------------------------------


def check_listen(settings: Settings) -> Check:
    s = settings.service
    tls = bool(s.GRPC_SERVER_CERT or s.GRPC_SERVER_KEY)
    everywhere = s.GRPC_HOST in ("", "0.0.0.0", "::", "[::]")
    if everywhere and not tls:
        return Check(
            "grpc-listen",
            "warn",
            "gRPC listens on all interfaces without TLS (MANAGER_GRPC_HOST empty): anyone on "
            "the network can run VMs; set MANAGER_GRPC_HOST=127.0.0.1, or TLS with "
            "MANAGER_GRPC_SERVER_CERT/_KEY (and MANAGER_GRPC_CLIENT_CA_CERTS for mutual TLS)",
        )
    where = s.GRPC_HOST or "all interfaces"
    return Check(
        "grpc-listen", "pass", f"gRPC on {where}:{s.GRPC_PORT}, {'TLS' if tls else 'plaintext'}"
    )


def check_unknown_variables(environ: Mapping[str, str]) -> list[Check]:
    checks = []
    for unknown in unknown_variables(environ):
        hint = f"; did you mean {unknown.closest}?" if unknown.closest else ""
        checks.append(
            Check(
                "unknown-variable",
                "warn",
                f"{unknown.name} is not a setting of the manager and is ignored{hint}",
            )
        )
    return checks


def check_tls(settings: Settings) -> Check:
    """The certificates and keys parse and match, as the daemon checks them at start."""
    from cocos_manager.tls import TlsConfigError, describe_mode, server_credentials

    try:
        mode, _ = server_credentials(settings.service)
    except TlsConfigError as error:
        return Check("tls", "fail", f"{error}: the daemon refuses to start")
    return Check("tls", "pass", f"gRPC {describe_mode(mode, settings.service)}")


def check_tracing(settings: Settings) -> Check:
    url = settings.service.JAEGER_URL
    if tracing_off(url):
        return Check("tracing", "pass", "COCOS_JAEGER_URL=off: no spans are exported")
    return Check("tracing", "pass", f"spans go to {url} (COCOS_JAEGER_URL; off turns it off)")


# -- files and directories -------------------------------------------------------------------


def _file_check(name: str, variable: str, path: str, fix: str) -> Check:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        return Check(name, "fail", f"{variable}={path}: {error.strerror}: {fix}")
    return Check(name, "pass", f"{variable}={path} is readable")


def check_files(settings: Settings) -> list[Check]:
    q = settings.qemu
    ovmf = "install Debian's ovmf package (or set the variable to your OVMF build)"
    images = (
        "use the Cocos guest images (kernel and rootfs of a Cocos release), or `make guest` for "
        "the test guest in build/guest"
    )
    checks = [_file_check("ovmf-code", "MANAGER_QEMU_OVMF_CODE_FILE", q.OVMF_CODE_FILE, ovmf)]
    if not q.KERNEL_HASH:
        checks.append(
            _file_check("ovmf-vars", "MANAGER_QEMU_OVMF_VARS_FILE", q.OVMF_VARS_FILE, ovmf)
        )
    checks.append(
        _file_check("kernel", "MANAGER_QEMU_DISK_IMG_KERNEL_FILE", q.DISK_IMG_KERNEL_FILE, images)
    )
    checks.append(
        _file_check("rootfs", "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE", q.DISK_IMG_ROOTFS_FILE, images)
    )
    return checks


def _writable_dir(name: str, variable: str, path: str) -> Check:
    """The directory, or the nearest existing parent it would be made in, is writable."""
    target = Path(path).absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return Check(name, "fail", f"{variable}={path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check(name, "fail", f"{variable}={path}: {probe} is not writable by this user")
    made = "" if probe == target else f" (will be made in {probe})"
    return Check(name, "pass", f"{variable}={path} is writable{made}")


def check_directories(settings: Settings) -> list[Check]:
    return [
        _writable_dir("tmp-file-loc", "MANAGER_QEMU_TMP_FILE_LOC", settings.qemu.TMP_FILE_LOC),
        _writable_dir("state-dir", "MANAGER_STATE_DIR", settings.service.STATE_DIR),
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def check_ports(settings: Settings) -> Check:
    span = settings.qemu.HOST_FWD_RANGE
    if span is None:
        return Check(
            "host-ports", "pass", "MANAGER_QEMU_HOST_FWD_RANGE unset: any free port per VM"
        )
    free = sum(1 for port in span if _port_free(port))
    size = span.last - span.first + 1
    if free == 0:
        return Check(
            "host-ports",
            "fail",
            f"MANAGER_QEMU_HOST_FWD_RANGE={span}: none of its {size} ports is free: widen it",
        )
    return Check("host-ports", "pass", f"MANAGER_QEMU_HOST_FWD_RANGE={span}: {free}/{size} free")


# -- QEMU ------------------------------------------------------------------------------------

Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=QEMU_PROBE_TIMEOUT,
        check=False,
    )
    return done.stdout + done.stderr


def _names(listing: str) -> set[str]:
    """The first word of each line of a QEMU `help` listing (names may be quoted)."""
    names = set()
    for line in listing.splitlines():
        words = line.split()
        if words and words[0] == "x86" and len(words) > 1:  # -cpu help: "x86 EPYC  ..."
            words = words[1:]
        if words and not line.endswith(":"):
            names.add(words[0].strip('"').rstrip(","))
        match = re.match(r'\s*name "([^"]+)"', line)
        if match:
            names.add(match.group(1))
    return names


def check_qemu(settings: Settings, run: Runner = _run) -> list[Check]:
    q = settings.qemu
    qemu = shutil.which(q.BIN_PATH)
    if qemu is None:
        return [
            Check(
                "qemu",
                "fail",
                f"MANAGER_QEMU_BIN_PATH={q.BIN_PATH} is not an executable on PATH: install "
                "qemu-system-x86 (Debian) or set MANAGER_QEMU_BIN_PATH",
            )
        ]
    try:
        version_text = run([qemu, "-version"])
        match = re.search(r"version (\d+(?:\.\d+)+)", version_text)
        if match is None:
            return [Check("qemu", "fail", f"{qemu} -version said: {version_text.strip()[:200]}")]
        checks = [Check("qemu", "pass", f"{qemu}, QEMU {match.group(1)}")]
        objects = _names(run([qemu, "-object", "help"]))
        devices = _names(run([qemu, "-device", "help"]))
        machines = _names(run([qemu, "-machine", "help"]))
        cpus = _names(run([qemu, "-cpu", "help"]))
    except (OSError, subprocess.SubprocessError) as error:
        return [Check("qemu", "fail", f"{qemu} does not answer -version/help: {error}")]
    needed: list[tuple[str, str, set[str], str]] = []
    if q.ENABLE_SEV_SNP:
        needed += [
            ("memory-backend-memfd-private", "object", objects, "MANAGER_QEMU_ENABLE_SEV_SNP"),
            ("sev-snp-guest", "object", objects, "MANAGER_QEMU_ENABLE_SEV_SNP"),
        ]
    elif q.ENABLE_SEV:
        needed.append(("sev-guest", "object", objects, "MANAGER_QEMU_ENABLE_SEV"))
    if q.AGENT_CHANNEL is AgentChannel.VSOCK:
        needed.append(("vhost-vsock-pci", "device", devices, "MANAGER_QEMU_AGENT_CHANNEL"))
    needed.append(("virtio-net-pci", "device", devices, "(always used)"))
    if q.MACHINE:
        needed.append((q.MACHINE, "machine", machines, "MANAGER_QEMU_MACHINE"))
    if q.CPU:
        needed.append((q.CPU, "cpu", cpus, "MANAGER_QEMU_CPU"))
    missing = [(name, kind, var) for name, kind, known, var in needed if name not in known]
    for name, kind, variable in missing:
        fix = {
            "MANAGER_QEMU_ENABLE_SEV_SNP": "this QEMU cannot launch SEV-SNP with the original's "
            "flags (AMD's fork has them): set MANAGER_QEMU_ENABLE_SEV_SNP=false",
            "MANAGER_QEMU_ENABLE_SEV": "set MANAGER_QEMU_ENABLE_SEV=false",
            "MANAGER_QEMU_AGENT_CHANNEL": "set MANAGER_QEMU_AGENT_CHANNEL=fw_cfg",
            "MANAGER_QEMU_MACHINE": "set MANAGER_QEMU_MACHINE (e.g. q35)",
            "MANAGER_QEMU_CPU": "set MANAGER_QEMU_CPU (e.g. max)",
        }.get(variable, "install a full qemu-system-x86")
        checks.append(Check(f"qemu-{kind}", "fail", f"QEMU has no {kind} {name!r}: {fix}"))
    present = [f"{kind} {name}" for name, kind, known, _ in needed if name in known]
    if present:
        checks.append(Check("qemu-features", "pass", "QEMU knows " + ", ".join(present)))
    if not q.ENABLE_KVM and q.CPU and q.CPU not in TCG_CPU_MODELS:
        checks.append(
            Check(
                "qemu-cpu",
                "warn",
                f"MANAGER_QEMU_CPU={q.CPU} under TCG (KVM off): TCG lacks some of its features "
                "and QEMU warns about each; set MANAGER_QEMU_CPU=max",
            )
        )
    return checks


def check_sudo(settings: Settings, run: Runner = _run) -> Check | None:
    """What a Run through sudo needs, tried for real: sudo runs QEMU (`-version`) without a
    password and lets it keep a descriptor (`-C`, the QMP socket); `kill` allowed too, for
    the last resort of a Stop (a QEMU that ignores QMP quit)."""
    q = settings.qemu
    if not q.USE_SUDO:
        return None
    qemu = shutil.which(q.BIN_PATH) or q.BIN_PATH
    kill = shutil.which("kill") or "/usr/bin/kill"
    rule = sudoers_lines(daemon_user(), qemu, kill)
    probe = ["sudo", "-n", "-C", "4", "--", qemu, "-version"]
    try:
        out = run(probe)
    except FileNotFoundError:
        return Check("sudo", "fail", "MANAGER_QEMU_USE_SUDO=true but sudo is not installed")
    except (OSError, subprocess.SubprocessError) as error:
        return Check("sudo", "fail", f"{shlex.join(probe)}: {error}")
    refusal = classify_sudo_refusal(out.splitlines())
    if refusal is not None or "QEMU emulator version" not in out:
        said = refusal[0] if refusal else (out.strip().splitlines() or ["no output"])[0]
        return Check(
            "sudo",
            "fail",
            f"MANAGER_QEMU_USE_SUDO=true but `{shlex.join(probe)}` does not run QEMU ({said}): "
            f"add to sudoers {rule}, or set MANAGER_QEMU_USE_SUDO=false",
        )
    try:
        listed = run(["sudo", "-n", "-l", kill])
    except (OSError, subprocess.SubprocessError):
        listed = ""
    if kill not in listed:
        return Check(
            "sudo",
            "warn",
            f"sudo runs {qemu} without a password, keeping its QMP socket; `sudo -n {kill}` is "
            "not allowed, so a Stop cannot kill a QEMU that ignores QMP quit (root's QEMU "
            f"cannot be signalled otherwise): add {kill} to the rule, {rule}",
        )
    return Check("sudo", "pass", f"sudo runs {qemu} without a password (-C allowed) and kill")


# -- the two entry points ----------------------------------------------------------------------


def startup_checks(settings: Settings, host: Host | None = None) -> list[Check]:
    """What the daemon checks at start: cheap (no QEMU run), no file written."""
    host = host or Host()
    checks = [check_kvm(settings, host), check_agent_channel(settings, host)]
    checks += check_sev(settings, host)
    checks.append(check_listen(settings))
    checks += check_unknown_variables(host.env())
    return checks


def run_checks(settings: Settings, host: Host | None = None, run: Runner = _run) -> list[Check]:
    """Every probe, for `cocos-manager check`."""
    host = host or Host()
    checks = startup_checks(settings, host)
    checks += check_qemu(settings, run)
    # What the confidential launch the settings ask for needs of this host and QEMU (policy,
    # firmware, QEMU's objects); it probes QEMU, so it runs here and not at start-up.
    from cocos_manager.confidential import confidential_host_checks

    checks += [
        Check(name, cast(Status, status), detail)
        for name, status, detail in confidential_host_checks(settings.qemu)
    ]
    checks += check_files(settings)
    checks += check_directories(settings)
    checks.append(check_ports(settings))
    sudo = check_sudo(settings, run)
    if sudo is not None:
        checks.append(sudo)
    checks.append(check_tls(settings))
    checks.append(check_tracing(settings))
    return checks


def log_startup_warnings(settings: Settings, log: Any, host: Host | None = None) -> None:
    """Each start-up finding that is not a pass, once, as a JSON log line."""
    for check in startup_checks(settings, host):
        if check.status != "pass":
            log.warning(check.detail, check=check.name, status=check.status)


def render(checks: Iterable[Check], as_json: bool) -> str:
    checks = list(checks)
    if as_json:
        return json.dumps([c.as_dict() for c in checks], indent=2)
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{c.status.upper():4}  {c.name:{width}}  {c.detail}" for c in checks)


def exit_code(checks: Iterable[Check]) -> int:
    """1 when a Run with these settings cannot work."""
    return 1 if any(c.status == "fail" for c in checks) else 0
