#!/usr/bin/env -S python3 -u
"""A stand-in for qemu-system-x86_64 where tests need many VMs or exact failures.

It takes the manager's real command line and does what QEMU does with the parts the manager
relies on: binds the hostfwd port (and serves the fw_cfg manifest there, as the test guest's
agent does, or a CreateVm'd VM's environment file, cert.pem and kernel command line from its
9p shares, as the test guest serves them), binds the VNC port, speaks QMP on the inherited monitor fd as QEMU 7.2 does
(commands refused until `qmp_capabilities`; one monitor client at a time), prints BOOTED to
stdout, exits on SIGTERM. FAKE_QEMU_MODE changes its behaviour:
  fail            print a QEMU-style error on stderr and exit 1 at once
  no-qmp          never answer on the monitor
  qmp-once        answer the first monitor session (the manager's readiness check), then
                  never again: a live QEMU whose monitor is wedged
  ignore-term     ignore SIGTERM (the manager must SIGKILL it)
  exit-after:S:RC exit with status RC after S seconds
  halt-after:S:STATUS  S seconds after the first QMP session negotiated, QEMU stops the guest
                  as KVM's emulation failure or a panic does: a STOP event (and GUEST_PANICKED
                  for STATUS guest-panicked) on that session; query-status says STATUS from
                  then on, and `cont` resumes it (RESUME event). The process stays alive.
                  (In every mode QMP `stop` pauses the guest as QEMU does: STOP event, status
                  "paused"; `cont` resumes it.)
`-version` and `-object help` answer like QEMU 10 (the objects: FAKE_QEMU_OBJECTS, comma
separated, default an upstream QEMU's confidential-computing ones), for the start-up probes.
  halt-on-ready:STATUS  as halt-after, but at once behind the first query-status answer
                  (which still says running): a guest that fails at its first instruction
  ignore-powerdown  ignore QMP system_powerdown (otherwise: "reboot: Power down", exit 0,
                  as a guest that handles the ACPI power button)
  slow-stop:S     answer QMP `stop` only after S seconds (and ignore system_powerdown, as
                  ignore-powerdown): a Pause still in flight when a Stop comes
  ignore-quit     accept QMP quit and go on running (otherwise: exit 0, as QEMU)
  chatty:N:SIZE[:RATE]  a chatty guest: after BOOTED, print N lines of SIZE characters each
                  (numbered, RATE lines a second; no RATE: as fast as the pipe takes them),
                  then CHATTY DONE
  output-helper   start a helper process that inherits QEMU's stdout and stderr and keeps them
                  open for 30 s after QEMU has ended (as a `-netdev tap` ifup script that starts
                  a daemon does); its command line names the marker fake-qemu-output-helper
A chatty guest, for the console's tests:
  FAKE_QEMU_TICK=S              print "tick N" (N = 0, 1, ...) on stdout every S seconds
  FAKE_QEMU_BURST=N             on SIGUSR1, print N lines "burst I" padded to 100 bytes, then
                                "burst done" (a guest flooding its console)
Two more knobs for fault tests:
  FAKE_QEMU_START_LOG=FILE      append one JSON line per start (pid, hostfwd port, VNC display),
                                so a test can tell whether QEMU was started at all, and how often
  FAKE_QEMU_TAKEN_CIDS=3,4      guest CIDs another VMM holds: given `-device vhost-vsock-pci` with
                                one of them, fail as QEMU 7.2's vhost_vsock_device_realize does
                                (error_setg_errno EADDRINUSE) and exit 1
  FAKE_QEMU_SQUAT=WHAT:MARKER   WHAT is hostfwd or vnc. If MARKER does not exist yet, start a
                                separate process that binds that port (its pid goes into MARKER)
                                before this one binds it: the port is taken by another process
                                between the manager's probe and QEMU's bind, and the bind fails
                                for real, with QEMU's message
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TextIO

NAME = "qemu-system-x86_64"


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def say(stream: TextIO, text: str) -> None:
    """As QEMU, which ignores SIGPIPE: output nobody reads any more (the manager died) is
    dropped, and the VM lives on to be re-adopted."""
    with contextlib.suppress(BrokenPipeError):
        stream.write(text)
        stream.flush()


def die(message: str, code: int = 1) -> None:
    say(sys.stderr, f"{NAME}: {message}\n")
    os._exit(code)


def chatter(count: str, size: str, rate: str = "0") -> None:
    """FAKE_QEMU_MODE=chatty: a guest printing many lines on its serial console."""
    pause = 1 / float(rate) if float(rate) else 0.0
    for number in range(int(count)):
        head = f"chatty {number:08d} "
        say(sys.stdout, head + "x" * max(0, int(size) - len(head)) + "\r\n")
        if pause:
            time.sleep(pause)
    say(sys.stdout, "CHATTY DONE\r\n")


def serve_qmp(listener: socket.socket, sessions: int | None) -> None:
    """One monitor client at a time, as QEMU's chardev socket: a second client waits (in the
    listen backlog) until the first one closes. After `sessions` sessions it stops accepting,
    as a QEMU whose main loop is wedged: clients connect, and nobody ever answers."""
    served = 0
    while sessions is None or served < sessions:
        conn, _ = listener.accept()
        with conn:
            qmp_session(conn)
        served += 1
    threading.Event().wait()


RUN_STATE = {"status": "running"}


def event(name: str, data: dict[str, object] | None = None) -> bytes:
    now = time.time()
    stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
    body: dict[str, object] = {"event": name, "timestamp": stamp}
    if data is not None:
        body["data"] = data
    return json.dumps(body).encode() + b"\r\n"


def halt_later(conn: socket.socket, seconds: float, status: str) -> None:
    """FAKE_QEMU_MODE=halt-after:S:STATUS, on the session open at that moment."""

    def halt() -> None:
        RUN_STATE["status"] = status
        with contextlib.suppress(OSError):
            if status == "guest-panicked":
                conn.sendall(event("GUEST_PANICKED", {"action": "pause"}))
            conn.sendall(event("STOP"))

    threading.Timer(seconds, halt).start()


def qmp_error(desc: str) -> dict[str, object]:
    return {"error": {"class": "CommandNotFound", "desc": desc}}


def qmp_session(conn: socket.socket) -> None:
    """QEMU's QMP: a greeting, then only qmp_capabilities until capabilities are negotiated."""
    greeting = {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
            "capabilities": ["oob"],
        }
    }
    negotiated = False
    try:
        conn.sendall(json.dumps(greeting).encode() + b"\r\n")
        for request in json_stream(conn):
            command, ident = request.get("execute"), request.get("id")
            reply: dict[str, object]
            if command == "qmp_capabilities":
                if negotiated:
                    reply = qmp_error(
                        "Capabilities negotiation is already complete, command ignored"
                    )
                else:
                    negotiated, reply = True, {"return": {}}
                    mode = os.environ.get("FAKE_QEMU_MODE", "")
                    if mode.startswith("halt-after:") and not RUN_STATE.get("scheduled"):
                        RUN_STATE["scheduled"] = "yes"
                        _, seconds, status = mode.split(":")
                        halt_later(conn, float(seconds), status)
            elif not negotiated:
                reply = qmp_error("Expecting capabilities negotiation with 'qmp_capabilities'")
            elif command == "query-status":
                status = RUN_STATE["status"]
                reply = {
                    "return": {
                        "status": status,
                        "singlestep": False,
                        "running": status == "running",
                    }
                }
            elif command == "cont":
                RUN_STATE["status"] = "running"
                conn.sendall(event("RESUME"))
                reply = {"return": {}}
            elif command == "stop":  # as QEMU: run state "paused", a STOP event before the return
                slow = os.environ.get("FAKE_QEMU_MODE", "")
                if slow.startswith("slow-stop:"):
                    time.sleep(float(slow.split(":")[1]))
                RUN_STATE["status"] = "paused"
                conn.sendall(event("STOP"))
                reply = {"return": {}}
            elif command == "system_powerdown":
                if not os.environ.get("FAKE_QEMU_MODE", "").startswith(
                    ("ignore-powerdown", "slow-stop:")
                ):
                    conn.sendall(b'{"return": {}}\r\n')
                    say(sys.stdout, "reboot: Power down\r\n")
                    os._exit(0)
                reply = {"return": {}}
            elif command == "quit":
                if os.environ.get("FAKE_QEMU_MODE") != "ignore-quit":
                    conn.sendall(b'{"return": {}}\r\n')
                    os._exit(0)
                reply = {"return": {}}
            else:
                reply = qmp_error(f"The command {command} has not been found")
            if ident is not None:
                reply["id"] = ident
            conn.sendall(json.dumps(reply).encode() + b"\r\n")
            mode = os.environ.get("FAKE_QEMU_MODE", "")
            halting = mode.startswith("halt-on-ready:") and not RUN_STATE.get("halted")
            if command == "query-status" and halting:  # right behind the "running" answer
                RUN_STATE["halted"] = RUN_STATE["status"] = mode.split(":", 1)[1]
                conn.sendall(event("STOP"))
    except OSError:  # the client went away mid-session: the next one may connect
        return


