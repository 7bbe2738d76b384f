"""What every datastore backend promises (``datastore/base.py``), checked on FAISS, Milvus Lite and an
in-memory backend written here: the sketch of a third backend, which needs nothing outside the
datastore interface to pass.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import STORE_DIM, store_info
from knnlm_vdb.adaptive import Calibration, LinearGate
from knnlm_vdb.datastore import TunedSettings, create_store, entry_ids, open_store
from knnlm_vdb.datastore.base import MISSING_VALUE, Datastore, StoreInfo, pad_results
from knnlm_vdb.errors import Incompatible, NotFound

INFO = store_info()


class MemoryDatastore(Datastore):
    """Everything in a dict; searched by brute force. ``SHELF`` plays the disk, so stores reopen."""

    SHELF: dict[str, dict] = {}

    def __init__(self, location: str):
        if location not in self.SHELF:
            raise NotFound(f"no in-memory datastore {location!r}")
        self._location, self._data = location, self.SHELF[location]
        self.info = StoreInfo.from_dict(self._data["info"])

    @classmethod
    def create(cls, location: str, info: StoreInfo, domain: str = "default") -> "MemoryDatastore":
        cls.SHELF[location] = {"info": info.to_dict(), "domain": domain, "rows": {}}
        return cls(location)

    @property
    def domain(self) -> str:
        return self._data["domain"]

    @property
    def location(self) -> str:
        return f"memory:{self._location}"

    def add(self, ids, keys, values, doc_ids=None, positions=None) -> int:
        new = 0
        for i, key, value in zip(np.asarray(ids, np.int64).tolist(), np.asarray(keys, np.float32), values):
            if i not in self._data["rows"]:
                self._data["rows"][i] = (key.copy(), int(value))
                new += 1
        return new

    def search(self, queries, k):
        rows = list(self._data["rows"].values())
        if not rows:
            return pad_results([[]] * len(queries), [[]] * len(queries), k)
        keys = np.stack([r[0] for r in rows])
        values = np.array([r[1] for r in rows])
        d = ((np.asarray(queries, np.float32)[:, None, :] - keys[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return pad_results(np.take_along_axis(d, order, 1).tolist(), values[order].tolist(), k)

    def count(self) -> int:
        return len(self._data["rows"])

    def delete_ids(self, ids) -> int:
        return sum(self._data["rows"].pop(int(i), None) is not None for i in np.unique(ids))

    def set_extra(self, key, value) -> None:
        self._data["info"].setdefault("extra", {})[key] = value
        self.info.extra[key] = value

    def describe(self) -> dict:
        return {"backend": "memory", "count": self.count(), "dim": self.info.dim, "model": self.info.model,
                "key_type": self.info.key_type, "index": {"type": "exact"}}


@pytest.fixture(params=["faiss", "milvus-lite", "memory"])
def backend(request, tmp_path):
    """``(create(domain), reopen(store))`` for one backend."""
    if request.param == "faiss":
        path = str(tmp_path / "faiss")
        return (lambda domain: create_store("faiss", path, INFO, domain=domain, key_dtype="float32"),
                lambda store: open_store("faiss", path))
    if request.param == "milvus-lite":
        uri = str(tmp_path / "knnlm.db")
        return (lambda domain: create_store("milvus", uri, INFO, domain=domain),
                lambda store: open_store("milvus", uri, domain=store.domain))
    name = request.node.name
    return (lambda domain: MemoryDatastore.create(name, INFO, domain=domain),
            lambda store: MemoryDatastore(name))


def rows(n: int, domain: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, STORE_DIM)).astype(np.float32)
    return entry_ids(domain, "doc", np.arange(n)), keys, rng.integers(0, 257, n).astype(np.int32)


def reopened(backend, store):
    store.close()
    return backend[1](store)


def test_identity_add_is_idempotent_and_search_is_exact(backend):
    store = backend[0]("docs")
    assert store.domain == "docs" and isinstance(store.location, str) and store.location
    ids, keys, values = rows(60, store.domain)
    assert store.add(ids[:40], keys[:40], values[:40]) == 40
    assert store.add(ids[:40], keys[:40], values[:40]) == 0  # same ids: nothing new
    both = np.concatenate([ids[35:], ids[35:]])  # overlapping and repeated within one batch
    assert store.add(both, np.concatenate([keys[35:]] * 2), np.concatenate([values[35:]] * 2)) == 20
    store.finalize()
    assert store.count() == 60
    queries = np.random.default_rng(1).standard_normal((5, STORE_DIM)).astype(np.float32)
    d, v = store.search(queries, 70)  # more than stored: padded
    exact = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    order = np.argsort(exact, axis=1)
    assert d.shape == v.shape == (5, 70) and d.dtype == np.float32 and v.dtype == np.int32
    np.testing.assert_array_equal(v[:, :60], values[order])
    np.testing.assert_allclose(d[:, :60], np.sort(exact, axis=1), rtol=1e-4, atol=1e-4)
    assert (np.diff(d[:, :60], axis=1) >= 0).all()
    assert np.isinf(d[:, 60:]).all() and (v[:, 60:] == MISSING_VALUE).all()
    store = reopened(backend, store)
    assert store.domain == "docs" and store.count() == 60
    assert store.add(ids, keys, values) == 0
    store.close()


def test_delete_ids(backend):
    store = backend[0]("docs")
    ids, keys, values = rows(30, store.domain)
    store.add(ids, keys, values)
    assert store.delete_ids(np.concatenate([ids[:10], ids[:10]])) == 10
    assert store.delete_ids(ids[:10]) == 0
    assert store.count() == 20
    d, v = store.search(keys[:10], 1)
    assert (d[:, 0] > 0).all()  # the deleted keys themselves are gone
    assert store.add(ids[:10], keys[:10], values[:10]) == 10  # and may come back
    store.close()


def test_stored_settings_round_trip_typed(backend):
    store = backend[0]("docs")
    assert store.tuned() is None and store.calibration() is None
    tuned = TunedSettings(k=16, temperature=2.0, lmbda=0.25, valid_ppl=9.5, valid_tokens=100)
    store.set_extra("tuned", tuned.to_dict())
    gate = LinearGate(("entropy",), [0.0], [1.0], [0.5], 0.1, 0.9)
    cal = Calibration(k=16, temperature=2.0, post=gate, pre=gate, skip_below=0.05)
    store.set_extra("calibration", cal.to_dict())
    store = reopened(backend, store)
    assert store.tuned() == tuned
    assert store.info.extra["tuned"]["lambda"] == 0.25  # the stored format stays what releases wrote
    got = store.calibration()
    assert isinstance(got, Calibration) and got.k == 16 and got.skip_below == 0.05 and got.pre == gate
    store.close()


def test_another_model_is_incompatible(backend):
    store = backend[0]("docs")
    other = StoreInfo(model="other", key_type=INFO.key_type, dim=INFO.dim, tokenizer=INFO.tokenizer,
                      vocab_size=INFO.vocab_size)
    with pytest.raises(Incompatible, match="model='tiny-test'"):
        store.info.check_compatible(other, store.location)
    store.close()
