"""Do no harm at full size: adaptive.py's table with whole-train-split datastores (a GPU run).

    python benchmarks/adaptive_full.py [--train-tokens 0] [--eval-tokens 20000] [--batch-size 16]

Both corpora's whole train splits become datastores (pydocs 2.3M entries, debref 71k), kept
in memory on the encoder's device and searched exactly with torch (key_types.exact_topk), so
no FAISS or Milvus is needed; then the same fits and the same scoring as paper.py/adaptive.py
(fixed λ tuned on the datastore's own valid prefix, the gate alone, the full --lambda auto).
On 2 CPU cores the encoding alone would take hours: this is meant for a GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, corpus_file, markdown_table, setup_logging, write_results
from key_types import encode, exact_topk
from adaptive import do_no_harm_rows, row_columns
from paper import DOMAINS, K, fit

from knnlm_vdb.encoder import Encoder
from knnlm_vdb.lm import load_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-tokens", type=int, default=0, help="cap on each datastore (0 = whole train split)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="cap on each valid/test split (0 = all)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--query-batch", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args()
    setup_logging()
    import common

    common.RESULTS = Path(args.results_dir)
    t_start = time.perf_counter()
    enc = Encoder(load_lm(args.model, dtype=args.dtype), ctx=args.ctx, stride=args.stride, batch_size=args.batch_size)
    timings = {}

    def ids_of(corpus: str, split: str, cap: int) -> list[int]:
        text = corpus_file(corpus, split).read_text()
        return enc.tokenize(text[: 16 * (cap + 1)] if cap else text)[: cap + 1 if cap else None]

    stores = {}
    for name in DOMAINS:
        t = time.perf_counter()
        stores[name] = encode(enc, ids_of(name, "train", args.train_tokens), with_logprobs=False)
        timings[f"{name}_encode_s"] = time.perf_counter() - t
    data = {}
    for corpus in DOMAINS:
        for split in ("valid", "test"):
            part = encode(enc, ids_of(corpus, split, args.eval_tokens), with_logprobs=True)
            out = {k: v for k, v in part.items() if k != "keys"}
            for name, store in stores.items():
                dist, rows = exact_topk(store["keys"], part["keys"], K, args.query_batch)
                out[f"dist_{name}"], out[f"vals_{name}"] = dist, store["targets"][rows]
            data[corpus, split] = out
    timings["search_done_s"] = time.perf_counter() - t_start
    best, cal = fit(data)

    rows = do_no_harm_rows(data, best, cal, entries={name: len(st["targets"]) for name, st in stores.items()})
    table = markdown_table(rows, row_columns(entries=True))
    write_results("adaptive-full", {"args": vars(args), "device": enc.lm.device, "rows": rows, "timings": timings,
                                    "tuned": {f"{s}|{c}": v for (s, c), v in best.items()},
                                    "calibration": {s: c.to_dict() for s, c in cal.items()},
                                    "seconds": time.perf_counter() - t_start}, table)
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