def json_stream(conn: socket.socket):  # type: ignore[no-untyped-def]
    """QMP clients send JSON objects back to back, not necessarily newline-terminated."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := conn.recv(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                obj, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            yield obj


def serve_agent(listener: socket.socket, manifest: bytes) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(manifest)


SQUATTER = """
import os, socket, sys
port, marker = int(sys.argv[1]), sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", port))
sock.listen(16)
with open(marker + ".tmp", "w") as out:
    out.write(str(os.getpid()))
os.rename(marker + ".tmp", marker)
sys.stdout.write("ready\\n")
sys.stdout.close()
while True:
    conn, _ = sock.accept()
    with conn:
        conn.sendall(b"squatter")
"""


def squat_once(what: str, port: int) -> None:
    """FAKE_QEMU_SQUAT: another process takes `port` now, unless it already did once."""
    spec = os.environ.get("FAKE_QEMU_SQUAT", "")
    if not spec.startswith(what + ":"):
        return
    marker = spec.split(":", 1)[1]
    if os.path.exists(marker):
        return
    squatter = subprocess.Popen(
        [sys.executable, "-c", SQUATTER, str(port), marker],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this stand-in; the test kills it by its pid
    )
    assert squatter.stdout is not None
    squatter.stdout.readline()  # bound and listening


def log_start(args: list[str]) -> None:
    path = os.environ.get("FAKE_QEMU_START_LOG")
    if path:
        hostfwd = re.search(r"hostfwd=tcp::(\d+)-", " ".join(option(args, "-netdev")))
        entry = {
            "pid": os.getpid(),
            "hostfwd": int(hostfwd.group(1)) if hostfwd else None,
            "vnc": option(args, "-vnc"),
            "cid": guest_cid(args)[1],
        }
        with open(path, "a") as out:
            out.write(json.dumps(entry) + "\n")


def guest_cid(args: list[str]) -> tuple[str, int | None]:
    """The `-device vhost-vsock-pci,...` option and the guest CID it names."""
    for spec in option(args, "-device"):
        match = re.search(r"guest-cid=(\d+)", spec)
        if spec.startswith("vhost-vsock") and match:
            return spec, int(match.group(1))
    return "", None


def refuse_taken_cid(args: list[str]) -> None:
    """FAKE_QEMU_TAKEN_CIDS: QEMU's own words when another VMM holds the CID."""
    taken = {int(c) for c in os.environ.get("FAKE_QEMU_TAKEN_CIDS", "").split(",") if c}
    spec, cid = guest_cid(args)
    if cid in taken:
        die(f"-device {spec}: vhost-vsock: unable to set guest cid: Address already in use")


