"""Can a Run work on this host with these settings? Probes shared by `cocos-manager check` and
the daemon's start-up warnings.

In the spirit of libvirt's virt-host-validate and kata-runtime's check: each probe is one line,
pass / warn / fail, and a line that is not a pass says what to do, naming the setting. A fail
means a Run with the current settings cannot work; a warn means it can, but something is off
(slow, insecure, or a typo that is ignored).

The start-up warnings are the cheap subset (files in /dev and /sys, the environment): the
daemon must reach SERVING fast. The QEMU probes (`-version`, `-object help`, `-device help`,
`-machine help`, `-cpu help`) run a QEMU process each and only run in `cocos-manager check`.

This module checks the service settings, files, directories and ports, and puts every probe
together; the kernel and device probes are in host_probes.py, the QEMU ones in qemu_probes.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from cocos_manager.config.choices import tracing_off
from cocos_manager.config.settings import Settings
from cocos_manager.config.unknown_variables import unknown_variables
from cocos_manager.host.check_result import Check, Status
from cocos_manager.host.probes import Host, check_agent_channel, check_kvm, check_sev
from cocos_manager.qemu.probes import Runner, check_qemu, check_sudo, run_probe

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
    from cocos_manager.config.tls import TlsConfigError, describe_mode, server_credentials

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
    from cocos_manager.confidential.modes import uses_bios

    if uses_bios(q):  # upstream SEV-SNP and TDX boot one image by -bios: no pflash drives
        checks = [_file_check("bios", "MANAGER_QEMU_BIOS_FILE", q.BIOS_FILE, ovmf)]
    else:
        checks = [_file_check("ovmf-code", "MANAGER_QEMU_OVMF_CODE_FILE", q.OVMF_CODE_FILE, ovmf)]
    if not q.KERNEL_HASH and not uses_bios(q):
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
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():  # mkdir cannot make it: File exists
        return Check(
            name,
            "fail",
            f"{variable}={path}: {probe} is a dangling symlink (to {os.readlink(probe)}): "
            "make its target, or point the variable elsewhere",
        )
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


# -- the two entry points ----------------------------------------------------------------------


def startup_checks(settings: Settings, host: Host | None = None) -> list[Check]:
    """What the daemon checks at start: cheap (no QEMU run), no file written."""
    host = host or Host()
    checks = [check_kvm(settings, host), check_agent_channel(settings, host)]
    checks += check_sev(settings, host)
    checks.append(check_listen(settings))
    checks += check_unknown_variables(host.env())
    return checks


def run_checks(
    settings: Settings, host: Host | None = None, run: Runner = run_probe
) -> list[Check]:
    """Every probe, for `cocos-manager check`."""
    host = host or Host()
    checks = startup_checks(settings, host)
    checks += check_qemu(settings, run)
    # What the confidential launch the settings ask for needs of this host and QEMU (policy,
    # firmware, QEMU's objects); it probes QEMU, so it runs here and not at start-up.
    from cocos_manager.confidential.checks import confidential_host_checks

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
    checks.append(check_sched_weight(settings))
    return checks


def check_sched_weight(settings: Settings) -> Check:
    """MANAGER_AUTOGROUP_NICE as the daemon would apply it (sched_weight.py)."""
    from cocos_manager.host.sched_weight import weight_check

    status, detail = weight_check(settings.service.AUTOGROUP_NICE)
    return Check("scheduling-weight", cast(Status, status), detail)


def log_startup_warnings(settings: Settings, log: Any, host: Host | None = None) -> None:
    """Each start-up finding that is a warn or a fail, once, as a JSON log line (an info is
    about a feature the settings do not ask for: no warning)."""
    for check in startup_checks(settings, host):
        if check.status in ("warn", "fail"):
            log.warning(check.detail, check=check.name, status=check.status)
