"""The collector is held off while the daemon starts (the start-up's objects live as long as
the process) and runs again, with them frozen out of its passes, once the daemon is built:
never left off while it serves (docs/decisions.md, "Start-up and the bench's targets")."""

from __future__ import annotations

from pathlib import Path

from tests.support.serving_probe import at_serving


def test_the_collector_runs_while_the_daemon_serves_and_skips_what_start_up_made(
    tmp_path: Path,
) -> None:
    found = at_serving(tmp_path)
    assert found["gc_enabled"] is True
    # The modules, classes and schemas of start-up: tens of thousands of objects.
    assert found["frozen"] > 10_000
