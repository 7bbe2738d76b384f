"""Milvus backend: one collection per domain, in Milvus Lite (a local ``.db`` path) or a Milvus server.

Modules, bottom up: ``naming`` (names, row layout, metadata keys), ``index`` (index types and
parameter validation), ``connection`` (URIs, connecting, one-line errors, load/index waits),
``versions`` (the database's schema record), ``catalog`` (domains and their metadata),
``create`` (collections of the newest schema; race-safe domain creation), ``ledger`` (the
ingest ledger), ``mirror`` (an in-process copy of a Lite domain for fast reads), ``store``
(``MilvusDatastore``), ``reindex`` (a new index behind the alias).
The names below are the ones callers outside the package normally need.
"""
from knnlm_vdb.datastore.milvus.catalog import NoSuchDomain, drop_domain, list_domains
from knnlm_vdb.datastore.milvus.connection import deployment_of, redact_uri
from knnlm_vdb.datastore.milvus.index import IndexConfig, validate_index
from knnlm_vdb.datastore.milvus.naming import check_domain
from knnlm_vdb.datastore.milvus.store import MilvusDatastore

__all__ = ["IndexConfig", "MilvusDatastore", "NoSuchDomain", "check_domain", "deployment_of", "drop_domain",
           "list_domains", "redact_uri", "validate_index"]
