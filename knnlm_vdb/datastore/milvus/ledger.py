"""The ingest ledger of a Milvus domain (see ``datastore/ledger.py``): collection ``knnlm_D__ledger``,
one row per committed chunk, created on the first commit. It is not behind the alias: a reindex
keeps the same rows, so the ledger stays valid across alias swaps.
"""
from __future__ import annotations

import hashlib

from knnlm_vdb.datastore.ledger import DocRecord, Ledger
from knnlm_vdb.datastore.milvus.connection import ensure_loaded, quiet_pymilvus, rpc
from knnlm_vdb.datastore.milvus.naming import DOC_ID_MAX_BYTES, LEDGER_OF_PROPERTY, ledger_name


def ledger_row_id(doc_id: str, chunk: int) -> int:
    """Deterministic row id of a chunk record: re-committing a chunk overwrites its row."""
    digest = hashlib.blake2b(f"{doc_id}\x00{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


class MilvusLedger(Ledger):
    """Committed chunks of one domain, a row each in ``knnlm_<domain>__ledger``.

    Milvus needs a vector field in every collection; ``v`` is a constant 2-d placeholder.
    """

    _FIELDS = ["doc_id", "chunk", "content_hash", "n_tokens"]

    def __init__(self, client, uri: str, domain: str):
        self.client, self.uri, self.name = client, uri, ledger_name(domain)
        self.domain = domain
        self._docs: dict[str, DocRecord] | None = None
        self._row_ids: dict[str, set[int]] = {}  # every ledger row of a document, whatever its hash
        self._ready = False  # the ledger collection exists and is loaded

    def documents(self) -> dict[str, DocRecord]:
        if self._docs is not None:
            return self._docs
        groups: dict[str, dict[tuple[str, int], set[int]]] = {}
        with rpc(f"read ledger {self.name}", self.uri):
            rows = []
            if self.client.has_collection(self.name):
                ensure_loaded(self.client, self.name)
                rows = self.client.query(self.name, filter="chunk >= 0", output_fields=self._FIELDS,
                                         consistency_level="Strong")
        for r in rows:
            groups.setdefault(r["doc_id"], {}).setdefault((r["content_hash"], int(r["n_tokens"])), set()).add(
                int(r["chunk"]))
        self._docs = {}
        for doc_id, versions in groups.items():
            (content_hash, n_tokens), chunks = max(versions.items(), key=lambda kv: len(kv[1]))
            self._docs[doc_id] = DocRecord(content_hash, n_tokens, set(chunks))
            self._row_ids[doc_id] = {ledger_row_id(doc_id, c) for cs in versions.values() for c in cs}
        return self._docs

    def _ensure_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        if self._ready:
            return
        if self.client.has_collection(self.name):
            ensure_loaded(self.client, self.name)
            self._ready = True
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=DOC_ID_MAX_BYTES)
        schema.add_field("chunk", DataType.INT64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=128)
        schema.add_field("n_tokens", DataType.INT64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
        index_params = self.client.prepare_index_params()
        index_params.add_index(field_name="v", index_type="FLAT", metric_type="L2")
        try:
            with quiet_pymilvus():
                self.client.create_collection(self.name, schema=schema, index_params=index_params,
                                              consistency_level="Strong", properties={LEDGER_OF_PROPERTY: self.domain})
        except Exception:
            if not self.client.has_collection(self.name):
                raise
            ensure_loaded(self.client, self.name)  # a parallel shard created it first
        self._ready = True

    def commit_chunk(self, doc_id, chunk, content_hash, n_tokens) -> None:
        docs = self.documents()
        rec = docs.get(doc_id)
        with rpc(f"write ledger {self.name}", self.uri):
            self._ensure_collection()
            if rec is None or rec.content_hash != content_hash:
                self._delete_rows(doc_id)  # a changed document starts a fresh record
                rec = docs[doc_id] = DocRecord(content_hash, int(n_tokens))
            row_id = ledger_row_id(doc_id, int(chunk))
            self.client.upsert(self.name, [{"id": row_id, "doc_id": doc_id, "chunk": int(chunk),
                                            "content_hash": content_hash, "n_tokens": int(n_tokens),
                                            "v": [0.0, 0.0]}])
        rec.chunks.add(int(chunk))
        self._row_ids.setdefault(doc_id, set()).add(row_id)

    def _delete_rows(self, doc_id: str) -> None:
        ids = sorted(self._row_ids.pop(doc_id, set()))
        if ids:
            self.client.delete(self.name, ids=ids)

    def forget(self, doc_id: str) -> None:
        if self.documents().pop(doc_id, None) is not None:
            with rpc(f"write ledger {self.name}", self.uri):
                self._delete_rows(doc_id)
