"""kNN-LM generation: decode speed against the base model's ``generate``, and continuation quality.

    python benchmarks/generate.py --pydocs cache/gen-pydocs-120000-flat --debref cache/gen-debref-all-flat \
        [--prompts 200 --context 512 --new-tokens 32] [--speed-prompts 8 --speed-context 128 --speed-tokens 64] \
        [--systems faiss-ivfpq,lite-hnsw,server-hnsw]

The datastores are FAISS directories built and tuned by the CLI (``knnlm-vdb build`` + ``tune``;
see ``make bench``), so they carry their tuned k, T, λ and the ``--lambda auto`` calibration.

1. **Decode speed** (greedy): kNN-LM ``KnnLM.generate`` tokens/s against ``model.generate`` on the
   same prompts in the same run, batch 1 and 8, fixed λ (the tuned setting) and ``--lambda auto``,
   through FAISS IVFPQ (a trained copy of the pydocs datastore), Milvus Lite HNSW, the same Lite
   domain read through its in-process mirror (``mirror=True``: exact search of a copy read once; the
   read's seconds are reported, not counted in tokens/s) and a Milvus standalone server HNSW (rows
   copied from the same datastore; the server is started here).
2. **Continuation quality**: prompts of ``--context`` tokens at evenly spaced offsets of pydocs
   test, greedy ``--new-tokens`` tokens, compared with the true continuation: token accuracy
   (same token at the same position) and mean matched-prefix length, for the base LM, fixed λ
   and auto, with the pydocs datastore (in domain) and the debref datastore (foreign), exact
   FAISS search. The prompt's forward runs once per batch and its KV cache is shared by every
   system (a copy each); a check on the first batch asserts this equals uncached generation.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CACHE, corpus_file, markdown_table, parse_systems, setup_logging, stop_on_sigterm, write_results
from milvus_vs_faiss import load_rows
from paired_stats import interval_text, paired_interval

from knnlm_vdb.api import KnnLM
from knnlm_vdb.datastore import open_store
from knnlm_vdb.datastore.faiss_store import FaissDatastore
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.lm import load_lm

log = logging.getLogger("generate")
SYSTEMS = ("faiss-ivfpq", "lite-hnsw", "lite-mirror", "server-hnsw")
NAMES = {"faiss-ivfpq": "FAISS IVFPQ", "lite-hnsw": "Milvus Lite HNSW", "lite-mirror": "Milvus Lite, mirror=True",
         "server-hnsw": "Milvus server HNSW"}


def arguments():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pydocs", required=True, help="FAISS datastore of pydocs train (built and tuned)")
    ap.add_argument("--debref", help="FAISS datastore of debref train (built and tuned; for the foreign quality rows)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=1024, help="the encoder's window (prompts keep their last ctx tokens)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--speed-prompts", type=int, default=8)
    ap.add_argument("--speed-context", type=int, default=128)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--speed-ks", default="tuned,64", help="k values of the fixed-λ speed runs ('tuned': the tuned k)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--quality-stores", default="pydocs,debref",
                    help="datastores the quality part decodes with (the base LM always runs)")
    ap.add_argument("--split", choices=("test", "valid"), default="test",
                    help="pydocs split the continuation prompts come from (valid: for choosing settings)")
    ap.add_argument("--shift", type=float, default=0.0,
                    help="in [0, 1): take the --prompts - 1 prompts this far into each gap between the usual ones "
                         "(0.5: a second set whose continuations lie between the first set's)")
    ap.add_argument("--kinds", default="fixed,auto,auto-nocache",
                    help="kNN-LM systems of the quality part, a subset of fixed,auto,auto-nocache (the base LM always runs)")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="also feed each system the true continuation and record its top-1 accuracy and "
                         "perplexity there: next-token prediction without the drift of free-running decoding")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--work-dir", default=str(CACHE / "generate-bench"))
    ap.add_argument("--name", default="generate")
    return ap.parse_args()


def prompts_of(ids: list[int], n: int, context: int, new: int,
               shift: float = 0.0) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, true continuation) pairs at evenly spaced offsets of one token stream, the
    first at its start and the last at its end; ``shift`` > 0: the ``n - 1`` pairs that far into
    each gap between those (0.5: another set whose continuations lie between theirs)."""
    last = len(ids) - context - new
    starts = np.linspace(0, last, n)
    if shift:
        starts = starts[:-1] + shift * (starts[1] - starts[0])
    starts = starts.astype(int)
    return [(ids[s:s + context], ids[s + context:s + context + new]) for s in starts]


