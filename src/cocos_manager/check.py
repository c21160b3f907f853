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
together; the kernel and device probes are in host/probes.py, the QEMU ones in qemu/probes.py.

What the daemon refuses to start with is one list, STARTUP_REFUSALS, run by the daemon first
(`refuse_startup`) and by `check` as its lines, so the two cannot drift (listeners: `check`
binds them as the daemon will, and lets go).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from cocos_manager.config import (
    DialOutConfigError,
    Settings,
    TlsConfigError,
    describe_mode,
    dialout_config,
    server_credentials,
    tracing_off,
    unknown_variables,
)
from cocos_manager.errors import ManagerError
from cocos_manager.host import (
    Check,
    Host,
    ListenRefusedError,
    StateDirLockedError,
    Status,
    check_agent_channel,
    check_kvm,
    check_private_dir,
    check_sev,
    probe_grpc_listen,
    probe_state_lock,
)
from cocos_manager.qemu import Runner, check_qemu, check_sudo, run_probe
from cocos_manager.telemetry import (
    MetricsServerError,
    describe_tracing,
    metrics_host,
    probe_collector,
    probe_metrics_listen,
)
from cocos_manager.vm import room_per_vm

# -- what the daemon refuses to start with -------------------------------------------------------

REFUSED = (
    TlsConfigError,
    DialOutConfigError,
    ManagerError,
    StateDirLockedError,
    ListenRefusedError,
    MetricsServerError,
)
"""What a refusal raises; its message is the one line the daemon exits with (status 2)."""


class StartupRefusedError(Exception):
    """The daemon cannot start with these settings; the message is the operator's line."""


def _tls(settings: Settings) -> str:
    mode, _ = server_credentials(settings.service)
    return f"gRPC {describe_mode(mode, settings.service)}"


def _dial_out(settings: Settings) -> str:
    try:
        config = dialout_config(settings.service)
    except TlsConfigError as error:  # as DialOut.configure words it
        raise DialOutConfigError(str(error)) from None
    if config is None:
        return "MANAGER_GRPC_URL unset: no dial-out"
    return f"dial-out to {config.target} {config.description}"


def _state_dir(settings: Settings) -> str:
    directory = Path(os.path.abspath(settings.service.STATE_DIR))
    if not directory.exists():
        return f"MANAGER_STATE_DIR={directory} will be made (mode 0700)"
    check_private_dir(directory)
    probe_state_lock(directory)
    return f"MANAGER_STATE_DIR={directory} is private to this user and not in use"


def _grpc_listen(settings: Settings) -> str:
    s = settings.service
    probe_grpc_listen(s.GRPC_HOST, s.GRPC_PORT)
    return f"{s.GRPC_HOST or 'all interfaces'}:{s.GRPC_PORT} can be bound"


def _metrics_listen(settings: Settings) -> str:
    return probe_metrics_listen(settings.service.METRICS_PORT, metrics_host(settings.service))


STARTUP_REFUSALS: tuple[tuple[str, Callable[[Settings], str], bool], ...] = (
    ("tls", _tls, False),
    ("dial-out", _dial_out, False),
    ("state-dir", _state_dir, False),
    ("grpc-listen", _grpc_listen, True),
    ("metrics-listen", _metrics_listen, True),
)
"""(check line, refusal, binds): each returns what passes, or raises one of REFUSED with the
daemon's line. `binds`: the daemon does not probe ahead; it binds for real at that step and
refuses a failure with the same line (host/listeners.py, telemetry/metrics.py)."""


def refusal_check(settings: Settings, name: str) -> Check:
    refusal = next(entry[1] for entry in STARTUP_REFUSALS if entry[0] == name)
    try:
        return Check(name, "pass", refusal(settings))
    except REFUSED as error:
        return Check(name, "fail", f"{error}: the daemon refuses to start")


def refuse_startup(settings: Settings) -> None:
    """The daemon's first step: StartupRefusedError with the line `check` prints for it."""
    for _, refusal, binds in STARTUP_REFUSALS:
        if not binds:
            try:
                refusal(settings)
            except REFUSED as error:
                raise StartupRefusedError(str(error)) from None


# -- service settings ------------------------------------------------------------------------


def check_listen(settings: Settings, bind: bool = False) -> Check:
    """Exposure of the gRPC listener; with `bind` (check, not the start-up warnings, which
    run while the daemon is about to bind it itself), first whether it can be bound."""
    if bind:
        bound = refusal_check(settings, "grpc-listen")
        if bound.status == "fail":
            return bound
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
        message = f"{unknown.name} is not a setting of the manager and is ignored{hint}"
        if unknown.upstream:
            message = f"{unknown.name} (today's upstream Cocos) is ignored: {unknown.upstream}"
        checks.append(Check("unknown-variable", "warn", message))
    return checks


