"""Can the continuation-quality comparison of ``generate.py`` tell its systems apart, and where does
each system's change come from?

    python benchmarks/generate_power.py results/generate-quality-408k-forced.json [--json]

From a run's per-prompt counts it reports, per system against the base LM and per measure:
the change and its paired-bootstrap 95% interval; the interval's half-width at the run's prompts
and at the most prompts the split holds (every ``--new-tokens`` continuation of it, disjoint, each
after its ``--context`` tokens); the smallest change those prompts detect with 80% power; and the
prompts a ±1% interval needs. Free-running matches are split into those before the first miss
(where the continuation still equals the truth, so each system predicts from true text) and those
after it (where it predicts from its own text and the reference has shifted).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import corpus_file, markdown_table, write_results
from paired_stats import detectable_pct, halfwidth_pct, paired_interval, prompts_for, spread

MEASURES = (  # (name, per-prompt counts of a result row)
    ("free-running matches", lambda r: r["matches_per_prompt"]),
    ("before the first miss", lambda r: r["prefix_per_prompt"]),
    ("after the first miss", lambda r: np.subtract(r["matches_per_prompt"], r["prefix_per_prompt"])),
    ("fed the truth: top-1", lambda r: r.get("forced_hits_per_prompt")),
)


def split_tokens(run: dict) -> int:
    """The prompt split's length in tokens: recorded by newer runs, else tokenized here as they do."""
    if "split_tokens" in run:
        return int(run["split_tokens"])
    from transformers import AutoTokenizer

    from knnlm_vdb.lm import resolve_model

    where, gguf = resolve_model(run["args"]["model"])
    tok = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    text = corpus_file("pydocs", run["args"].get("split", "test")).read_text()
    return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def power_rows(run: dict, tokens: int) -> list[dict]:
    """One row per (system, measure) of the run's quality rows, against its base LM row."""
    args = run["args"]
    quality = run["quality"]
    base = next(r for r in quality if r["datastore"] == "–")
    most = (tokens - args["context"]) // args["new_tokens"]
    rows = []
    for row in quality:
        if row is base:
            continue
        for measure, counts in MEASURES:
            ours, theirs = counts(row), counts(base)
            if ours is None or theirs is None:
                continue
            ours, theirs = np.asarray(ours), np.asarray(theirs)
            n, rel_sd = len(ours), spread(ours, theirs)
            lo, hi = paired_interval(ours, theirs)
            rows.append({
                "system": row["system"], "measure": measure, "prompts": n, "base": int(theirs.sum()),
                "system_total": int(ours.sum()), "delta_pct": 100 * (ours.sum() / theirs.sum() - 1),
                "ci95_pct": [lo, hi], "ci": f"{lo:+.1f} … {hi:+.1f}", "better": int((ours > theirs).sum()),
                "worse": int((ours < theirs).sum()), "relative_sd": rel_sd,
                "halfwidth_pct": halfwidth_pct(rel_sd, n), "split_prompts": most,
                "split_halfwidth_pct": halfwidth_pct(rel_sd, most),
                "split_detectable_pct": detectable_pct(rel_sd, most), "prompts_for_1pct": prompts_for(rel_sd, 1.0)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a generate.py results JSON with per-prompt counts (its quality part)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    path = Path(args.results)
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable results file ({e})")
    if not run.get("quality") or "prefix_per_prompt" not in run["quality"][0]:
        raise SystemExit(f"{path}: no per-prompt quality counts (a generate.py run without --skip-quality)")
    tokens = split_tokens(run)
    rows = power_rows(run, tokens)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    a = run["args"]
    table = (
        f"**How many prompts the comparison needs** ({path.name}: {rows[0]['prompts']} prompts of {a['context']} "
        f"tokens from pydocs {a.get('split', 'test')}, {a['new_tokens']} new tokens; the split's {tokens:,} tokens hold "
        f"{rows[0]['split_prompts']:,} disjoint continuations).\n\n" + markdown_table(rows, [
            ("system", "system", ""), ("measure", "measure", ""), ("base", "base LM", ","),
            ("system_total", "this system", ","), ("delta_pct", "Δ %", "+.2f"), ("ci", "95% interval", ""),
            ("better", "prompts better", ""), ("worse", "worse", ""),
            ("halfwidth_pct", "± % here", ".1f"), ("split_halfwidth_pct", "± % whole split", ".1f"),
            ("split_detectable_pct", "detectable % whole split", ".1f"),
            ("prompts_for_1pct", "prompts for ±1%", ",")]))
    write_results(path.stem + "-power", {"source": path.name, "split_tokens": tokens, "rows": rows}, table)


if __name__ == "__main__":
    main()
