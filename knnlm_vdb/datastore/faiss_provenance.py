"""Where a FAISS datastore's entries came from: document id and position, for provenance.

Entry ids are hashes of (domain, document, position), so the ledger's documents are hashed once
into an inverse map (cached per committed count); entries stored without a ledger report no
document (``doc_id`` "" and ``position`` -1).
"""
from __future__ import annotations

import numpy as np

from knnlm_vdb.datastore.base import entry_ids

_PLACES: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}


def entry_places(store) -> dict[int, tuple[str, int]]:
    """entry id -> (document id, position) for every document the store's ledger knows."""
    key = (str(store.path), store.count())
    if key not in _PLACES:
        places = {}
        for doc, rec in store.ledger().documents().items():
            positions = np.arange(1, rec.n_tokens, dtype=np.int64)
            for i, p in zip(entry_ids(store.domain, doc, positions).tolist(), positions.tolist()):
                places[i] = (doc, p)
        _PLACES.clear()  # one datastore's map at a time: it holds an entry per stored row
        _PLACES[key] = places
    return _PLACES[key]


def nearest_entries(store, queries: np.ndarray, n: int) -> list[list[dict]]:
    """Each query's ``n`` nearest entries: domain, doc_id, position, distance and target."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if store.count() == 0 or n < 1:
        return [[] for _ in queries]
    dist, rows = store.ranked_rows(queries, min(n, store.count()))  # the order and distances search mixes
    ids, values, where = store.ids(), store.values(), entry_places(store)
    out = []
    for d_row, r_row in zip(dist, rows):
        hits = []
        for d, r in zip(d_row, r_row):
            if r >= 0:
                doc, pos = where.get(int(ids[r]), ("", -1))
                hits.append({"domain": store.domain, "doc_id": doc, "position": pos, "distance": float(d),
                             "target": int(values[r])})
        out.append(hits)
    return out
