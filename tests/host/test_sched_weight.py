"""The daemon's session outweighs each of its guests' in the scheduler (host/sched_weight.py), and
only where the session is its own: never a shell's, never its VMs'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocos_manager.proto import manager_pb2 as pb
from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.processes import autogroup_nice

PROBE = """
import json, os, pathlib, sys
from cocos_manager.host.sched_weight import raise_session_weight, session_nice
if len(sys.argv) > 2:  # drop root, as a daemon run by an unprivileged user
    os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))
# As in the root cpu cgroup, wherever this host runs the test (the cgroup tests are below).
outcome = raise_session_weight(int(sys.argv[1]), cgroup=pathlib.Path(os.devnull))
print(json.dumps([outcome.applied, outcome.detail, outcome.operator_action, session_nice()]))
"""


def python_json(code: str, *args: str, **popen: object) -> list[object]:
    """Runs `code` in a Python of its own (its session, cgroup or user changed by the test) and
    returns what it printed as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        **popen,  # type: ignore[arg-type]
    )
    return list(json.loads(done.stdout))


def probe(nice: int, *user: str, **popen: object) -> list[object]:
    return python_json(PROBE, str(nice), *user, **popen)


@pytest.fixture
async def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    env = base_env(tmp_path)
    d = Daemon(env=env, log=tmp_path / "daemon.log")
    yield d
    if d.process is not None and d.process.poll() is None:
        await d.terminate()


async def test_the_daemon_session_outweighs_its_vms_and_the_vms_keep_the_default(
    daemon: Daemon, tmp_path: Path
) -> None:
    from cocos_manager.host.sched_weight import cpu_cgroup

    await daemon.start()
    assert os.getsid(daemon.pid) == daemon.pid  # as systemd starts a service
    # The daemon is in this test's cgroup: where that has the cpu controller, autogroups do
    # not apply and the daemon must say so rather than set a nice that changes nothing.
    weighed = cpu_cgroup() is None
    assert autogroup_nice(daemon.pid) == (-10 if weighed else 0)
    await daemon.stub.Run(run_request("weighed"))
    [qemu] = [child.pid for child in daemon.vm_children()]  # the VM's (stand-in) QEMU
    assert os.getsid(qemu) == qemu  # a session of its own...
    assert autogroup_nice(qemu) == 0  # ...at the default weight
    await daemon.stub.Stop(pb.StopRequest(computation_id="weighed"))
    said = "session autogroup nice -10" if weighed else "autogroups do not apply in cpu cgroup"
    assert "scheduling weight: " + said in daemon.log.read_text()


async def test_zero_leaves_the_session_at_the_default(daemon: Daemon) -> None:
    daemon.env["MANAGER_AUTOGROUP_NICE"] = "0"
    await daemon.start()
    assert autogroup_nice(daemon.pid) == 0


def test_a_session_that_is_not_ours_is_left_alone() -> None:
    """Started from a shell, the daemon shares the shell's session: its weight is not changed."""
    before = autogroup_nice(os.getpid())
    applied, detail, action, after = probe(-5)
    assert not applied and "not a session leader" in str(detail) and not action
    assert after == before  # None for both where the runner left the tests in the root group


def test_in_a_session_of_its_own_the_nice_is_set() -> None:
    applied, detail, _, after = probe(-3, start_new_session=True)
    assert applied, detail
    assert after == -3


def test_without_cap_sys_nice_the_operator_is_told_what_to_grant() -> None:
    assert os.geteuid() == 0, "CI runs as root: this test drops to nobody"
    applied, detail, action, after = probe(-5, "65534", start_new_session=True)
    assert not applied and action
    assert "CAP_SYS_NICE" in str(detail) and "MANAGER_AUTOGROUP_NICE=-5" in str(detail)
    assert after == 0


