"""`make bench` keeps working: one quick repetition of scripts/bench/ against the real daemon.

Only the shape of the JSON document is checked: every figure is there with its median, min
and max, its baseline and ratio where it has one, and a target with pass/fail where the issue
sets one. No figure is compared with anything: timings on shared CI machines prove nothing,
and `make bench` is where they are judged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import unavailable

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "build" / "guest"

# figure -> (has a baseline and a ratio, has a target)
FIGURES: dict[str, tuple[bool, bool]] = {
    "run_overhead.p50": (True, True),
    "run_overhead.p95": (True, True),
    "run_overhead.stop": (False, False),
    "image_size": (True, True),
    "crash_detection": (True, True),
    "burst": (True, True),
    "burst.without_weight": (True, True),
    "events.throughput": (True, True),
    "events.p99_latency": (True, True),
    "footprint.startup": (True, True),
    "footprint.startup_cpu": (True, True),
    "footprint.rss_idle": (True, True),
    "footprint.floor.startup": (True, False),
    "footprint.floor.startup_cpu": (True, False),
    "footprint.floor.rss_idle": (True, False),
    "footprint.rss_supervising": (True, False),
    "footprint.cpu_supervising": (False, False),
    "records.durable": (True, False),
    "fleet.rss": (True, False),
    "fleet.cpu_idle": (False, False),
    "fleet.list": (True, False),
    "fleet.run": (True, False),
    "fleet.events_fanout": (True, False),
}


@pytest.fixture(autouse=True)
def _real_qemu_and_guest() -> None:
    """`make test` installs QEMU and builds the guest first: under CI a missing one fails."""
    if (
        shutil.which("qemu-system-x86_64") is None
        or not (GUEST / "bzImage").is_file()
        or not (GUEST / "rootfs.cpio.gz").is_file()
    ):
        unavailable("needs qemu-system-x86_64 and the test guest (make guest)")


def check_stats(where: str, stats: Any) -> None:
    assert isinstance(stats, dict), where
    for key in ("median", "min", "max", "n"):
        assert isinstance(stats.get(key), int | float), f"{where}.{key}"
    assert stats["min"] <= stats["median"] <= stats["max"], where
    assert stats["n"] >= 1, where


@pytest.mark.timeout(300)
def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--quick", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=290,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(output.read_text())
    assert json.loads(result.stdout[result.stdout.index("\n{") :]) == doc  # the printed one
    assert doc["quick"] is True
    assert doc["repetitions"] == 1
    machine = doc["machine"]
    assert machine["nproc"] >= 1 and machine["cpu_model"] and machine["memory_gib"] > 0
    assert set(doc["figures"]) == set(FIGURES)
    for key, (has_baseline, has_target) in FIGURES.items():
        figure = doc["figures"][key]
        assert figure["label"] and figure["unit"], key
        check_stats(f"{key}.value", figure["value"])
        if has_baseline:
            check_stats(f"{key}.baseline", figure["baseline"])
            assert figure["baseline"]["label"], key
            check_stats(f"{key}.ratio", figure["ratio"])
        if has_target:
            target = figure["target"]
            assert target["op"] in ("<=", ">=") and target["on"] in ("ratio", "value"), key
            assert isinstance(target["limit"], int | float), key
            assert isinstance(figure["pass"], bool), key
        assert "pass" in figure, key
    # What the figures rest on is recorded, whatever the timings.
    image = doc["figures"]["image_size"]
    assert image["big_image"]["bytes"] >= 512 * 2**20 and image["big_image"]["sparse"] is False
    assert set(image["per_vm_files"]) == {"kernel", "rootfs", "ovmf"}
    burst = doc["figures"]["burst"]
    for check in burst["checks"]:
        assert check["succeeded"] == burst["vms"]
        assert check["distinct_ports"] == check["distinct_cids"] == burst["vms"]
        assert check["distinct_vnc_displays"] == burst["vms"]
    for key in ("footprint.startup", "footprint.startup_cpu", "footprint.rss_idle"):
        check_stats(f"{key}.over_floor", doc["figures"][key]["over_floor"])
    for delivery in doc["figures"]["events.throughput"]["delivery"]:
        assert delivery["received"] == delivery["sent"]
