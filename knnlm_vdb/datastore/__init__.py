"""Datastore backends behind one interface; ``open_store``/``create_store`` pick one by name, and
``open_spec``/``create_spec``/``open_or_create`` take a ``spec.StoreSpec`` (and ``IndexSpec``)."""
from __future__ import annotations

from pathlib import Path

from knnlm_vdb.datastore.base import Datastore, StoreInfo, TunedSettings, entry_ids, merge_topk
from knnlm_vdb.datastore.spec import BACKENDS, IndexSpec, StoreSpec, check_backend

__all__ = ["BACKENDS", "Datastore", "IndexSpec", "StoreInfo", "StoreSpec", "TunedSettings", "create_spec",
           "create_store", "entry_ids", "merge_topk", "open_or_create", "open_spec", "open_store", "preflight"]


def open_store(backend: str, location: str, domain: str = "default", **options) -> Datastore:
    """Open an existing datastore: a FAISS directory, or a Milvus domain at a URI."""
    check_backend(backend)
    if backend == "faiss":
        from knnlm_vdb.datastore.faiss_store import FaissDatastore

        return FaissDatastore(location)
    from knnlm_vdb.datastore.milvus.store import MilvusDatastore

    return MilvusDatastore.open(location, domain, **options)


def create_store(backend: str, location: str, info: StoreInfo, domain: str = "default", **options) -> Datastore:
    """Create an empty datastore for ``info``'s model and key type."""
    check_backend(backend)
    if backend == "faiss":
        from knnlm_vdb.datastore.faiss_store import FaissDatastore

        return FaissDatastore.create(location, info, domain=domain, **options)
    from knnlm_vdb.datastore.milvus.store import MilvusDatastore

    return MilvusDatastore.create(location, domain, info, **options)


def _index_options(spec: StoreSpec, index: IndexSpec | None) -> dict:
    if index is None:
        return {}
    if index.backend != spec.backend:
        raise ValueError(f"a {index.backend} index spec for a {spec.backend} store")
    return index.options()


def open_spec(spec: StoreSpec) -> Datastore:
    """Open the existing store ``spec`` names (NotFound if there is none)."""
    return open_store(spec.backend, spec.location, spec.domain, **spec.connection())


def create_spec(spec: StoreSpec, info: StoreInfo, index: IndexSpec | None = None, projection=None) -> Datastore:
    """Create a new, empty store (refused if one exists) with ``index``; ``projection`` (a fitted
    ``projection.Projection``): the store keeps keys projected by it."""
    extra = {"projection": projection} if projection is not None else {}
    return create_store(spec.backend, spec.location, info, domain=spec.domain, **spec.connection(),
                        **_index_options(spec, index), **extra)


def open_or_create(spec: StoreSpec, info: StoreInfo, index: IndexSpec | None = None) -> Datastore:
    """Open ``spec``'s store, creating it with ``index`` if it does not exist (Milvus: race-safe
    between parallel shards). An existing store keeps its own index."""
    if spec.backend == "faiss":
        if (Path(spec.location) / "meta.json").is_file():
            return open_spec(spec)
        return create_spec(spec, info, index)
    from knnlm_vdb.datastore.milvus.store import MilvusDatastore

    return MilvusDatastore.open_or_create(spec.location, spec.domain, info, **spec.connection(),
                                          **_index_options(spec, index))


def preflight(spec: StoreSpec) -> None:
    """Refuse what cannot work before anything expensive (a model load): a Milvus database newer
    than this code. FAISS stores are checked when they open (cheap: meta.json and file sizes)."""
    if spec.backend == "milvus":
        from knnlm_vdb.datastore.milvus.versions import preflight as milvus_preflight

        milvus_preflight(spec.location, token=spec.token)
