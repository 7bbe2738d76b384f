"""Schema migrations, reindexing and the ``domains`` commands, on Milvus Lite and a real server.

On the server each test gets a database of its own (``http://host:port/<db>``), so a test that
fakes a schema version never disturbs the others sharing the session's server.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import STORE_DIM, store_info
from knnlm_vdb.cli import main
from knnlm_vdb.datastore import open_store
from knnlm_vdb.datastore.base import entry_ids
from knnlm_vdb.datastore.milvus import MilvusDatastore, list_domains, validate_index
from knnlm_vdb.datastore.milvus.connection import connect
from knnlm_vdb.datastore.milvus.create import create_collection, doc_id_index
from knnlm_vdb.datastore.milvus.naming import SCHEMA_COLLECTION
from knnlm_vdb.datastore.milvus.reindex import reindex
from knnlm_vdb.datastore.milvus.versions import latest_version, read_schema_state, write_schema_state
from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.schema import migrate, migrations, status

DIM = STORE_DIM
INFO = store_info()


def cli(*args, code=0, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    assert r.exit_code == code, (r.output, r.exception)
    return r


def make_domain(uri, domain, n=400, seed=0, **options) -> tuple[np.ndarray, np.ndarray]:
    """A domain with ``n`` random rows, a ledger entry and tuned settings; returns (ids, keys)."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DIM)).astype(np.float32)
    ids = entry_ids(domain, "doc", np.arange(n))
    with MilvusDatastore.create(uri, domain, INFO, **options) as store:
        store.add(ids, keys, rng.integers(0, 257, n), doc_ids=["doc"] * n, positions=np.arange(n))
        store.ledger().commit_chunk("doc", 0, "hash-1", n + 1)
        store.set_extra("tuned", {"k": 8, "temperature": 1.0, "lambda": 0.3})
    return ids, keys


def snapshot(uri, domain, queries, k=10):
    """What a reader sees: count, ids and distances of the k nearest, the ledger and the settings."""
    with open_store("milvus", uri, domain=domain) as store:
        d, nn = store.search_ids(queries, k)
        return {"count": store.count(), "ids": nn, "dist": d, "extra": store.info.extra,
                "ledger": {doc: (r.content_hash, r.n_tokens, sorted(r.chunks))
                           for doc, r in store.ledger().documents().items()}}


def assert_same_view(a, b):
    assert a["count"] == b["count"] and a["extra"] == b["extra"] and a["ledger"] == b["ledger"]
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_allclose(a["dist"], b["dist"], rtol=1e-4, atol=1e-4)


def make_version_1(uri, domain):
    """Make ``domain`` look as release 0.1 left it: no doc_id index, schema version 1 recorded."""
    client = connect(uri)
    try:
        physical = client.describe_collection(f"knnlm_{domain}")["collection_name"]
        client.release_collection(physical)
        client.drop_index(physical, "doc_id")
        client.load_collection(physical)
        assert doc_id_index(client, physical) is None
        write_schema_state(client, {"version": 1, "history": [{"version": 1, "name": "initial"}]})
    finally:
        client.close()
    return physical


# ---- migrations --------------------------------------------------------------------------------
def test_migrations_are_numbered_and_documented():
    ms = migrations()
    assert [m.version for m in ms] == list(range(1, len(ms) + 1)) and latest_version() == len(ms) >= 2
    assert all(m.description and callable(m.module.upgrade) for m in ms)


def test_migrate_an_empty_database_then_again_is_a_no_op(uri):
    before = status(uri)
    assert before["version"] == 0 and not before["recorded"] and len(before["pending"]) == latest_version()
    plan = json.loads(cli("migrate", "--uri", uri, "--dry-run", "--json").output)
    assert plan["dry_run"] and [s["version"] for s in plan["applied"]] == list(range(1, latest_version() + 1))
    assert status(uri)["version"] == 0  # a dry run changes nothing

    r = json.loads(cli("migrate", "--uri", uri, "--json").output)
    assert r["from"] == 0 and r["to"] == latest_version()
    s = json.loads(cli("migrate", "status", "--uri", uri, "--json").output)
    assert s["version"] == latest_version() and s["pending"] == [] and s["recorded"]
    assert [h["version"] for h in s["history"]] == list(range(1, latest_version() + 1))

    again = cli("migrate", "--uri", uri)
    assert "nothing to do" in again.output
    assert migrate(uri)["applied"] == []
    assert status(uri)["history"] == s["history"]  # nothing recorded twice
    assert list_domains(uri) == []  # the schema record is not a domain


