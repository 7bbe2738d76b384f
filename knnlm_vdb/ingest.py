"""Encode documents and stream their (key, next token) rows into a datastore.

Rows go to the store block by block, so the datastore never has to fit in memory.
Entry ids come from (domain, document, position): ingesting the same text twice adds
nothing the second time.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore.base import Datastore, entry_ids
from knnlm_vdb.encoder import Encoder

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    documents: int
    tokens: int
    added: int
    skipped: int
    encode_seconds: float
    store_seconds: float

    @property
    def seconds(self) -> float:
        return self.encode_seconds + self.store_seconds

    def to_dict(self) -> dict:
        return {**self.__dict__, "seconds": self.seconds,
                "encode_tokens_per_s": self.tokens / self.encode_seconds if self.encode_seconds else None,
                "ingest_entries_per_s": self.tokens / self.seconds if self.seconds else None}


def ingest(encoder: Encoder, store: Datastore, documents: list[Document], domain: str = "default",
           max_tokens: int | None = None, show_progress: bool = True) -> IngestReport:
    """Add every target token of ``documents`` (up to ``max_tokens`` in all) to ``store``."""
    tokenized = []
    budget = max_tokens
    for doc in documents:
        ids = encoder.tokenize(doc.text)
        if budget is not None:
            ids = ids[: budget + 1]  # n+1 tokens give n targets
            budget -= max(0, len(ids) - 1)
        if len(ids) >= 2:
            tokenized.append((doc, ids))
        if budget is not None and budget <= 0:
            break
    total = sum(len(ids) - 1 for _, ids in tokenized)
    report = IngestReport(documents=len(tokenized), tokens=0, added=0, skipped=0, encode_seconds=0.0, store_seconds=0.0)
    bar = tqdm(total=total, unit="tok", desc="encode", disable=not show_progress, smoothing=0.1)
    for doc, ids in tokenized:
        blocks = encoder.encode(ids, with_logprobs=False, progress=bar)
        while True:
            t0 = time.perf_counter()
            block = next(blocks, None)
            t1 = time.perf_counter()
            if block is None:
                break
            report.encode_seconds += t1 - t0
            added = store.add(entry_ids(domain, doc.doc_id, block.positions), block.keys, block.targets,
                              doc_ids=[doc.doc_id] * len(block), positions=block.positions)
            report.store_seconds += time.perf_counter() - t1
            report.tokens += len(block)
            report.added += added
            report.skipped += len(block) - added
    bar.close()
    t = time.perf_counter()
    store.flush()
    report.store_seconds += time.perf_counter() - t
    log.info("ingested %d tokens from %d documents: %d added, %d already present",
             report.tokens, report.documents, report.added, report.skipped)
    return report