def greedy_base(lm: KnnLM, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    """The base model's own ``generate`` (no processor): continuations and wall seconds."""
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return out[:, ids.shape[1]:].tolist(), time.perf_counter() - t


def speed(lm: KnnLM, prompts: list[list[int]], new: int, batch: int, lmbda, k: int) -> dict:
    """Greedy tokens/s of kNN-LM decoding and of the base generate, same prompts, interleaved per batch."""
    base_s = knn_s = 0.0
    searched = total = 0
    knn = {"lmbda": "auto"} if lmbda == "auto" else {"lmbda": lmbda, "k": k}
    greedy_base(lm, prompts[:batch], 2)  # warm-up: first calls pay for allocations and index loading
    lm.generate(prompts[0] if batch == 1 else prompts[:batch], max_new_tokens=2, **knn)
    for i in range(0, len(prompts), batch):
        part = prompts[i:i + batch]
        _, s = greedy_base(lm, part, new)
        base_s += s
        steps = []
        t = time.perf_counter()
        lm.generate(part[0] if batch == 1 else part, max_new_tokens=new, on_step=steps.append, **knn)
        knn_s += time.perf_counter() - t
        searched += sum(s.searched for row in steps for s in row)
        total += sum(len(row) for row in steps)
    base_rate, knn_rate = len(prompts) * new / base_s, total / knn_s  # kNN-LM decoding may stop at an EOS
    return {"base_tokens_per_s": base_rate, "knn_tokens_per_s": knn_rate, "ratio": knn_rate / base_rate,
            "searched": searched / max(1, total)}


# kind -> (row label, KnnLM.settings overrides; None: the store's tuned k, T, λ). auto-nocache: what
# the in-document cache adds to auto
KINDS = {"fixed": ("fixed λ (tuned)", None), "auto": ("--lambda auto", {"lmbda": "auto"}),
         "auto-nocache": ("--lambda auto --no-cache", {"lmbda": "auto", "cache": False})}


def prompted(lm: KnnLM, settings, ids, keys, hidden, read_by=None):
    """A processor for one ``generate`` over ``ids`` whose prefill states (``keys``, ``hidden``) are
    already computed: with adaptive λ it reads the prompt from them, as ``generate`` would.
    ``read_by``: a processor that has read this prompt already; its trust and in-document caches
    are shared (decoding only searches them), so the prompt — one datastore search per position,
    most of a batch's time on an exact store — is read once per system."""
    proc = lm.logits_processor(settings=settings)
    if settings.adaptive:
        if read_by is None:
            proc.scales = proc.read_prompt(ids, keys, hidden, start=0)
        else:
            proc.scales, proc.caches = read_by.scales, read_by.caches
    return proc


def teacher_forced(model, proc, ids, truth, cache) -> tuple[np.ndarray, np.ndarray]:
    """Feed the true continuation ``truth`` [B, n] after ``ids`` (whose last token ``cache`` has not
    seen), one cached forward per token as ``generate`` runs them, through ``proc``; -> whether the
    mixture's top token is the true one and the true token's log-probability, both [B, n]."""
    seq, tok, hits, logps = ids, ids[:, -1:], [], []
    with torch.inference_mode():
        for t in range(truth.shape[1]):
            out = model(tok, cache=cache, use_cache=True)
            cache = out.past_key_values
            scores = torch.log_softmax(proc(seq, out.logits[:, -1, :]).float(), -1)
            hits.append((scores.argmax(-1) == truth[:, t]).numpy())
            logps.append(scores.gather(1, truth[:, t:t + 1])[:, 0].numpy())
            tok = truth[:, t:t + 1]
            seq = torch.cat([seq, tok], 1)
    return np.stack(hits, 1), np.stack(logps, 1)


def quality(enc: Encoder, stores: dict, pairs, new: int, batch: int, kinds=tuple(KINDS),
            forced: bool = False) -> list[dict]:
    """Token accuracy and matched-prefix length of greedy continuations, per system (and with
    ``forced`` the top-1 accuracy and perplexity of each system fed the true continuation)."""
    lms = {name: KnnLM(enc, [store]) for name, store in stores.items()}
    systems = [("base LM", None, {"lmbda": 0.0})] + [
        (f"{name}, {KINDS[kind][0]}", name, KINDS[kind][1]) for name in stores for kind in kinds
        if kind != "auto-nocache" or "cache_calibration" in stores[name].info.extra]
    acc = {s[0]: [] for s in systems}
    prefix = {s[0]: [] for s in systems}
    searched = {s[0]: [0, 0] for s in systems}
    seconds = {s[0]: 0.0 for s in systems}
    forced_hits = {s[0]: [] for s in systems}
    forced_logp = {s[0]: [] for s in systems}
    cache_check = {}
    model = enc.lm.model
    t_start = time.perf_counter()
    for i in range(0, len(pairs), batch):
        part = pairs[i:i + batch]
        ids = torch.tensor([p for p, _ in part])
        with torch.inference_mode():
            out = model(ids[:, :-1], use_cache=True)
        cache = out.past_key_values
        keys, hidden = (t.clone() for t in enc.captured())
        for label, name, overrides in systems:
            lm = lms[name] if name else next(iter(lms.values()))
            if overrides is not None:
                settings = lm.settings(**overrides)
            else:
                t = stores[name].info.extra["tuned"]
                settings = lm.settings(k=t["k"], temperature=t["temperature"], lmbda=t["lambda"])
            proc = prompted(lm, settings, ids, keys, hidden)
            if forced:  # a processor of its own (each keeps its step count) that shares proc's prompt read
                truth = torch.tensor([t for _, t in part])
                fed = prompted(lm, settings, ids, keys, hidden, read_by=proc)
                h, lp = teacher_forced(model, fed, ids, truth, copy.deepcopy(cache))
                forced_hits[label].extend(h.sum(1).tolist())
                forced_logp[label].extend(lp.sum(1).tolist())
            steps = []
            from knnlm_vdb.generate import StepStreamer

            t = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), cache=copy.deepcopy(cache),
                                     max_new_tokens=new, min_new_tokens=new, do_sample=False, logits_processor=[proc],
                                     pad_token_id=enc.lm.tokenizer.eos_token_id,
                                     streamer=StepStreamer(proc, steps.append))
            seconds[label] += time.perf_counter() - t
            if i == 0 and name:  # the shared prefill against plain generate: same first-step distribution
                one = lm.generate(part[0][0], max_new_tokens=1, settings=settings)
                cache_check[label] = abs(one.steps[0].prob - steps[0][0].prob)
            for row, (_, truth) in enumerate(part):
                got = gen[row, ids.shape[1]:].tolist()
                same = np.array(got[:len(truth)]) == np.array(truth)
                acc[label].append(float(same.mean()))
                prefix[label].append(int(np.argmin(same)) if not same.all() else len(truth))
            searched[label][0] += sum(s.searched for row in steps for s in row)
            searched[label][1] += sum(len(row) for row in steps)
        log.info("quality: %d / %d prompts (%.0fs)", min(i + batch, len(pairs)), len(pairs),
                 time.perf_counter() - t_start)
    base_acc = float(np.mean(acc["base LM"]))
    rows = []
    for label, name, _ in systems:
        a = float(np.mean(acc[label]))
        lo, hi = paired_interval(acc[label], acc["base LM"])
        rows.append({"system": label, "datastore": name or "–", "token_accuracy": a,
                     "delta_vs_base_pct": 100 * (a / base_acc - 1), "delta_ci95_pct": [lo, hi],
                     "matched_prefix": float(np.mean(prefix[label])),
                     "matches_per_prompt": [round(x * new) for x in acc[label]], "prefix_per_prompt": prefix[label],
                     "searched": searched[label][0] / max(1, searched[label][1]) if name else None,
                     "decode_seconds": seconds[label], "prefill_check_abs_dprob": cache_check.get(label)})
        if forced:
            hits, base_hits = np.asarray(forced_hits[label]), np.asarray(forced_hits["base LM"])
            lo, hi = paired_interval(hits, base_hits)
            rows[-1].update({
                "forced_accuracy": float(hits.sum() / (len(hits) * new)),
                "forced_delta_vs_base_pct": 100 * (hits.sum() / base_hits.sum() - 1), "forced_delta_ci95_pct": [lo, hi],
                "forced_ppl": float(np.exp(-np.sum(forced_logp[label]) / (len(hits) * new))),
                "forced_hits_per_prompt": hits.tolist()})
    return rows


