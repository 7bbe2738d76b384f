"""Encode documents and stream their (key, next token) rows into a datastore, resumably.

Rows go to the store chunk by chunk, so the datastore never has to fit in memory. Entry ids
come from (domain, document, position) and stores skip ids they hold, so ingesting the same
text twice adds nothing; the ledger (ledger.py) records finished chunks so a re-run after a
crash skips them, and notices documents whose text changed.

``shard=(i, n)`` takes chunk ``c`` of document ``d`` iff ``(seed(d) + c) % n == i``: n workers
given the same input fill one domain without coordinating.
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore.base import Datastore, entry_ids
from knnlm_vdb.datastore.ledger import CHUNK_TARGETS, chunk_count, chunk_range
from knnlm_vdb.encoder import Encoder, sliding_windows
from knnlm_vdb.errors import KnnlmError

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    documents: int = 0
    tokens: int = 0
    added: int = 0
    skipped: int = 0
    chunks_done: int = 0
    chunks_already_committed: int = 0
    replaced: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # text differs from the ingested version, not replaced
    encode_seconds: float = 0.0  # in the LM
    store_seconds: float = 0.0  # in the datastore (overlaps encoding: writes run in their own thread)
    seconds: float = 0.0  # wall clock

    def to_dict(self) -> dict:
        return {**self.__dict__,
                "encode_tokens_per_s": self.tokens / self.encode_seconds if self.encode_seconds else None,
                "ingest_entries_per_s": self.tokens / self.seconds if self.seconds else None}


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise KnnlmError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise KnnlmError(f"--shard {text}: need N >= 1 and 0 <= i < N")
    return i, n


def _doc_seed(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=4).digest(), "little")


def budgeted(n_tokens: int, budget: int | None) -> tuple[int, int | None]:
    """How many of a document's ``n_tokens`` tokens go in under a ``budget`` of targets (None: no
    limit; n+1 tokens give n targets) -> (token limit, budget left). One rule for ``ingest`` and
    ``sample_keys``, so the projection's sample covers exactly what the build stores."""
    if budget is None:
        return n_tokens, None
    limit = min(n_tokens, budget + 1)
    return limit, budget - max(0, limit - 1)


def sample_keys(encoder: Encoder, documents: list[Document], rows: int, max_tokens: int | None = None) -> np.ndarray:
    """The keys of about ``rows`` targets spread evenly over what ingesting ``documents`` (up to
    ``max_tokens`` targets) stores: what a build fits its key projection on (projection.py),
    before any row is stored.

    Whole encoder windows are picked at an even stride (all of their keys are kept, so the
    count is ``rows`` give or take a window), so each sampled key has the context a full pass
    gives it and costs no more to encode. Why not the first keys: corpora come in
    order (a docs tree by path), and a projection fitted on the first topics alone drops the
    directions the later ones need (pydocs, 408k entries: pca128 +1.36% vs exact perplexity
    fitted on the first 32,768 keys, +0.94% on keys spread over the store; benchmarks/compress.py).
    """
    windows = []  # (document index, first target, end) of every window the store's targets come from
    budget = max_tokens
    for d, doc in enumerate(documents):
        n, budget = budgeted(len(encoder.tokenize(doc.text)), budget)
        if n >= 2:
            windows += [(d, w.score_from, w.end) for w in sliding_windows(n, encoder.ctx, encoder.stride)]
        if budget is not None and budget <= 0:
            break
    total = sum(hi - lo for _, lo, hi in windows)
    picked = windows
    if total > rows:
        per = total / len(windows)
        every = np.linspace(0, len(windows) - 1, max(1, round(rows / per)), dtype=np.int64)
        picked = [windows[i] for i in np.unique(every)]
    parts, current, ids = [], None, []
    for d, lo, hi in picked:
        if d != current:  # picked windows come in document order: tokenize each picked document once
            current, ids = d, encoder.tokenize(documents[d].text)
        for block in encoder.encode(ids, with_logprobs=False, target_range=(lo, hi)):
            parts.append(np.asarray(block.keys, dtype=np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.lm.hidden_size), np.float32)


