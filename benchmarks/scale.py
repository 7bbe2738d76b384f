"""How a Milvus standalone server's costs grow with datastore size: ingest, index build, memory,
query latency and recall, for IVF_FLAT, IVF_SQ8, IVF_PQ and HNSW.

    nice -n 10 python benchmarks/scale.py --real-keys benchmarks/cache/gen-pydocs-120000-flat \\
        --sizes 1000000,3000000,10000000 --indexes IVF_SQ8,IVF_FLAT,HNSW,IVF_PQ --dim 64   (make bench-scale)

Starts its own server (PyPI ``milvus``, tests/milvus_server.py) on a free port with its data under
benchmarks/cache/scale-milvus/, and stops it on exit, Ctrl-C or SIGTERM. Keys are real keys
resampled with noise, optionally PCA-projected (``scale_data.py`` states the recipe; it is stored
in the results). Sizes are nested: one collection grows from size to size, and the exact ground
truth is streamed along with the inserts. At each size, for each index type: create the index on
the flushed rows, wait until it is built, load, search, release, drop the index.

Ingest goes through pymilvus ``insert`` into a collection with knnlm-vdb's row schema (id, key,
target, doc_id, position, plus its Trie index on doc_id): ``MilvusDatastore.add`` looks up every
id before upserting it (idempotent appends), and ``--probe-rows`` measures that path separately.
Results are written after every configuration (``scale_report.py``: benchmarks/results/<name>.{json,md,png});
configurations ruled out by ``--limits``, ``--max-server-gib`` or the ``--budget-min`` estimate
(linear growth from the last measured size) are recorded as skipped with the reason.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from common import CACHE, setup_logging, stop_on_sigterm
from scale_data import ExactTopK, make_keys, read_real_keys, recall
from scale_report import save

from knnlm_vdb.datastore.base import StoreInfo
from knnlm_vdb.datastore.milvus import MilvusDatastore, drop_domain, validate_index
from knnlm_vdb.datastore.milvus.connection import index_done, wait_for_index
from knnlm_vdb.datastore.milvus.create import ensure_doc_id_index

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from milvus_server import MilvusTestServer  # noqa: E402

log = logging.getLogger("scale")
INDEXES = ("IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW")
COLLECTION = "scale_bench"
GIB = 1 << 30
DOC_LEN = 512  # entries per synthetic document: doc_id / position payload like a real domain's


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the server's tree RSS every ``period`` s; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self.stopped = pid, period, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            try:
                self.peak = max(self.peak, tree_rss(self.pid))
            except psutil.Error:
                return

    def reset(self) -> None:
        self.peak = tree_rss(self.pid)


def dir_bytes(root: Path, name: str) -> int:
    """Bytes of all files below every directory called ``name`` under ``root``."""
    total = 0
    for d in root.rglob(name):
        if d.is_dir():
            total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return total


def create_collection(client, dim: int) -> None:
    """knnlm-vdb's row schema (``milvus/create.py``) without a vector index: the benchmark builds each one."""
    from knnlm_vdb.datastore.milvus.create import row_schema

    client.create_collection(COLLECTION, schema=row_schema(dim), consistency_level="Session")


def payload(first: int, n: int, seed: int) -> tuple[list, list, list]:
    ids = np.arange(first, first + n, dtype=np.int64)
    targets = np.random.default_rng([seed, 7, first]).integers(0, 49152, size=n)
    return ids.tolist(), targets.tolist(), (ids % DOC_LEN).tolist()


def ingest(client, keys, start: int, stop: int, truth: ExactTopK, batch: int, seed: int) -> dict:
    """Insert rows ``[start, stop)``, feeding them to the ground truth too; then flush."""
    insert_s, t0, last = 0.0, time.perf_counter(), time.monotonic()
    for first, block in keys.rows(start, stop, batch):
        ids, targets, positions = payload(first, len(block), seed)
        rows = [{"id": i, "key": k, "target": t, "doc_id": f"doc{i // DOC_LEN:08d}", "position": p}
                for i, k, t, p in zip(ids, block, targets, positions)]
        t = time.perf_counter()
        client.insert(COLLECTION, rows)
        insert_s += time.perf_counter() - t
        truth.add(first, block)
        if time.monotonic() - last > 30:
            done = first + len(block) - start
            log.info("ingest %d/%d rows (%.0f rows/s in insert calls)", done, stop - start, done / insert_s)
            last = time.monotonic()
    t = time.perf_counter()
    client.flush(COLLECTION)
    flush_s = time.perf_counter() - t
    n = stop - start
    return {"rows": n, "insert_s": insert_s, "flush_s": flush_s, "wall_s": time.perf_counter() - t0,
            "entries_per_s": n / (insert_s + flush_s)}


