"""benchmarks/generate.py: feeding the true continuation one cached token at a time through the
processor gives what scoring the whole text gives, a processor sharing another's prompt read decodes
the same, and shifted prompts are another set (tiny random model)."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TEXT
from test_generate import MEMORISED, _store
from knnlm_vdb.api import KnnLM
from knnlm_vdb.encoder import Encoder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # its own imports (common, milvus_vs_faiss) live there
    try:
        spec = importlib.util.spec_from_file_location("bench_generate", BENCH / "generate.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def _prefill(lm, ids):
    """The prompt's forward as generate.py runs it once per batch: (KV cache, keys, hidden)."""
    with torch.inference_mode():
        out = lm.model(ids[:, :-1], use_cache=True)
    keys, hidden = (t.clone() for t in lm.encoder.captured())
    return out.past_key_values, keys, hidden


def _forced(bench, lm, settings, prompt, truth):
    ids = torch.tensor([prompt])
    cache, keys, hidden = _prefill(lm, ids)
    proc = bench.prompted(lm, settings, ids, keys, hidden)
    return bench.teacher_forced(lm.model, proc, ids, torch.tensor([truth]), cache)


def test_teacher_forced_pass_equals_scoring_the_whole_text(bench, tmp_path, llama_lm):
    enc = Encoder(llama_lm, ctx=128, stride=64)
    lm = KnnLM(enc, [_store(tmp_path, enc, "mem", MEMORISED)], k=8, temperature=1.0, lmbda=0.5)
    ids = enc.tokenize(MEMORISED[:40])
    prompt, truth = ids[:25], ids[25:]
    hits, logps = _forced(bench, lm, lm.settings(lmbda=0.5), prompt, truth)
    scored = lm.score(ids, lmbda=0.5)
    np.testing.assert_allclose(logps[0], scored.logprobs[-len(truth):], atol=1e-4)
    assert hits[0].mean() > 0.9  # the memorised text, mixed in at λ=0.5, is predicted

    base_hits, base_logps = _forced(bench, lm, lm.settings(lmbda=0.0), prompt, truth)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1]
    want = torch.log_softmax(logits.float(), -1)
    np.testing.assert_allclose(base_logps[0], want[torch.arange(len(truth)), torch.tensor(truth)].numpy(), atol=1e-4)
    np.testing.assert_array_equal(base_hits[0], (want.argmax(-1) == torch.tensor(truth)).numpy())
    assert base_hits[0].mean() < hits[0].mean()


def test_a_processor_sharing_another_ones_prompt_read_decodes_the_same(bench, tmp_path, llama_lm):
    """generate.py reads each prompt once per system: the teacher-forced processor takes the trust
    and in-document caches of the free-running one, which decoding only searches."""
    enc = Encoder(llama_lm, ctx=128, stride=64)
    lm = KnnLM(enc, [_store(tmp_path, enc, "mem", MEMORISED * 2 + TINY_TEXT)])
    lm.tune([enc.tokenize(MEMORISED + TINY_TEXT[::-1]), enc.tokenize(TINY_TEXT)], max_k=16)
    settings = lm.settings()
    assert settings.adaptive and lm.settings(cache=True).adaptive  # calibrated, with the in-document cache
    ids = enc.tokenize(MEMORISED[:60])
    prompt, truth = torch.tensor([ids[:40]]), torch.tensor([ids[40:]])
    cache, keys, hidden = _prefill(lm, prompt)
    own = bench.prompted(lm, settings, prompt, keys, hidden)
    shared = bench.prompted(lm, settings, prompt, keys, hidden, read_by=own)
    assert own.caches is not None and shared.scales == own.scales and shared.caches is own.caches
    fresh = bench.prompted(lm, settings, prompt, keys, hidden)
    a, b, fresh = (bench.teacher_forced(lm.model, proc, prompt, truth, copy.deepcopy(cache))
                   for proc in (own, shared, fresh))
    for x, y in ((a, b), (a, fresh)):  # decoding left the shared read as it found it
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_allclose(x[1], y[1], atol=1e-6)


def test_shifted_prompts_are_another_set_with_disjoint_continuations(bench):
    ids = list(range(10_000))
    first = bench.prompts_of(ids, 20, 64, 8)
    second = bench.prompts_of(ids, 20, 64, 8, shift=0.5)
    assert first[0][0] == ids[:64] and first[-1][1] == ids[-8:]  # shift 0: the whole stream, ends included
    assert len(second) == 19  # one in each gap
    for prompt, truth in first + second:
        assert len(prompt) == 64 and len(truth) == 8 and truth[0] == prompt[-1] + 1
    assert not {t for _, truth in first for t in truth} & {t for _, truth in second for t in truth}
    assert max(t for _, truth in second for t in truth) < len(ids)
