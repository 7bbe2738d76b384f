"""Milvus datastore: one collection per domain, in Milvus Lite (a local ``.db`` path) or a Milvus server.

Naming. A domain ``D`` (letters and digits, words joined by single underscores, at most
64 characters) is read and written through the alias ``knnlm_D``, which points at the
collection ``knnlm_D__v1``. A later reindex can build ``knnlm_D__v2`` and swap the alias,
so readers never see a half-built index. Where the server has no aliases (older Milvus
Lite builds) the collection itself is called ``knnlm_D``. Double underscores are not
allowed in domain names, so ``__v<N>`` can never be mistaken for part of a domain.

Schema: ``id`` INT64 primary key (``base.entry_ids``: deterministic, so re-adding a row is a
no-op), ``key`` FLOAT_VECTOR(dim), ``target`` INT32 (the next token), ``doc_id``
VARCHAR(1024), ``position`` INT64. Metric L2: Milvus returns squared L2, like FAISS.

Ingest ledger (``ledger.py``): collection ``knnlm_D__ledger``, one row per committed chunk,
created on the first commit. It is not behind the alias: a reindex keeps the same rows, so
the ledger stays valid across alias swaps.

Durability: a Milvus server has logged a row durably (its write-ahead log) when the insert
returns, and Strong reads see it at once; a server flush only seals segments (seconds each,
and many small segments), so ``flush()`` seals nothing on a server and ``seal()``/``close()``
seal once so the index gets built. Milvus Lite writes rows to a WAL that is not fsynced, so
there ``flush()`` persists them (about 0.2 s).

Metadata: the collection property ``knnlm.meta`` holds JSON
``{format_version, domain, info: StoreInfo, index: {type, build_params, search_params}}``.
Properties work on Milvus Lite and on the server (Lite drops the schema description) and
travel with the collection.

URIs: a local path ending in ``.db`` is Milvus Lite; ``http(s)://host:port`` is a server,
whose token comes from the ``token=`` option (the CLI reads ``KNNLM_MILVUS_TOKEN``) and is
never logged. Connecting gives up after ``timeout`` seconds (default 10).

Schema versions, creation races, reindexing (``schema.py``): every open and create first reads the
database's schema record (collection ``knnlm__schema``) and refuses a database newer than this
code. ``open_or_create`` (what ``append`` uses) is race-safe: parallel shard workers on a new
domain end up sharing the one collection that the winner created (see ``create``). New
collections get the newest schema, including the scalar index on ``doc_id`` (schema 2).

Behaviour observed with pymilvus 3.0.2, Milvus Lite 3.2.2 and a Milvus 2.3.5 standalone
server: Milvus Lite locks its database directory for the life of the process that opened it
(pymilvus keeps the embedded server running after ``close()``), so one process at a time uses a
Lite file, and it forgets which collections were loaded when that process exits. Lite reads
index build parameters only from a JSON ``params`` pair, which pymilvus 3 does not send (so
both forms are sent). Scalar indexes: Lite builds only INVERTED, a 2.3 server only Trie for
VARCHAR. pymilvus 3.0.2 sends ``describe_alias``/``list_aliases`` without the database of the
URI, so a server answers them for ``default``; aliases are resolved with describe_collection.
Both support aliases, collection properties and ``count(*)``; Lite 3.2.2 also
builds IVF_SQ8 and HNSW_SQ, but we only allow FLAT/IVF_FLAT/HNSW there, which every Lite
release supports. The server reports 0 rows in collection statistics until a flush, so
``count()`` uses ``count(*)``. Lite searches brute force (FLAT segments and unflushed rows)
with an ``[nq, n, dim]`` float32 temporary, so Lite query batches are sized to bound it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse, urlunparse

import numpy as np

from knnlm_vdb.datastore.base import Datastore, StoreInfo, pad_results
from knnlm_vdb.datastore.ledger import DocRecord, Ledger
from knnlm_vdb.errors import BackendUnavailable, KnnlmError, NotFound

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PREFIX = "knnlm_"
META_PROPERTY = "knnlm.meta"
DOC_ID_MAX_BYTES = 1024
MAX_TOPK = 16384  # Milvus rejects limit > 16384
MAX_NQ = 16384  # and more than 16384 query vectors per search
RPC_BUDGET_BYTES = 32 << 20  # one gRPC message carries at most 64 MB; stay at half of it
BYTES_PER_HIT = 32  # id (<=10 B varint) + score (4 B) + target (<=5 B) + framing, rounded up
INSERT_BATCH_BYTES = 16 << 20
ID_CHECK_BATCH = 4096  # ids per "id in [...]" query when looking for rows already stored
# Milvus Lite brute-forces each source (the unflushed memtable, and any segment whose index is
# FLAT or not built yet) with an [nq, rows, dim] float32 temporary. A source holds at most a
# memtable (128 MiB by default) or a compacted segment (100k rows), so we bound nq by that.
LITE_SCRATCH_BYTES = 512 << 20
LITE_MEMTABLE_BYTES = 128 << 20
LITE_SEGMENT_ROWS = 100_000
DEFAULT_CONNECT_TIMEOUT = 10.0
# Database-wide schema record (schema.py). "knnlm_" + a domain never contains "__" right after the
# prefix, so no domain's alias can collide with it.
SCHEMA_COLLECTION = "knnlm__schema"
SCHEMA_PROPERTY = "knnlm.schema"
CREATE_TOKEN_PROPERTY = "knnlm.create_token"  # which of several racing creators made a collection
RETIRED_PROPERTY = "knnlm.retired"  # set on a generation a reindex replaced but kept (--keep-old)
ALIAS_WAIT_S = 15.0  # how long a creator that lost a race waits for the winner's alias
# Scalar index on doc_id (schema version 2), by preference. Milvus Lite 3.2 builds only INVERTED;
# a 2.3 server only Trie for VARCHAR (INVERTED arrived in 2.4, which still builds Trie).
DOC_ID_INDEX_TYPES = {"lite": ("INVERTED",), "server": ("Trie", "INVERTED")}

CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
LITE_INDEXES = ("FLAT", "IVF_FLAT", "HNSW")
CPU_INDEXES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW")
GPU_INDEXES = ("GPU_CAGRA", "GPU_IVF_FLAT", "GPU_IVF_PQ", "GPU_BRUTE_FORCE")
# Whether a server has GPU indexes is only known once it answers, so plain "server" allows both.
DEPLOYMENT_INDEXES = {"lite": LITE_INDEXES, "server-cpu": CPU_INDEXES, "server-gpu": GPU_INDEXES,
                      "server": CPU_INDEXES + GPU_INDEXES}

_INT32_MAX = 2**31 - 1
_NLIST = ("int", 1, 65536)
_NPROBE = ("int", 1, 65536)
_PQ = {"nlist": _NLIST, "m": ("int", 1, 65536), "nbits": ("int", 1, 16)}
# index type -> (build parameters, search parameters); each parameter -> ("int", lo, hi) or ("str", choices)
_PARAMS: dict[str, tuple[dict, dict]] = {
    "FLAT": ({}, {}),
    "IVF_FLAT": ({"nlist": _NLIST}, {"nprobe": _NPROBE}),
    "IVF_SQ8": ({"nlist": _NLIST}, {"nprobe": _NPROBE}),
    "IVF_PQ": (_PQ, {"nprobe": _NPROBE}),
    "HNSW": ({"M": ("int", 2, 2048), "efConstruction": ("int", 1, _INT32_MAX)}, {"ef": ("int", 1, _INT32_MAX)}),
    "GPU_CAGRA": ({"intermediate_graph_degree": ("int", 1, 1024), "graph_degree": ("int", 1, 1024),
                   "build_algo": ("str", ("IVF_PQ", "NN_DESCENT")),
                   "cache_dataset_on_device": ("str", ("true", "false"))},
                  {"itopk_size": ("int", 1, 4096), "search_width": ("int", 1, 1024),
                   "min_iterations": ("int", 0, _INT32_MAX), "max_iterations": ("int", 0, _INT32_MAX),
                   "team_size": ("int", 0, 32)}),
    "GPU_IVF_FLAT": ({"nlist": _NLIST}, {"nprobe": _NPROBE}),
    "GPU_IVF_PQ": (_PQ, {"nprobe": _NPROBE}),
    "GPU_BRUTE_FORCE": ({}, {}),
}
_DEFAULT_BUILD = {
    "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024}, "IVF_PQ": {"nlist": 1024, "nbits": 8},
    "HNSW": {"M": 16, "efConstruction": 200},
    "GPU_CAGRA": {"intermediate_graph_degree": 64, "graph_degree": 32},
    "GPU_IVF_FLAT": {"nlist": 1024}, "GPU_IVF_PQ": {"nlist": 1024, "nbits": 8},
}
# Largest k each index type returns in full. GPU limits differ between Milvus releases and
# their docs (GPU_IVF_FLAT is documented as 256 in some and 2048 in others): we use the
# smallest documented value, so a search never silently returns fewer neighbours.
_MAX_K = {"GPU_CAGRA": 1024, "GPU_IVF_PQ": 1024, "GPU_IVF_FLAT": 256}
_DOMAIN_RE = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*")


# ---- index configuration ------------------------------------------------------------------
@dataclass(frozen=True)
class IndexConfig:
    """A validated Milvus index: type, build parameters and the user's search parameters."""

    index_type: str
    build_params: dict = field(default_factory=dict)
    search_params: dict = field(default_factory=dict)

    def search_request(self, k: int, deployment: str = "server") -> dict:
        """``search_params`` for one search of ``k`` neighbours, k-dependent defaults filled in."""
        validate_index(self.index_type, self.build_params, self.search_params, k=k, deployment=deployment)
        params = dict(self.search_params)
        if self.index_type == "HNSW":
            params.setdefault("ef", max(k, 64))  # ef < k makes Milvus return fewer than k hits
        elif self.index_type == "GPU_CAGRA":
            params.setdefault("itopk_size", max(64, -(-k // 32) * 32))
        elif "nlist" in self.build_params:
            params.setdefault("nprobe", min(32, self.build_params["nlist"]))
        return {"metric_type": "L2", "params": params}

    def to_dict(self) -> dict:
        return {"type": self.index_type, "build_params": dict(self.build_params),
                "search_params": dict(self.search_params), "metric": "L2"}


def _check_param(kind: str, index_type: str, name: str, value, spec) -> None:
    if spec[0] == "int":
        _, lo, hi = spec
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise KnnlmError(f"{index_type} {kind} parameter {name}={value!r} must be an integer in [{lo}, {hi}]")
    elif value not in spec[1]:
        raise KnnlmError(f"{index_type} {kind} parameter {name}={value!r} must be one of {', '.join(spec[1])}")


def validate_index(index_type: str, build_params: dict | None = None, search_params: dict | None = None,
                   k: int | None = None, deployment: str = "server", dim: int | None = None) -> IndexConfig:
    """Check an index configuration before anything reaches Milvus; return it with defaults.

    ``deployment`` is ``lite``, ``server`` (CPU or GPU: unknown until it answers),
    ``server-cpu`` or ``server-gpu``. ``k`` (the neighbours a search asks for) and ``dim``
    enable the checks that depend on them. Raises ``KnnlmError`` naming the bad value.
    """
    if deployment not in DEPLOYMENT_INDEXES:
        raise KnnlmError(f"unknown Milvus deployment {deployment!r}: use one of {', '.join(DEPLOYMENT_INDEXES)}")
    if not isinstance(index_type, str):
        raise KnnlmError(f"Milvus index type must be a string, got {index_type!r}")
    itype = index_type.upper()
    allowed = DEPLOYMENT_INDEXES[deployment]
    if itype not in allowed:
        where = "Milvus Lite" if deployment == "lite" else f"a Milvus {deployment.replace('-', ' ')}"
        raise KnnlmError(f"index type {index_type!r} is not supported by {where}; use one of {', '.join(allowed)}")
    for kind, given in (("build", build_params), ("search", search_params)):
        if given is not None and not isinstance(given, dict):
            raise KnnlmError(f"Milvus {kind} parameters must be a mapping, got {given!r}")
    build_spec, search_spec = _PARAMS[itype]
    build = {**_DEFAULT_BUILD.get(itype, {}), **(build_params or {})}
    search = dict(search_params or {})
    for kind, params, spec in (("build", build, build_spec), ("search", search, search_spec)):
        for name, value in params.items():
            if name not in spec:
                known = ", ".join(spec) or "none"
                raise KnnlmError(f"unknown {itype} {kind} parameter {name!r} (known: {known})")
            _check_param(kind, itype, name, value, spec[name])
    if itype in ("IVF_PQ", "GPU_IVF_PQ"):
        if dim is not None:
            build.setdefault("m", max(m for m in range(1, min(64, dim) + 1) if dim % m == 0))
            if dim % build["m"]:
                raise KnnlmError(f"{itype} m={build['m']} must divide the key dimension {dim}")
    if "nprobe" in search and search["nprobe"] > build["nlist"]:
        raise KnnlmError(f"{itype} nprobe={search['nprobe']} exceeds nlist={build['nlist']}; "
                         f"a search cannot probe more lists than the index has")
    if itype == "GPU_CAGRA" and build["graph_degree"] > build["intermediate_graph_degree"]:
        raise KnnlmError(f"GPU_CAGRA graph_degree={build['graph_degree']} must not exceed "
                         f"intermediate_graph_degree={build['intermediate_graph_degree']}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise KnnlmError(f"--k must be a positive integer, got {k!r}")
        if k > MAX_TOPK:
            raise KnnlmError(f"--k {k} exceeds {MAX_TOPK}, the most neighbours Milvus returns per query")
        if k > _MAX_K.get(itype, MAX_TOPK):
            raise KnnlmError(f"--k {k} exceeds {_MAX_K[itype]}, the most neighbours {itype} returns per query")
        if itype == "HNSW" and "ef" in search and search["ef"] < k:
            raise KnnlmError(f"HNSW ef={search['ef']} is smaller than --k {k}; Milvus would return fewer "
                             f"than k neighbours. Use ef >= k (or leave ef unset for max(k, 64))")
        if itype == "GPU_CAGRA" and "itopk_size" in search and search["itopk_size"] < k:
            raise KnnlmError(f"GPU_CAGRA itopk_size={search['itopk_size']} is smaller than --k {k}; use itopk_size >= k")
    return IndexConfig(itype, build, search)


def _check_consistency(level: str) -> str:
    for name in CONSISTENCY_LEVELS:
        if isinstance(level, str) and level.lower() == name.lower():
            return name
    raise KnnlmError(f"unknown Milvus consistency level {level!r}: use one of {', '.join(CONSISTENCY_LEVELS)}")


def check_domain(domain: str) -> str:
    """A domain name usable inside a collection name; refuse anything else with a clear message."""
    if not isinstance(domain, str) or len(domain) > 64 or not _DOMAIN_RE.fullmatch(domain):
        raise KnnlmError(f"invalid domain {domain!r}: use letters and digits, words joined by single "
                         f"underscores, at most 64 characters (e.g. python_docs)")
    return domain


def alias_name(domain: str) -> str:
    """Name readers use for a domain: an alias, or the collection itself without alias support."""
    return PREFIX + check_domain(domain)


def collection_name(domain: str, generation: int = 1) -> str:
    """Physical collection behind the alias of ``domain``."""
    return f"{alias_name(domain)}__v{generation}"


def ledger_name(domain: str) -> str:
    """Collection holding the ingest ledger of ``domain``."""
    return f"{alias_name(domain)}__ledger"


# ---- connections ----------------------------------------------------------------------------
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


def _connect(uri: str, token: str | None = None, timeout: float | None = None, db_name: str | None = None,
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
            raise NotFound(f"no Milvus Lite database at {uri}; build one first (or check --uri)")
        os.makedirs(parent, exist_ok=True)
    try:
        # Milvus Lite starts its embedded server on the first connection to a file; two threads doing
        # that at once both try to lock the file and one fails, so Lite connections are made one at a time
        with _LITE_CONNECT_LOCK if deployment == "lite" else _nothing():
            client = MilvusClient(uri=uri, token=token or "", db_name=db_name or "", timeout=timeout)
    except MilvusException as exc:
        if deployment == "lite" and _lite_locked(uri):
            raise KnnlmError(f"the Milvus Lite database {uri} is open in another process; Milvus Lite allows one "
                             f"process per database file (use a Milvus server for concurrent readers and "
                             f"writers)") from None
        raise BackendUnavailable(f"cannot connect to Milvus at {shown} within {timeout:g}s: {exc.message}") from None
    except Exception as exc:  # grpc/URI errors that pymilvus does not wrap
        raise BackendUnavailable(f"cannot connect to Milvus at {shown}: {exc}") from None
    log.debug("connected to Milvus at %s", shown)
    return client


_LITE_CONNECT_LOCK = threading.Lock()
_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_saved: list[int] = []


def _lite_locked(uri: str) -> bool:
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


def ensure_loaded(client, name: str) -> None:
    """Load a collection that is not in memory. Milvus Lite forgets what was loaded when the
    process that opened the file exits; a server keeps collections loaded."""
    state = client.get_load_state(name)["state"]
    if getattr(state, "name", str(state)) != "Loaded":
        log.info("loading Milvus collection %s into memory", name)
        client.load_collection(name)


def read_schema_state(client) -> dict | None:
    """The database's schema record (``schema.py``): ``{version, history}``, or None if it has none."""
    if not client.has_collection(SCHEMA_COLLECTION):
        return None
    raw = (client.describe_collection(SCHEMA_COLLECTION).get("properties") or {}).get(SCHEMA_PROPERTY)
    if not raw:
        return {"version": 0, "history": []}
    try:
        state = json.loads(raw)
        int(state["version"])
    except (ValueError, KeyError, TypeError):
        raise KnnlmError(f"corrupt schema record in Milvus collection {SCHEMA_COLLECTION}") from None
    return state


def check_schema_version(client, uri: str) -> int:
    """The recorded schema version (0: none); refuse a database migrated by a newer knnlm-vdb."""
    from knnlm_vdb.schema import latest_version

    state = read_schema_state(client)
    version = int(state["version"]) if state else 0
    if version > latest_version():
        raise KnnlmError(f"the Milvus database at {redact_uri(uri)} has schema version {version}, newer than the "
                         f"newest this knnlm-vdb knows ({latest_version()}); upgrade knnlm-vdb to use it")
    return version


def doc_id_index(client, name: str) -> str | None:
    """Type of the scalar index on ``doc_id`` of collection ``name`` ("" when the server chose), or None."""
    for index_name in client.list_indexes(name):
        desc = client.describe_index(name, index_name)
        if desc.get("field_name") == "doc_id":
            return desc.get("index_type", "")
    return None


def ensure_doc_id_index(client, name: str, deployment: str, strict: bool = True) -> str | None:
    """Build a scalar index on ``doc_id`` unless there is one; return its type.

    Tries the types this deployment may support in order. ``strict=False`` logs a warning and
    returns None where none works (an optimisation must not block creating a domain).
    """
    have = doc_id_index(client, name)
    if have is not None:
        return have
    errors = []
    for index_type in DOC_ID_INDEX_TYPES["lite" if deployment == "lite" else "server"]:
        params = client.prepare_index_params()
        params.add_index(field_name="doc_id", index_type=index_type)
        try:
            with quiet_pymilvus():
                client.create_index(name, params)
            return index_type
        except Exception as exc:
            errors.append(f"{index_type}: {getattr(exc, 'message', exc)}")
            if doc_id_index(client, name) is not None:  # another process built it meanwhile
                return doc_id_index(client, name)
    message = f"cannot build a scalar index on {name}.doc_id ({'; '.join(errors)})"
    if strict:
        raise KnnlmError(message)
    log.warning("%s; continuing without it", message)
    return None


@contextmanager
def _rpc(what: str, uri: str):
    """Turn a Milvus failure into a one-line ``KnnlmError`` naming the operation and server."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        raise KnnlmError(f"Milvus {what} at {redact_uri(uri)} failed: {exc.message}") from None


def _supports_aliases(client) -> bool:
    """Older Milvus Lite builds answer alias calls with an error; there we use collections directly."""
    from pymilvus.exceptions import MilvusException

    try:
        client.list_aliases()
        return True
    except MilvusException as exc:
        log.info("Milvus at this URI has no aliases (%s); using collections directly", exc.message)
        return False


@contextmanager
def _nothing():
    yield


def _appears(check, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Whether ``check()`` becomes true within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _create_token(client, name: str) -> str | None:
    return (client.describe_collection(name).get("properties") or {}).get(CREATE_TOKEN_PROPERTY)


def _alias_target(client, alias: str) -> str | None:
    """The collection ``alias`` points at, or None where there is no such alias.

    Asks describe_collection, not describe_alias/list_aliases: pymilvus 3.0.2 sends those two with
    an empty database name, so a 2.3 server answers them for the default database whatever the URI.
    """
    if not client.has_collection(alias):
        return None
    target = client.describe_collection(alias).get("collection_name")
    return target if target != alias else None


def _read_meta(client, name: str) -> tuple[dict, dict]:
    """The collection's description and its knnlm metadata, or ({}, {}) for foreign collections."""
    desc = client.describe_collection(name)
    raw = (desc.get("properties") or {}).get(META_PROPERTY)
    if raw is None:
        return desc, {}
    try:
        return desc, json.loads(raw)
    except ValueError:
        raise KnnlmError(f"corrupt knnlm metadata on Milvus collection {desc.get('collection_name', name)}") from None


def _domain_collections(client) -> dict[str, list[str]]:
    """domain -> physical collections that carry its metadata (more than one mid-reindex)."""
    found: dict[str, list[str]] = {}
    for name in sorted(client.list_collections()):
        if not name.startswith(PREFIX):
            continue
        try:
            _, meta = _read_meta(client, name)
        except KnnlmError as exc:  # someone else's collection: list the others rather than fail
            log.warning("skipping %s: %s", name, exc)
            continue
        if meta.get("domain"):
            found.setdefault(meta["domain"], []).append(name)
    return found


class NoSuchDomain(KnnlmError):
    """The domain does not exist at that URI."""


def list_domains(uri: str, token: str | None = None, timeout: float | None = None,
                 db_name: str | None = None) -> list[str]:
    """Domains stored at ``uri`` (sorted), for ``knnlm-vdb domains list``."""
    client = _connect(uri, token, timeout, db_name)
    try:
        with _rpc("list collections", uri):
            return sorted(_domain_collections(client))
    finally:
        client.close()


def drop_domain(uri: str, domain: str, token: str | None = None, timeout: float | None = None,
                db_name: str | None = None) -> list[str]:
    """Delete a domain: its alias and every collection holding it. Returns the dropped collections."""
    check_domain(domain)
    client = _connect(uri, token, timeout, db_name)
    try:
        with _rpc(f"drop domain {domain}", uri):
            check_schema_version(client, uri)
            names = _domain_collections(client).get(domain, [])
            if not names:
                raise NoSuchDomain(f"no domain {domain!r} at {redact_uri(uri)}")
            if _supports_aliases(client) and _alias_target(client, alias_name(domain)) is not None:
                client.drop_alias(alias_name(domain))
            if client.has_collection(ledger_name(domain)):
                names.append(ledger_name(domain))
            for name in names:
                client.drop_collection(name)
        log.info("dropped domain %s (%s) at %s", domain, ", ".join(names), redact_uri(uri))
        return names
    finally:
        client.close()


_CONN_OPTIONS = ("token", "timeout", "db_name")
_INDEX_OPTIONS = ("index_type", "index_params", "search_params", "consistency", "k")


def _split_options(options: dict) -> tuple[dict, dict]:
    unknown = sorted(set(options) - set(_CONN_OPTIONS) - set(_INDEX_OPTIONS))
    if unknown:
        raise KnnlmError(f"unknown Milvus option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(_CONN_OPTIONS + _INDEX_OPTIONS)}")
    conn = {k: options[k] for k in _CONN_OPTIONS if k in options}
    idx = {k: options[k] for k in _INDEX_OPTIONS if options.get(k) is not None}
    return conn, idx


# ---- the datastore ------------------------------------------------------------------------------
class MilvusDatastore(Datastore):
    """Keys of one domain in a Milvus collection, searched by squared L2 with the configured index."""

    def __init__(self, client, uri: str, domain: str, name: str, meta: dict, index: IndexConfig,
                 consistency: str = "Strong"):
        self.client = client
        self.uri = uri
        self.domain = domain
        self.name = name  # alias (or the collection itself): what every request names
        self.meta = meta
        self.info = StoreInfo.from_dict(meta["info"])
        self.index = index
        self.consistency = consistency
        self.deployment = deployment_of(uri)
        self._dirty = False
        self._count_hint = self.count()
        self._rows_added_here = 0

    # ---- creation / opening -------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, domain: str, info: StoreInfo, exist_ok: bool = False, **options) -> "MilvusDatastore":
        """Create the collection (and alias) for a new domain.

        Options: ``index_type`` (FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ, HNSW, GPU_*; default FLAT),
        ``index_params`` (build), ``search_params`` (ef, nprobe, ...), ``consistency``
        (default Strong), ``k`` (the neighbours searches will ask for, to check ef/itopk/limits
        now rather than at the first search), and connection options ``token``, ``timeout``
        (seconds to connect, default 10), ``db_name``. Everything is validated before the
        server is contacted.

        ``exist_ok``: a domain that exists, or that another process creates at the same moment,
        is opened instead (its own index settings win). Creation is race-safe: each creator tags
        the collection it asks for with a random token, and only the one whose token is on it
        owns it (a 2.3 server answers a duplicate create with identical parameters with success);
        a loser waits for the winner's alias and opens the domain, never dropping anything.
        """
        conn, idx = _split_options(options)
        check_domain(domain)
        consistency = _check_consistency(idx.get("consistency", "Strong"))
        deployment = deployment_of(uri)
        index = validate_index(idx.get("index_type", "FLAT"), idx.get("index_params"), idx.get("search_params"),
                               k=idx.get("k"), deployment=deployment, dim=info.dim)
        reopen = {k: v for k, v in options.items() if k in _CONN_OPTIONS or k in ("consistency", "k")}
        client = _connect(uri, must_exist=False, **conn)
        try:
            with _rpc(f"create domain {domain}", uri):
                check_schema_version(client, uri)
                alias = alias_name(domain)
                if client.has_collection(alias):
                    if exist_ok:
                        return cls._open_instead(client, uri, domain, reopen)
                    raise KnnlmError(f"domain {domain!r} already exists at {redact_uri(uri)}; append to it, "
                                     f"or drop it first (knnlm-vdb domains drop)")
                aliases = _supports_aliases(client)
                physical = collection_name(domain) if aliases else alias
                if aliases and client.has_collection(physical):
                    if exist_ok:  # another creator between its two steps, or an interrupted create: adopt it
                        return cls._adopt(client, uri, domain, physical, reopen)
                    raise KnnlmError(f"collection {physical} exists without its alias {alias} (an interrupted "
                                     f"create?); remove it with `knnlm-vdb domains drop {domain}`")
                meta = {"format_version": FORMAT_VERSION, "domain": domain, "info": info.to_dict(),
                        "index": index.to_dict()}
                token = uuid.uuid4().hex
                try:
                    try:
                        with quiet_pymilvus() if exist_ok else _nothing():
                            cls._create_collection(client, physical, info.dim, index, consistency, meta,
                                                   deployment=deployment, create_token=token)
                    except Exception:
                        # Milvus Lite fails a concurrent create before the winner's collection is listed
                        if exist_ok and _appears(lambda: client.has_collection(physical), 5.0) and \
                                _create_token(client, physical) != token:
                            lost = True  # someone else's collection: the race was lost
                        else:
                            raise
                    else:
                        lost = _create_token(client, physical) != token
                    if lost:
                        log.info("domain %s was created concurrently by another process; opening it", domain)
                        return cls._adopt(client, uri, domain, physical, reopen)
                    if aliases:
                        try:
                            with quiet_pymilvus():
                                client.create_alias(physical, alias)
                        except Exception:
                            if not _alias_target(client, alias) == physical:  # an adopter may have made it
                                raise
                except BaseException:  # e.g. the server has no such index: leave nothing half-made behind
                    if (client.has_collection(physical) and _create_token(client, physical) == token
                            and _alias_target(client, alias) != physical):
                        client.drop_collection(physical)
                    raise
            log.info("created Milvus domain %s (collection %s, %s) at %s", domain, physical, index.index_type,
                     redact_uri(uri))
            return cls(client, uri, domain, alias, meta, index, consistency)
        except BaseException:
            client.close()
            raise

    @classmethod
    def open_or_create(cls, uri: str, domain: str, info: StoreInfo, **options) -> "MilvusDatastore":
        """Open ``domain``, creating it with ``options`` if it does not exist (race-safe, see ``create``).

        For an existing domain only the connection options, ``consistency`` and ``k`` apply; its
        stored index stays as it is.
        """
        reopen = {k: v for k, v in options.items() if k in _CONN_OPTIONS or k in ("consistency", "k")}
        if deployment_of(uri) == "server" or os.path.exists(uri):
            try:
                return cls.open(uri, domain, **reopen)
            except NoSuchDomain:
                pass
        return cls.create(uri, domain, info, exist_ok=True, **options)

    @classmethod
    def _open_instead(cls, client, uri: str, domain: str, reopen: dict) -> "MilvusDatastore":
        client.close()
        return cls.open(uri, domain, **reopen)

    @classmethod
    def _adopt(cls, client, uri: str, domain: str, physical: str, reopen: dict) -> "MilvusDatastore":
        """Open a domain whose collection exists: wait for its alias, and make it if none comes."""
        import time

        alias = alias_name(domain)
        deadline = time.monotonic() + ALIAS_WAIT_S
        while time.monotonic() < deadline:
            if client.has_collection(alias):
                return cls._open_instead(client, uri, domain, reopen)
            time.sleep(0.2)
        _, meta = _read_meta(client, physical)
        if meta.get("domain") != domain:
            raise KnnlmError(f"collection {physical} exists but does not hold domain {domain!r}; "
                             f"remove it, or use another domain name")
        log.warning("collection %s had no alias %s after %.0fs (an interrupted create); adding it",
                    physical, alias, ALIAS_WAIT_S)
        try:
            with quiet_pymilvus():
                client.create_alias(physical, alias)
        except Exception:
            if _alias_target(client, alias) is None:
                raise
        return cls._open_instead(client, uri, domain, reopen)

    @staticmethod
    def _create_collection(client, name: str, dim: int, index: IndexConfig, consistency: str, meta: dict,
                           deployment: str = "server", create_token: str | None = None) -> None:
        """A collection of the newest schema: the fields, the vector index and the ``doc_id`` index."""
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("target", DataType.INT32)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=DOC_ID_MAX_BYTES)
        schema.add_field("position", DataType.INT64)
        build = dict(index.build_params)
        if deployment == "lite" and build:
            # pymilvus 3 sends build parameters as flat key-value pairs, which Milvus Lite 3.2 ignores
            # (it reads only a JSON "params" pair, and would use nlist=128, M=16, ...): send both forms
            build["params"] = dict(index.build_params)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="key", index_type=index.index_type, metric_type="L2", params=build)
        properties = {META_PROPERTY: json.dumps(meta, sort_keys=True)}
        if create_token:
            properties[CREATE_TOKEN_PROPERTY] = create_token
        with quiet_pymilvus():  # failures still raise; Lite logs a traceback for each method it lacks
            client.create_collection(name, schema=schema, index_params=index_params, consistency_level=consistency,
                                     properties=properties)
        ensure_doc_id_index(client, name, deployment, strict=False)

    @classmethod
    def open(cls, uri: str, domain: str = "default", **options) -> "MilvusDatastore":
        """Open an existing domain. ``search_params`` and ``consistency`` may override the stored
        ones for this session; ``index_type``/``index_params`` must match what the domain was built with."""
        conn, idx = _split_options(options)
        check_domain(domain)
        consistency = _check_consistency(idx.get("consistency", "Strong"))
        client = _connect(uri, **conn)
        try:
            with _rpc(f"open domain {domain}", uri):
                check_schema_version(client, uri)
                name = alias_name(domain)
                if not client.has_collection(name):
                    known = sorted(_domain_collections(client))
                    raise NoSuchDomain(f"no domain {domain!r} at {redact_uri(uri)} (domains there: "
                                     f"{', '.join(known) or 'none'}); build it first")
                desc, meta = _read_meta(client, name)
                if not meta:
                    raise KnnlmError(f"Milvus collection {desc.get('collection_name', name)} was not created by "
                                     f"knnlm-vdb (no {META_PROPERTY} property)")
                if meta.get("format_version", 0) > FORMAT_VERSION:
                    raise KnnlmError(f"domain {domain!r} has format {meta['format_version']}, newer than this "
                                     f"knnlm-vdb understands ({FORMAT_VERSION}); upgrade knnlm-vdb")
                stored = meta["index"]
                if "index_type" in idx and idx["index_type"].upper() != stored["type"]:
                    raise KnnlmError(f"domain {domain!r} is indexed with {stored['type']}, not "
                                     f"{idx['index_type']}; reindex it to change the index type")
                if "index_params" in idx and {**stored["build_params"], **idx["index_params"]} != stored["build_params"]:
                    raise KnnlmError(f"domain {domain!r} was built with index parameters {stored['build_params']}; "
                                     f"reindex it to change them")
                search = idx.get("search_params", stored.get("search_params") or {})
                index = validate_index(stored["type"], stored["build_params"], search, k=idx.get("k"),
                                       deployment=deployment_of(uri), dim=meta["info"]["dim"])
                state = client.get_load_state(name)["state"]
                if getattr(state, "name", str(state)) != "Loaded":
                    log.info("loading Milvus collection %s into memory", name)
                    client.load_collection(name)
            return cls(client, uri, domain, name, meta, index, consistency)
        except BaseException:
            client.close()
            raise

    # ---- writing ----------------------------------------------------------------------------
    def _physical(self) -> str:
        """The collection the alias points at now (re-read: a reindex may have swapped it)."""
        return self.client.describe_collection(self.name)["collection_name"]

    def _existing(self, ids: np.ndarray) -> set[int]:
        found: set[int] = set()
        for i in range(0, len(ids), ID_CHECK_BATCH):
            chunk = ids[i:i + ID_CHECK_BATCH].tolist()
            rows = self.client.query(self.name, filter=f"id in {chunk}", output_fields=["id"],
                                     consistency_level="Strong")
            found.update(int(r["id"]) for r in rows)
        return found

    def add(self, ids, keys, values, doc_ids=None, positions=None) -> int:
        """Store rows whose ids are not there yet; return how many were new.

        Rows are upserted, so two writers racing on the same ids still leave one row each.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        keys = np.asarray(keys, dtype=np.float32)
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        n = len(ids)
        if keys.ndim != 2 or keys.shape[1] != self.info.dim:
            raise KnnlmError(f"keys have shape {keys.shape}, datastore dimension is {self.info.dim}")
        positions = np.full(n, -1, np.int64) if positions is None else np.asarray(positions, np.int64).reshape(-1)
        doc_ids = [""] * n if doc_ids is None else list(doc_ids)
        if not (len(keys) == len(values) == len(positions) == len(doc_ids) == n):
            raise KnnlmError(f"add() got {n} ids, {len(keys)} keys, {len(values)} values, "
                             f"{len(positions)} positions and {len(doc_ids)} document ids")
        if n == 0:
            return 0
        too_long = next((d for d in doc_ids if len(str(d).encode()) > DOC_ID_MAX_BYTES), None)
        if too_long is not None:
            raise KnnlmError(f"document id {str(too_long)[:40]!r}... is longer than {DOC_ID_MAX_BYTES} bytes")
        _, first = np.unique(ids, return_index=True)  # a duplicate inside one batch counts once
        first.sort()
        with _rpc(f"add to {self.name}", self.uri):
            existing = self._existing(ids[first])
            new = np.array([i for i in first if int(ids[i]) not in existing], dtype=np.int64)
            if len(new) == 0:
                return 0
            row_bytes = 4 * self.info.dim + 64 + max(len(str(d)) for d in doc_ids)
            batch = max(1, INSERT_BATCH_BYTES // row_bytes)
            for s in range(0, len(new), batch):
                sel = new[s:s + batch]
                rows = [{"id": i, "key": k, "target": v, "doc_id": str(doc_ids[j]), "position": p}
                        for j, i, k, v, p in zip(sel.tolist(), ids[sel].tolist(), keys[sel], values[sel].tolist(),
                                                 positions[sel].tolist())]
                self.client.upsert(self.name, rows)
        self._dirty = True
        self._count_hint += len(new)
        self._rows_added_here += len(new)
        return int(len(new))

    def delete_ids(self, ids) -> int:
        """Remove entries by id (``append --replace``); return how many were stored."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        with _rpc(f"delete from {self.name}", self.uri):
            doomed = sorted(self._existing(ids))
            for i in range(0, len(doomed), ID_CHECK_BATCH):
                self.client.delete(self.name, ids=doomed[i:i + ID_CHECK_BATCH])
        if doomed:
            self._dirty = True
            self._count_hint = max(0, self._count_hint - len(doomed))
        return len(doomed)

    def flush(self) -> None:
        """Make the rows added so far durable: Lite persists its WAL; a server already has (see module doc)."""
        if self._dirty and self.deployment == "lite":
            self.seal()

    def seal(self) -> None:
        """Seal the growing segments so Milvus indexes them (a no-op when nothing was added)."""
        if not self._dirty:
            return
        with _rpc(f"flush {self.name}", self.uri):
            self.client.flush(self._physical())
        self._dirty = False

    def ledger(self) -> "MilvusLedger":
        return MilvusLedger(self.client, self.uri, self.domain)

    def wait_for_index(self, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict:
        """Block until the server has indexed every flushed row (benchmarks: time searches on the index)."""
        import time

        start = time.monotonic()
        last_log = start
        with _rpc(f"describe index of {self.name}", self.uri):
            physical = self._physical()
            while True:
                state = self.client.describe_index(physical, "key")
                now = time.monotonic()
                # A 2.3 server keeps reporting pending_index_rows after the build finished, so
                # indexed_rows reaching total_rows counts as done too.
                indexed, total = state.get("indexed_rows"), state.get("total_rows")
                done = not state.get("pending_index_rows") or (total and indexed is not None and indexed >= total)
                if done or now - start > timeout_s:
                    return state
                if now - last_log >= 30:
                    log.info("%s: index %s, %s of %s rows indexed (%.0f s)", self.name, state.get("state"),
                             indexed, total, now - start)
                    last_log = now
                time.sleep(poll_s)

    def set_extra(self, key: str, value) -> None:
        try:
            json.dumps(value)
        except TypeError:
            raise KnnlmError(f"setting {key!r} is not JSON-serialisable: {value!r}") from None
        self.meta["info"].setdefault("extra", {})[key] = value
        with _rpc(f"set {key} on {self.name}", self.uri):
            self.client.alter_collection_properties(
                self._physical(), properties={META_PROPERTY: json.dumps(self.meta, sort_keys=True)})
        self.info.extra[key] = value

    # ---- reading ----------------------------------------------------------------------------
    def count(self) -> int:
        """Rows a reader sees now: ``count(*)`` at Strong consistency (statistics lag until a flush)."""
        with _rpc(f"count {self.name}", self.uri):
            res = self.client.query(self.name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"])

    def queries_per_call(self, k: int) -> int:
        """Queries per search RPC: request and result under the RPC budget, Lite's scratch bounded."""
        nq = min(MAX_NQ, RPC_BUDGET_BYTES // (k * BYTES_PER_HIT), RPC_BUDGET_BYTES // (4 * self.info.dim))
        # Lite brute-forces FLAT collections and not-yet-indexed (growing) rows with an
        # nq × rows × dim scratch buffer. An indexed collection this process has not written to
        # has no growing rows (writers seal on close), so only the RPC budget applies; capping it
        # anyway made HNSW search ~0.35 s per 2 queries on a 408k-row domain instead of ~1.5 s per 256.
        if self.deployment == "lite" and (self.index.index_type == "FLAT" or self._rows_added_here):
            row_bytes = 4 * self.info.dim
            per_query = min(self._count_hint * row_bytes, max(LITE_MEMTABLE_BYTES, LITE_SEGMENT_ROWS * row_bytes))
            nq = min(nq, LITE_SCRATCH_BYTES // max(1, per_query))
        return max(1, nq)

    def _search(self, queries: np.ndarray, k: int, what: str) -> tuple[list, list]:
        """Ragged per-query distances and ``what`` ("target" values or "id"s), in RPC-sized batches."""
        request = self.index.search_request(k, self.deployment)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise KnnlmError(f"queries have shape {queries.shape}, datastore dimension is {self.info.dim}")
        dists: list = []
        found: list = []
        step = self.queries_per_call(k)
        with _rpc(f"search {self.name}", self.uri):
            for i in range(0, len(queries), step):
                res = self.client.search(self.name, data=queries[i:i + step], limit=k, anns_field="key",
                                         search_params=request, output_fields=["target"] if what == "target" else [],
                                         consistency_level=self.consistency)
                for hits in res:
                    dists.append(hits.distances)
                    found.append([h["entity"]["target"] for h in hits] if what == "target" else hits.ids)
        return dists, found

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_results(*self._search(queries, k, "target"), k)

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` but with the neighbours' entry ids (int64, -1 when unfilled): for recall checks."""
        dists, ids = self._search(queries, k, "id")
        d, _ = pad_results(dists, [[0] * len(x) for x in ids], k)
        out = np.full((len(ids), k), -1, dtype=np.int64)
        for i, row in enumerate(ids):
            out[i, :min(len(row), k)] = row[:k]
        return d, out

    def describe(self) -> dict:
        with _rpc(f"describe {self.name}", self.uri):
            physical = self._physical()
            try:
                state = self.client.describe_index(physical, "key")
                index_state = {k: state[k] for k in ("total_rows", "indexed_rows", "pending_index_rows", "state")
                               if k in state}
            except Exception as exc:  # informative only; never fail describe over it
                index_state = {"error": str(exc)}
        return {
            "backend": "milvus",
            "uri": redact_uri(self.uri),
            "deployment": self.deployment,
            "domain": self.domain,
            "collection": physical,
            "alias": self.name if physical != self.name else None,
            "count": self.count(),
            "dim": self.info.dim,
            "model": self.info.model,
            "key_type": self.info.key_type,
            "tokenizer": self.info.tokenizer,
            "vocab_size": self.info.vocab_size,
            "index": {**self.index.to_dict(), **index_state},
            "consistency": self.consistency,
            "extra": dict(self.info.extra),
        }

    def close(self) -> None:
        if self.client is None:
            return
        try:
            self.seal()
        finally:
            self.client.close()
            self.client = None


def _ledger_row_id(doc_id: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{doc_id}\x00{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


class MilvusLedger(Ledger):
    """Committed chunks of one domain, a row each in ``knnlm_<domain>__ledger``.

    Milvus needs a vector field in every collection; ``v`` is a constant 2-d placeholder.
    """

    _FIELDS = ["doc_id", "chunk", "content_hash", "n_tokens"]

    def __init__(self, client, uri: str, domain: str):
        self.client, self.uri, self.name = client, uri, ledger_name(domain)
        self.domain = domain
        self._docs: dict[str, DocRecord] | None = None
        self._row_ids: dict[str, set[int]] = {}  # every ledger row of a document, whatever its hash
        self._ready = False  # the ledger collection exists and is loaded

    def documents(self) -> dict[str, DocRecord]:
        if self._docs is not None:
            return self._docs
        groups: dict[str, dict[tuple[str, int], set[int]]] = {}
        with _rpc(f"read ledger {self.name}", self.uri):
            rows = []
            if self.client.has_collection(self.name):
                ensure_loaded(self.client, self.name)
                rows = self.client.query(self.name, filter="chunk >= 0", output_fields=self._FIELDS,
                                         consistency_level="Strong")
        for r in rows:
            groups.setdefault(r["doc_id"], {}).setdefault((r["content_hash"], int(r["n_tokens"])), set()).add(
                int(r["chunk"]))
        self._docs = {}
        for doc_id, versions in groups.items():
            (content_hash, n_tokens), chunks = max(versions.items(), key=lambda kv: len(kv[1]))
            self._docs[doc_id] = DocRecord(content_hash, n_tokens, set(chunks))
            self._row_ids[doc_id] = {_ledger_row_id(doc_id, c) for cs in versions.values() for c in cs}
        return self._docs

    def _ensure_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        if self._ready:
            return
        if self.client.has_collection(self.name):
            ensure_loaded(self.client, self.name)
            self._ready = True
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=DOC_ID_MAX_BYTES)
        schema.add_field("chunk", DataType.INT64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=128)
        schema.add_field("n_tokens", DataType.INT64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
        index_params = self.client.prepare_index_params()
        index_params.add_index(field_name="v", index_type="FLAT", metric_type="L2")
        try:
            with quiet_pymilvus():
                self.client.create_collection(self.name, schema=schema, index_params=index_params,
                                              consistency_level="Strong", properties={"knnlm.ledger_of": self.domain})
        except Exception:
            if not self.client.has_collection(self.name):
                raise
            ensure_loaded(self.client, self.name)  # a parallel shard created it first
        self._ready = True

    def commit_chunk(self, doc_id, chunk, content_hash, n_tokens) -> None:
        docs = self.documents()
        rec = docs.get(doc_id)
        with _rpc(f"write ledger {self.name}", self.uri):
            self._ensure_collection()
            if rec is None or rec.content_hash != content_hash:
                self._delete_rows(doc_id)  # a changed document starts a fresh record
                rec = docs[doc_id] = DocRecord(content_hash, int(n_tokens))
            row_id = _ledger_row_id(doc_id, int(chunk))
            self.client.upsert(self.name, [{"id": row_id, "doc_id": doc_id, "chunk": int(chunk),
                                            "content_hash": content_hash, "n_tokens": int(n_tokens),
                                            "v": [0.0, 0.0]}])
        rec.chunks.add(int(chunk))
        self._row_ids.setdefault(doc_id, set()).add(row_id)

    def _delete_rows(self, doc_id: str) -> None:
        ids = sorted(self._row_ids.pop(doc_id, set()))
        if ids:
            self.client.delete(self.name, ids=ids)

    def forget(self, doc_id: str) -> None:
        if self.documents().pop(doc_id, None) is not None:
            with _rpc(f"write ledger {self.name}", self.uri):
                self._delete_rows(doc_id)
