"""The in-document cache: exact causal search, tuned by `tune`, mixed by adaptive λ, off on request."""
import numpy as np
import pytest
import torch

from conftest import TINY_TEXT
from knnlm_vdb.api import KnnLM
from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.doc_cache import DocumentCache
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.errors import Incompatible, InvalidInput
from knnlm_vdb.ingest import ingest


def brute(keys, values, query, k):
    d = ((keys - query) ** 2).sum(1)
    order = np.argsort(d, kind="stable")[:k]
    return d[order], values[order]


def test_search_is_exact_and_sees_only_earlier_positions():
    rng = np.random.default_rng(0)
    keys, values = rng.standard_normal((50, 6)).astype(np.float32), rng.integers(0, 99, 50).astype(np.int32)
    cache = DocumentCache()
    cache.add(keys[:30], values[:30])
    rows = np.array([0, 3, 7, 19])
    dist, vals = cache.search(keys[30:][rows], 8, keys[30:], values[30:], rows)
    for i, r in enumerate(rows):
        visible = 30 + r  # everything before block position r
        d, v = brute(keys[:visible], values[:visible], keys[30 + r], 8)
        np.testing.assert_allclose(dist[i], d, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(vals[i], v)
    assert len(cache) == 30  # searching does not add
    cache.add(keys[30:], values[30:])
    assert len(cache) == 50


def test_fewer_entries_than_k_are_marked_missing_and_the_window_forgets_the_oldest():
    cache = DocumentCache(max_entries=3)
    empty_d, empty_v = cache.search(np.zeros((2, 4), np.float32), 5)
    assert np.isinf(empty_d).all() and (empty_v == -1).all()
    cache.add(np.eye(4, dtype=np.float32)[:2], np.array([7, 8]))
    d, v = cache.search(np.eye(4, dtype=np.float32)[:1], 5)
    assert list(v[0]) == [7, 8, -1, -1, -1] and np.isinf(d[0, 2:]).all()
    cache.add(np.eye(4, dtype=np.float32)[2:], np.array([9, 10]))
    assert list(cache.values) == [8, 9, 10]  # the first position fell out of the window


def repeating_docs(rng, n, length=60):
    """Documents that repeat themselves (a random string, twice): what a cache is for."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 "))
    return ["".join(rng.choice(letters, length)) * 2 for _ in range(n)]


@pytest.fixture(scope="module")
def tuned(llama_lm, tmp_path_factory):
    enc = Encoder(llama_lm, ctx=256, stride=128)
    store = FaissDatastore.create(tmp_path_factory.mktemp("cache") / "ds", StoreInfo.for_encoder(enc),
                                  key_dtype="float32")
    ingest(enc, store, [Document("fox", TINY_TEXT * 3)], show_progress=False)
    rng = np.random.default_rng(1)
    lm = KnnLM(enc, [store])
    report = lm.tune([enc.tokenize(t) for t in repeating_docs(rng, 8)], max_k=64)
    return lm, report, rng


def test_tune_stores_a_cache_calibration_and_auto_uses_it_by_default(tuned):
    lm, report, _ = tuned
    assert "cache_calibration" in lm.stores[0].info.extra
    assert report["cache"]["valid_auto_ppl"] < report["base_ppl"]
    on, off = lm.settings(), lm.settings(cache=False)
    assert on.adaptive and on.cache is not None and on.to_dict()["cache"]
    assert off.adaptive and off.cache is None
    assert lm.settings(k=8, temperature=1.0, lmbda=0.3).adaptive is False  # fixed λ: no cache


def test_the_cache_lowers_perplexity_on_a_repetitive_document_and_not_on_others(tuned):
    lm, _, rng = tuned
    docs = [lm.encoder.tokenize(t) for t in repeating_docs(rng, 4)]
    with_cache, without = lm.evaluate(docs, cache=True), lm.evaluate(docs, cache=False)
    assert with_cache.knnlm_ppl < 0.9 * without.knnlm_ppl
    plain = [lm.encoder.tokenize(TINY_TEXT[::-1])]  # nothing repeats: the cache must not hurt
    assert lm.evaluate(plain, cache=True).knnlm_ppl <= lm.evaluate(plain, cache=False).base_ppl * 1.02
    scored = lm.score(repeating_docs(rng, 1)[0])  # score() is one document through the same path
    assert scored.settings["cache"]


def test_generation_fills_each_rows_cache_with_its_prompt_only(tuned):
    lm, _, rng = tuned
    prompts = repeating_docs(rng, 2, length=30)
    ids = [lm.encoder.tokenize(p) for p in prompts]
    proc = lm.logits_processor(prompt_lengths=[len(i) for i in ids])
    width = max(len(i) for i in ids)
    batch = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.inference_mode():
        lm.model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, logits_processor=[proc],
                          pad_token_id=0)
    assert [len(c) for c in proc.caches] == [len(i) - 1 for i in ids]  # positions whose next token is known
    for cache, i in zip(proc.caches, ids):
        assert list(cache.values) == i[1:]


def test_asking_for_a_cache_that_cannot_be_had_is_refused(tuned, tmp_path, llama_lm):
    lm, _, _ = tuned
    with pytest.raises(InvalidInput, match="--lambda auto"):
        lm.settings(k=8, temperature=1.0, lmbda=0.3, cache=True)
    enc = lm.encoder
    bare = FaissDatastore.create(tmp_path / "bare", StoreInfo.for_encoder(enc), key_dtype="float32")
    ingest(enc, bare, [Document("fox", TINY_TEXT)], show_progress=False)
    bare.set_extra("calibration", lm.stores[0].info.extra["calibration"])  # adaptive, but no cache term
    with pytest.raises(Incompatible, match="tune"):
        KnnLM(enc, [bare], cache=True)
    assert KnnLM(enc, [bare]).settings().cache is None  # by default: simply no cache


def test_the_service_scores_with_the_cache_as_the_python_api_does(tuned):
    """serve mixes in a tuned domain's cache: a Score request is one document, read like `score()`."""
    from knnlm_vdb.adaptive import Calibration
    from knnlm_vdb.service.client import KnnlmClient
    from knnlm_vdb.service.server import Domain, KnnlmServer, KnnlmService, Limits, Listen

    lm, _, rng = tuned
    store = lm.stores[0]
    extra = store.info.extra
    domain = Domain("mem", store, "faiss", "mem", 8, 1.0, 0.3, Calibration.from_dict(extra["calibration"]),
                    Calibration.from_dict(extra["cache_calibration"]))
    server = KnnlmServer(KnnlmService(lm.encoder, [domain], Limits(max_k=64)), Listen("127.0.0.1", 0),
                         max_workers=4).start()
    try:
        text = repeating_docs(rng, 1)[0]
        with KnnlmClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            r = client.score(text, domains=["mem"])
        want, without = lm.score(text), lm.score(text, cache=False)
        assert r.knnlm_ppl == pytest.approx(want.knnlm_ppl, rel=1e-4)
        assert want.knnlm_ppl < without.knnlm_ppl
    finally:
        server.stop(1.0)
