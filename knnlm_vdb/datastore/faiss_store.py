"""FAISS datastore: keys and values in flat files on disk, an exact or compressed index over them.

Layout of a datastore directory::

    meta.json     what it was built with, the committed row count, the index spec
    keys.bin      [count, dim] float16 or float32, row-major   (memory-mapped; dim is the
                  projection's output dimension when the store has one)
    values.bin    [count] int32 next-token ids
    ids.bin       [count] int64 deterministic entry ids (see base.entry_ids)
    index.faiss   the trained SQ8 / PQ / IVFPQ index (the exact index is rebuilt on open)
    projection.npz  the learned key projection (only with ``projection``; see projection.py)

Appends write data first and commit ``count`` in meta.json last, by atomic rename. Bytes
past the committed count are leftovers of a crashed writer and are cut off on the next
write, so a crash never leaves a half-visible row.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from knnlm_vdb.datastore.base import MISSING_VALUE, Datastore, StoreInfo, take_rows
from knnlm_vdb.datastore.faiss_check import KEY_DTYPES, check_sizes, open_meta, read_index, refusal
from knnlm_vdb.datastore.faiss_index import (INDEX_TYPES, TRAINED, bytes_per_entry, check_options, default_nlist,
                                             default_pq_m, exact_distances, min_train_rows, train)
from knnlm_vdb.errors import Incompatible, InvalidInput, KnnlmError
from knnlm_vdb.io import atomic_write_json
from knnlm_vdb.projection import Projection, check_project_dim
from knnlm_vdb.settings import MAX_K

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
__all__ = ["FaissDatastore", "INDEX_TYPES", "default_nlist", "default_pq_m"]


def _gpu_resources():
    """faiss-gpu resources when faiss-gpu is installed and a GPU is present, else None."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