def index_request(itype: str, dim: int, k: int, args, nprobe: int | None = None) -> tuple[dict, dict]:
    """Build and search parameters, validated by knnlm-vdb's own index rules."""
    build = {"M": args.hnsw_m, "efConstruction": args.ef_construction} if itype == "HNSW" else {"nlist": args.nlist}
    if itype == "IVF_PQ":
        build["m"] = args.pq_m or dim // 4
    nprobe = args.nprobes[0] if nprobe is None else nprobe
    search = {"ef": max(k, args.ef)} if itype == "HNSW" else {"nprobe": min(nprobe, args.nlist)}
    cfg = validate_index(itype, build, search, k=k, deployment="server-cpu", dim=dim)
    return cfg.build_params, cfg.search_params


def skip_reason(itype: str, size: int, dim: int, args, rows: list[dict], deadline: float) -> str | None:
    """Why a configuration is not run: a size limit, memory, or the time left (from the measured growth)."""
    if size > args.limits.get(itype, size):
        return f"{itype} is limited to {args.limits[itype]:,} entries (--limits): its build takes too long on this machine"
    done = [r for r in rows if r["index"] == itype and r.get("status") == "ok"]
    if done:  # build + load + queries grow about linearly with size
        last = done[-1]
        est = (last["build_s"] + last["load_s"] + last["query_s"]) * size / last["size"]
        left = deadline - time.monotonic()
        if est > left:
            return (f"estimated {est:.0f}s (linear growth from {last['size']:,} entries) exceeds the "
                    f"{max(0, left):.0f}s left of --budget-min {args.budget_min:g}")
    est = size * (2 * 4 * dim + 200) / GIB  # raw vectors + an index as large + payload, loaded
    if est > args.max_server_gib:
        return f"estimated loaded server memory {est:.1f} GiB exceeds --max-server-gib {args.max_server_gib}"
    return None


