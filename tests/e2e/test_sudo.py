"""MANAGER_QEMU_USE_SUDO=true end to end: a non-root daemon, Debian's real sudo, real QEMU (TCG).

The test creates a system user, writes a sudoers rule for it (checked by `visudo -cf`,
removed at the end), and starts the real daemon as that user. QEMU then runs as root, a child
of sudo: the daemon may signal sudo (sudo keeps the caller's real uid) but not QEMU (EPERM).

The daemon runs with one capability, CAP_DAC_READ_SEARCH, and nothing else: this machine's
Python lives under /root (mode 0700), which a plain system user could not even execute. That
capability lets it read files; it does not let it signal another user's process (CAP_KILL),
which is what this test is about; the test checks that it has no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cocos_manager.proto import manager_pb2 as pb
from cocos_manager.proto import manager_pb2_grpc as pb_grpc
from tests.e2e.test_real_vm import (
    BOOT_TIMEOUT,
    EventWatch,
    booted,
    daemon_env,
    guest_images,
    manager_event,
)
from tests.support.daemon_process import clean_environ
from tests.support.harness import FAKE_QEMU, run_request
from tests.support.processes import console_keepers, gone_within, processes_mentioning
from tests.support.waiting import subscribed, unavailable, wait_for

pytestmark = pytest.mark.timeout(600)

# A user per test worker (make test runs tests in parallel): one worker's NOPASSWD rule must
# not answer for another's test of a rule without it.
USER = "cocos-test-sudo" + os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
EXE = str(Path(sys.executable).with_name("cocos-manager"))
CAP_DAC_READ_SEARCH = 1 << 2
START_GUARD = 120.0


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    qemu: str
    kill: str


@pytest.fixture(scope="module")
def account() -> Account:
    if os.geteuid() != 0:
        unavailable("needs root: it creates a system user and writes a sudoers rule")
    for tool in ("sudo", "visudo", "useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: scripts/setup.sh installs it", pytrace=False)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )
    entry = pwd.getpwnam(USER)
    qemu = shutil.which("qemu-system-x86_64")
    kill = shutil.which("kill")
    assert qemu is not None and kill is not None
    return Account(USER, entry.pw_uid, entry.pw_gid, qemu, kill)


@contextlib.contextmanager
def sudoers(text: str) -> Iterator[Path]:
    """A rule file in /etc/sudoers.d, validated before it is installed, removed afterwards."""
    path = Path(f"/etc/sudoers.d/cocos-test-sudo-{os.getpid()}")
    draft = Path(tempfile.mkstemp(prefix="cocos-sudoers-")[1])
    try:
        draft.write_text(text)
        subprocess.run(["visudo", "-cqf", str(draft)], check=True)
        draft.chmod(0o440)
        shutil.move(draft, path)
        yield path
    finally:
        draft.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def nopasswd_rule(a: Account, kill: bool = True) -> str:
    commands = f"{a.qemu}, {a.kill}" if kill else a.qemu
    return f"{a.name} ALL=(root) NOPASSWD: {commands}\nDefaults!{a.qemu} closefrom_override\n"


@pytest.fixture
def workdir(account: Account) -> Iterator[Path]:
    """Owned by the user (pytest's tmp_path is under root's 0700 directory); the guest copied
    in, as the user may not read build/guest in general."""
    root = Path(tempfile.mkdtemp(prefix="cocos-sudo-"))
    for flavour in ("", "9p"):  # 9p: the guest of CreateVm'd VMs
        kernel, rootfs = guest_images(flavour)
        (root / "guest" / flavour).mkdir(parents=True, exist_ok=True)
        shutil.copy(kernel, root / "guest" / flavour / "bzImage")
        shutil.copy(rootfs, root / "guest" / flavour / "rootfs.cpio.gz")
    for path in [root, *root.rglob("*")]:
        os.chown(path, account.uid, account.gid)
    try:
        yield root
    finally:
        left = processes_mentioning(str(root))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):  # for a failure's post-mortem
            shutil.copy(root / "daemon.log", Path(tempfile.gettempdir()) / "cocos-sudo-last.log")
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"


@dataclass
class UserDaemon:
    """The real daemon, run as the unprivileged user."""

    account: Account
    root: Path
    port: int = 0  # the daemon picks it (MANAGER_GRPC_PORT=0) and says which at each start
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.aio.Channel | None = None
    starts: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    def vm_files(self) -> list[str]:
        """What VM files are left; none when no Run got as far as making the directory (a
        Run cancelled within milliseconds, on a loaded host, ends before its files)."""
        try:
            return os.listdir(self.vms)
        except FileNotFoundError:
            return []

    @property
    def stub(self) -> pb_grpc.ManagerServiceStub:
        assert self.channel is not None
        return pb_grpc.ManagerServiceStub(self.channel)

    def env(self) -> dict[str, str]:
        env = clean_environ() | daemon_env(
            self.root,
            {
                "MANAGER_GRPC_HOST": "127.0.0.1",
                # Its own pick: a port chosen here and let go was sometimes taken by another
                # test's VM (host ports are the kernel's picks too) before the daemon bound it,
                # and the daemon refused to start ("daemon exited at start").
                "MANAGER_GRPC_PORT": "0",
                "MANAGER_QEMU_USE_SUDO": "true",
                "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(self.root / "guest" / "bzImage"),
                "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(self.root / "guest" / "rootfs.cpio.gz"),
                "MANAGER_QEMU_STOP_TIMEOUT": "1s",
                "COCOS_JAEGER_URL": "off",
            },
        )
        env["HOME"] = str(self.root)
        return env | self.extra_env

    def as_user(self, *argv: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.account.uid}",
            f"--regid={self.account.gid}",
            "--init-groups",
            "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
            *argv,
        ]

    def check_sudo_line(self) -> str:
        """`cocos-manager check`'s sudo line, run as the daemon's user."""
        done = subprocess.run(
            self.as_user(EXE, "check"),
            env=self.env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.split()[1:2] == ["sudo"]]
        assert len(lines) == 1, done.stdout + done.stderr
        return lines[0]

    async def start(self) -> None:
        self.starts += 1
        log = self.root / "daemon.log"
        with open(log, "ab") as out:
            earlier = out.tell()  # a restart's log follows the earlier runs' lines
            self.process = subprocess.Popen(  # noqa: ASYNC220
                self.as_user(EXE),
                env=self.env(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # A hang guard only: a daemon importing its modules as another user on a host loaded
        # by parallel tests (and their VMs) took over 30 s to say its first line.
        deadline = time.monotonic() + START_GUARD
        self.port = await self.listening_port(earlier, deadline)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(self.channel)
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited at start:\n{self.log_tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            assert time.monotonic() < deadline, f"not SERVING\n{self.log_tail()}"
            await asyncio.sleep(0.05)
        fields = proc_status(self.process.pid)
        assert fields["Uid"].split()[:2] == [str(self.account.uid)] * 2
        assert int(fields["CapEff"], 16) == CAP_DAC_READ_SEARCH  # no CAP_KILL, nothing else

    async def listening_port(self, offset: int, deadline: float) -> int:
        """The port of the daemon's start-up line ("... listening at", its `grpc` field)."""
        assert self.process is not None
        while True:
            with open(self.root / "daemon.log", "rb") as log:
                log.seek(offset)
                for line in log.read().splitlines():
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        if isinstance(entry, dict) and (address := entry.get("grpc")):
                            return int(address.rpartition(":")[2])
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited at start:\n{self.log_tail()}")
            assert time.monotonic() < deadline, f"no start-up line\n{self.log_tail()}"
            await asyncio.sleep(0.05)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "daemon.log").read_text().splitlines()[-30:])
        return ""

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        await self.close_channel()

    async def terminate(self) -> int:
        await self.close_channel()
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 60)

    def vm_processes(self) -> dict[str, list[int]]:
        """sudo and QEMU processes of this daemon's VMs (their command lines name vms/; not
        the console keepers: `keepers()`), each told apart by its own command line. The
        keepers used to be listed first, in a scan of their own: one started between the two
        scans was taken for QEMU, and a test then took sudo for alone while its child had
        not exec'd QEMU yet (two "sudo"), or killed sudo before QEMU ever ran."""
        found: dict[str, list[int]] = {"sudo": [], "qemu": []}
        for pid in processes_mentioning(str(self.vms)):
            with contextlib.suppress(OSError):
                if b"console_keeper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                found["sudo" if name == "sudo" else "qemu"].append(pid)
        return found

    def keepers(self) -> list[int]:
        """The VMs' console keepers (the daemon user's, holding root QEMU's output)."""
        return console_keepers(str(self.vms))

    def left(self) -> str:
        """What a test that expected none of it finds: VM files, processes and the log."""
        return (
            f"files: {self.vm_files()}\nprocesses: {self.vm_processes()}\n"
            f"keepers: {self.keepers()}\nlog:\n{self.log_tail()}"
        )


