"""Small pieces shared by tests that talk to agents and guests."""

from __future__ import annotations

import socket


class AckSink:
    """Where acks go when the stream is fed by hand rather than read from a socket."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


def read_agent(port: int) -> bytes:
    """Everything the (stand-in) agent behind a forwarded host port sends before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