def test_the_kernels_root_autogroup_reads_as_none_and_is_left_alone(tmp_path: Path) -> None:
    """The kernel prints nothing for its root autogroup (a CI runner's tests can sit there) and
    refuses to reweigh it: a session leader there (defensive: setsid makes a new autogroup) is
    left alone, and the daemon says why."""
    from cocos_manager.host.sched_weight import session_nice

    root_group = tmp_path / "autogroup"
    root_group.write_text("")
    assert session_nice(root_group) is None
    own = tmp_path / "own-autogroup"
    own.write_text("/autogroup-77 nice -4\n")
    assert session_nice(own) == -4
    leader = f"""
import json, os, pathlib
from cocos_manager.host.sched_weight import raise_session_weight
outcome = raise_session_weight(-5, autogroup=pathlib.Path({str(root_group)!r}),
                               cgroup=pathlib.Path(os.devnull))
print(json.dumps([outcome.applied, outcome.detail]))
"""
    applied, detail = python_json(leader, start_new_session=True)
    assert not applied and "root autogroup" in str(detail)
    assert root_group.read_text() == ""  # not written


def test_out_of_range_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from cocos_manager.config.settings import SettingsError, load_settings

    monkeypatch.setenv("MANAGER_AUTOGROUP_NICE", "-21")
    with pytest.raises(SettingsError, match="MANAGER_AUTOGROUP_NICE"):
        load_settings()


# -- where autogroups do not apply: a cpu cgroup other than the root ---------------------------

IN_CGROUP = """
import json, os, sys
with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
from cocos_manager.host.sched_weight import raise_session_weight
outcome = raise_session_weight(int(sys.argv[1]))
print(json.dumps([outcome.applied, outcome.detail]))
"""


def cpu_hierarchy() -> Path:
    """Where this host's cpu cgroups are made: the v1 cpu hierarchy, or the v2 root where the
    cpu controller is enabled for its children (systemd does that on most v2 hosts)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    subtree = (v2 / "cgroup.subtree_control").read_text().split()
    assert "cpu" in subtree, (
        "no cpu cgroup to be made here: no v1 cpu hierarchy, and cgroup v2 without the cpu controller at its root"
    )
    return v2


def test_in_a_cpu_cgroup_of_its_own_the_nice_is_not_claimed(tmp_path: Path) -> None:
    """As a systemd service is wherever the cpu controller is on: the kernel takes the
    autogroup nice and ignores it (only the root cpu cgroup is weighed by autogroup), so the
    daemon must not log it as applied."""
    assert os.geteuid() == 0, "CI runs as root: this test makes a cgroup"
    group = cpu_hierarchy() / f"cocos-sched-weight-{os.getpid()}"
    group.mkdir()
    try:
        applied, detail = python_json(IN_CGROUP, "-4", str(group), start_new_session=True)
        assert not applied, detail
        assert f"cpu cgroup /{group.name}" in str(detail)
    finally:
        group.rmdir()


@pytest.mark.parametrize(
    ("cgroup", "weights", "expected"),
    [
        ("1:cpu:/\n0::/\n", [], None),  # v1 root: autogroups apply
        (
            "4:cpu,cpuacct:/system.slice/m.service\n0::/system.slice/m.service\n",
            [],
            ("/system.slice/m.service"),
        ),
        ("0::/system.slice/m.service\n", [], None),  # v2, cpu controller nowhere
        ("0::/system.slice/m.service\n", ["system.slice"], "/system.slice/m.service"),
        ("0::/system.slice/m.service\n", ["system.slice/m.service"], "/system.slice/m.service"),
        ("0::/\n", [""], "/"),  # a container's namespaced root with the cpu controller
    ],
    ids=["v1-root", "v1-unit", "v2-no-cpu", "v2-parent-has-cpu", "v2-unit-has-cpu", "v2-cgroupns"],
)
def test_the_cpu_cgroup_that_weighs_the_daemon(
    tmp_path: Path, cgroup: str, weights: list[str], expected: str | None
) -> None:
    from cocos_manager.host.sched_weight import cpu_cgroup

    proc = tmp_path / "cgroup"
    proc.write_text(cgroup)
    mount = tmp_path / "sys-fs-cgroup"
    for path in weights:
        (mount / path).mkdir(parents=True, exist_ok=True)
        (mount / path / "cpu.weight").write_text("100\n")
    assert cpu_cgroup(proc, mount) == expected
