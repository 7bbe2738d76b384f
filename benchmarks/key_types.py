"""Which hidden state makes the best key: ``ffn_input`` vs ``final_hidden`` (paper, Table 4/§6).

    python benchmarks/key_types.py [--train-tokens 100000] [--eval-tokens 20000] [--sizes 25000,100000]

For each key type: encode the first ``--train-tokens`` targets of pydocs train as a datastore,
encode the first ``--eval-tokens`` of valid and test as queries, search exactly, tune k/T/λ on
valid (the same grid as ``knnlm-vdb tune``) and report test perplexity with those settings;
``--sizes`` adds perplexity against datastore size (prefixes of the same datastore).

Search is exact squared L2 computed with torch on the encoder's device (a GPU when there is
one), so the script needs neither FAISS nor Milvus and runs unchanged on a GPU machine:
candidates come from a float32 matrix product, and the distances of the top k are then
recomputed directly (the product form loses precision to cancellation).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, corpus_file, markdown_table, setup_logging, write_results  # noqa: E402
from knnlm_vdb.encoder import Encoder  # noqa: E402
from knnlm_vdb.evaluate import Neighbours, tune  # noqa: E402
from knnlm_vdb.knn import interpolate, knn_target_logprobs, perplexity  # noqa: E402
from knnlm_vdb.lm import load_lm  # noqa: E402
from knnlm_vdb.settings import KEY_TYPES  # noqa: E402

log = logging.getLogger("key_types")


def encode(enc: Encoder, ids: list[int], with_logprobs: bool):
    """Keys (on the encoder's device), targets and the LM's outputs for every target of ``ids``."""
    import torch

    parts: dict[str, list] = {}
    for block in enc.encode(ids, with_logprobs=with_logprobs):
        parts.setdefault("keys", []).append(torch.from_numpy(block.keys).to(enc.lm.device))
        parts.setdefault("targets", []).append(block.targets)
        if with_logprobs:
            for name in ("lm_logprobs", "lm_entropy", "lm_max_logprob"):
                parts.setdefault(name, []).append(getattr(block, name))
    out = {name: (torch.cat(v) if name == "keys" else np.concatenate(v)) for name, v in parts.items()}
    return out


def exact_topk(keys, queries, k: int, query_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 top-k of every query over ``keys`` (torch tensors on one device)."""
    k = min(k, len(keys))
    key_sq = (keys * keys).sum(1)
    dists, rows = [], []
    for i in range(0, len(queries), query_batch):
        q = queries[i:i + query_batch]
        approx = key_sq[None, :] - 2.0 * (q @ keys.T)  # |q|² is the same for every key of a row
        cand = approx.topk(k, dim=1, largest=False).indices
        exact = ((keys[cand] - q[:, None, :]) ** 2).sum(-1)
        exact, order = exact.sort(dim=1)
        dists.append(exact.cpu().numpy())
        rows.append(cand.gather(1, order).cpu().numpy())
    return np.concatenate(dists), np.concatenate(rows)


def neighbours(split: dict, store: dict, n: int, k: int, query_batch: int) -> Neighbours:
    dist, rows = exact_topk(store["keys"][:n], split["keys"], k, query_batch)
    return Neighbours(split["targets"], split["lm_logprobs"], dist, store["targets"][rows],
                      split["lm_entropy"], split["lm_max_logprob"])


def fixed_ppl(nb: Neighbours, best: dict) -> float:
    knn = knn_target_logprobs(nb.distances[:, :best["k"]], nb.values[:, :best["k"]], nb.targets, best["temperature"])
    return perplexity(interpolate(nb.lm_logprobs, knn, best["lambda"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="pydocs")
    ap.add_argument("--train-tokens", type=int, default=100_000, help="datastore size (0 = the whole train split)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="cap on the valid and test prefixes (0 = all)")
    ap.add_argument("--sizes", default="", help="comma-separated datastore sizes for a size curve per key type")
    ap.add_argument("--key-types", default=",".join(KEY_TYPES))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    ap.add_argument("--query-batch", type=int, default=256, help="queries per search step")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    ap.add_argument("--dtype", default="auto", help="model dtype (auto: float32 on CPU, float16 on GPU)")
    ap.add_argument("--name", default=None, help="results name (default key_types-<corpus>-<train tokens>)")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--oracle", action="store_true", help="also report test perplexity at the setting best for test")
    args = ap.parse_args()
    setup_logging()
    import benchmarks.common as common

    common.RESULTS = Path(args.results_dir)
    key_types = [t.strip() for t in args.key_types.split(",") if t.strip()]
    unknown = sorted(set(key_types) - set(KEY_TYPES))
    if unknown:
        raise SystemExit(f"unknown --key-types {', '.join(unknown)}; choose from {', '.join(KEY_TYPES)}")
    t_start = time.perf_counter()
    lm = load_lm(args.model, device=args.device or "auto", dtype=args.dtype)
    probe = Encoder(lm, ctx=args.ctx, stride=args.stride)
    text = {s: corpus_file(args.corpus, s).read_text() for s in ("train", "valid", "test")}
    if args.train_tokens:  # tokenising all 9 MB of pydocs train takes a minute; a token is < 16 characters
        text["train"] = text["train"][: 16 * (args.train_tokens + 1)]
    ids = {s: probe.tokenize(t) for s, t in text.items()}
    if args.train_tokens:
        ids["train"] = ids["train"][: args.train_tokens + 1]
    if args.eval_tokens:
        for s in ("valid", "test"):
            ids[s] = ids[s][: args.eval_tokens + 1]
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})

    rows, curves, timings = [], {}, {}
    for key_type in key_types:
        enc = Encoder(lm, key_type=key_type, ctx=args.ctx, stride=args.stride, batch_size=args.batch_size)
        t = time.perf_counter()
        store = encode(enc, ids["train"], with_logprobs=False)
        timings[f"{key_type}_encode_s"] = time.perf_counter() - t
        n = len(store["targets"])
        log.info("%s: %d entries encoded in %.0f s", key_type, n, timings[f"{key_type}_encode_s"])
        split = {s: encode(enc, ids[s], with_logprobs=True) for s in ("valid", "test")}
        t = time.perf_counter()
        valid = neighbours(split["valid"], store, n, 1024, args.query_batch)
        test = neighbours(split["test"], store, n, 1024, args.query_batch)
        timings[f"{key_type}_search_s"] = time.perf_counter() - t
        tuned = tune(valid)
        best = tuned["best"]
        base = perplexity(test.lm_logprobs)
        ppl = fixed_ppl(test, best)
        test_best = tune(test)["best"] if args.oracle else {"ppl": None, "k": None, "temperature": None, "lambda": None}
        rows.append({"key_type": key_type, "entries": n, "k": best["k"], "temperature": best["temperature"],
                     "lambda": best["lambda"], "valid_base": tuned["base_ppl"], "valid_knnlm": best["ppl"],
                     "test_base": base, "test_knnlm": ppl, "test_delta": 100 * (ppl / base - 1),
                     "test_oracle": test_best["ppl"], "test_oracle_setting": {k: test_best[k] for k in ("k", "temperature", "lambda")}})
        log.info("%s: test %.3f -> %.3f (k=%d T=%g λ=%g)", key_type, base, ppl, best["k"], best["temperature"], best["lambda"])
        curves[key_type] = []
        for size in [s for s in sizes if s < n] + [n]:
            nb = test if size == n else neighbours(split["test"], store, size, best["k"], args.query_batch)
            curves[key_type].append({"entries": size, "ppl": fixed_ppl(nb, best)})
        del store, split
        if lm.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    table = markdown_table(rows, [("key_type", "key", ""), ("entries", "entries", ","), ("k", "k", "d"),
                                  ("temperature", "T", "g"), ("lambda", "λ", "g"), ("valid_base", "valid base", ".3f"),
                                  ("valid_knnlm", "valid kNN-LM", ".3f"), ("test_base", "test base", ".3f"),
                                  ("test_knnlm", "test kNN-LM", ".3f"), ("test_delta", "Δ%", "+.2f"),
                                  ("test_oracle", "test, best setting for test", ".3f")])
    name = args.name or f"key_types-{args.corpus}-{args.train_tokens or 'all'}"
    plot(curves, Path(args.results_dir) / f"{name}.png", args.corpus)
    write_results(name, {"args": vars(args), "device": lm.device, "rows": rows, "curves": curves,
                         "timings": timings, "seconds": time.perf_counter() - t_start}, table)


def plot(curves: dict, path: Path, corpus: str) -> None:
    if not any(len(c) > 1 for c in curves.values()):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key_type, curve in curves.items():
        ax.plot([r["entries"] for r in curve], [r["ppl"] for r in curve], marker="o", label=key_type)
    ax.set_xscale("log")
    ax.set_xlabel("datastore entries")
    ax.set_ylabel(f"{corpus} test perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