def test_migrate_from_version_1_keeps_the_data(uri):
    make_domain(uri, "docs")
    physical = make_version_1(uri, "docs")
    queries = np.random.default_rng(5).standard_normal((20, DIM)).astype(np.float32)
    before = snapshot(uri, "docs", queries)
    assert status(uri)["version"] == 1

    plan = migrate(uri, dry_run=True)
    assert [s["version"] for s in plan["applied"]] == [2] and physical in plan["applied"][0]["actions"][0]
    r = json.loads(cli("migrate", "--uri", uri, "--json").output)
    assert r["from"] == 1 and r["to"] == 2 == latest_version()
    assert len(r["applied"][0]["actions"]) == 1

    client = connect(uri)
    try:
        assert doc_id_index(client, physical) == ("INVERTED" if uri.endswith(".db") else "Trie")
        assert client.query(physical, filter='doc_id == "doc"', output_fields=["count(*)"])[0]["count(*)"] == 400
    finally:
        client.close()
    assert_same_view(snapshot(uri, "docs", queries), before)
    assert migrate(uri)["applied"] == []  # idempotent
    assert_same_view(snapshot(uri, "docs", queries), before)


def test_new_domains_are_created_at_the_newest_schema(uri):
    make_domain(uri, "fresh", n=10)
    client = connect(uri)
    try:
        assert doc_id_index(client, "knnlm_fresh__v1") is not None
    finally:
        client.close()
    r = migrate(uri)  # 0001 records the version; 0002 finds nothing to do
    assert [len(s["actions"]) for s in r["applied"]] == [1, 0]


def test_a_database_newer_than_the_code_is_refused(uri, tiny_model_dirs, corpus_file):
    make_domain(uri, "docs", n=20)
    client = connect(uri)
    try:
        write_schema_state(client, {"version": latest_version() + 1, "history": []})
    finally:
        client.close()
    newer = f"schema version {latest_version() + 1}, newer than"
    with pytest.raises(KnnlmError, match=newer):
        migrate(uri)
    with pytest.raises(KnnlmError, match=newer):
        open_store("milvus", uri, domain="docs")
    with pytest.raises(KnnlmError, match=newer):
        MilvusDatastore.create(uri, "other", INFO)
    s = status(uri)
    assert s["newer_than_code"] and s["version"] == latest_version() + 1
    assert "newer than this knnlm-vdb" in cli("migrate", "status", "--uri", uri).output
    assert newer in cli("domains", "describe", "docs", "--uri", uri, code=2).output
    # append refuses before it loads the model: a model path that does not exist is never reached
    r = cli("append", "--backend", "milvus", "--uri", uri, "--domain", "docs", "--corpus", corpus_file,
            "--model", "/nonexistent/model", code=2)
    assert newer in r.output


def test_migrate_refuses_downgrades_and_unknown_versions(uri):
    migrate(uri)
    assert "downgrade" in cli("migrate", "--uri", uri, "--to", "1", code=2).output
    assert "no schema version 99" in cli("migrate", "--uri", uri, "--to", "99", code=2).output
    assert migrate(uri, to=latest_version())["applied"] == []


def test_migrate_to_stops_there(uri):
    r = migrate(uri, to=1)
    assert r["to"] == 1 and status(uri)["version"] == 1
    assert [p["version"] for p in status(uri)["pending"]] == list(range(2, latest_version() + 1))


def test_dry_run_on_a_missing_lite_file_creates_nothing(tmp_path):
    db = tmp_path / "none.db"
    r = migrate(str(db), dry_run=True)
    assert len(r["applied"]) == latest_version() and not db.exists()
    assert not status(str(db))["exists"] and not db.exists()


