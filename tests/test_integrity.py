"""Integrity (issue 16): a damaged FAISS datastore is refused on open with one line and exit 2 and is
left byte-identical; ``check`` names the damage; bad input fails before the model loads and
before the first write."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from knnlm_vdb.cli import main
from knnlm_vdb.datastore import StoreInfo, entry_ids
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.datastore.ledger import JsonLedger
from knnlm_vdb.errors import Incompatible

INFO = StoreInfo(model="m", key_type="ffn_input", dim=16, tokenizer="t", vocab_size=1000)
WIN = ["--ctx", "64", "--stride", "32"]
NO_MODEL = "/nonexistent/model-dir"  # loading it would fail with "cannot load model"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def refused_cleanly(r, *needles):
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output and "cannot load model" not in r.output
    for n in needles:
        assert n in r.output, r.output


def make_store(path, n=120, index="flat"):
    """A consistent datastore: rows of document 'doc' positions 1..n, and a ledger chunk for them."""
    ivf = {"nlist": 2, "pq_m": 2} if index == "ivfpq" else {}  # small: training stays quick
    store = FaissDatastore.create(path, INFO, index=index, nprobe=1, **ivf)
    rng = np.random.default_rng(0)
    store.add(entry_ids("default", "doc", np.arange(1, n + 1)), rng.standard_normal((n, 16)),
              rng.integers(0, 1000, n))
    store.train()
    JsonLedger(path / "ledger.json").commit_chunk("doc", 0, "h", n + 1)
    return path


def _drop(field):
    def corrupt(meta):
        parent, _, leaf = field.rpartition(".")
        (meta[parent] if parent else meta).pop(leaf)
    return corrupt


CORRUPTIONS = [(name, how) for name in ("keys.bin", "values.bin", "ids.bin", "meta.json")
               for how in ("truncate", "delete", "garbage")] + [
    ("ledger.json", "truncate"), ("ledger.json", "garbage"),
    *[("meta.json", f"drop {f}") for f in ("key_dtype", "count", "info", "info.dim", "info.model", "index",
                                            "index.type", "index.indexed_count")],
]


def corrupt(path, name, how):
    p = path / name
    if how == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "delete":
        p.unlink()
    elif how == "garbage":  # random bytes, not a whole number of rows and shorter than the committed ones
        p.write_bytes(np.random.default_rng(1).bytes(max(1, p.stat().st_size // 3 + 1)))
    else:
        meta = json.loads(p.read_text())
        _drop(how.split()[1])(meta)
        p.write_text(json.dumps(meta))


@pytest.mark.parametrize("name,how", CORRUPTIONS, ids=[f"{n}-{h}" for n, h in CORRUPTIONS])
def test_each_corruption_is_refused_cleanly_and_changes_nothing(tmp_path, name, how, corpus_file):
    ds = make_store(tmp_path / "ds")
    corrupt(ds, name, how)
    before = snapshot(ds)
    if not (name == "meta.json" and how == "delete"):
        with pytest.raises(Incompatible, match="is damaged|not valid JSON"):
            FaissDatastore(ds)
    for cmd in (["eval", "--corpus", corpus_file], ["append", "--corpus", corpus_file]):
        refused_cleanly(run(cmd[0], "--model", NO_MODEL, "--datastore", ds, *cmd[1:]), str(ds))
    r = run("check", "--datastore", ds, "--json")
    if name == "meta.json" and how == "delete":
        refused_cleanly(r, "no FAISS datastore")
    else:
        assert r.exit_code == 2, r.output
        report = json.loads(r.output)
        assert not report["healthy"] and any(d["name"].startswith(name) for d in report["damage"]), report
        r = run("check", "--datastore", ds, "--repair")
        assert r.exit_code == 2
    assert snapshot(ds) == before


@pytest.mark.parametrize("how", ["truncate", "delete", "garbage"])
def test_a_damaged_ivfpq_index_is_refused_and_repair_retrains_it(tmp_path, how):
    ds = make_store(tmp_path / "ds", n=300, index="ivfpq")
    corrupt(ds, "index.faiss", how)
    before = snapshot(ds)
    with pytest.raises(Incompatible, match="index.faiss"):
        FaissDatastore(ds).search(np.zeros((1, 16), np.float32), 4)
    r = run("check", "--datastore", ds, "--json")
    assert r.exit_code == 2 and json.loads(r.output)["damage"][0]["name"].startswith("index.faiss"), r.output
    assert snapshot(ds) == before
    r = run("check", "--datastore", ds, "--repair")
    assert r.exit_code == 0 and "retrained" in r.output, r.output
    assert FaissDatastore(ds).search(np.zeros((1, 16), np.float32), 4)[1].min() >= 0


def test_check_reports_a_healthy_datastore(tmp_path):
    ds = make_store(tmp_path / "ds")
    r = run("fsck", "--datastore", ds, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["healthy"] and report["count"] == 120 and report["ledger_rows"] == 120
    assert report["row_bytes_per_entry"] == 16 * 2 + 4 + 8 and report["bytes_per_entry"] > 44
    assert report["damage"] == [] and report["notes"] == []
    assert "healthy" in run("check", "--datastore", ds).output


def test_uncommitted_tail_is_a_note_and_repair_cuts_it(tmp_path):
    ds = make_store(tmp_path / "ds")
    with open(ds / "keys.bin", "ab") as f:
        f.write(b"\1" * 100)
    report = json.loads(run("check", "--datastore", ds, "--json").output)
    assert report["healthy"] and report["notes"][0]["name"] == "keys.bin:uncommitted_tail"
    r = run("check", "--datastore", ds, "--repair", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["notes"] == [], r.output
    assert (ds / "keys.bin").stat().st_size == 120 * 32


def test_rows_the_ledger_claims_but_are_gone_are_damage_and_repair_forgets_them(tmp_path):
    ds = make_store(tmp_path / "ds")
    JsonLedger(ds / "ledger.json").commit_chunk("other", 0, "h2", 5)  # 4 rows that were never stored
    report = json.loads(run("check", "--datastore", ds, "--json").output)
    assert [d["name"] for d in report["damage"]] == ["ledger.json:rows_missing"]
    r = run("check", "--datastore", ds, "--repair")
    assert r.exit_code == 0 and "forgot 1 document" in r.output, r.output
    assert "other" not in JsonLedger(ds / "ledger.json").documents()


def test_zero_fill_repro_is_refused_and_leaves_every_file_untouched(tmp_path, tiny_model_dirs, corpus_file):
    """Issue 16 case 1: keys.bin cut shorter than the committed rows, then append (used to zero-fill)."""
    ds = tmp_path / "fds"
    r = run("build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus_file, "--out", ds)
    assert r.exit_code == 0, r.output
    keys = ds / "keys.bin"
    with open(keys, "r+b") as f:
        f.truncate(keys.stat().st_size // 2)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "one", "text": "one more document " * 3}) + "\n")
    before = snapshot(ds)
    r = run("append", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", ds, "--corpus", one,
            "--max-tokens", 40)
    refused_cleanly(r, "keys.bin has", "rows lost", "knnlm-vdb check")
    assert snapshot(ds) == before
    # and the library itself never extends a short file, even on a store opened before the damage
    store = FaissDatastore(make_store(tmp_path / "lib"))
    with open(tmp_path / "lib" / "keys.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(Incompatible, match="keys.bin has 100 bytes"):
        store.add(entry_ids("default", "x", np.arange(3)), np.zeros((3, 16)), np.zeros(3))
    assert (tmp_path / "lib" / "keys.bin").stat().st_size == 100


# ---- input checked before the model loads -------------------------------------------------------
BAD_OPTIONS = [
    (["--k", 1_000_000_000], "--k must be a positive integer at most 16384"),
    (["--temperature", "inf"], "--temperature must be a positive finite number"),
    (["--temperature", "nan"], "--temperature must be a positive finite number"),
    (["--lambda", "1.5"], "--lambda must be in [0, 1]"),
    (["--ctx", 1], "--ctx must be at least 2"),
    (["--ctx", 64, "--stride", 65], "--stride must be between 1 and --ctx"),
    (["--batch-size", 0], "--batch-size must be positive"),
    (["--device", "gpu7"], "--device must be"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[m.split()[0] + str(e[-1]) for e, m in BAD_OPTIONS])
def test_bad_options_fail_before_the_model_loads(tmp_path, corpus_file, extra, message):
    """The model path does not exist: reaching load_lm would say "cannot load model" instead."""
    ds = make_store(tmp_path / "ds")
    for cmd in ("eval", "serve"):
        args = ["--corpus", corpus_file] if cmd == "eval" else ["--insecure"]
        refused_cleanly(run(cmd, "--model", NO_MODEL, "--datastore", ds, *args, *extra), message)


@pytest.mark.parametrize("uri,domain,message", [
    ("ftp://host/x", "docs", "must be a local path ending in .db"),
    ("./x.db", "bad-name", "invalid domain"),
    ("./x.db", "a" * 65, "invalid domain"),
])
def test_bad_uri_or_domain_fails_before_the_model_loads(tmp_path, corpus_file, uri, domain, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in (["eval", "--corpus", corpus_file], ["append", "--corpus", corpus_file],
                ["build", "--corpus", corpus_file]):
        refused_cleanly(run(cmd[0], "--model", NO_MODEL, "--uri", uri, "--domain", domain, *cmd[1:]), message)
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt"], "nothing may be created"


@pytest.mark.parametrize("record,message", [
    ({"id": None, "text": "hello there"}, '"id" must be a string or an integer, got NoneType'),
    ({"id": ["a"], "text": "hello there"}, '"id" must be a string or an integer, got list'),
    ({"id": {"a": 1}, "text": "hello there"}, '"id" must be a string or an integer, got dict'),
    ({"id": True, "text": "hello there"}, '"id" must be a string or an integer, got bool'),
    ({"id": "x", "text": ["a", "b"]}, '"text" must be a string, got list'),
    ({"id": "x", "text": None}, '"text" must be a string, got NoneType'),
    ({"id": "x" * 1025, "text": "hello there"}, '"id" must be 1 to 1024 bytes'),
    ({"id": "", "text": "hello there"}, '"id" must be 1 to 1024 bytes'),
    ([1, 2], 'expected a JSON object with "id" and "text"'),
])
def test_a_corpus_with_one_bad_record_stores_nothing(tmp_path, tiny_model_dirs, record, message):
    ds = make_store(tmp_path / "ds")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [{"id": 7, "text": "good text " * 20}, record]) + "\n")
    before = snapshot(ds)
    refused_cleanly(run("append", "--model", NO_MODEL, "--datastore", ds, "--corpus", corpus), f"{corpus}:2: ",
                    message)
    assert snapshot(ds) == before


def test_json_output_is_strict(tmp_path):
    from knnlm_vdb.cli_common import strict_json

    out = strict_json({"a": float("inf"), "b": [np.float32("nan"), 1.5], "c": np.int64(3), "d": np.array([1.0])})
    assert out == {"a": None, "b": [None, 1.5], "c": 3, "d": [1.0]}
    json.dumps(out, allow_nan=False)


# ---- Milvus (Lite): damaged metadata is refused on open and reported by check ------------------------
@pytest.mark.parametrize("field", ["info.dim", "info.model", "info.tokenizer", "index.type", "index", "info"])
def test_each_missing_milvus_meta_field_is_refused_and_reported(tmp_path, corpus_file, field, tiny_model_dirs):
    from knnlm_vdb.datastore import create_store

    uri = str(tmp_path / "m.db")
    store = create_store("milvus", uri, INFO, domain="docs")
    rng = np.random.default_rng(0)
    store.add(entry_ids("docs", "doc", np.arange(50)), rng.standard_normal((50, 16)).astype(np.float32),
              rng.integers(0, 1000, 50))
    store.flush()
    collection = store.describe()["collection"]
    raw = store.client.describe_collection(collection)["properties"]["knnlm.meta"]
    meta = json.loads(raw)
    _drop(field)(meta)
    store.client.alter_collection_properties(collection, properties={"knnlm.meta": json.dumps(meta)})
    store.client.close()
    r = run("check", "--uri", uri, "--domain", "docs", "--json")
    assert r.exit_code == 2, r.output
    report = json.loads(r.output)
    assert not report["healthy"] and field in report["damage"][0]["message"], report
    r = run("eval", "--model", tiny_model_dirs["llama"], *WIN, "--uri", uri, "--domain", "docs", "--corpus", corpus_file)
    refused_cleanly(r, "is damaged", field)  # (a Milvus domain is opened after the model loads)
    from pymilvus import MilvusClient

    with_client = MilvusClient(uri)
    assert json.loads(with_client.describe_collection(collection)["properties"]["knnlm.meta"]) == meta  # unchanged
    with_client.close()


def test_check_reports_a_healthy_milvus_domain(tmp_path):
    from knnlm_vdb.datastore import create_store

    uri = str(tmp_path / "m.db")
    store = create_store("milvus", uri, INFO, domain="docs")
    store.add(entry_ids("docs", "doc", np.arange(30)), np.ones((30, 16), np.float32), np.arange(30))
    store.close()
    r = run("fsck", "--uri", uri, "--domain", "docs", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["healthy"] and report["count"] == 30 and report["damage"] == []
    assert run("check", "--uri", str(tmp_path / "none.db"), "--domain", "docs").exit_code == 2
    assert not (tmp_path / "none.db").exists()  # check only reads
