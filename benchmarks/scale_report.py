"""The scale benchmark's report: the results table (JSON + markdown) and the log-log plot of each
cost against datastore size, one line per index type."""
from __future__ import annotations

import logging

from common import RESULTS, markdown_table, write_results

log = logging.getLogger("scale")

PANELS = (("ingest_total_s", "ingest seconds (cumulative)"), ("build_s", "index build seconds"),
          ("rss_loaded_gib", "server RSS loaded (GiB)"), ("lat1024", "p50 latency of one search call, k=1024, largest nq (ms)"))


def plot_costs(rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, label) in zip(axes.flat, PANELS):
        for index in sorted({r["index"] for r in ok}):
            pts = []
            for r in ok:
                if r["index"] != index:
                    continue
                if key == "lat1024":  # the CLI's default k on a Milvus server
                    lat = sorted((int(k.split("nq")[1]), v["p50_ms"]) for k, v in r.items()
                                 if k.startswith("k1024_nq") and isinstance(v, dict))
                    value = lat[-1][1] if lat else None
                else:
                    value = r.get(key)
                if value:
                    pts.append((r["size"], value))
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=index)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entries")
        ax.set_title(label + (" (shared by all indexes)" if key == "ingest_total_s" else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Milvus standalone: cost vs datastore size (log-log)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


def table(rows: list[dict], args) -> str:
    cols = [("size", "entries", ","), ("index", "index", ""), ("status", "status", ""),
            ("ingest_entries_per_s", "ingest entries/s", ".0f"), ("build_s", "build s", ".1f"),
            ("load_s", "load s", ".1f"), ("rss_loaded_gib", "server RSS GiB", ".2f"),
            ("rss_peak_gib", "peak RSS GiB", ".2f"), ("loaded_bytes_per_entry", "loaded B/entry", ".0f"),
            ("index_file_bytes_per_entry", "index file B/entry", ".0f")]
    flat = []
    for r in rows:
        f = dict(r)
        for k in args.ks:
            for nq in args.nqs:
                m = r.get(f"k{k}_nq{nq}")
                f[f"lat{k}_{nq}"] = None if m is None else f"{m['p50_ms']:.0f} / {m['p99_ms']:.0f}"
            f[f"rec{k}"] = r.get(f"recall@{k}")
        if r.get("status") == "skipped":
            f["status"] = f"skipped: {r['reason']}"
        flat.append(f)
    for k in args.ks:
        cols += [(f"lat{k}_{nq}", f"k={k} nq={nq} p50/p99 ms", "") for nq in args.nqs]
        cols.append((f"rec{k}", f"recall@{k}", ".3f"))
    return markdown_table(flat, cols)


def save(args, recipe: dict, meta: dict, rows: list[dict]) -> None:
    title = (f"**Scale on one Milvus {meta.get('server_version', '2.3')} standalone server** "
             f"(`{meta['command']}`): {recipe['dim']}-d keys = {recipe['projection']} of {recipe['real_keys']:,} "
             f"real {recipe['real_dim']}-d keys, resampled with Gaussian noise of norm {recipe['noise_ratio']} × "
             f"the median nearest-neighbour distance; {len(args.queries_np)} held-out queries. "
             f"Ingest: pymilvus insert of {args.batch:,}-row batches + flush. Latency: wall time of one search "
             f"call (Session consistency). Machine: {meta['cpus']} CPU cores shared with other work, "
             f"{meta['mem_gib']:.0f} GiB RAM.\n\n")
    sweep = [{"size": r["size"], "index": r["index"], "nprobe": p, **{f"rec{k}": m.get(f"recall@{k}") for k in args.ks},
              **{f"lat{k}": f"{m[f'k{k}_nq{args.nqs[-1]}']['p50_ms']:.0f}" for k in args.ks}}
             for r in rows for p, m in r.get("nprobe_sweep", {}).items()]
    sweep_table = ""
    if sweep:
        sweep_table = (f"\n\nIVF nprobe sweep (nlist {args.nlist} per segment; p50 ms at nq={args.nqs[-1]}):\n\n"
                       + markdown_table(sweep, [("size", "entries", ","), ("index", "index", ""), ("nprobe", "nprobe", "")]
                                        + [(f"rec{k}", f"recall@{k}", ".3f") for k in args.ks]
                                        + [(f"lat{k}", f"k={k} p50 ms", "") for k in args.ks]))
    write_results(args.name, {"args": {k: v for k, v in vars(args).items() if not k.endswith("_np")},
                              "keys": recipe, "machine": meta, "rows": rows}, title + table(rows, args) + sweep_table)
    try:
        plot_costs(rows, args.name)
    except Exception as exc:  # a plot must never cost the measurements
        log.warning("plot failed: %s", exc)
