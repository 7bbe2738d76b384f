"""Ingest throughput: datastore entries/s against the encoder's tokens/s, for FAISS, Milvus Lite and a Milvus server.

    python benchmarks/ingest.py [--corpus ../shared/corpora/pydocs/train.txt] [--max-tokens 20000] \\
        [--model smollm2-135m] [--systems faiss,lite,server] [--server-uri http://host:19530]

Each system gets a fresh, empty datastore (FAISS flat with float16 keys as the CLI builds it;
Milvus FLAT, as ``append`` creates a domain) and the same ``ingest()`` run over the first
--max-tokens tokens of the corpus, with the same encoder. ``ingest()`` stores block i in a
writer thread while the LM encodes block i+1, and reports the time in the LM
(encode_seconds), in the datastore (store_seconds: add() calls, per-chunk flushes and ledger
commits) and the wall clock (seconds). From those:

  * encoder tokens/s    tokens / encode_seconds: what the model alone sustains;
  * store entries/s     tokens / store_seconds: what the datastore alone absorbs;
  * ingest entries/s    tokens / seconds: what an append achieves;
  * overlap bound       tokens / max(encode, store): the best a perfect overlap could reach;
  * overlap gain        (encode + store) / seconds: how much the overlap saved over encoding
                        and storing one after the other (1.0: nothing overlapped).

Closing the store (sealing; the server then builds the index) is timed apart. The Milvus
server is started here (tests/milvus_server.py) unless --server-uri names one; its domain is
dropped afterwards. Writes benchmarks/results/ingest-<corpus>-<tokens>.{json,md}.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import CACHE, CORPORA, markdown_table, parse_systems, setup_logging, stop_on_sigterm, write_results

from knnlm_vdb.corpus import Document, read_corpora
from knnlm_vdb.datastore import StoreInfo, create_store
from knnlm_vdb.encoder import Encoder
from knnlm_vdb.ingest import ingest
from knnlm_vdb.lm import load_lm
from knnlm_vdb.settings import DEFAULTS

log = logging.getLogger("ingest_bench")
SYSTEMS = ("faiss", "lite", "server")
CHARS_PER_TOKEN_CAP = 12  # text kept per requested token, so a 9 MB corpus is not tokenized in full


def capped_documents(path: str, max_tokens: int) -> list[Document]:
    """The corpus's documents, cut to about what --max-tokens needs (ingest stops at max_tokens anyway)."""
    budget = max_tokens * CHARS_PER_TOKEN_CAP
    docs = []
    for doc in read_corpora([path]):
        if budget <= 0:
            break
        docs.append(Document(doc_id=doc.doc_id, text=doc.text[:budget]))
        budget -= len(docs[-1].text)
    return docs


