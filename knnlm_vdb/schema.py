"""Schema versions of a Milvus database: the migration runner behind ``knnlm-vdb migrate``.

Versions. The migrations are the modules ``knnlm_vdb/migrations/mNNNN_<name>.py`` (see that
package); the newest one's number is the schema this code writes. A database records the
version it was migrated to in the property ``knnlm.schema`` of its collection
``knnlm__schema`` (a property, because Milvus Lite and the server both keep collection
properties, and reading one is a single describe call). A database without that collection
is at version 0: empty, or made by a release before migrations. Opening a domain refuses a
database whose version is newer than this code's newest (``datastore.milvus.versions.check_schema_version``);
an older one is used as it is and upgraded by ``knnlm-vdb migrate``.

``migrate`` needs only the URI: no model, no domain. Each step is idempotent and the version
is recorded after each, so an interrupted run is finished by running it again. Two runs at
once are safe (each step checks before it changes anything) but pointless; the Helm chart runs
one hook Job.

Reindexing a domain lives in ``datastore/milvus/reindex.py``.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import ModuleType

from knnlm_vdb.datastore.milvus.catalog import domain_collections
from knnlm_vdb.datastore.milvus.connection import connect, deployment_of, redact_uri, rpc
from knnlm_vdb.datastore.milvus.naming import SCHEMA_COLLECTION
from knnlm_vdb.datastore.milvus.versions import (check_schema_version, create_schema_collection, migration_names,
                                                 read_schema_state, write_schema_state)
from knnlm_vdb.datastore.milvus.versions import preflight  # noqa: F401  (its home was here; callers import it)
from knnlm_vdb.errors import KnnlmError

log = logging.getLogger(__name__)


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


def migrations() -> list[Migration]:
    """Every migration, oldest first."""
    global _MIGRATIONS
    if _MIGRATIONS is None:
        out = []
        for version, name, module_name in migration_names():
            module = importlib.import_module(f"knnlm_vdb.migrations.{module_name}")
            if not callable(getattr(module, "upgrade", None)):
                raise RuntimeError(f"migration {module_name} has no upgrade(client, ctx)")
            doc = (module.__doc__ or name).strip().splitlines()[0]
            out.append(Migration(version, name, doc, module))
        _MIGRATIONS = out
    return _MIGRATIONS


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
        if self.client is None:  # dry run against a Lite file that does not exist yet
            return {}
        return domain_collections(self.client)

    def ensure_schema_collection(self) -> None:
        if self.client is None or not self.client.has_collection(SCHEMA_COLLECTION):
            self.act(f"create the schema record (collection {SCHEMA_COLLECTION})", create_schema_collection,
                     self.client)


def _record(client, migration: Migration, n_actions: int) -> None:
    from knnlm_vdb import __version__

    state = read_schema_state(client) or {"version": 0, "history": []}
    if int(state["version"]) >= migration.version:  # a concurrent run got there first
        return
    state["version"] = migration.version
    state.setdefault("history", []).append({
        "version": migration.version, "name": migration.name, "changes": n_actions, "knnlm_vdb": __version__,
        "applied_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    write_schema_state(client, state)


def _lite_missing(uri: str) -> bool:
    return deployment_of(uri) == "lite" and not os.path.exists(uri)


def status(uri: str, token: str | None = None, timeout: float | None = None, db_name: str | None = None) -> dict:
    """Where a database stands: its version, the newest known, pending and applied migrations.

    Reports a database newer than this code instead of refusing it, and never creates one.
    """
    known = migrations()
    latest = known[-1].version if known else 0
    state, domains, exists = None, [], not _lite_missing(uri)
    if exists:
        client = connect(uri, token, timeout, db_name, must_exist=True)
        try:
            with rpc("read the schema version", uri):
                state = read_schema_state(client)
                domains = sorted(domain_collections(client))
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
    known = migrations()
    latest = known[-1].version if known else 0
    if to is not None and not 0 <= to <= latest:
        raise KnnlmError(f"--to {to}: there is no schema version {to} (this knnlm-vdb knows 1 to {latest})")
    target = latest if to is None else to
    deployment = deployment_of(uri)
    client = None
    if not (dry_run and _lite_missing(uri)):
        client = connect(uri, token, timeout, db_name, must_exist=False)
    steps = []
    try:
        with rpc("migrate", uri):
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


