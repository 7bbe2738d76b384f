"""The ingest ledger: which chunks of which documents a datastore holds, and of what text.

Appends are made safe by two facts together:
  * entry ids are a pure function of (domain, document, position), and every store skips ids
    it already has, so re-encoding a chunk can never duplicate rows;
  * a chunk is recorded here only after its rows are durable in the store, so a chunk the
    ledger calls committed is never missing rows.
A crash between the two leaves a chunk stored but unrecorded: the next run re-encodes it and
adds nothing. The ledger is therefore an index of finished work (to skip it, and to notice
a document whose text changed), never the source of truth for the rows themselves.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from knnlm_vdb.io import atomic_write_json

CHUNK_TARGETS = 4096  # targets per chunk: the unit of resumption and of sharding


@dataclass
class DocRecord:
    content_hash: str
    n_tokens: int
    chunks: set[int] = field(default_factory=set)

    def n_chunks(self, chunk_targets: int) -> int:
        return chunk_count(self.n_tokens, chunk_targets)

    def complete(self, chunk_targets: int) -> bool:
        return len(self.chunks) >= self.n_chunks(chunk_targets)


def chunk_count(n_tokens: int, chunk_targets: int) -> int:
    """Chunks of a document with ``n_tokens`` tokens (targets are positions 1..n-1)."""
    return max(0, -(-(n_tokens - 1) // chunk_targets))


def chunk_range(chunk: int, chunk_targets: int, n_tokens: int) -> tuple[int, int]:
    """Target positions ``[lo, hi)`` of a chunk."""
    lo = 1 + chunk * chunk_targets
    return lo, min(lo + chunk_targets, n_tokens)


class Ledger(ABC):
    """Per-domain record of committed chunks; each backend keeps it durably beside its data."""

    @abstractmethod
    def documents(self) -> dict[str, DocRecord]:
        """Every document the domain holds (possibly partially)."""

    @abstractmethod
    def commit_chunk(self, doc_id: str, chunk: int, content_hash: str, n_tokens: int) -> None:
        """Record a chunk whose rows are already durable in the store."""

    @abstractmethod
    def forget(self, doc_id: str) -> None:
        """Drop a document's record (its rows must already be deleted)."""

    def get(self, doc_id: str) -> DocRecord | None:
        return self.documents().get(doc_id)


class JsonLedger(Ledger):
    """A sidecar JSON file replaced by atomic rename: readers see the old or the new file, never half."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._docs: dict[str, DocRecord] | None = None

    def documents(self) -> dict[str, DocRecord]:
        if self._docs is None:
            raw = json.loads(self.path.read_text()) if self.path.exists() else {}
            self._docs = {d: DocRecord(r["content_hash"], r["n_tokens"], set(r["chunks"])) for d, r in raw.items()}
        return self._docs

    def _save(self) -> None:
        atomic_write_json(self.path, {d: {"content_hash": r.content_hash, "n_tokens": r.n_tokens,
                                          "chunks": sorted(r.chunks)} for d, r in self.documents().items()})

    def commit_chunk(self, doc_id, chunk, content_hash, n_tokens) -> None:
        docs = self.documents()
        rec = docs.get(doc_id)
        if rec is None or rec.content_hash != content_hash:
            rec = docs[doc_id] = DocRecord(content_hash, n_tokens)
        rec.chunks.add(int(chunk))
        self._save()

    def forget(self, doc_id: str) -> None:
        if self.documents().pop(doc_id, None) is not None:
            self._save()
