"""kNN-LM decoding through transformers.generate, and the KnnLM facade, on tiny random models."""
import numpy as np
import pytest
import torch

from conftest import TINY_TEXT
from knnlm_vdb.api import KnnLM
from knnlm_vdb.corpus import Document
from knnlm_vdb.datastore import StoreInfo
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.ingest import ingest

MEMORISED = "0123456789abcdefghij" * 4


def _store(tmp_path, enc, name, text):
    store = FaissDatastore.create(tmp_path / name, StoreInfo.for_encoder(enc), key_dtype="float32")
    ingest(enc, store, [Document(name, text)], show_progress=False)
    return store


@pytest.fixture()
def knnlm(tmp_path, any_lm):
    enc = Encoder(any_lm, ctx=128, stride=64)
    return KnnLM(enc, [_store(tmp_path, enc, "mem", MEMORISED + TINY_TEXT)], k=8, temperature=1.0, lmbda=0.5)


def _base_generate(lm: KnnLM, prompt: str, **kw):
    ids = torch.tensor([lm.encoder.tokenize(prompt)])
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=lm.tokenizer.eos_token_id,
                                eos_token_id=lm.tokenizer.eos_token_id,
                                **kw)
    return out[0, ids.shape[1]:].tolist()


def test_lambda_zero_is_the_base_models_generate_greedy(knnlm):
    got = knnlm.generate("The quick brown", max_new_tokens=12, lmbda=0.0)
    assert got.token_ids == _base_generate(knnlm, "The quick brown", max_new_tokens=12, do_sample=False)
    assert len(got.steps) == 12 and all(s.prob == s.base_prob for s in got.steps)


def test_lambda_zero_is_the_base_models_generate_seeded_sampling(knnlm):
    got = knnlm.generate("The quick brown", max_new_tokens=12, lmbda=0.0, do_sample=True, top_p=0.9,
                         temperature_lm=0.8, seed=7)
    torch.manual_seed(7)
    want = _base_generate(knnlm, "The quick brown", max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8,
                          top_k=0)
    assert got.token_ids == want


def test_high_lambda_greedy_reproduces_a_memorised_sequence(knnlm):
    prompt = MEMORISED[:25]
    got = knnlm.generate(prompt, max_new_tokens=15, lmbda=0.99)
    expected = MEMORISED[25:40]
    assert got.text == expected
    base = knnlm.generate(prompt, max_new_tokens=15, lmbda=0.0)
    assert base.text != expected  # the random model alone cannot know it


def test_cached_decoding_matches_rescoring_the_whole_sequence(knnlm):
    """Each step's mixture over the KV cache equals scoring prompt + continuation in one pass."""
    prompt = "def add(a, b):"
    got = knnlm.generate(prompt, max_new_tokens=10, lmbda=0.3, k=8, temperature=2.0)
    ids = knnlm.encoder.tokenize(prompt) + got.token_ids
    scored = knnlm.score(ids, lmbda=0.3, k=8, temperature=2.0)
    tail = scored.logprobs[-len(got.token_ids):]
    np.testing.assert_allclose(np.log([s.prob for s in got.steps]), tail, atol=1e-4)
    np.testing.assert_allclose(np.log([s.base_prob for s in got.steps]), scored.base_logprobs[-10:], atol=1e-4)


def test_batch_with_left_padding_equals_one_by_one(tmp_path, llama_lm):
    enc = Encoder(llama_lm, ctx=128, stride=64)
    lm = KnnLM(enc, [_store(tmp_path, enc, "mem", MEMORISED + TINY_TEXT)], k=8, temperature=1.0, lmbda=0.4)
    prompts = ["The quick brown fox", "0123", "def add(a, b):\n    return"]
    batch = lm.generate(prompts, max_new_tokens=8)
    for p, g in zip(prompts, batch):
        one = lm.generate(p, max_new_tokens=8)
        assert g.token_ids == one.token_ids
        np.testing.assert_allclose([s.prob for s in g.steps], [s.prob for s in one.steps], atol=1e-4)


def test_beam_search_runs_and_logits_processor_plugs_into_model_generate(knnlm):
    beams = knnlm.generate(MEMORISED[:25], max_new_tokens=6, num_beams=3, lmbda=0.99)
    assert beams.text == MEMORISED[25:31]
    ids = torch.tensor([knnlm.encoder.tokenize(MEMORISED[:25])])
    proc = knnlm.logits_processor(lmbda=0.99)
    with torch.inference_mode():
        out = knnlm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   logits_processor=[proc], pad_token_id=0)
    assert knnlm.tokenizer.decode(out[0, ids.shape[1]:]) == MEMORISED[25:31]


