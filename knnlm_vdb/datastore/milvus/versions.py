"""The database's schema record: which migration a Milvus database was brought to.

The migrations are the modules ``knnlm_vdb/migrations/mNNNN_<name>.py``; the newest one's number
is the schema this code writes. A database records its version in the property ``knnlm.schema``
of the collection ``knnlm__schema``; one without that collection is at version 0. Every open and
create reads it first and refuses a database newer than this code (``check_schema_version``).
The runner that applies migrations is ``knnlm_vdb/schema.py``.
"""
from __future__ import annotations

import functools
import json
import pkgutil
import re

from knnlm_vdb.datastore.milvus.connection import (check_lite_location, connect, deployment_of, is_lite_database,
                                                   quiet_pymilvus, redact_uri, rpc)
from knnlm_vdb.datastore.milvus.naming import SCHEMA_COLLECTION, SCHEMA_PROPERTY
from knnlm_vdb.errors import Incompatible

_MODULE_RE = re.compile(r"m(\d{4})_([a-z0-9_]+)")


@functools.lru_cache(maxsize=1)
def migration_names() -> list[tuple[int, str, str]]:
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


def latest_version() -> int:
    """The schema version this code creates and understands (cheap: lists module names only)."""
    return len(migration_names())


def read_schema_state(client) -> dict | None:
    """The database's schema record: ``{version, history}``, or None if it has none."""
    if not client.has_collection(SCHEMA_COLLECTION):
        return None
    raw = (client.describe_collection(SCHEMA_COLLECTION).get("properties") or {}).get(SCHEMA_PROPERTY)
    if not raw:
        return {"version": 0, "history": []}
    try:
        state = json.loads(raw)
        int(state["version"])
    except (ValueError, KeyError, TypeError):
        raise Incompatible(f"corrupt schema record in Milvus collection {SCHEMA_COLLECTION}") from None
    return state


def check_schema_version(client, uri: str) -> int:
    """The recorded schema version (0: none); refuse a database migrated by a newer knnlm-vdb."""
    state = read_schema_state(client)
    version = int(state["version"]) if state else 0
    if version > latest_version():
        raise Incompatible(f"the Milvus database at {redact_uri(uri)} has schema version {version}, newer than the "
                         f"newest this knnlm-vdb knows ({latest_version()}); upgrade knnlm-vdb to use it")
    return version


def create_schema_collection(client) -> None:
    """The ``knnlm__schema`` collection at version 0, unless it exists (a racing migrator is fine)."""
    from pymilvus import DataType, MilvusClient

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
    create_schema_collection(client)
    client.alter_collection_properties(SCHEMA_COLLECTION, properties={SCHEMA_PROPERTY: json.dumps(state)})


def preflight(uri: str, token: str | None = None, timeout: float | None = None) -> int:
    """Refuse a database newer than this code before anything expensive (loading a model) happens.

    Returns the recorded version (0: none, or no Lite file yet).
    """
    if deployment_of(uri) == "lite" and not is_lite_database(uri):
        check_lite_location(uri, create=True)  # a path append cannot create a database at fails now
        return 0
    client = connect(uri, token, timeout, None, must_exist=True)
    try:
        with rpc("read the schema version", uri):
            return check_schema_version(client, uri)
    finally:
        client.close()
