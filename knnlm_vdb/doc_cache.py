"""The in-document cache: the keys of the document read so far, as one more memory to search.

A kNN-LM's datastore holds other documents. The document being scored or continued repeats
itself — its identifiers, names and phrases come back — and the encoder has already computed
a key for every earlier position of it. Keeping those keys with the tokens that followed them
gives an exact local memory for free: the continuous cache of Grave et al. (2017), here in the
kNN-LM's own form (squared L2 distances, ``p ∝ exp(-d/T)``), which the paper combined with
its datastore for its best WikiText-103 result.

The cache is searched exactly (it is small) and causally: position ``t`` sees only positions
before it, whose next tokens are already known. ``mixing.Mixer`` mixes it as one more part with
its own calibration (gate features and per-document trust), so where it does not help it fades
out like a foreign domain.
"""
from __future__ import annotations

import numpy as np

MAX_ENTRIES = 4096  # the most recent positions kept: a long document's distant past helps little


class DocumentCache:
    """Keys and next tokens of one document's positions so far, in order (the most recent ``max_entries``)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_entries = max_entries
        self.keys = np.zeros((0, 0), np.float32)  # [n, dim] once the first keys arrive
        self.values = np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self.values)

    def add(self, keys: np.ndarray, targets: np.ndarray) -> None:
        """Append positions (``keys[i]`` was followed by ``targets[i]``), forgetting the oldest beyond the cap."""
        keys = np.asarray(keys, np.float32).reshape(len(targets), -1)
        self.keys = np.concatenate([self.keys.reshape(-1, keys.shape[1]), keys])[-self.max_entries:]
        self.values = np.concatenate([self.values, np.asarray(targets, np.int32)])[-self.max_entries:]

    def search(self, queries: np.ndarray, k: int, block_keys: np.ndarray | None = None,
               block_targets: np.ndarray | None = None, rows: np.ndarray | None = None):
        """The ``k`` nearest cached positions of each query: -> (squared L2 ``[n, k]``, next tokens ``[n, k]``),
        ``inf`` / ``-1`` where fewer than ``k`` are there.

        With ``block_keys``/``block_targets`` the queries are positions ``rows`` of a block that
        directly follows the cache: query ``i`` also sees the block's positions before ``rows[i]``."""
        queries = np.asarray(queries, np.float32)
        n = len(queries)
        keys, values = self.keys.reshape(-1, queries.shape[1]), self.values
        m = len(values)
        if block_keys is not None:
            keys = np.concatenate([keys, np.asarray(block_keys, np.float32)])
            values = np.concatenate([values, np.asarray(block_targets, np.int32)])
        dist = np.full((n, k), np.inf, np.float32)
        vals = np.full((n, k), -1, np.int32)
        if not len(values) or not n:
            return dist, vals
        d = (np.einsum("ij,ij->i", queries, queries)[:, None] + np.einsum("ij,ij->i", keys, keys)[None]
             - 2.0 * queries @ keys.T)
        d = np.maximum(d, 0.0)
        if block_keys is not None:  # causal: block position j is visible to query at block row r only if j < r
            rows = np.arange(n) if rows is None else np.asarray(rows)
            hidden = np.arange(len(values) - m)[None] >= rows[:, None]
            d[:, m:][hidden] = np.inf
            low = rows - self.max_entries  # the window: at most max_entries positions back
            too_old = (np.arange(len(values))[None] - m) < low[:, None]
            d[too_old] = np.inf
        kk = min(k, d.shape[1])
        top = np.argpartition(d, kk - 1, axis=1)[:, :kk] if kk < d.shape[1] else np.tile(np.arange(kk), (n, 1))
        td = np.take_along_axis(d, top, 1)
        order = np.argsort(td, axis=1, kind="stable")
        top, td = np.take_along_axis(top, order, 1), np.take_along_axis(td, order, 1)
        dist[:, :kk] = td
        vals[:, :kk] = np.where(np.isfinite(td), values[top], -1)
        return dist, vals