def check_tls(settings: Settings) -> Check:
    """The certificates and keys parse and match, as the daemon checks them at start."""
    return refusal_check(settings, "tls")


def check_tracing(settings: Settings) -> Check:
    url = settings.service.JAEGER_URL
    if tracing_off(url):
        return Check("tracing", "pass", "COCOS_JAEGER_URL=off: no spans are exported")
    where = describe_tracing(url)  # never the URL's credentials
    unreachable = probe_collector(url)
    if unreachable is not None:
        return Check(
            "tracing",
            "warn",
            f"COCOS_JAEGER_URL={where}: the collector at {unreachable}: spans will be dropped "
            "(logged once per outage); start the collector, or set COCOS_JAEGER_URL=off",
        )
    return Check("tracing", "pass", f"spans go to {where} (COCOS_JAEGER_URL; off turns it off)")


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
    from cocos_manager.confidential import uses_bios

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


def _existing(path: str) -> Path:
    """The directory, or the nearest existing parent it would be made in."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value, unit = size / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


def check_tmp_room(settings: Settings, writable: Check) -> Check:
    """Room for a VM's files in TMP_FILE_LOC: what one needs against what is free there."""
    q = settings.qemu
    if writable.status == "fail":
        return writable
    directory = _existing(q.TMP_FILE_LOC)
    try:
        room = room_per_vm(q, directory)
        stats = os.statvfs(directory)
    except OSError as error:
        return Check("tmp-file-loc", "fail", f"MANAGER_QEMU_TMP_FILE_LOC: {error.strerror}")
    free = stats.f_bavail * stats.f_frsize
    vms = free // room.needed
    says = (
        f"MANAGER_QEMU_TMP_FILE_LOC={q.TMP_FILE_LOC}: {_human(free)} free, a VM needs "
        f"{_human(room.needed)} ({'; '.join(room.parts)})"
    )
    if vms == 0:
        return Check(
            "tmp-file-loc", "fail", f"{says}: no room for one VM; free space there or move it"
        )
    limit = settings.service.MAX_VMS
    if limit and vms < limit:
        return Check("tmp-file-loc", "warn", f"{says}: room for {vms} of MANAGER_MAX_VMS={limit}")
    return Check("tmp-file-loc", "pass", f"{says}: room for {vms}")


def check_directories(settings: Settings) -> list[Check]:
    tmp = _writable_dir("tmp-file-loc", "MANAGER_QEMU_TMP_FILE_LOC", settings.qemu.TMP_FILE_LOC)
    state = _writable_dir("state-dir", "MANAGER_STATE_DIR", settings.service.STATE_DIR)
    if state.status != "fail" and os.path.exists(settings.service.STATE_DIR):
        state = refusal_check(settings, "state-dir")
    return [check_tmp_room(settings, tmp), state]


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


def startup_checks(
    settings: Settings, host: Host | None = None, *, bind: bool = False
) -> list[Check]:
    """What the daemon checks at start: cheap (no QEMU run), no file written; `bind` (for
    `check`) binds the gRPC listener too."""
    host = host or Host()
    checks = [check_kvm(settings, host), check_agent_channel(settings, host)]
    checks += check_sev(settings, host)
    checks.append(check_listen(settings, bind))
    checks += check_unknown_variables(host.env())
    return checks


def run_checks(
    settings: Settings, host: Host | None = None, run: Runner = run_probe
) -> list[Check]:
    """Every probe, for `cocos-manager check`."""
    host = host or Host()
    checks = startup_checks(settings, host, bind=True)
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
    checks.append(refusal_check(settings, "dial-out"))
    checks.append(refusal_check(settings, "metrics-listen"))
    checks.append(check_tracing(settings))
    checks.append(check_sched_weight(settings))
    return checks


def check_sched_weight(settings: Settings) -> Check:
    """MANAGER_AUTOGROUP_NICE as the daemon would apply it (host/sched_weight.py)."""
    from cocos_manager.host import weight_check

    status, detail = weight_check(settings.service.AUTOGROUP_NICE)
    return Check("scheduling-weight", cast(Status, status), detail)


def log_startup_warnings(settings: Settings, log: Any, host: Host | None = None) -> None:
    """Each start-up finding that is a warn or a fail, once, as a JSON log line (an info is
    about a feature the settings do not ask for: no warning)."""
    for check in startup_checks(settings, host):
        if check.status in ("warn", "fail"):
            log.warning(check.detail, check=check.name, status=check.status)
