"""Compressed keys: bytes per entry against kNN-LM perplexity, for each storage form.

    python benchmarks/compress.py --datastore cache/cmp-pydocs-408000-flat --test-tokens 6000

Reads an existing FAISS flat datastore (real pydocs keys; not rebuilt), runs the LM once over
the first ``--test-tokens`` pydocs test tokens (and ``--valid-tokens`` valid tokens when no tune
result is given) and caches queries, targets and LM log-probs in benchmarks/cache/compress/.
Each form is then a new store filled with the same rows through the library (``add`` takes
model-space keys and projects them when the form has a projection; ``search`` takes the
model-space queries), and is scored with the exact store's tuned k, T and λ:

* ``bytes_per_entry`` from the store's own ``describe()`` (vectors + index + payload [+ re-rank keys]);
  ``key B`` is vectors + index, the issue's accounting (1,152 B fp16 keys, ~72 B paper IVFPQ);
* recall@k: share of the exact top-k entries (by id) that the form returns in its top-k;
* kNN-LM perplexity with the exact store's k/T/λ, and its change against the exact store;
* ``dist ratio``: mean nearest-neighbour distance of the form over the exact one (does T still fit).

Writes benchmarks/results/compress.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from common import CACHE, RESULTS, corpus_file, markdown_table, setup_logging, stop_on_sigterm, write_results
from scale_data import recall

from knnlm_vdb.datastore.base import take_rows
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.evaluate import Neighbours, tune
from knnlm_vdb.knn import interpolate, knn_target_logprobs, perplexity
from knnlm_vdb.projection import SAMPLE_ROWS, Projection

# name -> (backend, index, pq_m, project_dim, recompute); a Milvus pq_m may be (m, nbits)
FORMS = {
    "flat": ("faiss", "flat", None, None, False),
    "sq8": ("faiss", "sq8", None, None, False),
    "pq64": ("faiss", "pq", 64, None, False),
    "pca288": ("faiss", "flat", None, 288, False),
    "pca128": ("faiss", "flat", None, 128, False),
    "pca64": ("faiss", "flat", None, 64, False),
    "pca64+sq8": ("faiss", "sq8", None, 64, False),
    "pca32+sq8": ("faiss", "sq8", None, 32, False),
    "pca128+pq32": ("faiss", "pq", 32, 128, False),
    "pca128+pq16": ("faiss", "pq", 16, 128, False),
    "pca128+pq32+rerank": ("faiss", "pq", 32, 128, True),
    "pca128+ivfpq32": ("faiss", "ivfpq", 32, 128, False),
    "milvus:pca64+IVF_SQ8": ("milvus", "IVF_SQ8", None, 64, False),
    "milvus:pca24+IVF_SQ8": ("milvus", "IVF_SQ8", None, 24, False),
    "server:pca128+IVF_PQ16": ("server", "IVF_PQ", 16, 128, False),  # Milvus Lite 3.2.2 cannot build IVF_PQ
    "server:pca192+IVF_PQ24": ("server", "IVF_PQ", 24, 192, False),  # 32 B key: 24 B codes + 8 B id
    "server:pca96+IVF_PQ24": ("server", "IVF_PQ", 24, 96, False),
    "server:pca72+IVF_PQ24": ("server", "IVF_PQ", 24, 72, False),  # 3 dims per code byte, as pca96+pq32
    "server:pca128+IVF_PQ16x12": ("server", "IVF_PQ", (16, 12), 128, False),  # 24 B: 16 codes of 12 bits
    "pca96+pq32": ("faiss", "pq", 32, 96, False),
    "pca64+pq32": ("faiss", "pq", 32, 64, False),
    "pca128+rq32": ("faiss", "rq", 32, 128, False),  # 31 residual codebooks + a 1-byte norm
    "pca192+rq32": ("faiss", "rq", 32, 192, False),
    "pca256+rq32": ("faiss", "rq", 32, 256, False),
}

DEFAULT_FORMS = ("flat", "pca128", "pca64+sq8", "pca32+sq8", "pca128+pq32", "pca128+pq16", "milvus:pca24+IVF_SQ8",
                 "milvus:pca64+IVF_SQ8", "server:pca128+IVF_PQ16", "pca128+pq32+rerank", "pca288", "sq8")


def build_options(name: str, nprobe: int, train_rows: int) -> dict:
    """The options of this run that change what form ``name`` measures: a kept row measured with
    others is measured again. Rows written before they were recorded had the defaults (32, 10,000)."""
    if name == "flat":
        return {}
    return {"train_rows": train_rows} if FORMS[name][0] == "faiss" else {"nprobe": nprobe}


def kept(row: dict) -> dict:
    """``build_options`` of a stored row (its recorded ones, or the defaults of older runs)."""
    if "build" in row:
        return row["build"]
    return build_options(row["form"], 32, 10000) if row["form"] in FORMS else {}


def lm_pass(enc, split: str, n_tokens: int, tag: str) -> dict:
    """Queries (float32), targets and LM log-probs of the first ``n_tokens`` targets of pydocs ``split``."""
    path = CACHE / "compress" / f"{tag}-pydocs-{split}-{n_tokens}.npz"
    if path.exists():
        return dict(np.load(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = enc.tokenize(corpus_file("pydocs", split).read_text())[: n_tokens + 1]
    parts: dict[str, list] = {}
    for block in enc.encode(ids, with_logprobs=True):
        for key in ("keys", "targets", "lm_logprobs"):
            parts.setdefault(key, []).append(getattr(block, key))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    np.savez(path, **out)
    return out


KS = (8, 16, 32, 64, 128, 256, 512, 1024)


def knnlm_ppl(data: dict, dist: np.ndarray, vals: np.ndarray, k: int, t: float, lam: float) -> float:
    knn = knn_target_logprobs(dist[:, :k], vals[:, :k], data["targets"], t)
    return perplexity(interpolate(data["lm_logprobs"], knn, lam))


def search_ids(store, src: FaissDatastore, queries: np.ndarray, k: int):
    """(distances, values, entry ids) of the ``k`` nearest, in batches.

    Each form is searched once: a FAISS form for row numbers (values and distances finished as
    ``search`` finishes them), a Milvus form for ids (the values come from the source rows the
    form was filled with, same ids). Searching twice (values, then ids) doubled the slowest part
    of a 408k-entry run."""
    ids_of_rows, values = src.ids(), src.values()
    store_values = store.values() if isinstance(store, FaissDatastore) else None
    row_of = None
    out_d, out_v, out_i = [], [], []
    for i in range(0, len(queries), 512):
        q = queries[i:i + 512]
        if isinstance(store, FaissDatastore):  # one index search: search()'s rows and distances
            d, rows = store.ranked_rows(q, k)
            d, v = take_rows(d, rows, store_values)
            ids = ids_of_rows[np.where(rows >= 0, rows, 0)]
        else:
            if row_of is None:
                order = np.argsort(ids_of_rows, kind="stable")
                row_of = (ids_of_rows[order], order)
            d, ids = store.search_ids(q, k)
            if store.projection is not None:
                d = store.projection.scale_distances(d)
            sorted_ids, order = row_of
            pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
            v = np.where(ids >= 0, np.asarray(values)[order[pos]], -1).astype(np.int32)
        out_d.append(d), out_v.append(v), out_i.append(ids)
    return np.concatenate(out_d), np.concatenate(out_v), np.concatenate(out_i)


_SERVER = []


def server_uri(work: Path) -> str:
    """A Milvus 2.3.5 standalone server (PyPI ``milvus``, tests/milvus_server.py) for this run."""
    if not _SERVER:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from milvus_server import MilvusTestServer

        server = MilvusTestServer(work.parent / "milvus-server")
        server.start()
        _SERVER.append(server)
    return _SERVER[0].uri


def build_form(name: str, src: FaissDatastore, sample: np.ndarray, work: Path, uri: str, train_rows: int,
               nprobe: int = 32):
    backend, index, pq_m, pdim, recompute = FORMS[name]
    proj = Projection.fit(sample, pdim) if pdim else None
    keys, values, ids = src.keys(), src.values(), src.ids()
    t0 = time.perf_counter()
    if backend == "faiss":
        store = FaissDatastore.create(work / name.replace("+", "_"), src.info, index=index, pq_m=pq_m,
                                      nlist=256 if index == "ivfpq" else None,
                                      recompute=recompute, projection=proj, key_dtype="float16")
        for i in range(0, len(keys), 16384):
            store.add(ids[i:i + 16384], np.asarray(keys[i:i + 16384], np.float32), values[i:i + 16384])
        store.train(sample_size=train_rows)  # PQ k-means on all 120k rows takes minutes on 2 shared cores
        store.finalize()
    else:
        from knnlm_vdb.datastore.milvus import MilvusDatastore, NoSuchDomain, drop_domain

        domain = "c_" + name.split(":")[1].replace("+", "_").lower()
        m, nbits = pq_m if isinstance(pq_m, tuple) else (pq_m, None)
        params = {"nlist": 256, **({"m": m} if m else {}), **({"nbits": nbits} if nbits else {})}
        if backend == "server":
            uri = server_uri(work)
        try:  # a scratch domain: one an interrupted run left in the server's data is rebuilt
            drop_domain(uri, domain)
        except NoSuchDomain:
            pass
        store = MilvusDatastore.create(uri, domain, src.info, index_type=index, index_params=params,
                                       search_params={"nprobe": nprobe}, projection=proj)
        for i in range(0, len(keys), 8192):
            store.add(ids[i:i + 8192], np.asarray(keys[i:i + 8192], np.float32), values[i:i + 8192],
                      doc_ids=["d"] * len(ids[i:i + 8192]), positions=np.arange(i, i + len(ids[i:i + 8192])))
        store.seal()
        store.wait_for_index(3600)
    return store, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(CACHE / "cmp-pydocs-408000-flat"), help="exact FAISS flat store")
    ap.add_argument("--tune-json", default="",
                    help="`knnlm-vdb tune --json` output to score every form with (default: tuned here on --valid-tokens)")
    ap.add_argument("--test-tokens", type=int, default=6000)
    ap.add_argument("--valid-tokens", type=int, default=16000,
                    help="pydocs valid tokens every form is tuned on (4,000 left the λ choice to noise)")
    ap.add_argument("--forms", default=",".join(DEFAULT_FORMS), help="comma-separated subset of: " + ", ".join(FORMS))
    ap.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS, help="keys the projections are fitted on")
    ap.add_argument("--sample-from", choices=("first", "spread"), default="spread",
                    help="fit projections on the store's first keys (what a build sees first) or on keys spread "
                         "evenly over the whole store")
    ap.add_argument("--recall-k", type=int, default=64)
    ap.add_argument("--milvus-exact-settings-only", action="store_true",
                    help="Milvus forms: search the test tokens at the exact store's k only (no own tune; Lite is "
                         "slow at k=1024)")
    ap.add_argument("--nprobe", type=int, default=32, help="IVF lists a Milvus form searches (of nlist 256)")
    ap.add_argument("--train-rows", type=int, default=10000, help="random rows the SQ8/PQ quantisers train on")
    ap.add_argument("--work", default=str(CACHE / "compress" / "stores"), help="scratch for the compressed stores")
    ap.add_argument("--name", default="compress",
                    help="results/<name>.{json,md}; a run keeps the forms it holds that were measured with the same "
                         "--nprobe (Milvus forms) or --train-rows (FAISS forms)")
    args = ap.parse_args()
    setup_logging()
    stop_on_sigterm()
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.lm import load_lm

    src = FaissDatastore(args.datastore)
    enc = Encoder(load_lm(src.info.model), key_type=src.info.key_type)
    tag = f"{src.info.model}-{src.info.key_type}"
    test = lm_pass(enc, "test", args.test_tokens, tag)
    max_k = 1024
    t0 = time.perf_counter()
    d_ex, v_ex, i_ex = search_ids(src, src, test["keys"], max_k)
    exact_s = time.perf_counter() - t0
    tuned = None
    tj = Path(args.tune_json) if args.tune_json else None
    if tj is not None:
        if not (tj.is_file() and tj.stat().st_size):
            raise SystemExit(f"--tune-json {tj}: no such tune result")
        tuned = json.loads(tj.read_text()).get("best")
        tuned_from = str(tj)
    valid = lm_pass(enc, "valid", args.valid_tokens, tag)

    def own_tune(store) -> tuple[dict, list]:
        """k, T, λ tuned for ``store`` on the valid tokens, as `knnlm-vdb tune` would, and the grid."""
        dv, vv, _ = search_ids(store, src, valid["keys"], max_k)
        res = tune(Neighbours(valid["targets"], valid["lm_logprobs"], dv, vv, None, None), ks=KS)
        return res["best"], res["grid"]

    def valid_at(grid, k_, t_, lam_) -> float | None:
        return next((g["ppl"] for g in grid if (g["k"], g["temperature"], g["lambda"]) == (k_, t_, lam_)), None)

    exact_own, exact_grid = own_tune(src)
    if not tuned:
        tuned = exact_own
        tuned_from = f"tuned here on the first {args.valid_tokens} pydocs valid tokens (exact store)"
    k, t, lam = int(tuned["k"]), float(tuned["temperature"]), float(tuned["lambda"])
    base_ppl = perplexity(test["lm_logprobs"])
    exact_ppl = knnlm_ppl(test, d_ex, v_ex, k, t, lam)
    exact_own_ppl = knnlm_ppl(test, d_ex, v_ex, exact_own["k"], exact_own["temperature"], exact_own["lambda"])
    rk = args.recall_k
    if args.sample_from == "first":
        sample = np.asarray(src.keys()[: args.sample_rows], np.float32)
    else:
        every = np.linspace(0, src.count() - 1, min(args.sample_rows, src.count())).astype(np.int64)
        sample = np.asarray(src.keys()[every], np.float32)
    work = Path(args.work)
    rows = []
    prior = RESULTS / f"{args.name}.json"
    if prior.exists():  # resume: keep the forms a run over the same rows and tokens measured
        old = json.loads(prior.read_text())
        if (old.get("entries"), old.get("tokens"), old.get("valid_tokens"), old.get("k"),
                old.get("sample_from", "first")) == (src.count(), len(test["targets"]), args.valid_tokens, k,
                                                     args.sample_from):
            rows = old["rows"]
    for name in [f for f in args.forms.split(",") if f]:
        if name not in FORMS:
            raise SystemExit(f"unknown form {name!r}")
        build = build_options(name, args.nprobe, args.train_rows)
        if any(r["form"] == name and kept(r) == build for r in rows):
            continue
        rows = [r for r in rows if r["form"] != name]  # measured with other options: measured again
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        uri = str(work / "milvus.db")
        if name == "flat":
            store, build_s = src, 0.0
        else:
            store, build_s = build_form(name, src, sample, work, uri, args.train_rows, args.nprobe)
        t0 = time.perf_counter()
        quick = FORMS[name][0] != "faiss" and args.milvus_exact_settings_only
        if store is src:  # the exact store's answers and tune are above
            (d, v, i), search_s, own, grid = (d_ex, v_ex, i_ex), exact_s, exact_own, exact_grid
        else:
            d, v, i = search_ids(store, src, test["keys"], max(k, rk) if quick else max(max_k, rk))
            search_s = time.perf_counter() - t0
            own, grid = ({"k": None, "temperature": None, "lambda": None}, None) if quick else own_tune(store)
        own_ppl = None if quick else knnlm_ppl(test, d, v, own["k"], own["temperature"], own["lambda"])
        desc = store.describe()
        b = desc["bytes_per_entry"]
        ppl = knnlm_ppl(test, d, v, k, t, lam)
        proj = desc.get("projection") or {}
        rows.append({"form": name, "backend": FORMS[name][0], "dim": desc.get("stored_dim", desc["dim"]),
                     "explained": proj.get("explained_variance"), "key_bytes": b["vectors"] + b["index"],
                     "bytes_per_entry": b["total"], "bytes_parts": b, "recall": recall(i[:, :rk], i_ex[:, :rk]), "ppl": ppl,
                     "delta_pct": 100 * (ppl / exact_ppl - 1), "own_k": own["k"], "own_t": own["temperature"],
                     "own_lambda": own["lambda"], "own_ppl": own_ppl,
                     "own_delta_pct": None if quick else 100 * (own_ppl / exact_own_ppl - 1),
                     # how far apart the two settings are where they were chosen: valid ppl, own best vs exact's
                     "valid_own_ppl": own.get("ppl"), "valid_ppl_at_exact": valid_at(grid, k, t, lam) if grid else None,
                     "dist_ratio": float(np.mean(d[:, 0]) / np.mean(d_ex[:, 0])),
                     "build_s": round(build_s, 1), "search_s": round(search_s, 1), "build": build})
        print(json.dumps({k_: v_ for k_, v_ in rows[-1].items() if k_ != "bytes_parts"}), flush=True)
        if store is not src:
            store.close()
        report(args, src, test, rows, tuned_from, k, t, lam, base_ppl, exact_ppl, exact_own, exact_own_ppl, exact_s,
               len(sample), rk)
    for server in _SERVER:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)


def report(args, src, test, rows, tuned_from, k, t, lam, base_ppl, exact_ppl, exact_own, exact_own_ppl, exact_s,
           n_sample, rk) -> None:
    """Results so far (written after every form, so a stopped run keeps what it measured)."""
    cols = [("form", "form", ""), ("backend", "backend", ""), ("dim", "stored dim", "d"),
            ("explained", "PCA variance kept", ".3f"), ("key_bytes", "key B/entry", "d"),
            ("bytes_per_entry", "total B/entry", "d"), ("recall", f"recall@{rk}", ".3f"), ("ppl", "kNN-LM ppl", ".3f"),
            ("delta_pct", "Δ vs exact %", "+.2f"), ("own_t", "own T", ".1f"), ("own_ppl", "ppl, own tune", ".3f"),
            ("own_delta_pct", "Δ own %", "+.2f"), ("dist_ratio", "NN dist ratio", ".3f"),
            ("build_s", "build s", ".1f"), ("search_s", "search s", ".1f")]
    head = (f"pydocs test, first {len(test['targets'])} tokens; datastore {args.datastore} ({src.count():,} entries, "
            f"{src.info.model} {src.info.key_type}); k={k}, T={t}, λ={lam} ({tuned_from}); base LM ppl "
            f"{base_ppl:.3f}, exact kNN-LM ppl {exact_ppl:.3f}. 'own tune': k, T, λ tuned for each form on the first "
            f"{args.valid_tokens} pydocs valid tokens (exact store: k={exact_own['k']}, T={exact_own['temperature']}, "
            f"λ={exact_own['lambda']}, test ppl {exact_own_ppl:.3f}); projections fitted on "
            + (f"the first {n_sample:,} keys" if args.sample_from == "first" else
               f"{n_sample:,} keys spread evenly over the store") + "\n\n")
    write_results(args.name, {"datastore": args.datastore, "entries": src.count(), "tokens": len(test["targets"]),
                               "valid_tokens": args.valid_tokens, "k": k, "temperature": t, "lambda": lam, "tuned_from": tuned_from,
                               "base_ppl": base_ppl, "exact_ppl": exact_ppl, "exact_search_s": round(exact_s, 1),
                               "exact_own_tune": exact_own, "exact_own_ppl": exact_own_ppl,
                               "sample_rows": n_sample, "sample_from": args.sample_from, "recall_k": rk, "rows": rows},
                  head + markdown_table(rows, cols))


if __name__ == "__main__":
    main()
