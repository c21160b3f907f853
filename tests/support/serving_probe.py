"""The daemon's own entry point (`cocos_manager.main.main`) run in a fresh interpreter until it
tells systemd READY=1 (it is SERVING then), and what that process holds at that moment: the
modules it loaded and the collector's state. The process then ends without its shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.harness import base_env
from tests.support.logged_daemon import daemon_env

_PROBE = """
import gc, json, os, sys
import cocos_manager.telemetry.sdnotify as sdnotify

def notify(state):
    if state == sdnotify.READY:
        print(json.dumps({
            "modules": sorted(sys.modules),
            "gc_enabled": gc.isenabled(),
            "frozen": gc.get_freeze_count(),
        }), flush=True)
        os._exit(0)
    return True

sdnotify.notify = notify
from cocos_manager.main import main
sys.argv = ["cocos-manager"]
sys.exit(main())
"""


def at_serving(tmp: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`modules` (every name in sys.modules), `gc_enabled`, `frozen` (gc.get_freeze_count())
    of a daemon with the tests' base settings (and `env`) once it serves."""
    return run_probe(_PROBE, daemon_env(base_env(tmp) | (env or {})), tmp, '{"modules"')


def run_probe(script: str, env: dict[str, str], cwd: Path, marker: str) -> dict[str, Any]:
    """`script` run in a fresh interpreter with `env`: the last line of its output starting
    with `marker`, as JSON; the process must have ended with status 0."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-2000:]
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def packages(found: dict[str, Any]) -> set[str]:
    return {name.split(".")[0] for name in found["modules"]}
