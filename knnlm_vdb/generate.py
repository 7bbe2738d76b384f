"""kNN-LM decoding inside ``transformers.generate``: greedy, sampling and beam search as they are.

The model is not modified. ``encoder.KeyTap`` keeps the key of every position the model just
computed, so each decoding step — one forward of the new token over the KV cache — leaves its
query behind; ``KnnLogitsProcessor`` searches it (one batched search for all sequences),
mixes p_kNN into the step's distribution with the same ``mixing.Mixer`` that ``eval`` uses,
and hands ``log p_kNN-LM`` on to the usual warpers (temperature, top-k, top-p) and the
sampler. Processors that ``generate`` builds from the generation config run before it and
warpers after it, so sampling knobs shape the mixture, not the LM alone.

Adaptive λ: on the first call (the prompt's forward) every prompt position is scored like a
document in ``eval``, so each domain's ``DocumentTrust`` starts from the prompt's evidence.
After that the trust is frozen: a generated token is the model's own choice, and learning from
its likelihood would let the model confirm itself (a domain that proposed a token would be
trusted more for having proposed it). Generated steps use the pre-search gate (skipped
searches are skipped here too), the per-token gate and the prompt's trust. The in-document
cache holds the prompt's positions only, for the same reason: a cache of generated tokens would
make the model repeat itself with growing confidence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from knnlm_vdb.encoder import Encoder
from knnlm_vdb.mixing import Found, Mixer

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One generated token of one sequence: its probabilities under the mixture, the LM and p_kNN."""

    token_id: int
    prob: float
    base_prob: float
    knn_prob: float
    lmbda: float
    searched: bool
    neighbours: list = field(default_factory=list)


def _processor_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


def gate_features(logprobs):
    """(entropy, top log-probability) of each row, as numpy. A token another processor ruled out
    (-inf, e.g. EOS under ``min_new_tokens``) adds nothing to the entropy: 0 · log 0 = 0, not NaN —
    a NaN here would make the pre-search gate skip every search."""
    import torch

    terms = torch.where(torch.isfinite(logprobs), logprobs.exp() * logprobs, torch.zeros_like(logprobs))
    return (-terms.sum(-1)).cpu().numpy(), logprobs.max(-1).values.cpu().numpy()