def run_one(system: str, enc: Encoder, docs: list[Document], max_tokens: int, work: Path, server_uri: str | None,
            show_progress: bool) -> dict:
    info = StoreInfo.for_encoder(enc)
    domain = f"ingest_{uuid.uuid4().hex[:8]}"
    cleanup = None
    if system == "faiss":
        path = work / f"{domain}-faiss"
        store = create_store("faiss", str(path), info, domain=domain, index="flat", key_dtype=DEFAULTS["key_dtype"])
        cleanup = lambda: shutil.rmtree(path, ignore_errors=True)  # noqa: E731
    elif system == "lite":
        uri = str(work / f"{domain}.db")
        store = create_store("milvus", uri, info, domain=domain, index_type="FLAT")

        def cleanup():
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)
            shutil.rmtree(uri, ignore_errors=True)
    else:
        from knnlm_vdb.datastore.milvus import drop_domain

        store = create_store("milvus", server_uri, info, domain=domain, index_type="FLAT")
        cleanup = lambda: drop_domain(server_uri, domain)  # noqa: E731
    try:
        report = ingest(enc, store, docs, domain=domain, max_tokens=max_tokens, show_progress=show_progress)
        t = time.perf_counter()
        store.close()
        close_s = time.perf_counter() - t
    finally:
        if cleanup is not None:
            cleanup()
    r = report.to_dict()
    tokens = report.tokens
    return {
        "system": {"faiss": "FAISS flat (float16 keys)", "lite": "Milvus Lite FLAT", "server": "Milvus server FLAT"}[system],
        "tokens": tokens, "chunks": report.chunks_done, "encode_seconds": report.encode_seconds,
        "store_seconds": report.store_seconds, "close_seconds": close_s,
        "encoder_tokens_per_s": tokens / report.encode_seconds if report.encode_seconds else None,
        "store_entries_per_s": tokens / report.store_seconds if report.store_seconds else None,
        "ingest_entries_per_s": r["ingest_entries_per_s"],
        "bottleneck": "store" if report.store_seconds > report.encode_seconds else "encoder",
        "overlap_bound_entries_per_s": tokens / max(report.encode_seconds, report.store_seconds)
        if max(report.encode_seconds, report.store_seconds) else None,
        "overlap_gain": (report.encode_seconds + report.store_seconds) / report.seconds if report.seconds else None,
        "report": r,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(CORPORA / "pydocs" / "train.txt"), help="text or JSONL file")
    ap.add_argument("--max-tokens", type=int, default=20_000, help="entries to ingest per system")
    ap.add_argument("--model", default=DEFAULTS["model"])
    ap.add_argument("--key-type", default=DEFAULTS["key_type"])
    ap.add_argument("--ctx", type=int, default=DEFAULTS["ctx"])
    ap.add_argument("--stride", type=int, default=DEFAULTS["stride"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--device", default=DEFAULTS["device"])
    ap.add_argument("--dtype", default=DEFAULTS["dtype"])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    ap.add_argument("--server-uri", default=None, help="use this Milvus server instead of starting one")
    ap.add_argument("--work-dir", default=str(CACHE / "ingest-bench"), help="scratch datastores and the server's data")
    ap.add_argument("--name", default=None, help="results file name [default: ingest-<corpus>-<max tokens>]")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    setup_logging()
    stop_on_sigterm()
    systems = parse_systems(args.systems, SYSTEMS)
    if not Path(args.corpus).is_file():
        raise SystemExit(f"corpus not found: {args.corpus} (give --corpus PATH)")

    docs = capped_documents(args.corpus, args.max_tokens)
    enc = Encoder(load_lm(args.model, device=args.device, dtype=args.dtype), key_type=args.key_type, ctx=args.ctx,
                  stride=args.stride, batch_size=args.batch_size)
    warm = enc.tokenize(docs[0].text[: 8 * args.ctx])[: 2 * args.ctx]
    for _ in enc.encode(warm, with_logprobs=False):  # warm-up: the first forward pass is not measured
        pass

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    server, server_uri = None, args.server_uri
    if "server" in systems and not server_uri:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from milvus_server import MilvusTestServer

        server = MilvusTestServer(tempfile.mkdtemp(prefix="milvus-server-", dir=work))
        server_uri = server.start(timeout_s=300)
    rows = []
    try:
        for system in systems:
            log.info("== %s", system)
            rows.append(run_one(system, enc, docs, args.max_tokens, work, server_uri, not args.no_progress))
    finally:
        if server is not None:
            server.stop()

    corpus = Path(args.corpus).parent.name if Path(args.corpus).stem in ("train", "valid", "test") else Path(args.corpus).stem
    title = (f"**Ingest throughput**: {rows[0]['tokens']:,} tokens of {args.corpus} per system, model {args.model} "
             f"({enc.lm.hidden_size}-d {args.key_type} keys), ctx {args.ctx} / stride {args.stride}, batch "
             f"{args.batch_size}, device {enc.lm.device}. ingest() stores block i while encoding block i+1; the "
             f"overlap bound is tokens / max(encode, store) seconds, the gain (encode + store) / wall seconds.\n\n")
    table = title + markdown_table(rows, [
        ("system", "system", ""), ("tokens", "entries", ","), ("encoder_tokens_per_s", "encoder tokens/s", ".0f"),
        ("store_entries_per_s", "store entries/s", ".0f"), ("ingest_entries_per_s", "ingest entries/s", ".0f"),
        ("overlap_bound_entries_per_s", "overlap bound entries/s", ".0f"), ("overlap_gain", "overlap gain", ".2f"),
        ("bottleneck", "bottleneck", ""), ("close_seconds", "close s", ".2f")])
    name = args.name or f"ingest-{corpus}-{args.max_tokens}"
    write_results(name, {"args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
