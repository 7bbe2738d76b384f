"""The paper's claims on our corpora, and adaptive interpolation (--lambda auto).

    python benchmarks/paper.py            # after benchmarks/quality.py built the pydocs datastore

One LM pass per split (pydocs/debref valid and test) computes the LM's log-probabilities and
the top-1024 neighbours in *both* domains' datastores; everything else is re-scored offline
from that cache (benchmarks/cache/paper/), so the whole study costs four eval passes:

* domain adaptation: base LM vs + in-domain vs + other-domain vs + both datastores;
* fixed λ (tuned on valid) vs adaptive λ (`--lambda auto`), in and across domains, with the
  share of searches skipped (benchmarks/adaptive.py adds timings and the gate-only ablation);
* curves on pydocs test: perplexity against k, λ, T and datastore size
  (benchmarks/key_types.py: ffn_input vs final_hidden keys).

Writes benchmarks/results/paper.{json,md} and paper_*.png.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import CACHE, RESULTS, corpus_file, markdown_table, setup_logging, write_results

from knnlm_vdb.adaptive import fit_calibration
from knnlm_vdb.corpus import read_documents
from knnlm_vdb.datastore import StoreInfo, merge_topk
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.evaluate import Neighbours, tune
from knnlm_vdb.ingest import ingest
from knnlm_vdb.knn import perplexity
from knnlm_vdb.lm import load_lm
from knnlm_vdb.mixing import Found, Mixer

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


def auto_scores(data: dict, stores: list[str], cals: list, trust: bool = True) -> tuple[float, float]:
    """(perplexity, share of searches skipped) of ``--lambda auto`` over cached neighbours, scored
    by the same Mixer as evaluate() (the split read as one document). ``trust=False``: the
    per-token gate alone, without the per-document trust."""
    mixer = Mixer(stores, calibrations=cals)  # store names stand in for stores: nothing is searched here
    masks = mixer.search_masks(data["lm_entropy"], data["lm_max_logprob"])
    found = [Found(m, np.where(m[:, None], data[f"dist_{s}"][:, :c.k], np.inf).astype(np.float32),
                   np.where(m[:, None], data[f"vals_{s}"][:, :c.k], -1).astype(np.int32))
             for s, c, m in zip(stores, cals, masks)]
    doc = mixer.new_document()
    if not trust:
        for d in doc:
            d.scales, d.prior, d.weights = np.ones(1), np.ones(1), np.ones(1)
    mixed, _, _ = mixer.score(doc, data["targets"], data["lm_logprobs"], data["lm_entropy"],
                              data["lm_max_logprob"], found)
    return perplexity(mixed), float(1 - np.any(masks, axis=0).mean())


def arguments(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pydocs-tokens", type=int, default=408_000)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--debref-tokens", type=int, default=0, help="debref datastore cap (0 = whole train split)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="cap on each valid/test split (0 = all)")
    return ap


def passes(args):
    """-> (encoder, {domain: datastore}, {(corpus, split): cached LM pass with both domains' neighbours})."""
    enc = Encoder(load_lm(args.model), ctx=args.ctx, stride=args.stride, batch_size=2)
    stores = {"pydocs": build_store(enc, "pydocs", args.pydocs_tokens, args.ctx, args.stride),
              "debref": build_store(enc, "debref", args.debref_tokens or None, args.ctx, args.stride)}
    tag = f"p{args.pydocs_tokens}-d{args.debref_tokens}-e{args.eval_tokens}-c{args.ctx}s{args.stride}"
    data = {(c, s): split_pass(enc, stores, c, s, tag, args.eval_tokens) for c in DOMAINS for s in ("valid", "test")}
    return enc, stores, data


def fit(data: dict) -> tuple[dict, dict]:
    """Best fixed (k, T, λ) per (datastore, tuning corpus) and 'both'; calibration per datastore on its own valid."""
    best, cal = {}, {}
    for store in DOMAINS:
        for corpus in DOMAINS:
            best[store, corpus] = tune(neighbours(data[corpus, "valid"], store))["best"]
        cal[store], _ = fit_calibration(neighbours(data[store, "valid"], store),
                                        best[store, store]["k"], best[store, store]["temperature"])
    for corpus in DOMAINS:
        best["both", corpus] = tune(both(data[corpus, "valid"]))["best"]
    return best, cal


def prepare(args):
    """Logging, the cached passes and the fits both paper.py and adaptive.py start from."""
    setup_logging()
    enc, stores, data = passes(args)
    best, cal = fit(data)
    return enc, stores, data, best, cal


def main() -> None:
    args = arguments(__doc__).parse_args()
    t_start = time.perf_counter()
    enc, stores, data, best, cal = prepare(args)

    # 1. domain adaptation on the test splits: fixed λ, and --lambda auto
    rows = []
    for corpus in DOMAINS:
        test = data[corpus, "test"]
        base = perplexity(test["lm_logprobs"])
        other = [s for s in DOMAINS if s != corpus][0]
        rows.append({"test": corpus, "datastore": "none (base LM)", "fixed_ppl": base})
        for store in (corpus, other):
            nb = neighbours(test, store)
            ppl_auto, skipped = auto_scores(test, [store], [cal[store]])
            rows.append({"test": corpus, "datastore": store + (" (in-domain)" if store == corpus else " (other domain)"),
                         "fixed_ppl": fixed_ppl(nb, best[store, store]),
                         "fixed_test_tuned_ppl": fixed_ppl(nb, best[store, corpus]),
                         "auto_ppl": ppl_auto, "auto_skipped": skipped})
        ppl_auto, skipped = auto_scores(test, list(DOMAINS), [cal[s] for s in DOMAINS])
        rows.append({"test": corpus, "datastore": "both (fixed: merged top-k; auto: per domain)",
                     "fixed_test_tuned_ppl": fixed_ppl(both(test), best["both", corpus]),
                     "auto_ppl": ppl_auto, "auto_skipped": skipped})
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

    table = markdown_table(rows, [("test", "test text", ""), ("datastore", "datastore", ""),
                                  ("fixed_ppl", "ppl, λ tuned on datastore's domain", ".3f"),
                                  ("fixed_delta", "Δ%", "+.1f"),
                                  ("fixed_test_tuned_ppl", "ppl, λ tuned on test domain's valid", ".3f"),
                                  ("fixed_test_tuned_delta", "Δ%", "+.1f"),
                                  ("auto_ppl", "ppl, --lambda auto", ".3f"), ("auto_delta", "Δ%", "+.2f"),
                                  ("auto_skipped", "searches skipped", ".0%")])
    plots(curves)
    write_results("paper", {"args": vars(args), "rows": rows, "curves": curves,
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
