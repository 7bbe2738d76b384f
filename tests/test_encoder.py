"""Windows, key capture and key/target alignment on tiny random models."""
import numpy as np
import pytest
import torch

from conftest import TINY_TEXT
from knnlm_vdb.encoder import Encoder, sliding_windows
from knnlm_vdb.errors import KnnlmError


@pytest.mark.parametrize("n,ctx,stride", [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 5), (100, 16, 16), (37, 10, 1)])
def test_each_target_scored_once_with_enough_context(n, ctx, stride):
    windows = sliding_windows(n, ctx, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert w.end - w.begin <= ctx
        assert w.begin <= w.score_from - 1
        for p in range(w.score_from, w.end):
            assert p - w.begin >= min(p, ctx - stride)  # context tokens before target p


@pytest.mark.parametrize("ctx,stride", [(1, 1), (8, 0), (8, 9)])
def test_bad_window_settings(ctx, stride):
    with pytest.raises(KnnlmError):
        sliding_windows(10, ctx, stride)


NORM_AFTER_ATTENTION = {"llama": "post_attention_layernorm", "gpt2": "ln_2", "neox": "post_attention_layernorm"}


def test_ffn_input_key_is_the_normed_input_of_the_last_ffn(any_lm):
    """Independent check: the output of the last block's post-attention norm."""
    arch = any_lm.name.split("-")[1]
    layers = [m for m in any_lm.model.modules() if isinstance(m, torch.nn.ModuleList)][-1]
    norm = getattr(layers[-1], NORM_AFTER_ATTENTION[arch])
    seen = {}
    handle = norm.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    enc = Encoder(any_lm, ctx=64, stride=64)
    ids = enc.tokenize(TINY_TEXT)[:40]
    try:
        (block,) = list(enc.encode(ids))
    finally:
        handle.remove()
    expected = seen["x"][0, :-1].detach().numpy()  # states at positions 0..38 predict targets 1..39
    np.testing.assert_allclose(block.keys, expected, rtol=1e-5, atol=1e-5)
    assert block.positions.tolist() == list(range(1, 40))
    assert block.targets.tolist() == ids[1:40]


def test_lm_logprobs_and_final_hidden_match_the_full_model(any_lm):
    enc = Encoder(any_lm, key_type="final_hidden", ctx=64, stride=64)
    ids = enc.tokenize(TINY_TEXT)[:50]
    (block,) = list(enc.encode(ids))
    with torch.no_grad():
        out = any_lm.model(torch.tensor([ids]), output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
    expected = logp[torch.arange(49), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(block.lm_logprobs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(block.keys, out.hidden_states[-1][0, :-1].numpy(), rtol=1e-5, atol=1e-5)


def test_windowed_and_batched_encoding_agree_with_one_window(llama_lm):
    ids = Encoder(llama_lm, ctx=256, stride=128).tokenize(TINY_TEXT)[:200]
    one = list(Encoder(llama_lm, ctx=256, stride=256).encode(ids))
    many = list(Encoder(llama_lm, ctx=32, stride=32, batch_size=3).encode(ids))
    assert np.concatenate([b.positions for b in many]).tolist() == one[0].positions.tolist()
    # stride == ctx restarts the context, so only the first window's rows match exactly
    np.testing.assert_allclose(many[0].keys[:31], one[0].keys[:31], rtol=1e-4, atol=1e-5)


def test_unknown_key_type_refused(llama_lm):
    with pytest.raises(KnnlmError, match="key-type"):
        Encoder(llama_lm, key_type="attention")


def test_ctx_longer_than_model_refused(llama_lm):
    with pytest.raises(KnnlmError, match="context length"):
        Encoder(llama_lm, ctx=100_000, stride=10)
