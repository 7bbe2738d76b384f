"""Milvus (Lite and server) against FAISS exact on the same datastore rows.

    python benchmarks/milvus_vs_faiss.py --faiss-dir benchmarks/cache/pydocs-408000-ffn_input-c1024s512-flat \\
        [--eval-tokens 20000] [--k 1024 --temperature 1 --lambda 0.25] [--systems lite-hnsw,server-ivf_flat,...]

Copies the rows of an existing FAISS datastore (built by quality.py) into Milvus Lite
(HNSW, IVF_FLAT) and a Milvus standalone server (IVF_FLAT, IVF_SQ8, HNSW), then reports
for each: recall@k against exact search on a sample of test-split queries, queries/s,
kNN-LM test perplexity, and kNN-LM tokens/s as a multiple of the base LM's tokens/s in
the same evaluate() run. The server is started here (tests/milvus_server.py) unless
--server-uri names one. Loaded domains are kept under --work-dir and reused when their row
count matches, so a rerun only measures. Writes benchmarks/results/milvus-vs-faiss-*.{json,md}.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CACHE, corpus_file, markdown_table, parse_systems, setup_logging, stop_on_sigterm, write_results

from knnlm_vdb.datastore.faiss_store import FaissDatastore, default_nlist
from knnlm_vdb.datastore.milvus import MilvusDatastore, drop_domain, list_domains
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.evaluate import evaluate
from knnlm_vdb.lm import load_lm

log = logging.getLogger("milvus_vs_faiss")
SYSTEMS = ("lite-hnsw", "lite-ivf_flat", "server-ivf_flat", "server-ivf_sq8", "server-hnsw")


def index_options(index_type: str, n: int, args) -> dict:
    """The same knobs for Lite and server: HNSW M/efConstruction/ef, IVF nlist ~ 4·√n and nprobe."""
    if index_type == "HNSW":
        search = {"ef": max(args.ef, args.k)} if args.ef else {}
        return {"index_type": "HNSW", "index_params": {"M": args.hnsw_m, "efConstruction": args.ef_construction},
                "search_params": search}
    nlist = args.nlist or default_nlist(n)
    return {"index_type": index_type, "index_params": {"nlist": nlist},
            "search_params": {"nprobe": min(args.nprobe, nlist)}}


def load_rows(src: FaissDatastore, uri: str, domain: str, options: dict, batch: int) -> tuple[MilvusDatastore, dict]:
    """Copy every row of ``src`` into ``domain`` (reused if it already holds them), sealed and indexed."""
    n = src.count()
    stats = {}
    exists = uri.startswith("http") or Path(uri).exists()
    if exists and domain in list_domains(uri):
        store = MilvusDatastore.open(uri, domain, search_params=options["search_params"],
                                     consistency=options["consistency"])
        if store.count() == n and store.index.index_type == options["index_type"]:
            log.info("reusing %s at %s (%d rows)", domain, uri, n)
            return store, {"reused": True}
        store.close()
        drop_domain(uri, domain)
    store = MilvusDatastore.create(uri, domain, src.info, **options)
    keys, values, ids = src.keys(), src.values(), src.ids()
    t = time.perf_counter()
    for i in range(0, n, batch):
        store.add(ids[i:i + batch], np.asarray(keys[i:i + batch], dtype=np.float32), values[i:i + batch])
        log.info("%s: %d / %d rows", domain, min(i + batch, n), n)
    stats["load_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    store.seal()
    if uri.startswith("http"):
        stats["index_state"] = store.wait_for_index()
    stats["seal_index_seconds"] = time.perf_counter() - t
    stats["load_rows_per_s"] = n / stats["load_seconds"] if stats["load_seconds"] else None
    store.close()  # measure as a reader does: a fresh handle on the sealed, indexed domain
    store = MilvusDatastore.open(uri, domain, search_params=options["search_params"],
                                 consistency=options["consistency"])
    return store, stats


def exact_neighbours(src: FaissDatastore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances and entry ids of the exact top-k (faiss IndexFlatL2 over the float32 keys)."""
    import faiss

    index = faiss.IndexFlatL2(src.info.dim)
    keys = src.keys()
    for i in range(0, len(keys), 65536):
        index.add(np.ascontiguousarray(keys[i:i + 65536], dtype=np.float32))
    dist, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return dist, np.where(rows >= 0, src.ids()[np.maximum(rows, 0)], -1)


