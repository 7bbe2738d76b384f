"""Live appends into Milvus (Lite and a real server): creating a missing domain race-free,
idempotence, resuming after SIGKILL, and evaluation while an append runs.

Milvus Lite locks its database directory for the life of the process that opened it (pymilvus
keeps the embedded server running after ``close()``), so a Lite file used by a subprocess is
never opened by this process first, and the concurrent eval-during-append test for Lite uses
two threads of one process. On the server each test gets a database of its own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import STORE_DIM, docs_file, server_database, store_info
from knnlm_vdb.cli import main, make_encoder
from knnlm_vdb.datastore.base import StoreInfo, entry_ids
from knnlm_vdb.datastore.milvus import MilvusDatastore, list_domains, validate_index
from knnlm_vdb.datastore.milvus.catalog import iterate_rows
from knnlm_vdb.datastore.milvus.connection import connect
from knnlm_vdb.datastore.milvus.create import create_collection
from knnlm_vdb.errors import KnnlmError

WIN = ["--ctx", "64", "--stride", "32"]
DIM = STORE_DIM
INFO = store_info()


@pytest.fixture(params=["lite", "server"])
def where(request, tmp_path):
    """``(kind, uri_for(name))``: Lite gives each name a file of its own, the server a shared database."""
    if request.param == "lite":
        yield "lite", lambda name: str(tmp_path / f"{name}.db")
    else:
        for uri in server_database(request.getfixturevalue("milvus_server").uri):
            yield "server", lambda name: uri


def expected_targets(path, tokenizer):
    return sum(len(tokenizer(json.loads(line)["text"])["input_ids"]) - 1 for line in open(path))


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def append_args(model_dir, uri, domain, corpus):
    return ["append", "--model", model_dir, *WIN, "--backend", "milvus", "--uri", uri, "--domain", domain,
            "--corpus", str(corpus)]


def rows_of(uri, domain) -> tuple[dict, dict]:
    """id -> target and id -> key of every row of a domain."""
    targets, keys = {}, {}
    with MilvusDatastore.open(uri, domain) as store:
        for rows in iterate_rows(store.client, store.name, ["id", "target", "key"], 4096):
            for r in rows:
                targets[int(r["id"])] = int(r["target"])
                keys[int(r["id"])] = np.asarray(r["key"], np.float32)
    return targets, keys


def subprocess_count(uri, domain) -> int:
    """Rows of a domain, asked by another process (this one must not lock a Lite file it will reuse)."""
    out = subprocess.run([sys.executable, "-m", "knnlm_vdb", "domains", "describe", domain, "--uri", uri, "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)["count"]


# ---- creating the domain ----------------------------------------------------------------------
def test_append_creates_a_missing_domain_and_twice_adds_nothing(where, tmp_path, tiny_model_dirs, tokenizer):
    kind, uri_for = where
    uri = uri_for("db")
    corpus = docs_file(tmp_path / "c.jsonl", 5)
    r1 = json.loads(cli(*append_args(tiny_model_dirs["llama"], uri, "news", corpus), "--index", "HNSW",
                        "--json").output)
    assert r1["added"] == expected_targets(corpus, tokenizer) > 0
    assert r1["datastore"]["index"]["type"] == "HNSW" and r1["datastore"]["count"] == r1["added"]
    r2 = json.loads(cli(*append_args(tiny_model_dirs["llama"], uri, "news", corpus), "--json").output)
    assert r2["added"] == 0 and r2["chunks_already_committed"] == 5
    assert r2["datastore"]["count"] == r1["added"]
    assert list_domains(uri) == ["news"]
    # a model that does not match the domain is refused, not mixed in
    r = CliRunner().invoke(main, append_args(tiny_model_dirs["gpt2"], uri, "news", corpus))
    assert r.exit_code == 2 and "was built with model=" in r.output


def test_concurrent_creators_share_one_domain(where):
    """Indexed-Job pods that all start `append` on a new domain: one creates it, the rest open it."""
    kind, uri_for = where
    uri = uri_for("db")
    n = 4
    barrier = threading.Barrier(n)
    stores, errors = [None] * n, []

    def worker(i):
        try:
            barrier.wait()
            stores[i] = MilvusDatastore.open_or_create(uri, "shared", INFO, index_type="FLAT")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    rng = np.random.default_rng(0)
    for i, store in enumerate(stores):
        assert store._physical() == "knnlm_shared__v1"
        store.add(entry_ids("shared", f"doc{i}", np.arange(10)), rng.standard_normal((10, DIM)), np.arange(10))
    assert stores[0].count() == 10 * n
    for store in stores:
        store.close()
    client = connect(uri)
    try:
        assert sorted(c for c in client.list_collections() if c.startswith("knnlm_shared")) == ["knnlm_shared__v1"]
        # an interrupted create (collection made, alias not) is adopted by the next creator
        create_collection(client, "knnlm_orphan__v1", DIM, validate_index("FLAT"), "Strong",
                          {"format_version": 1, "domain": "orphan", "info": INFO.to_dict(),
                           "index": {"type": "FLAT", "build_params": {}, "search_params": {}}})
    finally:
        client.close()
    with pytest.raises(KnnlmError, match="without its alias"):
        MilvusDatastore.create(uri, "orphan", INFO)
    with MilvusDatastore.open_or_create(uri, "orphan", INFO, alias_wait_s=0.3) as store:
        assert store._physical() == "knnlm_orphan__v1" and store.count() == 0
    assert "orphan" in list_domains(uri)


# ---- crash and resume -------------------------------------------------------------------------
def _watch_progress(proc, seen: list):
    """Collect tqdm's percentages from the process's stderr."""
    buf = ""
    while True:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            return
        buf = (buf + chunk.decode(errors="replace"))[-4096:]
        for m in re.finditer(r"encode:\s+(\d+)%", buf):
            seen.append(int(m.group(1)))


def test_killed_append_resumes_to_exactly_the_expected_entries(where, tmp_path, tiny_model_dirs, tokenizer):
    kind, uri_for = where
    corpus = docs_file(tmp_path / "big.jsonl", 24, words=50)
    clean_uri, crash_uri = uri_for("clean"), uri_for("crashed")
    cli(*append_args(tiny_model_dirs["llama"], clean_uri, "clean", corpus))
    # read the clean domain now: a Lite connection left idle for the minutes a loaded machine takes
    # below is dropped by its embedded server (gRPC GOAWAY "too_many_pings"), and reconnecting in this
    # process then trips over the lock it still holds
    want_t, want_k = rows_of(clean_uri, "clean")

    cmd = [sys.executable, "-m", "knnlm_vdb", *append_args(tiny_model_dirs["llama"], crash_uri, "crashed", corpus)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: list[int] = []
    reader = threading.Thread(target=_watch_progress, args=(proc, seen), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (seen and seen[-1] >= 30):
        time.sleep(0.02)
    assert proc.poll() is None, f"append finished before it could be killed (progress {seen[-3:]})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(10)
    want_count = expected_targets(corpus, tokenizer)
    partial = subprocess_count(crash_uri, "crashed")
    assert 0 < partial < want_count

    resumed = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    assert report["chunks_already_committed"] > 0  # the ledger skipped finished documents
    got_t, got_k = rows_of(crash_uri, "crashed")
    assert len(got_t) == len(want_t) == want_count == report["datastore"]["count"]
    # ids derive from the domain name: compare by (document, position) through each domain's ids
    texts = {d["id"]: d["text"] for d in map(json.loads, open(corpus))}
    for doc, text in texts.items():
        n = len(tokenizer(text)["input_ids"])
        gi, wi = entry_ids("crashed", doc, np.arange(1, n)), entry_ids("clean", doc, np.arange(1, n))
        assert [got_t[i] for i in gi.tolist()] == [want_t[i] for i in wi.tolist()], doc
        np.testing.assert_allclose(np.stack([got_k[i] for i in gi.tolist()]),
                                   np.stack([want_k[i] for i in wi.tolist()]), rtol=1e-4, atol=1e-4)


# ---- reading while writing --------------------------------------------------------------------
def test_eval_during_an_append_gets_no_errors(where, tmp_path, tiny_model_dirs, corpus_file):
    from knnlm_vdb.corpus import read_corpora
    from knnlm_vdb.evaluate import evaluate
    from knnlm_vdb.ingest import ingest

    kind, uri_for = where
    uri = uri_for("db")
    model = tiny_model_dirs["llama"]
    corpus = docs_file(tmp_path / "more.jsonl", 30, words=50)
    reader_enc = make_encoder(model, "ffn_input", 64, 32, 2, "cpu", "float32")
    test_ids = reader_enc.tokenize("gamma delta alpha beta theta mu kappa " * 8)
    results, errors = [], []

    if kind == "server":  # a separate process appends, as in a deployment
        cli(*append_args(model, uri, "live", corpus_file))
        writer = subprocess.Popen([sys.executable, "-m", "knnlm_vdb", *append_args(model, uri, "live", corpus)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        running = lambda: writer.poll() is None  # noqa: E731
    else:  # Milvus Lite: one process per file, so the writer is a thread
        writer_enc = make_encoder(model, "ffn_input", 64, 32, 2, "cpu", "float32")
        store_w = MilvusDatastore.open_or_create(uri, "live", StoreInfo.for_encoder(writer_enc))

        def write():
            try:
                ingest(writer_enc, store_w, read_corpora([str(corpus)]), domain="live", show_progress=False)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=write)
        running = thread.is_alive

    with MilvusDatastore.open_or_create(uri, "live", StoreInfo.for_encoder(reader_enc)) as store_r:
        if kind == "lite":
            thread.start()
        while running() or not results:
            try:
                res = evaluate(reader_enc, test_ids, [store_r], k=8, show_progress=False)
                results.append((store_r.count(), res.knnlm_ppl))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                break
        if kind == "lite":
            thread.join()
            store_w.close()
        else:
            assert writer.wait(300) == 0, writer.stderr.read().decode()[-3000:]
        final = store_r.count()
    assert not errors, errors
    assert len(results) >= 2 and all(np.isfinite(p) for _, p in results)
    counts = [c for c, _ in results]
    assert counts == sorted(counts) and counts[-1] <= final
