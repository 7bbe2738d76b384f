"""Compressed keys: the learned projection, FAISS SQ8/PQ forms, Milvus IVF_SQ8/IVF_PQ, bytes per entry.

Real FAISS and real Milvus (Lite and the standalone server); keys are random with a low
intrinsic dimension, like LM hidden states, so a projection can keep their neighbours.
"""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import store_info
from knnlm_vdb.cli import main
from knnlm_vdb.datastore import IndexSpec, StoreSpec, create_spec, open_spec
from knnlm_vdb.datastore.base import entry_ids
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.projection import Projection

INFO = store_info()  # dim 16
WIN = ["--ctx", "64", "--stride", "32"]


def low_rank_rows(n: int, rank: int = 4, dim: int = 16, seed: int = 0, noise: float = 1e-3):
    """Keys on a ``rank``-dimensional subspace (plus a little noise), offset from the origin."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    keys = rng.standard_normal((n, rank)) @ basis * 3 + 5 + noise * rng.standard_normal((n, dim))
    return (entry_ids("default", f"doc{seed}", np.arange(n)), keys.astype(np.float32),
            rng.integers(0, 257, n).astype(np.int32))


def exact_rows(keys, queries, k):
    d = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    return np.argsort(d, axis=1)[:, :k], np.sort(d, axis=1)[:, :k]


def test_projection_is_orthonormal_keeps_low_rank_distances_and_round_trips(tmp_path):
    _, keys, _ = low_rank_rows(500)
    p = Projection.fit(keys, 4)
    assert np.allclose(p.basis @ p.basis.T, np.eye(4), atol=1e-5)
    assert p.explained_variance > 0.999
    a, b = p.apply(keys[:50]), p.apply(keys[50:100])
    d_proj = ((a - b) ** 2).sum(-1)
    d_orig = ((keys[:50] - keys[50:100]) ** 2).sum(-1)
    assert np.allclose(d_proj, d_orig, rtol=1e-3)  # same scale: the tuned temperature still fits
    p.save(tmp_path / "p.npz")
    again = Projection.load(tmp_path / "p.npz", p.summary())
    assert np.array_equal(again.apply(keys[:5]), p.apply(keys[:5]))
    assert np.array_equal(Projection.from_dict(json.loads(json.dumps(p.to_dict()))).basis, p.basis)


@pytest.mark.parametrize("index", ["flat", "sq8", "pq", "rq"])
def test_faiss_projected_store_finds_the_exact_neighbours_after_reopen(tmp_path, index):
    ids, keys, values = low_rank_rows(2000)
    proj = Projection.fit(keys[:1000], 4)
    store = FaissDatastore.create(tmp_path / "ds", INFO, index=index, pq_m={"pq": 4, "rq": 5}.get(index),
                                  key_dtype="float32", projection=proj, recompute=index != "flat")
    store.add(ids[:1500], keys[:1500], values[:1500])  # model-space keys in
    store.finalize()
    store.add(ids[1500:], keys[1500:], values[1500:])  # appended after training: encoded, persisted
    store.close()
    assert (tmp_path / "ds" / "keys.bin").stat().st_size == 2000 * 4 * 4  # 4-d keys stored
    store = FaissDatastore(tmp_path / "ds")
    assert store.count() == 2000 and store.dim == 4 and store.info.dim == 16
    queries = keys[[3, 700, 1999]] + 0.01
    dist, vals = store.search(queries, 8)  # model-space queries in
    rows, d_exact = exact_rows(keys, queries, 8)
    assert np.array_equal(vals, values[rows])
    assert np.allclose(dist, d_exact, rtol=0.05, atol=2e-3)  # minus the query offset off the subspace
    hits = store.entries(queries, 8)  # provenance names the neighbours search mixed, at its distances
    assert [[h["target"] for h in q] for q in hits] == vals.tolist()
    assert np.allclose([[h["distance"] for h in q] for q in hits], dist, rtol=1e-5)
    desc = store.describe()
    assert desc["projection"]["dim_in"] == 16 and desc["projection"]["dim_out"] == 4
    assert desc["stored_dim"] == 4


def test_sq8_and_pq_survive_reopen_and_appends_are_searchable(tmp_path):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1200, 16)).astype(np.float32)
    values = rng.integers(0, 257, 1200).astype(np.int32)
    ids = entry_ids("default", "d", np.arange(1200))
    for index in ("sq8", "pq"):
        path = tmp_path / index
        s = FaissDatastore.create(path, INFO, index=index, pq_m=8 if index == "pq" else None, recompute=True)
        s.add(ids[:1000], keys[:1000], values[:1000])
        s.finalize()
        assert (path / "index.faiss").exists()
        s.add(ids[1000:], keys[1000:], values[1000:])
        s.close()
        s = FaissDatastore(path)
        assert s.describe()["index"]["indexed_count"] == 1200
        dist, vals = s.search(keys[[5, 1100]], 1)
        assert list(vals[:, 0]) == [values[5], values[1100]]  # re-ranked with the stored keys: exact
        assert np.allclose(dist[:, 0], 0, atol=1e-2)


def test_bytes_per_entry_falls_with_compression(tmp_path):
    ids, keys, values = low_rank_rows(600)
    proj = Projection.fit(keys, 8)
    forms = [("flat", None, None), ("sq8", None, None), ("sq8", proj, None), ("pq", None, 4), ("pq", proj, 2),
             ("rq", proj, 3)]
    totals = []
    for i, (index, p, m) in enumerate(forms):
        s = FaissDatastore.create(tmp_path / str(i), INFO, index=index, pq_m=m, projection=p)
        s.add(ids, keys, values)
        s.finalize()
        b = s.describe()["bytes_per_entry"]
        assert b["total"] == b["vectors"] + b["index"] + b["payload"] + b["rerank"]
        totals.append(b["total"])
    assert totals == [16 * 4 + 4, 16 + 4, 8 + 4, 4 + 4, 2 + 4, 3 + 4]


def test_bad_compression_options_are_one_line_invalid_input(tmp_path):
    _, keys, _ = low_rank_rows(100)
    with pytest.raises(InvalidInput, match="project-dim"):
        Projection.fit(keys, 17)
    with pytest.raises(InvalidInput, match="pq-m 5 must divide the key dimension 16"):
        FaissDatastore.create(tmp_path / "a", INFO, index="pq", pq_m=5)
    with pytest.raises(InvalidInput, match="pq-m 3 must divide the key dimension 8"):
        FaissDatastore.create(tmp_path / "b", INFO, index="pq", pq_m=3, projection=Projection.fit(keys, 8))
    with pytest.raises(InvalidInput, match="an rq code needs at least 2 bytes"):
        FaissDatastore.create(tmp_path / "r", INFO, index="rq", pq_m=1)
    with pytest.raises(InvalidInput, match="unknown FAISS --index"):
        FaissDatastore.create(tmp_path / "c", INFO, index="lsh")
    with pytest.raises(InvalidInput, match="pq-m 5 must divide the key dimension 8"):
        IndexSpec.from_options("milvus", "IVF_PQ", pq_m=5, project_dim=8)


def test_cli_build_with_projection_and_bad_options(tmp_path, tiny_model_dirs, corpus_file):
    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    base = ["build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus_file]
    r = run(*base, "--out", tmp_path / "bad1", "--project-dim", 999)  # the tiny model's keys are 32-d
    assert r.exit_code == 2 and "--project-dim must be an integer in [1, 32]" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = run(*base, "--out", tmp_path / "bad2", "--index", "pq", "--pq-m", 5, "--project-dim", 8)
    assert r.exit_code == 2 and "--pq-m 5 must divide the key dimension 8" in r.output
    r = run(*base, "--out", tmp_path / "ds", "--index", "sq8", "--project-dim", 8, "--json")
    assert r.exit_code == 0, r.output
    desc = json.loads(r.output)["datastore"]
    assert desc["projection"]["dim_in"] == 32 and desc["projection"]["dim_out"] == 8
    assert desc["bytes_per_entry"]["vectors"] == 8
    r = run("eval", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", tmp_path / "ds", "--corpus",
            corpus_file, "--k", 8, "--lambda", 0.5, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["knnlm_ppl"] < out["base_ppl"]  # queries were projected like the stored keys


@pytest.mark.parametrize("index_type", ["IVF_SQ8", "IVF_PQ"])
def test_milvus_projected_domain_with_compressed_index(uri, index_type):
    domain = f"t{uuid.uuid4().hex[:10]}"
    if index_type == "IVF_PQ" and not uri.startswith("http"):  # Lite 3.2.2 cannot build it
        with pytest.raises(InvalidInput, match="not supported by Milvus Lite"):
            create_spec(StoreSpec("milvus", uri, domain), INFO, IndexSpec.from_options("milvus", "IVF_PQ"))
        return
    ids, keys, values = low_rank_rows(3000)
    proj = Projection.fit(keys[:2000], 8)
    spec = StoreSpec("milvus", uri, domain)
    index = IndexSpec.from_options("milvus", index_type, nlist=16, nprobe=16,
                                   pq_m=4 if index_type == "IVF_PQ" else None, project_dim=8)
    store = create_spec(spec, INFO, index, projection=proj)
    store.add(ids, keys, values, doc_ids=["d"] * len(ids), positions=np.arange(len(ids)))
    store.close()
    store = open_spec(spec)
    try:
        assert store.count() == 3000
        desc = store.describe()
        assert desc["projection"]["dim_out"] == 8 and desc["stored_dim"] == 8
        assert desc["index"]["type"] == index_type
        b = desc["bytes_per_entry"]
        assert b["vectors"] == (8 if index_type == "IVF_SQ8" else 4) and b["raw_stored"] == 32
        queries = keys[[10, 2500]]
        _, vals = store.search(queries, 1)
        assert list(vals[:, 0]) == [values[10], values[2500]]
    finally:
        store.close()


def test_reindex_moves_a_live_domain_to_projected_sq8_keys(uri):
    domain = f"t{uuid.uuid4().hex[:10]}"
    ids, keys, values = low_rank_rows(1500, rank=4)
    spec = StoreSpec("milvus", uri, domain)
    store = create_spec(spec, INFO, IndexSpec.from_options("milvus", "FLAT"))
    store.add(ids, keys, values, doc_ids=["d"] * len(ids), positions=np.arange(len(ids)))
    store.close()
    queries = keys[[7, 1200]] + 0.001
    r = CliRunner().invoke(main, ["reindex", "--uri", uri, "--domain", domain, "--index-type", "IVF_SQ8",
                                  "--index-param", "nlist=8", "--search-param", "nprobe=8", "--project-dim", "8",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["projection"]["dim_out"] == 8
    store = open_spec(spec)
    try:
        desc = store.describe()
        assert desc["stored_dim"] == 8 and desc["index"]["type"] == "IVF_SQ8" and desc["count"] == 1500
        assert desc["bytes_per_entry"]["vectors"] == 8
        _, vals = store.search(queries, 1)  # model-space queries, projected by the domain's stored projection
        assert list(vals[:, 0]) == [values[7], values[1200]]
    finally:
        store.close()
    r = CliRunner().invoke(main, ["reindex", "--uri", uri, "--domain", domain, "--index-type", "FLAT",
                                         "--project-dim", "4"])
    assert r.exit_code == 2 and "already stores projected keys" in r.output


def test_distance_scale_keeps_neighbour_distances_comparable():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3000, 16)) * np.r_[np.full(4, 6.0), np.full(12, 1.0)]).astype(np.float32)
    p = Projection.fit(x, 4)
    assert p.distance_scale > 1.5  # neighbours differ mostly in the 12 dropped directions
    q, pool = x[:200], x[200:]
    d_proj = ((p.apply(q)[:, None] - p.apply(pool)[None]) ** 2).sum(-1)
    nn = np.argsort(d_proj, axis=1)[:, :8]
    d_full = ((q[:, None] - pool[None]) ** 2).sum(-1)
    full = np.take_along_axis(d_full, nn, 1).mean()
    raw, scaled = full / np.take_along_axis(d_proj, nn, 1).mean(), full / p.scale_distances(np.take_along_axis(d_proj, nn, 1)).mean()
    assert raw > 2.5 and 0.6 < scaled < 1.6  # measured on other neighbours (k=32 of 2.5k): close, not equal


def test_rq_trains_on_a_capped_sample(caplog):
    """rq's training time grows with its sample (codebooks fitted in turn, with a beam search):
    it trains on RQ_TRAIN_ROWS keys however large the store, and still encodes every key."""
    import logging

    from knnlm_vdb.datastore.faiss_index import RQ_TRAIN_ROWS, train

    rows = RQ_TRAIN_ROWS + 5000
    keys = np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32)
    spec = {"type": "rq", "nlist": None, "pq_m": 2, "nprobe": 1}
    with caplog.at_level(logging.INFO, logger="knnlm_vdb.datastore.faiss_index"):
        index = train(keys, spec, 4)
    assert f"training RQ1x8_Ncqint8 on {RQ_TRAIN_ROWS} of {rows} keys" in caplog.text
    assert index.ntotal == rows and spec["indexed_count"] == rows


def test_projection_sample_spreads_over_the_documents_a_build_stores(llama_lm):
    """A build fits its projection on keys from all over the corpus, not its first topic, each
    with the context a full pass gives it; documents past --max-tokens are not sampled."""
    from knnlm_vdb.corpus import Document
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.ingest import sample_keys

    enc = Encoder(llama_lm, ctx=32, stride=16, batch_size=4)
    rng = np.random.default_rng(0)
    docs = [Document(f"d{i}", "".join(rng.choice(list("abcdefghij klmnop"), 100))) for i in range(10)]
    full = [np.concatenate([b.keys for b in enc.encode(enc.tokenize(d.text), with_logprobs=False)]) for d in docs]

    def owners(sample):  # the document each sampled key is a stored key of (None: not a stored key)
        return [next((j for j, f in enumerate(full) if np.abs(f - row).max(1).min() < 1e-5), None) for row in sample]

    sample = sample_keys(enc, docs, 64)  # ~1,000 targets in ~60 windows of 16-31
    assert 48 <= len(sample) <= 96
    owner = owners(sample)
    assert None not in owner  # every sampled key is one the store holds, with the context a full pass gives
    assert owner[0] == 0 and owner[-1] == 9 and len(set(owner)) == 4
    capped = owners(sample_keys(enc, docs, 64, max_tokens=3 * 99))  # the first 3 documents' targets
    assert None not in capped and set(capped) <= {0, 1, 2} and capped[-1] == 2
    everything = sample_keys(enc, docs, 10_000)  # fewer targets than rows: all of them
    assert len(everything) == sum(len(f) for f in full)
