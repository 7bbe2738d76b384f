"""Creating collections of the newest schema, and creating a domain race-free.

Parallel shard workers of ``append`` may all create a new domain at once. Each creator tags the
collection it asks for with a random token, and only the one whose token is on it owns it (a 2.3
server answers a duplicate create with identical parameters with success); a loser waits for the
winner's alias and opens the domain, never dropping anything. New collections get the newest
schema, including the scalar index on ``doc_id`` (schema 2).

Milvus Lite reads index build parameters only from a JSON ``params`` pair, which pymilvus 3 does
not send, so both forms are sent.
"""
from __future__ import annotations

import json
import logging
import uuid
from contextlib import nullcontext

from knnlm_vdb.datastore.milvus.catalog import alias_target, properties, read_meta
from knnlm_vdb.datastore.milvus.connection import appears, quiet_pymilvus, redact_uri, supports_aliases
from knnlm_vdb.datastore.milvus.index import DOC_ID_INDEX_TYPES, IndexConfig
from knnlm_vdb.datastore.milvus.naming import (CREATE_TOKEN_PROPERTY, DOC_ID_MAX_BYTES, META_PROPERTY, alias_name,
                                               collection_name)
from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.projection import stored_dim

log = logging.getLogger(__name__)

ALIAS_WAIT_S = 15.0  # how long a creator that lost a race waits for the winner's alias


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


def row_schema(dim: int):
    """The fields of a domain's rows (newest schema): id, key, target, doc_id, position."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("key", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("target", DataType.INT32)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=DOC_ID_MAX_BYTES)
    schema.add_field("position", DataType.INT64)
    return schema


def create_collection(client, name: str, dim: int, index: IndexConfig, consistency: str, meta: dict,
                      deployment: str = "server", create_token: str | None = None) -> None:
    """A collection of the newest schema: the fields, the vector index and the ``doc_id`` index."""
    schema = row_schema(dim)
    build = dict(index.build_params)
    if deployment == "lite" and build:
        # pymilvus 3 sends build parameters as flat key-value pairs, which Milvus Lite 3.2 ignores
        # (it reads only a JSON "params" pair, and would use nlist=128, M=16, ...): send both forms
        build["params"] = dict(index.build_params)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="key", index_type=index.index_type, metric_type="L2", params=build)
    props = {META_PROPERTY: json.dumps(meta, sort_keys=True)}
    if create_token:
        props[CREATE_TOKEN_PROPERTY] = create_token
    with quiet_pymilvus():  # failures still raise; Lite logs a traceback for each method it lacks
        client.create_collection(name, schema=schema, index_params=index_params, consistency_level=consistency,
                                 properties=props)
    ensure_doc_id_index(client, name, deployment, strict=False)


def _create_token(client, name: str) -> str | None:
    return properties(client, name).get(CREATE_TOKEN_PROPERTY)


def create_domain(client, uri: str, domain: str, meta: dict, index: IndexConfig, consistency: str,
                  deployment: str, exist_ok: bool = False, alias_wait_s: float = ALIAS_WAIT_S) -> bool:
    """Create the collection and alias of ``domain``; True when this call made them.

    False (only with ``exist_ok``) means the domain exists or another process made it meanwhile:
    the caller opens it. Anything this call made is removed again if it fails half-way.
    """
    alias = alias_name(domain)
    if client.has_collection(alias):
        if exist_ok:
            return False
        raise KnnlmError(f"domain {domain!r} already exists at {redact_uri(uri)}; append to it, "
                         f"or drop it first (knnlm-vdb domains drop)")
    aliases = supports_aliases(client)
    physical = collection_name(domain) if aliases else alias
    if aliases and client.has_collection(physical):
        if exist_ok:  # another creator between its two steps, or an interrupted create: adopt it
            adopt(client, domain, physical, alias_wait_s)
            return False
        raise KnnlmError(f"collection {physical} exists without its alias {alias} (an interrupted "
                         f"create?); remove it with `knnlm-vdb domains drop {domain}`")
    token = uuid.uuid4().hex
    try:
        try:
            with quiet_pymilvus() if exist_ok else nullcontext():
                create_collection(client, physical, stored_dim(meta), index, consistency, meta,
                                  deployment=deployment, create_token=token)
        except Exception:
            # Milvus Lite fails a concurrent create before the winner's collection is listed
            if exist_ok and appears(lambda: client.has_collection(physical), 5.0) and \
                    _create_token(client, physical) != token:
                lost = True  # someone else's collection: the race was lost
            else:
                raise
        else:
            lost = _create_token(client, physical) != token
        if lost:
            log.info("domain %s was created concurrently by another process; opening it", domain)
            adopt(client, domain, physical, alias_wait_s)
            return False
        if aliases:
            try:
                with quiet_pymilvus():
                    client.create_alias(physical, alias)
            except Exception:
                if not alias_target(client, alias) == physical:  # an adopter may have made it
                    raise
    except BaseException:  # e.g. the server has no such index: leave nothing half-made behind
        if (client.has_collection(physical) and _create_token(client, physical) == token
                and alias_target(client, alias) != physical):
            client.drop_collection(physical)
        raise
    log.info("created Milvus domain %s (collection %s, %s) at %s", domain, physical, index.index_type,
             redact_uri(uri))
    return True


def adopt(client, domain: str, physical: str, alias_wait_s: float = ALIAS_WAIT_S) -> None:
    """A domain whose collection exists: wait for its alias, and make it if none comes."""
    alias = alias_name(domain)
    if appears(lambda: client.has_collection(alias), alias_wait_s, poll_s=0.2):
        return
    _, meta = read_meta(client, physical)
    if meta.get("domain") != domain:
        raise KnnlmError(f"collection {physical} exists but does not hold domain {domain!r}; "
                         f"remove it, or use another domain name")
    log.warning("collection %s had no alias %s after %.0fs (an interrupted create); adding it",
                physical, alias, alias_wait_s)
    try:
        with quiet_pymilvus():
            client.create_alias(physical, alias)
    except Exception:
        if alias_target(client, alias) is None:
            raise
