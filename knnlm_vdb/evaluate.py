"""Perplexity of the base LM and of the kNN-LM over exactly the same tokens.

One forward pass per window gives both the LM's log-probabilities and the queries; the
search for one block runs in a worker thread while the LM encodes the next block (torch
and faiss/Milvus release the GIL), so retrieval hides behind the forward pass where it can.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from knnlm_vdb.datastore.base import Datastore
from knnlm_vdb.doc_cache import DocumentCache
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.knn import interpolate, knn_target_logprobs, perplexity
from knnlm_vdb.mixing import Mixer

log = logging.getLogger(__name__)

CACHE_TUNE_K = 256  # in-document neighbours kept per token for tuning the cache (its k is chosen up to this)


@dataclass
class Neighbours:
    """Everything needed to re-score a text offline under other k, T, λ (used by tuning)."""

    targets: np.ndarray  # int32 [n]
    lm_logprobs: np.ndarray  # float32 [n]
    distances: np.ndarray  # float32 [n, k]
    values: np.ndarray  # int32 [n, k]
    lm_entropy: np.ndarray  # float32 [n]
    lm_max_logprob: np.ndarray  # float32 [n]

    def knnlm_logprobs(self, k: int, temperature: float, lmbda) -> np.ndarray:
        knn = knn_target_logprobs(self.distances[:, :k], self.values[:, :k], self.targets, temperature)
        return interpolate(self.lm_logprobs, knn, lmbda)


@dataclass
class EvalResult:
    tokens: int
    base_ppl: float
    knnlm_ppl: float | None
    lm_seconds: float
    retrieval_seconds: float
    wall_seconds: float
    settings: dict = field(default_factory=dict)
    neighbours: Neighbours | None = None
    cache_neighbours: Neighbours | None = None  # keep_neighbours: the in-document cache's, for tuning it
    per_token: dict | None = None  # keep_tokens: lm, knn, mixed log-probs, λ, searched, keys (per scored token)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "base_ppl": self.base_ppl,
            "knnlm_ppl": self.knnlm_ppl,
            "base_tokens_per_s": self.tokens / self.lm_seconds if self.lm_seconds else None,
            "knnlm_tokens_per_s": self.tokens / self.wall_seconds if self.wall_seconds else None,
            "retrieval_seconds": self.retrieval_seconds,
            "lm_seconds": self.lm_seconds,
            "wall_seconds": self.wall_seconds,
            **self.settings,
        }


def _chain_blocks(encoder: Encoder, sequences: list[list[int]], progress):
    """(document index, block) for every block of every document, in order."""
    for doc, ids in enumerate(sequences):
        if len(ids) >= 2:
            for block in encoder.encode(ids, with_logprobs=True, progress=progress):
                yield doc, block


def _calibrations(calibration, stores) -> list | None:
    """One calibration per store: a single one serves every store (and merged search is then
    replaced by per-domain search, each domain weighed by its own evidence)."""
    if calibration is None:
        return None
    if isinstance(calibration, (list, tuple)):
        return list(calibration)
    return [calibration] * max(1, len(stores))


def evaluate(encoder: Encoder, token_ids: list[int] | list[list[int]], stores: list[Datastore] | None = None,
             k: int = 1024, temperature: float = 1.0, lmbda: float = 0.25, keep_neighbours: bool = False,
             show_progress: bool = True, calibration=None, settings=None, keep_tokens: bool = False) -> EvalResult:
    """Score every target of ``token_ids`` (one sequence or several documents) under the LM and,
    given stores, under the kNN-LM.

    With a ``calibration`` (adaptive.Calibration, or one per store; ``--lambda auto``) λ is set
    per token and per domain from the retrieval evidence and the document read so far
    (``mixing.Mixer``), and searches the LM alone can answer are skipped; ``k`` and
    ``temperature`` then come from the calibration.
    """
    stores = stores or []
    cache_cal = None
    if settings is not None:  # knn_settings.Fixed | Adaptive
        k, temperature, lmbda = settings.k, settings.temperature, settings.lmbda
        calibration = list(settings.calibrations) if settings.adaptive else None
        cache_cal = settings.cache if settings.adaptive else None
    cals = _calibrations(calibration, stores)
    if cals is not None:
        k, temperature, lmbda = cals[0].k, cals[0].temperature, "auto"
        mixer = Mixer(stores, calibrations=cals, cache=cache_cal) if stores else None
    else:
        mixer = Mixer(stores, k, temperature, lmbda)
    if keep_neighbours and mixer is not None and len(mixer.groups) > 1:
        raise KnnlmError("keeping neighbours needs one search group: fixed λ, or a single domain")
    sequences = [token_ids] if token_ids and isinstance(token_ids[0], int) else list(token_ids)
    n_targets = sum(max(0, len(ids) - 1) for ids in sequences)
    lm_parts, mixed_parts, lam_parts, kept, detail, kept_cache = [], [], [], [], [], []
    lm_seconds = retrieval_seconds = 0.0
    searched = 0
    trust, trust_doc = None, -1
    cache_doc, cache, tuning = -1, None, None  # the document's caches: the mixer's, and the one tuning reads

    def retrieve(block, cache, tuning):
        t = time.perf_counter()
        found = mixer.retrieve(block.keys, mixer.search_masks(block.lm_entropy, block.lm_max_logprob),
                               cache, block.targets if cache is not None else None)
        near = None
        if tuning is not None:
            near = tuning.search(block.keys, CACHE_TUNE_K, block.keys, block.targets)
            tuning.add(block.keys, block.targets)
        return found, near, time.perf_counter() - t

    bar = tqdm(total=n_targets, unit="tok", desc="eval", disable=not show_progress, smoothing=0.1)
    wall0 = time.perf_counter()
    pending = None  # (doc, block, future) whose search is in flight
    with ThreadPoolExecutor(max_workers=1) as pool:
        blocks = _chain_blocks(encoder, sequences, bar)
        while True:
            t0 = time.perf_counter()
            item = next(blocks, None)
            lm_seconds += time.perf_counter() - t0
            if pending is not None:
                doc, prev, fut = pending
                found, near, secs = fut.result()
                retrieval_seconds += secs
                searched += int(mixer.searched(found).sum())
                if doc != trust_doc:
                    trust, trust_doc = mixer.new_document(), doc
                mixed, lam, knn = mixer.score(trust, prev.targets, prev.lm_logprobs, prev.lm_entropy,
                                              prev.lm_max_logprob, found)
                mixed_parts.append(mixed)
                lam_parts.append(lam)
                if keep_tokens:
                    detail.append((knn, mixer.searched(found), prev.keys))
                if keep_neighbours:
                    f = found[0]
                    kept.append((prev.targets, prev.lm_logprobs, f.distances, f.values, prev.lm_entropy,
                                 prev.lm_max_logprob))
                    if near is not None:
                        kept_cache.append((prev.targets, prev.lm_logprobs, *near, prev.lm_entropy,
                                           prev.lm_max_logprob))
                pending = None
            if item is None:
                break
            doc, block = item
            lm_parts.append(block.lm_logprobs)
            if stores:
                if doc != cache_doc:  # a new document: fresh caches (blocks come in document order)
                    cache_doc, cache = doc, mixer.new_cache()
                    tuning = DocumentCache() if keep_neighbours else None
                pending = (doc, block, pool.submit(retrieve, block, cache, tuning))
    wall = time.perf_counter() - wall0
    bar.close()
    lm_logprobs = np.concatenate(lm_parts) if lm_parts else np.zeros(0, np.float32)
    knnlm_ppl = None
    neighbours = cache_neighbours = None
    summary = {"k": k, "temperature": temperature, "lambda": lmbda, "ctx": encoder.ctx, "stride": encoder.stride}
    if stores:
        lambdas = np.concatenate(lam_parts)
        knnlm_ppl = perplexity(np.concatenate(mixed_parts))
        summary["searched_fraction"] = searched / max(1, len(lm_logprobs))
        summary["mean_lambda"] = float(lambdas.mean()) if len(lambdas) else None
        if keep_neighbours:
            neighbours = Neighbours(*(np.concatenate(parts) for parts in zip(*kept)))
            cache_neighbours = Neighbours(*(np.concatenate(parts) for parts in zip(*kept_cache)))
    per_token = None
    if keep_tokens:
        per_token = {"lm": lm_logprobs.astype(np.float64)}
        if stores:
            knn, searched_t, keys = (np.concatenate(p) for p in zip(*detail))
            per_token.update(knn=knn, mixed=np.concatenate(mixed_parts), lambdas=np.concatenate(lam_parts),
                             searched=searched_t, keys=keys)
    return EvalResult(
        tokens=len(lm_logprobs),
        base_ppl=perplexity(lm_logprobs),
        knnlm_ppl=knnlm_ppl,
        lm_seconds=lm_seconds,
        retrieval_seconds=retrieval_seconds,
        wall_seconds=wall,
        settings=summary,
        neighbours=neighbours,
        cache_neighbours=cache_neighbours,
        per_token=per_token,
    )


def tune(neighbours: Neighbours, ks=(8, 16, 32, 64, 128, 256, 512, 1024),
         temperatures=(0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
         lambdas=tuple(np.round(np.arange(0.05, 0.61, 0.05), 2))) -> dict:
    """Grid search of k, T and λ on held-out neighbours; returns the best setting and the grid."""
    best = None
    grid = []
    max_k = neighbours.distances.shape[1]
    for k in [k for k in ks if k <= max_k] or [max_k]:
        for t in temperatures:
            knn = knn_target_logprobs(neighbours.distances[:, :k], neighbours.values[:, :k], neighbours.targets, t)
            for lam in lambdas:
                ppl = perplexity(interpolate(neighbours.lm_logprobs, knn, float(lam)))
                grid.append({"k": k, "temperature": t, "lambda": float(lam), "ppl": ppl})
                if best is None or ppl < best["ppl"]:
                    best = grid[-1]
    return {"best": best, "base_ppl": perplexity(neighbours.lm_logprobs), "grid": grid}


TUNE_KS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def tune_datastore(encoder: Encoder, store: Datastore, sequences, max_k: int = 1024, adaptive: bool = True,
                   save: bool = True, show_progress: bool = True) -> dict:
    """Pick k, T and λ on validation ``sequences`` (and fit ``--lambda auto``'s calibration) for
    ``store``; with ``save`` they are stored with it, where every later run finds them.

    One LM pass and one search at ``max_k``: every smaller k, every T and λ re-score the kept
    neighbours offline, so the cost is one evaluation of the validation text."""
    res = evaluate(encoder, sequences, [store], k=max_k, keep_neighbours=True, show_progress=show_progress)
    grid = tune(res.neighbours, ks=[k for k in TUNE_KS if k <= max_k] or [max_k])
    best = grid["best"]
    report = {"best": best, "base_ppl": grid["base_ppl"], "tokens": res.tokens, "grid": grid["grid"]}
    tuned = {"k": best["k"], "temperature": best["temperature"], "lambda": best["lambda"], "valid_ppl": best["ppl"],
             "valid_base_ppl": grid["base_ppl"], "valid_tokens": res.tokens}
    if save:
        store.set_extra("tuned", tuned)
    if adaptive:
        from knnlm_vdb.adaptive import fit_calibration

        cal, fit = fit_calibration(res.neighbours, best["k"], best["temperature"])
        if save:
            store.set_extra("calibration", cal.to_dict())
        report["auto"] = {k: v for k, v in fit.items() if k != "skip_curve"}
        report["calibration"] = cal
        cache_cal, report["cache"] = tune_cache(res.cache_neighbours)
        if save:
            store.set_extra("cache_calibration", cache_cal.to_dict())
        report["cache_calibration"] = cache_cal
    return report


def tune_cache(neighbours: Neighbours) -> tuple:
    """The in-document cache's k and T (grid, as for a datastore) and its adaptive calibration,
    fitted on the cache's own neighbours of the validation text: -> (Calibration, report).
    Fitted alone against the LM, like each domain: the mixture then weighs the parts by evidence."""
    from knnlm_vdb.adaptive import fit_calibration

    grid = tune(neighbours, ks=[k for k in TUNE_KS if k <= CACHE_TUNE_K])
    best = grid["best"]
    cal, fit = fit_calibration(neighbours, best["k"], best["temperature"])
    return cal, {"k": best["k"], "temperature": best["temperature"], "fixed_lambda": best["lambda"],
                 "valid_fixed_ppl": best["ppl"], **{k: v for k, v in fit.items() if k != "skip_curve"}}