def test_stream_yields_the_same_text_and_stop_sequences_end_it(knnlm):
    pieces = [p for p, _ in knnlm.stream(MEMORISED[:25], max_new_tokens=15, lmbda=0.99)]
    assert "".join(pieces) == MEMORISED[25:40]
    stopped = knnlm.generate(MEMORISED[:25], max_new_tokens=15, lmbda=0.99, stop=["9a"])
    assert stopped.text == "5678" and stopped.stopped_by == "9a"


def test_closing_a_stream_early_stops_generation(knnlm):
    it = knnlm.stream(MEMORISED[:25], max_new_tokens=200, lmbda=0.5)
    next(it)
    it.close()  # the worker sees the cancel event at its next step and returns
    assert not knnlm._lock.locked()


@pytest.mark.parametrize("kw,match", [
    ({"top_p": 0.0, "do_sample": True}, "top_p"),
    ({"top_p": 1.5, "do_sample": True}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature_lm": 0.0, "do_sample": True}, "temperature"),
    ({"lmbda": 2.0}, "lambda"),
])
def test_bad_generation_parameters_are_refused(knnlm, kw, match):
    with pytest.raises(InvalidInput, match=match):
        knnlm.generate("abc", **kw)


def test_empty_prompt_refused(knnlm):
    with pytest.raises(InvalidInput, match="empty"):
        knnlm.generate("")


# ---- the CLI ------------------------------------------------------------------------------------
def _cli(*args):
    from click.testing import CliRunner

    from knnlm_vdb.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def cli_store(tmp_path, tiny_model_dirs):
    corpus = tmp_path / "mem.txt"
    corpus.write_text(MEMORISED + TINY_TEXT)
    r = _cli("build", "--model", tiny_model_dirs["llama"], "--ctx", 128, "--stride", 64, "--corpus", corpus,
             "--out", tmp_path / "ds", "--key-dtype", "float32")
    assert r.exit_code == 0, r.output
    return ["--model", tiny_model_dirs["llama"], "--ctx", 128, "--stride", 64, "--datastore", tmp_path / "ds"]


def test_cli_generate_streams_the_memorised_continuation(cli_store):
    r = _cli("generate", *cli_store, "--prompt", MEMORISED[:25], "--max-new-tokens", 15, "--lambda", 0.99,
             "--k", 8)
    assert r.exit_code == 0, r.output
    assert r.output == MEMORISED[25:40] + "\n"


def test_cli_generate_json_with_neighbours(cli_store, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(MEMORISED[:25])
    r = _cli("generate", *cli_store, "--prompt-file", prompt, "--max-new-tokens", 4, "--lambda", 0.99, "--k", 8,
             "--show-neighbours", 2, "--json")
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.output)
    assert out["text"] == MEMORISED[25:29]
    first = out["steps"][0]["neighbours"][0]
    assert first["doc_id"] == "mem.txt" and first["token"] == MEMORISED[25] and first["distance"] < 1e-3


@pytest.mark.parametrize("args,message", [
    ((), "--prompt TEXT or --prompt-file"),
    (("--prompt", "x", "--prompt-file", "y"), "one of them"),
    (("--prompt", "  "), "empty"),
    (("--prompt", "x", "--sample", "--top-p", 0), "top_p"),
    (("--prompt", "x", "--max-new-tokens", 0), "max_new_tokens"),
])
def test_cli_generate_bad_input_is_one_line_and_exit_2(cli_store, args, message):
    r = _cli("generate", *cli_store, *args)
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and message in r.output and r.output.count("\n") == 1


def test_auto_reads_the_prompt_first_and_generated_tokens_leave_trust_alone(tmp_path, llama_lm):
    """The prompt is scored like a document: a memorised prompt earns the domain more trust than
    an unseen one; decoding then uses that trust unchanged and skips searches the gate deems useless."""
    from knnlm_vdb.adaptive import fit_calibration
    from knnlm_vdb.evaluate import evaluate

    enc = Encoder(llama_lm, ctx=256, stride=128)
    store = _store(tmp_path, enc, "mem", MEMORISED * 3 + TINY_TEXT)
    valid = evaluate(enc, [enc.tokenize(MEMORISED * 2), enc.tokenize(TINY_TEXT[::-1])], [store], k=16,
                     keep_neighbours=True, show_progress=False)
    store.set_extra("calibration", fit_calibration(valid.neighbours, 16, 1.0)[0].to_dict())
    lm = KnnLM(enc, [store])
    assert lm.settings().adaptive  # calibrated: auto by default
    from transformers import LogitsProcessor

    class Watch(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen_scales.append(list(proc.scales[0]))
            return scores

    scales = {}
    for name, prompt in (("seen", MEMORISED * 2), ("unseen", "Zebras quietly juggle purple kettles at dawn.")):
        ids = torch.tensor([enc.tokenize(prompt)])
        proc = lm.logits_processor()
        seen_scales = []
        with torch.inference_mode():
            lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              logits_processor=[proc, Watch()],
                              pad_token_id=0)
        assert all(s == seen_scales[0] for s in seen_scales)  # generated tokens do not move the trust
        assert proc.searches + proc.skipped == 8
        scales[name] = seen_scales[0][0]
    assert scales["seen"] > scales["unseen"]


def test_score_reports_neighbours_with_their_documents(tmp_path, llama_lm):
    enc = Encoder(llama_lm, ctx=128, stride=64)
    lm = KnnLM(enc, [_store(tmp_path, enc, "mem", MEMORISED)], k=8, lmbda=0.5)
    r = lm.score(MEMORISED[:30], neighbours=2)
    assert len(r.neighbours) == len(r.token_ids) - 1
    for pos, hits in enumerate(r.neighbours, start=1):  # memorised: the nearest entry is the same position
        assert hits[0]["doc_id"] == "mem" and hits[0]["position"] == pos and hits[0]["distance"] < 1e-3
        assert hits[0]["target"] == r.token_ids[pos]
    assert r.knnlm_ppl < r.base_ppl


def test_gate_features_ignore_tokens_other_processors_ruled_out():
    """EOS banned by min_new_tokens (-inf) must not turn the entropy into NaN (which skipped every search)."""
    from knnlm_vdb.generate import gate_features

    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), -1)
    banned = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, float("-inf")]]), -1)
    entropy, top = gate_features(banned)
    want = -(banned[0, :3].exp() * banned[0, :3]).sum()
    assert np.isfinite(entropy).all() and entropy[0] == pytest.approx(float(want), abs=1e-6)
    assert top[0] == pytest.approx(float(banned.max()))
    assert gate_features(lp)[0][0] == pytest.approx(float(-(lp.exp() * lp).sum()), abs=1e-6)


