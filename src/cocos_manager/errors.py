"""The manager's error types; the gRPC layer maps each to its status code in one place."""

from __future__ import annotations

import grpc


class ManagerError(Exception):
    """Base of errors a client is told about. The message names what was wrong."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(ManagerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExistsError(ManagerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotFoundError(ManagerError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(ManagerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ManagerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AbortedError(ManagerError):
    """The operation was overtaken, e.g. a Stop arrived while the VM was starting."""

    code = grpc.StatusCode.ABORTED


class UnavailableError(ManagerError):
    """The daemon is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class VmStartError(ManagerError):
    """QEMU exited or never became ready; the message carries QEMU's own words."""

    code = grpc.StatusCode.INTERNAL
