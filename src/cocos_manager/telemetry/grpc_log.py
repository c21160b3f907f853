"""gRPC core's own log lines, turned into the daemon's JSON lines.

gRPC core (C++) writes to file descriptor 2 in absl's text format ("I1130 05:01:35.001 9365
ssl_transport_security.cc:2563] Handshake failed ..."): not JSON, and a failed TLS handshake
says neither who the peer was nor what it likely means. No Python hook sees a handshake that
fails (a server interceptor only sees calls), so the daemon reads fd 2 itself:

- before grpc is imported, GRPC_TRACE gets the `handshaker` tracer, whose line for a failed
  handshake carries the peer address (grpc.internal.endpoint_peer_address);
- fd 2 becomes a pipe read by a thread; Python's own sys.stderr keeps the real stderr, so a
  traceback never depends on that thread;
- each gRPC core record becomes one JSON line: a failed handshake as "TLS handshake failed"
  with the peer, the reason and what it likely means; other warnings and errors as
  "grpc core: ..."; the handshaker's routine trace lines are dropped. Anything on fd 2 that is
  not gRPC core's passes through to the real stderr unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cocos_manager.telemetry.logging import get_logger

HEADER = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w./+-]+:\d+)\] ?(.*)$")
# Lines gRPC core puts inside one record (absl status payloads).
CONTINUATION = re.compile(r"^(=== .* ===\s*|[\w./-]+\.(?:cc|h|c):\d+| shutdown=.*)$")
PEER = re.compile(r"grpc\.internal\.endpoint_peer_address=([^,}\s]+)")
HANDSHAKE_ERROR = re.compile(
    r"CallNextHandshakerLocked: error=(.*?)(?:\n=== |\n shutdown=| shutdown=)", re.S
)
SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")
TLS_ERROR = re.compile(r"ssl|tsi_|tls|certificate", re.I)
FLUSH_AFTER = 0.1  # seconds without a new line: the record in progress is complete

# What a server-side failure most likely means, by OpenSSL's reason.
MEANINGS = {
    "WRONG_VERSION_NUMBER": "the client speaks plaintext to this TLS port",
    "HTTP_REQUEST": "the client speaks plaintext to this TLS port",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate; mutual TLS "
    "(MANAGER_GRPC_CLIENT_CA_CERTS) requires one",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by "
    "MANAGER_GRPC_CLIENT_CA_CERTS",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this server's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected this server's certificate",
}
_LEVELS = {"I": "debug", "W": "warning", "E": "error", "F": "critical"}


def prepare_environment(environ: Any = None) -> None:
    """Must run before grpc is imported: gRPC core reads these once."""
    env = os.environ if environ is None else environ
    tracers = [t for t in env.get("GRPC_TRACE", "").split(",") if t]
    if "handshaker" not in tracers:
        env["GRPC_TRACE"] = ",".join([*tracers, "handshaker"])


@dataclass
class Record:
    level: str
    where: str
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def describe_handshake_failure(text: str) -> dict[str, str] | None:
    """The JSON fields of a failed handshake in one handshaker trace record, or None."""
    match = HANDSHAKE_ERROR.search(text)
    if match is None or match.group(1).strip() in ("OK", ""):
        return None
    error = match.group(1).strip()
    if not TLS_ERROR.search(error):
        return None  # e.g. the TCP connect was refused: no TLS handshake took place
    peer = PEER.search(text)
    server_side = "grpc.internal.server_credentials" in text
    fields = {
        "peer": peer.group(1) if peer else "unknown",
        "side": "server" if server_side else "client",
        "error": error,
    }
    reason = SSL_REASON.search(error)
    if reason is not None:
        fields["reason"] = reason.group(1)
        if reason.group(1) in MEANINGS and server_side:
            fields["likely"] = MEANINGS[reason.group(1)]
    return fields


class Pump:
    """Reads gRPC core's fd-2 output and re-emits it; testable without touching fd 2."""

    def __init__(self, passthrough: Any, log: Any = None) -> None:
        self._passthrough = passthrough
        self._log = log
        self._record: Record | None = None

    @property
    def log(self) -> Any:
        return self._log if self._log is not None else get_logger()

    @property
    def pending(self) -> bool:
        return self._record is not None

    def line(self, line: str) -> None:
        header = HEADER.match(line)
        if header is not None:
            self.flush()
            self._record = Record(header.group(1), header.group(2), [header.group(3)])
            return
        if self._record is not None and CONTINUATION.match(line):
            self._record.lines.append(line)
            return
        self.flush()
        if line.strip():
            self._passthrough.write(line + "\n")
            self._passthrough.flush()

    def flush(self) -> None:
        record, self._record = self._record, None
        if record is None:
            return
        text = record.text
        if "CallNextHandshakerLocked" in text:
            failure = describe_handshake_failure(text)
            if failure is not None:
                self.log.warning("TLS handshake failed", **failure)
            return
        if record.where.startswith(("handshaker.cc", "channel_trace.h", "trace.cc")):
            return  # the handshaker tracer's routine lines
        if "Handshake failed with error" in text:
            return  # the same failure, reported above with the peer
        getattr(self.log, _LEVELS[record.level])(f"grpc core: {text}", source=record.where)


def _pump_fd(read_fd: int, pump: Pump) -> None:
    buffer = b""
    with contextlib.suppress(OSError):
        while True:
            # Blocks while idle; a record in progress is complete after FLUSH_AFTER of quiet.
            ready, _, _ = select.select([read_fd], [], [], FLUSH_AFTER if pump.pending else None)
            if not ready:
                pump.flush()
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                pump.line(raw.decode("utf-8", errors="replace"))
    if buffer:
        pump.line(buffer.decode("utf-8", errors="replace"))
    pump.flush()
    os.close(read_fd)


_installed = False


def capture_grpc_core_log() -> None:
    """Routes fd 2 through a Pump (once per process); Python's sys.stderr stays the real one."""
    global _installed
    if _installed:
        return
    _installed = True
    prepare_environment()
    sys.stderr.flush()
    try:
        real = os.dup(2)  # not inheritable: QEMU and other children never get it
    except OSError:
        return  # no stderr at all: gRPC core's lines go nowhere anyway
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = open(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    thread = threading.Thread(
        target=_pump_fd, args=(read_fd, Pump(sys.stderr)), name="grpc-core-log", daemon=True
    )
    thread.start()

    def restore() -> None:
        # fd 2 back to the real stderr closes the pipe's last writer: the pump drains and ends.
        with contextlib.suppress(OSError):
            os.dup2(real, 2)
        thread.join(1.0)

    atexit.register(restore)


class _Dropped:
    """A log that keeps nothing: the caller of `grpc_core_silenced` tells the failure itself."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **fields: None


@contextlib.contextmanager
def grpc_core_silenced() -> Iterator[None]:
    """For a short synchronous gRPC call in a command that is not the daemon (`check`'s bind
    probe), whose failure the caller reports in its own words: gRPC core's record of it
    ("E1207 ... add_port.cc:83] Failed to add port ...") would be noise beside that line.
    Meanwhile fd 2 goes to a temporary file; gRPC core's records there are dropped, anything
    else goes on to stderr unchanged. Not for the daemon, whose fd 2 is already the Pump's."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            pump = Pump(sys.stderr, _Dropped())
            for line in held.read().decode("utf-8", errors="replace").splitlines():
                pump.line(line)
            pump.flush()
