"""The Milvus backend against real Milvus Lite (a temporary .db) and a real standalone server.

Each behaviour runs on both deployments; results are checked against FAISS exact search.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

from conftest import STORE_DIM, store_info
from knnlm_vdb.datastore import create_store, open_store
from knnlm_vdb.datastore.base import MISSING_VALUE, StoreInfo, entry_ids
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.datastore.milvus import MilvusDatastore, drop_domain, list_domains, redact_uri, validate_index
from knnlm_vdb.datastore.milvus.store import BYTES_PER_HIT
from knnlm_vdb.errors import BackendUnavailable, KnnlmError

DIM = STORE_DIM
INFO = store_info()


@pytest.fixture()
def domain(uri):
    """A domain name of its own for each test (the server is shared); dropped afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    if os.path.exists(uri) or uri.startswith("http"):
        if name in list_domains(uri):
            drop_domain(uri, name)


def random_rows(n: int, seed: int = 0, domain: str = "d", doc: str = "doc"):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DIM)).astype(np.float32)
    values = rng.integers(0, 257, n).astype(np.int32)
    positions = np.arange(n, dtype=np.int64)
    return entry_ids(domain, doc, positions), keys, values, positions


def faiss_exact(tmp_path, ids, keys, values) -> FaissDatastore:
    store = FaissDatastore.create(tmp_path / "faiss", INFO, index="flat", key_dtype="float32")
    store.add(ids, keys, values)
    return store


