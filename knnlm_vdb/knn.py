"""The kNN-LM arithmetic: p_kNN from neighbours, and its mixture with the LM. No I/O.

    p_kNN(w) ∝ Σ_{neighbours j with value w} exp(-d_j / T)        (d = squared L2)
    log p(w) = logaddexp(log(1-λ) + log p_LM(w), log λ + log p_kNN(w))

Everything is computed in log space in float64: a target no neighbour agrees with has
log p_kNN = -inf, which must give log(1-λ) + log p_LM, never NaN. Missing neighbours
(a store with fewer than k entries) are marked by value -1 and carry no mass.
"""
from __future__ import annotations

import math

import numpy as np

from knnlm_vdb.errors import InvalidInput, KnnlmError
from knnlm_vdb.settings import MAX_K


def check_params(lmbda: float | None = None, k: int | None = None, temperature: float | None = None) -> None:
    """Reject settings that would silently give nonsense."""
    if lmbda is not None and not 0.0 <= lmbda <= 1.0:
        raise InvalidInput(f"--lambda must be in [0, 1], got {lmbda}")
    if k is not None and not 1 <= k <= MAX_K:
        raise InvalidInput(f"--k must be a positive integer at most {MAX_K}, got {k}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise InvalidInput(f"--temperature must be a positive finite number, got {temperature}")


def _neighbour_logits(distances: np.ndarray, values: np.ndarray, temperature: float) -> np.ndarray:
    logits = -np.asarray(distances, dtype=np.float64) / temperature
    return np.where(np.asarray(values) >= 0, logits, -np.inf)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def knn_target_logprobs(distances: np.ndarray, values: np.ndarray, targets: np.ndarray,
                        temperature: float) -> np.ndarray:
    """log p_kNN(target) for each row ``[n]`` from neighbours ``[n, k]``; -inf where none agree."""
    logits = _neighbour_logits(distances, values, temperature)
    total = _logsumexp(logits)
    hits = np.where(np.asarray(values) == np.asarray(targets)[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        out = _logsumexp(hits) - total
    return np.where(np.isfinite(total), out, -np.inf)


def knn_distribution(distances: np.ndarray, values: np.ndarray, vocab_size: int,
                     temperature: float) -> np.ndarray:
    """Full log p_kNN over the vocabulary for one query (``distances``/``values`` are ``[k]``)."""
    logits = _neighbour_logits(distances[None], values[None], temperature)[0]
    keep = np.isfinite(logits)
    probs = np.zeros(vocab_size, dtype=np.float64)
    if keep.any():
        w = np.exp(logits[keep] - logits[keep].max())
        np.add.at(probs, np.asarray(values)[keep].astype(np.int64), w / w.sum())
    with np.errstate(divide="ignore"):
        return np.log(probs)


def interpolate(lm_logprobs, knn_logprobs, lmbda):
    """log((1-λ)·p_LM + λ·p_kNN), elementwise; λ may be a scalar or per-token array."""
    lm = np.asarray(lm_logprobs, dtype=np.float64)
    knn = np.asarray(knn_logprobs, dtype=np.float64)
    lam = np.broadcast_to(np.asarray(lmbda, dtype=np.float64), np.broadcast(lm, knn).shape)
    with np.errstate(divide="ignore"):
        a = np.where(lam < 1.0, np.log1p(-np.minimum(lam, 1.0)) + lm, -np.inf)
        b = np.where(lam > 0.0, np.log(np.maximum(lam, 0.0)) + knn, -np.inf)
    both_dead = np.isneginf(a) & np.isneginf(b)
    with np.errstate(invalid="ignore"):
        out = np.logaddexp(a, b)
    return np.where(both_dead, -np.inf, out)


def perplexity(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-likelihood (natural log)."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.size == 0:
        raise KnnlmError("no tokens were scored")
    return float(np.exp(-logprobs.mean()))
