"""``KnnLM``: the Python API — one object that holds a model, its datastores and their settings.

    from knnlm_vdb import KnnLM
    lm = KnnLM.open(model="smollm2-135m", uri="knnlm.db", domains=["docs"])   # or datastore="ds/"
    lm.score(text)                                   # perplexities, per-token log-probs, λ per token
    lm.generate(prompt, max_new_tokens=64)           # text, token ids, per-token probabilities
    for piece in lm.stream(prompt): ...              # text as it is produced
    model.generate(..., logits_processor=[lm.logits_processor()])    # any HF generate call

k, ``temperature`` and ``lmbda`` (a number or ``"auto"``) are keyword arguments named like the
gRPC ``KnnSettings`` fields; what is not given resolves once, by ``knn_settings.resolve``:
``open``'s arguments → what ``tune`` stored → adaptive λ when calibrated → defaults. The CLI,
the service, the demo and the benchmarks all go through this class.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.knn import perplexity
from knnlm_vdb.knn_settings import resolve
from knnlm_vdb.mixing import Mixer
from knnlm_vdb.settings import DEFAULTS

log = logging.getLogger(__name__)

DEFAULT_NEIGHBOURS = 4  # neighbours reported per token when provenance is asked for with True


@dataclass
class ScoreResult:
    """Per-token scores of one text (``token_ids[1:]`` are scored)."""

    token_ids: list[int]
    tokens: list[str]
    base_logprobs: np.ndarray
    knn_logprobs: np.ndarray | None
    logprobs: np.ndarray
    lambdas: np.ndarray | None
    searched: np.ndarray | None
    settings: dict
    neighbours: list | None = None  # per scored token, with neighbours=True

    @property
    def base_ppl(self) -> float:
        return perplexity(self.base_logprobs)

    @property
    def knnlm_ppl(self) -> float:
        return perplexity(self.logprobs)

    def to_dict(self) -> dict:
        return {"token_ids": self.token_ids, "tokens": self.tokens, "base_ppl": self.base_ppl,
                "knnlm_ppl": self.knnlm_ppl, "base_logprobs": self.base_logprobs.tolist(),
                "knn_logprobs": None if self.knn_logprobs is None else self.knn_logprobs.tolist(),
                "logprobs": self.logprobs.tolist(),
                "lambdas": None if self.lambdas is None else self.lambdas.tolist(),
                "settings": self.settings, "neighbours": self.neighbours}


@dataclass
class Generation:
    """One prompt's continuation."""

    text: str
    token_ids: list[int]
    steps: list = field(default_factory=list)  # generate.Step per token (greedy and sampling)
    settings: dict = field(default_factory=dict)
    stopped_by: str | None = None  # the stop sequence that ended it, if any

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"text": self.text, "token_ids": self.token_ids, "steps": [asdict(s) for s in self.steps],
                "settings": self.settings, "stopped_by": self.stopped_by}