def main() -> None:
    args = arguments()
    setup_logging()
    stop_on_sigterm()
    systems = parse_systems(args.systems, SYSTEMS)
    t0 = time.perf_counter()
    enc = Encoder(load_lm(args.model, device="cpu", dtype="float32"), ctx=args.ctx, stride=args.ctx // 2,
                  batch_size=2)
    chosen = [s for s in args.quality_stores.split(",") if s]
    if not chosen or set(chosen) - {"pydocs", "debref"}:
        raise SystemExit(f"--quality-stores: a comma-separated subset of pydocs,debref, not {args.quality_stores!r}")
    if "debref" in chosen and not args.skip_quality and not args.debref:
        raise SystemExit("--debref is needed for the foreign quality rows (or --quality-stores pydocs)")
    loaded = {"pydocs": FaissDatastore(args.pydocs), **({"debref": FaissDatastore(args.debref)} if args.debref else {})}
    for s in loaded.values():
        if "calibration" not in s.info.extra:
            raise SystemExit(f"{s.path} is not tuned: run `knnlm-vdb tune` on it first (see make bench)")
    pydocs = loaded["pydocs"]
    test_ids = enc.tokenize(corpus_file("pydocs", "test").read_text())
    payload = {"args": vars(args), "entries": {n: s.count() for n, s in loaded.items()},
               "tuned": {n: s.info.extra["tuned"] for n, s in loaded.items()}}
    tables = {}

    def save():  # after each part: a later failure keeps what was measured
        payload["seconds"] = time.perf_counter() - t0
        write_results(args.name, payload, "\n\n".join(tables[p] for p in ("quality", "speed") if p in tables))

    if not args.skip_speed:
        rows = run_speed(args, enc, pydocs, test_ids, systems)
        payload["speed"] = rows
        tables["speed"] = (
            f"**Decode speed** (greedy, {args.speed_prompts} prompts of {args.speed_context} tokens, "
            f"{args.speed_tokens} new tokens each; pydocs datastore, {pydocs.count():,} entries): "
            "kNN-LM tokens/s against the base model's `generate` in the same run.\n\n" + markdown_table(rows, [
                ("system", "system", ""), ("lambda", "λ", ""), ("k", "k", ""), ("batch", "batch", ""),
                ("base_tokens_per_s", "base tokens/s", ".1f"), ("knn_tokens_per_s", "kNN-LM tokens/s", ".1f"),
                ("ratio", "× base", ".2f"), ("searched", "searched", ".0%")]
                + ([("mirror_read_s", "mirror read s", ".1f")] if any("mirror_read_s" in r for r in rows) else [])))
        save()
    if not args.skip_quality:
        ids = test_ids if args.split == "test" else enc.tokenize(corpus_file("pydocs", "valid").read_text())
        if not 0.0 <= args.shift < 1.0 or (args.shift and args.prompts < 2):
            raise SystemExit(f"--shift: a fraction in [0, 1) of the spacing of at least 2 prompts, not {args.shift}")
        pairs = prompts_of(ids, args.prompts, args.context, args.new_tokens, args.shift)
        payload["split_tokens"] = len(ids)  # how many prompts the split could give (generate_power.py)
        kinds = [k for k in args.kinds.split(",") if k]
        if not kinds or set(kinds) - set(KINDS):
            raise SystemExit(f"--kinds: a comma-separated subset of {','.join(KINDS)}, not {args.kinds!r}")
        rows = quality(enc, {s: loaded[s] for s in chosen}, pairs, args.new_tokens, args.batch_size, kinds,
                       args.teacher_forced)
        payload["quality"] = rows
        for r in rows:
            for key in ("delta", "forced_delta"):
                if f"{key}_ci95_pct" in r:
                    r[f"{key}_ci"] = "–" if r["datastore"] == "–" else interval_text(*r[f"{key}_ci95_pct"])
        role = {"pydocs": "in domain", "debref": "foreign"}
        described = " and ".join(f"{s} ({loaded[s].count():,} entries, {role[s]})" for s in chosen)
        tables["quality"] = (
            f"**Continuation quality**: {len(pairs)} prompts of {args.context} tokens from pydocs {args.split}"
            + (f" ({args.shift:g} of the way between those of --prompts {args.prompts})" if args.shift else "") + ", "
            f"greedy {args.new_tokens} new tokens vs the true continuation; datastores {described}, exact "
            "FAISS search, tuned k/T/λ and calibrations.\n\n" + markdown_table(rows, [
                ("system", "system", ""), ("token_accuracy", "token accuracy", ".4f"),
                ("delta_vs_base_pct", "Δ vs base %", "+.2f"), ("delta_ci", "95% interval", ""),
                ("matched_prefix", "matched prefix", ".2f")]
                + ([("forced_accuracy", "fed the truth: top-1", ".4f"),
                    ("forced_delta_vs_base_pct", "its Δ %", "+.2f"), ("forced_delta_ci", "its 95% interval", ""),
                    ("forced_ppl", "fed the truth: ppl", ".3f")] if args.teacher_forced else [])
                + [("searched", "searched", ".0%"), ("decode_seconds", "decode s", ".0f")]))
        save()


