"""The errors a user or the environment can cause, and the one table that maps them to exit
codes (CLI) and gRPC status codes (service).

Anything that is not a ``KnnlmError`` is a bug and keeps its traceback. The subclasses let a
caller tell "your input is wrong" (fix the command, retrying is useless) from "a backend is
down" (retry later): a Kubernetes Job's ``podFailurePolicy`` can then act on the exit code.
"""
from __future__ import annotations


class KnnlmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InvalidInput(KnnlmError):
    """An option, file or request field is malformed or out of range."""


class NotFound(KnnlmError):
    """A named datastore, domain, file or model does not exist."""


class Incompatible(KnnlmError):
    """Things that exist but do not fit together: another model's datastore, a newer schema,
    a datastore damaged on disk, an adaptive request to an uncalibrated domain."""


class BackendUnavailable(KnnlmError):
    """A Milvus server, Milvus Lite file or knnlm-vdb server cannot be reached or used right now."""


# class -> (CLI exit code, gRPC status code name). The most specific class wins (see ``classify``).
# 2: the command is wrong, do not retry; 3: the backend is unavailable, retrying may help.
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
ERROR_TABLE: dict[type, tuple[int, str]] = {
    InvalidInput: (EXIT_USAGE, "INVALID_ARGUMENT"),
    NotFound: (EXIT_USAGE, "NOT_FOUND"),
    Incompatible: (EXIT_USAGE, "FAILED_PRECONDITION"),
    BackendUnavailable: (EXIT_UNAVAILABLE, "UNAVAILABLE"),
    KnnlmError: (EXIT_USAGE, "INVALID_ARGUMENT"),
}


def classify(exc: KnnlmError) -> tuple[int, str]:
    """-> (exit code, gRPC status code name) for ``exc``."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[KnnlmError]