HELD: list[int] = []  # descriptors this stand-in keeps open until it ends
OUTPUT_HELPER = """
import os, sys, time
os.read(0, 1)  # EOF once QEMU, the only holder of the pipe's other end, has ended
time.sleep(float(sys.argv[1]))
"""


def start_output_helper(args: list[str]) -> None:
    """FAKE_QEMU_MODE=output-helper: a process of QEMU's own that outlives it with its output."""
    read_end, write_end = os.pipe()  # write_end is not inheritable: QEMU alone holds it
    # The kernel's path names the VM's directory, as QEMU's own command line does.
    helper = [sys.executable, "-c", OUTPUT_HELPER, "30", "fake-qemu-output-helper"]
    subprocess.Popen(
        [*helper, *option(args, "-kernel")],
        stdin=read_end,
        start_new_session=True,
    )
    os.close(read_end)
    HELD.append(write_end)


def tick(seconds: float) -> None:
    count = 0
    while True:
        say(sys.stdout, f"tick {count}\n")
        count += 1
        time.sleep(seconds)


def burst(lines: int) -> None:
    text = "".join(f"burst {i} ".ljust(99, "x") + "\n" for i in range(lines))
    say(sys.stdout, text + "burst done\n")


def bind(port: int, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", port))
    except OSError:
        die(what)
    sock.listen(16)
    return sock


UPSTREAM_OBJECTS = (
    "memory-backend-file,memory-backend-memfd,memory-backend-ram,sev-guest,sev-snp-guest"
)


def answer_probe(args: list[str]) -> bool:
    if args == ["-version"]:
        say(sys.stdout, "QEMU emulator version 10.0.2 (fake)\n")
        return True
    if args == ["-object", "help"]:
        objects = os.environ.get("FAKE_QEMU_OBJECTS", UPSTREAM_OBJECTS)
        say(sys.stdout, "List of user creatable objects:\n")
        for name in filter(None, objects.split(",")):
            say(sys.stdout, f"  {name}\n")
        return True
    return False


def shares(args: list[str]) -> dict[str, str]:
    """The 9p shares of a CreateVm'd VM, as the test guest mounts them: mount tag -> host
    directory (commas in a path are doubled on the command line)."""
    paths = {}
    for spec in option(args, "-fsdev"):
        props = dict(
            part.replace("\0", ",").partition("=")[::2]
            for part in spec.replace(",,", "\0").split(",")[1:]
        )
        paths[props.get("id", "")] = props.get("path", "")
    found = {}
    for spec in option(args, "-device"):
        if spec.startswith("virtio-9p-pci,"):
            props = dict(part.partition("=")[::2] for part in spec.split(",")[1:])
            found[props.get("mount_tag", "")] = paths.get(props.get("fsdev", ""), "")
    return found


def handed(args: list[str], manifest: bytes) -> tuple[bytes, str]:
    """What the test guest serves on its agent port, and the id it prints: the manifest, or
    for a VM with the shares its environment file, cert.pem and kernel command line."""
    mounted = shares(args)
    if "env_share" not in mounted:
        return manifest, json.loads(manifest).get("id", "")
    with open(os.path.join(mounted["env_share"], "environment"), "rb") as file:
        environment = file.read()
    document = b"== /etc/cocos/environment\n" + environment
    cert = os.path.join(mounted.get("certs_share", ""), "cert.pem")
    if os.path.exists(cert):
        with open(cert, "rb") as file:
            document += b"== /etc/certs/cert.pem\n" + file.read()
    document += b"== /proc/cmdline\n" + " ".join(option(args, "-append")).encode() + b"\n"
    ids = re.findall(rb"^AGENT_CVM_ID=(.*)$", environment, re.M)
    return document, ids[0].decode() if ids else ""


def main() -> None:
    args = sys.argv[1:]
    if answer_probe(args):
        return
    mode = os.environ.get("FAKE_QEMU_MODE", "")
    log_start(args)
    if mode == "fail":
        die("-kernel bad: fake failure: could not load kernel")
    refuse_taken_cid(args)
    for kernel in option(args, "-kernel"):
        if not os.path.exists(kernel):
            die(f"could not load kernel '{kernel}': No such file or directory")
        with open(kernel, "rb") as image:
            head = image.read(16)
        if head.startswith(b"NOT A KERNEL"):
            die("linux kernel too old to load a ram disk")
    hostfwd = re.search(r"hostfwd=tcp::(\d+)-:(\d+)", " ".join(option(args, "-netdev")))
    manifest = b"{}"
    for spec in option(args, "-fw_cfg"):
        path = spec.split(",file=", 1)[1].replace(",,", ",")
        with open(path, "rb") as file:
            manifest = file.read()
    agent = None
    if hostfwd:
        port = int(hostfwd.group(1))
        squat_once("hostfwd", port)
        agent = bind(
            port,
            f"-netdev user: Could not set up host forwarding rule 'tcp::{port}-:{hostfwd.group(2)}'",
        )
    displays = []  # held while it runs, as QEMU's VNC server holds its port
    for display in option(args, "-vnc"):
        squat_once("vnc", 5900 + int(display.lstrip(":")))
        displays.append(
            bind(
                5900 + int(display.lstrip(":")),
                "-vnc "
                + display
                + ": Failed to start VNC server: Failed to find an available port: Address already in use",
            )
        )
    qmp = None
    for spec in option(args, "-chardev"):
        match = re.search(r"fd=(\d+)", spec)
        if match:
            qmp = socket.socket(fileno=int(match.group(1)))
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: die("terminating on signal 15", 0))
    if mode == "output-helper":  # before QMP answers: the helper is there once QEMU is ready
        start_output_helper(args)
    if qmp is not None and mode != "no-qmp":
        sessions = 1 if mode == "qmp-once" else None
        threading.Thread(target=serve_qmp, args=(qmp, sessions), daemon=True).start()
    served, identity = handed(args, manifest)
    if agent is not None:
        threading.Thread(target=serve_agent, args=(agent, served), daemon=True).start()
    say(sys.stdout, f"\x1b[2J\x1b[01;01HBOOTED {identity}\r\n")
    if mode.startswith("chatty:"):
        chatter(*mode.split(":")[1:])
    if lines := int(os.environ.get("FAKE_QEMU_BURST", "0")):
        signal.signal(signal.SIGUSR1, lambda *_: burst(lines))
    if seconds := float(os.environ.get("FAKE_QEMU_TICK", "0")):
        threading.Thread(target=tick, args=(seconds,), daemon=True).start()
    if mode.startswith("exit-after:"):
        _, seconds, code = mode.split(":")
        time.sleep(float(seconds))
        say(sys.stdout, "reboot: Power down\r\n")
        os._exit(int(code))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
