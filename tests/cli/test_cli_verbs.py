"""`cocos-manager-cli` for the operator verbs (stop --force, pause, resume, show, a Run's
size) as an operator runs it, against a real server with the stand-in QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cocos_manager.vm.lifecycle import VmState
from tests.cli.test_cli import cli
from tests.support.harness import running_manager


async def test_stop_says_how_long_it_waits_for_the_guest_and_force_does_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-powerdown")
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_POWERDOWN_GRACE="2s") as m:
        algorithm = tmp_path / "algo"
        algorithm.write_bytes(b"x")
        for name in ("polite", "forced"):
            assert (await cli(m, "run", "--id", name, "--algorithm", str(algorithm)))[0] == 0
        code, out, err = await cli(m, "stop", "polite")
        assert code == 0 and "computation polite stopped" in out
        assert "waiting up to 2s for the guest of polite to power off" in err
        assert "stop --force" in err
        code, out, err = await cli(m, "stop", "forced", "--force")
        assert code == 0 and "computation forced stopped" in out
        assert "waiting" not in err
        assert m.service.computations() == {}


async def test_pause_resume_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_manager(tmp_path, monkeypatch, MANAGER_QEMU_MAX_SMP="2") as m:
        algorithm = tmp_path / "algo"
        algorithm.write_bytes(b"x")
        code, _, err = await cli(
            m, "run", "--id", "c1", "--algorithm", str(algorithm), "--vcpus", "2",
            "--memory", "1G", "--ttl", "90s",
        )  # fmt: skip
        assert code == 0, err
        code, out, _ = await cli(m, "pause", "c1")
        assert code == 0 and "computation c1 paused" in out
        assert m.service.computations()["c1"].state is VmState.PAUSED
        code, out, _ = await cli(m, "show", "c1")
        assert code == 0
        lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        assert lines["state"].strip() == "paused (operator)"
        assert lines["vcpus"].strip() == "2" and lines["memory"].strip() == "1024 MiB"
        assert lines["ttl"].strip() == "1m30s"
        assert lines["confidential"].strip() == "none"
        assert lines["guest cid"].strip() == "- (fw_cfg: no vsock device)"  # the harness's channel
        assert "-smp 2,maxcpus=64" in lines["qemu"]
        code, out, _ = await cli(m, "show", "c1", "--json")
        doc = json.loads(out)
        assert doc["computation"]["computation_id"] == "c1" and doc["paused_by"] == "operator"
        code, out, _ = await cli(m, "show", "c1", "-v")
        assert "  MANAGER_QEMU_SMP_COUNT=2" in out.splitlines()
        assert "  -smp" in out.splitlines()
        code, out, _ = await cli(m, "resume", "c1")
        assert code == 0 and "computation c1 resumed" in out
        assert m.service.computations()["c1"].state is VmState.RUNNING
        assert (await cli(m, "stop", "c1"))[0] == 0
        code, out, _ = await cli(m, "show", "c1")
        assert "state:" in out and "ended" in out and "reason:" in out
        code, _, err = await cli(m, "pause", "c1")
        assert code == 1 and "NOT_FOUND" in err


async def test_size_options_are_checked_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_manager(tmp_path, monkeypatch) as m:
        algorithm = tmp_path / "algo"
        algorithm.write_bytes(b"x")
        code, _, err = await cli(m, "run", "--id", "x", "--algorithm", str(algorithm),
                                 "--memory", "lots")  # fmt: skip
        assert code == 2 and "--memory" in err and "is not a size" in err
        code, _, err = await cli(m, "run", "--id", "x", "--algorithm", str(algorithm),
                                 "--vcpus", "9")  # fmt: skip
        assert code == 1 and "INVALID_ARGUMENT" in err and "MANAGER_QEMU_MAX_SMP" in err
        assert m.service.computations() == {}


async def test_every_json_answer_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cvm-info --json` printed upstream's indented JSON over several lines, unlike every
    other --json; the unary verbs now share one shape (cli/calls.py, `unary`)."""
    async with running_manager(tmp_path, monkeypatch) as m:
        algorithm = tmp_path / "algo"
        algorithm.write_bytes(b"x")
        code, out, err = await cli(m, "run", "--id", "c1", "--algorithm", str(algorithm), "--json")
        assert code == 0, err
        assert len(out.splitlines()) == 1 and json.loads(out)["computation_id"] == "c1"
        for verb in (["cvm-info", "c1"], ["show", "c1"], ["list"]):
            code, out, err = await cli(m, *verb, "--json")
            assert code == 0, err
            assert len(out.splitlines()) == 1, (verb, out)
            json.loads(out)
        code, out, _ = await cli(m, "cvm-info", "c1", "--json")
        assert json.loads(out)["id"] == "c1" and json.loads(out)["cpu_num"] >= 1
        code, out, _ = await cli(m, "cvm-info", "c1")  # upstream's look without --json
        assert out.startswith("{\n  ") and json.loads(out)["id"] == "c1"
        for verb in ("pause", "resume"):  # no fields in the answer: nothing, as stop --json
            code, out, err = await cli(m, verb, "c1", "--json")
            assert (code, out) == (0, ""), err
        code, out, _ = await cli(m, "pause", "c1")
        assert out == "computation c1 paused\n"
        code, out, err = await cli(m, "remove-vm", "c1")
        assert (code, out) == (0, "virtual machine c1 removed\n"), err