def hnsw_options(k: int) -> dict:
    """The HNSW domain every Milvus system searches (ef at least k, or results are cut)."""
    return {"index_type": "HNSW", "index_params": {"M": 16, "efConstruction": 100}, "search_params": {"ef": max(64, k)},
            "consistency": "Strong"}


def run_speed(args, enc, pydocs, test_ids, systems) -> list[dict]:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prompts = [p for p, _ in prompts_of(test_ids, args.speed_prompts, args.speed_context, args.speed_tokens)]
    tuned = pydocs.info.extra["tuned"]
    ks = [int(tuned["k"]) if x == "tuned" else int(x) for x in args.speed_ks.split(",")]
    k = max(ks)
    stores, uris, server, mirror_read_s = {}, {}, None, None
    try:
        for system in systems:
            if system == "faiss-ivfpq":
                path = work / "pydocs-ivfpq"
                if not (path / "index.faiss").exists():
                    import shutil

                    shutil.rmtree(path, ignore_errors=True)
                    pydocs.copy_to(path, index="ivfpq")
                stores[system] = FaissDatastore(path)
            else:
                where = system.split("-")[0]
                if where == "server" and server is None:
                    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
                    from milvus_server import MilvusTestServer

                    server = MilvusTestServer(tempfile.mkdtemp(prefix="milvus-server-", dir=work))
                    server_uri = server.start(timeout_s=300)
                uri = str(work / "pydocs-lite.db") if where == "lite" else server_uri
                if system == "lite-mirror":  # one handle for every row: the copy is read once
                    load_rows(pydocs, uri, "pydocs", hnsw_options(k), batch=4096)[0].close()
                    stores[system] = open_store("milvus", uri, domain="pydocs", mirror=True)
                    t_read = time.perf_counter()
                    stores[system].mirror.current()
                    mirror_read_s = time.perf_counter() - t_read
                    continue
                # one search per token: Strong reads on a server wait for its next time tick, so
                # decoding reads a sealed domain with Bounded consistency (Lite answers at once)
                options = {**hnsw_options(k), "consistency": "Strong" if where == "lite" else "Bounded"}
                stores[system], _ = load_rows(pydocs, uri, "pydocs", options, batch=4096)
                uris[system] = (uri, options["consistency"])
        rows = []
        cal_k = int(pydocs.info.extra["calibration"]["k"])
        for system, store in stores.items():
            for batch in (1, 8):
                for lam, k_run in [(tuned["lambda"], k_) for k_ in ks] + [("auto", None)]:
                    lm, handle = KnnLM(enc, [store]), None
                    if system in uris:  # HNSW's ef follows this run's k: a larger ef costs search time
                        uri, consistency = uris[system]
                        handle = open_store("milvus", uri, domain="pydocs", consistency=consistency,
                                            search_params={"ef": max(64, k_run or cal_k)})
                        lm = KnnLM(enc, [handle])
                    r = speed(lm, prompts, args.speed_tokens, batch, lam, k_run)
                    if handle is not None:
                        handle.close()
                    rows.append({"system": NAMES[system], "lambda": lam, "k": pydocs.info.extra["calibration"]["k"] if lam == "auto" else k_run,
                                 "batch": batch, **r,
                                 **({"mirror_read_s": round(mirror_read_s, 1)} if system == "lite-mirror" else {})})
                    log.info("speed %s", rows[-1])
        return rows
    finally:
        for s in stores.values():
            s.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
