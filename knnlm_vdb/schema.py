"""Schema versions of a Milvus database: the migration runner, and reindexing a domain.

Versions. The migrations are the modules ``knnlm_vdb/migrations/mNNNN_<name>.py`` (see that
package); the newest one's number is the schema this code writes. A database records the
version it was migrated to in the property ``knnlm.schema`` of its collection
``knnlm__schema`` (a property, because Milvus Lite and the server both keep collection
properties, and reading one is a single describe call). A database without that collection
is at version 0: empty, or made by a release before migrations. Opening a domain refuses a
database whose version is newer than this code's newest (``milvus_store.check_schema_version``);
an older one is used as it is and upgraded by ``knnlm-vdb migrate``.

``migrate`` needs only the URI: no model, no domain. Each step is idempotent and the version
is recorded after each, so an interrupted run is finished by running it again. Two runs at
once are safe (each step checks before it changes anything) but pointless; the Helm chart runs
one hook Job.

Reindex. Readers and writers name a domain's alias, never its collection, so a new index is
built beside the old one and swapped in: create ``knnlm_D__v<N+1>`` with the new index, copy
every row into it (a query iterator over the old one), seal it and wait for the index, copy
what appends added meanwhile, check both counts are equal, move the alias, copy any rows that
landed in the old collection just before the move, then drop the old collection (or keep it,
marked retired, with ``keep_old``). The ledger collection is not behind the alias and stays
as it is; the metadata (model, tuned settings) moves with the alias. Deleting rows
(``append --replace``) while a reindex runs may leave the deleted rows in the new collection.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import pkgutil
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import ModuleType

import numpy as np

from knnlm_vdb.errors import KnnlmError

log = logging.getLogger(__name__)

_MODULE_RE = re.compile(r"m(\d{4})_([a-z0-9_]+)")


# ---- the migrations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    description: str
    module: ModuleType

    def to_dict(self) -> dict:
        return {"version": self.version, "name": self.name, "description": self.description}


_MIGRATIONS: list[Migration] | None = None


@functools.lru_cache(maxsize=1)
def _migration_names() -> list[tuple[int, str, str]]:
    """(version, name, module name) of every migration module, without importing them."""
    from knnlm_vdb import migrations as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        m = _MODULE_RE.fullmatch(info.name)
        if m:
            found.append((int(m.group(1)), m.group(2), info.name))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"knnlm_vdb.migrations must be numbered 1, 2, ... without gaps or repeats; found {versions}")
    return found


def migrations() -> list[Migration]:
    """Every migration, oldest first."""
    global _MIGRATIONS
    if _MIGRATIONS is None:
        out = []
        for version, name, module_name in _migration_names():
            module = importlib.import_module(f"knnlm_vdb.migrations.{module_name}")
            if not callable(getattr(module, "upgrade", None)):
                raise RuntimeError(f"migration {module_name} has no upgrade(client, ctx)")
            doc = (module.__doc__ or name).strip().splitlines()[0]
            out.append(Migration(version, name, doc, module))
        _MIGRATIONS = out
    return _MIGRATIONS


def latest_version() -> int:
    """The schema version this code creates and understands (cheap: lists module names only)."""
    return len(_migration_names())


class MigrationContext:
    """What a migration step sees besides the client; ``act`` makes ``--dry-run`` possible."""

    def __init__(self, client, uri: str, deployment: str, dry_run: bool):
        self.client, self.uri, self.deployment, self.dry_run = client, uri, deployment, dry_run
        self.actions: list[str] = []

    def act(self, description: str, fn=None, *args, **kwargs):
        """Record a change and, unless this is a dry run, make it."""
        self.actions.append(description)
        log.info("%s%s", "would " if self.dry_run else "", description)
        if not self.dry_run and fn is not None:
            return fn(*args, **kwargs)
        return None

    def domain_collections(self) -> dict[str, list[str]]:
        """domain -> its physical collections (several mid-reindex, or with kept old generations)."""
        from knnlm_vdb.datastore.milvus_store import _domain_collections

        if self.client is None:  # dry run against a Lite file that does not exist yet
            return {}
        return _domain_collections(self.client)

    def ensure_schema_collection(self) -> None:
        from knnlm_vdb.datastore.milvus_store import SCHEMA_COLLECTION

        if self.client is None or not self.client.has_collection(SCHEMA_COLLECTION):
            self.act(f"create the schema record (collection {SCHEMA_COLLECTION})", _create_schema_collection,
                     self.client)


def _create_schema_collection(client) -> None:
    from pymilvus import DataType, MilvusClient

    from knnlm_vdb.datastore.milvus_store import SCHEMA_COLLECTION, SCHEMA_PROPERTY, quiet_pymilvus

    if client.has_collection(SCHEMA_COLLECTION):
        return
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field; never used
    try:
        with quiet_pymilvus():
            client.create_collection(SCHEMA_COLLECTION, schema=schema, consistency_level="Strong",
                                     properties={SCHEMA_PROPERTY: json.dumps({"version": 0, "history": []})})
    except Exception:
        if not client.has_collection(SCHEMA_COLLECTION):  # not just another migrator being first
            raise


def write_schema_state(client, state: dict) -> None:
    """Store the schema record (the runner's last step; tests use it to fake other versions)."""
    from knnlm_vdb.datastore.milvus_store import SCHEMA_COLLECTION, SCHEMA_PROPERTY

    _create_schema_collection(client)
    client.alter_collection_properties(SCHEMA_COLLECTION, properties={SCHEMA_PROPERTY: json.dumps(state)})


def _record(client, migration: Migration, n_actions: int) -> None:
    from knnlm_vdb import __version__
    from knnlm_vdb.datastore.milvus_store import read_schema_state

    state = read_schema_state(client) or {"version": 0, "history": []}
    if int(state["version"]) >= migration.version:  # a concurrent run got there first
        return
    state["version"] = migration.version
    state.setdefault("history", []).append({
        "version": migration.version, "name": migration.name, "changes": n_actions, "knnlm_vdb": __version__,
        "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    write_schema_state(client, state)


def _connect_for(uri, token, timeout, db_name, must_exist):
    from knnlm_vdb.datastore.milvus_store import _connect

    return _connect(uri, token, timeout, db_name, must_exist=must_exist)


def _lite_missing(uri: str) -> bool:
    import os

    from knnlm_vdb.datastore.milvus_store import deployment_of

    return deployment_of(uri) == "lite" and not os.path.exists(uri)


def status(uri: str, token: str | None = None, timeout: float | None = None, db_name: str | None = None) -> dict:
    """Where a database stands: its version, the newest known, pending and applied migrations.

    Reports a database newer than this code instead of refusing it, and never creates one.
    """
    from knnlm_vdb.datastore.milvus_store import _domain_collections, _rpc, read_schema_state, redact_uri

    known = migrations()
    latest = known[-1].version if known else 0
    state, domains, exists = None, [], not _lite_missing(uri)
    if exists:
        client = _connect_for(uri, token, timeout, db_name, must_exist=True)
        try:
            with _rpc("read the schema version", uri):
                state = read_schema_state(client)
                domains = sorted(_domain_collections(client))
        finally:
            client.close()
    version = int(state["version"]) if state else 0
    return {"uri": redact_uri(uri), "exists": exists, "recorded": state is not None, "version": version,
            "latest": latest, "newer_than_code": version > latest,
            "pending": [m.to_dict() for m in known if m.version > version],
            "history": (state or {}).get("history", []), "domains": domains}


def migrate(uri: str, to: int | None = None, dry_run: bool = False, token: str | None = None,
            timeout: float | None = None, db_name: str | None = None) -> dict:
    """Apply the pending migrations up to ``to`` (default: the newest); with ``dry_run`` only list them."""
    from knnlm_vdb.datastore.milvus_store import _rpc, deployment_of, read_schema_state, redact_uri

    known = migrations()
    latest = known[-1].version if known else 0
    if to is not None and not 0 <= to <= latest:
        raise KnnlmError(f"--to {to}: there is no schema version {to} (this knnlm-vdb knows 1 to {latest})")
    target = latest if to is None else to
    deployment = deployment_of(uri)
    client = None
    if not (dry_run and _lite_missing(uri)):
        client = _connect_for(uri, token, timeout, db_name, must_exist=False)
    steps = []
    try:
        with _rpc("migrate", uri):
            state = read_schema_state(client) if client is not None else None
            current = int(state["version"]) if state else 0
            if current > latest:
                raise KnnlmError(f"the Milvus database at {redact_uri(uri)} has schema version {current}, newer "
                                 f"than the newest this knnlm-vdb knows ({latest}); upgrade knnlm-vdb to migrate it")
            if target < current:
                raise KnnlmError(f"the database is at schema version {current}; --to {target} would be a "
                                 f"downgrade, which knnlm-vdb does not do")
            for m in known:
                if not current < m.version <= target:
                    continue
                ctx = MigrationContext(client, uri, deployment, dry_run)
                t = time.perf_counter()
                try:
                    m.module.upgrade(client, ctx)
                except KnnlmError as exc:
                    raise KnnlmError(f"migration {m.version:04d} ({m.name}) failed: {exc}; the database stays at "
                                     f"version {steps[-1]['version'] if steps else current}") from None
                if not dry_run:
                    _record(client, m, len(ctx.actions))
                steps.append({**m.to_dict(), "actions": ctx.actions, "seconds": round(time.perf_counter() - t, 3)})
                log.info("%s migration %04d (%s): %d change(s)", "planned" if dry_run else "applied",
                         m.version, m.name, len(ctx.actions))
    finally:
        if client is not None:
            client.close()
    return {"uri": redact_uri(uri), "dry_run": dry_run, "from": current,
            "to": steps[-1]["version"] if steps else current, "latest": latest, "applied": steps}


def preflight(uri: str, token: str | None = None, timeout: float | None = None) -> int:
    """Refuse a database newer than this code before anything expensive (loading a model) happens.

    Returns the recorded version (0: none, or no Lite file yet).
    """
    from knnlm_vdb.datastore.milvus_store import _rpc, check_schema_version

    if _lite_missing(uri):
        return 0
    client = _connect_for(uri, token, timeout, None, must_exist=True)
    try:
        with _rpc("read the schema version", uri):
            return check_schema_version(client, uri)
    finally:
        client.close()


# ---- reindex -------------------------------------------------------------------------------------
_ROW_FIELDS = ["id", "key", "target", "doc_id", "position"]


def _iterate(client, name: str, fields: list[str], batch: int):
    """Every row of ``name`` (consistent snapshot), in batches."""
    from knnlm_vdb.datastore.milvus_store import quiet_pymilvus

    with quiet_pymilvus():  # Lite warns on every iterator that it uses a client-side timestamp
        it = client.query_iterator(name, batch_size=batch, filter="", output_fields=fields)
    try:
        while True:
            rows = it.next()
            if not rows:
                return
            yield rows
    finally:
        it.close()


def _ids(client, name: str) -> np.ndarray:
    parts = [np.fromiter((r["id"] for r in rows), np.int64, len(rows)) for rows in _iterate(client, name, ["id"], 16384)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _count(client, name: str) -> int:
    res = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"])


def _copy_ids(client, src: str, dst: str, ids: np.ndarray, batch: int) -> int:
    """Upsert the rows ``ids`` of ``src`` into ``dst``; return how many were found."""
    from knnlm_vdb.datastore.milvus_store import ID_CHECK_BATCH

    n = 0
    step = min(batch, ID_CHECK_BATCH)
    for i in range(0, len(ids), step):
        rows = client.query(src, filter=f"id in {ids[i:i + step].tolist()}", output_fields=_ROW_FIELDS,
                            consistency_level="Strong")
        if rows:
            client.upsert(dst, rows)
            n += len(rows)
    return n


def _wait_for_index(client, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.describe_index(name, "key")
        if not state.get("pending_index_rows") and state.get("indexed_rows", 0) >= state.get("total_rows", 0):
            return
        if time.monotonic() > deadline:
            raise KnnlmError(f"the new index on {name} was not built within {timeout_s:.0f}s ({state})")
        time.sleep(0.5)


def reindex(uri: str, domain: str, index_type: str, index_params: dict | None = None,
            search_params: dict | None = None, keep_old: bool = False, token: str | None = None,
            timeout: float | None = None, db_name: str | None = None, show_progress: bool = False,
            index_timeout_s: float = 3600.0, drop_delay_s: float = 2.0) -> dict:
    """Rebuild ``domain`` with another index into a new collection and swap the alias (module doc)."""
    from tqdm.auto import tqdm

    from knnlm_vdb.datastore import milvus_store as ms

    ms.check_domain(domain)
    deployment = ms.deployment_of(uri)
    client = _connect_for(uri, token, timeout, db_name, must_exist=True)
    t0 = time.perf_counter()
    new = None
    swapped = False
    try:
        with ms._rpc(f"reindex domain {domain}", uri):
            ms.check_schema_version(client, uri)
            alias = ms.alias_name(domain)
            if not ms._supports_aliases(client):
                raise KnnlmError("this Milvus has no collection aliases; reindexing without downtime needs them")
            if not client.has_collection(alias):
                known = sorted(ms._domain_collections(client))
                raise ms.NoSuchDomain(f"no domain {domain!r} at {ms.redact_uri(uri)} (domains there: "
                                      f"{', '.join(known) or 'none'})")
            desc, meta = ms._read_meta(client, alias)
            if not meta:
                raise KnnlmError(f"Milvus collection {desc.get('collection_name')} was not created by knnlm-vdb")
            old = desc["collection_name"]
            ms.ensure_loaded(client, old)  # Lite forgets loads between processes; iterators need it
            dim = int(meta["info"]["dim"])
            tuned_k = (meta["info"].get("extra") or {}).get("tuned", {}).get("k")
            index = ms.validate_index(index_type, index_params, search_params, deployment=deployment, dim=dim,
                                      k=int(tuned_k) if tuned_k else None)
            pattern = re.compile(re.escape(ms.alias_name(domain)) + r"__v(\d+)")
            generations = {int(m.group(1)): n for n in client.list_collections() if (m := pattern.fullmatch(n))}
            for n in sorted(generations.values()):
                if n == old:
                    continue
                props = client.describe_collection(n).get("properties") or {}
                if ms.RETIRED_PROPERTY not in props:
                    log.warning("dropping %s, left behind by an interrupted reindex of %s", n, domain)
                    client.drop_collection(n)
            generation = max(generations) + 1
            new = ms.collection_name(domain, generation)
            consistency = desc.get("consistency_level_name") or "Strong"
            if consistency not in ms.CONSISTENCY_LEVELS:
                consistency = "Strong"
            new_meta = {**meta, "index": index.to_dict(), "generation": generation}
            ms.MilvusDatastore._create_collection(client, new, dim, index, consistency, new_meta,
                                                  deployment=deployment)

            # bulk copy: a consistent snapshot of the old collection
            total = _count(client, old)
            batch = int(max(64, min(16384, ms.INSERT_BATCH_BYTES // (4 * dim + 64 + 256))))
            bar = tqdm(total=total, unit="row", desc="copy", disable=not show_progress)
            copied = 0
            for rows in _iterate(client, old, _ROW_FIELDS, batch):
                client.insert(new, rows)
                copied += len(rows)
                bar.update(len(rows))
            bar.close()
            t_copy = time.perf_counter()
            client.flush(new)
            _wait_for_index(client, new, index_timeout_s)
            t_index = time.perf_counter()

            # catch up with appends (and deletes) that reached the old collection during the copy
            caught_up = 0
            for attempt in range(5):
                old_ids, new_ids = _ids(client, old), _ids(client, new)
                missing = np.setdiff1d(old_ids, new_ids)
                extra = np.setdiff1d(new_ids, old_ids)
                caught_up += _copy_ids(client, old, new, missing, batch)
                for i in range(0, len(extra), ms.ID_CHECK_BATCH):
                    client.delete(new, ids=extra[i:i + ms.ID_CHECK_BATCH].tolist())
                n_old, n_new = _count(client, old), _count(client, new)
                if n_old == n_new:
                    break
                log.info("reindex %s: %d rows in %s, %d in %s; catching up again", domain, n_old, old, n_new, new)
            else:
                raise KnnlmError(f"reindex of {domain!r}: {new} holds {n_new} rows but {old} holds {n_old} after "
                                 f"5 catch-up passes (is something writing heavily?); nothing was swapped")
            state = client.get_load_state(new)["state"]
            if getattr(state, "name", str(state)) != "Loaded":
                client.load_collection(new)
            # the metadata as it is now (tune may have stored settings meanwhile), then the swap
            _, meta_now = ms._read_meta(client, old)
            new_meta = {**meta_now, "index": index.to_dict(), "generation": generation}
            client.alter_collection_properties(new, properties={ms.META_PROPERTY: json.dumps(new_meta, sort_keys=True)})
            client.alter_alias(new, alias)
            swapped = True
            log.info("domain %s now reads %s (%s); was %s", domain, new, index.index_type, old)
            # rows written to the old collection just before the swap took effect
            stragglers = np.setdiff1d(np.setdiff1d(_ids(client, old), old_ids), _ids(client, new))
            caught_up += _copy_ids(client, old, new, stragglers, batch)
            count = _count(client, new)
            if keep_old:
                client.alter_collection_properties(old, properties={ms.RETIRED_PROPERTY: json.dumps(
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
            "caught_up": caught_up, "index": index.to_dict(), "copy_seconds": round(t_copy - t0, 3),
            "index_seconds": round(t_index - t_copy, 3), "seconds": round(time.perf_counter() - t0, 3)}