# ---- pure validation --------------------------------------------------------------------------
def test_validate_index_rules():
    cfg = validate_index("hnsw", deployment="lite")
    assert cfg.index_type == "HNSW" and cfg.build_params == {"M": 16, "efConstruction": 200}
    assert cfg.search_request(100)["params"]["ef"] == 100  # default ef = max(k, 64)
    assert cfg.search_request(8)["params"]["ef"] == 64
    assert validate_index("IVF_FLAT", {"nlist": 16}).search_request(8)["params"]["nprobe"] == 16
    cases = [
        (dict(index_type="HNSW", search_params={"ef": 32}, k=64), "ef=32 is smaller than --k 64"),
        (dict(index_type="FLAT", k=16385), "exceeds 16384"),
        (dict(index_type="FLAT", k=0), "positive integer"),
        (dict(index_type="IVF_FLAT", build_params={"nlist": 16}, search_params={"nprobe": 32}), "exceeds nlist=16"),
        (dict(index_type="IVF_PQ", deployment="lite"), "not supported by Milvus Lite"),
        (dict(index_type="GPU_CAGRA", deployment="lite"), "not supported by Milvus Lite"),
        (dict(index_type="GPU_CAGRA", deployment="server-cpu"), "not supported"),
        (dict(index_type="HNSW", deployment="server-gpu"), "not supported"),
        (dict(index_type="DISKANN"), "not supported"),
        (dict(index_type="HNSW", search_params={"eff": 64}), "unknown HNSW search parameter 'eff'"),
        (dict(index_type="HNSW", build_params={"M": 1}), "M=1 must be an integer in [2, 2048]"),
        (dict(index_type="IVF_FLAT", build_params={"nlist": "16"}), "must be an integer"),
        (dict(index_type="IVF_PQ", build_params={"m": 5}, dim=16), "m=5 must divide"),
        (dict(index_type="GPU_CAGRA", k=2048), "exceeds 1024"),
        (dict(index_type="GPU_CAGRA", search_params={"itopk_size": 64}, k=128), "itopk_size=64 is smaller"),
        (dict(index_type="GPU_IVF_PQ", k=1025), "exceeds 1024"),
        (dict(index_type="GPU_IVF_FLAT", k=257), "exceeds 256"),
    ]
    for kwargs, message in cases:
        with pytest.raises(KnnlmError, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_index(**kwargs)
    assert validate_index("IVF_PQ", dim=DIM).build_params["m"] == 16  # default m: a divisor of dim
    assert validate_index("GPU_CAGRA", k=1024).search_request(1000)["params"]["itopk_size"] >= 1000


def test_uri_domain_and_option_errors(tmp_path):
    with pytest.raises(KnnlmError, match="invalid domain"):
        MilvusDatastore.create(str(tmp_path / "a.db"), "bad-name", INFO)
    with pytest.raises(KnnlmError, match="invalid domain"):
        MilvusDatastore.create(str(tmp_path / "a.db"), "a__v2", INFO)
    with pytest.raises(KnnlmError, match="must be a local path ending in .db"):
        MilvusDatastore.create(str(tmp_path / "a.sqlite"), "a", INFO)
    with pytest.raises(KnnlmError, match="unknown Milvus option"):
        MilvusDatastore.create(str(tmp_path / "a.db"), "a", INFO, nprob=3)
    with pytest.raises(KnnlmError, match="no Milvus Lite database"):
        MilvusDatastore.open(str(tmp_path / "missing.db"), "a")
    assert not (tmp_path / "a.db").exists()
    assert redact_uri("https://user:secret@host:19530") == "https://***@host:19530"


def test_unreachable_server_fails_fast():
    t = time.perf_counter()
    with pytest.raises(BackendUnavailable, match=r"cannot connect to Milvus at http://127\.0\.0\.1:1\b"):
        open_store("milvus", "http://127.0.0.1:1", domain="x", timeout=5, token="s3cret")
    with pytest.raises(BackendUnavailable, match="cannot connect") as info:
        list_domains("http://127.0.0.1:1", timeout=5, token="s3cret")
    assert "s3cret" not in str(info.value)
    assert time.perf_counter() - t < 12


# ---- both deployments -------------------------------------------------------------------------
def test_invalid_index_refused_before_create(uri, domain):
    bad = [dict(index_type="HNSW", search_params={"ef": 8}, k=16),
           dict(index_type="FLAT", k=20000),
           dict(index_type="IVF_FLAT", index_params={"nlist": 16}, search_params={"nprobe": 32}),
           dict(index_type="NOT_AN_INDEX")]
    if uri.endswith(".db"):
        bad.append(dict(index_type="GPU_CAGRA"))
    for options in bad:
        with pytest.raises(KnnlmError):
            create_store("milvus", uri, INFO, domain=domain, **options)
    if uri.endswith(".db"):
        assert not os.path.exists(uri)  # nothing was even connected to
    else:
        assert domain not in list_domains(uri)
        # a GPU index passes validation for a server of unknown hardware; a CPU server refuses it
        # and the half-made collection is removed
        with pytest.raises(KnnlmError, match="GPU_CAGRA"):
            create_store("milvus", uri, INFO, domain=domain, index_type="GPU_CAGRA")
        assert domain not in list_domains(uri)
    # a search-time k that the stored index cannot serve is refused too
    with MilvusDatastore.create(uri, domain, INFO, index_type="HNSW", search_params={"ef": 8}) as store:
        with pytest.raises(KnnlmError, match="ef=8 is smaller than --k 16"):
            store.search(np.zeros((1, DIM), np.float32), 16)


def test_flat_matches_faiss_exact(uri, domain, tmp_path):
    ids, keys, values, positions = random_rows(500)
    exact = faiss_exact(tmp_path, ids, keys, values)
    with MilvusDatastore.create(uri, domain, INFO, index_type="FLAT") as store:
        assert store.add(ids, keys, values, doc_ids=["doc"] * 500, positions=positions) == 500
        queries = np.random.default_rng(1).standard_normal((40, DIM)).astype(np.float32)
        for k in (10, 600):  # 600 > 500 stored rows: padded
            d_m, v_m = store.search(queries, k)
            d_f, v_f = exact.search(queries, k)
            assert d_m.dtype == np.float32 and v_m.dtype == np.int32 and d_m.shape == (40, k)
            np.testing.assert_array_equal(v_m, v_f)
            np.testing.assert_allclose(d_m, d_f, rtol=1e-4, atol=1e-4)
        assert (v_m[:, 500:] == MISSING_VALUE).all() and np.isinf(d_m[:, 500:]).all()
        _, nn_ids = store.search_ids(queries[:5], 10)
        exact_rows = np.argsort(((queries[:5, None, :] - keys[None]) ** 2).sum(-1), axis=1)[:, :10]
        np.testing.assert_array_equal(nn_ids, ids[exact_rows])
        # force many small RPCs: the split must not change results
        store.rpc_budget_bytes = 7 * 10 * BYTES_PER_HIT
        assert store.queries_per_call(10) == 7
        d_s, v_s = store.search(queries, 10)
        np.testing.assert_array_equal(v_s, exact.search(queries, 10)[1])


def test_knnlm_perplexity_matches_faiss(uri, domain, tmp_path, llama_lm):
    from conftest import TINY_TEXT
    from knnlm_vdb.corpus import Document
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.evaluate import evaluate
    from knnlm_vdb.ingest import ingest

    enc = Encoder(llama_lm, ctx=32, stride=16)
    info = StoreInfo.for_encoder(enc)
    docs = [Document("train.txt", TINY_TEXT)]
    exact = FaissDatastore.create(tmp_path / "faiss", info, index="flat", key_dtype="float32")
    ingest(enc, exact, docs, domain=domain, show_progress=False)
    test_ids = enc.tokenize("A lazy fox remembers the quick dog. def sub(a, b):\n    return a - b\n" * 2)
    with create_store("milvus", uri, info, domain=domain) as store:
        report = ingest(enc, store, docs, domain=domain, show_progress=False)
        assert report.added == exact.count() == store.count() > 0
        got = evaluate(enc, test_ids, [store], k=16, show_progress=False)
    want = evaluate(enc, test_ids, [exact], k=16, show_progress=False)
    assert got.tokens == want.tokens > 0
    assert got.knnlm_ppl != got.base_ppl
    assert got.knnlm_ppl == pytest.approx(want.knnlm_ppl, rel=1e-4)


def test_domains_are_isolated(uri, domain):
    other = domain + "_b"
    ids_a, keys_a, _, _ = random_rows(50, seed=1, domain=domain)
    ids_b, keys_b, _, _ = random_rows(50, seed=2, domain=other)
    try:
        with create_store("milvus", uri, INFO, domain=domain) as a, create_store("milvus", uri, INFO, domain=other) as b:
            a.add(ids_a, keys_a, np.full(50, 1, np.int32))
            b.add(ids_b, keys_b, np.full(50, 2, np.int32))
            assert a.count() == b.count() == 50
            _, v_a = a.search(keys_b[:5], 60)  # b's own keys, searched in a
            assert set(np.unique(v_a).tolist()) == {1, MISSING_VALUE}
            assert {domain, other} <= set(list_domains(uri))
        with pytest.raises(KnnlmError, match="already exists"):
            create_store("milvus", uri, INFO, domain=other)
        assert drop_domain(uri, other)
        assert other not in list_domains(uri) and domain in list_domains(uri)
        with pytest.raises(KnnlmError, match=f"no domain '{other}'"):
            open_store("milvus", uri, domain=other)
        with open_store("milvus", uri, domain=domain) as a:
            assert a.count() == 50
    finally:
        if other in list_domains(uri):
            drop_domain(uri, other)


def test_readding_same_ids_adds_nothing(uri, domain):
    ids, keys, values, positions = random_rows(120, domain=domain)
    batch = 30 * (4 * DIM + 64 + 3)  # several upserts per add
    with create_store("milvus", uri, INFO, domain=domain, insert_batch_bytes=batch) as store:
        assert store.add(ids[:100], keys[:100], values[:100], positions=positions[:100]) == 100
        assert store.add(ids[:100], keys[:100], values[:100]) == 0
        assert store.add(ids[50:], keys[50:], values[50:]) == 20  # 50 stored, 20 new
        dup = np.concatenate([ids[:3], ids[:3]])
        assert store.add(dup, np.concatenate([keys[:3]] * 2), np.concatenate([values[:3]] * 2)) == 0
        assert store.count() == 120
        with pytest.raises(KnnlmError, match="dimension"):
            store.add(ids[:2], np.zeros((2, DIM + 1), np.float32), values[:2])
    with open_store("milvus", uri, domain=domain) as store:
        assert store.add(ids, keys, values) == 0 and store.count() == 120


def test_incompatible_model_refused_and_info_round_trips(uri, domain):
    with create_store("milvus", uri, INFO, domain=domain):
        pass
    with open_store("milvus", uri, domain=domain) as store:
        assert store.info == INFO
        store.info.check_compatible(INFO, domain)
        for change in ({"dim": DIM * 2}, {"model": "other-lm"}, {"tokenizer": "tok-other"}, {"key_type": "final_hidden"}):
            other = StoreInfo(**{**INFO.to_dict(), **change})
            with pytest.raises(KnnlmError, match=f"built with {next(iter(change))}="):
                store.info.check_compatible(other, domain)
        with pytest.raises(KnnlmError, match="dimension"):
            store.search(np.zeros((1, DIM * 2), np.float32), 4)
    with pytest.raises(KnnlmError, match="indexed with FLAT"):
        open_store("milvus", uri, domain=domain, index_type="HNSW")


def test_set_extra_survives_reopen(uri, domain):
    with create_store("milvus", uri, INFO, domain=domain, index_type="IVF_FLAT", index_params={"nlist": 8}) as store:
        store.set_extra("tuned", {"k": 8, "temperature": 1.0, "lambda": 0.25})
        store.set_extra("note", "calibrated")
    with open_store("milvus", uri, domain=domain) as store:
        assert store.info.extra == {"tuned": {"k": 8, "temperature": 1.0, "lambda": 0.25}, "note": "calibrated"}
        desc = store.describe()
        assert desc["index"]["type"] == "IVF_FLAT" and desc["index"]["build_params"]["nlist"] == 8
        assert desc["extra"]["note"] == "calibrated" and desc["domain"] == domain and desc["count"] == 0
        assert desc["backend"] == "milvus" and desc["dim"] == DIM and desc["model"] == INFO.model
    with pytest.raises(KnnlmError, match="not JSON"):
        with open_store("milvus", uri, domain=domain) as store:
            store.set_extra("bad", object())


def test_hnsw_returns_k_neighbours(uri, domain):
    ids, keys, values, _ = random_rows(400, domain=domain)
    with create_store("milvus", uri, INFO, domain=domain, index_type="HNSW",
                      index_params={"M": 8, "efConstruction": 64}) as store:
        empty_d, empty_v = store.search(keys[:3], 5)
        assert (empty_v == MISSING_VALUE).all() and np.isinf(empty_d).all()
        store.add(ids, keys, values)
        store.seal()  # sealed segments get the HNSW graph
        for k in (100, 300):  # default ef = max(k, 64)
            d, v = store.search(keys[:20], k)
            assert (v != MISSING_VALUE).all() and np.isfinite(d).all()
            assert (np.diff(d, axis=1) >= 0).all()
            np.testing.assert_array_equal(v[:, 0], values[:20])  # each key finds itself first
    with open_store("milvus", uri, domain=domain, search_params={"ef": 300}) as store:
        assert (store.search(keys[:5], 300)[1] != MISSING_VALUE).all()


def test_delete_ids_and_ledger(uri, domain):
    ids, keys, values, _ = random_rows(60, domain=domain)
    with create_store("milvus", uri, INFO, domain=domain) as store:
        store.add(ids, keys, values)
        assert store.delete_ids(np.concatenate([ids[:10], ids[:3], [12345]])) == 10
        assert store.count() == 50
        assert (store.search(keys[:10], 1)[0][:, 0] > 0).all()  # deleted keys no longer find themselves
        assert store.add(ids, keys, values) == 10  # and can come back
        ledger = store.ledger()
        assert ledger.documents() == {}
        ledger.commit_chunk("doc 'a\"", 0, "h1", 9000)
        ledger.commit_chunk("doc 'a\"", 1, "h1", 9000)
        ledger.commit_chunk("b", 0, "h2", 10)
    with open_store("milvus", uri, domain=domain) as store:
        docs = store.ledger().documents()
        assert docs["doc 'a\""].chunks == {0, 1} and docs["doc 'a\""].content_hash == "h1"
        assert docs["b"].n_tokens == 10
        ledger = store.ledger()
        ledger.commit_chunk("b", 0, "h3", 12)  # changed text: a fresh record
        ledger.forget("doc 'a\"")
    with open_store("milvus", uri, domain=domain) as store:
        docs = store.ledger().documents()
        assert set(docs) == {"b"} and docs["b"].content_hash == "h3" and docs["b"].chunks == {0}
    dropped = drop_domain(uri, domain)
    assert any(name.endswith("__ledger") for name in dropped)
