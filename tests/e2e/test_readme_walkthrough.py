"""The README's walkthrough after the TCG block, run by bash as written: check, the daemon in
the background, `events --since 0`, run, the agent's answer, stop, `kill %1`. Only the agent
port of the example answer (40123) is replaced by the one `run` printed, read in a loop (the
README says "after ~10 s of boot"); the CLI finds this test's daemon through
COCOS_MANAGER_ADDR, so not one command line changes."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from tests.e2e.test_readme_tcg import readme_env
from tests.support.readme import README, REPO

pytestmark = pytest.mark.timeout(300)

READ_AGENT = """port=$(sed -n 's/.*agent port \\([0-9]*\\).*/\\1/p' run.out)
for _ in $(seq 1 240); do
    answer=$(cat < /dev/tcp/127.0.0.1/$port 2>/dev/null || true)
    [ -n "$answer" ] && break
    sleep 0.5
done
printf '%s\\n' "$answer" > agent.json"""


def walkthrough() -> list[str]:
    text = README.read_text()
    marker = text.index("<!-- readme-walkthrough")
    fence = text.index("```sh\n", marker) + len("```sh\n")
    return text[fence : text.index("```", fence)].splitlines()


def script() -> str:
    lines = []
    for line in walkthrough():
        if line.startswith("#"):
            continue
        if "cocos-manager-cli run " in line:
            lines.append(f"{line} | tee run.out")
        elif line.startswith("cat < /dev/tcp/127.0.0.1/40123"):
            lines.append(READ_AGENT)
        else:
            lines.append(line)
    return "\n".join(["set -e", *lines, "wait %1", 'echo "daemon exited $?"'])


async def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    env = readme_env(tmp_path)
    env["COCOS_MANAGER_ADDR"] = f"127.0.0.1:{env['MANAGER_GRPC_PORT']}"
    (tmp_path / ".venv").symlink_to(REPO / ".venv")  # `make install` made .venv
    (tmp_path / "build").mkdir()
    bash = await asyncio.create_subprocess_exec(
        "bash", "-c", script(), cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(bash.communicate(), 280)
    said, complained = out.decode(), err.decode()
    assert bash.returncode == 0, said + complained
    assert "daemon exited 0" in said
    assert re.search(r"(?m)^computation first runs; agent port \d+$", said), said
    manifest = json.loads((tmp_path / "agent.json").read_text())
    assert manifest["id"] == "first"
    # events --since 0: the Run's events from its first, and its end.
    assert "[first] event manager/vm-provision: starting" in said
    assert "[first] event manager/vm-stop: complete" in said
    assert "computation first stopped" in said
    assert "cocos-manager-cli: subscribed to the events of every computation" in complained
    assert not [line for line in said.splitlines() if line.startswith(("WARN", "FAIL"))]
    assert (tmp_path / "build" / "run.log").read_bytes().startswith(b"{")  # JSON log lines
