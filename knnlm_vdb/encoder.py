"""Turn token streams into (key, target) pairs and LM log-probabilities in one forward pass.

The same pass serves building (keys are stored) and evaluation (keys are queries), so
stored keys and queries cannot drift apart.

Key types:
  ``ffn_input``    input of the last layer's feed-forward block, after its norm
                   (the paper's best key), captured by a pre-hook on that block;
  ``final_hidden`` the final hidden state, i.e. the LM head's input.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.lm import LoadedLM
from knnlm_vdb.settings import KEY_TYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go through the LM; targets ``score_from .. end-1`` are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """Windows that score every token after the first exactly once.

    The first window scores all its targets; each later one scores only its last
    ``stride`` targets (at most ctx-1), so each of those sees at least ``ctx - stride`` tokens of context.
    """
    if ctx < 2:
        raise KnnlmError(f"--ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise KnnlmError(f"--stride must be between 1 and --ctx ({ctx}), got {stride}")
    windows = []
    step = min(stride, ctx - 1)  # a window's first target needs the token before it inside the window
    scored_until = 1  # position 0 has no context, so it is never a target
    end = min(ctx, n_tokens)
    while scored_until < n_tokens:
        begin = max(0, end - ctx)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        end = min(end + step, n_tokens)
    return windows


@dataclass
class EncodedBlock:
    """Rows for consecutive targets of one document.

    ``keys[i]`` is the LM's state at ``positions[i] - 1``; ``targets[i]`` is the token at
    ``positions[i]``; ``lm_logprobs[i]`` is log p_LM(target) when requested.
    """

    positions: np.ndarray  # int64 [n]
    keys: np.ndarray  # float32 [n, dim]
    targets: np.ndarray  # int32 [n]
    lm_logprobs: np.ndarray | None = None  # float32 [n]
    lm_entropy: np.ndarray | None = None  # float32 [n], entropy of p_LM (nats): a cheap "is the LM sure?" signal
    lm_max_logprob: np.ndarray | None = None  # float32 [n], log of p_LM's largest probability

    def __len__(self) -> int:
        return len(self.positions)


def _decoder_layers(model):
    """The model's list of Transformer blocks (Llama, GPT-2, GPT-NeoX, Mistral, ... alike), or None."""
    import torch

    candidates = [
        m for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) and hasattr(m[-1], "mlp")
    ]
    return candidates[-1] if candidates else None


