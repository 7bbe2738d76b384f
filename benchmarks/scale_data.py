"""Keys for the scale benchmark: real keys, a PCA to a smaller dimension, resampling with noise,
held-out queries, and exact top-k ground truth streamed in chunks.

Entry ``i`` of a synthetic datastore is regenerated from ``(seed, i // chunk)`` whenever it is
needed, so 10M entries never sit in memory twice (once for Milvus, once for the ground truth).
Each entry is a projected real key chosen uniformly with replacement plus isotropic Gaussian
noise whose norm is ``noise`` × the median nearest-neighbour distance among the projected real
keys: neighbour structure and distance scale follow the real keys. Queries are projected
held-out real keys (never resampled into the datastore) with the same noise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 50_000  # rows per generated chunk (the unit of determinism)


def read_real_keys(path: str | Path, limit: int | None = None) -> np.ndarray:
    """The committed keys of a FAISS flat datastore (``meta.json`` + ``keys.bin``), as float32, read-only."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    n, dim = int(meta["count"]), int(meta["info"]["dim"])
    n = n if limit is None else min(n, limit)
    keys = np.memmap(path / "keys.bin", dtype=meta.get("key_dtype", "float16"), mode="r", shape=(n, dim))
    return np.asarray(keys, dtype=np.float32)


def fit_pca(keys: np.ndarray, dim: int, sample: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, components [in_dim, dim], explained variance fraction) of a PCA fitted on a sample."""
    if dim > keys.shape[1]:
        raise ValueError(f"--dim {dim} exceeds the real keys' dimension {keys.shape[1]}")
    rng = np.random.default_rng(seed)
    rows = keys[rng.choice(len(keys), size=min(sample, len(keys)), replace=False)].astype(np.float64)
    mean = rows.mean(axis=0)
    cov = np.cov(rows - mean, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:dim]
    explained = float(vals[order].sum() / vals.sum())
    return mean.astype(np.float32), vecs[:, order].astype(np.float32), explained


def nn_distances(points: np.ndarray, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """L2 distance of ``sample`` random points to their nearest other point in ``points``."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(points), size=min(sample, len(points)), replace=False)
    best = np.full(len(idx), np.inf, dtype=np.float64)
    q = points[idx].astype(np.float32)
    qn = (q * q).sum(1)
    for s in range(0, len(points), CHUNK):
        x = points[s:s + CHUNK]
        d = qn[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
        hit = (idx >= s) & (idx < s + len(x))  # a point is not its own neighbour
        d[np.nonzero(hit)[0], idx[hit] - s] = np.inf
        best = np.minimum(best, d.min(1))
    return np.sqrt(np.maximum(best, 0))


@dataclass
class SyntheticKeys:
    """A deterministic stream of ``dim``-d entries resampled from ``base`` with noise ``sigma`` per coordinate."""

    base: np.ndarray  # [n_base, dim] projected real keys the entries are drawn from
    sigma: float
    seed: int = 0
    chunk: int = CHUNK

    @property
    def dim(self) -> int:
        return self.base.shape[1]

    def block(self, c: int) -> np.ndarray:
        """Chunk ``c``: rows ``[c * chunk, (c + 1) * chunk)``, the same on every call."""
        rng = np.random.default_rng([self.seed, c])
        pick = rng.integers(len(self.base), size=self.chunk)
        noise = rng.standard_normal((self.chunk, self.dim), dtype=np.float32)
        return self.base[pick] + np.float32(self.sigma) * noise

    def rows(self, start: int, stop: int, step: int | None = None):
        """Yield ``(first_row, keys)`` covering ``[start, stop)`` in pieces of at most ``step`` rows."""
        step = step or self.chunk
        pos = start
        while pos < stop:
            c = pos // self.chunk
            block = self.block(c)
            lo, hi = pos - c * self.chunk, min(stop - c * self.chunk, self.chunk)
            for s in range(lo, hi, step):
                e = min(s + step, hi)
                yield c * self.chunk + s, block[s:e]
            pos = c * self.chunk + hi


def make_keys(real: np.ndarray, dim: int, noise: float, n_queries: int, seed: int = 0,
              held_out: int = 2000) -> tuple[SyntheticKeys, np.ndarray, dict]:
    """Split real keys into a resampling pool and held-out query keys, project both to ``dim``
    (identity when ``dim`` is the real dimension), and add noise. Returns (entries, queries, recipe)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(real))
    held_out = min(held_out, len(real) // 10)
    q_idx, pool_idx = perm[:held_out], perm[held_out:]
    if dim < real.shape[1]:
        mean, comps, explained = fit_pca(real[pool_idx], dim, seed=seed)
        project = lambda x: (x - mean) @ comps  # noqa: E731
    else:
        explained = 1.0
        project = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    pool = np.ascontiguousarray(project(real[pool_idx]), dtype=np.float32)
    nn = nn_distances(pool, seed=seed)
    median_nn = float(np.median(nn))
    sigma = noise * median_nn / np.sqrt(dim)  # E|noise| ~ sigma·sqrt(dim) = noise × median NN distance
    q = project(real[q_idx[rng.choice(len(q_idx), size=n_queries, replace=n_queries > len(q_idx))]])
    q = (q + sigma * rng.standard_normal(q.shape)).astype(np.float32)
    recipe = {
        "source": "real keys of a FAISS flat datastore, resampled uniformly with replacement",
        "real_keys": int(len(real)), "real_dim": int(real.shape[1]), "pool_keys": int(len(pool_idx)),
        "held_out_query_keys": int(held_out), "dim": int(dim),
        "projection": f"PCA {real.shape[1]}->{dim} fitted on up to 50,000 pool keys" if dim < real.shape[1] else "none",
        "pca_explained_variance": round(explained, 4),
        "median_nn_distance": round(median_nn, 4), "noise_ratio": noise, "noise_sigma_per_dim": round(float(sigma), 5),
        "expected_noise_norm": round(float(sigma * np.sqrt(dim)), 4),
        "queries": f"{n_queries} held-out real keys (not in the pool), projected, plus the same noise",
        "seed": seed, "chunk": CHUNK,
    }
    return SyntheticKeys(pool, float(sigma), seed), q, recipe


class ExactTopK:
    """Running exact top-``k`` (squared L2) of fixed queries over a stream of (first_row, keys) chunks.

    Fed the datastore's rows in id order, its state after the first N rows is the ground truth of
    a datastore of N entries, so nested sizes cost one pass.
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.qn = (self.q.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.k = k
        self.dist = np.full((len(queries), 0), np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), 0), dtype=np.int64)
        self.seen = 0

    def add(self, first: int, keys: np.ndarray) -> None:
        if first != self.seen:
            raise ValueError(f"rows must arrive in order: expected row {self.seen}, got {first}")
        d = self.qn[:, None] - 2 * self.q @ keys.T + (keys * keys).sum(1)[None, :]
        ids = np.broadcast_to(np.arange(first, first + len(keys), dtype=np.int64), d.shape)
        d, ids = np.concatenate([self.dist, d], 1), np.concatenate([self.ids, ids], 1)
        if d.shape[1] > self.k:
            part = np.argpartition(d, self.k - 1, axis=1)[:, :self.k]
            d, ids = np.take_along_axis(d, part, 1), np.take_along_axis(ids, part, 1)
        self.dist, self.ids = d, ids
        self.seen += len(keys)

    def truth(self, k: int) -> np.ndarray:
        """[nq, k] ids of the exact k nearest rows seen so far, nearest first."""
        order = np.argsort(self.dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(self.ids, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (ids; -1 = no hit)."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / k for f, t in zip(found, truth)]))