class KnnLM:
    """A causal LM, its datastores, and the settings that mix them (see the module doc)."""

    def __init__(self, encoder, stores, k=None, temperature=None, lmbda=None, skip_below=None, cache=None):
        self.encoder = encoder
        self.stores = list(stores)
        self._defaults = {"k": k, "temperature": temperature, "lmbda": lmbda, "skip_below": skip_below,
                          "cache": cache}
        self._lock = threading.Lock()  # one forward at a time: the KeyTap holds one pass's states
        if self.stores:
            self.settings()  # refuse bad or impossible settings now, not at the first call

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, model: str = DEFAULTS["model"], *, uri: str | None = None, domains=None, datastore=None,
             key_type: str = DEFAULTS["key_type"], ctx: int = DEFAULTS["ctx"], stride: int = DEFAULTS["stride"],
             batch_size: int = DEFAULTS["batch_size"], device: str = "auto", dtype: str = "auto",
             consistency: str = DEFAULTS["consistency"], token: str | None = None,
             k: int | None = None, temperature: float | None = None, lmbda=None,
             skip_below: float | None = None, cache: bool | None = None, mirror: bool = False) -> "KnnLM":
        """Load ``model`` and open its datastores: FAISS directories (``datastore``, one or a list) or
        Milvus domains (``domains`` at ``uri``; Milvus Lite file by default). No datastore: the base LM.
        ``mirror=True`` reads Lite domains through an in-process copy (datastore/milvus/mirror.py):
        one full read at the first search, then searches in milliseconds instead of ~1.3 µs per row."""
        from knnlm_vdb.encoder import Encoder
        from knnlm_vdb.lm import load_lm

        stores = open_datastores(uri=uri, domains=domains, datastore=datastore, consistency=consistency,
                                 token=token, mirror=mirror)
        try:
            encoder = Encoder(load_lm(model, device=device, dtype=dtype), key_type=key_type, ctx=ctx,
                              stride=stride, batch_size=batch_size)
            check_stores(stores, encoder)
            return cls(encoder, stores, k=k, temperature=temperature, lmbda=lmbda, skip_below=skip_below, cache=cache)
        except BaseException:
            for s in stores:
                s.close()
            raise

    @property
    def model(self):
        """The Hugging Face model (unmodified; a forward hook records its keys)."""
        return self.encoder.lm.model

    @property
    def tokenizer(self):
        return self.encoder.lm.tokenizer

    def close(self) -> None:
        for s in self.stores:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- settings ---------------------------------------------------------------------------------
    def settings(self, k=None, temperature=None, lmbda=None, skip_below=None, cache=None):
        """The resolved ``knn_settings.Fixed | Adaptive`` for these overrides of ``open``'s settings.
        ``cache``: mix in the in-document cache (None: wherever ``tune`` calibrated it, adaptive λ only)."""
        d = self._defaults
        overrides = k is not None or temperature is not None or lmbda is not None
        if overrides and lmbda != "auto":
            # a fixed override drops an adaptive default's knobs
            d = {**d, "skip_below": None, "cache": None if d["cache"] is None else False}
        return resolve(self.stores, k if k is not None else d["k"],
                       temperature if temperature is not None else d["temperature"],
                       lmbda if lmbda is not None else d["lmbda"],
                       skip_below if skip_below is not None else d["skip_below"],
                       cache if cache is not None else d["cache"])

    def mixer(self, settings=None, **knn) -> Mixer:
        """The search plan for ``settings`` (a resolved ``Fixed | Adaptive``), else for these overrides."""
        return Mixer.for_settings(self.stores, settings if settings is not None else self.settings(**knn))

    # ---- scoring ----------------------------------------------------------------------------------
    def evaluate(self, sequences, show_progress: bool = False, keep_neighbours: bool = False, **knn):
        """Perplexity of the base LM and the kNN-LM over token sequences (``evaluate.EvalResult``)."""
        from knnlm_vdb.evaluate import evaluate

        settings = self.settings(**knn) if self.stores else None
        with self._lock:
            return evaluate(self.encoder, sequences, self.stores, settings=settings, show_progress=show_progress,
                            keep_neighbours=keep_neighbours, **({} if settings else {"k": 1, "lmbda": 0.0}))

    def tune(self, sequences, max_k: int = 1024, adaptive: bool = True, save: bool = True,
             show_progress: bool = False) -> dict:
        """Fit k, T, λ (and the ``--lambda auto`` calibration) on validation token sequences for the one
        datastore, store them with it, and use them from now on (``evaluate.tune_datastore``)."""
        from knnlm_vdb.evaluate import tune_datastore

        if len(self.stores) != 1:
            raise InvalidInput(f"tune fits one datastore at a time, not {len(self.stores)}")
        with self._lock:
            return tune_datastore(self.encoder, self.stores[0], sequences, max_k=max_k, adaptive=adaptive,
                                  save=save, show_progress=show_progress)

    def score(self, text, neighbours: bool | int = False, **knn) -> ScoreResult:
        """Score ``text`` (a string or token ids) as one document."""
        from knnlm_vdb.evaluate import evaluate

        ids = self.encoder.tokenize(text) if isinstance(text, str) else list(text)
        if len(ids) < 2:
            raise InvalidInput(f"the text has {len(ids)} token(s); at least 2 are needed to score")
        settings = self.settings(**knn) if self.stores else None
        with self._lock:
            res = evaluate(self.encoder, [ids], self.stores, settings=settings, show_progress=False, keep_tokens=True,
                           **({} if settings else {"k": 1, "lmbda": 0.0}))
        t = res.per_token
        n = neighbour_count(neighbours)
        return ScoreResult(
            token_ids=ids, tokens=[self.tokenizer.decode([i]) for i in ids], base_logprobs=t["lm"],
            knn_logprobs=t.get("knn"), logprobs=t.get("mixed", t["lm"]), lambdas=t.get("lambdas"),
            searched=t.get("searched"), settings=settings.to_dict() if settings else {},
            neighbours=self.provenance(n)(t["keys"]) if n and self.stores else None)

    # ---- generation -------------------------------------------------------------------------------
    def logits_processor(self, prompt_lengths=None, neighbours: bool | int = False, settings=None, **knn):
        """A ``transformers`` logits processor for one ``model.generate`` call on ``self.model``."""
        from knnlm_vdb.generate import KnnLogitsProcessor

        n = neighbour_count(neighbours)
        mixer = self.mixer(settings, **knn) if self.stores else Mixer([], 1, 1.0, 0.0)
        return KnnLogitsProcessor(self.encoder, mixer, prompt_lengths=prompt_lengths, neighbours=n,
                                  provenance=self.provenance(n) if n else None)

    def generate(self, prompt, max_new_tokens: int = 64, do_sample: bool = False, temperature_lm: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, num_beams: int = 1, seed: int | None = None,
                 stop: list[str] | tuple = (), neighbours: bool | int = False, on_step=None, cancel=None,
                 settings=None, search_ahead: bool = False, **knn):
        """Continue ``prompt`` (a string or token ids; a list of them for a batch) with kNN-LM decoding.

        -> ``Generation`` (a list for a list of prompts). Greedy by default; ``do_sample`` with
        ``temperature_lm``/``top_k``/``top_p``; ``num_beams`` > 1 for beam search (no per-token steps).
        ``on_step(steps)`` is called after each token; ``cancel`` (a ``threading.Event``) stops early;
        ``settings`` (a resolved ``Fixed | Adaptive``) replaces the keyword overrides.
        ``search_ahead`` starts each step's search from the key hook (``KnnLogitsProcessor.start``): it
        pays where the search runs on other hardware than the model (a Milvus server, a GPU model); on a
        few shared CPU cores the two only compete, so it is off by default.
        The prompt keeps its last ``ctx`` tokens, the context the datastore's keys were built with."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from knnlm_vdb.generate import StepStreamer
        from knnlm_vdb.stopping import Cancelled, StopSequences

        batch = isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list, tuple))
        prompts = [self._prompt_ids(p) for p in (prompt if batch else [prompt])]
        check_sampling(max_new_tokens, temperature_lm, top_k, top_p, num_beams, do_sample)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            (self.tokenizer.eos_token_id or 0)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row's last token is its real last token
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        if self.stores and settings is None:
            settings = self.settings(**knn)
        proc = self.logits_processor(prompt_lengths=[n for n in lengths for _ in range(num_beams)],
                                     neighbours=neighbours, settings=settings)
        stops = StopSequences(self.tokenizer, list(stop), width)
        criteria = StoppingCriteriaList([stops] + ([Cancelled(cancel)] if cancel is not None else []))
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                  temperature=temperature_lm if do_sample else None, top_k=top_k if do_sample else None,
                                  top_p=top_p if do_sample else None, pad_token_id=pad,
                                  eos_token_id=self.tokenizer.eos_token_id)
        streamer = StepStreamer(proc, on_step or (lambda steps: None)) if num_beams == 1 else None
        device = self.encoder.lm.device
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            if search_ahead:
                proc.start()
            try:
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          generation_config=config, logits_processor=LogitsProcessorList([proc]),
                                          stopping_criteria=criteria, streamer=streamer)
            finally:
                proc.close()
        results = []
        for b in range(len(prompts)):
            new = out[b, width:].tolist()
            steps = [s[b] for s in streamer.steps] if streamer is not None else []
            new, steps, stopped = stops.trim(new, steps, self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if stopped is not None:
                text = text[:text.index(stopped)]
            results.append(Generation(text=text, token_ids=new, steps=steps,
                                      settings=settings.to_dict() if settings else {}, stopped_by=stopped))
        return results if batch else results[0]

    def stream(self, prompt, **kwargs):
        """Yield ``(text piece, generate.Step)`` as tokens are produced, for one prompt. Closing the
        iterator early cancels the generation."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list, tuple)):
            raise InvalidInput("stream takes one prompt; use generate for a batch")
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()

        def run():
            try:
                self.generate(prompt, on_step=lambda steps: events.put(steps[0]), cancel=cancel, **kwargs)
                events.put(done)
            except BaseException as exc:  # re-raised in the consumer's thread
                events.put(exc)

        worker = threading.Thread(target=run, name="knnlm-generate", daemon=True)
        worker.start()
        ids: list[int] = []
        shown = ""
        try:
            while True:
                item = events.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                ids.append(item.token_id)
                text = self.tokenizer.decode(ids)
                piece = "" if text.endswith("\ufffd") else text[len(shown):]  # wait for a whole character
                shown += piece
                yield piece, item
        finally:
            cancel.set()
            worker.join()

    def _prompt_ids(self, prompt) -> list[int]:
        ids = self.encoder.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise InvalidInput("the prompt is empty")
        return ids[-self.encoder.ctx:]

    # ---- provenance -------------------------------------------------------------------------------
    def provenance(self, n: int):
        """A function from query keys ``[q, d]`` to each query's ``n`` nearest entries over all stores:
        dicts of domain, document id, position, distance and the token that followed."""
        return provenance(self.stores, self.tokenizer, n)


