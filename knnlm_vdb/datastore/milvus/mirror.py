"""A Milvus Lite domain's rows copied into an in-process FAISS index, for fast reads (``mirror=True``).

Why: milvus-lite 3.x runs its engine in Python inside this process, and each search call walks
every row of the collection in interpreted code (primary-key dedup and delete masks) before it
consults the index: about 95 ms a call at 68k rows on our 2-core CPU whatever the index type,
which is longer than one decoding step of the default model. The mirror answers the same query
from memory in milliseconds.

Lite locks its database to one process, so every write to it passes through this process:
``note_write`` (called by ``MilvusDatastore.add``/``delete_ids``, reindex and drop) bumps a
counter per (database, domain), and a mirror whose copy is older re-reads the domain before its
next search. Searches are therefore as fresh as Lite's own Strong reads, at no cost per call.
The copy is exact (``IndexFlatL2`` over the stored, possibly projected, keys): where the domain's
own index is approximate (HNSW, IVF) the mirror may return closer neighbours than Lite would.
The copy costs one full read of the domain (about 26 s for 68k rows of 576-d keys) and
4 bytes per stored dimension per row of memory, so it pays off in long-lived readers (the
service, the Python API, benchmarks), not in a one-shot command.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from knnlm_vdb.datastore.base import take_rows
from knnlm_vdb.datastore.milvus.connection import quiet_pymilvus

log = logging.getLogger(__name__)

EXPORT_BATCH = 4096  # rows per query_iterator page
_LOCK = threading.Lock()
_WRITES: dict[tuple[str, str], int] = {}


def domain_key(uri: str, domain: str) -> tuple[str, str]:
    """What the write counter is kept under (one path per Lite database, however it was spelled)."""
    return os.path.realpath(uri), domain


def note_write(uri: str, domain: str) -> None:
    """Rows of ``domain`` at ``uri`` changed (or its collection did): mirrors of it are stale."""
    key = domain_key(uri, domain)
    with _LOCK:
        _WRITES[key] = _WRITES.get(key, 0) + 1


def write_count(key: tuple[str, str]) -> int:
    """Writes noted so far for a ``domain_key`` (a dict read per search: no path resolution there)."""
    with _LOCK:
        return _WRITES.get(key, 0)


class Copy:
    """One read of a domain: its rows (id, target, doc_id, position) and a flat index on their stored
    keys. Never changed once made, so a search racing a re-read uses one consistent copy."""

    def __init__(self, index, ids, targets, doc_ids, positions, version: int):
        self.index, self.ids, self.targets, self.doc_ids = index, ids, targets, doc_ids
        self.positions, self.version = positions, version

    def _rows(self, stored_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(stored_queries, dtype=np.float32), k)

    def search(self, stored_queries: np.ndarray, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """``[n, k]`` distances and ``what`` ("target" values, int32, or entry "id"s, int64), as
        ``MilvusDatastore._search`` answers."""
        d, rows = self._rows(stored_queries, k)
        if what == "target":
            return take_rows(d, rows, self.targets)
        return take_rows(d, rows, self.ids, np.int64)

    def entries(self, stored_queries: np.ndarray, n: int, domain: str) -> list[list[dict]]:
        d, rows = self._rows(stored_queries, max(n, 1))
        return [[{"domain": domain, "doc_id": self.doc_ids[r], "position": int(self.positions[r]),
                  "distance": float(dist), "target": int(self.targets[r])}
                 for dist, r in zip(di[:n], ri[:n]) if r >= 0] for di, ri in zip(d, rows)]


class LiteMirror:
    """The current ``Copy`` of one Lite domain, re-read when this process has written to the domain."""

    def __init__(self, client, uri: str, domain: str, name: str, dim: int):
        self.client, self.domain, self.name, self.dim = client, domain, name, dim
        self.key = domain_key(uri, domain)
        self.copy: Copy | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        """``write_count()`` when the current copy was read; -1: never read."""
        return -1 if self.copy is None else self.copy.version

    def current(self) -> Copy:
        """The copy to search, re-read first when the domain was written since the last read."""
        with self._lock:
            if self.copy is None or self.copy.version != write_count(self.key):
                self.copy = self._read()
            return self.copy

    def _read(self) -> Copy:
        import faiss

        version = write_count(self.key)  # before the read: a write during it re-reads next time
        t0 = time.perf_counter()
        keys, ids, targets, docs, positions = [], [], [], [], []
        with quiet_pymilvus():  # Lite's iterator asks for a timestamp it does not serve, and logs it
            it = self.client.query_iterator(self.name, batch_size=EXPORT_BATCH, filter="",
                                            output_fields=["id", "key", "target", "doc_id", "position"],
                                            consistency_level="Strong")
        try:
            while True:
                page = it.next()
                if not page:
                    break
                keys.append(np.asarray([r["key"] for r in page], dtype=np.float32).reshape(-1, self.dim))
                ids.extend(r["id"] for r in page)
                targets.extend(r["target"] for r in page)
                docs.extend(r["doc_id"] for r in page)
                positions.extend(r["position"] for r in page)
        finally:
            it.close()
        index = faiss.IndexFlatL2(self.dim)
        if keys:
            index.add(np.ascontiguousarray(np.concatenate(keys)))
        log.info("mirrored %d rows of domain %s in %.1f s", len(ids), self.domain, time.perf_counter() - t0)
        return Copy(index, np.asarray(ids, np.int64), np.asarray(targets, np.int64), docs,
                    np.asarray(positions, np.int64), version)
