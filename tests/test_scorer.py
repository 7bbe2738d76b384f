"""``service.scoring.Scorer`` on its own: the tiny random Llama, a real FAISS store, no server.
A Score job scores each token as ``evaluate()`` does; a NextToken job is a distribution."""
from __future__ import annotations

import numpy as np
import pytest

from knnlm_vdb.evaluate import evaluate
from knnlm_vdb.service.scoring import Job, Scorer

TEXT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def setup(fox_store):
    return fox_store


def job(encoder, store, text, top_n=0, **kw) -> Job:
    settings = {"k": 8, "temperature": 2.0, "lmbda": 0.3, **kw}
    return Job(token_ids=encoder.tokenize(text), domains=("fox",), stores=(store,), top_n=top_n, **settings)


def test_score_job_equals_evaluate(setup):
    encoder, store = setup
    ids = encoder.tokenize(TEXT)
    assert len(ids) > 2 * encoder.ctx  # several sliding windows
    j = job(encoder, store, TEXT)
    assert Scorer(encoder).run([j]) == {}
    offline = evaluate(encoder, ids, [store], k=8, temperature=2.0, lmbda=0.3, show_progress=False, keep_tokens=True)
    t = offline.per_token
    assert len(j.mixed) == len(ids) - 1 == offline.tokens
    np.testing.assert_allclose(j.base, t["lm"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(j.knn, t["knn"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(j.mixed, t["mixed"], rtol=1e-4, atol=1e-4)
    assert j.knnlm_ppl == pytest.approx(offline.knnlm_ppl, rel=1e-4) and j.knnlm_ppl < j.base_ppl


def test_jobs_in_one_batch_score_as_alone(setup):
    """Batched with other jobs of other lengths (padding, one shared search), a job scores the same."""
    encoder, store = setup
    alone = job(encoder, store, TEXT[:60])
    Scorer(encoder).run([alone])
    batch = [job(encoder, store, TEXT), job(encoder, store, TEXT[:60]), job(encoder, store, "The lazy", top_n=3)]
    assert Scorer(encoder).run(batch) == {}
    np.testing.assert_allclose(batch[1].mixed, alone.mixed, rtol=1e-4, atol=1e-4)


def test_next_token_job_is_a_distribution(setup):
    encoder, store = setup
    j = job(encoder, store, "The quick brown fox jumps over the", top_n=5)
    assert Scorer(encoder).run([j]) == {}
    vocab = encoder.lm.vocab_size
    assert j.mixed.shape == j.base.shape == (vocab,)
    for logp in (j.mixed, j.base, j.knn):
        assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-6)
    assert len(j.top) == 5 and list(j.top) == list(np.argsort(-j.mixed, kind="stable")[:5])
    assert j.lambdas.tolist() == [pytest.approx(0.3)]