def measure_queries(client, queries: np.ndarray, truth: ExactTopK, itype: str, dim: int, args,
                    nprobe: int | None = None, nqs: list[int] | None = None) -> dict:
    """Latency p50/p99 per (k, nq) over ``--calls`` timed calls, and recall@k of every query."""
    out = {}
    for k in args.ks:
        _, search = index_request(itype, dim, k, args, nprobe)
        request = {"metric_type": "L2", "params": search}
        want = truth.truth(k)
        for nq in nqs or args.nqs:
            found = np.full((len(queries), k), -1, dtype=np.int64)
            lat = []
            calls = max(args.calls, -(-len(queries) // nq))
            for c in range(calls + 1):  # call 0 warms up and is not timed
                lo = (c * nq) % len(queries)
                sel = np.arange(lo, lo + nq) % len(queries)
                t = time.perf_counter()
                res = client.search(COLLECTION, data=queries[sel], limit=k, anns_field="key",
                                    search_params=request, output_fields=[], consistency_level="Session")
                dt = time.perf_counter() - t
                if c:
                    lat.append(dt)
                for qi, hits in zip(sel, res):
                    ids = np.asarray(hits.ids, dtype=np.int64)[:k]
                    found[qi, :len(ids)] = ids
            lat_ms = np.array(lat) * 1e3
            out[f"k{k}_nq{nq}"] = {"p50_ms": float(np.percentile(lat_ms, 50)),
                                   "p99_ms": float(np.percentile(lat_ms, 99)), "calls": len(lat),
                                   "queries_per_s": nq * len(lat) / float(np.sum(lat))}
            out[f"recall@{k}"] = recall(found, want)
        out[f"search_params_k{k}"] = search
    return out


def run_index(client, server, sampler, queries, truth, itype: str, size: int, dim: int, args) -> dict:
    """Build one index over the ``size`` flushed rows, load, search, release and drop it."""
    build, _ = index_request(itype, dim, max(args.ks), args)
    data_dir = server.base_dir / "data"
    files_before = dir_bytes(data_dir, "index_files")
    sampler.reset()
    params = client.prepare_index_params()
    params.add_index(field_name="key", index_name="key", index_type=itype, metric_type="L2", params=build)
    t = time.perf_counter()
    client.create_index(COLLECTION, params)
    state = wait_for_index(client, COLLECTION, timeout_s=args.build_timeout, poll_s=1.0)
    build_s = time.perf_counter() - t
    row = {"size": size, "index": itype, "dim": dim, "build_params": build}
    if not index_done(state):
        client.drop_index(COLLECTION, "key")
        return {**row, "status": "skipped", "reason": f"index build exceeded --build-timeout {args.build_timeout:.0f}s "
                f"({state.get('indexed_rows')} of {state.get('total_rows')} rows indexed)"}
    build_peak = sampler.peak
    index_bytes = dir_bytes(data_dir, "index_files") - files_before
    rss_released = tree_rss(server.pid)
    t = time.perf_counter()
    client.load_collection(COLLECTION)
    load_s = time.perf_counter() - t
    rss_loaded = tree_rss(server.pid)
    row.update(status="ok", build_s=build_s, load_s=load_s, rss_released_gib=rss_released / GIB,
               rss_loaded_gib=rss_loaded / GIB, rss_build_peak_gib=build_peak / GIB,
               loaded_bytes_per_entry=(rss_loaded - rss_released) / size, index_file_bytes_per_entry=index_bytes / size)
    log.info("%s @ %d: built in %.1fs, loaded in %.1fs, server RSS %.2f GiB", itype, size, build_s, load_s,
             rss_loaded / GIB)
    t = time.perf_counter()
    row.update(measure_queries(client, queries, truth, itype, dim, args))
    if itype != "HNSW":  # the recall/latency trade-off of nprobe, without a rebuild
        row["nprobe_sweep"] = {str(p): measure_queries(client, queries, truth, itype, dim, args, p, args.nqs[-1:])
                               for p in args.nprobes[1:]}
    row["query_s"] = time.perf_counter() - t
    row["rss_peak_gib"] = sampler.peak / GIB
    row["loadavg"] = os.getloadavg()
    client.release_collection(COLLECTION)
    client.drop_index(COLLECTION, "key")
    return row


def probe_project_add(uri: str, keys, rows: int, seed: int) -> dict:
    """Entries/s through knnlm-vdb's own ``MilvusDatastore.add`` (id look-up + upsert), on a side domain."""
    info = StoreInfo(model="scale-probe", key_type="synthetic", dim=keys.dim, tokenizer="none", vocab_size=49152)
    store = MilvusDatastore.create(uri, "scale_probe", info, index_type="IVF_FLAT", k=64)
    t = time.perf_counter()
    try:
        for first, block in keys.rows(0, rows, 10_000):
            ids, targets, positions = payload(first, len(block), seed)
            store.add(ids, block, targets, [f"doc{i // DOC_LEN:08d}" for i in ids], positions)
        store.seal()
        seconds = time.perf_counter() - t
    finally:
        store.close()
        drop_domain(uri, "scale_probe")
    return {"rows": rows, "seconds": seconds, "entries_per_s": rows / seconds}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-keys", default=str(CACHE / "gen-pydocs-120000-flat"),
                   help="FAISS flat datastore whose keys are resampled")
    p.add_argument("--real-limit", type=int, default=None, help="use at most this many real keys")
    p.add_argument("--random-keys", type=int, default=0,
                   help="develop without real keys: this many Gaussian 576-d stand-ins (results say so)")
    p.add_argument("--sizes", default="1000000,3000000,10000000")
    p.add_argument("--indexes", default="IVF_SQ8,IVF_FLAT,HNSW,IVF_PQ", help="in order of importance (budget)")
    p.add_argument("--dim", type=int, default=64, help="PCA dimension of the stored keys")
    p.add_argument("--noise", type=float, default=0.5, help="noise norm / median nearest-neighbour distance")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--ks", default="64,1024")
    p.add_argument("--nqs", default="8,32")
    p.add_argument("--calls", type=int, default=32, help="timed search calls per (k, nq)")
    p.add_argument("--nlist", type=int, default=256, help="IVF lists per segment (Milvus indexes each segment)")
    p.add_argument("--nprobe", default="16,4,64", help="IVF nprobe: the first for the table, the rest a recall sweep")
    p.add_argument("--pq-m", type=int, default=0, help="IVF_PQ sub-quantisers (default dim/4: 4 dims per byte)")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--ef", type=int, default=128, help="HNSW ef (at least k)")
    p.add_argument("--limits", default="HNSW=1000000,IVF_PQ=1000000",
                   help="largest size per index type (builds that take too long on 2 cores)")
    p.add_argument("--max-server-gib", type=float, default=10.0)
    p.add_argument("--budget-min", type=float, default=60.0,
                   help="wall-time budget: configurations estimated not to fit are recorded as skipped")
    p.add_argument("--build-timeout", type=float, default=900.0)
    p.add_argument("--segment-mb", type=int, default=1024, help="Milvus dataCoord.segment.maxSize (MB)")
    p.add_argument("--batch", type=int, default=10_000, help="rows per insert call")
    p.add_argument("--probe-rows", type=int, default=20_000, help="rows through MilvusDatastore.add (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results name (default scale-milvus-d<dim>)")
    p.add_argument("--keep-data", action="store_true", help="keep the server's data directory")
    args = p.parse_args(argv)
    args.sizes = sorted(int(float(s)) for s in args.sizes.split(","))
    args.indexes = [s.strip().upper() for s in args.indexes.split(",") if s.strip()]
    bad = sorted(set(args.indexes) - set(INDEXES))
    if bad:
        p.error(f"unknown --indexes {', '.join(bad)}; choose from {', '.join(INDEXES)}")
    args.limits = {k.strip().upper(): int(float(v)) for k, v in (x.split("=") for x in args.limits.split(",") if x)}
    args.nprobes = [int(x) for x in args.nprobe.split(",")]
    args.ks = [int(k) for k in args.ks.split(",")]
    args.nqs = [int(n) for n in args.nqs.split(",")]
    args.name = args.name or f"scale-milvus-d{args.dim}"
    return args


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    stop_on_sigterm()
    if args.random_keys:
        real = np.random.default_rng(args.seed).standard_normal((args.random_keys, 576), dtype=np.float32)
    else:
        real = read_real_keys(args.real_keys, args.real_limit)
    keys, queries, recipe = make_keys(real, args.dim, args.noise, args.queries, args.seed)
    if args.random_keys:
        recipe["source"] = f"{args.random_keys} Gaussian random 576-d vectors (development run, not real keys)"
    else:
        recipe["real_keys_path"] = str(args.real_keys)
    del real
    args.queries_np = queries
    log.info("keys: %s", recipe)
    meta = {"cpus": os.cpu_count(), "mem_gib": psutil.virtual_memory().total / GIB,
            "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "loadavg_start": os.getloadavg(), "segment_max_mb": args.segment_mb}
    truth = ExactTopK(queries, max(args.ks))
    base = CACHE / "scale-milvus"
    shutil.rmtree(base, ignore_errors=True)
    deadline = time.monotonic() + 60 * args.budget_min
    server = MilvusTestServer(base, settings={"dataCoord.segment.maxSize": args.segment_mb})
    rows: list[dict] = []
    try:
        uri = server.start(timeout_s=300)
        sampler = RssSampler(server.pid)
        sampler.start()
        from pymilvus import MilvusClient

        client = MilvusClient(uri=uri, timeout=60)
        meta["server_version"] = client.get_server_version()
        meta["rss_idle_gib"] = tree_rss(server.pid) / GIB
        if args.probe_rows:
            meta["project_add"] = probe_project_add(uri, keys, args.probe_rows, args.seed)
            log.info("MilvusDatastore.add: %.0f entries/s", meta["project_add"]["entries_per_s"])
        create_collection(client, keys.dim)
        meta["doc_id_index"] = ensure_doc_id_index(client, COLLECTION, "server", strict=False)
        done, ingest_s = 0, 0.0
        for size in args.sizes:
            rate = rows[-1]["ingest_entries_per_s"] if rows else None
            left = deadline - time.monotonic()
            if rate and (size - done) / rate > left:
                reason = (f"ingesting {size - done:,} more entries at {rate:.0f}/s would exceed the {left:.0f}s left "
                          f"of --budget-min {args.budget_min:g}")
                rows += [{"size": size, "index": i, "dim": keys.dim, "status": "skipped", "reason": reason}
                         for i in args.indexes]
                save(args, recipe, meta, rows)
                break
            step = ingest(client, keys, done, size, truth, args.batch, args.seed)
            ingest_s += step["insert_s"] + step["flush_s"]
            done = size
            log.info("size %d: ingested %d rows at %.0f entries/s", size, step["rows"], step["entries_per_s"])
            for itype in args.indexes:
                common = {"size": size, "index": itype, "dim": keys.dim, "ingest_entries_per_s": step["entries_per_s"],
                          "ingest_total_s": ingest_s, "ingest_step": step}
                reason = skip_reason(itype, size, keys.dim, args, rows, deadline)
                if reason:
                    rows.append({**common, "status": "skipped", "reason": reason})
                else:
                    rows.append({**common, **run_index(client, server, sampler, queries, truth, itype, size,
                                                       keys.dim, args)})
                save(args, recipe, meta, rows)
    except KeyboardInterrupt:
        log.warning("interrupted: results so far are in benchmarks/results/%s.*", args.name)
        raise SystemExit(130)
    finally:
        server.stop()
        if not args.keep_data:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
