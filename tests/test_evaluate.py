"""End-to-end kNN-LM scoring with a tiny model and a FAISS datastore."""
import numpy as np
import pytest

from conftest import TINY_TEXT
from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.evaluate import evaluate, tune
from knnlm_vdb.ingest import ingest


@pytest.fixture()
def built(tmp_path, llama_lm):
    enc = Encoder(llama_lm, ctx=64, stride=32)
    store = FaissDatastore.create(tmp_path / "ds", StoreInfo.for_encoder(enc), key_dtype="float32")
    report = ingest(enc, store, [Document("tiny", TINY_TEXT)], show_progress=False)
    return enc, store, report


def test_build_stores_one_entry_per_target(built):
    enc, store, report = built
    n = len(enc.tokenize(TINY_TEXT))
    assert report.added == n - 1 == store.count()


def test_lambda_zero_reproduces_base_perplexity_exactly(built):
    enc, store, _ = built
    ids = enc.tokenize("A kNN language model remembers the lazy dog.")
    res = evaluate(enc, ids, [store], k=8, lmbda=0.0, show_progress=False)
    base = evaluate(enc, ids, None, show_progress=False)
    assert res.knnlm_ppl == res.base_ppl == base.base_ppl


def test_keys_align_with_next_token(built):
    """On text the store memorised (same windows), each query's nearest key carries the true next token."""
    enc, store, _ = built
    ids = enc.tokenize(TINY_TEXT)
    res = evaluate(enc, ids, [store], k=4, lmbda=0.5, keep_neighbours=True, show_progress=False)
    nb = res.neighbours
    assert np.all(nb.distances[:, 0] < 1e-3)
    assert np.array_equal(nb.values[:, 0], nb.targets)
    assert res.knnlm_ppl < 0.6 * res.base_ppl


def test_repeated_sequence_puts_knn_mass_on_the_true_next_token(tmp_path, llama_lm):
    enc = Encoder(llama_lm, ctx=48, stride=24)
    seq = "0123456789abcdefghij" * 3
    store = FaissDatastore.create(tmp_path / "rep", StoreInfo.for_encoder(enc), key_dtype="float32")
    ingest(enc, store, [Document("rep", seq)], show_progress=False)
    # unseen prefix, then the memorised pattern
    res = evaluate(enc, enc.tokenize("zz" + "0123456789abcdefghij"), [store], k=8, temperature=1.0, lmbda=1.0,
                   keep_neighbours=True, show_progress=False)
    knn = res.neighbours.knnlm_logprobs(8, 1.0, 1.0)
    assert np.median(np.exp(knn[3:])) > 0.5


def test_multi_domain_search_merges_by_distance(tmp_path, llama_lm, built):
    enc, store, _ = built
    other = FaissDatastore.create(tmp_path / "other", StoreInfo.for_encoder(enc), key_dtype="float32")
    ingest(enc, other, [Document("other", "completely different words " * 10)], show_progress=False)
    ids = enc.tokenize(TINY_TEXT)[:60]
    one = evaluate(enc, ids, [store], k=4, lmbda=0.5, keep_neighbours=True, show_progress=False)
    both = evaluate(enc, ids, [other, store], k=4, lmbda=0.5, keep_neighbours=True, show_progress=False)
    np.testing.assert_allclose(both.neighbours.distances[:, 0], one.neighbours.distances[:, 0], atol=1e-5)
    assert both.knnlm_ppl == pytest.approx(one.knnlm_ppl, rel=0.05)


def test_tune_picks_a_setting_no_worse_than_the_base(built):
    enc, store, _ = built
    ids = enc.tokenize("The lazy dog jumps. def add(a, b): return a + b")
    res = evaluate(enc, ids, [store], k=16, keep_neighbours=True, show_progress=False)
    out = tune(res.neighbours, ks=(4, 16), temperatures=(1.0, 10.0), lambdas=(0.1, 0.5))
    assert out["best"]["ppl"] == min(g["ppl"] for g in out["grid"])
    assert len(out["grid"]) == 8


def test_adaptive_multi_domain_search_lets_a_foreign_domain_fade_out(tmp_path, llama_lm, built):
    """Each domain gets its own λ from its own evidence: adding a foreign domain to the search
    costs (almost) nothing, though a fixed λ on that domain alone hurts."""
    from knnlm_vdb.adaptive import fit_calibration

    enc, home, _ = built
    rng = np.random.default_rng(0)
    foreign_text = "".join(rng.choice(list("QWXZJKVqwxzjkv0123456789#$%&"), 1500))
    foreign = FaissDatastore.create(tmp_path / "foreign", StoreInfo.for_encoder(enc), key_dtype="float32")
    ingest(enc, foreign, [Document("foreign", foreign_text)], show_progress=False)
    cals = []
    for store, text in ((home, TINY_TEXT), (foreign, foreign_text)):  # each calibrated on its own text
        res = evaluate(enc, enc.tokenize(text), [store], k=8, keep_neighbours=True, show_progress=False)
        cals.append(fit_calibration(res.neighbours, k=8, temperature=1.0)[0])
    ids = enc.tokenize(TINY_TEXT)
    alone = evaluate(enc, ids, [home], calibration=cals[0], show_progress=False)
    both = evaluate(enc, ids, [home, foreign], calibration=cals, show_progress=False)
    assert alone.knnlm_ppl < alone.base_ppl
    assert both.knnlm_ppl <= alone.knnlm_ppl * 1.02
    foreign_fixed = evaluate(enc, ids, [foreign], k=8, temperature=1.0, lmbda=0.5, show_progress=False)
    assert foreign_fixed.knnlm_ppl > 1.1 * foreign_fixed.base_ppl  # what a fixed λ does with it
