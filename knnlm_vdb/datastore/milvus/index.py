"""Milvus index types and their parameters: validated before anything reaches Milvus.

Milvus Lite 3.2.2 builds FLAT, IVF_FLAT, HNSW and IVF_SQ8 (and HNSW_SQ); it creates an IVF_PQ
collection but its index build then fails ("reserved for a future phase") and searches stay
brute force, so IVF_PQ is refused on Lite. A CPU server builds FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ
and HNSW (2.3.5 checked), a GPU server the GPU_* types.
Vector types other than FLOAT_VECTOR (FLOAT16, BFLOAT16, INT8, BINARY) are refused by Milvus
Lite 3.2.2 and FLOAT16/BFLOAT16 need a 2.4+ server, so keys are always float32 vectors here;
compression comes from the index (IVF_SQ8, IVF_PQ) and the key projection (projection.py).
Scalar indexes on ``doc_id``: Lite builds only INVERTED, a 2.3 server only Trie for VARCHAR.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.settings import CONSISTENCY_LEVELS

MAX_TOPK = 16384  # Milvus rejects limit > 16384
MAX_NQ = 16384  # and more than 16384 query vectors per search
# Scalar index on doc_id (schema version 2), by preference. Milvus Lite 3.2 builds only INVERTED;
# a 2.3 server only Trie for VARCHAR (INVERTED arrived in 2.4, which still builds Trie).
DOC_ID_INDEX_TYPES = {"lite": ("INVERTED",), "server": ("Trie", "INVERTED")}

LITE_INDEXES = ("FLAT", "IVF_FLAT", "HNSW", "IVF_SQ8")
CPU_INDEXES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW")
GPU_INDEXES = ("GPU_CAGRA", "GPU_IVF_FLAT", "GPU_IVF_PQ", "GPU_BRUTE_FORCE")
# Whether a server has GPU indexes is only known once it answers, so plain "server" allows both.
DEPLOYMENT_INDEXES = {"lite": LITE_INDEXES, "server-cpu": CPU_INDEXES, "server-gpu": GPU_INDEXES,
                      "server": CPU_INDEXES + GPU_INDEXES}

_INT32_MAX = 2**31 - 1
_NLIST = ("int", 1, 65536)
_NPROBE = ("int", 1, 65536)
_PQ = {"nlist": _NLIST, "m": ("int", 1, 65536), "nbits": ("int", 1, 16)}
# index type -> (build parameters, search parameters); each parameter -> ("int", lo, hi) or ("str", choices)
_PARAMS: dict[str, tuple[dict, dict]] = {
    "FLAT": ({}, {}),
    "IVF_FLAT": ({"nlist": _NLIST}, {"nprobe": _NPROBE}),
    "IVF_SQ8": ({"nlist": _NLIST}, {"nprobe": _NPROBE}),
    "IVF_PQ": (_PQ, {"nprobe": _NPROBE}),
    "HNSW": ({"M": ("int", 2, 2048), "efConstruction": ("int", 1, _INT32_MAX)}, {"ef": ("int", 1, _INT32_MAX)}),
    "GPU_CAGRA": ({"intermediate_graph_degree": ("int", 1, 1024), "graph_degree": ("int", 1, 1024),
                   "build_algo": ("str", ("IVF_PQ", "NN_DESCENT")),
                   "cache_dataset_on_device": ("str", ("true", "false"))},
                  {"itopk_size": ("int", 1, 4096), "search_width": ("int", 1, 1024),
                   "min_iterations": ("int", 0, _INT32_MAX), "max_iterations": ("int", 0, _INT32_MAX),
                   "team_size": ("int", 0, 32)}),
    "GPU_IVF_FLAT": ({"nlist": _NLIST}, {"nprobe": _NPROBE}),
    "GPU_IVF_PQ": (_PQ, {"nprobe": _NPROBE}),
    "GPU_BRUTE_FORCE": ({}, {}),
}
_DEFAULT_BUILD = {
    "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024}, "IVF_PQ": {"nlist": 1024, "nbits": 8},
    "HNSW": {"M": 16, "efConstruction": 200},
    "GPU_CAGRA": {"intermediate_graph_degree": 64, "graph_degree": 32},
    "GPU_IVF_FLAT": {"nlist": 1024}, "GPU_IVF_PQ": {"nlist": 1024, "nbits": 8},
}
# Largest k each index type returns in full. GPU limits differ between Milvus releases and
# their docs (GPU_IVF_FLAT is documented as 256 in some and 2048 in others): we use the
# smallest documented value, so a search never silently returns fewer neighbours.
_MAX_K = {"GPU_CAGRA": 1024, "GPU_IVF_PQ": 1024, "GPU_IVF_FLAT": 256}
# ---- index configuration ------------------------------------------------------------------
@dataclass(frozen=True)
class IndexConfig:
    """A validated Milvus index: type, build parameters and the user's search parameters."""

    index_type: str
    build_params: dict = field(default_factory=dict)
    search_params: dict = field(default_factory=dict)

    def search_request(self, k: int, deployment: str = "server") -> dict:
        """``search_params`` for one search of ``k`` neighbours, k-dependent defaults filled in."""
        validate_index(self.index_type, self.build_params, self.search_params, k=k, deployment=deployment)
        params = dict(self.search_params)
        if self.index_type == "HNSW":
            params.setdefault("ef", max(k, 64))  # ef < k makes Milvus return fewer than k hits
        elif self.index_type == "GPU_CAGRA":
            params.setdefault("itopk_size", max(64, -(-k // 32) * 32))
        elif "nlist" in self.build_params:
            params.setdefault("nprobe", min(32, self.build_params["nlist"]))
        return {"metric_type": "L2", "params": params}

    def bytes_per_entry(self, dim: int) -> dict:
        """Estimated bytes one entry of ``dim``-d keys costs in the loaded index, by part: ``vectors``
        (raw float32, SQ8 bytes or PQ codes), ``index`` (an 8-byte id per IVF list entry, HNSW's
        2·M level-0 links of 4 bytes), ``payload`` (id, target and position fields; doc_id strings
        are extra), ``total``; ``raw_stored`` the float32 key Milvus keeps in storage besides."""
        b = self.build_params
        vectors = {"IVF_SQ8": dim, "IVF_PQ": -(-b.get("m", dim) * b.get("nbits", 8) // 8),
                   "GPU_IVF_PQ": -(-b.get("m", dim) * b.get("nbits", 8) // 8)}.get(self.index_type, 4 * dim)
        index = 8 if "IVF" in self.index_type else 8 * b.get("M", 0) if self.index_type == "HNSW" else 0
        return {"vectors": vectors, "index": index, "payload": 20, "total": vectors + index + 20,
                "raw_stored": 4 * dim}

    def to_dict(self) -> dict:
        return {"type": self.index_type, "build_params": dict(self.build_params),
                "search_params": dict(self.search_params), "metric": "L2"}


def _check_param(kind: str, index_type: str, name: str, value, spec) -> None:
    if spec[0] == "int":
        _, lo, hi = spec
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInput(f"{index_type} {kind} parameter {name}={value!r} must be an integer in [{lo}, {hi}]")
    elif value not in spec[1]:
        raise InvalidInput(f"{index_type} {kind} parameter {name}={value!r} must be one of {', '.join(spec[1])}")


def validate_index(index_type: str, build_params: dict | None = None, search_params: dict | None = None,
                   k: int | None = None, deployment: str = "server", dim: int | None = None) -> IndexConfig:
    """Check an index configuration before anything reaches Milvus; return it with defaults.

    ``deployment`` is ``lite``, ``server`` (CPU or GPU: unknown until it answers),
    ``server-cpu`` or ``server-gpu``. ``k`` (the neighbours a search asks for) and ``dim``
    enable the checks that depend on them. Raises ``InvalidInput`` naming the bad value.
    """
    if deployment not in DEPLOYMENT_INDEXES:
        raise InvalidInput(f"unknown Milvus deployment {deployment!r}: use one of {', '.join(DEPLOYMENT_INDEXES)}")
    if not isinstance(index_type, str):
        raise InvalidInput(f"Milvus index type must be a string, got {index_type!r}")
    itype = index_type.upper()
    allowed = DEPLOYMENT_INDEXES[deployment]
    if itype not in allowed:
        where = "Milvus Lite" if deployment == "lite" else f"a Milvus {deployment.replace('-', ' ')}"
        raise InvalidInput(f"index type {index_type!r} is not supported by {where}; use one of {', '.join(allowed)}")
    for kind, given in (("build", build_params), ("search", search_params)):
        if given is not None and not isinstance(given, dict):
            raise InvalidInput(f"Milvus {kind} parameters must be a mapping, got {given!r}")
    build_spec, search_spec = _PARAMS[itype]
    build = {**_DEFAULT_BUILD.get(itype, {}), **(build_params or {})}
    search = dict(search_params or {})
    for kind, params, spec in (("build", build, build_spec), ("search", search, search_spec)):
        for name, value in params.items():
            if name not in spec:
                known = ", ".join(spec) or "none"
                raise InvalidInput(f"unknown {itype} {kind} parameter {name!r} (known: {known})")
            _check_param(kind, itype, name, value, spec[name])
    if itype in ("IVF_PQ", "GPU_IVF_PQ"):
        if dim is not None:
            build.setdefault("m", max(m for m in range(1, min(64, dim) + 1) if dim % m == 0))
            if dim % build["m"]:
                raise InvalidInput(f"{itype} m={build['m']} must divide the key dimension {dim}")
    if "nprobe" in search and search["nprobe"] > build["nlist"]:
        raise InvalidInput(f"{itype} nprobe={search['nprobe']} exceeds nlist={build['nlist']}; "
                         f"a search cannot probe more lists than the index has")
    if itype == "GPU_CAGRA" and build["graph_degree"] > build["intermediate_graph_degree"]:
        raise InvalidInput(f"GPU_CAGRA graph_degree={build['graph_degree']} must not exceed "
                         f"intermediate_graph_degree={build['intermediate_graph_degree']}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInput(f"--k must be a positive integer, got {k!r}")
        if k > MAX_TOPK:
            raise InvalidInput(f"--k {k} exceeds {MAX_TOPK}, the most neighbours Milvus returns per query")
        if k > _MAX_K.get(itype, MAX_TOPK):
            raise InvalidInput(f"--k {k} exceeds {_MAX_K[itype]}, the most neighbours {itype} returns per query")
        if itype == "HNSW" and "ef" in search and search["ef"] < k:
            raise InvalidInput(f"HNSW ef={search['ef']} is smaller than --k {k}; Milvus would return fewer "
                             f"than k neighbours. Use ef >= k (or leave ef unset for max(k, 64))")
        if itype == "GPU_CAGRA" and "itopk_size" in search and search["itopk_size"] < k:
            raise InvalidInput(f"GPU_CAGRA itopk_size={search['itopk_size']} is smaller than --k {k}; use itopk_size >= k")
    return IndexConfig(itype, build, search)


def check_consistency(level: str) -> str:
    """The canonical spelling of a consistency level; refuse unknown ones."""
    for name in CONSISTENCY_LEVELS:
        if isinstance(level, str) and level.lower() == name.lower():
            return name
    raise InvalidInput(f"unknown Milvus consistency level {level!r}: use one of {', '.join(CONSISTENCY_LEVELS)}")
