"""Initial schema: start recording the schema version in the database.

The baseline is what knnlm-vdb 0.1 creates: per domain D a collection ``knnlm_D__v1``
(format_version 1: id, key, target, doc_id, position; metadata in the ``knnlm.meta``
property) behind the alias ``knnlm_D``, and a ledger collection ``knnlm_D__ledger``.
This step changes no domain: it checks that every domain is of that format and creates the
``knnlm__schema`` collection whose properties hold the version. On an empty database it
only creates that record.
"""
from __future__ import annotations

from knnlm_vdb.errors import KnnlmError


def upgrade(client, ctx) -> None:
    from knnlm_vdb.datastore.milvus.catalog import read_meta
    from knnlm_vdb.datastore.milvus.naming import FORMAT_VERSION

    for domain, names in sorted(ctx.domain_collections().items()):
        for name in names:
            _, meta = read_meta(client, name)
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise KnnlmError(f"collection {name} (domain {domain}) has format {meta['format_version']}, "
                                 f"newer than this knnlm-vdb understands ({FORMAT_VERSION})")
    ctx.ensure_schema_collection()
