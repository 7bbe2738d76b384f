"""Which 32-byte code keeps a key's neighbours: recall@k of faiss quantisers on real keys.

    python benchmarks/quantisers.py --datastore cache/cmp-pydocs-408000-flat --rows 16384

A quick probe before a full ``compress.py`` run (which measures perplexity through the library):
the first ``--rows`` keys of a FAISS flat datastore are the database, the next ``--queries``
keys the queries, and each code is scored by the share of the exact 576-d top-k it returns.
All codes search the same ``Projection`` (PCA + the library's random rotation, fitted on the
database rows), so the rows separate what the projection loses from what the code loses:

* ``pca`` flat: the projection alone (float32, 4 B a dimension);
* ``PQ``: product quantiser, one byte per group of dimensions (the library's ``pq`` form);
* ``OPQ32,PQ32`` (not by default): the same after a rotation learned to balance the groups;
* ``RQ..._Ncqint8``: residual quantiser, each codebook coding what the previous left, plus a
  1-byte norm (additive codes need it for L2 search).

Writes benchmarks/results/quantisers.{json,md}.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from common import CACHE, markdown_table, setup_logging, write_results
from scale_data import recall

from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.projection import SAMPLE_ROWS, Projection

CODES = ("PQ32", "RQ31x8_Ncqint8")  # "OPQ32,PQ32" with --codes: in a first probe it trained longest and kept no more (0.78)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(CACHE / "cmp-pydocs-408000-flat"), help="FAISS flat datastore")
    ap.add_argument("--rows", type=int, default=16384, help="database keys (the first ones)")
    ap.add_argument("--queries", type=int, default=1000, help="query keys (the ones after the database)")
    ap.add_argument("--dim", type=int, default=128, help="projection dimension")
    ap.add_argument("--codes", default=";".join(CODES), help="faiss index_factory strings, separated by ';'")
    ap.add_argument("--train-rows", type=int, default=16384, help="database rows the codes train on")
    ap.add_argument("-k", type=int, default=64)
    args = ap.parse_args()
    setup_logging()
    src = FaissDatastore(args.datastore)
    if src.count() < args.rows + args.queries:
        raise SystemExit(f"{args.datastore} has {src.count():,} keys, fewer than --rows + --queries")
    keys = np.asarray(src.keys()[: args.rows + args.queries], np.float32)
    db, q = keys[: args.rows], keys[args.rows:]
    exact = faiss.IndexFlatL2(db.shape[1])
    exact.add(db)
    truth = exact.search(q, args.k)[1]
    proj = Projection.fit(db[:SAMPLE_ROWS], args.dim)
    pdb, pq = proj.apply(db), proj.apply(q)

    flat = faiss.IndexFlatL2(args.dim)
    flat.add(pdb)
    rows = [{"code": f"pca{args.dim} flat", "bytes": 4 * args.dim, "recall": recall(flat.search(pq, args.k)[1], truth),
             "rel_mse": 0.0, "seconds": 0.0}]
    sample = pdb[: min(len(pdb), 5000)]
    for code in [c for c in args.codes.split(";") if c]:
        t = time.perf_counter()
        index = faiss.index_factory(args.dim, code)
        index.train(pdb[: args.train_rows])
        index.add(pdb)
        found = index.search(pq, args.k)[1]
        decoded = index.sa_decode(index.sa_encode(sample))
        rel_mse = float(((decoded - sample) ** 2).sum(1).mean() / (sample ** 2).sum(1).mean())
        rows.append({"code": f"pca{args.dim} + {code}", "bytes": int(index.sa_code_size()), "recall": recall(found, truth),
                     "rel_mse": rel_mse, "seconds": round(time.perf_counter() - t, 1)})
    head = (f"recall@{args.k} against exact {db.shape[1]}-d search: the first {args.rows:,} keys of "
            f"{args.datastore} as the database, the next {args.queries:,} as queries; projection "
            f"{db.shape[1]} -> {args.dim} ({100 * proj.explained_variance:.1f}% of the variance); codes "
            f"trained on {min(args.train_rows, args.rows):,} rows; `rel MSE`: squared reconstruction error over "
            f"the squared norm (projected space); seconds: train + add + search on this machine\n\n")
    write_results("quantisers", {"datastore": args.datastore, "rows": args.rows, "queries": args.queries,
                                 "dim": args.dim, "k": args.k, "explained_variance": proj.explained_variance,
                                 "results": rows},
                  head + markdown_table(rows, [("code", "code", ""), ("bytes", "B/entry", "d"),
                                               ("recall", f"recall@{args.k}", ".3f"), ("rel_mse", "rel MSE", ".4f"),
                                               ("seconds", "seconds", ".1f")]))


if __name__ == "__main__":
    main()
