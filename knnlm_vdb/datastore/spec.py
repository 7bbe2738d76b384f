"""Where a datastore lives and how its index is built, as values (like pymilvus's ``IndexParams``).

``StoreSpec`` names a store on any backend; ``IndexSpec`` holds the index options in one
vocabulary and ``IndexSpec.from_options`` is the only place that translates the CLI's options
(``--index``, ``--nlist``, ``--nprobe``, ...) into a backend's own names. The factory in
``datastore/__init__.py`` takes these, so callers never branch on the backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from knnlm_vdb.errors import InvalidInput

BACKENDS = ("faiss", "milvus")

# CLI-style name -> Milvus index build / search parameter name
_MILVUS_BUILD = {"nlist": "nlist", "pq_m": "m", "M": "M", "ef_construction": "efConstruction"}
_MILVUS_SEARCH = {"ef": "ef"}


def pq_m_divides_dim(backend: str, index: str) -> bool:
    """Whether ``--pq-m`` must divide the key dimension: a product quantiser cuts each key into
    pq_m equal groups; FAISS's residual quantiser (rq) codes the whole key with every codebook."""
    return not (backend == "faiss" and index.lower() == "rq")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InvalidInput(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class StoreSpec:
    """A datastore's address: a FAISS directory (``location``), or a Milvus ``domain`` at the URI
    ``location``. ``domain`` is also the id domain of a new FAISS store's entries."""

    backend: str
    location: str
    domain: str = "default"
    consistency: str | None = None  # Milvus read consistency; None: the stored one
    token: str | None = field(default=None, repr=False)  # Milvus credentials; never printed
    mirror: bool = False  # Milvus Lite: read through an in-process copy (datastore/milvus/mirror.py)

    def __post_init__(self):
        check_backend(self.backend)

    @property
    def name(self) -> str:
        """What a message calls this store: its directory (FAISS) or its domain (Milvus)."""
        return self.location if self.backend == "faiss" else self.domain

    def connection(self) -> dict:
        """The backend's open options (Milvus: token, consistency, mirror; FAISS: none)."""
        if self.backend == "faiss":
            return {}
        o = {"token": self.token}
        if self.consistency:
            o["consistency"] = self.consistency
        if self.mirror:
            o["mirror"] = True
        return o


@dataclass(frozen=True)
class IndexSpec:
    """A new store's index, already in the backend's spelling (see ``from_options``)."""

    backend: str
    type: str
    nlist: int | None = None
    pq_m: int | None = None  # code bytes: FAISS pq/ivfpq sub-quantizers or rq codebooks + norm, Milvus IVF_PQ m
    nprobe: int | None = None
    recompute: bool = False  # FAISS sq8/pq/ivfpq/rq: re-score candidates with the stored keys
    project_dim: int | None = None  # learned key projection (PCA) to this dimension, fitted at build
    key_dtype: str = "float16"  # FAISS key storage
    M: int | None = None  # HNSW graph degree (Milvus)
    ef_construction: int | None = None  # HNSW build beam (Milvus)
    ef: int | None = None  # HNSW search beam (Milvus)
    params: Mapping = field(default_factory=lambda: MappingProxyType({}))  # extra build parameters
    search: Mapping = field(default_factory=lambda: MappingProxyType({}))  # extra search parameters

    @classmethod
    def from_options(cls, backend: str, index: str, nlist: int | None = None, pq_m: int | None = None,
                     nprobe: int | None = None, recompute: bool = False, key_dtype: str = "float16",
                     M: int | None = None, ef_construction: int | None = None, ef: int | None = None,
                     params: Mapping | None = None, search: Mapping | None = None,
                     project_dim: int | None = None) -> "IndexSpec":
        """CLI-style options -> the spec: FAISS index names are lower case (flat, sq8, pq, ivfpq, rq), Milvus
        ones upper case (FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ, HNSW); nprobe only means something to a Milvus
        IVF index. What needs the key dimension is checked here only against ``project_dim``."""
        check_backend(backend)
        if project_dim is not None and (isinstance(project_dim, bool) or not isinstance(project_dim, int)
                                        or project_dim < 1):
            raise InvalidInput(f"--project-dim must be a positive integer, got {project_dim!r}")
        if pq_m is not None and (pq_m < 1 or (project_dim and project_dim % pq_m and pq_m_divides_dim(backend, index))):
            raise InvalidInput(f"--pq-m {pq_m} must divide the key dimension {project_dim}")
        if backend == "faiss":
            return cls(backend, index.lower(), nlist=nlist, pq_m=pq_m, nprobe=nprobe, recompute=recompute,
                       key_dtype=key_dtype, params=MappingProxyType(dict(params or {})),
                       search=MappingProxyType(dict(search or {})), project_dim=project_dim)
        itype = index.upper()
        return cls(backend, itype, nlist=nlist, nprobe=nprobe if "IVF" in itype else None, key_dtype=key_dtype,
                   pq_m=pq_m if "PQ" in itype else None, M=M, ef_construction=ef_construction, ef=ef,
                   params=MappingProxyType(dict(params or {})), search=MappingProxyType(dict(search or {})),
                   project_dim=project_dim)

    def options(self) -> dict:
        """The keyword arguments the backend's ``create`` takes."""
        if self.backend == "faiss":
            o = {"index": self.type, "nlist": self.nlist, "pq_m": self.pq_m, "recompute": self.recompute,
                 "key_dtype": self.key_dtype}
            if self.nprobe is not None:
                o["nprobe"] = self.nprobe
            return o
        build = {m: getattr(self, f) for f, m in _MILVUS_BUILD.items() if getattr(self, f)}
        search = {m: getattr(self, f) for f, m in _MILVUS_SEARCH.items() if getattr(self, f)}
        if self.nprobe is not None:
            search["nprobe"] = self.nprobe
        return {"index_type": self.type, "index_params": {**build, **self.params},
                "search_params": {**search, **self.search}}