# ---- reindex -----------------------------------------------------------------------------------
def test_reindex_keeps_count_results_ledger_and_settings(uri):
    ids, keys = make_domain(uri, "docs")
    queries = np.concatenate([keys[:10] + 0.01, np.random.default_rng(3).standard_normal((10, DIM))]).astype(np.float32)
    before = snapshot(uri, "docs", queries)
    reader = open_store("milvus", uri, domain="docs")  # opened before: reads through the alias throughout

    # invalid parameters are refused before anything is written
    client = connect(uri)
    collections = sorted(client.list_collections())
    for bad in [dict(index_type="IVF_FLAT", index_params={"nlist": 8}, search_params={"nprobe": 16}),
                dict(index_type="HNSW", search_params={"ef": 4}),  # below the tuned k=8
                dict(index_type="HNSW", index_params={"M": 1}), dict(index_type="NOT_AN_INDEX")]:
        with pytest.raises(KnnlmError):
            reindex(uri, "docs", **bad)
    with pytest.raises(KnnlmError, match="no domain 'nope'"):
        reindex(uri, "nope", "FLAT")
    assert sorted(client.list_collections()) == collections

    r = reindex(uri, "docs", "IVF_FLAT", {"nlist": 8}, {"nprobe": 8}, drop_delay_s=0)
    assert r["from"] == "knnlm_docs__v1" and r["to"] == "knnlm_docs__v2" and r["count"] == 400
    assert_same_view(snapshot(uri, "docs", queries), before)
    assert client.describe_collection("knnlm_docs")["collection_name"] == "knnlm_docs__v2"
    assert not client.has_collection("knnlm_docs__v1")
    assert doc_id_index(client, "knnlm_docs__v2") is not None
    np.testing.assert_array_equal(reader.search_ids(queries, 10)[1], before["ids"])

    out = json.loads(cli("reindex", "--uri", uri, "--domain", "docs", "--index-type", "HNSW", "--index-param", "M=16",
                         "--index-param", "efConstruction=200", "--search-param", "ef=400", "--keep-old",
                         "--json").output)
    assert out["to"] == "knnlm_docs__v3" and out["kept_old"] and out["index"]["search_params"] == {"ef": 400}
    assert_same_view(snapshot(uri, "docs", queries), before)
    desc = json.loads(cli("domains", "describe", "docs", "--uri", uri, "--json").output)
    assert desc["collection"] == "knnlm_docs__v3" and desc["index"]["type"] == "HNSW"
    assert [(c["name"], c["retired"]) for c in desc["collections"]] == [("knnlm_docs__v2", True),
                                                                         ("knnlm_docs__v3", False)]
    # a later reindex keeps the retired generation; drop removes every generation and the ledger
    reindex(uri, "docs", "FLAT", drop_delay_s=0)
    assert client.has_collection("knnlm_docs__v2") and not client.has_collection("knnlm_docs__v3")
    assert_same_view(snapshot(uri, "docs", queries), before)
    np.testing.assert_array_equal(reader.search_ids(queries, 10)[1], before["ids"])
    reader.close()
    cli("domains", "drop", "docs", "--uri", uri, "--yes")
    assert [c for c in client.list_collections() if c.startswith("knnlm_docs")] == []
    client.close()


def test_reindex_drops_the_leftover_of_an_interrupted_reindex(uri):
    make_domain(uri, "docs", n=50)
    client = connect(uri)
    try:  # a reindex that died after creating its collection
        create_collection(client, "knnlm_docs__v2", DIM, validate_index("FLAT"), "Strong",
                          {"format_version": 1, "domain": "docs", "info": INFO.to_dict(), "index": {}})
        r = reindex(uri, "docs", "FLAT", drop_delay_s=0)
        assert r["to"] == "knnlm_docs__v3" and r["count"] == 50
        assert sorted(c for c in client.list_collections() if "__v" in c) == ["knnlm_docs__v3"]
    finally:
        client.close()


# ---- domains -----------------------------------------------------------------------------------
def test_domains_list_describe_drop(uri):
    make_domain(uri, "alpha", n=30)
    make_domain(uri, "beta", n=20, index_type="HNSW")
    assert cli("domains", "list", "--uri", uri).output.split() == ["alpha", "beta"]
    assert json.loads(cli("domains", "list", "--uri", uri, "--json").output)["domains"] == ["alpha", "beta"]
    d = json.loads(cli("domains", "describe", "beta", "--uri", uri, "--json").output)
    assert (d["count"], d["dim"], d["model"], d["key_type"]) == (20, DIM, INFO.model, INFO.key_type)
    assert d["index"]["type"] == "HNSW" and d["index"]["build_params"]["M"] == 16
    assert d["ledger_documents"] == 1 and d["extra"]["tuned"]["k"] == 8
    text = cli("domains", "describe", "alpha", "--uri", uri).output
    assert "entries     30" in text and "FLAT" in text

    r = cli("domains", "drop", "alpha", "--uri", uri, input="n\n", code=1)
    assert "Aborted" in r.output and list_domains(uri) == ["alpha", "beta"]
    cli("domains", "drop", "alpha", "--uri", uri, input="y\n")
    assert list_domains(uri) == ["beta"]
    cli("domains", "drop", "beta", "--uri", uri, "--yes")
    assert list_domains(uri) == []
    assert "no domain 'alpha'" in cli("domains", "describe", "alpha", "--uri", uri, code=2).output
    assert "no domain 'alpha'" in cli("domains", "drop", "alpha", "--uri", uri, "--yes", code=2).output
    assert "invalid domain" in cli("domains", "drop", "a-b", "--uri", uri, "--yes", code=2).output


def test_a_second_process_on_a_lite_file_gets_a_clear_error(tmp_path):
    """Milvus Lite locks its database directory: one process at a time, until that process exits (exit 3: retry later)."""
    db = str(tmp_path / "knnlm.db")
    make_domain(db, "docs", n=5)  # this process now holds the lock
    r = subprocess.run([sys.executable, "-m", "knnlm_vdb", "domains", "list", "--uri", db],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "open in another process" in r.stderr, r.stderr[-2000:]


def test_schema_record_is_not_visible_as_a_domain(uri):
    migrate(uri)
    client = connect(uri)
    try:
        assert client.has_collection(SCHEMA_COLLECTION)
        assert read_schema_state(client)["version"] == latest_version()
    finally:
        client.close()
    assert list_domains(uri) == []