class KnnLogitsProcessor(_processor_base()):
    """A ``transformers`` logits processor that turns any causal LM's ``generate`` into kNN-LM decoding.

    One instance per ``generate`` call (it keeps the step count and each sequence's trust).
    ``prompt_lengths[b]`` is the number of real (not left-padding) tokens of row b; left out,
    every position of the first call's input counts as prompt. ``neighbours`` > 0 records that
    many nearest neighbours per generated token (see ``provenance``).
    """

    def __init__(self, encoder: Encoder, mixer: Mixer, prompt_lengths: list[int] | None = None,
                 neighbours: int = 0, provenance=None):
        self.encoder, self.mixer = encoder, mixer
        self.prompt_lengths = prompt_lengths
        self.neighbours, self.provenance = neighbours, provenance
        self.calls = 0
        self.scales = None  # [rows][parts] trust multiples, from the prompt (adaptive only)
        self.caches = None  # [rows] each row's in-document cache: its prompt's positions (with a cache calibration)
        self.searches = self.skipped = self.searched_ahead = 0
        self._last = None  # the latest step's distributions, until its tokens are known
        self._pool = None
        self._ahead = None  # (queries, future of each group's (distances, values)): a search already started

    def start(self) -> None:
        """Search each decoding step's queries the moment the model computes them. The key is ready
        at the last block's feed-forward input (``ffn_input``), so the search — another process for
        Milvus — runs while the model finishes that block, the final norm and the LM head (a fifth
        of a small model's step). ``close()`` stops it; ``KnnLM.generate`` does both."""
        from concurrent.futures import ThreadPoolExecutor

        if self.mixer.groups and not self.passthrough:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-search-ahead")
            self.encoder.tap.listener = self._search_ahead

    def close(self) -> None:
        if self.encoder.tap.listener == self._search_ahead:
            self.encoder.tap.listener = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _search_ahead(self, key_type: str, states) -> None:
        if key_type != self.encoder.key_type or self.calls == 0 or states.shape[1] != 1 or self._pool is None:
            return  # the prompt's forward (read first, as a document) or another model's state
        queries = states[:, -1].detach().float().cpu().numpy().copy()
        groups = range(len(self.mixer.groups))
        self._ahead = (queries, self._pool.submit(lambda: [self.mixer.search(g, queries) for g in groups]))

    def _retrieve(self, queries, masks) -> list[Found]:
        """Each part's neighbours of this step's queries: from the search started ahead when it was
        for these queries (kept where the masks say to search), else searched now."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0].shape != queries.shape or not np.array_equal(ahead[0], queries):
            return self.mixer.retrieve(queries, masks, self.caches)
        self.searched_ahead += 1
        return self.mixer.retrieve(queries, masks, self.caches, searched=ahead[1].result())

    @property
    def passthrough(self) -> bool:
        """Fixed λ = 0 and nothing to record: the base model's scores, bit for bit."""
        return not self.mixer.groups or (not self.mixer.adaptive and self.mixer.lmbda == 0.0)

    def __call__(self, input_ids, scores):
        import torch

        self.calls += 1
        if self.passthrough:
            self._last = ("base", torch.log_softmax(scores.float(), -1).cpu().numpy(), None)
            return scores
        keys, hidden = self.encoder.captured()
        if keys is None or keys.shape[0] != scores.shape[0]:
            raise RuntimeError("the model's forward did not go through the KeyTap; build the processor with "
                               "KnnLM.logits_processor() for the model that generates")
        lm = torch.log_softmax(scores.float(), dim=-1)
        if self.calls == 1 and self.mixer.adaptive and self.scales is None:
            self.scales = self.read_prompt(input_ids, keys, hidden)
        entropy, max_lp = gate_features(lm)
        queries = keys[:, -1].float().cpu().numpy()
        masks = self.mixer.search_masks(entropy, max_lp)
        found = self._retrieve(queries, masks)
        searched = self.mixer.searched(found)
        self.searches += int(searched.sum())
        self.skipped += int((~searched).sum())
        scales = self.scales if self.scales is not None else \
            [[c.new_document().expected_scale() for c in self.mixer.calibrations]] * len(queries) \
            if self.mixer.adaptive else None
        mixed, lam, knn = self.mixer.distributions(scales, lm.cpu().numpy(), entropy, max_lp, found)
        self._last = ("knn", mixed, (lm.cpu().numpy(), knn, lam, searched, queries if self.neighbours else None))
        return torch.as_tensor(mixed, dtype=scores.dtype, device=scores.device)

    def read_prompt(self, input_ids, keys, hidden, start: int | None = None) -> list[list[float]]:
        """Score each row's prompt as a document; -> each row's trust multiple per search group.

        ``keys``/``hidden`` column c holds input position ``start + c``: by default the trailing
        positions (the first forward of ``generate``; only the uncached ones when it reuses a
        KV cache), or ``start=0`` for the states of a prefill whose cache ``generate`` reuses."""
        import torch

        n_rows, width = input_ids.shape
        start = width - keys.shape[1] if start is None else start
        lengths = self.prompt_lengths or [width] * n_rows
        scales, caches = [], []
        for b in range(n_rows):
            trust, cache = self.mixer.new_document(), self.mixer.new_cache()
            lo = max(width - lengths[b], start)  # state positions whose next token is in the prompt
            hi = min(width - 1, start + keys.shape[1])
            if hi > lo:
                targets = input_ids[b, lo + 1:hi + 1].cpu().numpy()
                r = self.encoder.rows(keys, hidden, torch.full((hi - lo,), b), torch.arange(lo, hi) - start, targets)
                found = self.mixer.retrieve(r.keys, self.mixer.search_masks(r.entropy, r.max_logprob), cache, targets)
                self.mixer.score(trust, targets, r.target_logprobs, r.entropy, r.max_logprob, found)
            scales.append([t.expected_scale() for t in trust])
            caches.append(cache)
        if self.mixer.cache is not None:
            self.caches = caches
        return scales

    def take(self, tokens) -> list[Step]:
        """The steps of the tokens just chosen (one per row), from the latest call's distributions."""
        kind, mixed, extra = self._last
        tokens = np.asarray(tokens).reshape(-1)
        rows = np.arange(len(tokens))
        if kind == "base":
            p = np.exp(mixed[rows, tokens])
            return [Step(int(t), float(q), float(q), 0.0, 0.0, False) for t, q in zip(tokens, p)]
        base, knn, lam, searched, queries = extra
        neigh = self.provenance(queries) if queries is not None and self.provenance else [[] for _ in rows]
        return [Step(int(t), float(np.exp(mixed[b, t])), float(np.exp(base[b, t])), float(np.exp(knn[b, t])),
                     float(lam[b]), bool(searched[b]), neigh[b]) for b, t in zip(rows, tokens)]


class StepStreamer:
    """A ``generate`` streamer that turns each chosen token into ``Step``s and hands them on.

    ``on_step(list[Step])`` is called once per decoding step, in the thread that generates;
    ``stop()`` (a flag that a ``StoppingCriteria`` reads) lets a consumer cancel the rest."""

    def __init__(self, processor: KnnLogitsProcessor, on_step):
        self.processor, self.on_step = processor, on_step
        self._prompt_seen = False
        self.steps: list[list[Step]] = []

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first puts the prompt itself
            self._prompt_seen = True
            return
        steps = self.processor.take(value.cpu().numpy())
        self.steps.append(steps)
        self.on_step(steps)

    def end(self) -> None:
        pass
