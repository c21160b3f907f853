"""The collector is held off while the daemon starts (the start-up's objects live as long as
the process) and runs again, with them frozen out of its passes, once the daemon is built:
never left off while it serves (docs/decisions.md, "Start-up and the bench's targets")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.daemon_process import Daemon
from tests.support.harness import base_env, run_request
from tests.support.logged_daemon import daemon_env
from tests.support.processes import kill_and_reap, processes_mentioning
from tests.support.serving_probe import at_serving, run_probe


def test_the_collector_runs_while_the_daemon_serves_and_skips_what_start_up_made(
    tmp_path: Path,
) -> None:
    found = at_serving(tmp_path)
    assert found["gc_enabled"] is True
    # The modules, classes and schemas of start-up: tens of thousands of objects.
    assert found["frozen"] > 10_000


# The daemon's entry point in a fresh interpreter, after an earlier daemon left one VM running:
# at READY (the VM adopted), a thread stops it through the service and collects until every
# Machine made at start is freed, or gives up after a while and says how many are left.
_ADOPTED_PROBE = """
import asyncio, gc, json, os, sys, threading, time, weakref
import cocos_manager.telemetry.sdnotify as sdnotify

def notify(state):
    if state == sdnotify.READY:
        threading.Thread(target=check).start()
    return True

sdnotify.notify = notify  # before the daemon's modules take it
from cocos_manager import daemon
from cocos_manager.vm.machine import Machine

made, runners = [], []
real_init, real_setup = Machine.__init__, daemon.DaemonRunner.setup

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    made.append(weakref.ref(self))

async def setup(self):
    runners.append((self, asyncio.get_running_loop()))
    await real_setup(self)

def check():
    runner, loop = runners[0]
    ids = list(runner.service.computations())
    for computation_id in ids:
        asyncio.run_coroutine_threadsafe(runner.service.stop(computation_id), loop).result(60)
    for _ in range(150):
        gc.collect()
        if all(ref() is None for ref in made):
            break
        time.sleep(0.2)
    print(json.dumps({"adopted": ids, "alive": sum(ref() is not None for ref in made)}), flush=True)
    os._exit(0)

Machine.__init__, daemon.DaemonRunner.setup = init, setup
from cocos_manager.main import main
sys.argv = ["cocos-manager"]
sys.exit(main())
"""


async def test_a_vm_adopted_at_start_is_freed_once_it_ended(tmp_path: Path) -> None:
    """gc.freeze() once ran after recovery: the adopted VMs' objects, in reference cycles, were
    frozen with the start-up's and never collected once those VMs ended (each one kept for the
    daemon's life)."""
    env = base_env(tmp_path) | {"MANAGER_SHUTDOWN_STOPS_VMS": "false"}
    first = Daemon(dict(env), tmp_path / "first.log")
    try:
        await first.start()
        await first.stub.Run(run_request("adopted"))
        assert await first.terminate() == 0
        found = await asyncio.to_thread(
            run_probe, _ADOPTED_PROBE, daemon_env(env), tmp_path, '{"adopted"'
        )
        assert found == {"adopted": ["adopted"], "alive": 0}
    finally:
        if first.process is not None and first.process.poll() is None:
            await first.kill()
        kill_and_reap(processes_mentioning(str(tmp_path)))
