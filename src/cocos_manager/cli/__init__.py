"""`cocos-manager-cli`: the verbs, the Run request it builds from files, and what it prints."""

from __future__ import annotations

import os
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. gRPC core writes its own log lines to stderr (a failed TLS
    handshake is one, in absl's format, before the CLI's own explanation): the CLI says what a
    failure means itself, so gRPC core is told to keep quiet, before grpc is imported, unless
    the operator set GRPC_VERBOSITY to debug gRPC."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from cocos_manager.cli.commands import main as run

    return run(argv)


__all__ = ["main"]
