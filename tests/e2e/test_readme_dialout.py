"""The README's dial-out example, as written, on a fresh clone: the computations server with
the files the README names (they exist: docs/examples/), started without a terminal, and the
Manager with the README's TCG block plus the example's variables; the server receives run_res
and the agent in the guest serves the manifest with the two files' hashes. Before, the README
named iris.csv and lin_reg.py, which do not exist, and the server printed nothing about it
(and a traceback when its stdin was not a terminal)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.test_readme_tcg import readme_env, start
from tests.e2e.test_real_vm import BOOT_TIMEOUT, kill, read_agent, stop_daemon
from tests.support.readme import README, REPO

pytestmark = pytest.mark.timeout(300)


def dialout_block() -> list[str]:
    text = README.read_text()
    marker = text.index("<!-- readme-dialout")
    fence = text.index("```sh\n", marker) + len("```sh\n")
    return [line for line in text[fence : text.index("```", fence)].splitlines() if line[:1] != "#"]


async def test_the_readme_dialout_example_runs_as_written(tmp_path: Path) -> None:
    server_line, manager_line, ps_line = dialout_block()
    server_argv = shlex.split(server_line)
    assert server_argv[:2] == [".venv/bin/python", "tests/support/computations_server.py"]
    port_at = server_argv.index("--port") + 1
    assert server_argv[port_at] == "7001"
    server_argv[port_at] = "0"  # the kernel's pick, read from the server's first line
    data, algo = server_argv[server_argv.index("--seed-request") + 1 :][:2]
    assert (REPO / data).is_file() and (REPO / algo).is_file()

    *assignments, command = shlex.split(manager_line)
    assert command == ".venv/bin/cocos-manager"
    example = dict(a.split("=", 1) for a in assignments)
    assert example["MANAGER_GRPC_URL"] == "localhost:7001"
    env = readme_env(tmp_path)
    assert "qemu-system-x86_64" in ps_line

    server = await asyncio.create_subprocess_exec(
        sys.executable, *server_argv[1:], cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,  # no terminal: not read, not a traceback
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert server.stdout is not None and server.stderr is not None
    daemon = None
    try:
        first = json.loads(await asyncio.wait_for(server.stdout.readline(), 60))
        assert list(first) == ["listening"] and first["listening"] > 0
        env["MANAGER_GRPC_URL"] = f"localhost:{first['listening']}"  # where the server listens
        daemon = await asyncio.to_thread(start, env, tmp_path)
        run_res = None
        async with asyncio.timeout(BOOT_TIMEOUT):
            while run_res is None:
                line = await server.stdout.readline()
                assert line, "the computations server ended"
                received = json.loads(line).get("received", {})
                run_res = received.get("run_res")
        assert run_res["computation_id"] == "1"
        try:
            served = await read_agent(int(run_res["agent_port"]))
        except AssertionError as error:  # what the guest and the daemon said, for the reader
            consoles = [
                p.read_bytes()[-3000:] for p in sorted((tmp_path / "vms").glob("console-*"))
            ]
            log = (
                (tmp_path / "daemon.log").read_bytes()[-3000:]
                if (tmp_path / "daemon.log").exists()
                else b""
            )
            raise AssertionError(f"{error}\nconsole: {consoles!r}\ndaemon log: {log!r}") from None
        manifest = json.loads(served)
        assert manifest["id"] == "1"
        assert manifest["algorithms"]["hash"] == list(
            hashlib.sha3_256((REPO / algo).read_bytes()).digest()
        )
        assert manifest["datasets"][0]["hash"] == list(
            hashlib.sha3_256((REPO / data).read_bytes()).digest()
        )
    finally:
        if daemon is not None:
            try:
                await asyncio.to_thread(stop_daemon, daemon)
            finally:
                kill(daemon)
        if server.returncode is None:
            server.send_signal(signal.SIGINT)  # Ctrl-C, as the README says
        code = await asyncio.wait_for(server.wait(), 30)
    assert code == 0
    assert (await server.stderr.read()) == b""
