"""kNN-LM quality on pydocs: base LM vs kNN-LM with an exact and an IVFPQ FAISS datastore.

    python benchmarks/quality.py [--max-tokens 408000] [--corpus pydocs]

Builds (or reuses, from benchmarks/cache/) a datastore from the corpus's train split,
picks k, T and λ on valid.txt, and reports test.txt perplexity and tokens/s.
Writes benchmarks/results/quality.{json,md}.
"""
from __future__ import annotations

import argparse
import time

from common import CACHE, corpus_file, markdown_table, setup_logging, write_results

from knnlm_vdb.corpus import read_documents
from knnlm_vdb.datastore import StoreInfo
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.evaluate import evaluate, tune_datastore
from knnlm_vdb.ingest import ingest
from knnlm_vdb.lm import load_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="pydocs")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=408_000, help="datastore size cap (0 = whole train split)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--key-type", default="ffn_input")
    ap.add_argument("--max-k", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=0, help="cap on valid/test tokens (0 = all)")
    args = ap.parse_args()
    setup_logging()

    lm = load_lm(args.model)
    enc = Encoder(lm, key_type=args.key_type, ctx=args.ctx, stride=args.stride, batch_size=2)
    tag = f"{args.corpus}-{args.max_tokens or 'all'}-{args.key_type}-c{args.ctx}s{args.stride}"
    flat_dir, ivf_dir = CACHE / f"{tag}-flat", CACHE / f"{tag}-ivfpq"
    build = {}
    if not (flat_dir / "meta.json").exists():
        store = FaissDatastore.create(flat_dir.with_suffix(".partial"), StoreInfo.for_encoder(enc), key_dtype="float32")
        t = time.perf_counter()
        report = ingest(enc, store, read_documents(corpus_file(args.corpus, "train")), max_tokens=args.max_tokens or None)
        build = {**report.to_dict(), "build_wall_seconds": time.perf_counter() - t}
        store.set_extra("build_report", build)
        flat_dir.with_suffix(".partial").rename(flat_dir)
    flat = FaissDatastore(flat_dir)
    build = flat.info.extra.get("build_report", build)
    if not (ivf_dir / "meta.json").exists():
        t = time.perf_counter()
        flat.copy_to(ivf_dir.with_suffix(".partial"), index="ivfpq", key_dtype="float16")
        ivf_dir.with_suffix(".partial").rename(ivf_dir)
        build["ivfpq_train_seconds"] = time.perf_counter() - t
    ivfpq = FaissDatastore(ivf_dir)

    def tokens(split):
        ids = enc.tokenize(corpus_file(args.corpus, split).read_text())
        return ids[: args.eval_tokens + 1] if args.eval_tokens else ids

    valid_ids, test_ids = tokens("valid"), tokens("test")
    t = time.perf_counter()
    grid = tune_datastore(enc, flat, [valid_ids], max_k=args.max_k, adaptive=False, save=False)
    best = grid["best"]
    tune_seconds = time.perf_counter() - t
    k, T, lam = best["k"], best["temperature"], best["lambda"]

    rows = []
    base_row = None
    for name, store in (("exact (IndexFlatL2)", flat), ("IVFPQ", ivfpq)):
        res = evaluate(enc, test_ids, [store], k=k, temperature=T, lmbda=lam).to_dict()
        if base_row is None:
            base_row = {"system": "base LM", "tokens": res["tokens"], "ppl": res["base_ppl"],
                        "tokens_per_s": res["base_tokens_per_s"]}
            rows.append(base_row)
        rows.append({"system": f"kNN-LM, {name}", "tokens": res["tokens"], "ppl": res["knnlm_ppl"],
                     "tokens_per_s": res["knnlm_tokens_per_s"], "base_tokens_per_s_same_run": res["base_tokens_per_s"],
                     "retrieval_seconds": res["retrieval_seconds"], "raw": res})
    for r in rows:
        r["delta_pct"] = 100 * (r["ppl"] / base_row["ppl"] - 1)
        if "base_tokens_per_s_same_run" in r:
            r["speed_vs_base"] = r["tokens_per_s"] / r["base_tokens_per_s_same_run"]
    title = (f"**{args.corpus} test**, model {args.model}, datastore {flat.count():,} entries "
             f"({args.key_type}, ctx {args.ctx} / stride {args.stride}); tuned on valid: k={k}, T={T}, λ={lam} "
             f"(valid ppl {grid['base_ppl']:.3f} → {best['ppl']:.3f})\n\n")
    table = title + markdown_table(rows, [("system", "system", ""), ("tokens", "tokens", ","), ("ppl", "perplexity", ".3f"),
                                          ("delta_pct", "Δ vs base %", "+.1f"), ("tokens_per_s", "tokens/s", ".0f"),
                                          ("speed_vs_base", "× base tokens/s (same run)", ".2f")])
    write_results(f"quality-{args.corpus}-{args.max_tokens or 'all'}", {
        "args": vars(args), "datastore_entries": flat.count(), "build": build, "tune_seconds": tune_seconds,
        "valid": {"base_ppl": grid["base_ppl"], "best": best, "tokens": grid["tokens"]}, "test": rows,
        "grid": grid["grid"]}, table)


if __name__ == "__main__":
    main()
