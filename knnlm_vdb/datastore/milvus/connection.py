"""Reaching Milvus: URIs, connecting (one Milvus Lite start at a time), turning failures into one
line, and the small waits every caller shares (load state, index build).

URIs: a local path ending in ``.db`` is Milvus Lite; ``http(s)://host:port`` is a server,
whose token comes from the ``token=`` option (the CLI reads ``KNNLM_MILVUS_TOKEN``) and is
never logged. Connecting gives up after ``timeout`` seconds (default 10).

Milvus Lite locks its database directory for the life of the process that opened it (pymilvus
keeps the embedded server running after ``close()``), so one process at a time uses a Lite
file, and it forgets which collections were loaded when that process exits.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from urllib.parse import urlparse, urlunparse

from knnlm_vdb.errors import KnnlmError

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0

_LITE_CONNECT_LOCK = threading.Lock()
_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_saved: list[int] = []


def deployment_of(uri: str) -> str:
    """``lite`` for a local ``.db`` path, ``server`` for an http(s)/tcp URI; anything else is refused."""
    if not isinstance(uri, str) or not uri:
        raise KnnlmError("empty Milvus --uri: use a local path ending in .db (Milvus Lite) or http://host:19530")
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https", "tcp"):
        return "server"
    if uri.endswith(".db") and (not scheme or len(scheme) == 1):  # len 1: a Windows drive letter
        return "lite"
    raise KnnlmError(f"Milvus --uri {uri!r} must be a local path ending in .db (Milvus Lite) "
                     f"or a server address such as http://localhost:19530")


def redact_uri(uri: str) -> str:
    """The URI without any user:password part, safe to log and print."""
    parsed = urlparse(uri)
    if parsed.scheme and (parsed.username or parsed.password):
        host = parsed.hostname or ""
        netloc = f"***@{host}" + (f":{parsed.port}" if parsed.port else "")
        return urlunparse(parsed._replace(netloc=netloc))
    return uri


def connect(uri: str, token: str | None = None, timeout: float | None = None, db_name: str | None = None,
            must_exist: bool = True):
    """A ``MilvusClient`` for ``uri``, or a ``KnnlmError`` within about ``timeout`` seconds."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    deployment = deployment_of(uri)
    timeout = DEFAULT_CONNECT_TIMEOUT if timeout is None else float(timeout)
    shown = redact_uri(uri)
    if deployment == "lite":
        parent = os.path.dirname(os.path.abspath(uri))
        if must_exist and not os.path.exists(uri):
            raise KnnlmError(f"no Milvus Lite database at {uri}; build one first (or check --uri)")
        os.makedirs(parent, exist_ok=True)
    try:
        # Milvus Lite starts its embedded server on the first connection to a file; two threads doing
        # that at once both try to lock the file and one fails, so Lite connections are made one at a time
        with _LITE_CONNECT_LOCK if deployment == "lite" else nullcontext():
            client = MilvusClient(uri=uri, token=token or "", db_name=db_name or "", timeout=timeout)
    except MilvusException as exc:
        if deployment == "lite" and lite_locked(uri):
            raise KnnlmError(f"the Milvus Lite database {uri} is open in another process; Milvus Lite allows one "
                             f"process per database file (use a Milvus server for concurrent readers and "
                             f"writers)") from None
        raise KnnlmError(f"cannot connect to Milvus at {shown} within {timeout:g}s: {exc.message}") from None
    except Exception as exc:  # grpc/URI errors that pymilvus does not wrap
        raise KnnlmError(f"cannot connect to Milvus at {shown}: {exc}") from None
    log.debug("connected to Milvus at %s", shown)
    return client


def lite_locked(uri: str) -> bool:
    """Whether another process holds Milvus Lite's lock on the database directory ``uri``."""
    lock = os.path.join(uri, "LOCK")  # milvus_lite.db.LOCK_FILENAME
    if os.name != "posix" or not os.path.isfile(lock):
        return False
    import fcntl

    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextmanager
def quiet_pymilvus():
    """Silence pymilvus' own ERROR logs (with tracebacks) around calls whose failure we expect and handle,
    and Milvus Lite's in-process gRPC server, which logs every method it lacks (query iterators ask
    it for a timestamp), and Lite's own servicer, which logs failed requests with a traceback."""
    global _quiet_depth, _quiet_saved
    loggers = [logging.getLogger(name) for name in ("pymilvus", "grpc._server", "milvus_lite")]
    with _QUIET_LOCK:  # threads may nest these windows: the first in saves the levels, the last out restores them
        if _quiet_depth == 0:
            _quiet_saved = [lg.level for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for lg, level in zip(loggers, _quiet_saved):
                    lg.setLevel(level)


@contextmanager
def rpc(what: str, uri: str):
    """Turn a Milvus failure into a one-line ``KnnlmError`` naming the operation and server."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        raise KnnlmError(f"Milvus {what} at {redact_uri(uri)} failed: {exc.message}") from None


def supports_aliases(client) -> bool:
    """Older Milvus Lite builds answer alias calls with an error; there we use collections directly."""
    from pymilvus.exceptions import MilvusException

    try:
        client.list_aliases()
        return True
    except MilvusException as exc:
        log.info("Milvus at this URI has no aliases (%s); using collections directly", exc.message)
        return False


def ensure_loaded(client, name: str) -> None:
    """Load a collection that is not in memory. Milvus Lite forgets what was loaded when the
    process that opened the file exits; a server keeps collections loaded."""
    state = client.get_load_state(name)["state"]
    if getattr(state, "name", str(state)) != "Loaded":
        log.info("loading Milvus collection %s into memory", name)
        client.load_collection(name)


def index_done(state: dict) -> bool:
    """Whether ``describe_index`` says every flushed row is indexed.

    A 2.3 server keeps reporting ``pending_index_rows`` after the build finished, so indexed_rows
    reaching a non-zero total_rows counts as done too.
    """
    indexed, total = state.get("indexed_rows") or 0, state.get("total_rows") or 0
    return indexed >= total and (not state.get("pending_index_rows") or total > 0)


def wait_for_index(client, name: str, timeout_s: float = 3600.0, poll_s: float = 2.0,
                   log_every_s: float = 30.0) -> dict:
    """Poll the vector index of ``name`` until ``index_done`` or ``timeout_s``; return the last state.

    Callers that need the index (reindex) check ``index_done`` on the result; benchmarks only wait.
    """
    start = last_log = time.monotonic()
    while True:
        state = client.describe_index(name, "key")
        now = time.monotonic()
        if index_done(state) or now - start > timeout_s:
            return state
        if now - last_log >= log_every_s:
            log.info("%s: index %s, %s of %s rows indexed (%.0f s)", name, state.get("state"),
                     state.get("indexed_rows"), state.get("total_rows"), now - start)
            last_log = now
        time.sleep(poll_s)


def appears(check, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Whether ``check()`` becomes true within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
