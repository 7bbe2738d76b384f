"""Datastore backends behind one interface; ``open_store``/``create_store`` pick one by name."""
from __future__ import annotations

from knnlm_vdb.datastore.base import Datastore, StoreInfo, TunedSettings, entry_ids, merge_topk
from knnlm_vdb.errors import InvalidInput

BACKENDS = ("faiss", "milvus")

__all__ = ["BACKENDS", "Datastore", "StoreInfo", "TunedSettings", "entry_ids", "merge_topk", "open_store", "create_store"]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InvalidInput(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")


def open_store(backend: str, location: str, domain: str = "default", **options) -> Datastore:
    """Open an existing datastore: a FAISS directory, or a Milvus domain at a URI."""
    _check_backend(backend)
    if backend == "faiss":
        from knnlm_vdb.datastore.faiss_store import FaissDatastore

        return FaissDatastore(location)
    from knnlm_vdb.datastore.milvus.store import MilvusDatastore

    return MilvusDatastore.open(location, domain, **options)


def create_store(backend: str, location: str, info: StoreInfo, domain: str = "default", **options) -> Datastore:
    """Create an empty datastore for ``info``'s model and key type."""
    _check_backend(backend)
    if backend == "faiss":
        from knnlm_vdb.datastore.faiss_store import FaissDatastore

        return FaissDatastore.create(location, info, domain=domain, **options)
    from knnlm_vdb.datastore.milvus.store import MilvusDatastore

    return MilvusDatastore.create(location, domain, info, **options)
