"""Serving throughput and latency: requests/s and p50/p99 at 1, 4 and 16 concurrent clients,
with the batcher on and off.

    python benchmarks/serve_load.py [--model smollm2-135m] [--datastore DIR] [--clients 1,4,16]

The server is ``knnlm-vdb serve`` in its own process (as deployed); clients are threads here,
one channel each, sending Score requests of about ``--request-chars`` characters cut from
the bundled held-out tutorial chapters. "off" is ``--max-batch 1``: every request gets its
own LM forward and search. Without ``--datastore`` a FAISS datastore is built once from the
bundled training chapters into benchmarks/cache/. Writes benchmarks/results/serve_load.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import CACHE, markdown_table, setup_logging, write_results

from knnlm_vdb.corpus import read_documents
from knnlm_vdb.demo import sample_file

MODES = {"on": ["--max-batch", "32", "--batch-wait-ms", "5"], "off": ["--max-batch", "1", "--batch-wait-ms", "0"]}


def knnlm_vdb(*args: str) -> list[str]:
    return [sys.executable, "-m", "knnlm_vdb", *args]


def model_args(a) -> list[str]:
    return ["--model", a.model, "--ctx", str(a.ctx), "--stride", str(a.stride)]


def ensure_datastore(a) -> Path:
    if a.datastore:
        return Path(a.datastore)
    tag = "".join(c if c.isalnum() else "-" for c in Path(a.model).name)
    path = CACHE / f"serve-demo-{tag}-c{a.ctx}s{a.stride}"
    if not (path / "meta.json").exists():
        partial = path.with_suffix(".partial")
        subprocess.run(knnlm_vdb("build", *model_args(a), "--corpus", str(sample_file("demo_train.jsonl")),
                                 "--out", str(partial), "--json"), check=True, stdout=subprocess.DEVNULL)
        partial.rename(path)
    return path


def request_texts(chars: int) -> list[str]:
    texts = []
    for name in ("demo_valid.jsonl", "demo_test.jsonl"):
        for doc in read_documents(sample_file(name)):
            texts += [doc.text[i:i + chars] for i in range(0, len(doc.text) - chars // 2, chars)]
    return texts


class Server:
    """``knnlm-vdb serve`` on a free local port."""

    def __init__(self, a, datastore: Path, mode: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KNNLM_")}
        self.proc = subprocess.Popen(
            knnlm_vdb("serve", *model_args(a), "--datastore", str(datastore), "--host", "127.0.0.1", "--port", "0",
                      "--insecure", "--max-workers", "32", "--max-concurrent", "32", *MODES[mode]),
            stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            self.proc.kill()
            raise SystemExit(f"serve did not start: {line}")
        self.target = "127.0.0.1:" + line.split()[2].rsplit(":", 1)[1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def run_load(target: str, texts: list[str], clients: int, per_client: int) -> dict:
    from knnlm_vdb.service.client import KnnlmClient

    latencies, errors, tokens = [], [], [0]
    lock = threading.Lock()

    def one(c: int):
        with KnnlmClient(target, timeout=600) as client:
            for i in range(per_client):
                text = texts[(c * per_client + i) % len(texts)]
                t = time.perf_counter()
                try:
                    r = client.score(text)
                except Exception as exc:  # counted and reported, the run goes on
                    with lock:
                        errors.append(repr(exc)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
                    tokens[0] += r.scored_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": wall,
            "rps": len(latencies) / wall, "tokens_per_s": tokens[0] / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "first_error": errors[0] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--datastore", default=None, help="FAISS datastore built with --model (default: build one)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    ap.add_argument("--requests-per-client", type=int, default=16)
    ap.add_argument("--request-chars", type=int, default=600, help="characters per Score text (~150 tokens)")
    ap.add_argument("--modes", default="on,off", help="batching modes to run: on, off")
    ap.add_argument("--name", default="serve_load", help="results file name")
    a = ap.parse_args()
    setup_logging()
    datastore = ensure_datastore(a)
    texts = request_texts(a.request_chars)
    rows = []
    for mode in a.modes.split(","):
        server = Server(a, datastore, mode)
        try:
            run_load(server.target, texts, 2, 2)  # warm-up: first calls pay lazy initialisation
            for clients in (int(c) for c in a.clients.split(",")):
                row = {"batching": mode, **run_load(server.target, texts, clients, a.requests_per_client)}
                rows.append(row)
                print(f"batching {mode:3} clients {clients:2}: {row['rps']:.1f} req/s  p50 {row['p50_ms']:.0f} ms  "
                      f"p99 {row['p99_ms']:.0f} ms  errors {row['errors']}", flush=True)
        finally:
            server.stop()
    table = markdown_table(rows, [("batching", "batching", ""), ("clients", "clients", "d"),
                                  ("requests", "requests", "d"), ("errors", "errors", "d"), ("rps", "req/s", ".1f"),
                                  ("tokens_per_s", "tokens/s", ".0f"), ("p50_ms", "p50 ms", ".0f"),
                                  ("p99_ms", "p99 ms", ".0f")])
    write_results(a.name, {"model": a.model, "datastore": str(datastore), "ctx": a.ctx, "stride": a.stride,
                           "request_chars": a.request_chars, "cpus": os.cpu_count(), "rows": rows}, table)


if __name__ == "__main__":
    main()
