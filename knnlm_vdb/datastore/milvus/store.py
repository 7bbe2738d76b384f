"""Milvus datastore: the keys of one domain in one collection, in Milvus Lite (a local ``.db``
path) or a Milvus server; ``mirror.py`` holds Lite's optional in-process copy for reads.

Durability: a Milvus server has logged a row durably (its write-ahead log) when the insert
returns, and Strong reads see it at once; a server flush only seals segments (seconds each,
and many small segments), so ``flush()`` seals nothing on a server and ``seal()``/``close()``
seal once so the index gets built. Milvus Lite writes rows to a WAL that is not fsynced, so
there ``flush()`` persists them (about 0.2 s).

Behaviour observed with pymilvus 3.0.2, Milvus Lite 3.2.2 and a Milvus 2.3.5 standalone server:
the server reports 0 rows in collection statistics until a flush, so ``count()`` uses
``count(*)``. Lite's search walks every row in Python per call (~1.3 µs a row, whatever the index).
"""
from __future__ import annotations

import json
import logging

import numpy as np

from knnlm_vdb.datastore.base import Datastore, StoreInfo, pad_results
from knnlm_vdb.datastore.milvus.catalog import NoSuchDomain, count_rows, meta_damage, no_such_domain, read_meta
from knnlm_vdb.datastore.milvus.connection import (connect, creation_lock, deployment_of, ensure_loaded,
                                                   is_lite_database, redact_uri, rpc, wait_for_index)
from knnlm_vdb.datastore.milvus.create import ALIAS_WAIT_S, create_domain
from knnlm_vdb.datastore.milvus.index import MAX_NQ, IndexConfig, check_consistency, validate_index
from knnlm_vdb.datastore.milvus.ledger import MilvusLedger
from knnlm_vdb.datastore.milvus.mirror import LiteMirror, note_write
from knnlm_vdb.datastore.milvus.naming import (DOC_ID_MAX_BYTES, FORMAT_VERSION, META_PROPERTY, alias_name,
                                               check_domain, row_bytes)
from knnlm_vdb.datastore.milvus.options import REOPEN_OPTIONS, split_options
from knnlm_vdb.datastore.milvus.versions import check_schema_version
from knnlm_vdb.errors import Incompatible, InvalidInput, KnnlmError
from knnlm_vdb.projection import Projection, check_project_dim, stored_dim

log = logging.getLogger(__name__)

RPC_BUDGET_BYTES = 32 << 20  # one gRPC message carries at most 64 MB; stay at half of it
BYTES_PER_HIT = 32  # id (<=10 B varint) + score (4 B) + target (<=5 B) + framing, rounded up
INSERT_BATCH_BYTES = 16 << 20
ID_CHECK_BATCH = 4096  # ids per "id in [...]" query when looking for rows already stored
# Milvus Lite brute-forces each FLAT or not yet indexed source (memtable: 128 MiB by default; segment:
# 100k rows at most) with an [nq, rows, dim] float32 temporary, so we bound nq by that.
LITE_SCRATCH_BYTES = 512 << 20
LITE_MEMTABLE_BYTES = 128 << 20
LITE_SEGMENT_ROWS = 100_000

