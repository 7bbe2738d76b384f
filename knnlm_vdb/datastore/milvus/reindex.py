"""Reindexing a domain without downtime: build a new collection beside the old one, swap the alias.

Readers and writers name a domain's alias, never its collection. Reindex creates
``knnlm_D__v<N+1>`` with the new index, copies every row into it (a query iterator over the old
one), seals it and waits for the index, copies what appends added meanwhile, checks both counts
are equal, moves the alias, copies any rows that landed in the old collection just before the
move, then drops the old collection (or keeps it, marked retired, with ``keep_old``). The ledger
collection is not behind the alias and stays as it is; the metadata (model, tuned settings) moves
with the alias. Deleting rows (``append --replace``) while a reindex runs may leave the deleted
rows in the new collection.

``project_dim`` also compresses the keys: a projection (projection.py) is fitted on the first
``SAMPLE_ROWS`` keys of the old collection in id order (ids hash document and position, so
these are spread over its documents), every copied key is projected, and the new
collection holds ``project_dim``-d keys; queries are projected from then on (the projection
moves with the metadata). Only a domain without a projection can be projected.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

import numpy as np

from knnlm_vdb.datastore.milvus.catalog import count_rows, iterate_rows, no_such_domain, properties, read_meta
from knnlm_vdb.datastore.milvus.connection import (connect, deployment_of, ensure_loaded, index_done, rpc,
                                                   supports_aliases, wait_for_index)
from knnlm_vdb.datastore.milvus.create import create_collection
from knnlm_vdb.datastore.milvus.index import validate_index
from knnlm_vdb.datastore.milvus.mirror import note_write
from knnlm_vdb.datastore.milvus.naming import (META_PROPERTY, RETIRED_PROPERTY, ROW_FIELDS, alias_name, check_domain,
                                               collection_name, generation_pattern, row_bytes)
from knnlm_vdb.datastore.milvus.store import ID_CHECK_BATCH, INSERT_BATCH_BYTES
from knnlm_vdb.datastore.milvus.versions import check_schema_version
from knnlm_vdb.errors import InvalidInput, KnnlmError
from knnlm_vdb.projection import SAMPLE_ROWS, Projection, check_project_dim, stored_dim
from knnlm_vdb.settings import CONSISTENCY_LEVELS

log = logging.getLogger(__name__)


def _ids(client, name: str) -> np.ndarray:
    parts = [np.fromiter((r["id"] for r in rows), np.int64, len(rows)) for rows in iterate_rows(client, name, ["id"], 16384)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _projected(rows: list[dict], projection: Projection | None) -> list[dict]:
    """Rows with their keys projected (unchanged without a projection)."""
    if projection is None or not rows:
        return rows
    keys = projection.apply(np.asarray([r["key"] for r in rows], dtype=np.float32))
    return [{**r, "key": k} for r, k in zip(rows, keys)]


def _fit(client, name: str, dim_out: int, rows: int) -> Projection:
    parts, n = [], 0
    for batch in iterate_rows(client, name, ["id", "key"], 4096):
        parts.append(np.asarray([r["key"] for r in batch], dtype=np.float32))
        n += len(batch)
        if n >= rows:
            break
    return Projection.fit(np.concatenate(parts)[:rows], dim_out)


def _copy_ids(client, src: str, dst: str, ids: np.ndarray, batch: int, projection: Projection | None = None) -> int:
    """Upsert the rows ``ids`` of ``src`` into ``dst``; return how many were found."""
    n = 0
    step = min(batch, ID_CHECK_BATCH)
    for i in range(0, len(ids), step):
        rows = client.query(src, filter=f"id in {ids[i:i + step].tolist()}", output_fields=ROW_FIELDS,
                            consistency_level="Strong")
        if rows:
            client.upsert(dst, _projected(rows, projection))
            n += len(rows)
    return n


def reindex(uri: str, domain: str, index_type: str, index_params: dict | None = None,
            search_params: dict | None = None, keep_old: bool = False, token: str | None = None,
            timeout: float | None = None, db_name: str | None = None, show_progress: bool = False,
            index_timeout_s: float = 3600.0, drop_delay_s: float = 2.0, project_dim: int | None = None,
            sample_rows: int = SAMPLE_ROWS) -> dict:
    """Rebuild ``domain`` with another index into a new collection and swap the alias (module doc)."""
    from tqdm.auto import tqdm

    check_domain(domain)
    deployment = deployment_of(uri)
    client = connect(uri, token, timeout, db_name, must_exist=True)
    t0 = time.perf_counter()
    new = None
    swapped = False
    try:
        with rpc(f"reindex domain {domain}", uri):
            check_schema_version(client, uri)
            alias = alias_name(domain)
            if not supports_aliases(client):
                raise KnnlmError("this Milvus has no collection aliases; reindexing without downtime needs them")
            if not client.has_collection(alias):
                raise no_such_domain(client, uri, domain)
            desc, meta = read_meta(client, alias)
            if not meta:
                raise KnnlmError(f"Milvus collection {desc.get('collection_name')} was not created by knnlm-vdb")
            old = desc["collection_name"]
            ensure_loaded(client, old)  # Lite forgets loads between processes; iterators need it
            dim = stored_dim(meta)  # of the stored keys (a projection's output); they are copied as they are
            projection = None
            if project_dim is not None:
                if meta.get("projection"):
                    raise InvalidInput(f"domain {domain!r} already stores projected keys ({dim}-d); "
                                       f"rebuild it to project them again")
                check_project_dim(project_dim, dim)
                projection = _fit(client, old, project_dim, sample_rows)
                dim = project_dim
            tuned_k = (meta["info"].get("extra") or {}).get("tuned", {}).get("k")
            index = validate_index(index_type, index_params, search_params, deployment=deployment, dim=dim,
                                      k=int(tuned_k) if tuned_k else None)
            pattern = generation_pattern(domain)
            generations = {int(m.group(1)): n for n in client.list_collections() if (m := pattern.fullmatch(n))}
            for n in sorted(generations.values()):
                if n == old:
                    continue
                if RETIRED_PROPERTY not in properties(client, n):
                    log.warning("dropping %s, left behind by an interrupted reindex of %s", n, domain)
                    client.drop_collection(n)
            generation = max(generations) + 1
            new = collection_name(domain, generation)
            consistency = desc.get("consistency_level_name") or "Strong"
            if consistency not in CONSISTENCY_LEVELS:
                consistency = "Strong"
            moved = {"projection": projection.to_dict()} if projection is not None else {}
            new_meta = {**meta, **moved, "index": index.to_dict(), "generation": generation}
            create_collection(client, new, dim, index, consistency, new_meta, deployment=deployment)

            # bulk copy: a consistent snapshot of the old collection
            total = count_rows(client, old)
            batch = int(max(64, min(16384, INSERT_BATCH_BYTES // row_bytes(stored_dim(meta)))))
            bar = tqdm(total=total, unit="row", desc="copy", disable=not show_progress)
            copied = 0
            for rows in iterate_rows(client, old, ROW_FIELDS, batch):
                client.insert(new, _projected(rows, projection))
                copied += len(rows)
                bar.update(len(rows))
            bar.close()
            t_copy = time.perf_counter()
            client.flush(new)
            state = wait_for_index(client, new, index_timeout_s, poll_s=0.5)
            if not index_done(state):
                raise KnnlmError(f"the new index on {new} was not built within {index_timeout_s:.0f}s ({state})")
            t_index = time.perf_counter()

            # catch up with appends (and deletes) that reached the old collection during the copy
            caught_up = 0
            for attempt in range(5):
                old_ids, new_ids = _ids(client, old), _ids(client, new)
                missing = np.setdiff1d(old_ids, new_ids)
                extra = np.setdiff1d(new_ids, old_ids)
                caught_up += _copy_ids(client, old, new, missing, batch, projection)
                for i in range(0, len(extra), ID_CHECK_BATCH):
                    client.delete(new, ids=extra[i:i + ID_CHECK_BATCH].tolist())
                n_old, n_new = count_rows(client, old), count_rows(client, new)
                if n_old == n_new:
                    break
                log.info("reindex %s: %d rows in %s, %d in %s; catching up again", domain, n_old, old, n_new, new)
            else:
                raise KnnlmError(f"reindex of {domain!r}: {new} holds {n_new} rows but {old} holds {n_old} after "
                                 f"5 catch-up passes (is something writing heavily?); nothing was swapped")
            ensure_loaded(client, new)
            # the metadata as it is now (tune may have stored settings meanwhile), then the swap
            _, meta_now = read_meta(client, old)
            new_meta = {**meta_now, **moved, "index": index.to_dict(), "generation": generation}
            client.alter_collection_properties(new, properties={META_PROPERTY: json.dumps(new_meta, sort_keys=True)})
            client.alter_alias(new, alias)
            swapped = True
            note_write(uri, domain)
            log.info("domain %s now reads %s (%s); was %s", domain, new, index.index_type, old)
            # rows written to the old collection just before the swap took effect
            stragglers = np.setdiff1d(np.setdiff1d(_ids(client, old), old_ids), _ids(client, new))
            caught_up += _copy_ids(client, old, new, stragglers, batch, projection)
            count = count_rows(client, new)
            if keep_old:
                client.alter_collection_properties(old, properties={RETIRED_PROPERTY: json.dumps(
                    {"replaced_by": new, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})})
            else:
                time.sleep(drop_delay_s)  # let searches already sent to the old collection finish
                client.drop_collection(old)
    except BaseException:
        if new is not None and not swapped:
            try:
                if client.has_collection(new):
                    client.drop_collection(new)
            except Exception as exc:  # keep the original error
                log.warning("could not remove the unfinished %s: %s", new, exc)
        raise
    finally:
        client.close()
    return {"domain": domain, "from": old, "to": new, "kept_old": keep_old, "count": count, "copied": copied,
            "caught_up": caught_up, "index": index.to_dict(),
            "projection": projection.summary() if projection is not None else None, "copy_seconds": round(t_copy - t0, 3),
            "index_seconds": round(t_index - t_copy, 3), "seconds": round(time.perf_counter() - t0, 3)}