@pytest.mark.parametrize("settings", [dict(k=8, temperature=1.0, lmbda=0.5), dict(lmbda="auto")])
def test_searching_ahead_from_the_key_hook_changes_nothing_but_when(tmp_path, llama_lm, settings):
    """start(): each step's search begins at the last block's FFN input, before the LM head has run;
    the tokens and every probability are those of searching after the forward."""
    from knnlm_vdb.adaptive import fit_calibration
    from knnlm_vdb.evaluate import evaluate

    enc = Encoder(llama_lm, ctx=128, stride=64)
    store = _store(tmp_path, enc, "mem", MEMORISED + TINY_TEXT)
    valid = evaluate(enc, [enc.tokenize(MEMORISED), enc.tokenize(TINY_TEXT[::-1])], [store], k=8,
                     keep_neighbours=True, show_progress=False)
    store.set_extra("calibration", fit_calibration(valid.neighbours, 8, 1.0)[0].to_dict())
    lm = KnnLM(enc, [store], **settings)
    ids = torch.tensor([enc.tokenize(MEMORISED[:30])])
    runs = []
    for ahead in (False, True):
        proc = lm.logits_processor()
        if ahead:
            proc.start()
        with torch.inference_mode():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    logits_processor=[proc], pad_token_id=0, output_scores=True,
                                    return_dict_in_generate=True)
        proc.close()
        assert enc.tap.listener is None
        runs.append((out.sequences[0].tolist(), torch.stack(out.scores).numpy(), proc.searched_ahead))
    (tokens, scores, none), (tokens_ahead, scores_ahead, used) = runs
    assert tokens == tokens_ahead and none == 0 and used == 5  # every step after the prompt's
    np.testing.assert_allclose(scores_ahead, scores, rtol=0, atol=1e-9)
