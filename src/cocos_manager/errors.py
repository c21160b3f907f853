"""The manager's error types; the gRPC layer maps each to its status code in one place.

Each type also names its `reason`, the label of `manager_run_failures_total`, so the failure
metric never has to guess from a message (see docs/decisions.md, "Typed start errors").
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class ManagerError(Exception):
    """Base of errors a client is told about. The message names what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"


_TOLD = "cocos_told"


def mark_told(error: BaseException, told: bool) -> None:
    """Whether this Run's failure (any exception, a cancellation included) was published on
    Events as its VM's `vm-provision` `failed`, which a Run past admission publishes: a
    dial-out stream has then been told already (api/dialout_runs.py)."""
    setattr(error, _TOLD, told)


def was_told(error: BaseException) -> bool:
    return bool(getattr(error, _TOLD, False))


class InvalidArgumentError(ManagerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class AlreadyExistsError(ManagerError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "invalid_argument"


class NotFoundError(ManagerError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "invalid_argument"


class FailedPreconditionError(ManagerError):
    """A host file or tool is missing or unusable; the message names the setting."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "files"


class ResourceExhaustedError(ManagerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "resource_exhausted"


class AbortedError(ManagerError):
    """The operation was overtaken, e.g. a Stop arrived while the VM was starting."""

    code = grpc.StatusCode.ABORTED
    reason = "cancelled"


class UnavailableError(ManagerError):
    """The daemon is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class VmStartError(ManagerError):
    """A VM did not start; subclasses say how. The message carries QEMU's own words."""

    code = grpc.StatusCode.INTERNAL
    reason = "internal"


class QemuExitedError(VmStartError):
    """QEMU exited during start-up; `conflict` names a taken host number if its stderr says so."""

    reason = "qemu_exited"

    def __init__(self, message: str, *, exit: str, stderr: Sequence[str], conflict: str | None):
        super().__init__(message)
        self.exit = exit
        self.stderr = list(stderr)
        self.conflict = conflict


class ReadinessTimeoutError(VmStartError):
    """QEMU lived but its monitor never said `running` within MANAGER_QEMU_START_TIMEOUT."""

    reason = "start_timeout"


class HandoverTimeoutError(VmStartError):
    """The agent never took the manifest within MANAGER_QEMU_START_TIMEOUT."""

    reason = "start_timeout"


class HandoverFailedError(VmStartError):
    """The manifest could not be handed over and retrying cannot help (e.g. no AF_VSOCK)."""

    reason = "handover_failed"


class SudoRefusedError(FailedPreconditionError):
    """MANAGER_QEMU_USE_SUDO=true and sudo refused to run QEMU (a password wanted, no rule,
    `-C` not permitted): the message names sudo's words and the sudoers lines to add."""


class QemuStopFailedError(FailedPreconditionError):
    """A QEMU the daemon cannot signal (root's, started through sudo) did not exit: the VM is
    released anyway, and the message names the PID and the sudoers rule that would allow it."""
