"""Can the continuation-quality comparison of ``generate.py`` tell its systems apart, and where does
each system's change come from?

    python benchmarks/generate_power.py results/generate-quality-408k-forced.json [more results ...] [--json]

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
from paired_stats import detectable_pct, halfwidth_pct, interval_text, paired_interval, prompts_for, spread

MEASURES = (  # (name, per-prompt counts of a result row)
    ("free-running matches", lambda r: r["matches_per_prompt"]),
    ("before the first miss", lambda r: r["prefix_per_prompt"]),
    ("after the first miss", lambda r: np.subtract(r["matches_per_prompt"], r["prefix_per_prompt"])),
    ("fed the truth: top-1", lambda r: r.get("forced_hits_per_prompt")),
)


def split_tokens(run: dict) -> int:
    """The prompt split's length in tokens: recorded by newer runs, else tokenized here by the
    encoder generate.py tokenized it with (loading the model for its tokenizer: seconds)."""
    if "split_tokens" in run:
        return int(run["split_tokens"])
    from knnlm_vdb.encoder import Encoder
    from knnlm_vdb.lm import load_lm

    enc = Encoder(load_lm(run["args"]["model"], device="cpu", dtype="float32"))
    return len(enc.tokenize(corpus_file("pydocs", run["args"].get("split", "test")).read_text()))


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
                "ci95_pct": [lo, hi], "ci": interval_text(lo, hi), "better": int((ours > theirs).sum()),
                "worse": int((ours < theirs).sum()), "relative_sd": rel_sd,
                "halfwidth_pct": halfwidth_pct(rel_sd, n), "split_prompts": most,
                "split_halfwidth_pct": halfwidth_pct(rel_sd, most),
                "split_detectable_pct": detectable_pct(rel_sd, most), "prompts_for_1pct": prompts_for(rel_sd, 1.0)})
    return rows


def read_run(path: Path) -> dict:
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable results file ({e})")
    if not run.get("quality") or "prefix_per_prompt" not in run["quality"][0]:
        raise SystemExit(f"{path}: no per-prompt quality counts (a generate.py run without --skip-quality)")
    return run


def pooled(runs: list[dict], names: list[str]) -> dict:
    """One run of all the runs' prompts (the same systems, context and new tokens; e.g. ``--shift 0.5``
    beside the usual set): their per-prompt counts joined, so the pair is judged on both sets."""
    first = runs[0]
    for run, name in zip(runs[1:], names[1:]):
        same = all(run["args"].get(k) == first["args"].get(k) for k in ("context", "new_tokens", "split", "model"))
        if not same or [r["system"] for r in run["quality"]] != [r["system"] for r in first["quality"]]:
            raise SystemExit(f"{name}: other systems, context, new tokens or split than {names[0]}; cannot pool")
    quality = []
    for rows in zip(*(run["quality"] for run in runs)):
        joined = dict(rows[0])
        for key in ("matches_per_prompt", "prefix_per_prompt", "forced_hits_per_prompt"):
            parts = [r.get(key) for r in rows]
            joined[key] = None if any(p is None for p in parts) else [x for p in parts for x in p]
        quality.append(joined)
    return {**first, "quality": quality}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="generate.py results JSON with per-prompt counts (its quality part); "
                                               "several: their prompts are pooled")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    paths = [Path(p) for p in args.results]
    runs = [read_run(p) for p in paths]
    run = pooled(runs, [p.name for p in paths]) if len(runs) > 1 else runs[0]
    tokens = split_tokens(run)
    rows = power_rows(run, tokens)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    a = run["args"]
    source = " + ".join(p.name for p in paths)
    table = (
        f"**How many prompts the comparison needs** ({source}: {rows[0]['prompts']} prompts of {a['context']} "
        f"tokens from pydocs {a.get('split', 'test')}, {a['new_tokens']} new tokens; the split's {tokens:,} tokens "
        "hold "
        f"{rows[0]['split_prompts']:,} disjoint continuations).\n\n" + markdown_table(rows, [
            ("system", "system", ""), ("measure", "measure", ""), ("base", "base LM", ","),
            ("system_total", "this system", ","), ("delta_pct", "Δ %", "+.2f"), ("ci", "95% interval", ""),
            ("better", "prompts better", ""), ("worse", "worse", ""),
            ("halfwidth_pct", "± % here", ".1f"), ("split_halfwidth_pct", "± % whole split", ".1f"),
            ("split_detectable_pct", "detectable % whole split", ".1f"),
            ("prompts_for_1pct", "prompts for ±1%", ",")]))
    name = paths[0].stem + ("-pooled" if len(paths) > 1 else "") + "-power"
    write_results(name, {"source": [p.name for p in paths], "split_tokens": tokens, "rows": rows}, table)


if __name__ == "__main__":
    main()
