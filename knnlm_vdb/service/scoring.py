"""The kNN-LM for a batch of independent requests: one LM forward, one search per (domains, k).

Serving many small requests one by one wastes both the LM (tiny matrix products) and the
vector database (one round trip per query). Here the windows of every request in a batch
go through the LM together, right-padded to one length: with causal attention a pad token
only follows the real ones, so it cannot change their hidden states, and positions start at
0 in every row as they do offline. The windows are the ones ``Encoder.encode`` uses and λ is
applied by the same ``mixing.Mixer`` as ``evaluate`` uses (fixed, or per token and per domain
from calibrations), so a text scores the same here as offline, up to float rounding of other
batch shapes. Each Score request is one document for the adaptive per-document trust.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from knnlm_vdb.encoder import Encoder, sliding_windows
from knnlm_vdb.errors import BackendUnavailable, KnnlmError
from knnlm_vdb.knn import perplexity
from knnlm_vdb.mixing import Found, Mixer

log = logging.getLogger(__name__)

class DatastoreUnavailable(BackendUnavailable):
    """A datastore failed while serving a request (network, server or disk), not the request itself."""

    def __init__(self, domains, cause: BaseException):
        self.domains = tuple(domains)
        self.cause = cause
        super().__init__(f"datastore for domain(s) {', '.join(self.domains)} is unavailable: "
                         f"{str(cause) or type(cause).__name__}")


@dataclass
class Job:
    """One request's work. ``top_n == 0``: score every token; else the next-token distribution.

    ``calibrations`` (one adaptive.Calibration per domain) replace the fixed ``lmbda`` by a
    per-token, per-domain λ and skip the searches their pre-search gates deem useless.
    """

    token_ids: list[int]
    domains: tuple[str, ...]
    stores: tuple
    k: int
    temperature: float
    lmbda: float | None
    top_n: int = 0
    calibrations: tuple | None = None
    cache: object = None  # the in-document cache's adaptive.Calibration (adaptive only): a Score text reads itself
    keep_keys: bool = False  # keep ``keys`` (the scored tokens' queries), e.g. to report their neighbours
    # filled by Scorer.run
    base: np.ndarray | None = None  # score: log p_LM [n-1]; next: log p_LM over the vocabulary [V]
    knn: np.ndarray | None = None
    mixed: np.ndarray | None = None
    lambdas: np.ndarray | None = None  # λ per scored token (one for next)
    searched: np.ndarray | None = None  # bool per query: its neighbours were searched
    top: np.ndarray | None = None  # next: the top_n token ids by mixed probability
    keys: np.ndarray | None = None  # with keep_keys: the query of each scored token
    _keys: list = field(default_factory=list, repr=False)
    _base: list = field(default_factory=list, repr=False)
    _feats: list = field(default_factory=list, repr=False)
    _mixer: Mixer | None = field(default=None, repr=False)

    @property
    def mixer(self) -> Mixer:
        if self._mixer is None:
            self._mixer = Mixer(self.stores, self.k, self.temperature, self.lmbda, self.calibrations, self.cache)
        return self._mixer

    @property
    def adaptive(self) -> bool:
        return self.calibrations is not None

    @property
    def scores_text(self) -> bool:
        return self.top_n == 0

    @property
    def base_ppl(self) -> float:
        return perplexity(self.base)

    @property
    def knnlm_ppl(self) -> float:
        return perplexity(self.mixed)


@dataclass
class _Row:
    """A window of one job in the LM batch, and the positions whose keys/log-probs it yields."""

    job: Job
    ids: list[int]
    query_cols: np.ndarray  # columns (in the window) whose state is a query
    targets: np.ndarray | None  # score: the next tokens; next: None (keep the full distribution)


def _cat(parts) -> np.ndarray:
    return np.concatenate([np.asarray(p) for _, p in parts])


class Scorer:
    """Runs batches of jobs on one encoder. Not thread-safe: one caller at a time (the batcher's worker)."""

    def __init__(self, encoder: Encoder, max_batch_tokens: int | None = None, pad_id: int = 0, metrics=None):
        self.encoder = encoder
        self.metrics = metrics  # service.metrics.Metrics: search latency and failures, or None
        self.max_batch_tokens = max_batch_tokens or encoder.batch_size * encoder.ctx
        self.pad_id = pad_id

    def _rows(self, job: Job) -> list[_Row]:
        ids, ctx = job.token_ids, self.encoder.ctx
        if not job.scores_text:
            begin = max(0, len(ids) - ctx)
            return [_Row(job, ids[begin:], np.array([len(ids) - 1 - begin]), None)]
        rows = []
        for w in sliding_windows(len(ids), ctx, self.encoder.stride):
            cols = np.arange(w.score_from - 1 - w.begin, w.end - 1 - w.begin)
            rows.append(_Row(job, ids[w.begin:w.end], cols, np.asarray(ids[w.score_from:w.end], dtype=np.int64)))
        return rows

    def _micro_batches(self, rows: list[_Row]):
        """Rows by descending length, packed so padded tokens per forward stay under the budget."""
        rows = sorted(rows, key=lambda r: len(r.ids), reverse=True)
        batch: list[_Row] = []
        for r in rows:
            if batch and len(batch[0].ids) * (len(batch) + 1) > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(r)
        if batch:
            yield batch

    def _forward(self, batch: list[_Row]) -> None:
        """Keys, log p_LM (of the target, or of the whole vocabulary) and the gate features for
        every query of ``batch``, through the encoder's one ``rows`` path."""
        import torch

        enc = self.encoder
        ids = torch.full((len(batch), len(batch[0].ids)), self.pad_id, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        offsets = np.cumsum([0] + [len(r.query_cols) for r in batch])
        targets = np.concatenate(
            [r.targets if r.targets is not None else np.zeros(len(r.query_cols), np.int64) for r in batch])
        full_rows = [b for b, r in enumerate(batch) if r.targets is None]
        with torch.inference_mode():
            keys, hidden = enc.forward(ids.to(enc.lm.device))
            rows_t = torch.cat([torch.full((len(r.query_cols),), b, dtype=torch.long) for b, r in enumerate(batch)])
            cols_t = torch.cat([torch.as_tensor(r.query_cols, dtype=torch.long) for r in batch])
            out = enc.rows(keys, hidden, rows_t, cols_t, targets, features=any(r.job.adaptive for r in batch))
            full = {}
            if full_rows:  # next-token jobs: one query each, the whole distribution
                pick = torch.as_tensor([int(offsets[b]) for b in full_rows])
                dist = enc.rows(keys, hidden, rows_t[pick], cols_t[pick], features=False, full=True).logprobs
                full = {b: dist[i].cpu().numpy() for i, b in enumerate(full_rows)}
        for b, r in enumerate(batch):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            r.job._keys.append((r, out.keys[lo:hi]))
            r.job._base.append((r, full[b][None] if r.targets is None else out.target_logprobs[lo:hi]))
            r.job._feats.append((r, np.stack([out.entropy[lo:hi], out.max_logprob[lo:hi]], axis=1)))

    def run(self, jobs: list[Job]) -> dict[int, BaseException]:
        """Fill each job's results in place; returns ``{index: error}`` for jobs that failed."""
        errors: dict[int, BaseException] = {}
        rows = [r for job in jobs for r in self._rows(job)]
        order = {id(r): i for i, r in enumerate(rows)}
        for batch in self._micro_batches(rows):
            self._forward(batch)
        masks, found = [], []
        for job in jobs:  # back to document order, which sorting by length broke
            for parts in (job._keys, job._base, job._feats):
                parts.sort(key=lambda t: order[id(t[0])])
            feats = _cat(job._feats)
            masks.append(job.mixer.search_masks(feats[:, 0], feats[:, 1]))
            stores_masks = masks[-1][:len(job.mixer.groups)]
            job.searched = np.any(stores_masks, axis=0) if stores_masks else np.zeros(len(feats), bool)
            found.append([None] * len(masks[-1]))
        # one search per (stores, k) across the batch's jobs
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, job in enumerate(jobs):
            for g, stores in enumerate(job.mixer.groups):
                groups.setdefault((tuple(id(s) for s in stores), job.mixer.ks[g]), []).append((i, g))
        for (_, k), members in groups.items():
            queries = [_cat(jobs[i]._keys)[masks[i][g]] for i, g in members]
            sizes = np.cumsum([0] + [len(q) for q in queries])
            dist = np.full((int(sizes[-1]), k), np.inf, np.float32)
            vals = np.full((int(sizes[-1]), k), -1, np.int32)
            if sizes[-1]:
                i0, g0 = members[0]
                try:
                    with self.metrics.search(jobs[i0].mixer.groups[g0]) if self.metrics else nullcontext():
                        dist, vals = jobs[i0].mixer.search(g0, np.concatenate(queries))
                except Exception as exc:  # the store's failure, not the request's: report it, keep serving
                    names = [d for i, _ in members for d in jobs[i].domains]
                    log.warning("search in %s failed: %s", ", ".join(dict.fromkeys(names)), exc)
                    for i, _ in members:  # a typed library error keeps its own code (errors.ERROR_TABLE)
                        typed = isinstance(exc, KnnlmError) and not isinstance(exc, BackendUnavailable)
                        errors[i] = exc if typed else DatastoreUnavailable(jobs[i].domains, exc)
                    continue
            for j, (i, g) in enumerate(members):
                found[i][g] = Found.place(masks[i][g], k, dist[sizes[j]:sizes[j + 1]], vals[sizes[j]:sizes[j + 1]])
        for i, job in enumerate(jobs):
            if i not in errors:
                self._finish(job, found[i], masks[i])
            if job.keep_keys and i not in errors:
                job.keys = _cat(job._keys)
            job._keys, job._base, job._feats = [], [], []
        return errors

    @staticmethod
    def _finish(job: Job, found: list[Found], masks: list[np.ndarray]) -> None:
        feats = _cat(job._feats)
        trust = job.mixer.new_document()  # a request is one document
        if job.mixer.cache is not None:  # the cache part: the text's own earlier positions (a Score text only)
            mask = masks[-1]
            targets = np.asarray(job.token_ids[1:], dtype=np.int64) if job.scores_text else None
            found[-1] = job.mixer.search_cache(job.mixer.new_cache() if job.scores_text else None, _cat(job._keys),
                                               mask, targets)
        if job.scores_text:
            job.base = _cat(job._base).astype(np.float64)
            targets = np.asarray(job.token_ids[1:], dtype=np.int64)
            job.mixed, job.lambdas, job.knn = job.mixer.score(trust, targets, job.base, feats[:, 0], feats[:, 1], found)
            return
        job.base = np.asarray(job._base[0][1][0], dtype=np.float64)
        job.mixed, lam, job.knn = job.mixer.next_token(trust, job.base, feats[:1, 0], feats[:1, 1], found)
        job.lambdas = np.array([lam])
        n = min(job.top_n, len(job.base))
        top = np.argpartition(-job.mixed, n - 1)[:n]
        job.top = top[np.argsort(-job.mixed[top], kind="stable")]