def ingest(encoder: Encoder, store: Datastore, documents: list[Document], domain: str = "default",
           max_tokens: int | None = None, show_progress: bool = True, shard: tuple[int, int] = (0, 1),
           replace: bool = False, chunk_targets: int = CHUNK_TARGETS) -> IngestReport:
    """Add every target token of ``documents`` (up to ``max_tokens`` in all) to ``store``."""
    ledger = store.ledger()
    known = ledger.documents()
    report = IngestReport()
    plan = []  # (doc, token ids, chunks to do, how many targets to keep)
    budget = max_tokens
    for doc in documents:
        rec = known.get(doc.doc_id)
        if rec is not None and rec.content_hash != doc.content_hash:
            if not replace:
                log.warning("document %r changed since it was ingested; skipped (use --replace)", doc.doc_id)
                report.changed.append(doc.doc_id)
                continue
            removed = store.delete_ids(entry_ids(domain, doc.doc_id, np.arange(1, rec.n_tokens)))
            ledger.forget(doc.doc_id)
            log.info("replacing %r: removed %d old entries", doc.doc_id, removed)
            report.replaced.append(doc.doc_id)
            rec = None
        ids = encoder.tokenize(doc.text)
        limit, budget = budgeted(len(ids), budget)
        done = rec.chunks if rec is not None else set()
        chunks = []
        for c in range(chunk_count(limit, chunk_targets)):
            if (_doc_seed(doc.doc_id) + c) % shard[1] != shard[0]:
                continue
            if c in done:
                report.chunks_already_committed += 1
                continue
            chunks.append(c)
        if chunks:
            plan.append((doc, ids, chunks, limit))
        if budget is not None and budget <= 0:
            break

    total = sum(hi - lo for _, _, chunks, limit in plan for lo, hi in
                (chunk_range(c, chunk_targets, limit) for c in chunks))
    bar = tqdm(total=total, unit="tok", desc="encode", disable=not show_progress, smoothing=0.1)
    wall0 = time.perf_counter()

    def write(doc_id, block):  # runs in the writer thread while the LM encodes the next block
        t = time.perf_counter()
        added = store.add(entry_ids(domain, doc_id, block.positions), block.keys, block.targets,
                          doc_ids=[doc_id] * len(block), positions=block.positions)
        return added, len(block), time.perf_counter() - t

    def settle(futures):
        for fut in futures:
            added, n, secs = fut.result()
            report.added += added
            report.skipped += n - added
            report.tokens += n
            report.store_seconds += secs

    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = []
        for doc, ids, chunks, limit in plan:
            report.documents += 1
            for c in chunks:
                lo, hi = chunk_range(c, chunk_targets, limit)
                blocks = encoder.encode(ids, with_logprobs=False, progress=bar, target_range=(lo, hi))
                while True:
                    t0 = time.perf_counter()
                    block = next(blocks, None)
                    report.encode_seconds += time.perf_counter() - t0
                    if block is None:
                        break
                    if len(pending) > 1:  # at most one write queued behind the running one
                        settle([pending.pop(0)])
                    pending.append(writer.submit(write, doc.doc_id, block))
                settle(pending)
                pending.clear()
                t = time.perf_counter()
                store.flush()  # rows durable before the ledger says so
                if (lo, hi) == chunk_range(c, chunk_targets, len(ids)):  # a chunk cut short by --max-tokens stays open
                    ledger.commit_chunk(doc.doc_id, c, doc.content_hash, len(ids))
                report.store_seconds += time.perf_counter() - t
                report.chunks_done += 1
    bar.close()
    report.seconds = time.perf_counter() - wall0
    log.info("ingested %d tokens from %d documents: %d added, %d already present",
             report.tokens, report.documents, report.added, report.skipped)
    return report
