"""The CLI end to end with tiny saved models: build, eval --json, tune, and bad input."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from knnlm_vdb.cli import main

WIN = ["--ctx", "64", "--stride", "32"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def faiss_store(tmp_path, tiny_model_dirs, corpus_file):
    out = tmp_path / "ds"
    r = run("build", "--model", tiny_model_dirs["llama"], *WIN, "--corpus", corpus_file, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out


def test_build_then_eval_json(faiss_store, tiny_model_dirs, corpus_file):
    r = run("eval", "--model", tiny_model_dirs["llama"], *WIN, "--datastore", faiss_store, "--corpus", corpus_file,
            "--k", 8, "--lambda", 0.5, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    for key in ("tokens", "base_ppl", "knnlm_ppl", "base_tokens_per_s", "knnlm_tokens_per_s", "retrieval_seconds"):
        assert key in out
    assert out["tokens"] == len(corpus_file.read_text().encode()) - 1  # byte tokenizer: one token per byte
    assert out["knnlm_ppl"] < out["base_ppl"]  # the corpus is in the datastore


def test_tune_stores_settings_that_eval_then_uses(faiss_store, tiny_model_dirs, corpus_file):
    common = ["--model", tiny_model_dirs["llama"], *WIN, "--datastore", faiss_store]
    r = run("tune", *common, "--valid", corpus_file, "--max-k", 16, "--no-adaptive", "--json")
    assert r.exit_code == 0, r.output
    best = json.loads(r.output)["best"]
    meta = json.loads((faiss_store / "meta.json").read_text())
    assert meta["info"]["extra"]["tuned"]["lambda"] == best["lambda"]
    out = json.loads(run("eval", *common, "--corpus", corpus_file, "--json").output)
    assert (out["k"], out["temperature"], out["lambda"]) == (best["k"], best["temperature"], best["lambda"])
    assert out["knnlm_ppl"] == pytest.approx(best["ppl"], rel=1e-6)


def test_tune_fits_an_adaptive_calibration_that_eval_uses_by_default(faiss_store, tiny_model_dirs, corpus_file):
    common = ["--model", tiny_model_dirs["llama"], *WIN, "--datastore", faiss_store]
    r = run("tune", *common, "--valid", corpus_file, "--max-k", 16, "--json")
    auto = json.loads(r.output)["auto"]
    assert "calibration" in json.loads((faiss_store / "meta.json").read_text())["info"]["extra"]
    out = json.loads(run("eval", *common, "--corpus", corpus_file, "--no-cache", "--json").output)
    assert out["lambda"] == "auto"
    assert out["knnlm_ppl"] == pytest.approx(auto["valid_auto_ppl"], rel=0.02)  # same text, maybe fewer searches
    assert out["knnlm_ppl"] < out["base_ppl"]
    cached = json.loads(run("eval", *common, "--corpus", corpus_file, "--json").output)  # the default: + the cache
    assert cached["knnlm_ppl"] <= out["knnlm_ppl"] * 1.01  # a memorised text: the cache yields to the datastore
    fixed = json.loads(run("eval", *common, "--corpus", corpus_file, "--lambda", "0.3", "--json").output)
    assert fixed["lambda"] == 0.3 and fixed["searched_fraction"] == 1.0
    everywhere = json.loads(run("eval", *common, "--corpus", corpus_file, "--skip-below", 0, "--json").output)
    sparse = json.loads(run("eval", *common, "--corpus", corpus_file, "--skip-below", 0.999, "--no-cache",
                            "--json").output)
    assert everywhere["searched_fraction"] == 1.0 >= out["searched_fraction"] >= sparse["searched_fraction"] == 0.0
    assert sparse["knnlm_ppl"] == pytest.approx(sparse["base_ppl"], rel=1e-9)  # nothing searched: the LM alone
    cache_only = json.loads(run("eval", *common, "--corpus", corpus_file, "--skip-below", 0.999, "--json").output)
    assert cache_only["searched_fraction"] == 0.0 and cache_only["knnlm_ppl"] < cache_only["base_ppl"]  # text repeats
    _fails_cleanly(run("eval", *common, "--corpus", corpus_file, "--lambda", "0.3", "--skip-below", 0.1),
                   "--skip-below applies to adaptive λ")
    _fails_cleanly(run("eval", *common, "--corpus", corpus_file, "--skip-below", 1.5), "--skip-below must be in [0, 1)")


def test_auto_over_several_datastores_needs_every_one_calibrated(faiss_store, tiny_model_dirs, corpus_file, tmp_path):
    model = ["--model", tiny_model_dirs["llama"], *WIN]
    other = tmp_path / "other"
    assert run("build", *model, "--corpus", corpus_file, "--out", other).exit_code == 0
    assert run("tune", *model, "--datastore", faiss_store, "--valid", corpus_file, "--max-k", 16).exit_code == 0
    both = [*model, "--datastore", faiss_store, "--datastore", other, "--corpus", corpus_file]
    _fails_cleanly(run("eval", *both, "--lambda", "auto"), f"{other} has none: run `knnlm-vdb tune`")
    fixed = json.loads(run("eval", *both, "--json").output)  # not all calibrated: the first's fixed setting
    assert fixed["lambda"] != "auto"
    assert run("tune", *model, "--datastore", other, "--valid", corpus_file, "--max-k", 16).exit_code == 0
    auto = json.loads(run("eval", *both, "--json").output)  # all calibrated: per-domain adaptive λ
    assert auto["lambda"] == "auto" and auto["knnlm_ppl"] < auto["base_ppl"]


def _fails_cleanly(r, pattern):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert pattern in r.output
    assert r.output.strip().count("\n") == 0  # one line


def test_missing_corpus(tmp_path, tiny_model_dirs):
    r = run("build", "--model", tiny_model_dirs["llama"], "--corpus", tmp_path / "nope.txt", "--out", tmp_path / "d")
    _fails_cleanly(r, "corpus file not found")


def test_empty_and_binary_corpus(tmp_path, tiny_model_dirs):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    _fails_cleanly(run("build", "--corpus", tmp_path / "empty.txt", "--out", tmp_path / "d"), "empty")
    _fails_cleanly(run("build", "--corpus", tmp_path / "bin.txt", "--out", tmp_path / "d"), "binary")


@pytest.mark.parametrize("flag,value,msg", [("--lambda", "1.5", "--lambda must be in [0, 1]"),
                                            ("--lambda", "often", "--lambda must be a number in [0, 1] or 'auto'"),
                                            ("--lambda", "-0.2", "--lambda must be in [0, 1]"),
                                            ("--k", "0", "--k must be a positive integer")])
def test_bad_knn_settings(faiss_store, tiny_model_dirs, corpus_file, flag, value, msg):
    r = run("eval", "--model", tiny_model_dirs["llama"], "--datastore", faiss_store, "--corpus", corpus_file, flag, value)
    _fails_cleanly(r, msg)


def test_datastore_from_another_model_is_refused(faiss_store, tiny_model_dirs, corpus_file):
    r = run("eval", "--model", tiny_model_dirs["gpt2"], *WIN, "--datastore", faiss_store, "--corpus", corpus_file)
    _fails_cleanly(r, "was built with model=")


def test_datastore_of_another_dimension_is_refused(tmp_path, faiss_store, tokenizer, corpus_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=257, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    wide = tmp_path / "wide"
    LlamaForCausalLM(cfg).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    r = run("eval", "--model", wide, *WIN, "--datastore", faiss_store, "--corpus", corpus_file)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "model=" in r.output or "dim=" in r.output


def test_missing_datastore_and_unknown_model(tmp_path, corpus_file, tiny_model_dirs):
    _fails_cleanly(run("eval", "--model", tiny_model_dirs["llama"], "--datastore", tmp_path / "none",
                       "--corpus", corpus_file), "no FAISS datastore")
    _fails_cleanly(run("eval", "--model", tmp_path / "no-model-here", "--datastore", tmp_path / "none",
                       "--corpus", corpus_file), "no FAISS datastore")
    (tmp_path / "ds").mkdir()
    r = run("build", "--model", tmp_path / "no-such-model", "--corpus", corpus_file, "--out", tmp_path / "ds2")
    _fails_cleanly(r, "cannot load model")


def test_console_script_prints_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "knnlm_vdb", "eval", "--datastore", str(tmp_path / "x"),
                        "--corpus", str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2  # options and the datastore are checked first, before the corpus and the model
    assert r.stderr.strip() == (f"error: no FAISS datastore at {tmp_path / 'x'} (missing meta.json); "
                                "build one with `knnlm-vdb build`")


def test_demo_runs_on_the_bundled_sample(tmp_path, tiny_model_dirs):
    r = run("demo", "--backend", "faiss", "--workdir", tmp_path, "--model", tiny_model_dirs["llama"], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["datastore_entries"] > 50_000  # four tutorial chapters, one entry per byte-level token
    assert out["tokens"] > 10_000 and out["base_ppl"] > 1 and 0 < out["knnlm_ppl"] <= out["base_ppl"] * 1.01
    assert 0 < out["auto_knnlm_ppl"] <= out["base_ppl"] * 1.01 and 0 <= out["auto_searched_fraction"] <= 1
    assert 0 < out["auto_no_cache_knnlm_ppl"] <= out["base_ppl"] * 1.01