def provenance(stores, tokenizer, n: int):
    """``KnnLM.provenance`` for any stores (the service reports a Score request's neighbours with it)."""

    def look(queries) -> list[list[dict]]:
        per_store = [s.entries(queries, n) for s in stores]
        out = []
        for q in range(len(queries)):
            hits = sorted((h for found in per_store for h in found[q]), key=lambda h: h["distance"])[:n]
            for h in hits:
                h["token"] = tokenizer.decode([h["target"]])
            out.append(hits)
        return out

    return look


def neighbour_count(neighbours: bool | int) -> int:
    if neighbours is True:
        return DEFAULT_NEIGHBOURS
    if neighbours is False or neighbours is None:
        return 0
    if int(neighbours) < 0 or int(neighbours) > 64:
        raise InvalidInput(f"neighbours must be between 0 and 64, got {neighbours}")
    return int(neighbours)


def check_sampling(max_new_tokens, temperature_lm, top_k, top_p, num_beams, do_sample) -> None:
    """Refuse decoding parameters ``generate`` would misread or silently ignore."""
    import math

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInput(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    if not (math.isfinite(temperature_lm) and temperature_lm > 0):
        raise InvalidInput(f"the sampling temperature must be positive, got {temperature_lm}")
    if top_k < 0:
        raise InvalidInput(f"top_k must be 0 (off) or positive, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise InvalidInput(f"num_beams must be positive, got {num_beams}")


def open_datastores(uri=None, domains=None, datastore=None, consistency=DEFAULTS["consistency"], token=None,
                    mirror=False):
    """FAISS directories (``datastore``) or Milvus domains at ``uri`` (``mirror``: see ``KnnLM.open``)."""
    from knnlm_vdb.datastore import open_store

    dirs = [datastore] if isinstance(datastore, str) else list(datastore or [])
    names = [domains] if isinstance(domains, str) else list(domains or [])
    if dirs and (names or uri):
        raise InvalidInput("give FAISS datastore directories or Milvus domains (uri, domains), not both")
    stores = []
    try:
        for d in dirs:
            stores.append(open_store("faiss", d))
        for name in names:
            stores.append(open_store("milvus", uri or DEFAULTS["uri"], domain=name, token=token,
                                     consistency=consistency, **({"mirror": True} if mirror else {})))
    except BaseException:
        for s in stores:
            s.close()
        raise
    return stores


def check_stores(stores, encoder) -> None:
    """Every datastore must have been built by this model, key type and tokenizer."""
    from knnlm_vdb.datastore import StoreInfo

    mine = StoreInfo.for_encoder(encoder)
    for s in stores:
        s.info.check_compatible(mine, s.location)
