"""Probes of the QEMU binary the settings name: its version, and whether it knows the objects,
devices, machine and CPU a Run asks for; and whether sudo may run it.

Each probe runs a QEMU process, so they run in `cocos-manager check` only, never at the
daemon's start-up.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable

from cocos_manager.config import AgentChannel, Settings
from cocos_manager.host import Check
from cocos_manager.qemu.failures import classify_sudo_refusal, daemon_user, sudoers_lines

QEMU_PROBE_TIMEOUT = 10.0
# CPU models that TCG (no KVM) runs without missing features; EPYC asks for ones it lacks.
TCG_CPU_MODELS = ("max", "qemu64", "qemu32", "kvm64", "base")
Runner = Callable[[list[str]], str]


def run_probe(argv: list[str]) -> str:
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


def check_qemu(settings: Settings, run: Runner = run_probe) -> list[Check]:
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
    from cocos_manager.confidential import LaunchMode, launch_mode

    mode = launch_mode(q)
    # Upstream SEV-SNP and TDX are checked with the confidential probes (their own objects);
    # only the seed's spelling needs the fork's memory-backend-memfd-private.
    if mode is LaunchMode.SNP_SEED:
        needed += [
            ("memory-backend-memfd-private", "object", objects, "MANAGER_QEMU_ENABLE_SEV_SNP"),
            ("sev-snp-guest", "object", objects, "MANAGER_QEMU_ENABLE_SEV_SNP"),
        ]
    elif mode in (LaunchMode.SEV, LaunchMode.SEV_UPSTREAM):
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
            "MANAGER_QEMU_ENABLE_SEV_SNP": "MANAGER_QEMU_SEV_SNP_SYNTAX=seed writes AMD's SNP "
            "fork's objects, which this QEMU lacks: use AMD's fork, or "
            "MANAGER_QEMU_SEV_SNP_SYNTAX=upstream with QEMU 9.1 or later, or set "
            "MANAGER_QEMU_ENABLE_SEV_SNP=false (no confidential VM)",
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


def check_sudo(settings: Settings, run: Runner = run_probe) -> Check | None:
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
    # Run for real, harmlessly (`kill -l 9` lists a name, signals nothing): `sudo -n -l kill`
    # lists a kill rule that wants a password as well, and Stop's `sudo -n kill` fails on it.
    try:
        listed = run(["sudo", "-n", kill, "-l", "9"])
    except (OSError, subprocess.SubprocessError):
        listed = ""
    if "KILL" not in listed.split() or classify_sudo_refusal(listed.splitlines()) is not None:
        return Check(
            "sudo",
            "warn",
            f"sudo runs {qemu} without a password, keeping its QMP socket; `sudo -n {kill}` is not "
            "allowed without a password, so a Stop cannot kill a QEMU that ignores QMP quit (root's QEMU "
            f"cannot be signalled otherwise): add {kill} to the rule, {rule}",
        )
    return Check("sudo", "pass", f"sudo runs {qemu} without a password (-C allowed) and kill")