@contextlib.asynccontextmanager
async def user_daemon(
    account: Account, root: Path, env: dict[str, str] | None = None
) -> AsyncIterator[UserDaemon]:
    daemon = UserDaemon(account, root, extra_env=env or {})
    await daemon.start()
    try:
        yield daemon
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            await daemon.terminate()
        await daemon.close_channel()


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.split(":\t", 1) for line in status.read().splitlines() if ":\t" in line)


def owner(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


async def watch(daemon: UserDaemon, cid: str) -> EventWatch:
    events = EventWatch(daemon.stub, cid)
    await subscribed(events.call)
    return events


async def test_password_required_fails_fast_with_failed_precondition(
    account: Account, workdir: Path
) -> None:
    rule = f"{account.name} ALL=(root) {account.qemu}\nDefaults!{account.qemu} closefrom_override\n"
    with sudoers(rule):
        async with user_daemon(account, workdir) as daemon:
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await daemon.stub.Run(run_request("pw"), timeout=30)
            took = time.monotonic() - began
            assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = failure.value.details() or ""
            assert "sudo wants a password" in details and "NOPASSWD" in details, details
            assert took < 20, took  # not the call's 30 s deadline
            assert daemon.vm_processes() == {"sudo": [], "qemu": []}
            assert daemon.vm_files() == []
            assert [p.name for p in (workdir / "state").glob("*.json")] == []
            listed = await daemon.stub.List(pb.ListRequest())
            assert list(listed.computations) == []
            line = await asyncio.to_thread(daemon.check_sudo_line)
            assert line.startswith("FAIL") and "password is required" in line, line


def never_ready_under_sudo(account: Account, workdir: Path) -> tuple[str, dict[str, str]]:
    """The sudoers rule and the daemon's settings for the stand-in QEMU run through sudo in
    its mode that never answers QMP: a start that is still waiting (the kill rule too). The
    stand-in is copied into the user's folder, as the guest is: the daemon, as the user, must
    find it executable, and a checkout under a 0700 directory (`mktemp -d`) is out of reach."""
    fake = str(workdir / FAKE_QEMU.name)
    shutil.copy(FAKE_QEMU, fake)
    os.chown(fake, account.uid, account.gid)
    rule = (
        f"{account.name} ALL=(root) NOPASSWD: {fake}, {account.kill}\n"
        f"Defaults!{fake} closefrom_override\n"
        f'Defaults!{fake} env_keep += "FAKE_QEMU_MODE"\n'
    )
    env = {
        "MANAGER_QEMU_BIN_PATH": fake,
        "MANAGER_QEMU_PASS_ENV": "FAKE_QEMU_MODE",
        "FAKE_QEMU_MODE": "no-qmp",
        "MANAGER_QEMU_START_TIMEOUT": "60s",
    }
    return rule, env


async def test_a_qemu_that_a_sudo_ended_at_start_left_running_is_ended(
    account: Account, workdir: Path
) -> None:
    """sudo can end and leave the QEMU it started running, root's and init's child, out of
    reach of the daemon's pidfd and signals: a SIGTERM in sudo's first milliseconds (the
    daemon's own, for a Run cancelled or stopped at once) kills sudo and not its command, and
    a SIGKILL never relays. The stand-in QEMU here never answers QMP, so the start is still
    waiting when sudo goes; the Run must fail, and that QEMU must not outlive it."""
    rule, env = never_ready_under_sudo(account, workdir)
    with sudoers(rule):
        async with user_daemon(account, workdir, env) as daemon:
            run = asyncio.ensure_future(daemon.stub.Run(run_request("left"), timeout=90))
            await wait_for(lambda: daemon.vm_processes()["qemu"], "the stand-in QEMU under sudo")
            [sudo] = daemon.vm_processes()["sudo"]
            os.kill(sudo, signal.SIGKILL)  # the test is root
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await run
            # The start's own error (waiting for the output sudo's QEMU held open once made it
            # "stopped while starting", ABORTED).
            assert failure.value.code() == grpc.StatusCode.INTERNAL, failure.value
            assert "killed by signal SIGKILL" in (failure.value.details() or ""), failure.value
            await wait_for(
                lambda: daemon.vm_processes() == {"sudo": [], "qemu": []}, "the QEMU sudo left", 15
            )
            assert "QEMU outlived sudo" in (workdir / "daemon.log").read_text()
            listed = await daemon.stub.List(pb.ListRequest())
            assert list(listed.computations) == []


async def test_a_qemu_spawned_through_sudo_as_the_daemon_died_is_ended_by_the_next_start(
    account: Account, workdir: Path
) -> None:
    """The daemon killed while sudo was starting QEMU: its record names the command line and
    no PID yet (tests/qemu/test_spawn_crash.py). The next start finds sudo and root's QEMU by
    that command line; SIGKILLing both, as it did, killed sudo only (root's QEMU refuses the
    daemon's signals, and a killed sudo relays nothing), and QEMU ran on, untracked. Here
    another daemon shares MANAGER_QEMU_TMP_FILE_LOC, so no sweep of lost records steps in:
    the record's own clean-up must end it, through sudo as a Stop does."""
    rule, env = never_ready_under_sudo(account, workdir)  # still starting when the daemon dies
    with sudoers(rule):
        async with user_daemon(account, workdir, env) as daemon:
            run = asyncio.ensure_future(daemon.stub.Run(run_request("spawning"), timeout=90))
            await wait_for(lambda: daemon.vm_processes()["qemu"], "the stand-in QEMU under sudo")
            [qemu] = daemon.vm_processes()["qemu"]
            await daemon.kill()  # closing its channel ends the call
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                await run
            # The record as it was while sudo was being spawned: the command line, no PID.
            for path in (workdir / "state").glob("vm-*.json"):
                record = json.loads(path.read_text())
                record.update(state="admitted", pid=0, start_time=0, cmdline=[])
                path.write_text(json.dumps(record))
            # Another daemon on the same MANAGER_QEMU_TMP_FILE_LOC (it holds it shared).
            held = os.open(daemon.vms, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(held, fcntl.LOCK_SH)
                await daemon.start()
                tracked = await daemon.stub.List(pb.ListRequest())
                assert list(tracked.computations) == []
                assert gone_within(qemu, 30), f"root's QEMU {qemu} runs on, untracked"
                assert daemon.vm_processes() == {"sudo": [], "qemu": []}
            finally:
                os.close(held)


async def test_run_stop_exit_readopt_shutdown(account: Account, workdir: Path) -> None:
    with sudoers(nopasswd_rule(account)):
        async with user_daemon(account, workdir) as daemon:
            line = await asyncio.to_thread(daemon.check_sudo_line)
            assert line.startswith("PASS"), line

            # A Run cancelled by its client while QEMU starts (root's, unsignallable): nothing
            # is left, whatever step the cancel hit.
            cancelled = 0
            for deadline in (0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.13):
                try:
                    await daemon.stub.Run(run_request("cancelled"), timeout=deadline)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                    cancelled += 1
                    # The service's answer can cross the client's deadline: the VM then runs
                    # though the client saw DEADLINE_EXCEEDED (not sudo's doing: the same race
                    # exists without sudo; reported). Such a VM is stopped as any other.
                    listed = await daemon.stub.List(pb.ListRequest())
                    if any(c.computation_id == "cancelled" for c in listed.computations):
                        with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND: went
                            await daemon.stub.Stop(pb.StopRequest(computation_id="cancelled"))
                else:  # started within the deadline: stopped as any VM
                    await daemon.stub.Stop(pb.StopRequest(computation_id="cancelled"))
                await wait_for(
                    lambda: daemon.vm_processes() == {"sudo": [], "qemu": []},
                    f"no VM left (Run deadline {deadline} s)",
                    15,
                    detail=daemon.left,
                )
                await wait_for(
                    lambda: daemon.vm_files() == [],
                    f"no VM file left (Run deadline {deadline} s)",
                    15,
                    detail=daemon.left,
                )
            assert cancelled > 0

            # Run: the guest boots.
            events = await watch(daemon, "s1")
            reply = await daemon.stub.Run(run_request("s1"), timeout=BOOT_TIMEOUT)
            assert int(reply.agent_port) > 0
            await events.wait_for("BOOTED s1", booted("s1"), BOOT_TIMEOUT)
            procs = daemon.vm_processes()
            assert len(procs["sudo"]) == 1 and len(procs["qemu"]) == 1, procs
            assert owner(procs["qemu"][0]) == 0  # root's: the daemon cannot signal it
            # Stop: neither QEMU nor sudo left.
            await daemon.stub.Stop(pb.StopRequest(computation_id="s1"), timeout=60)
            assert daemon.vm_processes() == {"sudo": [], "qemu": []}
            await events.wait_for("vm-stop complete", manager_event("vm-stop", "complete"), 5)
            await events.close()

            # QEMU killed from outside (as root): noticed by the exit itself (sudo ends with
            # its QEMU), within a bound far below any stop or start timeout. (No tighter
            # figure here: make test runs 4 workers on a noisy host; `make bench` measures it.)
            events = await watch(daemon, "s2")
            await daemon.stub.Run(run_request("s2"), timeout=BOOT_TIMEOUT)
            (qemu,) = daemon.vm_processes()["qemu"]
            os.kill(qemu, signal.SIGKILL)
            await events.wait_for("vm-exit", manager_event("vm-exit"), 5)
            await wait_for(lambda: daemon.vm_processes()["sudo"] == [], "sudo to end", 5)
            await events.close()

            # A frozen QEMU (SIGSTOP, as root): neither the SIGTERM sudo relays nor QMP quit
            # can end it; `sudo -n kill -KILL` does, and sudo goes with it.
            await daemon.stub.Run(run_request("frozen"), timeout=BOOT_TIMEOUT)
            (qemu,) = daemon.vm_processes()["qemu"]
            os.kill(qemu, signal.SIGSTOP)
            await daemon.stub.Stop(pb.StopRequest(computation_id="frozen"), timeout=60)
            assert daemon.vm_processes() == {"sudo": [], "qemu": []}

            # Daemon SIGKILL + restart: re-adopted, then stopped. Root's QEMU wrote its console
            # to the keeper's pipes: Logs after the restart has the boot from before it.
            events = await watch(daemon, "s3")
            await daemon.stub.Run(run_request("s3"), timeout=BOOT_TIMEOUT)
            await events.wait_for("BOOTED s3", booted("s3"), BOOT_TIMEOUT)
            await events.close()
            before = daemon.vm_processes()
            await daemon.kill()
            await daemon.start()
            listed = await daemon.stub.List(pb.ListRequest())
            assert [(c.computation_id, c.adopted) for c in listed.computations] == [("s3", True)]
            assert daemon.vm_processes() == before
            request = pb.LogsRequest(computation_id="s3")
            history = [line.message async for line in daemon.stub.Logs(request, timeout=10)]
            assert any(line.endswith("BOOTED s3") for line in history), history[-5:]
            await daemon.stub.Stop(pb.StopRequest(computation_id="s3"), timeout=60)
            assert daemon.vm_processes() == {"sudo": [], "qemu": []}

            # SIGTERM stops everything.
            await daemon.stub.Run(run_request("s4"), timeout=BOOT_TIMEOUT)
            assert daemon.vm_processes()["qemu"]
            assert await daemon.terminate() == 0
            assert daemon.vm_processes() == {"sudo": [], "qemu": []}
            assert daemon.vm_files() == []
            await wait_for(lambda: daemon.keepers() == [], "the console keepers to end", 5)


def same_file(a: str, b: str) -> bool:
    return os.path.samefile(a, b)


async def test_without_kill_rule_a_frozen_qemu_is_released_and_stop_says_so(
    account: Account, workdir: Path
) -> None:
    with sudoers(nopasswd_rule(account, kill=False)):
        async with user_daemon(account, workdir) as daemon:
            line = await asyncio.to_thread(daemon.check_sudo_line)
            assert line.startswith("WARN") and "kill" in line, line
            await daemon.stub.Run(run_request("frozen"), timeout=BOOT_TIMEOUT)
            (qemu,) = daemon.vm_processes()["qemu"]
            os.kill(qemu, signal.SIGSTOP)
            try:
                began = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await daemon.stub.Stop(pb.StopRequest(computation_id="frozen"), timeout=60)
                assert time.monotonic() - began < 30  # bounded: 5 s + 5 s + 10 s
                assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                details = failure.value.details() or ""
                assert str(qemu) in details, details
                # The daemon's own PATH finds kill (here none is set: /bin/kill, the same file
                # on a merged /usr; sudoers compares files too).
                named = re.findall(r"(/\S+/kill)\b", details)
                assert any(same_file(path, account.kill) for path in named), details
                # Released all the same: nothing STOPPING, the id free, no record or file.
                assert list((await daemon.stub.List(pb.ListRequest())).computations) == []
                assert daemon.vm_files() == []
                assert daemon.vm_processes()["qemu"] == [qemu]  # the PID the error named
            finally:
                # As the operator is told. SIGSTOP stopped sudo too (it follows its command's
                # job control): continued, it reaps QEMU and ends.
                os.kill(qemu, signal.SIGKILL)
                for sudo in daemon.vm_processes()["sudo"]:
                    os.kill(sudo, signal.SIGCONT)
            await wait_for(
                lambda: daemon.vm_processes() == {"sudo": [], "qemu": []}, "QEMU and sudo gone"
            )
            assert await daemon.terminate() == 0


async def test_create_vm_through_sudo_reads_and_removes_its_shares(
    account: Account, workdir: Path
) -> None:
    """A CreateVm'd VM's shares are the daemon user's (0700): QEMU, root's through sudo, reads
    them (the guest serves its environment), and the non-root daemon removes them."""
    from tests.e2e.test_create_vm_real import read_agent_port
    from tests.support.upstream_client import upstream_call
    from tests.test_create_vm import CERT, full_request, sections

    ninep = {
        "MANAGER_QEMU_DISK_IMG_KERNEL_FILE": str(workdir / "guest" / "9p" / "bzImage"),
        "MANAGER_QEMU_DISK_IMG_ROOTFS_FILE": str(workdir / "guest" / "9p" / "rootfs.cpio.gz"),
    }
    with sudoers(nopasswd_rule(account)):
        async with user_daemon(account, workdir, ninep) as daemon:
            address = f"127.0.0.1:{daemon.port}"
            created = (await upstream_call(address, "CreateVm", full_request())).json
            (shares,) = [name for name in daemon.vm_files() if name.startswith("shares-")]
            info = os.stat(os.path.join(daemon.vms, shares))
            assert (info.st_uid, info.st_mode & 0o777) == (account.uid, 0o700)
            procs = daemon.vm_processes()
            assert owner(procs["qemu"][0]) == 0
            deadline = time.monotonic() + BOOT_TIMEOUT
            served = await asyncio.to_thread(
                read_agent_port, int(created["forwardedPort"]), deadline
            )
            handed = sections(served)
            assert f"AGENT_CVM_ID={created['cvmId']}\n" in handed["/etc/cocos/environment"]
            assert handed["/etc/certs/cert.pem"] == CERT.decode()
            removed = await upstream_call(address, "RemoveVm", {"cvm_id": created["cvmId"]})
            assert removed.code == 0, removed.err
            assert daemon.vm_processes() == {"sudo": [], "qemu": []}
            assert daemon.vm_files() == []
