"""Request failures and their gRPC status codes, in one place for every RPC.

A library error (``errors.KnnlmError`` and its subclasses) gets its code from
``errors.ERROR_TABLE``, as the CLI gets its exit code; the service's own failures that the
table has no class for (a deadline that passed) are ``RequestError`` with an explicit code.
Anything else is a bug: the caller answers INTERNAL and logs the traceback.
"""
from __future__ import annotations

import grpc

from knnlm_vdb.errors import InvalidInput, KnnlmError, classify


class RequestError(Exception):
    """A request the server refuses for a reason the error table does not name, with its code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class DeadlineExceeded(RequestError):
    """The request's deadline passed before (or while) it was computed."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def invalid(message: str) -> InvalidInput:
    return InvalidInput(message)


def from_knnlm_error(exc: KnnlmError) -> RequestError:
    """A library error (bad settings, uncalibrated domain, backend down) by ``errors.ERROR_TABLE``."""
    return RequestError(getattr(grpc.StatusCode, classify(exc)[1]), str(exc))


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """-> (code, message) for an expected request failure, None for a bug (answer INTERNAL)."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, KnnlmError):
        err = from_knnlm_error(exc)
        return err.code, err.message
    return None
