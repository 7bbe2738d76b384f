"""benchmarks/generate.py's teacher-forced pass: feeding the true continuation one cached token at
a time through the processor gives what scoring the whole text gives (tiny random model)."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def _forced(bench, lm, settings, prompt, truth):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = lm.model(ids[:, :-1], use_cache=True)
    keys, hidden = (t.clone() for t in lm.encoder.captured())
    proc = bench.prompted(lm, settings, ids, keys, hidden)
    return bench.teacher_forced(lm.model, proc, ids, torch.tensor([truth]), copy.deepcopy(out.past_key_values))


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
