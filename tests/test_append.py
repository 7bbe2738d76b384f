"""Live appends: idempotent, resumable after SIGKILL, shardable, --replace for changed text."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import docs_file
from knnlm_vdb.cli import main
from knnlm_vdb.datastore.faiss_store import FaissDatastore

WIN = ["--ctx", "64", "--stride", "32"]


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def expected_targets(path, tokenizer):
    return sum(len(tokenizer(json.loads(line)["text"])["input_ids"]) - 1 for line in open(path))


def rows_by_id(store):
    return dict(zip(store.ids().tolist(), store.values().tolist()))


@pytest.fixture()
def empty_store(tmp_path, tiny_model_dirs, corpus_file):
    """A FAISS datastore holding the small conftest corpus."""
    out = tmp_path / "ds"
    cli("build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus_file, "--out", out)
    return out


def test_append_twice_adds_nothing_the_second_time(tmp_path, tiny_model_dirs, empty_store, tokenizer):
    new = docs_file(tmp_path / "new.jsonl", 5)
    before = FaissDatastore(empty_store).count()
    r1 = json.loads(cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", empty_store,
                        "--corpus", new, "--json").output)
    assert r1["added"] == expected_targets(new, tokenizer)
    r2 = json.loads(cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", empty_store,
                        "--corpus", new, "--json").output)
    assert r2["added"] == 0 and r2["chunks_already_committed"] == 5
    assert FaissDatastore(empty_store).count() == before + r1["added"]


def test_shards_together_equal_one_full_append(tmp_path, tiny_model_dirs, corpus_file):
    corpus = docs_file(tmp_path / "c.jsonl", 12)
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    cli("build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus, "--out", full)
    cli("build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus_file, "--out", sharded)
    base = rows_by_id(FaissDatastore(sharded))
    for i in range(3):
        cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", sharded, "--corpus", corpus,
            "--shard", f"{i}/3")
    got = rows_by_id(FaissDatastore(sharded))
    assert {k: v for k, v in got.items() if k not in base} == rows_by_id(FaissDatastore(full))


def test_changed_document_is_reported_and_replace_swaps_its_entries(tmp_path, tiny_model_dirs, empty_store):
    v1 = tmp_path / "v1.jsonl"
    v1.write_text(json.dumps({"id": "notes", "text": "first version of the notes " * 4}) + "\n")
    cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", empty_store, "--corpus", v1)
    count_v1 = FaissDatastore(empty_store).count()
    v2 = tmp_path / "v2.jsonl"
    v2.write_text(json.dumps({"id": "notes", "text": "second, shorter notes " * 2}) + "\n")
    r = json.loads(cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", empty_store,
                       "--corpus", v2, "--json").output)
    assert r["changed"] == ["notes"] and r["added"] == 0
    assert FaissDatastore(empty_store).count() == count_v1
    r = json.loads(cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", empty_store,
                       "--corpus", v2, "--replace", "--json").output)
    assert r["replaced"] == ["notes"]
    n_old = len("first version of the notes " * 4) - 1
    n_new = len("second, shorter notes " * 2) - 1
    assert FaissDatastore(empty_store).count() == count_v1 - n_old + n_new


def test_bad_shard_is_a_clean_error(empty_store, tiny_model_dirs, corpus_file):
    r = CliRunner().invoke(main, ["append", "--datastore", str(empty_store), "--corpus", str(corpus_file),
                                  "--shard", "3/2"])
    assert r.exit_code == 2 and "--shard" in r.output


def test_killed_append_resumes_to_exactly_the_expected_entries(tmp_path, tiny_model_dirs, corpus_file):
    corpus = docs_file(tmp_path / "big.jsonl", 100, words=50)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    for d in (clean, crashed):
        cli("build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus_file, "--out", d)
    cli("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", clean, "--corpus", corpus)

    cmd = [sys.executable, "-m", "knnlm_vdb", "append", "--model", tiny_model_dirs["llama"], *WIN,
           "--datastore", str(crashed), "--corpus", str(corpus)]
    start = FaissDatastore(crashed).count()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if json.loads((crashed / "meta.json").read_text())["count"] > start + 200:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "append finished before it could be killed; make the corpus bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = FaissDatastore(crashed).count()
    assert start < partial < FaissDatastore(clean).count()

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    got, want = FaissDatastore(crashed), FaissDatastore(clean)
    assert got.count() == want.count()
    assert len(set(got.ids().tolist())) == got.count()  # no duplicates
    assert rows_by_id(got) == rows_by_id(want)  # nothing lost, same values
    order_got, order_want = np.argsort(got.ids()), np.argsort(want.ids())
    np.testing.assert_allclose(np.asarray(got.keys())[order_got], np.asarray(want.keys())[order_want],
                               rtol=1e-2, atol=1e-2)