class ExactKeys:
    """Full-precision keys by entry id, to score what an approximate index returned."""

    def __init__(self, src: FaissDatastore):
        ids = src.ids()
        self.order = np.argsort(ids)
        self.sorted_ids = ids[self.order]
        self.keys = src.keys()

    def distances(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.sorted_ids, ids), 0, len(self.sorted_ids) - 1)
        valid = (ids >= 0) & (self.sorted_ids[pos] == ids)
        rows = self.order[pos]
        out = np.full(ids.shape, np.inf, dtype=np.float32)
        for i in range(len(queries)):
            cand = np.asarray(self.keys[np.sort(rows[i][valid[i]])], dtype=np.float32)
            d = ((cand - queries[i]) ** 2).sum(1)
            out[i, : len(d)] = np.sort(d)
        return out


def recall_at_k(queries, found_ids, exact_dist, exact_ids, exact_keys: ExactKeys) -> tuple[float, float]:
    """(id recall, tie-aware recall). The second counts a returned neighbour as correct when its
    exact distance is within the exact k-th distance: duplicate keys (repeated text) make ids among
    equal distances arbitrary, which would otherwise read as misses."""
    id_recall = np.mean([len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, (e >= 0).sum())
                         for f, e in zip(found_ids, exact_ids)])
    found_d = exact_keys.distances(queries, found_ids)
    kth = np.where(exact_ids >= 0, exact_dist, -np.inf).max(axis=1, keepdims=True)
    within = (found_d <= kth * (1 + 1e-4) + 1e-5).sum(1) / np.maximum(1, (exact_ids >= 0).sum(1))
    return float(id_recall), float(np.minimum(within, 1.0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faiss-dir", required=True, help="FAISS datastore whose rows are copied (flat, float32 keys)")
    ap.add_argument("--model", default=None, help="default: the model the datastore was built with")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--corpus", default="pydocs")
    ap.add_argument("--test-file", default=None, help="text to evaluate on (default: the corpus's test split)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="cap on test tokens for perplexity (0 = all)")
    ap.add_argument("--recall-queries", type=int, default=1000, help="test queries sampled for recall and queries/s")
    ap.add_argument("--search-batch", type=int, default=512, help="queries per search() call when timing")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lambda", dest="lmbda", type=float, default=0.25)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", type=int, default=0, help="HNSW search ef (0: max(k, 64)); raised to k if smaller")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about 4·sqrt(rows))")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--insert-batch", type=int, default=50_000)
    ap.add_argument("--consistency", default="Strong", help="Milvus read consistency (the CLI default is Strong)")
    ap.add_argument("--server-uri", default=None, help="use this Milvus server instead of starting one")
    ap.add_argument("--work-dir", default=str(CACHE / "milvus-bench"), help="Milvus Lite files and the server's data")
    ap.add_argument("--skip-faiss", action="store_true", help="do not evaluate the FAISS exact reference")
    args = ap.parse_args()
    setup_logging()
    stop_on_sigterm()
    systems = parse_systems(args.systems, SYSTEMS)

    src = FaissDatastore(args.faiss_dir)
    if src.meta["key_dtype"] != "float32":
        log.warning("%s stores float16 keys; Milvus gets them as float32", args.faiss_dir)
    n = src.count()
    lm = load_lm(args.model or src.info.model)
    enc = Encoder(lm, key_type=src.info.key_type, ctx=args.ctx, stride=args.stride, batch_size=args.batch_size)
    from knnlm_vdb.datastore import StoreInfo

    src.info.check_compatible(StoreInfo.for_encoder(enc), args.faiss_dir)
    text = Path(args.test_file).read_text() if args.test_file else corpus_file(args.corpus, "test").read_text()
    test_ids = enc.tokenize(text)
    if args.eval_tokens:
        test_ids = test_ids[: args.eval_tokens + 1]

    # queries: keys of the test text, as evaluate() would send them
    blocks = list(enc.encode(test_ids, with_logprobs=False))
    all_queries = np.concatenate([b.keys for b in blocks]).astype(np.float32)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(all_queries), size=min(args.recall_queries, len(all_queries)), replace=False))
    queries = all_queries[pick]
    k = min(args.k, n)
    t = time.perf_counter()
    exact_dist, exact = exact_neighbours(src, queries, k)
    exact_qps = len(queries) / (time.perf_counter() - t)
    exact_keys = ExactKeys(src)
    evaluate(enc, test_ids[: 4 * args.ctx], show_progress=False)  # warm-up, so the first row is not penalised

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    server = None
    server_uri = args.server_uri
    if any(s.startswith("server") for s in systems) and not server_uri:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from milvus_server import MilvusTestServer

        server = MilvusTestServer(tempfile.mkdtemp(prefix="milvus-server-", dir=work))
        server_uri = server.start(timeout_s=300)
    tag = Path(args.faiss_dir).name

    rows = []
    base_row = None
    try:
        if not args.skip_faiss:
            res = evaluate(enc, test_ids, [src], k=k, temperature=args.temperature, lmbda=args.lmbda).to_dict()
            base_row = {"system": "base LM", "ppl": res["base_ppl"], "tokens": res["tokens"],
                        "tokens_per_s": res["base_tokens_per_s"]}
            rows += [base_row, {"system": "FAISS exact (IndexFlatL2)", "recall": 1.0, "id_recall": 1.0, "qps": exact_qps,
                                "ppl": res["knnlm_ppl"], "tokens": res["tokens"], "tokens_per_s": res["knnlm_tokens_per_s"],
                                "speed_vs_base": res["knnlm_tokens_per_s"] / res["base_tokens_per_s"], "raw": res}]
        for system in systems:
            where, index_type = system.split("-", 1)
            index_type = index_type.upper()
            uri = str(work / f"{tag}-{index_type.lower()}.db") if where == "lite" else server_uri
            domain = f"bench_{index_type.lower()}"
            options = {**index_options(index_type, n, args), "consistency": args.consistency}
            log.info("== %s: %s", system, options)
            store, stats = load_rows(src, uri, domain, options, args.insert_batch)
            try:
                _, found = store.search_ids(queries, k)  # warm-up and recall
                t = time.perf_counter()
                for i in range(0, len(queries), args.search_batch):
                    store.search(queries[i:i + args.search_batch], k)
                qps = len(queries) / (time.perf_counter() - t)
                res = evaluate(enc, test_ids, [store], k=k, temperature=args.temperature, lmbda=args.lmbda).to_dict()
                id_recall, tie_recall = recall_at_k(queries, found, exact_dist, exact, exact_keys)
                rows.append({"system": f"Milvus {'Lite' if where == 'lite' else 'server'} {index_type}",
                             "recall": tie_recall, "id_recall": id_recall, "qps": qps, "ppl": res["knnlm_ppl"],
                             "tokens": res["tokens"], "tokens_per_s": res["knnlm_tokens_per_s"],
                             "speed_vs_base": res["knnlm_tokens_per_s"] / res["base_tokens_per_s"],
                             "index": store.describe()["index"], "load": stats, "raw": res})
                if base_row is None:
                    base_row = {"system": "base LM", "ppl": res["base_ppl"], "tokens": res["tokens"],
                                "tokens_per_s": res["base_tokens_per_s"]}
                    rows.insert(0, base_row)
            finally:  # free memory for the next system; a rerun loads the collection again
                if where == "server":
                    store.client.release_collection(store.describe()["collection"])
                store.close()
                if where == "lite":
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(uri)
    finally:
        if server is not None:
            server.stop()

    for r in rows:
        if r is not base_row and r.get("ppl") is not None:
            r["delta_pct"] = 100 * (r["ppl"] / base_row["ppl"] - 1)
    title = (f"**{args.corpus} test** ({rows[0]['tokens']:,} tokens), datastore {tag} ({n:,} entries, dim "
             f"{src.info.dim}), k={k}, T={args.temperature}, λ={args.lmbda}, Milvus consistency {args.consistency}; "
             f"recall@{k} (a neighbour counts when its exact distance is within the exact k-th; by id in "
             f"parentheses) and queries/s on {len(queries):,} test queries in batches of {args.search_batch}. "
             f"Speeds are ×base-LM tokens/s measured in the same evaluate() run.\n\n")
    for r in rows:
        if r.get("recall") is not None:
            r["recall_text"] = f"{r['recall']:.4f} ({r['id_recall']:.4f})"
    table = title + markdown_table(rows, [
        ("system", "system", ""), ("recall_text", f"recall@{k}", ""), ("qps", "queries/s", ".0f"),
        ("ppl", "perplexity", ".3f"), ("delta_pct", "Δ vs base %", "+.2f"), ("tokens_per_s", "tokens/s", ".0f"),
        ("speed_vs_base", "× base tokens/s", ".2f")])
    write_results(f"milvus-vs-faiss-{tag}", {"args": vars(args), "entries": n, "rows": rows}, table)


if __name__ == "__main__":
    main()
