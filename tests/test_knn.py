"""The kNN-LM arithmetic against hand computations."""
import math

import numpy as np
import pytest

from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.knn import check_params, interpolate, knn_distribution, knn_target_logprobs, perplexity


def test_knn_target_logprob_by_hand():
    d = np.array([[1.0, 2.0, 4.0]])
    v = np.array([[7, 3, 7]])
    T = 2.0
    w = np.exp(-d[0] / T)
    expected = math.log((w[0] + w[2]) / w.sum())
    got = knn_target_logprobs(d, v, np.array([7]), T)
    assert got[0] == pytest.approx(expected, rel=1e-12)


def test_interpolation_by_hand():
    lm, knn, lam = math.log(0.2), math.log(0.6), 0.25
    got = interpolate(np.array([lm]), np.array([knn]), lam)[0]
    assert got == pytest.approx(math.log(0.75 * 0.2 + 0.25 * 0.6), rel=1e-12)


def test_lambda_zero_is_exactly_the_lm():
    lm = np.log(np.array([0.1, 0.5, 1e-30]))
    knn = np.array([-np.inf, np.log(0.3), 0.0])
    assert np.array_equal(interpolate(lm, knn, 0.0), lm)


def test_no_agreeing_neighbour_is_finite_not_nan():
    d = np.array([[0.5, 0.7]])
    v = np.array([[1, 2]])
    knn = knn_target_logprobs(d, v, np.array([9]), 1.0)
    assert np.isneginf(knn[0])
    mixed = interpolate(np.array([math.log(0.4)]), knn, 0.3)
    assert np.isfinite(mixed[0]) and mixed[0] == pytest.approx(math.log(0.7 * 0.4))


def test_huge_distances_do_not_underflow_to_nan():
    d = np.array([[5000.0, 5001.0]])
    v = np.array([[4, 5]])
    got = knn_target_logprobs(d, v, np.array([4]), 0.1)
    assert np.isfinite(got[0]) and got[0] == pytest.approx(-math.log1p(math.exp(-10)), abs=1e-9)


def test_missing_neighbours_carry_no_mass():
    d = np.array([[1.0, np.inf, np.inf]])
    v = np.array([[3, -1, -1]])
    assert knn_target_logprobs(d, v, np.array([3]), 1.0)[0] == pytest.approx(0.0)
    all_missing = knn_target_logprobs(np.full((1, 2), np.inf), np.full((1, 2), -1), np.array([3]), 1.0)
    assert np.isneginf(all_missing[0])


def test_full_distribution_sums_to_one_and_matches_target_logprob():
    rng = np.random.default_rng(0)
    d = rng.random(16) * 10
    v = rng.integers(0, 20, 16)
    logp = knn_distribution(d, v, vocab_size=20, temperature=1.5)
    assert np.exp(logp).sum() == pytest.approx(1.0)
    for t in range(20):
        assert knn_target_logprobs(d[None], v[None], np.array([t]), 1.5)[0] == pytest.approx(logp[t])


def test_values_beyond_int16_survive():
    # the reference code stored values as int16, which overflows vocabularies over 32k
    d = np.array([[0.0, 1.0]])
    v = np.array([[49151, 40000]], dtype=np.int32)
    assert knn_target_logprobs(d, v, np.array([49151]), 1.0)[0] > math.log(0.5)


@pytest.mark.parametrize("kw", [{"lmbda": -0.1}, {"lmbda": 1.5}, {"k": 0}, {"temperature": 0.0}])
def test_bad_parameters_are_refused(kw):
    with pytest.raises(KnnlmError):
        check_params(**kw)


def test_perplexity():
    assert perplexity(np.log([0.5, 0.5])) == pytest.approx(2.0)
