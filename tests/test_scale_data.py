"""benchmarks/scale_data.py: the synthetic keys are deterministic chunk by chunk, the streamed
ground truth equals a brute-force top-k, and recall counts what it should (tiny, random data)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCALE_DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_data.py"


@pytest.fixture(scope="module")
def sd():
    spec = importlib.util.spec_from_file_location("scale_data", SCALE_DATA)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_data"] = mod  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_rows_are_regenerated_identically_in_any_pieces(sd):
    base = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
    keys = sd.SyntheticKeys(base, sigma=0.1, seed=3, chunk=100)
    whole = np.concatenate([b for _, b in keys.rows(0, 350)])
    pieces = list(keys.rows(70, 350, step=33))
    assert [f for f, _ in pieces][:3] == [70, 100, 133]  # pieces never straddle a chunk
    assert np.array_equal(np.concatenate([b for _, b in pieces]), whole[70:])
    assert len(whole) == 350 and not np.array_equal(whole[:100], whole[100:200])


def test_streamed_topk_is_exact_at_every_prefix(sd):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((500, 6)).astype(np.float32)
    q = rng.standard_normal((7, 6)).astype(np.float32)
    topk = sd.ExactTopK(q, k=20)
    for s in range(0, 500, 64):
        topk.add(s, data[s:s + 64])
        n = min(s + 64, 500)
        exact = np.argsort(((q[:, None, :] - data[None, :n]) ** 2).sum(-1), axis=1)[:, :20]
        assert np.array_equal(topk.truth(20), exact)
    assert sd.recall(topk.truth(5), exact[:, :5]) == 1.0
    with pytest.raises(ValueError):
        topk.add(0, data[:10])  # rows out of order would corrupt the ground truth


def test_recall_counts_overlap_and_ignores_missing_hits(sd):
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [-1, -1, -1, -1]])
    assert sd.recall(found, truth) == pytest.approx((2 / 4 + 0) / 2)


def test_make_keys_projects_holds_out_queries_and_states_the_recipe(sd, tmp_path):
    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 32)).astype(np.float16)
    (tmp_path / "keys.bin").write_bytes(real.tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"count": 400, "key_dtype": "float16", "info": {"dim": 32}}))
    loaded = sd.read_real_keys(tmp_path)
    assert loaded.dtype == np.float32 and loaded.shape == (400, 32)
    keys, queries, recipe = sd.make_keys(loaded, dim=8, noise=0.5, n_queries=10, seed=0, held_out=40)
    assert keys.dim == 8 and queries.shape == (10, 8)
    assert recipe["pool_keys"] == 360 and recipe["held_out_query_keys"] == 40
    assert recipe["expected_noise_norm"] == pytest.approx(0.5 * recipe["median_nn_distance"], rel=1e-3)
    assert 0 < recipe["pca_explained_variance"] < 1
    pool = {tuple(np.round(r, 4)) for r in keys.base}
    assert len(pool) == 360  # the held-out keys are not in the pool the entries are drawn from
