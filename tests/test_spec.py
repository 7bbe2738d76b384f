"""``StoreSpec``/``IndexSpec``: the CLI's index options translated once per backend, and the
factory that opens or creates a store from a spec (real FAISS directories, Milvus Lite)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import STORE_DIM, store_info

from knnlm_vdb.datastore import IndexSpec, StoreSpec, create_spec, entry_ids, open_or_create, open_spec
from knnlm_vdb.errors import InvalidInput, NotFound


def test_faiss_translation():
    spec = IndexSpec.from_options("faiss", "IVFPQ", nlist=64, pq_m=8, nprobe=4, recompute=True, key_dtype="float32")
    assert spec.options() == {"index": "ivfpq", "nlist": 64, "pq_m": 8, "nprobe": 4, "recompute": True,
                              "key_dtype": "float32"}
    assert "nprobe" not in IndexSpec.from_options("faiss", "flat").options()  # the store's own default


@pytest.mark.parametrize("index, kw, build, search", [
    ("ivf_flat", {"nlist": 128, "nprobe": 16}, {"nlist": 128}, {"nprobe": 16}),
    ("FLAT", {"nprobe": 32}, {}, {}),  # nprobe means nothing without IVF lists
    ("hnsw", {"nprobe": 32, "M": 16, "ef_construction": 200, "ef": 64}, {"M": 16, "efConstruction": 200}, {"ef": 64}),
    ("IVF_PQ", {"nlist": 64, "nprobe": 8, "params": {"m": 4}}, {"nlist": 64, "m": 4}, {"nprobe": 8}),
])
def test_milvus_translation(index, kw, build, search):
    o = IndexSpec.from_options("milvus", index, **kw).options()
    assert o == {"index_type": index.upper(), "index_params": build, "search_params": search}


def test_specs_are_values():
    spec = StoreSpec("milvus", "http://h:19530", domain="wiki", token="root:secret")
    assert spec == StoreSpec("milvus", "http://h:19530", domain="wiki", token="root:secret")
    assert "secret" not in repr(spec) and spec.name == "wiki"
    assert spec.connection() == {"token": "root:secret"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.domain = "other"
    with pytest.raises(InvalidInput, match="unknown --backend 'annoy'"):
        StoreSpec("annoy", "x")
    with pytest.raises(ValueError, match="faiss index spec for a milvus store"):
        create_spec(spec, store_info(), IndexSpec.from_options("faiss", "flat"))


def _add(store, n, seed=0):
    rng = np.random.default_rng(seed)
    store.add(entry_ids(store.domain, "doc", range(n)), rng.standard_normal((n, STORE_DIM)).astype(np.float32),
              rng.integers(0, 257, n).astype(np.int32), doc_ids=["doc"] * n, positions=list(range(n)))
    store.flush()


def test_faiss_open_or_create(tmp_path):
    spec = StoreSpec("faiss", str(tmp_path / "ds"), domain="notes")
    with pytest.raises(NotFound):
        open_spec(spec)
    store = open_or_create(spec, store_info(), IndexSpec.from_options("faiss", "flat", key_dtype="float32"))
    assert (store.domain, store.location, store.describe()["key_dtype"]) == ("notes", spec.location, "float32")
    _add(store, 5)
    store.close()
    again = open_or_create(spec, store_info(), IndexSpec.from_options("faiss", "ivfpq", nlist=2))
    assert again.count() == 5 and again.describe()["index"]["type"] == "flat"  # an existing store keeps its index


def test_milvus_lite_from_spec(tmp_path):
    spec = StoreSpec("milvus", str(tmp_path / "knnlm.db"), domain="wiki", consistency="Bounded")
    index = IndexSpec.from_options("milvus", "hnsw", M=8, ef_construction=32, ef=64)
    store = create_spec(spec, store_info(), index)
    try:
        desc = store.describe()
        assert desc["index"]["type"] == "HNSW" and desc["consistency"] == "Bounded"
        assert desc["index"]["build_params"]["M"] == 8 and desc["index"]["search_params"]["ef"] == 64
        _add(store, 4)
    finally:
        store.close()
    store = open_or_create(spec, store_info(), IndexSpec.from_options("milvus", "flat"))
    try:
        assert store.count() == 4 and store.describe()["index"]["type"] == "HNSW"
    finally:
        store.close()
