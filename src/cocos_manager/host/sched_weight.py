"""The daemon's weight against its own guests in the CPU scheduler.

With autogroup scheduling (Debian's kernels turn it on; it applies wherever systemd's cpu
controller is not enabled) Linux shares the CPU between sessions first. Every QEMU this daemon
starts is a session of its own (so that a Ctrl-C or the daemon's end does not take the VMs
along), so while N guests keep the CPUs busy the daemon's session got 1/(N+1) of them, and each
of its wake-ups (a gRPC call accepted, a QMP answer read, a spawn finished) waited for a
scheduler slice: 32 concurrent Runs took twice and more the time of the same 32 QEMUs started
at once by a client (make bench), with the admissions alone spread over two seconds.

libvirt weighs VMs apart from its daemon (machine.slice); here the daemon's own session gets a
lower autogroup nice (MANAGER_AUTOGROUP_NICE). The guests keep their weight against everything
else on the host, and an idle daemon takes nothing from them. docs/decisions.md, "Scheduling
weight".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")
AUTOGROUP_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")
CGROUP = Path("/proc/self/cgroup")
CGROUP_MOUNT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class WeightOutcome:
    applied: bool
    detail: str
    operator_action: bool = False  # worth a warning: the operator can fix it


def raise_session_weight(
    nice: int,
    autogroup: Path = AUTOGROUP,
    enabled_flag: Path = AUTOGROUP_ENABLED,
    cgroup: Path = CGROUP,
    cgroup_mount: Path = CGROUP_MOUNT,
) -> WeightOutcome:
    """Sets the autogroup nice of the daemon's session, where that session is the daemon's own
    (a service started by systemd is a session leader; a daemon started from a shell shares the
    shell's session, whose weight is not ours to change)."""
    if nice == 0:
        return WeightOutcome(False, "MANAGER_AUTOGROUP_NICE=0: the session keeps the default")
    if os.getsid(0) != os.getpid():
        return WeightOutcome(
            False,
            "not a session leader (started from a shell or another program, not by systemd): "
            "the session's scheduling weight is shared with its starter and left as it is",
        )
    if not autogroups_enabled(enabled_flag):
        return WeightOutcome(False, "autogroup scheduling is off (kernel.sched_autogroup_enabled)")
    if session_nice(autogroup) is None:
        # Defensive: setsid always makes a new autogroup, so a session leader is in the root
        # one only if the kernel could not allocate it (or it is init). The kernel refuses
        # (EINVAL) to reweigh the root group: say why rather than relay the errno.
        return WeightOutcome(
            False,
            "the session is in the kernel's root autogroup (one begun before autogroups, such "
            "as init's), whose weight is fixed",
        )
    group = cpu_cgroup(cgroup, cgroup_mount)
    if group is not None:
        # The kernel would take the write and change nothing: it says applied, and is not.
        return WeightOutcome(
            False,
            f"autogroups do not apply in cpu cgroup {group} (the cpu controller is on there; "
            "systemd turns it on for every unit once any unit or user session needs it): the "
            "daemon and its QEMUs share that cgroup's CPU thread by thread",
        )
    try:
        _write(autogroup, nice)
    except PermissionError:
        return WeightOutcome(
            False,
            f"MANAGER_AUTOGROUP_NICE={nice} needs CAP_SYS_NICE (root, or "
            "AmbientCapabilities=CAP_SYS_NICE in the unit): guests that keep the CPUs busy "
            "will slow this daemon's answers",
            operator_action=True,
        )
    except OSError as error:
        return WeightOutcome(False, f"cannot write {autogroup}: {error.strerror}")
    return WeightOutcome(True, f"session autogroup nice {nice}")


def session_nice(autogroup: Path = AUTOGROUP) -> int | None:
    """The autogroup nice of a process's session ("/autogroup-1234 nice -10"), or None when the
    process is in the kernel's root autogroup: the kernel prints nothing for that one (a process
    whose session was never begun with setsid since boot, such as init's descendants that kept
    its session). An unreadable file reads as the root group too: nothing to weigh."""
    try:
        words = autogroup.read_text().split()
    except OSError:
        return None
    return int(words[-1]) if words else None


def autogroups_enabled(flag: Path = AUTOGROUP_ENABLED) -> bool:
    """A kernel without autogroup support has no such file: off, as a 0 in it says."""
    try:
        return flag.read_text().strip() == "1"
    except OSError:
        return False


def _write(autogroup: Path, nice: int) -> None:
    """Without CAP_SYS_ADMIN the kernel takes one change per 100 ms host-wide (EAGAIN): two
    daemons started together, say. Twice more, 110 ms apart (three daemons started at once all
    get theirs, measured); this is start-up, before any client is served."""
    for attempt in range(3):
        try:
            with open(autogroup, "w") as handle:
                handle.write(str(nice))
            return
        except BlockingIOError:
            if attempt == 2:
                raise
            time.sleep(0.11)


def cpu_cgroup(cgroup: Path = CGROUP, mount: Path = CGROUP_MOUNT) -> str | None:
    """The cpu cgroup that weighs the daemon, or None for the root one. The kernel weighs a task
    by its autogroup only in the root cpu cgroup (task_wants_autogroup); anywhere else it
    accepts the autogroup nice and ignores it.

    cgroup v1 (or hybrid): the cpu hierarchy's path. cgroup v2: the task is weighed in the
    nearest ancestor that has the cpu controller, which is the one with a cpu.weight file (the
    root has none; a container's namespaced root "/" has one when its cgroup has the
    controller)."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return None
    unified: str | None = None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            unified = path
        elif "cpu" in controllers.split(","):
            return None if path == "/" else path
    if unified is None:
        return None
    here = Path(unified)
    for ancestor in (here, *here.parents):
        if (mount / str(ancestor).lstrip("/") / "cpu.weight").exists():
            return unified
    return None


# -- `cocos-manager check` -------------------------------------------------------------------

CAP_SYS_NICE = 23
PROC_STATUS = Path("/proc/self/status")


def weight_check(
    nice: int, enabled_flag: Path = AUTOGROUP_ENABLED, status: Path = PROC_STATUS
) -> tuple[str, str]:
    """(status, detail) for `cocos-manager check`: what the daemon, run as this user, would
    make of MANAGER_AUTOGROUP_NICE. Only what holds wherever it starts: `check` runs from a
    shell, in another session and cgroup than a service, so those two the daemon's start-up
    line tells."""
    if nice == 0:
        return "pass", "MANAGER_AUTOGROUP_NICE=0: the daemon's session keeps the default weight"
    if not autogroups_enabled(enabled_flag):
        return (
            "warn",
            f"MANAGER_AUTOGROUP_NICE={nice} has no effect: autogroup scheduling is off "
            "(kernel.sched_autogroup_enabled=0, or a kernel without it); busy guests will "
            "slow the daemon's answers",
        )
    if nice < 0 and not _has_cap_sys_nice(status):
        return (
            "warn",
            f"MANAGER_AUTOGROUP_NICE={nice} needs CAP_SYS_NICE, which this user lacks (grant "
            "AmbientCapabilities=CAP_SYS_NICE in the unit): busy guests will slow the "
            "daemon's answers",
        )
    return (
        "pass",
        f"autogroup scheduling on: the daemon sets its session's nice to {nice} at start when "
        "it leads its session (as under systemd) in the root cpu cgroup; its start-up log "
        "line says whether it did",
    )


def _has_cap_sys_nice(status: Path) -> bool:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False
