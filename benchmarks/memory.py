"""What the in-document cache adds to a kNN-LM (issue 18's quality claim), in and across domains.

    python benchmarks/memory.py --pydocs cache/gen-pydocs-120000-flat --debref cache/gen-debref-all-flat

The datastores are the ones `make bench-generate` builds and tunes with the CLI (`knnlm-vdb
tune` fits each domain's calibration *and* the cache's). One LM pass per test text keeps each
position's key, target, log p_LM and gate features (cached under benchmarks/cache/memory-*);
then every (datastore, text) pair is scored with the library's own ``Mixer``, document by
document, exactly as ``eval`` does: the base LM, ``--lambda auto`` without the cache, with it,
and the cache alone (no datastore). In domain = the datastore's own corpus; foreign = the other.

Writes benchmarks/results/memory.{json,md}.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import CACHE, corpus_file, markdown_table, setup_logging, write_results
from tqdm.auto import tqdm

from knnlm_vdb.adaptive import Calibration
from knnlm_vdb.cli_common import read_token_sequences
from knnlm_vdb.datastore import open_store
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.knn import perplexity
from knnlm_vdb.lm import load_lm
from knnlm_vdb.mixing import Found, Mixer

CORPORA = ("pydocs", "debref")
BLOCK = 512  # positions searched at a time (eval's stride)
FIELDS = ("keys", "targets", "lm_logprobs", "lm_entropy", "lm_max_logprob")


def lm_pass(encoder: Encoder, corpus: str, tokens: int) -> list[dict]:
    """Per test document: every scored position's key (fp16 on disk), target, log p_LM and gate features."""
    path = CACHE / f"memory-{corpus}-test-{tokens}-c{encoder.ctx}s{encoder.stride}.npz"
    if path.exists():
        z = np.load(path)
        bounds = z["bounds"]
        return [{f: z[f][a:b].astype(np.float32) if f == "keys" else z[f][a:b] for f in FIELDS}
                for a, b in zip(bounds[:-1], bounds[1:])]
    docs = read_token_sequences(encoder, [str(corpus_file(corpus, "test"))], tokens)
    out = []
    bar = tqdm(total=sum(len(d) - 1 for d in docs), unit="tok", desc=f"LM pass {corpus}")
    for ids in docs:
        blocks = list(encoder.encode(ids, with_logprobs=True, progress=bar))
        out.append({f: np.concatenate([getattr(b, f) for b in blocks]) for f in FIELDS})
    bar.close()
    bounds = np.cumsum([0] + [len(d["targets"]) for d in out])
    arrays = {f: np.concatenate([d[f] for d in out]) for f in FIELDS}
    arrays["keys"] = arrays["keys"].astype(np.float16)
    np.savez(path, bounds=bounds, **arrays)
    return out


def score(docs: list[dict], mixer: Mixer, found_of) -> np.ndarray:
    """log p of every target under ``mixer``, reading each document in order (trust and cache per document)."""
    parts = []
    for i, d in enumerate(docs):
        trust = mixer.new_document()
        parts.append(mixer.score(trust, d["targets"], d["lm_logprobs"], d["lm_entropy"], d["lm_max_logprob"],
                                 found_of(i, mixer))[0])
    return np.concatenate(parts)


def run_pair(store, docs: list[dict]) -> dict:
    extra = store.info.extra
    cal = Calibration.from_dict(extra["calibration"])
    cache_cal = Calibration.from_dict(extra["cache_calibration"])
    with_cache = Mixer([store], calibrations=[cal], cache=cache_cal)
    alone = Mixer([], calibrations=[], cache=cache_cal)
    t0 = time.perf_counter()
    found = []  # per document: [store part, cache part], searched once and shared by the three plans
    for d in docs:
        cache, runs = with_cache.new_cache(), []
        for a in range(0, len(d["targets"]), BLOCK):  # in blocks, as eval reads a document
            b = slice(a, a + BLOCK)
            masks = with_cache.search_masks(d["lm_entropy"][b], d["lm_max_logprob"][b])
            runs.append(with_cache.retrieve(d["keys"][b], masks, cache, d["targets"][b]))
        found.append([Found(*(np.concatenate([getattr(r[p], f) for r in runs]) for f in ("searched", "distances",
                                                                                          "values")))
                      for p in range(2)])
    seconds = time.perf_counter() - t0
    without = Mixer([store], calibrations=[cal])
    lm = np.concatenate([d["lm_logprobs"] for d in docs]).astype(np.float64)
    row = {
        "tokens": int(len(lm)), "documents": len(docs),
        "base_ppl": perplexity(lm),
        "auto_ppl": perplexity(score(docs, without, lambda i, m: found[i][:1])),
        "auto_cache_ppl": perplexity(score(docs, with_cache, lambda i, m: found[i])),
        "cache_only_ppl": perplexity(score(docs, alone, lambda i, m: found[i][1:])),
        "k": cal.k, "temperature": cal.temperature, "cache_k": cache_cal.k, "cache_temperature": cache_cal.temperature,
        "search_seconds": seconds,
    }
    row["cache_gain_pct"] = 100 * (1 - row["auto_cache_ppl"] / row["auto_ppl"])
    row["vs_base_pct"] = 100 * (row["auto_cache_ppl"] / row["base_ppl"] - 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pydocs", required=True, help="tuned FAISS datastore of pydocs train")
    ap.add_argument("--debref", required=True, help="tuned FAISS datastore of debref train")
    ap.add_argument("--tokens", type=int, default=20000, help="test tokens scored per corpus")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default="memory")
    ap.add_argument("--lm-only", action="store_true", help="only the LM passes (cached), no datastore needed")
    args = ap.parse_args()
    setup_logging()
    if args.lm_only:
        enc = Encoder(load_lm(args.model))
        for text in CORPORA:
            lm_pass(enc, text, args.tokens)
        return
    stores = {"pydocs": open_store("faiss", args.pydocs), "debref": open_store("faiss", args.debref)}
    for name, s in stores.items():
        if "cache_calibration" not in s.info.extra:
            raise SystemExit(f"{name}: no cache calibration; run `knnlm-vdb tune` on it with this version")
    enc = Encoder(load_lm(args.model))  # the context the datastores were built with (the CLI's defaults)
    rows = []
    for text in CORPORA:
        docs = lm_pass(enc, text, args.tokens)
        for ds in CORPORA:
            row = {"datastore": ds, "text": text, "where": "in domain" if ds == text else "foreign",
                   **run_pair(stores[ds], docs)}
            rows.append(row)
            print(row)
    table = markdown_table(rows, [
        ("datastore", "datastore", ""), ("text", "test text", ""), ("where", "", ""), ("tokens", "tokens", ","),
        ("base_ppl", "base LM", ".3f"), ("auto_ppl", "auto", ".3f"), ("auto_cache_ppl", "auto + cache", ".3f"),
        ("cache_gain_pct", "cache gain %", ".2f"), ("vs_base_pct", "auto + cache vs base %", "+.2f"),
        ("cache_only_ppl", "LM + cache only", ".3f")])
    write_results(args.name, {"model": args.model, "tokens_per_text": args.tokens, "rows": rows,
                              "datastores": {k: {"path": str(getattr(v, "path", "")), "entries": v.count()}
                                             for k, v in stores.items()}}, table)


if __name__ == "__main__":
    main()
