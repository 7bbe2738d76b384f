"""The scale benchmark's log-log plot: each cost against datastore size, one line per index type."""
from __future__ import annotations

from common import RESULTS

PANELS = (("ingest_total_s", "ingest seconds (cumulative)"), ("build_s", "index build seconds"),
          ("rss_loaded_gib", "server RSS loaded (GiB)"), ("lat64", "p50 latency k=64, largest nq (ms)"))


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
                if key == "lat64":
                    lat = sorted((int(k.split("nq")[1]), v["p50_ms"]) for k, v in r.items()
                                 if k.startswith("k64_nq") and isinstance(v, dict))
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
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Milvus standalone: cost vs datastore size (log-log)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