class MilvusDatastore(Datastore):
    """Keys of one domain in a Milvus collection, searched by squared L2 with the configured index."""

    def __init__(self, client, uri: str, domain: str, name: str, meta: dict, index: IndexConfig,
                 consistency: str = "Strong", rpc_budget_bytes: int = RPC_BUDGET_BYTES,
                 insert_batch_bytes: int = INSERT_BATCH_BYTES, alias_wait_s: float = ALIAS_WAIT_S,
                 mirror: bool = False):
        self.client = client
        self.uri = uri
        self._domain = domain
        self.name = name  # alias (or the collection itself): what every request names
        self.meta = meta
        self.info = StoreInfo.from_dict(meta["info"])
        self.projection = Projection.from_dict(meta["projection"]) if meta.get("projection") else None
        self.dim = stored_dim(meta)  # of the stored keys: the projection's output when there is one
        self.index = index
        self.consistency = consistency
        self.deployment = deployment_of(uri)
        self.rpc_budget_bytes = int(rpc_budget_bytes)
        self.insert_batch_bytes = int(insert_batch_bytes)
        self.alias_wait_s = float(alias_wait_s)
        self._dirty = False
        self._count_hint = self.count()
        self._rows_added_here = 0
        if mirror and self.deployment != "lite":
            raise InvalidInput(f"mirror is for Milvus Lite databases; {redact_uri(uri)} is a server, whose "
                               "search is native already")
        # reads through an in-process copy (see mirror.py): Lite's search costs ~1.3 µs per row per call
        self.mirror = LiteMirror(client, uri, domain, name, self.dim) if mirror else None

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def location(self) -> str:
        return f"domain {self._domain} at {redact_uri(self.uri)}"

    # ---- creation / opening -------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, domain: str, info: StoreInfo, exist_ok: bool = False, **options) -> "MilvusDatastore":
        """Create the collection (and alias) for a new domain.

        Options: ``index_type`` (FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ, HNSW, GPU_*; default FLAT),
        ``index_params`` (build), ``search_params`` (ef, nprobe, ...), ``consistency``
        (default Strong), ``k`` (the neighbours searches will ask for, to check ef/itopk/limits
        now rather than at the first search), connection options ``token``, ``timeout``
        (seconds to connect, default 10), ``db_name``, ``projection`` (a fitted ``Projection``:
        the collection stores projected keys) and ``TRANSFER_OPTIONS``. Everything is
        validated before the server is contacted.

        ``exist_ok``: a domain that exists, or that another process creates at the same moment,
        is opened instead (its own index settings win); see ``create.create_domain``.
        """
        conn, idx, transfer = split_options(options)
        check_domain(domain)
        consistency = check_consistency(idx.get("consistency", "Strong"))
        deployment = deployment_of(uri)
        meta = {"format_version": FORMAT_VERSION, "domain": domain, "info": info.to_dict()}
        projection = idx.get("projection")
        if projection is not None:
            check_project_dim(projection.dim_out, info.dim)
            if projection.dim_in != info.dim:
                raise InvalidInput(f"the projection maps from dimension {projection.dim_in}, keys have {info.dim}")
            meta["projection"] = projection.to_dict()
        index = validate_index(idx.get("index_type", "FLAT"), idx.get("index_params"), idx.get("search_params"),
                               k=idx.get("k"), deployment=deployment, dim=stored_dim(meta))
        reopen = {k: v for k, v in options.items() if k in REOPEN_OPTIONS}
        meta["index"] = index.to_dict()
        client = connect(uri, must_exist=False, **conn)
        try:
            with creation_lock(uri), rpc(f"create domain {domain}", uri):
                check_schema_version(client, uri)
                created = create_domain(client, uri, domain, meta, index, consistency, deployment, exist_ok=exist_ok,
                                        alias_wait_s=transfer.get("alias_wait_s", ALIAS_WAIT_S))
        except BaseException:
            client.close()
            raise
        if not created:
            client.close()
            return cls.open(uri, domain, **reopen)
        return cls(client, uri, domain, alias_name(domain), meta, index, consistency, **transfer)

    @classmethod
    def open_or_create(cls, uri: str, domain: str, info: StoreInfo, **options) -> "MilvusDatastore":
        """Open ``domain``, creating it with ``options`` if it does not exist (race-safe, see ``create``).

        For an existing domain only the connection options, ``consistency`` and ``k`` apply; its
        stored index stays as it is.
        """
        reopen = {k: v for k, v in options.items() if k in REOPEN_OPTIONS}
        if deployment_of(uri) == "server" or is_lite_database(uri):
            try:
                return cls.open(uri, domain, **reopen)
            except NoSuchDomain:
                pass
        return cls.create(uri, domain, info, exist_ok=True, **options)

    @classmethod
    def open(cls, uri: str, domain: str = "default", **options) -> "MilvusDatastore":
        """Open an existing domain. ``search_params`` and ``consistency`` may override the stored
        ones for this session; ``index_type``/``index_params`` must match what the domain was built with."""
        conn, idx, transfer = split_options(options)
        check_domain(domain)
        consistency = check_consistency(idx.get("consistency", "Strong"))
        client = connect(uri, **conn)
        try:
            with rpc(f"open domain {domain}", uri):
                check_schema_version(client, uri)
                name = alias_name(domain)
                if not client.has_collection(name):
                    raise no_such_domain(client, uri, domain, "; build it first")
                desc, meta = read_meta(client, name)
                if not meta:
                    raise Incompatible(f"Milvus collection {desc.get('collection_name', name)} was not created by "
                                     f"knnlm-vdb (no {META_PROPERTY} property)")
                damage = meta_damage(meta)
                if damage:
                    raise Incompatible(f"domain {domain!r} is damaged: its {META_PROPERTY} property lacks "
                                       f"{', '.join(damage)}; see `knnlm-vdb check --uri {redact_uri(uri)} --domain "
                                       f"{domain}`; rebuild the domain or restore it from a backup")
                if meta.get("format_version", 0) > FORMAT_VERSION:
                    raise Incompatible(f"domain {domain!r} has format {meta['format_version']}, newer than this "
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
                                       deployment=deployment_of(uri), dim=stored_dim(meta))
                ensure_loaded(client, name)
            return cls(client, uri, domain, name, meta, index, consistency, **transfer)
        except BaseException:
            client.close()
            raise

    # ---- writing ----------------------------------------------------------------------------
    def to_stored(self, vectors) -> np.ndarray:
        """Model-space keys or queries -> the stored space (projected when the domain has a projection)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.info.dim:
            raise KnnlmError(f"vectors have shape {vectors.shape}, datastore dimension is {self.info.dim}")
        return self.projection.apply(vectors) if self.projection is not None else np.ascontiguousarray(vectors)

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
        keys = self.to_stored(keys)
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        n = len(ids)
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
        with rpc(f"add to {self.name}", self.uri):
            existing = self._existing(ids[first])
            new = np.array([i for i in first if int(ids[i]) not in existing], dtype=np.int64)
            if len(new) == 0:
                return 0
            per_row = row_bytes(self.dim, max(len(str(d)) for d in doc_ids))
            batch = max(1, self.insert_batch_bytes // per_row)
            for s in range(0, len(new), batch):
                sel = new[s:s + batch]
                rows = [{"id": i, "key": k, "target": v, "doc_id": str(doc_ids[j]), "position": p}
                        for j, i, k, v, p in zip(sel.tolist(), ids[sel].tolist(), keys[sel], values[sel].tolist(),
                                                 positions[sel].tolist())]
                self.client.upsert(self.name, rows)
        note_write(self.uri, self._domain)
        self._dirty = True
        self._count_hint += len(new)
        self._rows_added_here += len(new)
        return int(len(new))

    def delete_ids(self, ids) -> int:
        """Remove entries by id (``append --replace``); return how many were stored."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        with rpc(f"delete from {self.name}", self.uri):
            doomed = sorted(self._existing(ids))
            for i in range(0, len(doomed), ID_CHECK_BATCH):
                self.client.delete(self.name, ids=doomed[i:i + ID_CHECK_BATCH])
        if doomed:
            note_write(self.uri, self._domain)
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
        with rpc(f"flush {self.name}", self.uri):
            self.client.flush(self._physical())
        self._dirty = False

    def finalize(self) -> None:
        """Seal what was added so Milvus builds the index over it (``close`` does it too)."""
        self.seal()

    def ledger(self) -> MilvusLedger:
        return MilvusLedger(self.client, self.uri, self.domain)

    def wait_for_index(self, timeout_s: float = 3600.0, poll_s: float = 2.0) -> dict:
        """Block until the server has indexed every flushed row (benchmarks: time searches on the index)."""
        with rpc(f"describe index of {self.name}", self.uri):
            return wait_for_index(self.client, self._physical(), timeout_s, poll_s)

    def set_extra(self, key: str, value) -> None:
        try:
            json.dumps(value)
        except TypeError:
            raise KnnlmError(f"setting {key!r} is not JSON-serialisable: {value!r}") from None
        self.meta["info"].setdefault("extra", {})[key] = value
        with rpc(f"set {key} on {self.name}", self.uri):
            self.client.alter_collection_properties(
                self._physical(), properties={META_PROPERTY: json.dumps(self.meta, sort_keys=True)})
        self.info.extra[key] = value

    # ---- reading ----------------------------------------------------------------------------
    def count(self) -> int:
        """Rows a reader sees now: ``count(*)`` at Strong consistency (statistics lag until a flush)."""
        with rpc(f"count {self.name}", self.uri):
            return count_rows(self.client, self.name)

    def queries_per_call(self, k: int) -> int:
        """Queries per search RPC: request and result under the RPC budget, Lite's scratch bounded."""
        budget = self.rpc_budget_bytes
        nq = min(MAX_NQ, budget // (k * BYTES_PER_HIT), budget // (4 * self.dim))
        # Only FLAT and growing rows (written by this process; writers seal on close) use the scratch:
        # capping an indexed domain anyway made 408k-row HNSW search ~0.35 s per 2 queries, not 1.5 s per 256.
        if self.deployment == "lite" and (self.index.index_type == "FLAT" or self._rows_added_here):
            row_bytes = 4 * self.dim
            per_query = min(self._count_hint * row_bytes, max(LITE_MEMTABLE_BYTES, LITE_SEGMENT_ROWS * row_bytes))
            nq = min(nq, LITE_SCRATCH_BYTES // max(1, per_query))
        return max(1, nq)

    def _results(self, stored: np.ndarray, k: int, fields: list[str]):
        """Milvus' hits for each (stored-space) query, searched in RPC-sized batches."""
        request = self.index.search_request(max(k, 1), self.deployment)
        step = self.queries_per_call(k)
        with rpc(f"search {self.name}", self.uri):
            for i in range(0, len(stored), step):
                yield from self.client.search(self.name, data=stored[i:i + step], limit=k, anns_field="key",
                                              search_params=request, output_fields=fields,
                                              consistency_level=self.consistency)

    def _search(self, queries: np.ndarray, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """``[n, k]`` stored-space distances (``inf`` where unfilled) and ``what``: "target" values
        (int32) or entry "id"s (int64), -1 where unfilled."""
        queries = self.to_stored(queries)
        if self.mirror is not None:
            with rpc(f"mirror {self.name}", self.uri):
                return self.mirror.current().search(queries, k, what)
        dists: list = []
        found: list = []
        for hits in self._results(queries, k, ["target"] if what == "target" else []):
            dists.append(hits.distances)
            found.append([h["entity"]["target"] for h in hits] if what == "target" else hits.ids)
        return pad_results(dists, found, k, np.int32 if what == "target" else np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        d, v = self._search(queries, k, "target")
        return (self.projection.scale_distances(d) if self.projection is not None else d), v

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` but with the neighbours' entry ids (int64, -1 when unfilled): for recall checks."""
        return self._search(queries, k, "id")

    def entries(self, queries: np.ndarray, n: int) -> list[list[dict]]:
        """Provenance of each query's ``n`` nearest entries: the stored doc_id and position fields."""
        queries = self.to_stored(queries)
        if self.mirror is not None:
            with rpc(f"mirror {self.name}", self.uri):
                return self.mirror.current().entries(queries, n, self.domain)
        return [[{"domain": self.domain, "doc_id": h["entity"]["doc_id"], "position": int(h["entity"]["position"]),
                  "distance": float(h["distance"]), "target": int(h["entity"]["target"])} for h in hits]
                for hits in self._results(queries, n, ["target", "doc_id", "position"])]

    def describe(self) -> dict:
        with rpc(f"describe {self.name}", self.uri):
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
            "stored_dim": self.dim,
            "projection": self.projection.summary() if self.projection is not None else None,
            "bytes_per_entry": self.index.bytes_per_entry(self.dim),
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
