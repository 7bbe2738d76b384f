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

from knnlm_vdb.datastore.base import Datastore, merge_topk
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.knn import check_params, interpolate, knn_target_logprobs, perplexity

log = logging.getLogger(__name__)


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


def search_all(stores: list[Datastore], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over several stores (domains), merged by distance."""
    return merge_topk([s.search(queries, k) for s in stores], k)


def _chain_blocks(encoder: Encoder, sequences: list[list[int]], progress):
    for ids in sequences:
        if len(ids) >= 2:
            yield from encoder.encode(ids, with_logprobs=True, progress=progress)


def evaluate(encoder: Encoder, token_ids: list[int] | list[list[int]], stores: list[Datastore] | None = None,
             k: int = 1024, temperature: float = 1.0, lmbda: float = 0.25, keep_neighbours: bool = False,
             show_progress: bool = True, calibration=None) -> EvalResult:
    """Score every target of ``token_ids`` (one sequence or several documents) under the LM and,
    given stores, under the kNN-LM.

    With a ``calibration`` (adaptive.Calibration; ``--lambda auto``) λ is set per token from
    the retrieval evidence, and searches the LM alone can answer are skipped; ``k`` and
    ``temperature`` then come from the calibration.
    """
    if calibration is not None:
        k, temperature, lmbda = calibration.k, calibration.temperature, "auto"
        check_params(k=k, temperature=temperature)
    else:
        check_params(lmbda=lmbda, k=k, temperature=temperature)
    stores = stores or []
    sequences = [token_ids] if token_ids and isinstance(token_ids[0], int) else list(token_ids)
    n_targets = sum(max(0, len(ids) - 1) for ids in sequences)
    lm_parts, knn_parts, lam_parts, kept = [], [], [], []
    lm_seconds = retrieval_seconds = 0.0
    searched = 0

    def retrieve(block):
        t = time.perf_counter()
        n = len(block)
        mask = np.ones(n, bool) if calibration is None else calibration.search_mask(block.lm_entropy,
                                                                                   block.lm_max_logprob)
        dist = np.full((n, k), np.inf, np.float32)
        vals = np.full((n, k), -1, np.int32)
        if mask.any():
            dist[mask], vals[mask] = search_all(stores, block.keys[mask], k)
        return mask, dist, vals, time.perf_counter() - t

    bar = tqdm(total=n_targets, unit="tok", desc="eval", disable=not show_progress, smoothing=0.1)
    wall0 = time.perf_counter()
    pending = None  # (block, future) whose search is in flight
    with ThreadPoolExecutor(max_workers=1) as pool:
        blocks = _chain_blocks(encoder, sequences, bar)
        while True:
            t0 = time.perf_counter()
            block = next(blocks, None)
            lm_seconds += time.perf_counter() - t0
            if pending is not None:
                prev, fut = pending
                mask, dist, vals, secs = fut.result()
                retrieval_seconds += secs
                searched += int(mask.sum())
                knn_parts.append(knn_target_logprobs(dist, vals, prev.targets, temperature))
                lam_parts.append(np.full(len(prev), lmbda, np.float64) if calibration is None else
                                 calibration.lambdas(dist, prev.lm_entropy, prev.lm_max_logprob, mask))
                if keep_neighbours:
                    kept.append((prev.targets, prev.lm_logprobs, dist, vals, prev.lm_entropy, prev.lm_max_logprob))
                pending = None
            if block is None:
                break
            lm_parts.append(block.lm_logprobs)
            if stores:
                pending = (block, pool.submit(retrieve, block))
    wall = time.perf_counter() - wall0
    bar.close()
    lm_logprobs = np.concatenate(lm_parts) if lm_parts else np.zeros(0, np.float32)
    knnlm_ppl = None
    neighbours = None
    settings = {"k": k, "temperature": temperature, "lambda": lmbda, "ctx": encoder.ctx, "stride": encoder.stride}
    if stores:
        lambdas = np.concatenate(lam_parts)
        knnlm_ppl = perplexity(interpolate(lm_logprobs, np.concatenate(knn_parts), lambdas))
        settings["searched_fraction"] = searched / max(1, len(lm_logprobs))
        settings["mean_lambda"] = float(lambdas.mean()) if len(lambdas) else None
        if keep_neighbours:
            neighbours = Neighbours(*(np.concatenate(parts) for parts in zip(*kept)))
    return EvalResult(
        tokens=len(lm_logprobs),
        base_ppl=perplexity(lm_logprobs),
        knnlm_ppl=knnlm_ppl,
        lm_seconds=lm_seconds,
        retrieval_seconds=retrieval_seconds,
        wall_seconds=wall,
        settings=settings,
        neighbours=neighbours,
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
