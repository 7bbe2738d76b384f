"""Request failures and their gRPC status codes, shared by the unary and the streaming RPCs."""
from __future__ import annotations

import grpc

from knnlm_vdb.errors import KnnlmError, classify


class RequestError(Exception):
    """A request the server refuses, with the status code that says why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def from_knnlm_error(exc: KnnlmError) -> RequestError:
    """A library error (bad settings, uncalibrated domain, backend down) by ``errors.ERROR_TABLE``."""
    return RequestError(getattr(grpc.StatusCode, classify(exc)[1]), str(exc))
