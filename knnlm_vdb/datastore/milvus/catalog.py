"""What a Milvus database holds: each collection's knnlm metadata, the domains, dropping one.

Collections are found by their metadata property, never by name alone, so someone else's
``knnlm_*`` collection is skipped with a warning rather than breaking a listing.
"""
from __future__ import annotations

import json
import logging

from knnlm_vdb.datastore.base import info_damage, is_int, typed_damage
from knnlm_vdb.datastore.milvus.connection import connect, quiet_pymilvus, redact_uri, rpc, supports_aliases
from knnlm_vdb.datastore.milvus.mirror import note_write
from knnlm_vdb.datastore.milvus.naming import META_PROPERTY, PREFIX, alias_name, check_domain, ledger_name
from knnlm_vdb.datastore.milvus.versions import check_schema_version
from knnlm_vdb.errors import KnnlmError, NotFound

log = logging.getLogger(__name__)


class NoSuchDomain(NotFound):
    """The domain does not exist at that URI."""


def read_meta(client, name: str) -> tuple[dict, dict]:
    """The collection's description and its knnlm metadata, or ({}, {}) for foreign collections."""
    desc = client.describe_collection(name)
    raw = (desc.get("properties") or {}).get(META_PROPERTY)
    if raw is None:
        return desc, {}
    try:
        return desc, json.loads(raw)
    except ValueError:
        raise KnnlmError(f"corrupt knnlm metadata on Milvus collection {desc.get('collection_name', name)}") from None


def meta_damage(meta: dict) -> list[str]:
    """The fields (``info.dim``, ``index.type``, ...) a domain's knnlm metadata lacks or holds mistyped."""
    if not isinstance(meta, dict):
        return ["(not a JSON object)"]
    info, index = meta.get("info"), meta.get("index")
    out = [] if is_int(meta.get("format_version", 0)) else ["format_version"]
    out += [f"info.{f}" for f, _ in info_damage(info)] if isinstance(info, dict) else ["info"]
    if isinstance(index, dict):
        out += [f"index.{f}" for f, _ in typed_damage(index, {"type": str, "build_params": dict})]
    else:
        out.append("index")
    return out


def properties(client, name: str) -> dict:
    """The collection properties of ``name`` (empty when it has none)."""
    return client.describe_collection(name).get("properties") or {}


def alias_target(client, alias: str) -> str | None:
    """The collection ``alias`` points at, or None where there is no such alias.

    Asks describe_collection, not describe_alias/list_aliases: pymilvus 3.0.2 sends those two with
    an empty database name, so a 2.3 server answers them for the default database whatever the URI.
    """
    if not client.has_collection(alias):
        return None
    target = client.describe_collection(alias).get("collection_name")
    return target if target != alias else None


def domain_collections(client) -> dict[str, list[str]]:
    """domain -> physical collections that carry its metadata (more than one mid-reindex)."""
    found: dict[str, list[str]] = {}
    for name in sorted(client.list_collections()):
        if not name.startswith(PREFIX):
            continue
        try:
            _, meta = read_meta(client, name)
        except KnnlmError as exc:  # someone else's collection: list the others rather than fail
            log.warning("skipping %s: %s", name, exc)
            continue
        if meta.get("domain"):
            found.setdefault(meta["domain"], []).append(name)
    return found


def count_rows(client, name: str) -> int:
    """Rows a reader of ``name`` sees now: ``count(*)`` at Strong consistency (statistics lag until a flush)."""
    res = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"])


def iterate_rows(client, name: str, fields: list[str], batch: int):
    """Every row of ``name`` (a consistent snapshot), in batches of at most ``batch``."""
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


def no_such_domain(client, uri: str, domain: str, hint: str = "") -> NoSuchDomain:
    """The error for a missing domain, naming the ones that exist."""
    known = sorted(domain_collections(client))
    return NoSuchDomain(f"no domain {domain!r} at {redact_uri(uri)} (domains there: "
                        f"{', '.join(known) or 'none'}){hint}")


def list_domains(uri: str, token: str | None = None, timeout: float | None = None,
                 db_name: str | None = None) -> list[str]:
    """Domains stored at ``uri`` (sorted), for ``knnlm-vdb domains list``."""
    client = connect(uri, token, timeout, db_name)
    try:
        with rpc("list collections", uri):
            return sorted(domain_collections(client))
    finally:
        client.close()


def drop_domain(uri: str, domain: str, token: str | None = None, timeout: float | None = None,
                db_name: str | None = None) -> list[str]:
    """Delete a domain: its alias and every collection holding it. Returns the dropped collections."""
    check_domain(domain)
    client = connect(uri, token, timeout, db_name)
    try:
        with rpc(f"drop domain {domain}", uri):
            check_schema_version(client, uri)
            names = domain_collections(client).get(domain, [])
            if not names:
                raise NoSuchDomain(f"no domain {domain!r} at {redact_uri(uri)}")
            if supports_aliases(client) and alias_target(client, alias_name(domain)) is not None:
                client.drop_alias(alias_name(domain))
            if client.has_collection(ledger_name(domain)):
                names.append(ledger_name(domain))
            for name in names:
                client.drop_collection(name)
            note_write(uri, domain)
        log.info("dropped domain %s (%s) at %s", domain, ", ".join(names), redact_uri(uri))
        return names
    finally:
        client.close()
