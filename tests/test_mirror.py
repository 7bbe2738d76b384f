"""The in-process mirror of a Milvus Lite domain (``mirror=True``): same answers as Lite's exact
search, fresh after every write of this process, refused on a server. Real Milvus Lite."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import store_info
from knnlm_vdb.datastore.base import entry_ids
from knnlm_vdb.datastore.milvus import MilvusDatastore, drop_domain
from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.projection import Projection

INFO = store_info()  # dim 16


def rows(n, seed=0, doc="d"):
    rng = np.random.default_rng(seed)
    return (entry_ids("default", doc, np.arange(n)), rng.standard_normal((n, 16)).astype(np.float32),
            rng.integers(0, 257, n).astype(np.int32))


def brute(keys, values, queries, k):
    d = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), values[order]


def test_mirror_answers_like_lite_flat_search_and_follows_writes(tmp_path):
    uri = str(tmp_path / "m.db")
    ids, keys, values = rows(300)
    with MilvusDatastore.create(uri, "docs", INFO, index_type="FLAT") as w:
        w.add(ids, keys, values, doc_ids=["a"] * 300, positions=np.arange(300))
    queries = rows(7, seed=1)[1]
    with MilvusDatastore.open(uri, "docs") as lite, MilvusDatastore.open(uri, "docs", mirror=True) as m:
        d_lite, v_lite = lite.search(queries, 10)
        d_m, v_m = m.search(queries, 10)
        assert m.mirror.version >= 0  # the copy was read, not Lite's search
        assert np.array_equal(v_m, v_lite) and np.allclose(d_m, d_lite, rtol=1e-5)
        d_b, v_b = brute(keys, values, queries, 10)
        assert np.array_equal(v_m, v_b) and np.allclose(d_m, d_b, rtol=1e-4)
        assert np.array_equal(m.search_ids(queries, 3)[1], lite.search_ids(queries, 3)[1])
        assert m.entries(queries[:2], 2) == [[{**e, "distance": pytest.approx(e["distance"], rel=1e-5)} for e in q]
                                             for q in lite.entries(queries[:2], 2)]
        # more neighbours asked than rows: padded like Lite's answer
        assert np.isinf(m.search(queries[:1], 400)[0][0, 300:]).all()

        # a write through any store of this process makes the copy stale: the next search re-reads
        new_ids, new_keys, new_values = rows(5, seed=2, doc="b")
        near = queries[:5] + 1e-3
        lite.add(new_ids, near, new_values, doc_ids=["b"] * 5, positions=np.arange(5))
        d_m, v_m = m.search(queries[:5], 1)
        assert np.array_equal(v_m[:, 0], new_values) and (d_m[:, 0] < 1e-4).all()
        assert lite.delete_ids(new_ids) == 5
        assert np.array_equal(m.search(queries, 10)[1], v_b)


def test_mirror_of_a_projected_domain_searches_in_the_stored_space(tmp_path):
    uri = str(tmp_path / "p.db")
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((16, 4)))[0].T
    keys = (rng.standard_normal((400, 4)) @ basis * 3 + 1e-3 * rng.standard_normal((400, 16))).astype(np.float32)
    values = rng.integers(0, 257, 400).astype(np.int32)
    ids = entry_ids("default", "d", np.arange(400))
    proj = Projection.fit(keys, 4)
    with MilvusDatastore.create(uri, "p", INFO, index_type="FLAT", projection=proj) as w:
        w.add(ids, keys, values)
    with MilvusDatastore.open(uri, "p") as lite, MilvusDatastore.open(uri, "p", mirror=True) as m:
        q = keys[:6] + 1e-2
        d_lite, v_lite = lite.search(q, 5)
        d_m, v_m = m.search(q, 5)
        assert np.array_equal(v_m, v_lite) and np.allclose(d_m, d_lite, rtol=1e-4)
        assert np.array_equal(v_m[:, 0], values[:6])


def test_drop_and_recreate_is_seen_by_an_open_mirror(tmp_path):
    uri = str(tmp_path / "r.db")
    ids, keys, values = rows(50)
    with MilvusDatastore.create(uri, "x", INFO, index_type="FLAT") as w:
        w.add(ids, keys, values)
    m = MilvusDatastore.open(uri, "x", mirror=True)
    try:
        assert np.array_equal(m.search(keys[:3], 1)[1][:, 0], values[:3])
        version = m.mirror.version
        drop_domain(uri, "x")
        with MilvusDatastore.create(uri, "x", INFO, index_type="FLAT") as w:
            w.add(ids[:10], keys[:10], (values[:10] + 1) % 257)
        assert m.mirror.current().version > version
        assert len(m.mirror.current().ids) == 10
    finally:
        m.close()


def test_mirror_on_a_server_is_refused_in_one_line(milvus_server):
    from conftest import server_database

    for uri in server_database(milvus_server.uri):
        with MilvusDatastore.create(uri, "s", INFO, index_type="FLAT") as w:
            w.add(*rows(3))
        with pytest.raises(InvalidInput, match="mirror is for Milvus Lite"):
            MilvusDatastore.open(uri, "s", mirror=True)


def test_knnlm_generates_the_same_through_the_mirror(tmp_path, llama_lm):
    """Generation reads a FLAT Lite domain (exact, as the mirror is) through the mirror: same tokens and
    probabilities; an append is searched by the very next call."""
    from conftest import TINY_TEXT
    from knnlm_vdb.api import KnnLM
    from knnlm_vdb.corpus import Document
    from knnlm_vdb.datastore import StoreInfo
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.ingest import ingest

    uri = str(tmp_path / "g.db")
    memorised = "0123456789abcdefghij" * 4
    enc = Encoder(llama_lm, ctx=128, stride=64)
    with MilvusDatastore.create(uri, "mem", StoreInfo.for_encoder(enc), index_type="FLAT") as w:
        ingest(enc, w, [Document("mem", memorised + TINY_TEXT)], domain="mem", show_progress=False)
    outs = []
    for mirror in (False, True):
        with KnnLM(enc, [MilvusDatastore.open(uri, "mem", mirror=mirror)], k=8, temperature=1.0, lmbda=0.5) as lm:
            outs.append(lm.generate(memorised[:30], max_new_tokens=12))
            if mirror:
                with MilvusDatastore.open(uri, "mem") as w:
                    ingest(enc, w, [Document("new", "zyxwvutsrq" * 6)], domain="mem", show_progress=False)
                fresh = lm.generate("zyxwvutsrqzyxwv", max_new_tokens=8)
    assert outs[0].token_ids == outs[1].token_ids
    assert np.allclose([s.prob for s in outs[0].steps], [s.prob for s in outs[1].steps], atol=1e-5)
    assert np.allclose([s.knn_prob for s in outs[0].steps], [s.knn_prob for s in outs[1].steps], atol=1e-5)
    assert fresh.text.startswith("utsrqzyx")
