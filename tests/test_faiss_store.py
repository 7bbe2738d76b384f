"""The FAISS datastore against numpy brute force, and its on-disk commit protocol."""
import numpy as np
import pytest

from knnlm_vdb.datastore import StoreInfo, entry_ids
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.errors import KnnlmError

INFO = StoreInfo(model="m", key_type="ffn_input", dim=16, tokenizer="t", vocab_size=1000)


def rows(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return (entry_ids("d", "doc", np.arange(n)), rng.standard_normal((n, dim)).astype(np.float32),
            rng.integers(0, 1000, n).astype(np.int32))


def brute_force(keys, queries, k):
    d = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_exact_search_equals_numpy(tmp_path):
    ids, keys, vals = rows(500)
    store = FaissDatastore.create(tmp_path / "s", INFO, key_dtype="float32")
    assert store.add(ids, keys, vals) == 500
    queries = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    dist, got_vals = store.search(queries, 10)
    exp_d, exp_rows = brute_force(keys, queries, 10)
    np.testing.assert_allclose(dist, exp_d, rtol=1e-4, atol=1e-4)
    assert np.array_equal(got_vals, vals[exp_rows])


def test_stored_key_retrieves_itself_at_distance_zero(tmp_path):
    ids, keys, vals = rows(100)
    store = FaissDatastore.create(tmp_path / "s", INFO, key_dtype="float32")
    store.add(ids, keys, vals)
    dist, got = store.search(keys[[3, 42]], 1)
    assert dist[:, 0] == pytest.approx([0.0, 0.0], abs=1e-4)
    assert got[:, 0].tolist() == [vals[3], vals[42]]


def test_fewer_entries_than_k_are_padded(tmp_path):
    ids, keys, vals = rows(3)
    store = FaissDatastore.create(tmp_path / "s", INFO)
    store.add(ids, keys, vals)
    dist, got = store.search(keys[:1], 5)
    assert np.isinf(dist[0, 3:]).all() and (got[0, 3:] == -1).all() and (got[0, :3] >= 0).all()


def test_adding_the_same_ids_twice_adds_nothing(tmp_path):
    ids, keys, vals = rows(50)
    store = FaissDatastore.create(tmp_path / "s", INFO)
    assert store.add(ids, keys, vals) == 50
    assert store.add(ids, keys, vals) == 0
    assert FaissDatastore(tmp_path / "s").add(ids[:10], keys[:10], vals[:10]) == 0
    assert FaissDatastore(tmp_path / "s").count() == 50


def test_reopen_preserves_rows_and_uncommitted_bytes_are_cut(tmp_path):
    ids, keys, vals = rows(40)
    store = FaissDatastore.create(tmp_path / "s", INFO, key_dtype="float32")
    store.add(ids[:30], keys[:30], vals[:30])
    # a writer that died after writing data but before committing meta.json
    with open(tmp_path / "s" / "keys.bin", "ab") as f:
        f.write(keys[30:35].tobytes())
    again = FaissDatastore(tmp_path / "s")
    assert again.count() == 30
    assert again.add(ids[30:], keys[30:], vals[30:]) == 10
    final = FaissDatastore(tmp_path / "s")
    np.testing.assert_array_equal(np.asarray(final.keys()), keys)
    np.testing.assert_array_equal(final.values(), vals)


def test_ivfpq_recall_and_exact_recompute(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16)) * 4
    keys = (centers[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, 16))).astype(np.float32)
    ids, vals = entry_ids("d", "doc", np.arange(4000)), np.arange(4000, dtype=np.int32)
    flat = FaissDatastore.create(tmp_path / "flat", INFO, key_dtype="float32")
    flat.add(ids, keys, vals)
    ivf = flat.copy_to(tmp_path / "ivf", index="ivfpq", nlist=16, pq_m=8, nprobe=16, recompute=True)
    assert (tmp_path / "ivf" / "index.faiss").exists()
    queries = keys[:50] + 0.1 * rng.standard_normal((50, 16)).astype(np.float32)
    exact_d, exact_v = flat.search(queries, 10)
    d, v = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_v, v)])
    assert recall > 0.5
    # recomputed distances are exact for the candidates found
    hit = v[:, 0] == exact_v[:, 0]
    np.testing.assert_allclose(d[hit, 0], exact_d[hit, 0], rtol=1e-4, atol=1e-4)


def test_ivfpq_append_reuses_the_trained_quantizer(tmp_path):
    ids, keys, vals = rows(3000)
    flat = FaissDatastore.create(tmp_path / "flat", INFO)
    flat.add(ids[:2500], keys[:2500], vals[:2500])
    ivf = flat.copy_to(tmp_path / "ivf", index="ivfpq", nlist=8, pq_m=4, nprobe=8)
    trained_at = (tmp_path / "ivf" / "index.faiss").stat().st_mtime_ns
    ivf.search(keys[:1], 1)
    ivf.add(ids[2500:], keys[2500:], vals[2500:])
    ivf.flush()
    reopened = FaissDatastore(tmp_path / "ivf")
    assert reopened.count() == 3000 and reopened.index_spec["indexed_count"] == 3000
    assert (tmp_path / "ivf" / "index.faiss").stat().st_mtime_ns != trained_at
    _, v = reopened.search(keys[2990:], 1)
    assert (v[:, 0] >= 0).all()


def test_ivfpq_with_too_few_entries_is_refused(tmp_path):
    ids, keys, vals = rows(100)
    store = FaissDatastore.create(tmp_path / "s", INFO, index="ivfpq", nlist=64)
    store.add(ids, keys, vals)
    with pytest.raises(KnnlmError, match="needs at least"):
        store.train()


def test_entry_ids_are_deterministic_and_distinct():
    a = entry_ids("dom", "doc1", np.arange(1000))
    assert np.array_equal(a, entry_ids("dom", "doc1", np.arange(1000)))
    assert len(set(a.tolist())) == 1000 and (a >= 0).all()
    assert not set(a.tolist()) & set(entry_ids("dom", "doc2", np.arange(1000)).tolist())
    assert not set(a.tolist()) & set(entry_ids("other", "doc1", np.arange(1000)).tolist())


def test_bad_creation_arguments(tmp_path):
    with pytest.raises(KnnlmError):
        FaissDatastore.create(tmp_path / "a", INFO, index="hnsw")
    with pytest.raises(KnnlmError):
        FaissDatastore.create(tmp_path / "b", INFO, pq_m=5)
    FaissDatastore.create(tmp_path / "c", INFO)
    with pytest.raises(KnnlmError, match="already exists"):
        FaissDatastore.create(tmp_path / "c", INFO)
    with pytest.raises(KnnlmError, match="no FAISS datastore"):
        FaissDatastore(tmp_path / "missing")