class KeyTap:
    """Hooks on an unmodified Hugging Face model that keep the states of its latest forward pass.

    Installed once per model (see ``tap_for``) and left in place, so any forward — ours over
    sliding windows, or one step of ``model.generate`` with its KV cache — leaves behind the
    keys of exactly the positions it computed. ``ffn_input`` is the last block's feed-forward
    input (a pre-hook on its ``mlp``), ``hidden`` the backbone's output (the LM head's input).
    """

    def __init__(self, model):
        self.ffn_input = None
        self.hidden = None
        self.listener = None  # called as listener(key_type, states) the moment a key is computed
        layers = _decoder_layers(model)
        self.has_ffn = layers is not None
        self._handles = [model.base_model.register_forward_hook(self._on_backbone)]
        if layers is not None:
            self._handles.append(layers[-1].mlp.register_forward_pre_hook(self._on_ffn))

    def _on_ffn(self, module, args):
        self.ffn_input = args[0]
        if self.listener is not None:
            self.listener("ffn_input", self.ffn_input)

    def _on_backbone(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if self.listener is not None:
            self.listener("final_hidden", self.hidden)

    def keys(self, key_type: str):
        return self.ffn_input if key_type == "ffn_input" else self.hidden

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def tap_for(lm: LoadedLM) -> KeyTap:
    """The model's one ``KeyTap`` (installed on first use)."""
    if lm.tap is None:
        lm.tap = KeyTap(lm.model)
    return lm.tap


@dataclass
class Rows:
    """What the LM says at chosen positions: keys, and (when asked) log p_LM of the targets,
    the whole distribution, and the gate features (entropy, top log-probability)."""

    keys: np.ndarray  # float32 [n, dim]
    target_logprobs: np.ndarray | None  # float32 [n]
    entropy: np.ndarray  # float32 [n]
    max_logprob: np.ndarray  # float32 [n]
    logprobs: object = None  # torch float32 [n, V], only with full=True


HEAD_ROWS = 512  # LM-head rows per matmul: bounds the [rows, vocab] logits temporary


class Encoder:
    """Runs the LM over sliding windows; keys come from the model's ``KeyTap``."""

    def __init__(self, lm: LoadedLM, key_type: str = "ffn_input", ctx: int = 1024, stride: int = 512,
                 batch_size: int = 2):
        if key_type not in KEY_TYPES:
            raise KnnlmError(f"unknown --key-type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
        max_positions = getattr(lm.model.config, "max_position_embeddings", None)
        if max_positions and ctx > max_positions:
            raise KnnlmError(f"--ctx {ctx} exceeds the model's context length {max_positions}")
        sliding_windows(ctx, ctx, stride)  # validates ctx and stride
        if batch_size < 1:
            raise KnnlmError(f"--batch-size must be positive, got {batch_size}")
        self.lm, self.key_type, self.ctx, self.stride, self.batch_size = lm, key_type, ctx, stride, batch_size
        self.backbone = lm.model.base_model
        self.head = lm.model.get_output_embeddings()
        self.tap = tap_for(lm)
        if key_type == "ffn_input" and not self.tap.has_ffn:
            raise KnnlmError(f"cannot find Transformer blocks with an .mlp in {type(lm.model).__name__}; "
                             "use --key-type final_hidden")

    @property
    def dim(self) -> int:
        return self.lm.hidden_size

    def tokenize(self, text: str) -> list[int]:
        tok = self.lm.tokenizer
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        return list(ids)

    def forward(self, batch_ids, attention_mask=None):
        """Keys ``[B, L, d]`` and the final hidden states ``[B, L, d]`` (the LM head's input)."""
        self.backbone(input_ids=batch_ids, attention_mask=attention_mask, use_cache=False)
        return self.captured()

    def captured(self):
        """(keys, hidden) of the model's latest forward pass, whoever ran it."""
        return self.tap.keys(self.key_type), self.tap.hidden

    def rows(self, keys, hidden, rows_t, cols_t, targets=None, features: bool = True, full: bool = False) -> Rows:
        """The one place states become kNN-LM inputs: keys, log p_LM of ``targets`` and the gate
        features at positions ``(rows_t[i], cols_t[i])`` of a forward pass. Build, score,
        next-token and generation all come through here, so stored keys and queries agree."""
        import torch

        rows_t, cols_t = rows_t.to(keys.device), cols_t.to(keys.device)
        n = len(rows_t)
        q_keys = keys[rows_t, cols_t].float().cpu().numpy()
        q_hidden = hidden[rows_t, cols_t]
        target_lp = np.empty(n, np.float32) if targets is not None else None
        entropy, max_lp = np.empty(n, np.float32), np.empty(n, np.float32)
        full_lp = []
        with torch.no_grad():  # callers may hold states from a forward outside inference mode
            for s in range(0, n if (targets is not None or features or full) else 0, HEAD_ROWS):
                lp = torch.log_softmax(self.head(q_hidden[s:s + HEAD_ROWS]).float(), dim=-1)
                e = s + len(lp)
                if targets is not None:
                    t = torch.as_tensor(targets[s:e], dtype=torch.long, device=lp.device)
                    target_lp[s:e] = lp.gather(1, t[:, None])[:, 0].cpu().numpy()
                if features:
                    entropy[s:e] = (-(lp.exp() * lp).sum(-1)).cpu().numpy()
                    max_lp[s:e] = lp.max(-1).values.cpu().numpy()
                if full:
                    full_lp.append(lp)
        return Rows(q_keys, target_lp, entropy, max_lp, torch.cat(full_lp) if full else None)

    def encode(self, token_ids: list[int], with_logprobs: bool = True, progress=None,
               target_range: tuple[int, int] | None = None) -> Iterator[EncodedBlock]:
        """Yield one block per batch of windows, in document order.

        ``target_range=(lo, hi)`` encodes only targets ``lo <= p < hi`` (one chunk of a resumable
        append), with exactly the context a whole-document pass gives them.
        """
        import torch

        windows = sliding_windows(len(token_ids), self.ctx, self.stride)
        if target_range is not None:
            lo, hi = target_range
            # The LM is causal, so cutting a window's end leaves the earlier states unchanged.
            windows = [Window(w.begin, min(w.end, hi), max(w.score_from, lo))
                       for w in windows if w.end > lo and w.score_from < hi]
        ids = torch.tensor(token_ids, dtype=torch.long)
        device = self.lm.device
        i = 0
        while i < len(windows):
            # Windows of one length go in one batch; only a document shorter than ctx has another.
            batch = [windows[i]]
            while (i + len(batch) < len(windows) and len(batch) < self.batch_size
                   and windows[i + len(batch)].end - windows[i + len(batch)].begin == batch[0].end - batch[0].begin):
                batch.append(windows[i + len(batch)])
            i += len(batch)
            batch_ids = torch.stack([ids[w.begin:w.end] for w in batch]).to(device)
            with torch.inference_mode():
                keys, hidden = self.forward(batch_ids)
                rows_t = torch.cat([torch.full((w.end - w.score_from,), b, dtype=torch.long)
                                    for b, w in enumerate(batch)])
                cols_t = torch.cat([torch.arange(w.score_from - 1 - w.begin, w.end - 1 - w.begin) for w in batch])
                positions = torch.cat([torch.arange(w.score_from, w.end) for w in batch])
                targets = ids[positions]
                # The head runs only on scored positions: half the windows' tokens are context.
                r = self.rows(keys, hidden, rows_t, cols_t, targets if with_logprobs else None,
                              features=with_logprobs)
            if progress is not None:
                progress.update(len(positions))
            yield EncodedBlock(
                positions=positions.numpy().astype(np.int64),
                keys=r.keys,
                targets=targets.numpy().astype(np.int32),
                lm_logprobs=r.target_logprobs,
                lm_entropy=r.entropy if with_logprobs else None,
                lm_max_logprob=r.max_logprob if with_logprobs else None,
            )

    def next_token(self, token_ids: list[int]):
        """Query key and LM log-probabilities over the vocabulary for the token after ``token_ids``."""
        import torch

        ids = torch.tensor([token_ids[-self.ctx:]], dtype=torch.long, device=self.lm.device)
        with torch.inference_mode():
            keys, hidden = self.forward(ids)
            r = self.rows(keys, hidden, torch.tensor([0]), torch.tensor([ids.shape[1] - 1]), features=False, full=True)
        return r.keys[0], r.logprobs[0].cpu().numpy()
