"""Scalar index on doc_id of every domain collection (per-document deletes and filters).

``append --replace`` and ``doc_id == "..."`` filters otherwise scan every row. Milvus Lite
3.2 builds only INVERTED for VARCHAR fields; a 2.3 server only Trie (2.4+ both), so the type
is picked per deployment (``datastore.milvus.index.DOC_ID_INDEX_TYPES``). Building a scalar index on a
loaded collection keeps it loaded and every row in place: readers and writers carry on.
Collections created since this version already have the index and are skipped.
"""
from __future__ import annotations


def upgrade(client, ctx) -> None:
    from knnlm_vdb.datastore.milvus.create import doc_id_index, ensure_doc_id_index
    from knnlm_vdb.datastore.milvus.index import DOC_ID_INDEX_TYPES

    kind = "lite" if ctx.deployment == "lite" else "server"
    for domain, names in sorted(ctx.domain_collections().items()):
        for name in names:
            if doc_id_index(client, name) is None:
                ctx.act(f"build a {'/'.join(DOC_ID_INDEX_TYPES[kind])} index on {name}.doc_id (domain {domain})",
                        ensure_doc_id_index, client, name, ctx.deployment)
