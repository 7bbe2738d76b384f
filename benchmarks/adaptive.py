"""Do no harm: fixed λ vs ``--lambda auto`` in and across domains, and what skipping searches buys.

    python benchmarks/adaptive.py --eval-tokens 20000 --speed-tokens 8000

Reuses paper.py's cached LM passes (pydocs and debref valid/test with both datastores'
neighbours). For every (datastore, test text) pair: base LM, the best fixed λ tuned on the
datastore's own valid split, ``--lambda auto`` with the per-token gate alone, and the full
``--lambda auto`` (gate + per-document trust), with the share of searches skipped.
Then timed ``evaluate()`` runs on a pydocs test prefix: base LM, fixed λ, and auto at its
stored skip threshold and at higher ones (the speed/perplexity trade-off).

Writes benchmarks/results/adaptive.{json,md,png}.
"""
from __future__ import annotations

import copy
import time

import numpy as np
from common import corpus_file, markdown_table, write_results
from paper import DOMAINS, arguments, auto_scores, fixed_ppl, neighbours, prepare

from knnlm_vdb.evaluate import evaluate
from knnlm_vdb.knn import perplexity


def do_no_harm_rows(data: dict, best: dict, cal: dict, entries: dict | None = None) -> list[dict]:
    """Per test text: each datastore under fixed λ, the gate alone and --lambda auto, then both
    datastores with per-domain λ; Δ% against the base LM. ``entries``: datastore sizes to report."""
    rows = []
    for corpus in DOMAINS:
        test = data[corpus, "test"]
        base = perplexity(test["lm_logprobs"])
        for store in (corpus, *[s for s in DOMAINS if s != corpus]):
            gate_only, _ = auto_scores(test, [store], [cal[store]], trust=False)
            auto, skipped = auto_scores(test, [store], [cal[store]])
            rows.append({"test": corpus, "datastore": store, "entries": (entries or {}).get(store),
                         "relation": "in-domain" if store == corpus else "cross-domain", "base": base,
                         "fixed": fixed_ppl(neighbours(test, store), best[store, store]), "gate_only": gate_only,
                         "auto": auto, "skipped": skipped})
        auto, skipped = auto_scores(test, list(DOMAINS), [cal[s] for s in DOMAINS])
        rows.append({"test": corpus, "datastore": "both", "relation": "per-domain λ", "base": base,
                     "auto": auto, "skipped": skipped})
    for r in rows:
        for key in ("fixed", "gate_only", "auto"):
            if r.get(key) is not None:
                r[f"{key}_delta"] = 100 * (r[key] / r["base"] - 1)
    return rows


def row_columns(entries: bool = False) -> list[tuple[str, str, str]]:
    return [("test", "test text", ""), ("datastore", "datastore", ""), *([("entries", "entries", ",")] if entries else []),
            ("relation", "", ""), ("base", "base LM", ".3f"), ("fixed", "fixed λ (own valid)", ".3f"),
            ("fixed_delta", "Δ%", "+.2f"), ("gate_only", "auto, gate only", ".3f"),
            ("gate_only_delta", "Δ%", "+.2f"), ("auto", "--lambda auto", ".3f"),
            ("auto_delta", "Δ%", "+.2f"), ("skipped", "searches skipped", ".0%")]


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--speed-tokens", type=int, default=8_000, help="pydocs test tokens for the timed evals")
    ap.add_argument("--skip-quantiles", default="0.5,0.7,0.85,0.95", help="extra skip thresholds: quantiles of the "
                                                                "pre-search gate's λ on pydocs valid")
    args = ap.parse_args()
    t_start = time.perf_counter()
    enc, stores, data, best, cal = prepare(args)

    rows = do_no_harm_rows(data, best, cal)

    # timed: the skip threshold trades searches for perplexity
    valid = data["pydocs", "valid"]
    pre = cal["pydocs"].pre(None, valid["lm_entropy"], valid["lm_max_logprob"])
    ids = enc.tokenize(corpus_file("pydocs", "test").read_text())[: args.speed_tokens + 1]
    b = best["pydocs", "pydocs"]
    runs = [{"run": "base LM", **evaluate(enc, ids, show_progress=False).to_dict()}]
    runs.append({"run": f"fixed λ={b['lambda']} k={b['k']}", **evaluate(
        enc, ids, [stores["pydocs"]], k=b["k"], temperature=b["temperature"], lmbda=b["lambda"],
        show_progress=False).to_dict()})
    thresholds = [("auto (stored threshold)", cal["pydocs"].skip_below)]
    thresholds += [(f"auto, skip below the valid {q:.0%} quantile", float(np.quantile(pre, q)))
                   for q in (float(x) for x in args.skip_quantiles.split(",") if x.strip())]
    for name, tau in thresholds:
        c = copy.deepcopy(cal["pydocs"])
        c.skip_below = tau
        runs.append({"run": name, "skip_below": tau,
                     **evaluate(enc, ids, [stores["pydocs"]], calibration=c, show_progress=False).to_dict()})
    base_speed = runs[0]["base_tokens_per_s"]
    fixed_speed = runs[1]["knnlm_tokens_per_s"]
    for r in runs:
        r["ppl"] = r["knnlm_ppl"] if r.get("knnlm_ppl") is not None else r["base_ppl"]
        r["tokens_per_s"] = r["knnlm_tokens_per_s"] if r.get("knnlm_ppl") is not None else r["base_tokens_per_s"]
        r["vs_fixed"] = r["tokens_per_s"] / fixed_speed
        r["vs_base_lm"] = r["tokens_per_s"] / base_speed
        r["skipped"] = 1 - r["searched_fraction"] if "searched_fraction" in r else None

    table = markdown_table(rows, row_columns())
    table += f"\n\nTimed on the first {runs[0]['tokens']:,} tokens of pydocs test (one process, the search of a block " \
             "overlapping the LM's next block):\n\n"
    table += markdown_table(runs, [("run", "run", ""), ("ppl", "perplexity", ".3f"), ("skipped", "searches skipped", ".0%"),
                                   ("retrieval_seconds", "search s (CPU, overlapped)", ".1f"),
                                   ("tokens_per_s", "tokens/s", ".0f"), ("vs_fixed", "× fixed λ", ".2f"),
                                   ("vs_base_lm", "× base LM", ".2f")])
    plot(runs)
    write_results("adaptive", {"args": vars(args), "rows": rows, "timed": runs,
                               "calibration": {s: c.to_dict() for s, c in cal.items()},
                               "seconds": time.perf_counter() - t_start}, table)


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import RESULTS

    fig, ax = plt.subplots(figsize=(6, 3.8))
    auto = [r for r in runs if r["run"].startswith("auto")]
    ax.plot([r["tokens_per_s"] for r in auto], [r["ppl"] for r in auto], marker="o", label="--lambda auto, more skipping →")
    for r in runs:
        if not r["run"].startswith("auto"):
            ax.scatter([r["tokens_per_s"]], [r["ppl"]], marker="s", label=r["run"])
    ax.set_xlabel("tokens/s (pydocs test, 2 CPU cores)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "adaptive.png", dpi=110)


if __name__ == "__main__":
    main()