def _recover_interrupted_swap(path: Path) -> None:
    """Finish or undo a directory swap of ``delete_ids`` that a crash interrupted."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            import shutil

            shutil.rmtree(old)
        else:
            os.rename(old, path)


class FaissDatastore(Datastore):
    """Exact (``IndexFlatL2``) or compressed (SQ8, PQ, paper-style IVFPQ) search over on-disk keys,
    optionally of projected keys: ``add`` and ``search`` take model-space vectors either way."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _recover_interrupted_swap(self.path)
        self.meta = meta = open_meta(self.path, FORMAT_VERSION)
        self.info = StoreInfo.from_dict(meta["info"])
        self.key_dtype = KEY_DTYPES[self.meta["key_dtype"]]
        summary = meta.get("projection")
        self.projection = Projection.load(self.path / "projection.npz", summary) if summary else None
        self._index = None
        self._ids_set: set[int] | None = None
        self._gpu = None
        self._values: np.ndarray | None = None

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, info: StoreInfo, index: str = "flat", key_dtype: str = "float16",
               nlist: int | None = None, pq_m: int | None = None, nprobe: int = 32,
               recompute: bool = False, domain: str = "default",
               projection: Projection | None = None) -> "FaissDatastore":
        """``projection``: store keys projected by it (fitted beforehand, see projection.py)."""
        if projection is not None:
            check_project_dim(projection.dim_out, info.dim)
            if projection.dim_in != info.dim:
                raise InvalidInput(f"the projection maps from dimension {projection.dim_in}, keys have {info.dim}")
        check_options(projection.dim_out if projection else info.dim, index, key_dtype, KEY_DTYPES, nlist, pq_m,
                      nprobe)
        path = Path(path)
        if (path / "meta.json").exists():
            raise KnnlmError(f"a datastore already exists at {path}; use `knnlm-vdb append` or another --out")
        path.mkdir(parents=True, exist_ok=True)
        for name in ("keys.bin", "values.bin", "ids.bin"):
            (path / name).write_bytes(b"")
        if projection is not None:
            projection.save(path / "projection.npz")
        meta = {
            "format_version": FORMAT_VERSION,
            "domain": domain,
            "info": info.to_dict(),
            "key_dtype": key_dtype,
            "count": 0,
            "index": {"type": index, "nlist": nlist, "pq_m": pq_m, "nprobe": nprobe,
                      "recompute": recompute, "indexed_count": 0},
        }
        if projection is not None:
            meta["projection"] = projection.summary()
        atomic_write_json(path / "meta.json", meta)
        return cls(path)

    # ---- raw rows -------------------------------------------------------------------------
    @property
    def domain(self) -> str:
        return self.meta.get("domain", "default")

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def dim(self) -> int:
        """Dimension of the stored keys (the projection's output when there is one)."""
        return self.projection.dim_out if self.projection is not None else self.info.dim

    def to_stored(self, vectors: np.ndarray) -> np.ndarray:
        """Model-space keys or queries -> the stored space (projected, float32)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.info.dim:
            raise KnnlmError(f"vectors have shape {vectors.shape}, datastore dimension is {self.info.dim}")
        return self.projection.apply(vectors) if self.projection is not None else np.ascontiguousarray(vectors)

    def count(self) -> int:
        return int(self.meta["count"])

    def keys(self) -> np.ndarray:
        """All committed keys, memory-mapped (no copy)."""
        n = self.count()
        if n == 0:
            return np.zeros((0, self.dim), dtype=self.key_dtype)
        return np.memmap(self.path / "keys.bin", dtype=self.key_dtype, mode="r", shape=(n, self.dim))

    def values(self) -> np.ndarray:
        return np.fromfile(self.path / "values.bin", dtype=np.int32, count=self.count())

    def ids(self) -> np.ndarray:
        return np.fromfile(self.path / "ids.bin", dtype=np.int64, count=self.count())

    def _truncate_uncommitted(self) -> None:
        n = self.count()
        for name, width in (("keys.bin", self.dim * np.dtype(self.key_dtype).itemsize),
                            ("values.bin", 4), ("ids.bin", 8)):
            p = self.path / name
            size = p.stat().st_size
            if size < n * width:  # never extend: zero rows would be searched as if they were keys
                raise Incompatible(refusal(self.path, [f for f in check_sizes(self.path, self.meta) if f.damage]))
            if size > n * width:
                log.warning("cutting %s back to the %d committed rows (left by an interrupted write)", name, n)
                with open(p, "r+b") as f:
                    f.truncate(n * width)

    def add(self, ids, keys, values, doc_ids=None, positions=None) -> int:
        return self.add_stored(ids, self.to_stored(keys), values)

    def add_stored(self, ids, keys, values) -> int:
        """``add`` for keys already in the stored space (copies between stores of one projection)."""
        ids = np.asarray(ids, dtype=np.int64)
        keys = np.asarray(keys)
        values = np.asarray(values, dtype=np.int32)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise KnnlmError(f"keys have shape {keys.shape}, datastore dimension is {self.dim}")
        if self._ids_set is None:
            self._ids_set = set(self.ids().tolist())
            self._truncate_uncommitted()
        new = np.fromiter((int(i) not in self._ids_set for i in ids), dtype=bool, count=len(ids))
        _, first = np.unique(ids, return_index=True)  # duplicates inside one batch count once
        once = np.zeros(len(ids), dtype=bool)
        once[first] = True
        new &= once
        if not new.any():
            return 0
        ids, keys, values = ids[new], keys[new].astype(self.key_dtype), values[new]
        for name, arr in (("keys.bin", keys), ("values.bin", values), ("ids.bin", ids)):
            with open(self.path / name, "ab") as f:
                f.write(np.ascontiguousarray(arr).tobytes())
                f.flush()
                os.fsync(f.fileno())
        self.meta["count"] = self.count() + len(ids)
        atomic_write_json(self.path / "meta.json", self.meta)  # the commit point
        self._ids_set.update(ids.tolist())
        if self._index is not None:
            self._index_add(keys)
        return int(len(ids))

    # ---- index ----------------------------------------------------------------------------
    @property
    def index_spec(self) -> dict:
        return self.meta["index"]

    def _key_chunks(self, start: int, chunk: int = 65536):
        keys = self.keys()
        for i in range(start, len(keys), chunk):
            yield np.ascontiguousarray(keys[i:i + chunk], dtype=np.float32)

    def _index_add(self, keys: np.ndarray) -> None:
        self._index.add(np.ascontiguousarray(keys, dtype=np.float32))

    def train(self, sample_size: int = 200_000, seed: int = 0) -> None:
        """Train and fill a compressed index from the stored keys (no-op for the exact index)."""
        import faiss

        spec = self.index_spec
        if spec["type"] not in TRAINED:
            return
        index = train(self.keys(), spec, self.dim, sample_size, seed)
        faiss.write_index(index, str(self.path / "index.faiss.tmp"))
        os.replace(self.path / "index.faiss.tmp", self.path / "index.faiss")
        atomic_write_json(self.path / "meta.json", self.meta)
        self._index = None

    def _load_index(self):
        import faiss

        spec = self.index_spec
        n = self.count()
        if spec["type"] == "flat":
            index = faiss.IndexFlatL2(self.dim)
            for chunk in self._key_chunks(0):
                index.add(chunk)
        else:
            if not (self.path / "index.faiss").exists():
                self.train()
            index, damage = read_index(self.path, n, self.dim)
            if damage is not None:
                raise Incompatible(refusal(self.path, [damage]))
            if index.ntotal < n:  # rows appended after the last index write: add them now
                for chunk in self._key_chunks(index.ntotal):
                    index.add(chunk)
            if spec["type"] == "ivfpq":
                index.nprobe = spec["nprobe"]
        res = _gpu_resources()
        if res is not None:
            try:
                index = faiss.index_cpu_to_gpu(res, 0, index)
                self._gpu = res
                log.info("FAISS index on GPU")
            except RuntimeError as exc:  # e.g. a PQ code size the GPU kernels do not support
                log.warning("keeping the FAISS index on CPU: %s", exc)
        self._index = index
        return index

    def flush(self) -> None:
        """Persist compressed codes for rows added since the last index write."""
        import faiss

        spec = self.index_spec
        if spec["type"] not in TRAINED or spec["indexed_count"] == self.count() or not (self.path / "index.faiss").exists():
            return
        index = self._index if self._index is not None else self._load_index()
        if self._gpu is not None:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(self.path / "index.faiss.tmp"))
        os.replace(self.path / "index.faiss.tmp", self.path / "index.faiss")
        spec["indexed_count"] = int(index.ntotal)
        atomic_write_json(self.path / "meta.json", self.meta)

    def finalize(self) -> None:
        """Train the compressed index once the rows are in (an exact index needs nothing); persist codes."""
        if self.index_spec["type"] in TRAINED and not (self.path / "index.faiss").exists():
            self.train()
        self.flush()

    def search(self, queries: np.ndarray, k: int):
        if not 1 <= k <= MAX_K:  # the padding below is [n, k]: k=1e9 would try to allocate GiBs
            raise InvalidInput(f"--k must be a positive integer at most {MAX_K}, got {k}")
        n = self.count()
        if n == 0:
            queries = self.to_stored(queries)  # an empty store still refuses queries of the wrong shape
            return (np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), MISSING_VALUE, np.int32))
        if self._values is None or len(self._values) != n:
            self._values = self.values()
        dist, rows = self.ranked_rows(queries, min(k, n))
        dist, values = take_rows(dist, rows, self._values)
        if dist.shape[1] < k:
            pad = k - dist.shape[1]
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
            values = np.pad(values, ((0, 0), (0, pad)), constant_values=MISSING_VALUE)
        return dist, values

    def copy_to(self, path: str | Path, chunk: int = 65536, **index_options) -> "FaissDatastore":
        """A new datastore with the same rows and another index (``index=``, ``nlist=``, ...); trained if IVFPQ."""
        options = {"index": self.index_spec["type"], "key_dtype": self.meta["key_dtype"],
                   "domain": self.meta.get("domain", "default"), "projection": self.projection, **index_options}
        dst = FaissDatastore.create(path, self.info, **options)
        keys, values, ids = self.keys(), self.values(), self.ids()
        same_space = dst.projection is self.projection
        for i in range(0, self.count(), chunk):
            if same_space:
                dst.add_stored(ids[i:i + chunk], keys[i:i + chunk], values[i:i + chunk])
            else:  # only an unprojected store's keys are model-space keys
                if self.projection is not None:
                    raise InvalidInput("a projected datastore cannot be copied into another projection")
                dst.add(ids[i:i + chunk], keys[i:i + chunk], values[i:i + chunk])
        dst.train()
        return dst

    def ranked_rows(self, queries: np.ndarray, k: int):
        """The row numbers (-1 where unfilled) and distances ``search`` answers with: re-ranked
        by the stored keys under ``recompute``, on the model-space scale under a projection."""
        queries = self.to_stored(queries)
        index = self._index if self._index is not None else self._load_index()
        dist, rows = index.search(queries, k)
        if self.index_spec["type"] in TRAINED and self.index_spec["recompute"]:
            dist = exact_distances(self.keys(), queries, rows)
            order = np.argsort(dist, axis=1, kind="stable")
            dist, rows = np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
        dist = np.where(rows >= 0, dist, np.inf).astype(np.float32)
        if self.projection is not None:
            dist = self.projection.scale_distances(dist)
        return dist, rows

    def entries(self, queries: np.ndarray, n: int) -> list[list[dict]]:
        from knnlm_vdb.datastore.faiss_provenance import nearest_entries

        return nearest_entries(self, queries, n)

    def ledger(self):
        from knnlm_vdb.datastore.ledger import JsonLedger

        return JsonLedger(self.path / "ledger.json")

    def delete_ids(self, ids) -> int:
        """Rewrite the datastore without ``ids`` into a new directory, then swap directories.

        Flat files cannot drop rows in place; a reader that opened the old directory keeps a
        consistent view until it reopens.
        """
        import shutil

        doomed = np.isin(self.ids(), np.asarray(ids, dtype=np.int64))
        if not doomed.any():
            return 0
        tmp = self.path.with_name(self.path.name + ".rewrite")
        shutil.rmtree(tmp, ignore_errors=True)
        spec = self.index_spec
        dst = FaissDatastore.create(tmp, self.info, index=spec["type"], key_dtype=self.meta["key_dtype"],
                                    nlist=spec["nlist"], pq_m=spec["pq_m"], nprobe=spec["nprobe"],
                                    recompute=spec["recompute"], domain=self.meta.get("domain", "default"),
                                    projection=self.projection)
        keep = np.flatnonzero(~doomed)
        keys, values, ids_all = self.keys(), self.values(), self.ids()
        for i in range(0, len(keep), 65536):
            rows = keep[i:i + 65536]
            dst.add_stored(ids_all[rows], keys[rows], values[rows])
        if spec["type"] in TRAINED and dst.count() >= min_train_rows(spec, dst.count(), dst.dim):
            dst.train()
        if (self.path / "ledger.json").exists():
            shutil.copy2(self.path / "ledger.json", tmp / "ledger.json")
        old = self.path.with_name(self.path.name + ".old")
        os.rename(self.path, old)
        os.rename(tmp, self.path)
        shutil.rmtree(old)
        self.__init__(self.path)
        return int(doomed.sum())

    # ---- metadata -------------------------------------------------------------------------
    def set_extra(self, key: str, value) -> None:
        self.meta["info"].setdefault("extra", {})[key] = value
        self.info.extra[key] = value
        atomic_write_json(self.path / "meta.json", self.meta)

    def describe(self) -> dict:
        return {
            "backend": "faiss",
            "path": str(self.path),
            "domain": self.meta.get("domain", "default"),
            "count": self.count(),
            "dim": self.dim,
            "model": self.info.model,
            "key_type": self.info.key_type,
            "tokenizer": self.info.tokenizer,
            "key_dtype": self.meta["key_dtype"],
            "index": dict(self.index_spec),
            "projection": self.projection.summary() if self.projection is not None else None,
            "stored_dim": self.dim,
            "bytes_per_entry": bytes_per_entry(self.index_spec, self.dim,
                                               self.dim * np.dtype(self.key_dtype).itemsize),
            "extra": dict(self.info.extra),
        }
