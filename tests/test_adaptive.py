"""Adaptive λ: useless retrieval fades out, useful retrieval is trusted, calibrations persist."""
import numpy as np
import pytest

from knnlm_vdb.adaptive import Calibration, fit_calibration
from knnlm_vdb.evaluate import Neighbours
from knnlm_vdb.knn import interpolate, knn_target_logprobs, perplexity


def synthetic(n=4000, k=16, useful=True, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 1000, n).astype(np.int32)
    lm = np.log(rng.uniform(0.05, 0.4, n))
    ent = rng.uniform(1.0, 4.0, n)
    maxlp = np.log(rng.uniform(0.2, 0.6, n))
    dist = np.sort(rng.uniform(5, 50, (n, k)), axis=1).astype(np.float32)
    vals = rng.integers(0, 1000, (n, k)).astype(np.int32)
    if useful:  # half the tokens were memorised: a close neighbour with the right value
        hit = rng.random(n) < 0.5
        dist[hit, 0] = rng.uniform(0.0, 1.0, hit.sum())
        vals[hit, 0] = targets[hit]
    return Neighbours(targets, lm, dist, vals, ent, maxlp)


def auto_ppl(cal, nb):
    searched = cal.search_mask(nb.lm_entropy, nb.lm_max_logprob)
    knn = knn_target_logprobs(nb.distances[:, :cal.k], nb.values[:, :cal.k], nb.targets, cal.temperature)
    return perplexity(interpolate(nb.lm_logprobs, knn, cal.lambdas(nb.distances, nb.lm_entropy, nb.lm_max_logprob, searched)))


def test_useless_retrieval_drives_lambda_to_zero():
    nb = synthetic(useful=False)
    cal, _ = fit_calibration(nb, k=16, temperature=1.0)
    lam = cal.post(nb.distances, nb.lm_entropy, nb.lm_max_logprob)
    assert lam.mean() < 0.01
    assert auto_ppl(cal, nb) == pytest.approx(perplexity(nb.lm_logprobs), rel=0.005)


def test_useful_retrieval_raises_lambda_where_neighbours_are_close():
    nb = synthetic(useful=True)
    cal, report = fit_calibration(nb, k=16, temperature=1.0)
    lam = cal.post(nb.distances, nb.lm_entropy, nb.lm_max_logprob)
    close = nb.distances[:, 0] < 1.0
    assert lam[close].mean() > 0.5 > 0.1 > lam[~close].mean()
    base = perplexity(nb.lm_logprobs)
    best_fixed = min(perplexity(nb.knnlm_logprobs(16, 1.0, lam_)) for lam_ in np.linspace(0.05, 0.9, 18))
    assert auto_ppl(cal, nb) < best_fixed < base


def test_gate_fitted_in_domain_fades_out_on_far_neighbours():
    nb = synthetic(useful=True)
    cal, _ = fit_calibration(nb, k=16, temperature=1.0)
    far = synthetic(useful=False, seed=1)
    far.distances += 100.0  # another domain: everything is far away
    assert auto_ppl(cal, far) <= perplexity(far.lm_logprobs) * 1.005


def test_calibration_round_trips_through_a_dict():
    cal, _ = fit_calibration(synthetic(), k=8, temperature=2.0)
    again = Calibration.from_dict(cal.to_dict())
    nb = synthetic(seed=3)
    np.testing.assert_allclose(again.post(nb.distances, nb.lm_entropy, nb.lm_max_logprob),
                               cal.post(nb.distances, nb.lm_entropy, nb.lm_max_logprob))
    assert (again.k, again.temperature, again.skip_below) == (8, 2.0, cal.skip_below)


def test_mix_domains_with_one_domain_equals_interpolation_and_a_zero_weight_domain_is_ignored():
    from knnlm_vdb.adaptive import mix_domains

    rng = np.random.default_rng(0)
    lm, knn = np.log(rng.uniform(0.01, 1, 50)), np.log(rng.uniform(0.01, 1, 50))
    lam = rng.uniform(0, 0.9, 50)
    np.testing.assert_allclose(mix_domains(lm, [(knn, lam)]), interpolate(lm, knn, lam), rtol=1e-12)
    other = np.full(50, -np.inf)
    np.testing.assert_allclose(mix_domains(lm, [(knn, lam), (other, np.zeros(50))]), interpolate(lm, knn, lam))


def _doc_ppl(lm, knn, lam):
    return perplexity(interpolate(lm, knn, lam))


def test_document_trust_learns_that_a_foreign_datastore_does_not_help():
    """The gate trusts neighbours that never hold the target (another domain at in-domain
    distances): per-token, that costs ×1/(1-λ); the per-document trust learns it and stays within
    its bound (log #multiples + switching cost) of the LM alone."""
    from knnlm_vdb.adaptive import DocumentTrust

    rng = np.random.default_rng(0)
    n = 2000
    lm = np.log(rng.uniform(0.05, 0.5, n))
    knn = np.full(n, -np.inf)  # no neighbour agrees with any target
    gate = np.full(n, 0.5)
    base = perplexity(lm)
    assert _doc_ppl(lm, knn, gate) > 1.9 * base
    lam = DocumentTrust().observe(lm, knn, gate)
    assert lam[-100:].max() < 0.01
    assert _doc_ppl(lm, knn, lam) <= base * 1.005


def test_document_trust_grows_where_retrieval_is_right_and_restarts_per_document():
    from knnlm_vdb.adaptive import TRUST_SCALES, DocumentTrust

    rng = np.random.default_rng(1)
    n = 500
    lm = np.log(rng.uniform(0.05, 0.5, n))
    knn = np.log(rng.uniform(0.8, 1.0, n))  # neighbours almost always right
    gate = np.full(n, 0.4)
    trust = DocumentTrust()
    lam = trust.observe(lm, knn, gate)
    assert trust.expected_scale() > 0.95 * max(TRUST_SCALES)
    assert _doc_ppl(lm, knn, lam) < _doc_ppl(lm, knn, gate) < perplexity(lm)
    cal, _ = fit_calibration(synthetic(), k=16, temperature=1.0)
    assert cal.new_document().expected_scale() == pytest.approx(np.mean(TRUST_SCALES))


def test_skipped_tokens_teach_the_trust_nothing():
    from knnlm_vdb.adaptive import DocumentTrust

    trust = DocumentTrust()
    before = trust.weights.copy()
    lam = trust.observe(np.log(np.full(10, 0.1)), np.zeros(10), np.zeros(10))
    assert np.all(lam == 0) and np.array_equal(trust.weights, before)
