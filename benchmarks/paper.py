"""The paper's claims on our corpora, and adaptive interpolation (--lambda auto).

    python benchmarks/paper.py            # after benchmarks/quality.py built the pydocs datastore

One LM pass per split (pydocs/debref valid and test) computes the LM's log-probabilities and
the top-1024 neighbours in *both* domains' datastores; everything else is re-scored offline
from that cache (benchmarks/cache/paper/), so the whole study costs four eval passes:

* domain adaptation: base LM vs + in-domain vs + other-domain vs + both datastores;
* fixed λ (tuned on valid) vs adaptive λ (`--lambda auto`), in and across domains, with the
  share of searches skipped;
* curves on pydocs test: perplexity against k, λ and datastore size.

Writes benchmarks/results/paper.{json,md} and paper_*.png.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import CACHE, RESULTS, corpus_file, markdown_table, setup_logging, write_results

from knnlm_vdb.adaptive import fit_calibration, mix_domains
from knnlm_vdb.corpus import read_documents
from knnlm_vdb.datastore import StoreInfo, merge_topk
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.evaluate import Neighbours, evaluate, tune
from knnlm_vdb.ingest import ingest
from knnlm_vdb.knn import interpolate, knn_target_logprobs, perplexity
from knnlm_vdb.lm import load_lm

K = 1024
DOMAINS = ("pydocs", "debref")


def build_store(enc, name: str, max_tokens: int | None, ctx: int, stride: int) -> FaissDatastore:
    path = CACHE / f"{name}-{max_tokens or 'all'}-ffn_input-c{ctx}s{stride}-flat"
    if not (path / "meta.json").exists():
        tmp = path.with_suffix(".partial")
        store = FaissDatastore.create(tmp, StoreInfo.for_encoder(enc), key_dtype="float32")
        report = ingest(enc, store, read_documents(corpus_file(name, "train")), max_tokens=max_tokens)
        store.set_extra("build_report", report.to_dict())
        tmp.rename(path)
    return FaissDatastore(path)


def split_pass(enc, stores: dict, corpus: str, split: str, tag: str, max_tokens: int) -> dict:
    """LM outputs, queries and both domains' neighbours for one split, cached as .npz."""
    path = CACHE / "paper" / f"{tag}-{corpus}-{split}.npz"
    if path.exists():
        return dict(np.load(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = enc.tokenize(corpus_file(corpus, split).read_text())
    if max_tokens:
        ids = ids[: max_tokens + 1]
    parts: dict[str, list] = {}
    t0 = time.perf_counter()
    for block in enc.encode(ids, with_logprobs=True):
        row = {"targets": block.targets, "lm_logprobs": block.lm_logprobs, "lm_entropy": block.lm_entropy,
               "lm_max_logprob": block.lm_max_logprob, "queries": block.keys.astype(np.float16)}
        for name, store in stores.items():
            row[f"dist_{name}"], row[f"vals_{name}"] = store.search(block.keys, K)
        for key, value in row.items():
            parts.setdefault(key, []).append(value)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["seconds"] = np.array(time.perf_counter() - t0)
    np.savez(path, **out)
    return out


def neighbours(data: dict, store: str) -> Neighbours:
    return Neighbours(data["targets"], data["lm_logprobs"], data[f"dist_{store}"], data[f"vals_{store}"],
                      data["lm_entropy"], data["lm_max_logprob"])


def both(data: dict) -> Neighbours:
    d, v = merge_topk([(data[f"dist_{s}"], data[f"vals_{s}"]) for s in DOMAINS], K)
    return Neighbours(data["targets"], data["lm_logprobs"], d, v, data["lm_entropy"], data["lm_max_logprob"])


def fixed_ppl(nb: Neighbours, best: dict) -> float:
    return perplexity(nb.knnlm_logprobs(best["k"], best["temperature"], best["lambda"]))


def auto_ppl(nb: Neighbours, cal) -> tuple[float, float]:
    searched = cal.search_mask(nb.lm_entropy, nb.lm_max_logprob)
    knn = knn_target_logprobs(nb.distances[:, :cal.k], nb.values[:, :cal.k], nb.targets, cal.temperature)
    lam = cal.lambdas(nb.distances[:, :cal.k], nb.lm_entropy, nb.lm_max_logprob, searched)
    return perplexity(interpolate(nb.lm_logprobs, knn, lam)), float(1 - searched.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pydocs-tokens", type=int, default=408_000)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--debref-tokens", type=int, default=0, help="debref datastore cap (0 = whole train split)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="cap on each valid/test split (0 = all)")
    ap.add_argument("--speed-tokens", type=int, default=16_000, help="tokens of pydocs test for the timed evals")
    args = ap.parse_args()
    setup_logging()
    t_start = time.perf_counter()
    enc = Encoder(load_lm(args.model), ctx=args.ctx, stride=args.stride, batch_size=2)
    stores = {"pydocs": build_store(enc, "pydocs", args.pydocs_tokens, args.ctx, args.stride),
              "debref": build_store(enc, "debref", args.debref_tokens or None, args.ctx, args.stride)}
    tag = f"p{args.pydocs_tokens}-d{args.debref_tokens}-e{args.eval_tokens}-c{args.ctx}s{args.stride}"
    data = {(c, s): split_pass(enc, stores, c, s, tag, args.eval_tokens) for c in DOMAINS for s in ("valid", "test")}

    # tuned settings: per (datastore, tuning corpus), and the calibration of each datastore on its own domain
    best, cal = {}, {}
    for store in DOMAINS:
        for corpus in DOMAINS:
            best[store, corpus] = tune(neighbours(data[corpus, "valid"], store))["best"]
        cal[store], _ = fit_calibration(neighbours(data[store, "valid"], store),
                                        best[store, store]["k"], best[store, store]["temperature"])
    for corpus in DOMAINS:
        best["both", corpus] = tune(both(data[corpus, "valid"]))["best"]

    # 1. domain adaptation and adaptive λ on the test splits
    rows = []
    for corpus in DOMAINS:
        test = data[corpus, "test"]
        base = perplexity(test["lm_logprobs"])
        other = [s for s in DOMAINS if s != corpus][0]
        rows.append({"test": corpus, "datastore": "none (base LM)", "fixed_ppl": base})
        for store in (corpus, other):
            nb = neighbours(test, store)
            ppl_auto, skipped = auto_ppl(nb, cal[store])
            rows.append({"test": corpus, "datastore": store + (" (in-domain)" if store == corpus else " (other domain)"),
                         "fixed_ppl": fixed_ppl(nb, best[store, store]),
                         "fixed_test_tuned_ppl": fixed_ppl(nb, best[store, corpus]),
                         "auto_ppl": ppl_auto, "auto_skipped": skipped})
        nbs = [neighbours(test, s) for s in DOMAINS]
        lm = test["lm_logprobs"]
        parts = []
        for s, nb in zip(DOMAINS, nbs):
            c = cal[s]
            searched = c.search_mask(nb.lm_entropy, nb.lm_max_logprob)
            knn = knn_target_logprobs(nb.distances[:, :c.k], nb.values[:, :c.k], nb.targets, c.temperature)
            parts.append((knn, c.lambdas(nb.distances[:, :c.k], nb.lm_entropy, nb.lm_max_logprob, searched)))
        rows.append({"test": corpus, "datastore": "both (merged top-k)",
                     "fixed_test_tuned_ppl": fixed_ppl(both(test), best["both", corpus]),
                     "auto_ppl": perplexity(mix_domains(lm, parts))})
        for r in rows:
            if r["test"] == corpus:
                for key in ("fixed_ppl", "fixed_test_tuned_ppl", "auto_ppl"):
                    if r.get(key) is not None:
                        r[key.replace("ppl", "delta")] = 100 * (r[key] / base - 1)

    # 2. curves on pydocs test with the pydocs datastore
    nb = neighbours(data["pydocs", "test"], "pydocs")
    b = best["pydocs", "pydocs"]
    curves = {"k": [{"k": k, "ppl": fixed_ppl(nb, {**b, "k": k})} for k in (8, 16, 32, 64, 128, 256, 512, 1024)],
              "lambda": [{"lambda": float(x), "ppl": fixed_ppl(nb, {**b, "lambda": float(x)})}
                         for x in np.round(np.arange(0.0, 0.61, 0.05), 2)],
              "temperature": [{"temperature": t, "ppl": fixed_ppl(nb, {**b, "temperature": t})}
                              for t in (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)]}
    curves["size"] = size_curve(stores["pydocs"], data["pydocs", "test"], b)

    # 3. timed evals: fixed λ vs --lambda auto with real skipped searches (pydocs test prefix)
    ids = enc.tokenize(corpus_file("pydocs", "test").read_text())[: args.speed_tokens + 1]
    fixed_run = evaluate(enc, ids, [stores["pydocs"]], k=b["k"], temperature=b["temperature"], lmbda=b["lambda"]).to_dict()
    auto_run = evaluate(enc, ids, [stores["pydocs"]], calibration=cal["pydocs"]).to_dict()
    speed = {"fixed": fixed_run, "auto": auto_run,
             "speedup": auto_run["knnlm_tokens_per_s"] / fixed_run["knnlm_tokens_per_s"]}

    table = markdown_table(rows, [("test", "test text", ""), ("datastore", "datastore", ""),
                                  ("fixed_ppl", "ppl, λ tuned on datastore's domain", ".3f"),
                                  ("fixed_delta", "Δ%", "+.1f"),
                                  ("fixed_test_tuned_ppl", "ppl, λ tuned on test domain's valid", ".3f"),
                                  ("fixed_test_tuned_delta", "Δ%", "+.1f"),
                                  ("auto_ppl", "ppl, --lambda auto", ".3f"), ("auto_delta", "Δ%", "+.1f"),
                                  ("auto_skipped", "searches skipped", ".0%")])
    table += (f"\n\nTimed on {fixed_run['tokens']:,} pydocs test tokens: fixed λ {fixed_run['knnlm_tokens_per_s']:.0f} "
              f"tokens/s (ppl {fixed_run['knnlm_ppl']:.3f}), --lambda auto {auto_run['knnlm_tokens_per_s']:.0f} tokens/s "
              f"(ppl {auto_run['knnlm_ppl']:.3f}, {100 * (1 - auto_run['searched_fraction']):.0f}% searches skipped): "
              f"{speed['speedup']:.2f}× ; base LM {fixed_run['base_tokens_per_s']:.0f} tokens/s.")
    plots(curves)
    write_results("paper", {"args": vars(args), "rows": rows, "curves": curves, "speed": speed,
                            "tuned": {f"{s}|{c}": v for (s, c), v in best.items()},
                            "calibration": {s: c.to_dict() for s, c in cal.items()},
                            "datastores": {s: st.count() for s, st in stores.items()},
                            "seconds": time.perf_counter() - t_start}, table)


def size_curve(store: FaissDatastore, test: dict, b: dict) -> list[dict]:
    """Perplexity with a datastore made of the first n entries (exact search over the cached queries)."""
    import faiss

    keys, values = store.keys(), store.values()
    queries = test["queries"].astype(np.float32)
    out = []
    for n in (25_000, 50_000, 100_000, 200_000, store.count()):
        n = min(n, store.count())
        index = faiss.IndexFlatL2(store.dim)
        index.add(np.ascontiguousarray(keys[:n], dtype=np.float32))
        d, rows = index.search(queries, b["k"])
        nb = Neighbours(test["targets"], test["lm_logprobs"], d, values[:n][rows], test["lm_entropy"],
                        test["lm_max_logprob"])
        out.append({"entries": n, "ppl": fixed_ppl(nb, b)})
        if n == store.count():
            break
    return out


def plots(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, xlabel, log) in zip(axes, [("size", "entries", True), ("k", "k", True),
                                            ("lambda", "lambda", False), ("temperature", "temperature", True)]):
        xs = [r["entries" if key == "size" else key] for r in curves[key]]
        ax.plot(xs, [r["ppl"] for r in curves[key]], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pydocs test perplexity")
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("kNN-LM on pydocs test (SmolLM2-135M, pydocs datastore, exact search)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "paper_curves.png", dpi=110)


if __name__ == "__main__":
    main()
