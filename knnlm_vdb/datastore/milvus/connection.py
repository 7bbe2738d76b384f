"""Reaching Milvus: URIs, connecting (one Milvus Lite start at a time), turning failures into one
line, and the small waits every caller shares (load state, index build).

URIs: a local path ending in ``.db`` is Milvus Lite; ``http(s)://host:port`` is a server,
whose token comes from the ``token=`` option (the CLI reads ``KNNLM_MILVUS_TOKEN``) and is
never logged. Connecting gives up after ``timeout`` seconds (default 10).

Milvus Lite locks its database directory for the life of the process that opened it (pymilvus
keeps the embedded server running after ``close()``), so one process at a time uses a Lite
file, and it forgets which collections were loaded when that process exits. Lite creates its
directories inside whatever path it is given, so a Lite path is checked before Lite sees it:
only commands that create a database (``must_exist=False``) may create one, and never inside a
file or a foreign directory; a failed open is explained in one line (locked, read-only, not a
database) while milvus-lite's own traceback is kept off the terminal.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from urllib.parse import urlparse, urlunparse

from knnlm_vdb.errors import BackendUnavailable, InvalidInput, KnnlmError, NotFound

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0

_LITE_CONNECT_LOCK = threading.Lock()
_LITE_CREATE_LOCKS: dict[str, threading.Lock] = {}
_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_saved: list[int] = []


def deployment_of(uri: str) -> str:
    """``lite`` for a local ``.db`` path, ``server`` for an http(s)/tcp URI; anything else is refused."""
    if not isinstance(uri, str) or not uri:
        raise InvalidInput("empty Milvus --uri: use a local path ending in .db (Milvus Lite) or http://host:19530")
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https", "tcp"):
        return "server"
    if uri.endswith(".db") and (not scheme or len(scheme) == 1):  # len 1: a Windows drive letter
        return "lite"
    raise InvalidInput(f"Milvus --uri {uri!r} must be a local path ending in .db (Milvus Lite) "
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
    """A ``MilvusClient`` for ``uri``, or a one-line ``KnnlmError`` within about ``timeout`` seconds.

    ``must_exist=False`` (build, append, migrate) may create a Milvus Lite database; every other
    caller only opens one that is there, and creates nothing.
    """
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    deployment = deployment_of(uri)
    timeout = DEFAULT_CONNECT_TIMEOUT if timeout is None else float(timeout)
    shown = redact_uri(uri)
    # Milvus Lite starts its embedded server on the first connection to a file; two threads doing
    # that at once both try to lock the file and one fails, so Lite connections are made one at a
    # time, the location check included (a thread checking while another creates the database
    # would see a path that is neither missing nor a directory yet)
    with _LITE_CONNECT_LOCK if deployment == "lite" else nullcontext():
        if deployment == "lite":
            check_lite_location(uri, create=not must_exist)
            try:
                os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
            except OSError as exc:
                raise BackendUnavailable(f"cannot create a Milvus Lite database at {uri}: {exc.strerror}") from None
        try:
            with lite_errors() as lite_failures:
                client = MilvusClient(uri=uri, token=token or "", db_name=db_name or "", timeout=timeout)
        except MilvusException as exc:
            if deployment == "lite":
                raise lite_open_error(uri, lite_failures) from None
            raise BackendUnavailable(f"cannot connect to Milvus at {shown} within {timeout:g}s: {exc.message}") from None
        except Exception as exc:  # grpc/URI errors that pymilvus does not wrap
            raise BackendUnavailable(f"cannot connect to Milvus at {shown}: {exc}") from None
    log.debug("connected to Milvus at %s", shown)
    return client


def creation_lock(uri: str):
    """A lock that makes creating domains in one Milvus Lite database one at a time (a no-op for a server).

    Only one process can use a Lite file, so its concurrent creators are threads of this process,
    and an in-process lock removes their race completely; Lite's own answers to concurrent
    creates (a collection listed before it can be described) are not reliable enough to arbitrate.
    Servers keep the token protocol of ``create.create_domain``, which works across processes.
    """
    if deployment_of(uri) != "lite":
        return nullcontext()
    with _LITE_CONNECT_LOCK:
        return _LITE_CREATE_LOCKS.setdefault(os.path.abspath(uri), threading.Lock())


def is_lite_database(path: str) -> bool:
    """Whether ``path`` is a Milvus Lite (3.x) database: a directory with its two subdirectories."""
    return all(os.path.isdir(os.path.join(path, d)) for d in ("collections", "databases"))


def check_lite_location(uri: str, create: bool) -> None:
    """Refuse, before Milvus Lite touches anything, a path this command must not open or create.

    Lite keeps a database in a directory and makes its subdirectories in any directory it is given,
    so a path that is not already a Lite database is only used by a command that creates one
    (``create``), and only when it is new or an empty directory.
    """
    path = os.path.abspath(uri)
    if os.path.isdir(path):
        if is_lite_database(path):
            if not os.access(path, os.W_OK):
                raise BackendUnavailable(f"the Milvus Lite database {uri} is in a read-only location; Milvus Lite "
                                         f"needs write access even to read (copy it somewhere writable)")
            return
        if not create:
            raise InvalidInput(f"{uri} is a directory but not a Milvus Lite database; check --uri")
        if os.listdir(path):
            raise InvalidInput(f"{uri} is a directory holding other files, not a Milvus Lite database; "
                               f"use a new path for --uri")
        writable = path
    elif os.path.lexists(path):
        raise InvalidInput(f"{uri} is a file, not a Milvus Lite database (Milvus Lite keeps a database in a "
                           f"directory); check --uri")
    elif not create:
        raise NotFound(f"no Milvus Lite database at {uri}; build one first (or check --uri)")
    else:
        writable = os.path.dirname(path)
        while not os.path.lexists(writable):
            writable = os.path.dirname(writable)
        if not os.path.isdir(writable):
            raise InvalidInput(f"cannot create a Milvus Lite database at {uri}: {writable} is a file, "
                               f"not a directory")
    if not os.access(writable, os.W_OK):
        raise BackendUnavailable(f"cannot create a Milvus Lite database at {uri}: {writable} is read-only")


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def lite_errors():
    """Collect milvus-lite's error records (it logs a traceback when it cannot start) instead of
    printing them: ``connect`` turns them into one line."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("milvus_lite")
    handler, propagate = _Collect(records), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def lite_open_error(uri: str, records: list) -> KnnlmError:
    """One line saying why Milvus Lite could not open ``uri`` (from the errors it logged)."""
    import errno

    cause = next((r.exc_info[1] for r in reversed(records) if r.exc_info and r.exc_info[1]), None)
    if type(cause).__name__ == "DataDirLockedError" or lite_locked(uri):
        return BackendUnavailable(f"the Milvus Lite database {uri} is open in another process; Milvus Lite allows "
                                  f"one process per database file (use a Milvus server for concurrent readers and "
                                  f"writers)")
    if isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BackendUnavailable(f"cannot open the Milvus Lite database {uri}: it is in a read-only location "
                                  f"({cause.strerror}); Milvus Lite needs write access even to read")
    if isinstance(cause, OSError):
        return BackendUnavailable(f"cannot open the Milvus Lite database {uri}: {cause.strerror or cause}")
    detail = f": {cause}" if cause is not None else ""
    return BackendUnavailable(f"cannot open the Milvus Lite database {uri}{detail}")


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
