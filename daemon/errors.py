"""The store's own errors: what went wrong, in the domain's words, plus a message an operator can act
on. Only the gRPC service and the peer layer translate a kind into a status code (`grpc_code`)."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID = "invalid argument"          # the request is malformed or out of bounds: nothing changed
    NOT_FOUND = "not found"
    PRECONDITION = "failed precondition"  # the state does not allow it (e.g. the allocation is gone)
    EXHAUSTED = "exhausted"               # a bound was reached: retry later or ask for less
    DENIED = "permission denied"
    UNAUTHENTICATED = "unauthenticated"
    UNAVAILABLE = "unavailable"           # a tier cannot do it now (disk stuck, S3 down): retry later
    OUT_OF_RANGE = "out of range"         # e.g. a Watch resumed from an event no longer kept


class ApiError(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        assert isinstance(kind, ErrorKind)
        self.kind = kind
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(ErrorKind.INVALID, message)


def not_found(message: str) -> ApiError:
    return ApiError(ErrorKind.NOT_FOUND, message)


def precondition(message: str) -> ApiError:
    return ApiError(ErrorKind.PRECONDITION, message)


def exhausted(message: str) -> ApiError:
    return ApiError(ErrorKind.EXHAUSTED, message)


def denied(message: str) -> ApiError:
    return ApiError(ErrorKind.DENIED, message)


def unauthenticated(message: str) -> ApiError:
    return ApiError(ErrorKind.UNAUTHENTICATED, message)


def unavailable(message: str) -> ApiError:
    return ApiError(ErrorKind.UNAVAILABLE, message)


def out_of_range(message: str) -> ApiError:
    return ApiError(ErrorKind.OUT_OF_RANGE, message)


def grpc_code(error: ApiError):
    """The gRPC status for a store error (imported by the translating layers only)."""
    import grpc  # noqa: PLC0415 - the domain core does not depend on gRPC
    return {
        ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorKind.DENIED: grpc.StatusCode.PERMISSION_DENIED,
        ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        ErrorKind.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    }[error.kind]
