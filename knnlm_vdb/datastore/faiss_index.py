"""FAISS index forms over a datastore's (possibly projected) keys: options, training, costs.

=========  ==========================================================================  =====================
form       what search holds in memory                                                 bytes per entry
=========  ==========================================================================  =====================
flat       ``IndexFlatL2``, rebuilt from keys.bin on open (float32 whatever is on disk)  4·dim
sq8        ``IndexScalarQuantizer`` 8-bit, one byte per dimension, scanned exhaustively  dim
pq         ``IndexPQ`` with ``pq_m`` 8-bit sub-quantizers, codes scanned exhaustively     pq_m
ivfpq      the paper's ``IndexIVFPQ``: ``pq_m``-byte codes + an 8-byte id in its list     pq_m + 8
rq         ``IndexResidualQuantizer``: ``pq_m`` - 1 8-bit codebooks, each coding what the   pq_m
           previous ones left, + a 1-byte norm (additive codes need it for L2), scanned
=========  ==========================================================================  =====================

At the same code size rq keeps more of each key than pq (16,384 pydocs keys projected to 128
dimensions, 32 bytes: recall@64 0.821 against pq's 0.779, the projection alone 0.842;
benchmarks/quantisers.py; at 408k entries it matched the unquantised projection's perplexity,
benchmarks/compress.py), for 3x the training time (its codebooks are fitted one after another,
with a beam search, so it trains on a capped sample), a slower encoding and a slower scan.
Trained forms (sq8, pq, ivfpq, rq) live in index.faiss. ``recompute`` re-scores each query's
candidates with the stored keys (keys.bin, memory-mapped), the paper's exact re-ranking: it
costs a read of those keys per search, so a re-ranking store counts them in its bytes per entry.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from knnlm_vdb.datastore.spec import pq_m_divides_dim
from knnlm_vdb.errors import InvalidInput, KnnlmError

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "sq8", "pq", "ivfpq", "rq")
TRAINED = ("sq8", "pq", "ivfpq", "rq")  # forms with an index.faiss
CODED = ("pq", "ivfpq", "rq")  # forms whose code size is ``pq_m`` bytes
PQ_TRAIN_ROWS = 256  # 8-bit PQ: one training point per centroid at least
# rq fits its codebooks one after another with a beam search, so its training time grows with the
# sample: 16,384 projected pydocs keys train RQ31x8 in 146 s on 2 cores; the 200,000 rows the
# other forms sample would take ~30 min. 32,768 rows is over 3x faiss's 39 points per centroid.
RQ_TRAIN_ROWS = 32_768


def default_nlist(n: int) -> int:
    """A power of two near 4·√n, with at least 39 training points per list (faiss's minimum)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return min(nlist, 65536)


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: the largest divisor of dim that is at most 64 (64-byte codes, as in the paper)."""
    return max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)


def check_options(dim: int, index: str, key_dtype: str, key_dtypes, nlist, pq_m, nprobe) -> None:
    """Refuse index options that cannot work for keys of dimension ``dim`` (InvalidInput, one line)."""
    if index not in INDEX_TYPES:
        raise InvalidInput(f"unknown FAISS --index {index!r}: use one of {', '.join(INDEX_TYPES)}")
    if key_dtype not in key_dtypes:
        raise InvalidInput(f"unknown --key-dtype {key_dtype!r}: use float16 or float32")
    if pq_m is not None and (isinstance(pq_m, bool) or not isinstance(pq_m, int) or pq_m < 1):
        raise InvalidInput(f"--pq-m must be a positive integer, got {pq_m!r}")
    if pq_m is not None and index == "rq" and pq_m < 2:
        raise InvalidInput(f"--pq-m {pq_m}: an rq code needs at least 2 bytes (a codebook and the norm)")
    if pq_m is not None and pq_m_divides_dim("faiss", index) and dim % pq_m:
        raise InvalidInput(f"--pq-m {pq_m} must divide the key dimension {dim}")
    if nprobe < 1 or (nlist is not None and (nlist < 1 or nprobe > nlist)):
        raise InvalidInput(f"need 1 <= --nprobe ({nprobe}) <= --nlist ({nlist})")


def min_train_rows(spec: dict, n: int, dim: int) -> int:
    """Rows the form needs before it can be trained."""
    if spec["type"] == "ivfpq":
        return 39 * (spec["nlist"] or default_nlist(n))
    if spec["type"] in CODED:
        return PQ_TRAIN_ROWS
    return 1


def train(keys, spec: dict, dim: int, sample_size: int = 200_000, seed: int = 0):
    """A trained, filled index of form ``spec["type"]`` over ``keys`` (``[n, dim]``, memory-mapped);
    ``spec`` gets the chosen nlist and pq_m. Raises KnnlmError when there are too few keys."""
    import faiss

    n, kind = len(keys), spec["type"]
    nlist = spec["nlist"] or default_nlist(n) if kind == "ivfpq" else None
    m = spec["pq_m"] or default_pq_m(dim) if kind in CODED else None
    need = min_train_rows({**spec, "nlist": nlist}, n, dim)
    if n < need:
        what = f"IVFPQ with nlist={nlist}" if kind == "ivfpq" else kind.upper()
        raise KnnlmError(f"{what} needs at least {need} entries to train, the datastore has {n}; "
                         f"use --index flat{' or a smaller --nlist' if kind == 'ivfpq' else ''}")
    if kind == "ivfpq" and spec["nprobe"] > nlist:
        raise KnnlmError(f"--nprobe {spec['nprobe']} exceeds nlist {nlist}")
    if kind == "sq8":
        factory = "SQ8"
    elif kind == "rq":  # m - 1 codebooks + the 1-byte norm
        factory = f"RQ{m - 1}x8_Ncqint8"
    else:
        factory = f"IVF{nlist},PQ{m}" if kind == "ivfpq" else f"PQ{m}"
    rng = np.random.default_rng(seed)
    if kind == "rq":
        sample_size = min(sample_size, RQ_TRAIN_ROWS)
    rows = np.sort(rng.choice(n, size=min(n, max(sample_size, need)), replace=False))
    sample = np.ascontiguousarray(keys[rows], dtype=np.float32)
    log.info("training %s on %d of %d keys", factory, len(sample), n)
    index = faiss.index_factory(dim, factory)
    index.train(sample)
    for i in range(0, n, 65536):
        index.add(np.ascontiguousarray(keys[i:i + 65536], dtype=np.float32))
    spec.update(nlist=nlist, pq_m=m, indexed_count=n)
    return index


def exact_distances(keys, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The paper's re-ranking: squared L2 of each candidate row's stored key to its query."""
    safe = np.where(rows >= 0, rows, 0)
    uniq, inverse = np.unique(safe.reshape(-1), return_inverse=True)
    cand = np.asarray(keys[uniq], dtype=np.float32)[inverse].reshape(rows.shape + (queries.shape[1],))
    d = ((cand - queries[:, None, :]) ** 2).sum(-1)
    return np.where(rows >= 0, d, np.inf).astype(np.float32)


def bytes_per_entry(spec: dict, dim: int, key_width: int) -> dict:
    """What one entry costs at search time, by part (see the module table).

    ``vectors``: the keys or codes search scans; ``index``: per-entry index overhead (ids in
    inverted lists); ``payload``: the value (int32 next token); ``rerank``: stored keys read to
    re-rank (``recompute``); ``total`` their sum; ``disk``: every file (keys.bin, values.bin,
    ids.bin, codes).
    """
    kind = spec["type"]
    m = spec.get("pq_m") or default_pq_m(dim)
    vectors = m if kind in CODED else {"flat": 4 * dim, "sq8": dim}[kind]
    index = 8 if kind == "ivfpq" else 0
    rerank = key_width if kind in TRAINED and spec.get("recompute") else 0
    codes = vectors + index if kind in TRAINED else 0
    return {"vectors": vectors, "index": index, "payload": 4, "rerank": rerank,
            "total": vectors + index + 4 + rerank, "disk": key_width + 4 + 8 + codes}
