"""``mixing.Mixer`` on its own, with real FAISS stores of random keys: the merged top-k and the
one λ of the paper's kNN-LM, adaptive λ per domain, and the batched next-token path."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import STORE_DIM, store_info

from knnlm_vdb.adaptive import Calibration, LinearGate
from knnlm_vdb.datastore import create_store, entry_ids
from knnlm_vdb.mixing import Found, Mixer

VOCAB = 257


def filled(path, name, n, seed):
    rng = np.random.default_rng(seed)
    store = create_store("faiss", str(path / name), store_info(), key_dtype="float32", domain=name)
    keys = rng.standard_normal((n, STORE_DIM)).astype(np.float32)
    values = rng.integers(0, 20, n).astype(np.int32)  # few distinct tokens: neighbours agree often
    store.add(entry_ids(name, "doc", range(n)), keys, values, doc_ids=["doc"] * n, positions=list(range(n)))
    store.flush()
    return store, keys, values


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    a, ka, va = filled(root, "a", 60, 1)
    b, kb, vb = filled(root, "b", 40, 2)
    yield (a, b), np.concatenate([ka, kb]), np.concatenate([va, vb])
    a.close()
    b.close()


def lm_rows(n, seed=3):
    """Random LM log-distributions [n, V], their entropy and max log-prob."""
    x = np.random.default_rng(seed).standard_normal((n, VOCAB))
    lm = x - np.log(np.exp(x).sum(1, keepdims=True))
    return lm, -(np.exp(lm) * lm).sum(1), lm.max(1)


def gate(lambda_max: float) -> LinearGate:
    """A gate that answers (almost exactly) ``lambda_max`` whatever the features."""
    return LinearGate(("lm_entropy",), [0.0], [1.0], [0.0], 40.0, lambda_max)


def test_fixed_merges_top_k_over_stores_and_applies_one_lambda(two):
    stores, keys, values = two
    k, t, lam = 8, 2.0, 0.3
    mixer = Mixer(stores, k, t, lam)
    assert not mixer.adaptive and len(mixer.groups) == 1
    queries = np.random.default_rng(5).standard_normal((6, STORE_DIM)).astype(np.float32)
    dist, vals = mixer.search(0, queries)
    exact = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)  # brute force over the union of both stores
    order = np.argsort(exact, axis=1)[:, :k]
    np.testing.assert_allclose(dist, np.take_along_axis(exact, order, 1), rtol=1e-4)
    np.testing.assert_array_equal(vals, values[order])

    lm, ent, mx = lm_rows(6)
    targets = vals[:, 0].astype(np.int64)  # the nearest neighbour's token: p_kNN > 0
    masks = mixer.search_masks(ent, mx)
    assert [m.all() for m in masks] == [True]  # a fixed λ searches everywhere
    found = mixer.retrieve(queries, masks)
    mixed, lams, knn = mixer.score(None, targets, lm[np.arange(6), targets], ent, mx, found)
    w = np.exp(-dist / t)
    p_knn = (w * (vals == targets[:, None])).sum(1) / w.sum(1)
    np.testing.assert_allclose(np.exp(knn), p_knn, rtol=1e-5)
    np.testing.assert_allclose(np.exp(mixed), (1 - lam) * np.exp(lm[np.arange(6), targets]) + lam * p_knn, rtol=1e-5)
    assert (lams == lam).all()


def test_adaptive_is_per_domain(two):
    """A domain whose gate gives λ=0 is not searched and changes nothing: the mixture equals the
    other domain's alone."""
    stores, _, _ = two
    useful = Calibration(8, 2.0, post=gate(0.6), pre=gate(0.6), skip_below=0.05)
    useless = Calibration(4, 1.0, post=gate(0.0), pre=gate(0.0), skip_below=0.05)
    both, alone = Mixer(stores, calibrations=[useful, useless]), Mixer(stores[:1], calibrations=[useful])
    assert both.adaptive and both.groups == [[stores[0]], [stores[1]]] and both.ks == [8, 4]
    queries = np.random.default_rng(7).standard_normal((5, STORE_DIM)).astype(np.float32)
    lm, ent, mx = lm_rows(5)
    masks = both.search_masks(ent, mx)
    assert masks[0].all() and not masks[1].any()
    found = both.retrieve(queries, masks)
    assert np.isinf(found[1].distances).all() and (found[1].values == -1).all()
    targets = found[0].values[:, 0].astype(np.int64)
    lm_t = lm[np.arange(5), targets]
    mixed, lams, _ = both.score(both.new_document(), targets, lm_t, ent, mx, found)
    ref, ref_lams, _ = alone.score(alone.new_document(), targets, lm_t, ent, mx, found[:1])
    np.testing.assert_allclose(mixed, ref, rtol=1e-6)
    np.testing.assert_allclose(lams, ref_lams, rtol=1e-6)
    assert (lams > 0).all() and (mixed > lm_t).all()  # the nearest neighbour's token gained


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_distributions_equal_next_token_per_row(two, adaptive):
    stores, _, _ = two
    if adaptive:
        cals = [Calibration(8, 2.0, post=gate(0.5), pre=gate(0.5), skip_below=0.05),
                Calibration(8, 1.0, post=gate(0.2), pre=gate(0.2), skip_below=0.05)]
        mixer = Mixer(stores, calibrations=cals)
    else:
        mixer = Mixer(stores, 8, 2.0, 0.25)
    n = 4
    queries = np.random.default_rng(11).standard_normal((n, STORE_DIM)).astype(np.float32)
    lm, ent, mx = lm_rows(n)
    found = mixer.retrieve(queries, mixer.search_masks(ent, mx))
    trust = mixer.new_document()
    scales = [[doc.expected_scale() for doc in trust]] * n if adaptive else None
    mixed, lams, knn = mixer.distributions(scales, lm, ent, mx, found)
    assert mixed.shape == (n, VOCAB)
    for b in range(n):
        row = [Found(f.searched[b:b + 1], f.distances[b:b + 1], f.values[b:b + 1]) for f in found]
        m, lam, kn = mixer.next_token(trust, lm[b], ent[b:b + 1], mx[b:b + 1], row)
        np.testing.assert_allclose(m, mixed[b], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(kn, knn[b], rtol=1e-9, atol=1e-12)
        assert lam == pytest.approx(lams[b])
        assert np.exp(m).sum() == pytest.approx(1.0, abs=1e-9)
    assert (lams > 0).all()
